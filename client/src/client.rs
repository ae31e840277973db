//! The connection: endpoints, TLS with the session certificate, login and background renewal,
//! and the retry loop every typed client goes through.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use coffer_api::v1::auth_client::AuthClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, Result};
use crate::keys::KeyPair;
use crate::retry::{CallKind, RetryPolicy, with_retries};
use crate::session::{SessionCredentials, now_ms, renew_after};

/// How the client logs in, and in again when its session nears its end.
#[derive(Debug)]
pub enum Login {
    /// The identity's key pair (Private Key Challenge). Also what sealed reads and unwrapping
    /// decrypt with.
    Key(KeyPair),
    /// A Kubernetes service-account token for a role. The token file is read at every login,
    /// so a rotated projected token is picked up.
    Kubernetes {
        /// The Kubernetes role to log in as.
        role: String,
        /// The projected token (usually [`crate::KUBERNETES_TOKEN_FILE`]).
        token_file: PathBuf,
    },
    /// A session made elsewhere (e.g. by `coffer login`): used until it ends, never renewed.
    Session(SessionCredentials),
}

impl Login {
    fn renews(&self) -> bool {
        !matches!(self, Login::Session(_))
    }
}

/// What a [`Client`] connects to and how.
#[derive(Debug)]
#[non_exhaustive]
pub struct Config {
    /// API addresses (`host:port`) of any nodes; calls start on the last one that answered and
    /// move to the next on failure.
    pub endpoints: Vec<String>,
    /// The cluster CA (PEM) that the nodes' certificates chain to.
    pub ca_pem: Vec<u8>,
    /// Each attempt's deadline.
    pub timeout: Duration,
    /// No retry starts after this long since a call began.
    pub retry_budget: Duration,
    /// How to log in.
    pub login: Login,
    /// Session lifetime to ask for (zero: the server's default).
    pub session_ttl: Duration,
    /// A session to start with instead of logging in at once (e.g. one stored by the CLI), used
    /// while it has more than a few seconds left.
    pub initial_session: Option<SessionCredentials>,
}

impl Config {
    /// A configuration with a 10 s per-call timeout, a 30 s retry budget and the server's
    /// default session lifetime.
    pub fn new<S: Into<String>>(
        endpoints: impl IntoIterator<Item = S>,
        ca_pem: impl Into<Vec<u8>>,
        login: Login,
    ) -> Config {
        Config {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ca_pem: ca_pem.into(),
            timeout: Duration::from_secs(10),
            retry_budget: Duration::from_secs(30),
            login,
            session_ttl: Duration::ZERO,
            initial_session: None,
        }
    }
}

/// A connection to a Coffer cluster with a session that is kept alive. Cheap to clone; every
/// clone shares the session. The background renewal stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    ca_pem: Vec<u8>,
    login: Login,
    ttl_s: u64,
    policy: RetryPolicy,
    /// Channels without a client certificate, for logging in.
    anonymous: Vec<Channel>,
    current: RwLock<Current>,
    /// One login at a time.
    login_lock: tokio::sync::Mutex<()>,
    /// The endpoint that answered last.
    preferred: AtomicUsize,
    renewer: Mutex<Option<tokio::task::AbortHandle>>,
}

/// The session in use and the channels that present it. Swapped whole on renewal; calls in
/// flight keep the channel they cloned.
struct Current {
    session: SessionCredentials,
    channels: Vec<Channel>,
    generation: u64,
    renew_at: Instant,
    ends_at: Instant,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints)
            .field("login", &self.login)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.renewer.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

fn lock_poisoned<T>(p: std::sync::PoisonError<T>) -> T {
    // The guarded values are replaced whole, so a panic elsewhere cannot leave them half made.
    p.into_inner()
}

fn channel(addr: &str, ca_pem: &[u8], session: Option<&SessionCredentials>) -> Result<Channel> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some(s) = session {
        tls = tls.identity(Identity::from_pem(&s.certificate, s.key.as_bytes()));
    }
    Ok(Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| Error::Config(format!("bad server address {addr:?}: {e}")))?
        .tls_config(tls)
        .map_err(|e| Error::Config(format!("bad TLS settings for {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// 16 random bytes: a wrap id.
pub(crate) fn random_16() -> Result<Vec<u8>> {
    let mut b = vec![0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| crate::keys::KeyError::Random)?;
    Ok(b)
}

/// A write's request id: 16 bytes, the first 6 the milliseconds since the Unix epoch
/// (big-endian), the other 10 random (as a UUIDv7). Unique by the random part; ordered by
/// time, so the server's table of recent request ids grows at one end and is trimmed at the
/// other instead of changing pages all over (it is written with every write).
pub(crate) fn request_id() -> Result<Vec<u8>> {
    let mut b = random_16()?;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    Ok(b)
}

impl Client {
    /// Connects: logs in (unless `config` brings a session with time left) and starts renewing
    /// the session in the background. Needs a Tokio runtime.
    pub async fn connect(config: Config) -> Result<Client> {
        let endpoints: Vec<String> = config
            .endpoints
            .iter()
            .flat_map(|a| a.split(','))
            .map(|a| a.trim().trim_start_matches("https://").to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(Error::Config(
                "no server address: give at least one HOST:PORT (COFFER_ADDR)".into(),
            ));
        }
        let anonymous = endpoints
            .iter()
            .map(|a| channel(a, &config.ca_pem, None))
            .collect::<Result<Vec<_>>>()?;
        let renews = config.login.renews();
        let usable = |s: &SessionCredentials| {
            s.remaining(now_ms()) > crate::session::RENEW_MARGIN || !renews
        };
        let given = match &config.login {
            Login::Session(s) => Some(s.clone()),
            _ => config.initial_session.filter(usable),
        };
        let mut inner = Inner {
            endpoints,
            ca_pem: config.ca_pem,
            login: config.login,
            ttl_s: config.session_ttl.as_secs(),
            policy: RetryPolicy {
                budget: config.retry_budget,
                attempt_timeout: config.timeout,
                ..RetryPolicy::default()
            },
            anonymous,
            current: RwLock::new(Current {
                session: SessionCredentials {
                    certificate: String::new(),
                    key: Default::default(),
                    login: Default::default(),
                },
                channels: Vec::new(),
                generation: 0,
                renew_at: Instant::now(),
                ends_at: Instant::now(),
            }),
            login_lock: tokio::sync::Mutex::new(()),
            preferred: AtomicUsize::new(0),
            renewer: Mutex::new(None),
        };
        let session = match given {
            Some(s) => s,
            None => inner.log_in().await?,
        };
        let installed = inner.current_from(session, 1)?;
        *inner.current.get_mut().unwrap_or_else(lock_poisoned) = installed;
        let inner = Arc::new(inner);
        if renews {
            let task = tokio::spawn(renew_loop(Arc::downgrade(&inner)));
            *inner.renewer.lock().unwrap_or_else(lock_poisoned) = Some(task.abort_handle());
        }
        Ok(Client { inner })
    }

    /// The session in use now.
    pub fn session(&self) -> SessionCredentials {
        self.inner.read().session.clone()
    }

    /// The identity's key pair, for a [`Login::Key`] client.
    pub fn key_pair(&self) -> Option<&KeyPair> {
        match &self.inner.login {
            Login::Key(k) => Some(k),
            _ => None,
        }
    }

    /// The kv secrets engine mounted at `mount` (e.g. `"secret"`).
    pub fn kv(&self, mount: impl Into<String>) -> crate::kv::Kv {
        crate::kv::Kv::new(self.clone(), mount.into())
    }

    /// Secrets engine mounts.
    pub fn mounts(&self) -> crate::kv::Mounts {
        crate::kv::Mounts::new(self.clone())
    }

    /// Data wrapped to a recipient's key, readable once.
    pub fn wrap(&self) -> crate::wrap::Wrap {
        crate::wrap::Wrap::new(self.clone())
    }

    /// Path policies.
    pub fn policies(&self) -> crate::admin::Policies {
        crate::admin::Policies::new(self.clone())
    }

    /// Identities.
    pub fn identities(&self) -> crate::admin::Identities {
        crate::admin::Identities::new(self.clone())
    }

    /// Runs one call with retries (see [`crate::retry`]): `call` gets a channel to the endpoint
    /// of each attempt and the call's request id (the same for every attempt), and sends the
    /// same request each time.
    /// [`Client::call`] with a request message: each attempt sends a copy of `request`
    /// carrying that attempt's request id (the same for every retry), if the message has one.
    pub(crate) async fn unary<R, T, F, Fut>(&self, kind: CallKind, request: &R, rpc: F) -> Result<T>
    where
        R: Stamp + Clone,
        F: Fn(Channel, R) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        self.call(kind, |channel, request_id| {
            let mut request = request.clone();
            request.stamp(request_id);
            rpc(channel, request)
        })
        .await
    }

    pub(crate) async fn call<T, F, Fut>(&self, kind: CallKind, mut call: F) -> Result<T>
    where
        F: FnMut(Channel, Vec<u8>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let inner = &self.inner;
        inner.ensure_fresh().await?;
        let generation = AtomicU64::new(0);
        let first = inner.preferred.load(Ordering::Relaxed);
        let n = inner.endpoints.len();
        with_retries(
            &inner.policy,
            kind,
            |attempt, request_id| {
                let index = (first + attempt) % n;
                let (channel, g) = {
                    let c = inner.read();
                    (c.channels[index].clone(), c.generation)
                };
                generation.store(g, Ordering::Relaxed);
                let fut = call(channel, request_id);
                async move {
                    let r = fut.await;
                    if r.is_ok() {
                        inner.preferred.store(index, Ordering::Relaxed);
                    }
                    r
                }
            },
            || inner.relogin(generation.load(Ordering::Relaxed)),
        )
        .await
    }
}

impl Inner {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(lock_poisoned)
    }

    /// Channels presenting `session`, and when to renew it.
    fn current_from(&self, session: SessionCredentials, generation: u64) -> Result<Current> {
        let channels = self
            .endpoints
            .iter()
            .map(|a| channel(a, &self.ca_pem, Some(&session)))
            .collect::<Result<Vec<_>>>()?;
        let now = Instant::now();
        let lifetime = session.remaining(now_ms());
        Ok(Current {
            channels,
            generation,
            renew_at: now + renew_after(lifetime),
            ends_at: now + lifetime,
            session,
        })
    }

    /// One login, on whichever endpoint answers.
    async fn log_in(&self) -> Result<SessionCredentials> {
        let first = self.preferred.load(Ordering::Relaxed);
        let n = self.anonymous.len();
        let ttl_s = self.ttl_s;
        let channel =
            |attempt: usize| AuthClient::new(self.anonymous[(first + attempt) % n].clone());
        let no_relogin = || async { Ok(()) };
        let session = match &self.login {
            Login::Key(key) => {
                with_retries(
                    &self.policy,
                    CallKind::Read,
                    |attempt, _| {
                        let mut auth = channel(attempt);
                        async move { crate::login::key_login(&mut auth, key, ttl_s).await }
                    },
                    no_relogin,
                )
                .await?
            }
            Login::Kubernetes { role, token_file } => {
                let token =
                    std::fs::read_to_string(token_file).map_err(|source| Error::TokenFile {
                        path: token_file.clone(),
                        source,
                    })?;
                let token = zeroize::Zeroizing::new(token);
                let token = token.trim();
                with_retries(
                    &self.policy,
                    CallKind::Read,
                    |attempt, _| {
                        let mut auth = channel(attempt);
                        async move {
                            crate::login::kubernetes_login(&mut auth, role, token, ttl_s).await
                        }
                    },
                    no_relogin,
                )
                .await?
            }
            Login::Session(_) => return Err(Error::SessionEnded),
        };
        tracing::debug!(
            session_id = %session.login.session_id,
            identity = %session.login.identity,
            "logged in"
        );
        Ok(session)
    }

    /// Logs in again unless a renewal since `seen_generation` already did.
    async fn relogin(&self, seen_generation: u64) -> Result<()> {
        let _one = self.login_lock.lock().await;
        let generation = self.read().generation;
        if generation != seen_generation {
            return Ok(());
        }
        let session = self.log_in().await?;
        let next = self.current_from(session, generation + 1)?;
        *self.current.write().unwrap_or_else(lock_poisoned) = next;
        Ok(())
    }

    /// Makes sure no call starts on a session about to end (a renewal that failed, a machine
    /// that slept): logs in first when less than a second is left.
    async fn ensure_fresh(&self) -> Result<()> {
        let (ends_at, generation) = {
            let c = self.read();
            (c.ends_at, c.generation)
        };
        if Instant::now() + Duration::from_secs(1) < ends_at {
            return Ok(());
        }
        if self.login.renews() {
            self.relogin(generation).await
        } else {
            Err(Error::SessionEnded)
        }
    }
}

/// Renews the session at its renewal time until the client is dropped. A failed renewal is
/// tried again with a growing pause; calls log in themselves if the session ends meanwhile.
async fn renew_loop(client: Weak<Inner>) {
    let mut pause = Duration::from_secs(1);
    loop {
        let Some(inner) = client.upgrade() else {
            return;
        };
        let (at, generation) = {
            let c = inner.read();
            (c.renew_at, c.generation)
        };
        drop(inner);
        tokio::time::sleep_until(at.into()).await;
        let Some(inner) = client.upgrade() else {
            return;
        };
        match inner.relogin(generation).await {
            Ok(()) => pause = Duration::from_secs(1),
            Err(e) => {
                tracing::warn!(error = %e, "renewing the session failed; trying again");
                drop(inner);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_can_be_shared_between_tasks() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Client>();
        // Its calls can run in spawned tasks (no lock is held across an await).
        fn spawnable<F: Future + Send>(_: F) {}
        let never: Option<Client> = None;
        if let Some(c) = never {
            let kv = c.kv("secret");
            spawnable(async move { kv.get("app/db").await });
            spawnable(async move { c.wrap().unwrap("w_00").await });
        }
    }

    #[test]
    fn request_ids_are_unique_and_ordered_by_time() {
        let first = request_id().unwrap();
        // Wait for the next millisecond (a condition, with a deadline).
        let deadline = Instant::now() + Duration::from_secs(5);
        while request_id().unwrap()[..6] == first[..6] {
            assert!(Instant::now() < deadline, "the clock does not move");
        }
        let ids: Vec<Vec<u8>> = (0..1000).map(|_| request_id().unwrap()).collect();
        let distinct: std::collections::BTreeSet<&Vec<u8>> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        assert!(ids.iter().all(|id| id.len() == 16 && *id > first));
        // The random part differs between ids made in one millisecond.
        assert!(
            ids.windows(2)
                .any(|w| w[0][..6] == w[1][..6] && w[0][6..] != w[1][6..])
        );
    }

    #[tokio::test]
    async fn a_client_without_endpoints_is_refused() {
        let login = Login::Kubernetes {
            role: "web".into(),
            token_file: "/nonexistent".into(),
        };
        let err = Client::connect(Config::new(Vec::<String>::new(), b"".to_vec(), login))
            .await
            .expect_err("no endpoints");
        assert!(matches!(err, Error::Config(_)), "{err}");
    }
}

/// A request message that can carry a request id (messages without one ignore it).
pub(crate) trait Stamp {
    /// Sets the message's request id, if it has one.
    fn stamp(&mut self, _request_id: Vec<u8>) {}
}

/// Request messages with a `request_id` field.
macro_rules! stamped {
    ($($t:ty),* $(,)?) => {
        $(impl Stamp for $t {
            fn stamp(&mut self, request_id: Vec<u8>) {
                self.request_id = request_id;
            }
        })*
    };
}

/// Request messages without one.
macro_rules! unstamped {
    ($($t:ty),* $(,)?) => {
        $(impl Stamp for $t {})*
    };
}

stamped!(
    coffer_api::kv::v1::PutRequest,
    coffer_api::kv::v1::GetRequest,
    coffer_api::kv::v1::PatchRequest,
    coffer_api::kv::v1::VersionsRequest,
    coffer_api::kv::v1::ReadMetadataRequest,
    coffer_api::kv::v1::WriteMetadataRequest,
    coffer_api::kv::v1::DeleteMetadataRequest,
    coffer_api::kv::v1::ListRequest,
    coffer_api::wrap::v1::CreateRequest,
    coffer_api::wrap::v1::UnwrapRequest,
);

unstamped!(
    coffer_api::kv::v1::ListMountsRequest,
    coffer_api::v1::PolicyListRequest,
    coffer_api::v1::IdentityListRequest,
    coffer_api::kv::v1::EnableRequest,
    coffer_api::kv::v1::DisableRequest,
    coffer_api::wrap::v1::LookupRequest,
    coffer_api::v1::PolicyWriteRequest,
    coffer_api::v1::PolicyReadRequest,
    coffer_api::v1::PolicyDeleteRequest,
    coffer_api::v1::IdentityCreateRequest,
    coffer_api::v1::IdentityReadRequest,
    coffer_api::v1::IdentityUpdateRequest,
    coffer_api::v1::IdentityDeleteRequest,
);
