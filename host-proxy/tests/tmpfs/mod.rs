//! A small tmpfs mounted for one test (a state dir that really runs out of space: writes fail
//! with ENOSPC), unmounted when dropped, also when the test fails. Mounting needs root: without
//! it the tests that need one are skipped, unless HOSTBIND_REQUIRE_SWTPM is set (scripts/test
//! and CI), where they must run.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A mounted tmpfs; unmounted (lazily if still busy) on drop.
pub struct Tmpfs {
    dir: PathBuf,
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` at `dir` (created if missing). `None` (the test should return)
    /// when this process may not mount and the environment does not require these tests.
    pub fn mount(dir: &Path, bytes: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let (src, fstype) = (
            CString::new("tmpfs").unwrap(),
            CString::new("tmpfs").unwrap(),
        );
        let opts = CString::new(format!("size={bytes},mode=0700")).unwrap();
        let target = cstr(dir);
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if std::env::var_os("HOSTBIND_REQUIRE_SWTPM").is_some() {
                panic!(
                    "cannot mount a tmpfs at {} ({e}); these fault tests need root",
                    dir.display()
                );
            }
            eprintln!(
                "skipping: cannot mount a tmpfs at {} ({e}); run as root",
                dir.display()
            );
            return None;
        }
        Some(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Fills the file system with `name` until a write fails with ENOSPC; returns its size.
    pub fn fill(&self, name: &str) -> u64 {
        let p = self.dir.join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        let block = vec![0x5au8; 64 * 1024];
        let mut written = 0u64;
        let mut chunk = block.len();
        loop {
            match f.write(&block[..chunk]) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    if chunk == 1 {
                        break;
                    }
                    chunk = (chunk / 2).max(1);
                }
                Err(e) => panic!("filling {}: {e}", p.display()),
            }
        }
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = cstr(&self.dir);
        // SAFETY: a valid NUL-terminated path; MNT_DETACH unmounts even if a file is still open.
        unsafe {
            if libc::umount2(target.as_ptr(), 0) != 0 {
                libc::umount2(target.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}
