//! Autopilot and member health, on 4 voters with `--autopilot-dead-after-s 2
//! --autopilot-min-voters 3`: `coffer status` shows every member healthy in the leader's view;
//! a killed member is removed by the leader (its id retired) and the cluster goes on with 3;
//! a second killed member is kept, because removing it would leave 2 voters, and `coffer
//! status` shows it silent; back up, it is healthy again. (Autopilot is off by default: every
//! other scenario kills nodes and gets them back as members.)

use std::process::Command;
use std::time::Duration;

use coffer_cluster_tests::{Cluster, ClusterOptions, coffer_bin, wait_until};

/// `coffer status` through the CLI, as an operator reads it.
fn status_text(cluster: &Cluster) -> String {
    let out = Command::new(coffer_bin())
        .arg("status")
        .envs(cluster.cli_env())
        .output()
        .expect("run coffer status");
    assert!(out.status.success(), "coffer status: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `coffer status` row of member `id`.
fn row(text: &str, id: u64) -> String {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
        .unwrap_or_else(|| panic!("no row for node {id} in\n{text}"))
        .to_string()
}

async fn members(cluster: &Cluster, seen_by: u64) -> Option<Vec<u64>> {
    let mut ids: Vec<u64> = cluster
        .status(seen_by)
        .await?
        .members
        .iter()
        .map(|m| m.id)
        .collect();
    ids.sort();
    Some(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autopilot_removes_a_dead_member_but_keeps_the_minimum_of_voters() {
    let mut cluster = Cluster::start(
        4,
        ClusterOptions {
            extra_args: [
                "--autopilot-dead-after-s",
                "2",
                "--autopilot-min-voters",
                "3",
            ]
            .map(String::from)
            .to_vec(),
            ..ClusterOptions::default()
        },
    )
    .await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    wait_until(
        Duration::from_secs(20),
        "every member healthy in coffer status",
        || async {
            let text = status_text(&cluster);
            (text.contains("HEALTH")
                && (1..=4)
                    .filter(|id| *id != leader)
                    .all(|id| row(&text, id).contains("healthy")))
            .then_some(())
        },
    )
    .await;

    // A dead member goes; the cluster keeps writing with three.
    let first = (1..=4).rev().find(|id| *id != leader).expect("a follower");
    cluster.kill(first);
    wait_until(
        Duration::from_secs(30),
        "autopilot to remove the dead member",
        || async {
            let ids = members(&cluster, leader).await?;
            // The leader logs it once the id is retired too (the step after the change).
            let said = cluster
                .log(leader)
                .contains("autopilot removed a dead member");
            (!ids.contains(&first) && said).then_some(())
        },
    )
    .await;
    cluster
        .must_put(leader, "autopilot/after-removal", "1")
        .await;

    // The next dead voter stays: two voters would be fewer than the minimum of three.
    let second = cluster.other_than(leader);
    cluster.kill(second);
    wait_until(
        Duration::from_secs(30),
        "autopilot to say it keeps the dead voter",
        || async {
            cluster
                .log(leader)
                .contains("autopilot keeps a dead voter")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        members(&cluster, leader).await.expect("status").len(),
        3,
        "no voter removed below the minimum"
    );
    wait_until(
        Duration::from_secs(20),
        "coffer status to show the silent member",
        || async {
            row(&status_text(&cluster), second)
                .contains("no contact for")
                .then_some(())
        },
    )
    .await;
    cluster
        .must_put(leader, "autopilot/with-one-down", "1")
        .await;

    cluster.spawn(second);
    wait_until(
        Duration::from_secs(30),
        "the member to be healthy again",
        || async {
            row(&status_text(&cluster), second)
                .contains("healthy")
                .then_some(())
        },
    )
    .await;
}
