//! A minimal sender of journald's native protocol, for entries whose identifier and
//! priority are not the supervisor's own: the instance's forwarded output lines.
//!
//! Why not tracing-journald for these: its `SYSLOG_IDENTIFIER` is fixed per layer
//! (`Layer::with_syslog_identifier`) and an event field of that name would only add a second
//! value to the same entry; its priorities come from tracing levels (info → 5), so an
//! informational line at 6 cannot be expressed. `systemd-journal-logger` is a `log` backend
//! with the same two limits; `libsystemd` would fit but brings a large dependency tree
//! (its own nix, hashing and uuid crates) for forty lines of framing.
//!
//! Protocol (<https://systemd.io/JOURNAL_NATIVE_PROTOCOL/>): one datagram per entry on
//! `/run/systemd/journal/socket`; each field is either `KEY=VALUE\n` or, when the value may
//! hold a newline or arbitrary bytes, `KEY\n` + 64-bit little-endian length + value + `\n`.
//! Entries larger than a datagram must go through a sealed memfd; the forwarder bounds each
//! entry to [`crate::os::output::MAX_LINE`] bytes, far below the socket's datagram limit
//! (`net.core.wmem_default`, 208 KiB by default), so that path is never needed here.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

/// journald's native socket (`systemd-journald.service(8)`, "FILES").
pub const SOCKET: &str = "/run/systemd/journal/socket";

/// An unbound datagram socket that sends each entry to journald's socket by path, so that
/// a restarted journald (new socket inode) is reached without reconnecting.
#[derive(Debug)]
pub struct Journal {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Journal {
    /// Opens a socket and checks that journald listens (an empty datagram, which journald
    /// ignores, as tracing-journald's `Layer::new` does).
    pub fn connect() -> io::Result<Journal> {
        let j = Journal {
            socket: UnixDatagram::unbound()?,
            path: PathBuf::from(SOCKET),
        };
        j.socket.send_to(&[], &j.path)?;
        Ok(j)
    }

    /// Sends one entry. Blocking, as `sd_journal_sendv(3)` is: journald drains its socket
    /// quickly and the forwarder already bounds the rate.
    pub fn send(&self, fields: &[(&str, &[u8])]) -> io::Result<()> {
        self.socket.send_to(&encode(fields), &self.path).map(|_| ())
    }
}

/// One entry in the native format: `KEY=VALUE\n` for values without a newline, the
/// length-prefixed binary form otherwise. Keys must already be valid journal field names
/// (upper-case letters, digits, `_`, not starting with `_`).
pub fn encode(fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(fields.iter().map(|(k, v)| k.len() + v.len() + 10).sum());
    for (key, value) in fields {
        debug_assert!(valid_key(key), "invalid journal field name {key:?}");
        buf.extend_from_slice(key.as_bytes());
        if value.contains(&b'\n') {
            buf.push(b'\n');
            buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
        } else {
            buf.push(b'=');
        }
        buf.extend_from_slice(value);
        buf.push(b'\n');
    }
    buf
}

/// journald's rule for field names (`journal_field_valid()` in systemd's
/// `src/libsystemd/sd-journal/journal-file.c`): 1–64 characters of `A-Z0-9_`, not starting
/// with a digit or `_` (the underscore prefix is reserved for trusted fields).
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && !key.starts_with('_')
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key
            .bytes()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values_use_key_equals_value() {
        let e = encode(&[("MESSAGE", b"hello"), ("PRIORITY", b"6")]);
        assert_eq!(e, b"MESSAGE=hello\nPRIORITY=6\n");
    }

    #[test]
    fn values_with_newlines_are_length_prefixed() {
        let e = encode(&[("MESSAGE", b"a\nb")]);
        let mut want = b"MESSAGE\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"a\nb\n");
        assert_eq!(e, want);
    }

    #[test]
    fn field_names_follow_journald() {
        assert!(valid_key("SYSLOG_IDENTIFIER"));
        assert!(valid_key("INSTANCE_PID"));
        assert!(!valid_key("_PID"));
        assert!(!valid_key("1X"));
        assert!(!valid_key("message"));
        assert!(!valid_key(""));
    }

    #[test]
    fn entries_reach_a_bound_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let rx = UnixDatagram::bind(&path).unwrap();
        let j = Journal {
            socket: UnixDatagram::unbound().unwrap(),
            path,
        };
        j.send(&[("MESSAGE", b"x")]).unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MESSAGE=x\n");
    }
}
