//! The Private Key Challenge: how a client proves it holds an identity's private key, without
//! any secret that travels and could be replayed.
//!
//! 1. Any node issues a **challenge**: a random 32-byte nonce, an expiry, and an HMAC over both
//!    with a key derived from the keyring (the same on every unsealed node). Issuing writes
//!    nothing, so unauthenticated callers cannot fill any store.
//! 2. The client signs [`coffer_client::login::key_login_message`] (purpose, cluster,
//!    challenge, the session public key it wants, the TTL it asks for) with its identity key.
//! 3. **Login** on any node checks the challenge's MAC and expiry, finds the identity by its key,
//!    checks the signature, and commits one Raft transaction that marks the nonce used and
//!    creates the session, only if the nonce was never used: a challenge works once,
//!    cluster-wide, even when replayed to another node. A follower forwards it like any write.
//!
//! The login answer carries the session certificate (`session.rs`) that every other request
//! presents.

use std::time::{SystemTime, UNIX_EPOCH};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::barrier::Keyring;

/// How long a challenge can be used, by default.
pub const CHALLENGE_TTL_MS: u64 = 60_000;

/// A node's login settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginSettings {
    /// How long a challenge can be used.
    pub challenge_ttl: std::time::Duration,
    /// How often the leader removes used challenges and ended sessions.
    pub cleanup_interval: std::time::Duration,
    /// How long after a challenge expired or a session ended it is kept (so that nodes whose
    /// clocks are behind by less than this still refuse it).
    pub cleanup_grace: std::time::Duration,
    /// Challenges and logins each source address may make per second on each node (with a
    /// burst of four times that).
    pub rate_per_second: u32,
}

impl Default for LoginSettings {
    fn default() -> Self {
        LoginSettings {
            challenge_ttl: std::time::Duration::from_millis(CHALLENGE_TTL_MS),
            cleanup_interval: std::time::Duration::from_secs(60),
            cleanup_grace: std::time::Duration::from_secs(300),
            rate_per_second: 5,
        }
    }
}
/// Session lifetime when the client asks for none.
pub const DEFAULT_SESSION_TTL_S: u64 = 3600;
/// The longest session.
pub const MAX_SESSION_TTL_S: u64 = 24 * 3600;
/// Where used nonces are recorded: this prefix, then the nonce in hex; the value is the
/// challenge's expiry (ms since the epoch, 8 bytes big-endian), after which the leader may
/// remove it.
pub const NONCE_PREFIX: &[u8] = b"\0coffer/login-nonce/";
/// Where sessions live: this prefix, then the session id.
pub const SESSION_PREFIX: &[u8] = b"\0coffer/session/";
const CHALLENGE_PURPOSE: &[u8] = b"coffer/challenge/v1";
const NONCE: usize = 32;
const CHALLENGE_LEN: usize = NONCE + 8 + 32;

/// Why a login was refused (each names the failed check; none echoes a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not a challenge this cluster issued, or altered.
    #[error("the challenge was not issued by this cluster or was altered; ask for a new one")]
    BadChallenge,
    /// Past its expiry.
    #[error("the challenge expired; ask for a new one")]
    Expired,
    /// Used before (on any node).
    #[error(
        "this challenge was already used (or the key's identity changed meanwhile); ask for a new one"
    )]
    Replayed,
    /// No identity has this key.
    #[error(
        "no identity has the key {0}; an administrator registers it with `coffer identity create`"
    )]
    UnknownKey(String),
    /// The signature does not verify.
    #[error(
        "the signature does not match the key {0} over this login (wrong key, purpose or challenge)"
    )]
    BadSignature(String),
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn mac_key(keyring: &Keyring) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, &*keyring.derive(CHALLENGE_PURPOSE))
}

/// A new challenge: `nonce (32) | expiry ms (8, big-endian) | HMAC-SHA256 (32)`.
pub fn issue_challenge(keyring: &Keyring, now_ms: u64, ttl_ms: u64) -> anyhow::Result<Vec<u8>> {
    let mut out = vec![0u8; NONCE];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    out.extend_from_slice(&(now_ms + ttl_ms).to_be_bytes());
    let tag = hmac::sign(&mac_key(keyring), &out);
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Checks a challenge's MAC and expiry; returns its nonce and expiry (ms since the epoch).
pub fn check_challenge(
    keyring: &Keyring,
    challenge: &[u8],
    now_ms: u64,
) -> Result<([u8; NONCE], u64), Refused> {
    if challenge.len() != CHALLENGE_LEN {
        return Err(Refused::BadChallenge);
    }
    let (body, tag) = challenge.split_at(NONCE + 8);
    hmac::verify(&mac_key(keyring), body, tag).map_err(|_| Refused::BadChallenge)?;
    let mut expiry = [0u8; 8];
    expiry.copy_from_slice(&body[NONCE..]);
    let expiry = u64::from_be_bytes(expiry);
    if now_ms > expiry {
        return Err(Refused::Expired);
    }
    let mut nonce = [0u8; NONCE];
    nonce.copy_from_slice(&body[..NONCE]);
    Ok((nonce, expiry))
}

/// What the client signs with its identity key to log in (kept here for the callers that
/// name it so; the bytes are defined once, in the client SDK).
pub use coffer_client::login::key_login_message as login_message;

/// The reserved key that marks `nonce` used.
pub fn nonce_key(nonce: &[u8]) -> Vec<u8> {
    let mut k = NONCE_PREFIX.to_vec();
    for b in nonce {
        k.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    k
}

/// The reserved key of session `id`.
pub fn session_key(id: &str) -> Vec<u8> {
    let mut k = SESSION_PREFIX.to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

/// A session, as stored (inside the barrier).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The identity that logged in.
    pub identity: String,
    /// That identity's public key at login (64 bytes): the session ends if the name is given
    /// to another key.
    pub identity_key: Vec<u8>,
    /// The session public key the client will prove it holds.
    pub session_key: Vec<u8>,
    /// When it was created and when it ends, ms since the Unix epoch.
    pub created_ms: u64,
    /// When it ends.
    pub expires_ms: u64,
    /// For a Kubernetes login: the role and the service account (the policies are the role's).
    pub kubernetes: Option<(String, crate::kubernetes::ServiceAccount)>,
}

/// Session lifetimes, in seconds: the default (when a client asks for none) and the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTtls {
    /// Granted when the client asks for 0.
    pub default_s: u64,
    /// The longest granted.
    pub max_s: u64,
}

/// The lifetimes of a cluster whose administrators set none.
pub const BUILTIN_TTLS: SessionTtls = SessionTtls {
    default_s: DEFAULT_SESSION_TTL_S,
    max_s: MAX_SESSION_TTL_S,
};
/// No setting may allow sessions longer than this (a week).
pub const TTL_LIMIT_S: u64 = 7 * 86_400;
/// Where the cluster's settings live (inside the barrier).
pub const SETTINGS_KEY: &[u8] = b"\0coffer/settings";

/// The cluster's settings, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Session lifetimes for identities that set none of their own.
    pub session: SessionTtls,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            session: BUILTIN_TTLS,
        }
    }
}

/// Checks one identity's or the cluster's lifetimes (`None`: not set).
pub fn check_ttls(default_s: Option<u64>, max_s: Option<u64>) -> Result<(), String> {
    for (what, v) in [("default", default_s), ("maximum", max_s)] {
        if let Some(v) = v
            && !(1..=TTL_LIMIT_S).contains(&v)
        {
            return Err(format!(
                "the {what} session lifetime must be between 1 and {TTL_LIMIT_S} seconds (a week), not {v}"
            ));
        }
    }
    if let (Some(d), Some(m)) = (default_s, max_s)
        && d > m
    {
        return Err(format!(
            "the default session lifetime ({d} s) is longer than the maximum ({m} s)"
        ));
    }
    Ok(())
}

/// The TTL granted to `who` for a requested one (0: the default): the identity's own default
/// and maximum where set, never above the cluster's maximum.
pub fn session_ttl(
    requested_s: u64,
    cluster: SessionTtls,
    identity_default_s: Option<u64>,
    identity_max_s: Option<u64>,
    who: &str,
) -> Result<u64, String> {
    let max = identity_max_s.map_or(cluster.max_s, |m| m.min(cluster.max_s));
    let default = identity_default_s.unwrap_or(cluster.default_s).min(max);
    match requested_s {
        0 => Ok(default),
        s if s > max => Err(format!(
            "a session of {who} lasts at most {max} s, not {s} s (ask for less, or an administrator raises the maximum)"
        )),
        s => Ok(s),
    }
}

/// The client side: asks `target` for a challenge, signs it with the identity key in `key`
/// together with a fresh session key, and logs in. Returns the session to present.
pub async fn login(
    target: &crate::client::Target,
    key: &std::path::Path,
    ttl_s: u64,
) -> anyhow::Result<crate::client::SessionCredentials> {
    let identity = crate::keys::KeyPair::load(key)?;
    let mut client = coffer_api::v1::auth_client::AuthClient::new(target.connect().await?);
    login_on(&mut client, &identity, ttl_s)
        .await
        .map_err(crate::cli::status_error)
}

/// One Private Key Challenge login on `client` (`coffer bench --op login` drives this too).
pub async fn login_on(
    client: &mut coffer_api::v1::auth_client::AuthClient<tonic::transport::Channel>,
    identity: &crate::keys::KeyPair,
    ttl_s: u64,
) -> Result<crate::client::SessionCredentials, tonic::Status> {
    coffer_client::login::key_login(client, identity, ttl_s).await
}

/// The client side of a Kubernetes login: a fresh session key signs the challenge, the role and
/// the service-account `token`, sent with the token. Returns the session to present.
pub async fn kubernetes_login(
    target: &crate::client::Target,
    role: &str,
    token: &str,
    ttl_s: u64,
) -> anyhow::Result<crate::client::SessionCredentials> {
    let mut client = coffer_api::v1::auth_client::AuthClient::new(target.connect().await?);
    coffer_client::login::kubernetes_login(&mut client, role, token, ttl_s)
        .await
        .map_err(crate::cli::status_error)
}

/// Per-source limits on challenges and logins (token buckets, on each node): a burst of
/// `burst`, refilled at `per_second`. Sources idle for a minute are forgotten, so the table
/// stays small.
#[derive(Debug)]
pub struct RateLimit {
    burst: f64,
    per_second: f64,
    buckets:
        std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (f64, std::time::Instant)>>,
}

impl RateLimit {
    /// A limit of `burst` at once and `per_second` after that, per source address.
    pub fn new(burst: u32, per_second: u32) -> RateLimit {
        RateLimit {
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            buckets: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Takes one token for `source`; `false` when it has none left.
    pub fn allow(&self, source: std::net::IpAddr, now: std::time::Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 10_000 {
            buckets.retain(|_, (_, last)| now.duration_since(*last).as_secs() < 60);
        }
        let (tokens, last) = buckets.entry(source).or_insert((self.burst, now));
        let refill = now.duration_since(*last).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_challenge_checks_on_the_cluster_that_issued_it_until_it_expires() {
        let ring = Keyring::new().expect("keyring");
        let c = issue_challenge(&ring, 1_000, CHALLENGE_TTL_MS).expect("challenge");
        let (nonce, expiry) = check_challenge(&ring, &c, 1_000 + CHALLENGE_TTL_MS).expect("valid");
        assert_eq!(&nonce[..], &c[..NONCE]);
        assert_eq!(expiry, 1_000 + CHALLENGE_TTL_MS);
        assert_eq!(
            check_challenge(&ring, &c, 1_001 + CHALLENGE_TTL_MS),
            Err(Refused::Expired)
        );
        let other = Keyring::new().expect("keyring");
        assert_eq!(
            check_challenge(&other, &c, 1_000),
            Err(Refused::BadChallenge)
        );
        let mut extended = c.clone();
        extended[NONCE] ^= 0x40; // push the expiry far out
        assert_eq!(
            check_challenge(&ring, &extended, 1_000),
            Err(Refused::BadChallenge)
        );
        assert_eq!(
            check_challenge(&ring, &c[..10], 1_000),
            Err(Refused::BadChallenge)
        );
        assert_ne!(
            c,
            issue_challenge(&ring, 1_000, CHALLENGE_TTL_MS).expect("challenge")
        );
    }

    #[test]
    fn each_source_gets_a_burst_then_the_refill_rate() {
        let limit = RateLimit::new(3, 2);
        let t0 = std::time::Instant::now();
        let a: std::net::IpAddr = "10.0.0.1".parse().expect("ip");
        let b: std::net::IpAddr = "10.0.0.2".parse().expect("ip");
        assert!((0..3).all(|_| limit.allow(a, t0)));
        assert!(!limit.allow(a, t0), "the burst is spent");
        assert!(limit.allow(b, t0), "another source has its own bucket");
        let later = t0 + std::time::Duration::from_millis(500);
        assert!(
            limit.allow(a, later),
            "one token back after half a second at 2/s"
        );
        assert!(!limit.allow(a, later));
    }

    #[test]
    fn session_ttls_have_a_default_and_a_maximum_per_identity_within_the_clusters() {
        let c = BUILTIN_TTLS;
        assert_eq!(
            session_ttl(0, c, None, None, "a"),
            Ok(DEFAULT_SESSION_TTL_S)
        );
        assert_eq!(session_ttl(60, c, None, None, "a"), Ok(60));
        assert!(session_ttl(MAX_SESSION_TTL_S + 1, c, None, None, "a").is_err());
        // The identity's own values, capped by the cluster's maximum.
        assert_eq!(session_ttl(0, c, Some(300), Some(600), "a"), Ok(300));
        assert!(session_ttl(601, c, Some(300), Some(600), "a").is_err());
        assert_eq!(
            session_ttl(0, c, None, Some(600), "a"),
            Ok(600),
            "default capped"
        );
        let strict = SessionTtls {
            default_s: 60,
            max_s: 120,
        };
        assert!(session_ttl(3600, strict, None, Some(7200), "a").is_err());
        assert!(check_ttls(Some(10), Some(5)).is_err());
        assert!(check_ttls(Some(0), None).is_err());
        assert!(check_ttls(None, Some(TTL_LIMIT_S + 1)).is_err());
        assert!(check_ttls(Some(60), Some(60)).is_ok());
    }
}
