//! The rules single values follow: names (service, unit, host, network, interface,
//! variable), paths, bind specifications, capability names.

use super::*;

/// Longest service or network name. A booted instance's host name defaults to its instance
/// name (`--boot` implies `--uts`, and Apptainer sets the hostname to the instance name),
/// and sethostname(2) refuses more than HOST_NAME_MAX = 64 bytes; every file named after a
/// service (`NAME.lock`, `NAME.run`, Apptainer's `NAME.json`) and the unit
/// `apptainer-supervisor@NAME.service` stay far below NAME_MAX (255) with it.
pub const MAX_NAME_LEN: usize = 64;

/// The one rule for every name that becomes part of a path, a file name or a command-line
/// value: service names (instance name, `/run/apptainer-supervisor/NAME.lock`, unit
/// instance) and network names (`NAME.conflist`). Apptainer's instance-name rule
/// (`^[a-zA-Z0-9._-]+$`, internal/pkg/instance) narrowed so that no name is a path of its own
/// (`.`, `..`, a hidden file) or looks like an option: the name is a positional argument
/// after the image in `apptainer instance start IMAGE NAME`, where a leading `-` would be
/// read as a flag.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{name:?} contains {c:?}; names allow only ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!(
            "{name:?} starts with {:?}; a name must start with a letter, a digit or '_'",
            &name[..1]
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{name:?} is {} characters long; the limit is {MAX_NAME_LEN} (the host name a booted instance gets)",
            name.len()
        ));
    }
    Ok(())
}

/// A full systemd unit name with its type suffix (systemd.unit(5)); no instance guessing.
pub(super) fn check_unit_name(u: &str) -> Result<(), String> {
    const TYPES: &[&str] = &[
        ".service",
        ".socket",
        ".target",
        ".mount",
        ".automount",
        ".swap",
        ".path",
        ".timer",
        ".slice",
        ".scope",
        ".device",
    ];
    if !TYPES.iter().any(|t| u.len() > t.len() && u.ends_with(t)) {
        return Err(format!(
            "{u:?} is not a unit name with its type (e.g. \"httpd.service\")"
        ));
    }
    if u.len() > 255
        || u.chars()
            .any(|c| !(c.is_ascii_alphanumeric() || ":-_.\\@".contains(c)))
    {
        return Err(format!(
            "{u:?} contains characters systemd does not allow in unit names"
        ));
    }
    Ok(())
}

/// A unit name on the host, for `[unit]` and `[install]`: systemd.unit(5)'s syntax
/// (`unit_name_is_valid()` in systemd's src/basic/unit-name.c: a prefix, at most one `@`
/// with a non-empty instance, a type suffix), and no template, which no dependency can
/// name.
pub(super) fn check_host_unit_name(u: &str) -> Result<(), String> {
    check_unit_name(u)?;
    let stem = &u[..u.rfind('.').unwrap_or(u.len())];
    match stem.split_once('@') {
        _ if stem.is_empty() || stem.starts_with('@') => {
            Err(format!("{u:?} has no name before its type or '@'"))
        }
        Some((_, instance)) if instance.contains('@') => {
            Err(format!("{u:?} contains more than one '@'"))
        }
        Some((prefix, "")) => Err(format!(
            "{u:?} is a template; name an instance ({prefix}@NAME{})",
            &u[stem.len()..]
        )),
        _ => Ok(()),
    }
}

/// A `Documentation=` URI: one of the schemes systemd.unit(5) lists, nothing that would
/// split the space-separated list, and no `%` (systemd would read a specifier).
pub(super) fn check_doc_uri(d: &str) -> Result<(), String> {
    const SCHEMES: &[&str] = &["http://", "https://", "file:", "info:", "man:"];
    if !SCHEMES
        .iter()
        .any(|s| d.len() > s.len() && d.starts_with(s))
    {
        return Err(format!(
            "{d:?} is not an http:, https:, file:, info: or man: URI"
        ));
    }
    if d.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '%' || c == '"' || c == '\\')
    {
        return Err(format!(
            "{d:?} contains a space, a quote, a backslash, '%' or a control character"
        ));
    }
    Ok(())
}

pub(super) fn check_hostname(h: &str) -> Result<(), String> {
    // The kernel's limit for a UTS host name (HOST_NAME_MAX).
    if h.is_empty() || h.len() > 64 {
        return Err(format!("{h:?} must be 1 to 64 characters"));
    }
    // Apptainer's own rule, which refuses anything else at every start ("… is not a valid
    // hostname"): dot-separated labels of letters, digits and inner '-'
    // (internal/pkg/util/fs/files/hostname.go:19, `hostRegex`, v1.3.6 and v1.4.5).
    for label in h.split('.') {
        if label.is_empty() {
            return Err(format!("{h:?} has an empty label between dots"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!(
                "{h:?} contains {c:?}; a host name may contain only letters, digits, '-' and '.'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{h:?}: a label may not start or end with '-'"));
        }
    }
    Ok(())
}

/// CNI network names: what `--network` selects by the conflist's `"name"`, and the file
/// name `NAME.conflist`. Same rule as service names ([`check_name`]): no ',' (it would split
/// the `--network a,b` list), nothing that is a path of its own.
///
/// `none` is Apptainer's "no CNI network" (container_linux.go `prepareNetworkSetup`), never a
/// conflist: the supervisor passes it itself for a service without networks.
pub(super) fn check_network_name(n: &str) -> Result<(), String> {
    if n == NO_NETWORK {
        return Err(format!(
            "{n:?} is Apptainer's \"no network\", not a CNI network; a service without [[network]] already gets it"
        ));
    }
    check_name(n)
}

/// Apptainer's own default network: the `bridge` conflist it ships
/// (etc/network/00_bridge.conflist, v1.3.6 and v1.4.5), used by `--boot` when no `--network`
/// is given. A service asks for it with `[[network]] name = "bridge"`, `external = true`.
pub const APPTAINER_BRIDGE: &str = "bridge";

/// Variables that decide where Apptainer keeps an instance's state file and logs
/// (pkg/syfs/syfs.go `ConfigDir`: `APPTAINER_CONFIGDIR`, then `SINGULARITY_CONFIGDIR`, then
/// `$HOME/.apptainer`). Set in the env file or `[env]`, they would reach the CLI only, so
/// the instance would be recorded where neither the supervisor nor an operator's `apptainer
/// instance list` looks: refused.
pub const STATE_DIR_ENV: &[&str] = &["HOME", "APPTAINER_CONFIGDIR", "SINGULARITY_CONFIGDIR"];

/// Why `k` may not be set for the Apptainer CLI, if it may not.
pub fn state_dir_env(k: &str) -> Option<String> {
    STATE_DIR_ENV.contains(&k).then(|| {
        format!(
            "{k} would move Apptainer's instance state and logs away from where `apptainer instance list` and the supervisor look for them (pkg/syfs ConfigDir)"
        )
    })
}

/// The hint that goes with [`state_dir_env`].
pub const STATE_DIR_ENV_HINT: &str = "remove it: with boot = true the container's init gets HOME=/root anyway; to move Apptainer's state, set it in the unit's environment (systemctl edit), for the supervisor and Apptainer alike";

/// A network interface name (IFNAMSIZ 16 with the NUL; no '/' or spaces).
pub(super) fn check_ifname(n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > 15 || n == "." || n == ".." {
        return Err(format!(
            "{n:?} is not an interface name (1 to 15 characters)"
        ));
    }
    if n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(format!("{n:?} is not an interface name"));
    }
    Ok(())
}

pub(super) fn check_env_name(k: &str) -> Result<(), String> {
    let mut chars = k.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return Err(format!("{k:?} is not a valid environment variable name")),
    }
    if chars.any(|c| !(c.is_ascii_alphanumeric() || c == '_')) {
        return Err(format!("{k:?} is not a valid environment variable name"));
    }
    Ok(())
}

/// No `..`, no NUL, no ':' or ',' (Apptainer's `--bind`/`--overlay` lists split on them).
pub(super) fn check_path(p: &Path) -> Result<(), String> {
    let s = p.to_string_lossy();
    if s.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{s:?} contains \"..\""));
    }
    if s.contains(':') || s.contains(',') {
        return Err(format!(
            "{s:?} contains ':' or ',', which Apptainer's option lists split on"
        ));
    }
    // `--overlay` is a pflag string slice (pkg/cmdline/flag.go registers a `[]string`
    // default as StringSlice), whose values pflag reads as one CSV record: a '"' is a
    // quote (a bare one is a parse error) and a line break ends the record.
    if let Some(c) = s.chars().find(|c| *c == '"' || c.is_control()) {
        return Err(format!(
            "{s:?} contains {c:?}, which Apptainer's option parser reads as CSV syntax"
        ));
    }
    Ok(())
}

/// `src[:dst[:opts]]` as `apptainer --bind` documents it.
pub(super) fn parse_bind(spec: &str) -> Result<Bind, (String, Option<&'static str>)> {
    let mut parts = spec.split(':');
    let src = PathBuf::from(parts.next().unwrap_or_default());
    let dst = parts.next().map(PathBuf::from);
    let opts = parts.next();
    if parts.next().is_some() {
        return Err(("has more than three ':'-separated fields".into(), None));
    }
    if !src.is_absolute() {
        return Err((
            "the source is not an absolute path".into(),
            Some("bind sources are host paths; write them in full, or use ${service_dir}/…"),
        ));
    }
    if let Some(dst) = &dst {
        if !dst.is_absolute() {
            return Err(("the destination is not an absolute path".into(), None));
        }
    }
    // A bind onto the container's root would hide the image and the overlay that
    // `--overlay` puts there: the one mount target Apptainer itself always owns.
    let target = dst.as_ref().unwrap_or(&src);
    if target
        .components()
        .all(|c| c == Component::RootDir || c == Component::CurDir)
    {
        return Err((
            "the target is the container's root, where the image and overlay are".into(),
            None,
        ));
    }
    for p in std::iter::once(&src).chain(dst.iter()) {
        let s = p.to_string_lossy();
        if s.contains(',') || s.contains('\0') {
            return Err((
                "contains ',' or NUL, which Apptainer's --bind splits on".into(),
                None,
            ));
        }
        // Apptainer's ParseBindPath (pkg/runtime/engine/apptainer/config/bind.go) cuts the value into pieces
        // with the regexp `([^,^:]+:?)` (a '^' falls between pieces and is lost), trims
        // each piece with strings.TrimSpace, and reads a '\' before ',' or ':' as an
        // escape: such a path would not arrive as written.
        if let Some(c) = s.chars().find(|c| matches!(c, '^' | '\\')) {
            return Err((
                format!("contains {c:?}, which Apptainer's bind parser does not keep"),
                None,
            ));
        }
        if s.starts_with(char::is_whitespace) || s.ends_with(char::is_whitespace) {
            return Err((
                "a path starts or ends with white space, which Apptainer's bind parser trims"
                    .into(),
                None,
            ));
        }
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(("contains \"..\"".into(), None));
        }
    }
    let opts = match opts {
        None => None,
        Some("ro") => Some(BindOpt::Ro),
        Some("rw") => Some(BindOpt::Rw),
        Some(other) => {
            return Err((
                format!("unknown bind option {other:?}"),
                Some("options are \"ro\" or \"rw\"; pass others through apptainer.extra_args"),
            ))
        }
    };
    Ok(Bind {
        src,
        dst,
        opts,
        line: 0,
        column: 0,
    })
}

/// Parses a capability name as `security.keep_capabilities` takes it: `CAP_SYS_TIME`,
/// case-insensitive, the `CAP_` prefix optional.
pub fn parse_cap(name: &str) -> Result<caps::Capability, String> {
    let canonical = caps::to_canonical(name);
    canonical
        .parse::<caps::Capability>()
        .map_err(|_| format!("{name:?} is not a Linux capability name (capabilities(7))"))
}
