//! The window of recent request ids and their results, for exactly-once writes.
//!
//! The whole window lives in memory: an apply looks a request id up and adds it without
//! touching the file. It reaches the file as *chunks*: each state sync writes the ids its layer
//! added as one record, keyed by the chunk's highest sequence number, and removes the chunks
//! whose every id has left the window. A write used to cost four B-tree updates of the state
//! file (the id, its place in the order, and both again when it left the window); now a sync
//! writes one record and removes about one.
//!
//! Which ids are in the window is part of the replicated state (it decides whether a command
//! applies), so it follows one rule everywhere: ids in the order applied (their sequence
//! numbers), the oldest leaving first while there are more than the capacity.

use imbl::{OrdMap, Vector};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::overlay::Bytes;

/// The ids of the window, persistent (structurally shared): a reader takes a copy in O(1).
#[derive(Clone, Default)]
pub(crate) struct DedupWindow {
    /// Request id to its encoded result.
    by_id: OrdMap<Bytes, Bytes>,
    /// Every id with its sequence number and result, oldest first.
    order: Vector<Added>,
}

/// One added id, as a layer keeps it until its sync writes it: sequence number, request id,
/// encoded result.
pub(crate) type Added = (u64, Bytes, Bytes);

/// A chunk as the file stores it.
#[derive(Serialize, Deserialize)]
struct Chunk {
    entries: Vec<(u64, ByteBuf, ByteBuf)>,
}

impl DedupWindow {
    /// The encoded result remembered for `id`.
    pub fn get(&self, id: &[u8]) -> Option<&Bytes> {
        self.by_id.get(id)
    }

    /// The oldest sequence number in the window.
    pub fn front(&self) -> Option<u64> {
        self.order.front().map(|(seq, _, _)| *seq)
    }

    /// Adds an id with a sequence number higher than any in the window, then lets the oldest
    /// ids leave while there are more than `capacity`.
    pub fn add(&mut self, seq: u64, id: Bytes, result: Bytes, capacity: u64) {
        debug_assert!(self.order.back().is_none_or(|(last, _, _)| *last < seq));
        // An id that is already in the window is never applied again, so never added again.
        self.by_id.insert(id.clone(), result.clone());
        self.order.push_back((seq, id, result));
        while self.order.len() as u64 > capacity {
            let Some((_, old, _)) = self.order.pop_front() else {
                break;
            };
            self.by_id.remove(&old);
        }
    }

    /// Every id with its result, by id (as snapshot images list them).
    pub fn by_id(&self) -> impl Iterator<Item = (&Bytes, &Bytes)> {
        self.by_id.iter()
    }

    /// Every id with its sequence number and result, oldest first.
    pub fn by_seq(&self) -> impl Iterator<Item = &Added> {
        self.order.iter()
    }

    /// A window of `entries` (in any order) as [`DedupWindow::add`] would have left it.
    pub fn from_entries(mut entries: Vec<Added>, capacity: u64) -> DedupWindow {
        entries.sort_by_key(|(seq, _, _)| *seq);
        let mut window = DedupWindow::default();
        for (seq, id, result) in entries {
            // An id listed twice (never written so) keeps its newest result.
            if window.by_id.contains_key(&id) {
                window.order.retain(|(_, old, _)| *old != id);
            }
            window.add(seq, id, result, capacity);
        }
        window
    }
}

/// Encodes ids (oldest first) as one chunk.
pub(crate) fn encode_chunk<'a>(
    added: impl IntoIterator<Item = &'a Added>,
) -> Result<Vec<u8>, postcard::Error> {
    let chunk = Chunk {
        entries: added
            .into_iter()
            .map(|(seq, id, result)| {
                (
                    *seq,
                    ByteBuf::from(id.to_vec()),
                    ByteBuf::from(result.to_vec()),
                )
            })
            .collect(),
    };
    postcard::to_stdvec(&chunk)
}

/// The entries of a chunk the file holds.
pub(crate) fn decode_chunk(bytes: &[u8]) -> Result<Vec<Added>, postcard::Error> {
    let chunk: Chunk = postcard::from_bytes(bytes)?;
    Ok(chunk
        .entries
        .into_iter()
        .map(|(seq, id, result)| {
            (
                seq,
                Bytes::from(id.into_vec()),
                Bytes::from(result.into_vec()),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x: u8) -> Bytes {
        Bytes::from(vec![x; 16])
    }

    #[test]
    fn the_oldest_ids_leave_first_and_a_rebuilt_window_is_the_same() {
        let mut w = DedupWindow::default();
        let mut all = Vec::new();
        for i in 1..=5u8 {
            w.add(u64::from(i), b(i), b(100 + i), 3);
            all.push((u64::from(i), b(i), b(100 + i)));
        }
        assert_eq!(w.by_seq().count(), 3);
        assert_eq!(w.front(), Some(3));
        assert!(w.get(&b(2)).is_none());
        assert_eq!(w.get(&b(5)), Some(&b(105)));
        all.reverse();
        let rebuilt = DedupWindow::from_entries(all, 3);
        let seqs = |w: &DedupWindow| w.by_seq().cloned().collect::<Vec<_>>();
        assert_eq!(seqs(&rebuilt), seqs(&w));
        assert_eq!(
            rebuilt.by_id().collect::<Vec<_>>(),
            w.by_id().collect::<Vec<_>>()
        );
    }

    #[test]
    fn chunks_round_trip() {
        let added: Vector<Added> = (1..4u8)
            .map(|i| (u64::from(i) * 7, b(i), b(i + 50)))
            .collect();
        let bytes = encode_chunk(&added).unwrap();
        assert_eq!(
            decode_chunk(&bytes).unwrap(),
            added.into_iter().collect::<Vec<_>>()
        );
        assert!(decode_chunk(&bytes[..bytes.len() - 1]).is_err());
    }
}
