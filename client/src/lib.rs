//! The Coffer client SDK: a [`Client`] that logs in (identity key, Kubernetes token, or a
//! session made elsewhere), renews its session in the background before it ends, and retries
//! what is safe to retry on the next node; typed clients for the kv engine ([`kv::Kv`]),
//! mounts, wrapped data ([`wrap::Wrap`]), policies and identities; and the key pairs
//! ([`keys`]) every Coffer identity uses.
//!
//! ```no_run
//! # async fn f() -> coffer_client::Result<()> {
//! use coffer_client::{Client, Config, Login, keys::KeyPair};
//! let key = KeyPair::load("web.key".as_ref())?;
//! let ca = std::fs::read("ca.pem").expect("the CA file");
//! let client = Client::connect(Config::new(["node1:7700"], ca, Login::Key(key))).await?;
//! client.kv("secret").put("app/db", [("user", "app")]).await?;
//! let secret = client.kv("secret").get("app/db").await?;
//! assert_eq!(secret.data.get("user"), Some("app"));
//! # Ok(()) }
//! ```
//!
//! **Architecture invariant:** depends on `coffer-api` only among Coffer's crates; it knows the
//! wire API and the login messages, nothing of the server.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
mod client;
mod error;
pub mod keys;
pub mod kv;
pub mod login;
pub mod paging;
pub mod retry;
pub mod session;
pub mod wrap;

pub use client::{Client, Config, Login};
pub use error::{Error, Result};
pub use session::SessionCredentials;

/// Where Kubernetes projects a pod's service-account token.
pub const KUBERNETES_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
