//! VM identity and assignments from libvirt, through the real proxy service: a test-driver node
//! with several domains, CIDs and hostbind metadata (tests/fixtures/libvirt-node.xml). Guests
//! connect through the AF_VSOCK code path with their CID; the service is the daemon's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod libvirt_rig;

use hostbind_attest::wire::ErrorCode;
use hostbind_proxy::libvirt::LibvirtEvents;
use libvirt_rig::{node_uri, rig, uuid};

#[tokio::test(flavor = "multi_thread")]
async fn cids_map_to_domains_and_metadata_is_enforced() {
    let r = rig(&node_uri(), "deny", LibvirtEvents, true).await;
    r.license("cad", 2, "vm");
    r.license("sim", 5, "access");

    let st = r.lv().status();
    assert!(st.connected, "{st:?}");
    assert_eq!(st.running_domains, 9, "{st:?}"); // all but 'off'
    assert_eq!(st.with_cid, 8, "{st:?}"); // all but 'novsock'
    assert_eq!(st.cid_conflicts, vec!["CID 8: dup-a, dup-b".to_string()]);

    // CID -> domain: the identity the guest gets is libvirt's, not anything it says.
    let (mut web, ack) = r.guest(5).await;
    assert_eq!(
        (ack.vm.name.as_str(), ack.vm.uuid.as_str()),
        ("web", uuid(1).as_str())
    );
    let (mut db, ack) = r.guest(6).await;
    assert_eq!(
        (ack.vm.name.as_str(), ack.vm.uuid.as_str()),
        ("db", uuid(2).as_str())
    );

    // metadata assignment enforced: web may use cad only, db sim only
    web.token("cad").await.unwrap();
    let (code, msg) = web.token("sim").await.unwrap_err();
    assert_eq!(code, ErrorCode::NoLicense, "{msg}");
    assert!(
        msg.contains("VM 'web' may not use product 'sim'")
            && msg.contains("assigns only cad (reserve 1)")
            && msg.contains("hostbind-proxy vm assign web --product sim"),
        "{msg}"
    );
    db.token("sim").await.unwrap();
    let (code, msg) = db.token("cad").await.unwrap_err();
    assert_eq!(code, ErrorCode::NoLicense, "{msg}");

    // no assignment + unassigned = "deny"
    let (mut build, _) = r.guest(7).await;
    let (code, msg) = build.token("cad").await.unwrap_err();
    assert_eq!(code, ErrorCode::NoLicense);
    assert!(
        msg.contains("no hostbind assignment") && msg.contains("deny"),
        "{msg}"
    );

    // a malformed assignment gives nothing, and says why
    let (mut broken, _) = r.guest(13).await;
    let (code, msg) = broken.token("cad").await.unwrap_err();
    assert_eq!(code, ErrorCode::NoLicense);
    assert!(msg.contains("reserve='lots' is not a number"), "{msg}");

    // unknown CIDs are refused with a clear error: none, a shut-off domain's, a shared one
    for (cid, want) in [
        (42, "vsock CID 42 belongs to no running libvirt domain"),
        (9, "vsock CID 9 belongs to no running libvirt domain"),
        (
            8,
            "claimed by several running libvirt domains (dup-a, dup-b)",
        ),
    ] {
        let (code, msg) = r.connect(cid).hello().await.unwrap_err();
        assert_eq!(code, ErrorCode::UnknownVm, "{msg}");
        assert!(msg.contains(want), "{msg}");
    }
    assert!(
        r.svc
            .counters
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );

    // the lease is recorded against the domain's UUID and name
    let l = r.leases_of(&uuid(1));
    assert_eq!(l.len(), 1);
    assert_eq!(
        (l[0].vm_name.as_str(), l[0].product.as_str()),
        ("web", "cad")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reservations_keep_seats_for_their_domain() {
    // unassigned = allow: 'build' (no assignment) may use anything licensed
    let r = rig(&node_uri(), "allow", LibvirtEvents, true).await;
    r.license("cad", 2, "vm");
    r.license("sim", 1, "access");
    let (mut build, _) = r.guest(7).await;
    build.token("sim").await.unwrap();

    // cad: 2 seats, web (CID 5) reserves 1: the other VMs share the one left.
    let (mut cadder, _) = r.guest(10).await;
    let (mut cad2, _) = r.guest(11).await;
    let (mut web, _) = r.guest(5).await;
    cadder.token("cad").await.unwrap();
    let (code, msg) = cad2.token("cad").await.unwrap_err();
    assert_eq!(code, ErrorCode::SeatsExhausted, "{msg}");
    assert!(
        msg.contains("1 of the license's 2 seats are reserved for other VMs")
            && msg.contains("web (1)"),
        "{msg}"
    );
    // the reserved seat is web's
    web.token("cad").await.unwrap();
    // all seats in use now; refused without a reservation note
    let (code, msg) = cad2.token("cad").await.unwrap_err();
    assert_eq!(code, ErrorCode::SeatsExhausted);
    assert!(!msg.contains("reserved"), "{msg}");
    // Both refusals of cad2 are counted into one history entry per interval (refusals.rs).
    r.svc.flush_refusals();
    let refused: Vec<_> = r
        .history()
        .into_iter()
        .filter(|h| h.event == hostbind_proxy::ledger::HistoryEvent::Refused)
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0]
            .detail
            .starts_with("2 requests for 'cad' refused (seats_exhausted)"),
        "{refused:?}"
    );
}
