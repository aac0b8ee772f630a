//! Overlay figures, printed, never asserted (`cargo bench --bench overlay`).
//!
//! - the time `apptainer overlay create -S -s SIZE` takes for ww001's 100 000 MiB sparse
//!   image (the double runs `truncate` + `mkfs.ext3 -d`, as Apptainer's
//!   internal/app/apptainer/overlay_create.go does), and the disk space it really uses;
//! - the time `overlay::read_superblock` takes on it (the start-up check, a few reads
//!   whatever the size);
//! - the time `update`'s overlay snapshot takes on it (`update::snapshot::take`: a
//!   reflink, else a sparse copy after a free-space check) and the rollback's restore.
//!
//! Needs root (the double's config dir) and ~1.2 GB free in `BENCH_DIR` (default the
//! system temp dir). `BENCH_OVERLAY_MIB` (default 100000) and `BENCH_RUNS` (default 1)
//! adjust it. The figures are the double's and mkfs's, not ours: `cargo bench --bench
//! overlay --profile dev` gives the same ones without a release build.
//!
//! Measured 2026-11-26 on the 2-core shared build VM: 1.76–1.85 s wall (17 s while the
//! machine was loaded by a release build), 523 MiB allocated of 100 000 MiB (the inode
//! tables mkfs.ext3 writes), read_superblock 42–67 µs.

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::fs::MetadataExt;
use std::time::Instant;

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn main() {
    // cargo bench passes `--bench`; nothing else is expected.
    let mib = env_num("BENCH_OVERLAY_MIB", 100_000);
    let runs = env_num("BENCH_RUNS", 1);
    let base = std::env::var_os("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    for run in 1..=runs {
        let dir = tempfile::Builder::new()
            .prefix("asv-bench-overlay-")
            .tempdir_in(&base)
            .expect("tempdir");
        let img = dir.path().join("overlay.img");
        let t = Instant::now();
        let out = std::process::Command::new(support::support("apptainer"))
            .args(["overlay", "create", "-S", "-s", &mib.to_string()])
            .arg(&img)
            .env("APPTAINER_CONFIGDIR", dir.path().join("cfg"))
            .output()
            .expect("run the apptainer double");
        let create = t.elapsed();
        if !out.status.success() {
            eprintln!(
                "overlay create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::process::exit(1);
        }
        let m = std::fs::metadata(&img).expect("the image");
        let t = Instant::now();
        let sb = apptainer_supervisor::host::read_superblock(&img).expect("a sound image");
        let read = t.elapsed();
        println!(
            "run {run}: overlay create -S -s {mib}: {:.2} s wall; apparent {} MiB, allocated {} MiB; \
             read_superblock {} us ({} blocks of {} B, {:.2}% used, journal {})",
            create.as_secs_f64(),
            m.len() >> 20,
            (m.blocks() * 512) >> 20,
            read.as_micros(),
            sb.blocks_count,
            sb.block_size,
            sb.fill_percent(),
            sb.has_journal
        );
        // `update`'s overlay snapshot of it (the unit stopped): a reflink where the
        // filesystem can, else a sparse copy of the allocated blocks; then the rollback's
        // restore (two renames). What an update adds to the service's downtime.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let t = Instant::now();
        let snap = rt
            .block_on(apptainer_supervisor::update::snapshot::take(&img))
            .expect("the snapshot");
        let took = t.elapsed();
        let sm = std::fs::metadata(&snap.path).expect("the snapshot file");
        let t = Instant::now();
        apptainer_supervisor::update::snapshot::restore(&img, &snap.path, 0).expect("restore");
        let restore = t.elapsed();
        println!(
            "run {run}: update's overlay snapshot of {mib} MiB: {:.2} s wall ({}), {} MiB allocated by the copy; rollback restore {} us",
            took.as_secs_f64(),
            if snap.reflinked { "reflink" } else { "sparse copy" },
            (sm.blocks() * 512) >> 20,
            restore.as_micros()
        );
    }
}
