//! The CI subset of the chaos harness: Coffer nodes as containers on a private Docker network,
//! under seeded faults (partitions, kill -9, storage errors, then a random mix with pauses,
//! delay, clock skew and membership changes), with every checker's verdict asserted. The full
//! set is `coffer-chaos run --all` (see docs/testing.md).
//!
//! A second test runs the nodes with reads served from local state (no read-index) and
//! requires the checker to fail that run: the harness can see the bug class Jepsen found in
//! etcd 0.4.

use std::time::Duration;

use coffer_chaos::runner::{self, RunConfig};
use coffer_cluster_tests::coffer_bin;

/// The two runs share the machine's two cores: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(scenario: &str, seconds: u64, seed: u64, out: &std::path::Path) -> RunConfig {
    RunConfig {
        scenario: scenario.to_string(),
        nodes: 3,
        duration: Duration::from_secs(seconds),
        seed,
        binary: coffer_bin(),
        out_dir: out.to_path_buf(),
        broken_reads: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_scenarios_pass_every_checker() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let out = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for (scenario, seconds, seed) in [
        ("partition", 45, 11),
        ("kill", 45, 12),
        ("disk", 30, 13),
        ("mixed", 45, 14),
    ] {
        let report = runner::run(&config(scenario, seconds, seed, out.path()))
            .await
            .unwrap_or_else(|e| panic!("the harness could not run {scenario}: {e:#}"));
        println!("{}", report.summary());
        assert!(
            std::path::Path::new(&report.dir)
                .join("report.json")
                .exists(),
            "report.json written"
        );
        assert!(
            !report.faults.is_empty(),
            "{scenario}: faults were injected"
        );
        assert!(report.checks.contains_key("linearizability"));
        if scenario == "disk" {
            assert!(
                report.checks.contains_key("disk-fault-stops-node"),
                "a disk fault was judged"
            );
        }
        if !report.passed {
            failures.push(report.summary());
        }
    }
    assert!(
        failures.is_empty(),
        "chaos runs failed:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_reads_posing_as_linearizable_are_caught_under_a_leader_partition() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let out = tempfile::tempdir().expect("tempdir");
    let mut cfg = config("partition-leader", 25, 21, out.path());
    cfg.broken_reads = true;
    let report = runner::run(&cfg)
        .await
        .unwrap_or_else(|e| panic!("the harness could not run: {e:#}"));
    println!("{}", report.summary());
    let lin = &report.checks["linearizability"];
    assert!(!lin.ok, "stale reads went unnoticed: {}", report.summary());
    assert!(!report.passed);
    assert!(
        std::path::Path::new(&report.dir)
            .join("history.json")
            .exists(),
        "a failing run keeps its history"
    );
}
