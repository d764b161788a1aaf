//! TPM-fresh nonces: the verifier accepts a token whose nonce is in a Merkle batch quoted by
//! the host's AK and names each broken link; a real proxy batches concurrent fresh requests
//! under few quotes, quotes a lone one at once, and (batching = false) quotes each request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::keys::{VendorKey, VendorPublicKey};
use hostbind_attest::merkle::{MerkleError, MerkleTree};
use hostbind_attest::token::license_hash;
use hostbind_attest::token::{FreshEvidence, TokenClaims, TokenSigner};
use hostbind_attest::verify::{verify_token, Expectation, VerifyError};
use hostbind_attest::wire::{Body, Scope, TokenRequest};
use hostbind_proxy::enroll as host;
use hostbind_testkit::host::{Host as TkHost, Vendor};
use hostbind_testkit::Swtpm;
use serde_bytes::ByteBuf;
use std::collections::BTreeSet;

mod common;
use common::*;
mod wire_guest;
use wire_guest::WireGuest;

/// What an app expecting a TPM-fresh "cad" token for `nonce` checks.
fn fresh(nonce: &[u8]) -> Expectation {
    Expectation::product("cad")
        .nonce(nonce.to_vec())
        .require_tpm_fresh()
}

fn claims(
    s: &TokenSigner,
    host_id: &[u8],
    lic: &[u8],
    nonce: &[u8],
    fresh: FreshEvidence,
) -> TokenClaims {
    TokenClaims {
        host_id: host_id.to_vec(),
        vm_uuid: "6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a01".into(),
        vm_name: "vm-a".into(),
        product: "cad".into(),
        features: vec![],
        scope: "vm".into(),
        license_id: "L-cad".into(),
        license_hash: license_hash(lic).to_vec(),
        lease_id: "lease-1".into(),
        issued_at: t0() + 100,
        expires_at: t0() + 160,
        nonce: Some(nonce.to_vec()),
        chain_commitment: None,
        quote_ref: s.quote_ref().to_vec(),
        fresh: Some(fresh),
        pool: None,
    }
}

#[test]
fn fresh_proofs_verify_and_each_broken_link_is_named() {
    let vendor = VendorKey::generate().unwrap();
    let mut h = host(Swtpm::start().unwrap());
    let trust = cas(h._swtpm.ca());
    let cert = enroll_host(&mut h, &trust, &vendor);
    let installed = host::install(
        &mut h.tpm,
        h.state.path(),
        &cert,
        &vendor.public(),
        t0() + 20,
    )
    .unwrap();
    let s = signer(&mut h, cert, t0(), t0() + 1200);
    let (_, lic) = license(&vendor, &installed.host_id, "cad", &[]);
    let nonces: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 16]).collect();
    let tree = MerkleTree::build(&nonces).unwrap();
    let q = h.tpm.quote(&tree.root()).unwrap();
    let ev = |i: usize| FreshEvidence {
        attest: ByteBuf::from(q.attest.clone()),
        signature: ByteBuf::from(q.signature.clone()),
        proof: tree.proof(i).unwrap(),
    };
    let id = &installed.host_id;
    let now = t0() + 120;
    let vp = vendor.public();
    for (i, n) in nonces.iter().enumerate() {
        let t = s.issue(&claims(&s, id, &lic, n, ev(i)), &lic).unwrap();
        let v = verify_token(&t, &vp, now, &fresh(n)).unwrap();
        assert_eq!(v.fresh_quote.unwrap().extra_data, tree.root().to_vec());
    }
    // another nonce than the leaf at this index
    let t = s
        .issue(&claims(&s, id, &lic, &nonces[1], ev(0)), &lic)
        .unwrap();
    assert!(matches!(
        verify_token(&t, &vp, now, &Expectation::product("cad")),
        Err(VerifyError::FreshRootMismatch)
    ));
    // a path of the wrong length
    let mut e = ev(2);
    e.proof.path.pop();
    let t = s.issue(&claims(&s, id, &lic, &nonces[2], e), &lic).unwrap();
    assert!(matches!(
        verify_token(&t, &vp, now, &Expectation::product("cad")),
        Err(VerifyError::FreshProof(MerkleError::PathLength { .. }))
    ));
    // a quote over something else
    let other = h.tpm.quote(b"another batch").unwrap();
    let mut e = ev(3);
    e.attest = ByteBuf::from(other.attest.clone());
    e.signature = ByteBuf::from(other.signature.clone());
    let t = s.issue(&claims(&s, id, &lic, &nonces[3], e), &lic).unwrap();
    assert!(matches!(
        verify_token(&t, &vp, now, &Expectation::product("cad")),
        Err(VerifyError::FreshRootMismatch)
    ));
    // a quote whose signature does not match
    let mut e = ev(3);
    e.signature = ByteBuf::from(other.signature);
    let t = s.issue(&claims(&s, id, &lic, &nonces[3], e), &lic).unwrap();
    assert!(matches!(
        verify_token(&t, &vp, now, &Expectation::product("cad")),
        Err(VerifyError::FreshQuote(_))
    ));
    // freshness evidence without a nonce
    let mut c = claims(&s, id, &lic, &nonces[0], ev(0));
    c.nonce = None;
    let t = s.issue(&c, &lic).unwrap();
    assert!(matches!(
        verify_token(&t, &vp, now, &Expectation::product("cad")),
        Err(VerifyError::FreshWithoutNonce)
    ));
    // required but absent
    let mut c = claims(&s, id, &lic, &nonces[0], ev(0));
    c.fresh = None;
    let t = s.issue(&c, &lic).unwrap();
    assert!(matches!(
        verify_token(&t, &vp, now, &fresh(&nonces[0])),
        Err(VerifyError::FreshMissing)
    ));
    // every flipped byte of a fresh token is rejected
    let t = s
        .issue(&claims(&s, id, &lic, &nonces[4], ev(4)), &lic)
        .unwrap();
    for i in 0..t.len() {
        let mut b = t.clone();
        b[i] ^= 0x40;
        assert!(
            verify_token(&b, &vp, now, &fresh(&nonces[4])).is_err(),
            "flipped byte {i} accepted: {} -> {}",
            hex::encode(&t[i.saturating_sub(40)..(i + 8).min(t.len())]),
            hex::encode(&b[i.saturating_sub(40)..(i + 8).min(b.len())])
        );
    }
}

fn fresh_req(nonce: &[u8], fresh: bool) -> Body {
    Body::TokenRequest(TokenRequest {
        product: "cad".into(),
        features: vec![],
        nonce: Some(nonce.to_vec().into()),
        scope: Scope::Vm,
        pid: None,
        pid_start: None,
        chain: vec![],
        tpm_fresh: fresh,
    })
}

/// Starts a host with 4 VMs, a 1000-seat access-counted license, and `extra` config.
/// A raw wire connection to the VM socket at `socket`, past its Hello.
async fn guest_after_hello(socket: &std::path::Path) -> WireGuest<tokio::net::UnixStream> {
    let s = tokio::net::UnixStream::connect(socket).await.unwrap();
    let mut w = WireGuest::new(s);
    w.hello().await.unwrap();
    w
}

fn daemon(extra: &str) -> (Vendor, TkHost, VendorPublicKey) {
    let v = Vendor::new().unwrap();
    let mut h = TkHost::enrolled(&v, &["vm-a", "vm-b", "vm-c", "vm-d"], extra).unwrap();
    h.start_proxy().unwrap();
    let lic = h.issue_license(&v, "cad", 1000, "access", &[]).unwrap();
    h.proxy_ok(&["license", "add", &lic.to_string_lossy()])
        .unwrap();
    let vp =
        hostbind_attest::files::parse_vendor_public(&std::fs::read(v.public()).unwrap()).unwrap();
    (v, h, vp)
}

/// `per_vm` guests on each VM each send `rounds` fresh requests; returns the distinct quotes.
async fn storm(h: &TkHost, vp: &VendorPublicKey, per_vm: usize, rounds: usize) -> usize {
    let mut tasks = Vec::new();
    for (vi, vm) in h.vms.iter().enumerate() {
        for g in 0..per_vm {
            let sock = vm.socket.clone();
            let vp = *vp;
            tasks.push(tokio::spawn(async move {
                let mut w = guest_after_hello(&sock).await;
                let mut quotes = Vec::new();
                for r in 0..rounds {
                    let nonce = format!("nonce-{vi}-{g}-{r}").into_bytes();
                    let Body::TokenResponse(t) = w.call(fresh_req(&nonce, true)).await else {
                        panic!("fresh token refused")
                    };
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs();
                    let v = verify_token(&t.token, &vp, now, &fresh(&nonce)).unwrap();
                    quotes.push(v.claims.fresh.unwrap().attest.to_vec());
                }
                quotes
            }));
        }
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_batches_concurrent_fresh_requests_under_few_quotes() {
    // 16 guests per VM plus the lone one: over the default 16 connections per VM.
    let (_v, mut h, vp) = daemon("[limits]\nconnections_per_vm = 32\n");
    // A lone request is served at once with a batch of one.
    let mut w = guest_after_hello(&h.vms[0].socket).await;
    let Body::TokenResponse(t) = w.call(fresh_req(b"lone-nonce", true)).await else {
        panic!("refused")
    };
    let v = verify_token(&t.token, &vp, t.token_expires_at - 1, &fresh(b"lone-nonce")).unwrap();
    assert_eq!(v.claims.fresh.unwrap().proof.leaves, 1);
    // tpm_fresh without a nonce is malformed
    let Body::Error(e) = w
        .call(Body::TokenRequest(TokenRequest {
            product: "cad".into(),
            features: vec![],
            nonce: None,
            scope: Scope::Vm,
            pid: None,
            pid_start: None,
            chain: vec![],
            tpm_fresh: true,
        }))
        .await
    else {
        panic!("accepted a fresh request without nonce")
    };
    assert!(e.message.contains("needs a nonce"), "{}", e.message);
    // 4 VMs x 16 guests x 4 rounds = 256 fresh tokens under far fewer quotes.
    let quotes = storm(&h, &vp, 16, 4).await;
    assert!(quotes < 256 / 2, "{quotes} quotes for 256 fresh tokens");
    h.stop_proxy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_off_quotes_every_request() {
    let (_v, mut h, vp) = daemon("[fresh_nonces]\nbatching = false\n");
    let quotes = storm(&h, &vp, 4, 3).await;
    assert_eq!(quotes, 4 * 4 * 3);
    h.stop_proxy();
}

/// Stops the host's swtpm (SIGSTOP) until dropped (SIGCONT): a TPM that takes as long as the
/// test likes to quote. Signals only the swtpm this test started, by its pid.
struct FrozenTpm(u32);

impl FrozenTpm {
    fn freeze(pid: u32) -> FrozenTpm {
        let ok = std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "could not stop swtpm {pid}");
        FrozenTpm(pid)
    }
}

impl Drop for FrozenTpm {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_tpm_quote_does_not_stall_renewals_pipelined_behind_it() {
    use futures::{SinkExt, StreamExt};
    use hostbind_attest::wire::{Message, Renew};
    let (_v, mut h, vp) = daemon("");
    let mut w = guest_after_hello(&h.vms[0].socket).await;
    let Body::TokenResponse(lease) = w.call(fresh_req(b"plain-nonce", false)).await else {
        panic!("refused")
    };
    // The TPM hangs: the fresh request waits for its quote; the renewals need no TPM.
    let frozen = FrozenTpm::freeze(h.tpm.pid());
    w.f.send(Message::new(100, fresh_req(b"stalled-nonce", true)))
        .await
        .unwrap();
    const RENEWALS: u64 = 8;
    for i in 0..RENEWALS {
        let renew = Body::Renew(Renew {
            lease_id: lease.lease_id.clone(),
            nonce: None,
            chain: vec![],
            tpm_fresh: false,
        });
        w.f.send(Message::new(101 + i, renew)).await.unwrap();
    }
    let mut renewed = BTreeSet::new();
    while (renewed.len() as u64) < RENEWALS {
        let m = tokio::time::timeout(std::time::Duration::from_secs(15), w.f.next())
            .await
            .expect(
                "the renewals behind a TPM-fresh request waiting for its quote were not answered",
            )
            .unwrap()
            .unwrap();
        assert_ne!(
            m.id, 100,
            "the fresh request answered while the TPM was stopped"
        );
        match m.body {
            Body::TokenResponse(t) => assert_eq!(t.lease_id, lease.lease_id),
            Body::Event(_) => continue,
            other => panic!("renewal {} refused: {other:?}", m.id),
        }
        renewed.insert(m.id);
    }
    assert_eq!(renewed, (101..101 + RENEWALS).collect());
    // The TPM is back: the fresh request gets its token.
    drop(frozen);
    let m = loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(60), w.f.next())
            .await
            .expect("the fresh request was never answered")
            .unwrap()
            .unwrap();
        if m.id == 100 {
            break m;
        }
    };
    let Body::TokenResponse(t) = m.body else {
        panic!("fresh request refused: {:?}", m.body)
    };
    verify_token(
        &t.token,
        &vp,
        t.token_expires_at - 1,
        &fresh(b"stalled-nonce"),
    )
    .unwrap();
    h.stop_proxy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_at_its_request_bound_is_not_read_until_an_answer() {
    use futures::{SinkExt, StreamExt};
    use hostbind_attest::wire::{Message, Renew};
    // One request in progress per connection: nothing behind it is read (or buffered).
    let (_v, mut h, _vp) = daemon("[limits]\nrequests_per_connection = 1\n");
    let mut w = guest_after_hello(&h.vms[0].socket).await;
    let Body::TokenResponse(lease) = w.call(fresh_req(b"plain-nonce", false)).await else {
        panic!("refused")
    };
    let frozen = FrozenTpm::freeze(h.tpm.pid());
    w.f.send(Message::new(100, fresh_req(b"stalled-nonce", true)))
        .await
        .unwrap();
    for i in 0..3 {
        let renew = Body::Renew(Renew {
            lease_id: lease.lease_id.clone(),
            nonce: None,
            chain: vec![],
            tpm_fresh: false,
        });
        w.f.send(Message::new(101 + i, renew)).await.unwrap();
    }
    // The renewals wait unread behind the fresh request until its quote comes.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    drop(frozen);
    let mut order = Vec::new();
    while order.len() < 4 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(60), w.f.next())
            .await
            .expect("an answer")
            .unwrap()
            .unwrap();
        match m.body {
            Body::TokenResponse(_) => order.push(m.id),
            Body::Event(_) => {}
            other => panic!("request {} refused: {other:?}", m.id),
        }
    }
    assert_eq!(order, vec![100, 101, 102, 103]);
    h.stop_proxy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_holds_no_request_slot_of_its_vm() {
    // One request in progress per VM. An agent's idle connection (waiting for its next
    // message) must not hold that slot: a second connection of the VM says Hello and gets a
    // token. (Slots taken before each read starved every other connection of the VM — its
    // Hello was never read.)
    let (_v, mut h, _vp) = daemon("[limits]\nrequests_per_vm = 1\n");
    let a = guest_after_hello(&h.vms[0].socket).await;
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let mut b = guest_after_hello(&h.vms[0].socket).await;
        let Body::TokenResponse(_) = b.call(fresh_req(b"second-connection", false)).await else {
            panic!("refused")
        };
    })
    .await
    .expect("the second connection of the VM was served while the first sat idle");
    drop(a);
    h.stop_proxy();
}
