//! The redb-backed [`Store`].

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak, mpsc};
use std::time::{Duration, Instant};

use redb::{
    Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableHandle, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::dedup::{self, Added, DedupWindow};
use crate::overlay::{self, Bytes, Layers, Overlay};
use crate::txn::{Compare, KvEntry, Op, OpResult, Txn, TxnResult};
use crate::wal::{self, Held, LogImage, Record as LogRecord, Wal};
use crate::{Result, StorageError};

/// Raft log entries by index (opaque bytes), in the redb layout of earlier versions (read only
/// to move the log into its own file, see [`open_log`]).
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Log metadata (vote, committed, purged) and node identity, by name (opaque bytes).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The state machine's keys.
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
/// State machine metadata: the store revision, the dedup sequence and the Raft layer's opaque
/// records (last applied log id, membership).
const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
/// The dedup window (recent request ids with their results, for exactly-once writes) as
/// chunks, each keyed by its highest sequence number (see [`dedup`]).
const DEDUP_CHUNKS: TableDefinition<u64, &[u8]> = TableDefinition::new("dedup_chunks");
/// Where earlier versions kept the window, one row per id: moved into chunks on open.
const OLD_DEDUP: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dedup");
const OLD_DEDUP_ORDER: TableDefinition<u64, &[u8]> = TableDefinition::new("dedup_order");
/// The current snapshot's position: "index" and "meta" (opaque). Its data is the state file
/// itself, which holds the state at that position or a later one (an image is exported when
/// a peer needs it: [`Store::export_image`]). Earlier versions also kept a copy of the image
/// under [`OLD_IMAGE`].
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// In the snapshot table: the image earlier versions kept; removed when a snapshot is saved.
const OLD_IMAGE: &str = "data";
/// In the snapshot table: how many snapshots this node installed (see [`Store::read`]).
const INSTALLS: &str = "installs";
const REVISION: &str = "revision";
const DEDUP_SEQ: &str = "dedup_seq";
/// Counts this node's state syncs (it keeps a sync's commit from being empty). It travels in
/// snapshot images with the rest of `sm_meta`, where it means nothing; state digests ignore it.
const STATE_SYNCS: &str = "state_syncs";
/// How long applied changes may stay in memory only. After a crash the state machine restarts
/// from its last sync and the log entries after it are applied again (the Raft layer re-applies
/// committed entries on start).
const STATE_SYNC_INTERVAL: Duration = Duration::from_millis(1000);
/// Format of the snapshot image; bump with a decoder for the old one when it changes.
const IMAGE_FORMAT: u32 = 1;
/// The Raft log file is rewritten without its purged records once it is at least this large
/// and four times its live log.
const LOG_COMPACT_MIN_BYTES: u64 = 4 << 20;

/// Where the database lives.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A redb file, created when missing.
    File(PathBuf),
    /// Process memory only: for the transient install. Nothing survives the process.
    Memory,
}

/// Observes every durable log flush (for metrics).
pub type FlushObserver = Arc<dyn Fn(FlushEvent) + Send + Sync>;

/// One durable commit of the log.
#[derive(Debug, Clone, Copy)]
pub struct FlushEvent {
    /// Time spent in the commit (the fsync).
    pub duration: Duration,
    /// Log entries made durable by this commit.
    pub entries: u64,
    /// Appends (each with its callback) this commit completed.
    pub appends: usize,
}

/// How to open a [`Store`].
#[derive(Clone)]
pub struct StoreConfig {
    /// File or memory.
    pub backend: Backend,
    /// How many recent request ids the state machine remembers for exactly-once writes.
    pub dedup_capacity: u64,
    /// Called after each durable log flush.
    pub on_flush: Option<FlushObserver>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("backend", &self.backend)
            .field("dedup_capacity", &self.dedup_capacity)
            .finish_non_exhaustive()
    }
}

impl StoreConfig {
    /// Defaults for a backend.
    pub fn new(backend: Backend) -> StoreConfig {
        StoreConfig {
            backend,
            dedup_capacity: 100_000,
            on_flush: None,
        }
    }
}

/// A client-chosen id that makes a retried write apply once.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId(pub [u8; 16]);

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A state machine command: a transaction, optionally deduplicated by request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// When set, a second command with the same id is not applied again: it gets the first
    /// result (as long as the id is among the `dedup_capacity` most recent ones).
    pub request_id: Option<RequestId>,
    /// The transaction.
    pub txn: Txn,
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "txn({} compare, {} success, {} failure)",
            self.txn.compare.len(),
            self.txn.success.len(),
            self.txn.failure.len()
        )
    }
}

/// One log entry as the state machine sees it.
#[derive(Debug, Clone, Copy)]
pub enum ApplyInput<'a> {
    /// A command to apply.
    Command(&'a Command),
    /// An entry with no state machine effect (blank or membership); it only advances metadata.
    Skip,
}

/// Stored form of a key's value and metadata.
#[derive(PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    version: u64,
    create_revision: u64,
    mod_revision: u64,
}

/// Everything the state machine holds, as one consistent image (the snapshot format).
#[derive(Serialize, Deserialize)]
/// Byte strings are `ByteBuf`s: encoded as one block each (the same bytes as `Vec<u8>`'s
/// element-by-element encoding in postcard, much faster).
struct Image {
    format: u32,
    kv: Vec<(ByteBuf, ByteBuf)>,
    sm_meta: Vec<(String, ByteBuf)>,
    dedup: Vec<(ByteBuf, ByteBuf)>,
    dedup_order: Vec<(u64, ByteBuf)>,
}

struct Shared {
    /// The state machine's tables and the current snapshot.
    db: Database,
    /// The Raft log and its metadata as they are now (appends included as soon as they are
    /// accepted, before the flusher writes them): what log reads see.
    log: Mutex<LogState>,
    /// The Raft log's file, written only by the flusher thread (and on close): a file of its
    /// own, so a durable log commit writes only log records, and the state machine's pages
    /// reach the disk in a periodic sync instead (as etcd keeps its WAL apart from its bolt
    /// database).
    wal: Mutex<Wal>,
    /// The state machine's changes not in `db` yet (see [`overlay`]). Taken together with a
    /// read transaction of `db`, under this lock, by every reader.
    layers: Mutex<Layers>,
    /// Held by whoever writes the state machine to `db`: the sync, saving and installing a
    /// snapshot. One at a time, so a sync never writes changes older than an installed image.
    state_write: Mutex<()>,
    /// Held by each apply and snapshot install: they happen one at a time.
    applier: Mutex<()>,
    /// Set by the first failed commit; see [`StorageError::Failed`].
    failed: Mutex<Option<String>>,
    failed_flag: AtomicBool,
    dedup_capacity: u64,
    /// Bumped after every commit that may have changed a reserved key (one starting with a
    /// NUL byte): Coffer's own settings. Lets the node notice them without a read per entry.
    reserved_changes: AtomicU64,
}

/// The Raft log in memory: the live entries and metadata, plus the metadata records written
/// lazily (with the flusher's next commit).
#[derive(Default)]
struct LogState {
    image: LogImage,
    unwritten_meta: BTreeMap<String, Vec<u8>>,
    /// Reads back the entries not held in memory (none for a store in memory).
    reader: Option<Arc<std::fs::File>>,
}

/// Runs on the flusher thread with the store (`None` once it is closed).
type ExclusiveJob = Box<dyn FnOnce(Option<&Shared>) + Send>;

/// Work for the flusher thread, done in the order queued.
enum Job {
    /// Entries to write durably; `done` runs once they are on disk (or with the error).
    Append {
        entries: Vec<(u64, Arc<Vec<u8>>)>,
        done: Box<dyn FnOnce(Result<()>) + Send>,
    },
    /// Work that must come after every append queued before it (a truncation, a purge).
    Exclusive(ExclusiveJob),
}

/// One node's database. Cheap to clone; all clones share the database.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    flush_tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("failed", &self.shared.failed_flag.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn redb_err<E: Into<redb::Error>>(e: E) -> StorageError {
    StorageError::Redb(e.into())
}

fn corrupt(table: &'static str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt {
        table,
        reason: e.to_string(),
    }
}

fn u64_bytes(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

fn bytes_u64(table: &'static str, b: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = b
        .try_into()
        .map_err(|_| corrupt(table, format!("expected 8 bytes, found {}", b.len())))?;
    Ok(u64::from_le_bytes(arr))
}

impl Store {
    /// Opens (or creates) the database and starts its flusher thread.
    /// With [`Backend::File`]`(path)`, the state machine lives in `path` and the Raft log in
    /// [`log_path`]`(path)`; a log still kept in `path` (written by an earlier version) moves to
    /// the log file first.
    pub fn open(config: StoreConfig) -> Result<Store> {
        let open = |path: Option<&PathBuf>| match path {
            Some(path) => Database::create(path).map_err(|source| StorageError::Open {
                path: path.clone(),
                source,
            }),
            None => Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .map_err(|source| StorageError::Open {
                    path: PathBuf::from(":memory:"),
                    source,
                }),
        };
        let path = match &config.backend {
            Backend::File(path) => Some(path),
            Backend::Memory => None,
        };
        // The state machine's file first: a file that is not a database is reported as such
        // before anything is created beside it.
        let db = open(path)?;
        let (wal, image) = match path {
            Some(path) => open_log(path, &db)?,
            None => (Wal::memory(), LogImage::default()),
        };
        // Create every table up front so readers never meet a missing one.
        let wtx = db.begin_write().map_err(redb_err)?;
        {
            wtx.open_table(KV).map_err(redb_err)?;
            wtx.open_table(SM_META).map_err(redb_err)?;
            wtx.open_table(DEDUP_CHUNKS).map_err(redb_err)?;
            wtx.open_table(SNAPSHOT).map_err(redb_err)?;
            move_old_dedup(&wtx)?;
        }
        wtx.commit().map_err(redb_err)?;
        let dedup_capacity = config.dedup_capacity.max(1);
        let window = read_window(&db, dedup_capacity)?;

        let shared = Arc::new(Shared {
            db,
            log: Mutex::new(LogState {
                image,
                unwritten_meta: BTreeMap::new(),
                reader: wal.reader(),
            }),
            wal: Mutex::new(wal),
            layers: Mutex::new(Layers {
                window,
                ..Layers::default()
            }),
            state_write: Mutex::new(()),
            applier: Mutex::new(()),
            failed: Mutex::new(None),
            failed_flag: AtomicBool::new(false),
            dedup_capacity,
            reserved_changes: AtomicU64::new(0),
        });
        let (flush_tx, flush_rx) = mpsc::channel();
        let weak = Arc::downgrade(&shared);
        let on_flush = config.on_flush.clone();
        std::thread::Builder::new()
            .name("coffer-log-flush".into())
            .spawn(move || flusher(weak, flush_rx, on_flush))
            .map_err(|e| StorageError::Failed(format!("cannot start the flusher thread: {e}")))?;
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("coffer-state-sync".into())
            .spawn(move || state_syncer(weak))
            .map_err(|e| {
                StorageError::Failed(format!("cannot start the state sync thread: {e}"))
            })?;
        Ok(Store { shared, flush_tx })
    }

    /// Whether an earlier commit failed (the node must stop).
    pub fn is_failed(&self) -> bool {
        self.shared.failed_flag.load(Ordering::Acquire)
    }

    fn check(&self) -> Result<()> {
        self.shared.check()
    }

    fn write(&self, durability: Durability) -> Result<WriteTransaction> {
        self.shared.write(durability)
    }

    fn commit(&self, wtx: WriteTransaction) -> Result<()> {
        self.shared.commit(wtx)
    }

    // ---- Raft log ------------------------------------------------------------------------

    /// Appends log entries (index, bytes), replacing any with the same index. They are readable
    /// on return; `done` runs once they are durable (or with the error). Appends queued while
    /// the flusher writes share its next write and fsync.
    pub fn append(
        &self,
        entries: Vec<(u64, Vec<u8>)>,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        if let Err(e) = self.check() {
            return done(Err(e));
        }
        let injected = || -> Option<StorageError> {
            fail::fail_point!("storage::append", |_| {
                Some(
                    self.shared
                        .fail("injected write error (failpoint storage::append)".into()),
                )
            });
            None
        };
        if let Some(e) = injected() {
            return done(Err(e));
        }
        let entries: Vec<(u64, Arc<Vec<u8>>)> =
            entries.into_iter().map(|(i, b)| (i, Arc::new(b))).collect();
        // Queued under the lock, so the file receives appends in the order the log shows them.
        let mut log = self.shared.log();
        for (index, bytes) in &entries {
            log.image.entries.insert(*index, Held::new(bytes.clone()));
        }
        let job = Job::Append {
            entries,
            done: Box::new(done),
        };
        let sent = self.flush_tx.send(job);
        drop(log);
        if let Err(mpsc::SendError(Job::Append { done, .. })) = sent {
            done(Err(StorageError::Failed(
                "the flusher thread stopped".into(),
            )));
        }
    }

    /// Runs `f` on the flusher thread after every append queued before, and returns its result.
    fn exclusive<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let stopped = || StorageError::Failed("the flusher thread stopped".into());
        let (tx, rx) = mpsc::sync_channel(1);
        let job = Job::Exclusive(Box::new(move |shared| {
            let _ = tx.send(shared.map_or_else(|| Err(stopped()), f));
        }));
        self.flush_tx.send(job).map_err(|_| stopped())?;
        rx.recv().map_err(|_| stopped())?
    }

    /// Log entries with index in `[start, end)`, in order.
    pub fn log_range(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        self.check()?;
        if start >= end {
            return Ok(Vec::new());
        }
        // Found under the lock, copied (or read from the file) after it.
        let (found, reader) = {
            let log = self.shared.log();
            let found: Vec<(u64, Held)> = log
                .image
                .entries
                .range(start..end)
                .map(|(i, h)| (*i, h.clone()))
                .collect();
            (found, log.reader.clone())
        };
        found
            .into_iter()
            .map(|(i, h)| Ok((i, h.read(reader.as_deref())?.as_ref().clone())))
            .collect()
    }

    /// The last log entry, if any.
    pub fn log_last(&self) -> Result<Option<(u64, Vec<u8>)>> {
        self.check()?;
        let (last, reader) = {
            let log = self.shared.log();
            let last = log
                .image
                .entries
                .last_key_value()
                .map(|(i, h)| (*i, h.clone()));
            (last, log.reader.clone())
        };
        match last {
            Some((i, h)) => Ok(Some((i, h.read(reader.as_deref())?.as_ref().clone()))),
            None => Ok(None),
        }
    }

    /// Durably deletes every log entry with index `>= index`, the ones still being written
    /// included.
    pub fn truncate_from(&self, index: u64) -> Result<()> {
        self.check()?;
        self.shared
            .log()
            .image
            .apply(LogRecord::TruncateFrom(index));
        // After the appends queued before it: replaying the file drops them again.
        self.exclusive(move |shared| {
            shared.write_log(&[LogRecord::TruncateFrom(index)])?;
            Ok(())
        })
    }

    /// Durably deletes every log entry with index `<= index` and records `purged` under the
    /// metadata key `purged_key` in the same write. Runs after the appends queued before it:
    /// the Raft layer may purge entries it applied before they were flushed (after a
    /// snapshot), and replaying the file must not bring them back. When purged records fill
    /// most of the file, it is rewritten with only the live log.
    pub fn purge_through(&self, index: u64, purged_key: &str, purged: &[u8]) -> Result<()> {
        self.check()?;
        {
            let mut log = self.shared.log();
            log.image.apply(LogRecord::Meta(purged_key, purged));
            log.image.apply(LogRecord::PurgeThrough(index));
        }
        let (purged_key, purged) = (purged_key.to_string(), purged.to_vec());
        self.exclusive(move |shared| {
            shared.write_log(&[
                LogRecord::Meta(&purged_key, &purged),
                LogRecord::PurgeThrough(index),
            ])?;
            Ok(())
        })?;
        // Not waited for: the flusher rewrites the file, if it is due, before its next write.
        let compact = Job::Exclusive(Box::new(|shared| {
            if let Some(shared) = shared {
                let _ = shared.compact_log();
            }
        }));
        let _ = self.flush_tx.send(compact);
        Ok(())
    }

    /// Reads a log metadata record.
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.check()?;
        Ok(self.shared.log().image.meta.get(key).cloned())
    }

    /// Writes a log metadata record; with `durable` it is on disk on return, otherwise it is
    /// readable at once and written with the next append's write (no fsync of its own).
    /// A key is written one way or the other, never both.
    pub fn meta_put(&self, key: &str, value: &[u8], durable: bool) -> Result<()> {
        self.check()?;
        if !durable {
            let mut log = self.shared.log();
            log.image.apply(LogRecord::Meta(key, value));
            log.unwritten_meta.insert(key.to_string(), value.to_vec());
            return Ok(());
        }
        let (key, value) = (key.to_string(), value.to_vec());
        self.exclusive(move |shared| {
            shared.write_log(&[LogRecord::Meta(&key, &value)])?;
            shared.log().image.apply(LogRecord::Meta(&key, &value));
            Ok(())
        })
    }

    // ---- State machine ---------------------------------------------------------------------

    /// Applies a batch of log entries and stores `sm_meta` records (e.g. the last applied log
    /// id) with them. Returns one result per input; `None` for [`ApplyInput::Skip`].
    /// Deterministic: the same inputs on the same state give the same results on every node.
    ///
    /// The changes go to memory (readable at once) and reach the file with the next state
    /// sync; nothing here waits for a disk.
    pub fn apply(
        &self,
        inputs: &[ApplyInput<'_>],
        sm_meta: &[(&str, &[u8])],
    ) -> Result<Vec<Option<TxnResult>>> {
        fail::fail_point!("storage::apply", |_| {
            Err(self
                .shared
                .fail("injected write error (failpoint storage::apply)".into()))
        });
        let _applying = lock(&self.shared.applier);
        self.check()?;
        // The batch changes the layers in place, holding their lock: readers wait for it (a
        // batch's changes appear together), and nodes no reader shares are changed without
        // being copied (a copy of the layers to work on cost a copy of every node written).
        // No sync can freeze the layer meanwhile, and no install runs (it holds `applier`).
        let mut layers = lock(&self.shared.layers);
        let rtx = self.shared.db.begin_read().map_err(redb_err)?;
        // Dropped before the lock: a batch that panics takes the layers with it, and the store
        // fails before anyone can see or sync what is left.
        let on_panic = FailOnPanic(&self.shared);
        let mut view = ReadView::new(rtx, std::mem::take(&mut *layers));
        let applied = self.apply_in(&mut view, inputs, sm_meta);
        *layers = std::mem::take(&mut view.layers);
        // The layers may hold part of a batch that failed: the store fails before the lock is
        // released, so no reader or sync sees it (both check after taking the lock).
        let applied =
            applied.map_err(|e| self.shared.fail(format!("applying a batch failed: {e}")));
        drop(on_panic);
        drop(layers);
        let (results, touches_reserved) = applied?;
        if touches_reserved {
            self.shared.reserved_changes.fetch_add(1, Ordering::AcqRel);
        }
        Ok(results)
    }

    /// Applies `inputs` to `view`'s layers; returns the results and whether a reserved key
    /// may have changed.
    fn apply_in(
        &self,
        view: &mut ReadView,
        inputs: &[ApplyInput<'_>],
        sm_meta: &[(&str, &[u8])],
    ) -> Result<(Vec<Option<TxnResult>>, bool)> {
        let mut revision = match view.meta(REVISION)? {
            Some(v) => bytes_u64("sm_meta", &v)?,
            None => 0,
        };
        let mut seq = match view.meta(DEDUP_SEQ)? {
            Some(v) => bytes_u64("sm_meta", &v)?,
            None => 0,
        };
        let mut results = Vec::with_capacity(inputs.len());
        let mut touches_reserved = false;
        for input in inputs {
            let ApplyInput::Command(cmd) = input else {
                results.push(None);
                continue;
            };
            if let Some(id) = &cmd.request_id
                && let Some(prev) = view.layers.window.get(&id.0)
            {
                let result: TxnResult =
                    postcard::from_bytes(prev).map_err(|e| corrupt("dedup", e))?;
                results.push(Some(result));
                continue;
            }
            touches_reserved |= cmd.txn.may_touch_reserved();
            let result = apply_txn(view, &mut revision, &cmd.txn)?;
            if let Some(id) = &cmd.request_id {
                // Remember the result without the previous values themselves: a retry
                // learns what happened, and old values (ciphertext of secrets, perhaps
                // large) are not kept around in the table and its snapshots.
                let encoded = postcard::to_stdvec(&without_values(&result))
                    .map_err(|e| corrupt("dedup", e))?;
                let id: Bytes = Arc::from(id.0.as_slice());
                let encoded: Bytes = Arc::from(encoded);
                seq += 1;
                let layers = &mut view.layers;
                layers
                    .window
                    .add(seq, id.clone(), encoded.clone(), self.shared.dedup_capacity);
                layers.active.dedup_added.push_back((seq, id, encoded));
                layers.active.dedup_front = layers.window.front();
            }
            results.push(Some(result));
        }
        let meta = &mut view.layers.active.meta;
        meta.insert(REVISION.into(), Arc::from(u64_bytes(revision)));
        meta.insert(DEDUP_SEQ.into(), Arc::from(u64_bytes(seq)));
        for (k, v) in sm_meta {
            meta.insert((*k).into(), Arc::from(*v));
        }
        Ok((results, touches_reserved))
    }

    /// A counter that changes after every applied batch or installed snapshot that may have
    /// changed a reserved key (one starting with a NUL byte). Cheap: one atomic load.
    pub fn reserved_changes(&self) -> u64 {
        self.shared.reserved_changes.load(Ordering::Acquire)
    }

    /// Whether `other` is this same store (a clone of it), not another one.
    pub fn is_same(&self, other: &Store) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// A consistent read view of the state machine.
    pub fn read(&self) -> Result<ReadView> {
        self.check()?;
        // The file and the changes not in it yet, at the same point: a sync commits and then
        // drops the layer it wrote under this lock.
        let layers = lock(&self.shared.layers);
        // Again under the lock: an apply that failed marks the store failed before it lets go.
        self.check()?;
        let rtx = self.shared.db.begin_read().map_err(redb_err)?;
        if let Some((installing, window)) = &layers.installing {
            let snap = rtx.open_table(SNAPSHOT).map_err(redb_err)?;
            let installs = match snap.get(INSTALLS).map_err(redb_err)? {
                Some(v) => bytes_u64("snapshot", v.value())?,
                None => 0,
            };
            if installs == *installing {
                let window = window.clone();
                return Ok(ReadView::new(
                    rtx,
                    Layers {
                        window,
                        ..Layers::default()
                    },
                ));
            }
        }
        Ok(ReadView::new(rtx, layers.clone()))
    }

    /// A consistent image of the whole state machine, for a snapshot, together with a read
    /// view of the same point (to read the Raft layer's metadata records of that image).
    pub fn export_image(&self) -> Result<(Vec<u8>, ReadView)> {
        let view = self.read()?;
        let image = view.image()?;
        let bytes = postcard::to_stdvec(&image).map_err(|e| corrupt("snapshot", e))?;
        Ok((bytes, view))
    }

    /// Durably records a snapshot taken at log position `index` (opaque metadata) as the
    /// current one, unless the current one is newer: a snapshot taken from older state while a
    /// newer one was being installed must not replace it. Returns whether it was recorded.
    ///
    /// The same commit makes every applied change durable (a state sync), so the state file,
    /// which is the snapshot's data, is never behind the snapshot (the log before it may be
    /// purged). Nothing is copied: as etcd's bolt file, the state file is the snapshot.
    pub fn save_snapshot(&self, index: u64, meta: &[u8]) -> Result<bool> {
        self.shared.sync_state(Some((index, meta)))
    }

    /// The current snapshot's metadata, if any. Its data is the state file: see
    /// [`Store::export_image`].
    pub fn current_snapshot(&self) -> Result<Option<Vec<u8>>> {
        self.check()?;
        let rtx = self.shared.db.begin_read().map_err(redb_err)?;
        let snap = rtx.open_table(SNAPSHOT).map_err(redb_err)?;
        let meta = snap.get("meta").map_err(redb_err)?;
        Ok(meta.map(|m| m.value().to_vec()))
    }

    /// Replaces the whole state machine with `image` (taken at log position `index`) and records
    /// it as the current snapshot, in one durable commit. An image that does not decode changes
    /// nothing.
    pub fn install_snapshot(&self, index: u64, meta: &[u8], image: &[u8]) -> Result<()> {
        let decoded: Image =
            postcard::from_bytes(image).map_err(|e| StorageError::BadSnapshot(e.to_string()))?;
        if decoded.format != IMAGE_FORMAT {
            return Err(StorageError::BadSnapshot(format!(
                "unknown image format {} (this build reads {IMAGE_FORMAT})",
                decoded.format
            )));
        }
        // No apply and no sync meanwhile: the image replaces everything, the changes in memory
        // included.
        if decoded.dedup_order.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(StorageError::BadSnapshot(
                "the dedup order's sequence numbers do not increase".into(),
            ));
        }
        let window = DedupWindow::from_entries(
            decoded
                .dedup_order
                .iter()
                .map(|(seq, id)| {
                    let result = decoded
                        .dedup
                        .binary_search_by(|(k, _)| k.as_slice().cmp(id.as_slice()))
                        .map(|at| decoded.dedup[at].1.as_slice())
                        .map_err(|_| {
                            StorageError::BadSnapshot(
                                "a request id of the dedup order has no result".into(),
                            )
                        })?;
                    Ok((*seq, Bytes::from(id.as_slice()), Bytes::from(result)))
                })
                .collect::<Result<_>>()?,
            self.shared.dedup_capacity,
        );
        let _applying = lock(&self.shared.applier);
        let _writing = lock(&self.shared.state_write);
        let wtx = self.write(Durability::Immediate)?;
        let installs;
        {
            let mut kv = wtx.open_table(KV).map_err(redb_err)?;
            kv.retain(|_, _| false).map_err(redb_err)?;
            for (k, v) in &decoded.kv {
                kv.insert(k.as_slice(), v.as_slice()).map_err(redb_err)?;
            }
            let mut smm = wtx.open_table(SM_META).map_err(redb_err)?;
            smm.retain(|_, _| false).map_err(redb_err)?;
            for (k, v) in &decoded.sm_meta {
                smm.insert(k.as_str(), v.as_slice()).map_err(redb_err)?;
            }
            let mut chunks = wtx.open_table(DEDUP_CHUNKS).map_err(redb_err)?;
            chunks.retain(|_, _| false).map_err(redb_err)?;
            insert_chunk(&mut chunks, window.by_seq())?;
            let mut snap = wtx.open_table(SNAPSHOT).map_err(redb_err)?;
            snap.insert("index", u64_bytes(index).as_slice())
                .map_err(redb_err)?;
            snap.insert("meta", meta).map_err(redb_err)?;
            snap.remove(OLD_IMAGE).map_err(redb_err)?;
            installs = match snap.get(INSTALLS).map_err(redb_err)? {
                Some(v) => bytes_u64("snapshot", v.value())?,
                None => 0,
            } + 1;
            snap.insert(INSTALLS, u64_bytes(installs).as_slice())
                .map_err(redb_err)?;
        }
        // Readers see the old state or the new, never the new file under the old changes:
        // one that finds this install in its read transaction leaves the layers out. The
        // commit itself runs without the lock, so readers do not wait for it.
        lock(&self.shared.layers).installing = Some((installs, window.clone()));
        self.commit(wtx)?;
        *lock(&self.shared.layers) = Layers {
            window,
            ..Layers::default()
        };
        self.shared.reserved_changes.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

impl Drop for Shared {
    /// Makes the state machine durable and writes the log metadata records not written yet
    /// (Raft's committed index when no append came after it), as redb makes a non-durable
    /// commit durable on close.
    fn drop(&mut self) {
        if self.check().is_err() {
            return;
        }
        if let Err(e) = self.sync_state(None) {
            tracing::warn!(error = %e, "could not make the state machine durable on close");
        }
        if let Err(e) = self.write_log(&[]) {
            tracing::warn!(error = %e, "could not write the pending log metadata on close");
        }
    }
}

impl Shared {
    fn log(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, durability: Durability) -> Result<WriteTransaction> {
        self.check()?;
        let mut wtx = self.db.begin_write().map_err(redb_err)?;
        wtx.set_durability(durability).map_err(redb_err)?;
        Ok(wtx)
    }

    /// Writes the lazily written metadata records and `records` to the log file, in one
    /// write, and syncs it (skipped when there is nothing to write). Returns where in the file
    /// each of `records` starts (`None` for a store in memory). Any error marks the store
    /// failed: what it should have made durable may not be.
    fn write_log(&self, records: &[LogRecord<'_>]) -> Result<Option<Vec<u64>>> {
        self.check()?;
        let meta = std::mem::take(&mut self.log().unwritten_meta);
        if records.is_empty() && meta.is_empty() {
            return Ok(Some(Vec::new()));
        }
        fail::fail_point!("storage::fsync", |_| {
            Err(self.fail("injected fsync error (failpoint storage::fsync)".into()))
        });
        let mut wal = self.wal.lock().unwrap_or_else(|p| p.into_inner());
        // The lazy records first: a record written with `records` is the newer one.
        let mut batch = wal.batch();
        for (k, v) in &meta {
            batch.push(LogRecord::Meta(k, v));
        }
        let places: Vec<u64> = records.iter().map(|r| batch.push(*r)).collect();
        let at = wal
            .write(batch)
            .and_then(|at| wal.sync().map(|()| at))
            .map_err(|e| self.fail(format!("durable log write failed: {e}")))?;
        Ok(wal
            .reader()
            .map(|_| places.into_iter().map(|p| at + p).collect()))
    }

    /// Rewrites the log file with only the live log when purged records make up most of it.
    /// Log reads and appends go on meanwhile (appends are written after it); only installing
    /// the new file's places takes the log's lock. A copy that cannot be written (a full disk)
    /// is given up with a warning and tried again after the next purge.
    fn compact_log(&self) -> Result<()> {
        self.check()?;
        let mut wal = self.wal.lock().unwrap_or_else(|p| p.into_inner());
        let (copied, old) = {
            let log = self.log();
            let live = log.image.encoded_len();
            if wal.len() < LOG_COMPACT_MIN_BYTES || wal.len() < live.saturating_mul(4) {
                return Ok(());
            }
            (log.image.clone(), log.reader.clone())
        };
        let Some(path) = wal.path().map(Path::to_path_buf) else {
            return Ok(());
        };
        let before = wal.len();
        let copy = match Wal::write_copy(&path, &copied, old.as_deref(), wal.last_write() + 1) {
            Ok(copy) => copy,
            Err(e) => {
                tracing::warn!(error = %e, "could not rewrite the Raft log without its purged entries; trying again after the next purge");
                return Ok(());
            }
        };
        if let Err(e) = self.check() {
            copy.discard();
            return Err(e);
        }
        // Renamed into place before the log's lock is taken: until the new places are
        // installed, readers keep the old handle (the old file, unlinked but open) with the
        // old places.
        let (installed, placed) = match copy.install(&path) {
            Ok(installed) => installed,
            Err(e) => return Err(self.fail(format!("rewriting the Raft log failed: {e}"))),
        };
        let mut log = self.log();
        let moved = log.image.place(placed, |index, held| {
            copied.entries.get(&index).is_some_and(|c| c.same_as(held))
        });
        // Every entry written before the copy was in it and is placed in the new file now;
        // any other entry with a place in the old file would read the wrong bytes from the
        // new one, so it is brought into memory first (none is expected).
        for (index, held) in log.image.entries.iter_mut() {
            if held.bytes.is_none() && !moved.contains(index) {
                let bytes = held
                    .read(old.as_deref())
                    .map_err(|e| self.fail(format!("reading the Raft log failed: {e}")))?;
                held.bytes = Some(bytes);
                held.at = None;
            }
        }
        log.reader = installed.reader();
        *wal = installed;
        tracing::debug!(
            before,
            after = wal.len(),
            "rewrote the Raft log without its purged entries"
        );
        Ok(())
    }

    /// Notes where the entries of a written batch are in the file (`starts`, one per entry in
    /// order), so large ones can leave memory. An entry replaced or removed since is skipped.
    fn written(&self, batch: &[Flushing], starts: &[u64]) {
        let mut log = self.log();
        let entries = batch.iter().flat_map(|(entries, _)| entries.iter());
        for ((index, bytes), start) in entries.zip(starts) {
            if let Some(held) = log.image.entries.get_mut(index)
                && held.bytes.as_ref().is_some_and(|b| Arc::ptr_eq(b, bytes))
            {
                held.written(*start);
            }
        }
    }

    /// Writes the applied changes not in the file yet to it, in one durable commit (skipped
    /// when there are none and no snapshot to save), together with `snapshot` (index, meta)
    /// unless the current snapshot is newer. Returns whether the snapshot was saved.
    /// Applies go on meanwhile, into a new layer. Any error marks the store failed.
    fn sync_state(&self, snapshot: Option<(u64, &[u8])>) -> Result<bool> {
        let _writing = lock(&self.state_write);
        self.check()?;
        let frozen = {
            let mut layers = lock(&self.layers);
            // Again under the lock: an apply that failed marks the store failed before it
            // lets go, and what it left in the layers must not reach the file.
            self.check()?;
            if layers.frozen.is_some() {
                // An earlier sync stopped (panicked) between freezing and committing: its
                // changes are not in the file, and freezing again would drop them.
                return Err(self.fail("an earlier state machine sync did not finish".into()));
            }
            if layers.active.is_empty() && snapshot.is_none() {
                return Ok(false);
            }
            let frozen = Arc::new(std::mem::take(&mut layers.active));
            layers.frozen = Some(frozen.clone());
            frozen
        };
        let written = self.write(Durability::Immediate).and_then(|wtx| {
            let saved = write_state(&wtx, &frozen, snapshot)?;
            Ok((wtx, saved))
        });
        let (wtx, saved) =
            written.map_err(|e| self.fail(format!("state machine sync failed: {e}")))?;
        self.commit(wtx)?;
        lock(&self.layers).frozen = None;
        Ok(saved)
    }

    fn check(&self) -> Result<()> {
        if self.failed_flag.load(Ordering::Acquire) {
            let why = self
                .failed
                .lock()
                .map(|g| g.clone().unwrap_or_default())
                .unwrap_or_default();
            return Err(StorageError::Failed(why));
        }
        Ok(())
    }

    /// Marks the store failed and returns the error to report.
    fn fail(&self, why: String) -> StorageError {
        tracing::error!(error = %why, "storage failed; the node must stop serving");
        if let Ok(mut g) = self.failed.lock()
            && g.is_none()
        {
            *g = Some(why.clone());
        }
        self.failed_flag.store(true, Ordering::Release);
        StorageError::Failed(why)
    }

    fn commit(&self, wtx: WriteTransaction) -> Result<()> {
        wtx.commit()
            .map_err(|e| self.fail(format!("commit failed: {e}")))
    }
}

/// Locks a mutex, whether or not a thread panicked while holding it (what it guards stays
/// consistent: every holder that changes it does so in one assignment, except an apply, which
/// marks the store failed if it panics: [`FailOnPanic`]).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks the store failed when dropped by a panic.
struct FailOnPanic<'a>(&'a Shared);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail("applying a batch panicked".into());
        }
    }
}

/// Writes one layer of changes, a sync counter and, unless the current one is newer, a
/// snapshot into `wtx`. Returns whether the snapshot was written.
fn write_state(
    wtx: &WriteTransaction,
    changes: &Overlay,
    snapshot: Option<(u64, &[u8])>,
) -> Result<bool> {
    let mut kv = wtx.open_table(KV).map_err(redb_err)?;
    for (key, record) in &changes.kv {
        match record {
            Some(r) => {
                let encoded = postcard::to_stdvec(&**r).map_err(|e| corrupt("kv", e))?;
                kv.insert(&**key, encoded.as_slice()).map_err(redb_err)?;
            }
            None => {
                kv.remove(&**key).map_err(redb_err)?;
            }
        }
    }
    let mut chunks = wtx.open_table(DEDUP_CHUNKS).map_err(redb_err)?;
    insert_chunk(&mut chunks, &changes.dedup_added)?;
    if let Some(front) = changes.dedup_front {
        // Chunks whose every id has left the window.
        chunks.retain_in(..front, |_, _| false).map_err(redb_err)?;
    }
    let mut smm = wtx.open_table(SM_META).map_err(redb_err)?;
    for (name, value) in &changes.meta {
        smm.insert(&**name, &**value).map_err(redb_err)?;
    }
    // Counts syncs (and keeps a commit that only saves a snapshot from being empty).
    let syncs = match smm.get(STATE_SYNCS).map_err(redb_err)? {
        Some(v) => bytes_u64("sm_meta", v.value())?,
        None => 0,
    };
    smm.insert(STATE_SYNCS, u64_bytes(syncs + 1).as_slice())
        .map_err(redb_err)?;
    let Some((index, meta)) = snapshot else {
        return Ok(false);
    };
    let mut snap = wtx.open_table(SNAPSHOT).map_err(redb_err)?;
    let current = match snap.get("index").map_err(redb_err)? {
        Some(v) => Some(bytes_u64("snapshot", v.value())?),
        None => None,
    };
    if current.is_some_and(|c| c > index) {
        return Ok(false);
    }
    snap.insert("index", u64_bytes(index).as_slice())
        .map_err(redb_err)?;
    snap.insert("meta", meta).map_err(redb_err)?;
    snap.remove(OLD_IMAGE).map_err(redb_err)?;
    Ok(true)
}

/// Moves a dedup window kept one row per id (by earlier versions) into one chunk, and removes
/// the old tables.
fn move_old_dedup(wtx: &WriteTransaction) -> Result<()> {
    let names: Vec<String> = wtx
        .list_tables()
        .map_err(redb_err)?
        .map(|t| t.name().to_string())
        .collect();
    if !names.iter().any(|n| n == OLD_DEDUP_ORDER.name()) {
        return Ok(());
    }
    {
        let order = wtx.open_table(OLD_DEDUP_ORDER).map_err(redb_err)?;
        let results = wtx.open_table(OLD_DEDUP).map_err(redb_err)?;
        move_old_rows(wtx, &order, &results)?;
    }
    wtx.delete_table(OLD_DEDUP_ORDER).map_err(redb_err)?;
    wtx.delete_table(OLD_DEDUP).map_err(redb_err)?;
    Ok(())
}

fn move_old_rows(
    wtx: &WriteTransaction,
    order: &redb::Table<u64, &[u8]>,
    results: &redb::Table<&[u8], &[u8]>,
) -> Result<()> {
    let mut added = imbl::Vector::new();
    for item in order.iter().map_err(redb_err)? {
        let (seq, id) = item.map_err(redb_err)?;
        let Some(result) = results.get(id.value()).map_err(redb_err)? else {
            return Err(corrupt(
                "dedup",
                format!(
                    "request id with sequence number {} has no result",
                    seq.value()
                ),
            ));
        };
        added.push_back((
            seq.value(),
            Bytes::from(id.value()),
            Bytes::from(result.value()),
        ));
    }
    let mut chunks = wtx.open_table(DEDUP_CHUNKS).map_err(redb_err)?;
    insert_chunk(&mut chunks, &added)
}

/// Writes ids (oldest first) as one chunk keyed by its highest sequence number; none, nothing.
fn insert_chunk<'a>(
    chunks: &mut redb::Table<u64, &[u8]>,
    added: impl IntoIterator<Item = &'a Added>,
) -> Result<()> {
    let added: Vec<&Added> = added.into_iter().collect();
    let Some((last, _, _)) = added.last() else {
        return Ok(());
    };
    let chunk =
        dedup::encode_chunk(added.iter().copied()).map_err(|e| corrupt("dedup_chunks", e))?;
    chunks.insert(*last, chunk.as_slice()).map_err(redb_err)?;
    Ok(())
}

/// The dedup window as the file holds it.
fn read_window(db: &Database, capacity: u64) -> Result<DedupWindow> {
    let rtx = db.begin_read().map_err(redb_err)?;
    let chunks = rtx.open_table(DEDUP_CHUNKS).map_err(redb_err)?;
    let mut entries = Vec::new();
    for item in chunks.iter().map_err(redb_err)? {
        let (_, chunk) = item.map_err(redb_err)?;
        entries.extend(dedup::decode_chunk(chunk.value()).map_err(|e| corrupt("dedup_chunks", e))?);
    }
    Ok(DedupWindow::from_entries(entries, capacity))
}

/// Makes the state machine's writes durable every [`STATE_SYNC_INTERVAL`] (when there are any),
/// on a thread of its own so that the log's commits never wait for it. Ends with the store.
fn state_syncer(shared: Weak<Shared>) {
    loop {
        std::thread::sleep(STATE_SYNC_INTERVAL);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.sync_state(None).is_err() {
            return; // the store is failed; the error was reported
        }
    }
}

/// An append the flusher is writing: its entries and its callback.
type Flushing = (Vec<(u64, Arc<Vec<u8>>)>, Box<dyn FnOnce(Result<()>) + Send>);

fn flusher(shared: Weak<Shared>, rx: mpsc::Receiver<Job>, on_flush: Option<FlushObserver>) {
    let mut next: Option<Job> = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let mut batch = match first {
            Job::Exclusive(f) => {
                f(shared.upgrade().as_deref());
                continue;
            }
            Job::Append { entries, done } => vec![(entries, done)],
        };
        // Every append queued meanwhile joins this write, up to the next exclusive job.
        while let Ok(job) = rx.try_recv() {
            match job {
                Job::Append { entries, done } => batch.push((entries, done)),
                exclusive => {
                    next = Some(exclusive);
                    break;
                }
            }
        }
        let entries = batch.iter().map(|(e, _)| e.len() as u64).sum();
        let started = Instant::now();
        let result = match shared.upgrade() {
            Some(shared) => {
                let records: Vec<LogRecord<'_>> = batch
                    .iter()
                    .flat_map(|(entries, _)| entries.iter())
                    .map(|(index, bytes)| LogRecord::Entry(*index, bytes))
                    .collect();
                shared.write_log(&records).map(|starts| {
                    if let Some(starts) = starts {
                        shared.written(&batch, &starts);
                    }
                })
            }
            None => Err(StorageError::Failed("the store was closed".into())),
        };
        if result.is_ok()
            && let Some(observer) = &on_flush
        {
            let event = FlushEvent {
                duration: started.elapsed(),
                entries,
                appends: batch.len(),
            };
            // A panicking observer must not take the callbacks down with it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| observer(event)));
        }
        for (_, done) in batch {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(StorageError::Failed(e.to_string())),
            };
            done(r);
        }
    }
}

/// Where the Raft log of a store whose state machine is in `path` lives: beside it, e.g.
/// `coffer.redb` and `coffer-raft.wal`.
pub fn log_path(path: &Path) -> PathBuf {
    beside(path, "-raft.wal")
}

/// Where the previous layout kept the Raft log: a redb database of its own.
fn redb_log_path(path: &Path) -> PathBuf {
    beside(path, "-raft-log.redb")
}

fn beside(path: &Path, suffix: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{stem}{suffix}"))
}

/// Opens the Raft log of the store whose state machine is in `path` (and `db`). A log in an
/// earlier layout (a redb file of its own, or tables in the state machine's file) is moved
/// into the log file first: the file is written and synced, then the old copy removed, so a
/// crash in between leaves a complete log file and the removal is finished on the next open.
fn open_log(path: &Path, db: &Database) -> Result<(Wal, LogImage)> {
    let wal_path = log_path(path);
    let old_file = redb_log_path(path);
    // A rewrite or a move cut short by a crash; the log file (or the old layout) is intact.
    let _ = std::fs::remove_file(wal_path.with_extension("wal-new"));
    // An earlier version could stop right after creating its log database, leaving it empty.
    if std::fs::metadata(&old_file).is_ok_and(|m| m.len() == 0) {
        std::fs::remove_file(&old_file)?;
    }
    if wal_path.exists() {
        let (wal, image) = Wal::open(&wal_path)?;
        remove_old_logs(db, &old_file)?;
        return Ok((wal, image));
    }
    let mut image = None;
    if old_file.exists() {
        let old = Database::open(&old_file).map_err(|source| StorageError::Open {
            path: old_file.clone(),
            source,
        })?;
        image = read_redb_log(&old)?;
    }
    if image.is_none() {
        image = read_redb_log(db)?;
    }
    let mut image = match image {
        Some(image) => {
            tracing::info!(
                entries = image.entries.len(),
                "moving the Raft log into its log file (a data directory of an earlier version)"
            );
            image
        }
        None if holds_state(db)? => {
            // Starting over with an empty log (no vote, no identity) beside old state could
            // vote twice in one term and answer from a state the cluster moved past.
            return Err(StorageError::Failed(format!(
                "the Raft log file {} is missing while the state beside it holds data; restore the whole data directory from the same backup, or replace this node (docs/operations/replacing-a-node.md)",
                wal_path.display()
            )));
        }
        None => LogImage::default(),
    };
    let wal = Wal::create(&wal_path, &mut image)?;
    remove_old_logs(db, &old_file)?;
    Ok((wal, image))
}

/// The Raft log a redb database of an earlier layout holds, if it has one.
fn read_redb_log(db: &Database) -> Result<Option<LogImage>> {
    let rtx = db.begin_read().map_err(redb_err)?;
    let mut image = LogImage::default();
    match rtx.open_table(META) {
        Ok(t) => {
            for item in t.iter().map_err(redb_err)? {
                let (k, v) = item.map_err(redb_err)?;
                // The old layout's count of durable commits means nothing any more.
                if k.value() != "flushes" {
                    image.meta.insert(k.value().to_string(), v.value().to_vec());
                }
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(redb_err(e)),
    }
    match rtx.open_table(LOG) {
        Ok(t) => {
            for item in t.iter().map_err(redb_err)? {
                let (k, v) = item.map_err(redb_err)?;
                image
                    .entries
                    .insert(k.value(), Held::new(Arc::new(v.value().to_vec())));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(redb_err(e)),
    }
    Ok(Some(image))
}

/// Removes the copies of the Raft log an earlier layout kept, once the log file holds it.
fn remove_old_logs(db: &Database, old_file: &Path) -> Result<()> {
    if old_file.exists() {
        std::fs::remove_file(old_file)?;
        wal::sync_dir(old_file)?;
    }
    let rtx = db.begin_read().map_err(redb_err)?;
    let has = |name| match rtx.list_tables() {
        Ok(mut tables) => Ok(tables.any(|t| t.name() == name)),
        Err(e) => Err(redb_err(e)),
    };
    if !has("raft_log")? && !has("meta")? {
        return Ok(());
    }
    drop(rtx);
    let wtx = db.begin_write().map_err(redb_err)?;
    wtx.delete_table(LOG).map_err(redb_err)?;
    wtx.delete_table(META).map_err(redb_err)?;
    wtx.commit().map_err(redb_err)?;
    Ok(())
}

/// Whether the state machine's database holds anything (it has applied entries).
fn holds_state(db: &Database) -> Result<bool> {
    let rtx = db.begin_read().map_err(redb_err)?;
    match rtx.open_table(SM_META) {
        Ok(t) => Ok(!t.is_empty().map_err(redb_err)?),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
        Err(e) => Err(redb_err(e)),
    }
}

fn entry(key: &[u8], r: &Record) -> KvEntry {
    KvEntry {
        key: key.to_vec(),
        value: r.value.clone(),
        version: r.version,
        create_revision: r.create_revision,
        mod_revision: r.mod_revision,
    }
}

fn compare_holds(view: &ReadView, c: &Compare) -> Result<bool> {
    let r = view.record(c.key())?;
    Ok(match c {
        Compare::Exists(_) => r.is_some(),
        Compare::Absent(_) => r.is_none(),
        Compare::ModRevision(_, rev) => r.map_or(0, |r| r.mod_revision) == *rev,
        Compare::Version(_, v) => r.map_or(0, |r| r.version) == *v,
    })
}

/// Applies one transaction to `view`'s working layer.
fn apply_txn(view: &mut ReadView, revision: &mut u64, txn: &Txn) -> Result<TxnResult> {
    let mut succeeded = true;
    for c in &txn.compare {
        if !compare_holds(view, c)? {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    let next = *revision + 1;
    let mut changed = false;
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::Put { key, value } => {
                let prev = view.record(key)?;
                let record = Record {
                    value: value.clone(),
                    version: prev.as_ref().map_or(0, |p| p.version) + 1,
                    create_revision: prev.as_ref().map_or(next, |p| p.create_revision),
                    mod_revision: next,
                };
                view.layers
                    .active
                    .kv
                    .insert(Arc::from(key.as_slice()), Some(Arc::new(record)));
                changed = true;
                results.push(OpResult::Put {
                    prev: prev.map(|p| entry(key, &p)),
                });
            }
            Op::Delete { key } => {
                let prev = view.record(key)?;
                if prev.is_some() {
                    view.layers
                        .active
                        .kv
                        .insert(Arc::from(key.as_slice()), None);
                    changed = true;
                }
                results.push(OpResult::Delete {
                    prev: prev.map(|p| entry(key, &p)),
                });
            }
            Op::DeletePrefix { prefix } => {
                let end = prefix_end(prefix);
                let upper = match &end {
                    Some(e) => Bound::Excluded(e.as_slice()),
                    None => Bound::Unbounded,
                };
                let keys = view
                    .records(Bound::Included(prefix.as_slice()), upper)?
                    .map(|r| r.map(|(k, _)| k))
                    .collect::<Result<Vec<_>>>()?;
                let deleted = keys.len() as u64;
                for key in keys {
                    view.layers.active.kv.insert(Arc::from(key), None);
                }
                if deleted > 0 {
                    changed = true;
                }
                results.push(OpResult::DeletePrefix { deleted });
            }
        }
    }
    if changed {
        *revision = next;
    }
    Ok(TxnResult {
        succeeded,
        revision: *revision,
        results,
    })
}

/// A result with the previous values' bytes left out (metadata kept).
fn without_values(result: &TxnResult) -> TxnResult {
    let strip = |prev: &Option<KvEntry>| {
        prev.as_ref().map(|e| KvEntry {
            value: Vec::new(),
            ..e.clone()
        })
    };
    TxnResult {
        succeeded: result.succeeded,
        revision: result.revision,
        results: result
            .results
            .iter()
            .map(|r| match r {
                OpResult::Put { prev } => OpResult::Put { prev: strip(prev) },
                OpResult::Delete { prev } => OpResult::Delete { prev: strip(prev) },
                OpResult::DeletePrefix { deleted } => OpResult::DeletePrefix { deleted: *deleted },
            })
            .collect(),
    }
}

/// The smallest key greater than every key with this prefix; `None` when there is none.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A consistent, read-only view of the state machine at one point: a read transaction of the
/// file and the changes not in it yet, as they were when the view was taken.
pub struct ReadView {
    rtx: redb::ReadTransaction,
    layers: Layers,
    kv: OnceLock<ReadOnlyTable<&'static [u8], &'static [u8]>>,
    smm: OnceLock<ReadOnlyTable<&'static str, &'static [u8]>>,
}

impl std::fmt::Debug for ReadView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadView").finish_non_exhaustive()
    }
}

/// A table of `rtx`, opened on first use.
fn table<'a, K: redb::Key + 'static, V: redb::Value + 'static>(
    rtx: &redb::ReadTransaction,
    cell: &'a OnceLock<ReadOnlyTable<K, V>>,
    def: TableDefinition<K, V>,
) -> Result<&'a ReadOnlyTable<K, V>> {
    if let Some(t) = cell.get() {
        return Ok(t);
    }
    let t = rtx.open_table(def).map_err(redb_err)?;
    Ok(cell.get_or_init(|| t))
}

fn decode_record(bytes: &[u8]) -> Result<Record> {
    postcard::from_bytes(bytes).map_err(|e| corrupt("kv", e))
}

/// A record as a reader finds it: encoded in the file, or applied and still in memory.
enum Stored {
    File(Vec<u8>),
    Memory(Arc<Record>),
}

impl Stored {
    fn record(self) -> Result<Arc<Record>> {
        match self {
            Stored::File(bytes) => Ok(Arc::new(decode_record(&bytes)?)),
            Stored::Memory(r) => Ok(r),
        }
    }

    /// The record as the file stores it.
    fn bytes(self) -> Result<Vec<u8>> {
        match self {
            Stored::File(bytes) => Ok(bytes),
            Stored::Memory(r) => postcard::to_stdvec(&*r).map_err(|e| corrupt("kv", e)),
        }
    }
}

impl ReadView {
    fn new(rtx: redb::ReadTransaction, layers: Layers) -> ReadView {
        ReadView {
            rtx,
            layers,
            kv: OnceLock::new(),
            smm: OnceLock::new(),
        }
    }

    fn kv_table(&self) -> Result<&ReadOnlyTable<&'static [u8], &'static [u8]>> {
        table(&self.rtx, &self.kv, KV)
    }

    fn smm_table(&self) -> Result<&ReadOnlyTable<&'static str, &'static [u8]>> {
        table(&self.rtx, &self.smm, SM_META)
    }

    /// One key's record.
    fn record(&self, key: &[u8]) -> Result<Option<Arc<Record>>> {
        if let Some(changed) = self.layers.kv(key) {
            return Ok(changed);
        }
        match self.kv_table()?.get(key).map_err(redb_err)? {
            Some(v) => Ok(Some(Arc::new(decode_record(v.value())?))),
            None => Ok(None),
        }
    }

    /// The live records in a key range, in key order, as stored: a record of the file is
    /// decoded only if the caller needs it (a snapshot image does not).
    fn stored_records<'a>(
        &'a self,
        lower: Bound<&'a [u8]>,
        upper: Bound<&'a [u8]>,
    ) -> Result<impl Iterator<Item = Result<(Vec<u8>, Stored)>> + 'a> {
        let base: Box<dyn Iterator<Item = _>> = if overlay::is_empty_range(lower, upper) {
            Box::new(std::iter::empty())
        } else {
            Box::new(
                self.kv_table()?
                    .range::<&[u8]>((lower, upper))
                    .map_err(redb_err)?,
            )
        };
        let base = base.map(|item| {
            let (k, v) = item.map_err(redb_err)?;
            Ok((k.value().to_vec(), Stored::File(v.value().to_vec())))
        });
        let changes = self
            .layers
            .kv_range(lower, upper)
            .map(|item| item.map(|(k, r)| (k, r.map(Stored::Memory))));
        Ok(overlay::over_base(changes, base))
    }

    /// The live records in a key range, in key order.
    fn records<'a>(
        &'a self,
        lower: Bound<&'a [u8]>,
        upper: Bound<&'a [u8]>,
    ) -> Result<impl Iterator<Item = Result<(Vec<u8>, Arc<Record>)>> + 'a> {
        Ok(self
            .stored_records(lower, upper)?
            .map(|item| item.and_then(|(k, r)| Ok((k, r.record()?)))))
    }

    /// A state machine metadata record.
    fn meta(&self, name: &str) -> Result<Option<Bytes>> {
        if let Some(changed) = self.layers.meta(name) {
            return Ok(Some(changed));
        }
        Ok(self
            .smm_table()?
            .get(name)
            .map_err(redb_err)?
            .map(|v| Arc::from(v.value())))
    }

    /// One key.
    pub fn get(&self, key: &[u8]) -> Result<Option<KvEntry>> {
        Ok(self.record(key)?.map(|r| entry(key, &r)))
    }

    /// Up to `limit` keys starting with `prefix` and greater than `after` (when given), in key
    /// order, and whether more follow.
    pub fn list(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<KvEntry>, bool)> {
        let lower = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let end = prefix_end(prefix);
        let upper = match &end {
            Some(e) => Bound::Excluded(e.as_slice()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.records(lower, upper)? {
            let (k, r) = item?;
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(entry(&k, &r));
        }
        Ok((out, false))
    }

    /// The store revision.
    pub fn revision(&self) -> Result<u64> {
        match self.meta(REVISION)? {
            Some(v) => bytes_u64("sm_meta", &v),
            None => Ok(0),
        }
    }

    /// A state machine metadata record written through [`Store::apply`].
    pub fn sm_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.meta(key)?.map(|v| v.to_vec()))
    }

    /// Number of keys.
    pub fn len(&self) -> Result<u64> {
        let kv = self.kv_table()?;
        let mut n = kv.len().map_err(redb_err)?;
        for change in self.layers.kv_range(Bound::Unbounded, Bound::Unbounded) {
            let (key, record) = change?;
            let in_file = kv.get(key.as_slice()).map_err(redb_err)?.is_some();
            match (record.is_some(), in_file) {
                (true, false) => n += 1,
                (false, true) => n -= 1,
                _ => {}
            }
        }
        Ok(n)
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// A digest of every key, value and version: equal on nodes that applied the same log.
    pub fn digest(&self) -> Result<u64> {
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for item in self.stored_records(Bound::Unbounded, Bound::Unbounded)? {
            let (k, r) = item?;
            // The record as the file stores it.
            let v = r.bytes()?;
            feed(&(k.len() as u64).to_le_bytes());
            feed(&k);
            feed(&(v.len() as u64).to_le_bytes());
            feed(&v);
        }
        feed(&self.revision()?.to_le_bytes());
        Ok(h)
    }

    fn image(&self) -> Result<Image> {
        let kv = self
            .stored_records(Bound::Unbounded, Bound::Unbounded)?
            .map(|item| item.and_then(|(k, r)| Ok((ByteBuf::from(k), ByteBuf::from(r.bytes()?)))))
            .collect::<Result<_>>()?;
        let sm_meta = overlay::over_base(
            self.layers.merged(|o| {
                o.meta
                    .iter()
                    .map(|(k, v)| Ok((k.to_string(), Some(ByteBuf::from(v.to_vec())))))
            }),
            self.smm_table()?.iter().map_err(redb_err)?.map(|item| {
                let (k, v) = item.map_err(redb_err)?;
                Ok((k.value().to_string(), ByteBuf::from(v.value())))
            }),
        )
        .collect::<Result<_>>()?;
        let window = &self.layers.window;
        let dedup = window
            .by_id()
            .map(|(id, result)| (ByteBuf::from(id.to_vec()), ByteBuf::from(result.to_vec())))
            .collect();
        let dedup_order = window
            .by_seq()
            .map(|(seq, id, _)| (*seq, ByteBuf::from(id.to_vec())))
            .collect();
        Ok(Image {
            format: IMAGE_FORMAT,
            kv,
            sm_meta,
            dedup,
            dedup_order,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> Store {
        Store::open(StoreConfig::new(Backend::Memory)).expect("open in-memory store")
    }

    fn put(k: &str, v: &str) -> Op {
        Op::Put {
            key: k.into(),
            value: v.into(),
        }
    }

    /// Applies an unconditional put of `k`.
    fn must_put(store: &Store, k: &str, v: &str) -> TxnResult {
        let txn = Txn {
            compare: vec![],
            success: vec![put(k, v)],
            failure: vec![],
        };
        must_apply(
            store,
            &Command {
                request_id: None,
                txn,
            },
        )
    }

    fn must_apply(store: &Store, cmd: &Command) -> TxnResult {
        store
            .apply(&[ApplyInput::Command(cmd)], &[])
            .expect("apply")
            .pop()
            .flatten()
            .expect("a result for a command")
    }

    #[test]
    fn only_changes_to_reserved_keys_bump_the_reserved_counter() {
        let s = mem();
        let apply = |txn: Txn| {
            must_apply(
                &s,
                &Command {
                    request_id: None,
                    txn,
                },
            )
        };
        apply(Txn::ops(vec![put("app/a", "1")]));
        assert_eq!(s.reserved_changes(), 0, "a user key is not reserved");
        apply(Txn::ops(vec![put("\0coffer/x", "1")]));
        assert_eq!(s.reserved_changes(), 1);
        // A failed compare still counts: the failure branch may touch reserved keys too.
        apply(Txn {
            compare: vec![Compare::Exists(b"nope".to_vec())],
            success: vec![],
            failure: vec![Op::Delete {
                key: b"\0coffer/x".to_vec(),
            }],
        });
        assert_eq!(s.reserved_changes(), 2);
        apply(Txn::ops(vec![Op::DeletePrefix {
            prefix: b"app/".to_vec(),
        }]));
        assert_eq!(s.reserved_changes(), 2);
    }

    #[test]
    fn versions_and_revisions_follow_etcd_rules() {
        let s = mem();
        let r1 = must_apply(
            &s,
            &Command {
                request_id: None,
                txn: Txn::ops(vec![put("a", "1"), put("b", "1")]),
            },
        );
        assert_eq!(r1.revision, 1, "one transaction is one revision");
        let r2 = must_apply(
            &s,
            &Command {
                request_id: None,
                txn: Txn::ops(vec![put("a", "2")]),
            },
        );
        assert_eq!(r2.revision, 2);
        let OpResult::Put { prev: Some(prev) } = &r2.results[0] else {
            panic!("expected a previous value, got {:?}", r2.results)
        };
        assert_eq!(prev.value, b"1");
        let a = s.read().unwrap().get(b"a").unwrap().unwrap();
        assert_eq!((a.version, a.create_revision, a.mod_revision), (2, 1, 2));
        // A delete of a missing key changes nothing, so the revision stays.
        let r3 = must_apply(
            &s,
            &Command {
                request_id: None,
                txn: Txn::ops(vec![Op::Delete { key: "zz".into() }]),
            },
        );
        assert_eq!(r3.revision, 2);
    }

    #[test]
    fn compare_selects_the_branch() {
        let s = mem();
        must_apply(
            &s,
            &Command {
                request_id: None,
                txn: Txn::ops(vec![put("k", "v1")]),
            },
        );
        let cas = |rev: u64, v: &str| Command {
            request_id: None,
            txn: Txn {
                compare: vec![Compare::ModRevision("k".into(), rev)],
                success: vec![put("k", v)],
                failure: vec![],
            },
        };
        assert!(!must_apply(&s, &cas(7, "bad")).succeeded);
        assert_eq!(s.read().unwrap().get(b"k").unwrap().unwrap().value, b"v1");
        assert!(must_apply(&s, &cas(1, "v2")).succeeded);
        assert_eq!(s.read().unwrap().get(b"k").unwrap().unwrap().value, b"v2");
        let absent = Command {
            request_id: None,
            txn: Txn {
                compare: vec![Compare::Absent("k".into())],
                success: vec![put("k", "x")],
                failure: vec![],
            },
        };
        assert!(!must_apply(&s, &absent).succeeded);
    }

    #[test]
    fn a_retried_request_applies_once_and_gets_the_first_result() {
        let s = mem();
        let cmd = Command {
            request_id: Some(RequestId([7; 16])),
            txn: Txn::ops(vec![put("n", "1")]),
        };
        let first = must_apply(&s, &cmd);
        let again = must_apply(&s, &cmd);
        assert_eq!(first, again);
        assert_eq!(s.read().unwrap().get(b"n").unwrap().unwrap().version, 1);
        // The remembered result keeps the previous value's metadata, not its bytes.
        let overwrite = Command {
            request_id: Some(RequestId([8; 16])),
            txn: Txn::ops(vec![put("n", "2")]),
        };
        let first = must_apply(&s, &overwrite);
        let OpResult::Put { prev: Some(prev) } = &first.results[0] else {
            panic!("expected a previous value")
        };
        assert_eq!(prev.value, b"1");
        let retried = must_apply(&s, &overwrite);
        let OpResult::Put { prev: Some(prev) } = &retried.results[0] else {
            panic!("expected a previous value")
        };
        assert!(prev.value.is_empty());
        assert_eq!(prev.version, 1);
    }

    #[test]
    fn dedup_memory_is_bounded() {
        let mut cfg = StoreConfig::new(Backend::Memory);
        cfg.dedup_capacity = 2;
        let s = Store::open(cfg).unwrap();
        for i in 0..3u8 {
            must_apply(
                &s,
                &Command {
                    request_id: Some(RequestId([i; 16])),
                    txn: Txn::ops(vec![put("n", "x")]),
                },
            );
        }
        // Id 0 was evicted: a retry now applies again (version 4); ids 1 and 2 are remembered.
        let retried_old = must_apply(
            &s,
            &Command {
                request_id: Some(RequestId([0; 16])),
                txn: Txn::ops(vec![put("n", "x")]),
            },
        );
        assert_eq!(retried_old.revision, 4);
        let retried_new = must_apply(
            &s,
            &Command {
                request_id: Some(RequestId([2; 16])),
                txn: Txn::ops(vec![put("n", "x")]),
            },
        );
        assert_eq!(retried_new.revision, 3);
    }

    #[test]
    fn delete_prefix_and_list_respect_prefix_bounds() {
        let s = mem();
        must_apply(
            &s,
            &Command {
                request_id: None,
                txn: Txn::ops(vec![
                    put("app/a", "1"),
                    put("app/b", "2"),
                    put("app/c", "3"),
                    put("apq", "4"),
                    put("ap", "5"),
                ]),
            },
        );
        let view = s.read().unwrap();
        let (page, more) = view.list(b"app/", None, 2).unwrap();
        assert_eq!(page.len(), 2);
        assert!(more);
        let (rest, more) = view.list(b"app/", Some(b"app/b"), 10).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].key, b"app/c");
        assert!(!more);
        let r = must_apply(
            &s,
            &Command {
                request_id: None,
                txn: Txn::ops(vec![Op::DeletePrefix {
                    prefix: "app/".into(),
                }]),
            },
        );
        assert_eq!(r.results, vec![OpResult::DeletePrefix { deleted: 3 }]);
        assert_eq!(s.read().unwrap().len().unwrap(), 2);
    }

    #[test]
    fn snapshot_image_round_trips_and_bad_images_change_nothing() {
        let a = mem();
        must_apply(
            &a,
            &Command {
                request_id: Some(RequestId([1; 16])),
                txn: Txn::ops(vec![put("x", "1"), put("y", "2")]),
            },
        );
        let (image, _) = a.export_image().unwrap();
        let b = mem();
        must_apply(
            &b,
            &Command {
                request_id: None,
                txn: Txn::ops(vec![put("stale", "1")]),
            },
        );
        assert!(b.install_snapshot(9, b"meta", b"garbage").is_err());
        // An image whose dedup order repeats a sequence number is refused too.
        let mut repeated: Image = postcard::from_bytes(&image).unwrap();
        repeated.dedup_order.push(repeated.dedup_order[0].clone());
        let repeated = postcard::to_stdvec(&repeated).unwrap();
        assert!(matches!(
            b.install_snapshot(9, b"meta", &repeated),
            Err(StorageError::BadSnapshot(_))
        ));
        assert!(b.read().unwrap().get(b"stale").unwrap().is_some());
        b.install_snapshot(9, b"meta", &image).unwrap();
        assert_eq!(
            a.read().unwrap().digest().unwrap(),
            b.read().unwrap().digest().unwrap()
        );
        assert!(b.read().unwrap().get(b"stale").unwrap().is_none());
        assert_eq!(b.current_snapshot().unwrap().unwrap(), b"meta".to_vec());
        // A snapshot taken from older state never replaces a newer installed one.
        assert!(!b.save_snapshot(5, b"old").unwrap());
        assert_eq!(b.current_snapshot().unwrap().unwrap(), b"meta".to_vec());
        assert!(b.save_snapshot(12, b"new").unwrap());
        assert_eq!(b.current_snapshot().unwrap().unwrap(), b"new".to_vec());
    }

    #[test]
    fn a_batch_that_fails_halfway_fails_the_store_and_never_reaches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let s = reopen(&path);
        must_put(&s, "before", "1");
        s.shared.sync_state(None).unwrap();
        // A remembered result that does not decode: the second command of the batch fails
        // after the first one changed the layers.
        lock(&s.shared.layers).window.add(
            1_000,
            Bytes::from(&[7u8; 16][..]),
            Bytes::from(&b"\xff\xff\xff"[..]),
            100,
        );
        let first = Command {
            request_id: None,
            txn: Txn::ops(vec![put("half", "1")]),
        };
        let second = Command {
            request_id: Some(RequestId([7; 16])),
            txn: Txn::ops(vec![put("never", "1")]),
        };
        let inputs = [ApplyInput::Command(&first), ApplyInput::Command(&second)];
        assert!(s.apply(&inputs, &[]).is_err());
        assert!(matches!(s.read(), Err(StorageError::Failed(_))));
        assert!(
            s.shared.sync_state(None).is_err(),
            "the half batch is never synced"
        );
        drop(s);
        let db = open_db(&path);
        let rtx = db.begin_read().unwrap();
        let kv = rtx.open_table(KV).unwrap();
        assert!(kv.get(b"before".as_slice()).unwrap().is_some());
        assert!(kv.get(b"half".as_slice()).unwrap().is_none());
    }

    /// The commands of a small deterministic workload: puts, deletes and prefix deletions
    /// over two prefixes, with request ids (some of them retries).
    fn workload(steps: u64) -> Vec<Command> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..steps)
            .map(|i| {
                let r = next();
                let key = format!("{}/{}", if r % 2 == 0 { "a" } else { "b" }, (r >> 8) % 12);
                let op = match (r >> 16) % 10 {
                    0..=5 => put(&key, &format!("v{i}")),
                    6..=8 => Op::Delete {
                        key: key.into_bytes(),
                    },
                    _ => Op::DeletePrefix {
                        prefix: b"a/".to_vec(),
                    },
                };
                // Every fifth command retries an id of a few commands back (maybe evicted).
                let id = if i % 5 == 4 { i - 3 } else { i };
                Command {
                    request_id: Some(RequestId([id as u8; 16])),
                    txn: Txn::ops(vec![op]),
                }
            })
            .collect()
    }

    /// What a reader can see of a store: every entry, the count, the revision, the digest.
    fn seen(s: &Store) -> (Vec<KvEntry>, u64, u64, u64) {
        let v = s.read().unwrap();
        let (all, more) = v.list(b"", None, usize::MAX).unwrap();
        assert!(!more);
        (
            all,
            v.len().unwrap(),
            v.revision().unwrap(),
            v.digest().unwrap(),
        )
    }

    /// An image without the sync counter (which differs between stores synced differently).
    fn image_without_syncs(s: &Store) -> Vec<u8> {
        let (bytes, _) = s.export_image().unwrap();
        let mut image: Image = postcard::from_bytes(&bytes).unwrap();
        image.sm_meta.retain(|(k, _)| k != STATE_SYNCS);
        postcard::to_stdvec(&image).unwrap()
    }

    #[test]
    fn records_and_images_encode_as_before() {
        #[derive(Serialize)]
        struct OldRecord {
            value: Vec<u8>,
            version: u64,
            create_revision: u64,
            mod_revision: u64,
        }
        #[derive(Serialize)]
        struct OldImage {
            format: u32,
            kv: Vec<(Vec<u8>, Vec<u8>)>,
            sm_meta: Vec<(String, Vec<u8>)>,
            dedup: Vec<(Vec<u8>, Vec<u8>)>,
            dedup_order: Vec<(u64, Vec<u8>)>,
        }
        let value: Vec<u8> = (0..=255).cycle().take(300).collect();
        let record = Record {
            value: value.clone(),
            version: 1,
            create_revision: 2,
            mod_revision: 300,
        };
        let old = OldRecord {
            value,
            version: 1,
            create_revision: 2,
            mod_revision: 300,
        };
        assert_eq!(
            postcard::to_stdvec(&record).unwrap(),
            postcard::to_stdvec(&old).unwrap()
        );
        let s = mem();
        must_apply(
            &s,
            &Command {
                request_id: Some(RequestId([3; 16])),
                txn: Txn::ops(vec![put("a", "1"), put("b", "2")]),
            },
        );
        let (bytes, _) = s.export_image().unwrap();
        let image: Image = postcard::from_bytes(&bytes).unwrap();
        let old = OldImage {
            format: image.format,
            kv: image
                .kv
                .iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
            sm_meta: image
                .sm_meta
                .iter()
                .map(|(k, v)| (k.clone(), v.to_vec()))
                .collect(),
            dedup: image
                .dedup
                .iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
            dedup_order: image
                .dedup_order
                .iter()
                .map(|(k, v)| (*k, v.to_vec()))
                .collect(),
        };
        assert_eq!(old.kv.len(), 2);
        assert_eq!(postcard::to_stdvec(&old).unwrap(), bytes);
    }

    #[test]
    fn reads_and_applies_see_the_same_state_however_often_it_is_synced() {
        let stores: Vec<Store> = (0..3)
            .map(|_| {
                let mut cfg = StoreConfig::new(Backend::Memory);
                cfg.dedup_capacity = 4;
                Store::open(cfg).unwrap()
            })
            .collect();
        for (i, cmd) in workload(300).iter().enumerate() {
            let results: Vec<TxnResult> = stores.iter().map(|s| must_apply(s, cmd)).collect();
            assert_eq!(results[0], results[1], "command {i}: {cmd}");
            assert_eq!(results[0], results[2], "command {i}: {cmd}");
            // Store 1 syncs after every command, store 2 every seventh; store 0 only when its
            // own thread does.
            stores[1].shared.sync_state(None).unwrap();
            if i % 7 == 6 {
                stores[2].shared.sync_state(None).unwrap();
            }
            let seen0 = seen(&stores[0]);
            assert_eq!(seen0, seen(&stores[1]), "after command {i}");
            assert_eq!(seen0, seen(&stores[2]), "after command {i}");
            assert_eq!(seen0.0.len() as u64, seen0.1, "len counts the listed keys");
        }
        assert_eq!(
            image_without_syncs(&stores[0]),
            image_without_syncs(&stores[1])
        );
        assert_eq!(
            image_without_syncs(&stores[0]),
            image_without_syncs(&stores[2])
        );
        // The file of the store synced after every command holds everything on its own.
        let rtx = stores[1].shared.db.begin_read().unwrap();
        let kv = rtx.open_table(KV).unwrap();
        assert_eq!(kv.len().unwrap(), seen(&stores[1]).1);
        assert!(lock(&stores[1].shared.layers).active.is_empty());
    }

    #[test]
    fn syncs_running_during_applies_lose_and_repeat_nothing() {
        let synced = mem();
        let reference = mem();
        let stop = Arc::new(AtomicBool::new(false));
        let syncer = {
            let (s, stop) = (synced.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut syncs = 0u64;
                while !stop.load(Ordering::Acquire) {
                    s.shared.sync_state(None).unwrap();
                    syncs += 1;
                }
                syncs
            })
        };
        for cmd in workload(3000) {
            assert_eq!(
                must_apply(&synced, &cmd),
                must_apply(&reference, &cmd),
                "{cmd}"
            );
        }
        stop.store(true, Ordering::Release);
        assert!(syncer.join().unwrap() > 0);
        assert_eq!(seen(&synced), seen(&reference));
        // Everything applied is in the file after one more sync, and nothing stays behind.
        synced.shared.sync_state(None).unwrap();
        assert!(lock(&synced.shared.layers).active.is_empty());
        let rtx = synced.shared.db.begin_read().unwrap();
        assert_eq!(
            rtx.open_table(KV).unwrap().len().unwrap(),
            seen(&reference).1
        );
    }

    #[test]
    fn a_reader_during_an_install_sees_the_old_state_or_the_new_whole() {
        let source = mem();
        must_put(&source, "x", "new");
        let (image, _) = source.export_image().unwrap();
        let s = mem();
        s.install_snapshot(1, b"meta", &image).unwrap();
        // As if a second install were being committed, with changes from before it in memory
        // (which the store's own sync thread must not write meanwhile).
        let _install = lock(&s.shared.state_write);
        let mut stale = Overlay::default();
        stale.kv.insert(Arc::from(&b"x"[..]), None);
        lock(&s.shared.layers).active = stale;
        lock(&s.shared.layers).installing = Some((2, DedupWindow::default()));
        assert!(
            s.read().unwrap().get(b"x").unwrap().is_none(),
            "before the install's commit, the changes in memory still apply"
        );
        // The file now holds install 1 as the one being committed: the changes are older.
        lock(&s.shared.layers).installing = Some((1, DedupWindow::default()));
        assert_eq!(s.read().unwrap().get(b"x").unwrap().unwrap().value, b"new");
    }

    #[test]
    fn a_view_keeps_its_point_in_time_across_applies_and_syncs() {
        let s = mem();
        must_put(&s, "k", "old");
        must_put(&s, "gone", "1");
        let before = s.read().unwrap();
        must_put(&s, "k", "new");
        s.shared.sync_state(None).unwrap();
        must_apply(
            &s,
            &Command {
                request_id: None,
                txn: Txn::ops(vec![Op::Delete {
                    key: b"gone".to_vec(),
                }]),
            },
        );
        // The sync is writing the delete while its layer is frozen (and the store's own sync
        // thread waits meanwhile).
        let _sync = lock(&s.shared.state_write);
        let during = {
            let mut layers = lock(&s.shared.layers);
            layers.frozen = Some(Arc::new(std::mem::take(&mut layers.active)));
            drop(layers);
            s.read().unwrap()
        };
        assert_eq!(before.get(b"k").unwrap().unwrap().value, b"old");
        assert!(before.get(b"gone").unwrap().is_some());
        assert_eq!((before.len().unwrap(), before.revision().unwrap()), (2, 2));
        assert_eq!(during.get(b"k").unwrap().unwrap().value, b"new");
        assert!(during.get(b"gone").unwrap().is_none());
        assert_eq!((during.len().unwrap(), during.revision().unwrap()), (1, 4));
        assert_eq!(
            during.list(b"", None, 10).unwrap().0,
            s.read().unwrap().list(b"", None, 10).unwrap().0
        );
    }

    #[test]
    fn saving_a_snapshot_makes_the_applied_state_durable_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(StoreConfig::new(Backend::File(
            dir.path().join("node.redb"),
        )))
        .unwrap();
        // An image kept by an earlier version: the state file replaces it.
        {
            let wtx = s.shared.db.begin_write().unwrap();
            wtx.open_table(SNAPSHOT)
                .unwrap()
                .insert(OLD_IMAGE, b"old image".as_slice())
                .unwrap();
            wtx.commit().unwrap();
        }
        let results = s
            .apply(
                &[ApplyInput::Command(&Command {
                    request_id: None,
                    txn: Txn::ops(vec![put("k", "v")]),
                })],
                &[("applied", b"7")],
            )
            .unwrap();
        assert_eq!(results.len(), 1);
        assert!(s.save_snapshot(7, b"meta").unwrap());
        assert_eq!(s.current_snapshot().unwrap().unwrap(), b"meta".to_vec());
        // The file alone (what a crash leaves) holds the state the snapshot was taken from.
        let rtx = s.shared.db.begin_read().unwrap();
        let snap = rtx.open_table(SNAPSHOT).unwrap();
        assert!(
            snap.get(OLD_IMAGE).unwrap().is_none(),
            "the old image is kept"
        );
        assert_eq!(
            snap.get("index").unwrap().unwrap().value(),
            u64_bytes(7).as_slice()
        );
        assert!(
            rtx.open_table(KV)
                .unwrap()
                .get(b"k".as_slice())
                .unwrap()
                .is_some()
        );
        let smm = rtx.open_table(SM_META).unwrap();
        assert_eq!(smm.get("applied").unwrap().unwrap().value(), b"7");
    }

    #[test]
    fn an_installed_snapshot_replaces_unsynced_changes_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let source = mem();
        must_put(&source, "x", "1");
        let (image, _) = source.export_image().unwrap();
        {
            let s = reopen(&path);
            must_put(&s, "stale", "1");
            s.install_snapshot(3, b"meta", &image).unwrap();
            must_put(&s, "after", "2");
            assert!(s.read().unwrap().get(b"stale").unwrap().is_none());
        }
        let s = reopen(&path);
        let v = s.read().unwrap();
        assert!(
            v.get(b"stale").unwrap().is_none(),
            "the old change came back"
        );
        assert_eq!(v.get(b"x").unwrap().unwrap().value, b"1");
        assert_eq!(v.get(b"after").unwrap().unwrap().value, b"2");
    }

    /// Opens a store of dedup capacity 2 at `path`, waiting for an earlier one to let go.
    fn open_small_dedup(path: &Path) -> Store {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut cfg = StoreConfig::new(Backend::File(path.to_path_buf()));
            cfg.dedup_capacity = 2;
            match Store::open(cfg) {
                Ok(s) => return s,
                Err(_) if Instant::now() < deadline => std::thread::yield_now(),
                Err(e) => panic!("reopen: {e}"),
            }
        }
    }

    fn dedup_cmd(id: u8) -> Command {
        Command {
            request_id: Some(RequestId([id; 16])),
            txn: Txn::ops(vec![put("n", "x")]),
        }
    }

    /// The state file of a store just dropped (its threads let go of it shortly after).
    fn open_db(path: &Path) -> Database {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Database::open(path) {
                Ok(db) => return db,
                Err(_) if Instant::now() < deadline => std::thread::yield_now(),
                Err(e) => panic!("open {}: {e}", path.display()),
            }
        }
    }

    fn chunk_rows(path: &Path) -> u64 {
        let db = open_db(path);
        let rtx = db.begin_read().unwrap();
        rtx.open_table(DEDUP_CHUNKS).unwrap().len().unwrap()
    }

    /// After ids 0, 1, 2 were applied (revisions 1 to 3) with capacity 2 and the store
    /// reopened: the window holds ids 1 and 2 and goes on evicting in order.
    fn assert_dedup_window_continues(s: &Store) {
        assert_eq!(
            must_apply(s, &dedup_cmd(2)).revision,
            3,
            "id 2 must be remembered"
        );
        assert_eq!(must_apply(s, &dedup_cmd(3)).revision, 4);
        assert_eq!(
            must_apply(s, &dedup_cmd(2)).revision,
            3,
            "id 2 must still be remembered"
        );
        assert_eq!(
            must_apply(s, &dedup_cmd(1)).revision,
            5,
            "id 1 must be forgotten"
        );
    }

    #[test]
    fn dedup_eviction_goes_on_in_order_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        {
            let s = open_small_dedup(&path);
            for id in 0..3 {
                must_apply(&s, &dedup_cmd(id));
                s.shared.sync_state(None).unwrap();
            }
        }
        // One chunk per sync, and the one whose only id left the window is gone.
        assert_eq!(chunk_rows(&path), 2);
        let s = open_small_dedup(&path);
        assert_dedup_window_continues(&s);
        for id in 10..40 {
            must_apply(&s, &dedup_cmd(id));
            s.shared.sync_state(None).unwrap();
        }
        drop(s);
        assert_eq!(chunk_rows(&path), 2, "chunks never outgrow the window");
    }

    #[test]
    fn a_dedup_window_kept_one_row_per_id_moves_into_a_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        {
            let s = open_small_dedup(&path);
            for id in 0..3 {
                must_apply(&s, &dedup_cmd(id));
            }
        }
        // Rewrite the window as earlier versions kept it: a result row per id and an order
        // row per sequence number.
        {
            let db = open_db(&path);
            let wtx = db.begin_write().unwrap();
            {
                let mut chunks = wtx.open_table(DEDUP_CHUNKS).unwrap();
                let mut entries = Vec::new();
                for item in chunks.iter().unwrap() {
                    entries.extend(dedup::decode_chunk(item.unwrap().1.value()).unwrap());
                }
                // The close's one sync wrote all three in one chunk; the window is the last
                // two, all that the old tables held.
                assert_eq!(entries.len(), 3);
                chunks.retain(|_, _| false).unwrap();
                let mut results = wtx.open_table(OLD_DEDUP).unwrap();
                let mut order = wtx.open_table(OLD_DEDUP_ORDER).unwrap();
                for (seq, id, result) in entries.into_iter().skip(1) {
                    results.insert(&*id, &*result).unwrap();
                    order.insert(seq, &*id).unwrap();
                }
            }
            wtx.commit().unwrap();
        }
        let s = open_small_dedup(&path);
        assert_dedup_window_continues(&s);
        drop(s);
        assert_eq!(chunk_rows(&path), 1);
        let db = open_db(&path);
        let rtx = db.begin_read().unwrap();
        assert!(
            rtx.open_table(OLD_DEDUP).is_err(),
            "the old tables are gone"
        );
        assert!(rtx.open_table(OLD_DEDUP_ORDER).is_err());
    }

    #[test]
    fn file_store_keeps_flushed_entries_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        {
            let s = Store::open(StoreConfig::new(Backend::File(path.clone()))).unwrap();
            let (tx, rx) = mpsc::channel();
            s.append(vec![(1, b"one".to_vec()), (2, b"two".to_vec())], move |r| {
                tx.send(r.is_ok()).unwrap()
            });
            assert!(rx.recv().unwrap());
            s.truncate_from(2).unwrap();
        }
        // The flusher thread holds only a weak reference, so the file is closed by now or soon.
        let s = reopen(&path);
        assert_eq!(s.log_range(0, 10).unwrap(), vec![(1, b"one".to_vec())]);
    }

    /// Waits for the flusher to release the file, then opens it again.
    #[test]
    fn a_log_in_the_state_file_moves_to_its_own_file_and_the_state_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        // The layout before the log had a file of its own: every table in one database.
        {
            let db = Database::create(&path).unwrap();
            let wtx = db.begin_write().unwrap();
            {
                let mut log = wtx.open_table(LOG).unwrap();
                log.insert(7, b"seven".as_slice()).unwrap();
                log.insert(8, b"eight".as_slice()).unwrap();
                let mut meta = wtx.open_table(META).unwrap();
                meta.insert("vote", b"v".as_slice()).unwrap();
                let mut kv = wtx.open_table(KV).unwrap();
                let record = Record {
                    value: b"kept".to_vec(),
                    version: 1,
                    create_revision: 1,
                    mod_revision: 1,
                };
                kv.insert(
                    b"k".as_slice(),
                    postcard::to_stdvec(&record).unwrap().as_slice(),
                )
                .unwrap();
            }
            wtx.commit().unwrap();
        }
        {
            let s = reopen(&path);
            assert_eq!(
                s.log_range(0, 10).unwrap(),
                vec![(7, b"seven".to_vec()), (8, b"eight".to_vec())]
            );
            assert_eq!(s.meta_get("vote").unwrap(), Some(b"v".to_vec()));
            assert_kept(&s);
            must_put(&s, "after", "x");
        }
        assert!(log_path(&path).exists(), "the log has its own file");
        // The state file holds no log any more, and a second open finds everything in place.
        {
            let db = Database::open(&path).unwrap();
            let rtx = db.begin_read().unwrap();
            assert!(
                rtx.open_table(LOG).is_err(),
                "the old log table was removed"
            );
        }
        let s = reopen(&path);
        assert_eq!(s.log_range(0, 10).unwrap().len(), 2);
        assert_eq!(s.meta_get("vote").unwrap(), Some(b"v".to_vec()));
        let view = s.read().unwrap();
        assert!(
            view.get(b"after").unwrap().is_some(),
            "the state written after the move survived the close"
        );
    }

    #[test]
    fn a_log_in_a_redb_file_of_its_own_moves_into_the_log_file() {
        let (_dir, path) = state_without_log("kept");
        // The previous layout: the log in a redb database beside the state, no log file.
        {
            let db = Database::create(redb_log_path(&path)).unwrap();
            let wtx = db.begin_write().unwrap();
            {
                let mut log = wtx.open_table(LOG).unwrap();
                log.insert(3, b"three".as_slice()).unwrap();
                let mut meta = wtx.open_table(META).unwrap();
                meta.insert("vote", b"v".as_slice()).unwrap();
                meta.insert("flushes", 9u64.to_le_bytes().as_slice())
                    .unwrap();
            }
            wtx.commit().unwrap();
        }
        for _ in 0..2 {
            let s = reopen(&path);
            assert_eq!(s.log_range(0, 10).unwrap(), vec![(3, b"three".to_vec())]);
            assert_eq!(s.meta_get("vote").unwrap(), Some(b"v".to_vec()));
            assert_eq!(s.meta_get("flushes").unwrap(), None);
            assert_kept(&s);
            assert!(!redb_log_path(&path).exists(), "the old log file is gone");
        }
    }

    #[test]
    fn a_purge_rewrites_a_mostly_purged_log_file_and_keeps_the_live_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let big = vec![0x5au8; 100_000];
        {
            let s = Store::open(StoreConfig::new(Backend::File(path.clone()))).unwrap();
            let (tx, rx) = mpsc::channel();
            for i in 1..=60 {
                let done = tx.clone();
                s.append(vec![(i, big.clone())], move |r| {
                    done.send(r.is_ok()).unwrap()
                });
            }
            for _ in 1..=60 {
                assert!(rx.recv().unwrap());
            }
            let grown = std::fs::metadata(log_path(&path)).unwrap().len();
            assert!(grown > 6_000_000, "{grown} bytes");
            // Written lazily: it must not be lost when the file is rewritten.
            s.meta_put("committed", b"c58", false).unwrap();
            s.purge_through(55, "purged", b"p55").unwrap();
            assert_eq!(s.log_range(0, 100).unwrap().len(), 5);
            // The rewrite comes before the flusher's next write.
            let (tx, rx) = mpsc::channel();
            s.append(vec![(61, b"after".to_vec())], move |r| {
                tx.send(r.is_ok()).unwrap()
            });
            assert!(rx.recv().unwrap());
            let rewritten = std::fs::metadata(log_path(&path)).unwrap().len();
            assert!(rewritten < 600_000, "{rewritten} bytes after the purge");
            assert_eq!(
                s.log_range(56, 57).unwrap()[0].1,
                big,
                "read at its new place"
            );
        }
        let s = reopen(&path);
        let log = s.log_range(0, 100).unwrap();
        let indexes: Vec<u64> = log.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, vec![56, 57, 58, 59, 60, 61]);
        assert_eq!(log[0].1, big);
        assert_eq!(log[5].1, b"after");
        assert_eq!(s.meta_get("committed").unwrap(), Some(b"c58".to_vec()));
        assert_eq!(s.meta_get("purged").unwrap(), Some(b"p55".to_vec()));
    }

    #[test]
    fn a_missing_log_file_beside_state_is_refused() {
        let (_dir, path) = state_without_log("v");
        for _ in 0..2 {
            let e = Store::open(StoreConfig::new(Backend::File(path.clone()))).unwrap_err();
            assert!(e.to_string().contains("is missing"), "{e}");
            assert!(
                !log_path(&path).exists(),
                "no empty log file is left to be accepted later"
            );
        }
    }

    /// Asserts that the state holds `k` = `kept`.
    fn assert_kept(s: &Store) {
        let got = s.read().unwrap().get(b"k").unwrap();
        assert_eq!(got.expect("the key is kept").value, b"kept");
    }

    /// A file store whose state holds `k` = `value`, closed, with its log file removed.
    fn state_without_log(value: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        {
            let s = Store::open(StoreConfig::new(Backend::File(path.clone()))).unwrap();
            must_put(&s, "k", value);
        }
        // Wait until the store closed (its threads hold it briefly), then lose the log file.
        drop(reopen(&path));
        std::fs::remove_file(log_path(&path)).unwrap();
        (dir, path)
    }

    fn reopen(path: &std::path::Path) -> Store {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Store::open(StoreConfig::new(Backend::File(path.to_path_buf()))) {
                Ok(s) => return s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::yield_now();
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
    }

    #[test]
    fn pending_appends_are_readable_truncatable_and_carry_lazy_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        {
            let s = Store::open(StoreConfig::new(Backend::File(path.clone()))).unwrap();
            s.meta_put("committed", b"c1", false).unwrap();
            assert_eq!(s.meta_get("committed").unwrap(), Some(b"c1".to_vec()));
            let (tx, rx) = mpsc::channel();
            let done = tx.clone();
            s.append(
                vec![
                    (1, b"one".to_vec()),
                    (2, b"two".to_vec()),
                    (3, b"three".to_vec()),
                ],
                move |r| done.send(r.is_ok()).unwrap(),
            );
            // Readable on return, whether or not the flusher has committed them yet.
            assert_eq!(s.log_range(2, 10).unwrap().len(), 2);
            assert_eq!(s.log_last().unwrap().unwrap().0, 3);
            // A truncation waits for the appends queued before it and removes them too.
            s.truncate_from(3).unwrap();
            assert!(rx.recv().unwrap());
            assert_eq!(s.log_last().unwrap().unwrap(), (2, b"two".to_vec()));
            // The same index appended again is the newer entry.
            let done = tx.clone();
            s.append(vec![(3, b"drei".to_vec())], move |r| {
                done.send(r.is_ok()).unwrap()
            });
            assert_eq!(s.log_range(3, 4).unwrap(), vec![(3, b"drei".to_vec())]);
            assert!(rx.recv().unwrap());
        }
        let s = reopen(&path);
        assert_eq!(
            s.log_range(0, 10).unwrap(),
            vec![
                (1, b"one".to_vec()),
                (2, b"two".to_vec()),
                (3, b"drei".to_vec())
            ]
        );
        // The lazily written record went to disk with the next append's commit.
        assert_eq!(s.meta_get("committed").unwrap(), Some(b"c1".to_vec()));
        // A purge right after an append (perhaps still pending) leaves nothing for the
        // flusher to write back below the purged mark.
        let (tx, rx) = mpsc::channel();
        s.append(vec![(4, b"vier".to_vec())], move |r| {
            tx.send(r.is_ok()).unwrap()
        });
        s.purge_through(4, "purged", b"p4").unwrap();
        assert!(rx.recv().unwrap());
        assert!(s.log_range(0, 10).unwrap().is_empty());
        // A record with no append after it is written when the store closes.
        s.meta_put("committed", b"c2", false).unwrap();
        drop(s);
        let s = reopen(&path);
        assert!(s.log_range(0, 10).unwrap().is_empty());
        assert_eq!(s.meta_get("committed").unwrap(), Some(b"c2".to_vec()));
    }

    #[test]
    fn prefix_end_handles_ff() {
        assert_eq!(prefix_end(b"a"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(&[0x61, 0xff]), Some(vec![0x62]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }
}
