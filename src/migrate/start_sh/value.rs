//! What a start.sh word stands for: variables followed as far as the script sets them,
//! the two command substitutions every seed script uses (`$(realpath "$0")`,
//! `$(dirname …)`), and paths cleaned up once the markers for `$0` and its directory are
//! replaced. Nothing is run: anything that needs the running system is an `Err` saying why.

use super::{Reader, Value};
use crate::migrate::shell::{self, Part, Word};
use crate::migrate::{Level, Note};

/// Internal markers for `$0` and its directory while values are built; replaced by
/// [`finish`]. Control characters cannot come from a script's literal text by accident.
pub(super) const SCRIPT: &str = "\u{1}script\u{1}";
pub(super) const BIN: &str = "\u{1}bin\u{1}";

impl Reader<'_> {
    /// The value of a word, or why it cannot be known without running the script.
    pub(super) fn value(&mut self, w: &Word) -> Result<Value, String> {
        self.value_t(w, false)
    }

    /// `path`: a variable holding the instance name becomes `${name}`.
    pub(super) fn value_t(&mut self, w: &Word, path: bool) -> Result<Value, String> {
        let mut text = String::new();
        let mut unquoted = Vec::new();
        for p in &w.parts {
            match p {
                Part::Lit(l) => text.push_str(l),
                Part::Var { name, quoted } => {
                    if !quoted {
                        unquoted.push(format!("${name}"));
                    }
                    if path && self.name_vars.contains(name) {
                        text.push_str("${name}");
                    } else {
                        text.push_str(&self.var(name, w.line)?);
                    }
                }
                Part::Subst { text: t, quoted } => {
                    if !quoted {
                        unquoted.push(format!("$({t})"));
                    }
                    text.push_str(&self.subst(t)?);
                }
            }
        }
        Ok(Value { text, unquoted })
    }

    fn var(&mut self, name: &str, line: usize) -> Result<String, String> {
        if name == "0" {
            return Ok(SCRIPT.to_owned());
        }
        if let Some(v) = self.vars.get(name) {
            return v.clone();
        }
        if name == "DIRNAME" {
            // The seed prints ww001's start.sh without its first lines ("launched the same
            // way as OOD/Login"); every full script there sets DIRNAME to the service dir.
            if !self.warned_dirname {
                self.warned_dirname = true;
                let n = self.note(
                    Level::Warning,
                    line,
                    "$DIRNAME is used but never set in this start.sh; taken as the service \
                     directory, as the other start.sh scripts of today's setup set it (DIRNAME=$(dirname \"$SCRIPT\")/../) \
                     — if the real script does not set it, bash expands it to nothing",
                );
                self.out.notes.push(n);
            }
            return Ok("${service_dir}".into());
        }
        let from_env = self
            .out
            .env_source
            .as_ref()
            .map(|s| format!(" (perhaps from {}, which migrate does not run)", s.path))
            .unwrap_or_default();
        Err(format!("${name} is not set in start.sh{from_env}"))
    }

    /// `$(realpath "$0")`, `$(readlink -f "$0")`, `$(dirname X)`; nothing else is run.
    fn subst(&mut self, text: &str) -> Result<String, String> {
        let unknown =
            || format!("$({text}) is another command's output, which migrate does not run");
        let cmds = shell::parse(text).map_err(|_| unknown())?;
        let [c] = cmds.as_slice() else {
            return Err(unknown());
        };
        let w: Vec<Option<String>> = c.words.iter().map(Word::literal).collect();
        let last = c.words.last().ok_or_else(unknown)?;
        let arg = self.value(last)?.text;
        match (w[0].as_deref(), c.words.len()) {
            (Some("realpath"), 2) | (Some("readlink"), 3) if arg == SCRIPT => {
                if c.words.len() == 3 && w[1].as_deref() != Some("-f") {
                    return Err(unknown());
                }
                Ok(SCRIPT.to_owned())
            }
            (Some("dirname"), 2) if arg == SCRIPT => Ok(BIN.to_owned()),
            (Some("dirname"), 2) => {
                let f = finish(&arg);
                Ok(f.rsplit_once('/').map_or(".".into(), |(d, _)| d.to_owned()))
            }
            _ => Err(unknown()),
        }
    }

    /// The warning for a value start.sh left unquoted: whether bash's word splitting and
    /// globbing changed it, judged on the service directory this migration is for.
    pub(super) fn split_note(&self, line: usize, v: &Value) -> Note {
        let literal = finish(&v.text).replace("${service_dir}", self.service_dir);
        let splits = literal.contains(|c: char| c.is_whitespace() || "*?[".contains(c));
        let what = v.unquoted.join(", ");
        let text = if splits {
            format!(
                "{what} unquoted: bash splits {literal:?} at blanks and expands globs, so start.sh \
                 passed it as several words; the service file passes it as one"
            )
        } else {
            format!(
                "{what} unquoted: bash would split the value at blanks and expand globs in it; \
                 {literal:?} has none, so start.sh worked; the service file passes it as one argument"
            )
        };
        self.note(Level::Warning, line, text)
    }
}

/// `dir/rel`, cleaned up lexically.
pub(super) fn join(dir: &str, rel: &str) -> String {
    normalize(&format!("{}/{}", dir.trim_end_matches('/'), rel))
}

/// Replaces the markers, `$DIRNAME`-style `bin/..` and `//`, in each `:`-separated field.
pub fn finish(s: &str) -> String {
    let s = s
        .replace(BIN, "${service_dir}/bin")
        .replace(SCRIPT, "${service_dir}/bin/start.sh");
    s.split(':').map(normalize).collect::<Vec<_>>().join(":")
}

/// Lexical path clean-up: `a//b` → `a/b`, `a/./b` → `a/b`, `a/bin/../b` → `a/b`, no
/// trailing `/`. Lexical `..` is right here because `$SCRIPT` came from `realpath`.
fn normalize(p: &str) -> String {
    if !p.contains('/') {
        return p.to_owned();
    }
    let absolute = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." if out
                .last()
                .is_some_and(|l| *l != ".." && *l != "${service_dir}") =>
            {
                out.pop();
            }
            c => out.push(c),
        }
    }
    let joined = out.join("/");
    if absolute {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".into()
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_cleans_paths() {
        assert_eq!(
            finish(&format!("{BIN}/..//root:/root")),
            "${service_dir}/root:/root"
        );
        assert_eq!(finish(&format!("{BIN}/../")), "${service_dir}");
        assert_eq!(finish("/a/./b//c/"), "/a/b/c");
    }
}
