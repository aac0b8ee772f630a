//! What the seed's `start.sh` means, read from its words (`shell.rs`), never run.
//!
//! The seed's scripts (apptainer-launchers-and-monitoring.md, "Container Start Script")
//! set `SCRIPT=$(realpath "$0")`, `DIRNAME=$(dirname "$SCRIPT")/../`, maybe `OVERLAY=…`,
//! source `$DIRNAME/bin/.service_env` when it exists, and run one `apptainer instance
//! start` with flags, the image and the instance name. Variables are followed as far as
//! they are known: `$DIRNAME` becomes `${service_dir}`, a variable holding the instance
//! name becomes `${name}`; anything else that depends on the running system (another
//! command's output, a variable from `.service_env`) is reported and left out.

use std::collections::HashMap;

use super::shell::{self, Command, Part, Word};
use super::{Level, Note, Origin, Setting};

/// Internal markers for `$0` and its directory while values are built; replaced by
/// [`finish`]. Control characters cannot come from a script's literal text by accident.
const SCRIPT: &str = "\u{1}script\u{1}";
const BIN: &str = "\u{1}bin\u{1}";

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

    /// The value of a word, or why it cannot be known without running the script.
    fn value(&mut self, w: &Word) -> Result<Value, String> {
        self.value_t(w, false)
    }

    /// `path`: a variable holding the instance name becomes `${name}`.
    fn value_t(&mut self, w: &Word, path: bool) -> Result<Value, String> {
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

    fn split_note(&self, line: usize, v: &Value) -> Note {
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

    fn instance_start(&mut self, words: &[Word], cmd: &str) {
        let line = words[0].line;
        if let Some(first) = self.seen_start {
            let n = self.note(
                Level::Warning,
                line,
                format!("a second `apptainer instance start` (the first is on line {first}): only the first is migrated"),
            );
            self.out.notes.push(n);
            return;
        }
        self.seen_start = Some(line);
        if cmd.contains('/') {
            self.out.binary = Some(Setting::new(cmd.to_owned(), self.at(line)));
        }
        let args = &words[3..];
        if args.len() < 2 {
            let n = self.note(
                Level::Warning,
                line,
                "`apptainer instance start` without an image and an instance name",
            );
            self.out.notes.push(n);
            return;
        }
        // start.sh's form ends with IMAGE NAME; flags come before them.
        let (flags, pos) = args.split_at(args.len() - 2);
        match pos[1].literal() {
            Some(name) => {
                self.out.instance = Some(Setting::new(name.clone(), self.at(pos[1].line)));
            }
            None => match self.value(&pos[1]) {
                Ok(v) if !v.text.contains('\u{1}') && !v.text.contains("${") => {
                    self.out.instance = Some(Setting::new(v.text, self.at(pos[1].line)));
                }
                _ => {
                    let n = self.note(
                        Level::Warning,
                        pos[1].line,
                        format!(
                            "the instance name {} is not known without running start.sh",
                            pos[1].source()
                        ),
                    );
                    self.out.notes.push(n);
                }
            },
        }
        self.name_vars = match &self.out.instance {
            Some(n) => self
                .vars
                .iter()
                .filter(|(_, v)| v.as_ref().ok() == Some(&n.value))
                .map(|(k, _)| k.clone())
                .collect(),
            None => Vec::new(),
        };
        self.image(&pos[0]);
        let mut i = 0;
        while i < flags.len() {
            let w = &flags[i];
            let lit = w.literal().unwrap_or_default();
            let (flag, inline) = match lit.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (lit.clone(), None),
            };
            let takes_value = matches!(
                flag.as_str(),
                "-B" | "--bind"
                    | "-o"
                    | "--overlay"
                    | "--network"
                    | "--network-args"
                    | "--hostname"
            );
            if flag == "--boot" {
                self.out.boot = Some(Setting::new(true, self.at(w.line)));
                i += 1;
                continue;
            }
            if !takes_value {
                self.extra(w);
                i += 1;
                continue;
            }
            // The value: inline (--bind=x) or the next word.
            let (vword, consumed) = match inline {
                Some(v) => (
                    Word {
                        parts: vec![Part::Lit(v)],
                        line: w.line,
                    },
                    1,
                ),
                None => match flags.get(i + 1) {
                    Some(n) => (n.clone(), 2),
                    None => {
                        let n = self.note(
                            Level::Warning,
                            w.line,
                            format!("{flag} without a value: not migrated"),
                        );
                        self.out.notes.push(n);
                        break;
                    }
                },
            };
            i += consumed;
            let is_path = matches!(flag.as_str(), "-B" | "--bind" | "-o" | "--overlay");
            let value = match self.value_t(&vword, is_path) {
                Ok(v) => v,
                Err(why) => {
                    let n = self.note(
                        Level::Warning,
                        vword.line,
                        format!("`{flag} {}`: {why}; not migrated", vword.source()),
                    );
                    self.out.notes.push(n);
                    continue;
                }
            };
            let mut notes = Vec::new();
            if !value.unquoted.is_empty() {
                notes.push(self.split_note(vword.line, &value));
            }
            let text = if is_path {
                finish(&value.text)
            } else {
                value.text.clone()
            };
            let at = self.at(vword.line);
            let setting = |v: String| Setting {
                value: v,
                from: vec![at.clone()],
                notes: notes.clone(),
            };
            match flag.as_str() {
                "-B" | "--bind" => {
                    for spec in text.split(',') {
                        self.out.binds.push(setting(spec.to_owned()));
                    }
                }
                "--network" => {
                    for n in text.split(',') {
                        self.out.networks.push(setting(n.to_owned()));
                    }
                }
                "--network-args" => self.out.network_args.push(setting(text)),
                "--hostname" => self.out.hostname = Some(setting(text)),
                _ => {
                    // -o / --overlay
                    let mut s = setting(text);
                    if let Some(prev) = &self.out.overlay {
                        s.notes.push(self.note(
                            Level::Warning,
                            vword.line,
                            format!(
                                "a second --overlay; the service file has one overlay ({} from line {} is kept), this one goes to apptainer.extra_args",
                                prev.value,
                                prev.from.first().map_or(0, |o| o.line)
                            ),
                        ));
                        let mut a = s.clone();
                        a.value = format!("--overlay={}", s.value);
                        self.out.extra_args.push(a);
                        continue;
                    }
                    if !s.value.starts_with('/') && !s.value.starts_with("${service_dir}") {
                        let rel = s.value.clone();
                        let cwd = self.cwd.clone().unwrap_or_else(|| "/".into());
                        s.notes.push(self.note(
                            Level::Warning,
                            vword.line,
                            format!(
                                "--overlay {rel} is relative: Apptainer opens it from the working directory, \
                                 which for a systemd service is {cwd} (systemd.exec(5) WorkingDirectory=), \
                                 so start.sh used {}, not the image Ansible creates in the service directory \
                                 (roles/master: {{{{ install_path }}}}/{{{{ servicename }}}}/overlay/overlay.img)",
                                join(&cwd, &rel)
                            ),
                        ));
                        s.value = relative_overlay(&rel, &cwd);
                        let resolved = s.value.replace("${service_dir}", self.service_dir);
                        let why = if s.value.starts_with("${service_dir}") {
                            "the image Ansible created for this service; check which of the two holds its data before the first start"
                        } else {
                            "what start.sh really opened"
                        };
                        s.notes.push(self.note(
                            Level::Warning,
                            vword.line,
                            format!("migrated as {} ({resolved}): {why}", s.value),
                        ));
                    }
                    self.out.overlay = Some(s);
                }
            }
        }
    }

    fn image(&mut self, w: &Word) {
        match self.value_t(w, true) {
            Ok(v) => {
                let mut s = Setting::new(finish(&v.text), self.at(w.line));
                if !v.unquoted.is_empty() {
                    s.notes.push(self.split_note(w.line, &v));
                }
                self.out.image = Some(s);
            }
            Err(why) => {
                let n = self.note(
                    Level::Warning,
                    w.line,
                    format!(
                        "image {}: {why}; the default image path is used",
                        w.source()
                    ),
                );
                self.out.notes.push(n);
            }
        }
    }

    fn extra(&mut self, w: &Word) {
        match self.value_t(w, true) {
            Ok(v) => {
                let text = finish(&v.text);
                let mut s = Setting::new(text.clone(), self.at(w.line));
                if text.starts_with('-') {
                    s.notes.push(self.note(
                        Level::Warning,
                        w.line,
                        format!("{text}: no service-file key for it; kept in apptainer.extra_args"),
                    ));
                }
                if !v.unquoted.is_empty() {
                    s.notes.push(self.split_note(w.line, &v));
                }
                self.out.extra_args.push(s);
            }
            Err(why) => {
                let n = self.note(
                    Level::Warning,
                    w.line,
                    format!("argument {}: {why}; not migrated", w.source()),
                );
                self.out.notes.push(n);
            }
        }
    }
}

/// Where a relative `--overlay` goes in the service file. The seed's ww001 passes
/// `overlay.img` while Ansible creates `overlay/overlay.img` in the service directory; a
/// file of that name is taken to mean that image. Anything else keeps what start.sh
/// really opened (relative to its working directory).
fn relative_overlay(rel: &str, cwd: &str) -> String {
    let default_name = crate::config::DEFAULT_OVERLAY
        .rsplit('/')
        .next()
        .unwrap_or("overlay.img");
    if rel == default_name || rel.trim_start_matches("./") == default_name {
        crate::config::DEFAULT_OVERLAY.to_owned()
    } else {
        join(cwd, rel)
    }
}

fn join(dir: &str, rel: &str) -> String {
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
