//! A fixture for multi-node scenarios: real `coffer server` processes, each on its own loopback
//! address (127.0.0.1x), with file storage in a temporary directory and TLS everywhere. Tests
//! reach the nodes only the way production clients do: over the public gRPC API.
//!
//! Helpers that panic on failure are named `must_*`. Waiting is always on a condition with a
//! deadline ([`wait_until`]), never a bare sleep.
#![forbid(unsafe_code)]

pub mod kube_api;
pub mod workload;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use coffer_api::v1 as pb;
use coffer_api::v1::cluster_client::ClusterClient;
use coffer_api::v1::kv_client::KvClient;
use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The binary under test: `coffer-under-test`, which cargo builds beside the integration test
/// executables of this package (`target/<profile>/`, one level above `deps/`).
pub fn coffer_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let bin = dir.join(format!("coffer-under-test{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test -p coffer-cluster-tests`, which builds it",
        bin.display()
    );
    bin
}

/// Options for a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Snapshot after this many log entries.
    pub snapshot_logs: u64,
    /// Entries kept behind a snapshot.
    pub logs_to_keep: u64,
    /// Extra flags for every node.
    pub extra_args: Vec<String>,
    /// Extra environment for every node (e.g. `FAILPOINTS`).
    pub env: Vec<(String, String)>,
    /// Initialize the new cluster (one operator key, threshold 1 of 1, peer unseal on) and
    /// unseal it, as every real cluster must be before it serves data. Off only for tests of
    /// the ceremony itself.
    pub initialize: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            snapshot_logs: 10_000,
            logs_to_keep: 1_000,
            extra_args: Vec::new(),
            env: Vec::new(),
            initialize: true,
        }
    }
}

/// One node process.
#[derive(Debug)]
pub struct NodeProc {
    /// Node id.
    pub id: u64,
    /// API address.
    pub api: SocketAddr,
    /// Peer address.
    pub peer: SocketAddr,
    /// Metrics address (`/metrics`, `/health`).
    pub metrics: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Whether this node was one of the initial voters (passes --initial-member).
    pub initial: bool,
    /// Extra environment for the next start (e.g. `FAILPOINTS`).
    pub env: Vec<(String, String)>,
    /// Extra flags for the next start (e.g. `--metrics-addr`).
    pub extra_args: Vec<String>,
    child: Option<Child>,
    /// Where its output goes.
    pub log: PathBuf,
}

/// A cluster of `coffer server` processes.
#[derive(Debug)]
pub struct Cluster {
    dir: tempfile::TempDir,
    /// The nodes by id.
    pub nodes: BTreeMap<u64, NodeProc>,
    initial_members: Vec<String>,
    options: ClusterOptions,
    ca_pem: Vec<u8>,
    /// The administrator's session (after initialization), presented by every client the
    /// fixture makes.
    session: std::sync::Mutex<Option<coffer_node::client::SessionCredentials>>,
}

/// The value of the first sample in Prometheus `text` whose line starts with `name` (a metric
/// name, optionally with the start of its labels).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .next()
}

/// A free port on a loopback address, below the kernel's ephemeral range (32768 and up on
/// Linux) and never handed out twice by this process: a port picked from the ephemeral range
/// could become the source port of some outgoing connection before the node binds it (seen
/// as a node that cannot listen, and a cluster that never forms, under parallel tests).
fn free_addr(ip: &str) -> SocketAddr {
    static GIVEN: std::sync::Mutex<Vec<SocketAddr>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..10_000 {
        let port = rand::random_range(20_000..32_000u16);
        let Ok(l) = std::net::TcpListener::bind((ip, port)) else {
            continue;
        };
        let addr = l.local_addr().expect("local addr");
        if !given.contains(&addr) {
            given.push(addr);
            return addr;
        }
    }
    panic!("no free port between 20000 and 32000 on {ip}");
}

fn node_ip(id: u64) -> String {
    format!("127.0.0.{}", 10 + id)
}

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> Vec<u8> {
    b.iter()
        .flat_map(|x| format!("{x:02x}").into_bytes())
        .collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 of `b`, without padding.
pub fn base64_unpadded(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, x)| acc | (u32::from(*x) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(B64[(n >> (18 - 6 * i) & 63) as usize]);
        }
    }
    out
}

/// The forms of a plaintext `marker` a leak scan looks for: raw, hex (both cases) and base64
/// (standard and URL-safe) at each of the three byte alignments it could have inside a longer
/// encoded text (the middle part, which is fixed).
pub fn plaintext_forms(marker: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut n = vec![
        ("raw".to_string(), marker.to_vec()),
        ("hex".into(), hex(marker)),
        ("HEX".into(), hex(marker).to_ascii_uppercase()),
    ];
    for pad in 0..3 {
        let mut padded = vec![0u8; pad];
        padded.extend_from_slice(marker);
        let enc = base64_unpadded(&padded);
        let skip = (pad * 4).div_ceil(3);
        let core = enc[skip..enc.len() - 4].to_vec();
        n.push((format!("base64+{pad}"), core.clone()));
        let url: Vec<u8> = core
            .iter()
            .map(|c| match c {
                b'+' => b'-',
                b'/' => b'_',
                c => *c,
            })
            .collect();
        n.push((format!("base64url+{pad}"), url));
    }
    n
}

/// Waits until `f` returns `Some`, polling every 50 ms, or panics with `what` at the deadline.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every file below `dir` (recursively), to scan what a cluster left on disk.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Issues node certificates with `coffer certs` (creating the cluster CA on first use).
fn must_issue_certs(dir: &Path, ids: std::ops::RangeInclusive<u64>) {
    let node_args: Vec<String> = ids
        .flat_map(|id| ["--node".to_string(), format!("{id}={}", node_ip(id))])
        .collect();
    let out = Command::new(coffer_bin())
        .args(["certs", "--dir"])
        .arg(dir)
        .args(&node_args)
        .output()
        .expect("run coffer certs");
    assert!(out.status.success(), "coffer certs failed: {out:?}");
}

/// `coffer operator init` through `target` with one new operator key (threshold 1 of 1) and a
/// new administrator key, saved in `keys` as `operator.key`/`.pub`, `admin.key`/`.pub`; the
/// operator's share is `keys/operator.share`. Nothing is unsealed yet.
pub async fn must_init_with_one_operator(target: &coffer_node::client::Target, keys: &Path) {
    for (name, what) in [
        ("operator", "test operator"),
        ("admin", "test administrator"),
    ] {
        coffer_node::keys::KeyPair::generate()
            .expect("key")
            .save(&keys.join(name), what)
            .expect("save key");
    }
    coffer_node::operator::init(
        target,
        &[keys.join("operator.pub")],
        1,
        &keys.join("admin.pub"),
        keys,
    )
    .await
    .expect("coffer operator init");
}

impl Cluster {
    /// Starts `n` voters that bootstrap a new cluster, and waits for a leader.
    pub async fn start(n: u64, options: ClusterOptions) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        must_issue_certs(&dir.path().join("tls"), 1..=n);
        let ca_pem = std::fs::read(dir.path().join("tls/ca.pem")).expect("ca.pem");
        let mut cluster = Cluster {
            dir,
            nodes: BTreeMap::new(),
            initial_members: Vec::new(),
            options,
            ca_pem,
            session: std::sync::Mutex::new(None),
        };
        for id in 1..=n {
            let ip = node_ip(id);
            let (api, peer) = (free_addr(&ip), free_addr(&ip));
            cluster.initial_members.push(format!("{id}={peer}/{api}"));
            cluster.add_node_proc(id, api, peer, true);
        }
        for id in 1..=n {
            cluster.spawn(id);
        }
        cluster.must_wait_leader(Duration::from_secs(20)).await;
        if cluster.options.initialize {
            cluster.must_initialize().await;
        }
        cluster
    }

    /// A client target over every running node, with the administrator's session once the
    /// cluster is initialized.
    pub fn target(&self) -> coffer_node::client::Target {
        let addrs: Vec<String> = self
            .running()
            .iter()
            .map(|id| self.nodes[id].api.to_string())
            .collect();
        let mut target = coffer_node::client::Target::new(
            &addrs,
            Some(&self.dir.path().join("tls/ca.pem")),
            Duration::from_secs(10),
        )
        .expect("client target");
        target.session = self.session();
        target
    }

    /// A client target for node `id` alone, without a session (to log in, or to be refused).
    pub fn target_without_session(&self, id: u64) -> coffer_node::client::Target {
        coffer_node::client::Target::new(
            &[self.nodes[&id].api.to_string()],
            Some(&self.dir.path().join("tls/ca.pem")),
            Duration::from_secs(10),
        )
        .expect("client target")
    }

    /// The administrator's session, once logged in.
    pub fn session(&self) -> Option<coffer_node::client::SessionCredentials> {
        self.session.lock().expect("session lock").clone()
    }

    /// The administrator key file (made at initialization).
    pub fn admin_key(&self) -> PathBuf {
        self.dir.path().join("keys/admin.key")
    }

    /// Logs in as the administrator (private key file `key`), gives it data access (the policy
    /// `coffer dev` adds) and makes every later client of the fixture present that session.
    pub async fn must_login_admin(&self, key: &Path) {
        let target = coffer_node::dev::allow_admin_data(&self.target(), key)
            .await
            .expect("log in as the administrator");
        *self.session.lock().expect("session lock") = target.session;
    }

    /// Environment for `coffer` CLI commands against this cluster: addresses, CA, the
    /// administrator key and a session file of its own.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        let addrs: Vec<String> = self
            .running()
            .iter()
            .map(|id| self.nodes[id].api.to_string())
            .collect();
        let path = |p: &str| self.dir.path().join(p).display().to_string();
        vec![
            ("COFFER_ADDR".into(), addrs.join(",")),
            ("COFFER_CACERT".into(), path("tls/ca.pem")),
            ("COFFER_KEY".into(), path("keys/admin.key")),
            ("COFFER_SESSION_FILE".into(), path("session.json")),
        ]
    }

    /// The fixture's operator key (the only one; threshold 1) and its share file.
    pub fn operator_files(&self) -> (PathBuf, PathBuf) {
        let keys = self.dir.path().join("keys");
        (keys.join("operator.key"), keys.join("operator.share"))
    }

    /// Initializes the cluster with one generated operator key (threshold 1 of 1) and an
    /// administrator key in `keys/`, unseals it, and turns peer unseal on (so that a restarted
    /// node unseals itself from a live one, as in a rolling restart).
    pub async fn must_initialize(&self) {
        let keys = self.dir.path().join("keys");
        let target = self.target();
        must_init_with_one_operator(&target, &keys).await;
        let first = self.running()[0];
        self.must_unseal(first).await;
        let (key, _) = self.operator_files();
        coffer_node::operator::act(&target, &key, coffer_node::seal::Action::PeerUnseal(true))
            .await
            .expect("turn peer unseal on");
        self.must_wait_unsealed(&self.running(), Duration::from_secs(20))
            .await;
        self.must_login_admin(&self.admin_key()).await;
    }

    /// Submits the operator's share to node `id` (after a restart of the whole cluster, or of a
    /// node that must not wait for peer unseal). Retries until the node takes it: a node that
    /// just started may not have applied the seal configuration yet.
    pub async fn must_unseal(&self, id: u64) {
        let (key, share) = self.operator_files();
        let target = coffer_node::client::Target::new(
            &[self.nodes[&id].api.to_string()],
            Some(&self.dir.path().join("tls/ca.pem")),
            Duration::from_secs(10),
        )
        .expect("client target");
        wait_until(
            Duration::from_secs(20),
            &format!("node {id} to take the unseal share"),
            || async {
                match coffer_node::operator::unseal(&target, &key, &share).await {
                    Ok(_) => Some(()),
                    Err(e) if format!("{e:#}").contains("already") => Some(()),
                    Err(_) => None,
                }
            },
        )
        .await;
    }

    /// Waits until each of `ids` reports itself unsealed.
    pub async fn must_wait_unsealed(&self, ids: &[u64], timeout: Duration) {
        for id in ids {
            wait_until(timeout, &format!("node {id} to be unsealed"), || async {
                (self.status(*id).await?.seal == "unsealed").then_some(())
            })
            .await;
        }
    }

    fn add_node_proc(&mut self, id: u64, api: SocketAddr, peer: SocketAddr, initial: bool) {
        let data_dir = self.dir.path().join(format!("node-{id}"));
        let log = self.dir.path().join(format!("node-{id}.log"));
        self.nodes.insert(
            id,
            NodeProc {
                id,
                api,
                peer,
                metrics: free_addr(&node_ip(id)),
                data_dir,
                initial,
                env: Vec::new(),
                extra_args: Vec::new(),
                child: None,
                log,
            },
        );
    }

    /// Prepares a new node (not started, not a member) with fresh addresses and a certificate
    /// issued later by the same cluster CA.
    pub fn add_node(&mut self, id: u64) -> &NodeProc {
        must_issue_certs(&self.dir.path().join("tls"), id..=id);
        let ip = node_ip(id);
        self.add_node_proc(id, free_addr(&ip), free_addr(&ip), false);
        &self.nodes[&id]
    }

    /// Prepares node `id` (not started) to join through node `via`: a node key, registered by
    /// the administrator, and the `--join` and `--node-key` flags. Start it with
    /// [`Cluster::spawn`]; it adds itself as a learner. Returns the key file.
    pub async fn add_joining_node(&mut self, id: u64, via: u64) -> PathBuf {
        let key = self.prepare_joining_node(id, via);
        let public_key = coffer_node::keys::KeyPair::load(&key)
            .expect("node key")
            .public()
            .to_bytes()
            .to_vec();
        self.admin(via)
            .register_node(pb::RegisterNodeRequest { id, public_key })
            .await
            .expect("register the node key");
        key
    }

    /// Like [`Cluster::add_joining_node`], without registering the key.
    pub fn prepare_joining_node(&mut self, id: u64, via: u64) -> PathBuf {
        self.add_node(id);
        let out = self.dir.path().join(format!("keys/node-{id}"));
        coffer_node::keys::KeyPair::generate()
            .expect("key")
            .save(&out, "test node key")
            .expect("save the node key");
        let key = out.with_extension("key");
        let via_api = self.nodes[&via].api.to_string();
        let node = self.nodes.get_mut(&id).expect("known node");
        node.extra_args.extend([
            "--join".to_string(),
            via_api,
            "--node-key".to_string(),
            key.display().to_string(),
        ]);
        key
    }

    /// Prepares node `id` (not started) as a StatefulSet pod beyond the initial members is
    /// started: the same `--initial-member` list as every pod (which does not name it) and its
    /// service-account token file, nothing else; it joins through the initial members.
    pub fn prepare_pod(&mut self, id: u64, token_file: &Path) {
        self.add_node(id);
        let mut args: Vec<String> = self
            .initial_members
            .iter()
            .flat_map(|m| ["--initial-member".to_string(), m.clone()])
            .collect();
        args.extend(["--join-token-file".into(), token_file.display().to_string()]);
        self.node_mut(id).extra_args.extend(args);
    }

    /// Writes the Kubernetes role that admits joining pods (`coffer-members`): the service
    /// account `coffer` of `namespace`, tokens for the audience `coffer-cluster`.
    pub async fn must_write_member_role(&self, namespace: &str) {
        coffer_api::v1::kubernetes_roles_client::KubernetesRolesClient::new(self.channel(1))
            .write(pb::KubernetesRole {
                name: coffer_node::node_identity::KUBERNETES_MEMBER_ROLE.into(),
                bound_service_accounts: vec!["coffer".into()],
                bound_namespaces: vec![namespace.into()],
                audience: "coffer-cluster".into(),
                ..Default::default()
            })
            .await
            .expect("write the member role");
    }

    /// Waits until a node that joined is a member (in `leader`'s view), unsealed (by peer
    /// unseal), and serves a linearizable read of a write made through `leader`.
    pub async fn must_wait_joined(&self, id: u64, leader: u64) {
        self.must_wait_member(id, leader, Duration::from_secs(20))
            .await;
        self.must_wait_unsealed(&[id], Duration::from_secs(20))
            .await;
        let key = format!("joined/{id}");
        self.must_put(leader, &key, "yes").await;
        self.must_get_equal(id, &key, "yes").await;
    }

    /// Node `id`'s process record.
    pub fn node(&self, id: u64) -> &NodeProc {
        &self.nodes[&id]
    }

    /// Node `id`'s process record, to change its next start.
    pub fn node_mut(&mut self, id: u64) -> &mut NodeProc {
        self.nodes.get_mut(&id).expect("known node")
    }

    /// Waits until node `id` is a member (voter or learner) in node `seen_by`'s view.
    pub async fn must_wait_member(&self, id: u64, seen_by: u64, timeout: Duration) {
        wait_until(
            timeout,
            &format!("node {id} to become a member"),
            || async {
                let s = self.status(seen_by).await?;
                s.members.iter().any(|m| m.id == id).then_some(())
            },
        )
        .await;
    }

    /// The `coffer server` command line of a node.
    pub fn server_command(&self, id: u64) -> Command {
        let node = &self.nodes[&id];
        let tls = self.dir.path().join("tls");
        let mut cmd = Command::new(coffer_bin());
        cmd.arg("server")
            .args(["--node-id", &id.to_string()])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--api-addr", &node.api.to_string()])
            .args(["--peer-addr", &node.peer.to_string()])
            .args(["--metrics-addr", &node.metrics.to_string()])
            .arg("--tls-cert")
            .arg(tls.join(format!("node-{id}.pem")))
            .arg("--tls-key")
            .arg(tls.join(format!("node-{id}-key.pem")))
            .arg("--tls-ca")
            .arg(tls.join("ca.pem"))
            .args(["--heartbeat-ms", "50", "--election-timeout-ms", "300"])
            .args(["--write-timeout-ms", "3000", "--read-timeout-ms", "3000"])
            // The older scenarios write through the raw store API (off by default).
            .arg("--raw-storage-endpoint")
            .args(["--snapshot-logs", &self.options.snapshot_logs.to_string()])
            .args(["--logs-to-keep", &self.options.logs_to_keep.to_string()])
            .args(&self.options.extra_args)
            .args(&node.extra_args)
            .env("RUST_LOG", "info,openraft=info")
            .envs(
                self.options
                    .env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .envs(node.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if node.initial {
            for m in &self.initial_members {
                cmd.args(["--initial-member", m]);
            }
        }
        cmd
    }

    /// A one-off `coffer server` command with node `ports_of`'s flags, but claiming to be node
    /// `node_id`, on `data_dir`, without `--initial-member`: for starts that must be refused.
    pub fn offline_command(&self, ports_of: u64, node_id: u64, data_dir: &Path) -> Command {
        let template = self.server_command(ports_of);
        let args: Vec<String> = template
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let mut cmd = Command::new(template.get_program());
        let mut i = 0;
        while i < args.len() {
            match args[i].as_str() {
                "--node-id" => {
                    cmd.args(["--node-id", &node_id.to_string()]);
                    i += 2;
                }
                "--data-dir" => {
                    cmd.arg("--data-dir").arg(data_dir);
                    i += 2;
                }
                "--initial-member" => i += 2,
                other => {
                    cmd.arg(other);
                    i += 1;
                }
            }
        }
        cmd
    }

    /// Starts (or restarts) a node's process; its output goes to its log file.
    pub fn spawn(&mut self, id: u64) {
        let mut cmd = self.server_command(id);
        let node = self.nodes.get_mut(&id).expect("known node");
        assert!(node.child.is_none(), "node {id} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("open node log");
        let child = cmd
            .stdout(Stdio::from(log.try_clone().expect("clone log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn coffer server");
        node.child = Some(child);
    }

    /// Kills a node with SIGKILL (no shutdown path runs) and reaps it.
    pub fn kill(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops a node as an orchestrator does (SIGTERM) and waits until its process exited;
    /// returns its exit code.
    pub fn terminate(&mut self, id: u64) -> Option<i32> {
        self.signal(id, "-TERM");
        let node = self.nodes.get_mut(&id).expect("known node");
        let mut child = node.child.take().expect("the node runs");
        child.wait().expect("wait for the node").code()
    }

    /// Stops a node's process with SIGSTOP (a long GC pause, a frozen VM).
    pub fn pause(&self, id: u64) {
        self.signal(id, "-STOP");
    }

    /// Resumes a paused node with SIGCONT.
    pub fn resume(&self, id: u64) {
        self.signal(id, "-CONT");
    }

    fn signal(&self, id: u64, sig: &str) {
        let pid = self.nodes[&id]
            .child
            .as_ref()
            .map(|c| c.id())
            .expect("the node runs");
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid} failed");
    }

    /// Cuts node `id` off from every other node in both directions (iptables on its loopback
    /// address; clients still reach it). The partition heals when the guard is dropped.
    pub fn isolate(&self, id: u64) -> Partition {
        let mut rules = Vec::new();
        for other in self.nodes.keys().filter(|o| **o != id) {
            for (src, dst) in [
                (node_ip(id), node_ip(*other)),
                (node_ip(*other), node_ip(id)),
            ] {
                rules.push(vec![
                    "OUTPUT".to_string(),
                    "-s".into(),
                    src,
                    "-d".into(),
                    dst,
                    "-j".into(),
                    "DROP".into(),
                ]);
            }
        }
        for rule in &rules {
            let status = Command::new("iptables")
                .arg("-I")
                .args(rule)
                .status()
                .expect("run iptables (the partition tests need it, as root)");
            assert!(status.success(), "iptables -I {rule:?} failed");
        }
        Partition { rules }
    }

    /// Whether a node's process has exited, with its exit code. An exited process no longer
    /// counts as running.
    pub fn exited(&mut self, id: u64) -> Option<Option<i32>> {
        let node = self.nodes.get_mut(&id).expect("known node");
        let child = node.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                node.child = None;
                Some(status.code())
            }
            _ => None,
        }
    }

    /// Node `id`'s `/metrics` answer (with its status line), if it answers with 200.
    pub async fn metrics_text(&self, id: u64) -> Option<String> {
        self.metrics_http(id, "/metrics")
            .await
            .filter(|r| r.starts_with("HTTP/1.1 200"))
    }

    /// The whole HTTP answer of node `id`'s metrics listener to `GET path`.
    pub async fn metrics_http(&self, id: u64, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.nodes[&id].metrics;
        let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut body = String::new();
        conn.read_to_string(&mut body).await.ok()?;
        Some(body)
    }

    /// The log output of a node so far.
    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(&self.nodes[&id].log).unwrap_or_default()
    }

    /// The cluster CA (PEM).
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// The temporary directory holding everything.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A channel to a node's API.
    pub fn channel(&self, id: u64) -> Channel {
        self.channel_with_timeout(id, Duration::from_secs(10))
    }

    /// A channel to a node's API whose requests give up after `timeout` (workload clients use
    /// a short one, so a paused or cut-off node costs them little).
    pub fn channel_with_timeout(&self, id: u64, timeout: Duration) -> Channel {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some(session) = self.session() {
            tls = tls.identity(Identity::from_pem(
                &session.certificate,
                session.key.as_bytes(),
            ));
        }
        Endpoint::from_shared(format!("https://{}", self.nodes[&id].api))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .timeout(timeout)
            .connect_lazy()
    }

    /// The API addresses of nodes `ids`, in that order (an SDK client starts with the first).
    pub fn endpoints(&self, ids: &[u64]) -> Vec<String> {
        ids.iter()
            .map(|id| self.nodes[id].api.to_string())
            .collect()
    }

    /// An SDK client over nodes `ids` (starting with the first) that logs in with `login`.
    pub async fn sdk(&self, ids: &[u64], login: coffer_client::Login) -> coffer_client::Client {
        coffer_client::Client::connect(coffer_client::Config::new(
            self.endpoints(ids),
            self.ca_pem.clone(),
            login,
        ))
        .await
        .expect("SDK client connects and logs in")
    }

    /// Writes policy `name` with `text` and creates identity `name` holding it, with a new key
    /// pair saved as `keys/NAME.key` (and `.pub`) in the cluster directory; returns the private
    /// key file. Done as the administrator.
    pub async fn must_create_identity(&self, name: &str, text: &str) -> PathBuf {
        use coffer_api::v1::identities_client::IdentitiesClient;
        use coffer_api::v1::policies_client::PoliciesClient;
        PoliciesClient::new(self.channel(self.running()[0]))
            .write(pb::PolicyWriteRequest {
                name: name.into(),
                text: text.into(),
            })
            .await
            .expect("policy write");
        let key = coffer_node::keys::KeyPair::generate().expect("key");
        IdentitiesClient::new(self.channel(self.running()[0]))
            .create(pb::IdentityCreateRequest {
                name: name.into(),
                public_key: key.public().to_bytes().to_vec(),
                policies: vec![name.into()],
                ..Default::default()
            })
            .await
            .expect("identity create");
        let (private, _) = key
            .save(&self.dir.path().join("keys").join(name), name)
            .expect("save the identity key");
        private
    }

    /// A key/value client for a node.
    pub fn kv(&self, id: u64) -> KvClient<Channel> {
        KvClient::new(self.channel(id))
    }

    /// A cluster client for a node.
    pub fn admin(&self, id: u64) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel(id))
    }

    /// A node's status, if it answers.
    pub async fn status(&self, id: u64) -> Option<pb::StatusResponse> {
        self.admin(id)
            .status(pb::StatusRequest { digest: true })
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Ids of the nodes whose process runs.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    /// Waits until every running member reports the same leader, and returns it.
    pub async fn must_wait_leader(&self, timeout: Duration) -> u64 {
        wait_until(
            timeout,
            "every running node to agree on a leader",
            || async {
                let mut leader = None;
                for id in self.running() {
                    let s = self.status(id).await?;
                    if s.leader_id == 0 || leader.is_some_and(|l| l != s.leader_id) {
                        return None;
                    }
                    leader = Some(s.leader_id);
                }
                leader.filter(|l| self.running().contains(l))
            },
        )
        .await
    }

    /// A running node other than `not`.
    pub fn other_than(&self, not: u64) -> u64 {
        *self
            .running()
            .iter()
            .find(|id| **id != not)
            .expect("another running node")
    }

    /// Puts through node `id`, panicking on failure.
    pub async fn must_put(&self, id: u64, key: &str, value: &str) -> pb::PutResponse {
        self.kv(id)
            .put(pb::PutRequest {
                key: key.into(),
                value: value.into(),
                request_id: Vec::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("put {key} via node {id}: {e}"))
            .into_inner()
    }

    /// Reads linearizably through node `id` and checks the value.
    pub async fn must_get_equal(&self, id: u64, key: &str, value: &str) {
        let r = self
            .kv(id)
            .get(pb::GetRequest {
                key: key.into(),
                consistency: pb::Consistency::Linearizable as i32,
            })
            .await
            .unwrap_or_else(|e| panic!("get {key} via node {id}: {e}"))
            .into_inner();
        let got = r.kv.map(|kv| kv.value).unwrap_or_default();
        assert_eq!(
            String::from_utf8_lossy(&got),
            value,
            "node {id} returned a different value for {key}"
        );
    }

    /// Every key under `prefix` as node `id` sees it (stale: its local state).
    pub async fn must_list_local(&self, id: u64, prefix: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut after = Vec::new();
        loop {
            let r = self
                .kv(id)
                .list(pb::ListRequest {
                    prefix: prefix.into(),
                    start_after: after.clone(),
                    limit: 1000,
                    consistency: pb::Consistency::Stale as i32,
                    keys_only: false,
                })
                .await
                .unwrap_or_else(|e| panic!("list via node {id}: {e}"))
                .into_inner();
            for kv in &r.kvs {
                out.insert(
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    String::from_utf8_lossy(&kv.value).into_owned(),
                );
            }
            match (r.more, r.kvs.last()) {
                (true, Some(last)) => after = last.key.clone(),
                _ => return out,
            }
        }
    }

    /// Waits until every running node applied at least what `id` has committed and all report
    /// the same state digest.
    pub async fn must_converge(&self, timeout: Duration) {
        wait_until(
            timeout,
            "every running node to converge on one digest",
            || async {
                let mut digests = Vec::new();
                for id in self.running() {
                    let s = self.status(id).await?;
                    digests.push((s.applied_index, s.digest));
                }
                let first = digests.first()?;
                digests.iter().all(|d| d == first).then_some(())
            },
        )
        .await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            // Keep the evidence of a failed scenario.
            let keep = match tempfile::TempDir::new() {
                Ok(empty) => std::mem::replace(&mut self.dir, empty).keep(),
                Err(_) => self.dir.path().to_path_buf(),
            };
            eprintln!("cluster directory kept for inspection: {}", keep.display());
            for node in self.nodes.values() {
                if let Ok(log) = std::fs::read_to_string(&node.log) {
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    eprintln!("--- node {} log (last lines) ---", node.id);
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

/// A network partition made by [`Cluster::isolate`]; dropping it heals the network.
#[derive(Debug)]
pub struct Partition {
    rules: Vec<Vec<String>>,
}

impl Drop for Partition {
    fn drop(&mut self) {
        for rule in &self.rules {
            let _ = Command::new("iptables").arg("-D").args(rule).status();
        }
    }
}

/// A background writer: puts unique keys through the given nodes until stopped, and records
/// which writes were acknowledged.
#[derive(Debug)]
pub struct Writer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<WriterLog>,
}

/// What a [`Writer`] saw.
#[derive(Debug, Default, Clone)]
pub struct WriterLog {
    /// Acknowledged writes: key -> value.
    pub acked: BTreeMap<String, String>,
    /// Writes that failed with a definite "not applied" status.
    pub failed: u64,
    /// Writes whose outcome is unknown.
    pub unknown: u64,
}

impl Writer {
    /// Starts `clients` concurrent writers putting `prefix/<client>-<n>` through `channels`.
    pub fn start(prefix: &str, channels: Vec<Channel>, clients: usize) -> Writer {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let prefix = prefix.to_string();
        let task = tokio::spawn(async move {
            let mut tasks = Vec::new();
            for c in 0..clients {
                let channels = channels.clone();
                let stop_rx = stop_rx.clone();
                let prefix = prefix.clone();
                tasks.push(tokio::spawn(async move {
                    let mut log = WriterLog::default();
                    let mut n = 0u64;
                    while !*stop_rx.borrow() {
                        n += 1;
                        let key = format!("{prefix}/{c}-{n}");
                        let value = format!("v{n}");
                        let mut kv =
                            KvClient::new(channels[(c + n as usize) % channels.len()].clone());
                        match kv
                            .put(pb::PutRequest {
                                key: key.clone().into(),
                                value: value.clone().into(),
                                request_id: uuid::Uuid::new_v4().as_bytes().to_vec(),
                            })
                            .await
                        {
                            Ok(_) => {
                                log.acked.insert(key, value);
                            }
                            Err(s) if s.code() == tonic::Code::Unavailable => log.failed += 1,
                            Err(_) => log.unknown += 1,
                        }
                    }
                    log
                }));
            }
            let mut all = WriterLog::default();
            for t in tasks {
                if let Ok(log) = t.await {
                    all.acked.extend(log.acked);
                    all.failed += log.failed;
                    all.unknown += log.unknown;
                }
            }
            all
        });
        Writer { stop, task }
    }

    /// Stops the writers and returns what they saw.
    pub async fn stop(self) -> WriterLog {
        let _ = self.stop.send(true);
        self.task.await.expect("writer task")
    }
}

/// A TLS verifier for test probes of the peer port: it accepts any server (what is tested is
/// whether the server accepts the probe's client certificate).
#[derive(Debug)]
struct AnyServer(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    coffer_node::handshake_signatures!();
}

impl coffer_node::tls::SignatureAlgorithms for AnyServer {
    fn algorithms(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.0
    }
}

impl Cluster {
    /// Calls `Peer.Info` on node `id`'s peer port presenting `cert_pem` with `key_pem` (PKCS#8
    /// or any PEM key rustls loads): `Ok` if the node answers, else why not.
    pub async fn peer_probe(&self, id: u64, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        self.peer_call(id, cert_pem, key_pem, |mut c| async move {
            c.info(coffer_raft::pb::Payload::default()).await
        })
        .await
        .map(|_| ())
    }

    /// Calls node `id`'s peer service with `call` presenting `cert_pem` with `key_pem`: the
    /// answer's bytes, or why not.
    pub async fn peer_call<F, Fut>(
        &self,
        id: u64,
        cert_pem: &str,
        key_pem: &str,
        call: F,
    ) -> Result<Vec<u8>, String>
    where
        F: FnOnce(coffer_raft::pb::peer_client::PeerClient<tonic::transport::Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<coffer_raft::pb::Payload>, tonic::Status>>,
    {
        let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(|e| e.to_string())?
            .ok_or("no key")?;
        let provider = rustls::crypto::ring::default_provider();
        let verifier = Arc::new(AnyServer(provider.signature_verification_algorithms));
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(certs, key)
            .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let pool = coffer_raft::PeerPool::new(Arc::new(config), Duration::from_secs(3), None);
        let client = pool.client(&self.nodes[&id].peer.to_string())?;
        match tokio::time::timeout(Duration::from_secs(10), call(client)).await {
            Ok(Ok(answer)) => Ok(answer.into_inner().data),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err("no answer within 10 s".into()),
        }
    }

    /// Node `id`'s node certificate and key (PEM), from its data directory.
    pub fn node_certificate(&self, id: u64) -> (String, String) {
        let dir = self.nodes[&id].data_dir.join("node-tls");
        let cert = std::fs::read_to_string(dir.join("node-cert.pem")).expect("node certificate");
        let key = coffer_node::keys::KeyPair::load(&dir.join("node.key")).expect("node key");
        (cert, key.signing_key_pkcs8_pem().to_string())
    }

    /// Node `id`'s certificate from the operator's bootstrap CA (`coffer certs`) and its key.
    pub fn bootstrap_certificate(&self, id: u64) -> (String, String) {
        let tls = self.dir.path().join("tls");
        (
            std::fs::read_to_string(tls.join(format!("node-{id}.pem"))).expect("certificate"),
            std::fs::read_to_string(tls.join(format!("node-{id}-key.pem"))).expect("key"),
        )
    }

    /// Issues a bootstrap-CA certificate for node `id` (which need not exist).
    pub fn issue_bootstrap_certificate(&self, id: u64) -> (String, String) {
        must_issue_certs(&self.dir.path().join("tls"), id..=id);
        self.bootstrap_certificate(id)
    }
}
