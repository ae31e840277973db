//! Leader failover time: kill -9 the leader, then time until a write through a surviving node
//! succeeds. Repeated on one cluster; the killed node restarts and catches up between rounds.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use coffer_api::kv::v1::kv_client::KvClient;
use tokio::time::Instant;

use crate::docker::{self, DockerCluster};

/// Runs `runs` failovers on a new `nodes`-node cluster and returns each one's duration.
pub async fn measure(binary: &Path, dir: &Path, nodes: u64, runs: usize) -> Result<Vec<Duration>> {
    let image = docker::ensure_image(binary)?;
    let cluster = DockerCluster::create(binary, &image, dir, nodes, 0, Vec::new())?;
    let first = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        match cluster.leader().await {
            0 if Instant::now() > first => bail!("the new cluster elected no leader in 30 s"),
            0 => tokio::time::sleep(Duration::from_millis(100)).await,
            l => break l,
        }
    };
    cluster
        .initialize(leader)
        .context("initializing the new cluster")?;
    let mut times = Vec::new();
    for round in 0..runs {
        // Settle: every node answers, is unsealed (a restarted one by its peers) and the
        // cluster takes writes.
        let settle = Instant::now() + Duration::from_secs(60);
        let leader = loop {
            let l = cluster.leader().await;
            let mut all = l != 0;
            for id in cluster.nodes.keys() {
                all &= cluster.status(*id, false).await.is_some_and(|s| {
                    s.leader_id == l
                        && s.applied_index + 10 >= s.commit_index
                        && s.seal == "unsealed"
                });
            }
            if all {
                break l;
            }
            if Instant::now() > settle {
                bail!("round {round}: the cluster did not settle within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Let followers see a few heartbeats from this leader.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let others: Vec<u64> = cluster
            .nodes
            .keys()
            .copied()
            .filter(|x| *x != leader)
            .collect();
        let killed = Instant::now();
        cluster.kill(leader)?;
        let mut n = 0usize;
        let elapsed = loop {
            let via = others[n % others.len()];
            n += 1;
            // A short client timeout, so the figure is the cluster's and not the retry policy's.
            let mut kv = KvClient::new(cluster.channel(via, Duration::from_millis(250))?);
            let put = kv
                .put(crate::workload::put_request(
                    "failover",
                    round.to_string(),
                    None,
                ))
                .await;
            if put.is_ok() {
                break killed.elapsed();
            }
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("round {round}: no write succeeded within 60 s of killing leader {leader}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        times.push(elapsed);
        cluster
            .start(leader)
            .with_context(|| format!("restart node {leader}"))?;
    }
    Ok(times)
}
