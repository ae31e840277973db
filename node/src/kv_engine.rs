//! The kv secrets engine's model (Vault KV v2): mounts, secret paths, the metadata record of a
//! secret and what each operation does to it. No I/O here: the `coffer.kv.v1` service
//! (`api/kv_engine.rs`) reads the records, calls these functions and writes the outcome in one
//! compare-and-swap transaction.
//!
//! Storage layout (values inside the barrier, like every value):
//! - `\0coffer/mounts/NAME`: a mount's configuration ([`Mount`]); `secret` is built in.
//! - `\x01kv/MOUNT/m/PATH`: a secret's [`SecretMetadata`], including the state of each kept
//!   version.
//! - `\x01kv/MOUNT/v/PATH\0VERSION` (version as 8 big-endian bytes): one version's data, a map
//!   of fields. Paths never contain NUL, so the versions of a path sort together and before
//!   the paths under it.
//!
//! Keys starting with `\x01` belong to the engines; the raw store API refuses them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The mount every cluster has.
pub const BUILTIN_MOUNT: &str = "secret";
/// Versions kept per secret when neither the secret nor its mount says otherwise.
pub const DEFAULT_MAX_VERSIONS: u32 = 10;
/// Where mount configurations live: this prefix, then the mount name.
pub const MOUNT_PREFIX: &[u8] = b"\0coffer/mounts/";
/// Every engine key starts with this byte.
pub const ENGINE_BYTE: u8 = 1;
/// Longest secret path, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Most fields in one secret, and most custom metadata entries.
pub const MAX_FIELDS: usize = 1000;

/// Mount names that would collide with Coffer's own policy paths.
const RESERVED_MOUNTS: [&str; 5] = ["sys", "auth", "wrap", "identity", "cubbyhole"];

/// A mount's configuration, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Engine type (only `kv`).
    pub kind: String,
    /// Versions kept per secret (0: [`DEFAULT_MAX_VERSIONS`]).
    pub max_versions: u32,
    /// Every write to this mount must carry a check-and-set version.
    pub cas_required: bool,
    /// Versions expire this long after they were written (0: never).
    pub delete_version_after_ms: u64,
    /// Free text.
    pub description: String,
}

impl Mount {
    /// The built-in `secret` mount's configuration.
    pub fn builtin() -> Mount {
        Mount {
            kind: "kv".into(),
            max_versions: 0,
            cas_required: false,
            delete_version_after_ms: 0,
            description: "key/value secrets (built in)".into(),
        }
    }
}

/// The state of one kept version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// When it was written, ms since the Unix epoch.
    pub created_ms: u64,
    /// When it was soft-deleted (0: not deleted).
    pub deleted_ms: u64,
    /// Its data was removed for good.
    pub destroyed: bool,
    /// The request id of the write that made it (empty: none), so a retried write finds it.
    pub request_id: Vec<u8>,
}

/// A secret's metadata, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMetadata {
    /// When the secret was created and last changed.
    pub created_ms: u64,
    /// When its metadata or data last changed.
    pub updated_ms: u64,
    /// The newest version (0: none yet).
    pub current: u64,
    /// This secret's own setting (0: the mount's).
    pub max_versions: u32,
    /// Writes must carry a check-and-set version.
    pub cas_required: bool,
    /// This secret's own version lifetime (0: the mount's).
    pub delete_version_after_ms: u64,
    /// Free key/value pairs.
    pub custom: BTreeMap<String, String>,
    /// The kept versions.
    pub versions: BTreeMap<u64, Version>,
}

/// Why an operation is refused; the service maps each to a status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Bad input (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// No such secret or version, or not readable now (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// Check-and-set failed or is required (FAILED_PRECONDITION).
    #[error("{0}")]
    Precondition(String),
}

/// Checks a mount name.
pub fn check_mount_name(name: &str) -> Result<(), Refusal> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(Refusal::Invalid(format!(
            "mount name {name:?}: use 1 to 64 letters, digits, `-` and `_`"
        )));
    }
    if RESERVED_MOUNTS.contains(&name) {
        return Err(Refusal::Invalid(format!(
            "{name:?} is reserved for Coffer's own paths; choose another mount name"
        )));
    }
    Ok(())
}

/// Checks a secret path: segments separated by `/`, none empty, `.` or `..`, no control
/// characters, at most [`MAX_PATH_BYTES`].
pub fn check_path(path: &str) -> Result<(), Refusal> {
    let bad = |why: &str| {
        Err(Refusal::Invalid(format!(
            "secret path {path:?} {why}; a path is segments like app/db separated by '/'"
        )))
    };
    if path.is_empty() {
        return bad("is empty");
    }
    if path.len() > MAX_PATH_BYTES {
        return bad(&format!("is longer than {MAX_PATH_BYTES} bytes"));
    }
    if path.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    if path
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return bad("has an empty, `.` or `..` segment");
    }
    Ok(())
}

/// Checks a list prefix: empty, or a folder ending in `/`.
pub fn check_folder(prefix: &str) -> Result<(), Refusal> {
    if prefix.is_empty() {
        return Ok(());
    }
    match prefix.strip_suffix('/') {
        Some(inner) => check_path(inner),
        None => Err(Refusal::Invalid(format!(
            "list a folder: {prefix:?} must end in '/' (or be empty for the mount's top)"
        ))),
    }
}

/// Checks field names and values of a secret or custom metadata.
pub fn check_fields(what: &str, fields: &BTreeMap<String, String>) -> Result<(), Refusal> {
    if fields.len() > MAX_FIELDS {
        return Err(Refusal::Invalid(format!(
            "{what} has {} fields; at most {MAX_FIELDS}",
            fields.len()
        )));
    }
    if let Some(k) = fields
        .keys()
        .find(|k| k.is_empty() || k.chars().any(char::is_control))
    {
        return Err(Refusal::Invalid(format!(
            "{what} field name {k:?} is empty or has a control character"
        )));
    }
    Ok(())
}

fn engine_key(mount: &str, kind: u8, path: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + mount.len() + path.len());
    k.push(ENGINE_BYTE);
    k.extend_from_slice(b"kv/");
    k.extend_from_slice(mount.as_bytes());
    k.push(b'/');
    k.push(kind);
    k.push(b'/');
    k.extend_from_slice(path.as_bytes());
    k
}

/// Where a mount's data lives (every key of the mount starts with this).
pub fn mount_data_prefix(mount: &str) -> Vec<u8> {
    let mut k = vec![ENGINE_BYTE];
    k.extend_from_slice(b"kv/");
    k.extend_from_slice(mount.as_bytes());
    k.push(b'/');
    k
}

/// The stored key of a mount's configuration.
pub fn mount_key(mount: &str) -> Vec<u8> {
    let mut k = MOUNT_PREFIX.to_vec();
    k.extend_from_slice(mount.as_bytes());
    k
}

/// The stored key of a secret's metadata (a folder prefix gives the prefix of the metadata of
/// every secret under it).
pub fn metadata_key(mount: &str, path: &str) -> Vec<u8> {
    engine_key(mount, b'm', path)
}

/// The prefix of every version of the secret at `path`.
pub fn versions_prefix(mount: &str, path: &str) -> Vec<u8> {
    let mut k = engine_key(mount, b'v', path);
    k.push(0);
    k
}

/// The stored key of one version's data.
pub fn version_key(mount: &str, path: &str, version: u64) -> Vec<u8> {
    let mut k = versions_prefix(mount, path);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

impl SecretMetadata {
    /// Versions kept: the secret's setting, else the mount's, else the default.
    pub fn effective_max_versions(&self, mount: &Mount) -> u32 {
        [self.max_versions, mount.max_versions, DEFAULT_MAX_VERSIONS]
            .into_iter()
            .find(|&n| n > 0)
            .unwrap_or(DEFAULT_MAX_VERSIONS)
    }

    /// Version lifetime: the secret's setting, else the mount's (0: forever).
    pub fn effective_delete_after(&self, mount: &Mount) -> u64 {
        if self.delete_version_after_ms > 0 {
            self.delete_version_after_ms
        } else {
            mount.delete_version_after_ms
        }
    }

    /// The oldest kept version (0: none).
    pub fn oldest(&self) -> u64 {
        self.versions.keys().next().copied().unwrap_or(0)
    }

    /// When `version` is (or was) deleted at `now`: its soft delete, or its expiry once past.
    pub fn deleted_at(&self, mount: &Mount, v: &Version, now_ms: u64) -> u64 {
        if v.deleted_ms > 0 {
            return v.deleted_ms;
        }
        let after = self.effective_delete_after(mount);
        if after > 0 && now_ms >= v.created_ms.saturating_add(after) {
            return v.created_ms.saturating_add(after);
        }
        0
    }

    /// The version a read of `asked` (0: the newest) gets, or why there is none to read.
    pub fn readable(
        &self,
        mount: &Mount,
        path: &str,
        asked: u64,
        now_ms: u64,
    ) -> Result<u64, Refusal> {
        let number = if asked == 0 { self.current } else { asked };
        if number == 0 {
            return Err(Refusal::NotFound(format!(
                "secret {path:?} has no version yet (only metadata)"
            )));
        }
        let Some(v) = self.versions.get(&number) else {
            let why = if number > self.current {
                format!("the newest is version {}", self.current)
            } else {
                format!(
                    "it was removed to keep the newest {} versions",
                    self.effective_max_versions(mount)
                )
            };
            return Err(Refusal::NotFound(format!(
                "secret {path:?} has no version {number}: {why}"
            )));
        };
        if v.destroyed {
            return Err(Refusal::NotFound(format!(
                "version {number} of {path:?} was destroyed; its data is gone"
            )));
        }
        let deleted = self.deleted_at(mount, v, now_ms);
        if deleted > 0 {
            return Err(Refusal::NotFound(format!(
                "version {number} of {path:?} was deleted at {deleted} ms (Unix time); `coffer kv undelete` brings it back"
            )));
        }
        Ok(number)
    }

    /// Checks a write's check-and-set against this metadata, for a mount.
    pub fn check_cas(&self, mount: &Mount, path: &str, cas: Option<u64>) -> Result<(), Refusal> {
        match cas {
            None if self.cas_required || mount.cas_required => Err(Refusal::Precondition(format!(
                "check-and-set is required for {path:?}: pass cas = the current version ({}; 0 for a new secret)",
                self.current
            ))),
            Some(c) if c != self.current => Err(Refusal::Precondition(format!(
                "check-and-set failed for {path:?}: the current version is {}, not {c}; read it again and retry",
                self.current
            ))),
            _ => Ok(()),
        }
    }

    /// Adds a new version written at `now` by a request with `request_id`. Returns the new
    /// version and the versions removed to keep the newest `max_versions` (their data must be
    /// deleted in the same transaction).
    pub fn add_version(
        &mut self,
        mount: &Mount,
        now_ms: u64,
        request_id: &[u8],
    ) -> (u64, Vec<u64>) {
        if self.created_ms == 0 {
            self.created_ms = now_ms;
        }
        self.updated_ms = now_ms;
        self.current += 1;
        self.versions.insert(
            self.current,
            Version {
                created_ms: now_ms,
                deleted_ms: 0,
                destroyed: false,
                request_id: request_id.to_vec(),
            },
        );
        (self.current, self.prune(mount))
    }

    /// Removes the versions beyond the newest `max_versions`; returns them (their data must be
    /// deleted in the same transaction).
    pub fn prune(&mut self, mount: &Mount) -> Vec<u64> {
        let keep = u64::from(self.effective_max_versions(mount));
        let removed: Vec<u64> = self
            .versions
            .keys()
            .copied()
            .take_while(|&v| v + keep <= self.current)
            .collect();
        for v in &removed {
            self.versions.remove(v);
        }
        removed
    }

    /// The kept version that a write with `request_id` made, if any.
    pub fn written_by(&self, request_id: &[u8]) -> Option<u64> {
        if request_id.is_empty() {
            return None;
        }
        self.versions
            .iter()
            .find(|(_, v)| v.request_id == request_id)
            .map(|(n, _)| *n)
    }

    /// The versions a delete, undelete or destroy of `asked` applies to (empty `asked`: the
    /// newest, for a delete). Versions not kept are an error.
    pub fn pick(
        &self,
        path: &str,
        asked: &[u64],
        newest_if_none: bool,
    ) -> Result<Vec<u64>, Refusal> {
        if asked.is_empty() {
            if newest_if_none && self.current > 0 && self.versions.contains_key(&self.current) {
                return Ok(vec![self.current]);
            }
            return Err(Refusal::Invalid(format!(
                "name the versions of {path:?} (e.g. --versions 1,2)"
            )));
        }
        let mut out = Vec::with_capacity(asked.len());
        for &v in asked {
            if !self.versions.contains_key(&v) {
                return Err(Refusal::NotFound(format!(
                    "secret {path:?} has no version {v} (kept: {})",
                    self.kept_list()
                )));
            }
            if !out.contains(&v) {
                out.push(v);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Soft-deletes, undeletes or destroys the `asked` versions (empty: the newest, for a
    /// delete) at `now`; returns the versions whose state changed (a destroyed version's data
    /// must be deleted in the same transaction). Versions already in that state are left out.
    pub fn change_versions(
        &mut self,
        mount: &Mount,
        path: &str,
        asked: &[u64],
        what: VersionChange,
        now_ms: u64,
    ) -> Result<Vec<u64>, Refusal> {
        let picked = self.pick(path, asked, what == VersionChange::Delete)?;
        let mut changed = Vec::new();
        for n in picked {
            let deleted = match self.versions.get(&n) {
                Some(v) => self.deleted_at(mount, v, now_ms),
                None => continue,
            };
            let Some(v) = self.versions.get_mut(&n) else {
                continue;
            };
            let changes = match what {
                VersionChange::Delete => !v.destroyed && deleted == 0,
                VersionChange::Undelete => !v.destroyed && v.deleted_ms > 0,
                VersionChange::Destroy => !v.destroyed,
            };
            if !changes {
                continue;
            }
            match what {
                VersionChange::Delete => v.deleted_ms = now_ms,
                VersionChange::Undelete => v.deleted_ms = 0,
                VersionChange::Destroy => v.destroyed = true,
            }
            changed.push(n);
        }
        Ok(changed)
    }

    fn kept_list(&self) -> String {
        if self.versions.is_empty() {
            return "none".into();
        }
        let v: Vec<String> = self.versions.keys().map(u64::to_string).collect();
        v.join(", ")
    }
}

/// What a delete, undelete or destroy of versions does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionChange {
    /// Soft delete (undelete brings it back).
    Delete,
    /// Undoes a soft delete.
    Undelete,
    /// Removes the data for good.
    Destroy,
}

/// The names directly under a folder, from the metadata paths found under it (relative to the
/// folder, in order): `db` for a secret, `web/` for a folder (once).
pub fn fold_names<'a>(relative: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for rel in relative {
        let name = match rel.find('/') {
            Some(i) => &rel[..=i],
            None => rel,
        };
        if out.last().map(String::as_str) != Some(name) {
            out.push(name.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount() -> Mount {
        Mount::builtin()
    }

    #[test]
    fn paths_and_mount_names_are_checked() {
        for good in ["app", "app/db", "a-b_c.d/e f"] {
            check_path(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "", "/app", "app/", "app//db", "a/../b", "./a", "a\0b", "a\nb",
        ] {
            assert!(
                matches!(check_path(bad), Err(Refusal::Invalid(_))),
                "{bad:?} must be refused"
            );
        }
        assert!(check_folder("").is_ok());
        assert!(check_folder("app/").is_ok());
        assert!(check_folder("app").is_err());
        assert!(check_mount_name("team-a_1").is_ok());
        assert!(check_mount_name("sys").is_err());
        assert!(check_mount_name("a/b").is_err());
        assert!(check_mount_name("").is_err());
    }

    #[test]
    fn versions_of_a_path_sort_together_before_paths_under_it() {
        let mut keys = [
            metadata_key("secret", "a"),
            version_key("secret", "a/b", 1),
            version_key("secret", "a", 2),
            version_key("secret", "a", 1),
            version_key("secret", "ab", 1),
        ];
        keys.sort();
        assert_eq!(keys[1], version_key("secret", "a", 1));
        assert_eq!(keys[2], version_key("secret", "a", 2));
        assert_eq!(keys[3], version_key("secret", "a/b", 1));
        let prefix = versions_prefix("secret", "a");
        assert_eq!(keys.iter().filter(|k| k.starts_with(&prefix)).count(), 2);
        assert!(!metadata_key("secret", "x").starts_with(&mount_data_prefix("secre")));
    }

    #[test]
    fn a_new_version_removes_the_ones_beyond_max_versions() {
        let mut m = SecretMetadata {
            max_versions: 3,
            ..SecretMetadata::default()
        };
        for n in 1..=3 {
            assert_eq!(m.add_version(&mount(), 10 * n, b"").0, n);
        }
        let (v, removed) = m.add_version(&mount(), 40, b"r4");
        assert_eq!((v, removed), (4, vec![1]));
        assert_eq!(m.oldest(), 2);
        assert_eq!(m.written_by(b"r4"), Some(4));
        // Lowering max_versions removes several at the next write.
        m.max_versions = 1;
        let (_, removed) = m.add_version(&mount(), 50, b"");
        assert_eq!(removed, vec![2, 3, 4]);
        assert_eq!(m.versions.keys().copied().collect::<Vec<_>>(), vec![5]);
    }

    #[test]
    fn cas_is_checked_and_can_be_required() {
        let mut m = SecretMetadata::default();
        assert!(m.check_cas(&mount(), "p", Some(0)).is_ok());
        assert!(m.check_cas(&mount(), "p", None).is_ok());
        m.add_version(&mount(), 1, b"");
        assert!(matches!(
            m.check_cas(&mount(), "p", Some(0)),
            Err(Refusal::Precondition(_))
        ));
        assert!(m.check_cas(&mount(), "p", Some(1)).is_ok());
        m.cas_required = true;
        assert!(matches!(
            m.check_cas(&mount(), "p", None),
            Err(Refusal::Precondition(_))
        ));
        let strict = Mount {
            cas_required: true,
            ..Mount::builtin()
        };
        assert!(
            SecretMetadata::default()
                .check_cas(&strict, "p", None)
                .is_err()
        );
    }

    #[test]
    fn reads_see_deleted_destroyed_expired_and_removed_versions_as_not_found() {
        let mut m = SecretMetadata {
            max_versions: 2,
            delete_version_after_ms: 1000,
            ..SecretMetadata::default()
        };
        for t in [100, 200, 300] {
            m.add_version(&mount(), t, b"");
        }
        assert_eq!(m.readable(&mount(), "p", 0, 500), Ok(3));
        assert_eq!(m.readable(&mount(), "p", 2, 500), Ok(2));
        let removed = m.readable(&mount(), "p", 1, 500).unwrap_err();
        assert!(removed.to_string().contains("newest 2"), "{removed}");
        assert!(m.readable(&mount(), "p", 9, 500).is_err());
        // Expired 1000 ms after it was written.
        let expired = m.readable(&mount(), "p", 3, 1300).unwrap_err();
        assert!(expired.to_string().contains("deleted at 1300"), "{expired}");
        m.versions.get_mut(&2).unwrap().deleted_ms = 400;
        assert!(m.readable(&mount(), "p", 2, 500).is_err());
        m.versions.get_mut(&2).unwrap().destroyed = true;
        assert!(
            m.readable(&mount(), "p", 2, 500)
                .unwrap_err()
                .to_string()
                .contains("destroyed")
        );
    }

    #[test]
    fn delete_undelete_and_destroy_change_only_what_is_not_in_that_state() {
        let mut m = SecretMetadata::default();
        for t in [1, 2, 3] {
            m.add_version(&mount(), t, b"");
        }
        let change = |m: &mut SecretMetadata, asked: &[u64], what| {
            m.change_versions(&mount(), "p", asked, what, 100).unwrap()
        };
        assert_eq!(change(&mut m, &[], VersionChange::Delete), vec![3]);
        assert_eq!(change(&mut m, &[1, 3], VersionChange::Delete), vec![1]);
        assert_eq!(change(&mut m, &[3], VersionChange::Undelete), vec![3]);
        assert_eq!(change(&mut m, &[2], VersionChange::Destroy), vec![2]);
        assert!(change(&mut m, &[2], VersionChange::Undelete).is_empty());
        assert!(
            m.change_versions(&mount(), "p", &[9], VersionChange::Destroy, 100)
                .is_err()
        );
    }

    #[test]
    fn listing_folds_folders() {
        assert_eq!(
            fold_names(["db", "web/a", "web/b", "web/c/d", "x"]),
            vec!["db", "web/", "x"]
        );
    }
}
