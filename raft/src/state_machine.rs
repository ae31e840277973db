//! [`RaftStateMachine`] over [`coffer_storage::Store`].
//!
//! To ensure correctness:
//! * A batch of entries is applied in one redb write transaction together with the last applied
//!   log id and membership, so the state and its position never disagree.
//! * Those writes become durable with the store's next state sync (at most about a second later;
//!   the log has a file of its own); after a crash the state may be behind the log and openraft
//!   re-applies the committed entries (apply is deterministic and deduplicates request ids, so
//!   re-applying is safe).
//! * A snapshot is an image read in one MVCC read transaction (the state keeps being served and
//!   written while it is built) and saved durably; installing one replaces the state atomically.

use std::io;

use coffer_storage::{ApplyInput, Store};
use futures::TryStreamExt;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};

use crate::codec::{decode_io, encode_io};
use crate::types::{LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig, no_op_result};

const APPLIED: &str = "raft_applied";
const MEMBERSHIP: &str = "raft_membership";

/// The replicated state machine of one node.
#[derive(Debug, Clone)]
pub struct StateMachine {
    store: Store,
}

impl StateMachine {
    /// A state machine over `store`.
    pub fn new(store: Store) -> StateMachine {
        StateMachine { store }
    }
}

fn read_position(view: &coffer_storage::ReadView) -> io::Result<(Option<LogId>, StoredMembership)> {
    let applied = match view.sm_meta(APPLIED)? {
        Some(b) => decode_io::<Option<LogId>>(&b)?,
        None => None,
    };
    let membership = match view.sm_meta(MEMBERSHIP)? {
        Some(b) => decode_io::<StoredMembership>(&b)?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        read_position(&self.store.read()?)
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        let mut batch = Vec::new();
        while let Some(item) = entries.try_next().await? {
            batch.push(item);
        }
        let Some(last) = batch.last().map(|(e, _)| e.log_id) else {
            return Ok(());
        };
        let mut membership = None;
        let inputs: Vec<ApplyInput<'_>> = batch
            .iter()
            .map(|(entry, _)| match &entry.payload {
                EntryPayload::Normal(cmd) => ApplyInput::Command(cmd),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                    ApplyInput::Skip
                }
                EntryPayload::Blank => ApplyInput::Skip,
            })
            .collect();
        let applied = encode_io(&Some(last))?;
        let membership_bytes = membership.as_ref().map(encode_io).transpose()?;
        let mut meta: Vec<(&str, &[u8])> = vec![(APPLIED, applied.as_slice())];
        if let Some(m) = &membership_bytes {
            meta.push((MEMBERSHIP, m.as_slice()));
        }
        // A direct call: applying changes memory only (the store writes it to its file in a
        // periodic sync) and never waits for a disk. Handing the worker over with
        // block_in_place was measured to triple the write latency.
        let results = self.store.apply(&inputs, &meta)?;
        drop(inputs);
        for ((_, responder), result) in batch.into_iter().zip(results) {
            if let Some(responder) = responder {
                responder.send(result.unwrap_or_else(no_op_result));
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Vec<u8>) -> io::Result<()> {
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = snapshot.len(), "installing snapshot");
        let index = meta.last_log_id.map_or(0, |l| l.index);
        let (store, meta_bytes) = (self.store.clone(), encode_io(meta)?);
        // Installing a large image blocks for a while: keep it off the async workers.
        tokio::task::spawn_blocking(move || store.install_snapshot(index, &meta_bytes, &snapshot))
            .await
            .map_err(io::Error::other)??;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        match self.store.current_snapshot()? {
            Some((meta, data)) => Ok(Some(Snapshot {
                meta: decode_io(&meta)?,
                snapshot: data,
            })),
            None => Ok(None),
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let store = self.store.clone();
        let (meta, image) = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let (image, view) = store.export_image()?;
            let (last_log_id, last_membership) = read_position(&view)?;
            drop(view);
            let meta = SnapshotMeta {
                last_log_id,
                last_membership,
            };
            let index = meta.last_log_id.map_or(0, |l| l.index);
            let saved = store.save_snapshot(index, &encode_io(&meta)?, &image)?;
            if !saved {
                tracing::info!(
                    index,
                    "a newer snapshot was installed meanwhile; this one is not kept"
                );
            }
            Ok((meta, image))
        })
        .await
        .map_err(io::Error::other)??;
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = image.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: image,
        })
    }
}
