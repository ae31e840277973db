//! Coffer's chaos harness: Coffer nodes as containers on a private Docker network, a seeded
//! schedule of faults (the ones chaos-mesh injects in Kubernetes, done locally), a workload of
//! recorded client operations, and checkers that judge the recorded history.
//!
//! **Architecture invariant:** the checkers know nothing of Coffer's internals, gRPC or Raft:
//! they judge what clients observed (operations with invoke and complete times and outcomes),
//! as Jepsen's Knossos and Porcupine do. The runner reaches the nodes only as clients and
//! operators do (the public API, `docker`, `iptables`), plus test-build failpoints.
#![forbid(unsafe_code)]

pub mod checkers;
pub mod docker;
pub mod failover;
pub mod history;
pub mod linearizability;
pub mod nemesis;
pub mod runner;
pub mod workload;

pub use history::{History, Op, OpKind, Outcome, Value};
pub use linearizability::{KeyVerdict, Verdict, check};
