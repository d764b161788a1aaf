//! Criterion benches for the wire framing: encode and decode a typical token request and a
//! token response carrying a 2 KiB token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hostbind_attest::wire::{
    decode_frame, encode_frame_into, Body, Message, Scope, TokenRequest, TokenResponse,
};
use serde_bytes::ByteBuf;

fn token_request() -> Message {
    Message::new(
        41,
        Body::TokenRequest(TokenRequest {
            product: "acme-cad-pro".into(),
            features: vec!["render".into(), "export-step".into(), "cloud-sync".into()],
            nonce: Some(ByteBuf::from(vec![0xa5; 32])),
            scope: Scope::Process,
            pid: Some(31337),
            pid_start: None,
            chain: vec![[0x11; 16], [0x22; 16], [0x33; 16]],
            tpm_fresh: false,
        }),
    )
}

fn token_response() -> Message {
    Message::new(
        41,
        Body::TokenResponse(TokenResponse {
            lease_id: "lease-6f1c0a3e9b2d4c58".into(),
            token: ByteBuf::from(vec![0x5a; 2048]),
            token_expires_at: 1_800_000_000,
            lease_expires_at: 1_800_000_300,
            grace_secs: 0,
        }),
    )
}

fn bench(c: &mut Criterion) {
    for (name, msg) in [
        ("token_request", token_request()),
        ("token_response_2k", token_response()),
    ] {
        let mut frame = Vec::new();
        encode_frame_into(&msg, &mut frame).unwrap();
        let mut g = c.benchmark_group(format!("wire/{name}"));
        g.throughput(Throughput::Bytes(frame.len() as u64));
        let mut out = Vec::with_capacity(4096);
        g.bench_function("encode", |b| {
            b.iter(|| {
                out.clear();
                encode_frame_into(black_box(&msg), &mut out).unwrap();
                black_box(out.len())
            })
        });
        g.bench_function("decode", |b| {
            b.iter(|| {
                let (m, used) = decode_frame::<Body>(black_box(&frame)).unwrap().unwrap();
                black_box((m, used))
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
