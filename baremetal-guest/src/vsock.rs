//! A virtio-vsock stream driver for one connection at a time, in which no wait on the device
//! can outlast its deadline.
//!
//! Built on virtio-drivers' queue API ([`VirtQueue`], [`OwningQueue`]) and transports, not on
//! its `VirtIOSocket`: that driver sends every packet with `VirtQueue::add_notify_wait_pop`,
//! which notifies the device once and then spins until the device returns the buffer, with no
//! deadline and no second notification. A notification the device's backend misses then hangs
//! the guest for good, and backends do miss them: vhost-user-backend before 0.24 (so
//! vhost-device-vsock 0.3, built on 0.20) drops a kick that arrives between QEMU's
//! `SET_VRING_KICK` and `SET_VRING_ENABLE` for the queue (rust-vmm/vhost#247, fixed by #374),
//! which is the moment this kernel sends its connection request right after setting
//! `DRIVER_OK` when the backend is slow to read its socket (a loaded host: QEMU 7.2 sends the
//! enable without waiting for a reply).
//!
//! Here every wait is bounded by a [`Deadline`] read from the guest's [`Clock`], and while it
//! waits the driver notifies the queue again, after 1 ms, then doubling up to every 100 ms
//! ([`RENOTIFY_FIRST_US`], [`RENOTIFY_MAX_US`]). Notifying again is always allowed by the virtio
//! spec (the device just looks at the ring again); it is how a lost kick is recovered. A transmit
//! buffer the device has not taken by the deadline is left to it (the driver is then
//! [`VsockError::Stalled`] for good and resets the device when dropped), so memory the device may
//! still read is never reused.

use alloc::boxed::Box;
use alloc::vec::Vec;

use virtio_drivers::device::common::Feature;
use virtio_drivers::device::socket::StreamShutdown;
pub use virtio_drivers::device::socket::VsockAddr;
use virtio_drivers::queue::{OwningQueue, VirtQueue};
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};
use virtio_drivers::{Error as VirtioError, Hal};

/// A monotonic clock in microseconds, for deadlines.
pub trait Clock {
    /// Microseconds since a fixed point.
    fn micros(&self) -> u64;
}

/// A point in time (of a [`Clock`]) by which a wait ends, with the budget it was made from (for
/// messages).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: u64,
    budget_us: u64,
}

impl Deadline {
    /// `budget_us` microseconds from now.
    pub fn after(clock: &impl Clock, budget_us: u64) -> Deadline {
        Deadline {
            at: clock.micros().saturating_add(budget_us),
            budget_us,
        }
    }

    /// The budget in milliseconds.
    pub fn budget_ms(&self) -> u64 {
        self.budget_us / 1000
    }

    fn passed(&self, now: u64) -> bool {
        now > self.at
    }
}

/// Descriptors per virtqueue.
pub const QUEUE_SIZE: usize = 8;
/// Size of each receive buffer (header included), and of the one transmit buffer.
pub const BUFFER_SIZE: usize = 4096;
/// The packet header (`struct virtio_vsock_hdr`).
pub const HEADER_LEN: usize = 44;
/// Most body bytes in one transmitted packet.
pub const MAX_TX_BODY: usize = BUFFER_SIZE - HEADER_LEN;
/// Bytes this driver buffers for the connection (the credit it gives the peer): one largest
/// hostbind frame (length prefix + 64 KiB body).
pub const RX_CAPACITY: u32 = 4 + hostbind_attest::wire::MAX_FRAME_BODY as u32;
/// First notification again after this long without progress.
pub const RENOTIFY_FIRST_US: u64 = 1_000;
/// Interval between notifications again, at most.
pub const RENOTIFY_MAX_US: u64 = 100_000;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVENT_QUEUE: u16 = 2;

/// Packet operations (virtio spec 5.10.6).
mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}
const TYPE_STREAM: u16 = 1;

/// Why the device or the connection failed.
#[derive(Debug)]
pub enum VsockError {
    /// Setting up the device or a queue failed.
    Device(VirtioError),
    /// The device did not take a packet off the transmit queue by the deadline although it was
    /// notified again and again: its backend is not processing the queue.
    Stalled {
        /// What the packet was.
        what: &'static str,
        /// How long the driver waited, ms.
        waited_ms: u64,
        /// How many times it notified the queue.
        notifications: u32,
    },
    /// An earlier packet was never taken by the device; the driver does not use it again.
    Wedged,
    /// The peer did not send what was waited for by the deadline.
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// The time budget of the step it was waited for in, ms.
        waited_ms: u64,
    },
    /// The peer refused the connection (reset in answer to the request).
    Refused,
    /// The peer closed or reset the connection.
    Closed,
    /// No connection was made, or it was given up.
    NotConnected,
    /// The device or the peer broke the protocol.
    Protocol(&'static str),
}

impl core::fmt::Display for VsockError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VsockError::Device(e) => write!(f, "virtio-vsock device error: {e}"),
            VsockError::Stalled {
                what,
                waited_ms,
                notifications,
            } => write!(
                f,
                "the virtio-vsock device did not take the {what} packet within {waited_ms} ms \
                 ({notifications} notifications): its backend is not processing the transmit \
                 queue; check the VM's vsock backend (vhost-vsock / vhost-device-vsock) and \
                 restart the VM"
            ),
            VsockError::Wedged => f.write_str(
                "the virtio-vsock device still holds an earlier packet it never took; restart \
                 the VM",
            ),
            VsockError::Timeout { what, waited_ms } => {
                write!(f, "no {what} from the host within {waited_ms} ms")
            }
            VsockError::Refused => f.write_str("the host refused the vsock connection"),
            VsockError::Closed => f.write_str("the host closed the vsock connection"),
            VsockError::NotConnected => f.write_str("no vsock connection"),
            VsockError::Protocol(what) => write!(f, "vsock protocol error: {what}"),
        }
    }
}

impl From<VirtioError> for VsockError {
    fn from(e: VirtioError) -> Self {
        VsockError::Device(e)
    }
}

/// A packet header (`struct virtio_vsock_hdr`, little-endian, packed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Header {
    fn write(&self, out: &mut [u8; HEADER_LEN]) {
        out[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        out[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        out[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        out[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        out[24..28].copy_from_slice(&self.len.to_le_bytes());
        out[28..30].copy_from_slice(&self.kind.to_le_bytes());
        out[30..32].copy_from_slice(&self.op.to_le_bytes());
        out[32..36].copy_from_slice(&self.flags.to_le_bytes());
        out[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        out[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
    }

    fn read(b: &[u8]) -> Option<Header> {
        let b: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Connected,
    /// Reset in answer to the request.
    Refused,
    Closed,
}

/// The one connection.
#[derive(Debug)]
struct Conn {
    peer: VsockAddr,
    local_port: u32,
    state: State,
    /// Received, not yet handed to the caller.
    rx: Vec<u8>,
    /// Bytes handed to the caller (what the peer may reuse of the credit it was given).
    fwd_cnt: u32,
    /// The `fwd_cnt` the peer last heard of.
    reported_fwd_cnt: u32,
    /// Body bytes sent.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    credit_requested: bool,
}

impl Conn {
    /// Body bytes the peer has room for.
    fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn is(&self, h: &Header, guest_cid: u64) -> bool {
        h.src_cid == self.peer.cid
            && h.src_port == self.peer.port
            && h.dst_cid == guest_cid
            && h.dst_port == self.local_port
    }
}

/// Counters of one driver's notifications.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Notifications {
    /// Notifications of the transmit queue, all told.
    pub tx: u32,
    /// Of those, the ones sent again because the device had not taken a packet yet.
    pub tx_again: u32,
    /// Notifications of the receive queue sent again while waiting for the peer.
    pub rx_again: u32,
}

/// Replies owed to peers, sent before this driver's next packet of its own.
#[derive(Debug, Default)]
struct Owed {
    credit_update: bool,
    /// Resets for packets that belong to no connection (at most [`QUEUE_SIZE`] kept).
    resets: Vec<Header>,
}

/// Notifies a queue again with a growing interval while a wait goes on.
#[derive(Debug)]
struct Backoff {
    next: u64,
    interval: u64,
}

impl Backoff {
    fn new(now: u64) -> Backoff {
        Backoff {
            next: now.saturating_add(RENOTIFY_FIRST_US),
            interval: RENOTIFY_FIRST_US,
        }
    }

    /// Whether to notify now.
    fn due(&mut self, now: u64) -> bool {
        if now < self.next {
            return false;
        }
        self.interval = (self.interval * 2).min(RENOTIFY_MAX_US);
        self.next = now.saturating_add(self.interval);
        true
    }
}

/// A virtio-vsock device driven for one stream connection.
pub struct Vsock<'c, H: Hal, T: Transport, C: Clock> {
    transport: T,
    rx: OwningQueue<H, QUEUE_SIZE, BUFFER_SIZE>,
    tx: VirtQueue<H, QUEUE_SIZE>,
    /// Set up because the device has it; this driver posts no event buffers (it does not follow
    /// transport resets, which only live migration sends).
    _events: VirtQueue<H, QUEUE_SIZE>,
    /// The transmit buffer (header + body), readable by the device while a packet is out.
    tx_buf: Box<[u8; BUFFER_SIZE]>,
    clock: &'c C,
    guest_cid: u64,
    conn: Option<Conn>,
    owed: Owed,
    /// A packet the device never took is still on the transmit queue.
    wedged: bool,
    notified: Notifications,
}

impl<'c, H: Hal, T: Transport, C: Clock> Vsock<'c, H, T, C> {
    /// Initialises the device behind `transport` (VERSION_1 only: no event index, no indirect
    /// descriptors) and posts the receive buffers.
    pub fn new(mut transport: T, clock: &'c C) -> Result<Self, VsockError> {
        if transport.device_type() != DeviceType::Socket {
            return Err(VsockError::Protocol(
                "the device is not a virtio-vsock device",
            ));
        }
        let _features = transport.begin_init(Feature::VERSION_1);
        let guest_cid = transport.read_consistent(|| {
            let low: u32 = transport.read_config_space(0)?;
            let high: u32 = transport.read_config_space(4)?;
            Ok(u64::from(low) | (u64::from(high) << 32))
        })?;
        let rx = VirtQueue::new(&mut transport, RX_QUEUE, false, false)?;
        let tx = VirtQueue::new(&mut transport, TX_QUEUE, false, false)?;
        let events = VirtQueue::new(&mut transport, EVENT_QUEUE, false, false)?;
        let rx = OwningQueue::new(rx)?;
        transport.finish_init();
        // Receive buffers are waiting; if this kick is lost, waits notify again.
        transport.notify(RX_QUEUE);
        Ok(Vsock {
            transport,
            rx,
            tx,
            _events: events,
            tx_buf: Box::new([0u8; BUFFER_SIZE]),
            clock,
            guest_cid,
            conn: None,
            owed: Owed::default(),
            wedged: false,
            notified: Notifications::default(),
        })
    }

    /// The CID the device gives this guest.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// How often the queues were notified (and notified again) so far.
    pub fn notifications(&self) -> Notifications {
        self.notified
    }

    /// A deadline `budget_us` from now on this driver's clock.
    pub fn deadline(&self, budget_us: u64) -> Deadline {
        Deadline::after(self.clock, budget_us)
    }

    /// Whether `deadline` has passed.
    pub fn expired(&self, deadline: Deadline) -> bool {
        deadline.passed(self.clock.micros())
    }

    /// Connects from `local_port` to `peer` and waits until the peer accepts, by `deadline`.
    /// Replaces any earlier connection (which should be shut down first).
    pub fn connect(
        &mut self,
        peer: VsockAddr,
        local_port: u32,
        deadline: Deadline,
    ) -> Result<(), VsockError> {
        self.conn = Some(Conn {
            peer,
            local_port,
            state: State::Connecting,
            rx: Vec::new(),
            fwd_cnt: 0,
            reported_fwd_cnt: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
        });
        self.send_control(op::REQUEST, 0, "connection request", deadline)?;
        self.wait_rx("connection", deadline, |c| c.state != State::Connecting)?;
        match self.conn_ref()?.state {
            State::Connected => Ok(()),
            State::Refused => Err(VsockError::Refused),
            _ => Err(VsockError::Closed),
        }
    }

    /// Sends all of `data`, waiting for the peer's credit when its buffer is full.
    pub fn send(&mut self, data: &[u8], deadline: Deadline) -> Result<(), VsockError> {
        let mut rest = data;
        while !rest.is_empty() {
            self.flush_owed(deadline)?;
            let conn = self.connected()?;
            let free = conn.peer_free() as usize;
            if free == 0 {
                if !conn.credit_requested {
                    conn.credit_requested = true;
                    self.send_control(op::CREDIT_REQUEST, 0, "credit request", deadline)?;
                }
                self.wait_rx("credit", deadline, |c| {
                    c.peer_free() > 0 || c.state != State::Connected
                })?;
                continue;
            }
            let n = free.min(MAX_TX_BODY).min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            self.transmit(op::RW, 0, chunk, "data", deadline)?;
            rest = tail;
        }
        Ok(())
    }

    /// Waits until the peer sent something (what is waited for is named `what` in a timeout)
    /// and appends all of it that has arrived to `out`; returns how many bytes.
    pub fn recv(
        &mut self,
        out: &mut Vec<u8>,
        what: &'static str,
        deadline: Deadline,
    ) -> Result<usize, VsockError> {
        self.wait_rx(what, deadline, |c| {
            !c.rx.is_empty() || c.state != State::Connected
        })?;
        let conn = self.conn_mut()?;
        let n = conn.rx.len();
        if n == 0 {
            return Err(VsockError::Closed);
        }
        out.append(&mut conn.rx);
        conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
        // Tell the peer about the room made once it is half of what it was given.
        if conn.fwd_cnt.wrapping_sub(conn.reported_fwd_cnt) >= RX_CAPACITY / 2 {
            self.owed.credit_update = true;
        }
        Ok(n)
    }

    /// Closes the connection (SHUTDOWN, not waiting for the peer's reset).
    pub fn shutdown(&mut self, deadline: Deadline) -> Result<(), VsockError> {
        let open = self
            .conn
            .as_ref()
            .is_some_and(|c| c.state == State::Connected);
        let result = if open {
            self.send_control(
                op::SHUTDOWN,
                StreamShutdown::all().bits(),
                "shutdown",
                deadline,
            )
        } else {
            Ok(())
        };
        self.conn = None;
        result
    }

    fn conn_ref(&self) -> Result<&Conn, VsockError> {
        self.conn.as_ref().ok_or(VsockError::NotConnected)
    }

    fn conn_mut(&mut self) -> Result<&mut Conn, VsockError> {
        self.conn.as_mut().ok_or(VsockError::NotConnected)
    }

    fn connected(&mut self) -> Result<&mut Conn, VsockError> {
        let conn = self.conn_mut()?;
        match conn.state {
            State::Connected => Ok(conn),
            State::Connecting => Err(VsockError::NotConnected),
            State::Refused | State::Closed => Err(VsockError::Closed),
        }
    }

    /// Sends a packet without body on the connection.
    fn send_control(
        &mut self,
        op: u16,
        flags: u32,
        what: &'static str,
        deadline: Deadline,
    ) -> Result<(), VsockError> {
        self.transmit(op, flags, &[], what, deadline)
    }

    /// Sends one packet on the connection (with its credit fields) and waits for the device to
    /// take it.
    fn transmit(
        &mut self,
        op: u16,
        flags: u32,
        body: &[u8],
        what: &'static str,
        deadline: Deadline,
    ) -> Result<(), VsockError> {
        let guest_cid = self.guest_cid;
        let conn = self.conn_mut()?;
        let len = u32::try_from(body.len()).map_err(|_| VsockError::Protocol("body too long"))?;
        let header = Header {
            src_cid: guest_cid,
            dst_cid: conn.peer.cid,
            src_port: conn.local_port,
            dst_port: conn.peer.port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: RX_CAPACITY,
            fwd_cnt: conn.fwd_cnt,
        };
        conn.reported_fwd_cnt = conn.fwd_cnt;
        if op == op::RW {
            conn.tx_cnt = conn.tx_cnt.wrapping_add(len);
        }
        self.put(&header, body, what, deadline)
    }

    /// Puts one packet on the transmit queue, notifies the device and waits until it has taken
    /// the packet, notifying it again while it has not; meanwhile receives what arrives.
    fn put(
        &mut self,
        header: &Header,
        body: &[u8],
        what: &'static str,
        deadline: Deadline,
    ) -> Result<(), VsockError> {
        if self.wedged {
            return Err(VsockError::Wedged);
        }
        let len = HEADER_LEN + body.len();
        if body.len() > MAX_TX_BODY {
            return Err(VsockError::Protocol(
                "packet body larger than the transmit buffer",
            ));
        }
        let mut head = [0u8; HEADER_LEN];
        header.write(&mut head);
        self.tx_buf[..HEADER_LEN].copy_from_slice(&head);
        self.tx_buf[HEADER_LEN..len].copy_from_slice(body);
        let inputs: [&[u8]; 1] = [&self.tx_buf[..len]];
        // SAFETY: `tx_buf` is owned by this driver and is not written again until the token is
        // popped below; if the device never returns it, `wedged` keeps it untouched until drop,
        // which resets the device before the buffer is freed.
        let token = unsafe { self.tx.add(&inputs, &mut []) }?;
        let start = self.clock.micros();
        let mut sent = 0u32;
        if self.tx.should_notify() {
            self.transport.notify(TX_QUEUE);
            sent += 1;
        }
        let mut again = Backoff::new(start);
        let mut rx_error = None;
        while !self.tx.can_pop() {
            let now = self.clock.micros();
            if deadline.passed(now) {
                self.wedged = true;
                self.notified.tx += sent;
                return Err(VsockError::Stalled {
                    what,
                    waited_ms: now.saturating_sub(start) / 1000,
                    notifications: sent,
                });
            }
            if again.due(now) {
                // Whatever the device said about notifications: it has not taken the packet.
                self.transport.notify(TX_QUEUE);
                sent += 1;
                self.notified.tx_again += 1;
            }
            // A device may want receive buffers back before it goes on. A bad packet is
            // reported once the device has given the transmit buffer back.
            if rx_error.is_none() {
                rx_error = self.poll_rx().err();
            }
            core::hint::spin_loop();
        }
        self.notified.tx += sent;
        let inputs: [&[u8]; 1] = [&self.tx_buf[..len]];
        // SAFETY: the same buffer as given to `add` for this token.
        if let Err(e) = unsafe { self.tx.pop_used(token, &inputs, &mut []) } {
            // The device gave back something else: the buffer's fate is unknown.
            self.wedged = true;
            return Err(e.into());
        }
        rx_error.map_or(Ok(()), Err)
    }

    /// Sends the replies owed to peers (credit updates, resets).
    fn flush_owed(&mut self, deadline: Deadline) -> Result<(), VsockError> {
        while let Some(h) = self.owed.resets.pop() {
            self.put(&h, &[], "reset", deadline)?;
        }
        if core::mem::take(&mut self.owed.credit_update)
            && self
                .conn
                .as_ref()
                .is_some_and(|c| c.state == State::Connected)
        {
            self.send_control(op::CREDIT_UPDATE, 0, "credit update", deadline)?;
        }
        Ok(())
    }

    /// Receives until `done` holds for the connection or the deadline passes, sending owed
    /// replies and notifying the receive queue again while nothing comes.
    fn wait_rx(
        &mut self,
        what: &'static str,
        deadline: Deadline,
        done: impl Fn(&Conn) -> bool,
    ) -> Result<(), VsockError> {
        let start = self.clock.micros();
        let mut again = Backoff::new(start);
        loop {
            self.flush_owed(deadline)?;
            // A bounded batch, so that a peer that never stops sending cannot hold the guest.
            for _ in 0..QUEUE_SIZE {
                if !self.poll_rx()? {
                    break;
                }
            }
            if done(self.conn_ref()?) {
                return Ok(());
            }
            let now = self.clock.micros();
            if deadline.passed(now) {
                // The step's budget: part of it may have gone to sending before this wait.
                return Err(VsockError::Timeout {
                    what,
                    waited_ms: deadline.budget_ms(),
                });
            }
            if again.due(now) {
                self.transport.notify(RX_QUEUE);
                self.notified.rx_again += 1;
            }
            core::hint::spin_loop();
        }
    }

    /// Takes one packet off the receive queue, if there is one, and handles it.
    fn poll_rx(&mut self) -> Result<bool, VsockError> {
        let guest_cid = self.guest_cid;
        let conn = &mut self.conn;
        let got = self.rx.poll(&mut self.transport, |buffer| {
            let Some(h) = Header::read(buffer) else {
                return Ok(Some(Err(VsockError::Protocol(
                    "the device returned a packet shorter than its header",
                ))));
            };
            let body = buffer
                .get(HEADER_LEN..HEADER_LEN.saturating_add(h.len as usize))
                .unwrap_or(&[]);
            if body.len() != h.len as usize {
                return Ok(Some(Err(VsockError::Protocol(
                    "the device returned a packet shorter than its length field",
                ))));
            }
            if h.op == op::RW {
                if let Some(c) = conn.as_mut() {
                    if c.is(&h, guest_cid) && c.state == State::Connected {
                        if c.rx.len() + body.len() > RX_CAPACITY as usize {
                            return Ok(Some(Err(VsockError::Protocol(
                                "the host sent more data than the credit it was given",
                            ))));
                        }
                        c.rx.extend_from_slice(body);
                    }
                }
            }
            Ok(Some(Ok(h)))
        })?;
        match got {
            None => Ok(false),
            Some(Err(e)) => Err(e),
            Some(Ok(h)) => {
                self.handle(&h);
                Ok(true)
            }
        }
    }

    /// What a received packet does to the connection.
    fn handle(&mut self, h: &Header) {
        let guest_cid = self.guest_cid;
        let ours = self.conn.as_ref().is_some_and(|c| c.is(h, guest_cid));
        if !ours {
            // Nothing listens here: reset whatever it is (but never answer a reset).
            if h.op != op::RST && h.dst_cid == guest_cid && self.owed.resets.len() < QUEUE_SIZE {
                self.owed.resets.push(Header {
                    src_cid: guest_cid,
                    dst_cid: h.src_cid,
                    src_port: h.dst_port,
                    dst_port: h.src_port,
                    kind: TYPE_STREAM,
                    op: op::RST,
                    ..Header::default()
                });
            }
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            op::RESPONSE if conn.state == State::Connecting => conn.state = State::Connected,
            op::RST if conn.state == State::Connecting => conn.state = State::Refused,
            op::RST | op::SHUTDOWN => conn.state = State::Closed,
            op::CREDIT_UPDATE => conn.credit_requested = false,
            op::CREDIT_REQUEST => self.owed.credit_update = true,
            _ => {}
        }
    }
}

impl<H: Hal, T: Transport, C: Clock> Drop for Vsock<'_, H, T, C> {
    fn drop(&mut self) {
        // Reset the device first, so it stops using the queues and buffers freed after this.
        self.transport.set_status(DeviceStatus::empty());
        for q in [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] {
            self.transport.queue_unset(q);
        }
    }
}
