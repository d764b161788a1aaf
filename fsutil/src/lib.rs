//! hostbind-fsutil: careful file writing (atomic replace with fsync and explicit permissions), reading with the path in every error, and error reports for the binaries.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Errors reading or writing hostbind files. Each says what the OS error means for the admin:
/// a permission problem (with the user this process runs as), a full disk, a missing file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Reading failed.
    #[error("cannot read {path}: {source}{}", io_hint(source, Access::Read))]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Writing failed.
    #[error("cannot write {path}: {source}{}", io_hint(source, Access::Write))]
    Write {
        path: String,
        source: std::io::Error,
    },
    /// Refusing to overwrite.
    #[error("{0} already exists; remove it first or pass --force")]
    Exists(String),
}

/// What was being done when an OS error happened (for [`io_hint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading a file or listing a directory.
    Read,
    /// Creating or writing a file or directory.
    Write,
}

/// The name of user `uid`, when the system knows it.
pub fn name_of(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// The name of the user this process runs as (its uid when the name is unknown).
pub fn user_name() -> String {
    let uid = nix::unistd::geteuid().as_raw();
    name_of(uid).unwrap_or_else(|| uid.to_string())
}

/// This process's user, for error messages: `user NAME (uid N)`.
pub fn whoami() -> String {
    let uid = nix::unistd::geteuid().as_raw();
    match name_of(uid) {
        Some(n) => format!("user {n} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// What an OS error means for the admin and what to do, as `"; ..."` to append to a message
/// naming the path; empty when the error speaks for itself (a missing file).
pub fn io_hint(e: &std::io::Error, access: Access) -> String {
    use std::io::ErrorKind as K;
    match (e.kind(), access) {
        (K::PermissionDenied, Access::Read) => format!(
            "; this process runs as {} and may not read it: check the owner and mode of the file and of its directories (ls -ld), or run as the user that owns them",
            whoami()
        ),
        (K::PermissionDenied, Access::Write) => format!(
            "; this process runs as {} and may not write there: check the owner and mode of the directory (ls -ld), or run as the user that owns it",
            whoami()
        ),
        (K::ReadOnlyFilesystem, _) => {
            "; the file system is read-only here (under systemd: ProtectSystem=strict allows only the state and runtime directories)".into()
        }
        (K::StorageFull, _) | (K::QuotaExceeded, _) => {
            "; the file system is full (or the user's quota is used up): free some space".into()
        }
        (K::NotADirectory, _) => "; a part of the path is a file, not a directory".into(),
        _ => String::new(),
    }
}

/// Whether `path` exists. Unlike [`Path::exists`], only a missing file (or directory on the
/// way) answers `false`: a permission or other error is returned as such, so that "cannot read"
/// is never reported as "not there".
pub fn exists(path: &Path) -> Result<bool, FileError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(FileError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Reads a whole file, with the path in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    fs::read(path).map_err(|source| FileError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Writes `bytes` to `path` atomically with `mode` (e.g. 0o600 for secrets): the file is either
/// the old one or the complete new one, never half-written.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let err = |source| FileError::Write {
        path: path.display().to_string(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(&dir) {
            d.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Like [`write_atomic`] but refuses to replace an existing file unless `force`.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32, force: bool) -> Result<(), FileError> {
    if !force && path.exists() {
        return Err(FileError::Exists(path.display().to_string()));
    }
    write_atomic(path, bytes, mode)
}

/// Renders an error and its causes for a person, one `: `-separated line, skipping causes whose
/// text the message before already contains (many errors quote their cause).
pub fn error_report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// Current Unix time in seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads a vendor public key given on the command line as 64 hex characters or a file name.
pub fn vendor_public_arg(arg: &str) -> Result<Vec<u8>, FileError> {
    if arg.len() == 64 && arg.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(arg.as_bytes().to_vec());
    }
    read(Path::new(arg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn errors_name_their_cause() {
        use std::io::{Error, ErrorKind};
        let denied = FileError::Read {
            path: "/var/lib/hostbind/host.cert".into(),
            source: Error::from(ErrorKind::PermissionDenied),
        }
        .to_string();
        assert!(
            denied.contains("may not read it") && denied.contains("uid "),
            "{denied}"
        );
        let full = FileError::Write {
            path: "/x".into(),
            source: Error::from(ErrorKind::StorageFull),
        }
        .to_string();
        assert!(full.contains("full"), "{full}");
        let missing = FileError::Read {
            path: "/x".into(),
            source: Error::from(ErrorKind::NotFound),
        }
        .to_string();
        assert!(
            !missing.contains("may not") && !missing.contains("full"),
            "{missing}"
        );
    }

    #[test]
    fn exists_tells_absent_from_unreadable() {
        let d = tempfile::tempdir().unwrap();
        assert!(!exists(&d.path().join("nope")).unwrap());
        assert!(!exists(&d.path().join("nope/deeper")).unwrap());
        std::fs::write(d.path().join("f"), b"x").unwrap();
        assert!(exists(&d.path().join("f")).unwrap());
        // A file where a directory is expected is an error, not "absent".
        assert!(exists(&d.path().join("f/x")).is_err());
    }

    #[test]
    fn atomic_write_sets_mode_and_refuses_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        write_new(&p, b"one", 0o600, false).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            write_new(&p, b"two", 0o600, false),
            Err(FileError::Exists(_))
        ));
        write_new(&p, b"two", 0o600, true).unwrap();
        assert_eq!(read(&p).unwrap(), b"two");
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
