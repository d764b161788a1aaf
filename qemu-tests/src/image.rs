//! The guest image builder: a Debian kernel plus a busybox initramfs holding the virtio and
//! vsock modules, the statically linked `hostbind-agent` and `hostbind-guest-app`, and `/init`.
//!
//! Everything is cached under `target/qemu-tests/`:
//! - `kernel/<package>/`: `vmlinuz` and the modules (decompressed) of the kernel package that
//!   `apt-cache depends linux-image-amd64` names today, fetched with `apt-get download` and
//!   unpacked with `dpkg-deb -x`, with their load order worked out from their `depends=`;
//! - `target/qemu-guest/`: a separate cargo target dir for the static guest binaries
//!   (`-C target-feature=+crt-static`), so building them never invalidates the main build;
//! - `images/<key>/initrd.cpio`: the initramfs, keyed by a hash of all its inputs (kernel
//!   package, modules, binaries, busybox, init script).
//!
//! Builds are serialised across test processes with a file lock.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{io_err, tail, target_dir, workspace_dir, QemuTestError, Result};

/// The Debian meta package whose dependency names the current kernel package.
pub const KERNEL_META_PACKAGE: &str = "linux-image-amd64";
/// Set this to a kernel package name (e.g. `linux-image-6.1.0-28-amd64`) to skip resolving it.
pub const KERNEL_PACKAGE_ENV: &str = "HOSTBIND_GUEST_KERNEL_PACKAGE";
/// The modules the guest loads, in load order, as paths under `lib/modules/<ver>/kernel/`.
pub const MODULES: [&str; 8] = [
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "net/vmw_vsock/vsock",
    "net/vmw_vsock/vmw_vsock_virtio_transport_common",
    "net/vmw_vsock/vmw_vsock_virtio_transport",
];
/// The guest's `/init`.
pub const INIT_SCRIPT: &str = include_str!("init.sh");
/// The target triple of the static guest binaries.
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Where busybox-static installs busybox.
pub const BUSYBOX: &str = "/bin/busybox";
/// Bump when what is kept of a kernel package changes.
const KERNEL_CACHE_VERSION: &str = "c2";
/// Bump when the image layout changes in a way the inputs don't show.
const LAYOUT_VERSION: &str = "hostbind-guest-image-v1";

/// A built guest image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel (`-kernel`).
    pub kernel: PathBuf,
    /// The initramfs (`-initrd`); `None` for a kernel that needs none (the bare-metal guest).
    pub initrd: Option<PathBuf>,
    /// The Debian kernel package it was made from.
    pub kernel_package: String,
    /// The hash of its inputs (names its cache directory).
    pub key: String,
    /// How long getting the image took in this process (build or cache hit).
    pub took: Duration,
}

static IMAGE: Mutex<Option<GuestImage>> = Mutex::new(None);

/// The guest image, built on first use (or taken from the cache) and then reused by every test
/// of this process.
pub fn guest_image() -> Result<GuestImage> {
    let mut slot = IMAGE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(img) = slot.as_ref() {
        return Ok(img.clone());
    }
    let img = build()?;
    *slot = Some(img.clone());
    Ok(img)
}

/// An exclusive `flock` on a file, released when dropped.
pub(crate) struct FileLock(File);

impl FileLock {
    pub(crate) fn acquire(path: &Path) -> Result<FileLock> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(format!("open lock file {}", path.display())))?;
        // SAFETY: flock(2) on a descriptor we own and keep open for the guard's lifetime.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(QemuTestError::Io {
                what: format!("lock {}", path.display()),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: unlocking our own descriptor; closing it would release the lock as well.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// Runs a command to completion; fails with its output unless it succeeded; returns stdout.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => QemuTestError::Missing {
                program: format!("{:?}", cmd.get_program()),
                detail: "not found on PATH".into(),
            },
            _ => QemuTestError::Io {
                what: format!("run {shown}"),
                source: e,
            },
        })?;
    if !out.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        return Err(QemuTestError::ToolFailed {
            command: shown,
            status: out.status.to_string(),
            output: tail(&text, 6000).to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn build() -> Result<GuestImage> {
    let t0 = Instant::now();
    let root = target_dir().join("qemu-tests");
    fs::create_dir_all(&root).map_err(io_err(format!("create {}", root.display())))?;
    let _lock = FileLock::acquire(&root.join("build.lock"))?;

    let package = kernel_package()?;
    let kdir = kernel(&root, &package)?;
    let bins = guest_binaries()?;
    let busybox = PathBuf::from(BUSYBOX);
    if !busybox.is_file() {
        return Err(QemuTestError::Missing {
            program: "busybox-static".into(),
            detail: format!("{BUSYBOX} does not exist"),
        });
    }
    ensure_static(&busybox, "busybox (install busybox-static, not busybox)")?;

    // The key: every input of the initramfs.
    let order =
        fs::read_to_string(kdir.join("modules/order")).map_err(io_err("read the module list"))?;
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION);
    h.update(&package);
    h.update(INIT_SCRIPT);
    h.update(&order);
    h.update(hash_file(&kdir.join("vmlinuz"))?);
    for m in order.split_whitespace() {
        h.update(hash_file(&kdir.join("modules").join(format!("{m}.ko")))?);
    }
    for b in &bins {
        h.update(hash_file(b)?);
    }
    h.update(hash_file(&busybox)?);
    let key = hex::encode(&h.finalize()[..12]);

    let images = root.join("images");
    let dir = images.join(&key);
    let initrd = dir.join("initrd.cpio");
    if !initrd.is_file() {
        let staging = images.join(format!(".staging-{}", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        let made = make_initramfs(&staging, &kdir, &order, &bins, &busybox);
        if made.is_ok() {
            let _ = fs::remove_dir_all(&dir);
            fs::rename(staging.join("out"), &dir)
                .map_err(io_err(format!("move the image to {}", dir.display())))?;
        }
        let _ = fs::remove_dir_all(&staging);
        made?;
        // Old images are of no use any more.
        if let Ok(rd) = fs::read_dir(&images) {
            for e in rd.flatten() {
                if e.file_name() != key.as_str() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
    Ok(GuestImage {
        kernel: kdir.join("vmlinuz"),
        initrd: Some(initrd),
        kernel_package: package,
        key,
        took: t0.elapsed(),
    })
}

/// The kernel package to use: `$HOSTBIND_GUEST_KERNEL_PACKAGE`, else what
/// `apt-cache depends linux-image-amd64` names.
pub fn kernel_package() -> Result<String> {
    if let Ok(p) = std::env::var(KERNEL_PACKAGE_ENV) {
        if !p.trim().is_empty() {
            return Ok(p.trim().to_string());
        }
    }
    let out = run(Command::new("apt-cache")
        .args(["depends", KERNEL_META_PACKAGE])
        .env("LC_ALL", "C"))
    .map_err(|e| {
        QemuTestError::Kernel(format!(
            "cannot ask apt which kernel {KERNEL_META_PACKAGE} depends on ({e}); run \
             `apt-get update` (scripts/setup does) or set {KERNEL_PACKAGE_ENV}"
        ))
    })?;
    parse_kernel_depends(&out).ok_or_else(|| {
        QemuTestError::Kernel(format!(
            "`apt-cache depends {KERNEL_META_PACKAGE}` names no linux-image-*-amd64 package \
             (output: {}); run `apt-get update` (scripts/setup does) or set {KERNEL_PACKAGE_ENV}",
            out.trim()
        ))
    })
}

/// The `linux-image-<ver>-amd64` package in `apt-cache depends` output.
pub fn parse_kernel_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| {
            p.starts_with("linux-image-")
                && p.ends_with("-amd64")
                && *p != KERNEL_META_PACKAGE
                && !p.contains('<')
        })
        .map(str::to_string)
}

/// The cached kernel dir of `package` (`vmlinuz`, `modules/*.ko`, `modules/order`), fetching
/// and unpacking the package first when it is not cached.
fn kernel(root: &Path, package: &str) -> Result<PathBuf> {
    let kdir = root
        .join("kernel")
        .join(format!("{package}.{KERNEL_CACHE_VERSION}"));
    if kdir.join("complete").is_file() {
        return Ok(kdir);
    }
    let work = root
        .join("kernel")
        .join(format!(".download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(io_err(format!("create {}", work.display())))?;
    let result = fetch_kernel(&work, &kdir, package);
    let _ = fs::remove_dir_all(&work);
    result?;
    Ok(kdir)
}

fn fetch_kernel(work: &Path, kdir: &Path, package: &str) -> Result<()> {
    run(Command::new("apt-get")
        .args(["download", package])
        .current_dir(work))
    .map_err(|e| {
        QemuTestError::Kernel(format!(
            "`apt-get download {package}` failed ({e}); check the network and run `apt-get update`"
        ))
    })?;
    let deb = fs::read_dir(work)
        .map_err(io_err(format!("list {}", work.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| {
            QemuTestError::Kernel(format!("apt-get download {package} left no .deb file"))
        })?;
    let x = work.join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;

    let _ = fs::remove_dir_all(kdir);
    let mods = kdir.join("modules");
    fs::create_dir_all(&mods).map_err(io_err(format!("create {}", mods.display())))?;
    let vmlinuz = fs::read_dir(x.join("boot"))
        .map_err(io_err(format!("list boot/ of {package}")))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| QemuTestError::Kernel(format!("{package} has no boot/vmlinuz-*")))?;
    fs::copy(&vmlinuz, kdir.join("vmlinuz")).map_err(io_err("copy vmlinuz"))?;

    // lib/modules/<ver>/ (or usr/lib/modules/<ver>/ on merged-/usr releases)
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| x.join(d))
        .filter_map(|d| fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .find(|p| p.join("kernel").is_dir())
        .ok_or_else(|| QemuTestError::Kernel(format!("{package} has no lib/modules/<ver>/")))?;
    let builtin = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let builtin_names: Vec<String> = builtin
        .lines()
        .filter_map(|l| l.trim().rsplit('/').next())
        .map(|n| n.trim_end_matches(".ko").replace('-', "_"))
        .collect();
    let mut found_mods: Vec<(String, Vec<String>)> = Vec::new();
    for m in MODULES {
        let name = m.rsplit('/').next().unwrap_or(m);
        let base = moddir.join("kernel").join(format!("{m}.ko"));
        let found = ["", ".xz", ".zst", ".gz"]
            .iter()
            .map(|ext| PathBuf::from(format!("{}{ext}", base.display())))
            .find(|p| p.is_file());
        let dest = mods.join(format!("{name}.ko"));
        match found {
            Some(src) => {
                decompress_module(&src, &dest)?;
                let data = fs::read(&dest).map_err(io_err(format!("read {}", dest.display())))?;
                found_mods.push((name.to_string(), module_depends(&data)));
            }
            None if builtin
                .lines()
                .any(|l| l.trim() == format!("kernel/{m}.ko")) =>
            {
                // Built into this kernel: nothing to load.
            }
            None => {
                return Err(QemuTestError::Kernel(format!(
                    "{package} has neither module {m}.ko(.xz/.zst/.gz) nor lists it as built in"
                )))
            }
        }
    }
    let order = load_order(&found_mods, &builtin_names)
        .map_err(|e| QemuTestError::Kernel(format!("{package}: {e}")))?;
    fs::write(mods.join("order"), order.join("\n") + "\n")
        .map_err(io_err("write the module list"))?;
    fs::write(kdir.join("complete"), package).map_err(io_err("mark the kernel complete"))?;
    Ok(())
}

/// The `depends=` list of a kernel module's `.modinfo` (module names, `-` written as `_`).
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &ko[at + KEY.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(|d| d.trim().replace('-', "_"))
        .filter(|d| !d.is_empty())
        .collect()
}

/// Orders modules so each comes after its dependencies (keeping the given order otherwise);
/// dependencies must be among `mods` or built in.
pub fn load_order(
    mods: &[(String, Vec<String>)],
    builtin: &[String],
) -> std::result::Result<Vec<String>, String> {
    for (name, deps) in mods {
        for d in deps {
            if !mods.iter().any(|(n, _)| n == d) && !builtin.contains(d) {
                return Err(format!(
                    "module {name} needs {d}, which is neither in the image's list nor built in"
                ));
            }
        }
    }
    let mut order: Vec<String> = Vec::new();
    while order.len() < mods.len() {
        let next = mods.iter().find(|(n, deps)| {
            !order.contains(n)
                && deps
                    .iter()
                    .all(|d| order.contains(d) || builtin.contains(d))
        });
        match next {
            Some((n, _)) => order.push(n.clone()),
            None => return Err("the modules depend on each other in a cycle".into()),
        }
    }
    Ok(order)
}

/// Copies a module, decompressing `.xz`, `.zst` and `.gz` (busybox insmod wants plain `.ko`).
fn decompress_module(src: &Path, dest: &Path) -> Result<()> {
    let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tool = match ext {
        "xz" => "xz",
        "zst" => "zstd",
        "gz" => "gzip",
        _ => {
            fs::copy(src, dest).map_err(io_err(format!("copy {}", src.display())))?;
            return Ok(());
        }
    };
    let out = File::create(dest).map_err(io_err(format!("create {}", dest.display())))?;
    let st = Command::new(tool)
        .arg("-dc")
        .arg(src)
        .stdout(out)
        .status()
        .map_err(|_| QemuTestError::Missing {
            program: tool.into(),
            detail: format!("needed to decompress {}", src.display()),
        })?;
    if !st.success() {
        return Err(QemuTestError::ToolFailed {
            command: format!("{tool} -dc {}", src.display()),
            status: st.to_string(),
            output: String::new(),
        });
    }
    Ok(())
}

/// Set to `release` to build the guest binaries optimised (for measurements; slower to build).
pub const GUEST_PROFILE_ENV: &str = "HOSTBIND_QEMU_GUEST_PROFILE";

/// Builds the static guest binaries into `target/qemu-guest` and returns their paths
/// (agent, app).
pub fn guest_binaries() -> Result<Vec<PathBuf>> {
    let tdir = target_dir().join("qemu-guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let release = std::env::var(GUEST_PROFILE_ENV).is_ok_and(|p| p == "release");
    let mut cmd = Command::new(&cargo);
    cmd.arg("build");
    if release {
        cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "0")
            .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
            .arg("--release");
    }
    run(cmd
        .current_dir(workspace_dir())
        .args(["--target", GUEST_TARGET, "--target-dir"])
        .arg(&tdir)
        .args([
            "-p",
            "hostbind-agent",
            "--bin",
            "hostbind-agent",
            "-p",
            "hostbind-qemu-tests",
            "--bin",
            "hostbind-guest-app",
            "--no-default-features",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        // Smaller binaries, quicker builds: no debug info in the guest.
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .env("CARGO_PROFILE_DEV_STRIP", "debuginfo"))
    .map_err(|e| match e {
        QemuTestError::ToolFailed { output, .. } => QemuTestError::ToolFailed {
            command: "cargo build (static guest binaries: hostbind-agent, hostbind-guest-app)"
                .into(),
            status: "failed".into(),
            output,
        },
        other => other,
    })?;
    let out = tdir
        .join(GUEST_TARGET)
        .join(if release { "release" } else { "debug" });
    let bins = vec![out.join("hostbind-agent"), out.join("hostbind-guest-app")];
    for b in &bins {
        ensure_static(b, "a guest binary")?;
    }
    Ok(bins)
}

/// Fails unless `path` is an ELF file without a program interpreter (statically linked).
fn ensure_static(path: &Path, what: &str) -> Result<()> {
    let mut f = File::open(path).map_err(io_err(format!("open {}", path.display())))?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)
        .map_err(io_err(format!("read {}", path.display())))?;
    match elf_has_interpreter(&data) {
        Some(false) => Ok(()),
        Some(true) => Err(QemuTestError::Invalid(format!(
            "{} ({what}) is dynamically linked; the guest has no libraries",
            path.display()
        ))),
        None => Err(QemuTestError::Invalid(format!(
            "{} ({what}) is not a 64-bit little-endian ELF file",
            path.display()
        ))),
    }
}

/// Whether a 64-bit little-endian ELF image has a PT_INTERP program header; `None` if the data
/// is not such an ELF image.
pub fn elf_has_interpreter(data: &[u8]) -> Option<bool> {
    if data.get(..4)? != b"\x7fELF" || *data.get(4)? != 2 || *data.get(5)? != 1 {
        return None;
    }
    let u16_at = |o: usize| -> Option<u16> {
        Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?))
    };
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?))
    };
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?))
    };
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let off = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(off)? == 3 {
            return Some(true);
        }
    }
    Some(false)
}

/// SHA-256 of a file.
fn hash_file(path: &Path) -> Result<[u8; 32]> {
    let mut f = File::open(path).map_err(io_err(format!("open {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io_err(format!("read {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// Lays out the initramfs tree in `staging/root` and packs it into `staging/out/initrd.cpio`.
fn make_initramfs(
    staging: &Path,
    kdir: &Path,
    order: &str,
    bins: &[PathBuf],
    busybox: &Path,
) -> Result<()> {
    let root = staging.join("root");
    let out = staging.join("out");
    for d in [
        "bin",
        "lib/modules",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "var/lib",
    ] {
        fs::create_dir_all(root.join(d)).map_err(io_err(format!("create {d} in the image")))?;
    }
    fs::create_dir_all(&out).map_err(io_err("create the image dir"))?;
    let copy = |src: &Path, dest: PathBuf| {
        fs::copy(src, &dest)
            .map(drop)
            .map_err(io_err(format!("copy {} into the image", src.display())))
    };
    copy(busybox, root.join("bin/busybox"))?;
    for b in bins {
        let name = b.file_name().unwrap_or_default();
        copy(b, root.join("bin").join(name))?;
    }
    for m in order.split_whitespace() {
        let name = format!("{m}.ko");
        copy(
            &kdir.join("modules").join(&name),
            root.join("lib/modules").join(&name),
        )?;
    }
    copy(&kdir.join("modules/order"), root.join("lib/modules/order"))?;
    fs::write(root.join("init"), INIT_SCRIPT).map_err(io_err("write /init"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        for p in [
            root.join("init"),
            root.join("bin/busybox"),
            root.join("bin/hostbind-agent"),
            root.join("bin/hostbind-guest-app"),
        ] {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                .map_err(io_err(format!("chmod {}", p.display())))?;
        }
    }
    let cpio = out.join("initrd.cpio");
    run(Command::new("sh")
        .arg("-c")
        .arg("find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet > \"$1\"")
        .arg("sh")
        .arg(&cpio)
        .current_dir(&root))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_kernel_package_in_apt_cache_output() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_kernel_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_kernel_depends("linux-image-amd64\n"), None);
        assert_eq!(
            parse_kernel_depends("  Depends: <linux-image-6.1-amd64>\n  Depends: foo\n"),
            None
        );
    }

    #[test]
    fn orders_modules_after_their_dependencies() {
        let ko = b"xx\0license=GPL\0depends=virtio_ring,virtio-pci-modern-dev\0name=virtio_pci\0";
        assert_eq!(
            module_depends(ko),
            vec!["virtio_ring".to_string(), "virtio_pci_modern_dev".into()]
        );
        assert!(module_depends(b"\0depends=\0").is_empty());
        let m = |n: &str, d: &[&str]| (n.to_string(), d.iter().map(|s| s.to_string()).collect());
        let mods = vec![
            m("virtio", &["virtio_ring"]),
            m("virtio_ring", &[]),
            m("virtio_pci", &["virtio", "virtio_ring", "x"]),
        ];
        assert_eq!(
            load_order(&mods, &["x".into()]).unwrap(),
            vec!["virtio_ring", "virtio", "virtio_pci"]
        );
        assert!(load_order(&mods, &[]).unwrap_err().contains("needs x"));
        let cyc = vec![m("a", &["b"]), m("b", &["a"])];
        assert!(load_order(&cyc, &[]).unwrap_err().contains("cycle"));
    }

    #[test]
    fn tells_static_from_dynamic_elf() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries are linked dynamically.
        assert_eq!(elf_has_interpreter(&me), Some(true));
        assert_eq!(elf_has_interpreter(b"not elf"), None);
        assert_eq!(elf_has_interpreter(&me[..40]), None);
    }
}
