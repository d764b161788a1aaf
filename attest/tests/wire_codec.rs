//! The `codec` feature: `FrameCodec` over an in-memory duplex stream.
#![cfg(feature = "codec")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use hostbind_attest::wire::*;
use serde_bytes::ByteBuf;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{Decoder, Encoder, Framed, FramedRead};

/// Fails the test instead of hanging when the pipe deadlocks.
async fn within_10s(f: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(std::time::Duration::from_secs(10), f)
        .await
        .expect("test timed out after 10 s");
}

fn request(id: u64) -> Message {
    Message::new(
        id,
        Body::TokenRequest(TokenRequest {
            product: "cad".into(),
            features: vec!["render".into()],
            nonce: Some(ByteBuf::from(vec![id as u8; 32])),
            scope: Scope::Process,
            pid: Some(100 + id as u32),
            pid_start: None,
            chain: vec![[id as u8; 16]],
            tpm_fresh: false,
        }),
    )
}

fn response(id: u64) -> Message {
    Message::new(
        id,
        Body::TokenResponse(TokenResponse {
            lease_id: format!("lease-{id}"),
            token: ByteBuf::from(vec![0x5a; 2048]),
            token_expires_at: 1_800_000_000,
            lease_expires_at: 1_800_000_300,
            grace_secs: 0,
        }),
    )
}

#[tokio::test]
async fn request_response_over_duplex() {
    within_10s(request_response_over_duplex_body()).await;
}

async fn request_response_over_duplex_body() {
    let (a, b) = tokio::io::duplex(1024); // small pipe: frames cross it in pieces
    let agent = Framed::new(a, FrameCodec::<Body>::new());
    let mut proxy = Framed::new(b, FrameCodec::<Body>::default());

    let server = tokio::spawn(async move {
        let mut seen = 0;
        while let Some(msg) = proxy.next().await {
            let msg = msg.unwrap();
            assert_eq!(msg.body.kind(), "token_request");
            proxy.send(response(msg.id)).await.unwrap();
            seen += 1;
        }
        seen
    });

    // Pipelined: send all requests before reading any answer, reading concurrently so the
    // small pipe cannot deadlock.
    let (mut tx, mut rx) = agent.split();
    let writer = tokio::spawn(async move {
        for id in 1..=20 {
            tx.feed(request(id)).await.unwrap();
        }
        tx.flush().await.unwrap();
        tx
    });
    for id in 1..=20 {
        let reply = rx.next().await.unwrap().unwrap();
        assert_eq!(reply, response(id));
    }
    let mut agent = writer.await.unwrap().reunite(rx).unwrap();
    agent.send(request(21)).await.unwrap();
    assert_eq!(agent.next().await.unwrap().unwrap(), response(21));

    drop(agent);
    assert_eq!(server.await.unwrap(), 21);
}

#[tokio::test]
async fn oversized_frame_is_rejected_without_reading_it() {
    within_10s(oversized_frame_is_rejected_without_reading_it_body()).await;
}

async fn oversized_frame_is_rejected_without_reading_it_body() {
    let (mut a, b) = tokio::io::duplex(64);
    let mut proxy = FramedRead::new(b, FrameCodec::<Body>::new());
    // Only the prefix is sent; the 1 MiB body never comes.
    a.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    match proxy.next().await {
        Some(Err(WireError::FrameTooLarge { len, max })) => {
            assert_eq!((len, max), (1 << 20, MAX_FRAME_BODY));
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    assert!(proxy.read_buffer().capacity() <= 2 * (MAX_FRAME_BODY + 4));
}

#[tokio::test]
async fn wrong_version_and_malformed_come_with_ids() {
    within_10s(wrong_version_and_malformed_come_with_ids_body()).await;
}

async fn wrong_version_and_malformed_come_with_ids_body() {
    let (mut a, b) = tokio::io::duplex(4096);
    let mut proxy = FramedRead::new(b, FrameCodec::<Body>::new());
    let mut msg = encode_frame(&request(9)).unwrap();
    // Patch v: the map starts `a3 61 76 01` ({"v": 1, ...}); make it 2.
    let at = msg
        .windows(3)
        .position(|w| w == [0x61, b'v', 0x01])
        .unwrap();
    msg[at + 2] = 0x02;
    a.write_all(&msg).await.unwrap();
    match proxy.next().await {
        Some(Err(e @ WireError::UnsupportedVersion { .. })) => {
            assert_eq!(e.request_id(), Some(9));
            assert_eq!(e.code(), ErrorCode::UnsupportedVersion);
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }

    let (mut a, b) = tokio::io::duplex(4096);
    let mut proxy = FramedRead::new(b, FrameCodec::<Body>::new());
    let mut bad = request(10);
    if let Body::TokenRequest(r) = &mut bad.body {
        r.product = "p".repeat(MAX_STRING_LEN + 1);
    }
    a.write_all(&encode_frame(&bad).unwrap()).await.unwrap();
    match proxy.next().await {
        Some(Err(e @ WireError::Malformed { .. })) => {
            assert_eq!(e.request_id(), Some(10));
            assert_eq!(ErrorBody::from(&e).code, ErrorCode::Malformed);
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[tokio::test]
async fn eof_in_the_middle_of_a_frame_is_an_error() {
    within_10s(eof_in_the_middle_of_a_frame_is_an_error_body()).await;
}

async fn eof_in_the_middle_of_a_frame_is_an_error_body() {
    let (mut a, b) = tokio::io::duplex(4096);
    let mut proxy = FramedRead::new(b, FrameCodec::<Body>::new());
    let frame = encode_frame(&request(3)).unwrap();
    a.write_all(&frame).await.unwrap();
    a.write_all(&frame[..10]).await.unwrap();
    drop(a);
    assert_eq!(proxy.next().await.unwrap().unwrap(), request(3));
    match proxy.next().await {
        Some(Err(WireError::Io(e))) => {
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        }
        other => panic!("expected an EOF error, got {other:?}"),
    }
}

#[test]
fn codec_buffers_at_most_one_frame_and_encoder_checks_size() {
    let mut codec = FrameCodec::<Body>::new();
    let mut buf = BytesMut::new();
    codec.encode(response(1), &mut buf).unwrap();
    let whole = buf.clone();
    // Feed it one byte at a time.
    let mut src = BytesMut::new();
    let mut got = None;
    for b in whole.iter() {
        assert!(got.is_none());
        src.extend_from_slice(&[*b]);
        got = codec.decode(&mut src).unwrap();
        assert!(src.capacity() <= MAX_FRAME_BODY + 4 + 64);
    }
    assert_eq!(got.unwrap(), response(1));
    assert!(src.is_empty());

    // Too-large messages are refused and leave the buffer untouched.
    let mut dst = BytesMut::from(&b"xy"[..]);
    let big = Message::new(
        1,
        Body::TokenResponse(TokenResponse {
            lease_id: "l".into(),
            token: ByteBuf::from(vec![0; MAX_FRAME_BODY]),
            token_expires_at: 0,
            lease_expires_at: 0,
            grace_secs: 0,
        }),
    );
    assert!(matches!(
        codec.encode(big, &mut dst),
        Err(WireError::MessageTooLarge { .. })
    ));
    assert_eq!(&dst[..], b"xy");
    // The codec's encoding is the same as encode_frame's.
    assert_eq!(&whole[..], &encode_frame(&response(1)).unwrap()[..]);
}
