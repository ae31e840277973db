//! `coffer dev`: a transient cluster of N in-process nodes on localhost, all in memory, with TLS
//! on every connection. Nothing is weakened; only persistence is absent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use coffer_raft::{Member, Settings};

use crate::config::{DataLocation, NodeConfig};
use crate::server::{self, RunningNode};
use crate::tls::{TlsMaterial, generate_cluster_certs, node_files};

/// A running transient cluster.
#[derive(Debug)]
pub struct DevCluster {
    /// The nodes, by id order.
    pub nodes: Vec<RunningNode>,
    /// The directory holding `env` and `tls/`.
    pub dir: PathBuf,
}

fn free_port() -> Result<SocketAddr> {
    // Bind-and-release: good enough for a local transient cluster; the real bind reports
    // clearly if another process took the port in between.
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("no free local port")?;
    Ok(l.local_addr()?)
}

/// Starts `n` nodes and waits until they agree on a leader.
pub async fn start(n: usize, dir: &Path) -> Result<DevCluster> {
    if n == 0 || n > 9 {
        bail!("--nodes must be between 1 and 9");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tls_dir = dir.join("tls");
    let ids: Vec<u64> = (1..=n as u64).collect();
    generate_cluster_certs(
        &tls_dir,
        &ids.iter().map(|id| (*id, Vec::new())).collect::<Vec<_>>(),
    )?;
    let mut plan = Vec::new();
    let mut members = BTreeMap::new();
    for id in &ids {
        let (api, peer, metrics) = (free_port()?, free_port()?, free_port()?);
        members.insert(*id, Member::new(peer.to_string(), api.to_string()));
        plan.push((*id, api, peer, metrics));
    }
    let mut nodes = Vec::new();
    for (id, api, peer, metrics) in plan {
        let files = node_files(&tls_dir, id);
        let cfg = NodeConfig {
            node_id: id,
            cluster_name: "coffer-dev".into(),
            data: DataLocation::Memory,
            api_addr: api,
            peer_addr: peer,
            metrics_addr: Some(metrics),
            member: members[&id].clone(),
            tls: files.clone(),
            initial_members: members.clone(),
            max_value_bytes: 1 << 20,
            unseal_progress_ttl: Duration::from_secs(600),
            raft: Settings {
                max_entry_bytes: 2 << 20,
                ..Settings::default()
            },
        };
        let tls = TlsMaterial::load(&files)?;
        nodes.push(server::start(cfg, tls).await?);
    }
    // Wait until every node knows the same leader.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let leaders: Vec<Option<u64>> = nodes.iter().map(|n| n.node.status().leader).collect();
        if leaders[0].is_some() && leaders.iter().all(|l| *l == leaders[0]) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the transient cluster elected no leader within 15 s: {leaders:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let addrs: Vec<String> = nodes.iter().map(|n| n.api_addr.to_string()).collect();
    let env = format!(
        "export COFFER_ADDR={}\nexport COFFER_CACERT={}\n",
        addrs.join(","),
        tls_dir.join("ca.pem").display()
    );
    std::fs::write(dir.join("env"), env)?;
    Ok(DevCluster {
        nodes,
        dir: dir.to_path_buf(),
    })
}

/// Runs the transient cluster until Ctrl-C.
pub async fn run(n: usize, dir: &Path) -> Result<()> {
    let cluster = start(n, dir).await?;
    println!("Coffer transient cluster: {n} nodes, in memory, TLS on every connection.");
    for node in &cluster.nodes {
        println!(
            "  node {}  api {}  peer {}  metrics http://{}/metrics",
            node.node.id(),
            node.api_addr,
            node.peer_addr,
            node.metrics_addr.map(|a| a.to_string()).unwrap_or_default()
        );
    }
    println!(
        "\nIn another shell:\n  source {}/env\n  coffer kv put app/db password=s3cret user=app\n  coffer kv get app/db\n  coffer status\n\nCtrl-C stops the cluster; its data is gone with it.",
        cluster.dir.display()
    );
    tokio::signal::ctrl_c().await?;
    println!("stopping");
    for node in cluster.nodes {
        node.stop().await;
    }
    Ok(())
}
