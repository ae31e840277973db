//! [`RaftStateMachine`] over [`coffer_storage::Store`].
//!
//! To ensure correctness:
//! * A batch of entries is applied in one redb write transaction together with the last applied
//!   log id and membership, so the state and its position never disagree.
//! * Those writes become durable with the store's next state sync (at most about a second later;
//!   the log has a file of its own); after a crash the state may be behind the log and openraft
//!   re-applies the committed entries (apply is deterministic and deduplicates request ids, so
//!   re-applying is safe).
//! * A snapshot copies nothing: taking one makes the applied state durable and records the
//!   position, and the state file is the snapshot's data from then on (it holds that state or a
//!   later one, and the log before it may be purged). A peer that needs the snapshot gets an
//!   image read in one MVCC read transaction when it is sent ([`export_snapshot`]), with that
//!   image's own position. Installing one replaces the state atomically.

use std::io;

use coffer_storage::{ApplyInput, Store};
use futures::TryStreamExt;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};

use crate::codec::{decode_io, encode_io};
use crate::types::{
    LogId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig, no_op_result,
};

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

/// An image of the whole state machine as it is now, with the position it was taken at: what a
/// peer installs. Reads every table, on a blocking thread.
pub(crate) async fn export_snapshot(store: Store) -> io::Result<(SnapshotMeta, Vec<u8>)> {
    tokio::task::spawn_blocking(move || {
        let (image, view) = store.export_image()?;
        let (last_log_id, last_membership) = read_position(&view)?;
        Ok((
            SnapshotMeta {
                last_log_id,
                last_membership,
            },
            image,
        ))
    })
    .await
    .map_err(io::Error::other)?
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
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

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> io::Result<()> {
        let (meta, image) = match snapshot {
            SnapshotData::Image(image) => (meta.clone(), image),
            // openraft installs the current snapshot on start only when the state is behind
            // it, which recording a snapshot with the state it was taken from rules out.
            SnapshotData::Local(store) if store.is_same(&self.store) => {
                return Err(io::Error::other(format!(
                    "the state file is behind its own snapshot at {:?}; restore this node from a \
                     peer (remove its data directory and add it again)",
                    meta.last_log_id
                )));
            }
            // Another node's store in this process (openraft's storage suite): install an
            // image of it, at that image's own position, as a peer would receive it.
            SnapshotData::Local(store) => export_snapshot(store).await?,
        };
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = image.len(), "installing snapshot");
        let index = meta.last_log_id.map_or(0, |l| l.index);
        let (store, meta_bytes) = (self.store.clone(), encode_io(&meta)?);
        // Installing a large image blocks for a while: keep it off the async workers.
        tokio::task::spawn_blocking(move || store.install_snapshot(index, &meta_bytes, &image))
            .await
            .map_err(io::Error::other)??;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        match self.store.current_snapshot()? {
            Some(meta) => Ok(Some(Snapshot {
                meta: decode_io(&meta)?,
                snapshot: SnapshotData::Local(self.store.clone()),
            })),
            None => Ok(None),
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    /// Makes the applied state durable and records its position as the snapshot: no image is
    /// written (a whole image per snapshot was measured to double the write tail).
    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let store = self.store.clone();
        let meta = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let (last_log_id, last_membership) = read_position(&store.read()?)?;
            let meta = SnapshotMeta {
                last_log_id,
                last_membership,
            };
            let index = meta.last_log_id.map_or(0, |l| l.index);
            // The sync writes every change applied so far, so the file holds this position or
            // a later one.
            if !store.save_snapshot(index, &encode_io(&meta)?)? {
                tracing::info!(
                    index,
                    "a newer snapshot was installed meanwhile; this one is not kept"
                );
            }
            Ok(meta)
        })
        .await
        .map_err(io::Error::other)??;
        tracing::info!(last_log_id = ?meta.last_log_id, "took snapshot");
        Ok(Snapshot {
            meta,
            snapshot: SnapshotData::Local(self.store.clone()),
        })
    }
}
