//! The state machine's changes since its last sync, held in memory over the redb file (as
//! etcd's backend keeps a read buffer over its bolt batch transaction).
//!
//! Applying a batch changes only this overlay: no redb transaction, so an apply never waits
//! for the sync's fsync. The state sync thread writes the overlay to redb in one durable
//! commit every second. Readers see the overlay first, then the file.
//!
//! The maps are persistent (structurally shared): a reader takes a copy in O(1) and keeps its
//! point in time while applies go on. During a sync there are two layers: the changes being
//! written (`frozen`) and those made since (`active`, which wins). Each change is a whole new
//! value or a deletion, so seeing a change in a layer and again in the file is harmless: the
//! frozen layer is dropped after the commit that holds it.

use std::iter::Peekable;
use std::ops::Bound;
use std::sync::Arc;

use imbl::{OrdMap, Vector};

use crate::Result;
use crate::dedup::{Added, DedupWindow};
use crate::store::Record;

/// Owned bytes, cheap to clone.
pub(crate) type Bytes = Arc<[u8]>;

/// One layer of changes; `None` is a deletion.
#[derive(Clone, Default)]
pub(crate) struct Overlay {
    /// Keys of the store.
    pub kv: OrdMap<Bytes, Option<Arc<Record>>>,
    /// Request ids added to the dedup window, in order (the sync writes them as one chunk).
    pub dedup_added: Vector<Added>,
    /// The oldest sequence number left in the dedup window after the layer's last apply (the
    /// sync removes the chunks older than it).
    pub dedup_front: Option<u64>,
    /// State machine metadata records (never deleted by an apply).
    pub meta: OrdMap<Arc<str>, Bytes>,
}

impl Overlay {
    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
            && self.dedup_added.is_empty()
            && self.dedup_front.is_none()
            && self.meta.is_empty()
    }
}

/// The changes not in the file yet, as one reader sees them.
#[derive(Clone, Default)]
pub(crate) struct Layers {
    /// Changes made since the sync under way began (or since the last sync).
    pub active: Overlay,
    /// Changes a sync is writing to the file; `None` between syncs.
    pub frozen: Option<Arc<Overlay>>,
    /// The dedup window as of the newest apply (not a change: the whole window).
    pub window: DedupWindow,
    /// While a snapshot is being installed: the install count the file will hold once it is
    /// committed and the window it brings (a reader that finds that count in its read
    /// transaction sees no layers and that window).
    pub installing: Option<(u64, DedupWindow)>,
}

impl Layers {
    /// The newest change in the layers, found by `pick`: `None` when no layer changed it.
    fn newest<'a, T>(&'a self, pick: impl Fn(&'a Overlay) -> Option<&'a T>) -> Option<&'a T> {
        pick(&self.active).or_else(|| self.frozen.as_deref().and_then(pick))
    }

    /// `Some(None)` when the key was deleted, `None` when the layers did not change it.
    pub fn kv(&self, key: &[u8]) -> Option<Option<Arc<Record>>> {
        self.newest(|o| o.kv.get(key)).cloned()
    }

    pub fn meta(&self, name: &str) -> Option<Bytes> {
        self.newest(|o| o.meta.get(name)).cloned()
    }

    /// Changed keys in a range, in key order, the newest change of each.
    pub fn kv_range<'a>(
        &'a self,
        lower: Bound<&'a [u8]>,
        upper: Bound<&'a [u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Option<Arc<Record>>)>> + 'a {
        self.merged(move |o: &'a Overlay| -> KvChanges<'a> {
            if is_empty_range(lower, upper) {
                return Box::new(std::iter::empty());
            }
            Box::new(
                o.kv.range::<_, [u8]>((lower, upper))
                    .map(|(k, v)| Ok((k.to_vec(), v.clone()))),
            )
        })
    }

    /// Every change of one map (`layer` lists it for one layer, in key order), the newest
    /// change of each key.
    pub fn merged<'a, K: Ord + 'a, V: 'a, I>(
        &'a self,
        layer: impl Fn(&'a Overlay) -> I,
    ) -> Merge<I, std::iter::Flatten<std::option::IntoIter<I>>>
    where
        I: Iterator<Item = Result<(K, V)>> + 'a,
    {
        let older = self.frozen.as_deref().map(&layer).into_iter().flatten();
        Merge::new(layer(&self.active), older)
    }
}

type KvChanges<'a> = Box<dyn Iterator<Item = Result<(Vec<u8>, Option<Arc<Record>>)>> + 'a>;

/// Whether `(lower, upper)` holds no key (a range a B-tree's `range` would refuse).
pub(crate) fn is_empty_range(lower: Bound<&[u8]>, upper: Bound<&[u8]>) -> bool {
    match (lower, upper) {
        (Bound::Included(l), Bound::Included(u)) => l > u,
        (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(u))
        | (Bound::Excluded(l), Bound::Included(u)) => l >= u,
        _ => false,
    }
}

/// Two key-ordered streams merged into one; on equal keys the first stream's item wins and
/// the second's is dropped. Errors pass through as they come.
pub(crate) struct Merge<A: Iterator, B: Iterator> {
    first: Peekable<A>,
    second: Peekable<B>,
}

impl<A: Iterator, B: Iterator> Merge<A, B> {
    pub fn new(first: A, second: B) -> Merge<A, B> {
        Merge {
            first: first.peekable(),
            second: second.peekable(),
        }
    }
}

impl<K: Ord, V, A, B> Iterator for Merge<A, B>
where
    A: Iterator<Item = Result<(K, V)>>,
    B: Iterator<Item = Result<(K, V)>>,
{
    type Item = Result<(K, V)>;

    fn next(&mut self) -> Option<Self::Item> {
        match (self.first.peek(), self.second.peek()) {
            (None, None) => None,
            (Some(Err(_)), _) | (Some(_), None) => self.first.next(),
            (_, Some(Err(_))) | (None, Some(_)) => self.second.next(),
            (Some(Ok((a, _))), Some(Ok((b, _)))) => match a.cmp(b) {
                std::cmp::Ordering::Less => self.first.next(),
                std::cmp::Ordering::Greater => self.second.next(),
                std::cmp::Ordering::Equal => {
                    self.second.next();
                    self.first.next()
                }
            },
        }
    }
}

/// Changes (`Some` value or `None` for a deletion) merged over the file's entries: the live
/// entries, in key order.
pub(crate) fn over_base<K: Ord, V>(
    changes: impl Iterator<Item = Result<(K, Option<V>)>>,
    base: impl Iterator<Item = Result<(K, V)>>,
) -> impl Iterator<Item = Result<(K, V)>> {
    Merge::new(changes, base.map(|r| r.map(|(k, v)| (k, Some(v))))).filter_map(|r| match r {
        Ok((k, Some(v))) => Some(Ok((k, v))),
        Ok((_, None)) => None,
        Err(e) => Some(Err(e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok<K, V>(items: Vec<(K, V)>) -> impl Iterator<Item = Result<(K, V)>> {
        items.into_iter().map(Ok)
    }

    #[test]
    fn the_first_stream_wins_on_equal_keys_and_deletions_hide_the_base() {
        let newer = ok(vec![(1, Some("a1")), (3, None), (5, Some("e1"))]);
        let older = ok(vec![(1, Some("a0")), (2, None), (3, Some("c0"))]);
        let base = ok(vec![(2, "b"), (3, "c"), (4, "d"), (6, "f")]);
        let merged: Vec<(i32, &str)> = over_base(Merge::new(newer, older), base)
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(merged, vec![(1, "a1"), (4, "d"), (5, "e1"), (6, "f")]);
    }

    #[test]
    fn empty_ranges_are_recognized() {
        let (a, b): (&[u8], &[u8]) = (b"a", b"b");
        assert!(is_empty_range(Bound::Excluded(b), Bound::Excluded(a)));
        assert!(is_empty_range(Bound::Excluded(a), Bound::Excluded(a)));
        assert!(is_empty_range(Bound::Included(a), Bound::Excluded(a)));
        assert!(!is_empty_range(Bound::Included(a), Bound::Included(a)));
        assert!(!is_empty_range(Bound::Excluded(a), Bound::Excluded(b)));
        assert!(!is_empty_range(Bound::Unbounded, Bound::Excluded(a)));
    }
}
