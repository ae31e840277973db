//! The `KubernetesRoles` service: which service accounts log in with which policies.

use super::*;

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
        if req.get_ref().name == node_identity::KUBERNETES_MEMBER_ROLE {
            // It admits cluster members: as much as a membership change.
            self.authorize(&req, RAFT_MEMBERS, Capability::Update)
                .await?;
        }
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
        let r = req.into_inner();
        self.timed("KubernetesRoleList", async {
            let names = self.names_under(kubernetes::ROLE_PREFIX, None).await?;
            let (names, more) = page(names, |n| n, &r.start_after, r.limit)?;
            Ok(pb::KubernetesRoleListResponse { names, more })
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
