//! Clients write unique values to a few keys and read them linearizably through every node
//! while the leader is paused (SIGSTOP), killed with SIGKILL and restarted, and cut off by a
//! network partition. The recorded history, final reads included, is checked for
//! linearizability per key: no acknowledged write is lost and no read is stale.

use std::time::Duration;

use coffer_chaos::{Outcome, check};
use coffer_cluster_tests::workload::Workload;
use coffer_cluster_tests::{Cluster, ClusterOptions, wait_until};

const KEYS: usize = 4;

async fn must_new_leader(cluster: &Cluster, old: u64, among: &[u64]) -> u64 {
    wait_until(
        Duration::from_secs(20),
        "a new leader among the others",
        || async {
            for id in among {
                let s = cluster.status(*id).await?;
                if s.leader_id != 0 && s.leader_id != old && among.contains(&s.leader_id) {
                    return Some(s.leader_id);
                }
            }
            None
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_history_is_linearizable_under_faults() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await;
    let channels = cluster
        .running()
        .into_iter()
        .map(|id| cluster.channel_with_timeout(id, Duration::from_millis(1500)))
        .collect();
    let workload = Workload::start(channels, 6, KEYS);
    workload.must_progress(100, Duration::from_secs(20)).await;

    // A paused leader (a long GC pause): the others elect a new one; it comes back as follower.
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    cluster.pause(leader);
    let others: Vec<u64> = cluster
        .running()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    must_new_leader(&cluster, leader, &others).await;
    workload.must_progress(50, Duration::from_secs(20)).await;
    cluster.resume(leader);
    workload.must_progress(50, Duration::from_secs(20)).await;

    // kill -9 of the leader, then a restart.
    let leader = cluster.must_wait_leader(Duration::from_secs(15)).await;
    cluster.kill(leader);
    let others: Vec<u64> = cluster.running();
    must_new_leader(&cluster, leader, &others).await;
    workload.must_progress(50, Duration::from_secs(20)).await;
    cluster.spawn(leader);
    workload.must_progress(50, Duration::from_secs(20)).await;

    // The leader cut off from the others (clients still reach it), then healed.
    let leader = cluster.must_wait_leader(Duration::from_secs(15)).await;
    let partition = cluster.isolate(leader);
    let others: Vec<u64> = cluster
        .running()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    must_new_leader(&cluster, leader, &others).await;
    workload.must_progress(50, Duration::from_secs(20)).await;
    drop(partition);
    cluster.must_wait_leader(Duration::from_secs(20)).await;
    workload.must_progress(50, Duration::from_secs(20)).await;

    let history = workload.stop(KEYS).await;
    let ok = history
        .ops
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .count();
    assert!(ok > 400, "too few successful operations to judge: {ok}");
    let verdict = check(&history);
    assert!(
        verdict.is_linearizable(),
        "not linearizable: {:?} ({} operations)",
        verdict.keys,
        history.ops.len()
    );
}
