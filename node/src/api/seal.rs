//! The `Seal` service: init, the unseal ceremony, operator actions, rekey, emergency seal.

use super::*;

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
                    if msg.contains("already initialized") || msg.contains("snapshot restore") {
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
