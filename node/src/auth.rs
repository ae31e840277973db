//! The Private Key Challenge: how a client proves it holds an identity's private key, without
//! any secret that travels and could be replayed.
//!
//! 1. Any node issues a **challenge**: a random 32-byte nonce, an expiry, and an HMAC over both
//!    with a key derived from the keyring (the same on every unsealed node). Issuing writes
//!    nothing, so unauthenticated callers cannot fill any store.
//! 2. The client signs [`login_message`] (purpose, cluster, challenge, the session public key it
//!    wants, the TTL it asks for) with its identity key.
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

/// How long a challenge can be used.
pub const CHALLENGE_TTL_MS: u64 = 60_000;
/// Session lifetime when the client asks for none.
pub const DEFAULT_SESSION_TTL_S: u64 = 3600;
/// The longest session.
pub const MAX_SESSION_TTL_S: u64 = 24 * 3600;
/// Where used nonces are recorded: this prefix, then the nonce in hex.
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
    #[error("the challenge expired; ask for a new one (challenges last 60 s)")]
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
pub fn issue_challenge(keyring: &Keyring, now_ms: u64) -> anyhow::Result<Vec<u8>> {
    let mut out = vec![0u8; NONCE];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    out.extend_from_slice(&(now_ms + CHALLENGE_TTL_MS).to_be_bytes());
    let tag = hmac::sign(&mac_key(keyring), &out);
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Checks a challenge's MAC and expiry; returns its nonce.
pub fn check_challenge(
    keyring: &Keyring,
    challenge: &[u8],
    now_ms: u64,
) -> Result<[u8; NONCE], Refused> {
    if challenge.len() != CHALLENGE_LEN {
        return Err(Refused::BadChallenge);
    }
    let (body, tag) = challenge.split_at(NONCE + 8);
    hmac::verify(&mac_key(keyring), body, tag).map_err(|_| Refused::BadChallenge)?;
    let mut expiry = [0u8; 8];
    expiry.copy_from_slice(&body[NONCE..]);
    if now_ms > u64::from_be_bytes(expiry) {
        return Err(Refused::Expired);
    }
    let mut nonce = [0u8; NONCE];
    nonce.copy_from_slice(&body[..NONCE]);
    Ok(nonce)
}

/// What the client signs with its identity key to log in.
pub fn login_message(
    cluster_id: &str,
    challenge: &[u8],
    session_key: &[u8],
    ttl_s: u64,
) -> Vec<u8> {
    let mut m = b"coffer/login/v1\0".to_vec();
    m.extend_from_slice(cluster_id.as_bytes());
    m.push(0);
    m.extend_from_slice(challenge);
    m.extend_from_slice(session_key);
    m.extend_from_slice(&ttl_s.to_be_bytes());
    m
}

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
}

/// The TTL granted for a requested one (0: the default), or why not.
pub fn session_ttl(requested_s: u64) -> Result<u64, String> {
    match requested_s {
        0 => Ok(DEFAULT_SESSION_TTL_S),
        s if s > MAX_SESSION_TTL_S => Err(format!(
            "a session lasts at most {MAX_SESSION_TTL_S} s (24 h), not {s} s"
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
    use coffer_api::v1 as pb;
    use coffer_api::v1::auth_client::AuthClient;
    let identity = crate::keys::KeyPair::load(key)?;
    let session = crate::keys::KeyPair::generate()?;
    let mut client = AuthClient::new(target.connect().await?);
    let challenge = client
        .challenge(pb::ChallengeRequest {})
        .await
        .map_err(crate::cli::status_error)?
        .into_inner();
    let session_key = session.public().to_bytes().to_vec();
    let signature = identity.sign(&login_message(
        &challenge.cluster_id,
        &challenge.challenge,
        &session_key,
        ttl_s,
    ));
    let login = client
        .login(pb::LoginRequest {
            challenge: challenge.challenge,
            public_key: identity.public().to_bytes().to_vec(),
            session_public_key: session_key,
            ttl_seconds: ttl_s,
            signature: signature.to_vec(),
        })
        .await
        .map_err(crate::cli::status_error)?
        .into_inner();
    Ok(crate::client::SessionCredentials {
        certificate: login.certificate.clone(),
        key: session.signing_key_pkcs8_pem(),
        login,
    })
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
        let c = issue_challenge(&ring, 1_000).expect("challenge");
        let nonce = check_challenge(&ring, &c, 1_000 + CHALLENGE_TTL_MS).expect("valid");
        assert_eq!(&nonce[..], &c[..NONCE]);
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
        assert_ne!(c, issue_challenge(&ring, 1_000).expect("challenge"));
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
    fn session_ttls_have_a_default_and_a_maximum() {
        assert_eq!(session_ttl(0), Ok(DEFAULT_SESSION_TTL_S));
        assert_eq!(session_ttl(60), Ok(60));
        assert!(session_ttl(MAX_SESSION_TTL_S + 1).is_err());
    }
}
