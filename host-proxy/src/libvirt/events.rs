//! Domain events: the event type the watcher acts on, the [`EventSource`] trait, libvirt's
//! event loop and callbacks ([`LibvirtEvents`]), and a hand-fed source ([`ManualEvents`]) for
//! events the libvirt test driver cannot produce (migration).
//!
//! The C callbacks only copy the domain's name and UUID and forward an event to a channel; all
//! work happens on the watcher thread.

use std::os::raw::{c_char, c_int, c_void};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;
use virt::connect::Connect;
use virt::sys;

use super::LibvirtError;

/// Why a domain stopped (libvirt's `VIR_DOMAIN_EVENT_STOPPED_*` details).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Normal shutdown.
    Shutdown,
    /// Forced off (`virsh destroy`).
    Destroyed,
    /// The guest crashed.
    Crashed,
    /// Migrated to another host.
    Migrated,
    /// Saved to a file.
    Saved,
    /// The host failed to keep it running.
    Failed,
    /// Reverted to an inactive snapshot.
    FromSnapshot,
    /// Any other detail.
    Other,
}

impl StopReason {
    fn from_detail(d: c_int) -> StopReason {
        match d as u32 {
            sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN => StopReason::Shutdown,
            sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED => StopReason::Destroyed,
            sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED => StopReason::Crashed,
            sys::VIR_DOMAIN_EVENT_STOPPED_MIGRATED => StopReason::Migrated,
            sys::VIR_DOMAIN_EVENT_STOPPED_SAVED => StopReason::Saved,
            sys::VIR_DOMAIN_EVENT_STOPPED_FAILED => StopReason::Failed,
            sys::VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT => StopReason::FromSnapshot,
            _ => StopReason::Other,
        }
    }

    /// How the history and the log describe it.
    pub fn describe(self) -> &'static str {
        match self {
            StopReason::Shutdown => "shut down",
            StopReason::Destroyed => "destroyed",
            StopReason::Crashed => "crashed",
            StopReason::Migrated => "migrated away",
            StopReason::Saved => "saved",
            StopReason::Failed => "failed",
            StopReason::FromSnapshot => "reverted to a snapshot",
            StopReason::Other => "stopped",
        }
    }
}

/// What happened to a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainEventKind {
    /// Defined (or its definition updated).
    Defined,
    /// Undefined (a running domain stays running, as a transient domain).
    Undefined,
    /// Started; `migrated` when it arrived by incoming migration.
    Started {
        /// Incoming migration.
        migrated: bool,
    },
    /// Paused; `migrated` when paused for an outgoing migration.
    Suspended {
        /// Outgoing migration in progress.
        migrated: bool,
    },
    /// Resumed; `migrated` when resumed at the end of an incoming migration.
    Resumed {
        /// Incoming migration finished.
        migrated: bool,
    },
    /// No longer running on this host.
    Stopped(StopReason),
    /// The guest crashed (it may stay in the crashed state).
    Crashed,
    /// Metadata changed; `ns` is the element's namespace (None for title/description).
    MetadataChanged {
        /// Namespace URI of the changed element.
        ns: Option<String>,
    },
    /// Anything else (shutdown in progress, PM suspend, ...): ignored.
    Other {
        /// libvirt's event number.
        event: i32,
        /// libvirt's detail number.
        detail: i32,
    },
}

impl DomainEventKind {
    /// Maps a libvirt lifecycle (event, detail) pair.
    pub fn from_lifecycle(event: i32, detail: i32) -> DomainEventKind {
        let migrated = |d: u32| detail as u32 == d;
        match event as u32 {
            sys::VIR_DOMAIN_EVENT_DEFINED => DomainEventKind::Defined,
            sys::VIR_DOMAIN_EVENT_UNDEFINED => DomainEventKind::Undefined,
            sys::VIR_DOMAIN_EVENT_STARTED => DomainEventKind::Started {
                migrated: migrated(sys::VIR_DOMAIN_EVENT_STARTED_MIGRATED),
            },
            sys::VIR_DOMAIN_EVENT_SUSPENDED => DomainEventKind::Suspended {
                migrated: migrated(sys::VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED),
            },
            sys::VIR_DOMAIN_EVENT_RESUMED => DomainEventKind::Resumed {
                migrated: migrated(sys::VIR_DOMAIN_EVENT_RESUMED_MIGRATED),
            },
            sys::VIR_DOMAIN_EVENT_STOPPED => {
                DomainEventKind::Stopped(StopReason::from_detail(detail))
            }
            sys::VIR_DOMAIN_EVENT_CRASHED => DomainEventKind::Crashed,
            _ => DomainEventKind::Other { event, detail },
        }
    }
}

/// An event about one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEvent {
    /// Domain UUID, lower-case hyphenated.
    pub uuid: String,
    /// Domain name.
    pub name: String,
    /// What happened.
    pub kind: DomainEventKind,
}

/// What the watcher receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A domain event.
    Domain(DomainEvent),
    /// libvirt closed the connection (daemon restarted, keepalive timeout, ...): reconnect.
    Closed(String),
}

/// Keeps an event subscription alive; dropping it unsubscribes.
pub struct Subscription(#[allow(dead_code)] Box<dyn Send>);

impl Subscription {
    /// A subscription holding `guard` until dropped.
    pub fn new(guard: impl Send + 'static) -> Subscription {
        Subscription(Box::new(guard))
    }
}

/// Where domain events come from: libvirt's event loop in the daemon, or a hand-fed channel
/// in tests of events the test driver cannot produce. Both deliver the same [`WatchEvent`]s.
/// The watcher subscribes a clone on each connection's worker thread (subscribing and
/// unsubscribing talk to libvirtd).
pub trait EventSource: Clone + Send + 'static {
    /// Starts sending `conn`'s events to `tx` until the returned subscription is dropped.
    fn subscribe(
        &mut self,
        conn: &Connect,
        tx: Sender<WatchEvent>,
    ) -> Result<Subscription, LibvirtError>;
}

/// Events fed by hand ([`ManualEvents::send`]), delivered exactly like libvirt's.
#[derive(Clone, Default)]
pub struct ManualEvents {
    tx: Arc<Mutex<Option<Sender<WatchEvent>>>>,
}

impl ManualEvents {
    /// A source with nothing subscribed yet.
    pub fn new() -> ManualEvents {
        ManualEvents::default()
    }

    /// Delivers `ev` to the watcher; false when the watcher is not subscribed (not connected).
    pub fn send(&self, ev: WatchEvent) -> bool {
        let g = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().is_some_and(|t| t.send(ev).is_ok())
    }
}

impl EventSource for ManualEvents {
    fn subscribe(
        &mut self,
        _conn: &Connect,
        tx: Sender<WatchEvent>,
    ) -> Result<Subscription, LibvirtError> {
        *self.tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        struct Unsub(Arc<Mutex<Option<Sender<WatchEvent>>>>);
        impl Drop for Unsub {
            fn drop(&mut self) {
                *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        Ok(Subscription::new(Unsub(self.tx.clone())))
    }
}

static EVENT_LOOP: Once = Once::new();

/// Registers libvirt's default event loop and runs it on a thread, once per process. Must run
/// before opening connections whose events are wanted. Also stops libvirt printing errors to
/// stderr (they are returned and logged instead).
pub fn ensure_event_loop() {
    EVENT_LOOP.call_once(|| {
        virt::error::clear_error_callback();
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::error!("cannot register libvirt's event loop: {e}; domain events will not arrive (the proxy still resyncs every minute)");
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("hostbind-libvirt-events".into())
            .spawn(|| loop {
                if let Err(e) = virt::event::event_run_default_impl() {
                    tracing::warn!("libvirt event loop iteration failed: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the libvirt event loop thread: {e}");
        }
    });
}

/// libvirt's own events: lifecycle and metadata-change callbacks, and the connection's close
/// callback, registered on each connection the watcher opens.
#[derive(Debug, Default, Clone, Copy)]
pub struct LibvirtEvents;

fn c_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: libvirt passes NUL-terminated strings valid for the callback's duration.
    Some(
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Name and UUID of a domain pointer libvirt lends to a callback (not owned: no free).
fn domain_ids(dom: sys::virDomainPtr) -> (String, String) {
    if dom.is_null() {
        return (String::new(), String::new());
    }
    // SAFETY: `dom` is valid for the callback; both calls only read the object locally.
    let name = c_str(unsafe { sys::virDomainGetName(dom) }).unwrap_or_default();
    let mut buf = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: buf has VIR_UUID_STRING_BUFLEN bytes as the API requires.
    let uuid = if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } == 0 {
        c_str(buf.as_ptr()).unwrap_or_default().to_ascii_lowercase()
    } else {
        String::new()
    };
    (name, uuid)
}

fn forward(opaque: *mut c_void, ev: WatchEvent) {
    if opaque.is_null() {
        return;
    }
    // SAFETY: opaque is the Box<Sender> registered with this callback, freed only by free_sender.
    let tx = unsafe { &*(opaque as *const Sender<WatchEvent>) };
    let _ = tx.send(ev);
}

unsafe extern "C" fn lifecycle_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    let _ = std::panic::catch_unwind(|| {
        let (name, uuid) = domain_ids(dom);
        forward(
            opaque,
            WatchEvent::Domain(DomainEvent {
                uuid,
                name,
                kind: DomainEventKind::from_lifecycle(event, detail),
            }),
        );
    });
    0
}

unsafe extern "C" fn metadata_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _kind: c_int,
    nsuri: *const c_char,
    opaque: *mut c_void,
) {
    let _ = std::panic::catch_unwind(|| {
        let (name, uuid) = domain_ids(dom);
        forward(
            opaque,
            WatchEvent::Domain(DomainEvent {
                uuid,
                name,
                kind: DomainEventKind::MetadataChanged { ns: c_str(nsuri) },
            }),
        );
    });
}

unsafe extern "C" fn close_cb(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    let _ = std::panic::catch_unwind(|| {
        let why = match reason as u32 {
            sys::VIR_CONNECT_CLOSE_REASON_ERROR => "connection error",
            sys::VIR_CONNECT_CLOSE_REASON_EOF => {
                "libvirtd closed the connection (restarted or stopped?)"
            }
            sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE => "keepalive timeout",
            sys::VIR_CONNECT_CLOSE_REASON_CLIENT => "closed by the client",
            _ => "unknown reason",
        };
        forward(opaque, WatchEvent::Closed(why.to_string()));
    });
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: created by Box::into_raw in LibvirtEvents::subscribe, freed once by libvirt.
        drop(unsafe { Box::from_raw(opaque as *mut Sender<WatchEvent>) });
    }
}

fn boxed(tx: &Sender<WatchEvent>) -> *mut c_void {
    Box::into_raw(Box::new(tx.clone())) as *mut c_void
}

struct Registered {
    conn: Connect,
    domain_ids: Vec<c_int>,
    close: bool,
}

impl Drop for Registered {
    fn drop(&mut self) {
        for id in &self.domain_ids {
            // SAFETY: the connection is alive (we hold a reference) and id came from RegisterAny.
            unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), *id) };
        }
        if self.close {
            // SAFETY: as above; the callback was registered on this connection.
            unsafe { sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(close_cb)) };
        }
    }
}

type LifecycleFn =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
type MetadataFn =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, *const c_char, *mut c_void);
type GenericFn = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);

impl EventSource for LibvirtEvents {
    fn subscribe(
        &mut self,
        conn: &Connect,
        tx: Sender<WatchEvent>,
    ) -> Result<Subscription, LibvirtError> {
        ensure_event_loop();
        let mut reg = Registered {
            conn: conn.clone(),
            domain_ids: Vec::new(),
            close: false,
        };
        // libvirt's API takes every domain callback as the generic type and calls it with the
        // signature of the event id (its VIR_DOMAIN_EVENT_CALLBACK cast).
        // SAFETY: both are `unsafe extern "C" fn` pointers of the same size; libvirt calls each
        // with the argument list of its event id.
        let callbacks: [(u32, GenericFn); 2] = unsafe {
            [
                (
                    sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    std::mem::transmute::<LifecycleFn, GenericFn>(lifecycle_cb),
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
                    std::mem::transmute::<MetadataFn, GenericFn>(metadata_cb),
                ),
            ]
        };
        for (id, cb) in callbacks {
            let opaque = boxed(&tx);
            // SAFETY: valid connection; opaque is freed by free_sender when deregistered.
            let r = unsafe {
                sys::virConnectDomainEventRegisterAny(
                    conn.as_ptr(),
                    std::ptr::null_mut(),
                    id as c_int,
                    Some(cb),
                    opaque,
                    Some(free_sender),
                )
            };
            if r < 0 {
                // SAFETY: registration failed, so libvirt did not take ownership of opaque.
                unsafe { free_sender(opaque) };
                return Err(LibvirtError::Libvirt {
                    what: format!("register for domain events (id {id})"),
                    source: virt::error::Error::last_error(),
                });
            }
            reg.domain_ids.push(r);
        }
        let opaque = boxed(&tx);
        // SAFETY: as above.
        let r = unsafe {
            sys::virConnectRegisterCloseCallback(
                conn.as_ptr(),
                Some(close_cb),
                opaque,
                Some(free_sender),
            )
        };
        if r < 0 {
            // SAFETY: registration failed; we still own opaque. Local drivers (test://) may not
            // support close callbacks; liveness is also polled.
            unsafe { free_sender(opaque) };
        } else {
            reg.close = true;
        }
        Ok(Subscription::new(reg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_numbers_map_to_kinds() {
        use DomainEventKind as K;
        assert_eq!(K::from_lifecycle(2, 1), K::Started { migrated: true });
        assert_eq!(K::from_lifecycle(2, 0), K::Started { migrated: false });
        assert_eq!(K::from_lifecycle(3, 1), K::Suspended { migrated: true });
        assert_eq!(K::from_lifecycle(4, 1), K::Resumed { migrated: true });
        assert_eq!(K::from_lifecycle(5, 1), K::Stopped(StopReason::Destroyed));
        assert_eq!(K::from_lifecycle(5, 3), K::Stopped(StopReason::Migrated));
        assert_eq!(K::from_lifecycle(5, 99), K::Stopped(StopReason::Other));
        assert_eq!(K::from_lifecycle(1, 0), K::Undefined);
        assert_eq!(K::from_lifecycle(8, 0), K::Crashed);
        assert_eq!(
            K::from_lifecycle(6, 1),
            K::Other {
                event: 6,
                detail: 1
            }
        );
    }
}
