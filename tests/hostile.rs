//! The container is untrusted: a hostile container against the shipped unit under a real
//! host systemd (`support::host`, as `host_unit.rs`), tried as an attacker would.
//!
//! The container is the Apptainer double's light init in a root of its own (a tmpfs with
//! the machine's `/usr` bound in, [`CROOT_INIT`]), so that its `/proc/<pid>/root` is not
//! the host's. Its D-Bus side is the hostile peer (`tests/support/hostile_peer.rs`, this
//! test's own executable run as a program): a real `dbus-daemon` on the container's
//! `/run/dbus/system_bus_socket` and an `org.freedesktop.systemd1` on it that answers the
//! supervisor's calls with an attacker's values. The test starts it inside the container's
//! PID namespace (`nsenter --pid`), so the bus peer the supervisor meets is a process of the
//! container, as the real one is: a peer check passes, and the defences behind it are what
//! is tested.
//!
//! What the host sees is read as an operator would: `systemctl show` (MainPID,
//! StatusText, ActiveState), PID 1's own debug log ("Got notification message from PID …
//! (FIELDS)": every notify datagram it accepted, field by field), the journal (a datagram
//! socket of this test at the host's `/run/systemd/journal/socket`, parsed in journald's
//! native protocol), `apptainer-supervisor status`, and `/proc/<pid>/status` of the
//! supervisor. Figures (peak RSS, STATUS= rate, delays) are printed with `eprintln!`.
//!
//! The harness (the host, the journal socket, the ways of reading) is
//! `tests/support/hostile_host.rs`; the peer `tests/support/hostile_peer.rs`. Each case
//! checks every requirement and fails at its end with all that did not hold ([`Checks`]).
//!
//! Needs root, `dbus-daemon` and `systemd` (as `host_unit.rs`); fails, never skips, in CI.

#[path = "support/hostile_host.rs"]
mod hostile_host;
#[path = "support/hostile_peer.rs"]
mod hostile_peer;
mod support;

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostile_host::*;
use support::host::HostSystemd;
use support::{require_root, SEC};

/// Not a test: the hostile peer's entry point when this executable is run as the peer
/// ([`Hostile::spawn_in_container`] sets [`hostile_peer::ENV`]).
#[test]
#[ignore = "the hostile peer's entry point, run by the other tests as a program"]
fn hostile_peer_main() {
    hostile_peer::main();
}

// ---------------------------------------------------------------------------------------
// The cases.

/// Newline-, escape- and 100 kB-laden ActiveState, SubState, Result, SystemState and unit
/// names (JobNew, ListUnitsFiltered), each trying to add `MAINPID=<the bystander's pid>`,
/// `READY=1` and `WATCHDOG=trigger` to our notify messages: PID 1 gets none of them, the
/// unit's MainPID stays the supervisor, READY=1 comes only with the real readiness, the
/// unrelated host service is untouched, `status` and the journal show the text escaped.
#[test]
fn hostile_states_and_names_never_reach_pid1_the_journal_or_a_terminal_raw() {
    if !require_root() {
        return;
    }
    let mut s = Hostile::new(Opts {
        start_sec: 90,
        stop_sec: 10,
        watchdog_sec: 10,
        log_fs_mib: None,
    });
    let bystander = s.show(BYSTANDER, &["ActiveState", "MainPID", "NRestarts"]);
    assert_eq!(bystander["ActiveState"], "active", "{bystander:?}");
    s.start();
    let cpid = s.container();
    let main = s.unit()["MainPID"].clone();
    assert_ne!(main, "0");
    s.start_peer("hostile", cpid, &bystander["MainPID"]);
    s.wait_peer(60 * SEC, "hostile-done");
    // The last hostile value is SystemState, read after StartupFinished: once the
    // supervisor's STATUS= quotes it, everything before it has been handled. A supervisor
    // may also refuse to quote it at all: then the first notify message after the peer
    // answered that read is the later event that shows the rest was handled.
    // (A supervisor that says nothing new at all within 20 s fails here.)
    let statuses = |s: &Hostile| {
        s.notifications(&main)
            .iter()
            .filter(|f| f.iter().any(|x| x.starts_with("STATUS=")))
            .count()
    };
    let deadline = Instant::now() + 20 * SEC;
    let mut at_read: Option<usize> = None;
    let m = loop {
        let m = s.unit();
        let n = statuses(&s);
        if at_read.is_none() && s.peer_log().contains("system-state-read") {
            at_read = Some(n);
        }
        if m["StatusText"].contains("hostile-system")
            || m["ActiveState"] != "activating"
            || at_read.is_some_and(|at| n > at)
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "nothing new from the supervisor within 20 s after the hostile SystemState was read: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("status after the hostile values: {:?}", m["StatusText"]);
    assert_eq!(
        (m["ActiveState"].as_str(), m["MainPID"].as_str()),
        ("activating", main.as_str()),
        "no READY=1 and no MAINPID= from the container\n{}",
        s.logs()
    );

    // `status` now: the live connection lists the container's failed units (its names).
    let out = s.status();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Shown escaped: raw, a hostile status would act on this terminal too.
    let shown: Vec<String> = text
        .lines()
        .map(|l| {
            l.chars()
                .take(300)
                .collect::<String>()
                .escape_debug()
                .to_string()
        })
        .collect();
    eprintln!(
        "status ({} bytes, exit {}):\n{}",
        out.stdout.len(),
        out.status,
        shown.join("\n")
    );
    // Each line on its own: a newline of the container's would be a line status did not
    // write (checked below), anything else would act on the terminal.
    let mut c = Checks::default();
    let in_lines: Vec<String> = out
        .stdout
        .split(|&b| b == b'\n')
        .chain(out.stderr.split(|&b| b == b'\n'))
        .flat_map(control_bytes)
        .collect();
    c.check(in_lines.is_empty(), || {
        format!("status writes control bytes a terminal would act on: {in_lines:?}")
    });
    let foreign: Vec<&str> = text
        .lines()
        .filter(|l| {
            !(l.starts_with("SERVICE") || l.starts_with(NAME) || l.starts_with("warning: "))
        })
        .collect();
    c.check(foreign.is_empty(), || {
        format!("lines status did not write itself (forged rows): {foreign:?}")
    });
    c.check(text.contains("hostile-unit"), || {
        "status shows the container's unit names, escaped".into()
    });
    c.check(out.stdout.len() < 64 * 1024, || {
        format!("status bounds what it quotes: {} bytes", out.stdout.len())
    });

    // The real readiness.
    s.go();
    let m = s.wait_unit(60 * SEC, "active", |m| m["ActiveState"] != "activating");
    assert_eq!(
        (m["ActiveState"].as_str(), m["SubState"].as_str()),
        ("active", "running"),
        "{m:?}\n{}",
        s.logs()
    );
    assert_eq!(
        m["MainPID"], main,
        "the unit's MainPID is still the supervisor"
    );

    // What PID 1 accepted from the supervisor, datagram by datagram.
    let got = s.notifications(&main);
    assert!(
        !got.is_empty(),
        "PID 1's debug log shows the notify messages\n{}",
        s.logs()
    );
    let forged_fields: Vec<String> = got.iter().flat_map(|f| forged(f)).collect();
    assert!(
        forged_fields.is_empty(),
        "fields of the container's reached PID 1: {forged_fields:?}"
    );
    let readies: Vec<usize> = got
        .iter()
        .enumerate()
        .filter(|(_, f)| f.iter().any(|x| x == "READY=1"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(readies.len(), 1, "one READY=1, the real one: {got:?}");
    let status_max = got
        .iter()
        .flatten()
        .filter(|f| f.starts_with("STATUS="))
        .map(String::len)
        .max()
        .unwrap_or(0);
    let quoting = got
        .iter()
        .flatten()
        .find(|f| f.starts_with("STATUS=") && f.contains("MAINPID"))
        .map(|f| f.chars().take(160).collect::<String>());
    eprintln!(
        "{} notify messages accepted by PID 1; the longest STATUS= {status_max} bytes; \
         the first quoting the container, as PID 1 logged it: {:?}",
        got.len(),
        quoting
    );

    // The bystander is untouched.
    let after = s.show(BYSTANDER, &["ActiveState", "MainPID", "NRestarts"]);
    assert_eq!(after, bystander, "the unrelated host service is untouched");

    // The journal: the hostile text shown escaped, never a control byte, bounded.
    let entries = s.journal.all();
    assert!(!entries.is_empty(), "the supervisor logs to the journal");
    let mut quoted = 0;
    let mut raw = Vec::new();
    for e in &entries {
        for (k, v) in e {
            if !control_bytes(v).is_empty() || v.len() > 64 * 1024 {
                raw.push(format!(
                    "{k} ({} bytes, {:?}): {:?}",
                    v.len(),
                    control_bytes(v),
                    String::from_utf8_lossy(&v[..v.len().min(200)])
                ));
            }
        }
        if e.values().any(|v| v.windows(8).any(|w| w == b"hostile-")) {
            quoted += 1;
        }
    }
    eprintln!(
        "{} journal entries, {quoted} quoting the container",
        entries.len()
    );
    c.check(raw.is_empty(), || {
        format!("journal fields with control bytes or unbounded: {raw:#?}")
    });
    c.check(quoted > 0, || {
        "the journal shows what the container said, escaped".into()
    });

    let m = s.stop();
    assert_eq!(
        (m["ActiveState"].as_str(), m["Result"].as_str()),
        ("inactive", "success"),
        "{m:?}\n{}",
        s.logs()
    );
    let after = s.show(BYSTANDER, &["ActiveState", "MainPID", "NRestarts"]);
    assert_eq!(after, bystander, "the unrelated host service is untouched");
    let problems = s.host.teardown();
    c.check(problems.is_empty(), || {
        format!("nothing left behind: {problems:?}")
    });
    c.finish();
}

/// The container's bus socket is an absolute symlink to a socket of the host: resolved
/// inside the container's root it names nothing, so neither `run` nor `status` connects;
/// the start fails with an error naming the socket.
#[test]
fn bus_socket_symlinked_to_a_host_socket_is_never_connected() {
    if !require_root() {
        return;
    }
    let mut s = Hostile::new(Opts {
        start_sec: 8,
        stop_sec: 5,
        watchdog_sec: 10,
        log_fs_mib: None,
    });
    // A listener of the host's, in the host's /run (which the container's root lacks).
    std::fs::create_dir_all(s.host.path("/run/asv-hostile")).unwrap();
    let listener = UnixListener::bind(s.host.path("/run/asv-hostile/host.sock")).unwrap();
    listener.set_nonblocking(true).unwrap();
    s.start();
    let cpid = s.container();
    let link = s.host.path(&s.bus_socket(cpid));
    std::os::unix::fs::symlink("/run/asv-hostile/host.sock", &link).unwrap();
    // `status` while it boots tries the container's bus too.
    let m = s.wait_unit(30 * SEC, "the booting phase", |m| {
        m["StatusText"].contains("waiting for its system bus") || m["ActiveState"] != "activating"
    });
    eprintln!("while booting: {m:?}");
    let out = s.status();
    eprintln!(
        "status:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        support::stderr(&out)
    );

    let m = s.wait_unit(60 * SEC, "the end of the start", |m| {
        m["ActiveState"] != "activating"
    });
    eprintln!("after the start: {m:?}");
    let mut accepted = 0;
    while listener.accept().is_ok() {
        accepted += 1;
    }
    let mut c = Checks::default();
    c.check(accepted == 0, || {
        format!("the supervisor (run and status) connected {accepted} times to the host's socket through the container's symlink")
    });
    c.check(m["ActiveState"] != "active", || {
        format!("no readiness without the bus: {m:?}")
    });
    let errors: Vec<String> = s
        .journal
        .all()
        .iter()
        .filter(|e| matches!(field(e, "PRIORITY"), b"0" | b"1" | b"2" | b"3"))
        .map(|e| String::from_utf8_lossy(field(e, "MESSAGE")).into_owned())
        .collect();
    eprintln!("errors in the journal: {errors:#?}");
    c.check(
        errors.iter().any(|m| m.contains("system_bus_socket")),
        || format!("a clear error naming the bus socket in the journal: {errors:?}"),
    );
    let problems = s.host.teardown();
    c.check(problems.is_empty(), || {
        format!("nothing left behind: {problems:?}")
    });
    c.finish();
}

/// One sample of the supervisor under a flood.
struct Sample {
    watchdog: usize,
    hwm_kib: u64,
}

/// The supervisor's VmHWM (KiB), read from the host's /proc.
fn vm_hwm(host: &HostSystemd, pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(host.path(&format!("/proc/{pid}/status"))).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The most of `times` (in order) within any 1 s window.
fn max_per_second(times: &[Instant]) -> usize {
    let mut best = 0;
    let mut from = 0;
    for (i, t) in times.iter().enumerate() {
        while t.duration_since(times[from]) > SEC {
            from += 1;
        }
        best = best.max(i + 1 - from);
    }
    best
}

/// 100 000 JobNew/PropertiesChanged signals in a burst, and 100 (> zbus's 64-slot queues)
/// before every reply: the supervisor stays small, says at most 5 STATUS= a second, keeps
/// the watchdog fed (no deadlock), becomes ready, and stops on SIGTERM in time.
#[test]
fn signal_flood_keeps_the_supervisor_small_quiet_and_responsive() {
    if !require_root() {
        return;
    }
    let mut s = Hostile::new(Opts {
        start_sec: 60,
        stop_sec: 10,
        // A ping every 3 s, each answered within 1.5 s: room for a loaded machine while
        // the burst is drained, and still three pings within 10 s of readiness.
        watchdog_sec: 6,
        log_fs_mib: None,
    });
    s.start();
    let cpid = s.container();
    let main = s.unit()["MainPID"].clone();
    let baseline = vm_hwm(&s.host, &main).unwrap_or(0);
    s.start_peer("flood", cpid, "1");

    // Sampled while waiting: the supervisor's peak RSS and the pings PID 1 accepted.
    let mut samples: Vec<Sample> = Vec::new();
    let pings = |s: &Hostile| {
        s.notifications(&main)
            .iter()
            .filter(|f| f.iter().any(|x| x == "WATCHDOG=1"))
            .count()
    };
    // Until `done`, or the unit is no longer starting or running (false then).
    let wait = |s: &Hostile, v: &mut Vec<Sample>, done: &dyn Fn(&Hostile) -> bool| -> bool {
        let deadline = Instant::now() + 120 * SEC;
        loop {
            v.push(Sample {
                watchdog: pings(s),
                hwm_kib: vm_hwm(&s.host, &main).unwrap_or(0),
            });
            if done(s) {
                return true;
            }
            let m = s.unit();
            if !matches!(m["ActiveState"].as_str(), "active" | "activating")
                || Instant::now() > deadline
            {
                eprintln!("gave up waiting: {m:?}\n{}", s.logs());
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut c = Checks::default();
    // The supervisor answers the calls of its start although each reply comes after 100
    // signals (a deadlock never gets to Subscribe), then takes the burst.
    let burst = wait(&s, &mut samples, &|s| s.peer_log().contains("burst-done"));
    c.check(burst, || {
        format!(
            "the supervisor got through its calls to Subscribe and the burst (a deadlock \
             stops it before); peer:\n{}{}",
            s.peer_log(),
            std::fs::read_to_string(s.peer_dir.join("peer.out")).unwrap_or_default()
        )
    });
    let ready = burst && wait(&s, &mut samples, &|s| s.unit()["ActiveState"] == "active");
    c.check(ready, || format!("ready after the burst: {:?}", s.unit()));
    // No deadlock: with 100 signals before every reply the watchdog is still fed: three
    // more pings (one every 3 s) after readiness.
    let at_ready = samples.last().map_or(0, |x| x.watchdog);
    let fed = ready
        && wait(&s, &mut samples, &|s| {
            s.unit()["ActiveState"] == "active" && pings(s) >= at_ready + 3
        });
    c.check(fed, || {
        format!("the watchdog fed after readiness: {:?}", s.unit())
    });
    let hwm_before_stop = vm_hwm(&s.host, &main).unwrap_or(0);

    // SIGTERM, honoured within the stop timeout.
    let t = Instant::now();
    let m = s.stop();
    let took = t.elapsed();
    let peak = samples
        .iter()
        .map(|x| x.hwm_kib)
        .max()
        .unwrap_or(0)
        .max(hwm_before_stop);
    let got = s.timed_notifications(&main);
    let has = |f: &[String], p: &str| f.iter().any(|x| x.starts_with(p));
    let status_times: Vec<Instant> = got
        .iter()
        .filter(|(_, f)| has(f, "STATUS="))
        .map(|(t, _)| *t)
        .collect();
    let rate = max_per_second(&status_times);
    let total_status = status_times.len();
    let total_watchdog = got.iter().filter(|(_, f)| has(f, "WATCHDOG=1")).count();
    let span = match (got.first(), got.last()) {
        (Some(a), Some(b)) => b.0.duration_since(a.0),
        _ => Duration::ZERO,
    };
    eprintln!(
        "flood: supervisor VmHWM {baseline} KiB before the peer, peak {peak} KiB ({:.1} MiB); \
         STATUS= at most {rate} in any 1 s window, {total_status} in {span:?}; \
         WATCHDOG=1 {total_watchdog}; stop took {took:?} ({m:?})",
        peak as f64 / 1024.0
    );
    if ready {
        c.check(
            m["ActiveState"] == "inactive" && m["Result"] == "success",
            || format!("SIGTERM honoured within the stop timeout: {m:?}"),
        );
    }
    c.check(rate <= 5, || {
        format!("at most 5 STATUS= per second reach PID 1: {rate}")
    });
    c.check(peak <= 16 * 1024, || {
        format!("the supervisor's peak RSS stays within 16 MiB: {peak} KiB")
    });
    let problems = s.host.teardown();
    c.check(problems.is_empty(), || {
        format!("nothing left behind: {problems:?}")
    });
    c.finish();
}

/// Stops the sampler thread when dropped (also when the test panics first).
struct Sampler(Option<std::thread::JoinHandle<()>>, Arc<AtomicBool>);

impl Drop for Sampler {
    fn drop(&mut self) {
        self.1.store(true, Ordering::SeqCst);
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

/// Reads the flood writers' stats files: (bytes written, write errors).
fn writer_stats(dir: &Path) -> (u64, u64) {
    let mut total = (0, 0);
    for name in ["writer-1.stats", "writer-2.stats"] {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let mut it = text
            .split_whitespace()
            .map(|n| n.parse::<u64>().unwrap_or(0));
        total.0 += it.next().unwrap_or(0);
        total.1 += it.next().unwrap_or(0);
    }
    total
}

/// The container writes its stdout and stderr as fast as it can to a 256 MiB log file
/// system: it never fills, READY=1 and the reaction to SIGTERM are not held up by it, and
/// the journal gets bounded lines and a count of what was suppressed.
#[test]
fn log_flood_never_fills_the_log_file_system_nor_delays_ready_or_stop() {
    if !require_root() {
        return;
    }
    let mut s = Hostile::new(Opts {
        start_sec: 90,
        stop_sec: 10,
        watchdog_sec: 10,
        log_fs_mib: Some(256),
    });
    let logs = s.log_fs.clone().unwrap();
    s.start();
    let cpid = s.container();
    s.start_peer("plain", cpid, "1");
    s.wait_peer(60 * SEC, "subscribed");

    // Watch the file system's free space all along.
    let min_free = Arc::new(Mutex::new(u64::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (min_free, stop, logs) = (min_free.clone(), stop.clone(), logs.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(v) = nix::sys::statvfs::statvfs(&logs) {
                    let free = v.blocks_available() * v.fragment_size();
                    let mut m = min_free.lock().unwrap();
                    *m = (*m).min(free);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let watcher = Sampler(Some(watcher), stop);

    // The writers: through the init's own stdout and stderr (Apptainer's NAME.out and
    // NAME.err, O_APPEND), from inside the container.
    let t_flood = Instant::now();
    for fd in ["1", "2"] {
        let target = format!("/proc/{cpid}/fd/{fd}");
        let stats = s.peer_dir.join(format!("writer-{fd}.stats"));
        let stats = stats.display().to_string();
        s.spawn_in_container(cpid, &["write-logs", &target, &stats]);
    }
    // Until 1 GiB was written (four times the file system), or a write failed.
    let deadline = Instant::now() + 120 * SEC;
    loop {
        let (bytes, errors) = writer_stats(&s.peer_dir);
        if bytes >= 1 << 30 || errors > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the writers wrote only {bytes} bytes in 120 s\n{}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // READY=1 while the flood goes on: from the peer's readiness to systemd's `active`.
    s.go();
    let sent: i64 = s.wait_peer(60 * SEC, "ready-sent")["ready-sent ".len()..]
        .parse::<i64>()
        .unwrap()
        / 1000;
    let m = s.wait_unit(60 * SEC, "readiness", |m| m["ActiveState"] != "activating");
    assert_eq!(m["ActiveState"], "active", "{m:?}\n{}", s.logs());
    let ready_delay = monotonic_prop(&s, "ActiveEnterTimestampMonotonic") - sent;

    // SIGTERM while the flood goes on: from systemd's stop (the unit leaves `active`) to
    // the container's end (its init's pidfd).
    let init = machine_pid(&s.host, cpid);
    let ended = std::thread::spawn(move || wait_exit(init, 60 * SEC));
    let before_stop = monotonic_us();
    let out = s.host.systemctl(&["stop", "--no-block", UNIT]);
    assert!(out.status.success());
    let mut left_active = 0;
    let deadline = Instant::now() + 60 * SEC;
    while Instant::now() < deadline {
        let m = s.show(UNIT, &["ActiveState", "ActiveExitTimestampMonotonic"]);
        if m["ActiveState"] != "active" {
            // 0 once a unit that stopped cleanly was collected: then the time the stop was
            // asked for (a little earlier: the delay can only look longer).
            left_active = m["ActiveExitTimestampMonotonic"].parse().unwrap_or(0);
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if left_active == 0 {
        left_active = before_stop;
    }
    let ended = ended.join().expect("the container's init ended");
    let m = s.wait_unit(60 * SEC, "the end of the stop", |m| {
        matches!(m["ActiveState"].as_str(), "inactive" | "failed")
    });
    let term_delay = ended - left_active;
    let flood_secs = t_flood.elapsed().as_secs_f64();
    drop(watcher);
    let (bytes, errors) = writer_stats(&s.peer_dir);
    let min_free = *min_free.lock().unwrap();

    let ident = format!("{NAME}-instance");
    let entries = s.journal.all();
    let lines: Vec<&Entry> = entries
        .iter()
        .filter(|e| field(e, "SYSLOG_IDENTIFIER") == ident.as_bytes() && e.contains_key("STREAM"))
        .collect();
    let line_bytes: usize = lines.iter().map(|e| field(e, "MESSAGE").len()).sum();
    let longest = lines
        .iter()
        .map(|e| field(e, "MESSAGE").len())
        .max()
        .unwrap_or(0);
    let suppressed: Vec<u64> = entries
        .iter()
        .filter(|e| field(e, "SYSLOG_IDENTIFIER") == ident.as_bytes())
        .filter_map(|e| String::from_utf8_lossy(field(e, "SUPPRESSED")).parse().ok())
        .collect();
    eprintln!(
        "log flood: {:.0} MiB written in {flood_secs:.1} s, {errors} failed writes; \
         least free on the 256 MiB file system {:.1} MiB; READY=1 {:.1} ms after the \
         inside was ready; the container ended {:.1} ms after SIGTERM; journal: {} lines \
         ({} bytes, longest {longest}), {} suppressed counts summing to {}",
        bytes as f64 / 1048576.0,
        min_free as f64 / 1048576.0,
        ready_delay as f64 / 1000.0,
        term_delay as f64 / 1000.0,
        lines.len(),
        line_bytes,
        suppressed.len(),
        suppressed.iter().sum::<u64>()
    );
    let mut c = Checks::default();
    c.check(
        m["ActiveState"] == "inactive" && m["Result"] == "success",
        || format!("stopped in order: {m:?}"),
    );
    c.check(errors == 0 && min_free > 0, || {
        format!(
            "the log file system never filled: {errors} failed writes, least free {min_free} bytes"
        )
    });
    // READY=1 came and SIGTERM was acted on (both checked above, with a stop in order);
    // how long each took under the flood is a figure, printed above, not asserted: the
    // defect was 10 s and 9 s, the goal 100 ms.
    c.check(longest <= 16 * 1024, || {
        format!("each forwarded line is bounded: {longest} bytes")
    });
    c.check(
        (lines.len() as f64) <= 1000.0 + 100.0 * (flood_secs + 1.0),
        || {
            format!(
                "forwarded lines bounded by the rate: {} in {flood_secs:.1} s",
                lines.len()
            )
        },
    );
    c.check(
        !suppressed.is_empty() && suppressed.len() as f64 <= flood_secs + 2.0,
        || {
            format!(
                "a count of what was suppressed, about one a second, not a flood of counts: \
                 {} in {flood_secs:.1} s",
                suppressed.len()
            )
        },
    );
    let problems = s.host.teardown();
    c.check(problems.is_empty(), || {
        format!("nothing left behind: {problems:?}")
    });
    c.finish();
}
