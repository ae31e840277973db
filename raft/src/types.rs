//! The openraft type configuration and the small types that cross the peer wire.

use serde::{Deserialize, Serialize};

pub use coffer_storage::{Command, TxnResult};

/// A cluster member's addresses and incarnation, as stored in the Raft membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `host:port` of the node-to-node (peer) listener.
    pub peer_addr: String,
    /// `host:port` of the client API listener.
    pub api_addr: String,
    /// The random id of the node's data directory, learned when the node joined. A node whose
    /// data directory was replaced has another one, and Raft messages meant for the old one are
    /// refused (openraft #898: a wiped node must never rejoin under its old id). 0: not known.
    pub incarnation: u64,
}

impl Member {
    /// A member whose incarnation is not known yet.
    pub fn new(peer_addr: impl Into<String>, api_addr: impl Into<String>) -> Member {
        Member {
            peer_addr: peer_addr.into(),
            api_addr: api_addr.into(),
            incarnation: 0,
        }
    }

    /// Whether both members have the same addresses (incarnations aside).
    pub fn same_addresses(&self, other: &Member) -> bool {
        self.peer_addr == other.peer_addr && self.api_addr == other.api_addr
    }
}

/// What a node says about itself on the peer port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its id.
    pub id: NodeId,
    /// Its data directory's incarnation.
    pub incarnation: u64,
    /// Whether its log holds a membership (it belongs to a cluster).
    pub initialized: bool,
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
/// A snapshot: its metadata and its data as this node holds it.
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// A snapshot's data as this node holds it.
#[derive(Debug)]
pub enum SnapshotData {
    /// An image of a whole state machine received from a leader, to install.
    Image(Vec<u8>),
    /// This node's own state file, which holds the snapshot's state or a later one (no copy
    /// is kept: the file is the snapshot, as etcd's bolt file is). A peer that needs it gets
    /// an image exported when it is sent, with that image's own, possibly later, position.
    Local(coffer_storage::Store),
}

/// The response given for log entries that are not commands (blank, membership).
pub(crate) fn no_op_result() -> TxnResult {
    TxnResult {
        succeeded: true,
        revision: 0,
        results: Vec::new(),
    }
}
