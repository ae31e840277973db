//! A node whose durable commit fails (an fsync error injected through the `storage::fsync`
//! failpoint, as chaos-mesh IOChaos would) stops serving at once and exits with code 3: it
//! never goes on with a state it did not persist. The other nodes keep every acknowledged
//! write and keep serving.

use std::time::Duration;

use coffer_cluster_tests::{Cluster, ClusterOptions, Writer, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failure_stops_the_node() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    let victim = cluster.other_than(leader);
    cluster.kill(victim);
    cluster
        .nodes
        .get_mut(&victim)
        .expect("victim")
        .env
        .push(("FAILPOINTS".into(), "storage::fsync=30*off->return".into()));
    cluster.spawn(victim);

    let channels = [leader, cluster.other_than(victim)]
        .iter()
        .filter(|id| **id != victim)
        .map(|id| cluster.channel(*id))
        .collect();
    let writer = Writer::start("load", channels, 4);
    let code = wait_until(
        Duration::from_secs(30),
        "the node with a failing disk to stop",
        || {
            let exited = cluster.exited(victim);
            async move { exited }
        },
    )
    .await;
    assert_eq!(
        code,
        Some(3),
        "a storage failure is fatal, with exit code 3"
    );
    let log = cluster.log(victim);
    assert!(log.contains("injected fsync error"), "{log}");

    let survivors = cluster.running();
    assert_eq!(survivors.len(), 2);
    let before = cluster
        .status(leader)
        .await
        .expect("leader status")
        .applied_index;
    wait_until(
        Duration::from_secs(10),
        "writes to continue on the survivors",
        || async {
            let s = cluster.status(leader).await?;
            (s.applied_index > before + 10).then_some(())
        },
    )
    .await;
    let log = writer.stop().await;
    cluster.must_converge(Duration::from_secs(10)).await;
    for id in survivors {
        let stored = cluster.must_list_local(id, "load/").await;
        for (k, v) in &log.acked {
            assert_eq!(stored.get(k), Some(v), "node {id} lost {k}");
        }
    }
}
