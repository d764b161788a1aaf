//! Criterion benches for the usage log: sealing one full 4 KiB block (HPKE to the metering
//! key), opening it, and verifying + reporting a 1,000-block log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hostbind_attest::usage::{
    block_hash, open_block, read_log, seal_block, BlockBody, BlockHeader, LeaseRef, MeteringSecret,
    TpmClock, UsageRecord, VmRef, BLOCK_SIZE, MAX_BODY,
};
use hostbind_attest::usage_body::BodyBuilder;
use rand_core::OsRng;

/// A body filled as a busy host fills one: short leases (start, token, end) on 8 VMs, as many
/// as fit.
fn full_body() -> BlockBody {
    let mut b = BodyBuilder::new(&"ab".repeat(32));
    for i in 0u64.. {
        let lease = LeaseRef {
            lease_id: format!("6f1c0a3e-9b2d-4c58-a1b2-{i:012}"),
            product: "acme-cad-pro".into(),
            license_id: "lic-0123456789abcdef".into(),
            customer: "ACME Engineering".into(),
            vm: VmRef {
                uuid: format!("6f1c1c8e-0a1d-4d4e-9a53-{:012}", i % 8),
                name: format!("cad-workstation-{:02}", i % 8),
            },
        };
        let at = 1_800_000_000 + i;
        for r in [
            UsageRecord::LeaseStart {
                at,
                lease: lease.clone(),
                scope: "vm".into(),
            },
            UsageRecord::token(at, lease.clone()),
            UsageRecord::LeaseEnd {
                at: at + 1,
                lease,
                reason: "released by the guest".into(),
            },
        ] {
            if b.push(r, MAX_BODY).is_err() {
                return b.finish();
            }
        }
    }
    b.finish()
}

fn header(seq: u64, prev: [u8; 32]) -> BlockHeader {
    BlockHeader {
        seq,
        prev,
        nv: 100 + seq,
        tpm: TpmClock {
            clock: 1_000_000 + seq * 60_000,
            reset_count: 1,
            restart_count: 0,
        },
        wall: 1_800_000_000 + seq * 60,
        key_id: [0; 8],
    }
}

fn bench(c: &mut Criterion) {
    let secret = MeteringSecret::from_ikm(b"bench metering key material 32b!");
    let body = full_body();
    println!("records per full block: {}", body.records.len());
    let block = seal_block(&header(0, [0; 32]), &body, secret.public(), &mut OsRng).unwrap();
    let mut g = c.benchmark_group("usage_block");
    g.throughput(Throughput::Bytes(BLOCK_SIZE as u64));
    g.bench_function("seal", |b| {
        b.iter(|| {
            seal_block(
                &header(0, [0; 32]),
                black_box(&body),
                secret.public(),
                &mut OsRng,
            )
        })
    });
    g.bench_function("open", |b| {
        b.iter(|| open_block(black_box(&block), &secret))
    });
    g.finish();

    let mut log = Vec::new();
    let mut prev = [0u8; 32];
    for seq in 0..1000 {
        let b = seal_block(&header(seq, prev), &body, secret.public(), &mut OsRng).unwrap();
        prev = block_hash(&b);
        log.extend_from_slice(&b);
    }
    let mut g = c.benchmark_group("usage_log");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(log.len() as u64));
    g.bench_function("read_log_1000_blocks", |b| {
        b.iter(|| {
            let r = read_log(black_box(&log), &secret, 120);
            assert!(r.anomalies.is_empty());
            r
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
