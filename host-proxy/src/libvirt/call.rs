//! Bounded libvirt calls. libvirt's client calls block until the daemon answers, and a hung
//! libvirtd (stopped, deadlocked, swapping) answers never or only when its keepalive gives up.
//! So each connection lives on its own worker thread ([`Worker`]): the connection is opened,
//! used and closed only there, and every call is a job the caller waits for with a timeout.
//!
//! A call that times out keeps its worker busy until libvirt returns; further calls on that
//! worker fail at once ([`LibvirtError::Hung`]) instead of queueing behind it, and the caller
//! drops the worker and opens a new connection. At most [`MAX_WORKERS`] worker threads are
//! alive per [`Workers`] count, so a daemon that hangs again and again cannot pile up threads.

use super::{open, open_read_only, Access, LibvirtError};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virt::connect::Connect;

/// Worker threads (open connections, including abandoned ones whose call has not returned)
/// allowed at once per [`Workers`].
pub const MAX_WORKERS: usize = 3;

type Job = Box<dyn FnOnce(&Connect) + Send>;

/// Counts one owner's worker threads and its timed-out calls.
#[derive(Debug, Default)]
pub struct Workers {
    live: AtomicUsize,
    stuck: AtomicUsize,
    timeouts: AtomicU64,
}

impl Workers {
    /// Worker threads alive now (one per open connection, plus abandoned ones still stuck).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Calls (and connection attempts) that timed out and have not returned yet.
    pub fn stuck(&self) -> usize {
        self.stuck.load(Ordering::SeqCst)
    }

    /// libvirt calls that did not answer in time, since start.
    pub fn timeouts(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
    }
}

/// Decrements the live count when the worker thread ends, however it ends.
struct LiveGuard(Arc<Workers>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The call a worker is running.
#[derive(Debug, Clone)]
struct Running {
    what: String,
    since: Instant,
    /// Its caller gave up waiting (counted in [`Workers::stuck`] until it returns).
    abandoned: bool,
}

type Slot = Arc<Mutex<Option<Running>>>;

fn running(what: &str) -> Option<Running> {
    Some(Running {
        what: what.to_string(),
        since: Instant::now(),
        abandoned: false,
    })
}

/// Marks the call in `slot` as given up by its caller; false when it has just returned.
fn abandon(slot: &Mutex<Option<Running>>, workers: &Workers) -> bool {
    let mut r = lock(slot);
    match r.as_mut() {
        Some(run) => {
            if !run.abandoned {
                run.abandoned = true;
                workers.stuck.fetch_add(1, Ordering::SeqCst);
                workers.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            true
        }
        None => false,
    }
}

/// Ends the call in `slot` (on the worker thread, when libvirt returned).
fn finish(slot: &Mutex<Option<Running>>, workers: &Workers) {
    let mut r = lock(slot);
    if r.as_ref().is_some_and(|run| run.abandoned) {
        workers.stuck.fetch_sub(1, Ordering::SeqCst);
    }
    *r = None;
}

/// One libvirt connection on its own thread; calls wait at most `timeout`. Dropping it closes
/// the connection on the worker thread once the call in progress (if any) returns.
pub struct Worker {
    jobs: mpsc::Sender<Job>,
    running: Slot,
    timeout: Duration,
    uri: String,
    workers: Arc<Workers>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Worker {
    /// Opens a connection to `uri` on a new worker thread, waiting at most `timeout`. Fails
    /// without starting a thread when `workers` already has [`MAX_WORKERS`] alive.
    pub fn open(
        uri: &str,
        access: Access,
        timeout: Duration,
        workers: &Arc<Workers>,
    ) -> Result<Worker, LibvirtError> {
        let live = workers.live.fetch_add(1, Ordering::SeqCst);
        if live >= MAX_WORKERS {
            workers.live.fetch_sub(1, Ordering::SeqCst);
            return Err(LibvirtError::Hung {
                uri: uri.to_string(),
                what: format!("{live} earlier connections (calls that timed out have not returned yet); not opening another until one does"),
            });
        }
        let guard = LiveGuard(workers.clone());
        let (opened_tx, opened_rx) = mpsc::channel::<Result<(), LibvirtError>>();
        let (jobs, jobs_rx) = mpsc::channel::<Job>();
        let target = uri.to_string();
        let slot: Slot = Arc::new(Mutex::new(running("connect")));
        let (slot2, workers2) = (slot.clone(), workers.clone());
        let spawned = std::thread::Builder::new()
            .name("hostbind-libvirt-call".into())
            .spawn(move || {
                let _guard = guard;
                let conn = match access {
                    Access::ReadOnly => open_read_only(&target),
                    Access::ReadWrite => open(&target),
                };
                finish(&slot2, &workers2);
                let conn = match conn {
                    Ok(c) => {
                        let _ = opened_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = jobs_rx.recv() {
                    job(&conn);
                }
                // `conn` is closed here, on this thread: closing talks to libvirtd too.
            });
        if let Err(e) = spawned {
            // The closure (and with it the guard) was dropped: the count is already back.
            return Err(LibvirtError::Invalid(format!(
                "cannot start a thread for the libvirt connection: {e}"
            )));
        }
        let w = Worker {
            jobs,
            running: slot,
            timeout,
            uri: uri.to_string(),
            workers: workers.clone(),
        };
        let opened = match opened_rx.recv_timeout(timeout) {
            Err(_) if abandon(&w.running, workers) => return Err(w.timed_out("connect")),
            // It returned just as the wait ended: its answer is there.
            Err(_) => opened_rx.try_recv().map_err(|_| w.ended()),
            Ok(r) => Ok(r),
        };
        opened?.map(|()| w)
    }

    fn ended(&self) -> LibvirtError {
        LibvirtError::Invalid(format!(
            "the thread of the libvirt connection to {} has ended",
            self.uri
        ))
    }

    fn timed_out(&self, what: &str) -> LibvirtError {
        LibvirtError::Timeout {
            uri: self.uri.clone(),
            what: what.to_string(),
            secs: self.timeout.as_secs_f64(),
        }
    }

    /// Runs `f` with the connection on the worker thread and waits at most the timeout for it.
    /// Fails at once while an earlier call that timed out is still running.
    pub fn call<R: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&Connect) -> Result<R, LibvirtError> + Send + 'static,
    ) -> Result<R, LibvirtError> {
        {
            let mut r = lock(&self.running);
            if let Some(busy) = r.as_ref() {
                return Err(LibvirtError::Hung {
                    uri: self.uri.clone(),
                    what: format!(
                        "an earlier call ({}) has not returned for {:.1}s",
                        busy.what,
                        busy.since.elapsed().as_secs_f64()
                    ),
                });
            }
            *r = running(what);
        }
        let (tx, rx) = mpsc::channel();
        let (slot, workers) = (self.running.clone(), self.workers.clone());
        let job: Job = Box::new(move |c| {
            let r = f(c);
            finish(&slot, &workers);
            let _ = tx.send(r);
        });
        if self.jobs.send(job).is_err() {
            *lock(&self.running) = None;
            return Err(self.ended());
        }
        match rx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) if abandon(&self.running, &self.workers) => {
                Err(self.timed_out(what))
            }
            // It returned just as the wait ended: its answer is there (or comes at once).
            Err(_) => rx
                .recv_timeout(Duration::from_secs(1))
                .unwrap_or_else(|_| Err(self.ended())),
        }
    }

    /// Closes the connection on the worker thread, dropping `leftovers` (event subscriptions,
    /// connection handles: their drop talks to libvirtd) there first. Does not wait.
    pub fn close(self, leftovers: impl Send + 'static) {
        let _ = self.jobs.send(Box::new(move |_| drop(leftovers)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URI: &str = "test:///default";

    #[test]
    fn a_call_that_does_not_return_in_time_times_out_and_blocks_no_later_caller() {
        let workers = Arc::new(Workers::default());
        let w = Worker::open(URI, Access::ReadOnly, Duration::from_millis(300), &workers).unwrap();
        assert!(w.call("version", |c| Ok(c.lib_version().is_ok())).unwrap());
        let (release, hold) = mpsc::channel::<()>();
        let e = w
            .call("stuck", move |_| {
                let _ = hold.recv();
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(e, LibvirtError::Timeout { .. }), "{e}");
        assert!(
            e.to_string().contains("did not answer stuck within 0.3s"),
            "{e}"
        );
        // the next call fails at once instead of queueing behind the stuck one
        let t = Instant::now();
        let e = w.call("next", |_| Ok(())).unwrap_err();
        assert!(
            t.elapsed() < Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        assert!(
            e.to_string()
                .contains("an earlier call (stuck) has not returned"),
            "{e}"
        );
        assert_eq!(workers.timeouts(), 1);
        // once the stuck call returns, the worker answers again
        release.send(()).unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        while w.call("again", |_| Ok(())).is_err() {
            assert!(Instant::now() < end);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!((workers.timeouts(), workers.stuck()), (1, 0));
        w.close(());
    }

    #[test]
    fn stuck_workers_are_bounded_and_counted_until_they_end() {
        let workers = Arc::new(Workers::default());
        let mut holds = Vec::new();
        for _ in 0..MAX_WORKERS {
            let w =
                Worker::open(URI, Access::ReadOnly, Duration::from_millis(100), &workers).unwrap();
            let (release, hold) = mpsc::channel::<()>();
            assert!(w
                .call("stuck", move |_| {
                    let _ = hold.recv();
                    Ok(())
                })
                .is_err());
            holds.push(release);
            w.close(()); // abandoned, as the watcher does
        }
        assert_eq!(workers.live(), MAX_WORKERS);
        let e = Worker::open(URI, Access::ReadOnly, Duration::from_millis(100), &workers)
            .err()
            .unwrap();
        assert!(e.to_string().contains("not opening another"), "{e}");
        assert_eq!(workers.live(), MAX_WORKERS);
        drop(holds); // the stuck calls return: their threads close and end
        let end = Instant::now() + Duration::from_secs(5);
        while workers.live() > 0 {
            assert!(Instant::now() < end, "{} still alive", workers.live());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(Worker::open(URI, Access::ReadOnly, Duration::from_secs(5), &workers).is_ok());
    }

    #[test]
    fn a_failed_open_is_an_error_and_leaves_no_thread() {
        let workers = Arc::new(Workers::default());
        let e = Worker::open(
            "test:///nonexistent/node.xml",
            Access::ReadOnly,
            Duration::from_secs(5),
            &workers,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("cannot connect to libvirt"), "{e}");
        let end = Instant::now() + Duration::from_secs(5);
        while workers.live() > 0 {
            assert!(Instant::now() < end);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
