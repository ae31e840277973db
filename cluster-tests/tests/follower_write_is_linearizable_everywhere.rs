//! A write accepted by a follower is forwarded to the leader, and once it returns, a
//! linearizable read on every node (followers included) sees it: followers serve reads through
//! read-index, never from possibly stale local state.

use std::time::Duration;

use coffer_cluster_tests::{Cluster, ClusterOptions};

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
