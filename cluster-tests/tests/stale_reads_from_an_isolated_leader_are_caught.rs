//! The harness can see the bug class Jepsen found in etcd 0.4: a leader cut off from the
//! others that keeps answering "linearizable" reads from its local state. With the
//! `raft::linearize_local` failpoint (test builds only) the isolated old leader returns the
//! value from before a write the new leader acknowledged, and the checker flags the history.
//! Without it, the same sequence yields no stale read: the isolated leader cannot confirm its
//! leadership, so it refuses the read or answers after catching up.

use std::time::Duration;

use coffer_api::v1 as pb;
use coffer_chaos::{History, Op, OpKind, Outcome, check};
use coffer_cluster_tests::{Cluster, ClusterOptions, wait_until};
use tokio::time::Instant;

async fn op_put(cluster: &Cluster, id: u64, value: u64, start: Instant) -> Op {
    let invoked = start.elapsed().as_nanos() as u64;
    cluster.must_put(id, "k", &value.to_string()).await;
    Op {
        client: id as u32,
        key: "k".into(),
        kind: OpKind::Write(value),
        invoked,
        completed: start.elapsed().as_nanos() as u64,
        outcome: Outcome::Ok,
    }
}

async fn op_get(cluster: &Cluster, id: u64, start: Instant) -> Op {
    let invoked = start.elapsed().as_nanos() as u64;
    let r = cluster
        .kv(id)
        .get(pb::GetRequest {
            key: b"k".to_vec(),
            consistency: pb::Consistency::Linearizable as i32,
        })
        .await;
    let completed = start.elapsed().as_nanos() as u64;
    let (seen, outcome) = match r {
        Ok(r) => (
            r.into_inner()
                .kv
                .and_then(|kv| String::from_utf8(kv.value).ok()?.parse().ok()),
            Outcome::Ok,
        ),
        Err(_) => (None, Outcome::Failed),
    };
    Op {
        client: 100,
        key: "k".into(),
        kind: OpKind::Read(seen),
        invoked,
        completed,
        outcome,
    }
}

/// Writes 1 through the leader, isolates it, writes 2 through the new leader, then reads
/// through the isolated old leader. Returns the history.
async fn isolated_leader_scenario(options: ClusterOptions) -> History {
    let cluster = Cluster::start(3, options).await;
    let start = Instant::now();
    let mut history = History::default();
    let old = cluster.must_wait_leader(Duration::from_secs(10)).await;
    history.push(op_put(&cluster, old, 1, start).await);
    cluster.must_converge(Duration::from_secs(10)).await;
    let _partition = cluster.isolate(old);
    let others: Vec<u64> = cluster
        .running()
        .into_iter()
        .filter(|id| *id != old)
        .collect();
    let new = wait_until(
        Duration::from_secs(20),
        "a leader among the majority",
        || async {
            let s = cluster.status(others[0]).await?;
            (s.leader_id != 0 && s.leader_id != old).then_some(s.leader_id)
        },
    )
    .await;
    history.push(op_put(&cluster, new, 2, start).await);
    history.push(op_get(&cluster, old, start).await);
    history
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_reads_from_an_isolated_leader_are_caught() {
    // The real read path: no stale read, whatever the isolated node answers.
    let history = isolated_leader_scenario(ClusterOptions::default()).await;
    let verdict = check(&history);
    assert!(
        verdict.is_linearizable(),
        "{:?}: {:?}",
        verdict.keys,
        history.ops
    );

    // The broken read path: the stale read happens and is caught.
    let broken = ClusterOptions {
        env: vec![("FAILPOINTS".into(), "raft::linearize_local=return".into())],
        ..ClusterOptions::default()
    };
    let history = isolated_leader_scenario(broken).await;
    let read = history.ops.last().expect("the read");
    assert_eq!(
        read.kind,
        OpKind::Read(Some(1)),
        "the broken node served its stale local state"
    );
    let verdict = check(&history);
    assert_eq!(verdict.violations(), vec!["k"], "{:?}", verdict.keys);
}
