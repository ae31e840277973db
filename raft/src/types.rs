//! The openraft type configuration and the small types that cross the peer wire.

use serde::{Deserialize, Serialize};

pub use coffer_storage::{Command, TxnResult};

/// A cluster member's addresses, as stored in the Raft membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `host:port` of the node-to-node (peer) listener.
    pub peer_addr: String,
    /// `host:port` of the client API listener.
    pub api_addr: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer={} api={}", self.peer_addr, self.api_addr)
    }
}

openraft::declare_raft_types!(
    /// Coffer's Raft types: the log carries state machine [`Command`]s and answers
    /// [`TxnResult`]s; nodes are numbered and carry their [`Member`] addresses.
    pub TypeConfig:
        D = Command,
        R = TxnResult,
        NodeId = u64,
        Node = Member,
);

/// Node ids are positive integers chosen by the operator (stable across restarts).
pub type NodeId = u64;
/// A log id (leader id and index).
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A log entry.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// A vote.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// The membership as stored with its log id.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot whose data is the storage layer's state machine image.
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, Vec<u8>>;

/// The response given for log entries that are not commands (blank, membership).
pub(crate) fn no_op_result() -> TxnResult {
    TxnResult {
        succeeded: true,
        revision: 0,
        results: Vec::new(),
    }
}
