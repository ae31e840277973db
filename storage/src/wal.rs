//! The Raft log's write-ahead file: an append-only sequence of checksummed frames of records.
//!
//! A durable log commit is one `write` of every record queued meanwhile and one `fdatasync`,
//! instead of a copy-on-write B-tree commit (redb wrote about 13 pages per commit here, this
//! writes the records themselves). The live log's index is held in memory (the Raft layer purges the
//! log behind every snapshot, so it stays a few thousand entries), with the bytes of every entry
//! up to [`INLINE_MAX`] bytes: replication reads those without touching the file; larger entries
//! are read back from the file, so the memory the log takes does not grow with the values' size.
//!
//! Layout: an 8-byte magic and an 8-byte random salt, then frames
//! `[len: u32][crc32: u32][write: u64][body: len bytes]` (little-endian; the top bit of `len`
//! marks the first frame of a write; the checksum covers the salt, `len`, the write number and
//! the body). The body is records `[len: u32][kind: u8][fields]`. One write to the file is one
//! frame (or several of at most [`FRAME_BODY_MAX`] bytes each, with the same write number), and
//! write numbers go up with every write. Replaying the records in order rebuilds the log: an entry replaces any at its
//! index, a truncation drops the entries from an index on, a purge those through an index, a
//! metadata record sets a key. When purged records make up most of the file, it is rewritten
//! with only the live entries and metadata (a new file, synced, renamed over the old one, the
//! directory synced).
//!
//! A frame that ends past the end of the file or fails its checksum is where a crash cut the
//! last write short: the file is cut there when it opens (with a warning naming the bytes
//! dropped), since the entries in it were never acknowledged (an append is acknowledged only
//! after its `fdatasync`). If the first frame of a *later* write follows the damage, the damage
//! is not a torn last write but lost or corrupted data in the middle of the log (a failed
//! writeback, a bad disk): opening is refused, since continuing could forget a vote or entries
//! the cluster counted on. A frame whose checksum holds but whose records do not decode (a
//! newer format) is refused too.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"CFRWAL\x00\x03";
/// The magic and the file's salt.
const HEADER: u64 = 16;
const FRAME_HEADER: usize = 16;
/// Set in a frame's length field on the first frame of a write.
const FIRST: u32 = 1 << 31;
/// A write's records are split into frames of at most this many bytes (a larger record gets a
/// frame of its own).
pub(crate) const FRAME_BODY_MAX: usize = 64 << 20;
/// No frame is this large: a length beyond it is damage, not data.
const MAX_FRAME: u32 = 1 << 30;

/// Entries up to this size stay in memory after they are written; larger ones are read back.
pub(crate) const INLINE_MAX: usize = 4096;
/// Bytes from a record's start to its entry's bytes: the length (4), the kind (1), the index (8).
const ENTRY_BYTES: usize = 13;

const ENTRY: u8 = 1;
const TRUNCATE_FROM: u8 = 2;
const PURGE_THROUGH: u8 = 3;
const META: u8 = 4;

/// One change to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record<'a> {
    /// The entry at an index (replacing any there).
    Entry(u64, &'a [u8]),
    /// Every entry with index `>=` this one is gone.
    TruncateFrom(u64),
    /// Every entry with index `<=` this one is gone.
    PurgeThrough(u64),
    /// A metadata record (vote, committed, purged, node identity).
    Meta(&'a str, &'a [u8]),
}

impl Record<'_> {
    /// Appends the record (`[len][kind][fields]`) to `out`.
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Record::Entry(index, bytes) => {
                out.push(ENTRY);
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(bytes);
            }
            Record::TruncateFrom(index) => {
                out.push(TRUNCATE_FROM);
                out.extend_from_slice(&index.to_le_bytes());
            }
            Record::PurgeThrough(index) => {
                out.push(PURGE_THROUGH);
                out.extend_from_slice(&index.to_le_bytes());
            }
            Record::Meta(key, value) => {
                out.push(META);
                let key_len = u16::try_from(key.len()).expect("metadata keys are short names");
                out.extend_from_slice(&key_len.to_le_bytes());
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(value);
            }
        }
        let len = u32::try_from(out.len() - start - 4).expect("a log record under 4 GiB");
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    fn encoded_len(&self) -> usize {
        4 + match self {
            Record::Entry(_, bytes) => 9 + bytes.len(),
            Record::TruncateFrom(_) | Record::PurgeThrough(_) => 9,
            Record::Meta(key, value) => 3 + key.len() + value.len(),
        }
    }

    fn decode(payload: &[u8]) -> Option<Record<'_>> {
        let (&kind, body) = payload.split_first()?;
        let index = || {
            body.get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        };
        match kind {
            ENTRY => Some(Record::Entry(index()?, &body[8..])),
            TRUNCATE_FROM if body.len() == 8 => Some(Record::TruncateFrom(index()?)),
            PURGE_THROUGH if body.len() == 8 => Some(Record::PurgeThrough(index()?)),
            META => {
                let key_len = u16::from_le_bytes(body.get(..2)?.try_into().ok()?) as usize;
                let key = std::str::from_utf8(body.get(2..2 + key_len)?).ok()?;
                Some(Record::Meta(key, &body[2 + key_len..]))
            }
            _ => None,
        }
    }
}

/// The frames of one write to the file.
pub(crate) struct Batch {
    buf: Vec<u8>,
    salt: u64,
    write: u64,
    /// Where the frame being filled starts in `buf`.
    frame: Option<usize>,
    /// Whether the next frame opened is the write's first.
    first: bool,
}

impl Batch {
    fn new(salt: u64, write: u64) -> Batch {
        Batch {
            buf: Vec::new(),
            salt,
            write,
            frame: None,
            first: true,
        }
    }

    /// The rest of a write whose first frames went out already.
    fn continuing(salt: u64, write: u64) -> Batch {
        Batch {
            first: false,
            ..Batch::new(salt, write)
        }
    }

    /// Adds a record; returns where in the batch its entry's bytes start (for an entry).
    pub(crate) fn push(&mut self, record: Record<'_>) -> u64 {
        match self.frame {
            Some(start)
                if self.buf.len() > start + FRAME_HEADER
                    && self.buf.len() - start - FRAME_HEADER + record.encoded_len()
                        > FRAME_BODY_MAX =>
            {
                self.close();
                self.open();
            }
            None => self.open(),
            Some(_) => {}
        }
        let at = self.buf.len();
        record.encode(&mut self.buf);
        (at + ENTRY_BYTES) as u64
    }

    fn open(&mut self) {
        self.frame = Some(self.buf.len());
        self.buf.extend_from_slice(&[0; FRAME_HEADER]);
    }

    fn close(&mut self) {
        let Some(start) = self.frame.take() else {
            return;
        };
        let body = &self.buf[start + FRAME_HEADER..];
        let len = u32::try_from(body.len()).expect("a frame under 1 GiB");
        let len = if std::mem::take(&mut self.first) {
            len | FIRST
        } else {
            len
        };
        let crc = frame_crc(self.salt, len, self.write, body);
        self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        self.buf[start + 8..start + 16].copy_from_slice(&self.write.to_le_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        self.close();
        self.buf
    }
}

/// A frame's checksum: over the file's salt (so bytes inside an entry, which a client may
/// choose, never pass for a frame of this file), the length field, the write number and the
/// body.
fn frame_crc(salt: u64, len: u32, write: u64, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(&write.to_le_bytes());
    h.update(body);
    h.finalize()
}

/// A live log entry: its bytes, where they are in the log file once written, or both.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) bytes: Option<Arc<Vec<u8>>>,
    /// Offset and length of the entry's bytes in the log file.
    pub(crate) at: Option<(u64, usize)>,
}

impl Held {
    /// An entry not written yet.
    pub(crate) fn new(bytes: Arc<Vec<u8>>) -> Held {
        Held {
            bytes: Some(bytes),
            at: None,
        }
    }

    /// Records that the entry's bytes are at `offset` in the file; drops them from memory if
    /// they are large.
    pub(crate) fn written(&mut self, offset: u64) {
        let len = self.bytes.as_ref().map_or(0, |b| b.len());
        self.at = Some((offset, len));
        if len > INLINE_MAX {
            self.bytes = None;
        }
    }

    /// The entry's length in bytes.
    pub(crate) fn len(&self) -> usize {
        match (&self.bytes, self.at) {
            (Some(b), _) => b.len(),
            (None, Some((_, len))) => len,
            (None, None) => 0,
        }
    }

    /// Whether `other` is this very entry (the same bytes in memory and place in the file).
    pub(crate) fn same_as(&self, other: &Held) -> bool {
        let same_bytes = match (&self.bytes, &other.bytes) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same_bytes && self.at == other.at
    }

    /// The entry's bytes, read from `file` if they are not in memory.
    pub(crate) fn read(&self, file: Option<&File>) -> io::Result<Arc<Vec<u8>>> {
        if let Some(b) = &self.bytes {
            return Ok(b.clone());
        }
        let (Some((offset, len)), Some(file)) = (self.at, file) else {
            return Err(io::Error::other(
                "a log entry is neither in memory nor in the log file",
            ));
        };
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)?;
        Ok(Arc::new(buf))
    }
}

/// The log a file holds: live entries by index and metadata records by key.
#[derive(Debug, Default, Clone)]
pub(crate) struct LogImage {
    pub(crate) entries: BTreeMap<u64, Held>,
    pub(crate) meta: BTreeMap<String, Vec<u8>>,
}

impl LogImage {
    /// Applies a truncation, purge or metadata record (entries are inserted as [`Held`]).
    pub(crate) fn apply(&mut self, record: Record<'_>) {
        match record {
            Record::Entry(index, bytes) => {
                self.entries
                    .insert(index, Held::new(Arc::new(bytes.to_vec())));
            }
            Record::TruncateFrom(index) => {
                self.entries.split_off(&index);
            }
            Record::PurgeThrough(index) => {
                self.entries = match index.checked_add(1) {
                    Some(next) => self.entries.split_off(&next),
                    None => BTreeMap::new(),
                };
            }
            Record::Meta(key, value) => {
                self.meta.insert(key.to_string(), value.to_vec());
            }
        }
    }

    /// Records where copied entries are in a new file (`placed`: index and offset), for the
    /// entries `same(index, held)` says are still the ones copied; large ones leave memory.
    /// Returns the indexes placed.
    pub(crate) fn place(
        &mut self,
        placed: Vec<(u64, u64)>,
        same: impl Fn(u64, &Held) -> bool,
    ) -> std::collections::BTreeSet<u64> {
        let mut moved = std::collections::BTreeSet::new();
        for (index, offset) in placed {
            if let Some(held) = self.entries.get_mut(&index)
                && same(index, held)
            {
                let len = held.len();
                held.at = Some((offset, len));
                if len > INLINE_MAX {
                    held.bytes = None;
                }
                moved.insert(index);
            }
        }
        moved
    }

    /// The bytes a file holding only this image takes, about (for deciding to rewrite).
    pub(crate) fn encoded_len(&self) -> u64 {
        let entries: u64 = self
            .entries
            .values()
            .map(|h| (ENTRY_BYTES + h.len()) as u64)
            .sum();
        let meta: u64 = self
            .meta
            .iter()
            .map(|(k, v)| (7 + k.len() + v.len()) as u64)
            .sum();
        HEADER + FRAME_HEADER as u64 + entries + meta
    }
}

/// The open log file (none for a store in memory).
#[derive(Debug)]
pub(crate) struct Wal {
    file: Option<(PathBuf, File)>,
    /// A second handle for reading entries back (shared with readers, who use it without the
    /// writer's lock).
    reader: Option<Arc<File>>,
    len: u64,
    /// The number of the last write.
    write: u64,
    salt: u64,
}

fn context(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn open_handles(path: &Path) -> io::Result<(File, Arc<File>)> {
    let open = |append| {
        OpenOptions::new()
            .read(true)
            .append(append)
            .open(path)
            .map_err(|e| context(path, "cannot open the Raft log", e))
    };
    Ok((open(true)?, Arc::new(open(false)?)))
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A frame's header: the length field (with [`FIRST`]), the checksum, the write number.
fn frame_header(h: &[u8]) -> (u32, u32, u64) {
    (
        u32::from_le_bytes(h[..4].try_into().expect("4 bytes")),
        u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")),
        u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
    )
}

/// Where in `file`, between `from` and `end`, a whole first frame of a write numbered above
/// `after` starts, if one does: a write made after the damaged one. (The frames of the torn
/// write itself that follow its damaged frame are not first frames.) Reads in bounded windows.
fn later_write(file: &File, salt: u64, from: u64, end: u64, after: u64) -> io::Result<Option<u64>> {
    const WINDOW: u64 = 1 << 20;
    let mut window = Vec::new();
    let mut base = from;
    while base + (FRAME_HEADER as u64) <= end {
        let take = (end - base).min(WINDOW + FRAME_HEADER as u64);
        window.resize(take as usize, 0);
        file.read_exact_at(&mut window, base)?;
        let last = (take as usize).saturating_sub(FRAME_HEADER);
        for i in 0..=last.min(WINDOW as usize - 1) {
            let at = base + i as u64;
            let (len_field, crc, write) = frame_header(&window[i..i + FRAME_HEADER]);
            let len = u64::from(len_field & !FIRST);
            if len_field & FIRST == 0
                || write <= after
                || write - after > 1 << 32
                || len == 0
                || len > u64::from(MAX_FRAME)
                || at + FRAME_HEADER as u64 + len > end
            {
                continue;
            }
            let mut body = vec![0u8; len as usize];
            file.read_exact_at(&mut body, at + FRAME_HEADER as u64)?;
            if frame_crc(salt, len_field, write, &body) == crc {
                return Ok(Some(at));
            }
        }
        base += WINDOW;
    }
    Ok(None)
}

/// A salt for a new file: unpredictable (std's per-process random hash keys) and different
/// for every file.
fn new_salt() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

impl Wal {
    /// A log kept in memory only: writes go nowhere.
    pub(crate) fn memory() -> Wal {
        Wal {
            file: None,
            reader: None,
            len: 0,
            write: 0,
            salt: 0,
        }
    }

    /// Opens the log at `path` and replays it. A torn last write is cut off; damage before a
    /// later write is refused (see the module docs).
    pub(crate) fn open(path: &Path) -> io::Result<(Wal, LogImage)> {
        let (file, reader) = open_handles(path)?;
        let read_err = |e| context(path, "cannot read the Raft log", e);
        let not_a_log = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not a Coffer Raft log (its first bytes are not the log's magic); restore the data directory from a backup, or replace this node (docs/operations/replacing-a-node.md)",
                    path.display()
                ),
            )
        };
        let mut r = BufReader::with_capacity(1 << 20, &file);
        let mut header = [0u8; HEADER as usize];
        if read_full(&mut r, &mut header).map_err(read_err)? < header.len() || &header[..8] != MAGIC
        {
            return Err(not_a_log());
        }
        let salt = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        let end = file.metadata().map_err(read_err)?.len();
        let mut image = LogImage::default();
        let (mut at, mut last_write) = (HEADER, 0u64);
        let mut body = Vec::new();
        let torn = loop {
            let mut header = [0u8; FRAME_HEADER];
            match read_full(&mut r, &mut header).map_err(read_err)? {
                0 => break false,
                FRAME_HEADER => {}
                _ => break true,
            }
            let (len_field, crc, write) = frame_header(&header);
            let len = len_field & !FIRST;
            // Checked before reading the body: a damaged length must not size an allocation.
            if len == 0
                || len > MAX_FRAME
                || write < last_write
                || at + (FRAME_HEADER as u64) + u64::from(len) > end
            {
                break true;
            }
            body.resize(len as usize, 0);
            if read_full(&mut r, &mut body).map_err(read_err)? < body.len()
                || frame_crc(salt, len_field, write, &body) != crc
            {
                break true;
            }
            let mut off = 0;
            while off < body.len() {
                let (len, record) = body
                    .get(off..off + 4)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                    .and_then(|n| Some((n, Record::decode(body.get(off + 4..off + 4 + n)?)?)))
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "the Raft log {} holds a record at byte {} that this version cannot read, though its checksum holds (written by a newer version?); run the version that wrote it, or replace this node (docs/operations/replacing-a-node.md)",
                                path.display(),
                                at + (FRAME_HEADER + off) as u64
                            ),
                        )
                    })?;
                if let Record::Entry(index, entry) = record {
                    let mut held = Held::new(Arc::new(entry.to_vec()));
                    held.written(at + (FRAME_HEADER + off + ENTRY_BYTES) as u64);
                    image.entries.insert(index, held);
                } else {
                    image.apply(record);
                }
                off += 4 + len;
            }
            at += (FRAME_HEADER + body.len()) as u64;
            last_write = write;
        };
        drop(r);
        if torn {
            if let Some(later) =
                later_write(&file, salt, at + 1, end, last_write).map_err(read_err)?
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the Raft log {} is damaged at byte {at}, and a later write follows at byte {}: this is lost or corrupted data inside the log, not a write cut short by a crash, and starting could forget a vote or entries the cluster counted on; replace this node (docs/operations/replacing-a-node.md)",
                        path.display(),
                        later
                    ),
                ));
            }
            tracing::warn!(
                path = %path.display(),
                offset = at,
                dropped_bytes = end - at,
                "the Raft log ends in a write cut short by a crash; cutting it off: the entries in it were never acknowledged"
            );
            file.set_len(at)
                .and_then(|()| file.sync_all())
                .map_err(|e| context(path, "cannot cut the torn tail off the Raft log", e))?;
        }
        let wal = Wal {
            file: Some((path.to_path_buf(), file)),
            reader: Some(reader),
            len: at,
            write: last_write,
            salt,
        };
        Ok((wal, image))
    }

    /// Writes `image` as the whole log at `path`, durably: see [`Wal::write_copy`] and
    /// [`Copy::install`]. Records in `image` where each entry now is.
    pub(crate) fn create(path: &Path, image: &mut LogImage) -> io::Result<Wal> {
        let (wal, placed) = Wal::write_copy(path, image, None, 1)?.install(path)?;
        image.place(placed, |_, _| true);
        Ok(wal)
    }

    /// Writes `image` (entries not in memory read from `old`) to a new file beside `path`,
    /// with a salt of its own, synced, as one write numbered `write`.
    pub(crate) fn write_copy(
        path: &Path,
        image: &LogImage,
        old: Option<&File>,
        write: u64,
    ) -> io::Result<Copy> {
        let tmp = path.with_extension("wal-new");
        let salt = new_salt();
        let result = (|| {
            let mut f = File::create(&tmp).map_err(|e| context(&tmp, "cannot create", e))?;
            let mut written = HEADER;
            let mut header = MAGIC.to_vec();
            header.extend_from_slice(&salt.to_le_bytes());
            f.write_all(&header)
                .map_err(|e| context(&tmp, "cannot write", e))?;
            let mut batch = Batch::new(salt, write);
            for (k, v) in &image.meta {
                batch.push(Record::Meta(k, v));
            }
            let mut placed = Vec::with_capacity(image.entries.len());
            for (index, held) in &image.entries {
                let bytes = held.read(old)?;
                let at = batch.push(Record::Entry(*index, &bytes));
                placed.push((*index, written + at));
                // Large logs go out in pieces, not as one buffer the size of the log.
                if batch.buf.len() >= FRAME_BODY_MAX {
                    let rest = Batch::continuing(salt, write);
                    let out = std::mem::replace(&mut batch, rest).finish();
                    f.write_all(&out)
                        .map_err(|e| context(&tmp, "cannot write", e))?;
                    written += out.len() as u64;
                }
            }
            let out = batch.finish();
            f.write_all(&out)
                .and_then(|()| f.sync_all())
                .map_err(|e| context(&tmp, "cannot write", e))?;
            written += out.len() as u64;
            Ok(Copy {
                tmp: tmp.clone(),
                placed,
                len: written,
                write,
                salt,
            })
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// A batch for the next write.
    pub(crate) fn batch(&self) -> Batch {
        Batch::new(self.salt, self.write + 1)
    }

    /// Appends a batch (not durable until [`Wal::sync`]). Returns the offset in the file at
    /// which it starts.
    pub(crate) fn write(&mut self, batch: Batch) -> io::Result<u64> {
        let start = self.len;
        let write = batch.write;
        let bytes = batch.finish();
        if let Some((path, file)) = &mut self.file {
            file.write_all(&bytes)
                .map_err(|e| context(path, "cannot write the Raft log", e))?;
        }
        self.len += bytes.len() as u64;
        self.write = write;
        Ok(start)
    }

    /// Makes every write so far durable (`fdatasync`).
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        if let Some((path, file)) = &mut self.file {
            file.sync_data()
                .map_err(|e| context(path, "cannot sync the Raft log", e))?;
        }
        Ok(())
    }

    /// Bytes in the file.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The number of the last write.
    pub(crate) fn last_write(&self) -> u64 {
        self.write
    }

    /// The file (none in memory).
    pub(crate) fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|(p, _)| p.as_path())
    }

    /// The handle entries are read back with (none in memory).
    pub(crate) fn reader(&self) -> Option<Arc<File>> {
        self.reader.clone()
    }
}

/// A new log file written beside the current one, not yet in its place.
pub(crate) struct Copy {
    tmp: PathBuf,
    /// Each entry's index and where its bytes are in the new file.
    placed: Vec<(u64, u64)>,
    len: u64,
    write: u64,
    salt: u64,
}

impl Copy {
    /// Renames the copy over `path` and syncs the directory. Returns the log open for
    /// appending and where each copied entry is in it (for [`LogImage::place`]).
    pub(crate) fn install(self, path: &Path) -> io::Result<(Wal, Vec<(u64, u64)>)> {
        std::fs::rename(&self.tmp, path)
            .map_err(|e| context(path, "cannot rename the new log to", e))?;
        sync_dir(path)?;
        let (file, reader) = open_handles(path)?;
        let wal = Wal {
            file: Some((path.to_path_buf(), file)),
            reader: Some(reader),
            len: self.len,
            write: self.write,
            salt: self.salt,
        };
        Ok((wal, self.placed))
    }

    /// Removes the file (the copy is not used).
    pub(crate) fn discard(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Syncs the directory holding `path`, so a file created or renamed there stays.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| context(dir, "cannot sync the directory", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(wal: &mut Wal, records: &[Record<'_>]) {
        let mut batch = wal.batch();
        for r in records {
            batch.push(*r);
        }
        wal.write(batch).unwrap();
        wal.sync().unwrap();
    }

    fn entries(image: &LogImage, wal: &Wal) -> Vec<(u64, Vec<u8>)> {
        let reader = wal.reader();
        image
            .entries
            .iter()
            .map(|(i, h)| (*i, h.read(reader.as_deref()).unwrap().as_ref().clone()))
            .collect()
    }

    fn create(path: &Path) -> Wal {
        Wal::create(path, &mut LogImage::default()).unwrap()
    }

    /// An empty log in a new directory.
    fn fresh() -> (tempfile::TempDir, PathBuf, Wal) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.wal");
        let wal = create(&path);
        (dir, path, wal)
    }

    fn append_raw(path: &Path, bytes: &[u8]) {
        OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    #[test]
    fn replay_follows_entries_truncations_purges_and_metadata() {
        let (_dir, path, mut wal) = fresh();
        write(
            &mut wal,
            &[
                Record::Entry(1, b"one"),
                Record::Entry(2, b"two"),
                Record::Entry(3, b"three"),
                Record::Meta("vote", b"v1"),
            ],
        );
        write(
            &mut wal,
            &[
                Record::TruncateFrom(3),
                Record::Entry(3, b"drei"),
                Record::Entry(4, b"vier"),
                Record::PurgeThrough(1),
                Record::Meta("vote", b"v2"),
                Record::Meta("empty", b""),
            ],
        );
        drop(wal);
        let (wal, image) = Wal::open(&path).unwrap();
        assert_eq!(
            entries(&image, &wal),
            vec![
                (2, b"two".to_vec()),
                (3, b"drei".to_vec()),
                (4, b"vier".to_vec())
            ]
        );
        assert_eq!(image.meta.get("vote"), Some(&b"v2".to_vec()));
        assert_eq!(image.meta.get("empty"), Some(&Vec::new()));
        assert_eq!(wal.len(), std::fs::metadata(&path).unwrap().len());
    }

    #[test]
    fn a_torn_last_write_is_cut_off_and_the_log_goes_on_after_it() {
        let (_dir, path, mut wal) = fresh();
        write(
            &mut wal,
            &[Record::Entry(1, b"one"), Record::Entry(2, b"two")],
        );
        let good = wal.len();
        // The next write, in two frames (as a write larger than a frame is), with the first
        // frame damaged and the second whole: a crash persisted only part of it.
        let big = vec![3u8; FRAME_BODY_MAX - 10];
        let mut batch = wal.batch();
        batch.push(Record::Entry(3, &big));
        batch.push(Record::Entry(4, b"four"));
        let mut torn = batch.finish();
        let first = (u32::from_le_bytes(torn[..4].try_into().unwrap()) & !FIRST) as usize;
        assert!(
            FRAME_HEADER + first < torn.len(),
            "the write takes two frames"
        );
        torn[FRAME_HEADER + 20] ^= 0xff;
        drop(wal);
        append_raw(&path, &torn);
        let (mut wal, image) = Wal::open(&path).unwrap();
        assert_eq!(
            entries(&image, &wal),
            vec![(1, b"one".to_vec()), (2, b"two".to_vec())]
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good, "cut off");
        write(&mut wal, &[Record::Entry(3, b"drei")]);
        // Half a frame at the end is a torn write too.
        let mut batch = wal.batch();
        drop(wal);
        batch.push(Record::Entry(4, b"vier"));
        let half = batch.finish();
        append_raw(&path, &half[..half.len() - 3]);
        let (wal, image) = Wal::open(&path).unwrap();
        assert_eq!(entries(&image, &wal)[2], (3, b"drei".to_vec()));
        assert_eq!(image.entries.len(), 3);
    }

    #[test]
    fn damage_before_a_later_write_is_refused() {
        let (_dir, path, mut wal) = fresh();
        write(&mut wal, &[Record::Entry(1, b"one")]);
        let damaged_at = wal.len();
        write(&mut wal, &[Record::Meta("vote", b"term 6")]);
        write(&mut wal, &[Record::Meta("vote", b"term 7")]);
        drop(wal);
        // The second write reads back as zeros (a writeback that failed), the third is whole.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[damaged_at as usize..damaged_at as usize + 8].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        let e = Wal::open(&path).unwrap_err();
        assert!(e.to_string().contains("a later write follows"), "{e}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "the file is left as it was"
        );
    }

    #[test]
    fn damage_inside_a_long_write_before_a_later_write_is_refused() {
        let (_dir, path, mut wal) = fresh();
        let big = vec![3u8; FRAME_BODY_MAX - 10];
        write(
            &mut wal,
            &[Record::Entry(1, &big), Record::Entry(2, b"two")],
        );
        let end_of_long = wal.len();
        write(&mut wal, &[Record::Meta("vote", b"term 7")]);
        drop(wal);
        // The long write's second frame (acknowledged long ago) is damaged.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[end_of_long as usize - 2] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let e = Wal::open(&path).unwrap_err();
        assert!(e.to_string().contains("a later write follows"), "{e}");
    }

    #[test]
    fn a_record_this_version_cannot_read_is_refused() {
        let (_dir, path, mut wal) = fresh();
        // A whole frame with a good checksum holding a record of an unknown kind.
        let mut batch = wal.batch();
        batch.open();
        batch.buf.extend_from_slice(&2u32.to_le_bytes());
        batch.buf.extend_from_slice(&[9, 9]);
        wal.write(batch).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let e = Wal::open(&path).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.wal");
        std::fs::write(&path, b"something else entirely").unwrap();
        let e = Wal::open(&path).unwrap_err();
        assert!(e.to_string().contains("is not a Coffer Raft log"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"something else entirely");
    }

    #[test]
    fn large_entries_are_read_back_from_the_file_and_survive_a_rewrite() {
        let (_dir, path, mut wal) = fresh();
        let big = |i: u64| vec![i as u8; 10_000];
        for i in 1..=50 {
            write(&mut wal, &[Record::Entry(i, &big(i))]);
        }
        write(
            &mut wal,
            &[Record::Meta("purged", b"45"), Record::PurgeThrough(45)],
        );
        drop(wal);
        let (wal, mut image) = Wal::open(&path).unwrap();
        assert!(
            image.entries.values().all(|h| h.bytes.is_none()),
            "large entries are not held in memory"
        );
        let expected: Vec<(u64, Vec<u8>)> = (46..=50).map(|i| (i, big(i))).collect();
        assert_eq!(entries(&image, &wal), expected);
        let before = wal.len();
        let old = wal.reader();
        let copy = Wal::write_copy(&path, &image, old.as_deref(), wal.last_write() + 1).unwrap();
        let (mut wal, placed) = copy.install(&path).unwrap();
        image.place(placed, |_, _| true);
        assert!(wal.len() * 5 < before, "{} of {before} bytes", wal.len());
        assert_eq!(entries(&image, &wal), expected, "read at their new places");
        write(&mut wal, &[Record::Entry(51, b"after")]);
        drop(wal);
        let (wal, replayed) = Wal::open(&path).unwrap();
        let mut all = expected.clone();
        all.push((51, b"after".to_vec()));
        assert_eq!(entries(&replayed, &wal), all);
        assert_eq!(replayed.meta.get("purged"), Some(&b"45".to_vec()));
        assert_eq!(wal.len(), std::fs::metadata(&path).unwrap().len());
        assert!(!path.with_extension("wal-new").exists());
    }
}
