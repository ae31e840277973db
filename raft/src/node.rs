//! [`RaftNode`]: one member of the cluster, with writes from any node (forwarded to the leader),
//! linearizable reads on any node (read-index), membership changes and status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use coffer_storage::{Command, Op, RequestId, Store, TxnResult};
use openraft::Instant as _;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, InitializeError, LinearizableReadError, RaftError};
use openraft::raft::linearizable_read::{Linearizer, ReadLogId};
use openraft::{ChangeMembers, Raft, ReadPolicy, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::codec::{decode, encode};
use crate::log_store::LogStore;
use crate::network::{Network, PeerPool};
use crate::pb::Payload;
use crate::state_machine::StateMachine;
use crate::types::{LogId, Member, NodeId, TypeConfig};
use crate::{Error, Settings};

/// A write that was committed and applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Written {
    /// What the state machine answered.
    pub result: TxnResult,
    /// The log index of the entry.
    pub index: u64,
}

/// A membership change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add a node as a non-voting learner (a read replica); returns once it caught up.
    AddLearner {
        /// The new node's id (never one used before).
        id: NodeId,
        /// Its addresses.
        member: Member,
    },
    /// Make a learner a voter.
    Promote {
        /// The learner.
        id: NodeId,
    },
    /// Remove a voter or a learner from the cluster.
    Remove {
        /// The node.
        id: NodeId,
    },
}

/// The outcome of one attempt at the leader, as sent back over the peer wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Attempt {
    /// Try again (perhaps at another leader). `attempted`: the leader may have proposed it.
    Retry {
        /// Whether the operation may have been proposed.
        attempted: bool,
        /// Why it did not complete.
        why: String,
    },
    /// Final.
    Fail(Error),
}

/// One node's view of the cluster, for `coffer status` and metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This node.
    pub id: NodeId,
    /// Leader, Follower, Learner, Candidate or Shutdown.
    pub state: String,
    /// Current term.
    pub term: u64,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// Index of the last log entry.
    pub last_log_index: u64,
    /// Highest index known committed.
    pub committed: u64,
    /// Highest index applied to the state machine.
    pub applied: u64,
    /// Index covered by the current snapshot.
    pub snapshot: u64,
    /// Highest purged index.
    pub purged: u64,
    /// Voters and their addresses.
    pub voters: BTreeMap<NodeId, Member>,
    /// Learners and their addresses.
    pub learners: BTreeMap<NodeId, Member>,
    /// On the leader: highest index replicated to each member.
    pub replication: BTreeMap<NodeId, u64>,
    /// On the leader: how long ago each other member last acknowledged a heartbeat or an
    /// append (`None`: never, since this node became leader).
    pub last_contact: BTreeMap<NodeId, Option<Duration>>,
    /// Why Raft stopped, if it did.
    pub fatal: Option<String>,
}

/// Handles application messages from peers (see [`RaftNode::set_app_handler`]): the sending
/// node's id as its TLS certificate proves it (see [`PeerIdentity`]) and the request's bytes
/// in, the answer's bytes (or a refusal) out.
pub type AppHandler = Arc<
    dyn Fn(
            Option<NodeId>,
            Vec<u8>,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>>
        + Send
        + Sync,
>;

/// The id of the node at the other end of a peer connection, as its certificate proves it.
/// Whoever serves the peer service puts it into each request's extensions after checking the
/// client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerIdentity(pub NodeId);

/// Checks again that the peer's certificate still counts: whoever serves the peer service puts
/// it into each request's extensions. A long-lived stream (`StreamAppend`) calls it on a
/// message when a second or more passed since the last check, so a peer removed or refused
/// since the stream opened gets no further, as it would on its next call.
#[derive(Clone)]
pub struct PeerRecheck(pub Arc<dyn Fn() -> Result<(), String> + Send + Sync>);

impl std::fmt::Debug for PeerRecheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerRecheck")
    }
}

/// Notices of changes to a node's Raft state; see [`RaftNode::changes`].
pub struct Changes {
    rx: openraft::type_config::alias::WatchReceiverOf<
        TypeConfig,
        openraft::RaftMetrics<TypeConfig>,
    >,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Changes")
    }
}

impl Changes {
    /// Waits for the next change; `false` once the node has stopped.
    pub async fn next(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

/// One cluster member.
pub struct RaftNode {
    app_handler: std::sync::OnceLock<AppHandler>,
    id: NodeId,
    incarnation: u64,
    /// Set when this node must stop serving for a reason Raft does not know (e.g. it was
    /// addressed as an earlier incarnation of itself).
    poisoned: std::sync::Mutex<Option<String>>,
    raft: Raft<TypeConfig, StateMachine>,
    store: Store,
    pool: PeerPool,
    settings: Settings,
    write_permits: Arc<Semaphore>,
    read_permits: Arc<Semaphore>,
    admin_lock: tokio::sync::Mutex<()>,
    /// Linearizable reads waiting for a read index; one fetch serves all of them (see
    /// [`RaftNode::linearize`]).
    read_waiters: tokio::sync::mpsc::UnboundedSender<ReadWaiter>,
    pub(crate) share_counts: ShareCounts,
    /// Writes waiting to be forwarded to the leader together (see [`forward_writes`]).
    forwards: tokio::sync::mpsc::UnboundedSender<Forwarding>,
}

/// Forwarded batches in flight from one follower. While they are out, writes queue and go
/// in the next batch; a lone write (no batch in flight) leaves at once.
const FORWARDS_IN_FLIGHT: usize = 2;
/// At most this many writes, and about this many bytes of keys and values, in one batch.
const FORWARD_BATCH_WRITES: usize = 256;
const FORWARD_BATCH_BYTES: usize = crate::MAX_PEER_MESSAGE / 4;

/// A write waiting to be forwarded to the leader.
struct Forwarding {
    cmd: Command,
    deadline: Instant,
    answer: tokio::sync::oneshot::Sender<Result<Written, Attempt>>,
    /// [`QUEUED`], then [`SENT`] once in a batch on its way to the leader, or [`ABANDONED`]
    /// when its deadline passed first (it is then never sent).
    state: Arc<AtomicU8>,
}

const QUEUED: u8 = 0;
const SENT: u8 = 1;
const ABANDONED: u8 = 2;

/// About how many bytes a command takes on the wire.
fn command_bytes(cmd: &Command) -> usize {
    let ops = cmd.txn.success.iter().chain(&cmd.txn.failure);
    let ops: usize = ops
        .map(|op| match op {
            Op::Put { key, value } => key.len() + value.len(),
            Op::Delete { key } => key.len(),
            Op::DeletePrefix { prefix } => prefix.len(),
        })
        .sum();
    let compares: usize = cmd.txn.compare.iter().map(|c| c.key().len() + 16).sum();
    64 + ops + compares
}

/// Sends the writes this follower forwards to the leader in batches, one RPC for all the
/// writes that queued while earlier batches were out: under load the leader answers one
/// request per batch instead of one per write (as etcd followers forward proposals inside
/// their Raft messages). Ends when the node is dropped.
async fn forward_writes(
    node: std::sync::Weak<RaftNode>,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<Forwarding>,
) {
    // Batches in flight to the leader they went to: writes for a new leader never wait for
    // batches stuck at an old one (until their deadline, if it is cut off).
    let mut in_flight = (None, Arc::new(Semaphore::new(FORWARDS_IN_FLIGHT)));
    let mut next: Option<Forwarding> = None;
    loop {
        let first = match next.take() {
            Some(f) => f,
            None => match queued.recv().await {
                Some(f) => f,
                None => return,
            },
        };
        let permit = loop {
            let (leader, recheck) = match node.upgrade() {
                Some(n) => (
                    n.leader().map(|(l, _)| l),
                    Duration::from_millis(n.settings.heartbeat_ms.max(1)),
                ),
                None => return,
            };
            if in_flight.0 != leader {
                in_flight = (leader, Arc::new(Semaphore::new(FORWARDS_IN_FLIGHT)));
            }
            let waiting = in_flight.1.clone().acquire_owned();
            if let Ok(Ok(permit)) = tokio::time::timeout(recheck, waiting).await {
                break permit;
            }
        };
        let mut bytes = command_bytes(&first.cmd);
        let mut batch = vec![first];
        while batch.len() < FORWARD_BATCH_WRITES {
            let Ok(f) = queued.try_recv() else { break };
            bytes += command_bytes(&f.cmd);
            if bytes > FORWARD_BATCH_BYTES {
                next = Some(f);
                break;
            }
            batch.push(f);
        }
        // Writes whose caller gave up (deadline, dropped request) must not go: their callers
        // were told they were not sent.
        batch.retain(|f| {
            !f.answer.is_closed()
                && f.state
                    .compare_exchange(QUEUED, SENT, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
        });
        if batch.is_empty() {
            continue;
        }
        let Some(node) = node.upgrade() else { return };
        node.share_counts.batches.fetch_add(1, Ordering::Relaxed);
        node.share_counts
            .forwarded
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        tokio::spawn(async move {
            node.send_forwards(batch).await;
            drop(permit);
        });
    }
}

/// How well linearizable reads share read-index rounds, forwarded writes share batches, and
/// replication streams carry append messages, on this node.
#[derive(Debug, Default)]
pub(crate) struct ShareCounts {
    /// Reads that waited for a read index.
    reads: AtomicU64,
    /// Read indexes fetched for them (from the leader, or as leader).
    rounds: AtomicU64,
    /// Writes sent to the leader in forwarded batches.
    forwarded: AtomicU64,
    /// Batches that carried them.
    batches: AtomicU64,
    /// As follower: `StreamAppend` streams from a leader that carried entries.
    pub(crate) append_streams: AtomicU64,
    /// The messages on them that carried entries.
    pub(crate) append_messages: AtomicU64,
}

/// Fetches read indexes for the waiting linearizable reads, one fetch at a time: each fetch
/// answers every read that registered before it started (as etcd's `linearizableReadLoop`
/// does), so a follower sends the leader one read-index request per round instead of one per
/// read. Ends when the node is dropped.
async fn fetch_read_indexes(
    node: std::sync::Weak<RaftNode>,
    mut waiting: tokio::sync::mpsc::UnboundedReceiver<ReadWaiter>,
) {
    let mut round = Vec::new();
    while let Some(first) = waiting.recv().await {
        round.push(first);
        while let Ok(next) = waiting.try_recv() {
            round.push(next);
        }
        // Reads that gave up (their caller went away) need no answer; reads past their deadline
        // get theirs at once, so that they do not cut the round short for the others.
        let now = Instant::now();
        round.retain(|w: &ReadWaiter| !w.answer.is_closed());
        for late in round.extract_if(.., |w| w.deadline <= now) {
            let _ = late.answer.send(Err(Attempt::Retry {
                attempted: false,
                why: "the read's deadline passed before a read index was fetched".into(),
            }));
        }
        let Some(deadline) = round.iter().map(|w| w.deadline).min() else {
            continue;
        };
        let Some(node) = node.upgrade() else { return };
        node.share_counts.rounds.fetch_add(1, Ordering::Relaxed);
        node.share_counts
            .reads
            .fetch_add(round.len() as u64, Ordering::Relaxed);
        let outcome = node.fetch_read_index(deadline).await;
        drop(node);
        for waiter in round.drain(..) {
            let _ = waiter.answer.send(outcome.clone());
        }
    }
}

/// A linearizable read waiting for a read index fetched after it registered.
struct ReadWaiter {
    deadline: Instant,
    answer: tokio::sync::oneshot::Sender<Result<LogId, Attempt>>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The answer a background task sends to a request it took (`sent`), or `late` once the
/// deadline passes first.
async fn answer_of<T>(
    sent: bool,
    answered: tokio::sync::oneshot::Receiver<Result<T, Attempt>>,
    deadline: Instant,
    late: Attempt,
) -> Result<T, Attempt> {
    let gone = || Attempt::Fail(Error::Fatal("this node is shutting down".into()));
    if !sent {
        return Err(gone());
    }
    match tokio::time::timeout(remaining(deadline), answered).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => Err(gone()),
        Err(_) => Err(late),
    }
}

/// An outcome the leader sent back, as this node reports it.
fn from_leader<T>(leader: NodeId, outcome: Result<T, Attempt>) -> Result<T, Attempt> {
    match outcome {
        // The leader stopping (a restart, a failed disk) is not this node's failure: the
        // operation may have been proposed there, and another leader can take it.
        Err(Attempt::Fail(Error::Fatal(why))) => Err(Attempt::Retry {
            attempted: true,
            why: format!("leader {leader} stopped: {why}"),
        }),
        other => other,
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

impl RaftNode {
    /// Starts Raft for node `id` over `store`. The peer service must be served by the caller
    /// (see [`RaftNode::peer_service`]).
    pub async fn start(
        id: NodeId,
        incarnation: u64,
        settings: Settings,
        store: Store,
        pool: PeerPool,
    ) -> Result<Arc<RaftNode>, Error> {
        let config = openraft::Config {
            cluster_name: "coffer".into(),
            heartbeat_interval: settings.heartbeat_ms,
            election_timeout_min: settings.election_timeout_ms,
            election_timeout_max: settings.election_timeout_ms.saturating_mul(2),
            install_snapshot_timeout: settings.snapshot_timeout.as_millis() as u64,
            // Keep one append batch well under the peer message limit even with the
            // largest entries.
            max_payload_entries: (crate::MAX_PEER_MESSAGE as u64
                / 2
                / settings.max_entry_bytes.max(1) as u64)
                .clamp(1, 256),
            snapshot_policy: if settings.snapshot_logs == 0 {
                SnapshotPolicy::Never
            } else {
                SnapshotPolicy::LogsSinceLast(settings.snapshot_logs)
            },
            max_in_snapshot_log_to_keep: settings.logs_to_keep,
            purge_batch_size: 256,
            enable_pre_vote: Some(true),
            // Replicate entries as soon as they are appended locally, so the leader's fsync
            // runs in parallel with the followers' instead of before them.
            broadcast_submitted_on_append: Some(true),
            // A restarted leader must not resume its old leadership: its persisted commit index
            // may be behind what the cluster acknowledged (save_committed is not fsynced), and
            // a read index computed from it would miss acknowledged writes (seen in the
            // full-restart scenario). A fresh election commits a new no-op first.
            enable_leader_restore: Some(false),
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Config(e.to_string()))?;
        let network = Network::new(id, pool.clone(), settings.snapshot_timeout);
        let raft = Raft::new(
            id,
            Arc::new(config),
            network,
            LogStore::new(store.clone()),
            StateMachine::new(store.clone()),
        )
        .await
        .map_err(|e| Error::Fatal(e.to_string()))?;
        let (read_waiters, waiting) = tokio::sync::mpsc::unbounded_channel();
        let (forwards, queued) = tokio::sync::mpsc::unbounded_channel();
        let node = Arc::new(RaftNode {
            app_handler: std::sync::OnceLock::new(),
            id,
            incarnation,
            poisoned: std::sync::Mutex::new(None),
            raft,
            store,
            pool,
            write_permits: Arc::new(Semaphore::new(settings.max_pending_writes)),
            read_permits: Arc::new(Semaphore::new(settings.max_pending_reads)),
            settings,
            admin_lock: tokio::sync::Mutex::new(()),
            read_waiters,
            share_counts: ShareCounts::default(),
            forwards,
        });
        tokio::spawn(fetch_read_indexes(Arc::downgrade(&node), waiting));
        tokio::spawn(forward_writes(Arc::downgrade(&node), queued));
        Ok(node)
    }

    /// Registers the handler of application messages from peers (once; later calls are
    /// ignored). Until then such messages are refused as UNAVAILABLE.
    pub fn set_app_handler(&self, handler: AppHandler) {
        let _ = self.app_handler.set(handler);
    }

    pub(crate) fn app_handler(&self) -> Option<&AppHandler> {
        self.app_handler.get()
    }

    /// The other members (voters and learners) with their addresses.
    pub fn peers(&self) -> Vec<(NodeId, Member)> {
        let s = self.status();
        s.voters
            .iter()
            .chain(s.learners.iter())
            .filter(|(id, _)| **id != self.id)
            .map(|(id, m)| (*id, m.clone()))
            .collect()
    }

    /// Sends an application message to the member at `peer_addr` over the node-to-node
    /// channel (mutual TLS) and returns its handler's answer.
    pub async fn send_app(
        &self,
        peer_addr: &str,
        data: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, Error> {
        let mut client = self.pool.client(peer_addr).map_err(Error::Unavailable)?;
        crate::tap::outgoing(&data);
        let call = client.app(Payload {
            data,
            ..Payload::default()
        });
        let response = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| Error::Unavailable(format!("{peer_addr} did not answer in time")))?
            .map_err(|s| {
                self.pool.refused(peer_addr, &s);
                Error::Unavailable(format!("{peer_addr}: {}", s.message()))
            })?;
        Ok(response.into_inner().data)
    }

    /// Drops the open peer connections: the next call to each peer connects anew (after this
    /// node's TLS identity changed).
    pub fn reset_peer_connections(&self) {
        self.pool.reset();
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The openraft handle (for metrics and tests).
    pub fn raft(&self) -> &Raft<TypeConfig, StateMachine> {
        &self.raft
    }

    /// The local store (reads after [`RaftNode::linearize`], or stale reads).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This node's data directory incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// What this node tells peers about itself.
    pub async fn info(&self) -> crate::types::NodeInfo {
        crate::types::NodeInfo {
            id: self.id,
            incarnation: self.incarnation,
            initialized: self.is_initialized().await.unwrap_or(true),
        }
    }

    /// Asks the node at `peer_addr` who it is.
    pub async fn peer_info(&self, peer_addr: &str) -> Result<crate::types::NodeInfo, Error> {
        let mut client = self.pool.client(peer_addr).map_err(Error::Unavailable)?;
        let call = client.info(Payload::default());
        let response = tokio::time::timeout(Duration::from_secs(3), call)
            .await
            .map_err(|_| Error::Unavailable(format!("{peer_addr} did not answer in time")))?
            .map_err(|s| {
                self.pool.refused(peer_addr, &s);
                Error::Unavailable(format!("{peer_addr}: {}", s.message()))
            })?;
        decode(&response.into_inner().data).map_err(|s| Error::Unavailable(s.message().to_string()))
    }

    /// A peer addressed this node as an earlier incarnation of itself. If this node never
    /// joined a cluster, its data directory was replaced: it stops serving rather than rejoin
    /// with an empty log under its old id.
    pub async fn refuse_stale_incarnation(&self, expected: u64) {
        if self.is_initialized().await.unwrap_or(true) {
            tracing::warn!(
                expected,
                "refused a Raft message meant for another incarnation"
            );
            return;
        }
        self.poison(format!(
            "the cluster knows node {} with data directory incarnation {expected:x}, but this data \
             directory is a new one ({:x}): a wiped node must not rejoin under its old id. Remove \
             node {} with `coffer cluster remove {}` and join this one with a new --node-id",
            self.id, self.incarnation, self.id, self.id
        ));
    }

    fn poison(&self, why: String) {
        tracing::error!(reason = %why, "node stops serving");
        if let Ok(mut p) = self.poisoned.lock()
            && p.is_none()
        {
            *p = Some(why);
        }
    }

    /// Forms a new cluster with `members` as its voters, once every member answered with its
    /// incarnation (waiting for them as long as it takes). Returns `false` when this node's log
    /// already has a membership. Fails, and stops this node, when another member already
    /// belongs to a cluster: this node's empty log means its data directory was replaced.
    pub async fn bootstrap(&self, mut members: BTreeMap<NodeId, Member>) -> Result<bool, Error> {
        for (id, member) in members.iter_mut() {
            if *id == self.id {
                member.incarnation = self.incarnation;
                continue;
            }
            let mut warned = false;
            let info = loop {
                if self.is_initialized().await? {
                    return Ok(false);
                }
                match self.peer_info(&member.peer_addr).await {
                    Ok(info) => break info,
                    Err(e) => {
                        if !warned {
                            tracing::info!(member = id, error = %e, "waiting for an initial member");
                            warned = true;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            if info.id != *id {
                let why = format!(
                    "initial member {id} at {} says it is node {}: fix --initial-member",
                    member.peer_addr, info.id
                );
                self.poison(why.clone());
                return Err(Error::Config(why));
            }
            if info.initialized {
                let why = format!(
                    "node {id} already belongs to a cluster but this node's log is empty: its data \
                     directory was replaced. Remove node {} from the cluster and join this one with \
                     a new --node-id (never bootstrap twice)",
                    self.id
                );
                self.poison(why.clone());
                return Err(Error::Config(why));
            }
            member.incarnation = info.incarnation;
        }
        self.initialize(members).await
    }

    /// A stream of "something changed" notices for this node's Raft state (applied entries,
    /// leader, membership): for tasks that follow what the node applies.
    pub fn changes(&self) -> Changes {
        Changes {
            rx: self.raft.metrics(),
        }
    }

    /// Waits until the node's Raft state changes, at most `timeout`.
    pub async fn wait_changed(&self, timeout: Duration) {
        let mut rx = self.raft.metrics();
        // A new receiver has not seen the current value: without this, `changed` would return
        // at once and every caller's loop would spin.
        drop(rx.borrow_and_update());
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }

    /// Forms a new cluster with `members` as its voters. Returns `false` when this node's log
    /// already has a membership (the cluster exists): initializing is then a no-op.
    pub async fn initialize(&self, members: BTreeMap<NodeId, Member>) -> Result<bool, Error> {
        match self.raft.initialize(members).await {
            Ok(()) => Ok(true),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(false),
            Err(RaftError::APIError(e)) => Err(Error::Config(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(Error::Fatal(e.to_string())),
        }
    }

    /// Whether this node's log has a membership (it belongs to a cluster).
    pub async fn is_initialized(&self) -> Result<bool, Error> {
        self.raft
            .is_initialized()
            .await
            .map_err(|e| Error::Fatal(e.to_string()))
    }

    fn leader(&self) -> Option<(NodeId, Option<Member>)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let leader = m.current_leader?;
        let member = m.membership_config.membership().get_node(&leader).cloned();
        Some((leader, member))
    }

    /// Waits until the metrics change (a leader appears, say), at most a short while.
    async fn wait_for_change(&self, deadline: Instant) {
        let pause = remaining(deadline).min(Duration::from_millis(
            self.settings.heartbeat_ms.saturating_mul(2),
        ));
        self.wait_changed(pause).await;
    }

    /// Why the node cannot serve, if Raft or storage stopped.
    pub fn fatal(&self) -> Option<String> {
        if self.store.is_failed() {
            return Some("storage failed".into());
        }
        if let Some(why) = self.poisoned.lock().ok().and_then(|p| p.clone()) {
            return Some(why);
        }
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        m.running_state.as_ref().err().map(|e| e.to_string())
    }

    /// Commits a command through the leader, from any node, and returns its result.
    ///
    /// The command gets a request id if it has none, so a retry after a lost answer (a leader
    /// change, a dropped connection) applies it at most once. Fails with
    /// [`Error::Unavailable`] when it was certainly not applied, and [`Error::OutcomeUnknown`]
    /// when the deadline passed after it may have been proposed.
    pub async fn write(&self, mut cmd: Command) -> Result<Written, Error> {
        if cmd.request_id.is_none() {
            cmd.request_id = Some(RequestId(*uuid::Uuid::new_v4().as_bytes()));
        }
        let _permit = self
            .write_permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Error::Overloaded(format!("{} writes", self.settings.max_pending_writes))
            })?;
        let deadline = Instant::now() + self.settings.write_timeout;
        let mut attempted = false;
        let mut why;
        loop {
            let outcome = match self.other_leader() {
                Ok(None) => self.propose(&cmd, deadline).await,
                Ok(Some(_)) => self.forward(&cmd, deadline).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(written) => return Ok(written),
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry {
                    attempted: a,
                    why: w,
                }) => {
                    attempted |= a;
                    why = w;
                }
            }
            if Instant::now() >= deadline {
                return Err(if attempted {
                    Error::OutcomeUnknown(why)
                } else {
                    Error::Unavailable(why)
                });
            }
            self.wait_for_change(deadline).await;
        }
    }

    /// `None` when this node leads; the leader and its address when another node does; a
    /// retry when no leader (or its address) is known.
    fn other_leader(&self) -> Result<Option<(NodeId, Member)>, Attempt> {
        match self.leader() {
            Some((leader, _)) if leader == self.id => Ok(None),
            Some((leader, Some(member))) => Ok(Some((leader, member))),
            Some((leader, None)) => Err(Attempt::Retry {
                attempted: false,
                why: format!("leader {leader} is not in this node's membership yet"),
            }),
            None => Err(Attempt::Retry {
                attempted: false,
                why: "no leader is known".into(),
            }),
        }
    }

    /// One attempt at a write through the leader, in the next forwarded batch.
    async fn forward(&self, cmd: &Command, deadline: Instant) -> Result<Written, Attempt> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        let queued = Forwarding {
            cmd: cmd.clone(),
            deadline,
            answer,
            state: state.clone(),
        };
        let sent = self.forwards.send(queued).is_ok();
        let late = Attempt::Retry {
            attempted: true,
            why: "the leader did not answer before the deadline".into(),
        };
        let outcome = answer_of(sent, answered, deadline, late).await;
        if matches!(outcome, Err(Attempt::Retry { .. }))
            && state
                .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // It never left this node, and now never will.
            return Err(Attempt::Retry {
                attempted: false,
                why: "the deadline passed while the write waited for earlier forwarded writes"
                    .into(),
            });
        }
        outcome
    }

    /// Sends one batch of forwarded writes to the leader and answers each of them.
    async fn send_forwards(&self, batch: Vec<Forwarding>) {
        let mut asked = 0;
        let outcome: Result<Vec<Result<Written, Attempt>>, Attempt> = match self.other_leader() {
            Ok(Some((leader, member))) => {
                asked = leader;
                let deadline = batch
                    .iter()
                    .map(|f| f.deadline)
                    .max()
                    .unwrap_or_else(Instant::now);
                let payload: Vec<(&Command, u64)> = batch
                    .iter()
                    .map(|f| (&f.cmd, remaining(f.deadline).as_millis() as u64))
                    .collect();
                self.call_leader(leader, &member, deadline, payload, |mut c, p| async move {
                    c.forward_batch(p).await
                })
                .await
            }
            // This node became the leader, or lost track of it, since the writes queued:
            // each retries.
            Ok(None) => Err(Attempt::Retry {
                attempted: false,
                why: "this node became the leader".into(),
            }),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(outcomes) if outcomes.len() == batch.len() => {
                for (f, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = f.answer.send(from_leader(asked, outcome));
                }
            }
            Ok(outcomes) => {
                let why = format!(
                    "the leader answered {} of {} forwarded writes",
                    outcomes.len(),
                    batch.len()
                );
                for f in batch {
                    let _ = f.answer.send(Err(Attempt::Retry {
                        attempted: true,
                        why: why.clone(),
                    }));
                }
            }
            Err(e) => {
                for f in batch {
                    let _ = f.answer.send(Err(e.clone()));
                }
            }
        }
    }

    /// One proposal on this node as leader.
    pub(crate) async fn propose(
        &self,
        cmd: &Command,
        deadline: Instant,
    ) -> Result<Written, Attempt> {
        if let Some(why) = self.quorum_lost() {
            return Err(Attempt::Retry {
                attempted: false,
                why,
            });
        }
        match tokio::time::timeout(remaining(deadline), self.raft.client_write(cmd.clone())).await {
            Err(_) => Err(Attempt::Retry {
                attempted: true,
                why: "the entry was not committed before the deadline".into(),
            }),
            Ok(Ok(resp)) => Ok(Written {
                result: resp.data,
                index: resp.log_id.index,
            }),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                Err(Attempt::Retry {
                    attempted: false,
                    why: "leadership changed".into(),
                })
            }
            Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)))) => {
                Err(Attempt::Retry {
                    attempted: true,
                    why: "the leader changed before the entry committed".into(),
                })
            }
            Ok(Err(RaftError::APIError(e))) => Err(Attempt::Fail(Error::Invalid(e.to_string()))),
            Ok(Err(RaftError::Fatal(e))) => Err(Attempt::Fail(Error::Fatal(e.to_string()))),
        }
    }

    /// On a leader of a multi-voter cluster: why it cannot commit now (no quorum heard from
    /// within two election timeouts), if so.
    pub fn quorum_lost(&self) -> Option<String> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        if m.state != ServerState::Leader || m.membership_config.voter_ids().count() < 2 {
            return None;
        }
        let limit = Duration::from_millis(self.settings.election_timeout_ms.saturating_mul(4));
        match &m.last_quorum_acked {
            Some(at) if at.elapsed() <= limit => None,
            Some(at) => Some(format!(
                "the leader has not heard from a quorum for {} ms",
                at.elapsed().as_millis()
            )),
            None => None,
        }
    }

    async fn call_leader<Req, Resp, F, Fut>(
        &self,
        leader: NodeId,
        member: &Member,
        deadline: Instant,
        req: Req,
        call: F,
    ) -> Result<Resp, Attempt>
    where
        Req: Serialize,
        Resp: serde::de::DeserializeOwned,
        F: FnOnce(crate::pb::peer_client::PeerClient<tonic::transport::Channel>, Payload) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Payload>, tonic::Status>>,
    {
        let client = self
            .pool
            .client(&member.peer_addr)
            .map_err(|why| Attempt::Retry {
                attempted: false,
                why,
            })?;
        let data = encode(&req).map_err(|s| Attempt::Fail(Error::Invalid(s.message().into())))?;
        let response = match tokio::time::timeout(
            remaining(deadline),
            call(
                client,
                Payload {
                    data,
                    ..Payload::default()
                },
            ),
        )
        .await
        {
            Err(_) => {
                return Err(Attempt::Retry {
                    attempted: true,
                    why: format!("leader {leader} did not answer before the deadline"),
                });
            }
            Ok(Err(status)) => {
                self.pool.refused(&member.peer_addr, &status);
                // A refused connection (or certificate) never reached the leader; anything
                // else might have.
                let connect = (status.code() == tonic::Code::Unavailable
                    && status.message().contains("connect"))
                    || status.code() == tonic::Code::Unauthenticated;
                return Err(Attempt::Retry {
                    attempted: !connect,
                    why: format!("leader {leader} unreachable: {}", status.message()),
                });
            }
            Ok(Ok(r)) => r,
        };
        let result: Result<Resp, Attempt> =
            decode(&response.into_inner().data).map_err(|s| Attempt::Retry {
                attempted: true,
                why: s.message().to_string(),
            })?;
        from_leader(leader, result)
    }

    /// Makes local reads linearizable: obtains a read index (from the leader when this node
    /// follows, confirmed by a quorum heartbeat) and waits until this node applied it. Returns
    /// the read index.
    pub async fn linearize(&self) -> Result<u64, Error> {
        // A deliberately broken mode for tests: skip the read index and serve local state, the
        // bug Jepsen found in etcd 0.4 (compiled in only with the `failpoints` feature).
        fail::fail_point!("raft::linearize_local", |_| Ok(self.status().applied));
        let _permit = self.read_permits.try_acquire().map_err(|_| {
            Error::Overloaded(format!(
                "{} linearizable reads",
                self.settings.max_pending_reads
            ))
        })?;
        let deadline = Instant::now() + self.settings.read_timeout;
        let mut why;
        loop {
            let outcome = self.shared_read_index(deadline).await;
            match outcome {
                Ok(log_id) => return self.await_applied(log_id, deadline).await,
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry { why: w, .. }) => why = w,
            }
            // Returns at once when the deadline has passed; checked after it, so that a read
            // never registers for a round past its deadline.
            self.wait_for_change(deadline).await;
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "no linearizable read index within {} ms: {why}",
                    self.settings.read_timeout.as_millis()
                )));
            }
        }
    }

    /// (writes this node forwarded to the leader, batches that carried them) since it started:
    /// the second grows slower than the first when concurrent writes share batches.
    pub fn forward_counts(&self) -> (u64, u64) {
        (
            self.share_counts.forwarded.load(Ordering::Relaxed),
            self.share_counts.batches.load(Ordering::Relaxed),
        )
    }

    /// (`StreamAppend` streams that brought this node entries, messages on them that carried
    /// entries) since it started: a leader keeps one stream per replication session, so the
    /// first grows far slower than the second.
    pub fn append_counts(&self) -> (u64, u64) {
        (
            self.share_counts.append_streams.load(Ordering::Relaxed),
            self.share_counts.append_messages.load(Ordering::Relaxed),
        )
    }

    /// (linearizable reads that waited for a read index, read-index rounds fetched for them)
    /// since this node started: the second grows slower than the first when concurrent reads
    /// share rounds.
    pub fn read_index_counts(&self) -> (u64, u64) {
        (
            self.share_counts.reads.load(Ordering::Relaxed),
            self.share_counts.rounds.load(Ordering::Relaxed),
        )
    }

    /// One attempt at a read index, shared with the reads waiting at the same time: the
    /// waiter joins the next fetch, which starts after it registered (a fetch already under
    /// way may have been answered before this read began, so it would not order it).
    async fn shared_read_index(&self, deadline: Instant) -> Result<LogId, Attempt> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let sent = self
            .read_waiters
            .send(ReadWaiter { deadline, answer })
            .is_ok();
        // A round under way when this read registered may run until the later deadline of its
        // own reads; this read waits no longer than its own.
        let late = Attempt::Retry {
            attempted: false,
            why: "no read index was fetched before the deadline".into(),
        };
        answer_of(sent, answered, deadline, late).await
    }

    /// One attempt at a read index: at this node if it leads, else asked of the leader.
    async fn fetch_read_index(&self, deadline: Instant) -> Result<LogId, Attempt> {
        match self.leader() {
            Some((leader, _)) if leader == self.id => self.read_index_local(deadline).await,
            Some((leader, Some(member))) => {
                self.call_leader(
                    leader,
                    &member,
                    deadline,
                    remaining(deadline).as_millis() as u64,
                    |mut c, p| async move { c.read_index(p).await },
                )
                .await
            }
            _ => Err(Attempt::Retry {
                attempted: false,
                why: "no leader is known".into(),
            }),
        }
    }

    /// The read index on this node as leader.
    pub(crate) async fn read_index_local(&self, deadline: Instant) -> Result<LogId, Attempt> {
        match tokio::time::timeout(
            remaining(deadline),
            self.raft.get_read_log_id(ReadPolicy::ReadIndex),
        )
        .await
        {
            Err(_) => Err(Attempt::Retry {
                attempted: false,
                why: "the leader could not confirm its leadership with a quorum in time".into(),
            }),
            Ok(Ok((read_log_id, _))) => Ok(*read_log_id.log_id()),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_)))) => {
                Err(Attempt::Retry {
                    attempted: false,
                    why: "leadership changed".into(),
                })
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(e)))) => {
                Err(Attempt::Retry {
                    attempted: false,
                    why: e.to_string(),
                })
            }
            Ok(Err(RaftError::Fatal(e))) => Err(Attempt::Fail(Error::Fatal(e.to_string()))),
        }
    }

    async fn await_applied(&self, log_id: LogId, deadline: Instant) -> Result<u64, Error> {
        let linearizer = Linearizer::new(self.id, ReadLogId::from_log_id(log_id), None);
        match linearizer
            .try_await_ready(&self.raft, Some(remaining(deadline)))
            .await
        {
            Ok(Ok(_)) => Ok(log_id.index),
            Ok(Err(state)) => Err(Error::Unavailable(format!(
                "this node has applied up to {:?} but the read index is {}; it is catching up",
                state.applied().map(|l| l.index),
                log_id.index
            ))),
            Err(e) => Err(Error::Fatal(e.to_string())),
        }
    }

    /// Changes the membership through the leader. Changes are serialized at the leader. A new
    /// learner must be running: it is asked for its id and incarnation first.
    pub async fn change_membership(&self, mut change: MembershipChange) -> Result<u64, Error> {
        if let MembershipChange::AddLearner { id, member } = &mut change {
            // The new node may still be starting: give it a few seconds to answer.
            let deadline = Instant::now() + Duration::from_secs(10);
            let info = loop {
                match self.peer_info(&member.peer_addr).await {
                    Ok(info) => break info,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(Error::Unavailable(format!(
                            "the new node must be running to be added: {e}"
                        )));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            if info.id != *id {
                return Err(Error::Invalid(format!(
                    "the node at {} is node {}, not node {id}",
                    member.peer_addr, info.id
                )));
            }
            if info.initialized {
                return Err(Error::Invalid(format!(
                    "the node at {} already belongs to a cluster; a new member starts with an empty data directory",
                    member.peer_addr
                )));
            }
            member.incarnation = info.incarnation;
        }
        let deadline = Instant::now() + self.settings.membership_timeout;
        let mut why;
        loop {
            let outcome = match self.leader() {
                Some((leader, _)) if leader == self.id => {
                    self.change_membership_local(change.clone(), deadline).await
                }
                Some((leader, Some(member))) => {
                    self.call_leader(
                        leader,
                        &member,
                        deadline,
                        (change.clone(), remaining(deadline).as_millis() as u64),
                        |mut c, p| async move { c.admin(p).await },
                    )
                    .await
                }
                _ => Err(Attempt::Retry {
                    attempted: false,
                    why: "no leader is known".into(),
                }),
            };
            match outcome {
                Ok(index) => return Ok(index),
                Err(Attempt::Fail(e)) => return Err(e),
                // Membership changes carry no request id: only retry what was never proposed.
                Err(Attempt::Retry {
                    attempted: true,
                    why,
                }) => {
                    return Err(Error::OutcomeUnknown(why));
                }
                Err(Attempt::Retry { why: w, .. }) => why = w,
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(why));
            }
            self.wait_for_change(deadline).await;
        }
    }

    pub(crate) async fn change_membership_local(
        &self,
        change: MembershipChange,
        deadline: Instant,
    ) -> Result<u64, Attempt> {
        let _serial = match tokio::time::timeout(remaining(deadline), self.admin_lock.lock()).await
        {
            Ok(g) => g,
            Err(_) => {
                return Err(Attempt::Retry {
                    attempted: false,
                    why: "another membership change is still running".into(),
                });
            }
        };
        tracing::info!(?change, "membership change");
        let fut = async {
            match change {
                MembershipChange::AddLearner { id, member } => {
                    self.raft.add_learner(id, member, true).await
                }
                MembershipChange::Promote { id } => {
                    self.raft
                        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                        .await
                }
                MembershipChange::Remove { id } => {
                    let is_voter = self.raft.voter_ids().any(|v| v == id);
                    let change = if is_voter {
                        ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                    } else {
                        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                    };
                    self.raft.change_membership(change, false).await
                }
            }
        };
        match tokio::time::timeout(remaining(deadline), fut).await {
            Err(_) => Err(Attempt::Retry {
                attempted: true,
                why: "the membership change did not complete before the deadline".into(),
            }),
            Ok(Ok(resp)) => Ok(resp.log_id.index),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                Err(Attempt::Retry {
                    attempted: false,
                    why: "leadership changed".into(),
                })
            }
            Ok(Err(RaftError::APIError(e))) => Err(Attempt::Fail(Error::Invalid(e.to_string()))),
            Ok(Err(RaftError::Fatal(e))) => Err(Attempt::Fail(Error::Fatal(e.to_string()))),
        }
    }

    /// The leader this node knows of, cheaply (for per-request headers).
    pub fn leader_id(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    /// The highest log index applied to this node's state machine, cheaply.
    pub fn applied_index(&self) -> u64 {
        self.raft
            .metrics()
            .borrow_watched()
            .last_applied
            .map_or(0, |l| l.index)
    }

    /// Where this node's current membership was decided (the log id of its entry: index,
    /// term and the leader that proposed it; `None` before any), cheaply: it changes whenever
    /// the membership does.
    pub fn membership_position(&self) -> Option<(u64, u64, NodeId)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        m.membership_config
            .log_id()
            .as_ref()
            .map(|l| (l.index, l.leader_id.term, l.leader_id.node_id))
    }

    /// This node's view of the cluster (builds member maps: not for per-request use).
    pub fn status(&self) -> NodeStatus {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut voter_map = BTreeMap::new();
        let mut learner_map = BTreeMap::new();
        for (id, node) in membership.nodes() {
            if voters.contains(id) {
                voter_map.insert(*id, node.clone());
            } else {
                learner_map.insert(*id, node.clone());
            }
        }
        let index = |l: &Option<LogId>| l.map_or(0, |l| l.index);
        NodeStatus {
            id: self.id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            committed: index(&m.local_committed),
            applied: index(&m.last_applied),
            snapshot: index(&m.snapshot),
            purged: index(&m.purged),
            voters: voter_map,
            learners: learner_map,
            replication: m
                .replication
                .as_ref()
                .map(|r| r.iter().map(|(id, l)| (*id, index(l))).collect())
                .unwrap_or_default(),
            last_contact: m
                .heartbeat
                .as_ref()
                .map(|h| {
                    h.iter()
                        .filter(|(id, _)| **id != self.id)
                        .map(|(id, at)| (*id, at.as_ref().map(|at| at.elapsed())))
                        .collect()
                })
                .unwrap_or_default(),
            fatal: m.running_state.as_ref().err().map(|e| e.to_string()),
        }
    }

    /// Asks Raft to build a snapshot now (and compact the log behind it).
    pub async fn trigger_snapshot(&self) -> Result<(), Error> {
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Error::Fatal(e.to_string()))
    }

    /// On a leader with other voters: hands leadership to the most up-to-date voter that
    /// answered lately and waits (at most `timeout`) until this node is no longer leader.
    /// Returns the voter it chose, or `None` when there was nothing to hand over. A node about
    /// to stop calls this first, so its followers do not wait an election timeout for a leader.
    pub async fn hand_over_leadership(&self, timeout: Duration) -> Option<NodeId> {
        let s = self.status();
        if s.leader != Some(self.id) {
            return None;
        }
        let to = s
            .voters
            .keys()
            .filter(|id| **id != self.id)
            .filter(|id| {
                s.last_contact.get(id).copied().flatten().is_some_and(|d| {
                    d < Duration::from_millis(self.settings.election_timeout_ms * 2)
                })
            })
            .max_by_key(|id| s.replication.get(id).copied().unwrap_or(0))
            .copied()?;
        match tokio::time::timeout(timeout, self.raft.trigger().transfer_leader(to)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot hand over leadership");
                return None;
            }
            Err(_) => {
                tracing::warn!("leadership hand-over not taken within {timeout:?}");
                return None;
            }
        }
        let deadline = Instant::now() + timeout;
        while self.leader_id() == Some(self.id) && Instant::now() < deadline {
            self.wait_for_change(deadline).await;
        }
        Some(to)
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}
