//! The public gRPC services (one versioned package each, `coffer.*.v1`), one submodule per
//! service; this module holds what they share: the [`Api`] state, the per-request
//! authentication and authorization (`caller`, `permit`, `authorize`), the paths each operation
//! is authorized at, and record helpers.
//!
//! Every value passes the encryption barrier here: it is encrypted with the active data key
//! (bound to its key path) before it is proposed to Raft, and decrypted after it is read. A
//! sealed or uninitialized node serves no data (FAILED_PRECONDITION says why and what to do).
//! The raw store API (`kv`) is the first client surface; the secrets engines will be put in
//! front of it, and retiring it touches only that submodule.

use std::sync::Arc;
use std::time::Instant;

use coffer_api::v1 as pb;
use coffer_api::v1::cluster_server::Cluster;
use coffer_api::v1::kv_server::Kv;
use coffer_raft::{Error as RaftError, Member, MembershipChange, RaftNode, Written};
use coffer_storage::{Command, Compare, KvEntry, Op, OpResult, ReadView, RequestId, Txn};
use tonic::{Request, Response, Status};

use crate::auth;
use crate::barrier::Keyring;
use crate::delegation;
use crate::identity;
use crate::keys::PublicKey;
use crate::kubernetes;
use crate::metrics::Metrics;
use crate::node_identity;
use crate::policy::{self, Capability};
use crate::seal::{
    Action, Operator, Refused, RekeyOutcome, RekeyProposal, RekeySubmission, Seal, Submission,
};
use crate::session::{self, Grant, Sessions};

mod autopilot;
mod cluster;
mod grants;
mod identities;
mod kubernetes_roles;
mod kv;
mod kv_engine;
mod login;
mod policies;
mod seal;
mod sessions;
mod settings;
mod snapshots;
mod wrap;

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;
/// Most operations in one transaction.
pub const MAX_TXN_OPS: usize = 128;
/// A list page ends once the values in it pass this many bytes (at least one key per page).
pub const MAX_PAGE_BYTES: usize = 4 << 20;

/// Shared state of the API services.
#[derive(Debug, Clone)]
pub struct Api {
    node: Arc<RaftNode>,
    metrics: Metrics,
    max_value_bytes: usize,
    cluster_name: String,
    seal: Arc<Seal>,
    logins: Arc<auth::RateLimit>,
    sessions: Arc<Sessions>,
    login: auth::LoginSettings,
    kubernetes: Arc<kubernetes::Validator>,
    /// Writes to one secret through this node take turns (striped by path), so that they do
    /// not keep invalidating each other's compare-and-swap.
    secret_locks: Arc<Vec<tokio::sync::Mutex<()>>>,
    /// Whether the raw store API (`coffer.raw.v1.Kv`) answers (`--raw-storage-endpoint`).
    raw_storage: bool,
    /// Autopilot's dead-member clean-up (off by default).
    autopilot: crate::config::Autopilot,
    /// Held while a snapshot restore runs on this node (one at a time).
    restoring: Arc<tokio::sync::Mutex<()>>,
}

impl Api {
    /// The API of `node`.
    pub fn new(
        node: Arc<RaftNode>,
        metrics: Metrics,
        max_value_bytes: usize,
        cluster_name: String,
        seal: Arc<Seal>,
        login: auth::LoginSettings,
        kubernetes: Arc<kubernetes::Validator>,
    ) -> Api {
        Api {
            node,
            metrics,
            max_value_bytes,
            cluster_name,
            seal,
            // Per source and node: 4 s worth at once, then the rate (default 20, then 5/s).
            logins: Arc::new(auth::RateLimit::new(
                login.rate_per_second.saturating_mul(4),
                login.rate_per_second,
            )),
            sessions: Arc::new(Sessions::default()),
            login,
            kubernetes,
            secret_locks: Arc::new((0..4096).map(|_| tokio::sync::Mutex::new(())).collect()),
            raw_storage: false,
            autopilot: crate::config::Autopilot::default(),
            restoring: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Runs autopilot's dead-member clean-up with these settings (see [`Api::autopilot_loop`]).
    pub fn with_autopilot(mut self, autopilot: crate::config::Autopilot) -> Api {
        self.autopilot = autopilot;
        self
    }

    /// Serves the raw store API too (`--raw-storage-endpoint`; off by default).
    pub fn with_raw_storage_endpoint(mut self, on: bool) -> Api {
        self.raw_storage = on;
        self
    }

    async fn timed<T, F>(&self, method: &str, f: F) -> Result<Response<T>, Status>
    where
        F: std::future::Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let result = f.await;
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        self.metrics.observe(method, started, code);
        result.map(Response::new)
    }

    fn header(&self, revision: u64, raft_index: u64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            revision,
            node_id: self.node.id(),
            raft_index,
            leader_id: self.node.leader_id().unwrap_or(0),
        })
    }

    fn check_key(&self, key: &[u8]) -> Result<(), Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument("the key must not be empty"));
        }
        if key[0] <= crate::kv_engine::ENGINE_BYTE {
            return Err(Status::invalid_argument(
                "keys starting with a NUL or \\x01 byte are reserved for Coffer itself and its secrets engines",
            ));
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(Status::invalid_argument(format!(
                "the key is {} bytes; keys are at most {MAX_KEY_BYTES} bytes",
                key.len()
            )));
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), Status> {
        if value.len() > self.max_value_bytes {
            return Err(Status::invalid_argument(format!(
                "the value is {} bytes; the limit is {} bytes (server option --max-value-bytes)",
                value.len(),
                self.max_value_bytes
            )));
        }
        Ok(())
    }

    /// The keyring, or FAILED_PRECONDITION saying why data cannot be served (uninitialized or
    /// sealed, and what to do).
    fn keyring(&self) -> Result<Arc<Keyring>, Status> {
        self.seal
            .keyring()
            .map_err(|e| Status::failed_precondition(e.to_string()))
    }

    /// Decrypts a stored entry's value (read at `key`), for a response.
    fn open_entry(
        &self,
        keyring: &Keyring,
        e: KvEntry,
        keys_only: bool,
    ) -> Result<pb::KeyValue, Status> {
        let value = if keys_only {
            Vec::new()
        } else {
            self.decrypt(keyring, &e.key, &e.value)?.to_vec()
        };
        Ok(pb::KeyValue {
            key: e.key,
            value,
            version: e.version,
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
        })
    }

    /// Encrypts `plain` for storage at `key` with the active data key.
    fn encrypt(&self, keyring: &Keyring, key: &[u8], plain: &[u8]) -> Result<Vec<u8>, Status> {
        keyring
            .encrypt(key, plain)
            .map_err(|e| Status::internal(format!("encryption failed: {e:#}")))
    }

    /// Decrypts what is stored at `key`. A value written under a data key this node has not
    /// opened yet (a rotation applied a moment ago) makes it take in the newest keyring and try
    /// once more; what still does not decrypt is DATA_LOSS.
    fn decrypt(
        &self,
        keyring: &Keyring,
        key: &[u8],
        blob: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, Status> {
        if let Ok(v) = keyring.decrypt(key, blob) {
            return Ok(v);
        }
        self.seal.refresh();
        self.keyring()?.decrypt(key, blob).map_err(|err| {
            Status::data_loss(format!(
                "the value of {:?} cannot be decrypted: {err:#}",
                String::from_utf8_lossy(key)
            ))
        })
    }

    fn open_prev(
        &self,
        keyring: &Keyring,
        prev: Option<KvEntry>,
    ) -> Result<Option<pb::KeyValue>, Status> {
        prev.map(|e| self.open_entry(keyring, e, false)).transpose()
    }

    fn op_response(&self, keyring: &Keyring, r: OpResult) -> Result<pb::OpResponse, Status> {
        Ok(match r {
            OpResult::Put { prev } => pb::OpResponse {
                deleted: 0,
                prev: self.open_prev(keyring, prev)?,
            },
            OpResult::Delete { prev } => pb::OpResponse {
                deleted: u64::from(prev.is_some()),
                prev: self.open_prev(keyring, prev)?,
            },
            OpResult::DeletePrefix { deleted } => pb::OpResponse {
                deleted,
                prev: None,
            },
        })
    }

    async fn write(&self, txn: Txn, request_id: &[u8]) -> Result<Written, Status> {
        let request_id = parse_request_id(request_id)?;
        self.node
            .write(Command { request_id, txn })
            .await
            .map_err(raft_status)
    }

    /// Prepares a read: linearizable (read index) or stale. Returns the index it reflects.
    async fn read_point(&self, consistency: i32) -> Result<u64, Status> {
        match pb::Consistency::try_from(consistency) {
            Ok(pb::Consistency::Linearizable) => self.node.linearize().await.map_err(raft_status),
            Ok(pb::Consistency::Stale) => Ok(self.node.applied_index()),
            Err(_) => Err(Status::invalid_argument(format!(
                "unknown consistency {consistency}; use LINEARIZABLE (0) or STALE (1)"
            ))),
        }
    }

    /// A put of `value` at `key`, encrypted by the barrier before it reaches Raft.
    fn sealed_put(&self, keyring: &Keyring, key: Vec<u8>, value: &[u8]) -> Result<Op, Status> {
        self.check_key(&key)?;
        self.check_value(value)?;
        let value = self.encrypt(keyring, &key, value)?;
        Ok(Op::Put { key, value })
    }

    fn convert_op(&self, keyring: &Keyring, op: pb::RequestOp) -> Result<Op, Status> {
        match op.op {
            Some(pb::request_op::Op::Put(p)) => self.sealed_put(keyring, p.key, &p.value),
            Some(pb::request_op::Op::Delete(d)) => {
                self.check_key(&d.key)?;
                Ok(if d.prefix {
                    Op::DeletePrefix { prefix: d.key }
                } else {
                    Op::Delete { key: d.key }
                })
            }
            None => Err(Status::invalid_argument(
                "a transaction operation has no op set",
            )),
        }
    }
}

/// Every entry under `prefix` in `view`, in key order, at most `most` of them.
fn entries_under(view: &ReadView, prefix: &[u8], most: usize) -> Result<Vec<KvEntry>, Status> {
    let mut out: Vec<KvEntry> = Vec::new();
    while out.len() < most {
        let after = out.last().map(|e| e.key.clone());
        let (page, more) = view
            .list(prefix, after.as_deref(), (most - out.len()).min(1000))
            .map_err(storage_status)?;
        out.extend(page);
        if !more {
            break;
        }
    }
    Ok(out)
}

/// Largest page of the administration lists (policies, identities, roles, sessions, grants,
/// mounts); also the page size when a request asks for 0.
pub const MAX_ADMIN_PAGE: u32 = 1000;

/// One page of `items`, which are sorted by `key`: those after `start_after` (empty: from the
/// start), at most `limit` (0: [`MAX_ADMIN_PAGE`]), and whether more follow.
fn page<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> &str,
    start_after: &str,
    limit: u32,
) -> Result<(Vec<T>, bool), Status> {
    if limit > MAX_ADMIN_PAGE {
        return Err(Status::invalid_argument(format!(
            "limit {limit} is above the maximum page size of {MAX_ADMIN_PAGE}"
        )));
    }
    let limit = if limit == 0 { MAX_ADMIN_PAGE } else { limit } as usize;
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|item| start_after.is_empty() || key(item) > start_after)
        .collect();
    let more = rest.len() > limit;
    rest.truncate(limit);
    Ok((rest, more))
}

fn parse_request_id(id: &[u8]) -> Result<Option<RequestId>, Status> {
    match id.len() {
        0 => Ok(None),
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(id);
            Ok(Some(RequestId(b)))
        }
        n => Err(Status::invalid_argument(format!(
            "request_id must be empty or 16 bytes, not {n}"
        ))),
    }
}

/// Maps replication errors to gRPC status codes (see the API's proto for their meaning).
pub fn raft_status(e: RaftError) -> Status {
    let msg = e.to_string();
    match e {
        RaftError::Unavailable(_) => Status::unavailable(msg),
        RaftError::OutcomeUnknown(_) => Status::deadline_exceeded(msg),
        RaftError::Overloaded(_) => Status::resource_exhausted(msg),
        RaftError::Invalid(_) => Status::failed_precondition(msg),
        _ => Status::internal(msg),
    }
}

fn storage_status(e: coffer_storage::StorageError) -> Status {
    Status::internal(format!("this node's storage failed: {e}"))
}

/// Ends a page early once its values pass [`MAX_PAGE_BYTES`] (keeping at least one key).
fn cap_page(mut entries: Vec<KvEntry>, more: bool, keys_only: bool) -> (Vec<KvEntry>, bool) {
    if keys_only {
        return (entries, more);
    }
    let mut bytes = 0;
    let mut keep = entries.len();
    for (i, e) in entries.iter().enumerate() {
        bytes += e.key.len() + e.value.len();
        if bytes > MAX_PAGE_BYTES && i > 0 {
            keep = i;
            break;
        }
    }
    if keep < entries.len() {
        entries.truncate(keep);
        return (entries, true);
    }
    (entries, more)
}

impl Api {
    /// The built-in `admin` identity, from the seal configuration.
    fn admin_identity(&self) -> Result<pb::IdentityResponse, Status> {
        let config = self
            .seal
            .config()
            .map_err(|e| Status::internal(format!("{e:#}")))?
            .ok_or_else(|| Status::failed_precondition("this cluster is not initialized"))?;
        let key = PublicKey::from_bytes(&config.admin_key)
            .map_err(|e| Status::internal(format!("the administrator key: {e:#}")))?;
        Ok(pb::IdentityResponse {
            name: identity::ADMIN.into(),
            public_key: config.admin_key,
            fingerprint: key.fingerprint(),
            policies: vec![policy::ADMIN.into()],
            mod_revision: 0,
            warnings: Vec::new(),
            default_session_ttl_seconds: 0,
            max_session_ttl_seconds: 0,
        })
    }

    /// The names stored under a reserved `prefix` (linearizable; needs an unsealed node), with
    /// the built-in `builtin` if there is one, in name order.
    async fn names_under(
        &self,
        prefix: &[u8],
        builtin: Option<&str>,
    ) -> Result<Vec<String>, Status> {
        self.keyring()?;
        self.node.linearize().await.map_err(raft_status)?;
        let view = self.node.store().read().map_err(storage_status)?;
        let mut names: Vec<String> = builtin.map(String::from).into_iter().collect();
        names.extend(
            entries_under(&view, prefix, usize::MAX)?
                .iter()
                .map(|e| String::from_utf8_lossy(&e.key[prefix.len()..]).into_owned()),
        );
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// This cluster's key-set id and the administrator key's fingerprint.
    fn admin_cluster(&self) -> Result<(String, String), Status> {
        let admin = self.admin_identity()?;
        let config = self
            .seal
            .config()
            .map_err(|e| Status::internal(format!("{e:#}")))?
            .ok_or_else(|| Status::failed_precondition("this cluster is not initialized"))?;
        Ok((config.cluster_id, admin.fingerprint))
    }

    /// A stored identity (after a linearizable read) and its `mod_revision`.
    async fn stored_identity(
        &self,
        keyring: &Keyring,
        name: &str,
    ) -> Result<Option<(identity::Identity, u64)>, Status> {
        self.node.linearize().await.map_err(raft_status)?;
        self.read_record(keyring, &identity::store_key(name))
    }

    /// Warnings for policies an identity names that do not exist.
    fn missing_policies(&self, policies: &[String]) -> Result<Vec<String>, Status> {
        let view = self.node.store().read().map_err(storage_status)?;
        let mut warnings = Vec::new();
        for p in policies {
            if p != policy::ADMIN
                && view
                    .get(&policy::store_key(p))
                    .map_err(storage_status)?
                    .is_none()
            {
                warnings.push(format!(
                    "policy {p:?} does not exist (yet): it grants nothing until `coffer policy write {p} FILE`"
                ));
            }
        }
        Ok(warnings)
    }

    fn identity_response(
        name: String,
        record: identity::Identity,
        mod_revision: u64,
        warnings: Vec<String>,
    ) -> Result<pb::IdentityResponse, Status> {
        let key = PublicKey::from_bytes(&record.public_key)
            .map_err(|e| Status::data_loss(format!("identity {name:?}: {e:#}")))?;
        Ok(pb::IdentityResponse {
            name,
            fingerprint: key.fingerprint(),
            public_key: record.public_key,
            policies: record.policies,
            mod_revision,
            warnings,
            default_session_ttl_seconds: record.default_ttl_s.unwrap_or(0),
            max_session_ttl_seconds: record.max_ttl_s.unwrap_or(0),
        })
    }

    /// A record encoded and encrypted for storage at `key`.
    fn sealed_record<T: serde::Serialize>(
        &self,
        keyring: &Keyring,
        key: &[u8],
        record: &T,
    ) -> Result<Vec<u8>, Status> {
        let plain =
            postcard::to_allocvec(record).map_err(|e| Status::internal(format!("encode: {e}")))?;
        self.encrypt(keyring, key, &plain)
    }
}

/// Where the raw key/value API is authorized: a key `K` is the path `secret/data/K` (as Vault's
/// KV v2 at the default mount), a listing of prefix `P` is `secret/metadata/P`.
pub const KV_DATA: &str = "secret/data/";
/// See [`KV_DATA`].
pub const KV_METADATA: &str = "secret/metadata/";

/// Membership changes are authorized at this path (`update`).
pub const RAFT_MEMBERS: &str = "sys/storage/raft/members";
/// Taking a snapshot now is authorized at this path (`update`).
pub const RAFT_SNAPSHOT: &str = "sys/storage/raft/snapshot";
/// Policies are managed at this path and the policy name (`list` on the path itself).
pub const POLICIES: &str = "sys/policies/acl";
/// Identities are managed at this path and the identity name (`list` on the path itself).
pub const IDENTITIES: &str = "sys/identities";

/// Registering node keys is authorized at this path and the node id (`create`).
pub const RAFT_NODES: &str = "sys/storage/raft/nodes";

/// Cluster settings are read (`read`) and written (`update`) at this path.
pub const SETTINGS: &str = "sys/settings";

/// An administrator's emergency seal is authorized at this path (`sudo`).
pub const EMERGENCY_SEAL: &str = "sys/seal";

/// Sessions are managed at this path and the session id (`list` on the path itself).
pub const SESSIONS: &str = "sys/sessions";

fn kv_path(base: &str, key: &[u8]) -> Result<String, Status> {
    let key = std::str::from_utf8(key).map_err(|_| {
        Status::invalid_argument(
            "keys are UTF-8 paths (each is authorized as the path secret/data/KEY)",
        )
    })?;
    Ok(format!("{base}{key}"))
}

/// `Ok` when `grant` allows `capability` on `path`.
fn allow(grant: &Grant, path: &str, capability: Capability) -> Result<(), Status> {
    if grant.acl.allows(path, capability) {
        Ok(())
    } else {
        Err(permission_denied(grant, capability, path))
    }
}

fn permission_denied(grant: &Grant, capability: Capability, path: &str) -> Status {
    tracing::info!(
        identity = grant.identity,
        session = grant.session_id,
        path,
        capability = capability.as_str(),
        "permission denied"
    );
    Status::permission_denied(format!(
        "identity {:?} may not {} {path:?} (its policies: {}); an administrator grants it in a policy",
        grant.identity,
        capability.as_str(),
        grant.policies.join(", ")
    ))
}

impl Api {
    /// Whether the caller may delete `key`, or every key under it.
    fn check_delete(grant: &Grant, key: &[u8], prefix: bool) -> Result<(), Status> {
        let path = kv_path(KV_DATA, key)?;
        let allowed = if prefix {
            grant.acl.allows_all_under(&path, Capability::Delete)
        } else {
            grant.acl.allows(&path, Capability::Delete)
        };
        if allowed {
            Ok(())
        } else {
            let shown = if prefix { format!("{path}*") } else { path };
            Err(permission_denied(grant, Capability::Delete, &shown))
        }
    }

    /// Checks the caller and that `capability` is allowed on `path`; returns the caller.
    async fn authorize<T: Sync>(
        &self,
        req: &Request<T>,
        path: &str,
        capability: Capability,
    ) -> Result<Arc<Grant>, Status> {
        let grant = self.caller(req).await?;
        self.permit(grant, |g| allow(g, path, capability)).await
    }

    /// Runs `check` on the caller's grant. A refusal decided from this node's state is decided
    /// again after a read index, so that a grant acknowledged before the request (a policy
    /// written, an identity updated) is never refused by a node that had not applied it yet.
    async fn permit(
        &self,
        grant: Arc<Grant>,
        check: impl Fn(&Grant) -> Result<(), Status>,
    ) -> Result<Arc<Grant>, Status> {
        match check(&grant) {
            Ok(()) => Ok(grant),
            Err(e) if e.code() == tonic::Code::PermissionDenied => {
                self.node.linearize().await.map_err(raft_status)?;
                let grant = self.recheck(&grant)?;
                check(&grant)?;
                Ok(grant)
            }
            Err(e) => Err(e),
        }
    }

    /// The caller's session: its certificate checked against the session CA, the session found
    /// in this node's replicated state, not expired, and what its identity's current policies
    /// allow. UNAUTHENTICATED names the failed check.
    async fn caller<T: Sync>(&self, req: &Request<T>) -> Result<Arc<Grant>, Status> {
        let keyring = self.keyring()?;
        let refuse = |why: String| {
            tracing::info!(remote = ?req.remote_addr(), reason = why, "request refused");
            Status::unauthenticated(why)
        };
        let certs = req.peer_certs().unwrap_or_default();
        let Some(cert) = certs.first() else {
            return Err(refuse(
                "no session certificate: log in first (`coffer login --key FILE`, or set COFFER_KEY) and present the session certificate".into(),
            ));
        };
        let ca = self
            .sessions
            .ca(&keyring)
            .map_err(|e| Status::internal(format!("the session CA: {e:#}")))?;
        let now = auth::now_ms();
        let session_key = self.sessions.verify(&ca, cert, now).map_err(&refuse)?;
        if let Ok(grant) = self.grant_for(&keyring, session_key) {
            return Ok(grant);
        }
        // Refused by this node's state: decide again after a read index (a login made through
        // another node may not have reached this one yet).
        self.node.linearize().await.map_err(raft_status)?;
        self.grant_for(&keyring, session_key).map_err(refuse)
    }

    /// What the session with `session_key` may do now, by this node's replicated state (a
    /// cached decision while no reserved key changed since).
    fn grant_for(&self, keyring: &Keyring, session_key: [u8; 32]) -> Result<Arc<Grant>, String> {
        let generation = self.node.store().reserved_changes();
        let cached = self
            .sessions
            .grant(generation, &session_key)
            .filter(|g| g.recheck_at_ms.is_none_or(|t| auth::now_ms() < t));
        let grant = match cached {
            Some(grant) => grant,
            None => {
                let grant = Arc::new(self.load_grant(keyring, &session_key)?);
                self.sessions.keep(generation, session_key, grant.clone());
                grant
            }
        };
        if auth::now_ms() >= grant.expires_ms {
            return Err(format!(
                "session {} has ended; log in again",
                grant.session_id
            ));
        }
        Ok(grant)
    }

    /// The caller's grant again after a read index: a linearizable read is decided by the
    /// policies and sessions of at least that point (a change acknowledged before the request
    /// applies to it, on every node).
    fn recheck(&self, grant: &Grant) -> Result<Arc<Grant>, Status> {
        let keyring = self.keyring()?;
        self.grant_for(&keyring, grant.session_key)
            .map_err(Status::unauthenticated)
    }

    /// Decides what the session with `session_key` may do, from this node's state.
    fn load_grant(&self, keyring: &Keyring, session_key: &[u8; 32]) -> Result<Grant, String> {
        let view = self.node.store().read().map_err(|e| e.to_string())?;
        let read = |key: &[u8]| -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, String> {
            match view.get(key).map_err(|e| e.to_string())? {
                Some(e) => keyring
                    .decrypt(key, &e.value)
                    .map(Some)
                    .map_err(|e| format!("a stored record does not decrypt: {e:#}")),
                None => Ok(None),
            }
        };
        let list = |prefix: &[u8]| -> Result<Vec<zeroize::Zeroizing<Vec<u8>>>, String> {
            entries_under(&view, prefix, usize::MAX)
                .map_err(|e| e.message().to_string())?
                .iter()
                .map(|e| {
                    keyring
                        .decrypt(&e.key, &e.value)
                        .map_err(|e| format!("a stored record does not decrypt: {e:#}"))
                })
                .collect()
        };
        let admin_key = || -> Result<Vec<u8>, String> {
            Ok(self
                .seal
                .config()
                .map_err(|e| format!("{e:#}"))?
                .ok_or("this cluster is not initialized")?
                .admin_key)
        };
        session::decide(&read, &list, &admin_key, session_key)
    }
}

impl Api {
    /// A record stored at `key` (inside the barrier) in this node's state, decoded, with its
    /// `mod_revision`; `None` when absent.
    fn read_record<T: serde::de::DeserializeOwned>(
        &self,
        keyring: &Keyring,
        key: &[u8],
    ) -> Result<Option<(T, u64)>, Status> {
        let view = self.node.store().read().map_err(storage_status)?;
        self.read_record_in(&view, keyring, key)
    }

    /// [`Api::read_record`] in a given read view (so that several reads see one state).
    fn read_record_in<T: serde::de::DeserializeOwned>(
        &self,
        view: &ReadView,
        keyring: &Keyring,
        key: &[u8],
    ) -> Result<Option<(T, u64)>, Status> {
        match view.get(key).map_err(storage_status)? {
            Some(e) => {
                let plain = self.decrypt(keyring, key, &e.value)?;
                let record = postcard::from_bytes(&plain).map_err(|err| {
                    Status::data_loss(format!(
                        "the record at {:?} is corrupt: {err}",
                        String::from_utf8_lossy(key)
                    ))
                })?;
                Ok(Some((record, e.mod_revision)))
            }
            None => Ok(None),
        }
    }

    /// This node's store revision now.
    fn revision_now(&self) -> Result<u64, Status> {
        self.node
            .store()
            .read()
            .and_then(|view| view.revision())
            .map_err(storage_status)
    }

    /// The cluster's session lifetimes (from this node's state).
    fn cluster_ttls(&self, keyring: &Keyring) -> Result<auth::SessionTtls, Status> {
        Ok(self
            .read_record::<auth::Settings>(keyring, auth::SETTINGS_KEY)?
            .map(|(settings, _)| settings)
            .unwrap_or_default()
            .session)
    }

    /// Creates `session` in one transaction that marks the challenge's nonce used, only if it
    /// never was (on any node), the session key is new, and `also` holds; issues its
    /// certificate.
    async fn open_session(
        &self,
        keyring: &Arc<Keyring>,
        session: auth::Session,
        nonce: &[u8],
        challenge_expiry: u64,
        also: Option<Compare>,
    ) -> Result<pb::LoginResponse, Status> {
        let mut session_public = [0u8; 32];
        session_public.copy_from_slice(&session.session_key[..32]);
        let id = session::session_id(&session_public);
        let certificate = self
            .sessions
            .ca(keyring)
            .and_then(|ca| {
                ca.issue(
                    &session_public,
                    &session.identity,
                    session.created_ms,
                    session.expires_ms,
                )
            })
            .map_err(|e| {
                Status::internal(format!("cannot issue the session certificate: {e:#}"))
            })?;
        let record_key = auth::session_key(&id);
        let sealed = self.sealed_record(keyring, &record_key, &session)?;
        let used = auth::nonce_key(nonce);
        let mut compare = vec![
            Compare::Absent(used.clone()),
            Compare::Absent(record_key.clone()),
        ];
        compare.extend(also);
        let txn = Txn {
            compare,
            success: vec![
                Op::Put {
                    key: used.clone(),
                    value: challenge_expiry.to_be_bytes().to_vec(),
                },
                Op::Put {
                    key: record_key.clone(),
                    value: sealed,
                },
            ],
            failure: Vec::new(),
        };
        let w = self.write(txn, &[]).await?;
        if !w.result.succeeded {
            let view = self.node.store().read().map_err(storage_status)?;
            let nonce_used = view.get(&used).map_err(storage_status)?.is_some();
            if !nonce_used && view.get(&record_key).map_err(storage_status)?.is_some() {
                return Err(Status::invalid_argument(format!(
                    "the session key already has a session ({id}); make a new session key for each login"
                )));
            }
            // The nonce was used, or what the login was checked against changed meanwhile.
            return Err(unauthenticated(auth::Refused::Replayed));
        }
        tracing::info!(identity = session.identity, session = id, "login");
        Ok(pb::LoginResponse {
            session_id: id,
            identity: session.identity,
            expires_at_ms: session.expires_ms,
            certificate,
        })
    }
}

fn unauthenticated(e: auth::Refused) -> Status {
    Status::unauthenticated(e.to_string())
}

impl Api {
    /// Refuses a caller that asked for too many challenges or logins lately.
    fn rate_limit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(source) = req.remote_addr().map(|a| a.ip()) else {
            return Ok(());
        };
        if self.logins.allow(source, std::time::Instant::now()) {
            Ok(())
        } else {
            Err(Status::resource_exhausted(format!(
                "too many challenges and logins from {source}; wait a second and try again"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value_len: usize) -> KvEntry {
        KvEntry {
            key: key.as_bytes().to_vec(),
            value: vec![0; value_len],
            version: 1,
            create_revision: 1,
            mod_revision: 1,
        }
    }

    #[test]
    fn a_page_ends_once_its_values_pass_the_byte_limit() {
        let big = MAX_PAGE_BYTES / 2 - 16;
        let (page, more) = cap_page(
            vec![entry("a", big), entry("b", big), entry("c", big)],
            false,
            false,
        );
        assert_eq!(page.len(), 2);
        assert!(more, "the caller must be told to ask for the rest");
        // A single value larger than the limit still gets a page of its own.
        let (page, more) = cap_page(vec![entry("a", MAX_PAGE_BYTES * 2)], false, false);
        assert_eq!((page.len(), more), (1, false));
        // Keys only: no values, no cap.
        let (page, _) = cap_page(
            vec![entry("a", big), entry("b", big), entry("c", big)],
            false,
            true,
        );
        assert_eq!(page.len(), 3);
    }

    #[test]
    fn administration_lists_come_in_pages() {
        let names: Vec<String> = (0..5).map(|i| format!("n{i}")).collect();
        let (first, more) = page(names.clone(), |n| n, "", 2).unwrap();
        assert_eq!(
            (first, more),
            (vec!["n0".to_string(), "n1".to_string()], true)
        );
        let (last, more) = page(names.clone(), |n| n, "n2", 0).unwrap();
        assert_eq!(
            (last, more),
            (vec!["n3".to_string(), "n4".to_string()], false)
        );
        let (exact, more) = page(names.clone(), |n| n, "n2", 2).unwrap();
        assert_eq!((exact.len(), more), (2, false));
        assert_eq!(
            page(names, |n| n, "", 1001).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn request_ids_are_empty_or_16_bytes() {
        assert_eq!(parse_request_id(&[]).unwrap(), None);
        assert!(parse_request_id(&[7; 16]).unwrap().is_some());
        assert_eq!(
            parse_request_id(&[1, 2]).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
