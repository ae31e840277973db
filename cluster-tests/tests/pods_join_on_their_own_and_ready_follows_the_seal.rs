//! What the StatefulSet relies on, with real processes (the manifests' flags, the pod's
//! service-account token from the test Kubernetes API server: no kube-apiserver runs here).
//!
//! Readiness: `/ready` answers 501 before the cluster is initialized, 200 on every unsealed
//! member, 503 "sealed" on a restarted node while its operators have not unsealed it (peer
//! unseal off), and 200 again once they did, 503 "no quorum" on a leader cut off from its peers;
//! `/health` (liveness) stays 200 through all of it, so a sealed pod is never restarted.
//!
//! Auto-join: a pod the initial member list does not name, started with exactly the flags
//! every pod has (that list and its token file), joins through the initial members as a
//! learner, serves, and is promoted by the one documented command; restarted with its volume it
//! comes back under its own id without joining again; with a wiped volume it is refused (never
//! two members with one id) and never ready, until `coffer cluster remove` takes the member out:
//! then it joins again under its id, and the old node's certificate opens nothing (peers pin
//! the recorded key). An initial member's pod with a lost volume stops (exit code 3) while it is
//! a member, and joins again once removed.
//!
//! Stopping: a leader sent SIGTERM hands leadership to another voter before it stops, and
//! exits with code 0; the cluster has a new leader without waiting for an election timeout.

use std::time::Duration;

use coffer_api::v1 as pb;
use coffer_cluster_tests::kube_api::KubeApi;
use coffer_cluster_tests::{Cluster, ClusterOptions, wait_until};

/// Waits until node `id`'s `GET path` answers with `code` and a body containing `says`.
async fn must_answer(cluster: &Cluster, id: u64, path: &str, code: u16, says: &str) {
    wait_until(
        Duration::from_secs(30),
        &format!("node {id} to answer {path} with {code} {says:?}"),
        || async {
            let answer = cluster.metrics_http(id, path).await?;
            (answer.starts_with(&format!("HTTP/1.1 {code} ")) && answer.contains(says))
                .then_some(())
        },
    )
    .await;
}

/// Three voters whose Kubernetes logins go to the test API server, the `coffer-members` role
/// written, and a token file of the namespace's `coffer` service account (what every pod of
/// the StatefulSet mounts). Keep the directory and the API server alive.
async fn pods_cluster() -> (tempfile::TempDir, KubeApi, Cluster, u64, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = KubeApi::start(dir.path()).await;
    let cluster = Cluster::start(
        3,
        ClusterOptions {
            extra_args: api.token_review_args(),
            ..ClusterOptions::default()
        },
    )
    .await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    cluster.must_write_member_role("coffer").await;
    let token = dir.path().join("token");
    std::fs::write(
        &token,
        api.token(
            "coffer",
            "coffer",
            ("coffer-4", "uid-4"),
            &["coffer-cluster"],
            3600,
        ),
    )
    .expect("token");
    (dir, api, cluster, leader, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_means_unsealed_and_serving_and_health_never_asks_for_a_restart() {
    let mut cluster = Cluster::start(
        3,
        ClusterOptions {
            initialize: false,
            ..ClusterOptions::default()
        },
    )
    .await;
    for id in 1..=3 {
        must_answer(&cluster, id, "/ready", 501, "coffer operator init").await;
        must_answer(&cluster, id, "/health", 200, "ok").await;
    }

    cluster.must_initialize().await;
    for id in 1..=3 {
        must_answer(&cluster, id, "/ready", 200, "ready: voter").await;
    }

    // With peer unseal off, a restarted node waits for its operators: not ready, still live.
    let (key, _) = cluster.operator_files();
    coffer_node::operator::act(
        &cluster.target(),
        &key,
        coffer_node::seal::Action::PeerUnseal(false),
    )
    .await
    .expect("turn peer unseal off");
    cluster.kill(3);
    cluster.spawn(3);
    must_answer(&cluster, 3, "/ready", 503, "sealed").await;
    must_answer(&cluster, 3, "/health", 200, "ok").await;
    cluster.must_unseal(3).await;
    must_answer(&cluster, 3, "/ready", 200, "ready: voter").await;

    // A leader cut off from its peers still thinks it leads, but cannot commit: not ready.
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    let cut = cluster.isolate(leader);
    must_answer(&cluster, leader, "/ready", 503, "no quorum").await;
    must_answer(&cluster, leader, "/health", 200, "ok").await;
    drop(cut);
    must_answer(&cluster, leader, "/ready", 200, "ready: voter").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_beyond_the_initial_members_joins_through_them_and_keeps_its_id() {
    let (_dir, _api, mut cluster, leader, token) = pods_cluster().await;

    // Scaling to 4 replicas starts pod 4 with the flags every pod has.
    cluster.prepare_pod(4, &token);
    assert!(
        !cluster.node(4).extra_args.iter().any(|a| a == "--join"),
        "the pod is given no --join"
    );
    cluster.spawn(4);
    cluster.must_wait_joined(4, leader).await;
    must_answer(&cluster, 4, "/ready", 200, "ready: learner").await;
    let status = cluster.status(leader).await.expect("status");
    let voters = status.members.iter().filter(|m| m.voter).count();
    assert_eq!(voters, 3, "joining made no voter: {status:?}");

    // The documented command makes it a voter.
    cluster
        .admin(leader)
        .promote(pb::NodeRequest { id: 4 })
        .await
        .expect("promote");
    must_answer(&cluster, 4, "/ready", 200, "ready: voter").await;

    // Restarted with its volume: the same member, no new join.
    cluster.kill(4);
    cluster.spawn(4);
    must_answer(&cluster, 4, "/ready", 200, "ready: voter").await;
    let joins = cluster
        .log(4)
        .matches("joined the cluster as a learner")
        .count();
    assert_eq!(joins, 1, "the restarted pod joined again");
    let key = "pods/after-restart";
    cluster.must_put(leader, key, "1").await;
    cluster.must_get_equal(4, key, "1").await;

    // With a wiped volume it is refused: node 4 is still a member.
    let old_certificate = cluster.node_certificate(4);
    cluster.kill(4);
    std::fs::remove_dir_all(&cluster.node(4).data_dir).expect("wipe");
    cluster.spawn(4);
    wait_until(
        Duration::from_secs(30),
        "the wiped pod to be refused",
        || async { cluster.log(4).contains("is already a member").then_some(()) },
    )
    .await;
    must_answer(&cluster, 4, "/ready", 503, "not in a cluster yet").await;
    let status = cluster.status(leader).await.expect("status");
    let fours: Vec<_> = status.members.iter().filter(|m| m.id == 4).collect();
    assert_eq!(fours.len(), 1, "one member 4: {status:?}");
    assert!(fours[0].voter, "the old member 4 is untouched: {status:?}");

    // The operator removes the old member; the same pod, still retrying, joins again under
    // its id with its new key. The old node 4's certificate opens nothing.
    cluster
        .admin(leader)
        .remove(pb::NodeRequest { id: 4 })
        .await
        .expect("remove node 4");
    cluster.must_wait_joined(4, leader).await;
    must_answer(&cluster, 4, "/ready", 200, "ready: learner").await;
    let (cert, key) = old_certificate;
    cluster
        .peer_probe(leader, &cert, &key)
        .await
        .expect_err("the removed node's certificate");
    assert!(
        cluster.log(leader).contains("not for the key recorded"),
        "the leader names the check"
    );

    // Scaling back: the operator removes the member; the cluster is 3 voters again.
    cluster.kill(4);
    cluster
        .admin(leader)
        .remove(pb::NodeRequest { id: 4 })
        .await
        .expect("remove node 4");
    let status = cluster.status(leader).await.expect("status");
    assert_eq!(
        status.members.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "{status:?}"
    );
    cluster.must_put(leader, "pods/after-scale-down", "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_member_pod_with_a_lost_volume_comes_back_once_removed() {
    let (_dir, _api, mut cluster, leader, token) = pods_cluster().await;
    let lost = cluster.other_than(leader);
    cluster.kill(lost);
    std::fs::remove_dir_all(&cluster.node(lost).data_dir).expect("wipe");
    cluster
        .node_mut(lost)
        .extra_args
        .extend(["--join-token-file".into(), token.display().to_string()]);

    // Still a member: the pod stops (exit code 3), as Kubernetes would see it crash.
    cluster.spawn(lost);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(code) = cluster.exited(lost) {
            break code;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the wiped member did not stop: {}",
            cluster.log(lost)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, Some(3), "{}", cluster.log(lost));

    // Removed, the restarted pod joins again under its id, through its peers.
    cluster
        .admin(leader)
        .remove(pb::NodeRequest { id: lost })
        .await
        .expect("remove the lost member");
    cluster.spawn(lost);
    cluster.must_wait_joined(lost, leader).await;
    assert!(
        cluster.log(lost).contains("joining it again"),
        "{}",
        cluster.log(lost)
    );
    cluster
        .admin(leader)
        .promote(pb::NodeRequest { id: lost })
        .await
        .expect("promote");
    must_answer(&cluster, lost, "/ready", 200, "ready: voter").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_hands_leadership_over_first() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    cluster.must_put(leader, "handover/before", "1").await;
    let code = cluster.terminate(leader);
    assert_eq!(code, Some(0), "a SIGTERM is a clean stop");
    let log = cluster.log(leader);
    assert!(
        log.contains("handed leadership over before stopping"),
        "the leader handed over: {log}"
    );
    let next = cluster.must_wait_leader(Duration::from_secs(10)).await;
    assert_ne!(next, leader);
    cluster.must_put(next, "handover/after", "1").await;
    cluster.spawn(leader);
    cluster
        .must_wait_unsealed(&[leader], Duration::from_secs(20))
        .await;
    cluster.must_get_equal(leader, "handover/after", "1").await;
}
