//! Text that leaves the supervisor for the host's PID 1 may carry what the container said
//! (an inner unit's name, SubState or Result): a root process inside can put any bytes
//! there. sd_notify(3) messages are newline-separated `KEY=VALUE` lines, and the sd-notify
//! crate escapes nothing, so a newline in a status would add fields of the container's
//! choosing (`MAINPID=`, `READY=1`, `WATCHDOG=trigger`). systemd-nspawn re-emits a
//! container's STATUS= as its own after splitting on newlines; we keep the text on one
//! line instead: every control character is shown escaped, and the length is capped.
//!
//! What the container's systemd tells us over its bus is checked as soon as it is read
//! (`os/inner.rs`), so that nothing downstream — the policy, `STATUS=`, the journal, the live
//! state file, `status` — ever holds a raw container string: states ([`enum_value`]) must
//! look like systemd's (`[a-z0-9-]{1,32}`), unit names ([`unit_name`]) must be valid by
//! systemd's own rules (`unit_name_is_valid()`, src/basic/unit-name.c); anything else is
//! shown escaped and marked, so it can neither forge a line, a column or a terminal code,
//! nor be mistaken for (or collide with) a real state or unit.

use std::borrow::Cow;

/// The longest STATUS= text we send, in bytes, the `…` that marks a cut included: a status
/// line is a sentence for `systemctl status`, not a log, and the whole datagram stays well
/// inside the buffer systemd reads a notify message into.
pub(crate) const MAX_STATUS: usize = 2048;

/// `s` on one line: control characters (C0, DEL, C1) as `\n`, `\t`, `\r` or `\xNN`/`\u{NN}`
/// escapes, and at most `max` bytes in all, cut at a character boundary and marked with
/// `…`. Idempotent (its output has no control character and fits), so the sinks of one
/// report may each apply it. A backslash stays as it is: a text that looks like an escape
/// is still one field on one line.
pub(crate) fn one_line(s: &str, max: usize) -> Cow<'_, str> {
    let clean = s.len() <= max && !s.chars().any(char::is_control);
    if clean {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().min(max) + 4);
    for c in s.chars() {
        let piece: Cow<str> = match c {
            '\n' => "\\n".into(),
            '\r' => "\\r".into(),
            '\t' => "\\t".into(),
            c if c.is_control() && (c as u32) < 0x80 => format!("\\x{:02x}", c as u32).into(),
            c if c.is_control() => format!("\\u{{{:x}}}", c as u32).into(),
            c => {
                let mut b = [0u8; 4];
                String::from(c.encode_utf8(&mut b)).into()
            }
        };
        if out.len() + piece.len() > max - '…'.len_utf8() {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    Cow::Owned(out)
}

/// Several lines of what the container or a command quoting it wrote (a CLI's stderr, the
/// end of the instance's `.err` log), for a message: each line through [`one_line`] (at
/// most `max_line` bytes), joined by newlines. A reader sees the lines as written, but no
/// byte a terminal acts on and no line longer than the cap. (`\r` ends no line here: it
/// is shown escaped, so it cannot overwrite what came before it on a terminal.)
pub(crate) fn lines(s: &str, max_line: usize) -> String {
    s.lines()
        .map(|l| one_line(l, max_line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The longest state systemd uses is far shorter; a newer inner systemd may add states
/// (v254: `auto-restart-queued`), so the rule is the shape, not a list.
pub(crate) const MAX_ENUM: usize = 32;

/// How much of a rejected value is shown inside `unknown(…)` / `invalid(…)`, in bytes of
/// escaped text.
const MAX_SHOWN: usize = 64;

/// systemd's `UNIT_NAME_MAX` (256, the NUL included): a valid name is shorter.
pub(crate) const UNIT_NAME_MAX: usize = 256;

/// The unit types systemd knows (`unit_type_from_string`); a name needs one as suffix.
const UNIT_TYPES: [&str; 11] = [
    "service",
    "mount",
    "swap",
    "socket",
    "target",
    "device",
    "automount",
    "timer",
    "path",
    "slice",
    "scope",
];

/// An enum-like value from the container (ActiveState, SubState, LoadState, Result,
/// SystemState): as it is when it looks like one of systemd's (`[a-z0-9-]{1,32}`), empty
/// when empty (not known, e.g. a target has no Result), else `unknown(…)` with the value
/// escaped ([`escape_strict`]) and cut. Never equal to a real state, so the policy can never
/// take it for `active` or `failed`.
pub(crate) fn enum_value(s: &str) -> Cow<'_, str> {
    let ok = s.len() <= MAX_ENUM
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("unknown({})", escape_strict(s, MAX_SHOWN)))
    }
}

/// A unit name from the container (JobNew, JobRemoved, ListUnitsFiltered …): as it is when
/// systemd would accept it ([`is_valid_unit_name`]), else `invalid(…)` with the name escaped
/// ([`escape_strict`]) and cut. A valid name has no space, comma, parenthesis or control
/// character, so neither form can forge a table column, a list entry or a line, and an
/// invalid name never reads as (or collides with) a valid one.
pub(crate) fn unit_name(s: &str) -> Cow<'_, str> {
    if is_valid_unit_name(s) {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("invalid({})", escape_strict(s, UNIT_NAME_MAX)))
    }
}

/// systemd's `unit_name_is_valid(n, UNIT_NAME_PLAIN|UNIT_NAME_INSTANCE|UNIT_NAME_TEMPLATE)`:
/// shorter than `UNIT_NAME_MAX`, a known type after the last `.`, a non-empty prefix of
/// `[A-Za-z0-9:_.\\-]` and `@`, not starting with `@`.
pub(crate) fn is_valid_unit_name(n: &str) -> bool {
    if n.is_empty() || n.len() >= UNIT_NAME_MAX {
        return false;
    }
    let Some((prefix, kind)) = n.rsplit_once('.') else {
        return false;
    };
    if prefix.is_empty() || !UNIT_TYPES.contains(&kind) || prefix.starts_with('@') {
        return false;
    }
    prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b))
}

/// Every byte that is not printable ASCII (space, control characters, DEL, non-ASCII) and
/// every backslash as `\xNN`, at most `max` bytes in all, cut at an escape boundary and
/// marked with `…`: what is left is one word of visible ASCII.
pub(crate) fn escape_strict(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 4);
    for b in s.bytes() {
        let piece = if b.is_ascii_graphic() && b != b'\\' {
            char::from(b).to_string()
        } else {
            format!("\\x{b:02x}")
        };
        if out.len() + piece.len() > max.saturating_sub('…'.len_utf8()) {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_their_breaks_and_lose_what_a_terminal_acts_on() {
        let text = "FATAL: x\r\x1b[2Jforged\nsecond\u{9b}1m\n";
        assert_eq!(
            lines(text, 512),
            "FATAL: x\\r\\x1b[2Jforged\nsecond\\u{9b}1m"
        );
        let long = "y".repeat(600);
        assert_eq!(lines(&long, 512).len(), 512);
    }

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        assert!(matches!(
            one_line("running: 1/1 required units active", MAX_STATUS),
            Cow::Borrowed("running: 1/1 required units active")
        ));
    }

    #[test]
    fn a_newline_cannot_add_a_notify_field() {
        let evil = "failed: x.service (auto-restart\nMAINPID=1\nREADY=1\nWATCHDOG=trigger)";
        let got = one_line(evil, MAX_STATUS);
        assert!(!got.contains('\n'), "{got}");
        assert_eq!(
            got,
            "failed: x.service (auto-restart\\nMAINPID=1\\nREADY=1\\nWATCHDOG=trigger)"
        );
    }

    #[test]
    fn terminal_codes_are_shown_and_a_second_pass_changes_nothing() {
        let once = one_line("a\\nb\n\u{1b}[31m", MAX_STATUS).into_owned();
        assert_eq!(once, "a\\nb\\n\\x1b[31m");
        assert_eq!(one_line(&once, MAX_STATUS), once);
        let long = one_line(&"x\n".repeat(1000), MAX_STATUS).into_owned();
        assert_eq!(one_line(&long, MAX_STATUS), long);
        assert_eq!(
            one_line("\u{1b}[2J\r\t\u{7f}\u{9b}", MAX_STATUS),
            "\\x1b[2J\\r\\t\\x7f\\u{9b}"
        );
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        let long = "é".repeat(100_000);
        let got = one_line(&long, MAX_STATUS);
        assert!(got.len() <= MAX_STATUS, "{}", got.len());
        assert!(got.ends_with('…'));
        assert!(got.trim_end_matches('…').chars().all(|c| c == 'é'));
    }

    #[test]
    fn states_that_look_like_systemds_pass_anything_else_is_marked() {
        let table: &[(&str, &str)] = &[
            ("active", "active"),
            ("auto-restart-queued", "auto-restart-queued"),
            ("exit-code", "exit-code"),
            ("", ""),
            ("Active", "unknown(Active)"),
            ("running\nMAINPID=1", "unknown(running\\x0aMAINPID=1)"),
            ("\u{1b}[31mfailed", "unknown(\\x1b[31mfailed)"),
            ("a b", "unknown(a\\x20b)"),
            ("é", "unknown(\\xc3\\xa9)"),
            ("back\\slash", "unknown(back\\x5cslash)"),
            (
                "a-state-of-thirty-three-chars-xyz",
                "unknown(a-state-of-thirty-three-chars-xyz)",
            ),
        ];
        for (input, want) in table {
            assert_eq!(enum_value(input), *want, "{input:?}");
        }
        assert_eq!(enum_value(&"x".repeat(MAX_ENUM)), "x".repeat(MAX_ENUM));
        let long = enum_value(&"\n".repeat(100_000)).into_owned();
        assert!(
            long.len() <= MAX_SHOWN + "unknown()".len(),
            "{}",
            long.len()
        );
        assert!(long.ends_with("…)"), "{long}");
    }

    #[test]
    fn unit_names_follow_systemds_rules() {
        let table: &[(&str, &str)] = &[
            ("httpd.service", "httpd.service"),
            ("getty@tty1.service", "getty@tty1.service"),
            ("getty@.service", "getty@.service"),
            (
                "dev-disk-by\\x2duuid-1.device",
                "dev-disk-by\\x2duuid-1.device",
            ),
            ("-.mount", "-.mount"),
            ("a@b@c.service", "a@b@c.service"),
            ("httpd", "invalid(httpd)"),
            ("httpd.nothing", "invalid(httpd.nothing)"),
            (".service", "invalid(.service)"),
            ("@x.service", "invalid(@x.service)"),
            ("", "invalid()"),
            (
                "x.service\nwarning: forged",
                "invalid(x.service\\x0awarning:\\x20forged)",
            ),
            (
                "\u{1b}]0;title\u{7}.service",
                "invalid(\\x1b]0;title\\x07.service)",
            ),
            ("a b.service", "invalid(a\\x20b.service)"),
            ("a,b.service", "invalid(a,b.service)"),
            ("tab\there.service", "invalid(tab\\x09here.service)"),
            // A valid name may hold a backslash; an escaped invalid one never reads as it.
            ("a\\nb.service", "a\\nb.service"),
            ("a\nb.service", "invalid(a\\x0ab.service)"),
        ];
        for (input, want) in table {
            assert_eq!(unit_name(input), *want, "{input:?}");
        }
        let max = format!(
            "{}.service",
            "u".repeat(UNIT_NAME_MAX - 1 - ".service".len())
        );
        assert_eq!(unit_name(&max), max.as_str());
        let over = format!("u{max}");
        let got = unit_name(&over).into_owned();
        assert!(got.starts_with("invalid(u") && got.ends_with("…)"), "{got}");
        assert!(
            got.len() <= UNIT_NAME_MAX + "invalid()".len(),
            "{}",
            got.len()
        );
    }

    #[test]
    fn marked_forms_hold_no_control_character_space_or_row_separator() {
        for s in [
            "\n",
            "\r\n",
            "\t",
            "\u{1b}[2J",
            "\u{9b}",
            " ",
            "\u{7f}",
            "\u{2028}",
        ] {
            let e = enum_value(s);
            let u = unit_name(s);
            for out in [&*e, &*u] {
                assert!(out.bytes().all(|b| b.is_ascii_graphic()), "{s:?} → {out:?}");
            }
        }
    }
}
