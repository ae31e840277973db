//! A service's view: an SDK client with 20-second sessions keeps reading a secret in a loop for
//! 60 seconds, on three nodes, while its session is renewed several times and the leader is
//! killed (and later comes back): not one read fails, and writes go on after the kill.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use coffer_client::{Client, Config, Login};
use coffer_cluster_tests::{Cluster, ClusterOptions};
use coffer_node::keys::KeyPair;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_reads_survives_session_renewals_and_a_leader_kill() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await;
    let file = cluster
        .must_create_identity(
            "svc",
            r#"path "secret/*" { capabilities = ["create", "read", "update"] }"#,
        )
        .await;
    let mut config = Config::new(
        cluster.endpoints(&cluster.running()),
        cluster.ca_pem().to_vec(),
        Login::Key(KeyPair::load(&file).expect("key")),
    );
    config.session_ttl = Duration::from_secs(20);
    let client = Client::connect(config).await.expect("connect");
    let kv = client.kv("secret");
    kv.put("svc/config", [("n", "0")])
        .await
        .expect("first write");

    let started = Instant::now();
    let mut sessions = BTreeSet::new();
    let (mut reads, mut failed_reads) = (0u64, Vec::new());
    // The highest value any write was sent with (a write with an unknown outcome may still
    // have been applied).
    let (mut writes_after_kill, mut sent) = (0u64, 0u64);
    let mut killed: Option<(u64, Instant)> = None;
    let mut restarted = false;
    while started.elapsed() < Duration::from_secs(60) {
        if killed.is_none() && started.elapsed() > Duration::from_secs(25) {
            let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
            cluster.kill(leader);
            killed = Some((leader, Instant::now()));
        }
        if let Some((id, at)) = killed
            && !restarted
            && at.elapsed() > Duration::from_secs(15)
        {
            cluster.spawn(id);
            restarted = true;
        }
        match kv.get("svc/config").await {
            Ok(secret) => {
                reads += 1;
                let n: u64 = secret
                    .data
                    .get("n")
                    .and_then(|n| n.parse().ok())
                    .expect("n");
                assert!(n <= sent, "read {n}, but no write sent more than {sent}");
            }
            Err(e) => failed_reads.push(format!("{:?}: {e}", started.elapsed())),
        }
        if reads % 10 == 0 {
            sent += 1;
            let ok = kv
                .put("svc/config", [("n", sent.to_string())])
                .await
                .is_ok();
            if ok && killed.is_some() {
                writes_after_kill += 1;
            }
        }
        sessions.insert(client.session().login.session_id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        killed.is_some() && restarted,
        "the leader was killed and restarted"
    );
    assert!(failed_reads.is_empty(), "failed reads: {failed_reads:#?}");
    assert!(reads >= 200, "the loop kept reading: {reads} reads");
    assert!(
        sessions.len() >= 3,
        "the session was renewed at least twice in 60 s of 20 s sessions: {sessions:?}"
    );
    assert!(
        writes_after_kill > 0,
        "writes went on after the leader was killed"
    );
}
