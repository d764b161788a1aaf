//! Where the host proxy is and how to reach it: AF_VSOCK (production guests) or a Unix socket
//! (demo and tests on the build machine).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncWrite};

/// The host's vsock CID (VMADDR_CID_HOST): a guest reaches its host's proxy there.
pub const HOST_CID: u32 = 2;
/// The port the host proxy listens on by default.
pub const DEFAULT_PORT: u32 = 9999;
/// The default host address, `vsock:2:9999`.
pub const DEFAULT_HOST: &str = "vsock:2:9999";

/// A byte stream to the host proxy, whatever the transport (a socket, so it has a descriptor).
pub trait HostStream: AsyncRead + AsyncWrite + AsRawFd + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + AsRawFd + Send + Unpin> HostStream for T {}

/// Whether the socket `fd` has a pending error (for example a vsock connection reset by a
/// transport reset or device removal after a live migration).
///
/// The kernel reports such a reset as `POLLERR` alone, which tokio does not hand to a task that
/// waits to read, so the connection task asks with a zero-timeout `poll(2)` on its tick instead
/// of learning it on its next write (which could be half a lease TTL later). The error stays
/// pending: the next read or write still returns it.
pub fn socket_failed(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, nfds 1, timeout 0 (never blocks); `fd` is borrowed from a live
    // stream by the caller.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0
}

/// A boxed [`HostStream`].
pub type BoxedStream = Pin<Box<dyn HostStream>>;

/// The address of the host proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostAddr {
    /// AF_VSOCK context id and port (`vsock:CID:PORT`).
    Vsock {
        /// Context id (2 is the host).
        cid: u32,
        /// Port.
        port: u32,
    },
    /// A Unix stream socket (`unix:PATH`), for the demo and tests.
    Unix(PathBuf),
}

/// Why a host address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid host address '{input}': {reason}; use vsock:CID:PORT (e.g. vsock:2:9999) or unix:PATH"
)]
pub struct AddrError {
    /// What was given.
    pub input: String,
    /// What is wrong.
    pub reason: String,
}

impl Default for HostAddr {
    fn default() -> Self {
        HostAddr::Vsock {
            cid: HOST_CID,
            port: DEFAULT_PORT,
        }
    }
}

impl FromStr for HostAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, AddrError> {
        let err = |reason: &str| AddrError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| err("a vsock address needs both a CID and a port"))?;
            let cid = cid
                .parse::<u32>()
                .map_err(|_| err("the CID is not a number between 0 and 4294967295"))?;
            let port = port
                .parse::<u32>()
                .map_err(|_| err("the port is not a number between 0 and 4294967295"))?;
            Ok(HostAddr::Vsock { cid, port })
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(err("the Unix socket path is empty"));
            }
            Ok(HostAddr::Unix(PathBuf::from(path)))
        } else {
            Err(err("unknown transport"))
        }
    }
}

impl fmt::Display for HostAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            HostAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl HostAddr {
    /// The tokio-vsock address of a vsock host address (building it opens nothing).
    pub fn vsock_addr(&self) -> Option<tokio_vsock::VsockAddr> {
        match self {
            HostAddr::Vsock { cid, port } => Some(tokio_vsock::VsockAddr::new(*cid, *port)),
            HostAddr::Unix(_) => None,
        }
    }

    /// What to check when the host cannot be reached, for error messages.
    pub fn hint(&self) -> String {
        match self {
            HostAddr::Vsock { cid, port } => format!(
                "check that this VM has a vsock device (/dev/vsock) and that hostbind-proxy runs on \
                 the host and listens on vsock port {port} (CID {cid} is the host)"
            ),
            HostAddr::Unix(p) => format!(
                "check that hostbind-proxy is running and listening on {}",
                p.display()
            ),
        }
    }

    /// Opens a stream to the host proxy.
    pub async fn connect(&self) -> io::Result<BoxedStream> {
        match self {
            HostAddr::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok(Box::pin(s))
            }
            HostAddr::Vsock { cid, port } => {
                let s = tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port))
                    .await?;
                Ok(Box::pin(s))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reset_connection_is_seen_as_failed_without_reading() {
        use std::net::{TcpListener, TcpStream};
        use std::os::fd::AsRawFd;
        // TCP on loopback: an abortive close (linger 0) resets the peer, like a vsock reset.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (theirs, _) = l.accept().unwrap();
        assert!(!super::socket_failed(ours.as_raw_fd()), "live connection");
        // An orderly close is not an error: the reader sees EOF itself.
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !super::socket_failed(ours.as_raw_fd()),
            "half-closed is not failed"
        );
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a linger struct of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                theirs.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        drop(theirs);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !super::socket_failed(ours.as_raw_fd()) {
            assert!(std::time::Instant::now() < deadline, "reset never reported");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    use super::*;

    #[test]
    fn parses_and_formats_both_transports() {
        let v: HostAddr = "vsock:2:9999".parse().unwrap();
        assert_eq!(v, HostAddr::Vsock { cid: 2, port: 9999 });
        assert_eq!(v.to_string(), "vsock:2:9999");
        assert_eq!(HostAddr::default(), v);
        assert_eq!(DEFAULT_HOST.parse::<HostAddr>().unwrap(), v);
        let u: HostAddr = "unix:/tmp/x y.sock".parse().unwrap();
        assert_eq!(u, HostAddr::Unix("/tmp/x y.sock".into()));
        assert_eq!(u.to_string(), "unix:/tmp/x y.sock");
        assert!(u.vsock_addr().is_none());
    }

    #[test]
    fn vsock_address_is_built_without_opening_a_socket() {
        let v: HostAddr = "vsock:3:1234".parse().unwrap();
        let a = v.vsock_addr().unwrap();
        assert_eq!(a.cid(), 3);
        assert_eq!(a.port(), 1234);
        assert!(v.hint().contains("vsock port 1234"));
    }

    #[test]
    fn rejects_bad_addresses_with_a_reason() {
        for (input, reason) in [
            ("vsock:2", "both a CID and a port"),
            ("vsock:x:1", "CID is not a number"),
            ("vsock:2:-1", "port is not a number"),
            ("vsock:2:99999999999", "port is not a number"),
            ("unix:", "path is empty"),
            ("tcp:127.0.0.1:1", "unknown transport"),
            ("", "unknown transport"),
        ] {
            let e = input.parse::<HostAddr>().unwrap_err();
            assert!(e.reason.contains(reason), "{input}: {e}");
            assert!(e.to_string().contains("vsock:CID:PORT"), "{e}");
        }
    }
}
