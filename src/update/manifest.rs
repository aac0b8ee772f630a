//! The manifest digest of an `oras://` reference, recorded beside the SIF's digest: tags
//! move, and the manifest digest is what a registry's UI, `oras manifest fetch` and
//! `skopeo inspect` show, so an operator can match what runs with what the registry lists.
//!
//! Asked with curl(1) — the system's CA bundle and proxy settings, no HTTP/TLS crate — as
//! the OCI distribution API has it: `HEAD /v2/<repo>/manifests/<tag>` with the OCI
//! manifest's media type accepted, the digest in `Docker-Content-Digest`; a `401` with a
//! `Bearer` challenge gets an anonymous token from its realm (as ghcr.io hands them out)
//! and one retry. A registry that wants credentials gets no answer: the update goes on and
//! the digest is recorded as unknown, saying why. The layer's digest (the SIF's sha256,
//! which Apptainer verifies) stays the one that decides.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Each curl call's bound.
const WITHIN: Duration = Duration::from_secs(20);

/// `(scheme, registry, repository, reference)` of `oras://registry/repo[:tag|@digest]`.
/// The scheme as go-containerregistry's `name.Registry.Scheme` picks it (registry.go:81
/// at v0.19.1 and v0.20.2, which Apptainer 1.3.6 and 1.4.5 vendor): plain HTTP for
/// `localhost`, loopback and RFC 1918 addresses, HTTPS otherwise.
fn parse(url: &str) -> Option<(&'static str, &str, &str, &str)> {
    let rest = url.strip_prefix("oras://")?.trim_start_matches('/');
    let (registry, path) = rest.split_once('/')?;
    let (repo, reference) = match path.split_once('@') {
        Some((r, d)) => (r, d),
        None => match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, t),
            _ => (path, "latest"),
        },
    };
    if registry.is_empty() || repo.is_empty() || reference.is_empty() {
        return None;
    }
    let host = registry
        .strip_prefix('[')
        .and_then(|h| h.split_once(']').map(|(h, _)| h))
        .unwrap_or_else(|| registry.split(':').next().unwrap_or(registry));
    let plain = host == "localhost"
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| match ip {
            std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_private(),
            std::net::IpAddr::V6(v6) => v6.is_loopback(),
        });
    Some((
        if plain { "http" } else { "https" },
        registry,
        repo,
        reference,
    ))
}

/// The manifest digest (`sha256:…`) of `url`, or why it is not known.
pub async fn digest(url: &str) -> Result<String, String> {
    let Some((scheme, registry, repo, reference)) = parse(url) else {
        return Err(format!(
            "{url} is not an oras://REGISTRY/REPOSITORY[:TAG] reference"
        ));
    };
    if reference.starts_with("sha256:") {
        // Pulled by digest: that is the manifest's digest.
        return Ok(reference.to_owned());
    }
    let manifest = format!("{scheme}://{registry}/v2/{repo}/manifests/{reference}");
    let first = head(&manifest, None).await?;
    if let Some(d) = header(&first, "docker-content-digest") {
        return Ok(d);
    }
    let challenge = header(&first, "www-authenticate")
        .filter(|c| c.to_ascii_lowercase().starts_with("bearer "))
        .ok_or_else(|| format!("{manifest}: {}", status_line(&first)))?;
    let token = token(&challenge).await?;
    let second = head(&manifest, Some(&token)).await?;
    header(&second, "docker-content-digest").ok_or_else(|| {
        format!(
            "{manifest}: {} (with an anonymous token: the registry wants credentials?)",
            status_line(&second)
        )
    })
}

/// The response headers of `HEAD url` (the last response's, after redirects).
async fn head(url: &str, bearer: Option<&str>) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "-L", "-I", "--max-time", "20", "-H"])
        .arg(format!("Accept: {MANIFEST_TYPE}"));
    if bearer.is_some() {
        // From stdin, not argv: a token in /proc/PID/cmdline is readable by every user.
        cmd.args(["-H", "@-"]);
    }
    let out = run(
        cmd.arg("--").arg(url),
        bearer.map(|t| format!("Authorization: Bearer {t}\n")),
    )
    .await?;
    // The last response of a redirect chain.
    let text = String::from_utf8_lossy(&out);
    Ok(text
        .rsplit("\r\n\r\n")
        .find(|b| b.starts_with("HTTP/"))
        .unwrap_or(&text)
        .to_owned())
}

/// An anonymous token from a `Bearer realm="…",service="…",scope="…"` challenge.
async fn token(challenge: &str) -> Result<String, String> {
    let mut realm = None;
    let mut query = Vec::new();
    for part in challenge["bearer ".len()..].split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            continue;
        };
        let v = v.trim_matches('"');
        match k {
            "realm" => realm = Some(v.to_owned()),
            "service" | "scope" => query.push(format!("{k}={}", v.replace(' ', "%20"))),
            _ => {}
        }
    }
    let realm = realm.ok_or_else(|| format!("a Bearer challenge without a realm: {challenge}"))?;
    if !realm.starts_with("https://") && !realm.starts_with("http://") {
        return Err(format!("a token realm that is not a URL: {realm}"));
    }
    let url = if query.is_empty() {
        realm
    } else {
        format!("{realm}?{}", query.join("&"))
    };
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "-L", "-f", "--max-time", "20", "--"])
        .arg(&url);
    let body = run(&mut cmd, None).await?;
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not a token: {e}"))?;
    v.get("token")
        .or_else(|| v.get("access_token"))
        .and_then(|t| t.as_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("{url}: no token in the answer"))
}

/// Runs curl (bounded), `stdin` written to it; its stdout (at most 1 MiB is looked at).
async fn run(cmd: &mut tokio::process::Command, stdin: Option<String>) -> Result<Vec<u8>, String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("curl: {e}"))?;
    if let Some(mut i) = child.stdin.take() {
        if let Some(s) = stdin {
            let _ = i.write_all(s.as_bytes()).await;
        }
    }
    let out = tokio::time::timeout(WITHIN + Duration::from_secs(5), child.wait_with_output())
        .await
        .map_err(|_| "curl did not end".to_owned())?
        .map_err(|e| format!("curl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "curl: {}",
            crate::os::sanitize::one_line(&String::from_utf8_lossy(&out.stderr), 512)
        ));
    }
    let mut b = out.stdout;
    b.truncate(1 << 20);
    Ok(b)
}

fn header(block: &str, name: &str) -> Option<String> {
    block.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

fn status_line(block: &str) -> String {
    crate::os::sanitize::one_line(block.lines().next().unwrap_or("no answer"), 200).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_schemes_as_go_containerregistry_has_them() {
        assert_eq!(
            parse("oras://127.0.0.1:5000/hpc/ood:v2"),
            Some(("http", "127.0.0.1:5000", "hpc/ood", "v2"))
        );
        assert_eq!(
            parse("oras://ghcr.io/org/ood"),
            Some(("https", "ghcr.io", "org/ood", "latest"))
        );
        assert_eq!(
            parse("oras://10.1.2.3/x@sha256:abc"),
            Some(("http", "10.1.2.3", "x", "sha256:abc"))
        );
        assert_eq!(
            parse("oras://localhost:5000/a/b:c"),
            Some(("http", "localhost:5000", "a/b", "c"))
        );
        assert_eq!(
            parse("oras://[::1]:5000/a:b"),
            Some(("http", "[::1]:5000", "a", "b"))
        );
        assert_eq!(
            parse("oras://registry.example.org:443/a"),
            Some(("https", "registry.example.org:443", "a", "latest"))
        );
        assert_eq!(parse("docker://x/y"), None);
        assert_eq!(parse("oras://x"), None);
    }

    #[test]
    fn the_last_response_of_a_redirect_chain_is_read() {
        let block = "HTTP/1.1 200 OK\r\nDocker-Content-Digest: sha256:aa\r\nContent-Type: x";
        assert_eq!(
            header(block, "docker-content-digest").as_deref(),
            Some("sha256:aa")
        );
        assert_eq!(status_line(block), "HTTP/1.1 200 OK");
    }
}
