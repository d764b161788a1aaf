//! Property tests for the wire framing: hostile input never panics, messages round-trip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use ciborium::Value;
use hostbind_attest::wire::*;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use serde_bytes::ByteBuf;

/// Strings of at most 64 chars, so at most 256 bytes (any Unicode scalar, no surrogates).
fn short_string() -> impl Strategy<Value = String> {
    "\\PC{0,64}"
}

fn bytes(max: usize) -> impl Strategy<Value = ByteBuf> {
    vec(any::<u8>(), 0..=max).prop_map(ByteBuf::from)
}

fn host_id() -> impl Strategy<Value = ByteBuf> {
    vec(any::<u8>(), HOST_ID_LEN).prop_map(ByteBuf::from)
}

fn chain() -> impl Strategy<Value = Vec<EphemeralId>> {
    vec(any::<[u8; 16]>(), 0..=MAX_CHAIN)
}

fn arb_hello() -> impl Strategy<Value = Hello> {
    (
        short_string(),
        chain(),
        btree_map(short_string(), short_string(), 0..=MAX_FACTS),
        option::of(host_id()),
    )
        .prop_map(|(agent_version, chain, facts, known_host)| Hello {
            agent_version,
            chain,
            facts,
            known_host,
        })
}

fn arb_hello_ack() -> impl Strategy<Value = HelloAck> {
    (
        short_string(),
        host_id(),
        bytes(2048),
        short_string(),
        short_string(),
        any::<u32>(),
        option::of(any::<u32>()),
        any::<bool>(),
    )
        .prop_map(
            |(
                proxy_version,
                host_id,
                host_cert,
                uuid,
                name,
                lease_ttl_secs,
                idle_timeout_secs,
                lease_query,
            )| {
                HelloAck {
                    proxy_version,
                    host_id,
                    host_cert,
                    vm: VmIdentity { uuid, name },
                    lease_ttl_secs,
                    idle_timeout_secs,
                    lease_query,
                }
            },
        )
}

fn arb_scope() -> impl Strategy<Value = Scope> {
    prop_oneof![Just(Scope::Vm), Just(Scope::Process)]
}

fn arb_token_request() -> impl Strategy<Value = TokenRequest> {
    (
        short_string(),
        vec(short_string(), 0..=MAX_FEATURES),
        option::of(bytes(MAX_NONCE_LEN)),
        arb_scope(),
        option::of(any::<u32>()),
        option::of(any::<u64>()),
        chain(),
    )
        .prop_map(
            |(product, features, nonce, scope, pid, pid_start, chain)| TokenRequest {
                product,
                features,
                nonce,
                scope,
                pid,
                pid_start,
                chain,
                tpm_fresh: false,
            },
        )
}

fn arb_token_response() -> impl Strategy<Value = TokenResponse> {
    (short_string(), bytes(4096), any::<u64>(), any::<u64>()).prop_map(
        |(lease_id, token, token_expires_at, lease_expires_at)| TokenResponse {
            lease_id,
            token,
            token_expires_at,
            lease_expires_at,
            grace_secs: 0,
        },
    )
}

fn arb_event_kind() -> impl Strategy<Value = EventKind> {
    prop_oneof![
        Just(EventKind::LeaseRevoked),
        Just(EventKind::LeaseExpired),
        Just(EventKind::LicenseRemoved),
        Just(EventKind::CloneDetected),
    ]
}

fn arb_error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::Malformed),
        Just(ErrorCode::UnsupportedVersion),
        Just(ErrorCode::FrameTooLarge),
        Just(ErrorCode::UnexpectedMessage),
        Just(ErrorCode::UnknownVm),
        Just(ErrorCode::NoLicense),
        Just(ErrorCode::LicenseNotValid),
        Just(ErrorCode::SeatsExhausted),
        Just(ErrorCode::UnknownLease),
        Just(ErrorCode::CloneRefused),
        Just(ErrorCode::Busy),
        Just(ErrorCode::Internal),
        Just(ErrorCode::Unavailable),
    ]
}

fn arb_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        arb_hello().prop_map(Body::Hello),
        arb_hello_ack().prop_map(Body::HelloAck),
        arb_token_request().prop_map(Body::TokenRequest),
        arb_token_response().prop_map(Body::TokenResponse),
        short_string().prop_map(|lease_id| Body::Release(Release { lease_id })),
        (
            short_string(),
            option::of(bytes(MAX_NONCE_LEN)),
            chain(),
            any::<bool>()
        )
            .prop_map(|(lease_id, nonce, chain, tpm_fresh)| Body::Renew(Renew {
                lease_id,
                nonce,
                chain,
                tpm_fresh,
            })),
        Just(Body::Ack(Ack {})),
        Just(Body::Ping(Ping {})),
        any::<u32>().prop_map(|offset| Body::LeaseQuery(LeaseQuery { offset })),
        (
            vec(
                (
                    short_string(),
                    short_string(),
                    vec(short_string(), 0..4),
                    arb_scope(),
                    option::of(any::<u32>()),
                    option::of(any::<u64>()),
                    any::<u64>(),
                )
                    .prop_map(
                        |(lease_id, product, features, scope, pid, pid_start, lease_expires_at)| {
                            HeldLease {
                                lease_id,
                                product,
                                features,
                                scope,
                                pid,
                                pid_start,
                                lease_expires_at,
                            }
                        }
                    ),
                0..4
            ),
            any::<bool>()
        )
            .prop_map(|(leases, more)| Body::LeaseList(LeaseList { leases, more })),
        (
            arb_event_kind(),
            option::of(short_string()),
            option::of(short_string()),
            ".{0,200}"
        )
            .prop_map(|(kind, lease_id, product, message)| Body::Event(Event {
                kind,
                lease_id,
                product,
                message
            })),
        (arb_error_code(), ".{0,200}")
            .prop_map(|(code, message)| Body::Error(ErrorBody { code, message })),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    (any::<u64>(), arb_body()).prop_map(|(id, body)| Message::new(id, body))
}

/// Decodes as `Body` and as a raw value; whatever happens must be Ok or a typed error,
/// and a consumed count never exceeds the input.
fn check_no_panic(buf: &[u8]) {
    for r in [
        decode_frame::<Body>(buf).map(|o| o.map(|(_, n)| n)),
        decode_frame::<Value>(buf).map(|o| o.map(|(_, n)| n)),
    ] {
        match r {
            Ok(Some(n)) => assert!(n >= 4 && n <= buf.len()),
            Ok(None) => {}
            Err(
                e @ (WireError::FrameTooLarge { .. }
                | WireError::UnsupportedVersion { .. }
                | WireError::Malformed { .. }),
            ) => {
                assert!(!e.to_string().is_empty());
                let _ = (e.code(), e.request_id());
            }
            Err(e) => panic!("decode returned an encoder-side error: {e:?}"),
        }
    }
}

fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    Length(u32),
    Version(u64),
    NegativeVersion(i64),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Mutation::Insert(i, x)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
        prop_oneof![any::<u32>(), 0..70_000u32].prop_map(Mutation::Length),
        any::<u64>().prop_map(Mutation::Version),
        any::<i64>().prop_map(Mutation::NegativeVersion),
    ]
}

/// Whether the frame body (after the 4-byte prefix) starts with a CBOR map.
fn is_map(frame: &[u8]) -> bool {
    matches!(
        ciborium::from_reader::<Value, _>(frame.get(4..).unwrap_or(&[])),
        Ok(Value::Map(_))
    )
}

/// Rewrites `v` in the frame's CBOR body.
fn with_version(frame: &[u8], v: Value) -> Vec<u8> {
    let mut val: Value = ciborium::from_reader(&frame[4..]).unwrap();
    for (k, x) in val.as_map_mut().unwrap() {
        if k.as_text() == Some("v") {
            *x = v.clone();
        }
    }
    let mut b = Vec::new();
    ciborium::into_writer(&val, &mut b).unwrap();
    frame_of(&b)
}

fn apply(frame: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut f = frame.to_vec();
    for m in muts {
        let n = f.len().max(1);
        match *m {
            Mutation::Flip(i, x) => {
                if !f.is_empty() {
                    f[i % n] ^= x;
                }
            }
            Mutation::Insert(i, x) => f.insert(i % (f.len() + 1), x),
            Mutation::Delete(i) => {
                if !f.is_empty() {
                    f.remove(i % n);
                }
            }
            Mutation::Truncate(i) => f.truncate(i % n),
            Mutation::Length(len) => {
                if f.len() >= 4 {
                    f[..4].copy_from_slice(&len.to_be_bytes());
                }
            }
            Mutation::Version(v) => {
                if is_map(&f) {
                    f = with_version(&f, Value::Integer(v.into()));
                }
            }
            Mutation::NegativeVersion(v) => {
                if is_map(&f) {
                    f = with_version(&f, Value::Integer(v.into()));
                }
            }
        }
    }
    f
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(buf in vec(any::<u8>(), 0..2048)) {
        check_no_panic(&buf);
    }

    #[test]
    fn random_bodies_in_a_valid_frame_never_panic(body in vec(any::<u8>(), 0..2048)) {
        check_no_panic(&frame_of(&body));
    }

    #[test]
    fn messages_round_trip(msg in arb_message()) {
        let frame = encode_frame(&msg).unwrap();
        let (back, used) = decode_frame::<Body>(&frame).unwrap().unwrap();
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(&back, &msg);
        // Every strict prefix needs more bytes (checked on a few cut points).
        for cut in [0, 1, 3, 4, 5, frame.len() / 2, frame.len() - 1] {
            prop_assert!(decode_frame::<Body>(&frame[..cut]).unwrap().is_none());
        }
    }

    #[test]
    fn mutated_frames_never_panic(msg in arb_message(), muts in vec(arb_mutation(), 1..4)) {
        let frame = encode_frame(&msg).unwrap();
        let mutated = apply(&frame, &muts);
        check_no_panic(&mutated);
        // A mutated frame that still decodes must re-encode to something that decodes the same.
        if let Ok(Some((m, _))) = decode_frame::<Body>(&mutated) {
            let again = encode_frame(&m).unwrap();
            let (m2, _) = decode_frame::<Body>(&again).unwrap().unwrap();
            prop_assert_eq!(m, m2);
        }
    }

    #[test]
    fn oversized_length_fails_before_body(len in (MAX_FRAME_BODY as u32 + 1)..=u32::MAX,
                                          extra in vec(any::<u8>(), 0..64)) {
        let mut buf = len.to_be_bytes().to_vec();
        buf.extend_from_slice(&extra);
        match decode_frame::<Body>(&buf) {
            Err(WireError::FrameTooLarge { len: l, max }) => {
                prop_assert_eq!(l, len as usize);
                prop_assert_eq!(max, MAX_FRAME_BODY);
            }
            other => prop_assert!(false, "expected FrameTooLarge, got {:?}", other),
        }
    }

    #[test]
    fn wrong_version_reports_id(msg in arb_message(), v in any::<u64>()) {
        prop_assume!(v != u64::from(PROTOCOL_VERSION));
        let frame = with_version(&encode_frame(&msg).unwrap(), Value::Integer(v.into()));
        match decode_frame::<Body>(&frame) {
            Err(WireError::UnsupportedVersion { got, supported, id }) => {
                prop_assert_eq!(got, v);
                prop_assert_eq!(supported, PROTOCOL_VERSION);
                prop_assert_eq!(id, Some(msg.id));
            }
            other => prop_assert!(false, "expected UnsupportedVersion, got {:?}", other),
        }
    }

    #[test]
    fn over_limit_content_is_malformed_with_id(id in any::<u64>(), extra in 1usize..8) {
        let msg = Message::new(id, Body::TokenRequest(TokenRequest {
            product: "p".into(),
            features: vec!["f".into(); MAX_FEATURES + extra],
            nonce: None,
            scope: Scope::Vm,
            pid: None,
            pid_start: None,
            chain: vec![],
            tpm_fresh: false,
        }));
        match decode_frame::<Body>(&encode_frame(&msg).unwrap()) {
            Err(WireError::Malformed { id: got, .. }) => prop_assert_eq!(got, Some(id)),
            other => prop_assert!(false, "expected Malformed, got {:?}", other),
        }
    }
}

#[test]
fn facts_strategy_respects_limits() {
    // Guard for the strategies above: a maximal hello is still valid.
    let facts: BTreeMap<String, String> = (0..MAX_FACTS)
        .map(|i| (format!("{i:0>256}"), "€".repeat(85)))
        .collect();
    let msg = Message::new(
        1,
        Body::Hello(Hello {
            agent_version: "x".repeat(MAX_STRING_LEN),
            chain: vec![[0; 16]; MAX_CHAIN],
            facts,
            known_host: Some(ByteBuf::from(vec![0; HOST_ID_LEN])),
        }),
    );
    let (back, _) = decode_frame::<Body>(&encode_frame(&msg).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(back, msg);
}
