//! The redb seat ledger's storage guarantees on real files: corrupt records and newer schemas are
//! clear errors, reopening gives back exactly the same state, licenses replaced then removed end
//! every lease of the product, history is complete and ordered, the ledger works from tokio, and
//! how long one durable (fsync'd) commit takes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::signed::CountMode;
use hostbind_proxy::ledger::{
    AcquireRequest, HistoryEvent, LeaseScope, Ledger, LedgerError, SCHEMA_VERSION,
};
use redb::{Database, TableDefinition};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

mod ledger_common;

/// A VM-scoped request (see `ledger_common::req`).
fn req<'a>(
    vm: &'a str,
    product: &'a str,
    mode: CountMode,
    seats: u32,
    now: u64,
) -> AcquireRequest<'a> {
    AcquireRequest {
        scope: LeaseScope::Vm,
        pid: None,
        ..ledger_common::req(vm, product, mode, seats, now)
    }
}

/// Writes one raw record with redb directly (the ledger must be closed).
fn poke_str(path: &Path, table: TableDefinition<&str, &[u8]>, key: &str, value: &[u8]) {
    let db = Database::open(path).unwrap();
    let tx = db.begin_write().unwrap();
    tx.open_table(table).unwrap().insert(key, value).unwrap();
    tx.commit().unwrap();
}

#[test]
fn ledger_is_send_sync_and_usable_from_tokio() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Ledger>();

    let d = tempfile::tempdir().unwrap();
    let l = Arc::new(Ledger::open(&d.path().join("l.redb")).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let ids: Vec<String> = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..8 {
            let l = l.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                let vm = format!("vm-{i}");
                l.acquire(&req(&vm, "cad", CountMode::Vm, 4, 100))
            }));
        }
        let mut ok = Vec::new();
        for t in tasks {
            if let Ok(lease) = t.await.unwrap() {
                ok.push(lease.id);
            }
        }
        ok
    });
    // concurrent callers are serialized: exactly the 4 seats are granted, never more
    assert_eq!(ids.len(), 4);
    assert_eq!(l.seats_in_use("cad", CountMode::Vm, 100).unwrap().0, 4);
    let refused = l
        .history(0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.event == HistoryEvent::Refused)
        .count();
    // refusals are not written one by one (the service counts them, refusals.rs)
    assert_eq!(refused, 0);
}

#[test]
fn corrupt_lease_record_names_table_and_key() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("l.redb");
    drop(Ledger::open(&p).unwrap());
    poke_str(&p, LEASES, "feedface", &[0xff, 0x00, 0x13, 0x37]);
    let e = Ledger::open(&p)
        .err()
        .expect("a corrupt lease must not open");
    assert!(matches!(&e, LedgerError::Open { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("leases/feedface") && msg.contains("restore") && msg.contains("l.redb"),
        "{msg}"
    );
}

#[test]
fn corrupt_history_record_is_an_error_from_history_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("l.redb");
    {
        let l = Ledger::open(&p).unwrap();
        l.put_license("L1", "cad", b"x", 1).unwrap();
        l.put_license("L2", "sim", b"y", 1).unwrap();
    }
    {
        let db = Database::open(&p).unwrap();
        let tx = db.begin_write().unwrap();
        // the second entry is replaced: valid CBOR, wrong shape
        tx.open_table(HISTORY)
            .unwrap()
            .insert(2u64, &[0x01u8][..])
            .unwrap();
        tx.commit().unwrap();
    }
    let l = Ledger::open(&p).unwrap();
    assert_eq!(
        l.history(0, 1).unwrap().len(),
        1,
        "the good entry still reads"
    );
    let e = l.history(0, 10).unwrap_err();
    assert!(
        matches!(&e, LedgerError::Corrupt { table: "history", key, .. } if key == "2"),
        "{e:?}"
    );
    // the next entry gets a fresh sequence number after the bad one, nothing is overwritten
    l.put_license("L3", "net", b"z", 2).unwrap();
    assert_eq!(l.history(3, 10).unwrap()[0].seq, 3);
}

#[test]
fn newer_schema_is_refused_with_upgrade_advice() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("l.redb");
    drop(Ledger::open(&p).unwrap());
    {
        let db = Database::open(&p).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(META)
            .unwrap()
            .insert("schema", SCHEMA_VERSION + 1)
            .unwrap();
        tx.commit().unwrap();
    }
    let e = Ledger::open(&p).err().expect("newer schema must not open");
    assert!(
        matches!(e, LedgerError::NewerSchema { found, supported } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{e:?}"
    );
    assert!(e.to_string().contains("upgrade hostbind-proxy"), "{e}");
}

#[test]
fn reopen_gives_back_identical_leases_licenses_and_history() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("l.redb");
    let (leases, licenses, history) = {
        let l = Ledger::open(&p).unwrap();
        l.put_license("L1", "cad", b"signed-1", 1).unwrap();
        let a = l
            .acquire(&AcquireRequest {
                features: &["pro".to_string()],
                scope: LeaseScope::Process,
                pid: Some(4242),
                ..req("vm-a", "cad", CountMode::Vm, 2, 10)
            })
            .unwrap();
        l.acquire(&req("vm-b", "cad", CountMode::Vm, 2, 11))
            .unwrap();
        l.acquire(&req("vm-c", "cad", CountMode::Vm, 2, 12))
            .unwrap_err();
        l.renew(&a.id, 90, 20).unwrap();
        (
            l.leases().unwrap(),
            l.licenses().unwrap(),
            l.history(0, 100).unwrap(),
        )
    };
    let l = Ledger::open(&p).unwrap();
    assert_eq!(l.leases().unwrap(), leases);
    assert_eq!(l.licenses().unwrap(), licenses);
    assert_eq!(l.history(0, 100).unwrap(), history);
    let a = &leases[0];
    assert_eq!(
        (a.pid, a.scope, a.expires_at, a.features.as_slice()),
        (
            Some(4242),
            LeaseScope::Process,
            110,
            &["pro".to_string()][..]
        )
    );
    // seats are still taken after the restart
    let e = l
        .acquire(&req("vm-c", "cad", CountMode::Vm, 2, 30))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "no free seat for product 'cad' on this host: 2 of 2 seats in use by vm-a, vm-b; \
         release a lease or add seats to the license"
    );
}

#[test]
fn replaced_license_keeps_leases_until_the_product_license_is_removed() {
    let d = tempfile::tempdir().unwrap();
    let l = Ledger::open(&d.path().join("l.redb")).unwrap();
    l.put_license("L1", "cad", b"one", 1).unwrap();
    l.put_license("S1", "sim", b"sim", 1).unwrap();
    let a = l
        .acquire(&req("vm-a", "cad", CountMode::Vm, 2, 10))
        .unwrap();
    let s = l
        .acquire(&AcquireRequest {
            license_id: "S1",
            ..req("vm-a", "sim", CountMode::Vm, 2, 10)
        })
        .unwrap();
    // renewal of the license: running leases go on, and still count against the new license
    assert_eq!(
        l.put_license("L2", "cad", b"two", 20).unwrap().as_deref(),
        Some("L1")
    );
    assert!(l.lease(&a.id).unwrap().is_some());
    assert_eq!(l.seats_in_use("cad", CountMode::Vm, 21).unwrap().0, 1);
    assert!(matches!(
        l.remove_license("L1", 22),
        Err(LedgerError::UnknownLicense { .. })
    ));
    // removing the product's license ends leases drawn from the one it replaced too
    let b = l
        .acquire(&AcquireRequest {
            license_id: "L2",
            ..req("vm-b", "cad", CountMode::Vm, 2, 23)
        })
        .unwrap();
    let mut ended: Vec<String> = l
        .remove_license("L2", 24)
        .unwrap()
        .into_iter()
        .map(|x| x.id)
        .collect();
    ended.sort();
    let mut want = vec![a.id.clone(), b.id.clone()];
    want.sort();
    assert_eq!(ended, want);
    // other products are untouched
    assert_eq!(l.leases().unwrap(), vec![l.lease(&s.id).unwrap().unwrap()]);
    assert_eq!(l.seats_in_use("cad", CountMode::Vm, 25).unwrap().0, 0);
}

#[test]
fn history_records_every_change_in_order() {
    use HistoryEvent::*;
    let d = tempfile::tempdir().unwrap();
    let l = Ledger::open(&d.path().join("l.redb")).unwrap();
    l.put_license("L1", "cad", b"x", 1).unwrap();
    let a = l
        .acquire(&req("vm-a", "cad", CountMode::Access, 1, 2))
        .unwrap();
    l.acquire(&req("vm-b", "cad", CountMode::Access, 1, 3))
        .unwrap_err();
    // the service's count of that refusal
    l.append_history(
        vec![(
            Refused,
            Some("vm-b".into()),
            Some("cad".into()),
            "1 request for 'cad' refused (seats_exhausted)".into(),
        )],
        3,
    )
    .unwrap();
    l.renew(&a.id, 60, 4).unwrap();
    l.release(&a.id, "app exited", 5).unwrap();
    let b = l
        .acquire(&req("vm-b", "cad", CountMode::Access, 1, 6))
        .unwrap();
    l.expire(1000).unwrap();
    let c = l
        .acquire(&req("vm-c", "cad", CountMode::Access, 1, 1001))
        .unwrap();
    l.remove_license("L1", 1002).unwrap();

    let h = l.history(0, 100).unwrap();
    let got: Vec<(u64, u64, HistoryEvent, Option<&str>)> = h
        .iter()
        .map(|e| (e.seq, e.at, e.event.clone(), e.lease_id.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, 1, LicenseAdded, None),
            (2, 2, LeaseStarted, Some(a.id.as_str())),
            (3, 3, Refused, None),
            (4, 4, LeaseRenewed, Some(a.id.as_str())),
            (5, 5, LeaseReleased, Some(a.id.as_str())),
            (6, 6, LeaseStarted, Some(b.id.as_str())),
            (7, 1000, LeaseExpired, Some(b.id.as_str())),
            (8, 1001, LeaseStarted, Some(c.id.as_str())),
            (9, 1002, LeaseReleased, Some(c.id.as_str())),
            (10, 1002, LicenseRemoved, None),
        ]
    );
    assert_eq!(h[2].vm_uuid.as_deref(), Some("vm-b"));
    assert!(h[2].detail.contains("refused (seats_exhausted)"), "{h:?}");
    assert_eq!(h[4].detail, "app exited");
    // paging
    let page = l.history(4, 3).unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    assert!(l.history(11, 10).unwrap().is_empty());
}

/// One acquire is one durable write transaction; measure what that costs on this disk.
#[test]
fn commit_latency() {
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let l = Ledger::open(&d.path().join("l.redb")).unwrap();
    let n = 200;
    let mut lat: Vec<Duration> = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let vm = format!("vm-{}", i % 10);
        let t = Instant::now();
        ids.push(
            l.acquire(&req(&vm, "cad", CountMode::None, 0, 100))
                .unwrap()
                .id,
        );
        lat.push(t.elapsed());
    }
    let t = Instant::now();
    for id in &ids {
        l.release(id, "done", 101).unwrap();
    }
    let rel = t.elapsed() / n as u32;
    lat.sort();
    let p = |q: f64| lat[((n as f64 - 1.0) * q) as usize];
    eprintln!(
        "ledger commit latency over {n} acquires: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}; release mean {rel:?}",
        p(0.5),
        p(0.9),
        p(0.99),
        lat[n - 1]
    );
    // a sanity bound, not a benchmark: a commit taking longer than this means something is broken
    assert!(p(0.5) < Duration::from_millis(500), "p50 {:?}", p(0.5));
}
