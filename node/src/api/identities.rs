//! The `Identities` service: registered client keys and their policies.

use super::*;

pub(super) fn check_identity_name(name: &str, changing: bool) -> Result<(), Status> {
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
        let r = req.into_inner();
        self.timed("IdentityList", async {
            let names = self
                .names_under(identity::STORE_PREFIX, Some(identity::ADMIN))
                .await?;
            let (names, more) = page(names, |n| n, &r.start_after, r.limit)?;
            Ok(pb::IdentityListResponse { names, more })
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
