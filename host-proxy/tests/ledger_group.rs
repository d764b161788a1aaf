//! Group commit of the seat ledger: many threads acquiring, renewing and releasing at once each
//! get their own lease, seat limits hold across concurrent batches, every returned change is on
//! disk when the ledger is reopened, and history has one entry per change with no gaps.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::signed::CountMode;
use hostbind_proxy::ledger::{AcquireRequest, HistoryEvent, LeaseScope, Ledger, LedgerError};
use std::collections::BTreeSet;
use std::sync::Arc;

mod ledger_common;

fn req<'a>(vm: &'a str, product: &'a str, seats: u32, now: u64) -> AcquireRequest<'a> {
    AcquireRequest {
        scope: LeaseScope::Vm,
        pid: None,
        pid_start: None,
        ..ledger_common::req(vm, product, CountMode::Access, seats, now)
    }
}

#[test]
fn concurrent_changes_are_all_durable_and_history_is_complete() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("l.redb");
    let l = Arc::new(Ledger::open(&p).unwrap());
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let l = l.clone();
            std::thread::spawn(move || {
                let vm = format!("vm{t}");
                let mut kept = Vec::new();
                for i in 0..40u64 {
                    let a = l.acquire(&req(&vm, "p", 10_000, 1000 + i)).unwrap();
                    let r = l.renew(&a.id, 600, 1001 + i).unwrap();
                    assert_eq!(r.expires_at, 1601 + i);
                    if i % 2 == 0 {
                        l.release(&a.id, "done", 1002 + i).unwrap();
                    } else {
                        kept.push(a.id);
                    }
                }
                kept
            })
        })
        .collect();
    let kept: BTreeSet<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(kept.len(), 16 * 20);
    drop(l);
    let l = Ledger::open(&p).unwrap();
    let on_disk: BTreeSet<String> = l.leases().unwrap().into_iter().map(|x| x.id).collect();
    assert_eq!(
        on_disk, kept,
        "reopened ledger holds exactly the kept leases"
    );
    let h = l.history(0, usize::MAX).unwrap();
    assert_eq!(h.len(), 16 * 40 * 2 + 16 * 20);
    for (i, e) in h.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "history sequence has no gaps");
    }
    let started = h
        .iter()
        .filter(|e| e.event == HistoryEvent::LeaseStarted)
        .count();
    assert_eq!(started, 16 * 40);
}

#[test]
fn seat_limit_holds_under_concurrent_batches() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("l.redb");
    let l = Arc::new(Ledger::open(&p).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let l = l.clone();
            std::thread::spawn(move || {
                let vm = format!("vm{t}");
                let (mut ok, mut full) = (0, 0);
                for _ in 0..10 {
                    match l.acquire(&req(&vm, "p", 25, 1000)) {
                        Ok(_) => ok += 1,
                        Err(LedgerError::SeatsExhausted { .. }) => full += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                (ok, full)
            })
        })
        .collect();
    let (ok, full) = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!((ok, full), (25, 55));
    drop(l);
    let l = Ledger::open(&p).unwrap();
    assert_eq!(l.leases().unwrap().len(), 25);
    let refused = l
        .history(0, usize::MAX)
        .unwrap()
        .iter()
        .filter(|e| e.event == HistoryEvent::Refused)
        .count();
    // refusals are not written one by one (the service counts them, refusals.rs)
    assert_eq!(refused, 0);
}
