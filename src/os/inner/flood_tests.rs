//! The watcher against a real dbus-daemon (a private bus of the test's own) and a fake
//! systemd on it that sends a flood of signals before it answers each call: with the signal
//! streams on the calls' connection, more than 64 signals during a call left its reply
//! unread for ever. Needs `dbus-daemon` (tests/setup.sh installs it).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::StreamExt;
use zbus::{ObjectPath, Variant};

use super::*;

const UNIT: &str = "httpd.service";
const UNIT_PATH: &str = "/org/freedesktop/systemd1/unit/httpd_2eservice";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
/// Signals the fake sends before it answers each call (the zbus queue holds 64).
const FLOOD: u32 = 200;
/// A burst of JobNew with no call pending, as in a boot storm or from a hostile inside.
const BURST: u32 = 100_000;

/// A private bus: `dbus-daemon` on a socket in `dir`, killed on drop.
struct Bus {
    child: Child,
    address: String,
}

impl Bus {
    fn start(dir: &Path) -> Bus {
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .arg(format!("--address=unix:path={}", dir.join("bus").display()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("dbus-daemon (tests/setup.sh installs it)");
        // The address is printed once the daemon listens.
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("dbus-daemon's address");
        Bus {
            child,
            address: line.trim().to_owned(),
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the fake systemd says and has sent.
#[derive(Clone, Default)]
struct Fake {
    system_state: Arc<Mutex<String>>,
    job_news: Arc<AtomicU32>,
}

impl Fake {
    async fn job_new(&self, conn: &zbus::Connection) {
        let n = self.job_news.fetch_add(1, Ordering::SeqCst);
        let job = ObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{n}")).unwrap();
        conn.emit_signal(
            None::<&str>,
            MANAGER_PATH,
            MANAGER_IFACE,
            "JobNew",
            &(n, job, "flood.service"),
        )
        .await
        .unwrap();
    }

    /// Answers the watcher's calls, each after [`FLOOD`] JobNew signals; `Version` never.
    async fn serve(self, conn: zbus::Connection) {
        let mut calls = zbus::MessageStream::from(&conn);
        while let Some(Ok(msg)) = calls.next().await {
            if msg.message_type() != zbus::message::Type::MethodCall {
                continue;
            }
            let hdr = msg.header();
            let member = hdr.member().map(|m| m.to_string()).unwrap_or_default();
            if member == "Get" {
                let (_, prop): (String, String) = msg.body().deserialize().unwrap();
                if prop == "Version" {
                    continue;
                }
            }
            for _ in 0..FLOOD {
                self.job_new(&conn).await;
            }
            match member.as_str() {
                "Subscribe" => conn.reply(&hdr, &()).await.unwrap(),
                "LoadUnit" => conn
                    .reply(&hdr, &ObjectPath::try_from(UNIT_PATH).unwrap())
                    .await
                    .unwrap(),
                "Get" => {
                    let (_, prop): (String, String) = msg.body().deserialize().unwrap();
                    let v = match prop.as_str() {
                        "SystemState" => Variant::from(self.system_state.lock().unwrap().clone()),
                        "NJobs" => Variant::from(0u32),
                        "LoadState" => Variant::from("loaded"),
                        "ActiveState" => Variant::from("active"),
                        "SubState" => Variant::from("running"),
                        "Result" => Variant::from("success"),
                        other => panic!("unexpected property {other}"),
                    };
                    conn.reply(&hdr, &v).await.unwrap();
                }
                other => panic!("unexpected call {other}"),
            }
        }
    }
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn signals_flooding_every_call_never_stall_a_reply_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let fake = Fake::default();
        *fake.system_state.lock().unwrap() = "starting".into();
        let fake_conn = zbus::connection::Builder::address(bus.address.as_str())
            .build()
            .await
            .unwrap();
        fake_conn
            .request_name("org.freedesktop.systemd1")
            .await
            .unwrap();
        tokio::spawn(fake.clone().serve(fake_conn.clone()));

        let conn = |timeout: Duration| {
            let address = bus.address.clone();
            async move {
                zbus::connection::Builder::address(address.as_str())
                    .method_timeout(timeout)
                    .build()
                    .await
                    .unwrap()
            }
        };
        let calls = conn(CALL_TIMEOUT).await;
        let manager = ManagerProxy::builder(&calls)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .unwrap();
        let signals = conn(CALL_TIMEOUT).await;
        let (tx, mut rx) = events();
        let required = vec![UNIT.to_owned()];
        tokio::spawn(async move {
            if let Err(e) = follow(&manager, &signals, &required, false, &tx).await {
                tx.send(InnerEvent::Lost(e.to_string()));
            }
        });
        // A bound, so that a stall fails the test instead of hanging it.
        let bound = Duration::from_secs(300);
        let first = tokio::time::timeout(bound, rx.recv())
            .await
            .expect("a stalled call: no first state");
        let Some(InnerEvent::Connected(s)) = first else {
            panic!("{first:?}");
        };
        assert_eq!(s.system_state, "starting");
        assert_eq!(s.units[UNIT].active_state, "active");

        let before = vm_hwm_kib();
        for _ in 0..BURST {
            fake.job_new(&fake_conn).await;
        }
        *fake.system_state.lock().unwrap() = "running".into();
        fake_conn
            .emit_signal(
                None::<&str>,
                MANAGER_PATH,
                MANAGER_IFACE,
                "StartupFinished",
                &(0u64, 0u64, 0u64, 0u64, 0u64, 0u64),
            )
            .await
            .unwrap();
        // The SystemState read after StartupFinished waits behind its own flood too. Every
        // JobNew is counted: none was lost while the calls waited.
        let mut changes = 0;
        let done = tokio::time::timeout(bound, async {
            while let Some(ev) = rx.recv().await {
                changes += 1;
                match ev {
                    InnerEvent::Changed(s)
                        if s.system_state == "running"
                            && s.jobs == fake.job_news.load(Ordering::SeqCst) =>
                    {
                        return s;
                    }
                    InnerEvent::Lost(why) => panic!("lost: {why}"),
                    _ => {}
                }
            }
            panic!("the watcher ended");
        })
        .await
        .expect("a stalled call after StartupFinished");
        assert!(done.jobs > BURST + 6 * FLOOD, "{}", done.jobs);
        eprintln!(
            "flood: {} JobNew, {changes} events handed to the loop, VmHWM {before} → {} KiB \
             (the test process: watcher, fake systemd and their connections)",
            done.jobs,
            vm_hwm_kib()
        );

        // A call nobody answers is a clear error, not a wait for ever.
        let slow = conn(Duration::from_millis(200)).await;
        let m = ManagerProxy::builder(&slow)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .unwrap();
        let e = InnerError::from(m.version().await.unwrap_err());
        assert!(matches!(e, InnerError::CallTimeout(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "the container's systemd did not answer within 25 s"
        );
    });
}
