//! `migrate`: today's `start.sh` and/or Ansible host_vars in, an equivalent service file out.
//!
//! The inputs are read, never run: `shell.rs` tokenizes start.sh, `start_sh.rs` gives its
//! words their meaning, `yaml.rs` reads host_vars, this module merges the two into one
//! [`Model`] (start.sh wins where both speak: it is what actually ran; disagreements are
//! reported), and `emit.rs` writes the TOML with a `# migrate:` comment next to every
//! setting that needs a person's decision. The result is validated with the same parser
//! `check` uses; an entry that parser refuses is commented out with its reason rather
//! than written, so the file always passes `check --config`.

mod emit;
pub mod shell;
pub mod start_sh;
pub mod yaml;

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::{self, DEFAULT_ENV_FILE, DEFAULT_OVERLAY, DEFAULT_OVERLAY_MIB};

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
    let mut model = build(inputs)?;
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

fn parse_err(input: &Input, line: usize, reason: String) -> MigrateError {
    MigrateError::Parse {
        path: input.path.clone(),
        line,
        reason,
    }
}

fn build(inputs: &Inputs) -> Result<Model, MigrateError> {
    if inputs.start_sh.is_none() && inputs.host_vars.is_none() {
        return Err(MigrateError::Usage(
            "nothing to migrate".into(),
            "pass --start-sh PATH and/or --host-vars PATH",
        ));
    }
    let hv = match &inputs.host_vars {
        Some(i) => {
            Some(yaml::read(&i.text, &i.label()).map_err(|e| parse_err(i, e.line, e.reason))?)
        }
        None => None,
    };
    let hv_label = inputs
        .host_vars
        .as_ref()
        .map(Input::label)
        .unwrap_or_default();

    // The service directory: asked for, else where start.sh lies, else Ansible's.
    let service_dir: Setting<String> = match (&inputs.service_dir, &inputs.start_sh) {
        (Some(d), _) => Setting::bare(d.trim_end_matches('/').to_owned()),
        (None, Some(s)) => match service_dir_of(&s.path) {
            Some(d) => Setting::bare(d.display().to_string()),
            None => {
                return Err(MigrateError::Usage(
                    format!("{}: cannot resolve its directory", s.path.display()),
                    "pass --service-dir DIR (the directory above start.sh's bin/)",
                ))
            }
        },
        (None, None) => match hv
            .as_ref()
            .and_then(|h| Some((h.install_path.as_ref()?, h.servicename.as_ref()?)))
        {
            Some((ip, sn)) => Setting {
                value: format!("{}/{}", ip.value.trim_end_matches('/'), sn.value),
                from: vec![ip.from[0].clone(), sn.from[0].clone()],
                notes: Vec::new(),
            },
            None => return Err(MigrateError::Usage(
                "the service directory is not known from host_vars alone".into(),
                "pass --service-dir DIR (start.sh's $DIRNAME, e.g. /shared/services/ood/ood001)",
            )),
        },
    };

    let sh = match &inputs.start_sh {
        Some(i) => Some(
            start_sh::read(&i.text, &i.label(), &service_dir.value)
                .map_err(|e| parse_err(i, e.line, e.reason))?,
        ),
        None => None,
    };
    let sh_label = inputs
        .start_sh
        .as_ref()
        .map(Input::label)
        .unwrap_or_default();
    let mut notes: Vec<Note> = Vec::new();
    let header = |label: &str, text: String| Note {
        level: Level::Warning,
        at: Origin {
            file: label.to_owned(),
            line: 0,
        },
        text,
    };
    if let Some(i) = &inputs.start_sh {
        let dir = i.path.parent().and_then(Path::file_name);
        if inputs.service_dir.is_none() && dir.is_some_and(|d| d != "bin") {
            notes.push(header(
                &sh_label,
                "start.sh is not in a bin/ directory as in today's start.sh layout; service_dir is \
                 still the directory above it, as $(dirname \"$SCRIPT\")/../ computes"
                    .into(),
            ));
        }
    }

    // The name.
    let from_sh = sh.as_ref().and_then(|s| s.instance.clone());
    let from_hv = hv.as_ref().and_then(|h| h.servicename.clone());
    let mut name = match (&inputs.name, &from_sh, &from_hv) {
        (Some(n), _, _) => Setting::bare(n.clone()),
        (None, Some(s), _) => s.clone(),
        (None, None, Some(h)) => h.clone(),
        (None, None, None) => {
            return Err(MigrateError::Usage(
                "the service name is not known from the inputs".into(),
                "pass --name NAME",
            ))
        }
    };
    if let (Some(s), Some(h)) = (&from_sh, &from_hv) {
        if s.value != h.value {
            name.notes.push(Note {
                level: Level::Warning,
                at: h.from[0].clone(),
                text: format!(
                    "host_vars servicename {:?} differs from start.sh's instance name {:?}",
                    h.value, s.value
                ),
            });
        } else if inputs.name.is_none() {
            name.from.extend(h.from.iter().cloned());
        }
    }
    if let (Some(n), Some(s)) = (&inputs.name, &from_sh) {
        if *n != s.value {
            name.notes.push(Note {
                level: Level::Warning,
                at: s.from[0].clone(),
                text: format!(
                    "start.sh started the instance as {:?}; the service file names it {n:?}, \
                     so `apptainer instance list` and stop.sh's name change with it",
                    s.value
                ),
            });
        }
    }

    let mut m = Model {
        inputs: [&inputs.start_sh, &inputs.host_vars]
            .into_iter()
            .flatten()
            .map(Input::label)
            .collect(),
        notes,
        name,
        service_dir,
        image: None,
        image_url: hv.as_ref().and_then(|h| h.container_url.clone()),
        boot: Setting::bare(true),
        hostname: None,
        binds: Vec::new(),
        env_file: None,
        env_file_note: None,
        env: Vec::new(),
        networks: Vec::new(),
        overlay_path: Setting::bare(DEFAULT_OVERLAY.to_owned()),
        overlay_size: Setting::bare(DEFAULT_OVERLAY_MIB),
        binary: None,
        extra_args: Vec::new(),
        readiness: None,
        dropped: Vec::new(),
    };

    // Image.
    if let Some(img) = sh.as_ref().and_then(|s| s.image.clone()) {
        if img.value.contains("://") {
            let mut url = img.clone();
            url.notes.push(Note {
                level: Level::Warning,
                at: img.from[0].clone(),
                text: format!(
                    "start.sh ran the image straight from {}; the service file starts a local \
                     image: pull it to {} (apptainer pull) before the first start",
                    img.value,
                    config::DEFAULT_IMAGE
                ),
            });
            if let Some(hvurl) = &m.image_url {
                if hvurl.value != img.value {
                    url.notes.push(Note {
                        level: Level::Warning,
                        at: hvurl.from[0].clone(),
                        text: format!("host_vars container_url is {:?}", hvurl.value),
                    });
                }
            }
            m.image_url = Some(url);
        } else {
            m.image = Some(img);
        }
    }
    if let Some(u) = &mut m.image_url {
        if u.from.iter().all(|o| o.file == hv_label) {
            u.notes.push(Note {
                level: Level::Note,
                at: u.from[0].clone(),
                text: "container_url: kept as image_url for image updates; the supervisor starts \
                       the local image and never pulls"
                    .into(),
            });
        }
    }

    // Boot.
    let hv_boot = hv.as_ref().and_then(|h| h.boot.clone());
    m.boot = match (&sh, &hv_boot) {
        (Some(s), _) => {
            let mut b = s.boot.clone().unwrap_or_else(|| {
                let mut b = Setting::new(
                    false,
                    Origin {
                        file: sh_label.clone(),
                        line: s.instance.as_ref().map_or(0, |i| i.from[0].line),
                    },
                );
                b.notes.push(Note {
                    level: Level::Warning,
                    at: b.from[0].clone(),
                    text: "start.sh passes no --boot: the image's startscript runs instead of \
                           systemd, so readiness can only be `instance`"
                        .into(),
                });
                b
            });
            if let Some(h) = &hv_boot {
                if h.value == b.value {
                    b.from.extend(h.from.iter().cloned());
                } else {
                    b.notes.push(Note {
                        level: Level::Warning,
                        at: h.from[0].clone(),
                        text: format!(
                            "host_vars says boot: {}, start.sh {}: start.sh is what ran, so it wins",
                            h.value,
                            if b.value { "passes --boot" } else { "does not pass --boot" }
                        ),
                    });
                }
            }
            b
        }
        (None, Some(h)) => h.clone(),
        (None, None) => Setting::bare(true),
    };
    m.hostname = sh.as_ref().and_then(|s| s.hostname.clone());

    // Binds and networks: start.sh's, compared with host_vars'.
    let hv_mounts = hv.as_ref().and_then(|h| h.mounts.clone());
    m.binds = merge_lists(
        sh.as_ref().map(|s| s.binds.clone()),
        hv_mounts,
        "-B",
        "mounts",
    );
    let hv_nets = hv.as_ref().and_then(|h| h.networks.clone());
    let nets = merge_lists(
        sh.as_ref().map(|s| s.networks.clone()),
        hv_nets,
        "--network",
        "network",
    );
    m.networks = nets
        .into_iter()
        .map(|name| Net {
            name,
            args: Vec::new(),
        })
        .collect();
    if let Some(s) = &sh {
        for a in &s.network_args {
            network_args(&mut m, a);
        }
    }
    if !m.networks.is_empty() {
        let all: Vec<String> = m.networks.iter().map(|n| n.name.value.clone()).collect();
        let first = &mut m.networks[0].name;
        let at = first.from.first().cloned().unwrap_or_default();
        first.notes.push(Note {
            level: Level::Note,
            at,
            text: format!(
                "the conflists of {} are Ansible's, and neither start.sh nor host_vars says what is \
                 in them: each network is left external (the supervisor only checks that \
                 a conflist in /etc/apptainer/network has that name). To let the \
                 supervisor write it, replace external = true with type, master, \
                 [network.ipam] … and manage = true (apptainer-supervisor.toml(5), NETWORKS; \
                 examples/*.toml)",
                all.join(", ")
            ),
        });
    }
    // `--boot` without `--network`: Apptainer gave the container its default `bridge`
    // network (launcher_linux.go: `--boot` sets Namespaces.Net, v1.4.5:365-367, and
    // setNamespaces then Network = "bridge", v1.4.5:959-962). The supervisor passes
    // `--network none` unless the service names that network, so it is written out.
    if m.networks.is_empty() && m.boot.value {
        let at = m.boot.from.first().cloned().unwrap_or_default();
        let mut name = Setting::new(crate::config::APPTAINER_BRIDGE.to_owned(), at.clone());
        name.from = m.boot.from.clone();
        name.notes.push(Note {
            level: Level::Note,
            at,
            text: "--boot without --network: Apptainer gave the container its default \
                   network, \"bridge\" (its 00_bridge.conflist: bridge sbr0, NAT, 10.22.0.0/16), \
                   so it is named here. Without a [[network]] the supervisor starts the \
                   container with --network none (no network); remove this table if the \
                   service needs none"
                .into(),
        });
        m.networks.push(Net {
            name,
            args: Vec::new(),
        });
    }

    // Overlay.
    let sh_overlay = sh.as_ref().and_then(|s| s.overlay.clone());
    match (&sh, sh_overlay) {
        (_, Some(o)) => m.overlay_path = o,
        (Some(s), None) => {
            let mut o = Setting::bare(DEFAULT_OVERLAY.to_owned());
            o.notes.push(Note {
                level: Level::Warning,
                at: Origin {
                    file: sh_label.clone(),
                    line: s.instance.as_ref().map_or(0, |i| i.from[0].line),
                },
                text: "start.sh attaches no --overlay; the supervisor always does, and creates \
                       this one if it is missing"
                    .into(),
            });
            m.overlay_path = o;
        }
        (None, None) => {}
    }
    match hv.as_ref().and_then(|h| h.overlay_size.clone()) {
        Some(s) => m.overlay_size = s,
        None => {
            let mut s = Setting::bare(DEFAULT_OVERLAY_MIB);
            s.notes.push(Note {
                level: Level::Note,
                at: Origin::default(),
                text: if inputs.host_vars.is_some() {
                    "host_vars set no overlay_size: Ansible's default (overlay_size | default(1024))".into()
                } else {
                    "no host_vars given: Ansible's default (overlay_size | default(1024)); used \
                     only if the image has to be created"
                        .into()
                },
            });
            m.overlay_size = s;
        }
    }

    // The env file.
    if let Some(src) = sh.as_ref().and_then(|s| s.env_source.clone()) {
        let mut note = Setting::new((), src.at.clone());
        note.notes.extend(src.notes.iter().cloned());
        if src.path == DEFAULT_ENV_FILE && src.guarded {
            note.notes.push(Note {
                level: Level::Note,
                at: src.at.clone(),
                text: format!(
                    "start.sh sources {} when it exists: that is env_file's default, read as \
                     KEY=VALUE lines, never run by a shell",
                    src.path
                ),
            });
            m.env_file_note = Some(note);
        } else {
            let mut s = Setting::new(src.path.clone(), src.at.clone());
            s.notes.extend(src.notes.iter().cloned());
            if src.guarded {
                s.notes.push(Note {
                    level: Level::Warning,
                    at: src.at.clone(),
                    text: "start.sh sourced it only when it existed; a set env_file must exist"
                        .into(),
                });
            }
            m.env_file = Some(s);
        }
        if let Some(env) = &inputs.service_env {
            let target = m.env_file.as_mut().map_or_else(
                || &mut m.env_file_note.as_mut().expect("set above").notes,
                |s| &mut s.notes,
            );
            let allexport = sh.as_ref().is_some_and(|s| s.allexport);
            target.extend(service_env_notes(env, allexport));
        }
    }
    if let Some(s) = &sh {
        m.env = s.env.clone();
        m.binary = s.binary.clone();
        m.extra_args = s.extra_args.clone();
        m.notes.extend(s.notes.iter().cloned());
    }
    if let Some(h) = &hv {
        m.notes.extend(h.notes.iter().cloned());
    }
    if let Some(b) = &mut m.binary {
        if !b.value.starts_with('/') {
            b.notes.push(Note {
                level: Level::Warning,
                at: b.from[0].clone(),
                text: format!(
                    "{}: not an absolute path; apptainer.binary must be",
                    b.value
                ),
            });
        }
    }
    m.readiness = Some(Note {
        level: Level::Note,
        at: Origin::default(),
        text: "start.sh had no notion of readiness: READY=1 now waits for the container's systemd \
               to boot; list the units that must be active too in [readiness] required_units \
               (e.g. \"httpd.service\")"
            .into(),
    });
    Ok(m)
}

/// `--network-args "[net:]K=V;K2=V2"` → the args of that network, or of all of them
/// (Apptainer's pkg/network SetArgs: no prefix means every network).
fn network_args(m: &mut Model, a: &Setting<String>) {
    let (net, rest) = match a.value.split_once(':') {
        Some((n, r)) if !n.contains('=') => (Some(n.to_owned()), r.to_owned()),
        _ => (None, a.value.clone()),
    };
    let kvs: Vec<String> = rest
        .split(';')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let mut matched = false;
    for n in &mut m.networks {
        if net.as_deref().is_none_or(|x| x == n.name.value) {
            n.args.extend(kvs.iter().cloned());
            n.name.from.extend(a.from.iter().cloned());
            n.name.notes.extend(a.notes.iter().cloned());
            matched = true;
        }
    }
    if !matched {
        let mut s = a.clone();
        s.value = format!("--network-args={}", a.value);
        s.notes.push(Note {
            level: Level::Warning,
            at: a.from.first().cloned().unwrap_or_default(),
            text:
                "--network-args for a network start.sh does not join; kept in apptainer.extra_args"
                    .into(),
        });
        m.extra_args.push(s);
    }
}

/// start.sh's list, checked against host_vars'; host_vars' alone when there is no start.sh.
fn merge_lists(
    sh: Option<Vec<Setting<String>>>,
    hv: Option<Vec<Setting<String>>>,
    flag: &str,
    key: &str,
) -> Vec<Setting<String>> {
    match (sh, hv) {
        (Some(mut s), Some(h)) => {
            let sv: Vec<&str> = s.iter().map(|x| x.value.as_str()).collect();
            let hvv: Vec<&str> = h.iter().map(|x| x.value.as_str()).collect();
            if sv == hvv {
                for (a, b) in s.iter_mut().zip(&h) {
                    a.from.extend(b.from.iter().cloned());
                }
            } else {
                let only_sh: Vec<&str> = sv.iter().filter(|v| !hvv.contains(v)).copied().collect();
                let only_hv: Vec<&str> = hvv.iter().filter(|v| !sv.contains(v)).copied().collect();
                let text = format!(
                    "start.sh's {flag} and host_vars' {key} differ (only in start.sh: {only_sh:?}; \
                     only in host_vars: {only_hv:?}{}): start.sh is what ran, so its list is used",
                    if only_sh.is_empty() && only_hv.is_empty() {
                        "; the order differs"
                    } else {
                        ""
                    }
                );
                let at = h
                    .first()
                    .and_then(|x| x.from.first().cloned())
                    .unwrap_or_default();
                if let Some(f) = s.first_mut() {
                    f.notes.push(Note {
                        level: Level::Warning,
                        at,
                        text,
                    });
                }
            }
            s
        }
        (Some(s), None) => s,
        (None, Some(h)) => h,
        (None, None) => Vec::new(),
    }
}

/// What becomes of each variable of `.service_env` (read, never sourced).
fn service_env_notes(env: &Input, allexport: bool) -> Vec<Note> {
    let label = env.label();
    let vars = match config::parse_env_file(&env.text) {
        Ok(v) => v,
        Err((line, reason)) => {
            return vec![Note {
                level: Level::Warning,
                at: Origin { file: label, line },
                text: format!(
                    "{reason}: the supervisor reads this file as KEY=VALUE lines and will refuse it as it is"
                ),
            }]
        }
    };
    let mut out = Vec::new();
    for (key, _) in vars {
        let line = env
            .text
            .lines()
            .position(|l| {
                let t = l.trim_start();
                let t = t.strip_prefix("export ").map_or(t, str::trim_start);
                t.starts_with(&format!("{key}="))
            })
            .map_or(0, |i| i + 1);
        let exported = line > 0
            && env
                .text
                .lines()
                .nth(line - 1)
                .is_some_and(|l| l.trim_start().starts_with("export "));
        let at = Origin {
            file: label.clone(),
            line,
        };
        if !exported && !allexport {
            out.push(Note {
                level: Level::Warning,
                at: at.clone(),
                text: format!(
                    "{key}: start.sh's `source` made it a shell variable only (no export), so \
                     apptainer never saw it; the supervisor puts it into apptainer's environment"
                ),
            });
        }
        // Apptainer reads APPTAINER_*/SINGULARITY_* itself and turns APPTAINERENV_X into
        // X inside; everything else only reaches the --boot init's environment.
        if !key.starts_with("APPTAINER") && !key.starts_with("SINGULARITY") {
            out.push(Note {
                level: Level::Warning,
                at,
                text: format!(
                    "{key}: reaches the container's init, but with --boot that is systemd, which \
                     starts its units with a clean environment (systemd src/core/manager.c, \
                     manager_default_environment), so no service inside sees it; set it in the \
                     image (a unit's Environment=) instead"
                ),
            });
        }
    }
    out
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
}
