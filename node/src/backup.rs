//! Backups: the file `coffer operator snapshot save` writes and `restore` reads.
//!
//! A backup holds every record of the replicated store at one revision, as stored: values are
//! the barrier's ciphertext (AES-256-GCM under the keyring, bound to their path), so the file
//! holds nothing readable without the master key. It also holds what the same operators need
//! to unseal it in another cluster: the seal configuration and the encrypted keyring. What
//! belongs to the source cluster's nodes and clients is left out ([`belongs_in_backup`]).
//!
//! The file (all integers big-endian):
//!
//! ```text
//! magic "COFFERBK" (8) | format version (4) | source revision (8) | created, ms since the
//! Unix epoch (8) | record count (8) | records | SHA-256 of everything before it (32)
//! record: key length (4) | key | value length (4) | value       (keys strictly increasing)
//! ```
//!
//! Restoring writes the records through Raft in bounded transactions: first a marker that a
//! restore is in progress ([`RESTORE_KEY`]; it also wipes a previous attempt that did not
//! finish), then the records, and last, in one transaction, the seal configuration, the
//! keyring and the marker saying it is complete. A cluster counts as initialized only once the
//! seal configuration exists, so a restore that stops half-way leaves an uninitialized cluster
//! that serves nothing, and running it again starts over cleanly.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use coffer_storage::ReadView;
use serde::{Deserialize, Serialize};

use crate::{auth, node_identity, seal};

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"COFFERBK";
/// The format this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the first record.
const HEADER_BYTES: usize = 8 + 4 + 8 + 8 + 8;
/// The checksum trailer.
const TRAILER_BYTES: usize = 32;
/// The largest backup a node takes in (it is checked in memory before anything is written).
pub const MAX_FILE_BYTES: u64 = 8 << 30;
/// Where a restore records that it is in progress, and then that it completed (postcard
/// [`RestoreMarker`]). Never part of a backup: it describes the cluster it was restored into.
pub const RESTORE_KEY: &[u8] = b"\0coffer/restore";
/// What an operator signs to restore a backup (followed by the file's checksum).
const RESTORE_CONTEXT: &[u8] = b"coffer/snapshot-restore/v1\0";
/// The records written last, in the transaction that completes a restore: with them the
/// cluster counts as initialized.
pub const WRITTEN_LAST: [&[u8]; 3] = [
    seal::KEYRING_KEY,
    node_identity::NODE_CA_KEY,
    seal::CONFIG_KEY,
];

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The source cluster's store revision the records were read at.
    pub source_revision: u64,
    /// When the file was made (ms since the Unix epoch).
    pub created_ms: u64,
    /// How many records follow.
    pub records: u64,
}

/// A parsed, verified backup.
#[derive(Debug)]
pub struct Backup {
    /// The header.
    pub header: Header,
    /// (key, value) in key order, values as stored (ciphertext).
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
    /// SHA-256 over the file before the trailer (the trailer itself).
    pub checksum: [u8; 32],
}

/// The restore marker's states.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum RestoreState {
    /// Records are being written; the cluster is not initialized yet.
    InProgress,
    /// The seal configuration was written with the last records.
    Complete,
}

/// What [`RESTORE_KEY`] holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestoreMarker {
    /// In progress or complete.
    pub state: RestoreState,
    /// The restored file's checksum.
    pub checksum: [u8; 32],
    /// The source cluster's revision.
    pub source_revision: u64,
    /// When the restore started (ms since the Unix epoch).
    pub started_ms: u64,
    /// The operator who signed it.
    pub operator: String,
}

/// Whether the record at `key` goes into a backup. Left out, because it belongs to the source
/// cluster's nodes or clients, or means nothing in another cluster:
/// * sessions: the restored cluster derives the same session CA from the same keyring, so a
///   session record carried over would let the old cluster's session certificates in;
///   clients log in again;
/// * used login nonces whose challenge has expired (an expired challenge is refused anyway);
///   unexpired ones are kept, so a challenge used just before the save cannot be used again;
/// * node key registrations, node certificate records and retired node ids: they name the
///   source cluster's nodes; the restored cluster's members record themselves when unsealed;
/// * the last seal action: it records a revision of the source cluster's store, and the
///   restored cluster starts sealed anyway;
/// * the peer-unseal setting: it makes the new cluster's node certificates as sensitive as
///   T operator shares, a decision the operators make again for the new nodes;
/// * the restore marker of a cluster that was itself restored.
pub fn belongs_in_backup(key: &[u8], value: &[u8], now_ms: u64) -> bool {
    if key.starts_with(auth::NONCE_PREFIX) {
        let expiry = value.try_into().map(u64::from_be_bytes).unwrap_or(u64::MAX);
        return expiry > now_ms;
    }
    let left_out_prefixes = [
        auth::SESSION_PREFIX,
        node_identity::NODE_KEY_PREFIX,
        node_identity::NODE_CERT_PREFIX,
        node_identity::NODE_RETIRED_PREFIX,
    ];
    let left_out_keys = [seal::SEALED_KEY, seal::PEER_UNSEAL_KEY, RESTORE_KEY];
    !left_out_prefixes.iter().any(|p| key.starts_with(p)) && !left_out_keys.contains(&key)
}

/// Writes a backup of `view` (which the caller read after a read index) made at `now_ms`.
/// Refuses a store that was never initialized: its backup could not be unsealed.
pub fn build(view: &ReadView, now_ms: u64) -> Result<Vec<u8>> {
    let source_revision = view.revision()?;
    let mut records = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let (page, more) = view.list(b"", after.as_deref(), 1000)?;
        after = page.last().map(|e| e.key.clone());
        records.extend(
            page.into_iter()
                .filter(|e| belongs_in_backup(&e.key, &e.value, now_ms))
                .map(|e| (e.key, e.value)),
        );
        if !more {
            break;
        }
    }
    if !records.iter().any(|(k, _)| k == seal::CONFIG_KEY) {
        bail!("this cluster is not initialized: there is nothing to back up");
    }
    Ok(encode(
        Header {
            source_revision,
            created_ms: now_ms,
            records: records.len() as u64,
        },
        &records,
    ))
}

/// The file for `header` and `records` (in key order).
pub fn encode(header: Header, records: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let size: usize = records.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(HEADER_BYTES + size + TRAILER_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&header.source_revision.to_be_bytes());
    out.extend_from_slice(&header.created_ms.to_be_bytes());
    out.extend_from_slice(&header.records.to_be_bytes());
    for (k, v) in records {
        for part in [k, v] {
            // A key is at most 4096 bytes and a value at most 64 MiB (the server's limits).
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &out);
    out.extend_from_slice(digest.as_ref());
    out
}

/// Reads and verifies a backup: magic, format version, checksum (before any record is looked
/// at), then the records, their count and order. Every refusal says what is wrong and that
/// nothing was restored from it.
pub fn decode(bytes: &[u8]) -> Result<Backup> {
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        bail!("not a Coffer backup file (it does not start with {MAGIC:?})");
    }
    if bytes.len() < HEADER_BYTES + TRAILER_BYTES {
        bail!(
            "the backup file is truncated ({} bytes, shorter than a header and a checksum): use an intact copy",
            bytes.len()
        );
    }
    let version = u32::from_be_bytes(read_array(bytes, 8));
    if version != FORMAT_VERSION {
        bail!(
            "the backup file has format version {version}, but this Coffer reads version {FORMAT_VERSION} only: restore it with the Coffer release that saved it"
        );
    }
    let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_BYTES);
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    if digest.as_ref() != trailer {
        bail!(
            "the backup file is corrupt or truncated: its SHA-256 checksum does not match its contents; use an intact copy (compare it with the checksum `coffer operator snapshot save` printed)"
        );
    }
    let mut checksum = [0u8; 32];
    checksum.copy_from_slice(trailer);
    let header = Header {
        source_revision: u64::from_be_bytes(read_array(body, 12)),
        created_ms: u64::from_be_bytes(read_array(body, 20)),
        records: u64::from_be_bytes(read_array(body, 28)),
    };
    let mut at = HEADER_BYTES;
    let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let field = |at: &mut usize| -> Result<Vec<u8>> {
        let len_end = *at + 4;
        let len = body
            .get(*at..len_end)
            .map(|b| u32::from_be_bytes(read_array(b, 0)) as usize)
            .context("the backup file is malformed: a record is cut short")?;
        let data = body
            .get(len_end..len_end + len)
            .context("the backup file is malformed: a record is cut short")?;
        *at = len_end + len;
        Ok(data.to_vec())
    };
    while at < body.len() {
        let key = field(&mut at)?;
        let value = field(&mut at)?;
        if records.last().is_some_and(|(last, _)| *last >= key) {
            bail!("the backup file is malformed: its keys are not in strictly increasing order");
        }
        records.push((key, value));
    }
    if records.len() as u64 != header.records {
        bail!(
            "the backup file is malformed: its header announces {} records, it holds {}",
            header.records,
            records.len()
        );
    }
    Ok(Backup {
        header,
        records,
        checksum,
    })
}

fn read_array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

impl Backup {
    /// The seal configuration the backup carries (the operators who can unseal it).
    pub fn seal_config(&self) -> Result<seal::SealConfig> {
        let value = self
            .value(seal::CONFIG_KEY)
            .context("the backup holds no seal configuration, so no operator could unseal it")?;
        postcard::from_bytes(value).context("the backup's seal configuration is corrupt")
    }

    /// The value of `key`, if the backup holds it.
    pub fn value(&self, key: &[u8]) -> Option<&[u8]> {
        self.records
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .ok()
            .map(|i| self.records[i].1.as_slice())
    }
}

/// What an operator of the backup signs to restore it.
pub fn restore_message(checksum: &[u8; 32]) -> Vec<u8> {
    [RESTORE_CONTEXT, checksum.as_slice()].concat()
}

/// The hex form of a checksum, as the CLI prints it.
pub fn hex(bytes: &[u8]) -> String {
    crate::operator::hex(bytes)
}

/// Writes `bytes` to `path` durably: into `path.tmp`, fsynced, renamed over `path`, and the
/// directory fsynced, so a crash leaves either the old file or the whole new one.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    // Owner only: the file holds ciphertext and the encrypted keyring, still nobody else's.
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?
    };
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(file);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync the directory {}", dir.display()))?;
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Scheduled backups (`--snapshot-dir`, `--snapshot-interval`, `--snapshot-retain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Where the files go.
    pub dir: PathBuf,
    /// How often the leader writes one.
    pub interval: std::time::Duration,
    /// How many files are kept; the oldest beyond that are deleted.
    pub retain: usize,
}

/// The name of a scheduled backup file: the time first (zero-padded, so names sort by time),
/// then the node that wrote it.
fn scheduled_name(created_ms: u64, node_id: u64) -> String {
    format!("coffer-{created_ms:016}-node{node_id}.snap")
}

/// Every `schedule.interval`, if this node is the leader of an initialized cluster, writes a
/// backup into `schedule.dir` (after a read index, which also confirms the leadership) and
/// deletes the oldest scheduled files beyond `schedule.retain`. A sealed leader writes them
/// too: a backup needs no key. Runs until the node stops; failures are logged and retried at
/// the next tick.
pub async fn run_schedule(node: std::sync::Arc<coffer_raft::RaftNode>, schedule: Schedule) {
    let mut tick = tokio::time::interval(schedule.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await; // The first tick is immediate: the first backup comes one interval in.
    loop {
        tick.tick().await;
        if node.leader_id() != Some(node.id()) {
            continue;
        }
        match scheduled_backup(&node, &schedule).await {
            Ok(Some((path, removed))) => tracing::info!(
                file = %path.display(),
                removed,
                "wrote a scheduled backup"
            ),
            Ok(None) => tracing::debug!("not initialized: no scheduled backup"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "scheduled backup failed; trying again at the next interval")
            }
        }
    }
}

async fn scheduled_backup(
    node: &std::sync::Arc<coffer_raft::RaftNode>,
    schedule: &Schedule,
) -> Result<Option<(PathBuf, usize)>> {
    node.linearize()
        .await
        .map_err(|e| anyhow::anyhow!("no read index: {e}"))?;
    let node = node.clone();
    let schedule = schedule.clone();
    tokio::task::spawn_blocking(move || {
        let view = node.store().read()?;
        if view.get(seal::CONFIG_KEY)?.is_none() {
            return Ok(None);
        }
        let now = auth::now_ms();
        let bytes = build(&view, now)?;
        drop(view);
        std::fs::create_dir_all(&schedule.dir)
            .with_context(|| format!("cannot create {}", schedule.dir.display()))?;
        let path = schedule.dir.join(scheduled_name(now, node.id()));
        write_file(&path, &bytes)?;
        let removed = prune(&schedule.dir, schedule.retain)?;
        Ok(Some((path, removed)))
    })
    .await?
}

/// Deletes the oldest scheduled backups in `dir` beyond the `retain` newest (by name, which
/// is by time); other files are left alone. Returns how many it deleted.
fn prune(dir: &Path, retain: usize) -> Result<usize> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("coffer-") && n.ends_with(".snap"))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(retain);
    for name in &names[..excess] {
        std::fs::remove_file(dir.join(name))
            .with_context(|| format!("cannot delete the old backup {name}"))?;
    }
    Ok(excess)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let records = vec![
            (seal::CONFIG_KEY.to_vec(), b"config".to_vec()),
            (b"\x01kv/secret/m/a".to_vec(), vec![7; 100]),
            (b"\x01kv/secret/v/a\x001".to_vec(), Vec::new()),
        ];
        encode(
            Header {
                source_revision: 42,
                created_ms: 1_700_000_000_000,
                records: 3,
            },
            &records,
        )
    }

    #[test]
    fn a_backup_round_trips() {
        let bytes = sample();
        let b = decode(&bytes).unwrap();
        assert_eq!(b.header.source_revision, 42);
        assert_eq!(b.records.len(), 3);
        assert_eq!(b.value(seal::CONFIG_KEY), Some(&b"config"[..]));
        assert_eq!(b.value(b"\x01kv/secret/v/a\x001"), Some(&[][..]));
        assert_eq!(&b.checksum[..], &bytes[bytes.len() - 32..]);
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let bytes = sample();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(decode(&bad).is_err(), "a flipped byte {i} was accepted");
        }
        for len in 0..bytes.len() {
            let e = decode(&bytes[..len]).unwrap_err().to_string();
            assert!(
                e.contains("truncated") || e.contains("not a Coffer backup"),
                "truncated to {len}: {e}"
            );
        }
    }

    #[test]
    fn another_format_version_is_named() {
        let mut bytes = sample();
        bytes[8..12].copy_from_slice(&2u32.to_be_bytes());
        let e = decode(&bytes).unwrap_err().to_string();
        assert!(e.contains("format version 2"), "{e}");
    }

    #[test]
    fn what_belongs_to_the_source_cluster_is_left_out() {
        let now = 1_000;
        let nonce = |expiry: u64| {
            belongs_in_backup(
                &[auth::NONCE_PREFIX, b"ab"].concat(),
                &expiry.to_be_bytes(),
                now,
            )
        };
        assert!(nonce(now + 1) && !nonce(now));
        for key in [
            [auth::SESSION_PREFIX, b"s1"].concat(),
            node_identity::node_cert_record(1),
            node_identity::node_key_record(4),
            node_identity::node_retired_record(3),
            seal::SEALED_KEY.to_vec(),
            seal::PEER_UNSEAL_KEY.to_vec(),
            RESTORE_KEY.to_vec(),
        ] {
            assert!(!belongs_in_backup(&key, b"", now), "{key:?}");
        }
        for key in WRITTEN_LAST {
            assert!(belongs_in_backup(key, b"", now));
        }
        assert!(belongs_in_backup(b"\x01kv/secret/m/a", b"", now));
    }

    #[test]
    fn retention_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for ms in [3, 1, 2, 4] {
            std::fs::write(dir.path().join(scheduled_name(ms, 1)), b"x").unwrap();
        }
        std::fs::write(dir.path().join("keep-me.snap"), b"x").unwrap();
        assert_eq!(prune(dir.path(), 2).unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                scheduled_name(3, 1),
                scheduled_name(4, 1),
                "keep-me.snap".into()
            ]
        );
    }

    #[test]
    fn a_written_file_replaces_the_old_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.snap");
        write_file(&path, b"one").unwrap();
        write_file(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!tmp_path(&path).exists());
    }
}
