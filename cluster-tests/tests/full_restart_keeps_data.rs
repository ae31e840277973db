//! Every node killed with SIGKILL at once and restarted: the cluster elects a leader again and
//! every acknowledged write is intact (acknowledged means fsynced on a quorum) once the
//! operators unseal it again.

use std::time::Duration;

use coffer_cluster_tests::{Cluster, ClusterOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restart_keeps_data() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    for i in 0..100 {
        let via = if i % 2 == 0 {
            leader
        } else {
            cluster.other_than(leader)
        };
        cluster
            .must_put(via, &format!("keep/{i:03}"), &format!("v{i}"))
            .await;
    }
    for id in [1, 2, 3] {
        cluster.kill(id);
    }
    for id in [1, 2, 3] {
        cluster.spawn(id);
    }
    cluster.must_wait_leader(Duration::from_secs(20)).await;
    // Every node restarts sealed, and no member is left to unseal the others: the ceremony
    // again, through one node (it passes the share on).
    cluster.must_unseal(1).await;
    cluster
        .must_wait_unsealed(&[1, 2, 3], Duration::from_secs(20))
        .await;
    for id in [1, 2, 3] {
        cluster.must_get_equal(id, "keep/000", "v0").await;
        cluster.must_get_equal(id, "keep/099", "v99").await;
    }
    cluster.must_converge(Duration::from_secs(20)).await;
    for id in [1, 2, 3] {
        assert_eq!(
            cluster.must_list_local(id, "keep/").await.len(),
            100,
            "node {id}"
        );
    }
}
