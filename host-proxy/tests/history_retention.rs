//! Ledger history retention (`[history] max_age`, `max_entries`): the oldest entries go first,
//! by age and by count, in short transactions; the newest entry always stays, so sequence
//! numbers go on after a restart; leases are untouched.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::signed::CountMode;
use hostbind_proxy::ledger::{AcquireRequest, HistoryEvent, LeaseScope, Ledger};

fn note(l: &Ledger, at: u64, n: usize) {
    let entries = (0..n)
        .map(|i| {
            (
                HistoryEvent::Refused,
                Some("vm-a".to_string()),
                None,
                format!("entry {i} at {at}"),
            )
        })
        .collect();
    l.append_history(entries, at).unwrap();
}

fn seqs(l: &Ledger) -> Vec<u64> {
    l.history(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect()
}

#[test]
fn history_is_pruned_by_age_and_count_oldest_first() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("l.redb");
    let l = Ledger::open(&p).unwrap();
    let lease = l
        .acquire(&AcquireRequest {
            vm_uuid: "vm-a",
            vm_name: "a",
            product: "cad",
            license_id: "L1",
            features: &[],
            scope: LeaseScope::Vm,
            pid: None,
            pid_start: None,
            ttl_secs: 1_000_000,
            now: 1,
            seats: 1,
            mode: CountMode::Vm,
        })
        .unwrap();
    for at in 2..=10 {
        note(&l, at, 1);
    }
    assert_eq!(l.history_len().unwrap(), 10);
    // By age: entries before 20 - 13 = 7 go (the lease start at 1 and the notes at 2..=6).
    assert_eq!(l.prune_history(13, 1_000_000, 20).unwrap(), 6);
    assert_eq!(seqs(&l), vec![7, 8, 9, 10]);
    // By count: the newest 2 stay.
    assert_eq!(l.prune_history(1_000_000, 2, 20).unwrap(), 2);
    assert_eq!(seqs(&l), vec![9, 10]);
    // Even when everything is old, the newest entry stays ...
    assert_eq!(l.prune_history(0, 1, 10_000).unwrap(), 1);
    assert_eq!(seqs(&l), vec![10]);
    // ... and the leases are untouched.
    assert_eq!(l.leases().unwrap(), vec![lease]);
    // After a restart the next entry goes on from there.
    drop(l);
    let l = Ledger::open(&p).unwrap();
    note(&l, 11, 1);
    assert_eq!(seqs(&l), vec![10, 11]);
}

#[test]
fn history_flood_is_pruned_in_chunks_down_to_the_cap() {
    let d = tempfile::tempdir().unwrap();
    let l = Ledger::open(&d.path().join("l.redb")).unwrap();
    note(&l, 5, 12_345);
    assert_eq!(l.prune_history(1_000_000, 1_000, 10).unwrap(), 11_345);
    assert_eq!(l.history_len().unwrap(), 1_000);
    assert_eq!(seqs(&l).first(), Some(&11_346));
    assert_eq!(l.prune_history(1_000_000, 1_000, 10).unwrap(), 0);
}
