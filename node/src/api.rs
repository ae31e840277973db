//! The public gRPC services over the replicated store (`coffer.v1.Kv`, `coffer.v1.Cluster`).
//!
//! Every value passes the encryption barrier here: it is encrypted with the active data key
//! (bound to its key path) before it is proposed to Raft, and decrypted after it is read. A
//! sealed or uninitialized node serves no data (FAILED_PRECONDITION says why and what to do).
//! This raw store API is the first client surface; the secrets engines (with authentication and
//! authorization) will be put in front of it, and retiring it touches only this module.

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
        }
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
        if key[0] == 0 {
            return Err(Status::invalid_argument(
                "keys starting with a NUL byte are reserved for Coffer itself",
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

#[tonic::async_trait]
impl Kv for Api {
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        self.timed("Put", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            self.check_key(&r.key)?;
            let path = kv_path(KV_DATA, &r.key)?;
            let grant = self
                .permit(grant, |g| {
                    allow(g, &path, Capability::Create)
                        .or_else(|_| allow(g, &path, Capability::Update))
                })
                .await?;
            // As in Vault: `create` writes a key that does not exist, `update` one that does.
            let (create, update) = (
                grant.acl.allows(&path, Capability::Create),
                grant.acl.allows(&path, Capability::Update),
            );
            let guard = match (create, update) {
                (true, true) => None,
                (true, false) => Some(Compare::Absent(r.key.clone())),
                (false, true) => Some(Compare::Exists(r.key.clone())),
                (false, false) => return Err(permission_denied(&grant, Capability::Update, &path)),
            };
            let keyring = self.keyring()?;
            let put = self.sealed_put(&keyring, r.key, &r.value)?;
            let txn = Txn {
                compare: guard.into_iter().collect(),
                success: vec![put],
                failure: Vec::new(),
            };
            let w = self.write(txn, &r.request_id).await?;
            if !w.result.succeeded {
                let missing = if create {
                    Capability::Update
                } else {
                    Capability::Create
                };
                return Err(permission_denied(&grant, missing, &path));
            }
            let prev = match w.result.results.into_iter().next() {
                Some(OpResult::Put { prev }) => self.open_prev(&keyring, prev)?,
                _ => None,
            };
            Ok(pb::PutResponse {
                header: self.header(w.result.revision, w.index),
                prev,
            })
        })
        .await
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        self.timed("Get", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            self.check_key(&r.key)?;
            let path = kv_path(KV_DATA, &r.key)?;
            let grant = self
                .permit(grant, |g| allow(g, &path, Capability::Read))
                .await?;
            let keyring = self.keyring()?;
            let index = self.read_point(r.consistency).await?;
            allow(&*self.recheck(&grant)?, &path, Capability::Read)?;
            let view = self.node.store().read().map_err(storage_status)?;
            let entry = view.get(&r.key).map_err(storage_status)?;
            let revision = view.revision().map_err(storage_status)?;
            match entry {
                Some(e) => Ok(pb::GetResponse {
                    header: self.header(revision, index),
                    kv: Some(self.open_entry(&keyring, e, false)?),
                }),
                None => Err(Status::not_found(format!(
                    "no key {:?}",
                    String::from_utf8_lossy(&r.key)
                ))),
            }
        })
        .await
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.timed("Delete", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            self.check_key(&r.key)?;
            self.permit(grant, |g| Self::check_delete(g, &r.key, r.prefix))
                .await?;
            let op = if r.prefix {
                Op::DeletePrefix { prefix: r.key }
            } else {
                Op::Delete { key: r.key }
            };
            let w = self.write(Txn::ops(vec![op]), &r.request_id).await?;
            let deleted = match w.result.results.into_iter().next() {
                Some(OpResult::Delete { prev }) => u64::from(prev.is_some()),
                Some(OpResult::DeletePrefix { deleted }) => deleted,
                _ => 0,
            };
            Ok(pb::DeleteResponse {
                header: self.header(w.result.revision, w.index),
                deleted,
            })
        })
        .await
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.timed("List", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            let path = kv_path(KV_METADATA, &r.prefix)?;
            let grant = self
                .permit(grant, |g| allow(g, &path, Capability::List))
                .await?;
            let limit = match r.limit {
                0 => 100,
                n if n > 1000 => {
                    return Err(Status::invalid_argument(format!(
                        "limit {n} is above the maximum page size of 1000"
                    )));
                }
                n => n as usize,
            };
            if r.prefix.first() == Some(&0) {
                return Err(Status::invalid_argument(
                    "keys starting with a NUL byte are reserved for Coffer itself",
                ));
            }
            let keyring = self.keyring()?;
            let index = self.read_point(r.consistency).await?;
            let grant = self.recheck(&grant)?;
            allow(&grant, &path, Capability::List)?;
            let view = self.node.store().read().map_err(storage_status)?;
            // Coffer's own keys all start with a NUL byte and sort first: a listing from the
            // start skips past them instead of paging through them.
            const PAST_RESERVED: &[u8] = b"\0\xff";
            let after = if r.prefix.is_empty() && r.start_after.as_slice() < PAST_RESERVED {
                Some(PAST_RESERVED)
            } else {
                (!r.start_after.is_empty()).then_some(r.start_after.as_slice())
            };
            let (mut entries, more) = view.list(&r.prefix, after, limit).map_err(storage_status)?;
            // Coffer's own keys (the seal configuration) sort first; they are not listed.
            entries.retain(|e| e.key.first() != Some(&0));
            let (entries, more) = cap_page(entries, more, r.keys_only);
            if !r.keys_only {
                for e in &entries {
                    let path = kv_path(KV_DATA, &e.key)?;
                    allow(&grant, &path, Capability::Read).map_err(|denied| {
                        Status::permission_denied(format!(
                            "{}; list with keys only to see just the names",
                            denied.message()
                        ))
                    })?;
                }
            }
            let revision = view.revision().map_err(storage_status)?;
            Ok(pb::ListResponse {
                header: self.header(revision, index),
                kvs: entries
                    .into_iter()
                    .map(|e| self.open_entry(&keyring, e, r.keys_only))
                    .collect::<Result<_, _>>()?,
                more,
            })
        })
        .await
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        self.timed("Txn", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            // A compare reveals whether a key exists and its revisions: it needs `read`. A put
            // may create or replace: it needs `create` and `update`.
            self.permit(grant, |g| {
                for c in &r.compare {
                    allow(g, &kv_path(KV_DATA, &c.key)?, Capability::Read)?;
                }
                for op in r.success.iter().chain(&r.failure) {
                    match &op.op {
                        Some(pb::request_op::Op::Put(p)) => {
                            let path = kv_path(KV_DATA, &p.key)?;
                            allow(g, &path, Capability::Create)?;
                            allow(g, &path, Capability::Update)?;
                        }
                        Some(pb::request_op::Op::Delete(d)) => {
                            Self::check_delete(g, &d.key, d.prefix)?
                        }
                        None => {}
                    }
                }
                Ok(())
            })
            .await?;
            if r.success.len() + r.failure.len() > MAX_TXN_OPS || r.compare.len() > MAX_TXN_OPS {
                return Err(Status::invalid_argument(format!(
                    "a transaction has at most {MAX_TXN_OPS} compares and {MAX_TXN_OPS} operations"
                )));
            }
            let keyring = self.keyring()?;
            let mut compare = Vec::with_capacity(r.compare.len());
            for c in r.compare {
                self.check_key(&c.key)?;
                use pb::compare::Target;
                compare.push(match c.target {
                    Some(Target::Exists(true)) | Some(Target::Absent(false)) => {
                        Compare::Exists(c.key)
                    }
                    Some(Target::Absent(true)) | Some(Target::Exists(false)) => {
                        Compare::Absent(c.key)
                    }
                    Some(Target::ModRevision(rev)) => Compare::ModRevision(c.key, rev),
                    Some(Target::Version(v)) => Compare::Version(c.key, v),
                    None => return Err(Status::invalid_argument("a compare has no target set")),
                });
            }
            let success = r
                .success
                .into_iter()
                .map(|o| self.convert_op(&keyring, o))
                .collect::<Result<Vec<_>, _>>()?;
            let failure = r
                .failure
                .into_iter()
                .map(|o| self.convert_op(&keyring, o))
                .collect::<Result<Vec<_>, _>>()?;
            let w = self
                .write(
                    Txn {
                        compare,
                        success,
                        failure,
                    },
                    &r.request_id,
                )
                .await?;
            Ok(pb::TxnResponse {
                header: self.header(w.result.revision, w.index),
                succeeded: w.result.succeeded,
                responses: w
                    .result
                    .results
                    .into_iter()
                    .map(|r| self.op_response(&keyring, r))
                    .collect::<Result<_, _>>()?,
            })
        })
        .await
    }
}

#[tonic::async_trait]
impl Cluster for Api {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let want_digest = req.into_inner().digest;
        self.timed("Status", async {
            let s = self.node.status();
            let view = self.node.store().read().map_err(storage_status)?;
            let mut members = Vec::new();
            for (voter, map) in [(true, &s.voters), (false, &s.learners)] {
                for (id, m) in map {
                    members.push(pb::Member {
                        id: *id,
                        api_addr: m.api_addr.clone(),
                        peer_addr: m.peer_addr.clone(),
                        voter,
                        incarnation: m.incarnation,
                    });
                }
            }
            Ok(pb::StatusResponse {
                node_id: s.id,
                state: s.state.clone(),
                term: s.term,
                leader_id: s.leader.unwrap_or(0),
                last_log_index: s.last_log_index,
                commit_index: s.committed,
                applied_index: s.applied,
                snapshot_index: s.snapshot,
                purged_index: s.purged,
                members,
                replication_lag: s
                    .replication
                    .iter()
                    .map(|(id, m)| (*id, s.last_log_index.saturating_sub(*m)))
                    .collect(),
                fatal: self.node.fatal().unwrap_or_default(),
                revision: view.revision().map_err(storage_status)?,
                digest: if want_digest {
                    view.digest().map_err(storage_status)?
                } else {
                    0
                },
                cluster_id: self.cluster_name.clone(),
                fsyncs: self.metrics.flush_totals().0,
                flushed_entries: self.metrics.flush_totals().1,
                seal: self.seal.summary(),
            })
        })
        .await
    }

    async fn add_learner(
        &self,
        req: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        self.timed("AddLearner", async {
            self.authorize(&req, RAFT_MEMBERS, Capability::Update)
                .await?;
            let r = req.into_inner();
            if r.id == 0 || r.api_addr.is_empty() || r.peer_addr.is_empty() {
                return Err(Status::invalid_argument(
                    "add-learner needs a positive id, an api address and a peer address",
                ));
            }
            let s = self.node.status();
            if s.voters.contains_key(&r.id) || s.learners.contains_key(&r.id) {
                return Err(Status::already_exists(format!(
                    "node {} is already a member; ids are never reused: pick a new one",
                    r.id
                )));
            }
            self.node.linearize().await.map_err(raft_status)?;
            let recorded = self
                .node
                .store()
                .read()
                .map_err(storage_status)?
                .get(&node_identity::node_cert_record(r.id))
                .map_err(storage_status)?;
            if recorded.is_none() {
                return Err(Status::failed_precondition(format!(
                    "node {} has no node certificate, so its peers would refuse it: register its node key with `coffer cluster register-node` and start it with --join; it adds itself",
                    r.id
                )));
            }
            let index = self
                .node
                .change_membership(MembershipChange::AddLearner {
                    id: r.id,
                    member: Member::new(r.peer_addr, r.api_addr),
                })
                .await
                .map_err(raft_status)?;
            Ok(pb::MembershipResponse { raft_index: index })
        })
        .await
    }

    async fn promote(
        &self,
        req: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        self.timed("Promote", async {
            self.authorize(&req, RAFT_MEMBERS, Capability::Update)
                .await?;
            let id = req.into_inner().id;
            if !self.node.status().learners.contains_key(&id) {
                return Err(Status::failed_precondition(format!(
                    "node {id} is not a learner; add it first with `coffer cluster add-learner`"
                )));
            }
            let index = self
                .node
                .change_membership(MembershipChange::Promote { id })
                .await
                .map_err(raft_status)?;
            Ok(pb::MembershipResponse { raft_index: index })
        })
        .await
    }

    async fn remove(
        &self,
        req: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        self.timed("Remove", async {
            self.authorize(&req, RAFT_MEMBERS, Capability::Update)
                .await?;
            let id = req.into_inner().id;
            let s = self.node.status();
            if !s.voters.contains_key(&id) && !s.learners.contains_key(&id) {
                return Err(Status::not_found(format!("node {id} is not a member")));
            }
            if s.voters.contains_key(&id) && s.voters.len() == 1 {
                return Err(Status::failed_precondition(
                    "cannot remove the last voter; the cluster would have no quorum",
                ));
            }
            let index = self
                .node
                .change_membership(MembershipChange::Remove { id })
                .await
                .map_err(raft_status)?;
            // Its node certificate opens nothing from now on (peers accept recorded nodes only).
            self.commit(
                Txn::ops(vec![
                    Op::Delete {
                        key: node_identity::node_cert_record(id),
                    },
                    Op::Delete {
                        key: node_identity::node_key_record(id),
                    },
                ]),
                "",
            )
            .await?;
            Ok(pb::MembershipResponse { raft_index: index })
        })
        .await
    }

    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        self.timed("RegisterNode", async {
            let id = req.get_ref().id;
            if id == 0 {
                return Err(Status::invalid_argument("the node id must be positive"));
            }
            self.authorize(&req, &format!("{RAFT_NODES}/{id}"), Capability::Create)
                .await?;
            let r = req.into_inner();
            let key = PublicKey::from_bytes(&r.public_key)
                .map_err(|e| Status::invalid_argument(format!("the node key: {e:#}")))?;
            let s = self.node.status();
            if s.voters.contains_key(&id) || s.learners.contains_key(&id) {
                return Err(Status::already_exists(format!(
                    "node {id} is already a member; ids are never reused: pick a new one"
                )));
            }
            self.commit(
                Txn {
                    compare: vec![Compare::Absent(node_identity::node_key_record(id))],
                    success: vec![Op::Put {
                        key: node_identity::node_key_record(id),
                        value: r.public_key,
                    }],
                    failure: Vec::new(),
                },
                &format!("a node key is already registered for node {id}; ids are never reused: pick a new one"),
            )
            .await?;
            Ok(pb::RegisterNodeResponse {
                fingerprint: key.fingerprint(),
            })
        })
        .await
    }

    type JoinStream = tokio_stream::wrappers::ReceiverStream<Result<pb::JoinProgress, Status>>;

    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        self.rate_limit(&req)?;
        let r = req.into_inner();
        let (certificate, node_ca) = self.timed("Join", self.admit(&r)).await?.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let node = self.node.clone();
        tokio::spawn(async move {
            let first = pb::JoinProgress {
                certificate,
                node_ca,
                raft_index: 0,
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            // The node serves its peer port with the certificate now; adding it asks it who it
            // is over that port first.
            let added = node
                .change_membership(MembershipChange::AddLearner {
                    id: r.node_id,
                    member: Member::new(r.peer_addr, r.api_addr),
                })
                .await
                .map(|raft_index| pb::JoinProgress {
                    raft_index,
                    ..pb::JoinProgress::default()
                })
                .map_err(raft_status);
            let _ = tx.send(added).await;
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        self.timed("Snapshot", async {
            self.authorize(&req, RAFT_SNAPSHOT, Capability::Update)
                .await?;
            let before = self.node.status().snapshot;
            self.node.trigger_snapshot().await.map_err(raft_status)?;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let s = self.node.status();
                if s.snapshot > before || (s.snapshot == s.applied && s.applied > 0) {
                    return Ok(pb::SnapshotResponse {
                        snapshot_index: s.snapshot,
                    });
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(Status::deadline_exceeded(
                        "the snapshot did not finish within 30 s",
                    ));
                }
                self.node
                    .wait_changed(std::time::Duration::from_millis(200))
                    .await;
            }
        })
        .await
    }
}

/// Registering node keys is authorized at this path and the node id (`create`).
pub const RAFT_NODES: &str = "sys/storage/raft/nodes";

impl Api {
    /// A proposal, refused if its compares fail (`why`).
    async fn commit(&self, txn: Txn, why: &str) -> Result<u64, Status> {
        let written = self
            .node
            .write(Command {
                request_id: None,
                txn,
            })
            .await
            .map_err(raft_status)?;
        if !written.result.succeeded {
            return Err(Status::failed_precondition(why.to_string()));
        }
        Ok(written.index)
    }

    /// Checks a join request's proof; returns the node certificate (PEM) and the node CA
    /// certificate (DER), with the node recorded.
    async fn admit(&self, r: &pb::JoinRequest) -> Result<(String, Vec<u8>), Status> {
        let keyring = self.keyring()?;
        let (cluster_id, _) = self.admin_cluster()?;
        if r.node_id == 0 || r.api_addr.is_empty() || r.peer_addr.is_empty() {
            return Err(Status::invalid_argument(
                "a join needs a positive node id, an API address and a peer address",
            ));
        }
        let (nonce, challenge_expiry) =
            auth::check_challenge(&keyring, &r.challenge, auth::now_ms())
                .map_err(unauthenticated)?;
        let status = self.node.status();
        if status.voters.contains_key(&r.node_id) || status.learners.contains_key(&r.node_id) {
            return Err(Status::already_exists(format!(
                "node {} is already a member; ids are never reused: pick a new one",
                r.node_id
            )));
        }
        self.node.linearize().await.map_err(raft_status)?;
        let registered_key = node_identity::node_key_record(r.node_id);
        let registered = self
            .node
            .store()
            .read()
            .map_err(storage_status)?
            .get(&registered_key)
            .map_err(storage_status)?
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "no node key is registered for node {}: an administrator runs `coffer cluster register-node --id {} --public-key FILE` first",
                    r.node_id, r.node_id
                ))
            })?;
        if registered.value != r.public_key {
            return Err(Status::permission_denied(format!(
                "the node key is not the one registered for node {}",
                r.node_id
            )));
        }
        let key = PublicKey::from_bytes(&r.public_key)
            .map_err(|e| Status::unauthenticated(format!("the node key: {e:#}")))?;
        key.verify(
            &node_identity::join_message(
                &cluster_id,
                &r.challenge,
                r.node_id,
                &r.api_addr,
                &r.peer_addr,
            ),
            &r.signature,
        )
        .map_err(|_| {
            Status::unauthenticated(
                "the join signature does not verify with the registered node key (another challenge, cluster or address?)",
            )
        })?;
        let record = node_identity::NodeRecord {
            api_addr: r.api_addr.clone(),
            peer_addr: r.peer_addr.clone(),
            recorded_ms: auth::now_ms(),
            how: format!("joined with node key {}", key.fingerprint()),
        };
        let used = auth::nonce_key(&nonce);
        self.commit(
            Txn {
                compare: vec![
                    Compare::Absent(used.clone()),
                    Compare::ModRevision(registered_key, registered.mod_revision),
                ],
                success: vec![
                    Op::Put {
                        key: used,
                        value: challenge_expiry.to_be_bytes().to_vec(),
                    },
                    Op::Put {
                        key: node_identity::node_cert_record(r.node_id),
                        value: postcard::to_allocvec(&record)
                            .map_err(|e| Status::internal(e.to_string()))?,
                    },
                ],
                failure: Vec::new(),
            },
            "the challenge was already used (or the node's registration changed): ask for a new one",
        )
        .await?;
        let ca = node_identity::NodeCa::from_keyring(&keyring)
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        let certificate = ca
            .issue(
                r.node_id,
                &key.signing_key(),
                node_identity::host_of(&r.peer_addr),
                auth::now_ms(),
            )
            .map_err(|e| Status::internal(format!("cannot issue the node certificate: {e:#}")))?;
        tracing::info!(
            node = r.node_id,
            "a node proved its registered key and joins"
        );
        Ok((certificate, ca.cert().to_vec()))
    }
}

fn refused_status(e: Refused) -> Status {
    match e {
        Refused::Other(e) => Status::internal(format!("{e:#}")),
        e => Status::failed_precondition(e.to_string()),
    }
}

#[tonic::async_trait]
impl coffer_api::v1::seal_server::Seal for Api {
    async fn init(
        &self,
        req: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        let r = req.into_inner();
        self.timed("Init", async {
            if r.operator_names.len() != r.operator_keys.len() {
                return Err(Status::invalid_argument(
                    "give one operator name per operator key",
                ));
            }
            let operators = r
                .operator_keys
                .into_iter()
                .zip(r.operator_names)
                .map(|(public_key, name)| Operator { name, public_key })
                .collect();
            let done = self
                .seal
                .init(operators, r.threshold, r.admin_key)
                .await
                .map_err(|e| {
                    let msg = format!("{e:#}");
                    if msg.contains("already initialized") {
                        Status::failed_precondition(msg)
                    } else if msg.contains("not committed") {
                        Status::unavailable(msg)
                    } else {
                        Status::invalid_argument(msg)
                    }
                })?;
            Ok(pb::InitResponse {
                cluster_id: done.cluster_id,
                encrypted_shares: done.encrypted_shares,
            })
        })
        .await
    }

    async fn seal_status(
        &self,
        _req: Request<pb::SealStatusRequest>,
    ) -> Result<Response<pb::SealStatusResponse>, Status> {
        self.timed("SealStatus", async {
            let internal = |e: anyhow::Error| Status::internal(format!("{e:#}"));
            let Some(config) = self.seal.config().map_err(internal)? else {
                return Ok(pb::SealStatusResponse {
                    node_id: self.node.id(),
                    sealed: true,
                    ..Default::default()
                });
            };
            let progress = self.seal.progress().map_err(internal)?;
            let peer = self.seal.peer_unseal().map_err(internal)?;
            let (data_key, seal_revision, keyring_revision, config_revision) =
                self.seal.revisions().map_err(internal)?;
            Ok(pb::SealStatusResponse {
                node_id: self.node.id(),
                initialized: true,
                sealed: progress.as_ref().is_none_or(|p| p.sealed),
                cluster_id: config.cluster_id,
                threshold: config.threshold,
                operator_names: config.operators.iter().map(|o| o.name.clone()).collect(),
                operator_keys: config
                    .operators
                    .iter()
                    .map(|o| o.public_key.clone())
                    .collect(),
                submitted: progress.map(|p| p.submitted).unwrap_or_default(),
                master_ciphertext: config.master_ciphertext,
                peer_unseal: peer.0,
                peer_unseal_revision: peer.1,
                seal_revision,
                keyring_revision,
                data_key,
                config_revision,
            })
        })
        .await
    }

    async fn operator_action(
        &self,
        req: Request<pb::OperatorActionRequest>,
    ) -> Result<Response<pb::OperatorActionResponse>, Status> {
        let r = req.into_inner();
        self.timed("OperatorAction", async {
            let action = Action::parse(&r.action).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "unknown action {:?}; use \"peer-unseal on\", \"peer-unseal off\", \"seal\" or \"rotate\"",
                    r.action
                ))
            })?;
            let data_key = self
                .seal
                .operator_action(action, r.operator_index, r.revision, &r.signature)
                .await
                .map_err(refused_status)?;
            Ok(pb::OperatorActionResponse { data_key })
        })
        .await
    }

    async fn emergency_seal(
        &self,
        req: Request<pb::EmergencySealRequest>,
    ) -> Result<Response<pb::EmergencySealResponse>, Status> {
        self.timed("EmergencySeal", async {
            let grant = self
                .authorize(&req, EMERGENCY_SEAL, Capability::Sudo)
                .await?;
            let by = format!("{} (session {})", grant.identity, grant.session_id);
            self.seal
                .emergency_seal(&by)
                .await
                .map_err(refused_status)?;
            tracing::warn!(by, "emergency seal by an administrator");
            Ok(pb::EmergencySealResponse {})
        })
        .await
    }

    async fn rekey(
        &self,
        req: Request<pb::RekeyRequest>,
    ) -> Result<Response<pb::RekeyResponse>, Status> {
        let r = req.into_inner();
        self.timed("Rekey", async {
            if r.new_operator_names.len() != r.new_operator_keys.len() {
                return Err(Status::invalid_argument(
                    "give one name per new operator key",
                ));
            }
            let operators = r
                .new_operator_keys
                .into_iter()
                .zip(r.new_operator_names)
                .map(|(public_key, name)| Operator { name, public_key })
                .collect();
            let outcome = self
                .seal
                .rekey(RekeySubmission {
                    cluster_id: r.cluster_id,
                    config_revision: r.config_revision,
                    proposal: RekeyProposal {
                        operators,
                        threshold: r.new_threshold,
                    },
                    operator_index: r.operator_index,
                    share: r.decryption_share,
                    signature: r.signature,
                })
                .await
                .map_err(refused_status)?;
            Ok(match outcome {
                RekeyOutcome::Pending(p) => pb::RekeyResponse {
                    done: false,
                    threshold: p.threshold,
                    submitted: p.submitted,
                    ..Default::default()
                },
                RekeyOutcome::Done(d) => pb::RekeyResponse {
                    done: true,
                    cluster_id: d.cluster_id,
                    encrypted_shares: d.encrypted_shares,
                    ..Default::default()
                },
            })
        })
        .await
    }

    async fn unseal(
        &self,
        req: Request<pb::UnsealRequest>,
    ) -> Result<Response<pb::UnsealResponse>, Status> {
        let r = req.into_inner();
        self.timed("Unseal", async {
            let p = self
                .seal
                .submit(
                    Submission {
                        cluster_id: r.cluster_id,
                        seal_revision: r.seal_revision,
                        operator_index: r.operator_index,
                        share: r.decryption_share,
                        signature: r.signature,
                    },
                    true,
                )
                .await
                .map_err(refused_status)?;
            Ok(pb::UnsealResponse {
                sealed: p.sealed,
                threshold: p.threshold,
                submitted: p.submitted,
            })
        })
        .await
    }
}

fn parse_policy_name(name: &str) -> Result<(), Status> {
    policy::check_name(name).map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl coffer_api::v1::policies_server::Policies for Api {
    async fn write(
        &self,
        req: Request<pb::PolicyWriteRequest>,
    ) -> Result<Response<pb::PolicyWriteResponse>, Status> {
        self.authorize(
            &req,
            &format!("{POLICIES}/{}", req.get_ref().name),
            Capability::Update,
        )
        .await?;
        let r = req.into_inner();
        self.timed("PolicyWrite", async {
            parse_policy_name(&r.name)?;
            if r.name == policy::ADMIN {
                return Err(Status::failed_precondition(
                    "the admin policy is built in and cannot be changed; write another policy",
                ));
            }
            if r.text.len() > self.max_value_bytes {
                return Err(Status::invalid_argument(format!(
                    "the policy is {} bytes; the limit is {}",
                    r.text.len(),
                    self.max_value_bytes
                )));
            }
            let parsed = policy::parse(&r.text)
                .map_err(|e| Status::invalid_argument(format!("policy {}: {e}", r.name)))?;
            let keyring = self.keyring()?;
            let key = policy::store_key(&r.name);
            let value = self.encrypt(&keyring, &key, r.text.as_bytes())?;
            let w = self
                .write(Txn::ops(vec![Op::Put { key, value }]), &[])
                .await?;
            let view = self.node.store().read().map_err(storage_status)?;
            // Policy paths name keys as `secret/data/KEY`.
            let warnings = policy::warnings(&parsed, |prefix| {
                prefix.strip_prefix(KV_DATA).is_some_and(|key| {
                    view.list(key.as_bytes(), None, 1)
                        .map(|(keys, _)| !keys.is_empty())
                        .unwrap_or(false)
                })
            });
            Ok(pb::PolicyWriteResponse {
                warnings,
                revision: w.result.revision,
            })
        })
        .await
    }

    async fn read(
        &self,
        req: Request<pb::PolicyReadRequest>,
    ) -> Result<Response<pb::PolicyReadResponse>, Status> {
        self.authorize(
            &req,
            &format!("{POLICIES}/{}", req.get_ref().name),
            Capability::Read,
        )
        .await?;
        let r = req.into_inner();
        self.timed("PolicyRead", async {
            parse_policy_name(&r.name)?;
            let keyring = self.keyring()?;
            if r.name == policy::ADMIN {
                return Ok(pb::PolicyReadResponse {
                    name: r.name,
                    text: policy::ADMIN_TEXT.into(),
                    mod_revision: 0,
                });
            }
            self.node.linearize().await.map_err(raft_status)?;
            let view = self.node.store().read().map_err(storage_status)?;
            let key = policy::store_key(&r.name);
            let Some(entry) = view.get(&key).map_err(storage_status)? else {
                return Err(Status::not_found(format!(
                    "no policy {:?}; `coffer policy list` shows them",
                    r.name
                )));
            };
            let text = self.decrypt(&keyring, &key, &entry.value)?;
            Ok(pb::PolicyReadResponse {
                name: r.name,
                text: String::from_utf8_lossy(&text).into_owned(),
                mod_revision: entry.mod_revision,
            })
        })
        .await
    }

    async fn list(
        &self,
        req: Request<pb::PolicyListRequest>,
    ) -> Result<Response<pb::PolicyListResponse>, Status> {
        self.authorize(&req, POLICIES, Capability::List).await?;
        self.timed("PolicyList", async {
            let names = self
                .names_under(policy::STORE_PREFIX, Some(policy::ADMIN))
                .await?;
            Ok(pb::PolicyListResponse { names })
        })
        .await
    }

    async fn delete(
        &self,
        req: Request<pb::PolicyDeleteRequest>,
    ) -> Result<Response<pb::PolicyDeleteResponse>, Status> {
        self.authorize(
            &req,
            &format!("{POLICIES}/{}", req.get_ref().name),
            Capability::Delete,
        )
        .await?;
        let r = req.into_inner();
        self.timed("PolicyDelete", async {
            parse_policy_name(&r.name)?;
            if r.name == policy::ADMIN {
                return Err(Status::failed_precondition(
                    "the admin policy is built in and cannot be deleted",
                ));
            }
            self.keyring()?;
            let w = self
                .write(
                    Txn::ops(vec![Op::Delete {
                        key: policy::store_key(&r.name),
                    }]),
                    &[],
                )
                .await?;
            let deleted = matches!(
                w.result.results.first(),
                Some(OpResult::Delete { prev: Some(_) })
            );
            Ok(pb::PolicyDeleteResponse { deleted })
        })
        .await
    }
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

fn check_identity_name(name: &str, changing: bool) -> Result<(), Status> {
    identity::check_name(name).map_err(Status::invalid_argument)?;
    if changing && name == identity::ADMIN {
        return Err(Status::failed_precondition(
            "the admin identity is the administrator key given at init; it cannot be changed",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl coffer_api::v1::identities_server::Identities for Api {
    async fn create(
        &self,
        req: Request<pb::IdentityCreateRequest>,
    ) -> Result<Response<pb::IdentityResponse>, Status> {
        self.authorize(
            &req,
            &format!("{IDENTITIES}/{}", req.get_ref().name),
            Capability::Create,
        )
        .await?;
        let r = req.into_inner();
        self.timed("IdentityCreate", async {
            check_identity_name(&r.name, true)?;
            let key = PublicKey::from_bytes(&r.public_key).map_err(|e| {
                Status::invalid_argument(format!("the public key: {e:#} (use a .pub file from `coffer keygen`)"))
            })?;
            let policies =
                identity::check_policies(&r.policies).map_err(Status::invalid_argument)?;
            auth::check_ttls(r.default_session_ttl_seconds, r.max_session_ttl_seconds)
                .map_err(Status::invalid_argument)?;
            let keyring = self.keyring()?;
            let fingerprint = key.fingerprint();
            if self.admin_identity()?.fingerprint == fingerprint {
                return Err(Status::already_exists(
                    "this key is the administrator's (identity admin); give each identity its own key",
                ));
            }
            let record_key = identity::store_key(&r.name);
            let index_key = identity::key_index(&fingerprint);
            let record = identity::Identity {
                public_key: r.public_key,
                policies,
                default_ttl_s: r.default_session_ttl_seconds,
                max_ttl_s: r.max_session_ttl_seconds,
            };
            let txn = Txn {
                compare: vec![
                    Compare::Absent(record_key.clone()),
                    Compare::Absent(index_key.clone()),
                ],
                success: vec![
                    Op::Put {
                        value: self.sealed_record(&keyring, &record_key, &record)?,
                        key: record_key,
                    },
                    Op::Put {
                        value: self.encrypt(&keyring, &index_key, r.name.as_bytes())?,
                        key: index_key,
                    },
                ],
                failure: Vec::new(),
            };
            let w = self.write(txn, &[]).await?;
            if !w.result.succeeded {
                return Err(Status::already_exists(format!(
                    "an identity named {:?}, or one with key {fingerprint}, already exists; `coffer identity list` shows them",
                    r.name
                )));
            }
            let warnings = self.missing_policies(&record.policies)?;
            Self::identity_response(r.name, record, w.result.revision, warnings)
        })
        .await
    }

    async fn read(
        &self,
        req: Request<pb::IdentityReadRequest>,
    ) -> Result<Response<pb::IdentityResponse>, Status> {
        self.authorize(
            &req,
            &format!("{IDENTITIES}/{}", req.get_ref().name),
            Capability::Read,
        )
        .await?;
        let r = req.into_inner();
        self.timed("IdentityRead", async {
            check_identity_name(&r.name, false)?;
            let keyring = self.keyring()?;
            if r.name == identity::ADMIN {
                // Built in, plus the policies an administrator added to it.
                let mut admin = self.admin_identity()?;
                if let Some((record, rev)) = self.stored_identity(&keyring, &r.name).await? {
                    admin.policies.extend(record.policies);
                    admin.mod_revision = rev;
                    admin.default_session_ttl_seconds = record.default_ttl_s.unwrap_or(0);
                    admin.max_session_ttl_seconds = record.max_ttl_s.unwrap_or(0);
                }
                return Ok(admin);
            }
            match self.stored_identity(&keyring, &r.name).await? {
                Some((record, rev)) => Self::identity_response(r.name, record, rev, Vec::new()),
                None => Err(Status::not_found(format!(
                    "no identity {:?}; `coffer identity list` shows them",
                    r.name
                ))),
            }
        })
        .await
    }

    async fn list(
        &self,
        req: Request<pb::IdentityListRequest>,
    ) -> Result<Response<pb::IdentityListResponse>, Status> {
        self.authorize(&req, IDENTITIES, Capability::List).await?;
        self.timed("IdentityList", async {
            let names = self
                .names_under(identity::STORE_PREFIX, Some(identity::ADMIN))
                .await?;
            Ok(pb::IdentityListResponse { names })
        })
        .await
    }

    async fn update(
        &self,
        req: Request<pb::IdentityUpdateRequest>,
    ) -> Result<Response<pb::IdentityResponse>, Status> {
        self.authorize(
            &req,
            &format!("{IDENTITIES}/{}", req.get_ref().name),
            Capability::Update,
        )
        .await?;
        let r = req.into_inner();
        self.timed("IdentityUpdate", async {
            check_identity_name(&r.name, false)?;
            let mut policies =
                identity::check_policies(&r.policies).map_err(Status::invalid_argument)?;
            let keyring = self.keyring()?;
            let admin = r.name == identity::ADMIN;
            let (mut record, rev) = match self.stored_identity(&keyring, &r.name).await? {
                Some(found) => found,
                // The administrator holds the built-in policy and any added to it (for example
                // data access in a development cluster); its key stays the one given at init.
                None if admin => (
                    identity::Identity {
                        public_key: self.admin_identity()?.public_key,
                        policies: Vec::new(),
                        default_ttl_s: None,
                        max_ttl_s: None,
                    },
                    0,
                ),
                None => return Err(Status::not_found(format!("no identity {:?}", r.name))),
            };
            if admin {
                policies.retain(|p| p != policy::ADMIN);
            }
            record.policies = policies;
            let set = |v: Option<u64>, old: Option<u64>| match v {
                None => old,
                Some(0) => None,
                Some(v) => Some(v),
            };
            record.default_ttl_s = set(r.default_session_ttl_seconds, record.default_ttl_s);
            record.max_ttl_s = set(r.max_session_ttl_seconds, record.max_ttl_s);
            auth::check_ttls(record.default_ttl_s, record.max_ttl_s)
                .map_err(Status::invalid_argument)?;
            let key = identity::store_key(&r.name);
            let txn = Txn {
                compare: vec![Compare::ModRevision(key.clone(), rev)],
                success: vec![Op::Put {
                    value: self.sealed_record(&keyring, &key, &record)?,
                    key,
                }],
                failure: Vec::new(),
            };
            let w = self.write(txn, &[]).await?;
            if !w.result.succeeded {
                return Err(Status::aborted(format!(
                    "identity {:?} changed meanwhile; run the command again",
                    r.name
                )));
            }
            let warnings = self.missing_policies(&record.policies)?;
            if admin {
                record.policies.insert(0, policy::ADMIN.to_string());
            }
            Self::identity_response(r.name, record, w.result.revision, warnings)
        })
        .await
    }

    async fn delete(
        &self,
        req: Request<pb::IdentityDeleteRequest>,
    ) -> Result<Response<pb::IdentityDeleteResponse>, Status> {
        self.authorize(
            &req,
            &format!("{IDENTITIES}/{}", req.get_ref().name),
            Capability::Delete,
        )
        .await?;
        let r = req.into_inner();
        self.timed("IdentityDelete", async {
            check_identity_name(&r.name, true)?;
            let keyring = self.keyring()?;
            let Some((record, rev)) = self.stored_identity(&keyring, &r.name).await? else {
                return Ok(pb::IdentityDeleteResponse { deleted: false });
            };
            let fingerprint = PublicKey::from_bytes(&record.public_key)
                .map_err(|e| Status::data_loss(format!("{e:#}")))?
                .fingerprint();
            let key = identity::store_key(&r.name);
            let txn = Txn {
                compare: vec![Compare::ModRevision(key.clone(), rev)],
                success: vec![
                    Op::Delete { key },
                    Op::Delete {
                        key: identity::key_index(&fingerprint),
                    },
                ],
                failure: Vec::new(),
            };
            let w = self.write(txn, &[]).await?;
            if !w.result.succeeded {
                return Err(Status::aborted(format!(
                    "identity {:?} changed meanwhile; run the command again",
                    r.name
                )));
            }
            Ok(pb::IdentityDeleteResponse { deleted: true })
        })
        .await
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

#[tonic::async_trait]
impl coffer_api::v1::auth_server::Auth for Api {
    async fn challenge(
        &self,
        req: Request<pb::ChallengeRequest>,
    ) -> Result<Response<pb::ChallengeResponse>, Status> {
        self.timed("Challenge", async {
            self.rate_limit(&req)?;
            let keyring = self.keyring()?;
            let cluster_id = self.admin_cluster()?.0;
            let ttl_ms = u64::try_from(self.login.challenge_ttl.as_millis()).unwrap_or(u64::MAX);
            let challenge = auth::issue_challenge(&keyring, auth::now_ms(), ttl_ms)
                .map_err(|e| Status::internal(format!("{e:#}")))?;
            Ok(pb::ChallengeResponse {
                challenge,
                cluster_id,
            })
        })
        .await
    }

    async fn login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        self.rate_limit(&req)?;
        let r = req.into_inner();
        self.timed("Login", async {
            let keyring = self.keyring()?;
            let (cluster_id, admin_fingerprint) = self.admin_cluster()?;
            let (nonce, challenge_expiry) =
                auth::check_challenge(&keyring, &r.challenge, auth::now_ms())
                    .map_err(unauthenticated)?;
            let key = PublicKey::from_bytes(&r.public_key)
                .map_err(|e| Status::unauthenticated(format!("the identity key: {e:#}")))?;
            PublicKey::from_bytes(&r.session_public_key)
                .map_err(|e| Status::invalid_argument(format!("the session key: {e:#}")))?;
            let fingerprint = key.fingerprint();
            // The login commits only if the key still names the same identity.
            let mut index_compare = None;
            let identity = if fingerprint == admin_fingerprint {
                identity::ADMIN.to_string()
            } else {
                self.node.linearize().await.map_err(raft_status)?;
                let view = self.node.store().read().map_err(storage_status)?;
                let index = identity::key_index(&fingerprint);
                let entry = view.get(&index).map_err(storage_status)?.ok_or_else(|| {
                    unauthenticated(auth::Refused::UnknownKey(fingerprint.clone()))
                })?;
                let name = self.decrypt(&keyring, &index, &entry.value)?;
                index_compare = Some(Compare::ModRevision(index, entry.mod_revision));
                String::from_utf8_lossy(&name).into_owned()
            };
            key.verify(
                // Signed as requested (0 = the default).
                &auth::login_message(
                    &cluster_id,
                    &r.challenge,
                    &r.session_public_key,
                    r.ttl_seconds,
                ),
                &r.signature,
            )
            .map_err(|_| unauthenticated(auth::Refused::BadSignature(fingerprint.clone())))?;
            // The lifetime: the identity's own limits within the cluster's.
            let own: Option<identity::Identity> = self
                .read_record(&keyring, &identity::store_key(&identity))?
                .map(|(record, _)| record);
            let ttl_s = auth::session_ttl(
                r.ttl_seconds,
                self.cluster_ttls(&keyring)?,
                own.as_ref().and_then(|i| i.default_ttl_s),
                own.as_ref().and_then(|i| i.max_ttl_s),
                &identity,
            )
            .map_err(Status::invalid_argument)?;
            let now = auth::now_ms();
            let session = auth::Session {
                identity,
                identity_key: r.public_key,
                session_key: r.session_public_key,
                created_ms: now,
                expires_ms: now + ttl_s * 1000,
                kubernetes: None,
            };
            self.open_session(&keyring, session, &nonce, challenge_expiry, index_compare)
                .await
        })
        .await
    }

    async fn kubernetes_login(
        &self,
        req: Request<pb::KubernetesLoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        self.rate_limit(&req)?;
        let r = req.into_inner();
        self.timed("KubernetesLogin", async {
            let keyring = self.keyring()?;
            let (cluster_id, _) = self.admin_cluster()?;
            let (nonce, challenge_expiry) =
                auth::check_challenge(&keyring, &r.challenge, auth::now_ms())
                    .map_err(unauthenticated)?;
            let session_key = PublicKey::from_bytes(&r.session_public_key)
                .map_err(|e| Status::invalid_argument(format!("the session key: {e:#}")))?;
            // The session key signs the challenge, the role and the token: whoever sends this
            // holds the key the certificate will be for.
            session_key
                .verify(
                    &kubernetes::login_message(
                        &cluster_id,
                        &r.challenge,
                        &r.role,
                        &r.token,
                        &r.session_public_key,
                        r.ttl_seconds,
                    ),
                    &r.signature,
                )
                .map_err(|_| {
                    Status::unauthenticated(
                        "the signature does not match the session key over this login (wrong purpose, challenge, role or token)",
                    )
                })?;
            policy::check_name(&r.role).map_err(Status::invalid_argument)?;
            self.node.linearize().await.map_err(raft_status)?;
            let role_key = kubernetes::role_key(&r.role);
            let view = self.node.store().read().map_err(storage_status)?;
            let entry = view.get(&role_key).map_err(storage_status)?.ok_or_else(|| {
                Status::unauthenticated(format!(
                    "no Kubernetes role {:?}; an administrator writes it with `coffer auth kubernetes role write`",
                    r.role
                ))
            })?;
            drop(view);
            let role: kubernetes::Role =
                postcard::from_bytes(&self.decrypt(&keyring, &role_key, &entry.value)?)
                    .map_err(|e| Status::data_loss(format!("role {:?} is corrupt: {e}", r.role)))?;
            let account = self
                .kubernetes
                .validate(&r.token, &role.audience)
                .await
                .map_err(|refusal| match refusal {
                    kubernetes::Refusal::Invalid(why) => {
                        tracing::info!(role = r.role, reason = why, "Kubernetes login refused");
                        Status::unauthenticated(why)
                    }
                    kubernetes::Refusal::Unavailable(why) => {
                        tracing::warn!(role = r.role, reason = why, "Kubernetes login unavailable");
                        Status::unavailable(why)
                    }
                })?;
            role.admits(&account).map_err(|why| {
                tracing::info!(role = r.role, account = account.username(), reason = why, "Kubernetes login refused");
                Status::permission_denied(why)
            })?;
            let who = format!("k8s:{}/{}", account.namespace, account.name);
            let ttl_s = auth::session_ttl(
                r.ttl_seconds,
                self.cluster_ttls(&keyring)?,
                None,
                role.max_ttl_s,
                &who,
            )
            .map_err(Status::invalid_argument)?;
            let now = auth::now_ms();
            let session = auth::Session {
                identity: who,
                identity_key: Vec::new(),
                session_key: r.session_public_key,
                created_ms: now,
                expires_ms: now + ttl_s * 1000,
                kubernetes: Some((r.role, account)),
            };
            // The login commits only if the role did not change since it was read.
            let also = Some(Compare::ModRevision(role_key, entry.mod_revision));
            self.open_session(&keyring, session, &nonce, challenge_expiry, also)
                .await
        })
        .await
    }
}

impl Api {
    /// Removes login state nobody can use any more, if this node leads: used challenge nonces
    /// whose challenge expired, and sessions that ended, each at least the configured grace ago (so that a
    /// node whose clock is behind still refuses them). At most 1,000 of each per call, in
    /// transactions that delete a record only if it did not change meanwhile. Returns how many
    /// nonces and sessions were removed.
    pub async fn clean_up_logins(&self) -> Result<(usize, usize), Status> {
        let grace = self.login.cleanup_grace;
        if self.node.leader_id() != Some(self.node.id()) {
            return Ok((0, 0));
        }
        let keyring = self.keyring()?;
        let cutoff =
            auth::now_ms().saturating_sub(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
        let view = self.node.store().read().map_err(storage_status)?;
        // Looks at up to 10,000 records of a kind per round and removes up to 1,000; a record
        // that cannot be read is left for an operator to look at.
        let ended = |prefix: &[u8],
                     end_of: &dyn Fn(&KvEntry) -> Option<u64>|
         -> Result<Vec<(Vec<u8>, u64)>, Status> {
            Ok(entries_under(&view, prefix, 10_000)?
                .iter()
                .filter(|e| end_of(e).is_some_and(|end| end < cutoff))
                .take(1000)
                .map(|e| (e.key.clone(), e.mod_revision))
                .collect())
        };
        let nonces = ended(auth::NONCE_PREFIX, &|e| {
            <[u8; 8]>::try_from(e.value.as_slice())
                .ok()
                .map(u64::from_be_bytes)
        })?;
        let sessions = ended(auth::SESSION_PREFIX, &|e| {
            let plain = keyring.decrypt(&e.key, &e.value).ok()?;
            postcard::from_bytes::<auth::Session>(&plain)
                .ok()
                .map(|s| s.expires_ms)
        })?;
        drop(view);
        let mut removed = [0usize; 2];
        for (kind, doomed) in [&nonces, &sessions].into_iter().enumerate() {
            for chunk in doomed.chunks(64) {
                let txn = Txn {
                    compare: chunk
                        .iter()
                        .map(|(k, rev)| Compare::ModRevision(k.clone(), *rev))
                        .collect(),
                    success: chunk
                        .iter()
                        .map(|(k, _)| Op::Delete { key: k.clone() })
                        .collect(),
                    failure: Vec::new(),
                };
                if self.write(txn, &[]).await?.result.succeeded {
                    removed[kind] += chunk.len();
                }
            }
        }
        self.metrics.login_state_removed("nonce", removed[0]);
        self.metrics.login_state_removed("session", removed[1]);
        Ok((removed[0], removed[1]))
    }

    /// Runs [`Api::clean_up_logins`] at the configured interval, for as long as the node runs.
    pub async fn clean_up_logins_loop(self) {
        let mut tick = tokio::time::interval(self.login.cleanup_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            match self.clean_up_logins().await {
                Ok((0, 0)) => {}
                Ok((nonces, sessions)) => {
                    tracing::info!(
                        nonces,
                        sessions,
                        "removed used login challenges and ended sessions"
                    )
                }
                Err(e) if e.code() == tonic::Code::FailedPrecondition => {} // sealed
                Err(e) => {
                    tracing::warn!(error = %e.message(), "login clean-up failed; trying again later")
                }
            }
        }
    }
}

fn role_response(
    name: String,
    role: kubernetes::Role,
    warnings: Vec<String>,
) -> pb::KubernetesRole {
    pb::KubernetesRole {
        name,
        bound_service_accounts: role.bound_service_accounts,
        bound_namespaces: role.bound_namespaces,
        audience: role.audience,
        policies: role.policies,
        max_session_ttl_seconds: role.max_ttl_s.unwrap_or(0),
        warnings,
    }
}

#[tonic::async_trait]
impl coffer_api::v1::kubernetes_roles_server::KubernetesRoles for Api {
    async fn write(
        &self,
        req: Request<pb::KubernetesRole>,
    ) -> Result<Response<pb::KubernetesRole>, Status> {
        let path = format!("{}/{}", kubernetes::ROLE_PATH, req.get_ref().name);
        self.authorize(&req, &path, Capability::Update).await?;
        let r = req.into_inner();
        self.timed("KubernetesRoleWrite", async {
            policy::check_name(&r.name).map_err(Status::invalid_argument)?;
            let policies =
                identity::check_policies(&r.policies).map_err(Status::invalid_argument)?;
            let max_ttl_s = (r.max_session_ttl_seconds > 0).then_some(r.max_session_ttl_seconds);
            auth::check_ttls(None, max_ttl_s).map_err(Status::invalid_argument)?;
            let role = kubernetes::Role {
                bound_service_accounts: r.bound_service_accounts,
                bound_namespaces: r.bound_namespaces,
                audience: r.audience,
                policies,
                max_ttl_s,
            };
            role.check().map_err(Status::invalid_argument)?;
            let keyring = self.keyring()?;
            let key = kubernetes::role_key(&r.name);
            let value = self.sealed_record(&keyring, &key, &role)?;
            self.write(Txn::ops(vec![Op::Put { key, value }]), &[]).await?;
            let mut warnings = self.missing_policies(&role.policies)?;
            if !self.kubernetes.enabled() {
                warnings.push(
                    "Kubernetes login is not configured on this node (--kubernetes-api-url, --kubernetes-in-cluster or --kubernetes-issuer)".into(),
                );
            }
            Ok(role_response(r.name, role, warnings))
        })
        .await
    }

    async fn read(
        &self,
        req: Request<pb::KubernetesRoleName>,
    ) -> Result<Response<pb::KubernetesRole>, Status> {
        let path = format!("{}/{}", kubernetes::ROLE_PATH, req.get_ref().name);
        self.authorize(&req, &path, Capability::Read).await?;
        let name = req.into_inner().name;
        self.timed("KubernetesRoleRead", async {
            policy::check_name(&name).map_err(Status::invalid_argument)?;
            let keyring = self.keyring()?;
            self.node.linearize().await.map_err(raft_status)?;
            match self.read_record::<kubernetes::Role>(&keyring, &kubernetes::role_key(&name))? {
                Some((role, _)) => Ok(role_response(name, role, Vec::new())),
                None => Err(Status::not_found(format!(
                    "no Kubernetes role {name:?}; `coffer auth kubernetes role list` shows them"
                ))),
            }
        })
        .await
    }

    async fn list(
        &self,
        req: Request<pb::KubernetesRoleListRequest>,
    ) -> Result<Response<pb::KubernetesRoleListResponse>, Status> {
        self.authorize(&req, kubernetes::ROLE_PATH, Capability::List)
            .await?;
        self.timed("KubernetesRoleList", async {
            let names = self.names_under(kubernetes::ROLE_PREFIX, None).await?;
            Ok(pb::KubernetesRoleListResponse { names })
        })
        .await
    }

    async fn delete(
        &self,
        req: Request<pb::KubernetesRoleName>,
    ) -> Result<Response<pb::KubernetesRoleDeleteResponse>, Status> {
        let path = format!("{}/{}", kubernetes::ROLE_PATH, req.get_ref().name);
        self.authorize(&req, &path, Capability::Delete).await?;
        let name = req.into_inner().name;
        self.timed("KubernetesRoleDelete", async {
            policy::check_name(&name).map_err(Status::invalid_argument)?;
            self.keyring()?;
            let w = self
                .write(
                    Txn::ops(vec![Op::Delete {
                        key: kubernetes::role_key(&name),
                    }]),
                    &[],
                )
                .await?;
            let deleted = matches!(
                w.result.results.first(),
                Some(OpResult::Delete { prev: Some(_) })
            );
            Ok(pb::KubernetesRoleDeleteResponse { deleted })
        })
        .await
    }
}

fn grant_info(id: String, g: delegation::Delegation) -> pb::GrantInfo {
    pb::GrantInfo {
        id,
        grantor: g.grantor,
        grantee: g.grantee,
        path: g.path,
        capabilities: g.capabilities,
        created_at_ms: g.created_ms,
        expires_at_ms: g.expires_ms,
    }
}

impl Api {
    /// Every stored grant (after a read index) with its id, key and revision.
    async fn all_grants(
        &self,
        keyring: &Keyring,
    ) -> Result<Vec<(String, Vec<u8>, u64, delegation::Delegation)>, Status> {
        self.node.linearize().await.map_err(raft_status)?;
        let view = self.node.store().read().map_err(storage_status)?;
        entries_under(&view, delegation::PREFIX, usize::MAX)?
            .into_iter()
            .map(|e| {
                let plain = self.decrypt(keyring, &e.key, &e.value)?;
                let g: delegation::Delegation = postcard::from_bytes(&plain)
                    .map_err(|err| Status::data_loss(format!("a grant is corrupt: {err}")))?;
                let id = String::from_utf8_lossy(&e.key)
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                Ok((id, e.key, e.mod_revision, g))
            })
            .collect()
    }
}

#[tonic::async_trait]
impl coffer_api::v1::grants_server::Grants for Api {
    async fn create(
        &self,
        req: Request<pb::GrantCreateRequest>,
    ) -> Result<Response<pb::GrantInfo>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        self.timed("GrantCreate", async {
            check_identity_name(&r.grantee, false)?;
            let pattern = delegation::path(&r.path).map_err(Status::invalid_argument)?;
            let caps =
                delegation::capabilities(&r.capabilities).map_err(Status::invalid_argument)?;
            if r.ttl_seconds == 0 || r.ttl_seconds > delegation::MAX_SECONDS {
                return Err(Status::invalid_argument(format!(
                    "a grant lasts 1 to {} seconds (30 days), not {}",
                    delegation::MAX_SECONDS,
                    r.ttl_seconds
                )));
            }
            if caller.identity == r.grantee {
                return Err(Status::invalid_argument("a grant is for another identity"));
            }
            let caller = self
                .permit(caller, |g| {
                    delegation::may_grant(&g.acl, &pattern, &caps)
                        .map_err(Status::permission_denied)
                })
                .await?;
            let keyring = self.keyring()?;
            if r.grantee != identity::ADMIN
                && self.stored_identity(&keyring, &r.grantee).await?.is_none()
            {
                return Err(Status::not_found(format!(
                    "no identity {:?} to grant to; `coffer identity list` shows them",
                    r.grantee
                )));
            }
            let now = auth::now_ms();
            let grant = delegation::Delegation {
                grantor: caller.identity.clone(),
                grantee: r.grantee.clone(),
                path: pattern.as_str().to_string(),
                capabilities: caps.iter().map(|c| c.as_str().to_string()).collect(),
                created_ms: now,
                expires_ms: now + r.ttl_seconds * 1000,
            };
            let id = uuid::Uuid::new_v4().simple().to_string();
            let key = delegation::key(&r.grantee, &id);
            let value = self.sealed_record(&keyring, &key, &grant)?;
            self.write(Txn::ops(vec![Op::Put { key, value }]), &[])
                .await?;
            tracing::info!(
                grantor = grant.grantor,
                grantee = grant.grantee,
                path = grant.path,
                id,
                "grant created"
            );
            Ok(grant_info(id, grant))
        })
        .await
    }

    async fn list(
        &self,
        req: Request<pb::GrantListRequest>,
    ) -> Result<Response<pb::GrantListResponse>, Status> {
        let caller = self.caller(&req).await?;
        self.timed("GrantList", async {
            let keyring = self.keyring()?;
            let all = caller.acl.allows(delegation::PATH, Capability::List);
            let now = auth::now_ms();
            let grants = self
                .all_grants(&keyring)
                .await?
                .into_iter()
                .filter(|(_, _, _, g)| {
                    g.expires_ms > now
                        && (all || g.grantor == caller.identity || g.grantee == caller.identity)
                })
                .map(|(id, _, _, g)| grant_info(id, g))
                .collect();
            Ok(pb::GrantListResponse { grants })
        })
        .await
    }

    async fn revoke(
        &self,
        req: Request<pb::GrantRevokeRequest>,
    ) -> Result<Response<pb::GrantRevokeResponse>, Status> {
        let caller = self.caller(&req).await?;
        let id = req.into_inner().id;
        self.timed("GrantRevoke", async {
            let keyring = self.keyring()?;
            let Some((_, key, rev, g)) = self
                .all_grants(&keyring)
                .await?
                .into_iter()
                .find(|(gid, ..)| *gid == id)
            else {
                return Ok(pb::GrantRevokeResponse { revoked: false });
            };
            let path = format!("{}/{id}", delegation::PATH);
            self.permit(caller, |c| {
                if c.identity == g.grantor {
                    Ok(())
                } else {
                    allow(c, &path, Capability::Delete)
                }
            })
            .await?;
            let txn = Txn {
                compare: vec![Compare::ModRevision(key.clone(), rev)],
                success: vec![Op::Delete { key }],
                failure: Vec::new(),
            };
            let revoked = self.write(txn, &[]).await?.result.succeeded;
            Ok(pb::GrantRevokeResponse { revoked })
        })
        .await
    }
}

/// Cluster settings are read (`read`) and written (`update`) at this path.
pub const SETTINGS: &str = "sys/settings";

impl Api {
    /// The stored settings (after a read index) and their revision; the defaults if none.
    async fn settings(&self) -> Result<(auth::Settings, u64), Status> {
        let keyring = self.keyring()?;
        self.node.linearize().await.map_err(raft_status)?;
        Ok(self
            .read_record(&keyring, auth::SETTINGS_KEY)?
            .unwrap_or_default())
    }
}

fn settings_response(settings: auth::Settings, mod_revision: u64) -> pb::SettingsResponse {
    pb::SettingsResponse {
        default_session_ttl_seconds: settings.session.default_s,
        max_session_ttl_seconds: settings.session.max_s,
        mod_revision,
    }
}

#[tonic::async_trait]
impl coffer_api::v1::settings_server::Settings for Api {
    async fn read(
        &self,
        req: Request<pb::SettingsReadRequest>,
    ) -> Result<Response<pb::SettingsResponse>, Status> {
        self.authorize(&req, SETTINGS, Capability::Read).await?;
        self.timed("SettingsRead", async {
            let (settings, rev) = self.settings().await?;
            Ok(settings_response(settings, rev))
        })
        .await
    }

    async fn write(
        &self,
        req: Request<pb::SettingsWriteRequest>,
    ) -> Result<Response<pb::SettingsResponse>, Status> {
        self.authorize(&req, SETTINGS, Capability::Update).await?;
        let r = req.into_inner();
        self.timed("SettingsWrite", async {
            let or = |v: u64, builtin: u64| if v == 0 { builtin } else { v };
            let session = auth::SessionTtls {
                default_s: or(r.default_session_ttl_seconds, auth::BUILTIN_TTLS.default_s),
                max_s: or(r.max_session_ttl_seconds, auth::BUILTIN_TTLS.max_s),
            };
            auth::check_ttls(Some(session.default_s), Some(session.max_s))
                .map_err(Status::invalid_argument)?;
            let settings = auth::Settings { session };
            let keyring = self.keyring()?;
            let value = self.sealed_record(&keyring, auth::SETTINGS_KEY, &settings)?;
            let w = self
                .write(
                    Txn::ops(vec![Op::Put {
                        key: auth::SETTINGS_KEY.to_vec(),
                        value,
                    }]),
                    &[],
                )
                .await?;
            Ok(settings_response(settings, w.result.revision))
        })
        .await
    }
}

/// An administrator's emergency seal is authorized at this path (`sudo`).
pub const EMERGENCY_SEAL: &str = "sys/seal";

/// Sessions are managed at this path and the session id (`list` on the path itself).
pub const SESSIONS: &str = "sys/sessions";

#[tonic::async_trait]
impl coffer_api::v1::sessions_server::Sessions for Api {
    async fn list(
        &self,
        req: Request<pb::SessionListRequest>,
    ) -> Result<Response<pb::SessionListResponse>, Status> {
        self.authorize(&req, SESSIONS, Capability::List).await?;
        let r = req.into_inner();
        self.timed("SessionList", async {
            let keyring = self.keyring()?;
            self.node.linearize().await.map_err(raft_status)?;
            let view = self.node.store().read().map_err(storage_status)?;
            let now = auth::now_ms();
            let mut sessions = Vec::new();
            for e in entries_under(&view, auth::SESSION_PREFIX, usize::MAX)? {
                let plain = self.decrypt(&keyring, &e.key, &e.value)?;
                let s: auth::Session = postcard::from_bytes(&plain)
                    .map_err(|e| Status::data_loss(format!("a session is corrupt: {e}")))?;
                if s.expires_ms > now && (r.identity.is_empty() || r.identity == s.identity) {
                    sessions.push(pb::SessionInfo {
                        session_id: String::from_utf8_lossy(&e.key[auth::SESSION_PREFIX.len()..])
                            .into_owned(),
                        identity: s.identity,
                        created_at_ms: s.created_ms,
                        expires_at_ms: s.expires_ms,
                    });
                }
            }
            sessions.sort_by(|a, b| {
                (&a.identity, a.created_at_ms).cmp(&(&b.identity, b.created_at_ms))
            });
            Ok(pb::SessionListResponse { sessions })
        })
        .await
    }

    async fn revoke(
        &self,
        req: Request<pb::SessionRevokeRequest>,
    ) -> Result<Response<pb::SessionRevokeResponse>, Status> {
        let caller = self.caller(&req).await?;
        let id = req.into_inner().session_id;
        self.timed("SessionRevoke", async {
            let id = if id.is_empty() {
                caller.session_id.clone()
            } else {
                id
            };
            if !(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())) {
                return Err(Status::invalid_argument(format!(
                    "{id:?} is not a session id (32 hex digits; `coffer session list` shows them)"
                )));
            }
            let path = format!("{SESSIONS}/{id}");
            let caller = self
                .permit(caller, |g| {
                    if id == g.session_id {
                        Ok(())
                    } else {
                        allow(g, &path, Capability::Delete)
                    }
                })
                .await?;
            let w = self
                .write(
                    Txn::ops(vec![Op::Delete {
                        key: auth::session_key(&id),
                    }]),
                    &[],
                )
                .await?;
            let revoked = matches!(
                w.result.results.first(),
                Some(OpResult::Delete { prev: Some(_) })
            );
            if revoked {
                tracing::info!(session = id, by = caller.identity, "session revoked");
            }
            Ok(pb::SessionRevokeResponse { revoked })
        })
        .await
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
    fn request_ids_are_empty_or_16_bytes() {
        assert_eq!(parse_request_id(&[]).unwrap(), None);
        assert!(parse_request_id(&[7; 16]).unwrap().is_some());
        assert_eq!(
            parse_request_id(&[1, 2]).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
