//! Delegation: an identity that holds `delegate` on a path grants another identity a capability
//! it holds there itself, until a time. The grantee's access ends at that time or when the grant
//! is revoked, whichever comes first; a `deny` in the grantee's own policies still wins.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::policy::{Acl, Capability, Pattern, Policy, Rule};

/// Where grants live (inside the barrier): this prefix, the grantee, `/`, the grant id.
pub const PREFIX: &[u8] = b"\0coffer/grant/";
/// Listing every grant and revoking others' is authorized at this path (`list`, `delete`).
pub const PATH: &str = "sys/grants";
/// The longest grant: 30 days.
pub const MAX_SECONDS: u64 = 30 * 86_400;

/// A grant, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    /// Who granted it.
    pub grantor: String,
    /// Who holds it.
    pub grantee: String,
    /// The path or prefix (`...*`) it covers.
    pub path: String,
    /// What it allows there.
    pub capabilities: Vec<String>,
    /// When it was made, ms since the Unix epoch.
    pub created_ms: u64,
    /// When it ends.
    pub expires_ms: u64,
}

/// The stored key of grant `id` to `grantee`.
pub fn key(grantee: &str, id: &str) -> Vec<u8> {
    let mut k = grantee_prefix(grantee);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The prefix of every grant to `grantee`.
pub fn grantee_prefix(grantee: &str) -> Vec<u8> {
    let mut k = PREFIX.to_vec();
    k.extend_from_slice(grantee.as_bytes());
    k.push(b'/');
    k
}

/// Parses what may be granted: data capabilities only (never `delegate`, `sudo` or `deny`).
pub fn capabilities(names: &[String]) -> Result<BTreeSet<Capability>, String> {
    if names.is_empty() {
        return Err("name at least one capability to grant (--capability read)".into());
    }
    names
        .iter()
        .map(|n| match Capability::parse(n) {
            Some(
                c @ (Capability::Read
                | Capability::Create
                | Capability::Update
                | Capability::Patch
                | Capability::Delete
                | Capability::List),
            ) => Ok(c),
            Some(_) => Err(format!(
                "{n:?} cannot be delegated: grant read, create, update, patch, delete or list"
            )),
            None => Err(format!("unknown capability {n:?}")),
        })
        .collect()
}

/// Checks a grant's path: one path, or a prefix ending in `*` (no `+` segments).
pub fn path(text: &str) -> Result<Pattern, String> {
    if text.contains('+') {
        return Err(format!(
            "{text:?}: a grant covers one path or a prefix ending in *, not + segments"
        ));
    }
    Pattern::new(text)
}

/// Whether the holder of `acl` may grant `caps` on `pattern`: it must hold `delegate` and each
/// capability on everything the pattern covers.
pub fn may_grant(acl: &Acl, pattern: &Pattern, caps: &BTreeSet<Capability>) -> Result<(), String> {
    let text = pattern.as_str();
    for cap in caps.iter().copied().chain([Capability::Delegate]) {
        let held = match text.strip_suffix('*') {
            Some(prefix) => acl.allows_all_under(prefix, cap),
            None => acl.allows(text, cap),
        };
        if !held {
            return Err(format!(
                "you may not grant {} on {text:?}: it takes {} there yourself (and delegate)",
                cap.as_str(),
                cap.as_str()
            ));
        }
    }
    Ok(())
}

/// The rules of the grants still running at `now_ms`, as one policy, and when the first of them
/// ends (the decision must be made again then).
pub fn as_policy(grants: &[Delegation], now_ms: u64) -> (Policy, Option<u64>) {
    let mut rules = Vec::new();
    let mut first_end: Option<u64> = None;
    for g in grants.iter().filter(|g| g.expires_ms > now_ms) {
        let (Ok(pattern), Ok(caps)) = (path(&g.path), capabilities(&g.capabilities)) else {
            continue;
        };
        rules.push(Rule {
            pattern,
            capabilities: caps,
        });
        first_end = Some(first_end.map_or(g.expires_ms, |e| e.min(g.expires_ms)));
    }
    (Policy { rules }, first_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(path: &str, caps: &[&str], expires_ms: u64) -> Delegation {
        Delegation {
            grantor: "alice".into(),
            grantee: "bob".into(),
            path: path.into(),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            created_ms: 0,
            expires_ms,
        }
    }

    #[test]
    fn only_what_the_grantor_holds_with_delegate_can_be_granted() {
        let alice = crate::policy::parse(
            r#"path "secret/data/team/*" { capabilities = ["read", "list", "delegate"] }
path "secret/data/team/keys" { capabilities = ["read"] }"#,
        )
        .expect("policy");
        let acl = Acl::new([&alice]);
        let read = capabilities(&["read".into()]).expect("caps");
        assert!(may_grant(&acl, &path("secret/data/team/db").expect("p"), &read).is_ok());
        assert!(may_grant(&acl, &path("secret/data/team/app/*").expect("p"), &read).is_ok());
        let err = may_grant(&acl, &path("secret/data/team/*").expect("p"), &read)
            .expect_err("team/keys holds no delegate");
        assert!(err.contains("delegate"), "{err}");
        let update = capabilities(&["update".into()]).expect("caps");
        assert!(may_grant(&acl, &path("secret/data/team/db").expect("p"), &update).is_err());
        assert!(capabilities(&["sudo".into()]).is_err());
        assert!(capabilities(&["delegate".into()]).is_err());
        assert!(path("secret/data/+/db").is_err());
    }

    #[test]
    fn running_grants_become_rules_and_the_first_end_is_reported() {
        let grants = [
            grant("secret/data/a", &["read"], 2_000),
            grant("secret/data/b/*", &["read", "list"], 5_000),
            grant("secret/data/c", &["read"], 500),
        ];
        let (policy, end) = as_policy(&grants, 1_000);
        assert_eq!(policy.rules.len(), 2, "the ended one is left out");
        assert_eq!(end, Some(2_000));
        let acl = Acl::new([&policy]);
        assert!(acl.allows("secret/data/b/x", Capability::List));
        assert!(!acl.allows("secret/data/c", Capability::Read));
        let (none, end) = as_policy(&grants, 9_000);
        assert!(none.rules.is_empty());
        assert_eq!(end, None);
    }
}
