//! Structured services (names, binds, networks, overlay, env) rendered as TOML: whatever the
//! parser accepts, the argv builder must turn into an argv whose values are exactly the
//! validated settings, each after its own flag, with the image and the name last.
#![no_main]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use apptainer_supervisor::config;
use apptainer_supervisor::plan::argv;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    name: String,
    service_dir: String,
    boot: bool,
    hostname: Option<String>,
    binds: Vec<String>,
    networks: Vec<(String, Vec<String>)>,
    overlay: Option<String>,
    env: BTreeMap<String, String>,
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn render(i: &Input) -> String {
    let mut t = format!(
        "name = {}\nservice_dir = {}\nboot = {}\n",
        q(&i.name),
        q(&i.service_dir),
        i.boot
    );
    if let Some(h) = &i.hostname {
        t += &format!("hostname = {}\n", q(h));
    }
    let binds: Vec<String> = i.binds.iter().map(|b| q(b)).collect();
    t += &format!("binds = [{}]\n", binds.join(", "));
    t += "[env]\n";
    for (k, v) in &i.env {
        t += &format!("{} = {}\n", q(k), q(v));
    }
    if let Some(o) = &i.overlay {
        t += &format!("[overlay]\npath = {}\n", q(o));
    }
    for (n, args) in &i.networks {
        let args: Vec<String> = args.iter().map(|a| q(a)).collect();
        t += &format!(
            "[[network]]\nname = {}\nexternal = true\nargs = [{}]\n",
            q(n),
            args.join(", ")
        );
    }
    t
}

/// The values that follow `flag`, in order.
fn values<'a>(argv: &'a [OsString], flag: &str) -> Vec<&'a OsString> {
    argv.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| &w[1])
        .collect()
}

fuzz_target!(|input: Input| {
    let text = render(&input);
    let Ok(s) = config::parse(&text, Path::new("/etc/apptainer-supervisor/x.toml"), None) else {
        return;
    };
    let a = argv::instance_start(&s);
    assert_eq!(a[a.len() - 1], OsString::from(&s.name));
    assert_eq!(a[a.len() - 2], s.image.as_os_str());
    let binds: Vec<OsString> = s.binds.iter().map(|b| b.spec().into()).collect();
    assert_eq!(values(&a, "--bind"), binds.iter().collect::<Vec<_>>());
    for b in &s.binds {
        // Each spec splits back into its parts on ':' (no ':' inside a path).
        let spec = b.spec();
        let parts: Vec<&str> = spec.split(':').collect();
        assert_eq!(Path::new(parts[0]), b.src);
        assert!(parts.len() <= 3 && !spec.contains(','));
        assert!(b.target().is_absolute());
    }
    assert_eq!(
        values(&a, "--overlay"),
        [&OsString::from(s.overlay.path.as_os_str())]
    );
    let nets: Vec<&str> = s.networks.iter().map(|n| n.name.as_str()).collect();
    if nets.is_empty() {
        assert!(values(&a, "--network").is_empty());
    } else {
        assert_eq!(values(&a, "--network"), [&OsString::from(nets.join(","))]);
        assert!(nets.iter().all(|n| !n.contains(',')));
    }
    for v in values(&a, "--network-args") {
        let v = v.to_str().expect("UTF-8");
        let (net, rest) = v.split_once(':').expect("net: prefix");
        assert!(nets.contains(&net));
        assert!(!v.contains(',') && !v.contains('"'));
        assert!(rest.split(';').all(|kv| kv.split('=').count() == 2));
    }
    assert_eq!(
        values(&a, "--hostname").len(),
        usize::from(s.hostname.is_some())
    );
    assert_eq!(a.iter().any(|x| x == "--boot"), s.boot);
    for x in &a {
        assert!(!x.as_encoded_bytes().contains(&0), "NUL in argv");
    }
});
