//! Renewal durability: a renewal returns without waiting for the commit of its new expiry, a
//! release after queued renewals stays a release, and a failed background commit degrades the
//! ledger like any other. Commits are held back or failed through the test hook (group.rs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use std::sync::mpsc;

const LIC: &str = "L1";

fn request(vm: &str, now: u64, seats: u32, mode: CountMode) -> AcquireRequest<'_> {
    AcquireRequest {
        vm_uuid: vm,
        vm_name: vm,
        product: "cad",
        license_id: LIC,
        features: &[],
        scope: LeaseScope::Vm,
        pid: None,
        pid_start: None,
        ttl_secs: 100,
        now,
        seats,
        mode,
    }
}

fn acquire(l: &Ledger, vm: &str, now: u64) -> Lease {
    l.acquire(&request(vm, now, 0, CountMode::None)).unwrap()
}

/// The lease as the file holds it (not the mirror), None when the file has none.
fn on_disk(l: &Ledger, id: &str) -> Option<Lease> {
    l.read_tx(|tx| {
        let t = tx.open_table(LEASES).map_err(storage)?;
        let v = t.get(id).map_err(storage)?;
        v.map(|v| record::open::<Lease>("leases", id.as_bytes(), id, v.value()))
            .transpose()
    })
    .unwrap()
}

fn set_hold(l: &Ledger, hold: bool) {
    let (m, cv) = &l.core.hook;
    m.lock().unwrap().hold = hold;
    cv.notify_all();
}

/// Waits until at least one commit is held back by the hook (the writer thread, or a waiter).
fn wait_until_held(l: &Ledger) {
    let (m, cv) = &l.core.hook;
    let mut h = m.lock().unwrap();
    while h.held == 0 {
        h = cv.wait(h).unwrap();
    }
}

/// Runs `f` on another thread and returns its result, or None if it has not returned within
/// `secs` (a liveness bound for a call that must not block on a held-back commit).
fn within<R: Send + 'static>(secs: u64, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}

#[test]
fn renewal_completes_while_the_commit_of_its_expiry_is_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let l = Arc::new(Ledger::open(&dir.path().join("ledger.redb")).unwrap());
    let lease = acquire(&l, "vm-a", 1_000);
    assert_eq!(on_disk(&l, &lease.id).unwrap().expires_at, 1_100);
    set_hold(&l, true);
    let (l2, id) = (l.clone(), lease.id.clone());
    // Before the fix the renewal committed (fsync) before returning, so it blocked here.
    let renewed = within(60, move || l2.renew(&id, 100, 1_050))
        .expect("the renewal waited for its commit")
        .unwrap();
    assert_eq!(renewed.expires_at, 1_150);
    // The writer thread took the renewal and is held at its commit: the file still has the
    // grant's expiry, the mirror the renewal's.
    wait_until_held(&l);
    assert_eq!(on_disk(&l, &lease.id).unwrap().expires_at, 1_100);
    assert_eq!(l.lease(&lease.id).unwrap().unwrap().expires_at, 1_150);
    set_hold(&l, false);
    // Committed in the background; a release (durable) after it cannot overtake it.
    l.core.flush();
    assert_eq!(on_disk(&l, &lease.id).unwrap().expires_at, 1_150);
}

#[test]
fn release_after_queued_renewals_is_not_undone_by_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let l = Arc::new(Ledger::open(&path).unwrap());
    let lease = acquire(&l, "vm-a", 1_000);
    let other = acquire(&l, "vm-b", 1_000);
    set_hold(&l, true);
    let (l2, a, b) = (l.clone(), lease.id.clone(), other.id.clone());
    within(60, move || {
        for i in 1..=5 {
            l2.renew(&a, 100, 1_000 + i).unwrap();
            l2.renew(&b, 100, 1_000 + i).unwrap();
        }
    })
    .expect("a renewal waited for its commit");
    wait_until_held(&l);
    // The release waits for its commit, which is queued behind the renewals.
    let (l2, id) = (l.clone(), lease.id.clone());
    let release = std::thread::spawn(move || l2.release(&id, "test", 1_010));
    for i in 6..=8 {
        l.renew(&other.id, 100, 1_000 + i).unwrap();
    }
    set_hold(&l, false);
    release.join().unwrap().unwrap();
    assert!(
        on_disk(&l, &lease.id).is_none(),
        "a renewal brought the released lease back"
    );
    l.core.flush();
    assert!(on_disk(&l, &lease.id).is_none());
    assert_eq!(on_disk(&l, &other.id).unwrap().expires_at, 1_108);
    // History: every renewal of the released lease comes before its release.
    let h = l.history(0, 1_000).unwrap();
    let mine: Vec<&HistoryEvent> = h
        .iter()
        .filter(|e| e.lease_id.as_deref() == Some(lease.id.as_str()))
        .map(|e| &e.event)
        .collect();
    assert_eq!(mine.first(), Some(&&HistoryEvent::LeaseStarted));
    assert_eq!(mine.last(), Some(&&HistoryEvent::LeaseReleased));
    assert_eq!(mine.len(), 7);
    drop(l);
    let again = Ledger::open(&path).unwrap();
    assert!(again.lease(&lease.id).unwrap().is_none());
    assert_eq!(again.lease(&other.id).unwrap().unwrap().expires_at, 1_108);
}

#[test]
fn failed_background_commit_of_a_renewal_degrades_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let l = Ledger::open(&path).unwrap();
    let lease = acquire(&l, "vm-a", 1_000);
    l.core.hook.0.lock().unwrap().fail = Some(LedgerError::Storage {
        reason: "injected write failure".into(),
        disk_full: true,
    });
    // The renewal itself succeeds (it does not wait); its commit fails in the writer thread.
    assert_eq!(l.renew(&lease.id, 100, 1_050).unwrap().expires_at, 1_150);
    // The failure degraded the ledger and the healer wrote the mirror back: the history says
    // so, counting the renewal, and the file has the renewed expiry.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let restored = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the ledger did not recover from the injected failure"
        );
        let h = l.history(0, 1_000).unwrap();
        if let Some(e) = h
            .into_iter()
            .find(|e| e.event == HistoryEvent::DurabilityRestored)
        {
            break e;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        restored
            .detail
            .contains("(1 renewals not recorded one by one"),
        "{}",
        restored.detail
    );
    assert!(restored.detail.contains("injected write failure"));
    assert!(l.health().commit_failures_total >= 1);
    assert_eq!(on_disk(&l, &lease.id).unwrap().expires_at, 1_150);
}

#[test]
fn clean_shutdown_commits_queued_renewals() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let l = Ledger::open(&path).unwrap();
    let lease = acquire(&l, "vm-a", 1_000);
    for i in 1..=50 {
        l.renew(&lease.id, 100, 1_000 + i).unwrap();
    }
    drop(l);
    let again = Ledger::open(&path).unwrap();
    assert_eq!(again.lease(&lease.id).unwrap().unwrap().expires_at, 1_150);
}

fn acquire_counted(
    l: &Ledger,
    vm: &str,
    seats: u32,
    reserved: &[(String, u32)],
) -> Result<Lease, LedgerError> {
    l.acquire_reserved(&request(vm, 1_000, seats, CountMode::Access), reserved)
}

/// A reserving VM's release racing other VMs' admissions: the admission port saw the
/// reservation in use and would have let another VM count against every seat; the ledger
/// takes the now unused reservation off the seats at the grant itself, so the released
/// reserved seats stay the reserving VM's.
#[test]
fn reserved_seats_released_between_admission_and_grant_stay_reserved() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
    let y: Vec<Lease> = (0..2)
        .map(|_| acquire_counted(&l, "vm-y", 3, &[]).unwrap())
        .collect();
    let reserved = vec![("vm-y".to_string(), 2)];
    // vm-a's admissions happened while vm-y held both: the limit they saw was 3.
    acquire_counted(&l, "vm-a", 3, &reserved).unwrap();
    for lease in &y {
        l.release(&lease.id, "released by the guest", 1_000)
            .unwrap();
    }
    // vm-a's next grants: vm-y's 2 reserved seats are unused now, 3 - 2 = 1 seat for vm-a,
    // which it holds already.
    let e = acquire_counted(&l, "vm-a", 3, &reserved).unwrap_err();
    assert!(
        matches!(e, LedgerError::SeatsExhausted { seats: 1, .. }),
        "{e:?}"
    );
    // vm-y gets its seats back.
    acquire_counted(&l, "vm-y", 3, &[]).unwrap();
    acquire_counted(&l, "vm-y", 3, &[]).unwrap();
}

/// A `meta` cell (the seat pool's etcd outage start) is durable across a reopen and outlives
/// the borrow of the ledger it came from; the ledger's own checks still pass with it there.
#[test]
fn meta_cell_value_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    {
        let l = Ledger::open(&path).unwrap();
        let cell = l.meta_cell("test.cell");
        assert_eq!(cell.get().unwrap(), None);
        cell.set(1_700_000_000).unwrap();
        acquire(&l, "vm-1", 10);
        assert_eq!(cell.get().unwrap(), Some(1_700_000_000));
    }
    let l = Ledger::open(&path).unwrap();
    assert_eq!(l.meta_cell("test.cell").get().unwrap(), Some(1_700_000_000));
    assert_eq!(l.leases().unwrap().len(), 1);
}
