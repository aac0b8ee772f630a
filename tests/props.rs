//! Property tests of the config parser and the argv builder, with a fixed case count and a
//! fixed seed (no persistence files), so CI runs the same cases every time.
//!
//! (a) The parser never panics, on arbitrary text and on TOML-shaped text.
//! (b) Every accepted service yields an `apptainer instance start` argv that, read back the
//!     way Apptainer's own CLI reads it, gives the same settings that were written in the
//!     file. The reader below is a model of Apptainer's flag handling, each rule citing the
//!     Apptainer source it follows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use apptainer_supervisor::config;
use apptainer_supervisor::plan::argv;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn cfg(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x5eed_a551),
        failure_persistence: None,
        ..Config::default()
    }
}

fn parse(text: &str) -> Result<config::Service, config::ConfigError> {
    config::parse(text, Path::new("/etc/apptainer-supervisor/p.toml"), None)
}

// ---------------------------------------------------------------------------------------
// (a) no panic

/// Lines that look like service files: known keys and tables with values of every type.
fn tomlish() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("name"),
        Just("service_dir"),
        Just("image"),
        Just("boot"),
        Just("hostname"),
        Just("binds"),
        Just("env_file"),
        Just("size_mib"),
        Just("path"),
        Just("args"),
        Just("type"),
        Just("master"),
        Just("addresses"),
        Just("required_units"),
        Just("mode"),
        Just("start_sec"),
        Just("x"),
    ];
    let value = prop_oneof![
        any::<String>().prop_map(|s| toml_str(&s)),
        "[/a-z${}_.:, é^\\\\-]{0,12}".prop_map(|s| toml_str(&s)),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        proptest::collection::vec("[/a-z${}:=;,.é -]{0,8}".prop_map(|s| toml_str(&s)), 0..4)
            .prop_map(|v| format!("[{}]", v.join(", "))),
        "[^\n]{0,10}",
    ];
    let line = prop_oneof![
        (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        prop_oneof![
            Just("[overlay]"),
            Just("[[network]]"),
            Just("[network.ipam]"),
            Just("[apptainer]"),
            Just("[readiness]"),
            Just("[timeouts]"),
            Just("[env]"),
            Just("[x"),
        ]
        .prop_map(str::to_owned),
        "[^\n]{0,20}",
    ];
    proptest::collection::vec(line, 0..12).prop_map(|l| l.join("\n"))
}

proptest! {
    #![proptest_config(cfg(256))]

    #[test]
    fn parser_never_panics_on_any_text(text in any::<String>()) {
        let _ = parse(&text);
    }

    #[test]
    fn parser_never_panics_on_toml_shaped_text(text in tomlish()) {
        if let Err(e) = parse(&text) {
            // Every message names the file and a position.
            prop_assert!(e.to_string().starts_with("/etc/apptainer-supervisor/p.toml:"), "{}", e);
        }
    }
}

// ---------------------------------------------------------------------------------------
// (b) argv round trip

/// What a valid service file sets, as the test meant it (not as config.rs read it).
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    service_dir: String,
    image: Option<String>,
    boot: bool,
    hostname: Option<String>,
    /// (source as written, destination, option)
    binds: Vec<(String, Option<String>, Option<&'static str>)>,
    /// (name, args)
    networks: Vec<(String, Vec<String>)>,
    overlay: Option<String>,
    env: BTreeMap<String, String>,
    writable_tmpfs: bool,
}

/// Characters some Apptainer parser gives a meaning to (CSV, bind pieces, escapes): the
/// generator mixes them in so that the round trip meets them; a file holding one may be
/// refused, and is then not a counterexample.
const TRICKY: &[char] = &['^', '\\', '"', ',', ';', '\t', '\n'];

/// One path component: printable, non-ASCII included, now and then a tricky character.
fn component() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_é@+^\\\\\",;\t][a-zA-Z0-9 _.é@+=^\\\\\",;\t-]{0,6}[a-zA-Z0-9_é]?"
}

fn abs_path() -> impl Strategy<Value = String> {
    proptest::collection::vec(component(), 1..4).prop_map(|c| format!("/{}", c.join("/")))
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}"
}

fn spec() -> impl Strategy<Value = Spec> {
    let bind = (
        prop_oneof![
            abs_path(),
            component().prop_map(|c| format!("${{service_dir}}/{c}"))
        ],
        proptest::option::of(abs_path()),
        prop_oneof![Just(None), Just(Some("ro")), Just(Some("rw"))],
    )
        .prop_map(|(src, dst, opt)| (src, dst.clone(), dst.and(opt)));
    let network = (
        name(),
        proptest::collection::vec("[A-Z][A-Z0-9_]{0,5}=[a-zA-Z0-9./:_@ ,\"=-]{0,10}", 0..3),
    );
    (
        (
            name(),
            abs_path(),
            proptest::option::of(abs_path()),
            any::<bool>(),
            proptest::option::of("[a-z][a-z0-9-]{0,10}"),
        ),
        (
            proptest::collection::vec(bind, 0..5),
            proptest::collection::vec(network, 0..4),
            proptest::option::of(prop_oneof![abs_path(), component()]),
            proptest::collection::btree_map("[A-Za-z_][A-Za-z0-9_]{0,6}", any::<String>(), 0..4),
            any::<bool>(),
        ),
    )
        .prop_map(
            |((name, service_dir, image, boot, hostname), (binds, networks, overlay, env, wt))| {
                Spec {
                    name,
                    service_dir,
                    image,
                    boot,
                    hostname,
                    binds,
                    networks,
                    overlay,
                    env,
                    writable_tmpfs: wt,
                }
            },
        )
        .prop_map(|mut s| {
            // Distinct bind targets and network names: duplicates are errors by design.
            let sd = s.service_dir.clone();
            let mut seen = Vec::new();
            s.binds.retain(|(src, dst, _)| {
                let t = PathBuf::from(dst.clone().unwrap_or_else(|| expand(src, &sd)));
                let fresh = !seen.contains(&t);
                seen.push(t);
                fresh
            });
            let mut names = Vec::new();
            s.networks.retain(|(n, _)| {
                // "none" is Apptainer's "no network", refused as a network name.
                let fresh = !names.contains(n) && n != "none";
                names.push(n.clone());
                fresh
            });
            s
        })
}

fn expand(s: &str, service_dir: &str) -> String {
    s.replace("${service_dir}", service_dir)
}

/// A TOML basic string, escaped by the toml crate itself.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn render(s: &Spec) -> String {
    let mut t = format!(
        "name = {}\nservice_dir = {}\nboot = {}\n",
        toml_str(&s.name),
        toml_str(&s.service_dir),
        s.boot
    );
    if let Some(i) = &s.image {
        t += &format!("image = {}\n", toml_str(i));
    }
    if let Some(h) = &s.hostname {
        t += &format!("hostname = {}\n", toml_str(h));
    }
    let binds: Vec<String> = s
        .binds
        .iter()
        .map(|(src, dst, opt)| {
            let mut b = src.clone();
            if let Some(d) = dst {
                b += &format!(":{d}");
                if let Some(o) = opt {
                    b += &format!(":{o}");
                }
            }
            toml_str(&b)
        })
        .collect();
    t += &format!("binds = [{}]\n", binds.join(", "));
    if !s.boot {
        t += "[readiness]\nmode = \"instance\"\n";
    }
    t += "[env]\n";
    for (k, v) in &s.env {
        t += &format!("{k} = {}\n", toml_str(v));
    }
    t += "[overlay]\n";
    if let Some(o) = &s.overlay {
        t += &format!("path = {}\n", toml_str(o));
    }
    t += "[apptainer]\n";
    if s.writable_tmpfs {
        t += "extra_args = [\"--writable-tmpfs\"]\n";
    }
    for (n, args) in &s.networks {
        let args: Vec<String> = args.iter().map(|a| toml_str(a)).collect();
        t += &format!(
            "[[network]]\nname = {}\nexternal = true\nargs = [{}]\n",
            toml_str(n),
            args.join(", ")
        );
    }
    t
}

/// One bind as Apptainer reads it: source, destination, option.
type BindRead = (PathBuf, PathBuf, Option<&'static str>);

/// The settings an `apptainer instance start` argv carries.
#[derive(Debug, Default, PartialEq, Eq)]
struct Settings {
    binary: String,
    boot: bool,
    writable_tmpfs: bool,
    hostname: Option<String>,
    networks: Vec<String>,
    /// network → its KEY=VALUE pairs, in order
    network_args: BTreeMap<String, Vec<(String, String)>>,
    /// (source, destination, read-only)
    binds: Vec<BindRead>,
    overlays: Vec<String>,
    image: PathBuf,
    name: String,
}

/// pflag's StringSlice reads each value as one CSV record (pflag string_slice.go
/// `readAsCSV`, encoding/csv with default settings): a bare '"' is an error, a line break
/// ends the record, ',' separates fields.
fn read_as_csv(v: &str) -> Result<Vec<String>, String> {
    if v.contains('"') {
        return Err(format!("CSV quoting in {v:?}"));
    }
    if v.contains(['\n', '\r']) {
        return Err(format!("line break in {v:?}"));
    }
    Ok(v.split(',').map(str::to_owned).collect())
}

/// Apptainer's `ParseBindPath` (pkg/runtime/engine/apptainer/config/bind.go) for values
/// without escapes: pieces are the matches of `([^,^:]+:?)`, each trimmed with
/// strings.TrimSpace; a piece ending in ':' continues the bind; then `newBindPath` splits on
/// ':' into source, destination (default: the source) and ','-separated options.
fn parse_bind_value(v: &str) -> Result<Vec<BindRead>, String> {
    if v.contains('\\') {
        return Err(format!("escape in {v:?} (not modelled)"));
    }
    let mut pieces = Vec::new();
    let mut cur = String::new();
    for c in v.chars() {
        match c {
            ',' | '^' => {
                if !cur.is_empty() {
                    pieces.push(std::mem::take(&mut cur));
                }
            }
            ':' => {
                if !cur.is_empty() {
                    cur.push(':');
                    pieces.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        pieces.push(cur);
    }
    let is_option =
        |s: &str| s == "ro" || s == "rw" || s.starts_with("id=") || s.starts_with("image-src=");
    let mut out = Vec::new();
    let mut bind = String::new();
    let mut elem = 0;
    let finish = |bind: &str| -> Result<BindRead, String> {
        let parts: Vec<&str> = bind.split(':').collect();
        if parts[0].is_empty() {
            return Err(format!("empty bind source in {bind:?}"));
        }
        let src = PathBuf::from(parts[0]);
        let dst = parts.get(1).map_or(src.clone(), PathBuf::from);
        let opt = match parts.get(2).copied() {
            None => None,
            Some("ro") => Some("ro"),
            Some("rw") => Some("rw"),
            Some(o) => return Err(format!("{o} is not a valid bind option")),
        };
        Ok((src, dst, opt))
    };
    // The loop of ParseBindPath, less the escape branches (a '\\' was refused above).
    for m in pieces {
        let s = m.trim();
        if elem == 2 && !is_option(s) {
            out.push(finish(&bind)?);
            elem = 0;
            bind.clear();
        }
        if elem == 0 && bind.is_empty() {
            bind = s.to_owned();
        }
        let colon = bind.ends_with(':');
        if elem == 2 && is_option(s) {
            if !colon {
                bind.push(',');
            }
            bind += s;
            continue;
        } else if elem > 2 {
            return Err(format!("wrong bind syntax: {bind}"));
        }
        if !bind.is_empty() {
            if colon {
                if elem > 0 {
                    bind += s;
                }
                elem += 1;
                continue;
            }
            out.push(finish(&bind)?);
            elem = 0;
            bind.clear();
            continue;
        }
        bind = s.to_owned();
        elem += 1;
    }
    if !bind.is_empty() {
        out.push(finish(&bind)?);
    }
    Ok(out)
}

/// Apptainer's network `SetArgs` (pkg/network/network.go): `net:K=V;K2=V2`, the network
/// named before the first ':' unless a '=' comes first; `parseArg` splits the pairs on ';'
/// and each pair on every '=', wanting exactly two parts.
fn parse_network_arg(
    arg: &str,
    networks: &[String],
) -> Result<(String, Vec<(String, String)>), String> {
    let colon = arg.find(':');
    let eq = arg.find('=');
    let (net, rest) = match (colon, eq) {
        (Some(c), Some(e)) if c < e => (arg[..c].to_owned(), &arg[c + 1..]),
        (Some(c), None) => (arg[..c].to_owned(), &arg[c + 1..]),
        _ => (networks.first().cloned().unwrap_or_default(), arg),
    };
    if !networks.contains(&net) {
        return Err(format!(
            "network {net} wasn't specified in --network option"
        ));
    }
    let mut pairs = Vec::new();
    for pair in rest.split(';') {
        let kv: Vec<&str> = pair.split('=').collect();
        if kv.len() != 2 {
            return Err(format!("invalid argument: {pair}"));
        }
        pairs.push((kv[0].to_owned(), kv[1].to_owned()));
    }
    Ok((net, pairs))
}

/// `apptainer instance start [flags] IMAGE NAME`, flags as cmd/internal/cli/action_flags.go
/// declares them: `--boot` and `--writable-tmpfs` are bools, `--hostname` and `--network`
/// strings (the network list split on ','), `--network-args` and `-o|--overlay` string
/// slices, `-B|--bind` a string array (cmdline.StringArray, "to allow commas in bind path").
fn read_argv(argv: &[String]) -> Result<Settings, String> {
    let mut s = Settings {
        binary: argv[0].clone(),
        ..Settings::default()
    };
    if argv.get(1..3) != Some(&["instance".to_owned(), "start".to_owned()][..]) {
        return Err(format!("not instance start: {argv:?}"));
    }
    let mut raw_network_args = Vec::new();
    let mut positional = Vec::new();
    let mut it = argv[3..].iter();
    while let Some(a) = it.next() {
        if !positional.is_empty() || !a.starts_with('-') {
            positional.push(a.clone());
            continue;
        }
        let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--boot" => s.boot = true,
            "--writable-tmpfs" => s.writable_tmpfs = true,
            "--hostname" => s.hostname = Some(value()?),
            "--network" => s.networks = value()?.split(',').map(str::to_owned).collect(),
            "--network-args" => raw_network_args.extend(read_as_csv(&value()?)?),
            "--bind" | "-B" => s.binds.extend(parse_bind_value(&value()?)?),
            "--overlay" | "-o" => s.overlays.extend(read_as_csv(&value()?)?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    for arg in raw_network_args {
        let (net, pairs) = parse_network_arg(&arg, &s.networks)?;
        s.network_args.entry(net).or_default().extend(pairs);
    }
    match positional.as_slice() {
        [image, name] => {
            s.image = PathBuf::from(image);
            s.name = name.clone();
        }
        other => return Err(format!("want IMAGE NAME, got {other:?}")),
    }
    Ok(s)
}

/// What the spec says the argv must carry, computed from the spec alone.
fn expected(sp: &Spec) -> Settings {
    let sd = &sp.service_dir;
    let resolve = |p: &str| {
        if p.starts_with('/') {
            PathBuf::from(p)
        } else {
            Path::new(sd).join(p)
        }
    };
    Settings {
        binary: "/usr/bin/apptainer".into(),
        boot: sp.boot,
        writable_tmpfs: sp.writable_tmpfs,
        hostname: sp.hostname.clone(),
        // A booted service without networks asks for Apptainer's "none" (no CNI), rather than
        // the `bridge` that --boot would imply.
        networks: if sp.networks.is_empty() && sp.boot {
            vec!["none".to_owned()]
        } else {
            sp.networks.iter().map(|(n, _)| n.clone()).collect()
        },
        network_args: sp
            .networks
            .iter()
            .filter(|(_, a)| !a.is_empty())
            .map(|(n, a)| {
                let pairs = a
                    .iter()
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').expect("generated with a '='");
                        (k.to_owned(), v.to_owned())
                    })
                    .collect();
                (n.clone(), pairs)
            })
            .collect(),
        binds: sp
            .binds
            .iter()
            .map(|(src, dst, opt)| {
                let src = PathBuf::from(expand(src, sd));
                let dst = dst.as_ref().map_or(src.clone(), PathBuf::from);
                (src, dst, *opt)
            })
            .collect(),
        overlays: vec![
            resolve(sp.overlay.as_deref().unwrap_or("overlay/overlay.img"))
                .display()
                .to_string(),
        ],
        image: resolve(sp.image.as_deref().unwrap_or("containers/container.sif")),
        name: sp.name.clone(),
    }
}

/// A plain spec (no tricky character, no bind path ending in white space, one '=' per
/// network argument) must be accepted; others may be refused.
fn should_accept(sp: &Spec) -> bool {
    let plain = |p: &str| !p.contains(TRICKY);
    let bind_ok = |p: &str| plain(p) && !p.ends_with(char::is_whitespace);
    plain(&sp.service_dir)
        && sp.image.as_deref().is_none_or(plain)
        && sp.overlay.as_deref().is_none_or(plain)
        && sp.binds.iter().all(|(src, dst, _)| {
            bind_ok(&expand(src, &sp.service_dir)) && dst.as_deref().is_none_or(bind_ok)
        })
        && sp
            .networks
            .iter()
            .flat_map(|(_, a)| a)
            .all(|a| plain(a) && a.matches('=').count() == 1)
}

proptest! {
    #![proptest_config(cfg(192))]

    #[test]
    fn accepted_configs_round_trip_through_apptainers_argv_reader(sp in spec()) {
        let text = render(&sp);
        let service = match parse(&text) {
            Ok(s) => s,
            Err(e) => {
                prop_assert!(!should_accept(&sp), "refused a valid file:\n{}\n{}", text, e);
                return Ok(());
            }
        };
        let argv: Vec<String> = argv::instance_start(&service)
            .into_iter()
            .map(|a| a.into_string().expect("UTF-8 in, UTF-8 out"))
            .collect();
        let got = read_argv(&argv).map_err(|e| {
            TestCaseError::fail(format!("apptainer would not read {argv:?}: {e}\n{text}"))
        })?;
        prop_assert_eq!(&got, &expected(&sp), "file:\n{}\nargv: {:?}", text, argv);

        // [env] reaches the child's environment as written, after the scrubbed parent.
        let env = argv::child_env(Vec::new(), &[], &service);
        for (k, v) in &sp.env {
            let found = env.iter().rev().find(|(ek, _)| ek == k.as_str()).map(|(_, ev)| ev);
            prop_assert_eq!(found.and_then(|v| v.to_str()), Some(v.as_str()), "{}", k);
        }
    }
}

#[test]
fn the_argv_reader_models_apptainer() {
    // A reader that accepted everything would make the round trip vacuous.
    assert!(read_as_csv("a\"b").is_err());
    assert_eq!(read_as_csv("a,b").unwrap(), ["a", "b"]);
    assert_eq!(
        parse_bind_value("/a b:/c:ro").unwrap(),
        [("/a b".into(), "/c".into(), Some("ro"))]
    );
    assert_eq!(
        parse_bind_value("/a^b").unwrap(),
        [
            ("/a".into(), "/a".into(), None),
            ("b".into(), "b".into(), None)
        ],
        "a '^' splits the bind"
    );
    assert_eq!(
        parse_bind_value("/a :/b ").unwrap(),
        [("/a ".into(), "/b".into(), None)],
        "trailing space of the destination is trimmed"
    );
    assert_eq!(
        parse_bind_value("/a,/b:/c").unwrap(),
        [
            ("/a".into(), "/a".into(), None),
            ("/b".into(), "/c".into(), None)
        ]
    );
    let nets = ["a".to_owned(), "b".to_owned()];
    assert!(parse_network_arg("a:K=V=W", &nets).is_err());
    assert_eq!(
        parse_network_arg("b:MAC=02:00:00:00:00:01", &nets).unwrap(),
        ("b".into(), vec![("MAC".into(), "02:00:00:00:00:01".into())])
    );
    assert_eq!(
        parse_network_arg("K=1", &nets).unwrap(),
        ("a".into(), vec![("K".into(), "1".into())])
    );
}
