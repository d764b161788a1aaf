//! The real `hostbind-proxy run` daemon on a real swtpm, driven over its per-VM Unix sockets with
//! the wire protocol and through its admin commands: seat limits per count mode, token chain,
//! bad frames, TTL expiry with pushed events, restart and kill -9 durability.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures::{SinkExt, StreamExt};
use hostbind_attest::files::VendorPublicKeyFile;
use hostbind_attest::keys::VendorPublicKey;
use hostbind_attest::signed::from_cbor;
use hostbind_attest::verify::{verify_token, Expectation};
use hostbind_attest::wire::{
    Body, ErrorCode, EventKind, FrameCodec, Hello, Message, Release, Renew, Scope, TokenRequest,
};
use hostbind_testkit::host::{Host, Vendor};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

mod wire_guest;
use wire_guest::WireGuest;

type Guest = WireGuest<UnixStream>;

/// A guest on `sock` that has said hello.
async fn connect(sock: &Path) -> Guest {
    let mut g = WireGuest::new(UnixStream::connect(sock).await.unwrap());
    g.hello().await.unwrap();
    g
}

fn vendor_pub(v: &Vendor) -> VendorPublicKey {
    let f: VendorPublicKeyFile = from_cbor("pub", &std::fs::read(v.public()).unwrap()).unwrap();
    VendorPublicKey::from_bytes(&f.key).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn add_license(h: &Host, v: &Vendor, product: &str, seats: u32, mode: &str) {
    let lic = h.issue_license(v, product, seats, mode, &[]).unwrap();
    let out = h
        .proxy_ok(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
    assert!(out.contains(&format!("for '{product}'")), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn seat_limits_per_count_mode_and_verifiable_tokens() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a", "vm-b", "vm-c"], "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 2, "vm");
    add_license(&h, &v, "sim", 2, "access");
    add_license(&h, &v, "viewer", 0, "none");
    let vp = vendor_pub(&v);
    let mut a = connect(&h.vm("vm-a").unwrap().socket).await;
    let mut b = connect(&h.vm("vm-b").unwrap().socket).await;
    let mut c = connect(&h.vm("vm-c").unwrap().socket).await;

    // vm mode: many processes of one VM hold one seat; the third VM is refused, naming holders.
    let t1 = a
        .token_with("cad", Scope::Process, Some(100), Some(b"nonce-one"))
        .await
        .unwrap();
    a.token_with("cad", Scope::Process, Some(101), None)
        .await
        .unwrap();
    a.token_with("cad", Scope::Vm, None, None).await.unwrap();
    let tb = b.token_with("cad", Scope::Vm, None, None).await.unwrap();
    let (code, msg) = c
        .token_with("cad", Scope::Vm, None, None)
        .await
        .unwrap_err();
    assert_eq!(code, ErrorCode::SeatsExhausted);
    assert!(
        msg.contains("'cad'")
            && msg.contains("2 of 2")
            && msg.contains("vm-a")
            && msg.contains("vm-b"),
        "{msg}"
    );
    // the token verifies offline with only the vendor key; VM identity is the host's, not the guest's
    let vt = verify_token(
        &t1.token,
        &vp,
        now(),
        &Expectation::product("cad").nonce(*b"nonce-one"),
    )
    .unwrap();
    assert_eq!(vt.claims.vm_name, "vm-a");
    assert_eq!(vt.claims.vm_uuid, h.vm("vm-a").unwrap().uuid);
    assert_eq!(hex::encode(&vt.claims.host_id), h.host_id);
    assert_eq!(vt.claims.scope, "process");
    // releasing b's seat lets c in
    assert!(matches!(
        b.call(Body::Release(Release {
            lease_id: tb.lease_id.clone()
        }))
        .await,
        Body::Ack(_)
    ));
    c.token_with("cad", Scope::Vm, None, None).await.unwrap();
    // releasing someone else's lease is refused
    match c
        .call(Body::Release(Release {
            lease_id: t1.lease_id.clone(),
        }))
        .await
    {
        Body::Error(e) => assert_eq!(e.code, ErrorCode::UnknownLease),
        o => panic!("{o:?}"),
    }

    // access mode: every lease is a seat, even from one VM
    a.token_with("sim", Scope::Process, Some(1), None)
        .await
        .unwrap();
    a.token_with("sim", Scope::Process, Some(2), None)
        .await
        .unwrap();
    let (code, msg) = b
        .token_with("sim", Scope::Process, Some(3), None)
        .await
        .unwrap_err();
    assert_eq!(code, ErrorCode::SeatsExhausted, "{msg}");
    assert!(msg.contains("vm-a (2)"), "{msg}");

    // none: never counted
    for i in 0..5 {
        c.token_with("viewer", Scope::Process, Some(i), None)
            .await
            .unwrap();
    }
    // no license at all
    let (code, msg) = a
        .token_with("unknown-product", Scope::Vm, None, None)
        .await
        .unwrap_err();
    assert_eq!(code, ErrorCode::NoLicense);
    assert!(
        msg.contains("no license for product 'unknown-product'"),
        "{msg}"
    );

    // admin view agrees
    let st = h.proxy_ok(&["status"]).unwrap();
    assert!(st.contains("cad") && st.contains("seats 2/2"), "{st}");
    let leases = h.proxy_ok(&["leases"]).unwrap();
    assert!(leases.contains("in VM vm-c"), "{leases}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_frames_get_an_error_and_close_while_others_are_served() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a", "vm-b"], "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 5, "vm");
    let sock = h.vm("vm-a").unwrap().socket.clone();
    let mut good = connect(&h.vm("vm-b").unwrap().socket).await;

    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "garbage",
            [&[0, 0, 0, 8][..], b"\xff\xfe garbage"].concat()[..12].to_vec(),
            ErrorCode::Malformed,
        ),
        (
            "oversized",
            vec![0, 2, 0, 0, 1, 2, 3],
            ErrorCode::FrameTooLarge,
        ),
        ("zero length", vec![0, 0, 0, 0], ErrorCode::Malformed),
        (
            "wrong version",
            {
                let m: Message<Body> = Message {
                    v: 7,
                    id: 42,
                    body: Body::Ack(Default::default()),
                };
                hostbind_attest::wire::encode_frame(&m).unwrap()
            },
            ErrorCode::UnsupportedVersion,
        ),
        (
            "truncated",
            vec![0, 0, 0, 50, 0xa3, 0x61],
            ErrorCode::Malformed,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut s = UnixStream::connect(&sock).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        if what == "truncated" {
            s.shutdown().await.unwrap();
        }
        let mut f = Framed::new(s, FrameCodec::<Body>::new());
        let m = tokio::time::timeout(Duration::from_secs(5), f.next())
            .await
            .unwrap();
        match m {
            Some(Ok(Message {
                body: Body::Error(e),
                id,
                ..
            })) => {
                assert_eq!(e.code, code, "{what}: {}", e.message);
                if what == "wrong version" {
                    assert_eq!(id, 42);
                }
            }
            other => panic!("{what}: expected an error frame, got {other:?}"),
        }
        let end = tokio::time::timeout(Duration::from_secs(5), f.next())
            .await
            .unwrap();
        assert!(
            end.is_none() || matches!(end, Some(Err(_))),
            "{what}: connection not closed: {end:?}"
        );
        // the other VM keeps being served
        good.token_with("cad", Scope::Vm, None, None).await.unwrap();
    }
    // requests before Hello are refused
    let s = UnixStream::connect(&sock).await.unwrap();
    let mut f = Framed::new(s, FrameCodec::<Body>::new());
    f.send(Message::new(
        1,
        Body::Release(Release {
            lease_id: "x".into(),
        }),
    ))
    .await
    .unwrap();
    match f.next().await {
        Some(Ok(Message {
            body: Body::Error(e),
            ..
        })) => assert_eq!(e.code, ErrorCode::UnexpectedMessage),
        o => panic!("{o:?}"),
    }
    assert!(h.proxy.as_mut().unwrap().running());
}

#[tokio::test(flavor = "multi_thread")]
async fn ttl_expiry_renew_and_admin_release_push_events() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(
        &v,
        &["vm-a"],
        "[leases]\nttl = \"6s\"\nkey_epoch = \"1m\"\nsweep_interval = \"200ms\"\n",
    )
    .unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 1, "vm");
    let mut a = connect(&h.vm("vm-a").unwrap().socket).await;
    let t = a.token_with("cad", Scope::Vm, None, None).await.unwrap();
    assert!(t.lease_expires_at <= now() + 6);
    // renewing keeps it alive past its first TTL (margins of seconds either way: the whole-second
    // expiry and a loaded machine must not decide this test)
    tokio::time::sleep(Duration::from_secs(3)).await;
    match a
        .call(Body::Renew(Renew {
            lease_id: t.lease_id.clone(),
            nonce: None,
            chain: vec![],
            tpm_fresh: false,
        }))
        .await
    {
        Body::TokenResponse(r) => assert!(r.lease_expires_at >= t.lease_expires_at + 3),
        o => panic!("{o:?}"),
    }
    while now() <= t.lease_expires_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(h.proxy_ok(&["leases"]).unwrap().contains(&t.lease_id));
    // without renewal it lapses, the VM is told, and the seat is free again
    let e = a
        .event(Duration::from_secs(12))
        .await
        .expect("no lease_expired event");
    assert_eq!(e.kind, EventKind::LeaseExpired);
    assert_eq!(e.lease_id.as_deref(), Some(t.lease_id.as_str()));
    match a
        .call(Body::Renew(Renew {
            lease_id: t.lease_id.clone(),
            nonce: None,
            chain: vec![],
            tpm_fresh: false,
        }))
        .await
    {
        Body::Error(e) => assert_eq!(e.code, ErrorCode::UnknownLease),
        o => panic!("{o:?}"),
    }
    let t2 = a.token_with("cad", Scope::Vm, None, None).await.unwrap();
    // the admin revokes it: event pushed
    let out = h.proxy_ok(&["release", &t2.lease_id]).unwrap();
    assert!(out.contains(&t2.lease_id), "{out}");
    let e = a
        .event(Duration::from_secs(3))
        .await
        .expect("no lease_revoked event");
    assert_eq!(e.kind, EventKind::LeaseRevoked);
    // an expired license is refused with a clear message
    let lic = h
        .issue_license(
            &v,
            "old",
            1,
            "vm",
            &["--not-before", "1000000000", "--valid-for", "1d"],
        )
        .unwrap();
    let out = h
        .proxy_cmd(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expired at 2001-09-10"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_survive_restart_and_kill9_under_load() {
    let v = Vendor::new().unwrap();
    let names: Vec<String> = (0..4).map(|i| format!("vm-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut h = Host::enrolled(&v, &refs, "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 0, "none");
    let mut g = connect(&h.vm("vm-0").unwrap().socket).await;
    let first = g.token_with("cad", Scope::Vm, None, None).await.unwrap();
    // orderly restart keeps the lease
    h.stop_proxy();
    h.start_proxy().unwrap();
    assert!(h.proxy_ok(&["leases"]).unwrap().contains(&first.lease_id));

    // load from 4 VMs; kill -9 in the middle; every lease the proxy answered must survive
    let answers = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for vm in &h.vms {
        let sock = vm.socket.clone();
        let answers = answers.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let Ok(s) = UnixStream::connect(&sock).await else {
                return got;
            };
            let mut f = Framed::new(s, FrameCodec::<Body>::new());
            if f.send(Message::new(
                1,
                Body::Hello(Hello {
                    agent_version: "t".into(),
                    chain: vec![],
                    facts: BTreeMap::new(),
                    known_host: None,
                }),
            ))
            .await
            .is_err()
            {
                return got;
            }
            for id in 2..100_000u64 {
                let req = Body::TokenRequest(TokenRequest {
                    product: "cad".into(),
                    features: vec![],
                    nonce: None,
                    scope: Scope::Process,
                    pid: Some(id as u32),
                    pid_start: None,
                    chain: vec![],
                    tpm_fresh: false,
                });
                if f.send(Message::new(id, req)).await.is_err() {
                    break;
                }
                loop {
                    match f.next().await {
                        Some(Ok(Message {
                            body: Body::TokenResponse(t),
                            ..
                        })) => {
                            got.push(t.lease_id);
                            answers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            break;
                        }
                        Some(Ok(_)) => continue,
                        _ => return got,
                    }
                }
            }
            got
        }));
    }
    // The kill comes in the middle of the load: once the proxy has answered a few dozen
    // requests (however slow a loaded machine makes that), bounded by 30 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while answers.load(std::sync::atomic::Ordering::Relaxed) < 40
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.kill_proxy();
    let mut answered = Vec::new();
    for t in tasks {
        answered.extend(t.await.unwrap());
    }
    assert!(answered.len() > 20, "too little load: {}", answered.len());
    h.start_proxy().unwrap();
    let out = h.proxy_ok(&["--json", "leases"]).unwrap();
    let stored: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let ids: std::collections::HashSet<&str> =
        stored.iter().map(|l| l["id"].as_str().unwrap()).collect();
    for id in &answered {
        assert!(
            ids.contains(id.as_str()),
            "lease {id} was answered before the crash but is lost"
        );
    }
    assert!(ids.contains(first.lease_id.as_str()));
}
