//! The `Grants` service: delegation of a capability until a time.

use super::identities::check_identity_name;
use super::*;

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
        let r = req.into_inner();
        self.timed("GrantList", async {
            let keyring = self.keyring()?;
            let all = caller.acl.allows(delegation::PATH, Capability::List);
            let now = auth::now_ms();
            let mut grants: Vec<pb::GrantInfo> = self
                .all_grants(&keyring)
                .await?
                .into_iter()
                .filter(|(_, _, _, g)| {
                    g.expires_ms > now
                        && (all || g.grantor == caller.identity || g.grantee == caller.identity)
                })
                .map(|(id, _, _, g)| grant_info(id, g))
                .collect();
            grants.sort_by(|a, b| a.id.cmp(&b.id));
            let (grants, more) = page(grants, |g| &g.id, &r.start_after, r.limit)?;
            Ok(pb::GrantListResponse { grants, more })
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
