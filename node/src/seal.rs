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
//! **While unsealed** a node holds the master key and the opened keyring, which the API uses to
//! encrypt every value before it is proposed to Raft. Operators' signed actions change the seal
//! cluster-wide through the replicated state: `seal` (every node drops its keys), `rotate` (a
//! new data key) and the peer-unseal setting. Each node notices them as it applies them (the
//! store counts changes to reserved keys; [`Seal::watch`] follows that count).

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
/// The keyring, encrypted under the master key.
pub const KEYRING_KEY: &[u8] = b"\0coffer/seal/keyring";
/// Written by every `seal` action: a node unsealed before its `mod_revision` seals itself.
pub const SEALED_KEY: &[u8] = b"\0coffer/seal/sealed";
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
    /// The first administrator's public key (for the authentication layer).
    pub admin_key: Vec<u8>,
}

impl SealConfig {
    /// The operators' names, comma-separated, for messages.
    pub fn operator_names(&self) -> String {
        self.operators
            .iter()
            .map(|o| o.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

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
/// cluster, the ciphertext (by hash), the seal action's revision (so a recorded submission
/// cannot undo a later `operator seal`: decryption shares themselves never change), the
/// operator and the share.
pub fn unseal_message(
    cluster_id: &str,
    master_ciphertext: &[u8],
    seal_revision: u64,
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
    m.extend_from_slice(&seal_revision.to_be_bytes());
    m.extend_from_slice(&index.to_be_bytes());
    m.extend_from_slice(share);
    m
}

/// An operator's signed action on the seal, applied cluster-wide through the replicated state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Turn peer unseal on or off.
    PeerUnseal(bool),
    /// Seal every node.
    Seal,
    /// Add a data key and make it active.
    Rotate,
}

impl Action {
    /// The action's name on the wire and in the signed message.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::PeerUnseal(true) => "peer-unseal on",
            Action::PeerUnseal(false) => "peer-unseal off",
            Action::Seal => "seal",
            Action::Rotate => "rotate",
        }
    }

    /// Parses [`Action::as_str`].
    pub fn parse(s: &str) -> Option<Action> {
        [
            Action::PeerUnseal(true),
            Action::PeerUnseal(false),
            Action::Seal,
            Action::Rotate,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }

    /// The reserved key the action changes (its `mod_revision` is what the operator signs).
    pub fn key(self) -> &'static [u8] {
        match self {
            Action::PeerUnseal(_) => PEER_UNSEAL_KEY,
            Action::Seal => SEALED_KEY,
            Action::Rotate => KEYRING_KEY,
        }
    }
}

/// What an operator signs for an action: the purpose, the cluster, the action and the current
/// `mod_revision` of the key it changes (0 if never set), so a signed request applies once.
pub fn action_message(cluster_id: &str, action: Action, revision: u64) -> Vec<u8> {
    let mut m = b"coffer/operator-action/v1\0".to_vec();
    m.extend_from_slice(cluster_id.as_bytes());
    m.push(0);
    m.extend_from_slice(action.as_str().as_bytes());
    m.push(0);
    m.extend_from_slice(&revision.to_be_bytes());
    m
}

/// What a rekey replaces the operators with (every submitting operator signs its digest).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RekeyProposal {
    /// The new operators, in share order.
    pub operators: Vec<Operator>,
    /// Shares needed from them.
    pub threshold: u32,
}

impl RekeyProposal {
    /// SHA-256 of the proposal's canonical encoding.
    pub fn digest(&self) -> Result<[u8; 32]> {
        let bytes = postcard::to_allocvec(self)?;
        let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Ok(out)
    }
}

/// What a current operator signs to authorize a rekey with a decryption share: the purpose,
/// the cluster, the seal configuration's `mod_revision`, the proposal's digest, the operator
/// and the share.
pub fn rekey_message(
    cluster_id: &str,
    config_revision: u64,
    proposal_digest: &[u8; 32],
    index: u32,
    share: &[u8],
) -> Vec<u8> {
    let mut m = b"coffer/rekey/v1\0".to_vec();
    m.extend_from_slice(cluster_id.as_bytes());
    m.push(0);
    m.extend_from_slice(&config_revision.to_be_bytes());
    m.extend_from_slice(proposal_digest);
    m.extend_from_slice(&index.to_be_bytes());
    m.extend_from_slice(share);
    m
}

/// One current operator's signed authorization of a rekey.
#[derive(Debug, Clone)]
pub struct RekeySubmission {
    /// The cluster's key-set id.
    pub cluster_id: String,
    /// The seal configuration's `mod_revision` the operator saw.
    pub config_revision: u64,
    /// The new operators and threshold.
    pub proposal: RekeyProposal,
    /// The submitting (current) operator.
    pub operator_index: u32,
    /// Its decryption share of the master-key ciphertext.
    pub share: Vec<u8>,
    /// Its signature over [`rekey_message`].
    pub signature: Vec<u8>,
}

/// Where a rekey stands after a submission.
#[derive(Debug)]
pub enum RekeyOutcome {
    /// More current operators must authorize it.
    Pending(Progress),
    /// Done: the new key-set id and each new operator's share, encrypted to their key.
    Done(Initialized),
}

struct RekeyProgress {
    digest: [u8; 32],
    config_revision: u64,
    shares: BTreeMap<u32, Vec<u8>>,
    started: Instant,
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
        /// The `mod_revision` of the last seal action the requester has applied: a member that
        /// has not applied it yet must not undo it.
        seal_revision: u64,
    },
}

/// The peer `App` message by which member `requester` asks for the master key, encrypted to
/// `key` (a one-time public key, 64 bytes), having applied the seal action of `seal_revision`.
pub fn peer_unseal_request(requester: u64, key: &[u8], seal_revision: u64) -> Result<Vec<u8>> {
    Ok(postcard::to_allocvec(&AppMessage::MasterKeyFor {
        requester,
        key: key.to_vec(),
        seal_revision,
    })?)
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
    /// The seal action's revision the operator signed (see [`unseal_message`]).
    pub seal_revision: u64,
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
        keyring: Arc<Keyring>,
        /// The stored keyring's `mod_revision` that `keyring` was opened from.
        keyring_revision: u64,
        /// The seal action's `mod_revision` when this node was unsealed; a newer one seals it.
        seal_revision: u64,
        /// Kept while unsealed: to open a rotated keyring, and for peer unseal.
        master: MasterKey,
    },
}

/// Why the data path is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Closed {
    /// Not initialized yet.
    #[error("this cluster is not initialized: run `coffer operator init` first")]
    Uninitialized,
    /// Sealed.
    #[error(
        "sealed: {received} of {threshold} decryption shares received; operators run `coffer operator unseal`"
    )]
    Sealed {
        /// Valid shares this node holds.
        received: usize,
        /// Shares needed.
        threshold: u32,
    },
}

/// A node's seal: sealed (with the ceremony's progress) or unsealed (holding the keyring).
pub struct Seal {
    node: Arc<RaftNode>,
    state: Mutex<State>,
    rekey: tokio::sync::Mutex<Option<RekeyProgress>>,
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
            rekey: tokio::sync::Mutex::new(None),
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

    /// The seal configuration, for a submission naming the key set `cluster_id`: refused when
    /// the cluster is not initialized or the submission is for another key set.
    fn config_for(&self, cluster_id: &str) -> Result<SealConfig, Refused> {
        let config = self
            .config()
            .map_err(Refused::Other)?
            .ok_or(Refused::NotInitialized)?;
        if cluster_id != config.cluster_id {
            return Err(Refused::OtherCluster {
                theirs: cluster_id.to_string(),
                ours: config.cluster_id,
            });
        }
        Ok(config)
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
        let keys = operator_keys(&operators, threshold)?;
        PublicKey::from_bytes(&admin_key).context("the administrator key")?;
        self.node
            .linearize()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if self.config()?.is_some() {
            bail!("this cluster is already initialized; init runs once per cluster");
        }
        if self.reserved(crate::backup::RESTORE_KEY)?.is_some() {
            bail!(
                "a snapshot restore has started on this cluster, so it is not initialized with init: run `coffer operator snapshot restore` again to finish it, or start a fresh cluster"
            );
        }
        let master = MasterKey::generate()?;
        let keyring = Keyring::new()?;
        let (config, encrypted_shares) = deal(&master, operators, &keys, threshold, admin_key)?;
        let cluster_id = config.cluster_id.clone();
        let txn = Txn {
            compare: vec![
                Compare::Absent(CONFIG_KEY.to_vec()),
                Compare::Absent(crate::backup::RESTORE_KEY.to_vec()),
            ],
            success: vec![
                Op::Put {
                    key: CONFIG_KEY.to_vec(),
                    value: postcard::to_allocvec(&config)?,
                },
                Op::Put {
                    key: KEYRING_KEY.to_vec(),
                    value: keyring.seal(&master)?,
                },
                // Public: sealed members check node certificates against it.
                Op::Put {
                    key: crate::node_identity::NODE_CA_KEY.to_vec(),
                    value: crate::node_identity::NodeCa::from_keyring(&keyring)?
                        .cert()
                        .to_vec(),
                },
            ],
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
            bail!(
                "this cluster is already initialized (another init or a snapshot restore won); init runs once"
            );
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
                // Shares of a key set a rekey has replaced no longer count.
                shares.retain(|_, s| s.cluster_id == config.cluster_id);
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
        let config = self.config_for(&s.cluster_id)?;
        let seal_revision = self.revision_of(SEALED_KEY).map_err(Refused::Other)?;
        if s.seal_revision != seal_revision {
            return Err(Refused::Other(anyhow::anyhow!(
                "this submission was made for seal revision {}, but this node is at {seal_revision} (sealed again since, or not caught up): run `coffer operator unseal` again",
                s.seal_revision
            )));
        }
        let message = unseal_message(
            &config.cluster_id,
            &config.master_ciphertext,
            s.seal_revision,
            s.operator_index,
            &s.share,
        );
        let who = check_share(&config, s.operator_index, &message, &s.signature, &s.share)?;
        let progress = {
            let mut state = self.lock();
            // Expire stale progress before adding to it.
            self.progress_of(&config, &mut state);
            if let State::Sealed { shares, started } = &mut *state {
                if shares.contains_key(&s.operator_index) {
                    return Err(Refused::Duplicate(who));
                }
                // Shares signed before a later seal action no longer count.
                shares.retain(|_, x| x.seal_revision == s.seal_revision);
                shares.insert(s.operator_index, s.clone());
                started.get_or_insert_with(Instant::now);
                if shares.len() >= config.threshold as usize {
                    let master = combine(
                        &config,
                        shares.iter().map(|(i, sub)| (*i, sub.share.clone())),
                    )?;
                    if self.revision_of(SEALED_KEY).map_err(Refused::Other)? != s.seal_revision {
                        return Err(Refused::Other(anyhow::anyhow!(
                            "the cluster was sealed again while the shares were combined: run `coffer operator unseal` again"
                        )));
                    }
                    *state = self
                        .open_with(master, s.seal_revision)
                        .map_err(Refused::Other)?;
                    tracing::info!("unsealed");
                }
            }
            self.progress_of(&config, &mut state)
        };
        // A seal action applied while the shares were being checked and combined takes
        // effect now (the watcher may have seen it while this node was still sealed).
        self.refresh();
        if relay {
            let me = self.clone();
            tokio::spawn(async move { me.relay(s).await });
        }
        Ok(progress)
    }

    /// Takes one current operator's authorization of a rekey. With T of them (for the same
    /// proposal and configuration), combines the master key, checks it opens the keyring, deals
    /// a new key set to the proposed operators and replaces the seal configuration (only if it
    /// is unchanged). The master key and the data stay as they are; the old shares stop
    /// working. Progress is kept on this node only, and expires like unseal progress.
    pub async fn rekey(&self, s: RekeySubmission) -> Result<RekeyOutcome, Refused> {
        let config = self.config_for(&s.cluster_id)?;
        let config_revision = self.revision_of(CONFIG_KEY).map_err(Refused::Other)?;
        if s.config_revision != config_revision {
            return Err(Refused::Other(anyhow::anyhow!(
                "the seal configuration changed since this rekey was signed: run the command again"
            )));
        }
        let new_keys = operator_keys(&s.proposal.operators, s.proposal.threshold)
            .map_err(|e| Refused::Other(e.context("the new operators")))?;
        let digest = s.proposal.digest().map_err(Refused::Other)?;
        let message = rekey_message(
            &config.cluster_id,
            config_revision,
            &digest,
            s.operator_index,
            &s.share,
        );
        let who = check_share(&config, s.operator_index, &message, &s.signature, &s.share)?;
        // One rekey at a time per node; the lock is held across the commit.
        let mut slot = self.rekey.lock().await;
        if slot.as_ref().is_some_and(|p| {
            p.started.elapsed() > self.progress_ttl || p.config_revision != config_revision
        }) {
            *slot = None;
        }
        let progress = slot.get_or_insert_with(|| RekeyProgress {
            digest,
            config_revision,
            shares: BTreeMap::new(),
            started: Instant::now(),
        });
        if progress.digest != digest {
            return Err(Refused::Other(anyhow::anyhow!(
                "another rekey (other new operators or threshold) is in progress on this node, authorized by {}; submit the same proposal, or wait until it expires",
                progress
                    .shares
                    .keys()
                    .map(|i| name(&config, *i))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if progress.shares.contains_key(&s.operator_index) {
            return Err(Refused::Duplicate(who));
        }
        progress.shares.insert(s.operator_index, s.share);
        if progress.shares.len() < config.threshold as usize {
            return Ok(RekeyOutcome::Pending(Progress {
                sealed: true,
                threshold: config.threshold,
                submitted: progress.shares.keys().map(|i| name(&config, *i)).collect(),
            }));
        }
        let collected: Vec<(u32, Vec<u8>)> = progress
            .shares
            .iter()
            .map(|(i, sh)| (*i, sh.clone()))
            .collect();
        *slot = None;
        let master = combine(&config, collected)?;
        let stored = self
            .reserved(KEYRING_KEY)
            .map_err(Refused::Other)?
            .ok_or_else(|| Refused::Other(anyhow::anyhow!("the keyring is missing")))?;
        Keyring::open(&master, &stored.value)
            .map_err(|e| Refused::Other(e.context("the combined master key")))?;
        let (new_config, encrypted_shares) = deal(
            &master,
            s.proposal.operators,
            &new_keys,
            s.proposal.threshold,
            config.admin_key,
        )
        .map_err(Refused::Other)?;
        let cluster_id = new_config.cluster_id.clone();
        let txn = Txn {
            compare: vec![Compare::ModRevision(CONFIG_KEY.to_vec(), config_revision)],
            success: vec![Op::Put {
                key: CONFIG_KEY.to_vec(),
                value: postcard::to_allocvec(&new_config).map_err(|e| Refused::Other(e.into()))?,
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
                Refused::Other(anyhow::anyhow!(
                    "the rekey's outcome is unknown: {e}. If `coffer operator rekey` now says the seal configuration changed, it committed and the new shares were lost with this answer: keep the cluster unsealed and move its data to a new cluster"
                ))
            })?;
        if !written.result.succeeded {
            return Err(Refused::Other(anyhow::anyhow!(
                "the seal configuration changed while the rekey was being made: run it again"
            )));
        }
        tracing::info!(cluster_id, "rekeyed");
        Ok(RekeyOutcome::Done(Initialized {
            cluster_id,
            encrypted_shares,
        }))
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
        Arc::new(move |peer: Option<u64>, data: Vec<u8>| {
            let me = me.clone();
            Box::pin(async move {
                match postcard::from_bytes(&data).map_err(|_| {
                    "not a seal message (are both nodes the same build?)".to_string()
                })? {
                    AppMessage::Share(s) => match me.submit(s, false).await {
                        Ok(_) | Err(Refused::Duplicate(_)) => Ok(Vec::new()),
                        Err(e) => Err(e.to_string()),
                    },
                    AppMessage::MasterKeyFor {
                        requester,
                        key,
                        seal_revision,
                    } => {
                        // The requester is who its certificate says, not who it claims.
                        if peer != Some(requester) {
                            return Err(format!(
                                "the request names node {requester}, but the peer's certificate is not node {requester}'s"
                            ));
                        }
                        me.hand_out_master_key(requester, &key, seal_revision)
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

    /// Runs an operator's signed action. The signature covers the current `mod_revision` of
    /// the key the action changes, and the write applies only if it is unchanged, so a
    /// recorded request cannot be replayed later. Returns the active data key number on this
    /// node afterwards (0 if sealed).
    pub async fn operator_action(
        &self,
        action: Action,
        operator_index: u32,
        revision: u64,
        signature: &[u8],
    ) -> Result<u32, Refused> {
        let config = self
            .config()
            .map_err(Refused::Other)?
            .ok_or(Refused::NotInitialized)?;
        let who = check_signature(
            &config,
            operator_index,
            &action_message(&config.cluster_id, action, revision),
            signature,
        )?;
        let value = match action {
            Action::PeerUnseal(on) => {
                if on {
                    b"on".to_vec()
                } else {
                    b"off".to_vec()
                }
            }
            // The value only has to change the key's mod_revision; the operator is recorded.
            Action::Seal => who.into_bytes(),
            Action::Rotate => {
                // Build on the cluster's latest keyring, never on a stale local copy: a rotation
                // from an older one would reuse the next key number with other key bytes.
                self.node
                    .linearize()
                    .await
                    .map_err(|e| Refused::Other(anyhow::anyhow!("{e}")))?;
                let stored = self
                    .reserved(KEYRING_KEY)
                    .map_err(Refused::Other)?
                    .ok_or_else(|| Refused::Other(anyhow::anyhow!("the keyring is missing")))?;
                if stored.mod_revision != revision {
                    return Err(Refused::Other(anyhow::anyhow!(
                        "the seal state changed since the request was signed: run the command again"
                    )));
                }
                let state = self.lock();
                let State::Unsealed { master, .. } = &*state else {
                    return Err(Refused::Other(anyhow::anyhow!(
                        "this node is sealed: send rotate to an unsealed node"
                    )));
                };
                let mut keyring = Keyring::open(master, &stored.value).map_err(Refused::Other)?;
                keyring.rotate().map_err(Refused::Other)?;
                keyring.seal(master).map_err(Refused::Other)?
            }
        };
        let txn = Txn {
            compare: vec![Compare::ModRevision(action.key().to_vec(), revision)],
            success: vec![Op::Put {
                key: action.key().to_vec(),
                value,
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
            .map_err(|e| Refused::Other(anyhow::anyhow!("the action was not committed: {e}")))?;
        if !written.result.succeeded {
            return Err(Refused::Other(anyhow::anyhow!(
                "the seal state changed since the request was signed: run the command again"
            )));
        }
        // Take it in here before answering (a follower may not have applied it yet).
        self.node
            .linearize()
            .await
            .map_err(|e| Refused::Other(anyhow::anyhow!("committed, but {e}")))?;
        self.refresh();
        Ok(self.keyring().map(|k| k.active()).unwrap_or(0))
    }

    /// Seals every node on an administrator's authority (checked by the caller): records who in
    /// the seal key, which every node takes in as it applies it, as after an operator's seal.
    pub async fn emergency_seal(&self, by: &str) -> Result<(), Refused> {
        let txn = Txn::ops(vec![Op::Put {
            key: SEALED_KEY.to_vec(),
            value: format!("administrator session: {by}").into_bytes(),
        }]);
        self.node
            .write(Command {
                request_id: None,
                txn,
            })
            .await
            .map_err(|e| Refused::Other(anyhow::anyhow!("the seal was not committed: {e}")))?;
        self.node
            .linearize()
            .await
            .map_err(|e| Refused::Other(anyhow::anyhow!("committed, but {e}")))?;
        self.refresh();
        Ok(())
    }

    /// Answers a restarted member's request: the master key, HPKE-encrypted to the one-time key
    /// it sent, if this node is unsealed and the cluster allows peer unseal.
    fn hand_out_master_key(
        &self,
        requester: u64,
        key: &[u8],
        requester_seal_revision: u64,
    ) -> Result<Vec<u8>, String> {
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
        // A seal action this node has applied but not yet taken in must not be undone here.
        self.refresh();
        match &*self.lock() {
            State::Unsealed { seal_revision, .. } if *seal_revision < requester_seal_revision => {
                Err("this node has not applied the latest seal action yet".into())
            }
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
            if self.is_sealed()
                && self.peer_unseal().map(|(on, _)| on).unwrap_or(false)
                && let Err(e) = self.try_peer_unseal().await
            {
                tracing::debug!(error = %e, "peer unseal not possible yet");
            }
            tokio::time::sleep(every).await;
        }
    }

    async fn try_peer_unseal(&self) -> Result<()> {
        let config = self.config()?.context("not initialized")?;
        // A one-time key: the master key travels encrypted to it, inside the peer TLS channel.
        let once = crate::keys::KeyPair::generate()?;
        let seal_revision = self.revision_of(SEALED_KEY)?;
        let request =
            peer_unseal_request(self.node.id(), &once.public().to_bytes(), seal_revision)?;
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
                    let unsealed = self.open_with(master, seal_revision)?;
                    *self.lock() = unsealed;
                    tracing::info!(by = id, "unsealed by a peer");
                    self.refresh();
                    return Ok(());
                }
                Err(e) => errors.push(format!("node {id}: {e}")),
            }
        }
        bail!("no member handed out the master key: {}", errors.join("; "))
    }

    /// The `mod_revision` of a reserved key as this node has applied it (0 when absent).
    fn revision_of(&self, key: &[u8]) -> Result<u64> {
        Ok(self.reserved(key)?.map_or(0, |e| e.mod_revision))
    }

    /// The unsealed state for `master`, as of the seal action revision `seal_revision` (the one
    /// the shares were signed for, or the one peer unseal asked with): opens the stored keyring.
    /// The caller then calls [`Seal::refresh`], which seals again if a later seal action has
    /// been applied meanwhile.
    fn open_with(&self, master: MasterKey, seal_revision: u64) -> Result<State> {
        let stored = self
            .reserved(KEYRING_KEY)?
            .context("the keyring is missing from the replicated state")?;
        Ok(State::Unsealed {
            keyring: Arc::new(Keyring::open(&master, &stored.value)?),
            keyring_revision: stored.mod_revision,
            seal_revision,
            master,
        })
    }

    /// The keyring, for the data path; or why the data path is closed.
    pub fn keyring(&self) -> Result<Arc<Keyring>, Closed> {
        if let State::Unsealed { keyring, .. } = &*self.lock() {
            return Ok(keyring.clone());
        }
        // Sealed: say how far the ceremony is (expired shares dropped first).
        match self.progress() {
            Ok(None) => Err(Closed::Uninitialized),
            Ok(Some(p)) if !p.sealed => self.keyring(),
            Ok(Some(p)) => Err(Closed::Sealed {
                received: p.submitted.len(),
                threshold: p.threshold,
            }),
            Err(_) => Err(Closed::Sealed {
                received: 0,
                threshold: 0,
            }),
        }
    }

    /// The active data key number and the stored seal, keyring and configuration revisions
    /// (for status).
    pub fn revisions(&self) -> Result<(u32, u64, u64, u64)> {
        let active = self.keyring().map(|k| k.active()).unwrap_or(0);
        Ok((
            active,
            self.revision_of(SEALED_KEY)?,
            self.revision_of(KEYRING_KEY)?,
            self.revision_of(CONFIG_KEY)?,
        ))
    }

    /// Takes in the seal actions this node has applied: a newer seal action seals it; a newer
    /// keyring (a rotation) is opened with the master key. Cheap when nothing changed.
    pub fn refresh(&self) {
        let (Ok(sealed_at), Ok(stored)) =
            (self.revision_of(SEALED_KEY), self.reserved(KEYRING_KEY))
        else {
            return;
        };
        let mut state = self.lock();
        if let State::Sealed { shares, .. } = &mut *state {
            // Shares signed before a seal action this node has applied no longer count.
            shares.retain(|_, x| x.seal_revision >= sealed_at);
            return;
        }
        let State::Unsealed {
            keyring,
            keyring_revision,
            seal_revision,
            master,
        } = &mut *state
        else {
            return;
        };
        if sealed_at > *seal_revision {
            *state = State::Sealed {
                shares: BTreeMap::new(),
                started: None,
            };
            tracing::warn!("sealed by an operator's seal action; the keys are dropped");
            return;
        }
        if let Some(stored) = stored
            && stored.mod_revision > *keyring_revision
        {
            match Keyring::open(master, &stored.value) {
                Ok(k) => {
                    tracing::info!(data_key = k.active(), "the keyring was rotated");
                    *keyring = Arc::new(k);
                    *keyring_revision = stored.mod_revision;
                }
                Err(e) => tracing::error!(error = %e, "cannot open the rotated keyring"),
            }
        }
    }

    /// Follows the state this node applies and calls [`Seal::refresh`] whenever a reserved key
    /// may have changed. Runs until the node stops.
    pub async fn watch(self: Arc<Self>) {
        let mut seen = u64::MAX;
        let mut changes = self.node.changes();
        loop {
            let now = self.node.store().reserved_changes();
            if now != seen {
                seen = now;
                self.refresh();
            }
            if !changes.next().await {
                return;
            }
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

/// Checks that `signature` over `message` is operator `index`'s. Returns the operator's name
/// and key fingerprint, for messages.
fn check_signature(
    config: &SealConfig,
    index: u32,
    message: &[u8],
    signature: &[u8],
) -> Result<String, Refused> {
    let (op, key) = config
        .operator(index)
        .map_err(|e| Refused::UnknownOperator(format!("{e:#}")))?;
    let who = format!("{} ({})", op.name, key.fingerprint());
    key.verify(message, signature)
        .map_err(|_| Refused::BadSignature(who.clone()))?;
    Ok(who)
}

/// [`check_signature`], and that `share` is operator `index`'s valid decryption share of the
/// master-key ciphertext (a bad one is named and does not count).
fn check_share(
    config: &SealConfig,
    index: u32,
    message: &[u8],
    signature: &[u8],
    share: &[u8],
) -> Result<String, Refused> {
    let who = check_signature(config, index, message, signature)?;
    let valid = threshold::verify_share(
        &config.public_set,
        index as usize,
        share,
        &config.master_ciphertext,
    )
    .map_err(Refused::Other)?;
    if !valid {
        return Err(Refused::BadShare(who));
    }
    Ok(who)
}

/// Combines checked decryption shares (operator index, share) into the master key.
fn combine(
    config: &SealConfig,
    shares: impl IntoIterator<Item = (u32, Vec<u8>)>,
) -> Result<MasterKey, Refused> {
    let collected: BTreeMap<usize, Vec<u8>> = shares
        .into_iter()
        .map(|(i, share)| (i as usize, share))
        .collect();
    threshold::combine(
        &config.public_set,
        config.threshold as usize,
        &collected,
        &config.master_ciphertext,
    )
    .and_then(|secret| MasterKey::from_bytes(&secret))
    .map_err(Refused::Other)
}

/// Checks a set of operators and a threshold; returns their public keys.
fn operator_keys(operators: &[Operator], threshold: u32) -> Result<Vec<PublicKey>> {
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
    Ok(keys)
}

/// Deals a new threshold key set for `master` among `operators` (keys `keys`) under a new
/// key-set id: the configuration to store and each operator's share, encrypted to them.
fn deal(
    master: &MasterKey,
    operators: Vec<Operator>,
    keys: &[PublicKey],
    threshold: u32,
    admin_key: Vec<u8>,
) -> Result<(SealConfig, Vec<Vec<u8>>)> {
    let dealt = threshold::deal(operators.len(), threshold as usize, master.expose())?;
    let cluster_id = uuid::Uuid::new_v4().to_string();
    let mut info = SHARE_INFO.to_vec();
    info.extend_from_slice(cluster_id.as_bytes());
    let encrypted_shares = keys
        .iter()
        .zip(&dealt.shares)
        .map(|(key, share)| key.seal(&info, share))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        SealConfig {
            cluster_id,
            threshold,
            operators,
            public_set: dealt.public_set.clone(),
            master_ciphertext: dealt.ciphertext.clone(),
            admin_key,
        },
        encrypted_shares,
    ))
}

fn name(config: &SealConfig, index: u32) -> String {
    config
        .operators
        .get(index as usize)
        .map(|o| o.name.clone())
        .unwrap_or_else(|| format!("#{index}"))
}
