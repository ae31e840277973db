//! A follower that was down while the leader compacted its log past the follower's position
//! catches up by installing a snapshot, and then serves the same data.

use std::time::Duration;

use coffer_cluster_tests::{Cluster, ClusterOptions, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_by_snapshot() {
    let options = ClusterOptions {
        snapshot_logs: 50,
        logs_to_keep: 5,
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(3, options).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    let follower = cluster.other_than(leader);
    cluster.must_put(leader, "before", "down").await;
    cluster.must_converge(Duration::from_secs(10)).await;
    let behind_at = cluster
        .status(follower)
        .await
        .expect("status")
        .last_log_index;
    cluster.kill(follower);

    for i in 0..300 {
        cluster
            .must_put(leader, &format!("bulk/{i:04}"), &format!("v{i}"))
            .await;
    }
    let purged = wait_until(
        Duration::from_secs(20),
        "the leader to compact its log",
        || async {
            let s = cluster.status(leader).await?;
            (s.snapshot_index > behind_at && s.purged_index > behind_at).then_some(s.purged_index)
        },
    )
    .await;
    assert!(
        purged > behind_at,
        "the log the follower needs is gone: it must take a snapshot"
    );

    cluster.spawn(follower);
    // It unseals itself from a live member (peer unseal is on in the fixture's clusters).
    cluster
        .must_wait_unsealed(&[follower], Duration::from_secs(20))
        .await;
    wait_until(
        Duration::from_secs(30),
        "the follower to install a snapshot",
        || async {
            let s = cluster.status(follower).await?;
            (s.snapshot_index >= purged).then_some(())
        },
    )
    .await;
    cluster.must_converge(Duration::from_secs(30)).await;
    let on_follower = cluster.must_list_local(follower, "bulk/").await;
    let on_leader = cluster.must_list_local(leader, "bulk/").await;
    assert_eq!(on_follower.len(), 300);
    assert_eq!(on_follower, on_leader);
    cluster.must_get_equal(follower, "bulk/0299", "v299").await;
}
