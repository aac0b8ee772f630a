//! `migrate`: today's `start.sh` and/or Ansible host_vars in, an equivalent service file out.
//!
//! The inputs are read, never run: `shell.rs` tokenizes start.sh, `start_sh/` gives its
//! words their meaning, `yaml.rs` reads host_vars, `build/` merges the two into one
//! [`Model`], one step per part of the service file (start.sh wins where both speak: it
//! is what actually ran; disagreements are reported), and `emit.rs` writes the TOML with
//! a `# migrate:` comment next to every setting that needs a person's decision. This
//! module holds the model's types and [`migrate`], which validates the result with the
//! same parser `check` uses; an entry that parser refuses is commented out with its
//! reason rather than written, so the file always passes `check --config`.

mod build;
mod emit;
pub mod shell;
pub mod start_sh;
pub mod yaml;

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config;

/// How much a note matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Looks wrong, or was not carried over: a person must decide.
    Warning,
    /// Worth knowing; nothing is lost.
    Note,
}

/// Where something was read: the input's file name (not its whole path, so the output
/// does not depend on where the inputs lay) and a 1-based line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub level: Level,
    pub at: Origin,
    pub text: String,
}

/// One value for the service file, where it came from, and what to say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting<T> {
    pub value: T,
    pub from: Vec<Origin>,
    pub notes: Vec<Note>,
}

impl<T> Setting<T> {
    pub fn new(value: T, at: Origin) -> Self {
        Setting {
            value,
            from: vec![at],
            notes: Vec::new(),
        }
    }

    fn bare(value: T) -> Self {
        Setting {
            value,
            from: Vec::new(),
            notes: Vec::new(),
        }
    }
}

/// One `[[network]]`.
#[derive(Debug, Clone)]
pub struct Net {
    pub name: Setting<String>,
    pub args: Vec<String>,
}

/// The service file to write, before it is text.
#[derive(Debug, Clone)]
pub struct Model {
    /// The inputs' file names, for the header.
    pub inputs: Vec<String>,
    /// Notes about the inputs as a whole.
    pub notes: Vec<Note>,
    pub name: Setting<String>,
    pub service_dir: Setting<String>,
    pub image: Option<Setting<String>>,
    pub image_url: Option<Setting<String>>,
    pub boot: Setting<bool>,
    pub hostname: Option<Setting<String>>,
    pub binds: Vec<Setting<String>>,
    /// `Some(explicit)`; `None`: the default, said in a comment (`env_file_note`).
    pub env_file: Option<Setting<String>>,
    pub env_file_note: Option<Setting<()>>,
    pub env: Vec<Setting<(String, String)>>,
    pub networks: Vec<Net>,
    pub overlay_path: Setting<String>,
    pub overlay_size: Setting<u64>,
    pub binary: Option<Setting<String>>,
    pub extra_args: Vec<Setting<String>>,
    /// What to say about `[readiness]`, which nothing in start.sh maps to.
    pub readiness: Option<Note>,
    /// Entries the service-file parser refused: (key, value as written, why).
    pub dropped: Vec<(String, String, Note)>,
}

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub start_sh: Option<Input>,
    pub host_vars: Option<Input>,
    /// The `.service_env` start.sh sources, when it exists beside start.sh.
    pub service_env: Option<Input>,
    pub name: Option<String>,
    pub service_dir: Option<String>,
    /// `--image-pointer`: `image` is the managed pointer `update` switches.
    pub image_pointer: bool,
}

/// One input file: its path (for messages) and its text.
#[derive(Debug, Clone)]
pub struct Input {
    pub path: PathBuf,
    pub text: String,
}

impl Input {
    fn label(&self) -> String {
        self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }
}

/// The result: the TOML text and what to tell the operator on stderr.
#[derive(Debug, Clone)]
pub struct Migration {
    pub toml: String,
    /// `warning: FILE:LINE: text` / `note: …` lines, in input order.
    pub messages: Vec<String>,
    pub warnings: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{path}: cannot read: {source}")]
    ReadInput {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {reason}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{0}\n  hint: {1}")]
    Usage(String, &'static str),
    #[error("{}: exists already; not overwritten\n  hint: choose another --output, or move the existing file away first", path.display())]
    OutputExists { path: PathBuf },
    #[error("{}: cannot write: {source}", path.display())]
    WriteOutput {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The merged file does not pass the parser and no entry could be blamed: a bug.
    #[error("the service file migrate wrote does not pass its own check (a bug):\n{0}")]
    Internal(String),
}

impl MigrateError {
    /// sysexits(3) codes, as `supervise::exit` names them.
    pub fn exit_code(&self) -> i32 {
        use crate::exit;
        match self {
            MigrateError::ReadInput { .. } => exit::NOINPUT,
            MigrateError::Parse { .. } => exit::DATAERR,
            MigrateError::Usage(..) => exit::USAGE,
            MigrateError::OutputExists { .. } | MigrateError::WriteOutput { .. } => exit::CANTCREAT,
            MigrateError::Internal(_) => exit::SOFTWARE,
        }
    }
}

/// Reads one input file (66 when it cannot be read).
pub fn read_input(path: &Path) -> Result<Input, MigrateError> {
    std::fs::read_to_string(path)
        .map(|text| Input {
            path: path.to_owned(),
            text,
        })
        .map_err(|source| MigrateError::ReadInput {
            path: path.to_owned(),
            source,
        })
}

/// The service directory start.sh computes: `$(dirname "$(realpath "$0")")/..`.
pub fn service_dir_of(start_sh: &Path) -> Option<PathBuf> {
    let real = std::fs::canonicalize(start_sh).ok()?;
    Some(real.parent()?.parent()?.to_owned())
}

/// Merges the inputs into a service file. Pure: the caller reads and writes files.
pub fn migrate(inputs: &Inputs) -> Result<Migration, MigrateError> {
    let mut model = build::build(inputs)?;
    // Validate with the real parser; comment out what it refuses, until it passes.
    for _ in 0..64 {
        let (text, refs) = emit::render(&model);
        let file = PathBuf::from(format!("{}.toml", model.name.value));
        let issues = match config::parse(&text, &file, None) {
            Ok(_) => return Ok(finish(model, text, inputs)),
            Err(e) => e.issues().to_vec(),
        };
        if issues.is_empty() {
            return Err(MigrateError::Internal(text));
        }
        let mut dropped_any = false;
        for issue in issues.iter().rev() {
            let Some((_, r)) = refs.iter().find(|(l, _)| *l == issue.line) else {
                continue;
            };
            if let Some(d) = emit::drop_ref(&mut model, *r, &issue.reason) {
                model.dropped.push(d);
                dropped_any = true;
            }
        }
        if !dropped_any {
            let e = config::parse(&text, &file, None)
                .err()
                .map(|e| e.to_string());
            return Err(match (issues.first(), e) {
                (Some(i), Some(msg)) if matches!(i.key.as_str(), "name" | "service_dir") => {
                    MigrateError::Usage(msg, "pass --name NAME / --service-dir DIR")
                }
                (_, msg) => MigrateError::Internal(msg.unwrap_or(text)),
            });
        }
    }
    Err(MigrateError::Internal("too many refused entries".into()))
}

/// `apptainer-supervisor migrate`: read the inputs, print the warnings, write the file.
pub fn run(args: &crate::cli::MigrateArgs) -> Result<(), MigrateError> {
    let start_sh = args.start_sh.as_deref().map(read_input).transpose()?;
    let host_vars = args.host_vars.as_deref().map(read_input).transpose()?;
    // start.sh's `source $DIRNAME/bin/.service_env`: the file beside it. Only read, to say
    // what becomes of its variables.
    let service_env = args
        .start_sh
        .as_deref()
        .and_then(Path::parent)
        .map(|d| d.join(".service_env"))
        .filter(|p| p.is_file())
        .map(|p| read_input(&p))
        .transpose()?;
    let inputs = Inputs {
        start_sh,
        host_vars,
        service_env,
        name: args.name.clone(),
        service_dir: args.service_dir.clone(),
        image_pointer: args.image_pointer,
    };
    let m = migrate(&inputs)?;
    for line in &m.messages {
        eprintln!("{line}");
    }
    match &args.output {
        None => {
            // A reader that went away (EPIPE) ends the output quietly; print! would panic.
            let mut out = std::io::stdout().lock();
            match out.write_all(m.toml.as_bytes()).and_then(|()| out.flush()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(MigrateError::WriteOutput {
                        path: PathBuf::from("-"),
                        source: e,
                    })
                }
                _ => {}
            }
        }
        Some(out) => {
            write_new(out, m.toml.as_bytes())?;
            eprintln!(
                "wrote {} ({} warning{}); check it with: apptainer-supervisor check --config {}",
                out.display(),
                m.warnings,
                if m.warnings == 1 { "" } else { "s" },
                out.display()
            );
        }
    }
    Ok(())
}

/// Writes a file that must not exist yet: the content goes to a temporary file with
/// [`crate::os::fsutil::write_atomic`], which is then hard-linked to `path` — `link(2)` fails
/// with EEXIST instead of replacing a file that appeared meanwhile — and removed.
fn write_new(path: &Path, data: &[u8]) -> Result<(), MigrateError> {
    let exists = |path: &Path| MigrateError::OutputExists {
        path: path.to_owned(),
    };
    let werr = |source| MigrateError::WriteOutput {
        path: path.to_owned(),
        source,
    };
    if path.symlink_metadata().is_ok() {
        return Err(exists(path));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        werr(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let tmp = dir.join(format!(
        ".{}.migrate.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    crate::os::fsutil::write_atomic(&tmp, data, 0o644).map_err(werr)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(werr),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(exists(path)),
        Err(e) => Err(werr(e)),
    }
}

fn finish(model: Model, toml: String, inputs: &Inputs) -> Migration {
    let paths: Vec<(String, String)> = [&inputs.start_sh, &inputs.host_vars, &inputs.service_env]
        .into_iter()
        .flatten()
        .map(|i| (i.label(), i.path.display().to_string()))
        .collect();
    let mut messages = Vec::new();
    let mut warnings = 0;
    for n in emit::all_notes(&model) {
        let file = paths
            .iter()
            .find(|(l, _)| *l == n.at.file)
            .map_or(n.at.file.clone(), |(_, p)| p.clone());
        let place = if n.at.line > 0 {
            format!("{file}:{}", n.at.line)
        } else {
            file
        };
        let level = match n.level {
            Level::Warning => {
                warnings += 1;
                "warning"
            }
            Level::Note => "note",
        };
        let place = if place.is_empty() {
            String::new()
        } else {
            format!("{place}: ")
        };
        messages.push(format!("{level}: {place}{}", n.text));
    }
    Migration {
        toml,
        messages,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, text: &str) -> Input {
        Input {
            path: PathBuf::from(format!("/in/{name}")),
            text: text.into(),
        }
    }

    #[test]
    fn host_vars_alone_need_a_service_dir() {
        let i = Inputs {
            host_vars: Some(input("x.yml", "servicename: x\n")),
            ..Default::default()
        };
        let e = migrate(&i).unwrap_err();
        assert_eq!(e.exit_code(), crate::exit::USAGE);
        let i = Inputs {
            host_vars: Some(input("x.yml", "servicename: x\ninstall_path: /srv/x/\n")),
            ..Default::default()
        };
        let m = migrate(&i).unwrap();
        assert!(m.toml.contains("service_dir = \"/srv/x/x\""), "{}", m.toml);
    }

    #[test]
    fn refused_entries_are_commented_out_and_the_rest_passes() {
        let i = Inputs {
            start_sh: Some(input(
                "start.sh",
                "apptainer instance start --boot -B rel:/x -B /a:/b:nodev /c.sif svc\n",
            )),
            service_dir: Some("/srv/svc".into()),
            ..Default::default()
        };
        let m = migrate(&i).unwrap();
        let s = config::parse(&m.toml, Path::new("svc.toml"), None).unwrap();
        assert!(s.binds.is_empty(), "{}", m.toml);
        assert!(m.toml.contains("# binds: \"rel:/x\""), "{}", m.toml);
        assert!(
            m.messages
                .iter()
                .any(|w| w.contains("not an absolute path")),
            "{:?}",
            m.messages
        );
    }

    #[test]
    fn service_env_variables_are_judged() {
        let i = Inputs {
            start_sh: Some(input(
                "start.sh",
                "source $DIRNAME/bin/.service_env\napptainer instance start --boot /c.sif svc\n",
            )),
            service_env: Some(input(".service_env", "FOO=1\nexport APPTAINER_TMPDIR=/t\n")),
            service_dir: Some("/srv/svc".into()),
            ..Default::default()
        };
        let m = migrate(&i).unwrap();
        let foo: Vec<_> = m.messages.iter().filter(|w| w.contains("FOO")).collect();
        assert_eq!(foo.len(), 2, "{:?}", m.messages);
        assert!(foo[0].contains("/in/.service_env:1"));
        assert!(!m.messages.iter().any(|w| w.contains("APPTAINER_TMPDIR")));
        // Unguarded source: an explicit env_file.
        assert!(m
            .toml
            .contains("env_file = \"${service_dir}/bin/.service_env\""));
    }

    #[test]
    fn network_args_go_to_their_network() {
        let i = Inputs {
            start_sh: Some(input(
                "start.sh",
                "apptainer instance start --network a,b --network-args \"b:IP=10.0.0.2/24\" /c.sif s\n",
            )),
            service_dir: Some("/srv/s".into()),
            ..Default::default()
        };
        let m = migrate(&i).unwrap();
        let s = config::parse(&m.toml, Path::new("s.toml"), None).unwrap();
        assert!(s.networks[0].args.is_empty());
        assert_eq!(s.networks[1].args, ["IP=10.0.0.2/24"]);
    }

    #[test]
    fn an_image_url_in_start_sh_becomes_image_url() {
        let i = Inputs {
            start_sh: Some(input(
                "start.sh",
                "apptainer instance start --boot docker://foo/bar:1 s\n",
            )),
            service_dir: Some("/srv/s".into()),
            ..Default::default()
        };
        let m = migrate(&i).unwrap();
        let s = config::parse(&m.toml, Path::new("s.toml"), None).unwrap();
        assert_eq!(
            s.image_url.as_deref(),
            Some("docker://foo/bar:1"),
            "{}",
            m.toml
        );
        assert!(
            m.messages
                .iter()
                .any(|w| w.contains("start.sh ran the image straight from docker://foo/bar:1")),
            "{:?}",
            m.messages
        );
    }

    #[test]
    fn network_args_for_a_network_not_joined_stay_in_extra_args() {
        let i = Inputs {
            start_sh: Some(input(
                "start.sh",
                "apptainer instance start --network a --network-args \"c:IP=1\" --writable-tmpfs /c.sif s\n",
            )),
            service_dir: Some("/srv/s".into()),
            ..Default::default()
        };
        let m = migrate(&i).unwrap();
        let s = config::parse(&m.toml, Path::new("s.toml"), None).unwrap();
        assert!(s.networks[0].args.is_empty());
        assert_eq!(
            s.apptainer.extra_args,
            ["--writable-tmpfs", "--network-args=c:IP=1"],
            "{}",
            m.toml
        );
        assert!(
            m.messages
                .iter()
                .any(|w| w.contains("--network-args for a network start.sh does not join")),
            "{:?}",
            m.messages
        );
    }
}
