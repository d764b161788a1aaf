//! hostbind-fsutil: careful file writing (atomic replace through an exclusively created random
//! temporary file, fsync, explicit permissions), Unix sockets bound with their mode, reading
//! with the path in every error, and error reports for the binaries.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Mutex;

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
///
/// The data goes to a temporary file with a random name in the target's directory, created
/// exclusively (`O_CREAT|O_EXCL`: never a file or symlink someone else put there) with `mode`
/// from its creation (narrowed by the umask), then fsynced and renamed over `path`, and the
/// directory fsynced. So a directory other users may write to (`--out` into `/tmp`, a shared
/// vendor directory) cannot hand this process a file they own or point it elsewhere.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    replace(path, bytes, mode, true)
}

/// Like [`write_atomic`] but refuses to replace an existing file unless `force`. Without
/// `force` the new file is linked in only if nothing is at `path` at that moment (no window
/// between the check and the write).
pub fn write_new(path: &Path, bytes: &[u8], mode: u32, force: bool) -> Result<(), FileError> {
    if !force && exists(path)? {
        return Err(FileError::Exists(path.display().to_string()));
    }
    replace(path, bytes, mode, force)
}

/// The directory a file at `path` lives in.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// [`write_atomic`]; `clobber` false refuses to replace an existing file.
fn replace(path: &Path, bytes: &[u8], mode: u32, clobber: bool) -> Result<(), FileError> {
    let err = |source| FileError::Write {
        path: path.display().to_string(),
        source,
    };
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.as_file_mut().write_all(bytes).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    // On error the temporary file is removed when `tmp` (or the error holding it) drops.
    let persisted = if clobber {
        tmp.persist(path)
    } else {
        tmp.persist_noclobber(path)
    };
    match persisted {
        Ok(_) => {}
        Err(e) if !clobber && e.error.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(FileError::Exists(path.display().to_string()))
        }
        Err(e) => return Err(err(e.error)),
    }
    if let Ok(d) = fs::File::open(dir) {
        d.sync_all().map_err(err)?;
    }
    Ok(())
}

/// Binds a Unix stream socket at `path` whose file has `mode` from the moment it exists: it is
/// bound under the umask `!mode`, not chmod-ed after `bind` (which leaves a window in which a
/// socket made under a looser umask accepts anyone). The umask is changed only in a short-lived
/// thread with its own file-system context (`unshare(CLONE_FS)`), so no other thread's files
/// are created under it; where `unshare` is refused, the process umask is set and restored
/// around the `bind` under a lock. Nothing may be at `path` (callers remove a stale socket).
/// The listener is non-blocking, ready for `tokio::net::UnixListener::from_std`.
pub fn bind_unix_listener(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    let l = std::thread::scope(|s| {
        s.spawn(|| bind_under_umask(path, mode))
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the socket-binding thread panicked")))
    })?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The `bind` of [`bind_unix_listener`], run in its own thread.
fn bind_under_umask(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    use nix::sys::stat::{umask, Mode};
    if nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).is_ok() {
        // This thread's umask only; it ends with the thread.
        umask(Mode::from_bits_truncate(!mode & 0o777));
        return UnixListener::bind(path);
    }
    bind_under_process_umask(path, mode)
}

/// The fallback of [`bind_under_umask`]: the process umask, set and restored around `bind`.
fn bind_under_process_umask(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    use nix::sys::stat::{umask, Mode};
    static PROCESS_UMASK: Mutex<()> = Mutex::new(());
    let _one_at_a_time = PROCESS_UMASK.lock().unwrap_or_else(|e| e.into_inner());
    let old = umask(Mode::from_bits_truncate(!mode & 0o777));
    let bound = UnixListener::bind(path);
    umask(old);
    bound
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

    #[test]
    fn temp_file_pre_creation_by_a_symlink_or_a_planted_file_is_harmless() {
        // Until issue 15 the temporary file was `.NAME.tmpPID`, opened without O_EXCL: a
        // symlink planted there made the writer write through it, and a file planted there (by
        // another user, world-writable) became the result.
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let p = d.path().join("k");
        let planted = d.path().join(format!(".k.tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        write_atomic(&p, b"secret", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let md = fs::symlink_metadata(&p).unwrap();
        assert!(md.file_type().is_file(), "{md:?}");
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(read(&p).unwrap(), b"secret");

        fs::remove_file(&planted).unwrap();
        fs::write(&planted, b"").unwrap();
        fs::set_permissions(&planted, fs::Permissions::from_mode(0o666)).unwrap();
        write_new(&p, b"secret2", 0o600, true).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_ne!(
            fs::metadata(&p).unwrap().ino(),
            fs::metadata(&planted).unwrap().ino()
        );
        assert_eq!(
            fs::read(&planted).unwrap(),
            b"",
            "the planted file got the data"
        );
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Only the planted file and the victim are left besides the result.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 3);
    }

    #[test]
    fn write_new_refuses_what_appears_meanwhile_and_a_dangling_symlink() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::os::unix::fs::symlink(d.path().join("nowhere"), &p).unwrap();
        assert!(matches!(
            write_new(&p, b"x", 0o600, false),
            Err(FileError::Exists(_))
        ));
        assert!(!d.path().join("nowhere").exists());
        // The no-clobber link itself refuses an existing file (the check before it passed).
        fs::remove_file(&p).unwrap();
        fs::write(&p, b"old").unwrap();
        assert!(matches!(
            replace(&p, b"new", 0o600, false),
            Err(FileError::Exists(_))
        ));
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn sockets_are_bound_with_their_mode_under_the_loosest_umask() {
        use nix::sys::stat::{umask, Mode};
        let d = tempfile::tempdir().unwrap();
        // Under umask 0 a socket chmod-ed after bind exists as 0777 for a moment.
        let old = umask(Mode::empty());
        let modes = [0o600, 0o660, 0o666, 0o640];
        let bound: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let p = d.path().join(format!("s{i}"));
                    let mode = modes[i % modes.len()];
                    s.spawn(move || {
                        let l = if i < 4 {
                            bind_unix_listener(&p, mode)
                        } else {
                            bind_under_process_umask(&p, mode)
                        };
                        (p, mode, l.unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let now = umask(old);
        assert_eq!(now, Mode::empty(), "the process umask changed");
        for (p, mode, _l) in &bound {
            let got = fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(got, *mode, "{}", p.display());
        }
        // A path in use is refused, not replaced.
        assert!(bind_unix_listener(&bound[0].0, 0o600).is_err());
    }
}
