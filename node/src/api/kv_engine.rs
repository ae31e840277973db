//! The kv secrets engine (`coffer.kv.v1.Kv`) and its mounts (`coffer.kv.v1.Mounts`): Vault KV v2
//! semantics over the transactional store. The model is in [`crate::kv_engine`]; here each
//! operation reads a secret's metadata, decides, and writes the new metadata together with the
//! version data it adds or removes in one transaction that holds only if the metadata did not
//! change meanwhile (else it reads again, after a read index, and decides again).

use std::collections::BTreeMap;

use coffer_api::kv::v1 as kvpb;
use coffer_api::kv::v1::kv_server::Kv as KvEngine;
use coffer_api::kv::v1::mounts_server::Mounts;
use prost::Message as _;

use super::*;
use crate::kv_engine::{self as engine, Mount, Refusal, SecretMetadata, VersionChange};

/// How often a write decides again after its metadata changed under it (writes to one secret
/// through other nodes), backing off a random while longer each time.
const MAX_ATTEMPTS: u64 = 24;
/// What a sealed response is encrypted for (HPKE `info`).
pub const SEALED_RESPONSE_INFO: &[u8] = b"coffer sealed response v1";
/// Mounts are managed at this path and the mount name (`list` on the path itself).
pub const MOUNTS: &str = "sys/mounts";

fn refusal(r: Refusal) -> Status {
    match r {
        Refusal::Invalid(m) => Status::invalid_argument(m),
        Refusal::NotFound(m) => Status::not_found(m),
        Refusal::Precondition(m) => Status::failed_precondition(m),
    }
}

/// The policy path of an operation: `MOUNT/KIND/PATH` (Vault's KV v2 layout).
fn acl_path(mount: &str, kind: &str, path: &str) -> String {
    format!("{mount}/{kind}/{path}")
}

/// The request id of attempt `attempt` of a write: the client's own for the first, then ids
/// derived from it, so that each attempt is applied at most once and a retried request meets
/// the same attempts again.
fn attempt_id(request_id: &[u8], attempt: u64) -> Vec<u8> {
    if attempt == 0 || request_id.is_empty() {
        return request_id.to_vec();
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"coffer kv attempt");
    ctx.update(request_id);
    ctx.update(&attempt.to_be_bytes());
    ctx.finish().as_ref()[..16].to_vec()
}

/// Waits before attempt `attempt` (from the second retry on): a random time up to 2^attempt
/// ms, at most 100 ms, so that writers to one secret through different nodes stop colliding.
async fn contention_backoff(attempt: u64) {
    if attempt >= 2 {
        let most = 1u64 << attempt.min(7);
        let ms = rand::random_range(0..most.min(100));
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

fn version_info(m: &SecretMetadata, mount: &Mount, number: u64, now: u64) -> kvpb::VersionInfo {
    match m.versions.get(&number) {
        Some(v) => kvpb::VersionInfo {
            version: number,
            created_ms: v.created_ms,
            deleted_ms: m.deleted_at(mount, v, now),
            destroyed: v.destroyed,
        },
        None => kvpb::VersionInfo {
            version: number,
            ..Default::default()
        },
    }
}

/// The outcome of a metadata change: what to write besides the metadata, and what to answer.
struct Change<T> {
    /// Operations on version data in the same transaction.
    ops: Vec<Op>,
    answer: T,
}

impl Api {
    /// The turn of writes to `path` of `mount` on this node (see `Api::secret_locks`).
    async fn secret_turn(&self, mount: &str, path: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let digest =
            ring::digest::digest(&ring::digest::SHA256, &engine::metadata_key(mount, path));
        let d = digest.as_ref();
        let stripe = usize::from(u16::from_be_bytes([d[0], d[1]])) % self.secret_locks.len();
        self.secret_locks[stripe].lock().await
    }

    fn kv_header(&self, request_id: &[u8], revision: u64) -> Option<kvpb::ResponseHeader> {
        Some(kvpb::ResponseHeader {
            request_id: request_id.to_vec(),
            node_id: self.node.id(),
            revision,
        })
    }

    /// A mount's configuration; an unknown mount is looked up again after a read index.
    async fn kv_mount(&self, keyring: &Keyring, name: &str) -> Result<Mount, Status> {
        engine::check_mount_name(name).map_err(refusal)?;
        if name == engine::BUILTIN_MOUNT {
            return Ok(Mount::builtin());
        }
        let key = engine::mount_key(name);
        if let Some((m, _)) = self.read_record::<Mount>(keyring, &key)? {
            return Ok(m);
        }
        self.node.linearize().await.map_err(raft_status)?;
        match self.read_record::<Mount>(keyring, &key)? {
            Some((m, _)) => Ok(m),
            None => Err(Status::not_found(format!(
                "no secrets engine is mounted at {name:?}; `coffer secrets list` shows the mounts, `coffer secrets enable kv --path {name}` adds one"
            ))),
        }
    }

    /// Checks a request's mount and path and returns the mount's configuration.
    async fn kv_target(&self, keyring: &Keyring, mount: &str, path: &str) -> Result<Mount, Status> {
        engine::check_path(path).map_err(refusal)?;
        self.kv_mount(keyring, mount).await
    }

    fn check_secret_size(&self, data: &BTreeMap<String, String>) -> Result<(), Status> {
        engine::check_fields("the secret", data).map_err(refusal)?;
        let bytes: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > self.max_value_bytes {
            return Err(Status::invalid_argument(format!(
                "the fields are {bytes} bytes; the limit is {} bytes (server option --max-value-bytes)",
                self.max_value_bytes
            )));
        }
        Ok(())
    }

    /// Writes a new version of `path`: `make` gives its data from the metadata (and the
    /// current data, for a patch). Returns the new version and the metadata after the write.
    #[allow(clippy::too_many_arguments)]
    async fn write_version(
        &self,
        grant: &Grant,
        keyring: &Keyring,
        (mount_name, mount): (&str, &Mount),
        path: &str,
        request_id: &[u8],
        cas: Option<u64>,
        make: impl Fn(
            &SecretMetadata,
            Option<BTreeMap<String, String>>,
        ) -> Result<BTreeMap<String, String>, Status>,
        needs_current: bool,
    ) -> Result<(u64, SecretMetadata, u64), Status> {
        parse_request_id(request_id)?;
        let data_path = acl_path(mount_name, "data", path);
        let meta_key = engine::metadata_key(mount_name, path);
        let _turn = self.secret_turn(mount_name, path).await;
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                contention_backoff(attempt).await;
                self.node.linearize().await.map_err(raft_status)?;
            }
            // The metadata and (for a patch) the current data, from one state.
            let view = self.node.store().read().map_err(storage_status)?;
            let read = self.read_record_in::<SecretMetadata>(&view, keyring, &meta_key)?;
            let (mut meta, rev) = match read {
                Some((m, rev)) => (m, Some(rev)),
                None => (SecretMetadata::default(), None),
            };
            if let Some(done) = meta.written_by(request_id) {
                let revision = view.revision().map_err(storage_status)?;
                return Ok((done, meta, revision));
            }
            // As in Vault: `create` writes a secret that does not exist, `update` one that
            // does. A patch needs `patch` (checked by the caller) and an existing secret.
            if !needs_current {
                let capability = if rev.is_some() {
                    Capability::Update
                } else {
                    Capability::Create
                };
                if let Err(denied) = allow(grant, &data_path, capability) {
                    if attempt == 0 {
                        continue; // decide again on the leader's latest state
                    }
                    return Err(denied);
                }
            }
            let now = auth::now_ms();
            let current = if needs_current {
                match meta.readable(mount, path, 0, now) {
                    Ok(n) => Some(self.version_data(&view, keyring, mount_name, path, n)?),
                    Err(_) if attempt == 0 => continue,
                    Err(Refusal::NotFound(m)) => {
                        return Err(Status::not_found(format!("{m}; nothing to patch")));
                    }
                    Err(other) => return Err(refusal(other)),
                }
            } else {
                None
            };
            drop(view);
            let effective_cas = if needs_current {
                cas.or(Some(meta.current))
            } else {
                cas
            };
            if let Err(r) = meta.check_cas(mount, path, effective_cas) {
                if attempt == 0 {
                    continue;
                }
                return Err(refusal(r));
            }
            let data = make(&meta, current)?;
            self.check_secret_size(&data)?;
            let (version, removed) = meta.add_version(mount, now, request_id);
            let version_key = engine::version_key(mount_name, path, version);
            let plain = postcard::to_allocvec(&data)
                .map_err(|e| Status::internal(format!("encode: {e}")))?;
            let mut success = vec![
                Op::Put {
                    key: meta_key.clone(),
                    value: self.sealed_record(keyring, &meta_key, &meta)?,
                },
                Op::Put {
                    value: self.encrypt(keyring, &version_key, &plain)?,
                    key: version_key,
                },
            ];
            success.extend(removed.iter().map(|v| Op::Delete {
                key: engine::version_key(mount_name, path, *v),
            }));
            let compare = vec![match rev {
                Some(rev) => Compare::ModRevision(meta_key.clone(), rev),
                None => Compare::Absent(meta_key.clone()),
            }];
            let txn = Txn {
                compare,
                success,
                failure: Vec::new(),
            };
            let w = self.write(txn, &attempt_id(request_id, attempt)).await?;
            if !w.result.succeeded {
                continue;
            }
            // A retried request whose attempt was applied before: the store answers from its
            // record of request ids, which keeps no values. Find the version it made.
            let replayed = matches!(
                w.result.results.first(),
                Some(OpResult::Put { prev: Some(e) }) if e.value.is_empty()
            );
            if replayed {
                self.node.linearize().await.map_err(raft_status)?;
                if let Some((meta, _)) = self.read_record::<SecretMetadata>(keyring, &meta_key)?
                    && let Some(done) = meta.written_by(request_id)
                {
                    return Ok((done, meta, w.result.revision));
                }
                return Err(Status::failed_precondition(
                    "this request was applied before, and the version it wrote is no longer kept",
                ));
            }
            return Ok((version, meta, w.result.revision));
        }
        Err(Status::aborted(format!(
            "secret {path:?} kept changing while this write was decided; try again"
        )))
    }

    /// The data of one version (which the metadata read in the same `view` says is kept).
    fn version_data(
        &self,
        view: &ReadView,
        keyring: &Keyring,
        mount: &str,
        path: &str,
        version: u64,
    ) -> Result<BTreeMap<String, String>, Status> {
        let key = engine::version_key(mount, path, version);
        let entry = view.get(&key).map_err(storage_status)?.ok_or_else(|| {
            Status::data_loss(format!(
                "version {version} of {path:?} is listed in its metadata but its data is missing"
            ))
        })?;
        let plain = self.decrypt(keyring, &key, &entry.value)?;
        postcard::from_bytes(&plain).map_err(|e| {
            Status::data_loss(format!("version {version} of {path:?} is corrupt: {e}"))
        })
    }

    /// Changes a secret's metadata with `change` (and writes its extra operations) in one
    /// transaction; decides again if the metadata changed meanwhile. `create` allows making
    /// metadata for a secret that has none.
    async fn change_metadata<T>(
        &self,
        keyring: &Keyring,
        mount_name: &str,
        path: &str,
        request_id: &[u8],
        create: bool,
        change: impl Fn(&mut SecretMetadata, u64) -> Result<Change<T>, Status>,
    ) -> Result<(T, SecretMetadata, u64), Status> {
        parse_request_id(request_id)?;
        let meta_key = engine::metadata_key(mount_name, path);
        let _turn = self.secret_turn(mount_name, path).await;
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                contention_backoff(attempt).await;
                self.node.linearize().await.map_err(raft_status)?;
            }
            let (mut meta, rev) = match self.read_record::<SecretMetadata>(keyring, &meta_key)? {
                Some((m, rev)) => (m, Some(rev)),
                None if create => (SecretMetadata::default(), None),
                None if attempt == 0 => continue,
                None => {
                    return Err(Status::not_found(format!(
                        "no secret {path:?} in mount {mount_name:?}"
                    )));
                }
            };
            let now = auth::now_ms();
            let Change { ops, answer } = change(&mut meta, now)?;
            if meta.created_ms == 0 {
                meta.created_ms = now;
            }
            meta.updated_ms = now;
            let mut success = vec![Op::Put {
                key: meta_key.clone(),
                value: self.sealed_record(keyring, &meta_key, &meta)?,
            }];
            success.extend(ops);
            let txn = Txn {
                compare: vec![match rev {
                    Some(rev) => Compare::ModRevision(meta_key.clone(), rev),
                    None => Compare::Absent(meta_key.clone()),
                }],
                success,
                failure: Vec::new(),
            };
            let w = self.write(txn, &attempt_id(request_id, attempt)).await?;
            if w.result.succeeded {
                return Ok((answer, meta, w.result.revision));
            }
        }
        Err(Status::aborted(format!(
            "secret {path:?} kept changing while this change was decided; try again"
        )))
    }

    /// Soft delete, undelete or destroy of versions.
    async fn change_versions(
        &self,
        req: Request<kvpb::VersionsRequest>,
        method: &str,
        what: VersionChange,
    ) -> Result<Response<kvpb::VersionsResponse>, Status> {
        self.timed(method, async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            let keyring = self.keyring()?;
            let mount = self.kv_target(&keyring, &r.mount, &r.path).await?;
            let (path, capability) = match what {
                VersionChange::Delete if r.versions.is_empty() => {
                    (acl_path(&r.mount, "data", &r.path), Capability::Delete)
                }
                VersionChange::Delete => {
                    (acl_path(&r.mount, "delete", &r.path), Capability::Update)
                }
                VersionChange::Undelete => {
                    (acl_path(&r.mount, "undelete", &r.path), Capability::Update)
                }
                VersionChange::Destroy => {
                    (acl_path(&r.mount, "destroy", &r.path), Capability::Update)
                }
            };
            self.permit(grant, |g| allow(g, &path, capability)).await?;
            let (changed, _, revision) = self
                .change_metadata(
                    &keyring,
                    &r.mount,
                    &r.path,
                    &r.request_id,
                    false,
                    |meta, now| {
                        let changed = meta
                            .change_versions(&mount, &r.path, &r.versions, what, now)
                            .map_err(refusal)?;
                        // Destroyed versions' data goes in the same transaction.
                        let ops = match what {
                            VersionChange::Destroy => changed
                                .iter()
                                .map(|n| Op::Delete {
                                    key: engine::version_key(&r.mount, &r.path, *n),
                                })
                                .collect(),
                            _ => Vec::new(),
                        };
                        Ok(Change {
                            ops,
                            answer: changed,
                        })
                    },
                )
                .await?;
            Ok(kvpb::VersionsResponse {
                header: self.kv_header(&r.request_id, revision),
                changed,
            })
        })
        .await
    }

    fn metadata_answer(
        &self,
        path: String,
        meta: &SecretMetadata,
        mount: &Mount,
        request_id: &[u8],
        revision: u64,
    ) -> kvpb::Metadata {
        let now = auth::now_ms();
        kvpb::Metadata {
            header: self.kv_header(request_id, revision),
            path,
            created_ms: meta.created_ms,
            updated_ms: meta.updated_ms,
            current_version: meta.current,
            oldest_version: meta.oldest(),
            max_versions: meta.max_versions,
            effective_max_versions: meta.effective_max_versions(mount),
            cas_required: meta.cas_required,
            delete_version_after_ms: meta.delete_version_after_ms,
            custom_metadata: meta.custom.clone().into_iter().collect(),
            versions: meta
                .versions
                .keys()
                .map(|&n| version_info(meta, mount, n, now))
                .collect(),
        }
    }
}

#[tonic::async_trait]
impl KvEngine for Api {
    async fn put(
        &self,
        req: Request<kvpb::PutRequest>,
    ) -> Result<Response<kvpb::WriteResponse>, Status> {
        self.timed("KvPut", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            let keyring = self.keyring()?;
            let mount = self.kv_target(&keyring, &r.mount, &r.path).await?;
            let data: BTreeMap<String, String> = r.data.into_iter().collect();
            self.check_secret_size(&data)?;
            let (version, meta, revision) = self
                .write_version(
                    &grant,
                    &keyring,
                    (&r.mount, &mount),
                    &r.path,
                    &r.request_id,
                    r.cas,
                    |_, _| Ok(data.clone()),
                    false,
                )
                .await?;
            Ok(kvpb::WriteResponse {
                header: self.kv_header(&r.request_id, revision),
                version: Some(version_info(&meta, &mount, version, auth::now_ms())),
            })
        })
        .await
    }

    async fn patch(
        &self,
        req: Request<kvpb::PatchRequest>,
    ) -> Result<Response<kvpb::WriteResponse>, Status> {
        self.timed("KvPatch", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            let keyring = self.keyring()?;
            let mount = self.kv_target(&keyring, &r.mount, &r.path).await?;
            if r.set.is_empty() && r.remove.is_empty() {
                return Err(Status::invalid_argument(
                    "a patch sets or removes at least one field",
                ));
            }
            let path = acl_path(&r.mount, "data", &r.path);
            let grant = self
                .permit(grant, |g| allow(g, &path, Capability::Patch))
                .await?;
            let (version, meta, revision) = self
                .write_version(
                    &grant,
                    &keyring,
                    (&r.mount, &mount),
                    &r.path,
                    &r.request_id,
                    r.cas,
                    |_, current| {
                        let mut data = current.unwrap_or_default();
                        for k in &r.remove {
                            data.remove(k);
                        }
                        data.extend(r.set.iter().map(|(k, v)| (k.clone(), v.clone())));
                        Ok(data)
                    },
                    true,
                )
                .await?;
            Ok(kvpb::WriteResponse {
                header: self.kv_header(&r.request_id, revision),
                version: Some(version_info(&meta, &mount, version, auth::now_ms())),
            })
        })
        .await
    }

    async fn get(
        &self,
        req: Request<kvpb::GetRequest>,
    ) -> Result<Response<kvpb::GetResponse>, Status> {
        self.timed("KvGet", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            let keyring = self.keyring()?;
            let mount = self.kv_target(&keyring, &r.mount, &r.path).await?;
            let path = acl_path(&r.mount, "data", &r.path);
            let grant = self.permit(grant, |g| allow(g, &path, Capability::Read)).await?;
            self.read_point(r.consistency).await?;
            allow(&*self.recheck(&grant)?, &path, Capability::Read)?;
            // The metadata and the version's data from one state (a write may prune or
            // destroy the version right after).
            let view = self.node.store().read().map_err(storage_status)?;
            let revision = view.revision().map_err(storage_status)?;
            let meta_key = engine::metadata_key(&r.mount, &r.path);
            let Some((meta, _)) = self.read_record_in::<SecretMetadata>(&view, &keyring, &meta_key)?
            else {
                return Err(Status::not_found(format!(
                    "no secret {:?} in mount {:?}",
                    r.path, r.mount
                )));
            };
            let now = auth::now_ms();
            let number = meta
                .readable(&mount, &r.path, r.version, now)
                .map_err(refusal)?;
            let data = self.version_data(&view, &keyring, &r.mount, &r.path, number)?;
            drop(view);
            let version = version_info(&meta, &mount, number, now);
            let custom_metadata = meta.custom.into_iter().collect();
            if r.seal_to_caller {
                let key = grant.identity_key.as_deref().ok_or_else(|| {
                    Status::failed_precondition(
                        "a sealed response is encrypted to the caller's registered key; this session came from a Kubernetes login, which has none: log in with a key",
                    )
                })?;
                let key = PublicKey::from_bytes(key)
                    .map_err(|e| Status::internal(format!("the caller's key: {e:#}")))?;
                let sealed = kvpb::SealedData {
                    data: data.into_iter().collect(),
                    mount: r.mount.clone(),
                    path: r.path.clone(),
                    version: number,
                };
                let plain = zeroize::Zeroizing::new(sealed.encode_to_vec());
                let sealed_data = key
                    .seal(SEALED_RESPONSE_INFO, &plain)
                    .map_err(|e| Status::internal(format!("sealing the response: {e:#}")))?;
                return Ok(kvpb::GetResponse {
                    header: self.kv_header(&r.request_id, revision),
                    data: Default::default(),
                    version: Some(version),
                    sealed_data,
                    custom_metadata,
                });
            }
            Ok(kvpb::GetResponse {
                header: self.kv_header(&r.request_id, revision),
                data: data.into_iter().collect(),
                version: Some(version),
                sealed_data: Vec::new(),
                custom_metadata,
            })
        })
        .await
    }

    async fn delete(
        &self,
        req: Request<kvpb::VersionsRequest>,
    ) -> Result<Response<kvpb::VersionsResponse>, Status> {
        self.change_versions(req, "KvDelete", VersionChange::Delete)
            .await
    }

    async fn undelete(
        &self,
        req: Request<kvpb::VersionsRequest>,
    ) -> Result<Response<kvpb::VersionsResponse>, Status> {
        self.change_versions(req, "KvUndelete", VersionChange::Undelete)
            .await
    }

    async fn destroy(
        &self,
        req: Request<kvpb::VersionsRequest>,
    ) -> Result<Response<kvpb::VersionsResponse>, Status> {
        self.change_versions(req, "KvDestroy", VersionChange::Destroy)
            .await
    }

    async fn read_metadata(
        &self,
        req: Request<kvpb::ReadMetadataRequest>,
    ) -> Result<Response<kvpb::Metadata>, Status> {
        self.timed("KvReadMetadata", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            let keyring = self.keyring()?;
            let mount = self.kv_target(&keyring, &r.mount, &r.path).await?;
            let path = acl_path(&r.mount, "metadata", &r.path);
            let grant = self
                .permit(grant, |g| allow(g, &path, Capability::Read))
                .await?;
            self.read_point(r.consistency).await?;
            allow(&*self.recheck(&grant)?, &path, Capability::Read)?;
            let revision = self.revision_now()?;
            let (meta, _) = self
                .read_record::<SecretMetadata>(&keyring, &engine::metadata_key(&r.mount, &r.path))?
                .ok_or_else(|| {
                    Status::not_found(format!("no secret {:?} in mount {:?}", r.path, r.mount))
                })?;
            Ok(self.metadata_answer(r.path, &meta, &mount, &r.request_id, revision))
        })
        .await
    }

    async fn write_metadata(
        &self,
        req: Request<kvpb::WriteMetadataRequest>,
    ) -> Result<Response<kvpb::Metadata>, Status> {
        self.timed("KvWriteMetadata", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            let keyring = self.keyring()?;
            let mount = self.kv_target(&keyring, &r.mount, &r.path).await?;
            let custom: BTreeMap<String, String> = r.custom_metadata.into_iter().collect();
            engine::check_fields("the custom metadata", &custom).map_err(refusal)?;
            self.check_secret_size(&custom)?;
            let path = acl_path(&r.mount, "metadata", &r.path);
            let grant = self
                .permit(grant, |g| {
                    allow(g, &path, Capability::Update)
                        .or_else(|_| allow(g, &path, Capability::Create))
                })
                .await?;
            let exists = self
                .read_record::<SecretMetadata>(&keyring, &engine::metadata_key(&r.mount, &r.path))?
                .is_some();
            allow(
                &grant,
                &path,
                if exists {
                    Capability::Update
                } else {
                    Capability::Create
                },
            )?;
            let (_, meta, revision) = self
                .change_metadata(
                    &keyring,
                    &r.mount,
                    &r.path,
                    &r.request_id,
                    true,
                    |meta, _| {
                        if let Some(n) = r.max_versions {
                            meta.max_versions = n;
                        }
                        if let Some(c) = r.cas_required {
                            meta.cas_required = c;
                        }
                        if let Some(d) = r.delete_version_after_ms {
                            meta.delete_version_after_ms = d;
                        }
                        if r.replace_custom_metadata {
                            meta.custom = custom.clone();
                        } else {
                            meta.custom.extend(custom.clone());
                        }
                        let ops = meta
                            .prune(&mount)
                            .into_iter()
                            .map(|v| Op::Delete {
                                key: engine::version_key(&r.mount, &r.path, v),
                            })
                            .collect();
                        Ok(Change { ops, answer: () })
                    },
                )
                .await?;
            Ok(self.metadata_answer(r.path, &meta, &mount, &r.request_id, revision))
        })
        .await
    }

    async fn delete_metadata(
        &self,
        req: Request<kvpb::DeleteMetadataRequest>,
    ) -> Result<Response<kvpb::DeleteMetadataResponse>, Status> {
        self.timed("KvDeleteMetadata", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            let keyring = self.keyring()?;
            self.kv_target(&keyring, &r.mount, &r.path).await?;
            let path = acl_path(&r.mount, "metadata", &r.path);
            self.permit(grant, |g| allow(g, &path, Capability::Delete))
                .await?;
            let txn = Txn::ops(vec![
                Op::Delete {
                    key: engine::metadata_key(&r.mount, &r.path),
                },
                Op::DeletePrefix {
                    prefix: engine::versions_prefix(&r.mount, &r.path),
                },
            ]);
            let w = self.write(txn, &r.request_id).await?;
            let deleted = matches!(
                w.result.results.first(),
                Some(OpResult::Delete { prev: Some(_) })
            );
            Ok(kvpb::DeleteMetadataResponse {
                header: self.kv_header(&r.request_id, w.result.revision),
                deleted,
            })
        })
        .await
    }

    async fn list(
        &self,
        req: Request<kvpb::ListRequest>,
    ) -> Result<Response<kvpb::ListResponse>, Status> {
        self.timed("KvList", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            let keyring = self.keyring()?;
            engine::check_folder(&r.prefix).map_err(refusal)?;
            self.kv_mount(&keyring, &r.mount).await?;
            let limit = match r.limit {
                0 => 100,
                n if n > 1000 => {
                    return Err(Status::invalid_argument(format!(
                        "limit {n} is above the maximum page size of 1000"
                    )));
                }
                n => n as usize,
            };
            let path = acl_path(&r.mount, "metadata", &r.prefix);
            let grant = self
                .permit(grant, |g| allow(g, &path, Capability::List))
                .await?;
            self.read_point(r.consistency).await?;
            allow(&*self.recheck(&grant)?, &path, Capability::List)?;
            let view = self.node.store().read().map_err(storage_status)?;
            let revision = view.revision().map_err(storage_status)?;
            let prefix = engine::metadata_key(&r.mount, &r.prefix);
            // Past a folder: its name then a byte no UTF-8 path has.
            let after_name = |name: &str| {
                let mut k = engine::metadata_key(&r.mount, &format!("{}{name}", r.prefix));
                if name.ends_with('/') {
                    k.push(0xff);
                }
                k
            };
            let mut after = (!r.start_after.is_empty()).then(|| after_name(&r.start_after));
            let mut names: Vec<String> = Vec::new();
            let mut more = false;
            'pages: loop {
                let (page, page_more) = view
                    .list(&prefix, after.as_deref(), 256)
                    .map_err(storage_status)?;
                if page.is_empty() {
                    break;
                }
                for e in &page {
                    let rel = String::from_utf8_lossy(&e.key[prefix.len()..]).into_owned();
                    let name = engine::fold_names([rel.as_str()]).remove(0);
                    if names.len() == limit {
                        more = true;
                        break 'pages;
                    }
                    let folder = name.ends_with('/');
                    after = Some(if folder {
                        after_name(&name)
                    } else {
                        e.key.clone()
                    });
                    names.push(name);
                    if folder {
                        continue 'pages; // skip the rest of the folder
                    }
                }
                if !page_more {
                    break;
                }
            }
            Ok(kvpb::ListResponse {
                header: self.kv_header(&r.request_id, revision),
                names,
                more,
            })
        })
        .await
    }
}

fn mount_info(name: &str, m: &Mount) -> kvpb::MountInfo {
    kvpb::MountInfo {
        path: name.to_string(),
        r#type: m.kind.clone(),
        max_versions: if m.max_versions == 0 {
            engine::DEFAULT_MAX_VERSIONS
        } else {
            m.max_versions
        },
        cas_required: m.cas_required,
        delete_version_after_ms: m.delete_version_after_ms,
        description: m.description.clone(),
        builtin: name == engine::BUILTIN_MOUNT,
    }
}

#[tonic::async_trait]
impl Mounts for Api {
    async fn enable(
        &self,
        req: Request<kvpb::EnableRequest>,
    ) -> Result<Response<kvpb::MountInfo>, Status> {
        self.authorize(
            &req,
            &format!("{MOUNTS}/{}", req.get_ref().path),
            Capability::Update,
        )
        .await?;
        let r = req.into_inner();
        self.timed("MountEnable", async {
            engine::check_mount_name(&r.path).map_err(refusal)?;
            if r.r#type != "kv" {
                return Err(Status::invalid_argument(format!(
                    "unknown secrets engine type {:?}; Coffer has \"kv\" (wrapped data needs no mount)",
                    r.r#type
                )));
            }
            if r.path == engine::BUILTIN_MOUNT {
                return Err(Status::already_exists("the `secret` mount is built in"));
            }
            let keyring = self.keyring()?;
            let mount = Mount {
                kind: r.r#type,
                max_versions: r.max_versions,
                cas_required: r.cas_required,
                delete_version_after_ms: r.delete_version_after_ms,
                description: r.description,
            };
            let key = engine::mount_key(&r.path);
            let txn = Txn {
                compare: vec![Compare::Absent(key.clone())],
                success: vec![Op::Put {
                    value: self.sealed_record(&keyring, &key, &mount)?,
                    key,
                }],
                failure: Vec::new(),
            };
            if !self.write(txn, &[]).await?.result.succeeded {
                return Err(Status::already_exists(format!(
                    "a secrets engine is already mounted at {:?}",
                    r.path
                )));
            }
            Ok(mount_info(&r.path, &mount))
        })
        .await
    }

    async fn disable(
        &self,
        req: Request<kvpb::DisableRequest>,
    ) -> Result<Response<kvpb::DisableResponse>, Status> {
        self.authorize(
            &req,
            &format!("{MOUNTS}/{}", req.get_ref().path),
            Capability::Delete,
        )
        .await?;
        let r = req.into_inner();
        self.timed("MountDisable", async {
            engine::check_mount_name(&r.path).map_err(refusal)?;
            if r.path == engine::BUILTIN_MOUNT {
                return Err(Status::failed_precondition(
                    "the built-in `secret` mount cannot be disabled; delete its secrets instead",
                ));
            }
            let key = engine::mount_key(&r.path);
            let txn = Txn {
                compare: vec![Compare::Exists(key.clone())],
                success: vec![
                    Op::Delete { key },
                    Op::DeletePrefix {
                        prefix: engine::mount_data_prefix(&r.path),
                    },
                ],
                failure: Vec::new(),
            };
            let w = self.write(txn, &[]).await?;
            if !w.result.succeeded {
                return Err(Status::not_found(format!(
                    "no secrets engine is mounted at {:?}",
                    r.path
                )));
            }
            let records_removed = match w.result.results.get(1) {
                Some(OpResult::DeletePrefix { deleted }) => *deleted,
                _ => 0,
            };
            Ok(kvpb::DisableResponse { records_removed })
        })
        .await
    }

    async fn list(
        &self,
        req: Request<kvpb::ListMountsRequest>,
    ) -> Result<Response<kvpb::ListMountsResponse>, Status> {
        self.authorize(&req, MOUNTS, Capability::List).await?;
        let r = req.into_inner();
        self.timed("MountList", async {
            let keyring = self.keyring()?;
            self.node.linearize().await.map_err(raft_status)?;
            let view = self.node.store().read().map_err(storage_status)?;
            let mut mounts = vec![mount_info(engine::BUILTIN_MOUNT, &Mount::builtin())];
            for e in entries_under(&view, engine::MOUNT_PREFIX, usize::MAX)? {
                let name =
                    String::from_utf8_lossy(&e.key[engine::MOUNT_PREFIX.len()..]).into_owned();
                let plain = self.decrypt(&keyring, &e.key, &e.value)?;
                let m: Mount = postcard::from_bytes(&plain).map_err(|err| {
                    Status::data_loss(format!("the mount {name:?} is corrupt: {err}"))
                })?;
                mounts.push(mount_info(&name, &m));
            }
            mounts.sort_by(|a, b| a.path.cmp(&b.path));
            let (mounts, more) = page(mounts, |m| &m.path, &r.start_after, r.limit)?;
            Ok(kvpb::ListMountsResponse { mounts, more })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_attempt_of_a_request_has_its_own_stable_id() {
        let id = [7u8; 16];
        assert_eq!(attempt_id(&id, 0), id.to_vec());
        let first = attempt_id(&id, 1);
        assert_eq!(first.len(), 16);
        assert_ne!(first, id.to_vec());
        assert_ne!(first, attempt_id(&id, 2));
        assert_eq!(first, attempt_id(&id, 1), "a retry meets the same attempts");
        assert!(attempt_id(&[], 3).is_empty(), "no id, no deduplication");
    }
}
