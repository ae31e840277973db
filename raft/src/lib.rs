//! Coffer's replication layer: openraft over [`coffer_storage`], a tonic network between nodes,
//! forwarding of writes to the leader, linearizable reads on any node, membership changes.
//!
//! **Architecture invariant:** this crate knows nothing of secrets, authentication, policies or
//! the public API. It replicates [`coffer_storage::Command`]s and answers with their results.
//!
//! **API boundary:** [`RaftNode`] (write, linearize, membership, status) and
//! [`PeerService::server`] (to be served behind mutual TLS on the peer port).
#![forbid(unsafe_code)]

mod codec;
mod log_store;
mod network;
mod node;
mod service;
mod state_machine;
mod tap;
mod types;

/// Generated peer protocol.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("coffer.peer.v1");
}

use std::time::Duration;

pub use log_store::LogStore;
pub use network::{MAX_PEER_MESSAGE, Network, PeerPool};
pub use node::{
    AppHandler, Changes, MembershipChange, NodeStatus, PeerIdentity, PeerRecheck, RaftNode, Written,
};
pub use service::PeerService;
pub use state_machine::StateMachine;
pub use types::{LogId, Member, NodeId, NodeInfo, TypeConfig};

/// Tuning of one node's Raft.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Minimum election timeout (the maximum is twice this).
    pub election_timeout_ms: u64,
    /// Build a snapshot (and compact the log) after this many entries; 0 never.
    pub snapshot_logs: u64,
    /// Entries kept in the log behind a snapshot, so slightly lagging followers need no snapshot.
    pub logs_to_keep: u64,
    /// How long a write may wait for a leader and a commit.
    pub write_timeout: Duration,
    /// How long a linearizable read may wait for a read index.
    pub read_timeout: Duration,
    /// How long a membership change may take.
    pub membership_timeout: Duration,
    /// Time limit for sending a snapshot to a peer.
    pub snapshot_timeout: Duration,
    /// Writes in flight on this node beyond which new ones are refused at once.
    pub max_pending_writes: usize,
    /// Linearizable reads waiting for a read index on this node beyond which new ones are
    /// refused at once.
    pub max_pending_reads: usize,
    /// The largest encoded log entry to expect (bounds append batches).
    pub max_entry_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat_ms: 100,
            election_timeout_ms: 500,
            snapshot_logs: 10_000,
            logs_to_keep: 1_000,
            write_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            membership_timeout: Duration::from_secs(30),
            snapshot_timeout: Duration::from_secs(120),
            max_pending_writes: 4096,
            max_pending_reads: 8192,
            max_entry_bytes: 2 << 20,
        }
    }
}

/// Errors of the replication layer. Every message says what happened and what to do.
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Error {
    /// Nothing was applied; retry later (no leader, no quorum, node catching up).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The write may or may not have been applied; retrying with the same request id applies
    /// it at most once.
    #[error("outcome unknown: {0}; retry with the same request id to apply it at most once")]
    OutcomeUnknown(String),
    /// Too many requests in flight on this node.
    #[error("overloaded: {0} already in flight on this node; retry with backoff")]
    Overloaded(String),
    /// A request Raft refuses (e.g. promoting a node that is not a learner).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Raft or storage stopped on this node; it must be restarted.
    #[error("this node stopped serving: {0}")]
    Fatal(String),
    /// A bad Raft configuration.
    #[error("invalid raft configuration: {0}")]
    Config(String),
}
