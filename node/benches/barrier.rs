//! The cost of the barrier and of the unseal ceremony's cryptography: AES-256-GCM encrypt and
//! decrypt of a value bound to its path (256 B, etcd's published case, and 4 KiB, a realistic
//! secret), and a threshold decryption share and its verification.
//!
//! `cargo bench -p coffer-node --bench barrier`

use std::collections::BTreeMap;

use coffer_node::barrier::Keyring;
use coffer_node::threshold;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn barrier(c: &mut Criterion) {
    let ring = Keyring::new().expect("keyring");
    let mut group = c.benchmark_group("barrier");
    for size in [256usize, 4096] {
        let value = vec![0x5au8; size];
        let sealed = ring.encrypt(b"secret/app/db", &value).expect("encrypt");
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encrypt", size), &value, |b, v| {
            b.iter(|| ring.encrypt(b"secret/app/db", v).expect("encrypt"))
        });
        group.bench_with_input(BenchmarkId::new("decrypt", size), &sealed, |b, s| {
            b.iter(|| ring.decrypt(b"secret/app/db", s).expect("decrypt"))
        });
    }
    group.finish();
}

fn ceremony(c: &mut Criterion) {
    let dealt = threshold::deal(3, 2, &[7u8; 32]).expect("deal");
    let share = threshold::decryption_share(&dealt.shares[0], &dealt.ciphertext).expect("share");
    let other = threshold::decryption_share(&dealt.shares[1], &dealt.ciphertext).expect("share");
    let mut group = c.benchmark_group("ceremony");
    group.sample_size(20);
    group.bench_function("decryption_share", |b| {
        b.iter(|| threshold::decryption_share(&dealt.shares[0], &dealt.ciphertext).expect("share"))
    });
    group.bench_function("verify_share", |b| {
        b.iter(|| {
            threshold::verify_share(&dealt.public_set, 0, &share, &dealt.ciphertext).expect("v")
        })
    });
    let two = BTreeMap::from([(0usize, share.clone()), (1usize, other.clone())]);
    group.bench_function("combine_2_of_3", |b| {
        b.iter(|| threshold::combine(&dealt.public_set, 2, &two, &dealt.ciphertext).expect("c"))
    });
    group.finish();
}

criterion_group!(benches, barrier, ceremony);
criterion_main!(benches);
