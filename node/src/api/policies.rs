//! The `Policies` service: path policies in Vault's HCL.

use super::*;

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
        let r = req.into_inner();
        self.timed("PolicyList", async {
            let names = self
                .names_under(policy::STORE_PREFIX, Some(policy::ADMIN))
                .await?;
            let (names, more) = page(names, |n| n, &r.start_after, r.limit)?;
            Ok(pb::PolicyListResponse { names, more })
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
