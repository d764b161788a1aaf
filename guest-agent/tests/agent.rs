//! The agent's logic against a scripted proxy speaking the real wire protocol, driven through the
//! real local API with the hostbind-client library (so these are also the client library's tests
//! against the real agent).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    next_matching, start_agent, start_agent_with, timing, token_text, wait_connected, Mode,
    ScriptedProxy,
};
use hostbind_attest::wire::{Body, ErrorCode as WireCode, Event, EventKind as WireEvent, Scope};
use hostbind_client::api::{LossReason, TokenRequest};
use hostbind_client::{ClientError, ErrorCode, EventKind};

fn vm_req(product: &str) -> TokenRequest {
    TokenRequest::new(product).with_scope(Scope::Vm)
}

#[tokio::test]
async fn hello_ack_status_and_known_host_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xa1, 60);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, Some(&proxy.host_hex())).await;

    let st = client.status().await.unwrap();
    assert!(st.connected);
    let host = st.host.unwrap();
    assert_eq!(host.vm.name, "test-vm");
    assert_eq!(host.proxy_version, "scripted-0");
    assert_eq!(host.lease_ttl_secs, 60);
    assert_eq!(st.host_address, format!("unix:{}", proxy.path.display()));
    assert!(st.leases.is_empty());

    let (_, hello) = proxy
        .wait_for(Duration::from_secs(1), |m| m.body.kind() == "hello")
        .await
        .unwrap();
    assert_eq!(hello.id, 1);
    let Body::Hello(h) = hello.body else { panic!() };
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
    // Clone detection: the first message starts the chain with one fresh id.
    assert_eq!(h.chain.len(), 1);
    assert!(
        h.facts.contains_key("hostname") && h.facts.contains_key("os"),
        "{:?}",
        h.facts
    );
    assert_eq!(h.known_host, None);

    // The host id is kept in the state dir and sent as known_host after a restart.
    let stored = std::fs::read_to_string(dir.path().join("state/last-host")).unwrap();
    assert_eq!(stored.trim(), proxy.host_hex());
    agent.shutdown().await;
    assert!(!dir.path().join("agent.sock").exists());
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;
    let hellos: Vec<_> = proxy
        .received()
        .into_iter()
        .filter_map(|(_, m)| match m.body {
            Body::Hello(h) => Some(h),
            _ => None,
        })
        .collect();
    assert_eq!(hellos.len(), 2);
    assert_eq!(
        hellos[1].known_host.as_ref().map(|h| h.as_slice()),
        Some(&proxy.host_id()[..])
    );
    // The restarted agent resumes its chain from the state dir (and appends a fresh id on
    // its first message), so the proxy sees one instance, not a fork.
    assert_eq!(hellos[1].chain.len(), 2);
    assert_eq!(hellos[1].chain[0], hellos[0].chain[0]);
    assert_ne!(hellos[1].chain[1], hellos[0].chain[0]);
    agent.shutdown().await;
}

#[tokio::test]
async fn pipelined_requests_are_matched_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xa2, 60);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;

    // The proxy answers only once all 6 requests are outstanding, in reverse order.
    proxy.hold_token_requests(6);
    let jobs: Vec<_> = (0..6)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.token(&vm_req(&format!("p{i}"))).await })
        })
        .collect();
    for (i, j) in jobs.into_iter().enumerate() {
        let r = j.await.unwrap().unwrap();
        assert_eq!(r.product, format!("p{i}"));
        assert!(token_text(&r.token).contains(&format!("product=p{i}|")));
        assert!(!r.cached);
    }
    assert_eq!(proxy.max_outstanding(), 6, "requests were not pipelined");
    let ids: Vec<u64> = proxy
        .received()
        .iter()
        .filter(|(_, m)| m.body.kind() == "token_request")
        .map(|(_, m)| m.id)
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 6);
    assert!(
        ids.iter().all(|id| *id > 1),
        "ids 0 and 1 are reserved: {ids:?}"
    );
    agent.shutdown().await;
}

#[tokio::test]
async fn cache_hit_is_local_and_nonce_always_goes_to_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xa3, 60);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;

    let req = vm_req("cad").with_features(["render", "export"]);
    let first = client.token(&req).await.unwrap();
    assert!(!first.cached);
    assert_eq!(first.host_id, proxy.host_hex());
    assert_eq!(first.scope, Scope::Vm);
    let sent = proxy.received().len();

    // Same request (features in another order): from cache, no proxy round trip.
    let req2 = vm_req("cad").with_features(["export", "render"]);
    let t0 = Instant::now();
    let n = 200;
    for _ in 0..n {
        let again = client.token(&req2).await.unwrap();
        assert!(again.cached);
        assert_eq!(again.token, first.token);
        assert_eq!(again.lease_id, first.lease_id);
    }
    let per_call = t0.elapsed() / n;
    println!("cache hit through the HTTP API: {per_call:?} per call (debug build)");
    assert_eq!(
        proxy.received().len(),
        sent,
        "a cache hit reached the proxy"
    );

    // With a nonce: always the proxy (a Renew of the same lease, no new seat).
    let with_nonce = client
        .token(
            &req2
                .clone()
                .with_nonce(vec![0xab, 0xcd, 0xab, 0xcd, 0xab, 0xcd, 0xab, 0xcd]),
        )
        .await
        .unwrap();
    assert!(!with_nonce.cached);
    assert_eq!(with_nonce.lease_id, first.lease_id);
    assert!(token_text(&with_nonce.token).ends_with("nonce=abcdabcdabcdabcd"));
    assert_eq!(proxy.count("renew"), 1);
    let with_nonce2 = client
        .token(
            &req2
                .clone()
                .with_nonce(vec![0xab, 0xcd, 0xab, 0xcd, 0xab, 0xcd, 0xab, 0xcd]),
        )
        .await
        .unwrap();
    assert_ne!(with_nonce2.token, with_nonce.token);
    assert_eq!(proxy.count("renew"), 2);
    assert_eq!(proxy.count("token_request"), 1);

    // The nonce-bound token does not replace the cached nonce-less one.
    let cached = client.token(&req2).await.unwrap();
    assert!(cached.cached);
    assert_eq!(cached.token, first.token);

    // A different scope or product is another lease.
    let other = client.token(&vm_req("cad")).await.unwrap();
    assert_ne!(other.lease_id, first.lease_id);
    assert_eq!(client.status().await.unwrap().leases.len(), 2);
    agent.shutdown().await;
}

#[tokio::test]
async fn refusals_map_to_http_statuses_with_the_proxy_message() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xa4, 60);
    proxy.set_seats("full", 0);
    proxy.refuse(
        "nolic",
        WireCode::NoLicense,
        "this host has no license for 'nolic'",
    );
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;

    match client.token(&vm_req("full")).await {
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => {
            assert_eq!((status, code), (409, ErrorCode::SeatsExhausted));
            assert!(message.contains("all 0 seats of 'full'"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match client.token(&vm_req("nolic")).await {
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => {
            assert_eq!((status, code), (403, ErrorCode::NoLicense));
            assert_eq!(message, "this host has no license for 'nolic'");
        }
        other => panic!("{other:?}"),
    }
    agent.shutdown().await;
}

#[tokio::test]
async fn not_connected_is_503_saying_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-proxy.sock");
    let (agent, client) = start_agent(dir.path(), &missing).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    match client.token(&vm_req("cad")).await {
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => {
            assert_eq!((status, code), (503, ErrorCode::NotConnected));
            assert!(message.contains("unreachable"), "{message}");
            assert!(
                message.contains(&missing.display().to_string()),
                "{message}"
            );
            assert!(
                message.contains("check that hostbind-proxy is running"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "not-connected must fail fast"
    );
    let st = client.status().await.unwrap();
    assert!(!st.connected);
    assert!(st.host.is_none());
    assert!(st.last_error.unwrap().contains("cannot connect"));
    agent.shutdown().await;
}

#[tokio::test]
async fn pushed_events_reach_apps_and_drop_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xa5, 60);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;
    let a = client.token(&vm_req("a")).await.unwrap();
    let b = client.token(&vm_req("b")).await.unwrap();
    let mut events = client.events().await.unwrap();

    proxy.push(Event {
        kind: WireEvent::LeaseRevoked,
        lease_id: Some(a.lease_id.clone()),
        product: Some("a".into()),
        message: "revoked by the host admin".into(),
    });
    let ev = next_matching(&mut events, Duration::from_secs(2), |k| {
        matches!(k, EventKind::LeaseLost { .. })
    })
    .await;
    match ev.kind {
        EventKind::LeaseLost {
            lease_id,
            product,
            reason,
            message,
            ..
        } => {
            assert_eq!(lease_id, a.lease_id);
            assert_eq!(product, "a");
            assert_eq!(reason, LossReason::Revoked);
            assert_eq!(message, "revoked by the host admin");
        }
        _ => unreachable!(),
    }
    assert!(ev.at > 0);
    proxy.push(Event {
        kind: WireEvent::LeaseExpired,
        lease_id: Some(b.lease_id.clone()),
        product: None,
        message: "expired".into(),
    });
    let ev = next_matching(&mut events, Duration::from_secs(2), |k| {
        matches!(k, EventKind::LeaseExpired { .. })
    })
    .await;
    assert!(matches!(ev.kind, EventKind::LeaseExpired { ref product, .. } if product == "b"));
    proxy.push(Event {
        kind: WireEvent::CloneDetected,
        lease_id: None,
        product: None,
        message: "chain forked".into(),
    });
    let ev = next_matching(&mut events, Duration::from_secs(2), |k| {
        matches!(k, EventKind::CloneDetected { .. })
    })
    .await;
    assert_eq!(
        ev.kind,
        EventKind::CloneDetected {
            message: "chain forked".into()
        }
    );
    assert!(client.status().await.unwrap().leases.is_empty());
    // The revoked lease is not served from cache any more: a new lease is acquired.
    let a2 = client.token(&vm_req("a")).await.unwrap();
    assert!(!a2.cached);
    assert_ne!(a2.lease_id, a.lease_id);
    agent.shutdown().await;
}

#[tokio::test]
async fn reconnects_with_growing_backoff_then_renews_on_the_same_host() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xa6, 60);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;
    let lease = client.token(&vm_req("cad")).await.unwrap();
    let mut events = client.events().await.unwrap();

    proxy.set_mode(Mode::CloseOnAccept);
    let before = proxy.accepts().len();
    let t_drop = Instant::now();
    proxy.drop_connections();
    next_matching(&mut events, Duration::from_secs(2), |k| {
        matches!(k, EventKind::Disconnected { .. })
    })
    .await;
    // Let the agent fail 6 times, then accept again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.accepts().len() < before + 6 {
        assert!(Instant::now() < deadline, "agent stopped retrying");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.set_mode(Mode::Normal);
    let attempts: Vec<Instant> = proxy.accepts()[before..].to_vec();
    let first_gap = attempts[0] - t_drop;
    assert!(
        first_gap < Duration::from_millis(300),
        "first retry after {first_gap:?}"
    );
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    println!("reconnect gaps: {gaps:?}");
    // Base delays after failures 1..5 are 200, 400, 800, 1600, 3200 ms (from 100 ms after the
    // session ended); each actual delay is in [base/2, base] plus connect time.
    let bases = [200u64, 400, 800, 1600, 3200];
    for (gap, base) in gaps.iter().zip(bases) {
        let base = Duration::from_millis(base);
        assert!(*gap >= base / 2, "gap {gap:?} < {:?}", base / 2);
        // Upper bound with slack for a loaded 2-core CI machine.
        assert!(
            *gap <= base + Duration::from_millis(500),
            "gap {gap:?} > {base:?}"
        );
    }

    let ev = next_matching(&mut events, Duration::from_secs(8), |k| {
        matches!(k, EventKind::Connected { .. })
    })
    .await;
    assert!(
        matches!(ev.kind, EventKind::Connected { ref host_id, .. } if *host_id == proxy.host_hex())
    );
    // Same host: the existing lease is renewed, not re-acquired, and no rebound.
    let (_, renew) = proxy
        .wait_for(Duration::from_secs(2), |m| m.body.kind() == "renew")
        .await
        .expect("lease not renewed after reconnect");
    match renew.body {
        Body::Renew(r) => assert_eq!(r.lease_id, lease.lease_id),
        _ => unreachable!(),
    }
    assert_eq!(proxy.count("token_request"), 1);
    let st = client.status().await.unwrap();
    assert_eq!(st.leases.len(), 1);
    assert_eq!(st.leases[0].lease_id, lease.lease_id);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = client.token(&vm_req("cad")).await.unwrap();
    assert!(again.cached);
    assert_eq!(again.lease_id, lease.lease_id);
    agent.shutdown().await;
}

#[tokio::test]
async fn unknown_lease_after_proxy_restart_is_reacquired() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xa7, 60);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;
    let lease = client.token(&vm_req("cad")).await.unwrap();
    let mut events = client.events().await.unwrap();
    proxy.forget_leases();
    proxy.drop_connections();
    let ev = next_matching(&mut events, Duration::from_secs(5), |k| {
        matches!(k, EventKind::LeaseLost { .. })
    })
    .await;
    let EventKind::LeaseLost {
        lease_id,
        reason,
        new_lease_id,
        ..
    } = ev.kind
    else {
        unreachable!()
    };
    assert_eq!(lease_id, lease.lease_id);
    assert_eq!(reason, LossReason::UnknownToHost);
    let new_id = new_lease_id.unwrap();
    assert!(proxy.leases().contains_key(&new_id));
    let t = client.token(&vm_req("cad")).await.unwrap();
    assert_eq!(t.lease_id, new_id);
    assert!(t.cached);
    agent.shutdown().await;
}

#[tokio::test]
async fn leases_are_renewed_at_half_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xa8, 2);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;
    let t0 = Instant::now();
    let first = client.token(&vm_req("cad")).await.unwrap();
    let (at, _) = proxy
        .wait_for(Duration::from_secs(3), |m| m.body.kind() == "renew")
        .await
        .expect("no renewal");
    let after = at - t0;
    assert!(
        after >= Duration::from_millis(900) && after <= Duration::from_millis(1600),
        "renewed after {after:?}, expected about 1 s (half of 2 s)"
    );
    // The renewed token replaces the cached one.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let now = client.token(&vm_req("cad")).await.unwrap();
    assert!(now.cached);
    assert_ne!(now.token, first.token);
    assert_eq!(now.lease_id, first.lease_id);
    agent.shutdown().await;
}

#[tokio::test]
async fn rebound_to_another_host_drops_tokens_and_reacquires_leases() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("proxy.sock");
    let host_a = ScriptedProxy::start(&sock, 0xaa, 60);
    let (agent, client) = start_agent(dir.path(), &sock).await;
    wait_connected(&client, Some(&host_a.host_hex())).await;
    let cad = client
        .token(&vm_req("cad").with_features(["render"]))
        .await
        .unwrap();
    let db = client.token(&vm_req("db")).await.unwrap();
    assert_eq!(cad.host_id, host_a.host_hex());
    let mut events = client.events().await.unwrap();

    // The VM migrates: host A's transport resets, host B answers on the same address.
    host_a.stop();
    drop(host_a);
    let host_b = ScriptedProxy::start(&sock, 0xbb, 60);
    host_b.set_seats("db", 0);

    let ev = next_matching(&mut events, Duration::from_secs(5), |k| {
        matches!(k, EventKind::Rebound { .. })
    })
    .await;
    let EventKind::Rebound {
        old_host,
        new_host,
        vm,
        leases,
    } = ev.kind
    else {
        unreachable!()
    };
    assert_eq!(old_host, hex::encode([0xaa; 32]));
    assert_eq!(new_host, host_b.host_hex());
    assert_eq!(vm.name, "test-vm");
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].old_lease_id, cad.lease_id);
    assert_eq!(leases[0].product, "cad");

    // Hello to B named A as the known host.
    let (_, hello) = host_b
        .wait_for(Duration::from_secs(1), |m| m.body.kind() == "hello")
        .await
        .unwrap();
    let Body::Hello(h) = hello.body else { panic!() };
    assert_eq!(
        h.known_host.as_ref().map(|h| h.as_slice()),
        Some(&[0xaa; 32][..])
    );
    // B got a token request with the same product/features/scope.
    let granted = host_b.leases();
    let rec = &granted[&leases[0].new_lease_id];
    assert_eq!(
        (rec.product.as_str(), rec.features.clone(), rec.scope),
        ("cad", vec!["render".to_string()], Scope::Vm)
    );

    // The lease B refused produced license_refused with B's message (it may have come before
    // the rebound event; check the status and a fresh request instead of event order).
    let st = client.status().await.unwrap();
    assert_eq!(st.host.unwrap().host_id, host_b.host_hex());
    assert_eq!(st.leases.len(), 1);
    assert!(st.leases.iter().all(|l| l.host_id == host_b.host_hex()));
    assert!(!st.leases.iter().any(|l| l.lease_id == db.lease_id));

    // Tokens bound to A are gone: the app now gets B's token (from the re-acquired lease).
    let t = client
        .token(&vm_req("cad").with_features(["render"]))
        .await
        .unwrap();
    assert_eq!(t.host_id, host_b.host_hex());
    assert_eq!(t.lease_id, leases[0].new_lease_id);
    assert!(token_text(&t.token).contains(&format!("host={}", &host_b.host_hex()[..8])));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("state/last-host"))
            .unwrap()
            .trim(),
        host_b.host_hex()
    );
    agent.shutdown().await;
}

#[tokio::test]
async fn rebound_refusal_is_reported_as_license_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("proxy.sock");
    let host_a = ScriptedProxy::start(&sock, 0xac, 60);
    let (agent, client) = start_agent(dir.path(), &sock).await;
    wait_connected(&client, None).await;
    let db = client.token(&vm_req("db")).await.unwrap();
    let mut events = client.events().await.unwrap();
    host_a.stop();
    drop(host_a);
    let host_b = ScriptedProxy::start(&sock, 0xbd, 60);
    host_b.set_seats("db", 0);
    let ev = next_matching(&mut events, Duration::from_secs(5), |k| {
        matches!(k, EventKind::LicenseRefused { .. })
    })
    .await;
    let EventKind::LicenseRefused {
        product,
        lease_id,
        code,
        message,
        ..
    } = ev.kind
    else {
        unreachable!()
    };
    assert_eq!(product, "db");
    assert_eq!(lease_id.as_deref(), Some(db.lease_id.as_str()));
    assert_eq!(code, ErrorCode::SeatsExhausted);
    assert!(message.contains("all 0 seats of 'db'"), "{message}");
    let ev = next_matching(&mut events, Duration::from_secs(5), |k| {
        matches!(k, EventKind::Rebound { .. })
    })
    .await;
    assert!(matches!(ev.kind, EventKind::Rebound { ref leases, .. } if leases.is_empty()));
    assert!(client.status().await.unwrap().leases.is_empty());
    agent.shutdown().await;
}

#[tokio::test]
async fn release_goes_to_the_proxy_and_unknown_leases_are_404() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xa9, 60);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;
    let t = client.token(&vm_req("cad")).await.unwrap();
    let r = client.release(&t.lease_id).await.unwrap();
    assert!(r.confirmed);
    assert!(proxy.leases().is_empty());
    assert!(client.status().await.unwrap().leases.is_empty());
    match client.release(&t.lease_id).await {
        Err(ClientError::Api { status, code, .. }) => {
            assert_eq!((status, code), (404, ErrorCode::UnknownLease));
        }
        other => panic!("{other:?}"),
    }
    // While disconnected, a release is kept and sent after reconnecting.
    let t = client.token(&vm_req("cad")).await.unwrap();
    proxy.set_mode(Mode::CloseOnAccept);
    proxy.drop_connections();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = client.release(&t.lease_id).await.unwrap();
    assert!(!r.confirmed);
    assert!(proxy.leases().contains_key(&t.lease_id));
    proxy.set_mode(Mode::Normal);
    proxy
        .wait_for(
            Duration::from_secs(5),
            |m| matches!(&m.body, Body::Release(r) if r.lease_id == t.lease_id),
        )
        .await
        .expect("queued release not sent after reconnect");
    agent.shutdown().await;
}

#[tokio::test]
async fn shutdown_releases_all_leases() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xae, 60);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;
    client.token(&vm_req("a")).await.unwrap();
    client.token(&vm_req("b")).await.unwrap();
    assert_eq!(proxy.leases().len(), 2);
    agent.shutdown().await;
    assert!(proxy.leases().is_empty());
}

#[tokio::test]
async fn bad_requests_and_a_garbage_speaking_proxy_do_not_hurt_the_agent() {
    use http_body_util::BodyExt;
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xaf, 60);
    proxy.set_mode(Mode::Garbage);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    // The garbage proxy is retried with backoff, and its error is shown.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = client.status().await.unwrap();
        if let Some(e) = st.last_error {
            assert!(e.contains("Hello"), "{e}");
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Raw HTTP: bad JSON, unknown fields, wrong paths and methods.
    async fn raw(sock: &std::path::Path, method: &str, path: &str, body: &str) -> (u16, String) {
        let stream = tokio::net::UnixStream::connect(sock).await.unwrap();
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "x")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
    let sock = dir.path().join("agent.sock");
    let (s, b) = raw(&sock, "POST", "/v1/token", "{not json").await;
    assert_eq!(s, 400);
    assert!(
        b.contains("\"bad_request\"") && b.contains("not valid JSON"),
        "{b}"
    );
    let (s, b) = raw(
        &sock,
        "POST",
        "/v1/token",
        r#"{"product":"x","feature":["a"]}"#,
    )
    .await;
    assert_eq!(s, 400);
    assert!(b.contains("unknown field"), "{b}");
    let (s, b) = raw(
        &sock,
        "POST",
        "/v1/token",
        r#"{"product":"x","nonce":"xyz"}"#,
    )
    .await;
    assert_eq!(s, 400);
    assert!(b.contains("not hex"), "{b}");
    // tpm_fresh is part of the API (it was refused as an unknown field), and needs a nonce the
    // verifier chose: the agent does not make one up.
    let (s, b) = raw(
        &sock,
        "POST",
        "/v1/token",
        r#"{"product":"x","tpm_fresh":true}"#,
    )
    .await;
    assert_eq!(s, 400);
    assert!(b.contains("tpm_fresh needs a nonce"), "{b}");
    let (s, b) = raw(
        &sock,
        "POST",
        "/v1/token",
        r#"{"product":"x","nonce":"0011"}"#,
    )
    .await;
    assert_eq!(s, 400);
    assert!(b.contains("8 to 64 bytes"), "{b}");
    let (s, _) = raw(&sock, "GET", "/v1/token", "").await;
    assert_eq!(s, 405);
    let (s, b) = raw(&sock, "GET", "/nope", "").await;
    assert_eq!(s, 404);
    assert!(b.contains("/v1/token"), "{b}");
    let big = format!(r#"{{"product":"{}"}}"#, "x".repeat(100_000));
    let (s, b) = raw(&sock, "POST", "/v1/token", &big).await;
    assert_eq!(s, 400);
    assert!(b.contains("limited to"), "{b}");
    // Garbage on the socket itself.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        s.write_all(b"\x00\x01\x02 garbage\r\n\r\n").await.unwrap();
        let mut buf = vec![];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    }

    // Then the proxy behaves, and the agent serves normally.
    proxy.set_mode(Mode::Normal);
    wait_connected(&client, None).await;
    let t = client.token(&vm_req("cad")).await.unwrap();
    assert!(!t.cached);
    // A proxy that sends garbage mid-session is dropped and reconnected to.
    let mut events = client.events().await.unwrap();
    proxy.send_raw(hostbind_attest::wire::Message::new(
        42,
        Body::Hello(hostbind_attest::wire::Hello {
            agent_version: "x".into(),
            chain: vec![],
            facts: Default::default(),
            known_host: None,
        }),
    ));
    proxy.send_raw(hostbind_attest::wire::Message::new(
        0,
        Body::Error(hostbind_attest::wire::ErrorBody {
            code: WireCode::Internal,
            message: "proxy is going down".into(),
        }),
    ));
    let ev = next_matching(&mut events, Duration::from_secs(2), |k| {
        matches!(k, EventKind::Disconnected { .. })
    })
    .await;
    assert!(
        matches!(ev.kind, EventKind::Disconnected { ref message } if message.contains("proxy is going down"))
    );
    next_matching(&mut events, Duration::from_secs(3), |k| {
        matches!(k, EventKind::Connected { .. })
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test]
async fn unanswered_requests_time_out_and_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xb1, 60);
    let mut t = timing();
    t.request_timeout = Duration::from_millis(500);
    let (agent, client) = start_agent_with(dir.path(), &proxy.path, t).await;
    wait_connected(&client, None).await;
    proxy.hold_token_requests(1000);
    let t0 = Instant::now();
    match client.token(&vm_req("cad")).await {
        Err(ClientError::Api { status, code, .. }) => {
            assert_eq!((status, code), (504, ErrorCode::Timeout));
        }
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
    agent.shutdown().await;
}

/// Run as a child process by `process_exit_releases_within_1s`: asks for a process-scoped
/// token on the agent named by HOSTBIND_TEST_CHILD_SOCKET, prints the lease and sleeps.
#[tokio::test]
#[ignore = "helper: run as a child process by process_exit_releases_within_1s"]
async fn child_holds_a_process_lease() {
    use std::io::Write;
    let Ok(sock) = std::env::var("HOSTBIND_TEST_CHILD_SOCKET") else {
        return;
    };
    let client = hostbind_client::Client::new(sock);
    let r = client.token(&TokenRequest::new("proc-app")).await.unwrap();
    assert_eq!(r.scope, Scope::Process);
    println!("LEASE {}", r.lease_id);
    std::io::stdout().flush().unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
}

/// Kills and reaps a child when dropped.
struct ChildGuard(std::process::Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real child process connects (SO_PEERCRED gives the agent its pid), holds a process-scoped
/// lease, and is killed: the agent's pidfd fires and the lease is released on the proxy
/// within 1 s.
#[tokio::test]
async fn process_exit_releases_within_1s() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xb2, 60);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;

    let mut child = ChildGuard(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "child_holds_a_process_lease",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("HOSTBIND_TEST_CHILD_SOCKET", dir.path().join("agent.sock"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child_pid = child.0.id();
    let stdout = child.0.stdout.take().unwrap();
    let lease_id = tokio::task::spawn_blocking(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            // libtest prints "test NAME ... " before the test's own output on the same line.
            if let Some(at) = line.find("LEASE ") {
                return line[at + 6..].trim().to_string();
            }
        }
        panic!("child ended without a lease");
    })
    .await
    .unwrap();

    // The lease belongs to the child's pid, and lives while the child does.
    let rec = proxy.leases()[&lease_id].clone();
    assert_eq!(rec.scope, Scope::Process);
    assert_eq!(rec.pid, Some(child_pid));
    let st = client.status().await.unwrap();
    assert_eq!(st.leases[0].pid, Some(child_pid));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(proxy.count("release"), 0);

    let killed = Instant::now();
    child.0.kill().unwrap();
    let (at, _) = proxy
        .wait_for(
            Duration::from_secs(3),
            |m| matches!(&m.body, Body::Release(r) if r.lease_id == lease_id),
        )
        .await
        .expect("lease not released after the process exited");
    let took = at - killed;
    println!("process exit -> Release at the proxy: {took:?}");
    assert!(took < Duration::from_secs(1), "released after {took:?}");
    assert!(proxy.leases().is_empty());
    assert!(client.status().await.unwrap().leases.is_empty());
    agent.shutdown().await;
}

/// The test process itself asks for a process-scoped lease: SO_PEERCRED yields its own pid.
#[tokio::test]
async fn process_scope_uses_the_callers_pid() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xb3, 60);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;
    let r = client.token(&TokenRequest::new("p")).await.unwrap();
    assert_eq!(r.scope, Scope::Process);
    assert_eq!(proxy.leases()[&r.lease_id].pid, Some(std::process::id()));
    let again = client.token(&TokenRequest::new("p")).await.unwrap();
    assert!(again.cached);
    // vm scope is another lease, without a pid.
    let vm = client.token(&vm_req("p")).await.unwrap();
    assert_ne!(vm.lease_id, r.lease_id);
    assert_eq!(proxy.leases()[&vm.lease_id].pid, None);
    agent.shutdown().await;
}

#[tokio::test]
async fn dropped_event_subscriptions_do_not_hurt_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xb4, 60);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;
    for _ in 0..20 {
        let ev = client.events().await.unwrap();
        drop(ev);
    }
    let mut kept = client.events().await.unwrap();
    proxy.drop_connections();
    next_matching(&mut kept, Duration::from_secs(2), |k| {
        matches!(k, EventKind::Disconnected { .. })
    })
    .await;
    client.status().await.unwrap();
    agent.shutdown().await;
}

/// Between the new host's HelloAck and the re-acquisition, the old host's cached token must not
/// be handed out (B holds the re-acquisition so the window stays open).
#[tokio::test]
async fn old_host_tokens_are_dropped_as_soon_as_the_new_host_answers() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("proxy.sock");
    let host_a = ScriptedProxy::start(&sock, 0xd1, 60);
    let (agent, client) = start_agent(dir.path(), &sock).await;
    wait_connected(&client, None).await;
    let a = client.token(&vm_req("cad")).await.unwrap();
    assert!(client.token(&vm_req("cad")).await.unwrap().cached);
    let mut events = client.events().await.unwrap();
    host_a.stop();
    drop(host_a);
    let host_b = ScriptedProxy::start(&sock, 0xd2, 60);
    host_b.hold_token_requests(1000);
    next_matching(
        &mut events,
        Duration::from_secs(5),
        |k| matches!(k, EventKind::Connected { host_id, .. } if *host_id == host_b.host_hex()),
    )
    .await;
    let quick = client.clone().with_timeout(Duration::from_millis(700));
    match quick.token(&vm_req("cad")).await {
        Ok(t) => panic!(
            "served a token while re-acquiring: host {} (old host {}), cached {}",
            t.host_id, a.host_id, t.cached
        ),
        Err(ClientError::Timeout(_)) => {}
        Err(e) => panic!("{e}"),
    }
    agent.abort().await;
}

/// The client keeps one connection alive and drives it from the calls themselves (no task of
/// its own): sequential calls reuse it, clones calling at once open their own, and a kept
/// connection the agent closed meanwhile (here: the agent restarted) is replaced on the next
/// call instead of failing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_serves_repeat_calls_and_is_replaced_after_an_agent_restart() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xb7, 60);
    let (agent, client) = start_agent(dir.path(), &proxy.path).await;
    wait_connected(&client, None).await;
    let req = vm_req("cad");
    let first = client.token(&req).await.unwrap();
    assert!(!first.cached);
    for _ in 0..50 {
        let t = client.token(&req).await.unwrap();
        assert!(t.cached);
        assert_eq!(t.token, first.token);
    }
    let calls = (0..8).map(|_| {
        let (c, req) = (client.clone(), req.clone());
        async move { c.token(&req).await }
    });
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.unwrap().token, first.token);
    }

    agent.shutdown().await;
    let (agent, _) = start_agent(dir.path(), &proxy.path).await;
    // The first call after the restart goes out on the connection the old agent closed.
    let st = client.status().await.unwrap();
    assert!(st.leases.is_empty());
    wait_connected(&client, None).await;
    let again = client.token(&req).await.unwrap();
    assert!(!again.cached);
    agent.shutdown().await;
}
