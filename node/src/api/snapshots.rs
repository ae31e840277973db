//! Backups through the `Cluster` service: `SnapshotSave` streams a backup file of the
//! replicated state, `SnapshotRestore` writes one into a cluster that was never initialized.
//! The file format and what a backup leaves out are in [`crate::backup`].

use super::*;
use crate::backup::{self, RESTORE_KEY, RestoreMarker, RestoreState};
use crate::seal::CONFIG_KEY;

/// Bytes per streamed chunk (well under the gRPC message limits).
pub(super) const CHUNK_BYTES: usize = 1 << 20;
/// A restore transaction carries at most this many bytes of records (or one larger record).
const BATCH_BYTES: usize = 512 << 10;

impl Api {
    /// A backup file of the state after a read index (administrators: `read` on
    /// [`RAFT_SNAPSHOT`]). Built in memory, like Raft's own snapshot images.
    pub(super) async fn backup_file<T: Sync>(&self, req: &Request<T>) -> Result<Vec<u8>, Status> {
        self.authorize(req, RAFT_SNAPSHOT, Capability::Read).await?;
        self.node.linearize().await.map_err(raft_status)?;
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || {
            let view = node.store().read()?;
            backup::build(&view, auth::now_ms())
        })
        .await
        .map_err(|e| Status::internal(format!("the backup task failed: {e}")))?
        .map_err(|e| Status::internal(format!("cannot build the backup: {e:#}")))
    }

    /// Restores the backup file sent in `stream` (see the proto for who may, and the refusals).
    pub(super) async fn restore_backup(
        &self,
        mut stream: tonic::Streaming<pb::SnapshotRestoreRequest>,
    ) -> Result<pb::SnapshotRestoreResponse, Status> {
        // Refused before the file is read, so that nobody can make an initialized node hold a
        // large upload (this call needs no session); one restore at a time per node.
        let already = |view: &coffer_storage::ReadView| -> Result<(), Status> {
            if view.get(CONFIG_KEY).map_err(storage_status)?.is_some() {
                return Err(Status::failed_precondition(
                    "this cluster is already initialized (it has a seal configuration): a snapshot is restored only into a new cluster that was never initialized, so that no data is overwritten; start a fresh cluster (new data directories) and restore into it",
                ));
            }
            Ok(())
        };
        already(&self.node.store().read().map_err(storage_status)?)?;
        let _one_at_a_time = self.restoring.try_lock().map_err(|_| {
            Status::failed_precondition(
                "another snapshot restore is running on this node; wait for it to end",
            )
        })?;
        let mut bytes = Vec::new();
        let mut signer = None;
        while let Some(msg) = stream.message().await? {
            signer.get_or_insert((msg.operator_index, msg.signature));
            if (bytes.len() + msg.data.len()) as u64 > backup::MAX_FILE_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "the backup file is larger than {} bytes, the most a node restores; nothing was restored",
                    backup::MAX_FILE_BYTES
                )));
            }
            bytes.extend_from_slice(&msg.data);
        }
        let (operator_index, signature) =
            signer.ok_or_else(|| Status::invalid_argument("no backup file was sent"))?;
        let file = backup::decode(&bytes)
            .map_err(|e| Status::invalid_argument(format!("{e:#}; nothing was restored")))?;
        drop(bytes);
        let config = file
            .seal_config()
            .map_err(|e| Status::invalid_argument(format!("{e:#}; nothing was restored")))?;
        let operator = self.check_restore_signature(&config, &file, operator_index, &signature)?;
        if let Some(missing) = backup::WRITTEN_LAST
            .iter()
            .find(|k| file.value(k).is_none())
        {
            return Err(Status::invalid_argument(format!(
                "the backup holds no {:?} record, without which the restored cluster could not be unsealed; nothing was restored",
                String::from_utf8_lossy(missing)
            )));
        }

        // Only into a cluster that was never initialized: nothing live is ever overwritten.
        self.node.linearize().await.map_err(raft_status)?;
        let view = self.node.store().read().map_err(storage_status)?;
        already(&view)?;
        let earlier = view.get(RESTORE_KEY).map_err(storage_status)?;
        drop(view);

        // 1. The marker: a restore is in progress (and a previous attempt that did not finish,
        //    the only thing an uninitialized cluster can hold, is wiped first).
        let mut marker = RestoreMarker {
            state: RestoreState::InProgress,
            checksum: file.checksum,
            source_revision: file.header.source_revision,
            started_ms: auth::now_ms(),
            operator: operator.clone(),
        };
        let mut begin = Vec::new();
        if earlier.is_some() {
            begin.push(Op::DeletePrefix { prefix: Vec::new() });
        }
        begin.push(Op::Put {
            key: RESTORE_KEY.to_vec(),
            value: encode_marker(&marker)?,
        });
        let started = self
            .restore_txn(
                vec![
                    Compare::Absent(CONFIG_KEY.to_vec()),
                    Compare::Version(RESTORE_KEY.to_vec(), earlier.map_or(0, |e| e.version)),
                ],
                begin,
            )
            .await?;
        let marker_revision = started.revision;
        let guard = || Compare::ModRevision(RESTORE_KEY.to_vec(), marker_revision);
        tracing::info!(
            records = file.records.len(),
            source_revision = file.header.source_revision,
            operator,
            "restoring a backup"
        );

        // 2. The records, in bounded transactions, each only while this restore's marker stands
        //    (a marker in the file, which `save` never writes, is not taken over).
        let total = file.records.len();
        let mut written = 0usize;
        let mut batch: Vec<Op> = Vec::new();
        let mut batch_bytes = 0usize;
        let body = file
            .records
            .iter()
            .filter(|(k, _)| !backup::WRITTEN_LAST.contains(&k.as_slice()) && k != RESTORE_KEY);
        for (key, value) in body {
            let size = key.len() + value.len();
            if !batch.is_empty() && (batch.len() >= MAX_TXN_OPS || batch_bytes + size > BATCH_BYTES)
            {
                written += batch.len();
                self.restore_batch(guard(), std::mem::take(&mut batch), written, total)
                    .await?;
                batch_bytes = 0;
            }
            batch.push(Op::Put {
                key: key.clone(),
                value: value.clone(),
            });
            batch_bytes += size;
        }
        if !batch.is_empty() {
            written += batch.len();
            self.restore_batch(guard(), batch, written, total).await?;
        }

        // Test builds: a restore that stops (a crash, a lost leader) just before it completes.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("backup::restore_last", |_| Err(stopped(
            Status::unavailable("failpoint backup::restore_last"),
            written,
            total
        )));

        // 3. Last, in one transaction: the keyring, the node CA and the seal configuration
        //    (from here on the cluster is initialized, and sealed), and the marker says done.
        marker.state = RestoreState::Complete;
        let mut last: Vec<Op> = backup::WRITTEN_LAST
            .iter()
            .filter_map(|k| {
                file.value(k).map(|v| Op::Put {
                    key: k.to_vec(),
                    value: v.to_vec(),
                })
            })
            .collect();
        last.push(Op::Put {
            key: RESTORE_KEY.to_vec(),
            value: encode_marker(&marker)?,
        });
        let done = self
            .restore_txn(vec![guard(), Compare::Absent(CONFIG_KEY.to_vec())], last)
            .await
            .map_err(|e| {
                if e.code() == tonic::Code::DeadlineExceeded {
                    // The last transaction's outcome is unknown: it may have committed.
                    Status::deadline_exceeded(format!(
                        "{} (the restore's last step may or may not have committed: `coffer status` shows in its SEAL column whether the cluster is initialized (sealed) or not (uninitialized); if it is not, run the restore again)",
                        e.message()
                    ))
                } else {
                    stopped(e, total, total)
                }
            })?;
        tracing::info!(
            records = total,
            revision = done.revision,
            "backup restored; the cluster is sealed"
        );
        Ok(pb::SnapshotRestoreResponse {
            records: total as u64,
            source_revision: file.header.source_revision,
            cluster_id: config.cluster_id,
            threshold: config.threshold,
            operator_names: config.operators.into_iter().map(|o| o.name).collect(),
            revision: done.revision,
        })
    }

    /// The name of the snapshot's operator `index` whose signature over the file's checksum
    /// `signature` is; PERMISSION_DENIED otherwise.
    fn check_restore_signature(
        &self,
        config: &crate::seal::SealConfig,
        file: &backup::Backup,
        index: u32,
        signature: &[u8],
    ) -> Result<String, Status> {
        let refuse = |why: String| {
            Status::permission_denied(format!(
                "{why}: a restore must be signed with the key of one of the snapshot's operators ({}); nothing was restored",
                config.operator_names()
            ))
        };
        let op = config
            .operators
            .get(index as usize)
            .ok_or_else(|| refuse(format!("the snapshot has no operator #{index}")))?;
        let key = PublicKey::from_bytes(&op.public_key)
            .map_err(|e| Status::invalid_argument(format!("the snapshot's operator key: {e:#}")))?;
        key.verify(&backup::restore_message(&file.checksum), signature)
            .map_err(|_| refuse(format!("the signature is not operator {}'s", op.name)))?;
        Ok(op.name.clone())
    }

    async fn restore_txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<Op>,
    ) -> Result<coffer_storage::TxnResult, Status> {
        let w = self
            .node
            .write(Command {
                request_id: None,
                txn: Txn {
                    compare,
                    success,
                    failure: Vec::new(),
                },
            })
            .await
            .map_err(raft_status)?;
        if !w.result.succeeded {
            return Err(Status::aborted(
                "another restore or an init started on this cluster meanwhile; check `coffer status` and, if the cluster is still uninitialized, run the restore again",
            ));
        }
        Ok(w.result)
    }

    async fn restore_batch(
        &self,
        guard: Compare,
        ops: Vec<Op>,
        written: usize,
        total: usize,
    ) -> Result<(), Status> {
        self.restore_txn(vec![guard], ops)
            .await
            .map(|_| ())
            .map_err(|e| stopped(e, written, total))
    }
}

/// A restore that stopped part-way: the cluster stays uninitialized and a new run starts over.
fn stopped(e: Status, written: usize, total: usize) -> Status {
    Status::new(
        e.code(),
        format!(
            "{} (the restore stopped with at most {written} of {total} records written; the cluster stays uninitialized and serves nothing: run the restore again, it starts over)",
            e.message()
        ),
    )
}

fn encode_marker(marker: &RestoreMarker) -> Result<Vec<u8>, Status> {
    postcard::to_allocvec(marker).map_err(|e| Status::internal(format!("encode: {e}")))
}
