//! Coffer's persistence layer: per node, an append-only file for the Raft log and its metadata
//! (`wal`), and a redb database for the transaction state machine (an ordered, versioned
//! key/value store with compare-and-swap transactions and exactly-once request ids).
//!
//! **Architecture invariant:** this crate knows nothing of Raft, gRPC or secrets. Log entries,
//! votes, membership records and values are opaque bytes handed in by the layer above; the only
//! structure it understands is the [`Txn`] model and the request id used for deduplication.
//!
//! # Durability
//!
//! * [`Store::append`] makes entries readable at once and queues them for the flusher thread,
//!   whose next write to the log file holds every append queued meanwhile, followed by one
//!   `fdatasync`; each append's callback fires once its entries are on disk. Many appends share
//!   one fsync: this is the group commit the Raft layer relies on.
//! * Vote, truncation, purge, snapshot installation and snapshot saving are durable on return.
//! * State machine writes ([`Store::apply`]) go to memory: a layer of persistent maps over the
//!   state machine's file, which reads consult first. A thread of the store writes that layer
//!   to the file in one durable commit every second (when it changed), as does closing the store
//!   and saving a snapshot (so the file is never behind a saved snapshot). An apply never waits
//!   for a disk, and a durable log write never writes the state machine's pages (the log has
//!   its own file), as etcd commits its bolt database apart from its WAL. After a crash the
//!   state machine may be behind the log, and the Raft layer re-applies committed entries (they
//!   are deterministic).
//! * A commit that fails marks the store failed: every later call returns
//!   [`StorageError::Failed`] and the node must stop serving (redb refuses writes until the
//!   database is reopened, and a log write that failed may have left a partial record).
#![forbid(unsafe_code)]

mod dedup;
mod overlay;
mod store;
mod txn;
mod wal;

pub use store::{
    ApplyInput, Backend, Command, FlushEvent, FlushObserver, ReadView, RequestId, Store,
    StoreConfig,
};
pub use txn::{Compare, KvEntry, Op, OpResult, Txn, TxnResult};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The database file could not be opened or created.
    #[error("cannot open the database at {path}: {source}")]
    Open {
        /// The file.
        path: std::path::PathBuf,
        /// What redb reported.
        #[source]
        source: redb::DatabaseError,
    },
    /// An earlier write failed; the store refuses everything until the process restarts.
    #[error("storage failed earlier ({0}); this node stopped writing and must be restarted")]
    Failed(String),
    /// An error from redb.
    #[error("storage error: {0}")]
    Redb(#[from] redb::Error),
    /// A record that does not decode.
    #[error("corrupt record in table {table}: {reason}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What did not decode.
        reason: String,
    },
    /// The Raft log file could not be read or written.
    #[error("Raft log: {0}")]
    Log(#[from] std::io::Error),
    /// A snapshot image that does not decode or has an unknown format.
    #[error("invalid snapshot image: {0}")]
    BadSnapshot(String),
}

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        std::io::Error::other(e)
    }
}

/// Result alias of this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
