//! journald end to end: the supervisor runs as under systemd (`INVOCATION_ID`,
//! `JOURNAL_STREAM`) in a private mount namespace whose `/run/systemd/journal/socket` is a
//! datagram socket of this test. Every entry is parsed from journald's native protocol
//! (<https://systemd.io/JOURNAL_NATIVE_PROTOCOL/>) and the fields and priorities of the real
//! events are checked: the supervisor's own (tracing-journald) and the instance's output
//! lines forwarded by `src/os/output.rs`. Needs root.

mod support;

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use support::journal_native::{parse, Entry};
use support::*;

#[test]
fn parser_reads_both_field_forms() {
    let mut d = b"A=1\nMESSAGE\n".to_vec();
    d.extend_from_slice(&3u64.to_le_bytes());
    d.extend_from_slice(b"x\ny\nB=\n");
    let e = parse(&d);
    assert_eq!(e["A"], "1");
    assert_eq!(e["MESSAGE"], "x\ny");
    assert_eq!(e["B"], "");
}

/// The test's journald: a socket in the world's directory that a thread drains all the
/// time (as journald does), so senders never block for long.
struct Journal {
    entries: Arc<Mutex<Vec<Entry>>>,
}

impl Journal {
    fn attach(w: &mut World) -> Journal {
        let dir = w.root().join("journal");
        std::fs::create_dir(&dir).unwrap();
        let sock = UnixDatagram::bind(dir.join("socket")).unwrap();
        let entries: Arc<Mutex<Vec<Entry>>> = Arc::default();
        let e = entries.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            while let Ok(n) = sock.recv(&mut buf) {
                // An empty datagram is the "is anyone there" probe of tracing-journald and
                // of our own sender; journald ignores it too. Entries too big for a datagram
                // would come as a memfd with an empty payload: none of ours is that big, and
                // an empty payload is never counted as an entry.
                if n > 0 {
                    e.lock().unwrap().push(parse(&buf[..n]));
                }
            }
        });
        w.journal_dir = Some(dir);
        w.env.push((
            "INVOCATION_ID".into(),
            "0123456789abcdef0123456789abcdef".into(),
        ));
        w.env.push(("JOURNAL_STREAM".into(), "0:0".into()));
        Journal { entries }
    }

    fn all(&self) -> Vec<Entry> {
        self.entries.lock().unwrap().clone()
    }

    fn with(&self, key: &str, value: &str) -> Vec<Entry> {
        self.all()
            .into_iter()
            .filter(|e| e.get(key).map(String::as_str) == Some(value))
            .collect()
    }

    fn wait_for(&self, what: &str, f: impl Fn(&[Entry]) -> bool) {
        eventually(20 * SEC, what, || f(&self.all()));
    }
}

/// Writes as the container does: through its init's own stdout (1) or stderr (2), which
/// Apptainer pointed at NAME.out / NAME.err (O_APPEND).
fn container_writes(pid: i32, fd: u8, text: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .unwrap();
    f.write_all(text).unwrap();
}

fn one(mut entries: Vec<Entry>, what: &str) -> Entry {
    assert_eq!(entries.len(), 1, "exactly one {what}: {entries:#?}");
    entries.remove(0)
}

#[test]
fn events_and_instance_output_reach_journald_with_their_fields() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-journal");
    let j = Journal::attach(&mut w);
    w.spawn_run();
    w.wait_ready();
    let (pid, _) = w.instance_pids();
    let pid_s = pid.to_string();
    container_writes(pid, 1, b"hello from stdout\n");
    container_writes(pid, 2, b"trouble on stderr\n<3>an error by prefix\n");
    container_writes(pid, 1, b"unfinished");
    let ident = "t-journal-instance";
    j.wait_for("the three complete instance lines", |e| {
        e.iter()
            .filter(|e| e.get("SYSLOG_IDENTIFIER").map(String::as_str) == Some(ident))
            .count()
            >= 3
    });
    kill(w.child(0).id() as i32, libc::SIGTERM);
    let out = w.wait(0, 30 * SEC);
    assert!(out.status.success(), "{out:?}");

    // The supervisor's own events: tracing-journald, its identifier, SERVICE on all.
    let own = j.with("SYSLOG_IDENTIFIER", "apptainer-supervisor");
    assert!(
        own.iter().all(|e| e["SERVICE"] == "t-journal"),
        "SERVICE on every event: {own:#?}"
    );
    let starting = one(
        j.with("PHASE", "starting-instance"),
        "PHASE=starting-instance",
    );
    assert_eq!(starting["MESSAGE"], "starting instance");
    assert_eq!(starting["PRIORITY"], "5");
    // A sandbox directory is no managed image (apptainer-supervisor(8), IMAGE POINTER).
    assert_eq!(starting["IMAGE_DIGEST"], "-", "{starting:?}");
    let booting = one(j.with("PHASE", "booting"), "PHASE=booting");
    assert_eq!(booting["INSTANCE_PID"], pid_s);
    let ready = one(j.with("PHASE", "ready"), "PHASE=ready");
    assert_eq!(ready["INSTANCE_PID"], pid_s);
    assert_eq!(ready["PRIORITY"], "5");
    assert_eq!(ready["IP"], "", "no network: IP is empty but present");
    assert!(ready["MESSAGE"].starts_with("ready"), "{ready:?}");
    let stopping = one(j.with("PHASE", "stopping"), "PHASE=stopping");
    assert_eq!(stopping["INSTANCE_PID"], pid_s);
    assert_eq!(stopping["STATUS"], "stopping: halting the container");
    let stopped = one(j.with("PHASE", "stopped"), "PHASE=stopped");
    assert_eq!(stopped["RESULT"], "success");
    assert_eq!(stopped["INSTANCE_PID"], pid_s);
    let requested = one(j.with("MESSAGE", "stop requested"), "stop requested");
    assert_eq!(requested["SIGNAL"], "SIGTERM");
    let master = one(j.with("MESSAGE", "master exited"), "master exited");
    assert!(
        master.contains_key("EXIT_STATUS"),
        "EXIT_STATUS when the master exits: {master:?}"
    );

    // The instance's lines: their own identifier, priority by stream or <N> prefix, the
    // unfinished last line flushed at the end.
    let lines = j.with("SYSLOG_IDENTIFIER", ident);
    let got: Vec<(&str, &str, &str)> = lines
        .iter()
        .map(|e| {
            assert_eq!(e["SERVICE"], "t-journal", "{e:?}");
            assert_eq!(e["INSTANCE_PID"], pid_s, "{e:?}");
            (
                e["MESSAGE"].as_str(),
                e["PRIORITY"].as_str(),
                e["STREAM"].as_str(),
            )
        })
        .collect();
    // The double's master warns on its stderr (the .err log) about a skipped bind mount
    // during the start: real instance output, forwarded like the rest, at warning.
    let mut sorted: Vec<_> = got
        .iter()
        .copied()
        .filter(|(m, p, s)| !(m.starts_with("WARNING: ") && *p == "4" && *s == "stderr"))
        .collect();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            ("an error by prefix", "3", "stderr"),
            ("hello from stdout", "6", "stdout"),
            ("trouble on stderr", "4", "stderr"),
            ("unfinished", "6", "stdout"),
        ],
        "{lines:#?}"
    );
    assert_eq!(got.last().unwrap().0, "unfinished", "flushed last: {got:?}");
    // Nothing went to stderr: under systemd everything is in the journal.
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(ident),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The log watch is closed while the container halts: the line its PID 1 writes right
/// before it exits still reaches the journal.
#[test]
fn the_last_line_before_pid_1_exits_reaches_the_journal() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-lastline");
    w.env
        .push(("FAKE_INIT_LAST_WORDS".into(), "halting now, goodbye".into()));
    let j = Journal::attach(&mut w);
    w.start();
    let out = w.stop_ok(0);
    assert!(w.mark_text().contains("halt"), "halted in order: {out:?}");
    let lines = j.with("SYSLOG_IDENTIFIER", "t-lastline-instance");
    assert_eq!(
        lines.last().map(|e| e["MESSAGE"].as_str()),
        Some("halting now, goodbye"),
        "{lines:#?}"
    );
}

#[test]
fn a_flood_of_output_is_bounded_and_reported_once() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-jflood");
    let j = Journal::attach(&mut w);
    w.spawn_run();
    w.wait_ready();
    let (pid, _) = w.instance_pids();
    const N: usize = 5000;
    let flood: String = (0..N).map(|i| format!("line {i}\n")).collect();
    // One write: the whole flood arrives before the supervisor reads.
    container_writes(pid, 1, flood.as_bytes());
    j.wait_for("the suppression report", |e| {
        e.iter().any(|e| e.contains_key("SUPPRESSED"))
    });
    kill(w.child(0).id() as i32, libc::SIGTERM);
    assert!(w.wait(0, 30 * SEC).status.success());

    let ident = j.with("SYSLOG_IDENTIFIER", "t-jflood-instance");
    let (reports, rest): (Vec<&Entry>, Vec<&Entry>) =
        ident.iter().partition(|e| e.contains_key("SUPPRESSED"));
    // Lines the double's master wrote during the start were forwarded first (when the
    // watch began) and used tokens too.
    let (lines, earlier): (Vec<&Entry>, Vec<&Entry>) = rest
        .into_iter()
        .partition(|e| e["MESSAGE"].starts_with("line "));
    assert!(
        earlier.iter().all(|e| e["STREAM"] == "stderr"),
        "{earlier:#?}"
    );
    let burst = 1000 - earlier.len();
    let suppressed: usize = reports
        .iter()
        .map(|e| e["SUPPRESSED"].parse::<usize>().unwrap())
        .sum();
    // Every line is either forwarded or counted; none twice.
    assert_eq!(lines.len() + suppressed, N, "{} lines", lines.len());
    // The burst (1000) passes in order; beyond it only what the rate refilled meanwhile,
    // far from the whole flood.
    assert!(
        lines.len() >= burst && lines.len() < N / 2,
        "{}",
        lines.len()
    );
    for (i, e) in lines.iter().take(burst).enumerate() {
        assert_eq!(e["MESSAGE"], format!("line {i}"));
    }
    // One report for a flood read in one go (each further one would need a refilled token
    // and lines after it).
    assert!(
        !reports.is_empty() && reports.len() <= lines.len() - burst + 1,
        "{reports:#?}"
    );
    let r = reports[0];
    assert_eq!(r["PRIORITY"], "4");
    assert!(
        r["MESSAGE"].contains("lines of the instance's output suppressed"),
        "{r:?}"
    );
}

#[test]
fn failed_required_unit_is_in_the_journal_with_its_unit_fields() {
    if !require_root() {
        return;
    }
    let mut w = World::booted(
        "j-inner",
        "required_units = [\"asv-flaky.service\"]\non_failure = \"restart-service\"",
    );
    let j = Journal::attach(&mut w);
    w.spawn_run();
    w.wait_ready();
    let (pid, _) = w.instance_pids();
    let pid_s = pid.to_string();
    // It fails for good: no restart of the unit (restart-service), SIGKILL → RESULT=signal.
    assert!(w.inside(&["touch", "/run/asv-fail"]).status.success());
    let _ = w.inside(&["systemctl", "kill", "-s", "KILL", "asv-flaky.service"]);
    let out = w.wait(0, 60 * SEC);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ready = one(j.with("PHASE", "ready"), "PHASE=ready");
    assert_eq!(ready["INSTANCE_PID"], pid_s);
    assert!(
        ready["SYSTEM_STATE"] == "running" || ready["SYSTEM_STATE"] == "degraded",
        "{ready:?}"
    );
    let failed: Vec<Entry> = j
        .with("INNER_UNIT", "asv-flaky.service")
        .into_iter()
        .filter(|e| e["MESSAGE"] == "required unit changed" && e["ACTIVE_STATE"] == "failed")
        .collect();
    let changed = one(failed, "required unit changed to failed");
    assert_eq!(changed["SUB_STATE"], "failed");
    assert_eq!(changed["RESULT"], "signal");
    assert_eq!(changed["PRIORITY"], "4", "a failed unit is a warning");
    assert_eq!(changed["INSTANCE_PID"], pid_s);
    let gave_up = one(
        j.with(
            "MESSAGE",
            "required unit failed; restarting the whole service (readiness.on_failure = restart-service)",
        ),
        "the give-up error",
    );
    assert_eq!(gave_up["PRIORITY"], "3");
    assert_eq!(gave_up["INNER_UNIT"], "asv-flaky.service");
    assert_eq!(gave_up["RESULT"], "signal");
    let stopping = one(j.with("PHASE", "stopping"), "PHASE=stopping");
    assert_eq!(stopping["INNER_UNIT"], "asv-flaky.service");
    let stopped = one(j.with("PHASE", "stopped"), "PHASE=stopped");
    assert_eq!(stopped["RESULT"], "unit-failed");
    let last = j.with("EXIT_CODE", "1");
    assert!(!last.is_empty(), "the final error names the exit code");
    // Whatever the booted container wrote (systemd's console output) came as its own lines.
    let lines = j.with("SYSLOG_IDENTIFIER", "j-inner-instance");
    eprintln!("{} instance lines, e.g. {:?}", lines.len(), lines.first());
    assert!(
        lines
            .iter()
            .all(|e| e["SERVICE"] == "j-inner" && e["INSTANCE_PID"] == pid_s),
        "{lines:#?}"
    );
}

/// A managed image (apptainer-supervisor(8), IMAGE POINTER): the start's message carries
/// its full digest as IMAGE_DIGEST, read from the name of the file the pointer leads to.
#[test]
fn the_start_of_a_managed_image_carries_its_digest() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-jdigest");
    let images = w.service_dir.join("containers/images");
    std::fs::create_dir_all(&images).unwrap();
    let tmp = images.join("incoming");
    std::fs::write(&tmp, support::registry::sif_bytes(b"journal\n")).unwrap();
    let digest = support::registry::sha256_file(&tmp);
    let name = format!("sha256-{}.sif", digest.trim_start_matches("sha256:"));
    std::fs::rename(&tmp, images.join(&name)).unwrap();
    std::os::unix::fs::symlink(
        format!("images/{name}"),
        w.service_dir.join("containers/current.sif"),
    )
    .unwrap();
    let text = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(
        w.config_path(),
        text.replace("containers/sandbox\"", "containers/current.sif\""),
    )
    .unwrap();
    let j = Journal::attach(&mut w);
    w.spawn_run();
    w.wait_ready();
    kill(w.child(0).id() as i32, libc::SIGTERM);
    assert!(w.wait(0, 30 * SEC).status.success());
    let starting = one(
        j.with("PHASE", "starting-instance"),
        "PHASE=starting-instance",
    );
    assert_eq!(starting["IMAGE_DIGEST"], digest, "{starting:?}");
}
