//! What the seed's `start.sh` means, read from its words (`shell.rs`), never run.
//!
//! The seed's scripts (apptainer-launchers-and-monitoring.md, "Container Start Script")
//! set `SCRIPT=$(realpath "$0")`, `DIRNAME=$(dirname "$SCRIPT")/../`, maybe `OVERLAY=…`,
//! source `$DIRNAME/bin/.service_env` when it exists, and run one `apptainer instance
//! start` with flags, the image and the instance name. Variables are followed as far as
//! they are known: `$DIRNAME` becomes `${service_dir}`, a variable holding the instance
//! name becomes `${name}`; anything else that depends on the running system (another
//! command's output, a variable from `.service_env`) is reported and left out.
//!
//! This module walks the script's commands (assignments, exports, `if [ -f … ]`, `source`,
//! `set -a`); `value.rs` says what a word stands for; `instance.rs` reads the
//! `apptainer instance start` command, word by word.

mod instance;
mod value;

use std::collections::HashMap;

use super::shell::{self, Command, Part, Word};
use super::{Level, Note, Origin, Setting};
// yaml.rs cleans host_vars' `$DIRNAME` mounts the way start.sh's paths are cleaned.
pub use value::finish;

/// A `source`/`.` of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvSource {
    /// The path, with `${service_dir}` where start.sh had `$DIRNAME`.
    pub path: String,
    /// Inside `if [ -f PATH ]`: a missing file was fine.
    pub guarded: bool,
    pub at: Origin,
    pub notes: Vec<Note>,
}

/// Everything start.sh says about the service.
#[derive(Debug, Default)]
pub struct StartSh {
    pub instance: Option<Setting<String>>,
    pub image: Option<Setting<String>>,
    pub binary: Option<Setting<String>>,
    pub boot: Option<Setting<bool>>,
    pub hostname: Option<Setting<String>>,
    pub binds: Vec<Setting<String>>,
    pub networks: Vec<Setting<String>>,
    /// `--network-args` values as written (`[net:]K=V;K2=V2`).
    pub network_args: Vec<Setting<String>>,
    pub overlay: Option<Setting<String>>,
    pub env_source: Option<EnvSource>,
    /// Exported variables and `VAR=x apptainer …` prefixes: what reached apptainer.
    pub env: Vec<Setting<(String, String)>>,
    pub extra_args: Vec<Setting<String>>,
    /// `set -a` came before: sourced variables were exported.
    pub allexport: bool,
    /// Notes about the script as a whole.
    pub notes: Vec<Note>,
}

/// Reads a start.sh. `label` names it in messages (`start.sh`); `service_dir` is the
/// directory `$DIRNAME` stands for, used only to say whether word splitting would bite.
pub fn read(text: &str, label: &str, service_dir: &str) -> Result<StartSh, shell::SyntaxError> {
    let commands = shell::parse(text)?;
    let mut r = Reader {
        label,
        service_dir,
        vars: HashMap::new(),
        out: StartSh::default(),
        guards: Vec::new(),
        cwd: None,
        warned_dirname: false,
        seen_start: None,
        name_vars: Vec::new(),
    };
    for c in &commands {
        r.command(c);
    }
    if r.seen_start.is_none() {
        return Err(shell::SyntaxError {
            line: commands.last().map_or(1, |c| c.line),
            reason: "no `apptainer instance start` command: nothing to migrate".into(),
        });
    }
    Ok(r.out)
}

struct Reader<'a> {
    label: &'a str,
    service_dir: &'a str,
    /// Variable → its value (markers and `${service_dir}` allowed), or why it is unknown.
    vars: HashMap<String, Result<String, String>>,
    out: StartSh,
    /// One entry per open `if`: the file its `[ -f FILE ]` test checks, if that is the test.
    guards: Vec<Option<String>>,
    /// After `cd DIR`.
    cwd: Option<String>,
    warned_dirname: bool,
    seen_start: Option<usize>,
    /// Variables holding the instance name: `${name}` in paths.
    name_vars: Vec<String>,
}

/// A word's value, and the unquoted expansions bash would have split.
struct Value {
    text: String,
    unquoted: Vec<String>,
}

impl Reader<'_> {
    fn at(&self, line: usize) -> Origin {
        Origin {
            file: self.label.to_owned(),
            line,
        }
    }

    fn note(&self, level: Level, line: usize, text: impl Into<String>) -> Note {
        Note {
            level,
            at: self.at(line),
            text: text.into(),
        }
    }

    fn command(&mut self, c: &Command) {
        let mut words: &[Word] = &c.words;
        // Control words: `if TEST`, `then CMD`, `else CMD`, `fi`.
        match words[0].literal().as_deref() {
            Some("if") => {
                let guard = self.test_file(&words[1..]);
                self.guards.push(guard);
                return;
            }
            Some("then" | "else" | "do") => {
                words = &words[1..];
                if words.is_empty() {
                    return;
                }
            }
            Some("fi" | "done") => {
                self.guards.pop();
                return;
            }
            _ => {}
        }
        // `export A=b`, `A=b`, `A=b cmd …`, `exec cmd …`.
        let export = words[0].literal().as_deref() == Some("export");
        if export {
            words = &words[1..];
        }
        let mut prefix: Vec<(String, Result<String, String>, usize)> = Vec::new();
        while let Some(w) = words.first() {
            let Some((name, value)) = self.assignment(w) else {
                break;
            };
            prefix.push((name, value, w.line));
            words = &words[1..];
        }
        if words.first().and_then(Word::literal).as_deref() == Some("exec") {
            words = &words[1..];
        }
        if words.is_empty() {
            for (name, value, line) in prefix {
                if export {
                    self.exported(&name, &value, line);
                }
                self.vars.insert(name, value);
            }
            return;
        }
        let cmd = words[0].literal().unwrap_or_default();
        let base = cmd.rsplit('/').next().unwrap_or("");
        match base {
            "source" | "." => self.source(words),
            "cd" => {
                self.cwd = words
                    .get(1)
                    .and_then(|w| self.value(w).ok())
                    .map(|v| v.text);
            }
            "apptainer" | "singularity" => {
                if words.get(1).and_then(Word::literal).as_deref() == Some("instance")
                    && words.get(2).and_then(Word::literal).as_deref() == Some("start")
                {
                    for (name, value, line) in &prefix {
                        self.exported(name, value, *line);
                    }
                    self.instance_start(words, &cmd);
                } else {
                    let n = self.note(
                        Level::Warning,
                        c.line,
                        format!(
                            "`{}` is not `apptainer instance start`: not migrated",
                            source_of(words)
                        ),
                    );
                    self.out.notes.push(n);
                }
            }
            "set" => {
                // `set -a` (allexport): every later assignment, the sourced ones
                // included, is exported (bash(1), The Set Builtin).
                let args: Vec<String> = words[1..].iter().filter_map(Word::literal).collect();
                let short_a = args
                    .iter()
                    .any(|w| w.starts_with('-') && !w.starts_with("--") && w.contains('a'));
                let long = args.windows(2).any(|p| p[0] == "-o" && p[1] == "allexport");
                if short_a || long {
                    self.out.allexport = true;
                }
            }
            "true" | ":" | "echo" | "[" | "test" | "[[" => {}
            _ => {
                let n = self.note(
                    Level::Warning,
                    c.line,
                    format!(
                        "`{}` has no counterpart in a service file: not migrated",
                        source_of(words)
                    ),
                );
                self.out.notes.push(n);
            }
        }
    }

    /// `NAME=VALUE` as one word.
    fn assignment(&mut self, w: &Word) -> Option<(String, Result<String, String>)> {
        let Some(Part::Lit(first)) = w.parts.first() else {
            return None;
        };
        let (name, rest) = first.split_once('=')?;
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || name.starts_with(|c: char| c.is_ascii_digit())
        {
            return None;
        }
        let mut parts = vec![Part::Lit(rest.to_owned())];
        parts.extend(w.parts[1..].iter().cloned());
        // No word splitting in an assignment (bash(1) PARAMETERS), so no split warning.
        let v = self
            .value(&Word {
                parts,
                line: w.line,
            })
            .map(|v| v.text);
        Some((name.to_owned(), v))
    }

    fn exported(&mut self, name: &str, value: &Result<String, String>, line: usize) {
        match value {
            Ok(v) if !v.contains('\u{1}') && !v.contains("${") => self
                .out
                .env
                .push(Setting::new((name.to_owned(), v.clone()), self.at(line))),
            Ok(_) | Err(_) => {
                let why = value
                    .clone()
                    .err()
                    .unwrap_or_else(|| "it names a path".into());
                let n = self.note(
                    Level::Warning,
                    line,
                    format!("exported {name} is not migrated to [env]: {why}"),
                );
                self.out.notes.push(n);
            }
        }
    }

    /// `[ -f FILE ]`, `[[ -f FILE ]]`, `test -f FILE` (also -e, -r, -s): FILE.
    fn test_file(&mut self, words: &[Word]) -> Option<String> {
        let lits: Vec<Option<String>> = words.iter().map(Word::literal).collect();
        let op_at = match lits.first()?.as_deref()? {
            "[" | "[[" | "test" => 1,
            _ => return None,
        };
        match lits.get(op_at)?.as_deref()? {
            "-f" | "-e" | "-r" | "-s" => {}
            _ => return None,
        }
        self.value(words.get(op_at + 1)?)
            .ok()
            .map(|v| finish(&v.text))
    }

    fn source(&mut self, words: &[Word]) {
        let line = words[0].line;
        let Some(w) = words.get(1) else {
            return;
        };
        match self.value(w) {
            Ok(v) => {
                let path = finish(&v.text);
                let guarded = self.guards.iter().any(|g| g.as_deref() == Some(&path));
                let notes = if v.unquoted.is_empty() {
                    Vec::new()
                } else {
                    vec![self.split_note(line, &v)]
                };
                self.out.env_source = Some(EnvSource {
                    path,
                    guarded,
                    at: self.at(line),
                    notes,
                });
            }
            Err(why) => {
                let n = self.note(
                    Level::Warning,
                    line,
                    format!("`source {}`: {why}; not migrated", w.source()),
                );
                self.out.notes.push(n);
            }
        }
    }
}

fn source_of(words: &[Word]) -> String {
    words.iter().map(Word::source).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const OOD: &str = r#"#!/bin/bash

SCRIPT=$(realpath "$0")
DIRNAME=$(dirname "$SCRIPT")/../
OVERLAY=$DIRNAME/overlay/overlay.img

if [ -f $DIRNAME/bin/.service_env ]; then
    source $DIRNAME/bin/.service_env
fi

apptainer instance start \
  --boot \
  --network macvlan_ood001 \
  -B /shared \
  -B $DIRNAME/root:/root \
  --overlay $OVERLAY \
  "$DIRNAME/containers/container.sif" ood001
"#;

    fn values(v: &[Setting<String>]) -> Vec<&str> {
        v.iter().map(|s| s.value.as_str()).collect()
    }

    #[test]
    fn dirname_becomes_service_dir() {
        let s = read(OOD, "start.sh", "/srv/ood001").unwrap();
        assert_eq!(s.instance.unwrap().value, "ood001");
        assert_eq!(
            s.image.unwrap().value,
            "${service_dir}/containers/container.sif"
        );
        assert_eq!(values(&s.binds), ["/shared", "${service_dir}/root:/root"]);
        assert_eq!(values(&s.networks), ["macvlan_ood001"]);
        let o = s.overlay.unwrap();
        assert_eq!(o.value, "${service_dir}/overlay/overlay.img");
        assert_eq!(o.from[0].line, 16);
        assert!(s.boot.unwrap().value);
        let e = s.env_source.unwrap();
        assert_eq!(e.path, "${service_dir}/bin/.service_env");
        assert!(e.guarded);
        assert!(s.extra_args.is_empty());
    }

    #[test]
    fn unquoted_variables_are_reported_next_to_their_setting() {
        let s = read(OOD, "start.sh", "/srv/ood001").unwrap();
        let bind = &s.binds[1];
        assert_eq!(bind.notes.len(), 1);
        assert!(
            bind.notes[0].text.starts_with("$DIRNAME unquoted"),
            "{:?}",
            bind.notes
        );
        // The quoted image path is not.
        assert!(s.image.unwrap().notes.is_empty());
        let spaced = read(OOD, "start.sh", "/srv/my ood").unwrap();
        assert!(spaced.binds[1].notes[0].text.contains("several words"));
    }

    #[test]
    fn a_flag_written_with_equals_and_a_variable_keeps_its_name() {
        let s = read(
            "N=ood001\napptainer instance start --boot --hostname=$N --bind=$DIRNAME/root:/root $DIRNAME/c.sif ood001\n",
            "start.sh",
            "/srv/ood001",
        )
        .unwrap();
        assert_eq!(s.hostname.unwrap().value, "ood001");
        assert_eq!(values(&s.binds), ["${service_dir}/root:/root"]);
        assert!(s.extra_args.is_empty(), "{:?}", values(&s.extra_args));
    }

    #[test]
    fn relative_overlay_is_resolved_and_reported() {
        let s = read(
            "apptainer instance start --overlay overlay.img $DIRNAME/c.sif ww001\n",
            "start.sh",
            "/srv/ww001",
        )
        .unwrap();
        let o = s.overlay.unwrap();
        assert_eq!(o.value, "${service_dir}/overlay/overlay.img");
        assert!(o
            .notes
            .iter()
            .any(|n| n.text.contains("start.sh used /overlay.img")));
        assert!(s.notes[0]
            .text
            .starts_with("$DIRNAME is used but never set"));
        let other = read(
            "cd /data\napptainer instance start --overlay o.img /c.sif x\n",
            "start.sh",
            "/srv/x",
        )
        .unwrap();
        assert_eq!(other.overlay.unwrap().value, "/data/o.img");
    }

    #[test]
    fn unknown_flags_and_unknown_variables() {
        let s = read(
            "apptainer instance start --writable-tmpfs --bind=/a,/b -B $X:/x --net /c.sif x\n",
            "start.sh",
            "/s",
        )
        .unwrap();
        assert_eq!(values(&s.extra_args), ["--writable-tmpfs", "--net"]);
        assert!(s.extra_args[0].notes[0]
            .text
            .contains("kept in apptainer.extra_args"));
        assert_eq!(values(&s.binds), ["/a", "/b"]);
        assert!(
            s.notes[0].text.contains("$X is not set in start.sh"),
            "{:?}",
            s.notes
        );
    }

    #[test]
    fn set_a_exports_what_is_sourced() {
        let s = read(
            "set -a\nsource /x\napptainer instance start /c.sif x\n",
            "start.sh",
            "/s",
        )
        .unwrap();
        assert!(s.allexport);
        let long = read(
            "set -o allexport\napptainer instance start /c.sif x\n",
            "start.sh",
            "/s",
        );
        assert!(long.unwrap().allexport);
        assert!(!read(OOD, "start.sh", "/s").unwrap().allexport);
    }

    #[test]
    fn no_instance_start_is_an_error() {
        let e = read("echo hello\n", "start.sh", "/s").unwrap_err();
        assert!(e.reason.contains("no `apptainer instance start`"));
    }
}
