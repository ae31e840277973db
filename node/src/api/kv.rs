//! The `Kv` service: the raw key/value store API, each key authorized as `secret/data/KEY`.
//! Served only with `--raw-storage-endpoint` (for debugging and the older tests); services use
//! the secrets engines.

use super::*;
use crate::kv_engine;

impl Api {
    fn raw_storage_on(&self) -> Result<(), Status> {
        if self.raw_storage {
            return Ok(());
        }
        Err(Status::unimplemented(
            "the raw store API is off on this node: use the kv secrets engine (coffer.kv.v1: `coffer kv`, the SDK); an operator can serve it for debugging with --raw-storage-endpoint",
        ))
    }
}

#[tonic::async_trait]
impl Kv for Api {
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        self.timed("Put", async {
            self.raw_storage_on()?;
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
            self.raw_storage_on()?;
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
            self.raw_storage_on()?;
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
            self.raw_storage_on()?;
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
            if r.prefix
                .first()
                .is_some_and(|&b| b <= kv_engine::ENGINE_BYTE)
            {
                return Err(Status::invalid_argument(
                    "keys starting with a NUL or \\x01 byte are reserved for Coffer itself",
                ));
            }
            let keyring = self.keyring()?;
            let index = self.read_point(r.consistency).await?;
            let grant = self.recheck(&grant)?;
            allow(&grant, &path, Capability::List)?;
            let view = self.node.store().read().map_err(storage_status)?;
            // Coffer's own keys all start with a NUL byte and sort first: a listing from the
            // start skips past them instead of paging through them.
            const PAST_RESERVED: &[u8] = b"\x01\xff";
            let after = if r.prefix.is_empty() && r.start_after.as_slice() < PAST_RESERVED {
                Some(PAST_RESERVED)
            } else {
                (!r.start_after.is_empty()).then_some(r.start_after.as_slice())
            };
            let (mut entries, more) = view.list(&r.prefix, after, limit).map_err(storage_status)?;
            // Coffer's own keys (the seal configuration) sort first; they are not listed.
            entries.retain(|e| e.key.first().is_some_and(|&b| b > kv_engine::ENGINE_BYTE));
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
            self.raw_storage_on()?;
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
