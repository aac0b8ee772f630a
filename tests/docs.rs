//! The documentation and the unit stay in step with the code (Podman's
//! `hack/xref-quadlet-docs` does the same for Quadlet's keys):
//!
//! - every service-file key in `keys::ALL` is documented in apptainer-supervisor.toml(5),
//!   and no other;
//! - every exit code of `exit` is in the EXIT STATUS section of
//!   apptainer-supervisor(8), and nothing else is;
//! - every field of the tracing events and spans in `src/`, and of the entries sent with
//!   journald's native protocol directly, is in the JOURNAL FIELDS section of
//!   apptainer-supervisor(8), and nothing else is;
//! - the pages (and apptainer-supervisor-generator(8)) pass `mandoc -T lint -W warning`;
//! - the template unit passes `systemd-analyze verify`, its timeouts cover the defaults of
//!   `timeouts.*`, and its restart rules match the exit codes (133 restarts, 78 does not).
//!
//! A missing tool fails the test and names the package to install: nothing is skipped.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use apptainer_supervisor::config::keys;
use apptainer_supervisor::config::{DEFAULT_KILL_SEC, DEFAULT_START_SEC, DEFAULT_STOP_SEC};
use apptainer_supervisor::exit;

const TOML_PAGE: &str = "man/apptainer-supervisor.toml.5";
const MAIN_PAGE: &str = "man/apptainer-supervisor.8";
const GENERATOR_PAGE: &str = "man/apptainer-supervisor-generator.8";
const UNIT: &str = "units/apptainer-supervisor@.service";
const UNIT_EXEC_START: &str = "ExecStart=/usr/bin/apptainer-supervisor run %i";

/// Every exit code, by hand: renaming or removing a constant breaks the build here, and
/// `exit_code_list_matches_the_source` fails when one is added to `mod exit` but not here.
const EXIT_CODES: &[(&str, i32)] = &[
    ("OK", exit::OK),
    ("INSTANCE_ENDED", exit::INSTANCE_ENDED),
    ("USAGE", exit::USAGE),
    ("NOT_ALL_UP", exit::NOT_ALL_UP),
    ("NO_SUCH_SERVICE", exit::NO_SUCH_SERVICE),
    ("ROLLED_BACK", exit::ROLLED_BACK),
    ("ROLLBACK_FAILED", exit::ROLLBACK_FAILED),
    ("DATAERR", exit::DATAERR),
    ("NOINPUT", exit::NOINPUT),
    ("UNAVAILABLE", exit::UNAVAILABLE),
    ("SOFTWARE", exit::SOFTWARE),
    ("OSERR", exit::OSERR),
    ("CANTCREAT", exit::CANTCREAT),
    ("IOERR", exit::IOERR),
    ("TEMPFAIL", exit::TEMPFAIL),
    ("NOPERM", exit::NOPERM),
    ("CONFIG", exit::CONFIG),
    ("INTERRUPTED", exit::INTERRUPTED),
    ("REBOOTED", exit::REBOOTED),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// mdoc macros that only format the word after them (`.It Cm name`, `.It Sy 78`).
const FORMATTING: &[&str] = &[
    "Cm", "Sy", "Li", "Ic", "Fl", "Ar", "Va", "Ev", "Dv", "Pa", "Em", "Ql",
];

/// The tags of list items, as whole words: `.It Cm overlay.size_mib Pq ...` (mdoc) gives
/// `overlay.size_mib`; in man(7), the first word of the line after `.TP`
/// (`.B overlay.size_mib`, `\fBoverlay.size_mib\fR`). Prose that happens to use a key's
/// word (`name`, `image`, `env`) is not a tag, so it does not count as documentation.
fn item_tags<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut tags = Vec::new();
    let mut after_tp = false;
    for line in lines {
        let words: Option<Vec<&str>> = if let Some(rest) = line.strip_prefix(".It ") {
            Some(
                rest.split_whitespace()
                    .skip_while(|w| FORMATTING.contains(w))
                    .collect(),
            )
        } else if after_tp {
            Some(
                line.split_whitespace()
                    .skip_while(|w| matches!(*w, ".B" | ".BR" | ".I" | ".IR"))
                    .collect(),
            )
        } else {
            None
        };
        after_tp = line.trim_end() == ".TP";
        if let Some(first) = words.as_ref().and_then(|w| w.first()) {
            let tag = first
                .replace("\\fB", "")
                .replace("\\fI", "")
                .replace("\\fR", "")
                .replace("\\fP", "");
            tags.push(tag.trim_matches('"').to_owned());
        }
    }
    tags
}

/// The lines of section `name` (`.Sh NAME` in mdoc, `.SH NAME` or `.SH "NAME"` in man).
fn section<'a>(roff: &'a str, name: &str) -> Vec<&'a str> {
    let is_heading = |l: &str| l.starts_with(".Sh ") || l.starts_with(".SH ");
    let mut lines = roff.lines();
    let found = lines
        .by_ref()
        .any(|l| is_heading(l) && l[4..].trim().trim_matches('"') == name);
    assert!(found, "no section {name:?}");
    lines.take_while(|l| !is_heading(l)).collect()
}

/// Runs a tool that the test needs; a missing one is a failure that says how to get it.
fn run_tool(cmd: &mut Command, package: &str) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("{program} is not installed: apt-get install {package} (dnf install {package} on EL)")
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------
// (a) keys

/// Each key is the tag of a list item (`.It Cm overlay.size_mib`), matched as a whole
/// word: `name` is not found in `network.name`.
#[test]
fn every_key_is_in_the_service_file_page() {
    let page = read(TOML_PAGE);
    let tags = item_tags(page.lines());
    let missing: Vec<&str> = keys::ALL
        .iter()
        .copied()
        .filter(|k| !tags.iter().any(|t| t == k))
        .collect();
    assert!(
        missing.is_empty(),
        "keys of keys::ALL missing from {TOML_PAGE} (add an `.It Cm KEY` entry under KEYS): {missing:?}"
    );
}

/// And the KEYS section documents no key that the parser does not know.
#[test]
fn service_file_page_documents_only_real_keys() {
    let page = read(TOML_PAGE);
    let unknown: Vec<String> = item_tags(section(&page, "KEYS"))
        .into_iter()
        .filter(|t| !keys::ALL.contains(&t.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "KEYS in {TOML_PAGE} documents keys that keys::ALL lacks: {unknown:?}"
    );
}

#[test]
fn item_tags_are_whole_words() {
    let mdoc = ".It Cm network.name\n.It Cm name\n.It Sy 78 Pq Dv EX_CONFIG\ntext\n.Cm image\n";
    assert_eq!(item_tags(mdoc.lines()), ["network.name", "name", "78"]);
    let man = ".TP\n.B overlay.size_mib\ntext\n.TP\n\\fBenv\\fR\n.B image\n";
    assert_eq!(item_tags(man.lines()), ["overlay.size_mib", "env"]);
}

// ---------------------------------------------------------------------------------------
// (b) exit codes

/// Each code is the tag of an item in EXIT STATUS (`.It Sy 78 Pq Dv EX_CONFIG`), and
/// every numeric tag there is a real code.
#[test]
fn every_exit_code_is_in_exit_status() {
    let page = read(MAIN_PAGE);
    let documented: Vec<i32> = item_tags(section(&page, "EXIT STATUS"))
        .iter()
        .filter_map(|t| t.parse().ok())
        .collect();
    let missing: Vec<_> = EXIT_CODES
        .iter()
        .filter(|(_, code)| !documented.contains(code))
        .collect();
    assert!(
        missing.is_empty(),
        "exit codes missing from EXIT STATUS in {MAIN_PAGE} (add `.It Sy CODE`): {missing:?}"
    );
    let stale: Vec<_> = documented
        .iter()
        .filter(|c| !EXIT_CODES.iter().any(|(_, e)| e == *c))
        .collect();
    assert!(
        stale.is_empty(),
        "EXIT STATUS in {MAIN_PAGE} documents codes the code never uses: {stale:?}"
    );
}

/// The hand-written list above is every `pub const` of src/exit.rs.
#[test]
fn exit_code_list_matches_the_source() {
    let body = read("src/exit.rs");
    let in_source: BTreeSet<(String, i32)> = body
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .map(|decl| {
            let (name, rest) = decl.split_once(':').expect("pub const NAME: i32 = N;");
            let value = rest.split_once('=').expect("pub const NAME: i32 = N;").1;
            let value = value.trim().trim_end_matches(';').trim();
            (
                name.trim().to_owned(),
                value.parse().unwrap_or_else(|_| panic!("{name} = {value}")),
            )
        })
        .collect();
    let listed: BTreeSet<(String, i32)> = EXIT_CODES
        .iter()
        .map(|(n, c)| ((*n).to_owned(), *c))
        .collect();
    assert_eq!(
        in_source, listed,
        "update EXIT_CODES in tests/docs.rs and EXIT STATUS in {MAIN_PAGE}"
    );
}

// ---------------------------------------------------------------------------------------
// (b2) journal fields

/// `src` with comments removed and every string, raw string and char literal replaced by
/// `""`, so that commas, parentheses and `info!(` inside them are not taken for code.
fn strip_literals(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < b.len() {
        let c = b[i];
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if (c == b'r' || c == b'b')
            && (i == 0 || !ident(b[i - 1]))
            && raw_string_len(&b[i..]).is_some()
        {
            i += raw_string_len(&b[i..]).expect("checked");
            out.push_str("\"\"");
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == b'\'' {
            // A char literal ('x', '\n', '"', 'é') or a lifetime ('a, 'static).
            let rest = &src[i + 1..];
            let len = if rest.starts_with('\\') {
                rest[2..].find('\'').map(|e| e + 3)
            } else {
                rest.chars()
                    .next()
                    .filter(|ch| rest[ch.len_utf8()..].starts_with('\''))
                    .map(|ch| ch.len_utf8() + 1)
            };
            match len {
                Some(n) => {
                    i += 1 + n;
                    out.push_str("' '");
                }
                None => {
                    i += 1;
                    out.push('\'');
                }
            }
        } else {
            let ch = src[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Length of a raw (byte) string literal at the start of `b` (`r"…"`, `r#"…"#`, `br"…"`).
fn raw_string_len(b: &[u8]) -> Option<usize> {
    let start = if b.starts_with(b"br") {
        2
    } else if b.starts_with(b"r") {
        1
    } else {
        return None;
    };
    let hashes = b[start..].iter().take_while(|c| **c == b'#').count();
    if b.get(start + hashes) != Some(&b'"') {
        return None;
    }
    let close: Vec<u8> = std::iter::once(b'"')
        .chain(std::iter::repeat_n(b'#', hashes))
        .collect();
    let body = start + hashes + 1;
    b[body..]
        .windows(close.len())
        .position(|w| w == close.as_slice())
        .map(|p| body + p + close.len())
}

/// The top-level comma-separated arguments of the macro call whose `(` is at `open`.
fn macro_args(code: &str, open: usize) -> Vec<&str> {
    let mut args = Vec::new();
    let mut depth = 0;
    let mut start = open + 1;
    for (i, c) in code[open..].char_indices().map(|(i, c)| (open + i, c)) {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    args.push(&code[start..i]);
                    return args;
                }
            }
            ',' if depth == 1 => {
                args.push(&code[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    panic!("unbalanced macro call at byte {open}");
}

/// The journald field names of the tracing events and spans in Rust source, as
/// tracing-journald writes them: upper-cased, other characters than letters and digits
/// replaced by `_`. Fields come before an event's message (`info!(A = 1, %b, ?c, d, "…")`)
/// and after a span's name (`info_span!("service", SERVICE = %s.name)`).
fn journal_fields(src: &str) -> BTreeSet<String> {
    const MACROS: &[&str] = &["trace", "debug", "info", "warn", "error"];
    let code = strip_literals(src);
    let mut fields = BTreeSet::new();
    let mut at = 0;
    while let Some(p) = code[at..].find("!(") {
        let bang = at + p;
        at = bang + 2;
        let before = &code[..bang];
        let name_start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let name = &before[name_start..];
        let (is_span, base) = match name.strip_suffix("_span") {
            Some(b) => (true, b),
            None => (false, name),
        };
        if !MACROS.contains(&base) {
            continue;
        }
        let mut args = macro_args(&code, bang + 1)
            .into_iter()
            .map(str::trim)
            .peekable();
        if is_span && args.peek() == Some(&"\"\"") {
            args.next();
        }
        for arg in args {
            if arg == "\"\"" || arg.is_empty() {
                break;
            }
            if ["target:", "parent:", "name:"]
                .iter()
                .any(|k| arg.starts_with(k))
            {
                continue;
            }
            let arg = arg.trim_start_matches(['%', '?']);
            let key = arg.split('=').next().expect("split yields one part").trim();
            assert!(
                !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'),
                "cannot read a field name from {name}!(… {arg} …)"
            );
            fields.insert(
                key.chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_uppercase()
                        } else {
                            '_'
                        }
                    })
                    .collect(),
            );
        }
    }
    fields
}

/// journald's own fields, which every entry has and the page describes apart.
const JOURNALD_OWN: &[&str] = &["MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"];

/// The fields of entries that a file sends with journald's native protocol itself
/// (`j.send(&fields)`: the instance's output lines, `update`'s steps): each
/// `("NAME", value)` tuple of a file that sends, less [`JOURNALD_OWN`].
fn native_fields(src: &str) -> BTreeSet<String> {
    let mut fields = BTreeSet::new();
    if !src.contains(".send(&") {
        return fields;
    }
    for (i, _) in src.match_indices('"') {
        let rest = &src[i + 1..];
        let Some(end) = rest.find('"') else { break };
        let name = &rest[..end];
        // A tuple's `(`, not a call's (`f("X", 1)`, `info!("X", …)`).
        let opens_pair = src[..i].trim_end().strip_suffix('(').is_some_and(|b| {
            !b.ends_with(|c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '!' | '>'))
        });
        let then_comma = rest[end + 1..].trim_start().starts_with(',');
        if opens_pair
            && then_comma
            && name.len() > 1
            && name.starts_with(|c: char| c.is_ascii_uppercase())
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            && !JOURNALD_OWN.contains(&name)
        {
            fields.insert(name.to_owned());
        }
    }
    fields
}

/// The field names that JOURNAL FIELDS lists as items (`.It Va OVERLAY , SIZE_MIB`).
fn documented_fields(lines: &[&str]) -> BTreeSet<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(".It "))
        .flat_map(str::split_whitespace)
        .filter(|w| {
            w.len() > 1
                && w.starts_with(|c: char| c.is_ascii_uppercase())
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn journal_field_names_are_read_from_macros() {
    let src = r##"
        // info!(COMMENTED = 1, "no");
        let s = info_span!("service", SERVICE = %s.name, INSTANCE_PID = tracing::field::Empty);
        warn!(pid, %unit, ?exit, master_pid = t.master.pid, "a, b = (c", x = 1);
        tracing::error!(exit_code = code, "{e}");
        debug!(target: "t", status = msg, "status");
        let c = ','; let q = '"'; let r = r#"info!(RAW = 1, "x")"#; fn f<'a>(_: &'a str) {}
        error!(a.b = 1, "{}", format!("(x"));
        self.notify.status("info!(NOT = 1)");
    "##;
    let got: Vec<String> = journal_fields(src).into_iter().collect();
    assert_eq!(
        got,
        [
            "A_B",
            "EXIT",
            "EXIT_CODE",
            "INSTANCE_PID",
            "MASTER_PID",
            "PID",
            "SERVICE",
            "STATUS",
            "UNIT"
        ]
    );
    let native = r#"
        let _ = j.send(&[("MESSAGE", b"x"), (
            "UPDATE_STEP", b"pull"), ("lower", b""), ("A", b"")]);
        let v = vec![("UNIT", x)]; f("NOT_A_PAIR", 1);
    "#;
    let got: Vec<String> = native_fields(native).into_iter().collect();
    assert_eq!(got, ["UNIT", "UPDATE_STEP"]);
    assert!(native_fields(r#"let v = [("PATH", "/bin")];"#).is_empty());
    let doc = ".It Va OVERLAY , SIZE_MIB\n.It Va ERROR\nthe Va NOT_AN_ITEM\n.It Dv STATUS=\n";
    let lines: Vec<&str> = doc.lines().collect();
    let got: Vec<String> = documented_fields(&lines).into_iter().collect();
    assert_eq!(got, ["ERROR", "OVERLAY", "SIZE_MIB"]);
}

/// Every `.rs` file under `dir`, at any depth.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.expect("read a directory entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// Every field a tracing event or span in `src/` sets, or an entry sent natively carries,
/// is an item of JOURNAL FIELDS, and every item there is a field some entry carries: `journalctl FIELD=…` is only as good as
/// the list.
#[test]
fn journal_fields_match_the_source() {
    let mut in_source = BTreeSet::new();
    for path in rust_files(&root().join("src")) {
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        in_source.extend(journal_fields(&text));
        in_source.extend(native_fields(&text));
    }
    assert!(
        in_source.contains("SERVICE") && in_source.contains("INSTANCE_PID"),
        "the field reader found no SERVICE or INSTANCE_PID in src/: {in_source:?}"
    );
    let page = read(MAIN_PAGE);
    let documented = documented_fields(&section(&page, "JOURNAL FIELDS"));
    let missing: Vec<&String> = in_source.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "journal fields set in src/ but missing from JOURNAL FIELDS in {MAIN_PAGE} (add `.It Va FIELD`): {missing:?}"
    );
    let stale: Vec<&String> = documented.difference(&in_source).collect();
    assert!(
        stale.is_empty(),
        "JOURNAL FIELDS in {MAIN_PAGE} lists fields that no event in src/ sets: {stale:?}"
    );
}

// ---------------------------------------------------------------------------------------
// (c) mandoc

fn mandoc_lint(page: &str) {
    let path = root().join(page);
    let out = run_tool(
        Command::new("mandoc")
            .args(["-T", "lint", "-W", "warning"])
            .arg(&path),
        "mandoc",
    );
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "mandoc -T lint -W warning {page}:\n{}",
        show(&out)
    );
}

#[test]
fn main_page_passes_mandoc_lint() {
    mandoc_lint(MAIN_PAGE);
}

#[test]
fn service_file_page_passes_mandoc_lint() {
    mandoc_lint(TOML_PAGE);
}

#[test]
fn generator_page_passes_mandoc_lint() {
    mandoc_lint(GENERATOR_PAGE);
}

// ---------------------------------------------------------------------------------------
// (d) the unit

#[test]
fn unit_passes_systemd_analyze_verify() {
    let unit = read(UNIT);
    let exec_starts: Vec<&str> = unit
        .lines()
        .filter(|l| l.starts_with("ExecStart="))
        .collect();
    assert_eq!(
        exec_starts,
        [UNIT_EXEC_START],
        "{UNIT}: ExecStart= changed; update this test"
    );
    let bin = env!("CARGO_BIN_EXE_apptainer-supervisor");
    let unit = unit.replace(UNIT_EXEC_START, &format!("ExecStart={bin} run %i"));

    let dir = tempfile::tempdir().expect("temporary directory");
    let instance = dir.path().join("apptainer-supervisor@ood001.service");
    std::fs::write(&instance, unit).expect("write the instantiated unit");

    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify").current_dir(dir.path());
    // Environmental: verify runs `man` for every `Documentation=man:` link, and the pages
    // are not installed on a build machine. Pointing MANPATH at copies of this tree's
    // pages checks the links against the very pages the other tests check.
    let manpath = dir.path().join("man");
    for (page, sect) in [(MAIN_PAGE, "man8"), (TOML_PAGE, "man5")] {
        let d = manpath.join(sect);
        std::fs::create_dir_all(&d).expect("create MANPATH");
        let name = Path::new(page).file_name().expect("page file name");
        std::fs::copy(root().join(page), d.join(name)).expect("copy man page");
    }
    cmd.env("MANPATH", &manpath);
    // Environmental: without man-db (minimal CI images) there is no `man` to run at all;
    // then only the link check is left out.
    if Command::new("man").arg("-w").arg("man").output().is_err() {
        cmd.arg("--man=no");
    }
    // A caller's SYSTEMD_LOG_LEVEL=debug would print chatter that is no finding.
    cmd.env_remove("SYSTEMD_LOG_LEVEL");
    cmd.arg(&instance);
    let out = run_tool(&mut cmd, "systemd");
    // verify only warns (status 0) about unknown keys and bad values: any output fails.
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify {}:\n{}",
        instance.display(),
        show(&out)
    );
}

/// `5s`, `3min`, `180` (seconds) → seconds.
fn unit_seconds(v: &str) -> u64 {
    let v = v.trim();
    let (num, mult) = if let Some(n) = v.strip_suffix("min") {
        (n, 60)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1)
    } else {
        (v, 1)
    };
    num.trim()
        .parse::<u64>()
        .unwrap_or_else(|_| panic!("unsupported time span {v:?}"))
        * mult
}

fn unit_value<'a>(unit: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    let values: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect();
    assert_eq!(values.len(), 1, "{UNIT}: expected one {key}=");
    values[0]
}

// The container's systemd gives each of its units 90 s to stop (DefaultTimeoutStopSec=):
// the supervisor's orderly halt must wait longer than that before it forces anything.
const _: () = assert!(DEFAULT_STOP_SEC > 90);

/// The unit's own limits must fit what the supervisor does with the default timeouts:
/// `instance start` within start_sec, and a halt of stop_sec, then `instance stop -F` and
/// SIGKILL of kill_sec each, plus 5 s.
#[test]
fn unit_timeouts_cover_the_config_defaults() {
    let unit = read(UNIT);
    let start = unit_seconds(unit_value(&unit, "TimeoutStartSec"));
    let stop = unit_seconds(unit_value(&unit, "TimeoutStopSec"));
    assert!(
        start > DEFAULT_START_SEC,
        "TimeoutStartSec={start}s <= timeouts.start_sec {DEFAULT_START_SEC}"
    );
    let halt = DEFAULT_STOP_SEC + 2 * DEFAULT_KILL_SEC + 5;
    assert!(
        stop > halt,
        "TimeoutStopSec={stop}s <= stop_sec + 2 x kill_sec + 5 = {halt}"
    );
    assert_eq!(unit_value(&unit, "Type"), "notify");
    assert_eq!(unit_value(&unit, "KillMode"), "mixed");
    assert_eq!(unit_value(&unit, "RuntimeDirectoryPreserve"), "yes");
    assert!(unit_seconds(unit_value(&unit, "WatchdogSec")) > 0);
}

/// The exit statuses a unit setting lists (`RestartForceExitStatus=133`).
fn unit_statuses(unit: &str, key: &str) -> BTreeSet<i32> {
    unit_value(unit, key)
        .split_whitespace()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{UNIT}: {key}={v}: expected exit statuses only"))
        })
        .collect()
}

/// A reboot from inside (133) restarts the service and is no failure, as in
/// systemd-nspawn@.service; a configuration error (78) is not retried.
#[test]
fn unit_restart_rules_match_the_exit_codes() {
    let unit = read(UNIT);
    assert_eq!(unit_value(&unit, "Restart"), "on-failure");
    assert_eq!(
        unit_statuses(&unit, "RestartForceExitStatus"),
        BTreeSet::from([exit::REBOOTED]),
        "{UNIT}: RestartForceExitStatus="
    );
    assert_eq!(
        unit_statuses(&unit, "SuccessExitStatus"),
        BTreeSet::from([exit::REBOOTED]),
        "{UNIT}: SuccessExitStatus="
    );
    assert_eq!(
        unit_statuses(&unit, "RestartPreventExitStatus"),
        BTreeSet::from([exit::CONFIG]),
        "{UNIT}: RestartPreventExitStatus="
    );
}

// ---------------------------------------------------------------------------------------
// (e) the README's developer commands

/// The line in the README's `sh` blocks that runs the tests (the one with `cargo test`).
fn readme_test_line() -> String {
    let readme = read("README.md");
    let mut in_sh = false;
    let mut found = Vec::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh" && !in_sh;
            continue;
        }
        if in_sh && line.trim_start().starts_with("tests/setup.sh") {
            found.push(line.trim().to_owned());
        }
    }
    assert_eq!(
        found.len(),
        1,
        "README.md: want exactly one `tests/setup.sh && cargo test …` line in a ```sh block, found {found:?}"
    );
    found.remove(0)
}

#[test]
fn ci_runs_the_readme_test_line_exactly() {
    let line = readme_test_line();
    assert!(
        line.contains("cargo test --locked"),
        "README's test line does not run cargo test --locked: {line}"
    );
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == line),
        ".ci/run does not run the README's test line `{line}` as one line of its own"
    );
}

#[test]
fn setup_script_exists_and_is_executable() {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(root().join("tests/setup.sh")).expect("tests/setup.sh");
    assert!(
        meta.permissions().mode() & 0o111 == 0o111,
        "tests/setup.sh is not executable: the README runs it as a command"
    );
}

/// Each page names the package and its version in `.Os`, so `man` shows which release
/// the page documents.
#[test]
fn pages_name_the_package_version_in_os() {
    let want = format!(".Os apptainer-supervisor {}", env!("CARGO_PKG_VERSION"));
    for page in [MAIN_PAGE, TOML_PAGE, GENERATOR_PAGE] {
        let text = read(page);
        assert!(
            text.lines().any(|l| l == want),
            "{page}: no `{want}` line (update it with Cargo.toml's version)"
        );
    }
}

/// Man pages and README are for operators: no file names of the source tree, and today's
/// setup is named as such (docs/DESIGN.md holds the internals).
#[test]
fn operator_docs_name_no_source_files_and_no_seed() {
    for doc in ["README.md", MAIN_PAGE, TOML_PAGE, GENERATOR_PAGE] {
        let text = read(doc);
        for (n, line) in text.lines().enumerate() {
            // roff comments are for whoever edits the page.
            if line.starts_with(".\\\"") {
                continue;
            }
            let lower = line.to_lowercase();
            assert!(
                !lower.contains("the seed") && !lower.contains("seed's"),
                "{doc}:{}: call it today's start.sh setup: {line}",
                n + 1
            );
            assert!(
                !line.contains("src/") && !line.contains(".rs"),
                "{doc}:{}: a source file name belongs in docs/DESIGN.md: {line}",
                n + 1
            );
        }
    }
}
