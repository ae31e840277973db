//! `coffer server` configuration: a TOML file, flags and `COFFER_*` environment variables
//! (flag or environment wins over the file), validated into [`NodeConfig`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use coffer_raft::{Member, NodeId, Settings};
use serde::Deserialize;

use crate::tls::TlsFiles;

/// Flags of `coffer server`. Every option can also be set in the file given by `--config`.
#[derive(Debug, Args, Default)]
pub struct ServerArgs {
    /// TOML file with any of the options below (snake_case names, e.g. `node_id = 1`).
    #[arg(long, env = "COFFER_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id: a positive integer, unique in the cluster and never reused.
    #[arg(long, env = "COFFER_NODE_ID")]
    pub node_id: Option<u64>,
    /// Name of the cluster; a data directory of another cluster is refused.
    #[arg(long, env = "COFFER_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Directory for this node's database (created if missing).
    #[arg(long, env = "COFFER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Keep everything in memory: nothing survives a restart.
    #[arg(long, env = "COFFER_IN_MEMORY")]
    pub in_memory: bool,
    /// A transient install: in memory, and the node that bootstraps the cluster initializes
    /// and unseals it itself with freshly generated operator and administrator keys written to
    /// --keys-dir (private keys 0600), with peer unseal on so other transient members unseal
    /// from it. TLS and everything else stay on; the data is gone when the processes stop.
    #[arg(long, env = "COFFER_TRANSIENT")]
    pub transient: bool,
    /// Where a transient install writes its keys (default ./coffer-transient-keys); keys of an
    /// earlier transient cluster there are replaced.
    #[arg(long, env = "COFFER_KEYS_DIR")]
    pub keys_dir: Option<PathBuf>,
    /// Client API listen address.
    #[arg(long, env = "COFFER_API_ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// Client API address other nodes and clients reach this node at (default: --api-addr).
    #[arg(long, env = "COFFER_ADVERTISE_API_ADDR")]
    pub advertise_api_addr: Option<String>,
    /// Node-to-node (Raft) listen address, mutual TLS only.
    #[arg(long, env = "COFFER_PEER_ADDR")]
    pub peer_addr: Option<SocketAddr>,
    /// Peer address other nodes reach this node at (default: --peer-addr).
    #[arg(long, env = "COFFER_ADVERTISE_PEER_ADDR")]
    pub advertise_peer_addr: Option<String>,
    /// Metrics listen address (plain HTTP): `/metrics` (Prometheus), `/health` (liveness) and
    /// `/ready` (readiness).
    #[arg(long, env = "COFFER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Node certificate (PEM), used for the API and, as client and server, for peers.
    #[arg(long, env = "COFFER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Node private key (PEM), readable by its owner only.
    #[arg(long, env = "COFFER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Cluster CA certificate (PEM): peers must present a certificate it signed.
    #[arg(long, env = "COFFER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The node key (`coffer keygen`): what this node's node certificate certifies, and, for a
    /// joining node, the key an administrator registered (`coffer cluster register-node`).
    /// Default: `node.key` in the data directory, made on first start.
    #[arg(long, env = "COFFER_NODE_KEY")]
    pub node_key: Option<PathBuf>,
    /// Join an existing cluster through these members' API addresses (`HOST:PORT`, repeated or
    /// comma-separated, tried in turn): the node proves its registered node key, receives its
    /// node certificate and is added as a learner. With --initial-member it is used only when
    /// the list does not name this node.
    #[arg(long, env = "COFFER_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// Prove membership with this service-account token file (read at each try) instead of a
    /// registered node key; the Kubernetes role `coffer-members` must admit it. A node that
    /// --initial-member does not name then joins through the initial members (or --join).
    #[arg(long, env = "COFFER_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// Voters of a new cluster, `ID=PEER_ADDR/API_ADDR`, repeated or comma-separated. Only the
    /// member with the lowest id initializes; an existing cluster ignores it. One list can
    /// serve every pod of a StatefulSet: a node it does not name joins (see --join-token-file).
    #[arg(
        long = "initial-member",
        env = "COFFER_INITIAL_MEMBERS",
        value_delimiter = ','
    )]
    pub initial_members: Vec<String>,
    /// Largest value accepted, in bytes.
    #[arg(long, env = "COFFER_MAX_VALUE_BYTES")]
    pub max_value_bytes: Option<usize>,
    /// Serve the raw store API (`coffer.raw.v1.Kv`: keys to opaque values, below the secrets
    /// engines) on this node, for debugging and the older tests; like Vault's `sys/raw`, off by
    /// default. Services use the engines (`coffer.kv.v1`, `coffer.wrap.v1`).
    #[arg(long, env = "COFFER_RAW_STORAGE_ENDPOINT")]
    pub raw_storage_endpoint: bool,
    /// Write a backup (the `coffer operator snapshot` file) into this directory every
    /// `--snapshot-interval`, on the leader only; off when not given.
    #[arg(long, env = "COFFER_SNAPSHOT_DIR")]
    pub snapshot_dir: Option<PathBuf>,
    /// How often the leader writes a scheduled backup: `90s`, `15m`, `1h` (default), `1d`.
    #[arg(long, env = "COFFER_SNAPSHOT_INTERVAL")]
    pub snapshot_interval: Option<String>,
    /// How many scheduled backups to keep in `--snapshot-dir` (default 7); the oldest beyond
    /// that are deleted.
    #[arg(long, env = "COFFER_SNAPSHOT_RETAIN")]
    pub snapshot_retain: Option<usize>,
    /// How long an unseal ceremony's progress is kept, in seconds (default 600): shares older
    /// than that are dropped and the ceremony starts over.
    #[arg(long, env = "COFFER_UNSEAL_PROGRESS_TTL_S")]
    pub unseal_progress_ttl_s: Option<u64>,
    /// How long a login challenge can be used, in milliseconds (default 60000).
    #[arg(long, env = "COFFER_LOGIN_CHALLENGE_TTL_MS")]
    pub login_challenge_ttl_ms: Option<u64>,
    /// Challenges and logins one source address may make per second on this node (default 5,
    /// with a burst of four times that).
    #[arg(long, env = "COFFER_LOGIN_RATE_PER_SECOND")]
    pub login_rate_per_second: Option<u32>,
    /// Kubernetes login: check service-account tokens with TokenReview at this API server URL.
    #[arg(long, env = "COFFER_KUBERNETES_API_URL")]
    pub kubernetes_api_url: Option<String>,
    /// Kubernetes login: check tokens with TokenReview at the API server of the cluster this
    /// node runs in (its pod's service account is the reviewer; it needs system:auth-delegator).
    #[arg(long, env = "COFFER_KUBERNETES_IN_CLUSTER")]
    pub kubernetes_in_cluster: bool,
    /// Kubernetes login: check tokens locally against this issuer's published keys (OIDC
    /// discovery); cannot see a deleted service account or pod before the token expires.
    #[arg(long, env = "COFFER_KUBERNETES_ISSUER")]
    pub kubernetes_issuer: Option<String>,
    /// The CA certificate (PEM) of the API server or issuer (default: the system's roots).
    #[arg(long, env = "COFFER_KUBERNETES_CA_CERT")]
    pub kubernetes_ca_cert: Option<PathBuf>,
    /// The reviewer's token file for TokenReview, re-read when it changes.
    #[arg(long, env = "COFFER_KUBERNETES_REVIEWER_TOKEN_FILE")]
    pub kubernetes_reviewer_token_file: Option<String>,
    /// How long a TokenReview or key fetch may take, in milliseconds (default 5000).
    #[arg(long, env = "COFFER_KUBERNETES_TIMEOUT_MS")]
    pub kubernetes_timeout_ms: Option<u64>,
    /// How often the leader removes used login challenges and ended sessions, in milliseconds
    /// (default 60000).
    #[arg(long, env = "COFFER_LOGIN_CLEANUP_INTERVAL_MS")]
    pub login_cleanup_interval_ms: Option<u64>,
    /// Autopilot: the leader removes a member (voter or learner) it has not heard from for this
    /// many seconds, retiring its id like `coffer cluster remove`. Off by default (0).
    #[arg(long, env = "COFFER_AUTOPILOT_DEAD_AFTER_S")]
    pub autopilot_dead_after_s: Option<u64>,
    /// Autopilot never removes a voter when fewer than this many voters would remain
    /// (default 3).
    #[arg(long, env = "COFFER_AUTOPILOT_MIN_VOTERS")]
    pub autopilot_min_voters: Option<usize>,
    /// How long after a challenge expired or a session ended it is kept, in milliseconds
    /// (default 300000): nodes whose clocks are behind by less than this still refuse them.
    #[arg(long, env = "COFFER_LOGIN_CLEANUP_GRACE_MS")]
    pub login_cleanup_grace_ms: Option<u64>,
    /// How long a write may wait for a leader and a commit, in milliseconds.
    #[arg(long, env = "COFFER_WRITE_TIMEOUT_MS")]
    pub write_timeout_ms: Option<u64>,
    /// How long a linearizable read may wait for a read index, in milliseconds.
    #[arg(long, env = "COFFER_READ_TIMEOUT_MS")]
    pub read_timeout_ms: Option<u64>,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long, env = "COFFER_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Minimum Raft election timeout in milliseconds (the maximum is twice this).
    #[arg(long, env = "COFFER_ELECTION_TIMEOUT_MS")]
    pub election_timeout_ms: Option<u64>,
    /// Snapshot and compact the log after this many entries (0: never).
    #[arg(long, env = "COFFER_SNAPSHOT_LOGS")]
    pub snapshot_logs: Option<u64>,
    /// Entries kept behind a snapshot for lagging followers.
    #[arg(long, env = "COFFER_LOGS_TO_KEEP")]
    pub logs_to_keep: Option<u64>,
    /// Writes in flight on this node beyond which new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "COFFER_MAX_PENDING_WRITES")]
    pub max_pending_writes: Option<usize>,
    /// Linearizable reads waiting on this node beyond which new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "COFFER_MAX_PENDING_READS")]
    pub max_pending_reads: Option<usize>,
}

/// The same options as read from a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<u64>,
    cluster_name: Option<String>,
    data_dir: Option<PathBuf>,
    in_memory: Option<bool>,
    transient: Option<bool>,
    keys_dir: Option<PathBuf>,
    api_addr: Option<SocketAddr>,
    advertise_api_addr: Option<String>,
    peer_addr: Option<SocketAddr>,
    advertise_peer_addr: Option<String>,
    metrics_addr: Option<SocketAddr>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    node_key: Option<PathBuf>,
    join: Option<String>,
    join_token_file: Option<PathBuf>,
    kubernetes_api_url: Option<String>,
    kubernetes_in_cluster: Option<bool>,
    kubernetes_issuer: Option<String>,
    kubernetes_ca_cert: Option<PathBuf>,
    kubernetes_reviewer_token_file: Option<String>,
    kubernetes_timeout_ms: Option<u64>,
    initial_members: Option<Vec<String>>,
    max_value_bytes: Option<usize>,
    raw_storage_endpoint: Option<bool>,
    unseal_progress_ttl_s: Option<u64>,
    snapshot_dir: Option<PathBuf>,
    snapshot_interval: Option<String>,
    snapshot_retain: Option<usize>,
    login_challenge_ttl_ms: Option<u64>,
    login_rate_per_second: Option<u32>,
    login_cleanup_interval_ms: Option<u64>,
    autopilot_dead_after_s: Option<u64>,
    autopilot_min_voters: Option<usize>,
    login_cleanup_grace_ms: Option<u64>,
    write_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    heartbeat_ms: Option<u64>,
    election_timeout_ms: Option<u64>,
    snapshot_logs: Option<u64>,
    logs_to_keep: Option<u64>,
    max_pending_writes: Option<usize>,
    max_pending_reads: Option<usize>,
}

/// Where a node keeps its data.
#[derive(Debug, Clone)]
pub enum DataLocation {
    /// A directory on disk.
    Dir(PathBuf),
    /// Memory only.
    Memory,
}

/// Autopilot: the leader's clean-up of members it stopped hearing from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autopilot {
    /// Remove a member silent for this long (`None`: never; the default).
    pub dead_after: Option<Duration>,
    /// Never leave fewer voters than this.
    pub min_voters: usize,
}

impl Default for Autopilot {
    fn default() -> Self {
        Autopilot {
            dead_after: None,
            min_voters: 3,
        }
    }
}

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Autopilot's dead-member clean-up.
    pub autopilot: Autopilot,
    /// This node.
    pub node_id: NodeId,
    /// Cluster name recorded in the data directory.
    pub cluster_name: String,
    /// Storage.
    pub data: DataLocation,
    /// API listener.
    pub api_addr: SocketAddr,
    /// Peer listener.
    pub peer_addr: SocketAddr,
    /// Metrics listener.
    pub metrics_addr: Option<SocketAddr>,
    /// This node's advertised addresses.
    pub member: Member,
    /// TLS files.
    pub tls: TlsFiles,
    /// The node key file (`None`: in the data directory, or a new one in memory).
    pub node_key: Option<PathBuf>,
    /// Members' API addresses to join through (empty: this node does not join; it is an
    /// initial member or already in a cluster).
    pub join: Vec<String>,
    /// The service-account token file a joining pod proves membership with.
    pub join_token_file: Option<PathBuf>,
    /// Voters of a new cluster.
    pub initial_members: BTreeMap<NodeId, Member>,
    /// Largest value accepted.
    pub max_value_bytes: usize,
    /// Whether the raw store API is served (off by default).
    pub raw_storage_endpoint: bool,
    /// How long unseal progress is kept.
    pub unseal_progress_ttl: Duration,
    /// Scheduled backups (off unless `--snapshot-dir` is given).
    pub backups: Option<crate::backup::Schedule>,
    /// Challenge lifetime and the leader's clean-up of login state.
    pub login: crate::auth::LoginSettings,
    /// How Kubernetes service-account tokens are checked (off unless configured).
    pub kubernetes: crate::kubernetes::ValidatorConfig,
    /// Raft tuning.
    pub raft: Settings,
    /// A transient install's keys directory (see `--transient`).
    pub transient_keys: Option<PathBuf>,
}

/// Parses `ID=PEER_ADDR/API_ADDR`.
pub fn parse_member(s: &str) -> Result<(NodeId, Member)> {
    let (id, addrs) = s
        .split_once('=')
        .with_context(|| format!("initial member {s:?} must look like ID=PEER_ADDR/API_ADDR"))?;
    let id: NodeId = id
        .trim()
        .parse()
        .with_context(|| format!("initial member {s:?}: the id must be a positive integer"))?;
    let (peer, api) = addrs
        .split_once('/')
        .with_context(|| format!("initial member {s:?} must look like ID=PEER_ADDR/API_ADDR"))?;
    if id == 0 || peer.is_empty() || api.is_empty() {
        bail!("initial member {s:?} must look like ID=PEER_ADDR/API_ADDR with ID > 0");
    }
    Ok((id, Member::new(peer.trim(), api.trim())))
}

impl ServerArgs {
    /// Merges flags, environment and file, and validates.
    pub fn resolve(self) -> Result<NodeConfig> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let node_id = self
            .node_id
            .or(file.node_id)
            .context("--node-id (or node_id in the config file, or COFFER_NODE_ID) is required")?;
        if node_id == 0 {
            bail!("--node-id must be a positive integer");
        }
        let transient = self.transient || file.transient.unwrap_or(false);
        let transient_keys = match (transient, self.keys_dir.or(file.keys_dir)) {
            (true, dir) => Some(dir.unwrap_or_else(|| PathBuf::from("coffer-transient-keys"))),
            (false, Some(_)) => bail!("--keys-dir is only for --transient"),
            (false, None) => None,
        };
        let in_memory = transient || self.in_memory || file.in_memory.unwrap_or(false);
        let data = match (self.data_dir.or(file.data_dir), in_memory) {
            (Some(_), true) => bail!(
                "give either --data-dir or --in-memory / --transient (which keep everything in memory), not both"
            ),
            (Some(dir), false) => DataLocation::Dir(dir),
            (None, true) => DataLocation::Memory,
            (None, false) => bail!("--data-dir is required (or --in-memory for a transient node)"),
        };
        let api_addr = self
            .api_addr
            .or(file.api_addr)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7700)));
        let peer_addr = self
            .peer_addr
            .or(file.peer_addr)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7701)));
        let metrics_addr = self.metrics_addr.or(file.metrics_addr);
        let member = Member::new(
            self.advertise_peer_addr
                .or(file.advertise_peer_addr)
                .unwrap_or_else(|| peer_addr.to_string()),
            self.advertise_api_addr
                .or(file.advertise_api_addr)
                .unwrap_or_else(|| api_addr.to_string()),
        );
        let need = |v: Option<PathBuf>, flag: &str| {
            v.with_context(|| format!("--{flag} is required: Coffer has no plaintext mode"))
        };
        let tls = TlsFiles {
            cert: need(self.tls_cert.or(file.tls_cert), "tls-cert")?,
            key: need(self.tls_key.or(file.tls_key), "tls-key")?,
            ca: need(self.tls_ca.or(file.tls_ca), "tls-ca")?,
        };
        let raw_members = if self.initial_members.is_empty() {
            file.initial_members.unwrap_or_default()
        } else {
            self.initial_members
        };
        let mut initial_members = BTreeMap::new();
        for m in &raw_members {
            let (id, member) = parse_member(m)?;
            if initial_members.insert(id, member).is_some() {
                bail!("initial member id {id} is given twice");
            }
        }
        if transient && initial_members.is_empty() {
            // A lone transient node is a one-node cluster of its own.
            initial_members.insert(node_id, member.clone());
        }
        let join_token_file = self.join_token_file.or(file.join_token_file);
        let mut join = if self.join.is_empty() {
            file.join
                .map(|j| j.split(',').map(|a| a.trim().to_string()).collect())
                .unwrap_or_default()
        } else {
            self.join
        };
        join.retain(|a: &String| !a.is_empty());
        match initial_members.get(&node_id) {
            // An initial member forms the cluster (or is in it already): it never joins.
            Some(m) if !m.same_addresses(&member) => bail!(
                "--initial-member gives node {node_id} the addresses {m}, but this node advertises {member}"
            ),
            Some(_) => join.clear(),
            None if initial_members.is_empty() => {}
            // A node the list does not name (a StatefulSet scaled past its initial members)
            // joins, through --join or else the initial members.
            None if !join.is_empty() => {}
            None if join_token_file.is_some() => {
                join = initial_members
                    .values()
                    .map(|m| m.api_addr.clone())
                    .collect();
            }
            None => bail!(
                "--initial-member lists no member with this node's id {node_id}; a node that joins an existing cluster also needs --join MEMBER_API_ADDR (with a registered node key) or --join-token-file (a Kubernetes pod, joining through the initial members)"
            ),
        }
        if join.is_empty() && join_token_file.is_some() && initial_members.is_empty() {
            bail!(
                "--join-token-file needs the members to join through: --join MEMBER_API_ADDR or --initial-member"
            );
        }
        let defaults = Settings::default();
        let heartbeat_ms = self
            .heartbeat_ms
            .or(file.heartbeat_ms)
            .unwrap_or(defaults.heartbeat_ms);
        let election_timeout_ms = self
            .election_timeout_ms
            .or(file.election_timeout_ms)
            .unwrap_or(defaults.election_timeout_ms);
        if heartbeat_ms == 0 || election_timeout_ms <= heartbeat_ms.saturating_mul(2) {
            bail!(
                "--election-timeout-ms ({election_timeout_ms}) must be more than twice --heartbeat-ms ({heartbeat_ms}), which must be positive"
            );
        }
        let mut raft = Settings {
            heartbeat_ms,
            election_timeout_ms,
            snapshot_logs: self
                .snapshot_logs
                .or(file.snapshot_logs)
                .unwrap_or(defaults.snapshot_logs),
            logs_to_keep: self
                .logs_to_keep
                .or(file.logs_to_keep)
                .unwrap_or(defaults.logs_to_keep),
            write_timeout: self
                .write_timeout_ms
                .or(file.write_timeout_ms)
                .map_or(defaults.write_timeout, Duration::from_millis),
            read_timeout: self
                .read_timeout_ms
                .or(file.read_timeout_ms)
                .map_or(defaults.read_timeout, Duration::from_millis),
            max_pending_writes: self
                .max_pending_writes
                .or(file.max_pending_writes)
                .unwrap_or(defaults.max_pending_writes)
                .max(1),
            max_pending_reads: self
                .max_pending_reads
                .or(file.max_pending_reads)
                .unwrap_or(defaults.max_pending_reads)
                .max(1),
            ..defaults
        };
        let max_value_bytes = self
            .max_value_bytes
            .or(file.max_value_bytes)
            .unwrap_or(1 << 20);
        if max_value_bytes == 0 || max_value_bytes > 64 << 20 {
            bail!("--max-value-bytes must be between 1 and 67108864 (64 MiB)");
        }
        // A key, a transaction's framing and the entry's own encoding come on top of the value.
        raft.max_entry_bytes = max_value_bytes + (1 << 20);
        let too_long = |d: Duration| d > Duration::from_secs(3600);
        if too_long(raft.write_timeout) || too_long(raft.read_timeout) {
            bail!("--write-timeout-ms and --read-timeout-ms must be at most 3600000 (one hour)");
        }
        let unseal_progress_ttl = Duration::from_secs(
            self.unseal_progress_ttl_s
                .or(file.unseal_progress_ttl_s)
                .unwrap_or(600),
        );
        if unseal_progress_ttl.is_zero() || unseal_progress_ttl > Duration::from_secs(86_400) {
            bail!("--unseal-progress-ttl-s must be between 1 and 86400 (a day)");
        }
        let interval = self.snapshot_interval.or(file.snapshot_interval);
        let retain = self.snapshot_retain.or(file.snapshot_retain);
        let backups = match self.snapshot_dir.or(file.snapshot_dir) {
            Some(dir) => {
                let interval = match interval {
                    Some(s) => crate::cli_secrets::parse_duration(&s)
                        .map_err(|e| anyhow::anyhow!("--snapshot-interval: {e}"))?,
                    None => Duration::from_secs(3600),
                };
                if interval.is_zero() || interval > Duration::from_secs(30 * 86_400) {
                    bail!("--snapshot-interval must be between 1s and 30d");
                }
                let retain = retain.unwrap_or(7);
                if retain == 0 {
                    bail!("--snapshot-retain must be at least 1");
                }
                Some(crate::backup::Schedule {
                    dir,
                    interval,
                    retain,
                })
            }
            None if interval.is_some() || retain.is_some() => {
                bail!("--snapshot-interval and --snapshot-retain need --snapshot-dir")
            }
            None => None,
        };
        let defaults = crate::auth::LoginSettings::default();
        let ms = |flag: Option<u64>, file: Option<u64>, default: Duration| {
            flag.or(file).map_or(default, Duration::from_millis)
        };
        let login = crate::auth::LoginSettings {
            challenge_ttl: ms(
                self.login_challenge_ttl_ms,
                file.login_challenge_ttl_ms,
                defaults.challenge_ttl,
            ),
            cleanup_interval: ms(
                self.login_cleanup_interval_ms,
                file.login_cleanup_interval_ms,
                defaults.cleanup_interval,
            ),
            cleanup_grace: ms(
                self.login_cleanup_grace_ms,
                file.login_cleanup_grace_ms,
                defaults.cleanup_grace,
            ),
            rate_per_second: self
                .login_rate_per_second
                .or(file.login_rate_per_second)
                .unwrap_or(defaults.rate_per_second),
        };
        if !(1..=100_000).contains(&login.rate_per_second) {
            bail!("--login-rate-per-second must be between 1 and 100000");
        }
        let between = |d: Duration, lo: u64, hi: u64| (lo..=hi).contains(&(d.as_millis() as u64));
        if !between(login.challenge_ttl, 1_000, 600_000) {
            bail!("--login-challenge-ttl-ms must be between 1000 and 600000 (10 minutes)");
        }
        if !between(login.cleanup_interval, 10, 86_400_000) {
            bail!("--login-cleanup-interval-ms must be between 10 and 86400000 (a day)");
        }
        if !between(login.cleanup_grace, 0, 604_800_000) {
            bail!("--login-cleanup-grace-ms must be at most 604800000 (a week)");
        }
        let kubernetes = {
            use crate::kubernetes::{DEFAULT_TOKEN_FILE, ValidatorConfig};
            let timeout = Duration::from_millis(
                self.kubernetes_timeout_ms
                    .or(file.kubernetes_timeout_ms)
                    .unwrap_or(5000),
            );
            if timeout.is_zero() || timeout > Duration::from_secs(60) {
                bail!("--kubernetes-timeout-ms must be between 1 and 60000");
            }
            let ca_pem = match self.kubernetes_ca_cert.or(file.kubernetes_ca_cert) {
                Some(path) => Some(std::fs::read(&path).with_context(|| {
                    format!(
                        "cannot read the Kubernetes CA certificate {}",
                        path.display()
                    )
                })?),
                None => None,
            };
            let url = self.kubernetes_api_url.or(file.kubernetes_api_url);
            let in_cluster =
                self.kubernetes_in_cluster || file.kubernetes_in_cluster.unwrap_or(false);
            let issuer = self.kubernetes_issuer.or(file.kubernetes_issuer);
            match (url, in_cluster, issuer) {
                (None, false, None) => ValidatorConfig::Off,
                (Some(url), false, None) => ValidatorConfig::TokenReview {
                    url,
                    ca_pem,
                    token_file: self
                        .kubernetes_reviewer_token_file
                        .or(file.kubernetes_reviewer_token_file)
                        .unwrap_or_else(|| DEFAULT_TOKEN_FILE.into()),
                    timeout,
                },
                (None, true, None) => ValidatorConfig::InCluster { timeout },
                (None, false, Some(issuer)) => ValidatorConfig::Jwks {
                    issuer,
                    ca_pem,
                    timeout,
                },
                _ => bail!(
                    "choose one way to check Kubernetes tokens: --kubernetes-api-url, --kubernetes-in-cluster or --kubernetes-issuer"
                ),
            }
        };
        let autopilot = Autopilot {
            dead_after: self
                .autopilot_dead_after_s
                .or(file.autopilot_dead_after_s)
                .filter(|s| *s > 0)
                .map(Duration::from_secs),
            min_voters: self
                .autopilot_min_voters
                .or(file.autopilot_min_voters)
                .unwrap_or(Autopilot::default().min_voters),
        };
        if let Some(d) = autopilot.dead_after
            && d.as_millis() < u128::from(election_timeout_ms) * 4
        {
            bail!(
                "--autopilot-dead-after-s must be at least four election timeouts ({} ms): a member silent for less is not dead, and a removed member does not come back by itself",
                election_timeout_ms * 4
            );
        }
        if autopilot.min_voters == 0 {
            bail!(
                "--autopilot-min-voters must be at least 1 (3 keeps a cluster that survives one lost voter)"
            );
        }
        Ok(NodeConfig {
            autopilot,
            transient_keys,
            backups,
            unseal_progress_ttl,
            login,
            kubernetes,
            node_id,
            cluster_name: self
                .cluster_name
                .or(file.cluster_name)
                .unwrap_or_else(|| "coffer".into()),
            data,
            api_addr,
            peer_addr,
            metrics_addr,
            member,
            tls,
            node_key: self.node_key.or(file.node_key),
            join_token_file,
            join,
            initial_members,
            max_value_bytes,
            raw_storage_endpoint: self.raw_storage_endpoint
                || file.raw_storage_endpoint.unwrap_or(false),
            raft,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_syntax_is_checked() {
        let (id, m) = parse_member("3=10.0.0.3:7701/10.0.0.3:7700").unwrap();
        assert_eq!(id, 3);
        assert_eq!(m.peer_addr, "10.0.0.3:7701");
        assert_eq!(m.api_addr, "10.0.0.3:7700");
        assert!(parse_member("3=10.0.0.3:7701").is_err());
        assert!(parse_member("0=a/b").is_err());
        assert!(parse_member("x=a/b").is_err());
    }

    #[test]
    fn file_and_flags_merge_with_flags_winning() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coffer.toml");
        std::fs::write(
            &file,
            "node_id = 2\ndata_dir = \"/var/lib/coffer\"\ntls_cert = \"c\"\ntls_key = \"k\"\ntls_ca = \"a\"\nheartbeat_ms = 50\n",
        )
        .unwrap();
        let args = ServerArgs {
            config: Some(file.clone()),
            heartbeat_ms: Some(70),
            ..Default::default()
        };
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.node_id, 2);
        assert_eq!(cfg.raft.heartbeat_ms, 70);
        std::fs::write(&file, "node_id = 2\nbogus = 1\n").unwrap();
        let err = ServerArgs {
            config: Some(file),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(format!("{err:#}").contains("bogus"), "{err:#}");
    }

    /// Every pod of a StatefulSet gets the same flags: the initial member list and a token.
    fn pod(id: u64, join: &[&str], token: bool) -> Result<NodeConfig> {
        let members: Vec<String> = (1..=3)
            .map(|i| format!("{i}=coffer-{i}.peers:7001/coffer-{i}.peers:7000"))
            .collect();
        ServerArgs {
            node_id: Some(id),
            data_dir: Some("/var/lib/coffer".into()),
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            tls_ca: Some("a".into()),
            advertise_api_addr: Some(format!("coffer-{id}.peers:7000")),
            advertise_peer_addr: Some(format!("coffer-{id}.peers:7001")),
            initial_members: members,
            join: join.iter().map(|s| s.to_string()).collect(),
            join_token_file: token.then(|| "/var/run/secrets/coffer/token".into()),
            ..Default::default()
        }
        .resolve()
    }

    #[test]
    fn a_pod_beyond_the_initial_members_joins_through_them() {
        let initial = pod(2, &[], true).unwrap();
        assert!(initial.join.is_empty(), "an initial member never joins");
        let also_given_join = pod(2, &["elsewhere:7000"], true).unwrap();
        assert!(
            also_given_join.join.is_empty(),
            "an initial member never joins"
        );
        let fourth = pod(4, &[], true).unwrap();
        assert_eq!(
            fourth.join,
            [
                "coffer-1.peers:7000",
                "coffer-2.peers:7000",
                "coffer-3.peers:7000"
            ]
        );
        let told_where = pod(4, &["a:7000", "b:7000"], false).unwrap();
        assert_eq!(told_where.join, ["a:7000", "b:7000"]);
        let err = pod(4, &[], false).unwrap_err();
        assert!(format!("{err:#}").contains("--join-token-file"), "{err:#}");
        let err = ServerArgs {
            node_id: Some(4),
            data_dir: Some("/var/lib/coffer".into()),
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            tls_ca: Some("a".into()),
            join_token_file: Some("t".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("members to join through"),
            "{err:#}"
        );
    }

    #[test]
    fn no_plaintext_and_no_ambiguous_storage() {
        let err = ServerArgs {
            node_id: Some(1),
            in_memory: true,
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("plaintext"), "{err}");
        let err = ServerArgs {
            node_id: Some(1),
            in_memory: true,
            data_dir: Some("/tmp/x".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
    }

    #[test]
    fn scheduled_backups_come_from_the_file_or_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coffer.toml");
        std::fs::write(
            &file,
            "node_id = 2\ndata_dir = \"d\"\ntls_cert = \"c\"\ntls_key = \"k\"\ntls_ca = \"a\"\nsnapshot_dir = \"/backups\"\nsnapshot_interval = \"15m\"\n",
        )
        .unwrap();
        let with = |args: ServerArgs| {
            ServerArgs {
                config: Some(file.clone()),
                ..args
            }
            .resolve()
        };
        let schedule = with(ServerArgs {
            snapshot_retain: Some(3),
            ..Default::default()
        })
        .unwrap()
        .backups
        .unwrap();
        assert_eq!(
            schedule,
            crate::backup::Schedule {
                dir: "/backups".into(),
                interval: Duration::from_secs(900),
                retain: 3,
            }
        );
        for (args, says) in [
            (
                ServerArgs {
                    snapshot_interval: Some("0s".into()),
                    ..Default::default()
                },
                "between 1s and 30d",
            ),
            (
                ServerArgs {
                    snapshot_retain: Some(0),
                    ..Default::default()
                },
                "at least 1",
            ),
        ] {
            let err = with(args).unwrap_err();
            assert!(format!("{err:#}").contains(says), "{err:#}");
        }
        let err = ServerArgs {
            node_id: Some(1),
            in_memory: true,
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            tls_ca: Some("a".into()),
            snapshot_retain: Some(2),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("need --snapshot-dir"),
            "{err:#}"
        );
    }
}
