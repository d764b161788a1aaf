//! Criterion benches for clone detection's graph logic (in memory, no storage): one observed
//! 4-id suffix on a long chain (the per-request cost on top of storage), and a fork appearing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use hostbind_attest::chain::{observe, MemStore};
use hostbind_attest::wire::EphemeralId;

fn id(n: u64) -> EphemeralId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_be_bytes());
    b
}

/// A store holding one chain of `len` ids, as one agent leaves it after `len` appends.
fn chain_of(len: u64) -> MemStore {
    let mut s = MemStore::default();
    for k in 0..len {
        let from = k.saturating_sub(3);
        let suffix: Vec<EphemeralId> = (from..=k).map(id).collect();
        observe(&mut s, &suffix, "vm", Some("cad"), k, 300).unwrap();
    }
    s
}

fn bench(c: &mut Criterion) {
    let base = chain_of(10_000);
    let mut g = c.benchmark_group("chain");
    g.bench_function("observe_known_suffix_on_10k_chain", |b| {
        let mut s = base.clone();
        let suffix: Vec<EphemeralId> = (9_996..10_000).map(id).collect();
        b.iter(|| observe(&mut s, black_box(&suffix), "vm", Some("cad"), 20_000, 300).unwrap())
    });
    g.bench_function("observe_append_on_10k_chain", |b| {
        b.iter_batched(
            || base.clone(),
            |mut s| {
                let suffix: Vec<EphemeralId> = (9_997..10_001).map(id).collect();
                let o = observe(&mut s, black_box(&suffix), "vm", Some("cad"), 20_000, 300);
                // Returned, so the store is dropped outside the timing.
                (s, o.unwrap())
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.bench_function("observe_fork_on_10k_chain", |b| {
        b.iter_batched(
            || base.clone(),
            |mut s| {
                let suffix = vec![id(9_997), id(9_998), id(u64::MAX)];
                let o = observe(&mut s, black_box(&suffix), "vm-b", Some("cad"), 20_000, 300);
                (s, o.unwrap())
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
