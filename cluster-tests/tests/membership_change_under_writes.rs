//! While writes continue: a fourth node joins as a learner (a read replica) with its registered
//! node key, is promoted to voter, and an original voter is removed: its node certificate
//! opens nothing on the peer port afterwards. No acknowledged write is lost and the new member
//! serves linearizable reads.

use std::time::Duration;

use coffer_api::v1 as pb;
use coffer_cluster_tests::{Cluster, ClusterOptions, Writer, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_change_under_writes() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    let channels = [1, 2, 3].map(|id| cluster.channel(id)).to_vec();
    let writer = Writer::start("load", channels, 4);

    // The new node proves the node key the administrator registered (through a follower)
    // and adds itself as a learner.
    let via = cluster.other_than(leader);
    cluster.add_joining_node(4, via).await;
    cluster.spawn(4);
    // A learner is a read replica: once a member has unsealed it (peer unseal), it serves
    // linearizable reads.
    cluster.must_wait_joined(4, leader).await;

    cluster
        .admin(4)
        .promote(pb::NodeRequest { id: 4 })
        .await
        .expect("promote");
    let victim = cluster.other_than(leader);
    let (cert, key) = cluster.node_certificate(victim);
    cluster
        .peer_probe(leader, &cert, &key)
        .await
        .expect("a member's node certificate is accepted");
    cluster
        .admin(leader)
        .remove(pb::NodeRequest { id: victim })
        .await
        .expect("remove");
    let status = wait_until(Duration::from_secs(10), "the new membership", || async {
        let s = cluster.status(4).await?;
        let voters: Vec<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
        (voters.len() == 3 && voters.contains(&4) && !voters.contains(&victim)).then_some(s)
    })
    .await;
    assert!(
        status.members.iter().all(|m| m.id != victim),
        "removed node is gone"
    );
    cluster.kill(victim);
    // The removed node's certificate (still within its validity) opens nothing.
    wait_until(
        Duration::from_secs(10),
        "the leader to refuse the removed node's certificate",
        || async { cluster.peer_probe(leader, &cert, &key).await.err() },
    )
    .await;
    let log = std::fs::read_to_string(&cluster.node(leader).log).expect("leader log");
    assert!(
        log.contains("neither a member nor joining"),
        "the refusal names the check"
    );
    // Its id is retired: no key can be registered for it again.
    let refused = cluster
        .admin(leader)
        .register_node(pb::RegisterNodeRequest {
            id: victim,
            public_key: coffer_node::keys::KeyPair::generate()
                .expect("key")
                .public()
                .to_bytes()
                .to_vec(),
        })
        .await
        .expect_err("a removed node's id");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("never reused"), "{refused:?}");

    let log = writer.stop().await;
    assert!(!log.acked.is_empty());
    cluster.must_put(4, "after", "change").await;
    cluster.must_converge(Duration::from_secs(20)).await;
    for id in cluster.running() {
        let stored = cluster.must_list_local(id, "load/").await;
        for (k, v) in &log.acked {
            assert_eq!(stored.get(k), Some(v), "node {id} lost {k}");
        }
    }
}
