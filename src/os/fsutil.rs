//! File writes that never leave a half-written file in place, and bounded reads of small
//! files a hostile hand may have replaced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The content of `f`, an opened file that must be a regular one (a FIFO or a device in its
/// place would be read for as long as it gives), of at most `max` bytes.
pub fn read_regular(f: File, max: u64) -> io::Result<Vec<u8>> {
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut data = Vec::new();
    f.take(max + 1).read_to_end(&mut data)?;
    if data.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {} KiB", max / 1024),
        ));
    }
    Ok(data)
}

/// Writes `data` to a temporary file beside `path`, fsyncs it, renames it over `path` and
/// fsyncs the directory. A crash or a full disk leaves the previous file intact.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_with(path, data, mode, true)
}

/// As [`write_atomic`], without the two fsyncs: for runtime state under /run that a
/// reboot discards anyway. Readers still never see half a file (rename is atomic), a full
/// disk still leaves the previous file; what is given up is durability across a crash of
/// the machine, which /run does not have. The fsyncs cost milliseconds on a disk-backed
/// directory, on the path between the inner boot's end and READY=1.
pub fn write_replace(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_with(path, data, mode, false)
}

fn write_with(path: &Path, data: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        write_atomic(&p, b"one", 0o644).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
