//! The `Settings` service: cluster-wide session lifetimes.

use super::*;

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
