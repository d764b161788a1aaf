//! Domain lifecycle through the real proxy service: libvirt's own events from the test driver
//! (destroy, undefine, start) release or restore a domain's leases at once, with history; the
//! migration events the test driver cannot produce are fed by hand with the same event type
//! (`ManualEvents`) into the same watcher; reconnecting after libvirt was unreachable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod libvirt_rig;

use hostbind_attest::wire::{ErrorCode, EventKind};
use hostbind_proxy::libvirt::{
    DomainEvent, DomainEventKind, LibvirtEvents, ManualEvents, StopReason, WatchEvent,
};
use libvirt_rig::{domain_xml, node_uri, node_xml, rig, uuid};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn destroy_and_undefine_release_leases_at_once_with_history() {
    let r = rig(&node_uri(), "allow", LibvirtEvents, true).await;
    r.license("cad", 5, "vm");
    r.license("sim", 5, "access");
    let (mut web, _) = r.guest(5).await;
    let (mut db, _) = r.guest(6).await;
    let (mut build, _) = r.guest(7).await;
    web.token("cad").await.unwrap();
    db.token("sim").await.unwrap();
    db.token("sim").await.unwrap();
    build.token("cad").await.unwrap();
    let conn = r.conn();

    // destroy: released at once (the TTL is 60 s), recorded, and the agent is told
    let t = std::time::Instant::now();
    conn.lookup_domain_by_name("web")
        .unwrap()
        .destroy()
        .unwrap();
    r.wait_for("web's lease released", || r.leases_of(&uuid(1)).is_empty())
        .await;
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(
        r.released_with(&uuid(1), "domain web stopped: destroyed (libvirt)"),
        1
    );
    let ev = web
        .event(Duration::from_secs(5))
        .await
        .expect("pushed event");
    assert_eq!(ev.kind, EventKind::LeaseRevoked);
    assert!(ev.message.contains("domain web stopped"), "{}", ev.message);
    // its CID is no longer a VM of this host
    r.wait_for("CID 5 gone", || r.lv().vm_for_cid(5).is_err())
        .await;
    let (code, msg) = r.connect(5).hello().await.unwrap_err();
    assert_eq!(code, ErrorCode::UnknownVm, "{msg}");
    // and a connection it still had open gets nothing more
    let (code, msg) = web.token("cad").await.unwrap_err();
    assert_eq!(code, ErrorCode::UnknownVm, "{msg}");
    assert!(msg.contains("is not a running libvirt domain"), "{msg}");
    // other domains keep theirs
    assert_eq!(r.leases_of(&uuid(2)).len(), 2);
    assert_eq!(r.leases_of(&uuid(3)).len(), 1);

    // undefine a running domain: it runs on (transient) and keeps its leases ...
    let dom = conn.lookup_domain_by_name("db").unwrap();
    dom.undefine().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(r.leases_of(&uuid(2)).len(), 2);
    db.token("sim").await.unwrap();
    // ... until it stops, when it is gone from libvirt altogether
    dom.destroy().unwrap();
    r.wait_for("db's leases released", || r.leases_of(&uuid(2)).is_empty())
        .await;
    assert_eq!(
        r.released_with(&uuid(2), "domain db stopped: destroyed (libvirt)"),
        3
    );
    assert!(conn.lookup_domain_by_name("db").is_err());

    // a stopped domain that starts again is picked up (STARTED rebuilds the CID map)
    conn.lookup_domain_by_name("web").unwrap().create().unwrap();
    r.wait_for("web back", || r.lv().vm_for_cid(5).is_ok())
        .await;
    let (mut web, _) = r.guest(5).await;
    web.token("cad").await.unwrap();

    // undefining a shut-off domain touches no one's leases
    let off = conn.lookup_domain_by_name("off").unwrap();
    assert!(!off.is_active().unwrap());
    off.undefine().unwrap();
    assert_eq!(r.leases_of(&uuid(3)).len(), 1, "build untouched");
}

fn ev(name: &str, n: u32, kind: DomainEventKind) -> WatchEvent {
    WatchEvent::Domain(DomainEvent {
        uuid: uuid(n),
        name: name.into(),
        kind,
    })
}

/// The test driver cannot migrate, so the migration events a real source and destination host
/// see are fed by hand (ManualEvents) to the same watcher code, while the test changes the
/// test driver's domains the way a migration would.
#[tokio::test(flavor = "multi_thread")]
async fn migration_events_release_on_the_source_and_pick_up_on_the_destination() {
    let events = ManualEvents::new();
    let r = rig(&node_uri(), "allow", events.clone(), true).await;
    r.license("cad", 3, "vm");
    let (mut web, _) = r.guest(5).await;
    web.token("cad").await.unwrap();
    let conn = r.conn();

    // source host: SUSPENDED_MIGRATED (migration running; it may still fail): leases stay
    assert!(events.send(ev("web", 1, DomainEventKind::Suspended { migrated: true })));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(r.leases_of(&uuid(1)).len(), 1);
    // the domain leaves this host, then STOPPED_MIGRATED: released at once, recorded
    conn.lookup_domain_by_name("web")
        .unwrap()
        .destroy()
        .unwrap();
    assert!(
        r.lv().vm_for_cid(5).is_ok(),
        "no event delivered yet: the CID map is unchanged"
    );
    assert!(events.send(ev("web", 1, DomainEventKind::Stopped(StopReason::Migrated))));
    r.wait_for("web released", || r.leases_of(&uuid(1)).is_empty())
        .await;
    assert_eq!(
        r.released_with(&uuid(1), "domain web migrated away (libvirt)"),
        1
    );
    r.wait_for("CID 5 gone", || r.lv().vm_for_cid(5).is_err())
        .await;

    // destination host: a domain arrives (STARTED_MIGRATED, RESUMED_MIGRATED) and is picked up
    let arrival = "6b1e0c3a-7d52-4c1e-9f00-0000000000ff";
    conn.define_domain_xml(&domain_xml("arrival", arrival, 12, &["cad"]))
        .unwrap()
        .create()
        .unwrap();
    let (code, _) = r.connect(12).hello().await.unwrap_err();
    assert_eq!(code, ErrorCode::UnknownVm, "not picked up before its event");
    assert!(events.send(WatchEvent::Domain(DomainEvent {
        uuid: arrival.into(),
        name: "arrival".into(),
        kind: DomainEventKind::Started { migrated: true },
    })));
    assert!(events.send(WatchEvent::Domain(DomainEvent {
        uuid: arrival.into(),
        name: "arrival".into(),
        kind: DomainEventKind::Resumed { migrated: true },
    })));
    r.wait_for("arrival picked up", || r.lv().vm_for_cid(12).is_ok())
        .await;
    let (mut arr, ack) = r.guest(12).await;
    assert_eq!(ack.vm.uuid, arrival);
    arr.token("cad").await.unwrap();
    // its assignment came along in its metadata: only cad
    assert_eq!(arr.token("sim").await.unwrap_err().0, ErrorCode::NoLicense);

    // a crashed guest's leases end too
    let (mut cadder, _) = r.guest(10).await;
    cadder.token("cad").await.unwrap();
    assert!(events.send(ev("cadder", 6, DomainEventKind::Crashed)));
    r.wait_for("cadder released", || r.leases_of(&uuid(6)).is_empty())
        .await;
    assert_eq!(
        r.released_with(&uuid(6), "domain cadder crashed (libvirt)"),
        1
    );

    // the connection closes (libvirtd restarted): the watcher reconnects and resyncs
    assert!(events.send(WatchEvent::Closed("test: libvirtd restarted".into())));
    r.wait_for("reconnected", || {
        let s = r.lv().status();
        s.connected && s.reconnects == 1
    })
    .await;
    // the new connection is a fresh copy of the node: 'arrival' is not in it, so its lease
    // (a domain that was running and no longer is) is ended by the resync
    r.wait_for("arrival's lease ended", || r.leases_of(arrival).is_empty())
        .await;
    assert_eq!(
        r.released_with(arrival, "domain arrival is not running (libvirt)"),
        1
    );
    assert!(r.lv().vm_for_cid(5).is_ok(), "web runs in the fresh node");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_libvirt_is_retried_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let later = dir.path().join("node.xml");
    let r = rig(
        &format!("test://{}", later.display()),
        "allow",
        LibvirtEvents,
        false,
    )
    .await;
    r.wait_for("a failed attempt", || r.lv().status().failed_attempts >= 1)
        .await;
    let st = r.lv().status();
    assert!(!st.connected);
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains("cannot connect to libvirt"),
        "{st:?}"
    );
    let (code, msg) = r.connect(5).hello().await.unwrap_err();
    assert_eq!(code, ErrorCode::UnknownVm);
    assert!(msg.contains("has not read the domains of libvirt"), "{msg}");
    // libvirt becomes reachable: the next attempt (backoff 1 s, 2 s, ...) connects
    std::fs::copy(node_xml(), &later).unwrap();
    r.wait_for("connected", || r.lv().status().connected).await;
    let (_, ack) = r.guest(5).await;
    assert_eq!(ack.vm.name, "web");
    let st = r.lv().status();
    assert_eq!(
        (st.failed_attempts, st.last_error.as_deref()),
        (0, None),
        "{st:?}"
    );
}

/// After a lost connection is made again, `status` must not keep showing the old error as if it
/// were current (it said "keepalive timeout" while connected); the loss is kept as history.
#[tokio::test(flavor = "multi_thread")]
async fn last_error_is_cleared_once_reconnected() {
    let events = ManualEvents::new();
    let r = rig(&node_uri(), "allow", events.clone(), true).await;
    assert!(events.send(WatchEvent::Closed("keepalive timeout".into())));
    r.wait_for("reconnected", || {
        let s = r.lv().status();
        s.connected && s.reconnects == 1
    })
    .await;
    let st = r.lv().status();
    assert_eq!(st.last_error, None, "{st:?}");
    let (at, why) = st.last_lost.clone().expect("the loss is recorded");
    assert_eq!(why, "keepalive timeout");
    assert!(at > 0 && st.state_age_secs.is_some(), "{st:?}");
}
