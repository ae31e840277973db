//! The kv secrets engine (`coffer.kv.v1`) and its mounts.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use coffer_api::kv::v1 as pb;
use coffer_api::kv::v1::kv_client::KvClient;
use coffer_api::kv::v1::mounts_client::MountsClient;
use prost::Message as _;
use zeroize::Zeroize as _;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::retry::CallKind;

pub use pb::{Metadata, MountInfo, VersionInfo};

/// The info a sealed response is encrypted with.
pub const SEALED_RESPONSE_INFO: &[u8] = b"coffer sealed response v1";

/// A secret's fields. The values are wiped when it is dropped and never printed by `Debug`.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct SecretMap(BTreeMap<String, String>);

impl SecretMap {
    /// The value of `field`.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.0.get(field).map(String::as_str)
    }

    /// The fields in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many fields.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No fields.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for SecretMap {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        SecretMap(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl std::fmt::Debug for SecretMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "***")))
            .finish()
    }
}

impl Drop for SecretMap {
    fn drop(&mut self) {
        for v in self.0.values_mut() {
            v.zeroize();
        }
    }
}

/// Moves a map out of a protobuf message into a [`SecretMap`] (the strings are moved, not
/// copied), wiping the values the map held.
fn take_secret(map: &mut HashMap<String, String>) -> SecretMap {
    SecretMap(map.drain().collect())
}

/// One version of a secret, as read.
#[derive(Debug, Clone)]
pub struct Secret {
    /// The fields.
    pub data: SecretMap,
    /// The version read.
    pub version: VersionInfo,
    /// The secret's custom metadata.
    pub custom_metadata: HashMap<String, String>,
}

/// How to read a secret.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// The version (0: the latest).
    pub version: u64,
    /// Serve from the contacted node's state without asking the leader (may lag).
    pub stale: bool,
}

/// Changes to a secret's settings; `None` leaves a setting unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataUpdate {
    /// Versions kept (0: the mount's setting).
    pub max_versions: Option<u32>,
    /// Whether every write must give a check-and-set version.
    pub cas_required: Option<bool>,
    /// Versions expire this long after they were written (zero: never).
    pub delete_version_after: Option<Duration>,
    /// Replaces the custom metadata when given.
    pub custom_metadata: Option<HashMap<String, String>>,
}

/// How to change some fields of a secret.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    /// Fields to set.
    pub set: SecretMap,
    /// Fields to remove.
    pub remove: Vec<String>,
    /// Check-and-set against this version instead of the one the server reads.
    pub cas: Option<u64>,
}

fn consistency(stale: bool) -> i32 {
    if stale {
        pb::Consistency::Stale as i32
    } else {
        pb::Consistency::Linearizable as i32
    }
}

fn version_of(v: Option<VersionInfo>) -> Result<VersionInfo> {
    v.ok_or_else(|| Error::Protocol("the answer names no version".into()))
}

/// The kv engine at one mount: `client.kv("secret")`. Paths are inside the mount (`app/db`).
#[derive(Debug, Clone)]
pub struct Kv {
    client: Client,
    mount: String,
}

impl Kv {
    pub(crate) fn new(client: Client, mount: String) -> Kv {
        Kv { client, mount }
    }

    /// The mount.
    pub fn mount(&self) -> &str {
        &self.mount
    }

    /// Writes a new version of the secret at `path`.
    pub async fn put(&self, path: &str, data: impl Into<SecretMap>) -> Result<VersionInfo> {
        self.put_request(path, data.into(), None).await
    }

    /// Writes a new version only if the current one is `cas` (0: only if there is none).
    pub async fn put_cas(
        &self,
        path: &str,
        data: impl Into<SecretMap>,
        cas: u64,
    ) -> Result<VersionInfo> {
        self.put_request(path, data.into(), Some(cas)).await
    }

    async fn put_request(
        &self,
        path: &str,
        data: SecretMap,
        cas: Option<u64>,
    ) -> Result<VersionInfo> {
        let mut request = pb::PutRequest {
            mount: self.mount.clone(),
            path: path.to_string(),
            data: data.0.clone().into_iter().collect(),
            cas,
            request_id: Vec::new(),
        };
        let answer = self
            .client
            .unary(
                CallKind::IdempotentWrite,
                &request,
                |ch, request| async move { KvClient::new(ch).put(request).await },
            )
            .await;
        request.data.values_mut().for_each(|v| v.zeroize());
        version_of(answer?.into_inner().version)
    }

    /// Reads the latest version.
    pub async fn get(&self, path: &str) -> Result<Secret> {
        self.get_with(path, ReadOptions::default()).await
    }

    /// Reads version `version`.
    pub async fn get_version(&self, path: &str, version: u64) -> Result<Secret> {
        let options = ReadOptions {
            version,
            stale: false,
        };
        self.get_with(path, options).await
    }

    /// Reads a version with `options` (e.g. a stale read from the contacted node).
    pub async fn get_with(&self, path: &str, options: ReadOptions) -> Result<Secret> {
        let mut answer = self.get_request(path, options, false).await?;
        Ok(Secret {
            data: take_secret(&mut answer.data),
            version: version_of(answer.version)?,
            custom_metadata: answer.custom_metadata,
        })
    }

    /// Reads a version encrypted by the server to the caller's key (past any TLS-terminating
    /// proxy only the caller can read it), decrypts it and checks it is the secret asked for.
    /// Needs a [`crate::Login::Key`] client.
    pub async fn get_sealed(&self, path: &str) -> Result<Secret> {
        self.get_sealed_with(path, ReadOptions::default()).await
    }

    /// [`Kv::get_sealed`] of a given version, or from the contacted node's state.
    pub async fn get_sealed_with(&self, path: &str, options: ReadOptions) -> Result<Secret> {
        let key = self
            .client
            .key_pair()
            .ok_or(Error::NeedsKey("a sealed read"))?;
        let answer = self.get_request(path, options, true).await?;
        let version = version_of(answer.version)?;
        let plain = key
            .open(SEALED_RESPONSE_INFO, &answer.sealed_data)
            .map_err(|e| Error::Protocol(format!("the sealed data does not open: {e}")))?;
        let mut sealed = pb::SealedData::decode(plain.as_slice())
            .map_err(|e| Error::Protocol(format!("the sealed data is malformed: {e}")))?;
        let data = take_secret(&mut sealed.data);
        let wanted = if options.version == 0 {
            version.version
        } else {
            options.version
        };
        if sealed.mount != self.mount || sealed.path != path || sealed.version != wanted {
            return Err(Error::Protocol(format!(
                "the sealed data is for {}/{} version {}, not {}/{path} version {wanted}",
                sealed.mount, sealed.path, sealed.version, self.mount
            )));
        }
        Ok(Secret {
            data,
            version,
            custom_metadata: answer.custom_metadata,
        })
    }

    async fn get_request(
        &self,
        path: &str,
        options: ReadOptions,
        seal_to_caller: bool,
    ) -> Result<pb::GetResponse> {
        let request = pb::GetRequest {
            mount: self.mount.clone(),
            path: path.to_string(),
            version: options.version,
            consistency: consistency(options.stale),
            seal_to_caller,
            request_id: Vec::new(),
        };
        let answer = self
            .client
            .unary(CallKind::Read, &request, |ch, request| async move {
                KvClient::new(ch).get(request).await
            })
            .await?;
        Ok(answer.into_inner())
    }

    /// Changes some fields of the latest version, making a new version.
    pub async fn patch(&self, path: &str, patch: Patch) -> Result<VersionInfo> {
        let mut request = pb::PatchRequest {
            mount: self.mount.clone(),
            path: path.to_string(),
            set: patch.set.0.clone().into_iter().collect(),
            remove: patch.remove.clone(),
            cas: patch.cas,
            request_id: Vec::new(),
        };
        let answer = self
            .client
            .unary(
                CallKind::IdempotentWrite,
                &request,
                |ch, request| async move { KvClient::new(ch).patch(request).await },
            )
            .await;
        request.set.values_mut().for_each(|v| v.zeroize());
        version_of(answer?.into_inner().version)
    }

    async fn versions(&self, op: VersionsOp, path: &str, versions: &[u64]) -> Result<Vec<u64>> {
        let request = pb::VersionsRequest {
            mount: self.mount.clone(),
            path: path.to_string(),
            versions: versions.to_vec(),
            request_id: Vec::new(),
        };
        let answer = self
            .client
            .unary(
                CallKind::IdempotentWrite,
                &request,
                |ch, request| async move {
                    let mut kv = KvClient::new(ch);
                    match op {
                        VersionsOp::Delete => kv.delete(request).await,
                        VersionsOp::Undelete => kv.undelete(request).await,
                        VersionsOp::Destroy => kv.destroy(request).await,
                    }
                },
            )
            .await?;
        Ok(answer.into_inner().changed)
    }

    /// Soft-deletes `versions` (none: the latest). Returns the versions changed.
    pub async fn delete(&self, path: &str, versions: &[u64]) -> Result<Vec<u64>> {
        self.versions(VersionsOp::Delete, path, versions).await
    }

    /// Restores soft-deleted versions. Returns the versions changed.
    pub async fn undelete(&self, path: &str, versions: &[u64]) -> Result<Vec<u64>> {
        self.versions(VersionsOp::Undelete, path, versions).await
    }

    /// Removes the data of versions for good. Returns the versions changed.
    pub async fn destroy(&self, path: &str, versions: &[u64]) -> Result<Vec<u64>> {
        self.versions(VersionsOp::Destroy, path, versions).await
    }

    /// A secret's metadata and the state of each kept version.
    pub async fn read_metadata(&self, path: &str) -> Result<Metadata> {
        let request = pb::ReadMetadataRequest {
            mount: self.mount.clone(),
            path: path.to_string(),
            consistency: consistency(false),
            request_id: Vec::new(),
        };
        let answer = self
            .client
            .unary(CallKind::Read, &request, |ch, request| async move {
                KvClient::new(ch).read_metadata(request).await
            })
            .await?;
        Ok(answer.into_inner())
    }

    /// Changes a secret's settings (creating its metadata if it has no version yet).
    pub async fn write_metadata(&self, path: &str, update: MetadataUpdate) -> Result<Metadata> {
        let replace = update.custom_metadata.is_some();
        let request = pb::WriteMetadataRequest {
            mount: self.mount.clone(),
            path: path.to_string(),
            max_versions: update.max_versions,
            cas_required: update.cas_required,
            delete_version_after_ms: update
                .delete_version_after
                .map(|d| d.as_millis().try_into().unwrap_or(u64::MAX)),
            custom_metadata: update.custom_metadata.unwrap_or_default(),
            replace_custom_metadata: replace,
            request_id: Vec::new(),
        };
        let answer = self
            .client
            .unary(
                CallKind::IdempotentWrite,
                &request,
                |ch, request| async move { KvClient::new(ch).write_metadata(request).await },
            )
            .await?;
        Ok(answer.into_inner())
    }

    /// Removes a secret with every version. Returns false when there was none.
    pub async fn delete_metadata(&self, path: &str) -> Result<bool> {
        let request = pb::DeleteMetadataRequest {
            mount: self.mount.clone(),
            path: path.to_string(),
            request_id: Vec::new(),
        };
        let answer = self
            .client
            .unary(
                CallKind::IdempotentWrite,
                &request,
                |ch, request| async move { KvClient::new(ch).delete_metadata(request).await },
            )
            .await?;
        Ok(answer.into_inner().deleted)
    }

    /// Every name directly under the folder `prefix` (`""` or ending in `/`), following the
    /// pages; folders end in `/`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let mut names: Vec<String> = Vec::new();
        loop {
            let request = pb::ListRequest {
                mount: self.mount.clone(),
                prefix: prefix.to_string(),
                start_after: names.last().cloned().unwrap_or_default(),
                limit: 1000,
                consistency: consistency(false),
                request_id: Vec::new(),
            };
            let page = self
                .client
                .unary(CallKind::Read, &request, |ch, request| async move {
                    KvClient::new(ch).list(request).await
                })
                .await?
                .into_inner();
            let empty = page.names.is_empty();
            names.extend(page.names);
            if !page.more || empty {
                return Ok(names);
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum VersionsOp {
    Delete,
    Undelete,
    Destroy,
}

impl<K: Into<String>, V: Into<String>, const N: usize> From<[(K, V); N]> for SecretMap {
    fn from(pairs: [(K, V); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl From<BTreeMap<String, String>> for SecretMap {
    fn from(map: BTreeMap<String, String>) -> Self {
        SecretMap(map)
    }
}

/// How to enable a kv mount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// Versions kept per secret unless the secret says otherwise (0: 10).
    pub max_versions: u32,
    /// Every write must give a check-and-set version.
    pub cas_required: bool,
    /// Versions expire this long after they were written (zero: never).
    pub delete_version_after: Duration,
    /// Free text.
    pub description: String,
}

/// Secrets engine mounts: `client.mounts()`.
#[derive(Debug, Clone)]
pub struct Mounts {
    client: Client,
}

impl Mounts {
    pub(crate) fn new(client: Client) -> Mounts {
        Mounts { client }
    }

    /// Enables a kv engine at `name` (letters, digits, `-` and `_`).
    pub async fn enable(&self, name: &str, options: MountOptions) -> Result<MountInfo> {
        let request = pb::EnableRequest {
            path: name.to_string(),
            r#type: "kv".into(),
            max_versions: options.max_versions,
            cas_required: options.cas_required,
            delete_version_after_ms: options
                .delete_version_after
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
            description: options.description,
        };
        let answer = self
            .client
            .unary(CallKind::Write, &request, |ch, request| async move {
                MountsClient::new(ch).enable(request).await
            })
            .await?;
        Ok(answer.into_inner())
    }

    /// Disables a mount, removing its secrets. Returns how many stored records (each secret's
    /// metadata and versions) were removed.
    pub async fn disable(&self, name: &str) -> Result<u64> {
        let request = pb::DisableRequest {
            path: name.to_string(),
        };
        let answer = self
            .client
            .unary(CallKind::Write, &request, |ch, request| async move {
                MountsClient::new(ch).disable(request).await
            })
            .await?;
        Ok(answer.into_inner().records_removed)
    }

    /// Every mount.
    pub async fn list(&self) -> Result<Vec<MountInfo>> {
        crate::paging::all_pages(
            |start_after| {
                let request = pb::ListMountsRequest {
                    start_after,
                    limit: 0,
                };
                async move {
                    let r = self
                        .client
                        .unary(CallKind::Read, &request, |ch, request| async move {
                            MountsClient::new(ch).list(request).await
                        })
                        .await?
                        .into_inner();
                    Ok((r.mounts, r.more))
                }
            },
            |m: &MountInfo| m.path.clone(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_never_printed() {
        let m = SecretMap::from([("user", "app"), ("pass", "hunter2")]);
        let shown = format!("{m:?}");
        assert!(
            shown.contains("pass") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert_eq!(m.get("user"), Some("app"));
        assert_eq!(
            m.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["pass", "user"]
        );
    }

    #[test]
    fn a_protobuf_map_is_moved_into_the_secret_map() {
        let mut proto: HashMap<String, String> = [("k".to_string(), "v".to_string())].into();
        let m = take_secret(&mut proto);
        assert!(proto.is_empty(), "nothing left behind in the message");
        assert_eq!(m.get("k"), Some("v"));
    }
}
