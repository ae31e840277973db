//! kv put and get throughput and latency through the Rust SDK on a 3-node cluster (file
//! storage, fsync, barrier encryption and session authentication on), and unwrap latency.
//!
//! Three SDK clients (one starting at each node, as three instances of a service would), logged
//! in as an identity with a policy; `CONCURRENCY` tasks spread over them, each putting or getting
//! a random one of 1,000 secrets with one 256-byte field. Unwrap: wraps and unwraps one after
//! another, timing the unwrap (a read-once transaction through the leader).
//!
//! ```sh
//! cargo build --release -p coffer-cluster-tests --bins --examples
//! target/release/examples/sdk_throughput [SECONDS per run, default 10]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer_client::{Client, Login};
use coffer_cluster_tests::{Cluster, ClusterOptions};
use coffer_node::keys::KeyPair;

const SECRETS: usize = 1000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Put,
    Get,
    GetStale,
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

async fn run(clients: &[Client], op: Op, concurrency: usize, seconds: f64) {
    let value = Arc::new("v".repeat(256));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let kv = clients[i % clients.len()].kv("secret");
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let path = format!("bench/{:04}", rand::random_range(0..SECRETS));
                let t = Instant::now();
                let ok = match op {
                    Op::Put => kv.put(&path, [("value", value.as_str())]).await.is_ok(),
                    Op::Get => kv.get(&path).await.is_ok(),
                    Op::GetStale => kv
                        .get_with(
                            &path,
                            coffer_client::kv::ReadOptions {
                                version: 0,
                                stale: true,
                            },
                        )
                        .await
                        .is_ok(),
                };
                if ok {
                    took.push(t.elapsed());
                } else {
                    errors += 1;
                }
            }
            (took, errors)
        }));
    }
    let mut took = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (mut d, e) = t.await.expect("task");
        took.append(&mut d);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    took.sort();
    println!(
        "{:<10} concurrency={concurrency:<3} ops/s={:<7.0} p50={:.2}ms p99={:.2}ms errors={errors}",
        format!("{op:?}"),
        took.len() as f64 / elapsed,
        percentile(&took, 0.5).as_secs_f64() * 1e3,
        percentile(&took, 0.99).as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("SECONDS"))
        .unwrap_or(10.0);
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    let file = cluster
        .must_create_identity(
            "bench",
            r#"path "secret/*" { capabilities = ["create", "read", "update"] }
path "wrap/to/bench" { capabilities = ["create"] }"#,
        )
        .await;
    let mut clients = Vec::new();
    for first in [1, 2, 3] {
        let mut order = vec![first];
        order.extend([1, 2, 3].into_iter().filter(|id| *id != first));
        let key = KeyPair::load(&file).expect("key");
        clients.push(cluster.sdk(&order, Login::Key(key)).await);
    }
    // Every secret exists before the reads.
    let kv = clients[0].kv("secret");
    for i in 0..SECRETS {
        kv.put(&format!("bench/{i:04}"), [("value", "v".repeat(256))])
            .await
            .expect("preload");
    }
    for op in [Op::Put, Op::Get, Op::GetStale] {
        for concurrency in [1, 16, 64] {
            run(&clients, op, concurrency, seconds).await;
        }
    }

    let me = KeyPair::load(&file).expect("key");
    let wrap = clients[1].wrap();
    let mut took = Vec::new();
    for i in 0..300 {
        let w = wrap
            .wrap(
                me.public(),
                format!("payload {i}").as_bytes(),
                Duration::from_secs(600),
            )
            .await
            .expect("wrap");
        let t = Instant::now();
        wrap.unwrap(&w.id).await.expect("unwrap");
        took.push(t.elapsed());
    }
    took.sort();
    println!(
        "Unwrap     sequential      n={}      p50={:.2}ms p99={:.2}ms",
        took.len(),
        percentile(&took, 0.5).as_secs_f64() * 1e3,
        percentile(&took, 0.99).as_secs_f64() * 1e3,
    );
}
