//! [`Model`] → service-file text, with `# from FILE:LINE` on each setting and
//! `# migrate: …` above the ones that need a decision. Keys come from [`crate::config::keys`] so
//! they are spelled as the parser spells them.
//!
//! [`render`] also says which line holds which entry, so that an entry the parser refuses
//! can be taken out ([`drop_ref`]) and written as a comment instead.

use super::{Level, Model, Note, Origin, Setting};
use crate::config::keys;

/// One entry of the model, by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ref {
    Name,
    ServiceDir,
    Image,
    ImageUrl,
    Hostname,
    Bind(usize),
    EnvFile,
    Env(usize),
    Net(usize),
    NetArg(usize, usize),
    OverlayPath,
    Binary,
    Extra(usize),
}

const WIDTH: usize = 92;

struct Out {
    text: String,
    line: usize,
    refs: Vec<(usize, Ref)>,
}

impl Out {
    fn push(&mut self, s: &str, r: Option<Ref>) {
        self.line += 1;
        if let Some(r) = r {
            self.refs.push((self.line, r));
        }
        self.text.push_str(s);
        self.text.push('\n');
    }

    fn blank(&mut self) {
        self.push("", None);
    }

    /// `# PREFIX text`, wrapped, `margin` spaces in.
    fn comment(&mut self, margin: &str, prefix: &str, text: &str) {
        let indent = " ".repeat(prefix.len());
        let mut line = format!("{margin}# {prefix}");
        let mut first = true;
        for word in text.split_whitespace() {
            if !first && line.len() + 1 + word.len() > WIDTH {
                let l = std::mem::replace(&mut line, format!("{margin}# {indent}"));
                self.push(&l, None);
                first = true;
            }
            if !first {
                line.push(' ');
            }
            line.push_str(word);
            first = false;
        }
        self.push(&line, None);
    }

    fn notes(&mut self, notes: &[Note]) {
        self.notes_in("", notes);
    }

    fn notes_in(&mut self, margin: &str, notes: &[Note]) {
        for n in notes {
            let text = if n.at.line > 0 {
                format!("{}: {}", n.at, n.text)
            } else {
                n.text.clone()
            };
            let prefix = match n.level {
                Level::Warning => "migrate: ",
                Level::Note => "migrate (note): ",
            };
            self.comment(margin, prefix, &text);
        }
    }

    fn from<T>(&mut self, s: &Setting<T>) {
        if !s.from.is_empty() {
            self.push(&format!("# from {}", from_list(&s.from)), None);
        }
    }

    /// `key = value` with its comments.
    fn setting<T>(&mut self, key: &str, s: &Setting<T>, value: String, r: Option<Ref>) {
        self.from(s);
        self.notes(&s.notes);
        self.push(&format!("{key} = {value}"), r);
    }

    /// `key = [` one entry per line `]`.
    fn list(&mut self, key: &str, items: &[Setting<String>], r: fn(usize) -> Ref) {
        if items.is_empty() {
            return;
        }
        self.push(&format!("{key} = ["), None);
        for (i, s) in items.iter().enumerate() {
            self.notes_in("  ", &s.notes);
            let from = if s.from.is_empty() {
                String::new()
            } else {
                format!("  # {}", from_list(&s.from))
            };
            self.push(&format!("  {},{from}", q(&s.value)), Some(r(i)));
        }
        self.push("]", None);
    }
}

fn from_list(from: &[Origin]) -> String {
    from.iter()
        .map(Origin::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A TOML basic string (toml.io: `"` `\` and control characters escaped).
pub fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The last dotted component of a key constant (`overlay.path` → `path`).
fn leaf(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// The service file, and which line holds which entry.
pub fn render(m: &Model) -> (String, Vec<(usize, Ref)>) {
    let mut o = Out {
        text: String::new(),
        line: 0,
        refs: Vec::new(),
    };
    o.comment(
        "",
        "",
        &format!(
            "{} — written by `apptainer-supervisor migrate` from {}. Lines that start with \
             `# migrate:` say what was not carried over or looks wrong; read them, then run \
             `apptainer-supervisor check --config THIS_FILE`.",
            m.name.value,
            m.inputs.join(" and ")
        ),
    );
    if !m.notes.is_empty() {
        o.blank();
        o.notes(&m.notes);
    }
    o.blank();
    o.setting(keys::NAME, &m.name, q(&m.name.value), Some(Ref::Name));
    if m.service_dir.from.is_empty() && m.service_dir.notes.is_empty() {
        o.push("# start.sh's $DIRNAME: the directory above its bin/", None);
    }
    o.setting(
        keys::SERVICE_DIR,
        &m.service_dir,
        q(&m.service_dir.value),
        Some(Ref::ServiceDir),
    );
    if let Some(s) = &m.image {
        o.setting(keys::IMAGE, s, q(&s.value), Some(Ref::Image));
    }
    if let Some(s) = &m.image_url {
        o.setting(keys::IMAGE_URL, s, q(&s.value), Some(Ref::ImageUrl));
    }
    o.setting(keys::BOOT, &m.boot, m.boot.value.to_string(), None);
    if let Some(s) = &m.hostname {
        o.setting(keys::HOSTNAME, s, q(&s.value), Some(Ref::Hostname));
    }
    o.list(keys::BINDS, &m.binds, Ref::Bind);
    if let Some(n) = &m.env_file_note {
        o.from(n);
        o.notes(&n.notes);
        // Left unset on purpose: a set env_file must exist, start.sh's `[ -f ]` made it optional.
        o.push(
            &format!(
                "# {} = {}  (the default; read only when it exists)",
                keys::ENV_FILE,
                q(crate::config::DEFAULT_ENV_FILE)
            ),
            None,
        );
    }
    if let Some(s) = &m.env_file {
        o.setting(keys::ENV_FILE, s, q(&s.value), Some(Ref::EnvFile));
    }

    if !m.env.is_empty() {
        o.blank();
        o.push("# exported by start.sh, so apptainer saw them", None);
        o.push(&format!("[{}]", keys::ENV), None);
        for (i, s) in m.env.iter().enumerate() {
            o.from(s);
            o.notes(&s.notes);
            o.push(
                &format!("{} = {}", s.value.0, q(&s.value.1)),
                Some(Ref::Env(i)),
            );
        }
    }

    for (i, n) in m.networks.iter().enumerate() {
        o.blank();
        o.from(&n.name);
        o.notes(&n.name.notes);
        o.push(&format!("[[{}]]", keys::NETWORK), None);
        o.push(
            &format!("{} = {}", leaf(keys::NETWORK_NAME), q(&n.name.value)),
            Some(Ref::Net(i)),
        );
        o.push(&format!("{} = true", leaf(keys::NETWORK_EXTERNAL)), None);
        if !n.args.is_empty() {
            o.push(&format!("{} = [", leaf(keys::NETWORK_ARGS)), None);
            for (j, a) in n.args.iter().enumerate() {
                o.push(&format!("  {},", q(a)), Some(Ref::NetArg(i, j)));
            }
            o.push("]", None);
        }
    }

    o.blank();
    o.push(&format!("[{}]", keys::OVERLAY), None);
    if m.overlay_path.from.is_empty() && m.overlay_path.notes.is_empty() {
        o.push("# where Ansible creates it (roles/master)", None);
    }
    o.setting(
        leaf(keys::OVERLAY_PATH),
        &m.overlay_path,
        q(&m.overlay_path.value),
        Some(Ref::OverlayPath),
    );
    o.setting(
        leaf(keys::OVERLAY_SIZE_MIB),
        &m.overlay_size,
        m.overlay_size.value.to_string(),
        None,
    );
    o.push("# as Ansible creates it: apptainer overlay create -S", None);
    o.push(&format!("{} = true", leaf(keys::OVERLAY_SPARSE)), None);

    if m.binary.is_some() || !m.extra_args.is_empty() {
        o.blank();
        o.push(&format!("[{}]", keys::APPTAINER), None);
        if let Some(s) = &m.binary {
            o.setting(
                leaf(keys::APPTAINER_BINARY),
                s,
                q(&s.value),
                Some(Ref::Binary),
            );
        }
        o.list(leaf(keys::APPTAINER_EXTRA_ARGS), &m.extra_args, Ref::Extra);
    }

    if let Some(n) = &m.readiness {
        o.blank();
        o.notes(std::slice::from_ref(n));
        o.push(&format!("# [{}]", keys::READINESS), None);
        o.push(
            &format!(
                "# {} = [\"httpd.service\"]",
                leaf(keys::READINESS_REQUIRED_UNITS)
            ),
            None,
        );
    }

    if !m.dropped.is_empty() {
        o.blank();
        o.push(
            "# Not written: the service-file parser refuses these (see the reasons):",
            None,
        );
        for (key, value, _) in &m.dropped {
            o.push(&format!("# {key}: {value}"), None);
        }
    }
    (o.text, o.refs)
}

/// Takes an entry out of the model; what to say instead. `None` for entries that cannot
/// go (the name, the service directory): the input itself is wrong then.
pub fn drop_ref(m: &mut Model, r: Ref, reason: &str) -> Option<(String, String, Note)> {
    fn take<T>(v: &mut Vec<Setting<T>>, i: usize) -> Option<Setting<T>> {
        (i < v.len()).then(|| v.remove(i))
    }
    let (key, value, from) = match r {
        Ref::Name | Ref::ServiceDir => return None,
        Ref::Image => {
            let s = m.image.take()?;
            (keys::IMAGE, q(&s.value), s.from)
        }
        Ref::ImageUrl => {
            let s = m.image_url.take()?;
            (keys::IMAGE_URL, q(&s.value), s.from)
        }
        Ref::Hostname => {
            let s = m.hostname.take()?;
            (keys::HOSTNAME, q(&s.value), s.from)
        }
        Ref::Bind(i) => {
            let s = take(&mut m.binds, i)?;
            (keys::BINDS, q(&s.value), s.from)
        }
        Ref::EnvFile => {
            let s = m.env_file.take()?;
            (keys::ENV_FILE, q(&s.value), s.from)
        }
        Ref::Env(i) => {
            let s = take(&mut m.env, i)?;
            (
                keys::ENV,
                format!("{} = {}", s.value.0, q(&s.value.1)),
                s.from,
            )
        }
        Ref::Net(i) => {
            if i >= m.networks.len() {
                return None;
            }
            let n = m.networks.remove(i);
            (keys::NETWORK_NAME, q(&n.name.value), n.name.from)
        }
        Ref::NetArg(i, j) => {
            let n = m.networks.get_mut(i)?;
            if j >= n.args.len() {
                return None;
            }
            let a = n.args.remove(j);
            (keys::NETWORK_ARGS, q(&a), n.name.from.clone())
        }
        Ref::OverlayPath => {
            let s = std::mem::replace(
                &mut m.overlay_path,
                Setting {
                    value: crate::config::DEFAULT_OVERLAY.to_owned(),
                    from: Vec::new(),
                    notes: Vec::new(),
                },
            );
            (keys::OVERLAY_PATH, q(&s.value), s.from)
        }
        Ref::Binary => {
            let s = m.binary.take()?;
            (keys::APPTAINER_BINARY, q(&s.value), s.from)
        }
        Ref::Extra(i) => {
            let s = take(&mut m.extra_args, i)?;
            (keys::APPTAINER_EXTRA_ARGS, q(&s.value), s.from)
        }
    };
    let note = Note {
        level: Level::Warning,
        at: from.first().cloned().unwrap_or_default(),
        text: format!("{key} {value} not written: {reason}"),
    };
    Some((key.to_owned(), format!("{value} — {reason}"), note))
}

/// Every note, in the order the file shows them, each once.
pub fn all_notes(m: &Model) -> Vec<Note> {
    let mut all: Vec<&Note> = Vec::new();
    all.extend(&m.notes);
    all.extend(&m.name.notes);
    all.extend(&m.service_dir.notes);
    for s in [&m.image, &m.image_url, &m.hostname, &m.env_file]
        .into_iter()
        .flatten()
    {
        all.extend(&s.notes);
    }
    all.extend(&m.boot.notes);
    for s in &m.binds {
        all.extend(&s.notes);
    }
    if let Some(n) = &m.env_file_note {
        all.extend(&n.notes);
    }
    for s in &m.env {
        all.extend(&s.notes);
    }
    for n in &m.networks {
        all.extend(&n.name.notes);
    }
    all.extend(&m.overlay_path.notes);
    all.extend(&m.overlay_size.notes);
    if let Some(b) = &m.binary {
        all.extend(&b.notes);
    }
    for s in &m.extra_args {
        all.extend(&s.notes);
    }
    all.extend(&m.readiness);
    all.extend(m.dropped.iter().map(|(_, _, n)| n));
    let mut out: Vec<Note> = Vec::new();
    for n in all {
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_for_toml() {
        assert_eq!(q(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(q("x\u{7f}\n"), "\"x\\u007F\\n\"");
        let t: toml::Value = toml::from_str(&format!("k = {}", q("a\"\\\u{1}é"))).unwrap();
        assert_eq!(t["k"].as_str(), Some("a\"\\\u{1}é"));
    }

    #[test]
    fn comments_wrap_and_keep_their_prefix() {
        let mut o = Out {
            text: String::new(),
            line: 0,
            refs: Vec::new(),
        };
        o.comment("", "migrate: ", &"word ".repeat(40));
        let lines: Vec<_> = o.text.lines().collect();
        assert!(lines.len() > 1);
        assert!(lines.iter().all(|l| l.len() <= WIDTH));
        assert!(lines[0].starts_with("# migrate: word"));
        assert!(lines[1].starts_with("#          word"));
        assert_eq!(o.line, lines.len());
    }
}
