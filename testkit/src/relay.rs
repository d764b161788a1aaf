//! A TCP relay on loopback that a test can cut and restore: put in front of a service (an etcd
//! cluster) it simulates one client machine losing its network path to it while others keep
//! theirs. It runs its own tokio runtime on a thread, so sync and async tests can use it; drop
//! stops it and closes every connection.

use crate::TestkitError;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How a cut behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Open connections are closed, new ones accepted and closed at once (a REJECT rule or a
    /// dead peer: clients see errors at once).
    Reject,
    /// Open and new connections stay open but no byte passes (a silent partition: clients only
    /// notice by their own timeouts).
    Blackhole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Cut(Cut),
    Shutdown,
}

/// A running relay; see the module doc.
#[derive(Debug)]
pub struct TcpRelay {
    addr: SocketAddr,
    state: watch::Sender<State>,
    connections: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpRelay {
    /// Listens on a free port of 127.0.0.1 and forwards each connection to the first of
    /// `targets` that accepts it (so a dead member is skipped).
    pub fn start(targets: Vec<SocketAddr>) -> Result<TcpRelay, TestkitError> {
        let io = |what: &'static str| {
            move |source| TestkitError::Io {
                what: what.into(),
                source,
            }
        };
        // Bound with std (no runtime entered here: `start` may be called from inside a tokio
        // runtime, whose thread must not block on another one), served on the relay's own.
        let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(io("bind the relay's port"))?;
        std_listener
            .set_nonblocking(true)
            .map_err(io("make the relay's port non-blocking"))?;
        let addr = std_listener
            .local_addr()
            .map_err(io("read the relay's port"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("start the relay's runtime"))?;
        let (state, rx) = watch::channel(State::Open);
        let connections = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&connections);
        let thread = std::thread::Builder::new()
            .name(format!("relay-{}", addr.port()))
            .spawn(move || {
                rt.block_on(async move {
                    match TcpListener::from_std(std_listener) {
                        Ok(listener) => accept_loop(listener, targets, rx, count).await,
                        Err(e) => eprintln!("relay: cannot serve its port: {e}"),
                    }
                })
            })
            .map_err(io("start the relay's thread"))?;
        Ok(TcpRelay {
            addr,
            state,
            connections,
            thread: Some(thread),
        })
    }

    /// The relay's address (127.0.0.1:port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The relay's address as an `https://` URL (for TLS clients whose server certificate
    /// names 127.0.0.1).
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Cuts the path: see [`Cut`].
    pub fn cut(&self, how: Cut) {
        self.state.send_replace(State::Cut(how));
    }

    /// Restores the path: new connections are forwarded again (blackholed connections that are
    /// still open resume).
    pub fn restore(&self) {
        self.state.send_replace(State::Open);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.state.send_replace(State::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    targets: Vec<SocketAddr>,
    mut state: watch::Receiver<State>,
    count: Arc<AtomicU64>,
) {
    let targets = Arc::new(targets);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((client, _)) = r else { continue };
                count.fetch_add(1, Ordering::Relaxed);
                if matches!(*state.borrow(), State::Cut(Cut::Reject)) {
                    drop(client);
                    continue;
                }
                tasks.spawn(relay(client, Arc::clone(&targets), state.clone()));
            }
            r = state.changed() => {
                if r.is_err() || *state.borrow() == State::Shutdown {
                    break;
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Forwards one connection until either side closes or the relay is cut (Reject) or shut
/// down; while blackholed no byte passes.
async fn relay(
    client: TcpStream,
    targets: Arc<Vec<SocketAddr>>,
    mut state: watch::Receiver<State>,
) {
    // Wait out a blackhole before connecting (the client's connect "hangs").
    while matches!(*state.borrow(), State::Cut(Cut::Blackhole)) {
        if state.changed().await.is_err() {
            return;
        }
    }
    let mut upstream = None;
    for t in targets.iter() {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(t)).await
        {
            upstream = Some(s);
            break;
        }
    }
    let Some(upstream) = upstream else { return };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = pump(&mut cr, &mut uw, state.clone());
    let down = pump(&mut ur, &mut cw, state.clone());
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = async {
            loop {
                if matches!(*state.borrow(), State::Cut(Cut::Reject) | State::Shutdown) {
                    return;
                }
                if state.changed().await.is_err() {
                    return;
                }
            }
        } => {}
    }
}

/// Copies bytes from `r` to `w`, pausing while the relay is blackholed.
async fn pump<R, W>(r: &mut R, w: &mut W, mut state: watch::Receiver<State>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while matches!(*state.borrow(), State::Cut(Cut::Blackhole)) {
            if state.changed().await.is_err() {
                return;
            }
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a blackhole are held until it ends, never delivered during it.
        while matches!(*state.borrow(), State::Cut(Cut::Blackhole)) {
            if state.changed().await.is_err() {
                return;
            }
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::io::{Read, Write};

    /// An echo server on loopback (std, one thread per connection), for the relay's own test.
    fn echo() -> SocketAddr {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let a = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().take(8) {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        a
    }

    fn roundtrip(s: &mut std::net::TcpStream) -> std::io::Result<Vec<u8>> {
        s.write_all(b"ping")?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b)?;
        Ok(b.to_vec())
    }

    #[tokio::test]
    async fn relay_starts_and_stops_inside_a_tokio_runtime() {
        // It used to block_on its own runtime in `start`: a panic ("Cannot start a runtime
        // from within a runtime") for every async test.
        let r = TcpRelay::start(vec![echo()]).unwrap();
        let mut c = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&b, b"ping");
        // Drop joins the relay's thread; do it off the runtime's worker.
        tokio::task::spawn_blocking(move || drop(r)).await.unwrap();
    }

    #[test]
    fn relay_forwards_cuts_blackholes_and_restores() {
        // The first target refuses connections: the relay skips it.
        let dead = {
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap()
        };
        let r = TcpRelay::start(vec![dead, echo()]).unwrap();
        let t = Some(Duration::from_millis(500));
        let mut c = std::net::TcpStream::connect(r.addr()).unwrap();
        c.set_read_timeout(t).unwrap();
        assert_eq!(roundtrip(&mut c).unwrap(), b"ping");

        r.cut(Cut::Blackhole);
        std::thread::sleep(Duration::from_millis(50));
        assert!(roundtrip(&mut c).is_err(), "a byte passed the blackhole");
        r.restore();
        // The echo held during the blackhole arrives after it.
        let mut b = [0u8; 4];
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");

        r.cut(Cut::Reject);
        std::thread::sleep(Duration::from_millis(50));
        let mut b = [0u8; 4];
        assert!(matches!(c.read(&mut b), Ok(0) | Err(_)), "still open");
        let mut c2 = std::net::TcpStream::connect(r.addr()).unwrap();
        c2.set_read_timeout(t).unwrap();
        assert!(
            roundtrip(&mut c2).is_err(),
            "a new connection passed the cut"
        );

        r.restore();
        let mut c3 = std::net::TcpStream::connect(r.addr()).unwrap();
        c3.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(roundtrip(&mut c3).unwrap(), b"ping");
        assert!(r.connections() >= 3);
    }
}
