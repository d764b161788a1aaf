//! Criterion benches for TPM-fresh nonce batches: building a Merkle tree with all inclusion
//! proofs (what the proxy does per batch) and verifying one proof (what a verifier does).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hostbind_attest::merkle::MerkleTree;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("merkle");
    for n in [1usize, 64, 1024] {
        let nonces: Vec<Vec<u8>> = (0..n).map(|i| (i as u64).to_be_bytes().repeat(4)).collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("build_with_proofs", n), &nonces, |b, l| {
            b.iter(|| {
                let t = MerkleTree::build(black_box(l)).unwrap();
                let proofs: Vec<_> = (0..l.len()).map(|i| t.proof(i).unwrap()).collect();
                black_box((t.root(), proofs))
            })
        });
        let t = MerkleTree::build(&nonces).unwrap();
        let (root, p) = (t.root(), t.proof(n / 2).unwrap());
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::new("verify_proof", n),
            &nonces[n / 2],
            |b, leaf| b.iter(|| p.verify(black_box(leaf), &root).unwrap()),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
