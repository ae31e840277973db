//! The `Sessions` service: listing and revoking sessions.

use super::*;

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
            sessions.sort_by(|a, b| a.session_id.cmp(&b.session_id));
            let (sessions, more) = page(sessions, |s| &s.session_id, &r.start_after, r.limit)?;
            Ok(pb::SessionListResponse { sessions, more })
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
