//! The `coffer` command line.
//!
//! Exit codes: 0 success, 1 error (printed once on stderr with what to do), 2 usage error,
//! 3 a server that stopped because its storage or Raft failed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use coffer_api::v1 as pb;
use coffer_api::v1::cluster_client::ClusterClient;
use coffer_client::paging::all_pages;

use crate::bench::{self, BenchArgs, BenchCommand};
use crate::cli_secrets::{KvCommand, SecretsCommand, WrapArgs};
use crate::client::Target;
use crate::config::ServerArgs;

/// Coffer: a distributed secrets manager.
#[derive(Debug, Parser)]
#[command(name = "coffer", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Client options shared by every command that talks to a cluster.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// API address(es) of any node(s), `host:port`, comma-separated; the first that answers is used.
    #[arg(long, env = "COFFER_ADDR", value_delimiter = ',', global = true)]
    pub addr: Vec<String>,
    /// The cluster CA certificate (PEM) to verify the server with.
    #[arg(long, env = "COFFER_CACERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Output format.
    #[arg(
        long,
        value_enum,
        default_value = "table",
        env = "COFFER_FORMAT",
        global = true
    )]
    pub format: Format,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 10.0, global = true)]
    pub timeout: f64,
    /// Your identity's private key: commands that need a session log in with it when the
    /// stored session (from `coffer login`) is missing, ended, or for another key or cluster.
    #[arg(long, env = "COFFER_KEY", global = true)]
    pub identity_key: Option<PathBuf>,
}

impl ClientArgs {
    pub(crate) fn target(&self) -> Result<Target> {
        Target::new(
            &self.addr,
            self.ca_cert.as_deref(),
            Duration::from_secs_f64(self.timeout.max(0.1)),
        )
    }

    /// The target with a session: the stored one when it fits, else a new login with the
    /// identity key (stored for the next command), else none (the server then says to log in).
    pub(crate) async fn session_target(&self) -> Result<Target> {
        let mut target = self.target()?;
        let stored = crate::client::StoredSession::path().and_then(|p| {
            crate::client::StoredSession::load(&p)
                .map_err(|e| tracing::debug!(error = %e, "no usable stored session"))
                .ok()
        });
        let key = match &self.identity_key {
            Some(path) => Some(crate::keys::KeyPair::load(path)?.public().fingerprint()),
            None => None,
        };
        if let Some(session) = stored.and_then(|s| s.fits(&target, key.as_deref())) {
            target.session = Some(session);
            return Ok(target);
        }
        if let (Some(path), Some(owner)) = (&self.identity_key, &key) {
            let session = target.login(path, 0).await?.clone();
            crate::client::StoredSession::save_best_effort(&target, &session, owner);
        }
        Ok(target)
    }
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    Table,
    /// JSON for programs.
    Json,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs one node (config file, flags or COFFER_* environment variables).
    Server(Box<ServerArgs>),
    /// Runs a transient in-memory cluster on localhost (TLS on, nothing persisted).
    Dev {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Directory for the generated certificates and the `env` file to source.
        #[arg(long, default_value = "/tmp/coffer")]
        dir: PathBuf,
    },
    /// Generates a cluster CA and node certificates into a directory.
    Certs {
        /// Output directory (ca.pem, node-ID.pem, node-ID-key.pem).
        #[arg(long)]
        dir: PathBuf,
        /// A node as `ID` or `ID=HOST[,HOST...]` (DNS names or IPs besides localhost/127.0.0.1).
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
    },
    /// Generates a key pair (Ed25519 to sign, X25519 to receive encrypted data): OUT.key
    /// (private, mode 0600) and OUT.pub (share it). One format for operators, administrators
    /// and clients.
    Keygen(KeygenArgs),
    /// Operator commands (key ceremony).
    Operator {
        /// Which operation.
        #[command(subcommand)]
        op: OperatorCommand,
    },
    /// Path policies in Vault's HCL syntax (stored inside the barrier; every request is
    /// checked against its session's policies).
    Policy {
        /// Which operation.
        #[command(subcommand)]
        op: PolicyCommand,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Logs in with an identity key (Private Key Challenge): proves you hold the key without
    /// sending any secret, creates a session and stores its certificate and key (0600) in
    /// `~/.coffer/session.json` (or COFFER_SESSION_FILE) for the next commands.
    Login {
        /// Your identity's private key file.
        #[arg(long, env = "COFFER_KEY")]
        key: Option<PathBuf>,
        /// Log in with this pod's Kubernetes service-account token for this role instead.
        #[arg(long)]
        kubernetes_role: Option<String>,
        /// The projected service-account token (for --kubernetes-role).
        #[arg(long, default_value = crate::kubernetes::DEFAULT_TOKEN_FILE)]
        token_file: PathBuf,
        /// Session lifetime in seconds (0: the default, 3600; at most 86400).
        #[arg(long, default_value_t = 0)]
        ttl_seconds: u64,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delegation: grant another identity a capability you hold, until a time.
    Grant {
        /// Which operation.
        #[command(subcommand)]
        op: GrantCommand,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Authentication methods besides keys: Kubernetes roles.
    Auth {
        /// Which method.
        #[command(subcommand)]
        method: AuthCommand,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cluster-wide settings (session lifetimes).
    Settings {
        /// Which operation.
        #[command(subcommand)]
        op: SettingsCommand,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Sessions: list them, or end one at once.
    Session {
        /// Which operation.
        #[command(subcommand)]
        op: SessionCommand,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Identities: a name, a public key and policies (stored inside the barrier); an identity
    /// logs in with its private key.
    Identity {
        /// Which operation.
        #[command(subcommand)]
        op: IdentityCommand,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Versioned secrets in the kv engine; paths start with the mount (`secret/app/db`).
    Kv {
        /// Which operation.
        #[command(subcommand)]
        op: KvCommand,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Secrets engine mounts: enable, disable, list.
    Secrets {
        /// Which operation.
        #[command(subcommand)]
        op: SecretsCommand,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Encrypts data here to a recipient's public key and stores only the ciphertext, readable
    /// once by that recipient until it expires; prints the wrap id to give them.
    Wrap {
        /// What to wrap, for whom.
        #[command(flatten)]
        wrap: WrapArgs,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Reads wrapped data once (it is gone afterwards) and decrypts it with your identity key;
    /// prints it raw.
    Unwrap {
        /// The wrap id (`w_...`).
        id: String,
        /// Write the data to this file (mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Shows every member's view: role, term, leader, log positions.
    Status {
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Changes the membership.
    Cluster {
        /// Which change.
        #[command(subcommand)]
        op: ClusterCommand,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Drives load against a Coffer cluster (or, with --target etcd, an etcd cluster) and
    /// prints throughput and latency; `coffer bench fsync` measures the disk instead.
    Bench {
        /// A measurement that is not load against a cluster.
        #[command(subcommand)]
        command: Option<BenchCommand>,
        /// Bench options.
        #[command(flatten)]
        bench: BenchArgs,
        /// Connection options (every --addr given is driven).
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `coffer keygen` options.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Output path without extension: writes OUT.key and OUT.pub (never overwrites).
    #[arg(long)]
    pub out: PathBuf,
    /// A comment for the public key line (e.g. who owns it).
    #[arg(long, default_value = "")]
    pub comment: String,
}

/// `coffer operator` operations.
#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Same as `coffer keygen`.
    Keygen(KeygenArgs),
    /// Initializes a running, uninitialized cluster: master key, keyring, a threshold key set
    /// for the operators; writes one share file per operator, encrypted to that operator's key.
    /// No token of any kind is created.
    Init {
        /// An operator's public key file (`coffer keygen` writes NAME.pub); once per operator.
        #[arg(long = "operator-key", required = true)]
        operator_keys: Vec<PathBuf>,
        /// Operators needed to unseal.
        #[arg(long)]
        threshold: u32,
        /// The first administrator's public key file.
        #[arg(long)]
        admin_key: PathBuf,
        /// Where to write the share files (NAME.share per operator key NAME.pub).
        #[arg(long, default_value = ".")]
        share_dir: PathBuf,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Turns peer unseal on or off for the cluster (signed with your operator key). With it on,
    /// an unsealed member unseals a restarted one over the node-to-node channel, so rolling
    /// restarts need no ceremony; the trade-off is in docs/operations/unseal.md. Off by default.
    PeerUnseal {
        /// on or off.
        #[arg(value_parser = ["on", "off"])]
        setting: String,
        /// Your operator private key file.
        #[arg(long, env = "COFFER_OPERATOR_KEY")]
        key: PathBuf,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Replaces the operators and threshold (e.g. 5 operators, 3 needed). T current operators
    /// each run it with the same new keys and threshold, all against the same node; each signs
    /// a decryption share made from their share file. The run that completes it writes the new
    /// share files; the old ones stop working. The master key and the data do not change.
    Rekey {
        /// Your (current) operator private key file.
        #[arg(long, env = "COFFER_OPERATOR_KEY")]
        key: PathBuf,
        /// Your current share file.
        #[arg(long)]
        share: PathBuf,
        /// A new operator's public key file; once per new operator.
        #[arg(long = "new-operator-key", required = true)]
        new_operator_keys: Vec<PathBuf>,
        /// New operators needed to unseal.
        #[arg(long)]
        new_threshold: u32,
        /// Where the completing run writes the new share files (NAME.share per NAME.pub).
        #[arg(long, default_value = ".")]
        share_dir: PathBuf,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Seals every node: each drops the master key and the keyring as it applies the seal, and
    /// serves no data until the next unseal ceremony. Signed with your operator key; without
    /// one, an administrator's emergency seal with your session (needs `sudo` on sys/seal).
    Seal {
        /// Your operator private key file.
        #[arg(long, env = "COFFER_OPERATOR_KEY")]
        key: Option<PathBuf>,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Adds a new data key to the keyring (signed with your operator key; on an unsealed node).
    /// New writes use it at once; values written under older keys stay readable. No downtime.
    Rotate {
        /// Your operator private key file.
        #[arg(long, env = "COFFER_OPERATOR_KEY")]
        key: PathBuf,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Backups: save the cluster's data (encrypted, as stored) to a file, check a file, or
    /// restore one into a new cluster (docs/operations/backup-and-restore.md).
    Snapshot {
        /// What to do.
        #[command(subcommand)]
        op: SnapshotCommand,
    },
    /// Takes part in the unseal ceremony: decrypts your share with your key, computes a
    /// decryption share here, signs it and sends only that (to any node; it reaches them all).
    Unseal {
        /// Your operator private key file.
        #[arg(long, env = "COFFER_OPERATOR_KEY")]
        key: PathBuf,
        /// Your share file (from `coffer operator init`).
        #[arg(long)]
        share: PathBuf,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `coffer operator snapshot` operations.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Saves a consistent backup of every record (read after a read index, values encrypted as
    /// stored) with the seal configuration, to FILE (written to FILE.tmp, fsynced, renamed; an
    /// existing FILE is never overwritten). Needs a session with `read` on
    /// sys/storage/raft/snapshot (COFFER_KEY).
    Save {
        /// The backup file to write.
        file: PathBuf,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Checks a backup file here, without a cluster: format, checksum and records; prints what
    /// it holds and which operators can unseal it.
    Inspect {
        /// The backup file.
        file: PathBuf,
    },
    /// Restores a backup file into a running cluster that was never initialized (refused
    /// otherwise), signed with the key of one of the backup's operators. The cluster ends
    /// sealed: the backup's operators unseal it with their share files.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// Your operator private key file (an operator of the backup).
        #[arg(long, env = "COFFER_OPERATOR_KEY")]
        key: PathBuf,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `coffer policy` operations.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Creates or replaces a policy from a file (`-` for standard input). A policy that does
    /// not parse is refused with its line and column; nothing is stored.
    Write {
        /// The policy's name (lowercase letters, digits, `-`, `_`).
        name: String,
        /// The HCL file, or `-`.
        file: PathBuf,
    },
    /// Prints a policy.
    Read {
        /// The policy's name.
        name: String,
    },
    /// Lists the policies' names.
    List,
    /// Deletes a policy.
    Delete {
        /// The policy's name.
        name: String,
    },
}

/// `coffer grant` operations.
#[derive(Debug, Subcommand)]
pub enum GrantCommand {
    /// Grants another identity a capability you hold (with `delegate`) on a path, for a while.
    Create {
        /// The identity that receives it.
        #[arg(long = "to")]
        grantee: String,
        /// One path, or a prefix ending in `*`.
        #[arg(long)]
        path: String,
        /// read, create, update, patch, delete or list; repeat for more.
        #[arg(long = "capability", required = true)]
        capabilities: Vec<String>,
        /// How long it lasts, in seconds (at most 30 days).
        #[arg(long)]
        ttl_seconds: u64,
    },
    /// Lists the grants you made or hold (all of them with `list` on sys/grants).
    List,
    /// Ends a grant at once.
    Revoke {
        /// The grant id (from `coffer grant list`).
        id: String,
    },
}

/// `coffer auth` methods.
#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Kubernetes service-account login.
    Kubernetes {
        /// Which operation.
        #[command(subcommand)]
        op: KubernetesCommand,
    },
}

/// `coffer auth kubernetes` operations.
#[derive(Debug, Subcommand)]
pub enum KubernetesCommand {
    /// Roles: which service accounts may log in, with which policies.
    Role {
        /// Which operation.
        #[command(subcommand)]
        op: RoleCommand,
    },
}

/// `coffer auth kubernetes role` operations.
#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// Creates or replaces a role.
    Write {
        /// The role's name.
        name: String,
        /// A service account name that may log in (`*`: any); repeat for more.
        #[arg(long = "bound-service-account", required = true)]
        service_accounts: Vec<String>,
        /// A namespace it may be in (`*`: any); repeat for more.
        #[arg(long = "bound-namespace", required = true)]
        namespaces: Vec<String>,
        /// The audience the pods' projected tokens are issued for.
        #[arg(long)]
        audience: String,
        /// A policy its sessions hold; repeat for more.
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// The longest session, seconds (0: the cluster's maximum).
        #[arg(long, default_value_t = 0)]
        max_session_ttl_seconds: u64,
    },
    /// Shows a role.
    Read {
        /// The role's name.
        name: String,
    },
    /// Lists the roles' names.
    List,
    /// Deletes a role (its sessions end).
    Delete {
        /// The role's name.
        name: String,
    },
}

/// `coffer settings` operations.
#[derive(Debug, Subcommand)]
pub enum SettingsCommand {
    /// Shows the cluster's settings.
    Read,
    /// Sets the session lifetimes for identities that set none of their own.
    Write {
        /// Default session lifetime, seconds (0: the built-in 3600).
        #[arg(long, default_value_t = 0)]
        default_session_ttl_seconds: u64,
        /// Maximum session lifetime, seconds (0: the built-in 86400; at most 604800).
        #[arg(long, default_value_t = 0)]
        max_session_ttl_seconds: u64,
    },
}

/// `coffer session` operations.
#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Lists the sessions that have not ended, by identity.
    List {
        /// Only this identity's sessions.
        #[arg(long)]
        identity: Option<String>,
    },
    /// Ends a session at once, on every node (without an id: your own, i.e. log out).
    Revoke {
        /// The session id (from `coffer session list`).
        session_id: Option<String>,
    },
}

/// `coffer identity` operations.
#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Registers an identity with its public key (a .pub file from `coffer keygen`).
    Create {
        /// The identity's name (lowercase letters, digits, `-`, `_`).
        name: String,
        /// Its public key file.
        #[arg(long)]
        public_key: PathBuf,
        /// A policy it holds; repeat for more.
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// Its own default session lifetime, seconds (default: the cluster's).
        #[arg(long)]
        default_session_ttl_seconds: Option<u64>,
        /// Its own maximum session lifetime, seconds (never above the cluster's).
        #[arg(long)]
        max_session_ttl_seconds: Option<u64>,
    },
    /// Shows an identity.
    Read {
        /// The identity's name.
        name: String,
    },
    /// Lists the identities' names.
    List,
    /// Replaces an identity's policies (and changes its session lifetimes when given).
    Update {
        /// The identity's name.
        name: String,
        /// A policy it holds from now on; repeat for more (none: no policy).
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// Its own default session lifetime, seconds (0: the cluster's).
        #[arg(long)]
        default_session_ttl_seconds: Option<u64>,
        /// Its own maximum session lifetime, seconds (0: the cluster's).
        #[arg(long)]
        max_session_ttl_seconds: Option<u64>,
    },
    /// Deletes an identity.
    Delete {
        /// The identity's name.
        name: String,
    },
}

/// `coffer cluster` operations.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Registers the node key a new node joins with (`coffer keygen --out FILE` on the node,
    /// then `coffer server --join ADDR --node-key FILE ...` there).
    RegisterNode {
        /// New, never used node id.
        #[arg(long)]
        id: u64,
        /// The node key's public half (`FILE.pub` from `coffer keygen`).
        #[arg(long)]
        public_key: std::path::PathBuf,
    },
    /// Adds a node that holds a node certificate (it joined before) as a learner again; a new
    /// node adds itself when it joins.
    AddLearner {
        /// The id of a node that joined before (it holds a node certificate); members are
        /// refused.
        #[arg(long)]
        id: u64,
        /// Its API address.
        #[arg(long)]
        api_addr: String,
        /// Its peer address.
        #[arg(long)]
        peer_addr: String,
    },
    /// Promotes a learner to voter.
    Promote {
        /// The learner's id.
        id: u64,
    },
    /// Removes a voter or learner.
    Remove {
        /// The node's id.
        id: u64,
    },
    /// Snapshots the contacted node now and compacts its log.
    Snapshot,
}

pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

pub(crate) fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// Prints names one per line, or as a JSON array.
pub(crate) fn print_names(names: &[String], json: bool) {
    if json {
        println!("{}", serde_json::json!(names));
    } else {
        for n in names {
            println!("{n}");
        }
    }
}

async fn policy_command(op: PolicyCommand, client: &ClientArgs) -> Result<()> {
    use coffer_api::v1::policies_client::PoliciesClient;
    let target = client.session_target().await?;
    let mut policies = PoliciesClient::new(target.connect().await?);
    let json = client.format == Format::Json;
    match op {
        PolicyCommand::Write { name, file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            let r = policies
                .write(pb::PolicyWriteRequest {
                    name: name.clone(),
                    text,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({"name": name, "revision": r.revision, "warnings": r.warnings})
                );
            } else {
                println!("policy {name} written");
            }
        }
        PolicyCommand::Read { name } => {
            let r = policies
                .read(pb::PolicyReadRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"name": r.name, "text": r.text, "mod_revision": r.mod_revision})
                );
            } else {
                print!("{}", r.text);
                if !r.text.ends_with('\n') {
                    println!();
                }
            }
        }
        PolicyCommand::List => {
            let names = all_pages(
                |start_after| {
                    let mut c = policies.clone();
                    async move {
                        let r = c
                            .list(pb::PolicyListRequest {
                                start_after,
                                limit: 0,
                            })
                            .await?
                            .into_inner();
                        Ok((r.names, r.more))
                    }
                },
                String::clone,
            )
            .await
            .map_err(status_error)?;
            print_names(&names, json);
        }
        PolicyCommand::Delete { name } => {
            let r = policies
                .delete(pb::PolicyDeleteRequest { name: name.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            if !r.deleted {
                bail!("no policy {name:?}; nothing deleted");
            }
            println!("policy {name} deleted");
        }
    }
    Ok(())
}

fn print_identity(r: &pb::IdentityResponse, json: bool) {
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"name": r.name, "fingerprint": r.fingerprint, "policies": r.policies,
                "mod_revision": r.mod_revision,
                "default_session_ttl_seconds": r.default_session_ttl_seconds,
                "max_session_ttl_seconds": r.max_session_ttl_seconds})
        );
    } else {
        let ttl = |v: u64| {
            if v == 0 {
                "cluster's".to_string()
            } else {
                format!("{v} s")
            }
        };
        println!(
            "{}  {}  policies: {}  session ttl: default {}, max {}",
            r.name,
            r.fingerprint,
            if r.policies.is_empty() {
                "(none)".to_string()
            } else {
                r.policies.join(", ")
            },
            ttl(r.default_session_ttl_seconds),
            ttl(r.max_session_ttl_seconds)
        );
    }
}

async fn grant_command(op: GrantCommand, client: &ClientArgs) -> Result<()> {
    use coffer_api::v1::grants_client::GrantsClient;
    let target = client.session_target().await?;
    let mut grants = GrantsClient::new(target.connect().await?);
    let json = client.format == Format::Json;
    let list = match op {
        GrantCommand::Create {
            grantee,
            path,
            capabilities,
            ttl_seconds,
        } => vec![
            grants
                .create(pb::GrantCreateRequest {
                    grantee,
                    path,
                    capabilities,
                    ttl_seconds,
                })
                .await
                .map_err(status_error)?
                .into_inner(),
        ],
        GrantCommand::List => all_pages(
            |start_after| {
                let mut c = grants.clone();
                async move {
                    let r = c
                        .list(pb::GrantListRequest {
                            start_after,
                            limit: 0,
                        })
                        .await?
                        .into_inner();
                    Ok((r.grants, r.more))
                }
            },
            |g: &pb::GrantInfo| g.id.clone(),
        )
        .await
        .map_err(status_error)?,
        GrantCommand::Revoke { id } => {
            let r = grants
                .revoke(pb::GrantRevokeRequest { id: id.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            if r.revoked {
                println!("grant {id} revoked");
            } else {
                println!("no grant {id} (it ended or was revoked already)");
            }
            return Ok(());
        }
    };
    if json {
        let items: Vec<_> = list
            .iter()
            .map(|g| {
                serde_json::json!({"id": g.id, "grantor": g.grantor, "grantee": g.grantee,
                    "path": g.path, "capabilities": g.capabilities, "expires_at_ms": g.expires_at_ms})
            })
            .collect();
        println!("{}", serde_json::Value::from(items));
    } else {
        let now = crate::auth::now_ms();
        let mut rows = vec![vec![
            "GRANT".to_string(),
            "FROM".into(),
            "TO".into(),
            "PATH".into(),
            "CAPABILITIES".into(),
            "ENDS IN".into(),
        ]];
        for g in &list {
            rows.push(vec![
                g.id.clone(),
                g.grantor.clone(),
                g.grantee.clone(),
                g.path.clone(),
                g.capabilities.join(","),
                format!("{} s", g.expires_at_ms.saturating_sub(now) / 1000),
            ]);
        }
        print_table(&rows);
    }
    Ok(())
}

async fn auth_command(method: AuthCommand, client: &ClientArgs) -> Result<()> {
    use coffer_api::v1::kubernetes_roles_client::KubernetesRolesClient;
    let AuthCommand::Kubernetes {
        op: KubernetesCommand::Role { op },
    } = method;
    let target = client.session_target().await?;
    let mut roles = KubernetesRolesClient::new(target.connect().await?);
    let json = client.format == Format::Json;
    let role = match op {
        RoleCommand::Write {
            name,
            service_accounts,
            namespaces,
            audience,
            policies,
            max_session_ttl_seconds,
        } => roles
            .write(pb::KubernetesRole {
                name,
                bound_service_accounts: service_accounts,
                bound_namespaces: namespaces,
                audience,
                policies,
                max_session_ttl_seconds,
                warnings: Vec::new(),
            })
            .await
            .map_err(status_error)?
            .into_inner(),
        RoleCommand::Read { name } => roles
            .read(pb::KubernetesRoleName { name })
            .await
            .map_err(status_error)?
            .into_inner(),
        RoleCommand::List => {
            let names = all_pages(
                |start_after| {
                    let mut c = roles.clone();
                    async move {
                        let r = c
                            .list(pb::KubernetesRoleListRequest {
                                start_after,
                                limit: 0,
                            })
                            .await?
                            .into_inner();
                        Ok((r.names, r.more))
                    }
                },
                String::clone,
            )
            .await
            .map_err(status_error)?;
            print_names(&names, json);
            return Ok(());
        }
        RoleCommand::Delete { name } => {
            let r = roles
                .delete(pb::KubernetesRoleName { name: name.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            if r.deleted {
                println!("role {name} deleted; its sessions ended");
            } else {
                println!("no role {name}: nothing deleted");
            }
            return Ok(());
        }
    };
    for w in &role.warnings {
        eprintln!("warning: {w}");
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"name": role.name, "bound_service_accounts": role.bound_service_accounts,
                "bound_namespaces": role.bound_namespaces, "audience": role.audience,
                "policies": role.policies, "max_session_ttl_seconds": role.max_session_ttl_seconds})
        );
    } else {
        println!(
            "{}  service accounts: {}  namespaces: {}  audience: {}  policies: {}  max ttl: {}",
            role.name,
            role.bound_service_accounts.join(", "),
            role.bound_namespaces.join(", "),
            role.audience,
            role.policies.join(", "),
            if role.max_session_ttl_seconds == 0 {
                "cluster's".to_string()
            } else {
                format!("{} s", role.max_session_ttl_seconds)
            }
        );
    }
    Ok(())
}

async fn settings_command(op: SettingsCommand, client: &ClientArgs) -> Result<()> {
    use coffer_api::v1::settings_client::SettingsClient;
    let target = client.session_target().await?;
    let mut settings = SettingsClient::new(target.connect().await?);
    let r = match op {
        SettingsCommand::Read => settings.read(pb::SettingsReadRequest {}).await,
        SettingsCommand::Write {
            default_session_ttl_seconds,
            max_session_ttl_seconds,
        } => {
            settings
                .write(pb::SettingsWriteRequest {
                    default_session_ttl_seconds,
                    max_session_ttl_seconds,
                })
                .await
        }
    }
    .map_err(status_error)?
    .into_inner();
    if client.format == Format::Json {
        println!(
            "{}",
            serde_json::json!({"default_session_ttl_seconds": r.default_session_ttl_seconds,
                "max_session_ttl_seconds": r.max_session_ttl_seconds, "mod_revision": r.mod_revision})
        );
    } else {
        println!(
            "session ttl: default {} s, max {} s",
            r.default_session_ttl_seconds, r.max_session_ttl_seconds
        );
    }
    Ok(())
}

async fn session_command(op: SessionCommand, client: &ClientArgs) -> Result<()> {
    use coffer_api::v1::sessions_client::SessionsClient;
    let target = client.session_target().await?;
    let mut sessions = SessionsClient::new(target.connect().await?);
    let json = client.format == Format::Json;
    match op {
        SessionCommand::List { identity } => {
            let identity = identity.unwrap_or_default();
            let mut all = all_pages(
                |start_after| {
                    let mut c = sessions.clone();
                    let identity = identity.clone();
                    async move {
                        let r = c
                            .list(pb::SessionListRequest {
                                identity,
                                start_after,
                                limit: 0,
                            })
                            .await?
                            .into_inner();
                        Ok((r.sessions, r.more))
                    }
                },
                |s: &pb::SessionInfo| s.session_id.clone(),
            )
            .await
            .map_err(status_error)?;
            // Pages come in session id order; people read them by identity and age.
            all.sort_by(|a, b| (&a.identity, a.created_at_ms).cmp(&(&b.identity, b.created_at_ms)));
            let r = pb::SessionListResponse {
                sessions: all,
                more: false,
            };
            if json {
                let list: Vec<_> = r
                    .sessions
                    .iter()
                    .map(|s| {
                        serde_json::json!({"session_id": s.session_id, "identity": s.identity,
                            "created_at_ms": s.created_at_ms, "expires_at_ms": s.expires_at_ms})
                    })
                    .collect();
                println!("{}", serde_json::Value::from(list));
            } else {
                let now = crate::auth::now_ms();
                let mut rows = vec![vec![
                    "SESSION".to_string(),
                    "IDENTITY".into(),
                    "ENDS IN".into(),
                ]];
                for s in &r.sessions {
                    rows.push(vec![
                        s.session_id.clone(),
                        s.identity.clone(),
                        format!("{} s", s.expires_at_ms.saturating_sub(now) / 1000),
                    ]);
                }
                print_table(&rows);
            }
        }
        SessionCommand::Revoke { session_id } => {
            let r = sessions
                .revoke(pb::SessionRevokeRequest {
                    session_id: session_id.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!("{}", serde_json::json!({"revoked": r.revoked}));
            } else if r.revoked {
                println!("revoked");
            } else {
                println!("no such session (it ended or was revoked already)");
            }
        }
    }
    Ok(())
}

async fn identity_command(op: IdentityCommand, client: &ClientArgs) -> Result<()> {
    use coffer_api::v1::identities_client::IdentitiesClient;
    let target = client.session_target().await?;
    let mut ids = IdentitiesClient::new(target.connect().await?);
    let json = client.format == Format::Json;
    match op {
        IdentityCommand::Create {
            name,
            public_key,
            policies,
            default_session_ttl_seconds,
            max_session_ttl_seconds,
        } => {
            let key = crate::keys::PublicKey::load(&public_key)?;
            let r = ids
                .create(pb::IdentityCreateRequest {
                    name,
                    public_key: key.to_bytes().to_vec(),
                    policies,
                    default_session_ttl_seconds,
                    max_session_ttl_seconds,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_identity(&r, json);
        }
        IdentityCommand::Read { name } => {
            let r = ids
                .read(pb::IdentityReadRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            print_identity(&r, json);
        }
        IdentityCommand::List => {
            let names = all_pages(
                |start_after| {
                    let mut c = ids.clone();
                    async move {
                        let r = c
                            .list(pb::IdentityListRequest {
                                start_after,
                                limit: 0,
                            })
                            .await?
                            .into_inner();
                        Ok((r.names, r.more))
                    }
                },
                String::clone,
            )
            .await
            .map_err(status_error)?;
            print_names(&names, json);
        }
        IdentityCommand::Update {
            name,
            policies,
            default_session_ttl_seconds,
            max_session_ttl_seconds,
        } => {
            let r = ids
                .update(pb::IdentityUpdateRequest {
                    name,
                    policies,
                    default_session_ttl_seconds,
                    max_session_ttl_seconds,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_identity(&r, json);
        }
        IdentityCommand::Delete { name } => {
            let r = ids
                .delete(pb::IdentityDeleteRequest { name: name.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            if !r.deleted {
                bail!("no identity {name:?}; nothing deleted");
            }
            println!("identity {name} deleted");
        }
    }
    Ok(())
}

async fn status_command(client: &ClientArgs) -> Result<()> {
    let target = client.target()?;
    let mut first = target.cluster().await?;
    let view = first
        .status(pb::StatusRequest { digest: false })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut rows = vec![
        vec![
            "NODE", "API", "ROLE", "STATE", "TERM", "LEADER", "LAST LOG", "COMMIT", "APPLIED",
            "SNAPSHOT", "REVISION", "SEAL", "HEALTH",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>(),
    ];
    let mut json_nodes = Vec::new();
    let mut members = view.members.clone();
    members.sort_by_key(|m| m.id);
    let mut answers = Vec::new();
    for m in &members {
        let answer = async {
            let mut c = ClusterClient::new(target.channel_to(&m.api_addr)?);
            let digest = client.format == Format::Json;
            anyhow::Ok(c.status(pb::StatusRequest { digest }).await?.into_inner())
        }
        .await;
        answers.push((m, answer));
    }
    // Member health is the leader's view: when each member last answered it, how far behind.
    let leader_view = answers.iter().find_map(|(_, a)| {
        a.as_ref()
            .ok()
            .filter(|s| s.leader_id == s.node_id && s.fatal.is_empty())
    });
    for (m, answer) in answers.iter() {
        let role = if m.voter { "voter" } else { "learner" };
        let health = member_health(m.id, leader_view);
        match answer {
            Ok(s) => {
                rows.push(vec![
                    m.id.to_string(),
                    m.api_addr.clone(),
                    role.into(),
                    if s.fatal.is_empty() {
                        s.state.clone()
                    } else {
                        format!("FAILED: {}", s.fatal)
                    },
                    s.term.to_string(),
                    s.leader_id.to_string(),
                    s.last_log_index.to_string(),
                    s.commit_index.to_string(),
                    s.applied_index.to_string(),
                    s.snapshot_index.to_string(),
                    s.revision.to_string(),
                    s.seal.clone(),
                    health.clone(),
                ]);
                json_nodes.push(serde_json::json!({
                    "id": m.id, "api_addr": m.api_addr, "role": role, "state": s.state,
                    "term": s.term, "leader": s.leader_id, "last_log_index": s.last_log_index,
                    "commit_index": s.commit_index, "applied_index": s.applied_index,
                    "snapshot_index": s.snapshot_index, "revision": s.revision,
                    "digest": format!("{:016x}", s.digest), "fatal": s.fatal,
                    "replication_lag": s.replication_lag, "seal": s.seal,
                    "last_contact_ms": s.last_contact_ms, "health": health,
                }));
            }
            Err(e) => {
                let mut row = vec![
                    m.id.to_string(),
                    m.api_addr.clone(),
                    role.into(),
                    format!("unreachable: {e}"),
                ];
                row.resize(12, String::new());
                row.push(health.clone());
                rows.push(row);
                json_nodes.push(serde_json::json!({"id": m.id, "api_addr": m.api_addr, "role": role, "error": e.to_string(), "health": health}));
            }
        }
    }
    if client.format == Format::Json {
        println!(
            "{}",
            serde_json::json!({"cluster": view.cluster_id, "leader": view.leader_id, "nodes": json_nodes})
        );
    } else {
        println!("cluster {}  leader {}", view.cluster_id, view.leader_id);
        print_table(&rows);
    }
    Ok(())
}

/// Member `id`'s health as the leader sees it (`leader`: the leader's status answer).
fn member_health(id: u64, leader: Option<&pb::StatusResponse>) -> String {
    let Some(l) = leader else {
        return "unknown: no leader answered".into();
    };
    if id == l.node_id {
        return "leader".into();
    }
    let lag = l.replication_lag.get(&id).copied().unwrap_or(0);
    match l.last_contact_ms.get(&id) {
        None => "no contact since this leader was elected".into(),
        Some(ms) if *ms >= MEMBER_SILENT_MS => {
            format!("no contact for {:.0} s", *ms as f64 / 1000.0)
        }
        Some(_) if lag > crate::metrics::READY_LAG => format!("lagging {lag} entries"),
        Some(ms) => format!("healthy ({ms} ms ago)"),
    }
}

/// A member the leader has not heard from for this long is shown as silent.
const MEMBER_SILENT_MS: u64 = 5_000;

async fn cluster_command(op: ClusterCommand, client: &ClientArgs) -> Result<()> {
    // Membership changes and snapshots may take up to 30 s on the server: wait longer than it.
    let mut client = client.clone();
    client.timeout = client.timeout.max(60.0);
    let target = client.session_target().await?;
    let mut c = target.cluster().await?;
    let index = match op {
        ClusterCommand::RegisterNode { id, public_key } => {
            let key = crate::keys::PublicKey::load(&public_key)?;
            let r = c
                .register_node(pb::RegisterNodeRequest {
                    id,
                    public_key: key.to_bytes().to_vec(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "registered node {id} with key {}: start it with --join and --node-key",
                r.fingerprint
            );
            return Ok(());
        }
        ClusterCommand::AddLearner {
            id,
            api_addr,
            peer_addr,
        } => {
            c.add_learner(pb::AddLearnerRequest {
                id,
                api_addr,
                peer_addr,
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .raft_index
        }
        ClusterCommand::Promote { id } => {
            c.promote(pb::NodeRequest { id })
                .await
                .map_err(status_error)?
                .into_inner()
                .raft_index
        }
        ClusterCommand::Remove { id } => {
            c.remove(pb::NodeRequest { id })
                .await
                .map_err(status_error)?
                .into_inner()
                .raft_index
        }
        ClusterCommand::Snapshot => {
            let s = c
                .snapshot(pb::SnapshotRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            println!("snapshot at index {}", s.snapshot_index);
            return Ok(());
        }
    };
    println!("membership changed at log index {index}");
    Ok(())
}

fn keygen_command(args: KeygenArgs) -> Result<()> {
    let pair = crate::keys::KeyPair::generate()?;
    let (key, public) = pair.save(&args.out, &args.comment)?;
    println!(
        "wrote {} (private, mode 0600: keep it) and {} (public: share it)\nfingerprint {}",
        key.display(),
        public.display(),
        pair.public().fingerprint()
    );
    Ok(())
}

fn certs_command(dir: PathBuf, nodes: Vec<String>) -> Result<()> {
    let mut parsed = Vec::new();
    for n in nodes {
        let (id, hosts) = match n.split_once('=') {
            Some((id, hosts)) => (id, hosts.split(',').map(str::to_string).collect()),
            None => (n.as_str(), Vec::new()),
        };
        let id: u64 = id.parse().ok().filter(|i| *i > 0).with_context(|| {
            format!("--node {n:?}: expected ID or ID=HOST[,HOST...] with ID > 0")
        })?;
        parsed.push((id, hosts));
    }
    crate::tls::generate_cluster_certs(&dir, &parsed)?;
    println!(
        "wrote a cluster CA and {} node certificate(s) to {}",
        parsed.len(),
        dir.display()
    );
    Ok(())
}

/// Exit code of a server that stopped on a fatal error.
pub const EXIT_FATAL: u8 = 3;

async fn server_command(args: ServerArgs) -> Result<u8> {
    let cfg = args.resolve()?;
    let tls = crate::tls::TlsMaterial::load(&cfg.tls)?;
    let transient = cfg.transient_keys.clone().map(|keys| {
        // The member that bootstraps (the lowest initial id, or a lone node) runs the ceremony.
        let bootstraps = cfg
            .initial_members
            .keys()
            .next()
            .is_none_or(|first| *first == cfg.node_id);
        (
            keys,
            bootstraps,
            cfg.member.api_addr.clone(),
            cfg.tls.ca.clone(),
        )
    });
    let node = crate::server::start(cfg, tls).await?;
    if let Some((keys, true, api, ca)) = transient {
        node.wait_leader(std::time::Duration::from_secs(60))
            .await
            .context("the transient cluster elected no leader within 60 s")?;
        crate::dev::initialize(&keys, &[api], &ca).await?;
        println!(
            "transient: initialized and unsealed, in memory, TLS on every connection; operator key {0}/operator.key (share {0}/operator.share, 1 of 1), administrator key {0}/admin.key. The data is gone when the server stops.",
            keys.display()
        );
    }
    let mut fatal = node.fatal.clone();
    let code = tokio::select! {
        r = tokio::signal::ctrl_c() => { r?; 0 }
        _ = terminate() => 0,
        why = async { fatal.wait_for(Option::is_some).await.map(|w| w.clone().unwrap_or_default()) } => {
            eprintln!("error: this node stopped serving: {}", why.unwrap_or_default());
            EXIT_FATAL
        }
    };
    node.stop().await;
    Ok(code)
}

#[cfg(unix)]
async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn terminate() {
    std::future::pending().await
}

/// The whole `coffer` program: parses the command line, installs logging, runs the command.
pub fn main() -> std::process::ExitCode {
    use std::process::ExitCode;
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Server(_) | Command::Dev { .. } => "info,openraft=warn",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // One process-wide crypto provider for rustls (ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs a parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Server(args) => server_command(*args).await,
        Command::Dev { nodes, dir } => crate::dev::run(nodes, &dir).await.map(|()| 0),
        Command::Certs { dir, nodes } => certs_command(dir, nodes).map(|()| 0),
        Command::Keygen(args)
        | Command::Operator {
            op: OperatorCommand::Keygen(args),
        } => keygen_command(args).map(|()| 0),
        Command::Operator { op } => crate::operator::run(op).await.map(|()| 0),
        Command::Kv { op, client } => crate::cli_secrets::kv_command(op, &client)
            .await
            .map(|()| 0),
        Command::Secrets { op, client } => crate::cli_secrets::secrets_command(op, &client)
            .await
            .map(|()| 0),
        Command::Wrap { wrap, client } => crate::cli_secrets::wrap_command(wrap, &client)
            .await
            .map(|()| 0),
        Command::Unwrap { id, out, client } => crate::cli_secrets::unwrap_command(id, out, &client)
            .await
            .map(|()| 0),
        Command::Policy { op, client } => policy_command(op, &client).await.map(|()| 0),
        Command::Identity { op, client } => identity_command(op, &client).await.map(|()| 0),
        Command::Session { op, client } => session_command(op, &client).await.map(|()| 0),
        Command::Settings { op, client } => settings_command(op, &client).await.map(|()| 0),
        Command::Auth { method, client } => auth_command(method, &client).await.map(|()| 0),
        Command::Grant { op, client } => grant_command(op, &client).await.map(|()| 0),
        Command::Login {
            key,
            kubernetes_role,
            token_file,
            ttl_seconds,
            client,
        } => {
            let mut target = client.target()?;
            let (session, owner) = match (kubernetes_role, key) {
                (Some(role), _) => {
                    let token = std::fs::read_to_string(&token_file).with_context(|| {
                        format!(
                            "cannot read the service-account token {}",
                            token_file.display()
                        )
                    })?;
                    let session =
                        crate::auth::kubernetes_login(&target, &role, token.trim(), ttl_seconds)
                            .await?;
                    (session, format!("kubernetes:{role}"))
                }
                (None, Some(key)) => {
                    let session = crate::auth::login(&target, &key, ttl_seconds).await?;
                    let owner = crate::keys::KeyPair::load(&key)?.public().fingerprint();
                    (session, owner)
                }
                (None, None) => anyhow::bail!(
                    "give --key FILE (or COFFER_KEY), or --kubernetes-role ROLE in a pod"
                ),
            };
            target.session = Some(session.clone());
            let saved = crate::client::StoredSession::save(&target, &session, &owner)?;
            let r = session.login;
            if client.format == Format::Json {
                println!(
                    "{}",
                    serde_json::json!({"identity": r.identity, "session_id": r.session_id, "expires_at_ms": r.expires_at_ms})
                );
            } else {
                let left = r.expires_at_ms.saturating_sub(crate::auth::now_ms()) / 1000;
                println!(
                    "logged in as {} for {left} s (session {}); the session is stored in {}",
                    r.identity,
                    r.session_id,
                    saved.display()
                );
            }
            Ok(0)
        }
        Command::Status { client } => status_command(&client).await.map(|()| 0),
        Command::Cluster { op, client } => cluster_command(op, &client).await.map(|()| 0),
        Command::Bench {
            command: Some(BenchCommand::Fsync(args)),
            client,
            ..
        } => {
            let json = args.json || client.format == Format::Json;
            let report = tokio::task::spawn_blocking(move || bench::fsync::measure(&args))
                .await
                .context("fsync bench")??;
            bench::fsync::print(&report, json)?;
            Ok(0)
        }
        Command::Bench {
            command: None,
            bench,
            client,
        } => {
            let target = match bench.target {
                bench::BenchSystem::Coffer => {
                    bench::BenchTarget::Coffer(client.session_target().await?)
                }
                bench::BenchSystem::Etcd => bench::BenchTarget::Etcd {
                    endpoints: bench.endpoints.clone(),
                    timeout: Duration::from_secs_f64(client.timeout.max(0.1)),
                },
            };
            let json = bench.json || client.format == Format::Json;
            for report in bench::run(&target, &bench).await? {
                bench::print(&report, json)?;
            }
            Ok(0)
        }
    }
}
