//! The seat ledger on a state dir that really runs out of space (a small tmpfs filled by the
//! test): the first failed write degrades the ledger instead of breaking it; leases keep
//! renewing from memory, new leases are refused with "state disk full", and once space is
//! back the healer writes the in-memory state to the file by itself — no restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::signed::CountMode;
use hostbind_proxy::ledger::{AcquireRequest, HistoryEvent, LeaseScope, Ledger, LedgerError};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

mod ledger_common;
mod tmpfs;

fn req<'a>(vm: &'a str, now: u64) -> AcquireRequest<'a> {
    AcquireRequest {
        scope: LeaseScope::Vm,
        pid: None,
        ttl_secs: 60,
        ..ledger_common::req(vm, "cad", CountMode::Access, 1000, now)
    }
}

#[test]
fn disk_full_degrades_then_heals_without_a_restart() {
    let base = tempfile::tempdir().unwrap();
    let Some(fs) = tmpfs::Tmpfs::mount(&base.path().join("state"), 2 * 1024 * 1024) else {
        return;
    };
    let path = fs.dir().join("ledger.redb");
    let l = Ledger::open(&path).unwrap();
    l.put_license("L1", "cad", b"signed", 1).unwrap();
    let mut leases: Vec<String> = (0..20)
        .map(|i| l.acquire(&req(&format!("vm-{i}"), 10)).unwrap().id)
        .collect();
    let filler = fs.fill("filler");
    assert!(filler > 0);

    // Renew until a write needs a page the full disk cannot give (history grows with every
    // renewal), at most 20,000 renewals.
    let mut now = 20;
    let mut renewals = 0;
    while l.health().durable && renewals < 20_000 {
        for id in &leases {
            l.renew(id, 60, now).unwrap();
            renewals += 1;
        }
        now += 1;
    }
    let h = l.health();
    assert!(!h.durable, "no write failed after {renewals} renewals");
    assert!(h.disk_full, "{h:?}");
    assert!(h.commit_failures_total >= 1);
    eprintln!(
        "the disk ran full after {renewals} renewals: {:?}",
        h.reason
    );

    // Degraded: renewals, releases and expiry go on in memory ...
    let t = now + 5;
    for id in &leases {
        let r = l.renew(id, 60, t).unwrap();
        assert_eq!(r.expires_at, t + 60);
    }
    let released = leases.pop().unwrap();
    l.release(&released, "app exited", t).unwrap();
    // ... new leases and license changes are refused, saying why.
    let e = l.acquire(&req("vm-new", t)).unwrap_err();
    assert!(
        matches!(
            e,
            LedgerError::Degraded {
                disk_full: true,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().starts_with("state disk full"), "{e}");
    let e = l.put_license("L2", "sim", b"x", t).unwrap_err();
    assert!(e.to_string().contains("state disk full"), "{e}");
    assert!(l.lease(&released).unwrap().is_none());
    assert_eq!(l.leases().unwrap().len(), leases.len());
    let h = l.health();
    assert!(h.changes_not_durable > leases.len() as u64, "{h:?}");
    assert!(h.grants_refused >= 1, "{h:?}");

    // Space comes back: the healer writes the mirror back by itself.
    std::fs::remove_file(fs.dir().join("filler")).unwrap();
    let freed = Instant::now();
    while !l.health().durable {
        assert!(
            freed.elapsed() < Duration::from_secs(30),
            "not healed 30 s after space came back: {:?}",
            l.health()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("healed {:?} after space came back", freed.elapsed());
    let h = l.health();
    assert_eq!((h.recoveries_total, h.changes_not_durable), (1, 0), "{h:?}");
    let fresh = l.acquire(&req("vm-new", t + 1)).unwrap();
    leases.push(fresh.id.clone());

    // What the file holds now is what the ledger said while degraded.
    let expect: BTreeMap<String, u64> = l
        .leases()
        .unwrap()
        .into_iter()
        .map(|x| (x.id, x.expires_at))
        .collect();
    let hist = l.history(0, usize::MAX).unwrap();
    drop(l);
    let l = Ledger::open(&path).unwrap();
    let got: BTreeMap<String, u64> = l
        .leases()
        .unwrap()
        .into_iter()
        .map(|x| (x.id, x.expires_at))
        .collect();
    assert_eq!(got, expect);
    assert!(!got.contains_key(&released));
    assert!(got
        .iter()
        .filter(|(id, _)| **id != fresh.id)
        .all(|(_, exp)| *exp == t + 60));
    assert_eq!(l.history(0, usize::MAX).unwrap(), hist);
    let restored: Vec<_> = hist
        .iter()
        .filter(|e| e.event == HistoryEvent::DurabilityRestored)
        .collect();
    assert_eq!(restored.len(), 1, "{hist:#?}");
    assert!(
        restored[0].detail.contains("kept in memory only"),
        "{}",
        restored[0].detail
    );
    // the release made while degraded is in the history, in order, with gap-free numbers
    assert!(hist.iter().any(|e| e.event == HistoryEvent::LeaseReleased
        && e.lease_id.as_deref() == Some(released.as_str())));
    let seqs: Vec<(u64, String)> = hist
        .iter()
        .map(|e| (e.seq, format!("{:?}", e.event)))
        .collect();
    assert!(
        seqs.iter().enumerate().all(|(i, s)| s.0 == i as u64 + 1),
        "{seqs:?}"
    );
}

/// A closed ledger holding two licenses, 30 leases and their history, and what it holds.
struct Populated {
    dir: tempfile::TempDir,
    licenses: Vec<hostbind_proxy::ledger::LicenseRecord>,
    leases: Vec<hostbind_proxy::ledger::Lease>,
    history: Vec<hostbind_proxy::ledger::HistoryEntry>,
}

impl Populated {
    fn new() -> Populated {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
        l.put_license("L1", "cad", &[7u8; 300], 1).unwrap();
        l.put_license("L2", "sim", &[9u8; 300], 2).unwrap();
        for i in 0..30 {
            let vm = format!("vm-{i}");
            let id = l.acquire(&req(&vm, 10)).unwrap().id;
            if i % 3 == 0 {
                l.renew(&id, 60, 20).unwrap();
            }
        }
        let p = Populated {
            licenses: l.licenses().unwrap(),
            leases: l.leases().unwrap(),
            history: l.history(0, usize::MAX).unwrap(),
            dir,
        };
        drop(l);
        p
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("ledger.redb")
    }

    /// Opens the ledger; a panic escaping `Ledger::open` fails the test.
    fn open(&self) -> Result<Ledger, LedgerError> {
        let p = self.path();
        std::panic::catch_unwind(move || Ledger::open(&p))
            .unwrap_or_else(|_| panic!("Ledger::open panicked"))
    }

    /// An error must name the file and say what to do.
    fn assert_names_file(&self, e: &LedgerError) {
        let m = e.to_string();
        let file = self.path().display().to_string();
        assert!(m.contains(&file), "does not name {file}: {m}");
        assert!(
            m.contains("--reset-ledger") || m.contains("restore"),
            "does not say what to do: {m}"
        );
    }

    /// An opened ledger holds exactly what was written (a damaged history is an error).
    fn assert_intact(&self, l: &Ledger) {
        assert_eq!(l.licenses().unwrap(), self.licenses);
        assert_eq!(l.leases().unwrap(), self.leases);
        match l.history(0, usize::MAX) {
            Ok(h) => assert_eq!(h, self.history),
            Err(e) => assert!(
                matches!(
                    e,
                    LedgerError::Corrupt {
                        table: "history",
                        ..
                    } | LedgerError::Storage { .. }
                ),
                "{e:?}"
            ),
        }
    }
}

#[test]
fn truncated_ledger_is_an_error_naming_the_file_never_a_panic() {
    let p = Populated::new();
    let good = std::fs::read(p.path()).unwrap();
    for len in [
        1,
        100,
        1000,
        4096,
        good.len() / 2,
        good.len() - 4096,
        good.len() - 1,
    ] {
        std::fs::write(p.path(), &good[..len]).unwrap();
        match p.open() {
            Err(e) => {
                p.assert_names_file(&e);
                // the failed open left the file as it was
                assert_eq!(
                    std::fs::read(p.path()).unwrap(),
                    &good[..len],
                    "changed at {len}"
                );
            }
            Ok(l) => p.assert_intact(&l),
        }
    }
    std::fs::write(p.path(), &good).unwrap();
    p.assert_intact(&p.open().unwrap());
}

#[test]
fn zeroed_ledger_is_an_error_and_an_empty_one_is_not_recreated() {
    let p = Populated::new();
    let good = std::fs::read(p.path()).unwrap();
    std::fs::write(p.path(), vec![0u8; good.len()]).unwrap();
    let e = p.open().err().expect("an all-zero ledger must not open");
    p.assert_names_file(&e);
    // zero length: redb would make a new, empty database of it
    std::fs::write(p.path(), b"").unwrap();
    let e = p.open().err().expect("an empty ledger must not open");
    assert!(
        matches!(e, LedgerError::Missing { empty: true, .. }),
        "{e:?}"
    );
    p.assert_names_file(&e);
    assert!(e.to_string().contains("is empty"), "{e}");
    assert_eq!(std::fs::metadata(p.path()).unwrap().len(), 0);
}

#[test]
fn deleted_ledger_of_an_initialised_host_needs_reset_ledger() {
    let p = Populated::new();
    std::fs::remove_file(p.path()).unwrap();
    let e = p
        .open()
        .err()
        .expect("a deleted ledger must not be recreated");
    assert!(
        matches!(e, LedgerError::Missing { empty: false, .. }),
        "{e:?}"
    );
    p.assert_names_file(&e);
    assert!(!p.path().exists(), "nothing is created");
    // the admin asks for a new ledger
    let l = Ledger::open_with(
        &p.path(),
        hostbind_proxy::ledger::OpenOptions { reset: true },
    )
    .unwrap();
    assert!(l.leases().unwrap().is_empty() && l.licenses().unwrap().is_empty());
    let h = l.history(0, 10).unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].event, HistoryEvent::LedgerReset);
    drop(l);
    // and it is this host's ledger from now on
    Ledger::open(&p.path()).unwrap();
}

#[test]
fn reset_ledger_moves_a_damaged_ledger_aside() {
    let p = Populated::new();
    let good = std::fs::read(p.path()).unwrap();
    std::fs::write(p.path(), &good[..good.len() / 2]).unwrap();
    p.open().err().expect("half a ledger must not open");
    let l = Ledger::open_with(
        &p.path(),
        hostbind_proxy::ledger::OpenOptions { reset: true },
    )
    .unwrap();
    let h = l.history(0, 10).unwrap();
    let kept: Vec<_> = std::fs::read_dir(p.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|f| f.to_string_lossy().contains("ledger.redb.reset-"))
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(std::fs::read(&kept[0]).unwrap(), &good[..good.len() / 2]);
    assert!(
        h[0].detail.contains(&kept[0].display().to_string()),
        "{}",
        h[0].detail
    );
}

#[test]
fn ledger_copied_from_another_host_is_refused() {
    let ours = Populated::new();
    let theirs = Populated::new();
    std::fs::copy(theirs.path(), ours.path()).unwrap();
    let e = ours
        .open()
        .err()
        .expect("another host's ledger must not open");
    assert!(matches!(e, LedgerError::Foreign { .. }), "{e:?}");
    assert!(
        e.to_string().contains("not the one this host created"),
        "{e}"
    );
}

fn rand_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn bit_flips_are_named_or_harmless_never_silent() {
    let p = Populated::new();
    // Compacted, so the pages holding records are the live ones (no old copies to miss).
    redb::Database::open(p.path()).unwrap().compact().unwrap();
    let good = std::fs::read(p.path()).unwrap();
    // Aim at the header and at the pages that hold licenses, leases and history (most of the
    // file is free space and redb's allocator state, which it rebuilds).
    let data_pages: Vec<usize> = good
        .chunks(4096)
        .enumerate()
        .filter(|(_, pg)| pg.windows(3).any(|w| w == b"vm-" || w == b"cad"))
        .map(|(i, _)| i)
        .collect();
    assert!(!data_pages.is_empty());
    let (mut refused, mut harmless) = (0, 0);
    for round in 0..80 {
        let at = if round % 4 == 0 {
            (rand_u64() % 512) as usize
        } else {
            let page = data_pages[(rand_u64() % data_pages.len() as u64) as usize];
            (page * 4096 + (rand_u64() % 4096) as usize).min(good.len() - 1)
        };
        let mut bad = good.clone();
        bad[at] ^= 1 << (rand_u64() % 8);
        std::fs::write(p.path(), &bad).unwrap();
        match p.open() {
            Err(e) => {
                p.assert_names_file(&e);
                refused += 1;
            }
            Ok(l) => {
                p.assert_intact(&l);
                harmless += 1;
            }
        }
    }
    eprintln!(
        "80 single-bit flips in the header and the record pages: {refused} refused with an error \
         naming the file, {harmless} read back intact (or a damaged history entry named)"
    );
    assert!(
        refused > 0,
        "no flip was noticed: the test did not test anything"
    );
}

#[test]
fn altered_lease_record_is_named_not_read_as_another_lease() {
    let p = Populated::new();
    let mut bytes = std::fs::read(p.path()).unwrap();
    // vm-17's lease, renamed to vm-18 in every copy of its page (copy-on-write keeps old ones)
    let mut n = 0;
    for i in 0..bytes.len() - 5 {
        if &bytes[i..i + 5] == b"vm-17" {
            bytes[i + 4] = b'8';
            n += 1;
        }
    }
    assert!(n > 0);
    std::fs::write(p.path(), &bytes).unwrap();
    let e = p.open().err().expect("an altered lease must not be read");
    p.assert_names_file(&e);
    let id = &p.leases.iter().find(|l| l.vm_name == "vm-17").unwrap().id;
    assert!(e.to_string().contains(&format!("leases/{id}")), "{e}");
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
}

#[test]
fn damage_under_a_running_ledger_is_an_error_not_a_crash() {
    use std::os::unix::fs::FileExt;
    let p = Populated::new();
    {
        // a longer history, most of it on pages that opening the ledger does not read
        let l = p.open().unwrap();
        for i in 0..300 {
            l.renew(&p.leases[i % p.leases.len()].id, 60, 30 + i as u64)
                .unwrap();
        }
    }
    let good = std::fs::read(p.path()).unwrap();
    let history = Ledger::open(&p.path())
        .unwrap()
        .history(0, usize::MAX)
        .unwrap();
    let used: Vec<usize> = (0..good.len()).filter(|&i| good[i] != 0).collect();
    let (mut errors, mut intact) = (0, 0);
    for _ in 0..40 {
        std::fs::write(p.path(), &good).unwrap();
        let l = p.open().unwrap();
        // damage on disk while the ledger runs: 40 bytes, then a read that goes to the file
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.path())
            .unwrap();
        for _ in 0..40 {
            let at = used[(rand_u64() % used.len() as u64) as usize];
            f.write_all_at(&[good[at] ^ 0xff], at as u64).unwrap();
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.history(0, usize::MAX)))
            .unwrap_or_else(|_| panic!("a read of a damaged ledger panicked"));
        match r {
            Ok(h) if h == history => intact += 1,
            Ok(h) => panic!("a damaged history read back as something else: {h:?}"),
            Err(_) => errors += 1,
        }
        // the seats are served from memory all the same
        assert_eq!(l.leases().unwrap().len(), p.leases.len());
    }
    eprintln!("40 rounds of 40 bytes altered under a running ledger: {errors} history reads failed with an error, {intact} unaffected");
    assert!(
        errors > 0,
        "no damage reached a read: the test did not test anything"
    );
}

#[test]
fn schema_1_ledger_is_migrated_to_checksummed_records() {
    use redb::{Database, TableDefinition};
    const LICENSES: TableDefinition<&str, &[u8]> = TableDefinition::new("licenses");
    const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
    const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
    const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
    let cbor = |v: &serde_json::Value| {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    };
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("ledger.redb");
    {
        // a ledger as hostbind-proxy 0.1 (schema 1) wrote it: plain CBOR records
        let db = Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(META).unwrap().insert("schema", 1).unwrap();
        let lease = serde_json::json!({
            "id": "aa", "vm_uuid": "u", "vm_name": "vm-a", "product": "cad",
            "license_id": "L1", "features": [], "scope": "process", "pid": 42,
            "created_at": 10, "renewed_at": 10, "expires_at": 70
        });
        tx.open_table(LEASES)
            .unwrap()
            .insert("aa", cbor(&lease).as_slice())
            .unwrap();
        let lic = ciborium::Value::Map(vec![
            ("id".into(), "L1".into()),
            ("product".into(), "cad".into()),
            ("bytes".into(), ciborium::Value::Bytes(vec![1, 2, 3])),
            ("added_at".into(), 5.into()),
        ]);
        let mut lic_bytes = Vec::new();
        ciborium::into_writer(&lic, &mut lic_bytes).unwrap();
        tx.open_table(LICENSES)
            .unwrap()
            .insert("L1", lic_bytes.as_slice())
            .unwrap();
        let h = serde_json::json!({
            "seq": 1, "at": 10, "event": "lease_started", "lease_id": "aa",
            "vm_uuid": "u", "product": "cad", "detail": "vm-a took a lease"
        });
        tx.open_table(HISTORY)
            .unwrap()
            .insert(1, cbor(&h).as_slice())
            .unwrap();
        tx.commit().unwrap();
    }
    let l = Ledger::open(&path).unwrap();
    let leases = l.leases().unwrap();
    assert_eq!(
        (
            leases.len(),
            leases[0].id.as_str(),
            leases[0].pid,
            leases[0].pid_start
        ),
        (1, "aa", Some(42), None)
    );
    assert_eq!(l.licenses().unwrap()[0].bytes, vec![1, 2, 3]);
    assert_eq!(l.history(0, 10).unwrap()[0].detail, "vm-a took a lease");
    drop(l);
    {
        let db = Database::open(&path).unwrap();
        let tx = db.begin_read().unwrap();
        let schema = tx
            .open_table(META)
            .unwrap()
            .get("schema")
            .unwrap()
            .unwrap()
            .value();
        assert_eq!(schema, hostbind_proxy::ledger::SCHEMA_VERSION);
    }
    // the migrated file opens again, and a change made outside hostbind is named
    let l = Ledger::open(&path).unwrap();
    assert_eq!(l.leases().unwrap(), leases);
    drop(l);
    {
        let db = Database::open(&path).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(LEASES).unwrap().remove("aa").unwrap();
        tx.commit().unwrap();
    }
    let e = Ledger::open(&path)
        .err()
        .expect("a removed lease is noticed");
    assert!(e.to_string().contains("records are missing"), "{e}");
}
