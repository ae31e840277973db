//! `coffer dev`: a transient cluster of N in-process nodes on localhost, all in memory, with TLS
//! on every connection, initialized and unsealed with generated keys (the same ceremony as a
//! real cluster, run by the tool). Nothing is weakened; only persistence is absent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use coffer_raft::{Member, Settings};

use coffer_api::v1::cluster_client::ClusterClient;

use crate::client::Target;
use crate::config::{DataLocation, NodeConfig};
use crate::keys::KeyPair;
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
            autopilot: crate::config::Autopilot::default(),
            node_id: id,
            cluster_name: "coffer-dev".into(),
            data: DataLocation::Memory,
            api_addr: api,
            peer_addr: peer,
            metrics_addr: Some(metrics),
            member: members[&id].clone(),
            tls: files.clone(),
            node_key: None,
            join: Vec::new(),
            join_token_file: None,
            initial_members: members.clone(),
            max_value_bytes: 1 << 20,
            raw_storage_endpoint: false,
            unseal_progress_ttl: Duration::from_secs(600),
            backups: None,
            login: crate::auth::LoginSettings::default(),
            kubernetes: crate::kubernetes::ValidatorConfig::Off,
            raft: Settings {
                max_entry_bytes: 2 << 20,
                ..Settings::default()
            },
            transient_keys: None,
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
    let keys = dir.join("keys");
    initialize(&keys, &addrs, &tls_dir.join("ca.pem")).await?;
    let env = format!(
        "export COFFER_ADDR={}\nexport COFFER_CACERT={}\nexport COFFER_OPERATOR_KEY={}\nexport COFFER_KEY={}\nexport COFFER_SESSION_FILE={}\n",
        addrs.join(","),
        tls_dir.join("ca.pem").display(),
        keys.join("operator.key").display(),
        keys.join("admin.key").display(),
        dir.join("session.json").display()
    );
    std::fs::write(dir.join("env"), env)?;
    Ok(DevCluster {
        nodes,
        dir: dir.to_path_buf(),
    })
}

/// Initializes a new transient cluster with a freshly generated operator key (one operator,
/// threshold one) and administrator key in `keys` (private keys 0600), unseals it with the
/// operator's share
/// (the same ceremony as a real cluster, done by the tool), turns peer unseal on, and waits
/// until every node in `addrs` is unsealed. Keys of an earlier transient cluster in that
/// directory are replaced: they opened nothing that still exists.
pub async fn initialize(keys: &Path, addrs: &[String], ca: &Path) -> Result<()> {
    // Only the files a transient install writes are replaced; nothing else in the directory
    // is touched (it may be one the user named).
    for name in [
        "operator.key",
        "operator.pub",
        "operator.share",
        "admin.key",
        "admin.pub",
    ] {
        let f = keys.join(name);
        if f.exists() {
            std::fs::remove_file(&f)
                .with_context(|| format!("cannot replace the old {}", f.display()))?;
        }
    }
    let operator = KeyPair::generate()?;
    operator.save(&keys.join("operator"), "coffer dev operator")?;
    KeyPair::generate()?.save(&keys.join("admin"), "coffer dev administrator")?;
    let target = Target::new(addrs, Some(ca), Duration::from_secs(10))?;
    crate::operator::init(
        &target,
        &[keys.join("operator.pub")],
        1,
        &keys.join("admin.pub"),
        keys,
    )
    .await
    .context("initializing the transient cluster")?;
    crate::operator::unseal(
        &target,
        &keys.join("operator.key"),
        &keys.join("operator.share"),
    )
    .await
    .context("unsealing the transient cluster")?;
    crate::operator::act(
        &target,
        &keys.join("operator.key"),
        crate::seal::Action::PeerUnseal(true),
    )
    .await
    .context("turning peer unseal on")?;
    // The share reaches the other nodes through the node that took it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for addr in addrs {
        loop {
            let mut c = ClusterClient::new(target.channel_to(addr)?);
            let seal = c
                .status(coffer_api::v1::StatusRequest { digest: false })
                .await
                .map(|s| s.into_inner().seal)
                .unwrap_or_default();
            if seal == "unsealed" {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("node {addr} of the transient cluster did not unseal within 15 s: {seal}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    allow_admin_data(&target, &keys.join("admin.key"))
        .await
        .context("giving the administrator data access")?;
    Ok(())
}

/// The policy a transient cluster adds to its administrator: every key of the default `secret/`
/// mount, so the quick start works with one key. A real cluster's administrator manages
/// identities and policies only, until given more.
pub const DEV_DATA_POLICY: &str = "dev-data";
const DEV_DATA_TEXT: &str = r#"# Added by `coffer dev` / `coffer server --transient`: all data, for the administrator.
path "secret/*" {
  capabilities = ["create", "read", "update", "patch", "delete", "list"]
}
# Wrapped data for any identity.
path "wrap/to/*" {
  capabilities = ["create"]
}
"#;

/// Logs in as the administrator (key file `admin_key`), writes the [`DEV_DATA_POLICY`] policy
/// and adds it to the `admin` identity. Returns the logged-in target.
pub async fn allow_admin_data(target: &Target, admin_key: &Path) -> Result<Target> {
    use coffer_api::v1 as pb;
    let mut target = target.clone();
    target.login(admin_key, 0).await?;
    let channel = target.connect().await?;
    pb::policies_client::PoliciesClient::new(channel.clone())
        .write(pb::PolicyWriteRequest {
            name: DEV_DATA_POLICY.into(),
            text: DEV_DATA_TEXT.into(),
        })
        .await
        .map_err(crate::cli::status_error)?;
    pb::identities_client::IdentitiesClient::new(channel)
        .update(pb::IdentityUpdateRequest {
            name: crate::identity::ADMIN.into(),
            policies: vec![DEV_DATA_POLICY.into()],
            ..Default::default()
        })
        .await
        .map_err(crate::cli::status_error)?;
    Ok(target)
}

/// Runs the transient cluster until Ctrl-C.
pub async fn run(n: usize, dir: &Path) -> Result<()> {
    let cluster = start(n, dir).await?;
    println!(
        "Coffer transient cluster: {n} nodes, in memory, TLS on every connection, initialized and unsealed."
    );
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
        "  operator key {0}/keys/operator.key (share {0}/keys/operator.share, 1 of 1), administrator key {0}/keys/admin.key\n\nIn another shell:\n  source {0}/env\n  coffer kv put secret/app/db password=s3cret user=app\n  coffer kv get secret/app/db\n  coffer status\n\nCtrl-C stops the cluster; its data is gone with it.",
        cluster.dir.display()
    );
    tokio::signal::ctrl_c().await?;
    println!("stopping");
    for node in cluster.nodes {
        node.stop().await;
    }
    Ok(())
}
