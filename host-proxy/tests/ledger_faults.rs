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
    assert!(h.changes_not_durable >= leases.len() as u64 + 1, "{h:?}");
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
