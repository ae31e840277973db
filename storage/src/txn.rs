//! The transaction model of the replicated state machine.
//!
//! Keys are ordered byte strings; values are opaque bytes (the node stores barrier ciphertext in
//! them). Every key carries a `version` (number of puts since it was created, reset by a delete),
//! a `create_revision` and a `mod_revision`. The store has one global `revision` that grows by one
//! for every transaction that changes something, as in etcd.

use serde::{Deserialize, Serialize};

/// One stored key with its metadata, as returned by reads and as the previous value of a write.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The opaque value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Number of puts since the key was (re)created; 1 after the first put.
    pub version: u64,
    /// Store revision of the put that created the key.
    pub create_revision: u64,
    /// Store revision of the last put to the key.
    pub mod_revision: u64,
}

impl std::fmt::Debug for KvEntry {
    // Values may be ciphertext of secrets: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvEntry")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("value_len", &self.value.len())
            .field("version", &self.version)
            .field("create_revision", &self.create_revision)
            .field("mod_revision", &self.mod_revision)
            .finish()
    }
}

/// A condition on one key, evaluated atomically with the rest of the transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compare {
    /// The key exists.
    Exists(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The key does not exist.
    Absent(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The key's `mod_revision` equals the given one (0 means absent).
    ModRevision(#[serde(with = "serde_bytes")] Vec<u8>, u64),
    /// The key's `version` equals the given one (0 means absent).
    Version(#[serde(with = "serde_bytes")] Vec<u8>, u64),
}

impl Compare {
    /// The key this condition looks at.
    pub fn key(&self) -> &[u8] {
        match self {
            Compare::Exists(k) | Compare::Absent(k) => k,
            Compare::ModRevision(k, _) | Compare::Version(k, _) => k,
        }
    }
}

/// One write operation.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create or replace a key.
    Put {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The opaque value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Delete one key (no effect when absent).
    Delete {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Delete every key that starts with `prefix`.
    DeletePrefix {
        /// The prefix; an empty prefix is refused by the node, not here.
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
    },
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Put { key, value } => write!(
                f,
                "Put({:?}, {} bytes)",
                String::from_utf8_lossy(key),
                value.len()
            ),
            Op::Delete { key } => write!(f, "Delete({:?})", String::from_utf8_lossy(key)),
            Op::DeletePrefix { prefix } => {
                write!(f, "DeletePrefix({:?})", String::from_utf8_lossy(prefix))
            }
        }
    }
}

/// `if all(compare) then success else failure`, applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    /// Conditions; all must hold for `success` to run. Empty means always.
    pub compare: Vec<Compare>,
    /// Operations run when every condition holds.
    pub success: Vec<Op>,
    /// Operations run otherwise.
    pub failure: Vec<Op>,
}

impl Txn {
    /// A transaction with no conditions that runs `ops`.
    pub fn ops(ops: Vec<Op>) -> Txn {
        Txn {
            compare: Vec::new(),
            success: ops,
            failure: Vec::new(),
        }
    }

    /// Whether applying this may change a reserved key (one starting with a NUL byte, which
    /// only Coffer itself writes). An empty delete prefix covers every key.
    pub fn may_touch_reserved(&self) -> bool {
        self.success.iter().chain(&self.failure).any(|op| match op {
            Op::Put { key, .. } | Op::Delete { key } => key.first() == Some(&0),
            Op::DeletePrefix { prefix } => prefix.first().is_none_or(|b| *b == 0),
        })
    }
}

/// What one operation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// A put, with the value it replaced.
    Put {
        /// The entry before the put, if any.
        prev: Option<KvEntry>,
    },
    /// A delete, with the value it removed.
    Delete {
        /// The entry before the delete, if any.
        prev: Option<KvEntry>,
    },
    /// A prefix delete, with how many keys it removed.
    DeletePrefix {
        /// Number of keys removed.
        deleted: u64,
    },
}

/// The outcome of an applied transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResult {
    /// Whether every comparison held (so `success` ran).
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: u64,
    /// One result per operation of the branch that ran.
    pub results: Vec<OpResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes these types had before their byte strings were marked `serde_bytes`: Raft
    /// logs, dedup records and snapshots written by earlier versions hold this encoding.
    #[derive(Serialize)]
    enum OldOp {
        Put { key: Vec<u8>, value: Vec<u8> },
        Delete { key: Vec<u8> },
        DeletePrefix { prefix: Vec<u8> },
    }

    #[derive(Serialize)]
    enum OldCompare {
        Exists(Vec<u8>),
        Absent(Vec<u8>),
        ModRevision(Vec<u8>, u64),
        Version(Vec<u8>, u64),
    }

    #[derive(Serialize)]
    struct OldEntry {
        key: Vec<u8>,
        value: Vec<u8>,
        version: u64,
        create_revision: u64,
        mod_revision: u64,
    }

    #[test]
    fn byte_strings_encode_as_before_and_decode_from_the_old_encoding() {
        let long: Vec<u8> = (0..=255).cycle().take(300).collect();
        let ops = [
            (
                Op::Put {
                    key: b"k".to_vec(),
                    value: long.clone(),
                },
                OldOp::Put {
                    key: b"k".to_vec(),
                    value: long.clone(),
                },
            ),
            (
                Op::Delete { key: long.clone() },
                OldOp::Delete { key: long.clone() },
            ),
            (
                Op::DeletePrefix { prefix: vec![] },
                OldOp::DeletePrefix { prefix: vec![] },
            ),
        ];
        for (new, old) in &ops {
            let old_bytes = postcard::to_stdvec(old).unwrap();
            assert_eq!(postcard::to_stdvec(new).unwrap(), old_bytes);
            assert_eq!(&postcard::from_bytes::<Op>(&old_bytes).unwrap(), new);
        }
        let compares = [
            (
                Compare::Exists(long.clone()),
                OldCompare::Exists(long.clone()),
            ),
            (
                Compare::Absent(b"a".to_vec()),
                OldCompare::Absent(b"a".to_vec()),
            ),
            (
                Compare::ModRevision(b"m".to_vec(), 300),
                OldCompare::ModRevision(b"m".to_vec(), 300),
            ),
            (
                Compare::Version(b"v".to_vec(), 7),
                OldCompare::Version(b"v".to_vec(), 7),
            ),
        ];
        for (new, old) in &compares {
            let old_bytes = postcard::to_stdvec(old).unwrap();
            assert_eq!(postcard::to_stdvec(new).unwrap(), old_bytes);
            assert_eq!(&postcard::from_bytes::<Compare>(&old_bytes).unwrap(), new);
        }
        let entry = KvEntry {
            key: b"key".to_vec(),
            value: long.clone(),
            version: 2,
            create_revision: 3,
            mod_revision: 400,
        };
        let old = OldEntry {
            key: b"key".to_vec(),
            value: long,
            version: 2,
            create_revision: 3,
            mod_revision: 400,
        };
        let old_bytes = postcard::to_stdvec(&old).unwrap();
        assert_eq!(postcard::to_stdvec(&entry).unwrap(), old_bytes);
        assert_eq!(postcard::from_bytes::<KvEntry>(&old_bytes).unwrap(), entry);
    }
}
