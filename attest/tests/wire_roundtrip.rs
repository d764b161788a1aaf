//! Wire framing: round trips, partial input, error cases and limits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use ciborium::Value;
use hostbind_attest::wire::*;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).unwrap();
    out
}

fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn msg_value(v: Value, id: Value, body: Value) -> Value {
    Value::Map(vec![(text("v"), v), (text("id"), id), (text("body"), body)])
}

fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    decode_frame::<Body>(buf)
}

pub fn samples() -> Vec<Body> {
    let mut facts = BTreeMap::new();
    facts.insert("os".to_string(), "linux".to_string());
    facts.insert("hostname".to_string(), "build-7".to_string());
    vec![
        Body::Hello(Hello {
            agent_version: "0.1.0".into(),
            chain: vec![[1; 16], [2; 16]],
            facts,
            known_host: Some(ByteBuf::from(vec![7; 32])),
        }),
        Body::Hello(Hello {
            agent_version: String::new(),
            chain: vec![],
            facts: BTreeMap::new(),
            known_host: None,
        }),
        Body::HelloAck(HelloAck {
            proxy_version: "0.1.0".into(),
            host_id: ByteBuf::from(vec![9; 32]),
            host_cert: ByteBuf::from(vec![0xd2; 700]),
            vm: VmIdentity {
                uuid: "4b1c2f5e-0000-4000-8000-000000000001".into(),
                name: "web-1".into(),
            },
            lease_ttl_secs: 300,
            idle_timeout_secs: Some(300),
            lease_query: true,
        }),
        Body::TokenRequest(TokenRequest {
            product: "cad-pro".into(),
            features: vec!["render".into(), "export".into()],
            nonce: Some(ByteBuf::from(vec![0xaa; 32])),
            scope: Scope::Process,
            pid: Some(4242),
            pid_start: None,
            chain: vec![[3; 16]],
            tpm_fresh: false,
        }),
        Body::TokenRequest(TokenRequest {
            product: "cad".into(),
            features: vec![],
            nonce: None,
            scope: Scope::Vm,
            pid: None,
            pid_start: None,
            chain: vec![],
            tpm_fresh: false,
        }),
        Body::TokenResponse(TokenResponse {
            lease_id: "lease-1".into(),
            token: ByteBuf::from(vec![0x5a; 2048]),
            token_expires_at: 1_800_000_000,
            lease_expires_at: 1_800_000_300,
            grace_secs: 0,
        }),
        Body::Release(Release {
            lease_id: "lease-1".into(),
        }),
        Body::Renew(Renew {
            lease_id: "lease-1".into(),
            nonce: Some(ByteBuf::from(vec![1, 2, 3])),
            chain: vec![[4; 16]; 16],
            tpm_fresh: false,
        }),
        Body::Ack(Ack {}),
        Body::Ping(Ping {}),
        Body::LeaseQuery(LeaseQuery { offset: 100 }),
        Body::LeaseList(LeaseList {
            leases: vec![
                HeldLease {
                    lease_id: "lease-1".into(),
                    product: "cad".into(),
                    features: vec!["pro".into()],
                    scope: Scope::Process,
                    pid: Some(4242),
                    pid_start: Some(987_654),
                    lease_expires_at: 1_700_000_060,
                },
                HeldLease {
                    lease_id: "lease-2".into(),
                    product: "cad".into(),
                    features: vec![],
                    scope: Scope::Vm,
                    pid: None,
                    pid_start: None,
                    lease_expires_at: 1_700_000_061,
                },
            ],
            more: false,
        }),
        Body::Event(Event {
            kind: EventKind::LeaseRevoked,
            lease_id: Some("lease-1".into()),
            product: Some("cad".into()),
            message: "revoked by admin".into(),
        }),
        Body::Event(Event {
            kind: EventKind::CloneDetected,
            lease_id: None,
            product: None,
            message: String::new(),
        }),
        Body::Error(ErrorBody {
            code: ErrorCode::SeatsExhausted,
            message: "all 5 seats of cad are in use; release one or buy more".into(),
        }),
    ]
}

#[test]
fn every_variant_round_trips() {
    let mut kinds = std::collections::BTreeSet::new();
    for (i, body) in samples().into_iter().enumerate() {
        kinds.insert(body.kind());
        let msg = Message::new(i as u64 * 1_000_000_007, body);
        let frame = encode_frame(&msg).unwrap();
        let (back, used) = decode(&frame).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(back, msg);
        assert_eq!(back.v, PROTOCOL_VERSION);
    }
    assert_eq!(kinds.len(), 12, "every Body variant is covered: {kinds:?}");
}

#[test]
fn all_error_codes_and_event_kinds_round_trip() {
    let codes = [
        ErrorCode::Malformed,
        ErrorCode::UnsupportedVersion,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnexpectedMessage,
        ErrorCode::UnknownVm,
        ErrorCode::NoLicense,
        ErrorCode::LicenseNotValid,
        ErrorCode::SeatsExhausted,
        ErrorCode::UnknownLease,
        ErrorCode::CloneRefused,
        ErrorCode::Busy,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
    ];
    for code in codes {
        let msg = Message::new(
            1,
            Body::Error(ErrorBody {
                code,
                message: "x".into(),
            }),
        );
        let (back, _) = decode(&encode_frame(&msg).unwrap()).unwrap().unwrap();
        assert_eq!(back, msg);
    }
    for kind in [
        EventKind::LeaseRevoked,
        EventKind::LeaseExpired,
        EventKind::LicenseRemoved,
        EventKind::CloneDetected,
    ] {
        let msg = Message::new(
            0,
            Body::Event(Event {
                kind,
                lease_id: None,
                product: None,
                message: "m".into(),
            }),
        );
        let (back, _) = decode(&encode_frame(&msg).unwrap()).unwrap().unwrap();
        assert_eq!(back, msg);
    }
}

#[test]
fn wire_shape_is_snake_case_with_byte_strings() {
    let msg = Message::new(
        5,
        Body::TokenRequest(TokenRequest {
            product: "p".into(),
            features: vec![],
            nonce: Some(ByteBuf::from(vec![1, 2])),
            scope: Scope::Process,
            pid: Some(1),
            pid_start: None,
            chain: vec![[0xee; 16]],
            tpm_fresh: false,
        }),
    );
    let frame = encode_frame(&msg).unwrap();
    assert_eq!(
        u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
        frame.len() - 4
    );
    let v: Value = ciborium::from_reader(&frame[4..]).unwrap();
    let map = v.as_map().unwrap();
    let get = |m: &[(Value, Value)], k: &str| {
        m.iter()
            .find(|(key, _)| key.as_text() == Some(k))
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(get(map, "v"), Value::Integer(1.into()));
    assert_eq!(get(map, "id"), Value::Integer(5.into()));
    let body = get(map, "body");
    let req = get(body.as_map().unwrap(), "token_request");
    let req = req.as_map().unwrap();
    assert_eq!(get(req, "scope"), text("process"));
    assert_eq!(get(req, "nonce"), Value::Bytes(vec![1, 2]));
    assert_eq!(
        get(req, "chain"),
        Value::Array(vec![Value::Bytes(vec![0xee; 16])])
    );
    // The 16-byte id is a CBOR byte string: major type 2, length 16 (0x50).
    assert!(frame
        .windows(17)
        .any(|w| w[0] == 0x50 && w[1..] == [0xee; 16]));

    let ev = Message::new(
        0,
        Body::Event(Event {
            kind: EventKind::CloneDetected,
            lease_id: None,
            product: None,
            message: String::new(),
        }),
    );
    let v: Value = ciborium::from_reader(&encode_frame(&ev).unwrap()[4..]).unwrap();
    let ev = get(get(v.as_map().unwrap(), "body").as_map().unwrap(), "event");
    assert_eq!(get(ev.as_map().unwrap(), "kind"), text("clone_detected"));
}

#[test]
fn every_prefix_needs_more_bytes() {
    for body in samples() {
        let frame = encode_frame(&Message::new(77, body)).unwrap();
        for cut in 0..frame.len() {
            assert!(
                decode(&frame[..cut]).unwrap().is_none(),
                "prefix of {cut}/{} bytes",
                frame.len()
            );
        }
    }
}

#[test]
fn back_to_back_frames() {
    let a = Message::new(1, samples().remove(0));
    let b = Message::new(2, Body::Ack(Ack {}));
    let mut buf = Vec::new();
    encode_frame_into(&a, &mut buf).unwrap();
    let first_len = buf.len();
    encode_frame_into(&b, &mut buf).unwrap();
    buf.extend_from_slice(&[0, 0]); // start of a third frame

    let (m1, used1) = decode(&buf).unwrap().unwrap();
    assert_eq!((m1, used1), (a, first_len));
    let (m2, used2) = decode(&buf[used1..]).unwrap().unwrap();
    assert_eq!(m2, b);
    assert_eq!(used1 + used2, buf.len() - 2);
    assert!(decode(&buf[used1 + used2..]).unwrap().is_none());
}

#[test]
fn oversized_length_fails_without_body() {
    let err = decode(&70000u32.to_be_bytes()).unwrap_err();
    assert!(matches!(
        err,
        WireError::FrameTooLarge {
            len: 70000,
            max: 65536
        }
    ));
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    assert_eq!(err.request_id(), None);
    assert_eq!(
        err.to_string(),
        "frame of 70000 bytes exceeds the 65536-byte limit; the peer is not speaking hostbind \
         protocol v1 or is broken"
    );
    assert!(matches!(
        decode(&u32::MAX.to_be_bytes()),
        Err(WireError::FrameTooLarge { .. })
    ));
    // Exactly the limit is allowed (and needs the body).
    assert!(decode(&65536u32.to_be_bytes()).unwrap().is_none());
}

#[test]
fn encode_refuses_too_large_message() {
    let msg = Message::new(
        1,
        Body::TokenResponse(TokenResponse {
            lease_id: "l".into(),
            token: ByteBuf::from(vec![0; MAX_FRAME_BODY]),
            token_expires_at: 0,
            lease_expires_at: 0,
            grace_secs: 0,
        }),
    );
    let mut out = vec![1, 2, 3];
    let err = encode_frame_into(&msg, &mut out).unwrap_err();
    assert!(matches!(err, WireError::MessageTooLarge { max: 65536, len } if len > 65536));
    assert_eq!(out, vec![1, 2, 3], "output buffer restored");
    assert!(encode_frame(&msg).is_err());
}

#[test]
fn zero_length_frame_is_malformed() {
    let err = decode(&[0, 0, 0, 0]).unwrap_err();
    assert!(
        matches!(err, WireError::Malformed { id: None, .. }),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::Malformed);
}

#[test]
fn wrong_version_is_reported_with_id_even_if_body_is_unknown() {
    let body = msg_value(
        Value::Integer(2.into()),
        Value::Integer(99.into()),
        Value::Map(vec![(text("quantum_hello"), Value::Array(vec![]))]),
    );
    let err = decode(&frame_of(&cbor(&body))).unwrap_err();
    match &err {
        WireError::UnsupportedVersion { got, supported, id } => {
            assert_eq!((*got, *supported, *id), (2, 1, Some(99)));
        }
        e => panic!("unexpected {e:?}"),
    }
    assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
    assert_eq!(err.request_id(), Some(99));
    let reply = ErrorBody::from(&err);
    assert_eq!(reply.code, ErrorCode::UnsupportedVersion);
    assert!(reply.message.contains("version 2"), "{}", reply.message);

    // v0 and huge versions, id missing.
    for v in [0u64, 3, u64::MAX] {
        let body = Value::Map(vec![
            (text("v"), Value::Integer(v.into())),
            (text("body"), Value::Null),
        ]);
        let err = decode(&frame_of(&cbor(&body))).unwrap_err();
        assert!(
            matches!(err, WireError::UnsupportedVersion { got, id: None, .. } if got == v),
            "{err:?}"
        );
    }
    // Trailing data in a v2 frame is still a version error.
    let mut b = cbor(&msg_value(
        Value::Integer(2.into()),
        Value::Integer(1.into()),
        Value::Null,
    ));
    b.push(0);
    assert!(matches!(
        decode(&frame_of(&b)),
        Err(WireError::UnsupportedVersion { .. })
    ));
}

fn malformed(frame: &[u8]) -> (String, Option<u64>) {
    match decode(frame) {
        Err(WireError::Malformed { reason, id }) => (reason, id),
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn malformed_messages() {
    let good = cbor(&msg_value(
        Value::Integer(1.into()),
        Value::Integer(8.into()),
        Value::Map(vec![(text("ack"), Value::Map(vec![]))]),
    ));
    assert!(decode(&frame_of(&good)).unwrap().is_some());

    // Trailing bytes inside the frame.
    let mut b = good.clone();
    b.extend_from_slice(&[0xf6, 0xf6]);
    let (reason, id) = malformed(&frame_of(&b));
    assert_eq!(id, Some(8));
    assert!(reason.contains("2 bytes follow"), "{reason}");

    // Not a map.
    let (reason, id) = malformed(&frame_of(&cbor(&Value::Array(vec![]))));
    assert_eq!(id, None);
    assert!(reason.contains("not a CBOR map"), "{reason}");

    // Truncated CBOR inside a complete frame.
    let (reason, _) = malformed(&frame_of(&good[..good.len() - 1]));
    assert!(reason.contains("ends before"), "{reason}");

    // Invalid CBOR (reserved additional info 28).
    let (reason, _) = malformed(&frame_of(&[0x1c]));
    assert!(reason.contains("invalid CBOR"), "{reason}");

    // Unknown body variant, with the id.
    let b = cbor(&msg_value(
        Value::Integer(1.into()),
        Value::Integer(3.into()),
        Value::Map(vec![(text("launch_missiles"), Value::Map(vec![]))]),
    ));
    let (reason, id) = malformed(&frame_of(&b));
    assert_eq!(id, Some(3));
    assert!(reason.contains("launch_missiles"), "{reason}");

    // Missing fields.
    let b = cbor(&Value::Map(vec![
        (text("v"), Value::Integer(1.into())),
        (text("id"), Value::Integer(3.into())),
    ]));
    assert!(malformed(&frame_of(&b)).0.contains("no `body`"));
    let b = cbor(&Value::Map(vec![
        (text("v"), Value::Integer(1.into())),
        (text("body"), Value::Null),
    ]));
    assert_eq!(
        malformed(&frame_of(&b)),
        ("the message has no `id`".into(), None)
    );
    let b = cbor(&Value::Map(vec![
        (text("id"), Value::Integer(3.into())),
        (text("body"), Value::Null),
    ]));
    assert_eq!(malformed(&frame_of(&b)).1, Some(3));

    // Wrong types for v and id.
    let b = cbor(&msg_value(text("1"), Value::Integer(3.into()), Value::Null));
    assert!(malformed(&frame_of(&b)).0.contains("`v` is not"));
    let b = cbor(&msg_value(
        Value::Integer((-1).into()),
        Value::Integer(3.into()),
        Value::Null,
    ));
    assert!(malformed(&frame_of(&b)).0.contains("`v` is not"));
    let b = cbor(&msg_value(
        Value::Integer(1.into()),
        Value::Integer((-3).into()),
        Value::Null,
    ));
    assert!(malformed(&frame_of(&b)).0.contains("`id` is not"));

    // Duplicate keys.
    let b = cbor(&Value::Map(vec![
        (text("v"), Value::Integer(1.into())),
        (text("id"), Value::Integer(3.into())),
        (text("v"), Value::Integer(2.into())),
        (text("body"), Value::Null),
    ]));
    assert!(malformed(&frame_of(&b)).0.contains("twice"));

    // Chain entries that are not 16 bytes.
    let b = cbor(&msg_value(
        Value::Integer(1.into()),
        Value::Integer(4.into()),
        Value::Map(vec![(
            text("release"),
            Value::Map(vec![(text("lease_id"), Value::Integer(1.into()))]),
        )]),
    ));
    assert_eq!(malformed(&frame_of(&b)).1, Some(4));

    // Unknown top-level keys are ignored.
    let b = cbor(&Value::Map(vec![
        (text("v"), Value::Integer(1.into())),
        (text("id"), Value::Integer(3.into())),
        (text("trace"), text("abc")),
        (
            text("body"),
            Value::Map(vec![(text("ack"), Value::Map(vec![]))]),
        ),
    ]));
    assert_eq!(decode(&frame_of(&b)).unwrap().unwrap().0.id, 3);
}

fn bad_chain_frame(len: usize) -> Vec<u8> {
    let chain = Value::Array(vec![Value::Bytes(vec![0; len])]);
    let b = cbor(&msg_value(
        Value::Integer(1.into()),
        Value::Integer(6.into()),
        Value::Map(vec![(
            text("renew"),
            Value::Map(vec![
                (text("lease_id"), text("l")),
                (text("nonce"), Value::Null),
                (text("chain"), chain),
            ]),
        )]),
    ));
    frame_of(&b)
}

#[test]
fn ephemeral_ids_must_be_16_bytes() {
    assert!(decode(&bad_chain_frame(16)).unwrap().is_some());
    for len in [0, 15, 17, 32] {
        let (_, id) = malformed(&bad_chain_frame(len));
        assert_eq!(id, Some(6));
    }
}

fn limit_err(body: Body) -> Option<String> {
    let frame = encode_frame(&Message::new(11, body)).unwrap();
    match decode(&frame) {
        Ok(Some(_)) => None,
        Err(WireError::Malformed { reason, id }) => {
            assert_eq!(id, Some(11), "validation errors carry the id");
            Some(reason)
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn request(f: impl FnOnce(&mut TokenRequest)) -> Body {
    let mut r = TokenRequest {
        product: "p".into(),
        features: vec![],
        nonce: None,
        scope: Scope::Vm,
        pid: None,
        pid_start: None,
        chain: vec![],
        tpm_fresh: false,
    };
    f(&mut r);
    Body::TokenRequest(r)
}

#[test]
fn content_limits_are_enforced() {
    let s = |n: usize| "x".repeat(n);
    // At the limit: fine. One over: Malformed with a reason.
    assert_eq!(limit_err(request(|r| r.product = s(256))), None);
    assert!(limit_err(request(|r| r.product = s(257)))
        .unwrap()
        .contains("product is 257 bytes"));
    assert_eq!(limit_err(request(|r| r.features = vec![s(256); 64])), None);
    assert!(limit_err(request(|r| r.features = vec![s(1); 65]))
        .unwrap()
        .contains("65 features"));
    assert!(limit_err(request(|r| r.features = vec![s(257)])).is_some());
    assert_eq!(limit_err(request(|r| r.chain = vec![[0; 16]; 16])), None);
    assert!(limit_err(request(|r| r.chain = vec![[0; 16]; 17]))
        .unwrap()
        .contains("17 entries"));
    assert_eq!(
        limit_err(request(|r| r.nonce = Some(ByteBuf::from(vec![0; 64])))),
        None
    );
    assert!(limit_err(request(|r| r.nonce = Some(ByteBuf::from(vec![0; 65])))).is_some());
    // A multi-byte string is measured in bytes: 86 * 3 = 258 bytes.
    assert!(limit_err(request(|r| r.product = "€".repeat(86))).is_some());

    let hello = |facts: usize, klen: usize, vlen: usize, host: Option<usize>| {
        Body::Hello(Hello {
            agent_version: "1".into(),
            chain: vec![],
            facts: (0..facts)
                .map(|i| (format!("{i:0>width$}", width = klen.max(3)), s(vlen)))
                .collect(),
            known_host: host.map(|n| ByteBuf::from(vec![0; n])),
        })
    };
    assert_eq!(limit_err(hello(32, 256, 256, Some(32))), None);
    assert!(limit_err(hello(33, 3, 1, None))
        .unwrap()
        .contains("33 facts"));
    assert!(limit_err(hello(1, 257, 1, None)).is_some());
    assert!(limit_err(hello(1, 3, 257, None)).is_some());
    assert!(limit_err(hello(0, 3, 1, Some(31)))
        .unwrap()
        .contains("known_host"));

    let ack = |id_len: usize, name: usize| {
        Body::HelloAck(HelloAck {
            proxy_version: "1".into(),
            host_id: ByteBuf::from(vec![0; id_len]),
            host_cert: ByteBuf::new(),
            vm: VmIdentity {
                uuid: "u".into(),
                name: s(name),
            },
            lease_ttl_secs: 1,
            idle_timeout_secs: None,
            lease_query: false,
        })
    };
    assert_eq!(limit_err(ack(32, 256)), None);
    assert!(limit_err(ack(33, 1)).unwrap().contains("host_id"));
    assert!(limit_err(ack(32, 257)).is_some());

    assert!(limit_err(Body::Release(Release { lease_id: s(257) })).is_some());
    assert!(limit_err(Body::Renew(Renew {
        lease_id: "l".into(),
        nonce: Some(ByteBuf::from(vec![0; 65])),
        chain: vec![],
        tpm_fresh: false,
    }))
    .is_some());
    assert!(limit_err(Body::TokenResponse(TokenResponse {
        lease_id: s(257),
        token: ByteBuf::new(),
        token_expires_at: 0,
        lease_expires_at: 0,
        grace_secs: 0,
    }))
    .is_some());
    assert!(limit_err(Body::Event(Event {
        kind: EventKind::LeaseExpired,
        lease_id: None,
        product: Some(s(257)),
        message: String::new(),
    }))
    .is_some());
}

#[test]
fn kind_names_match_wire_names() {
    for body in samples() {
        let v = Value::serialized(&body).unwrap();
        let (key, _) = &v.as_map().unwrap()[0];
        assert_eq!(key.as_text(), Some(body.kind()));
    }
}

/// The framing works with other body types (the proxy's admin socket).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum AdminBody {
    ListLeases { product: Option<String> },
    Leases(Vec<String>),
}
impl Validate for AdminBody {}

#[test]
fn generic_bodies() {
    let msg = Message::new(
        12,
        AdminBody::ListLeases {
            product: Some("cad".into()),
        },
    );
    let frame = encode_frame(&msg).unwrap();
    let (back, used) = decode_frame::<AdminBody>(&frame).unwrap().unwrap();
    assert_eq!((back, used), (msg, frame.len()));
    // The same bytes as an agent Body are Malformed (with the id), not a panic.
    let (_, id) = malformed(&frame);
    assert_eq!(id, Some(12));
    // Any frame can be read as a raw CBOR value.
    let (raw, _) = decode_frame::<Value>(&frame).unwrap().unwrap();
    assert_eq!(raw.id, 12);
    let leases = Message::new(13, AdminBody::Leases(vec!["a".into(), "b".into()]));
    let (back, _) = decode_frame::<AdminBody>(&encode_frame(&leases).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(back, leases);
}

#[test]
fn error_helpers() {
    let e = WireError::Malformed {
        reason: "r".into(),
        id: Some(4),
    };
    assert_eq!((e.code(), e.request_id()), (ErrorCode::Malformed, Some(4)));
    let e = WireError::Encode("x".into());
    assert_eq!((e.code(), e.request_id()), (ErrorCode::Internal, None));
    let e = WireError::from(std::io::Error::other("boom"));
    assert_eq!(e.code(), ErrorCode::Internal);
    assert!(e.to_string().contains("boom"));
    assert_eq!(WireError::malformed("m").request_id(), None);
}
