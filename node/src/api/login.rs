//! The `Auth` service (challenge, key and Kubernetes login) and the leader's clean-up of login state.

use super::*;

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
                &coffer_client::login::key_login_message(
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
                    &coffer_client::login::kubernetes_login_message(
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
            if r.role == node_identity::KUBERNETES_MEMBER_ROLE {
                return Err(Status::permission_denied(format!(
                    "the Kubernetes role {:?} is reserved for nodes joining the cluster; no session logs in with it",
                    r.role
                )));
            }
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
