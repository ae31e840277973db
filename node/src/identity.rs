//! Identities: a name, a public key (the one key format of `coffer keygen`) and the policies it
//! holds. An identity proves itself by signing with its private key (the login flow comes with
//! authentication); nothing secret about it is stored. The administrator key given at init is
//! the built-in identity `admin`, with the built-in `admin` policy.
//!
//! Records live inside the barrier under reserved keys: `\0coffer/identity/NAME` holds the
//! record, and `\0coffer/identity-key/FINGERPRINT` maps a public key to the one identity that
//! has it (a key belongs to at most one identity, so a login by key finds its identity).

use serde::{Deserialize, Serialize};

/// Where identity records live: this prefix, then the name.
pub const STORE_PREFIX: &[u8] = b"\0coffer/identity/";
/// Where the key index lives: this prefix, then the key's fingerprint.
pub const KEY_INDEX_PREFIX: &[u8] = b"\0coffer/identity-key/";
/// The built-in administrator identity (the key given at init).
pub const ADMIN: &str = "admin";

/// A stored identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Both public keys (64 bytes).
    pub public_key: Vec<u8>,
    /// The names of the policies it holds.
    pub policies: Vec<String>,
    /// Its own default session lifetime in seconds (`None`: the cluster's).
    pub default_ttl_s: Option<u64>,
    /// Its own maximum session lifetime in seconds (`None`: the cluster's; never above it).
    pub max_ttl_s: Option<u64>,
}

/// Checks an identity name: the same rules as policy names.
pub fn check_name(name: &str) -> Result<(), String> {
    crate::policy::check_name(name).map_err(|_| {
        format!("identity name {name:?}: use 1 to 128 lowercase letters, digits, `-` and `_`")
    })
}

/// The stored key of identity `name`.
pub fn store_key(name: &str) -> Vec<u8> {
    let mut k = STORE_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// The stored key of the index entry for a public key with `fingerprint`.
pub fn key_index(fingerprint: &str) -> Vec<u8> {
    let mut k = KEY_INDEX_PREFIX.to_vec();
    k.extend_from_slice(fingerprint.as_bytes());
    k
}

/// Checks a list of policy names (each valid, none twice) and returns it sorted.
pub fn check_policies(policies: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(policies.len());
    for p in policies {
        crate::policy::check_name(p)?;
        if out.contains(p) {
            return Err(format!("policy {p:?} is given twice"));
        }
        out.push(p.clone());
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_policy_lists_are_checked() {
        assert!(check_name("ci-deployer").is_ok());
        assert!(check_name("CI").is_err());
        assert_eq!(
            check_policies(&["b".into(), "a".into()]).expect("ok"),
            vec!["a".to_string(), "b".to_string()]
        );
        assert!(check_policies(&["a".into(), "a".into()]).is_err());
        assert!(check_policies(&["A".into()]).is_err());
    }
}
