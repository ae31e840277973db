//! kill -9 of the leader under a concurrent write load: a new leader is elected, every
//! acknowledged write is present afterwards on every node, and writes resume. A linearizable
//! read sent while no leader answers waits for the next one without spinning.

use std::time::Duration;

use coffer_api::v1 as pb;
use coffer_cluster_tests::{Cluster, ClusterOptions, Writer, metric, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await;
    let old_leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    let channels = cluster
        .running()
        .into_iter()
        .map(|id| cluster.channel(id))
        .collect();
    let writer = Writer::start("load", channels, 8);

    // Let some writes land, then kill the leader in the middle of the load.
    wait_until(
        Duration::from_secs(10),
        "writes to be acknowledged",
        || async {
            let s = cluster.status(old_leader).await?;
            (s.applied_index > 50).then_some(())
        },
    )
    .await;
    cluster.kill(old_leader);
    let new_leader = cluster.must_wait_leader(Duration::from_secs(15)).await;
    assert_ne!(new_leader, old_leader);
    // Writes resume under the new leader while the load keeps running.
    let before = cluster
        .status(new_leader)
        .await
        .expect("status")
        .applied_index;
    wait_until(Duration::from_secs(15), "writes to resume", || async {
        let s = cluster.status(new_leader).await?;
        (s.applied_index > before + 20).then_some(())
    })
    .await;
    let log = writer.stop().await;
    assert!(
        log.acked.len() > 50,
        "too few acknowledged writes: {}",
        log.acked.len()
    );

    // The old leader comes back and catches up; every acknowledged write is on every node.
    cluster.spawn(old_leader);
    cluster.must_wait_leader(Duration::from_secs(15)).await;
    cluster
        .must_wait_unsealed(&[old_leader], Duration::from_secs(20))
        .await;
    cluster.must_put(old_leader, "after/restart", "ok").await;
    cluster.must_converge(Duration::from_secs(20)).await;
    for id in cluster.running() {
        let stored = cluster.must_list_local(id, "load/").await;
        for (key, value) in &log.acked {
            assert_eq!(
                stored.get(key),
                Some(value),
                "node {id} lost the acknowledged write {key}"
            );
        }
    }

    // Kill the leader again and read through a survivor at once: until a new leader is
    // elected, each attempt at a read index fails fast (the old leader's connection is
    // refused), and the read retries when Raft's state changes or after two heartbeats, not
    // in a loop (it once spun, thousands of attempts a second, on every read and write that
    // waited for a leader).
    let leader = cluster.must_wait_leader(Duration::from_secs(15)).await;
    let reader = cluster.other_than(leader);
    let rounds = |text: Option<String>| {
        metric(&text.expect("metrics"), "coffer_read_index_rounds_total").unwrap_or(0.0)
    };
    let before = rounds(cluster.metrics_text(reader).await);
    cluster.kill(leader);
    cluster
        .kv(reader)
        .get(pb::GetRequest {
            key: b"after/restart".to_vec(),
            consistency: pb::Consistency::Linearizable as i32,
        })
        .await
        .expect("a linearizable read waits for the next leader");
    let attempts = rounds(cluster.metrics_text(reader).await) - before;
    assert!(
        attempts < 200.0,
        "the read made {attempts} read-index attempts while it waited for a leader"
    );
}
