//! `apptainer instance start [FLAGS] IMAGE NAME`: what each of its words builds — the
//! binary, the instance name, the image, `--boot`, binds, networks and their args, the
//! hostname and the overlay; any other flag is kept for `apptainer.extra_args`.

use super::value::{finish, join};
use super::Reader;
use crate::migrate::shell::{Part, Word};
use crate::migrate::{Level, Setting};

impl Reader<'_> {
    /// The first `apptainer instance start`; a later one is only reported, since a
    /// service file starts one instance.
    pub(super) fn instance_start(&mut self, words: &[Word], cmd: &str) {
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
        self.instance_name(&pos[1]);
        self.image(&pos[0]);
        self.flags(flags);
    }

    /// The instance name, when it is known without running the script, and the variables
    /// that hold it, so that paths built from them say `${name}`.
    fn instance_name(&mut self, w: &Word) {
        match w.literal() {
            Some(name) => {
                self.out.instance = Some(Setting::new(name.clone(), self.at(w.line)));
            }
            None => match self.value(w) {
                Ok(v) if !v.text.contains('\u{1}') && !v.text.contains("${") => {
                    self.out.instance = Some(Setting::new(v.text, self.at(w.line)));
                }
                _ => {
                    let n = self.note(
                        Level::Warning,
                        w.line,
                        format!(
                            "the instance name {} is not known without running start.sh",
                            w.source()
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
    }

    /// The flags before IMAGE NAME, in order: `--boot`, a flag with a service-file key
    /// and its value ([`Self::valued_flag`]), or an extra argument.
    fn flags(&mut self, flags: &[Word]) {
        let mut i = 0;
        while i < flags.len() {
            let w = &flags[i];
            let (flag, inline) = split_inline(w);
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
                Some(v) => (v, 1),
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
            self.valued_flag(&flag, &vword);
        }
    }

    /// A flag that has a service-file key, with its value (`--bind=x` or the next word).
    fn valued_flag(&mut self, flag: &str, vword: &Word) {
        let is_path = matches!(flag, "-B" | "--bind" | "-o" | "--overlay");
        let value = match self.value_t(vword, is_path) {
            Ok(v) => v,
            Err(why) => {
                let n = self.note(
                    Level::Warning,
                    vword.line,
                    format!("`{flag} {}`: {why}; not migrated", vword.source()),
                );
                self.out.notes.push(n);
                return;
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
        match flag {
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
            // -o / --overlay
            _ => self.overlay(setting(text), vword.line),
        }
    }

    /// `-o`/`--overlay`: the first is the service's overlay, a relative path resolved as
    /// Apptainer would have (and reported); a second has no key and becomes an extra
    /// argument.
    fn overlay(&mut self, mut s: Setting<String>, line: usize) {
        if let Some(prev) = &self.out.overlay {
            s.notes.push(self.note(
                Level::Warning,
                line,
                format!(
                    "a second --overlay; the service file has one overlay ({} from line {} is kept), this one goes to apptainer.extra_args",
                    prev.value,
                    prev.from.first().map_or(0, |o| o.line)
                ),
            ));
            let mut a = s.clone();
            a.value = format!("--overlay={}", s.value);
            self.out.extra_args.push(a);
            return;
        }
        if !s.value.starts_with('/') && !s.value.starts_with("${service_dir}") {
            let rel = s.value.clone();
            let cwd = self.cwd.clone().unwrap_or_else(|| "/".into());
            s.notes.push(self.note(
                Level::Warning,
                line,
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
                line,
                format!("migrated as {} ({resolved}): {why}", s.value),
            ));
        }
        self.out.overlay = Some(s);
    }

    /// IMAGE: a URI as written, or a path with `${name}` where a variable holding the
    /// instance name was used.
    fn image(&mut self, w: &Word) {
        match self.value_t(w, true) {
            Ok(v) => {
                // A `transport://ref` is a URI to Apptainer whatever the transport
                // (internal/pkg/util/uri/uri.go Split, v1.3.6:111 and v1.4.5:111), not a
                // path: path clean-up would fold its `//` and hide it from the merge.
                let is_uri = v
                    .text
                    .split_once(':')
                    .is_some_and(|(_, rest)| rest.starts_with("//"));
                let text = if is_uri {
                    v.text.clone()
                } else {
                    finish(&v.text)
                };
                let mut s = Setting::new(text, self.at(w.line));
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

    /// Any other word before IMAGE NAME: kept as an extra argument, with a warning when it
    /// is a flag (it has no service-file key).
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

/// A flag word split at its first `=` when it is written `--flag=value`: the flag's name
/// is the plain text before the `=`, the value the rest of the word, which may still
/// expand (`--hostname=$N` names `--hostname` as surely as `--hostname $N` does).
fn split_inline(w: &Word) -> (String, Option<Word>) {
    let lead = match w.parts.first() {
        Some(Part::Lit(l)) => l,
        _ => return (w.literal().unwrap_or_default(), None),
    };
    match lead.split_once('=') {
        Some((f, v)) if f.starts_with("--") => {
            let mut parts = vec![Part::Lit(v.to_owned())];
            parts.extend(w.parts[1..].iter().cloned());
            (
                f.to_owned(),
                Some(Word {
                    parts,
                    line: w.line,
                }),
            )
        }
        _ => (w.literal().unwrap_or_default(), None),
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
