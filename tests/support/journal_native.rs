//! journald's native protocol as the tests read it: a datagram socket of the test stands
//! where `/run/systemd/journal/socket` is, and each entry is parsed
//! (<https://systemd.io/JOURNAL_NATIVE_PROTOCOL/>).

use std::collections::BTreeMap;

pub type Entry = BTreeMap<String, String>;

/// Parses one native-protocol datagram: `KEY=VALUE\n`, or `KEY\n` + u64 LE length + value
/// + `\n`. A repeated key keeps its last value (tests never rely on repeats).
pub fn parse(mut d: &[u8]) -> Entry {
    let mut e = Entry::new();
    while !d.is_empty() {
        let end = d
            .iter()
            .position(|&b| b == b'=' || b == b'\n')
            .expect("field name ends with = or newline");
        let key = String::from_utf8(d[..end].to_vec()).expect("ASCII field name");
        if d[end] == b'=' {
            let rest = &d[end + 1..];
            let nl = rest.iter().position(|&b| b == b'\n').expect("value ends");
            e.insert(key, String::from_utf8_lossy(&rest[..nl]).into_owned());
            d = &rest[nl + 1..];
        } else {
            let rest = &d[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let value = &rest[8..8 + len];
            assert_eq!(
                rest[8 + len],
                b'\n',
                "binary field {key} ends with a newline"
            );
            e.insert(key, String::from_utf8_lossy(value).into_owned());
            d = &rest[8 + len + 1..];
        }
    }
    e
}
