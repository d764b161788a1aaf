//! The redb seat ledger on real files: seat counting per mode, expiry, renew, release, license
//! replace/remove, history, persistence, corrupt input, and a property test against a model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::signed::CountMode;
use hostbind_proxy::ledger::{AcquireRequest, HistoryEvent, Ledger, LedgerError};
use proptest::prelude::*;
use std::collections::HashMap;

mod ledger_common;
use ledger_common::req;

fn open() -> (tempfile::TempDir, Ledger) {
    let d = tempfile::tempdir().unwrap();
    let l = Ledger::open(&d.path().join("l.redb")).unwrap();
    (d, l)
}

#[test]
fn vm_mode_counts_vms_access_counts_leases_none_counts_nothing() {
    let (_d, l) = open();
    for _ in 0..3 {
        l.acquire(&req("vm-a", "cad", CountMode::Vm, 2, 100))
            .unwrap();
    }
    l.acquire(&req("vm-b", "cad", CountMode::Vm, 2, 100))
        .unwrap();
    match l.acquire(&req("vm-c", "cad", CountMode::Vm, 2, 100)) {
        Err(LedgerError::SeatsExhausted {
            in_use,
            seats,
            holders,
            ..
        }) => {
            assert_eq!((in_use, seats), (2, 2));
            assert_eq!(holders, vec!["vm-a", "vm-b"]);
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(l.seats_in_use("cad", CountMode::Vm, 100).unwrap().0, 2);

    l.acquire(&req("vm-a", "sim", CountMode::Access, 2, 100))
        .unwrap();
    l.acquire(&req("vm-a", "sim", CountMode::Access, 2, 100))
        .unwrap();
    let e = l
        .acquire(&req("vm-b", "sim", CountMode::Access, 2, 100))
        .unwrap_err();
    assert!(
        e.to_string().contains("2 of 2 seats in use by vm-a (2)"),
        "{e}"
    );

    for _ in 0..10 {
        l.acquire(&req("vm-c", "free", CountMode::None, 0, 100))
            .unwrap();
    }
    // refusals cost no history entry each (the service writes counts per interval)
    let h = l.history(0, 1000).unwrap();
    assert_eq!(
        h.iter()
            .filter(|e| e.event == HistoryEvent::Refused)
            .count(),
        0
    );
    assert!(h.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[test]
fn expiry_renew_release_and_release_where() {
    let (_d, l) = open();
    let a = l
        .acquire(&req("vm-a", "cad", CountMode::Vm, 1, 100))
        .unwrap();
    assert!(l
        .acquire(&req("vm-b", "cad", CountMode::Vm, 1, 150))
        .is_err());
    // renew extends from now
    let r = l.renew(&a.id, 60, 150).unwrap();
    assert_eq!(r.expires_at, 210);
    // an expired lease no longer counts, even before the sweep, and cannot be renewed
    let b = l
        .acquire(&req("vm-b", "cad", CountMode::Vm, 1, 211))
        .unwrap();
    assert!(matches!(
        l.renew(&a.id, 60, 300),
        Err(LedgerError::UnknownLease { .. })
    ));
    assert!(l.lease(&a.id).unwrap().is_none());
    // sweep
    let gone = l.expire(271).unwrap();
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].id, b.id);
    // release and release_where
    let c = l
        .acquire(&req("vm-c", "cad", CountMode::Access, 5, 300))
        .unwrap();
    l.acquire(&req("vm-c", "sim", CountMode::Access, 5, 300))
        .unwrap();
    l.acquire(&req("vm-d", "sim", CountMode::Access, 5, 300))
        .unwrap();
    assert_eq!(l.release(&c.id, "test", 301).unwrap().id, c.id);
    assert!(matches!(
        l.release(&c.id, "test", 301),
        Err(LedgerError::UnknownLease { .. })
    ));
    let v = l
        .release_where(|x| x.vm_uuid == "vm-c", "vm stopped", 302)
        .unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(l.leases().unwrap().len(), 1);
    let h = l.history(0, 1000).unwrap();
    assert!(h
        .iter()
        .any(|e| e.event == HistoryEvent::LeaseExpired
            && e.lease_id.as_deref() == Some(a.id.as_str())));
    assert!(h
        .iter()
        .any(|e| e.event == HistoryEvent::LeaseReleased && e.detail == "vm stopped"));
}

#[test]
fn licenses_replace_per_product_and_removal_ends_leases() {
    let (_d, l) = open();
    assert_eq!(l.put_license("L1", "cad", b"one", 1).unwrap(), None);
    assert_eq!(
        l.put_license("L2", "cad", b"two", 2).unwrap(),
        Some("L1".into())
    );
    l.put_license("S1", "sim", b"sim", 3).unwrap();
    let ids: Vec<String> = l.licenses().unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, vec!["L2", "S1"]);
    let mut r = req("vm-a", "cad", CountMode::Vm, 1, 10);
    r.license_id = "L2";
    l.acquire(&r).unwrap();
    let ended = l.remove_license("L2", 11).unwrap();
    assert_eq!(ended.len(), 1);
    assert!(l.leases().unwrap().is_empty());
    assert!(matches!(
        l.remove_license("L2", 12),
        Err(LedgerError::UnknownLicense { .. })
    ));
}

#[test]
fn survives_reopen_and_refuses_a_second_opener() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("l.redb");
    let id = {
        let l = Ledger::open(&p).unwrap();
        l.put_license("L1", "cad", b"x", 1).unwrap();
        let e = Ledger::open(&p).err().expect("second open must fail");
        assert!(e.to_string().contains("another hostbind-proxy"), "{e}");
        l.acquire(&req("vm-a", "cad", CountMode::Vm, 1, 10))
            .unwrap()
            .id
    };
    let l = Ledger::open(&p).unwrap();
    assert_eq!(l.lease(&id).unwrap().unwrap().vm_uuid, "vm-a");
    assert_eq!(l.licenses().unwrap().len(), 1);
    let n = l.history_len().unwrap();
    l.acquire(&req("vm-b", "cad", CountMode::None, 0, 11))
        .unwrap();
    assert_eq!(l.history_len().unwrap(), n + 1);
    assert_eq!(
        l.history(n + 1, 10).unwrap().len(),
        1,
        "history seq numbers start at 1"
    );
}

#[test]
fn garbage_file_is_a_clear_error_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("l.redb");
    std::fs::write(&p, vec![0x5a; 8192]).unwrap();
    let e = Ledger::open(&p).err().expect("garbage must not open");
    assert!(e.to_string().contains("cannot open the seat ledger"), "{e}");
}

#[derive(Debug, Clone)]
enum Op {
    Acquire(u8),
    Renew(u8),
    Release(u8),
    Tick(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4).prop_map(Op::Acquire),
        (0u8..16).prop_map(Op::Renew),
        (0u8..16).prop_map(Op::Release),
        (0u8..40).prop_map(Op::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn matches_a_simple_model_and_never_exceeds_seats(ops in proptest::collection::vec(op(), 1..60), seats in 1u32..3, vm_mode in any::<bool>()) {
        let mode = if vm_mode { CountMode::Vm } else { CountMode::Access };
        let (_d, l) = open();
        let mut now = 1000u64;
        let mut model: HashMap<String, (String, u64)> = HashMap::new(); // id -> (vm, expires)
        let mut ids: Vec<String> = Vec::new();
        for o in ops {
            match o {
                Op::Acquire(v) => {
                    let vm = format!("vm-{v}");
                    let live: Vec<&(String, u64)> = model.values().filter(|(_, e)| *e > now).collect();
                    let used = if vm_mode {
                        let mut vms: Vec<&String> = live.iter().map(|(v, _)| v).collect();
                        vms.sort();
                        vms.dedup();
                        (vms.len() as u32, vms.contains(&&vm))
                    } else {
                        (live.len() as u32, false)
                    };
                    let expect_ok = used.1 || used.0 < seats;
                    let r = l.acquire(&AcquireRequest { ttl_secs: 30, ..req(&vm, "a", mode, seats, now) });
                    prop_assert_eq!(r.is_ok(), expect_ok, "acquire {} at {}", vm, now);
                    if let Ok(lease) = r {
                        model.insert(lease.id.clone(), (vm, now + 30));
                        ids.push(lease.id);
                    }
                }
                Op::Renew(i) => {
                    if let Some(id) = ids.get(i as usize) {
                        let live = model.get(id).map(|(_, e)| *e > now).unwrap_or(false);
                        let r = l.renew(id, 30, now);
                        prop_assert_eq!(r.is_ok(), live);
                        if live {
                            if let Some(m) = model.get_mut(id) { m.1 = now + 30; }
                        } else {
                            model.remove(id);
                        }
                    }
                }
                Op::Release(i) => {
                    if let Some(id) = ids.get(i as usize) {
                        let known = model.remove(id).is_some();
                        prop_assert_eq!(l.release(id, "t", now).is_ok(), known);
                    }
                }
                Op::Tick(s) => {
                    now += s as u64;
                    let gone = l.expire(now).unwrap();
                    for g in gone {
                        prop_assert!(model.remove(&g.id).is_some());
                    }
                    model.retain(|_, (_, e)| *e > now);
                }
            }
            let (in_use, _) = l.seats_in_use("a", mode, now).unwrap();
            prop_assert!(in_use <= seats);
        }
    }
}
