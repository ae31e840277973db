//! Init and the unseal ceremony.
//!
//! **Init** (on any node of an uninitialized cluster) generates the master key, the keyring and
//! a threshold key set for N operators of whom T must take part, encrypts the master key under
//! the threshold public key and the keyring under the master key, and commits the seal
//! configuration (public material and ciphertexts only) to the replicated state under a
//! reserved key, in one transaction that succeeds only if no configuration exists. Each
//! operator's key share goes back to the caller encrypted to that operator's public key (HPKE);
//! the master key and the shares are then dropped (zeroized): every node starts sealed.
//!
//! **Unseal**: an operator's own process decrypts its share with its private key, computes a
//! decryption share of the master-key ciphertext, signs the submission and sends only that. A
//! node checks the signature and the decryption share against the operator's public key share
//! (a bad one is refused with the operator named and does not count), keeps it in memory, and
//! passes it to every other member over the node-to-node channel; each member checks it again.
//! With T valid shares a node combines them, opens the keyring and is unsealed. Shares are
//! never written anywhere, and a ceremony's progress expires.
//!
//! This layer holds the keyring; encrypting the API's values with it is the next step.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use coffer_raft::RaftNode;
use coffer_storage::{Command, Compare, Op, Txn};
use serde::{Deserialize, Serialize};

use crate::barrier::{Keyring, MasterKey};
use crate::keys::PublicKey;
use crate::threshold;

/// Where the seal configuration lives in the replicated state (keys starting with a NUL byte
/// are reserved: the public API refuses them).
pub const CONFIG_KEY: &[u8] = b"\0coffer/seal/config";
/// The cluster setting that lets an unsealed member unseal a restarted one (off when absent).
pub const PEER_UNSEAL_KEY: &[u8] = b"\0coffer/settings/peer-unseal";
/// The HPKE purpose of share files.
pub const SHARE_INFO: &[u8] = b"coffer/share/v1";
const UNSEAL_CONTEXT: &[u8] = b"coffer/unseal/v1";

/// One operator in the seal configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Operator {
    /// A name for messages (e.g. the public key file's name).
    pub name: String,
    /// Both public keys (64 bytes).
    pub public_key: Vec<u8>,
}

/// The seal configuration: public material and ciphertexts, replicated outside the barrier.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SealConfig {
    /// A random id of this cluster's key set (share files name it).
    pub cluster_id: String,
    /// Shares needed.
    pub threshold: u32,
    /// The operators, in share order.
    pub operators: Vec<Operator>,
    /// The threshold public key set.
    pub public_set: Vec<u8>,
    /// The master key encrypted under the threshold public key.
    pub master_ciphertext: Vec<u8>,
    /// The keyring encrypted under the master key.
    pub keyring: Vec<u8>,
    /// The first administrator's public key (for the authentication layer).
    pub admin_key: Vec<u8>,
}

impl SealConfig {
    fn operator(&self, index: u32) -> Result<(&Operator, PublicKey)> {
        let op = self.operators.get(index as usize).with_context(|| {
            format!(
                "no operator #{index} in this cluster's seal configuration ({} operators)",
                self.operators.len()
            )
        })?;
        Ok((op, PublicKey::from_bytes(&op.public_key)?))
    }
}

/// The message an operator signs to submit a decryption share: it names the purpose, the
/// cluster, the ciphertext (by hash), the operator and the share.
pub fn unseal_message(
    cluster_id: &str,
    master_ciphertext: &[u8],
    index: u32,
    share: &[u8],
) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, master_ciphertext);
    let mut m = Vec::with_capacity(128 + share.len());
    m.extend_from_slice(UNSEAL_CONTEXT);
    m.push(0);
    m.extend_from_slice(cluster_id.as_bytes());
    m.push(0);
    m.extend_from_slice(digest.as_ref());
    m.extend_from_slice(&index.to_be_bytes());
    m.extend_from_slice(share);
    m
}

/// What an operator signs to turn peer unseal on or off: the purpose, the cluster, the new
/// value and the setting's current `mod_revision` (0 if never set).
pub fn peer_unseal_message(cluster_id: &str, enabled: bool, revision: u64) -> Vec<u8> {
    let mut m = b"coffer/peer-unseal/v1\0".to_vec();
    m.extend_from_slice(cluster_id.as_bytes());
    m.push(0);
    m.push(u8::from(enabled));
    m.extend_from_slice(&revision.to_be_bytes());
    m
}

fn peer_unseal_info(cluster_id: &str) -> Vec<u8> {
    let mut info = b"coffer/peer-unseal/master/v1".to_vec();
    info.extend_from_slice(cluster_id.as_bytes());
    info
}

/// Messages between members over the peer `App` RPC.
#[derive(Debug, Serialize, Deserialize)]
enum AppMessage {
    /// An accepted unseal share, for the receiver to check and count.
    Share(Submission),
    /// A restarted member asks for the master key, encrypted to a one-time key.
    MasterKeyFor {
        /// Its node id (must be a member).
        requester: u64,
        /// The one-time public key (64 bytes).
        key: Vec<u8>,
    },
}

/// A share file's contents (JSON), written by `coffer operator init`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShareFile {
    /// The cluster's key-set id.
    pub cluster_id: String,
    /// The operator's position in the seal configuration.
    pub operator_index: u32,
    /// The operator's key fingerprint (to catch using another operator's key early).
    pub operator_fingerprint: String,
    /// Shares needed.
    pub threshold: u32,
    /// The key share, HPKE-encrypted to the operator's key (hex).
    pub encrypted_share: String,
}

/// A submitted, verified decryption share (kept in memory only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submission {
    /// The cluster's key-set id the operator signed.
    pub cluster_id: String,
    /// The operator.
    pub operator_index: u32,
    /// The decryption share.
    pub share: Vec<u8>,
    /// The operator's signature over [`unseal_message`].
    pub signature: Vec<u8>,
}

/// Where a node's ceremony stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Whether the node is still sealed.
    pub sealed: bool,
    /// Shares needed.
    pub threshold: u32,
    /// Operators whose valid shares this node holds.
    pub submitted: Vec<String>,
}

enum State {
    Sealed {
        shares: BTreeMap<u32, Submission>,
        started: Option<Instant>,
    },
    Unsealed {
        keyring: Keyring,
        /// Kept while unsealed so that peer unseal can hand it to a restarted member.
        master: MasterKey,
    },
}

/// A node's seal: sealed (with the ceremony's progress) or unsealed (holding the keyring).
pub struct Seal {
    node: Arc<RaftNode>,
    state: Mutex<State>,
    progress_ttl: Duration,
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seal")
            .field("sealed", &self.is_sealed())
            .finish_non_exhaustive()
    }
}

/// What init hands back: the cluster id and, per operator, the encrypted share.
#[derive(Debug)]
pub struct Initialized {
    /// The new key-set id.
    pub cluster_id: String,
    /// Operator i's share, encrypted to operator i's key.
    pub encrypted_shares: Vec<Vec<u8>>,
}

/// Why a submission was refused (each a distinct message; none resets the progress).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The cluster was never initialized (or this node has not applied the init yet).
    #[error("this cluster is not initialized: run `coffer operator init` first")]
    NotInitialized,
    /// The share was made for another cluster.
    #[error("this share is for cluster {theirs}, but this cluster is {ours}")]
    OtherCluster {
        /// The submission's cluster.
        theirs: String,
        /// This cluster.
        ours: String,
    },
    /// No such operator.
    #[error("{0}")]
    UnknownOperator(String),
    /// The signature does not verify with the operator's key.
    #[error("the submission for operator {0} is not signed by that operator's key")]
    BadSignature(String),
    /// The decryption share does not verify.
    #[error(
        "the decryption share of operator {0} is invalid (made from another share file or altered); it does not count"
    )]
    BadShare(String),
    /// The operator already took part in this ceremony.
    #[error("operator {0} already submitted a share in this ceremony")]
    Duplicate(String),
    /// Anything else.
    #[error("{0:#}")]
    Other(anyhow::Error),
}

impl Seal {
    /// A sealed node's seal.
    pub fn new(node: Arc<RaftNode>, progress_ttl: Duration) -> Arc<Seal> {
        Arc::new(Seal {
            node,
            state: Mutex::new(State::Sealed {
                shares: BTreeMap::new(),
                started: None,
            }),
            progress_ttl,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this node is sealed.
    pub fn is_sealed(&self) -> bool {
        matches!(*self.lock(), State::Sealed { .. })
    }

    /// The seal configuration this node has applied, if any.
    pub fn config(&self) -> Result<Option<SealConfig>> {
        let Some(entry) = self.reserved(CONFIG_KEY)? else {
            return Ok(None);
        };
        Ok(Some(
            postcard::from_bytes(&entry.value)
                .context("the stored seal configuration is corrupt")?,
        ))
    }

    /// A reserved key as this node has applied it (a stale local read).
    fn reserved(&self, key: &[u8]) -> Result<Option<coffer_storage::KvEntry>> {
        let view = self
            .node
            .store()
            .read()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        view.get(key).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Initializes the cluster. Fails if it is initialized already.
    pub async fn init(
        &self,
        operators: Vec<Operator>,
        threshold: u32,
        admin_key: Vec<u8>,
    ) -> Result<Initialized> {
        threshold::check_threshold(operators.len(), threshold as usize)?;
        let mut keys = Vec::new();
        for (i, op) in operators.iter().enumerate() {
            let key = PublicKey::from_bytes(&op.public_key)
                .with_context(|| format!("operator key #{} ({})", i + 1, op.name))?;
            if keys.contains(&key) {
                bail!(
                    "operator key {} ({}) is given twice: every operator needs their own key",
                    key.fingerprint(),
                    op.name
                );
            }
            keys.push(key);
        }
        PublicKey::from_bytes(&admin_key).context("the administrator key")?;
        self.node
            .linearize()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if self.config()?.is_some() {
            bail!("this cluster is already initialized; init runs once per cluster");
        }
        let master = MasterKey::generate()?;
        let keyring = Keyring::new()?;
        let dealt = threshold::deal(operators.len(), threshold as usize, master.expose())?;
        let cluster_id = uuid::Uuid::new_v4().to_string();
        let mut encrypted_shares = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let mut info = SHARE_INFO.to_vec();
            info.extend_from_slice(cluster_id.as_bytes());
            encrypted_shares.push(key.seal(&info, &dealt.shares[i])?);
        }
        let config = SealConfig {
            cluster_id: cluster_id.clone(),
            threshold,
            operators,
            public_set: dealt.public_set,
            master_ciphertext: dealt.ciphertext,
            keyring: keyring.seal(&master)?,
            admin_key,
        };
        let txn = Txn {
            compare: vec![Compare::Absent(CONFIG_KEY.to_vec())],
            success: vec![Op::Put {
                key: CONFIG_KEY.to_vec(),
                value: postcard::to_allocvec(&config)?,
            }],
            failure: Vec::new(),
        };
        let written = self
            .node
            .write(Command {
                request_id: None,
                txn,
            })
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "init was not committed: {e} (if `coffer status` shows the cluster sealed, it was, and its shares are lost: the cluster must be rebuilt)"
                )
            })?;
        if !written.result.succeeded {
            bail!("this cluster is already initialized (another init won); init runs once");
        }
        Ok(Initialized {
            cluster_id,
            encrypted_shares,
        })
    }

    /// Where this node's ceremony stands (expired progress is dropped first).
    pub fn progress(&self) -> Result<Option<Progress>> {
        let Some(config) = self.config()? else {
            return Ok(None);
        };
        let mut state = self.lock();
        Ok(Some(self.progress_of(&config, &mut state)))
    }

    fn progress_of(&self, config: &SealConfig, state: &mut State) -> Progress {
        match state {
            State::Unsealed { .. } => Progress {
                sealed: false,
                threshold: config.threshold,
                submitted: Vec::new(),
            },
            State::Sealed { shares, started } => {
                if started.is_some_and(|t| t.elapsed() > self.progress_ttl) {
                    shares.clear();
                    *started = None;
                }
                Progress {
                    sealed: true,
                    threshold: config.threshold,
                    submitted: shares.keys().map(|i| name(config, *i)).collect(),
                }
            }
        }
    }

    /// Takes one operator's signed decryption share. `relay`: pass it on to the other members
    /// once accepted (false when it came from a member).
    pub async fn submit(self: &Arc<Self>, s: Submission, relay: bool) -> Result<Progress, Refused> {
        let config = self
            .config()
            .map_err(Refused::Other)?
            .ok_or(Refused::NotInitialized)?;
        if s.cluster_id != config.cluster_id {
            return Err(Refused::OtherCluster {
                theirs: s.cluster_id,
                ours: config.cluster_id,
            });
        }
        let (op, key) = config
            .operator(s.operator_index)
            .map_err(|e| Refused::UnknownOperator(format!("{e:#}")))?;
        let who = format!("{} ({})", op.name, key.fingerprint());
        let message = unseal_message(
            &config.cluster_id,
            &config.master_ciphertext,
            s.operator_index,
            &s.share,
        );
        key.verify(&message, &s.signature)
            .map_err(|_| Refused::BadSignature(who.clone()))?;
        let valid = threshold::verify_share(
            &config.public_set,
            s.operator_index as usize,
            &s.share,
            &config.master_ciphertext,
        )
        .map_err(Refused::Other)?;
        if !valid {
            return Err(Refused::BadShare(who));
        }
        let progress = {
            let mut state = self.lock();
            // Expire stale progress before adding to it.
            self.progress_of(&config, &mut state);
            if let State::Sealed { shares, started } = &mut *state {
                if shares.contains_key(&s.operator_index) {
                    return Err(Refused::Duplicate(who));
                }
                shares.insert(s.operator_index, s.clone());
                started.get_or_insert_with(Instant::now);
                if shares.len() >= config.threshold as usize {
                    let collected: BTreeMap<usize, Vec<u8>> = shares
                        .iter()
                        .map(|(i, sub)| (*i as usize, sub.share.clone()))
                        .collect();
                    let master = threshold::combine(
                        &config.public_set,
                        config.threshold as usize,
                        &collected,
                        &config.master_ciphertext,
                    )
                    .and_then(|secret| MasterKey::from_bytes(&secret))
                    .map_err(Refused::Other)?;
                    let keyring =
                        Keyring::open(&master, &config.keyring).map_err(Refused::Other)?;
                    *state = State::Unsealed { keyring, master };
                    tracing::info!("unsealed");
                }
            }
            self.progress_of(&config, &mut state)
        };
        if relay {
            let me = self.clone();
            tokio::spawn(async move { me.relay(s).await });
        }
        Ok(progress)
    }

    /// Passes an accepted submission to every other member (best effort; each checks it).
    async fn relay(&self, s: Submission) {
        let Ok(data) = postcard::to_allocvec(&AppMessage::Share(s)) else {
            return;
        };
        for (id, member) in self.node.peers() {
            let sent = self
                .node
                .send_app(&member.peer_addr, data.clone(), Duration::from_secs(5))
                .await;
            if let Err(e) = sent {
                tracing::warn!(peer = id, error = %e, "could not pass an unseal share on");
            }
        }
    }

    /// The handler for messages from other members: relayed shares, and peer-unseal requests.
    pub fn app_handler(self: &Arc<Self>) -> coffer_raft::AppHandler {
        let me = self.clone();
        Arc::new(move |data: Vec<u8>| {
            let me = me.clone();
            Box::pin(async move {
                match postcard::from_bytes(&data).map_err(|_| {
                    "not a seal message (are both nodes the same build?)".to_string()
                })? {
                    AppMessage::Share(s) => match me.submit(s, false).await {
                        Ok(_) | Err(Refused::Duplicate(_)) => Ok(Vec::new()),
                        Err(e) => Err(e.to_string()),
                    },
                    AppMessage::MasterKeyFor { requester, key } => {
                        me.hand_out_master_key(requester, &key)
                    }
                }
            })
        })
    }

    /// Whether the cluster's peer-unseal setting is on (as this node has applied it), and the
    /// setting's `mod_revision` (0 when never set).
    pub fn peer_unseal(&self) -> Result<(bool, u64)> {
        Ok(match self.reserved(PEER_UNSEAL_KEY)? {
            Some(e) => (e.value == b"on", e.mod_revision),
            None => (false, 0),
        })
    }

    /// Turns peer unseal on or off, on an operator's signed request. The signature covers the
    /// setting's current `mod_revision`, and the write only applies if it is unchanged, so a
    /// recorded request cannot be replayed later.
    pub async fn set_peer_unseal(
        &self,
        enabled: bool,
        operator_index: u32,
        revision: u64,
        signature: &[u8],
    ) -> Result<(), Refused> {
        let config = self
            .config()
            .map_err(Refused::Other)?
            .ok_or(Refused::NotInitialized)?;
        let (op, key) = config
            .operator(operator_index)
            .map_err(|e| Refused::UnknownOperator(format!("{e:#}")))?;
        let who = format!("{} ({})", op.name, key.fingerprint());
        let message = peer_unseal_message(&config.cluster_id, enabled, revision);
        key.verify(&message, signature)
            .map_err(|_| Refused::BadSignature(who))?;
        let txn = Txn {
            compare: vec![Compare::ModRevision(PEER_UNSEAL_KEY.to_vec(), revision)],
            success: vec![Op::Put {
                key: PEER_UNSEAL_KEY.to_vec(),
                value: if enabled {
                    b"on".to_vec()
                } else {
                    b"off".to_vec()
                },
            }],
            failure: Vec::new(),
        };
        let written = self
            .node
            .write(Command {
                request_id: None,
                txn,
            })
            .await
            .map_err(|e| Refused::Other(anyhow::anyhow!("the setting was not committed: {e}")))?;
        if !written.result.succeeded {
            return Err(Refused::Other(anyhow::anyhow!(
                "the setting changed since the request was signed: run the command again"
            )));
        }
        Ok(())
    }

    /// Answers a restarted member's request: the master key, HPKE-encrypted to the one-time key
    /// it sent, if this node is unsealed and the cluster allows peer unseal.
    fn hand_out_master_key(&self, requester: u64, key: &[u8]) -> Result<Vec<u8>, String> {
        let config = self
            .config()
            .map_err(|e| format!("{e:#}"))?
            .ok_or("not initialized")?;
        let (on, _) = self.peer_unseal().map_err(|e| format!("{e:#}"))?;
        if !on {
            return Err("peer unseal is off in this cluster".into());
        }
        if !self.node.peers().iter().any(|(id, _)| *id == requester) {
            return Err(format!("node {requester} is not a member"));
        }
        let recipient = PublicKey::from_bytes(key).map_err(|e| format!("{e:#}"))?;
        match &*self.lock() {
            State::Unsealed { master, .. } => {
                tracing::info!(
                    node = requester,
                    "handing the master key to a restarted member"
                );
                recipient
                    .seal(&peer_unseal_info(&config.cluster_id), master.expose())
                    .map_err(|e| format!("{e:#}"))
            }
            State::Sealed { .. } => Err("this node is sealed too".into()),
        }
    }

    /// While this node is sealed and the cluster allows peer unseal, asks the other members for
    /// the master key every `every`. Runs until the node stops.
    pub async fn peer_unseal_loop(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if !self.is_sealed() || !self.peer_unseal().map(|(on, _)| on).unwrap_or(false) {
                continue;
            }
            if let Err(e) = self.try_peer_unseal().await {
                tracing::debug!(error = %e, "peer unseal not possible yet");
            }
        }
    }

    async fn try_peer_unseal(&self) -> Result<()> {
        let config = self.config()?.context("not initialized")?;
        // A one-time key: the master key travels encrypted to it, inside the peer TLS channel.
        let once = crate::keys::KeyPair::generate()?;
        let request = postcard::to_allocvec(&AppMessage::MasterKeyFor {
            requester: self.node.id(),
            key: once.public().to_bytes().to_vec(),
        })?;
        let mut errors = Vec::new();
        for (id, member) in self.node.peers() {
            match self
                .node
                .send_app(&member.peer_addr, request.clone(), Duration::from_secs(3))
                .await
            {
                Ok(sealed) => {
                    let secret = once.open(&peer_unseal_info(&config.cluster_id), &sealed)?;
                    let master = MasterKey::from_bytes(&secret)?;
                    let keyring = Keyring::open(&master, &config.keyring)?;
                    *self.lock() = State::Unsealed { keyring, master };
                    tracing::info!(by = id, "unsealed by a peer");
                    return Ok(());
                }
                Err(e) => errors.push(format!("node {id}: {e}")),
            }
        }
        bail!("no member handed out the master key: {}", errors.join("; "))
    }

    /// Runs `f` with the keyring, or refuses because the node is sealed.
    pub fn with_keyring<T>(&self, f: impl FnOnce(&Keyring) -> T) -> Result<T, String> {
        match &*self.lock() {
            State::Unsealed { keyring, .. } => Ok(f(keyring)),
            State::Sealed { shares, .. } => Err(format!(
                "sealed: {} decryption share(s) received; operators run `coffer operator unseal`",
                shares.len()
            )),
        }
    }

    /// One line for `coffer status`.
    pub fn summary(&self) -> String {
        match self.progress() {
            Ok(None) => "uninitialized".into(),
            Ok(Some(p)) if !p.sealed => "unsealed".into(),
            Ok(Some(p)) => format!(
                "sealed ({} of {}{})",
                p.submitted.len(),
                p.threshold,
                if p.submitted.is_empty() {
                    String::new()
                } else {
                    format!(": {}", p.submitted.join(", "))
                }
            ),
            Err(e) => format!("unknown ({e:#})"),
        }
    }
}

fn name(config: &SealConfig, index: u32) -> String {
    config
        .operators
        .get(index as usize)
        .map(|o| o.name.clone())
        .unwrap_or_else(|| format!("#{index}"))
}
