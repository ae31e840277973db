//! A node whose data directory was wiped must never rejoin under its old id (openraft #898):
//! the cluster remembers each member's data directory incarnation, so the fresh node refuses
//! Raft messages meant for its earlier self and stops with exit code 3 and a message saying
//! what to do, instead of corrupting the leader's view of what it has replicated. The rest of
//! the cluster keeps serving.

use std::time::Duration;

use coffer_cluster_tests::{Cluster, ClusterOptions, wait_until};

async fn must_exit_with_refusal(cluster: &mut Cluster, id: u64) {
    let code = wait_until(Duration::from_secs(20), "the wiped node to stop", || {
        let exited = cluster.exited(id);
        async move { exited }
    })
    .await;
    assert_eq!(code, Some(3), "exit code of the wiped node");
    let log = cluster.log(id);
    assert!(
        log.contains("must not rejoin under its old id")
            || log.contains("data directory was replaced"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_follower_is_refused_by_the_leader() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    let wiped = *cluster
        .running()
        .iter()
        .find(|id| **id != leader && **id != 1)
        .expect("a follower other than 1");
    cluster.must_put(leader, "a", "1").await;
    cluster.must_converge(Duration::from_secs(10)).await;
    cluster.kill(wiped);
    std::fs::remove_dir_all(&cluster.nodes[&wiped].data_dir).expect("wipe");
    cluster.spawn(wiped);
    must_exit_with_refusal(&mut cluster, wiped).await;
    assert_eq!(cluster.exited(leader), None, "the leader keeps running");
    cluster.must_put(leader, "b", "2").await;
    cluster
        .must_get_equal(cluster.other_than(wiped), "b", "2")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_bootstrap_node_does_not_bootstrap_again() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    cluster.must_put(leader, "a", "1").await;
    cluster.must_converge(Duration::from_secs(10)).await;
    cluster.kill(1);
    let leader = cluster.must_wait_leader(Duration::from_secs(15)).await;
    std::fs::remove_dir_all(&cluster.nodes[&1].data_dir).expect("wipe");
    cluster.spawn(1);
    must_exit_with_refusal(&mut cluster, 1).await;
    cluster.must_put(leader, "b", "2").await;
    cluster
        .must_get_equal(cluster.other_than(1), "b", "2")
        .await;
}
