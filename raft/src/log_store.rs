//! [`RaftLogStorage`] over [`coffer_storage::Store`].
//!
//! To ensure correctness:
//! * `append` returns once the entries are readable (held in memory by the store until its
//!   flusher thread writes them) and completes the `IOFlushed` callback only after that write
//!   and its fsync, so an entry is never acknowledged to the leader before it is on disk, and
//!   many appends share one write and one fsync.
//! * `save_vote`, `truncate_after` and `purge` are durable on return.
//! * `save_committed` is not durable on its own (it is written with the next append's commit);
//!   losing it only means re-applying after a crash, and `read_committed` ignores a committed
//!   log id whose entry the log does not hold (its append had not reached the disk).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use coffer_storage::Store;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};

use crate::codec::{decode_io, encode_io};
use crate::types::{Entry, LogId, TypeConfig, Vote};

const VOTE: &str = "raft_vote";
const COMMITTED: &str = "raft_committed";
const PURGED: &str = "raft_purged";

/// The Raft log of one node.
#[derive(Debug, Clone)]
pub struct LogStore {
    store: Store,
}

impl LogStore {
    /// A log over `store`.
    pub fn new(store: Store) -> LogStore {
        LogStore { store }
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        match self.store.meta_get(key)? {
            Some(bytes) => Ok(Some(decode_io(&bytes)?)),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        let raw = self.store.log_range(start, end)?;
        let mut out = Vec::with_capacity(raw.len());
        for (index, bytes) in raw {
            let entry: Entry = decode_io(&bytes)?;
            if entry.log_id.index != index {
                return Err(io::Error::other(format!(
                    "log entry stored at index {index} has log id {}",
                    entry.log_id
                )));
            }
            out.push(entry);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.meta(VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let purged: Option<LogId> = self.meta::<Option<LogId>>(PURGED)?.flatten();
        let last = match self.store.log_last()? {
            Some((_, bytes)) => Some(decode_io::<Entry>(&bytes)?.log_id),
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        self.store.meta_put(VOTE, &encode_io(vote)?, true)?;
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        self.store
            .meta_put(COMMITTED, &encode_io(&committed)?, false)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        let Some(committed) = self.meta::<Option<LogId>>(COMMITTED)?.flatten() else {
            return Ok(None);
        };
        // Written lazily with the next append's commit, it may name an entry whose append was
        // still queued when the process stopped. openraft re-applies the log up to it on start,
        // so it counts only if this log holds that very entry; otherwise the state machine's
        // own position is where the node restarts from (the leader sends the rest).
        let held = self.store.log_range(committed.index, committed.index + 1)?;
        match held.first() {
            Some((_, bytes)) if decode_io::<Entry>(bytes)?.log_id == committed => {
                Ok(Some(committed))
            }
            _ => Ok(None),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            encoded.push((entry.log_id.index, encode_io(&entry)?));
        }
        // Readable on return; the flusher thread writes it, with every append queued
        // meanwhile, in one write and one fsync of the log file.
        self.store.append(encoded, move |r| {
            callback.io_completed(r.map_err(io::Error::from));
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        self.store.truncate_from(from)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let index = log_id.index;
        self.store
            .purge_through(index, PURGED, &encode_io(&Some(log_id))?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use coffer_storage::{Backend, StoreConfig};
    use openraft::testing::{blank_ent, log_id};

    use super::*;

    #[tokio::test]
    async fn a_committed_id_counts_only_when_the_log_holds_its_entry() {
        let store = Store::open(StoreConfig::new(Backend::Memory)).expect("store");
        let mut log = LogStore::new(store.clone());
        let committed = log_id::<TypeConfig>(2, 1, 5);
        // As after a crash before the append of entry 5 reached the disk.
        log.save_committed(Some(committed)).await.expect("save");
        assert_eq!(log.read_committed().await.expect("read"), None);
        // Another term's entry at that index is not the committed one either.
        let append = |entry: Entry| {
            let (tx, rx) = std::sync::mpsc::channel();
            let bytes = encode_io(&entry).expect("encode");
            store.append(vec![(entry.log_id.index, bytes)], move |r| {
                tx.send(r.is_ok()).expect("send")
            });
            assert!(rx.recv().expect("flushed"));
        };
        append(blank_ent::<TypeConfig>(1, 1, 5));
        assert_eq!(log.read_committed().await.expect("read"), None);
        append(blank_ent::<TypeConfig>(2, 1, 5));
        assert_eq!(log.read_committed().await.expect("read"), Some(committed));
    }
}
