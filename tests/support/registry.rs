//! A real OCI registry for the tests: Debian's `docker-registry` (the CNCF distribution
//! registry, `/usr/bin/docker-registry serve CONFIG`) on 127.0.0.1, its own process with a
//! private storage directory, killed on drop; and a push of a SIF file as an ORAS artifact
//! laid out as Apptainer's `oras push` lays it out (internal/pkg/client/oras/image.go,
//! NewImageFromSIF, at v1.3.6 and v1.4.5: an empty `{}` config of media type
//! `application/vnd.sylabs.sif.config.v1+json`, one layer of media type
//! `application/vnd.sylabs.sif.layer.v1.sif` titled with the file's base name, an OCI image
//! manifest), over the registry's HTTP API with a small HTTP/1.1 client on std's TcpStream
//! (no HTTP crate for three request shapes).
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// internal/pkg/client/oras/layer.go: SifLayerMediaTypeV1 (:18 at both tags).
pub const SIF_LAYER_MEDIA_TYPE: &str = "application/vnd.sylabs.sif.layer.v1.sif";
/// internal/pkg/client/oras/image.go: SifConfigMediaTypeV1 (:26 at both tags).
pub const SIF_CONFIG_MEDIA_TYPE: &str = "application/vnd.sylabs.sif.config.v1+json";
/// image.go: emptyConfig and its digest (:19, :23 at both tags).
pub const EMPTY_CONFIG: &[u8] = b"{}";
pub const OCI_MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// The registry process; killed (SIGKILL) and reaped on drop.
pub struct Registry {
    child: Option<Child>,
    pub addr: String,
    /// Keeps the storage and config until the registry is gone.
    _dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
    /// From spawn to the first `GET /v2/` answered 200 (printed by the tests, never asserted).
    pub start_time: Duration,
}

/// What a push stored: the manifest's digest (what the tag resolves to) and the SIF layer's
/// digest (`sha256:` + the file's sha256, what Apptainer verifies the pulled file against).
#[derive(Debug, Clone)]
pub struct Pushed {
    pub manifest_digest: String,
    pub layer_digest: String,
    pub config_digest: String,
}

/// The package is a test prerequisite (tests/setup.sh): missing, the test fails when
/// `CI=true` and is skipped loudly elsewhere, as `require_root` does.
pub fn require_registry() -> bool {
    if Path::new(REGISTRY_BIN).exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{REGISTRY_BIN} missing and CI=true: run tests/setup.sh (package docker-registry)");
    }
    eprintln!("SKIPPED: needs {REGISTRY_BIN} (tests/setup.sh installs docker-registry)");
    false
}

/// A port that was free a moment ago (the registry binds it itself, by its config).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    /// Started on a free loopback port; a port another process took between our probe and
    /// the registry's bind makes the registry exit at once, and it is started again on
    /// another (at most 5 times).
    pub fn start() -> Registry {
        let mut last = String::new();
        for _ in 0..5 {
            match Registry::try_start() {
                Ok(reg) => return reg,
                Err(log) => last = log,
            }
        }
        panic!("docker-registry exited before listening, 5 times; last log:\n{last}");
    }

    fn try_start() -> Result<Registry, String> {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        // No TLS, no auth: a registry on the loopback address, which Apptainer's client
        // (go-containerregistry) reaches over plain HTTP without --no-https (DOUBLE.md).
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n  secret: apptainer-supervisor-tests\n",
                storage.display()
            ),
        )
        .unwrap();
        let t0 = Instant::now();
        let mut child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {REGISTRY_BIN}: {e}"));
        // The registry logs `listening on ADDR` once its socket is bound (distribution's
        // registry.go ListenAndServe, before Serve): the condition, read from its log as it
        // comes, no polling. The pipe closing first means the registry exited.
        let log: Arc<Mutex<String>> = Arc::default();
        let (tx, rx) = mpsc::channel::<bool>();
        let stderr = child.stderr.take().unwrap();
        let (l, want) = (log.clone(), format!("listening on {addr}"));
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let up = line.contains(&want);
                l.lock().unwrap().push_str(&(line + "\n"));
                if up {
                    let _ = tx.send(true);
                }
            }
            let _ = tx.send(false);
        });
        let mut reg = Registry {
            child: Some(child),
            addr,
            _dir: dir,
            log,
            start_time: Duration::ZERO,
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(true) => {}
            Ok(false) => return Err(reg.log()),
            Err(_) => panic!("docker-registry not listening within 30 s:\n{}", reg.log()),
        }
        // Bound, so this connection is accepted: /v2/ (the API's version check) answers 200.
        let r = request(&reg.addr, "GET", "/v2/", &[], &[]).unwrap();
        assert_eq!(r.status, 200, "GET /v2/: {}\n{}", r.text(), reg.log());
        reg.start_time = t0.elapsed();
        Ok(reg)
    }

    /// What the registry logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("registry running").id()
    }

    /// SIGKILL and reap: the registry stops mid-whatever it was doing.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `oras://127.0.0.1:PORT/NAME:TAG`, what `apptainer pull` is given.
    pub fn oras_url(&self, name: &str, tag: &str) -> String {
        format!("oras://{}/{name}:{tag}", self.addr)
    }

    /// Push `data` as the SIF file `title` (the layer's org.opencontainers.image.title) to
    /// `name:tag`, as Apptainer's `push oras://` does (oras.go UploadImage → remote.Write):
    /// the layer blob, the empty config blob, then the manifest under the tag.
    pub fn push_sif(&self, name: &str, tag: &str, title: &str, data: &[u8]) -> Pushed {
        let layer_digest = sha256_digest(data);
        self.push_blob(name, &layer_digest, data);
        let config_digest = sha256_digest(EMPTY_CONFIG);
        assert_eq!(
            config_digest,
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "image.go's emptyConfigDigest"
        );
        self.push_blob(name, &config_digest, EMPTY_CONFIG);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST_MEDIA_TYPE,
            "config": {
                "mediaType": SIF_CONFIG_MEDIA_TYPE,
                "digest": config_digest,
                "size": EMPTY_CONFIG.len(),
            },
            "layers": [{
                "mediaType": SIF_LAYER_MEDIA_TYPE,
                "digest": layer_digest,
                "size": data.len(),
                "annotations": {"org.opencontainers.image.title": title},
            }],
        });
        let body = serde_json::to_vec(&manifest).unwrap();
        let manifest_digest = sha256_digest(&body);
        let r = request(
            &self.addr,
            "PUT",
            &format!("/v2/{name}/manifests/{tag}"),
            &[("Content-Type", OCI_MANIFEST_MEDIA_TYPE)],
            &body,
        )
        .unwrap();
        assert_eq!(r.status, 201, "PUT manifest: {}", r.text());
        assert_eq!(
            r.header("docker-content-digest"),
            Some(manifest_digest.as_str()),
            "the registry's digest of the manifest we sent"
        );
        Pushed {
            manifest_digest,
            layer_digest,
            config_digest,
        }
    }

    /// DELETE /v2/<name>/blobs/<digest> (the registry's storage allows deletes): the blob
    /// is gone while manifests still name it, as after a registry's garbage collection.
    pub fn delete_blob(&self, name: &str, digest: &str) {
        let r = request(
            &self.addr,
            "DELETE",
            &format!("/v2/{name}/blobs/{digest}"),
            &[],
            b"",
        )
        .unwrap();
        assert_eq!(r.status, 202, "DELETE blob: {}", r.text());
    }

    /// A monolithic blob upload: POST /v2/<name>/blobs/uploads/ (202 + Location), then
    /// PUT <Location>&digest=<digest> with the whole blob (201).
    fn push_blob(&self, name: &str, digest: &str, data: &[u8]) {
        let r = request(
            &self.addr,
            "POST",
            &format!("/v2/{name}/blobs/uploads/"),
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(r.status, 202, "POST blob upload: {}", r.text());
        let loc = r.header("location").expect("Location of the upload");
        // distribution answers an absolute URL; keep its path and query.
        let path = match loc.find("://") {
            Some(i) => {
                let rest = &loc[i + 3..];
                &rest[rest.find('/').unwrap_or(rest.len())..]
            }
            None => loc,
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let r = request(
            &self.addr,
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            data,
        )
        .unwrap();
        assert_eq!(r.status, 201, "PUT blob {digest}: {}", r.text());
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `sha256:<hex>` of `data`, by coreutils' sha256sum (no hashing crate in the tests).
pub fn sha256_digest(data: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    let hex = String::from_utf8(out.stdout).unwrap();
    format!("sha256:{}", hex.split_whitespace().next().unwrap())
}

/// `sha256:<hex>` of a file.
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    let hex = String::from_utf8(out.stdout).unwrap();
    format!("sha256:{}", hex.split_whitespace().next().unwrap())
}

/// A real SIF with no objects (every descriptor free), `payload` after its descriptors:
/// what Apptainer's image.Init and pull's ensureSIF take for a SIF (sif.go:65-83: 2048
/// bytes with `SIF_MAGIC`, a header and descriptors that load), cheap to push and pull.
/// It cannot boot (no system partition: `no root filesystem found`); `support::sif`
/// makes the images that boot.
pub fn sif_bytes(payload: &[u8]) -> Vec<u8> {
    super::sif::objectless_sif(payload)
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`, so the body ends at EOF).
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

/// A TCP relay in front of the registry that lets each response through until `gate` bytes
/// of it have passed, then holds it (the registry is left blocked mid-send once the socket
/// buffers fill) until `release()`: the test's condition that a transfer has started, and
/// the moment to stop the registry in the middle of it. Stands for the network only: every
/// byte the client sees is the registry's.
pub struct GatedRelay {
    pub addr: String,
    state: Arc<(Mutex<RelayState>, Condvar)>,
}

#[derive(Default)]
struct RelayState {
    held: bool,
    released: bool,
}

impl GatedRelay {
    pub fn start(upstream: &str, gate: usize) -> GatedRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state: Arc<(Mutex<RelayState>, Condvar)> = Arc::default();
        let upstream = upstream.to_string();
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    return;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pipe(c2, s2, usize::MAX, None));
                let st = st.clone();
                std::thread::spawn(move || pipe(server, client, gate, Some(st)));
            }
        });
        GatedRelay { addr, state }
    }

    /// Waits (bounded) until a response has been held at the gate.
    pub fn wait_held(&self, within: Duration) -> bool {
        let (m, cv) = &*self.state;
        let g = m.lock().unwrap();
        let (g, _) = cv.wait_timeout_while(g, within, |s| !s.held).unwrap();
        g.held
    }

    /// Lets the held responses go on (what is left of them).
    pub fn release(&self) {
        let (m, cv) = &*self.state;
        m.lock().unwrap().released = true;
        cv.notify_all();
    }
}

fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    gate: usize,
    st: Option<Arc<(Mutex<RelayState>, Condvar)>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut passed = 0usize;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if passed >= gate {
            if let Some(st) = &st {
                let (m, cv) = &**st;
                let mut g = m.lock().unwrap();
                g.held = true;
                cv.notify_all();
                while !g.released {
                    g = cv.wait(g).unwrap();
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        passed += n;
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Every file under `dir`, recursively (paths).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}
