//! Criterion benches for the seat ledger on a real file: one acquire+release (two durable
//! commits) from a single caller, and the same from 32 concurrent callers, where group commit
//! puts many callers' writes under one fsync (reported per operation).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hostbind_attest::signed::CountMode;
use hostbind_proxy::ledger::{AcquireRequest, LeaseScope, Ledger};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn req(vm: &str) -> AcquireRequest<'_> {
    AcquireRequest {
        vm_uuid: vm,
        vm_name: vm,
        product: "cad",
        license_id: "L1",
        features: &[],
        scope: LeaseScope::Vm,
        pid: None,
        pid_start: None,
        ttl_secs: 600,
        now: 1_800_000_000,
        seats: 1_000_000,
        mode: CountMode::Access,
    }
}

fn bench(c: &mut Criterion) {
    let d = tempfile::tempdir().unwrap();
    let l = Arc::new(Ledger::open(&d.path().join("bench.redb")).unwrap());
    let mut g = c.benchmark_group("ledger");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    g.bench_function("commit_acquire_release_1_caller", |b| {
        b.iter(|| {
            let lease = l.acquire(&req("vm-a")).unwrap();
            l.release(&lease.id, "bench", 1_800_000_001).unwrap();
        })
    });
    const CALLERS: u64 = 32;
    g.throughput(Throughput::Elements(CALLERS));
    g.bench_function("commit_acquire_release_32_callers", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let ts: Vec<_> = (0..CALLERS)
                    .map(|i| {
                        let l = l.clone();
                        std::thread::spawn(move || {
                            let vm = format!("vm-{i}");
                            let lease = l.acquire(&req(&vm)).unwrap();
                            l.release(&lease.id, "bench", 1_800_000_001).unwrap();
                        })
                    })
                    .collect();
                for t in ts {
                    t.join().unwrap();
                }
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
