//! The `Cluster` service: status, membership, snapshots, and nodes registering and joining.

use super::*;

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
                last_contact_ms: s
                    .last_contact
                    .iter()
                    .filter_map(|(id, d)| d.map(|d| (*id, d.as_millis() as u64)))
                    .collect(),
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
            let raft_index = self.remove_member(id).await?;
            Ok(pb::MembershipResponse { raft_index })
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
                    compare: vec![
                        Compare::Absent(node_identity::node_key_record(id)),
                        Compare::Absent(node_identity::node_retired_record(id)),
                    ],
                    success: vec![Op::Put {
                        key: node_identity::node_key_record(id),
                        value: r.public_key,
                    }],
                    failure: Vec::new(),
                },
                &format!("node {id} has a registered key already, or was removed; ids are never reused: pick a new one"),
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

    type SnapshotSaveStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::SnapshotChunk, Status>>;

    async fn snapshot_save(
        &self,
        req: Request<pb::SnapshotSaveRequest>,
    ) -> Result<Response<Self::SnapshotSaveStream>, Status> {
        let file = self
            .timed("SnapshotSave", self.backup_file(&req))
            .await?
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for chunk in file.chunks(snapshots::CHUNK_BYTES) {
                let chunk = pb::SnapshotChunk {
                    data: chunk.to_vec(),
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn snapshot_restore(
        &self,
        req: Request<tonic::Streaming<pb::SnapshotRestoreRequest>>,
    ) -> Result<Response<pb::SnapshotRestoreResponse>, Status> {
        self.timed("SnapshotRestore", self.restore_backup(req.into_inner()))
            .await
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

    /// The registered node key of node `id` must be `public_key`: adds to `proof` the compare
    /// that keeps the registration as read; returns how the node joins.
    async fn registered_node_key(
        &self,
        id: u64,
        public_key: &[u8],
        proof: &mut Vec<Compare>,
    ) -> Result<String, Status> {
        let registered_key = node_identity::node_key_record(id);
        let registered = self
            .node
            .store()
            .read()
            .map_err(storage_status)?
            .get(&registered_key)
            .map_err(storage_status)?
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "no node key is registered for node {id}: an administrator runs `coffer cluster register-node --id {id} --public-key FILE` first"
                ))
            })?;
        if registered.value != public_key {
            return Err(Status::permission_denied(format!(
                "the node key is not the one registered for node {id}"
            )));
        }
        proof.push(Compare::ModRevision(
            registered_key,
            registered.mod_revision,
        ));
        Ok("joined with its registered node key".into())
    }

    /// The service-account token must be admitted by the Kubernetes role reserved for
    /// members: adds to `proof` the compare that keeps the role as read; returns how the node
    /// joins.
    async fn kubernetes_member(
        &self,
        keyring: &Keyring,
        token: &str,
        proof: &mut Vec<Compare>,
    ) -> Result<String, Status> {
        let name = node_identity::KUBERNETES_MEMBER_ROLE;
        let role_key = kubernetes::role_key(name);
        let (role, revision) = self
            .read_record::<kubernetes::Role>(keyring, &role_key)?
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "no Kubernetes role {name:?}: an administrator writes it (`coffer auth kubernetes role write {name} ...`) to let pods of the cluster's service account join"
                ))
            })?;
        let account = self
            .kubernetes
            .validate(token, &role.audience)
            .await
            .map_err(|refusal| match refusal {
                kubernetes::Refusal::Invalid(why) => Status::unauthenticated(why),
                kubernetes::Refusal::Unavailable(why) => Status::unavailable(why),
            })?;
        role.admits(&account).map_err(Status::permission_denied)?;
        proof.push(Compare::ModRevision(role_key, revision));
        Ok(format!(
            "joined as Kubernetes service account {}/{}",
            account.namespace, account.name
        ))
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
        node_identity::check_peer_addr(&r.peer_addr).map_err(Status::invalid_argument)?;
        let (nonce, challenge_expiry) =
            auth::check_challenge(&keyring, &r.challenge, auth::now_ms())
                .map_err(unauthenticated)?;
        let key = PublicKey::from_bytes(&r.public_key)
            .map_err(|e| Status::unauthenticated(format!("the node key: {e:#}")))?;
        // The node key signs the join (and the token, if any): the certificate will be for it.
        key.verify(
            &node_identity::join_message(
                &cluster_id,
                &r.challenge,
                r.node_id,
                &r.api_addr,
                &r.peer_addr,
                &r.kubernetes_token,
            ),
            &r.signature,
        )
        .map_err(|_| {
            Status::unauthenticated(
                "the join signature does not verify with the node key (another challenge, cluster, address or token?)",
            )
        })?;
        self.node.linearize().await.map_err(raft_status)?;
        let status = self.node.status();
        if status.voters.contains_key(&r.node_id) || status.learners.contains_key(&r.node_id) {
            return Err(Status::already_exists(format!(
                "node {} is already a member: if this is that node, it was added and catches up; a replaced node joins under a new id",
                r.node_id
            )));
        }
        let retired = node_identity::node_retired_record(r.node_id);
        let mut proof = Vec::new();
        let how = if r.kubernetes_token.is_empty() {
            self.registered_node_key(r.node_id, &r.public_key, &mut proof)
                .await?
        } else {
            // A pod never takes an id an administrator registered for a node key.
            proof.push(Compare::Absent(node_identity::node_key_record(r.node_id)));
            self.kubernetes_member(&keyring, &r.kubernetes_token, &mut proof)
                .await?
        };
        let record = node_identity::NodeRecord {
            api_addr: r.api_addr.clone(),
            peer_addr: r.peer_addr.clone(),
            recorded_ms: auth::now_ms(),
            how: format!("{how}, node key {}", key.fingerprint()),
            signing_key: key.signing_key(),
        };
        let used = auth::nonce_key(&nonce);
        // A registered node key never takes an id that was used. A pod does: a StatefulSet
        // pod is its id, and a pod whose member was removed (its volume lost) joins again under
        // it. Its new record pins its new key, so the removed node's certificates stay shut.
        let mut compare = vec![Compare::Absent(used.clone())];
        let mut success = vec![Op::Put {
            key: used,
            value: challenge_expiry.to_be_bytes().to_vec(),
        }];
        if r.kubernetes_token.is_empty() {
            compare.push(Compare::Absent(retired));
        } else {
            success.push(Op::Delete { key: retired });
        }
        success.push(Op::Put {
            key: node_identity::node_cert_record(r.node_id),
            value: postcard::to_allocvec(&record).map_err(|e| Status::internal(e.to_string()))?,
        });
        self.commit(
            Txn {
                compare: [compare, proof].concat(),
                success,
                failure: Vec::new(),
            },
            "the challenge was already used, the node id was retired, or its registration changed: ask for a new challenge (a removed node's id is never given to a registered node key again)",
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
            how = record.how,
            "a node proved its right to join"
        );
        Ok((certificate, ca.cert().to_vec()))
    }
}

impl Api {
    /// Removes member `id` (voter or learner) and retires its id: its node record and
    /// registered key are deleted and it is never admitted again. Used by `Cluster.Remove` and
    /// by autopilot's dead-member clean-up.
    pub(crate) async fn remove_member(&self, id: u64) -> Result<u64, Status> {
        let s = self.node.status();
        let member = s.voters.contains_key(&id) || s.learners.contains_key(&id);
        let retire = Txn::ops(vec![
            Op::Delete {
                key: node_identity::node_cert_record(id),
            },
            Op::Delete {
                key: node_identity::node_key_record(id),
            },
            Op::Put {
                key: node_identity::node_retired_record(id),
                value: auth::now_ms().to_be_bytes().to_vec(),
            },
        ]);
        if !member {
            // A join that recorded the node but never added it, or a removal whose second
            // step did not commit: finish retiring it.
            self.node.linearize().await.map_err(raft_status)?;
            let view = self.node.store().read().map_err(storage_status)?;
            let recorded = view
                .get(&node_identity::node_cert_record(id))
                .map_err(storage_status)?
                .is_some()
                || view
                    .get(&node_identity::node_key_record(id))
                    .map_err(storage_status)?
                    .is_some();
            drop(view);
            if !recorded {
                return Err(Status::not_found(format!("node {id} is not a member")));
            }
            let index = self.commit(retire, "").await?;
            return Ok(index);
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
        // Its node certificate opens nothing from now on (peers accept members and nodes
        // being added only), and its id is never admitted again. If this step does not
        // commit, removing the id again finishes it.
        self.commit(retire, "").await?;
        Ok(index)
    }
}
