//! A latency-injecting relay between a TPM client (the proxy's TCTI) and swtpm, for load runs
//! that simulate a hardware TPM's quote latency on swtpm (hostbind-loadgen
//! `--tpm-quote-latency-ms`).
//!
//! The protocol, as the tpm2-tss swtpm TCTI speaks it (`tcti-swtpm.c`): for every TPM command
//! the TCTI opens a TCP connection to the data port, writes the raw command (the TPM 2.0 command
//! header — tag u16, size u32, command code u32, all big-endian — and its body, `size` bytes in
//! all), reads the 10-byte response header, then `size - 10` more bytes, and closes the
//! connection. Locality and reset go over the control channel on the next port (one request
//! and one answer per connection), which the relay passes through byte for byte. (The
//! `TPM_SEND_COMMAND` / locality / length framing belongs to the Microsoft simulator's
//! `mssim` TCTI; swtpm's TCP data port takes raw commands.)
//!
//! The relay parses each command's header, forwards the command, reads the whole response and,
//! when the command was TPM2_Quote (command code 0x00000158), waits the configured latency
//! before answering; every other command passes straight through. It listens on 127.0.0.1 on
//! two adjacent ports (data, control), serves each connection on its own thread, and stops
//! when dropped.

use crate::TestkitError;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// TPM_CC_Quote.
pub const TPM_CC_QUOTE: u32 = 0x0000_0158;
/// Largest command or response the relay accepts (TPM 2.0 buffers are a few KiB).
const MAX_MESSAGE: usize = 64 * 1024;
/// How often the accept loops look at the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// A TPM that does not answer within this is treated as gone (the connection is closed).
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// What the relay has seen.
#[derive(Debug, Default)]
pub struct RelayCounts {
    /// TPM commands relayed (data port).
    pub commands: AtomicU64,
    /// TPM2_Quote commands among them, each answered after the latency.
    pub quotes: AtomicU64,
    /// Connections on the control port.
    pub control: AtomicU64,
}

/// A running relay; dropping it stops accepting (connections in progress finish).
#[derive(Debug)]
pub struct TpmRelay {
    port: u16,
    stop: Arc<AtomicBool>,
    counts: Arc<RelayCounts>,
    threads: Vec<JoinHandle<()>>,
}

impl TpmRelay {
    /// Starts a relay to the swtpm whose data port is `tpm_port` (control `tpm_port + 1`) that
    /// answers each TPM2_Quote `quote_latency` after swtpm did.
    pub fn start(tpm_port: u16, quote_latency: Duration) -> Result<TpmRelay, TestkitError> {
        let (data, ctrl) = listen_pair()?;
        let port = data
            .local_addr()
            .map_err(crate::io_err("read the relay's port"))?
            .port();
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(RelayCounts::default());
        let up = |p: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
        let (tpm_data, tpm_ctrl) = (up(tpm_port), up(tpm_port.saturating_add(1)));
        let mut threads = Vec::new();
        for (listener, control) in [(data, false), (ctrl, true)] {
            listener
                .set_nonblocking(true)
                .map_err(crate::io_err("make the relay's listener non-blocking"))?;
            let (halt, counts) = (stop.clone(), counts.clone());
            let spawned = std::thread::Builder::new()
                .name(format!(
                    "tpm-relay-{}",
                    if control { "ctrl" } else { "data" }
                ))
                .spawn(move || {
                    accept_loop(&listener, &halt, |client| {
                        let counts = counts.clone();
                        let _ = std::thread::Builder::new()
                            .name("tpm-relay-conn".into())
                            .spawn(move || {
                                let r = if control {
                                    counts.control.fetch_add(1, Ordering::Relaxed);
                                    pass_through(client, tpm_ctrl)
                                } else {
                                    relay_commands(client, tpm_data, quote_latency, &counts)
                                };
                                // A client or swtpm that went away mid-command: its own error.
                                let _ = r;
                            });
                    })
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(crate::io_err("start a relay thread")(e));
                }
            }
        }
        Ok(TpmRelay {
            port,
            stop,
            counts,
            threads,
        })
    }

    /// TCTI string for the relay: `swtpm:host=127.0.0.1,port=P`.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The relay's data port (control is `port() + 1`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// TPM commands relayed so far.
    pub fn commands(&self) -> u64 {
        self.counts.commands.load(Ordering::Relaxed)
    }

    /// TPM2_Quote commands relayed (and delayed) so far.
    pub fn quotes(&self) -> u64 {
        self.counts.quotes.load(Ordering::Relaxed)
    }

    /// Control-channel connections passed through so far.
    pub fn control_connections(&self) -> u64 {
        self.counts.control.load(Ordering::Relaxed)
    }
}

impl Drop for TpmRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Two listeners on adjacent ports of 127.0.0.1 (data, control).
fn listen_pair() -> Result<(TcpListener, TcpListener), TestkitError> {
    for _ in 0..64 {
        let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(crate::io_err("bind 127.0.0.1:0 for the TPM relay"))?;
        let port = first
            .local_addr()
            .map_err(crate::io_err("read the bound port"))?
            .port();
        if port == u16::MAX {
            continue;
        }
        if let Ok(second) = TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)) {
            return Ok((first, second));
        }
    }
    Err(TestkitError::Io {
        what: "find two adjacent free TCP ports on 127.0.0.1 for the TPM relay".into(),
        source: io::Error::new(io::ErrorKind::AddrInUse, "64 candidates taken"),
    })
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, mut serve: impl FnMut(TcpStream)) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => {
                if s.set_nonblocking(false).is_ok() {
                    serve(s);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            // EMFILE and the like: back off instead of spinning.
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn timeouts(s: &TcpStream) -> io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)
}

/// Reads one TPM command or response (10-byte header, then the rest of `size`); None at a
/// clean end of stream before a header.
fn read_message(s: &mut TcpStream) -> io::Result<Option<(u32, Vec<u8>)>> {
    let mut hdr = [0u8; 10];
    let mut got = 0;
    while got < hdr.len() {
        match s.read(&mut hdr[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let size = u32::from_be_bytes([hdr[2], hdr[3], hdr[4], hdr[5]]) as usize;
    if !(10..=MAX_MESSAGE).contains(&size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("TPM message size {size} is not in 10..={MAX_MESSAGE}"),
        ));
    }
    let code = u32::from_be_bytes([hdr[6], hdr[7], hdr[8], hdr[9]]);
    let mut msg = Vec::with_capacity(size);
    msg.extend_from_slice(&hdr);
    msg.resize(size, 0);
    s.read_exact(&mut msg[10..])?;
    Ok(Some((code, msg)))
}

/// Relays the commands of one client connection, one at a time, over one connection to swtpm.
fn relay_commands(
    mut client: TcpStream,
    tpm: SocketAddr,
    quote_latency: Duration,
    counts: &RelayCounts,
) -> io::Result<()> {
    timeouts(&client)?;
    let mut up: Option<TcpStream> = None;
    while let Some((code, cmd)) = read_message(&mut client)? {
        let u = match &mut up {
            Some(u) => u,
            None => {
                let u = TcpStream::connect_timeout(&tpm, Duration::from_secs(5))?;
                timeouts(&u)?;
                up.insert(u)
            }
        };
        counts.commands.fetch_add(1, Ordering::Relaxed);
        u.write_all(&cmd)?;
        let (_, resp) = read_message(u)?.ok_or(io::ErrorKind::UnexpectedEof)?;
        if code == TPM_CC_QUOTE {
            counts.quotes.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(quote_latency);
        }
        client.write_all(&resp)?;
    }
    if let Some(u) = up {
        let _ = u.shutdown(Shutdown::Both);
    }
    Ok(())
}

/// Copies bytes both ways between a control-channel client and swtpm's control port.
fn pass_through(client: TcpStream, to: SocketAddr) -> io::Result<()> {
    timeouts(&client)?;
    let up = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    timeouts(&up)?;
    let (mut c_in, mut u_out) = (client.try_clone()?, up.try_clone()?);
    let forward = std::thread::Builder::new()
        .name("tpm-relay-ctrl".into())
        .spawn(move || {
            let _ = io::copy(&mut c_in, &mut u_out);
            let _ = u_out.shutdown(Shutdown::Write);
        })?;
    let (mut u_in, mut c_out) = (up, client);
    let _ = io::copy(&mut u_in, &mut c_out);
    let _ = c_out.shutdown(Shutdown::Write);
    let _ = forward.join();
    Ok(())
}
