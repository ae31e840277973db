//! Operation histories: what each client invoked, when, and what it saw.

use serde::{Deserialize, Serialize};

/// A register value. Workloads write unique values, so a read names the write it saw.
pub type Value = u64;

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpKind {
    /// Write `value` to the key.
    Write(Value),
    /// Linearizable read; the value seen (`None`: the key was absent). Only meaningful when the
    /// outcome is [`Outcome::Ok`].
    Read(Option<Value>),
    /// Compare-and-set: if the key holds `expected` (`None`: absent), write `new`. `succeeded`
    /// is what the server answered (only meaningful when the outcome is [`Outcome::Ok`]).
    Cas {
        /// Value required before.
        expected: Option<Value>,
        /// Value written when it held.
        new: Value,
        /// Whether the server said the comparison held.
        succeeded: bool,
    },
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Completed, with the result recorded in the kind.
    Ok,
    /// Certainly had no effect (e.g. UNAVAILABLE before it was proposed).
    Failed,
    /// May or may not have taken effect (timeout, connection lost, DEADLINE_EXCEEDED).
    Unknown,
}

/// One operation of one client on one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// The client (a sequential process).
    pub client: u32,
    /// The key.
    pub key: String,
    /// What it did and saw.
    pub kind: OpKind,
    /// When it was invoked (any monotonic clock unit, e.g. nanoseconds since the run started).
    pub invoked: u64,
    /// When its answer arrived (ignored for [`Outcome::Unknown`], which may take effect at any
    /// time after it was invoked).
    pub completed: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// A run's operations, in any order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// The operations.
    pub ops: Vec<Op>,
}

impl History {
    /// Adds an operation.
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// The distinct keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.ops.iter().map(|o| o.key.clone()).collect();
        keys.sort();
        keys.dedup();
        keys
    }
}
