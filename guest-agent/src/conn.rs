//! The connection manager: one task that keeps ONE connection to the host proxy, runs Hello on
//! every (re)connect, pipelines requests by id and dispatches pushed events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hostbind_attest::wire::FrameCodec;
use hostbind_attest::wire::{
    Body, ErrorBody, Event, EventKind as WireEventKind, Hello, HelloAck, Message, Ping, VmIdentity,
};
use hostbind_client::api::{self, EventKind, LossReason};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;

use crate::agent::{store_last_host, unix_now, HostId, Session, Shared, AGENT_VERSION};
use crate::backoff::Backoff;
use crate::transport::BoxedStream;

/// Id of the Hello request on every connection; later requests count up from here.
const HELLO_ID: u64 = 1;
/// Most requests written before one flush.
const MAX_BATCH: usize = 64;

/// A request for the proxy, queued to the connection task.
pub(crate) struct Outgoing {
    pub body: Body,
    pub reply: oneshot::Sender<Result<Reply, CallError>>,
}

/// A successful answer and the session it came from.
#[derive(Debug)]
pub(crate) struct Reply {
    pub body: Body,
    pub host_id: HostId,
    pub vm: VmIdentity,
    #[allow(dead_code)]
    pub generation: u64,
}

/// Why a request to the proxy failed.
#[derive(Debug, Clone)]
pub(crate) enum CallError {
    /// No session right now (message says what to check).
    NotConnected(String),
    /// The session ended before the answer came.
    Lost(String),
    /// The proxy did not answer in time (the session is dropped and re-established).
    TimedOut(String),
    /// The proxy answered with an error.
    Refused(ErrorBody),
    /// The proxy answered with something that is not an answer to this request.
    Unexpected(String),
    /// The proxy answered with a token that had already expired by this VM's clock.
    Expired(String),
}

impl CallError {
    /// The local API error for this failure.
    pub fn to_api(&self) -> api::ApiError {
        match self {
            CallError::NotConnected(m) => api::ApiError {
                code: api::ErrorCode::NotConnected,
                message: m.clone(),
            },
            CallError::TimedOut(m) => api::ApiError {
                code: api::ErrorCode::Timeout,
                message: format!("{m}; the agent is reconnecting, retry in a moment"),
            },
            CallError::Lost(m) => api::ApiError {
                code: api::ErrorCode::NotConnected,
                message: format!(
                    "the connection to the host proxy was lost before it answered ({m}); retry \
                     in a moment, the agent is reconnecting"
                ),
            },
            CallError::Refused(e) => api::ApiError {
                code: e.code.into(),
                message: e.message.clone(),
            },
            CallError::Expired(m) => api::ApiError {
                code: api::ErrorCode::TokenExpired,
                message: m.clone(),
            },
            CallError::Unexpected(m) => api::ApiError {
                code: api::ErrorCode::UnexpectedMessage,
                message: format!(
                    "the host proxy answered unexpectedly ({m}); agent and proxy versions may not \
                     match"
                ),
            },
        }
    }
}

/// Runs the connection manager until shutdown.
pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Outgoing>) {
    let timing = shared.cfg.timing.clone();
    let mut backoff = Backoff::new(timing.backoff_min, timing.backoff_max);
    let mut shutdown = shared.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            return;
        }
        // Connect and Hello, answering queued requests with "not connected" meanwhile.
        let attempt = connect_and_hello(&shared);
        tokio::pin!(attempt);
        let result = loop {
            tokio::select! {
                r = &mut attempt => break r,
                o = rx.recv() => match o {
                    Some(o) => reject(o, &shared),
                    None => return,
                },
                _ = shutdown.changed() => return,
            }
        };
        match result {
            Ok((framed, ack)) => {
                backoff.reset();
                let (generation, old_host) = on_connected(&shared, &ack);
                tokio::spawn(crate::leases::resync(shared.clone(), generation, old_host));
                let reason = serve(&shared, framed, &mut rx, generation).await;
                let Some(reason) = reason else { return };
                on_disconnected(&shared, &reason);
            }
            Err(Failed {
                reason,
                no_transport,
            }) => {
                tracing::debug!("connection attempt failed: {reason}");
                shared.lock().last_error = Some(reason);
                if no_transport {
                    // No vsock device at all (e.g. unplugged for a migration): the attempt never
                    // reached a host, so retry soon instead of backing off, to catch the device
                    // coming back.
                    backoff.reset();
                }
            }
        }
        // Wait before the next attempt; still answer requests meanwhile.
        let delay = backoff.next_delay();
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                o = rx.recv() => match o {
                    Some(o) => reject(o, &shared),
                    None => return,
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Answers a request that arrived without a session.
fn reject(o: Outgoing, shared: &Shared) {
    let _ = o.reply.send(Err(shared.not_connected()));
}

type Conn = Framed<BoxedStream, FrameCodec<Body>>;

/// Why a connection attempt failed.
struct Failed {
    /// For people.
    reason: String,
    /// The guest has no transport to the host right now (vsock `ENODEV`: no vsock device).
    no_transport: bool,
}

impl From<String> for Failed {
    fn from(reason: String) -> Failed {
        Failed {
            reason,
            no_transport: false,
        }
    }
}

/// Opens the transport and runs Hello; returns the framed connection and the proxy's answer.
async fn connect_and_hello(shared: &Shared) -> Result<(Conn, HelloAck), Failed> {
    let host = &shared.cfg.host;
    let timeout = shared.cfg.timing.hello_timeout;
    let stream = match tokio::time::timeout(timeout, host.connect()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(Failed {
                reason: format!("cannot connect to {host}: {e}"),
                no_transport: e.raw_os_error() == Some(libc::ENODEV),
            })
        }
        Err(_) => {
            return Err(format!("connecting to {host} took longer than {timeout:?}").into());
        }
    };
    let work = async {
        let mut framed = Framed::new(stream, FrameCodec::<Body>::new());
        let known_host = shared.lock().last_host.map(|h| ByteBuf::from(h.to_vec()));
        let hello = Hello {
            agent_version: AGENT_VERSION.to_string(),
            chain: shared.chain.next_suffix(),
            facts: shared.cfg.facts.clone(),
            known_host,
        };
        framed
            .send(Message::new(HELLO_ID, Body::Hello(hello)))
            .await
            .map_err(|e| format!("cannot send Hello to {host}: {e}"))?;
        loop {
            let msg = match framed.next().await {
                None => {
                    return Err(format!(
                        "the host proxy at {host} closed the connection during Hello"
                    ))
                }
                Some(Err(e)) => return Err(format!("Hello with {host} failed: {e}")),
                Some(Ok(m)) => m,
            };
            match (msg.id, msg.body) {
                (HELLO_ID, Body::HelloAck(ack)) => return Ok((framed, ack)),
                (_, Body::Error(e)) => {
                    return Err(format!(
                        "the host proxy refused the session ({}): {}",
                        api::ErrorCode::from(e.code),
                        e.message
                    ))
                }
                (0, Body::Event(ev)) => on_proxy_event(shared, ev),
                (id, body) => {
                    return Err(format!(
                        "the host proxy answered Hello with '{}' (id {id}); agent and proxy \
                         versions may not match",
                        body.kind()
                    ))
                }
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r.map_err(Failed::from),
        Err(_) => Err(format!(
            "the host proxy at {host} did not complete Hello within {timeout:?}"
        )
        .into()),
    }
}

/// Records a new session; returns its generation and the host of the session before.
fn on_connected(shared: &Shared, ack: &HelloAck) -> (u64, Option<HostId>) {
    let mut host_id: HostId = [0; 32];
    // HelloAck::validate checked the length; copy defensively anyway.
    let n = ack.host_id.len().min(host_id.len());
    host_id[..n].copy_from_slice(&ack.host_id[..n]);
    let (generation, old_host, changed) = {
        let mut st = shared.lock();
        st.generation += 1;
        let generation = st.generation;
        let old_host = st.last_host.replace(host_id);
        let changed = old_host != Some(host_id);
        if changed {
            // Tokens bound to another host are dropped at once; resync re-acquires the leases.
            for lease in st.leases.values_mut() {
                if lease.host_id != host_id {
                    lease.cached = None;
                }
            }
        }
        st.session = Some(Session {
            host_id,
            vm: ack.vm.clone(),
            proxy_version: ack.proxy_version.clone(),
            lease_ttl_secs: ack.lease_ttl_secs,
            idle_timeout_secs: ack.idle_timeout_secs,
            since: unix_now(),
            generation,
            lease_query: ack.lease_query,
        });
        st.last_error = None;
        (generation, old_host, changed)
    };
    if changed {
        store_last_host(&shared.last_host_path(), &host_id);
    }
    tracing::info!(
        host = %hex::encode(host_id),
        vm = %ack.vm.name,
        proxy = %ack.proxy_version,
        ttl = ack.lease_ttl_secs,
        "session with the host proxy started"
    );
    shared.emit(EventKind::Connected {
        host_id: hex::encode(host_id),
        vm: api::VmInfo::from(&ack.vm),
    });
    (generation, old_host)
}

/// Records the end of a session.
fn on_disconnected(shared: &Shared, reason: &str) {
    {
        let mut st = shared.lock();
        st.session = None;
        st.last_error = Some(reason.to_string());
    }
    tracing::warn!("session with the host proxy ended: {reason}; reconnecting");
    shared.emit(EventKind::Disconnected {
        message: reason.to_string(),
    });
}

/// A request waiting for its answer.
struct Pending {
    reply: oneshot::Sender<Result<Reply, CallError>>,
    sent: Instant,
}

/// Serves one session until it ends; returns why, or `None` on shutdown.
async fn serve(
    shared: &Shared,
    mut framed: Conn,
    rx: &mut mpsc::Receiver<Outgoing>,
    generation: u64,
) -> Option<String> {
    let (host_id, vm, idle) = match shared.lock().session.as_ref() {
        Some(s) => (s.host_id, s.vm.clone(), s.idle_timeout_secs),
        None => return Some("session vanished".into()),
    };
    // A proxy that closes quiet connections gets a ping at a third of its idle timeout when
    // nothing else was sent; its answer also shows the connection is alive.
    let keepalive = idle.map(|s| Duration::from_secs(u64::from(s.max(3)) / 3));
    let mut last_sent = Instant::now();
    let mut _ping: Option<oneshot::Receiver<Result<Reply, CallError>>> = None;
    let timeout = shared.cfg.timing.request_timeout;
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut next_id = HELLO_ID + 1;
    // Also how often a reset connection is looked for (see `transport::socket_failed`).
    let mut tick = tokio::time::interval(Duration::from_millis(100).min(timeout));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = shared.shutdown.clone();
    let reason = loop {
        tokio::select! {
            _ = shutdown.changed() => {
                fail_all(&mut pending, "the agent is shutting down");
                return None;
            }
            frame = framed.next() => match frame {
                None => break "the host proxy closed the connection".to_string(),
                Some(Err(e)) => break format!("reading from the host proxy failed: {e}"),
                Some(Ok(msg)) => {
                    if let Err(reason) = dispatch(shared, msg, &mut pending, host_id, &vm, generation) {
                        break reason;
                    }
                }
            },
            o = rx.recv() => {
                let Some(first) = o else {
                    fail_all(&mut pending, "the agent is shutting down");
                    return None;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(o) => batch.push(o),
                        Err(_) => break,
                    }
                }
                let mut failed = None;
                for o in batch {
                    if o.reply.is_closed() {
                        continue;
                    }
                    let id = next_id;
                    next_id += 1;
                    tracing::debug!(id, kind = o.body.kind(), "request to the host proxy");
                    let mut body = o.body;
                    shared.chain.stamp(&mut body);
                    match framed.feed(Message::new(id, body)).await {
                        Ok(()) => {
                            pending.insert(id, Pending { reply: o.reply, sent: Instant::now() });
                        }
                        Err(hostbind_attest::wire::WireError::Io(e)) => {
                            let _ = o.reply.send(Err(CallError::Lost(e.to_string())));
                            failed = Some(format!("writing to the host proxy failed: {e}"));
                            break;
                        }
                        // An encoding problem concerns this request only.
                        Err(e) => {
                            let _ = o.reply.send(Err(CallError::Unexpected(e.to_string())));
                        }
                    }
                }
                if failed.is_none() {
                    if let Err(e) = framed.flush().await {
                        failed = Some(format!("writing to the host proxy failed: {e}"));
                    }
                }
                last_sent = Instant::now();
                if let Some(reason) = failed {
                    break reason;
                }
            }
            _ = tick.tick() => {
                if crate::transport::socket_failed(framed.get_ref().as_raw_fd()) {
                    break "the connection to the host proxy was reset (vsock transport reset, \
                           e.g. after a live migration)"
                        .to_string();
                }
                if keepalive.is_some_and(|k| last_sent.elapsed() >= k) {
                    let id = next_id;
                    next_id += 1;
                    let (tx, rx) = oneshot::channel();
                    if let Err(e) = framed.send(Message::new(id, Body::Ping(Ping {}))).await {
                        break format!("writing to the host proxy failed: {e}");
                    }
                    tracing::debug!(id, "ping to the host proxy");
                    pending.insert(id, Pending { reply: tx, sent: Instant::now() });
                    _ping = Some(rx);
                    last_sent = Instant::now();
                }
                pending.retain(|_, p| !p.reply.is_closed());
                if pending.values().any(|p| p.sent.elapsed() > timeout) {
                    let reason = format!("the host proxy did not answer within {timeout:?}");
                    for (_, p) in pending.drain() {
                        let _ = p.reply.send(Err(CallError::TimedOut(reason.clone())));
                    }
                    break reason;
                }
            }
        }
    };
    fail_all(&mut pending, &reason);
    Some(reason)
}

/// Fails every waiting request with `reason`.
fn fail_all(pending: &mut HashMap<u64, Pending>, reason: &str) {
    for (_, p) in pending.drain() {
        let _ = p.reply.send(Err(CallError::Lost(reason.to_string())));
    }
}

/// Handles one message from the proxy; `Err` ends the session.
fn dispatch(
    shared: &Shared,
    msg: Message<Body>,
    pending: &mut HashMap<u64, Pending>,
    host_id: HostId,
    vm: &VmIdentity,
    generation: u64,
) -> Result<(), String> {
    if msg.id == 0 {
        return match msg.body {
            Body::Event(ev) => {
                on_proxy_event(shared, ev);
                Ok(())
            }
            Body::Error(e) => Err(format!(
                "the host proxy ended the session ({}): {}",
                api::ErrorCode::from(e.code),
                e.message
            )),
            other => {
                tracing::warn!(
                    kind = other.kind(),
                    "ignoring an unexpected message with id 0"
                );
                Ok(())
            }
        };
    }
    let Some(p) = pending.remove(&msg.id) else {
        match msg.body {
            Body::Error(e) => tracing::warn!(
                id = msg.id,
                "the host proxy reported an error for no waiting request: {}",
                e.message
            ),
            other => tracing::warn!(
                id = msg.id,
                kind = other.kind(),
                "ignoring an answer to no waiting request"
            ),
        }
        return Ok(());
    };
    let result = match msg.body {
        Body::Error(e) => Err(CallError::Refused(e)),
        body => Ok(Reply {
            body,
            host_id,
            vm: vm.clone(),
            generation,
        }),
    };
    let _ = p.reply.send(result);
    Ok(())
}

/// Turns an event pushed by the proxy into lease bookkeeping and an app event.
pub(crate) fn on_proxy_event(shared: &Shared, ev: Event) {
    let kind = serde_json::to_value(ev.kind).ok();
    tracing::info!(
        kind = kind.as_ref().and_then(|k| k.as_str()),
        lease = ev.lease_id.as_deref(),
        "event from the host proxy: {}",
        ev.message
    );
    if ev.kind == WireEventKind::CloneDetected {
        shared.emit(EventKind::CloneDetected {
            message: ev.message,
        });
        return;
    }
    let removed = ev
        .lease_id
        .as_deref()
        .and_then(|id| crate::leases::remove_by_id(shared, id));
    let lease_id = ev.lease_id.clone().unwrap_or_default();
    let product = removed
        .as_ref()
        .map(|l| l.key.product.clone())
        .or(ev.product.clone())
        .unwrap_or_default();
    let kind = match ev.kind {
        WireEventKind::LeaseExpired => EventKind::LeaseExpired {
            lease_id,
            product,
            message: ev.message,
        },
        WireEventKind::LeaseRevoked | WireEventKind::LicenseRemoved => EventKind::LeaseLost {
            lease_id,
            product,
            reason: if ev.kind == WireEventKind::LeaseRevoked {
                LossReason::Revoked
            } else {
                LossReason::LicenseRemoved
            },
            new_lease_id: None,
            message: ev.message,
        },
        WireEventKind::CloneDetected => return,
    };
    // The lease's owner sees it; a lease no local user holds, only root.
    match removed {
        Some(l) => shared.emit_to(l.key.uid, kind),
        None => shared.emit_for(crate::agent::Audience::Root, kind, Vec::new()),
    }
}
