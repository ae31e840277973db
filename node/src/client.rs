//! Connecting to a cluster from the CLI and the bench: TLS with the cluster CA, any node.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use coffer_api::v1::cluster_client::ClusterClient;
use coffer_api::v1::kv_client::KvClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where and how to reach the cluster.
#[derive(Debug, Clone)]
pub struct Target {
    /// API addresses (`host:port`), tried in order.
    pub addrs: Vec<String>,
    /// The cluster CA (PEM).
    pub ca_pem: Vec<u8>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// The session presented on every request, once logged in.
    pub session: Option<SessionCredentials>,
}

pub use coffer_client::SessionCredentials;

impl Target {
    /// From the `--addr` list and the CA file.
    pub fn new(addrs: &[String], ca: Option<&Path>, timeout: Duration) -> Result<Target> {
        let addrs: Vec<String> = addrs
            .iter()
            .flat_map(|a| a.split(','))
            .map(|a| a.trim().trim_start_matches("https://").to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if addrs.is_empty() {
            bail!(
                "no server address: pass --addr HOST:PORT or set COFFER_ADDR (`source <dev dir>/env` after `coffer dev`)"
            );
        }
        let ca = ca.context(
            "no CA certificate: pass --ca-cert FILE or set COFFER_CACERT (Coffer speaks TLS only)",
        )?;
        let ca_pem = std::fs::read(ca)
            .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
        Ok(Target {
            addrs,
            ca_pem,
            timeout,
            session: None,
        })
    }

    /// Logs in with the identity key in `key` (Private Key Challenge) and presents the new
    /// session on every later request. `ttl_s` 0 asks for the default.
    pub async fn login(&mut self, key: &Path, ttl_s: u64) -> Result<&SessionCredentials> {
        let session = crate::auth::login(self, key, ttl_s).await?;
        Ok(self.session.insert(session))
    }

    /// A lazily connecting channel to one address.
    pub fn channel_to(&self, addr: &str) -> Result<Channel> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some(session) = &self.session {
            tls = tls.identity(Identity::from_pem(
                &session.certificate,
                session.key.as_bytes(),
            ));
        }
        Ok(Endpoint::from_shared(format!("https://{addr}"))
            .with_context(|| format!("bad server address {addr:?}"))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(3))
            .timeout(self.timeout)
            .tcp_nodelay(true)
            .connect_lazy())
    }

    /// A connected channel to the first address that answers.
    pub async fn connect(&self) -> Result<Channel> {
        let mut errors = Vec::new();
        for addr in &self.addrs {
            let channel = self.channel_to(addr)?;
            let mut probe = ClusterClient::new(channel.clone());
            match probe.status(coffer_api::v1::StatusRequest::default()).await {
                Ok(_) => return Ok(channel),
                Err(e) => errors.push(format!("{addr}: {}", e.message())),
            }
        }
        bail!("no node answered: {}", errors.join("; "))
    }

    /// A key/value client on the first node that answers.
    pub async fn kv(&self) -> Result<KvClient<Channel>> {
        Ok(KvClient::new(self.connect().await?)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    /// A cluster client on the first node that answers.
    pub async fn cluster(&self) -> Result<ClusterClient<Channel>> {
        Ok(ClusterClient::new(self.connect().await?))
    }
}

/// A session kept on disk between commands (like a Vault token file, but a short-lived
/// certificate and its key, useless without TLS to this cluster): `~/.coffer/session.json`, or
/// the file COFFER_SESSION_FILE names. Mode 0600.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct StoredSession {
    identity: String,
    session_id: String,
    expires_at_ms: u64,
    certificate: String,
    key: String,
    /// The identity key's fingerprint.
    identity_fingerprint: String,
    /// SHA-256 (hex) of the cluster CA the session was made with.
    cluster_ca: String,
}

impl std::fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StoredSession({} as {}, ***)",
            self.session_id, self.identity
        )
    }
}

fn ca_digest(ca_pem: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, ca_pem)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A stored session is used only while this much of it is left.
const STORED_MARGIN_MS: u64 = 30_000;

impl StoredSession {
    /// Where the session is kept.
    pub fn path() -> Option<std::path::PathBuf> {
        if let Some(p) = std::env::var_os("COFFER_SESSION_FILE") {
            return Some(p.into());
        }
        std::env::var_os("HOME").map(|h| Path::new(&h).join(".coffer").join("session.json"))
    }

    /// Reads the stored session.
    pub fn load(path: &Path) -> Result<StoredSession> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a session", path.display()))
    }

    /// The session, if it is for `target`'s cluster, for the key with fingerprint `key` (when
    /// one is given), and not about to end.
    pub fn fits(self, target: &Target, key: Option<&str>) -> Option<SessionCredentials> {
        let fits = self.cluster_ca == ca_digest(&target.ca_pem)
            && key.is_none_or(|k| k == self.identity_fingerprint)
            && self.expires_at_ms > crate::auth::now_ms() + STORED_MARGIN_MS;
        fits.then(|| SessionCredentials {
            certificate: self.certificate,
            key: zeroize::Zeroizing::new(self.key),
            login: coffer_api::v1::LoginResponse {
                session_id: self.session_id,
                identity: self.identity,
                expires_at_ms: self.expires_at_ms,
                certificate: String::new(),
            },
        })
    }

    /// Stores `session` (made with the identity key whose fingerprint is `owner`, or for the
    /// Kubernetes role `kubernetes:ROLE`) for the next commands, replacing the file
    /// atomically. Returns where.
    pub fn save(
        target: &Target,
        session: &SessionCredentials,
        owner: &str,
    ) -> Result<std::path::PathBuf> {
        let path = StoredSession::path()
            .context("no place to store the session: set HOME or COFFER_SESSION_FILE")?;
        let stored = StoredSession {
            identity: session.login.identity.clone(),
            session_id: session.login.session_id.clone(),
            expires_at_ms: session.login.expires_at_ms,
            certificate: session.certificate.clone(),
            key: session.key.to_string(),
            identity_fingerprint: owner.to_string(),
            cluster_ca: ca_digest(&target.ca_pem),
        };
        let text = zeroize::Zeroizing::new(serde_json::to_string_pretty(&stored)?);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        crate::tls::write_private(&tmp, &text)?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        Ok(path)
    }

    /// [`StoredSession::save`], warning instead of failing (the command goes on either way).
    pub fn save_best_effort(target: &Target, session: &SessionCredentials, owner: &str) {
        if let Err(e) = StoredSession::save(target, session, owner) {
            eprintln!(
                "warning: the session was not stored ({e:#}); the next command logs in again"
            );
        }
    }
}
