//! Text that leaves the supervisor for the host's PID 1 may carry what the container said
//! (an inner unit's name, SubState or Result): a root process inside can put any bytes
//! there. sd_notify(3) messages are newline-separated `KEY=VALUE` lines, and the sd-notify
//! crate escapes nothing, so a newline in a status would add fields of the container's
//! choosing (`MAINPID=`, `READY=1`, `WATCHDOG=trigger`). systemd-nspawn re-emits a
//! container's STATUS= as its own after splitting on newlines; we keep the text on one
//! line instead: every control character is shown escaped, and the length is capped.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
