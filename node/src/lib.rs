//! The `coffer` binary's library: the node (API, Raft wiring, metrics), the transient `dev`
//! cluster, and the command line.
//!
//! **Architecture invariant:** the only crate that knows the public API, configuration files
//! and (later) authentication, policies and secrets. It talks to Raft through
//! [`coffer_raft::RaftNode`] and never opens the storage tables itself.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod backup;
pub mod barrier;
pub mod bench;
pub mod cli;
pub mod cli_secrets;
pub mod client;
pub mod config;
pub mod delegation;
pub mod dev;
pub mod identity;
pub use coffer_client::keys;
pub mod kubernetes;
pub mod kv_engine;
pub mod metrics;
pub mod node_identity;
pub mod operator;
pub mod policy;
pub mod seal;
pub mod server;
pub mod session;
pub mod threshold;
pub mod tls;
pub mod wrap;
