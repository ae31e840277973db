//! A write accepted by a follower is forwarded to the leader, and once it returns, a
//! linearizable read on every node (followers included) sees it: followers serve reads through
//! read-index, never from possibly stale local state.

use std::time::Duration;

use coffer_api::v1 as pb;
use coffer_cluster_tests::{Cluster, ClusterOptions, metric};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_write_is_linearizable_everywhere() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    let follower = cluster.other_than(leader);
    for round in 0..20 {
        let key = format!("app/k{round}");
        let value = format!("value-{round}");
        let put = cluster.must_put(follower, &key, &value).await;
        assert_eq!(
            put.header.expect("header").node_id,
            follower,
            "the follower itself answers (no redirect for the client)"
        );
        for id in cluster.running() {
            cluster.must_get_equal(id, &key, &value).await;
        }
    }
}

/// Concurrent linearizable reads on a follower share read-index rounds (one request to the
/// leader answers every read that was waiting when it was sent), and each of them still sees
/// the write acknowledged before it began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_follower_reads_share_read_index_rounds() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    let follower = cluster.other_than(leader);
    let counts = |text: &str| {
        (
            metric(text, "coffer_linearizable_reads_total").unwrap_or(0.0),
            metric(text, "coffer_read_index_rounds_total").unwrap_or(0.0),
        )
    };
    for round in 0..5 {
        let key = format!("app/shared-{round}");
        let value = format!("value-{round}");
        cluster.must_put(leader, &key, &value).await;
        let before = counts(&cluster.metrics_text(follower).await.expect("metrics"));
        // One connection, 64 requests in flight on it at once.
        let kv = cluster.kv(follower);
        let reads: Vec<_> = (0..64)
            .map(|_| {
                let mut kv = kv.clone();
                let key = key.clone();
                async move {
                    kv.get(pb::GetRequest {
                        key: key.into(),
                        consistency: pb::Consistency::Linearizable as i32,
                    })
                    .await
                }
            })
            .collect();
        for r in futures::future::join_all(reads).await {
            let got = r
                .expect("linearizable get")
                .into_inner()
                .kv
                .expect("the key exists");
            assert_eq!(
                got.value,
                value.as_bytes(),
                "a read missed the acknowledged write"
            );
        }
        let after = counts(&cluster.metrics_text(follower).await.expect("metrics"));
        let (reads, rounds) = (after.0 - before.0, after.1 - before.1);
        // The node's own background reads may add a few of each.
        assert!(
            reads >= 64.0,
            "every read waited for a read index ({reads} counted)"
        );
        assert!(
            rounds >= 1.0 && rounds <= reads / 2.0,
            "{reads} reads took {rounds} read-index rounds; concurrent reads should share them"
        );
    }
}

/// Concurrent writes through a follower share forwarded batches (one request to the leader
/// carries every write that queued while earlier batches were out), and each write still
/// applies once and is readable everywhere once acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_follower_writes_share_forwarded_batches() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    let follower = cluster.other_than(leader);
    let counts = |text: &str| {
        (
            metric(text, "coffer_forwarded_writes_total").unwrap_or(0.0),
            metric(text, "coffer_forward_batches_total").unwrap_or(0.0),
        )
    };
    let before = counts(&cluster.metrics_text(follower).await.expect("metrics"));
    // One connection, 64 writes in flight on it at once, three times.
    let kv = cluster.kv(follower);
    for round in 0..3 {
        let writes: Vec<_> = (0..64)
            .map(|i| {
                let mut kv = kv.clone();
                async move {
                    kv.put(pb::PutRequest {
                        key: format!("app/batch-{round}-{i}").into(),
                        value: format!("value-{i}").into(),
                        request_id: Vec::new(),
                    })
                    .await
                }
            })
            .collect();
        for r in futures::future::join_all(writes).await {
            r.expect("put through the follower");
        }
    }
    let after = counts(&cluster.metrics_text(follower).await.expect("metrics"));
    let (writes, batches) = (after.0 - before.0, after.1 - before.1);
    // All 192 unless an election made the follower the leader meanwhile (then it proposes
    // the rest itself).
    assert!(
        writes >= 64.0,
        "the writes were forwarded ({writes} counted)"
    );
    assert!(
        batches >= 1.0 && batches <= writes / 2.0,
        "{writes} writes took {batches} batches; concurrent writes should share them"
    );
    for id in cluster.running() {
        for i in [0, 31, 63] {
            cluster
                .must_get_equal(id, &format!("app/batch-2-{i}"), &format!("value-{i}"))
                .await;
        }
    }
    // Each write applied once: a second apply would have made version 2.
    let mut kv = cluster.kv(leader);
    for round in 0..3 {
        for i in 0..64 {
            let key = format!("app/batch-{round}-{i}");
            let got = kv
                .get(pb::GetRequest {
                    key: key.clone().into(),
                    consistency: pb::Consistency::Linearizable as i32,
                })
                .await
                .expect("get")
                .into_inner()
                .kv
                .unwrap_or_else(|| panic!("{key} is missing"));
            assert_eq!(got.version, 1, "{key} was applied more than once");
        }
    }
}
