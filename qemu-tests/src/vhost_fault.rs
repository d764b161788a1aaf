//! Faults of a vhost-user backend, for tests: a relay on the vhost-user socket between QEMU and
//! vhost-device-vsock that forwards every message with the file descriptors it carries, and
//! holds back or turns off the `SET_VRING_ENABLE` of one queue.
//!
//! Holding it back is what a loaded host does to a backend that reads its socket late: QEMU
//! (7.2) sends `SET_VRING_ENABLE` without waiting for an answer and lets the guest run on, so the
//! guest's first notification of the queue reaches the backend before the queue is enabled, and
//! vhost-user-backend before 0.24 (vhost-device-vsock 0.3) drops it (rust-vmm/vhost#247, fixed
//! by #374). A guest driver that notifies only once then waits forever. Turning the enable into a disable
//! is a backend that never processes the queue at all.
//!
//! The relay sits at `$D/vhost-relay.sock` (QEMU's chardev) and connects to the backend's
//! socket when QEMU connects; its threads end when either side closes, or when it is dropped.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::{io_err, Result};

/// `VHOST_USER_SET_VRING_ENABLE`.
pub const SET_VRING_ENABLE: u32 = 18;
/// Header flag: the front-end waits for a reply (`VHOST_USER_NEED_REPLY`).
const NEED_REPLY: u32 = 1 << 3;
/// vhost-user header: request, flags, payload size (u32 each, native = little endian).
const HEADER: usize = 12;
/// Larger than any payload of the messages QEMU and vhost-device-vsock exchange.
const MAX_PAYLOAD: usize = 4096;
/// Most descriptors one message carries (the memory table: 8 regions).
const MAX_FDS: usize = 8;

/// What to do to a vhost-user backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhostFault {
    /// Forward the `SET_VRING_ENABLE` that enables `queue` only `by` later (and every message
    /// after it with it): the guest's first notification of the queue comes before the enable.
    LateEnable {
        /// Queue index (vsock: 0 receive, 1 transmit, 2 events).
        queue: u32,
        /// How late.
        by: Duration,
    },
    /// Forward the `SET_VRING_ENABLE` that enables `queue` as one that disables it: the backend
    /// never processes the queue.
    NeverEnable {
        /// Queue index.
        queue: u32,
    },
}

/// What the relay did to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tampered {
    /// The request (`SET_VRING_ENABLE`).
    pub request: u32,
    /// The queue it was for.
    pub queue: u32,
    /// Whether QEMU waited for the backend's reply to it (then the guest cannot run ahead of
    /// the enable: QEMU versions that send it synchronously close the window for lost kicks).
    pub need_reply: bool,
    /// The fault applied.
    pub fault: VhostFault,
}

/// A running relay; stopped (threads joined) when dropped.
#[derive(Debug)]
pub struct VhostRelay {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<UnixStream>>>,
    tampered: Arc<Mutex<Vec<Tampered>>>,
    thread: Option<JoinHandle<()>>,
}

impl VhostRelay {
    /// Listens at `listen` and, once QEMU connects there, connects it to the backend's socket
    /// `backend`, applying `fault`.
    pub fn start(listen: &Path, backend: &Path, fault: VhostFault) -> Result<VhostRelay> {
        let listener = UnixListener::bind(listen).map_err(io_err(format!(
            "bind the vhost-user relay at {}",
            listen.display()
        )))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("make the vhost-user relay's listener non-blocking"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let tampered = Arc::new(Mutex::new(Vec::new()));
        let backend = backend.to_path_buf();
        let thread = {
            let (stop, streams, tampered) = (stop.clone(), streams.clone(), tampered.clone());
            std::thread::Builder::new()
                .name("vhost-relay".into())
                .spawn(move || relay(&listener, &backend, fault, &stop, &streams, &tampered))
                .map_err(io_err("start the vhost-user relay thread"))?
        };
        Ok(VhostRelay {
            path: listen.to_path_buf(),
            stop,
            streams,
            tampered,
            thread: Some(thread),
        })
    }

    /// The socket QEMU connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The messages the relay changed so far.
    pub fn tampered(&self) -> Vec<Tampered> {
        self.tampered.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

impl Drop for VhostRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(streams) = self.streams.lock() {
            for s in streams.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts QEMU (polling, so that a drop ends the wait), connects the backend and runs both
/// directions until one side closes.
fn relay(
    listener: &UnixListener,
    backend: &Path,
    fault: VhostFault,
    stop: &AtomicBool,
    streams: &Mutex<Vec<UnixStream>>,
    tampered: &Mutex<Vec<Tampered>>,
) {
    let qemu = loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    };
    let Ok(back) = UnixStream::connect(backend) else {
        return;
    };
    let clones = (qemu.try_clone(), back.try_clone());
    let (Ok(qemu2), Ok(back2)) = clones else {
        return;
    };
    if qemu.set_nonblocking(false).is_err() {
        return;
    }
    match streams.lock() {
        Ok(mut s) => s.extend([qemu2, back2]),
        Err(_) => return,
    }
    if stop.load(Ordering::SeqCst) {
        return;
    }
    std::thread::scope(|s| {
        s.spawn(|| forward(&back, &qemu, None));
        forward(&qemu, &back, Some((fault, tampered)));
    });
}

/// Forwards messages from `from` to `to` until either ends; applies `fault` (QEMU to backend).
fn forward(from: &UnixStream, to: &UnixStream, fault: Option<(VhostFault, &Mutex<Vec<Tampered>>)>) {
    while let Ok(Some((mut header, mut payload, fds))) = receive(from) {
        if let Some((fault, log)) = fault {
            tamper(fault, &mut header, &mut payload, log);
        }
        if send(to, &header, &payload, &fds).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Applies `fault` to one message from QEMU.
fn tamper(
    fault: VhostFault,
    header: &mut [u8; HEADER],
    payload: &mut [u8],
    log: &Mutex<Vec<Tampered>>,
) {
    let request = u32_at(header, 0);
    if request != SET_VRING_ENABLE || payload.len() < 8 {
        return;
    }
    let (index, enable) = (u32_at(payload, 0), u32_at(payload, 4));
    let queue = match fault {
        VhostFault::LateEnable { queue, .. } | VhostFault::NeverEnable { queue } => queue,
    };
    if index != queue || enable == 0 {
        return;
    }
    if let Ok(mut l) = log.lock() {
        l.push(Tampered {
            request,
            queue,
            need_reply: u32_at(header, 4) & NEED_REPLY != 0,
            fault,
        });
    }
    match fault {
        VhostFault::LateEnable { by, .. } => std::thread::sleep(by),
        VhostFault::NeverEnable { .. } => payload[4..8].copy_from_slice(&0u32.to_le_bytes()),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

/// One message: header (with the descriptors sent along with it), payload. `None` at the end.
#[allow(clippy::type_complexity)]
fn receive(from: &UnixStream) -> std::io::Result<Option<([u8; HEADER], Vec<u8>, Vec<OwnedFd>)>> {
    let mut header = [0u8; HEADER];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut fds = Vec::new();
    let got = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let msg = recvmsg::<()>(
            from.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors for this process; nothing
                // else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        msg.bytes
    };
    if got == 0 {
        return Ok(None);
    }
    let mut reader = from;
    reader.read_exact(&mut header[got..])?;
    let size = u32_at(&header, 8) as usize;
    if size > MAX_PAYLOAD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("vhost-user message with a {size}-byte payload"),
        ));
    }
    let mut payload = vec![0u8; size];
    reader.read_exact(&mut payload)?;
    Ok(Some((header, payload, fds)))
}

/// Sends one message with its descriptors.
fn send(to: &UnixStream, header: &[u8], payload: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(header), IoSlice::new(payload)];
    let sent = sendmsg::<()>(to.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    // The descriptors went with the first byte; the rest (if the socket took less) follows.
    let rest: Vec<u8> = header.iter().chain(payload).copied().skip(sent).collect();
    if !rest.is_empty() {
        let mut writer = to;
        writer.write_all(&rest)?;
    }
    Ok(())
}
