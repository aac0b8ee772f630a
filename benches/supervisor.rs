//! Supervisor figures, printed, never asserted (`cargo bench --bench supervisor`).
//!
//! Same rig as the tests (Apptainer CLI double, light init, real NOTIFY_SOCKET). Measures
//! what the foundation issue asks for, next to the peers in
//! shared/reference/peer-measurements.md (conmon: 2.1 MiB RSS, 1 ms CPU to ready; nspawn:
//! 7.4 MiB, 6.8 ms; both 0 idle wake-ups):
//! - start overhead: `run` → READY=1, against the double's `instance start` alone;
//! - supervisor CPU from start to READY (schedstat, ns), peak RSS (VmHWM), threads;
//! - idle wake-ups (context switches) over 30 s, with no watchdog and with WatchdogSec=10s;
//! - instance death → supervisor exit, next to death → master exit (the double's cleanup);
//! - SIGTERM → exit (light init halts at once: this is our own stop path).
//!
//! Needs root. `BENCH_RUNS` (default 5) and `BENCH_IDLE_SEC` (default 30) adjust it.

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use support::*;

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn schedstat_ns(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn ctxt(pid: u32) -> (u64, u64) {
    (
        status_kb(pid, "voluntary_ctxt_switches:"),
        status_kb(pid, "nonvoluntary_ctxt_switches:"),
    )
}

/// Blocks until `pid` exits (pidfd + poll), returning when that was seen.
fn wait_exit(pid: i32, within: Duration) -> Option<Instant> {
    // SAFETY: pidfd_open returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Some(Instant::now());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, within.as_millis() as i32) };
    (r == 1).then(Instant::now)
}

struct Stats(Vec<f64>);

impl Stats {
    fn show(&mut self, what: &str, unit: &str) {
        self.0.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = self.0.len();
        if n == 0 {
            println!("{what:<52} n/a");
            return;
        }
        println!(
            "{what:<52} {:>9.2} {unit} median [{:.2}..{:.2}] n={n}",
            self.0[n / 2],
            self.0[0],
            self.0[n - 1]
        );
    }
}

fn main() {
    if !require_root() {
        return;
    }
    let runs = env_num("BENCH_RUNS", 5) as usize;
    let idle = Duration::from_secs(env_num("BENCH_IDLE_SEC", 30));
    println!("apptainer-supervisor bench: {runs} runs, idle window {idle:?}, binary {BIN}");

    let mut ready_ms = Stats(vec![]);
    let mut double_ms = Stats(vec![]);
    let mut cpu_ms = Stats(vec![]);
    let mut hwm = Stats(vec![]);
    let mut rss = Stats(vec![]);
    let mut death_master = Stats(vec![]);
    let mut death_exit = Stats(vec![]);
    let mut stop_ms = Stats(vec![]);
    let mut threads = 0;

    for i in 0..runs {
        // The double alone: `instance start` until it returns (what start.sh waited for).
        {
            let w = World::new(&format!("b-dbl{i}"));
            let ov = w.overlay();
            assert!(w
                .apptainer(&["overlay", "create", "-S", "-s", "64", ov.to_str().unwrap()])
                .status
                .success());
            let img = w.image();
            let t = Instant::now();
            let out = w.apptainer(&[
                "instance",
                "start",
                "--boot",
                // As the supervisor passes it for a service without [[network]]: without
                // it Apptainer (and the double) would run its default bridge network.
                "--network",
                "none",
                "--overlay",
                ov.to_str().unwrap(),
                img.to_str().unwrap(),
                &w.name,
            ]);
            double_ms.0.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            w.apptainer(&["instance", "stop", "-F", &w.name]);
        }
        // The supervisor: start → READY (overlay pre-created so both do the same work).
        let mut w = World::new(&format!("b-run{i}"));
        let ov = w.overlay();
        assert!(w
            .apptainer(&["overlay", "create", "-S", "-s", "64", ov.to_str().unwrap()])
            .status
            .success());
        let t = Instant::now();
        let pid = w.spawn_run();
        w.wait_ready();
        ready_ms.0.push(t.elapsed().as_secs_f64() * 1e3);
        cpu_ms.0.push(schedstat_ns(pid) as f64 / 1e6);
        std::thread::sleep(Duration::from_secs(1));
        hwm.0.push(status_kb(pid, "VmHWM:") as f64 / 1024.0);
        rss.0.push(status_kb(pid, "VmRSS:") as f64 / 1024.0);
        threads = status_kb(pid, "Threads:");

        if i % 2 == 0 {
            // Instance death → supervisor exit.
            let (cpid, mpid) = w.instance_pids();
            let t = Instant::now();
            kill(cpid, libc::SIGKILL);
            let m = wait_exit(mpid, Duration::from_secs(10)).expect("master exit");
            let s = wait_exit(pid as i32, Duration::from_secs(10)).expect("supervisor exit");
            death_master.0.push((m - t).as_secs_f64() * 1e3);
            death_exit.0.push((s - t).as_secs_f64() * 1e3);
            w.wait(0, Duration::from_secs(5));
        } else {
            let t = Instant::now();
            kill(pid as i32, libc::SIGTERM);
            let s = wait_exit(pid as i32, Duration::from_secs(30)).expect("supervisor exit");
            stop_ms.0.push((s - t).as_secs_f64() * 1e3);
            w.wait(0, Duration::from_secs(5));
        }
    }

    println!();
    double_ms.show("double `instance start` alone", "ms");
    ready_ms.show("supervisor start → READY=1 (wall)", "ms");
    let overhead = Stats(
        ready_ms
            .0
            .iter()
            .zip(double_ms.0.iter())
            .map(|(r, d)| r - d)
            .collect(),
    );
    let mut overhead = overhead;
    overhead.show("start overhead (READY − double alone, paired)", "ms");
    cpu_ms.show("supervisor CPU, start → READY (schedstat)", "ms");
    hwm.show("supervisor peak RSS (VmHWM)", "MiB");
    rss.show("supervisor RSS 1 s after READY (VmRSS)", "MiB");
    println!("{:<52} {threads}", "supervisor threads");
    death_master.show("container SIGKILL → master exit (double cleanup)", "ms");
    death_exit.show("container SIGKILL → supervisor exit", "ms");
    let mut ours = Stats(
        death_exit
            .0
            .iter()
            .zip(death_master.0.iter())
            .map(|(s, m)| s - m)
            .collect(),
    );
    ours.show("  of which the supervisor's own (after master exit)", "ms");
    stop_ms.show("SIGTERM → supervisor exit (light init)", "ms");

    // Idle wake-ups: without a watchdog, then with WatchdogSec=10s (a ping every 5 s).
    for (label, dog) in [("no watchdog", None), ("WatchdogSec=10s", Some("10000000"))] {
        let mut w = World::new(&format!("b-idle{}", dog.is_some() as u8));
        if let Some(d) = dog {
            w.env.push(("WATCHDOG_USEC".into(), d.into()));
        }
        let pid = w.spawn_run();
        w.wait_ready();
        std::thread::sleep(Duration::from_secs(1));
        let (v0, n0) = ctxt(pid);
        let c0 = schedstat_ns(pid);
        std::thread::sleep(idle);
        let (v1, n1) = ctxt(pid);
        let c1 = schedstat_ns(pid);
        println!(
            "{:<52} {} voluntary + {} involuntary wake-ups, {:.3} ms CPU over {:?}",
            format!("idle, {label}"),
            v1 - v0,
            n1 - n0,
            (c1 - c0) as f64 / 1e6,
            idle
        );
        kill(pid as i32, libc::SIGTERM);
        w.wait(0, Duration::from_secs(30));
    }
    println!("\npeers (shared/reference/peer-measurements.md): conmon 2.1 MiB / 1.0 ms CPU / 0 idle wake-ups; systemd-nspawn 7.4 MiB / 6.8 ms / 0");
}
