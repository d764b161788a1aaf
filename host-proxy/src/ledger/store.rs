//! The ledger file: opening it (never a panic: redb asserts on some damaged files, so every call
//! into redb runs behind [`guard`]), the initialisation marker next to it, and closing and
//! re-opening it after a failed write (redb refuses all further writes on a handle that saw one).

use super::LedgerError;
use redb::Database;
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, RwLock};

/// redb's page cache (its default is 1 GiB): the hot data is mirrored in memory anyway, and the
/// OS page cache holds the file, so a small cache keeps the proxy's RSS low with many leases.
const LEDGER_CACHE_BYTES: usize = 4 * 1024 * 1024;

/// What the admin can do about a ledger file that does not open.
pub(super) fn advice(path: &Path) -> String {
    format!(
        "restore {} from a backup, or start once with `hostbind-proxy run --reset-ledger` to move \
         it aside and begin an empty ledger (licenses in the licenses dir are added again; guests \
         request new leases)",
        path.display()
    )
}

thread_local! {
    /// Set while this thread runs inside [`guard`]: its panics are reported as errors there.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    /// Where the last guarded panic happened.
    static PANIC_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that keeps panics inside [`guard`] off stderr (they become
/// errors that say where redb failed) and passes every other panic to the previous hook.
fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) {
                let at = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()));
                PANIC_AT.with(|p| *p.borrow_mut() = at);
            } else {
                prev(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic inside it (redb asserts on some damaged files) into an error
/// message.
pub(super) fn guard<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    install_hook();
    let outer = GUARDED.with(|g| g.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    r.map_err(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        let at = PANIC_AT
            .with(|p| p.borrow_mut().take())
            .map(|a| format!(" at {a}"))
            .unwrap_or_default();
        format!("the storage library failed on this file ({msg}{at})")
    })
}

/// The marker file that says this host's ledger was initialised: `<ledger>.init`.
pub(super) fn marker_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".init");
    PathBuf::from(s)
}

/// The marker's content: the ledger id and when the ledger was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Marker {
    pub id: u64,
    pub created: u64,
}

impl Marker {
    const MAGIC: &'static str = "hostbind-seat-ledger";

    pub fn read(path: &Path) -> Result<Option<Marker>, LedgerError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(LedgerError::Open {
                    path: path.display().to_string(),
                    reason: format!(
                        "cannot read the ledger's initialisation marker: {e}; check the state dir's permissions"
                    ),
                })
            }
        };
        let mut w = text.split_whitespace();
        let parsed = match (w.next(), w.next(), w.next()) {
            (Some(Self::MAGIC), Some(id), Some(created)) => {
                u64::from_str_radix(id, 16).ok().zip(created.parse().ok())
            }
            _ => None,
        };
        match parsed {
            Some((id, created)) => Ok(Some(Marker { id, created })),
            None => Err(LedgerError::Open {
                path: path.display().to_string(),
                reason: format!(
                    "the ledger's initialisation marker is damaged; it should read \"{} <id> <created>\"; restore it from a backup, or delete it if the ledger next to it is this host's",
                    Self::MAGIC
                ),
            }),
        }
    }

    pub fn write(&self, path: &Path) -> Result<(), LedgerError> {
        let text = format!("{} {:016x} {}\n", Self::MAGIC, self.id, self.created);
        hostbind_fsutil::write_atomic(path, text.as_bytes(), 0o600).map_err(|e| LedgerError::Open {
            path: path.display().to_string(),
            reason: format!("cannot write the ledger's initialisation marker: {e}"),
        })
    }
}

/// Opens (`create`: or initialises) the redb file at `path`; never panics. Returns the database
/// and whether redb had to repair it (it was not closed cleanly).
pub(super) fn open_file(path: &Path, create: bool) -> Result<(Database, bool), LedgerError> {
    let open_err = |reason: String| LedgerError::Open {
        path: path.display().to_string(),
        reason,
    };
    let repaired = Arc::new(AtomicBool::new(false));
    let r = repaired.clone();
    let res = guard(|| {
        let mut b = redb::Builder::new();
        b.set_cache_size(LEDGER_CACHE_BYTES)
            .set_repair_callback(move |_| r.store(true, Ordering::Relaxed));
        if create {
            b.create(path)
        } else {
            b.open(path)
        }
    });
    match res {
        Ok(Ok(db)) => Ok((db, repaired.load(Ordering::Relaxed))),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(open_err(
            "it is in use by another process — is another hostbind-proxy running with this state dir?"
                .into(),
        )),
        Ok(Err(e)) => {
            let e = redb::Error::from(e);
            let disk_full = super::is_disk_full(&e);
            Err(open_err(if disk_full {
                format!("{e}: the state disk is full; free space in {} and start again", parent(path))
            } else {
                format!("it is damaged or not a seat ledger ({e}); {}", advice(path))
            }))
        }
        Err(panic) => Err(open_err(format!(
            "it is damaged: {panic}; {}",
            advice(path)
        ))),
    }
}

fn parent(path: &Path) -> String {
    path.parent()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| ".".into())
}

/// The open database, replaced when a failed write forces a re-open.
pub(super) struct Store {
    path: PathBuf,
    db: RwLock<Option<Database>>,
    /// Set when redb panicked: its handle may be unusable (poisoned locks) until re-opened.
    panicked: AtomicBool,
}

impl Store {
    pub fn new(path: &Path, db: Database) -> Store {
        Store {
            path: path.to_path_buf(),
            db: RwLock::new(Some(db)),
            panicked: AtomicBool::new(false),
        }
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the database (shared with other readers and writers; redb serialises write
    /// transactions itself). A panic inside becomes [`LedgerError::Storage`]; with no open
    /// database (a re-open failed) the error says so.
    pub fn with<R>(
        &self,
        f: impl FnOnce(&Database) -> Result<R, LedgerError>,
    ) -> Result<R, LedgerError> {
        let g = self.db.read().unwrap_or_else(|e| e.into_inner());
        let Some(db) = g.as_ref() else {
            return Err(LedgerError::Storage {
                reason: "the ledger file is closed after a failed write and could not be opened again yet".into(),
                disk_full: false,
            });
        };
        guard(|| f(db)).unwrap_or_else(|reason| {
            self.panicked.store(true, Ordering::Release);
            Err(LedgerError::Storage {
                reason,
                disk_full: false,
            })
        })
    }

    /// Whether redb panicked since the last call (the handle must then be re-opened).
    pub fn take_panicked(&self) -> bool {
        self.panicked.swap(false, Ordering::AcqRel)
    }

    /// Closes the database and opens the file again (redb repairs it if the failed write left
    /// it unclean). On failure no database is open until the next attempt.
    pub fn reopen(&self) -> Result<bool, LedgerError> {
        let mut g = self.db.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = g.take() {
            // Dropping a handle whose writes failed may itself trip redb: keep going.
            let _ = guard(move || drop(old));
        }
        let (db, repaired) = open_file(&self.path, false)?;
        *g = Some(db);
        Ok(repaired)
    }
}
