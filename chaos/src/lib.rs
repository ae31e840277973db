//! Coffer's chaos harness. This first part is the history model and the checkers that judge a
//! run; the runner that drives clients against containerized nodes while injecting faults
//! builds on it.
//!
//! **Architecture invariant:** the checkers know nothing of Coffer's internals, gRPC or Raft:
//! they judge what clients observed (operations with invoke and complete times and outcomes),
//! as Jepsen's Knossos and Porcupine do.
#![forbid(unsafe_code)]

pub mod history;
pub mod linearizability;

pub use history::{History, Op, OpKind, Outcome, Value};
pub use linearizability::{KeyVerdict, Verdict, check};
