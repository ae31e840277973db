//! Kubernetes service-account login: a pod proves its identity with its projected
//! service-account token (a JWT) and, in the same request, proves it holds a fresh session key
//! by signing a challenge with it. The token is checked either by the Kubernetes API server
//! (TokenReview, which also sees deleted service accounts and pods) or locally against the
//! issuer's published keys (OIDC discovery and JWKS; it cannot see a deletion before the token
//! expires). A **role** names which service accounts in which namespaces may log in, for which
//! token audience, and which policies their sessions hold.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::{Deserialize, Serialize};

/// Where roles live (inside the barrier): this prefix, then the role name.
pub const ROLE_PREFIX: &[u8] = b"\0coffer/k8s-role/";
/// Roles are managed at this path and the role name (`list` on the path itself).
pub const ROLE_PATH: &str = "auth/kubernetes/role";
/// Where a pod's projected service-account token is, by default.
pub const DEFAULT_TOKEN_FILE: &str = coffer_client::KUBERNETES_TOKEN_FILE;
/// Clocks may differ by this much when checking a token's times locally.
const LEEWAY_S: u64 = 60;

/// The stored key of role `name`.
pub fn role_key(name: &str) -> Vec<u8> {
    let mut k = ROLE_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// A Kubernetes role, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Service account names that may log in (`*`: any).
    pub bound_service_accounts: Vec<String>,
    /// Namespaces they may be in (`*`: any).
    pub bound_namespaces: Vec<String>,
    /// The audience the token must be for.
    pub audience: String,
    /// Policies the sessions hold.
    pub policies: Vec<String>,
    /// The longest session, in seconds (`None`: the cluster's maximum).
    pub max_ttl_s: Option<u64>,
}

impl Role {
    /// Checks the role's fields.
    pub fn check(&self) -> Result<(), String> {
        if self.bound_service_accounts.is_empty() || self.bound_namespaces.is_empty() {
            return Err(
                "a role needs at least one --bound-service-account and one --bound-namespace (`*` for any)"
                    .into(),
            );
        }
        if self.audience.trim().is_empty() {
            return Err(
                "a role needs an --audience: the audience the pods' projected tokens are issued for"
                    .into(),
            );
        }
        Ok(())
    }

    /// Whether the role admits `sa`; the error names what does not match.
    pub fn admits(&self, sa: &ServiceAccount) -> Result<(), String> {
        let bound = |list: &[String], v: &str| list.iter().any(|b| b == "*" || b == v);
        if !bound(&self.bound_namespaces, &sa.namespace) {
            return Err(format!(
                "namespace {:?} is not bound to this role (bound: {})",
                sa.namespace,
                self.bound_namespaces.join(", ")
            ));
        }
        if !bound(&self.bound_service_accounts, &sa.name) {
            return Err(format!(
                "service account {:?} is not bound to this role (bound: {})",
                sa.name,
                self.bound_service_accounts.join(", ")
            ));
        }
        Ok(())
    }
}

/// Who a validated token belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The pod the token was issued for, if bound to one.
    pub pod_name: Option<String>,
    /// That pod's uid.
    pub pod_uid: Option<String>,
}

impl ServiceAccount {
    /// `system:serviceaccount:NS:NAME`.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The token is not valid (the message names the failed check).
    Invalid(String),
    /// The validator could not be reached in time, or failed.
    Unavailable(String),
}

// ---- JWTs -------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct Named {
    name: String,
    uid: Option<String>,
}

#[derive(Debug, Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: Named,
    pod: Option<Named>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<u64>,
    nbf: Option<u64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

/// A JWT split into its parts; nothing verified yet.
struct Jwt {
    header: Header,
    claims: Claims,
    signed: Vec<u8>,
    signature: Vec<u8>,
}

fn parse_jwt(token: &str) -> Result<Jwt, Refusal> {
    let bad = |what: &str| Refusal::Invalid(format!("the token is not a JWT: {what}"));
    let mut parts = token.trim().split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("it must have three dot-separated parts"));
    };
    let header: Header = serde_json::from_slice(
        &B64URL
            .decode(h)
            .map_err(|_| bad("the header is not base64url"))?,
    )
    .map_err(|_| bad("the header is not JSON"))?;
    let claims: Claims = serde_json::from_slice(
        &B64URL
            .decode(c)
            .map_err(|_| bad("the claims are not base64url"))?,
    )
    .map_err(|_| bad("the claims are not the JSON of a service-account token"))?;
    let signature = B64URL
        .decode(s)
        .map_err(|_| bad("the signature is not base64url"))?;
    Ok(Jwt {
        header,
        claims,
        signed: format!("{h}.{c}").into_bytes(),
        signature,
    })
}

impl Claims {
    fn audiences(&self) -> Vec<&str> {
        match &self.aud {
            Some(Audience::One(a)) => vec![a.as_str()],
            Some(Audience::Many(list)) => list.iter().map(String::as_str).collect(),
            None => Vec::new(),
        }
    }

    /// The service account the claims name (from `kubernetes.io`, else from `sub`).
    fn service_account(&self) -> Result<ServiceAccount, Refusal> {
        if let Some(k) = &self.kubernetes {
            return Ok(ServiceAccount {
                namespace: k.namespace.clone(),
                name: k.serviceaccount.name.clone(),
                pod_name: k.pod.as_ref().map(|p| p.name.clone()),
                pod_uid: k.pod.as_ref().and_then(|p| p.uid.clone()),
            });
        }
        let sub = self.sub.as_deref().unwrap_or_default();
        parse_username(sub).ok_or_else(|| {
            Refusal::Invalid(format!(
                "the token is not a service-account token (subject {sub:?})"
            ))
        })
    }
}

fn parse_username(username: &str) -> Option<ServiceAccount> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then(|| ServiceAccount {
        namespace: namespace.into(),
        name: name.into(),
        pod_name: None,
        pod_uid: None,
    })
}

// ---- keys (JWKS) ------------------------------------------------------------------------

/// One published key.
#[derive(Debug, Clone, Deserialize)]
pub struct Jwk {
    kty: String,
    kid: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

#[derive(Debug, Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

fn verify_signature(jwt: &Jwt, keys: &[Jwk]) -> Result<(), Refusal> {
    let candidates: Vec<&Jwk> = keys
        .iter()
        .filter(|k| jwt.header.kid.is_none() || k.kid == jwt.header.kid)
        .collect();
    if candidates.is_empty() {
        return Err(Refusal::Invalid(format!(
            "the token is signed by a key the issuer does not publish (kid {:?})",
            jwt.header.kid.as_deref().unwrap_or("")
        )));
    }
    let decode = |v: &Option<String>| v.as_deref().and_then(|s| B64URL.decode(s).ok());
    for key in candidates {
        let ok = match (jwt.header.alg.as_str(), key.kty.as_str()) {
            ("ES256", "EC") if key.crv.as_deref() == Some("P-256") => {
                match (decode(&key.x), decode(&key.y)) {
                    (Some(x), Some(y)) => {
                        let point = [&[4u8][..], &x, &y].concat();
                        ring::signature::UnparsedPublicKey::new(
                            &ring::signature::ECDSA_P256_SHA256_FIXED,
                            point,
                        )
                        .verify(&jwt.signed, &jwt.signature)
                        .is_ok()
                    }
                    _ => false,
                }
            }
            ("RS256", "RSA") => match (decode(&key.n), decode(&key.e)) {
                (Some(n), Some(e)) => ring::signature::RsaPublicKeyComponents { n, e }
                    .verify(
                        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                        &jwt.signed,
                        &jwt.signature,
                    )
                    .is_ok(),
                _ => false,
            },
            _ => false,
        };
        if ok {
            return Ok(());
        }
    }
    Err(Refusal::Invalid(format!(
        "the token's signature does not verify with the issuer's keys (alg {})",
        jwt.header.alg
    )))
}

/// Checks a token locally: signature by one of `keys`, issuer, audience and times.
pub fn check_locally(
    token: &str,
    keys: &[Jwk],
    issuer: &str,
    audience: &str,
    now_s: u64,
) -> Result<ServiceAccount, Refusal> {
    let jwt = parse_jwt(token)?;
    verify_signature(&jwt, keys)?;
    let c = &jwt.claims;
    if c.iss.as_deref() != Some(issuer) {
        return Err(Refusal::Invalid(format!(
            "the token was issued by {:?}, not {issuer:?}",
            c.iss.as_deref().unwrap_or("")
        )));
    }
    if !c.audiences().contains(&audience) {
        return Err(Refusal::Invalid(format!(
            "the token is for audience {:?}, not the role's {audience:?}",
            c.audiences()
        )));
    }
    match c.exp {
        Some(exp) if exp + LEEWAY_S > now_s => {}
        Some(_) => return Err(Refusal::Invalid("the token expired".into())),
        None => return Err(Refusal::Invalid("the token has no expiry".into())),
    }
    if c.nbf.is_some_and(|nbf| nbf > now_s + LEEWAY_S) {
        return Err(Refusal::Invalid("the token is not valid yet".into()));
    }
    c.service_account()
}

// ---- validators -------------------------------------------------------------------------

/// Where tokens are checked (node settings).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ValidatorConfig {
    /// Kubernetes login is off.
    #[default]
    Off,
    /// TokenReview at this API server (URL), trusting this CA (PEM; none: the system's), as the
    /// reviewer whose token is in this file (re-read when it changes).
    TokenReview {
        /// The API server's URL.
        url: String,
        /// Its CA certificate (PEM).
        ca_pem: Option<Vec<u8>>,
        /// The reviewer's token file.
        token_file: String,
        /// How long a review may take.
        timeout: Duration,
    },
    /// TokenReview at the API server of the cluster this node runs in (in-cluster config).
    InCluster {
        /// How long a review may take.
        timeout: Duration,
    },
    /// Local checks against the issuer's keys (OIDC discovery at the issuer URL).
    Jwks {
        /// The issuer (`iss`), also where its discovery document is.
        issuer: String,
        /// Its CA certificate (PEM; none: the system's).
        ca_pem: Option<Vec<u8>>,
        /// How long fetching the keys may take.
        timeout: Duration,
    },
}

/// Checks service-account tokens, as configured.
pub struct Validator {
    config: ValidatorConfig,
    client: Mutex<Option<kube::Client>>,
    keys: Mutex<Option<(Instant, Vec<Jwk>)>>,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Keys fetched from the issuer are used this long before they are fetched again.
const KEYS_FOR: Duration = Duration::from_secs(300);

fn pem_to_der(pem: &[u8]) -> Result<Vec<Vec<u8>>> {
    let certs: Vec<Vec<u8>> = rustls_pemfile::certs(&mut &pem[..])
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .context("the Kubernetes CA certificate is not PEM")?;
    if certs.is_empty() {
        bail!("the Kubernetes CA file holds no certificate");
    }
    Ok(certs)
}

fn client_for(
    url: &str,
    ca_pem: Option<&[u8]>,
    token_file: Option<&str>,
    timeout: Duration,
) -> Result<kube::Client> {
    let mut config = kube::Config::new(
        url.parse()
            .with_context(|| format!("{url:?} is not a URL"))?,
    );
    if let Some(pem) = ca_pem {
        config.root_cert = Some(pem_to_der(pem)?);
    }
    if let Some(file) = token_file {
        config.auth_info.token_file = Some(file.to_string());
    }
    set_timeouts(&mut config, timeout);
    kube::Client::try_from(config).context("the Kubernetes client")
}

/// The client's own timeouts sit past the deadline `validate` keeps, so a silent API server
/// is always reported by that deadline ("did not answer ... within"), never as whichever of
/// the client's timers happened to fire first (a flaky "client error (SendRequest)").
fn set_timeouts(config: &mut kube::Config, timeout: Duration) {
    let outer = timeout + Duration::from_secs(5);
    config.connect_timeout = Some(outer);
    config.read_timeout = Some(outer);
    config.write_timeout = Some(outer);
}

impl Validator {
    /// A validator for `config` (its clients are made now, nothing is contacted yet).
    pub fn new(config: ValidatorConfig) -> Result<Validator> {
        let client = Self::client(&config)?;
        Ok(Validator {
            config,
            client: Mutex::new(client),
            keys: Mutex::new(None),
        })
    }

    fn client(config: &ValidatorConfig) -> Result<Option<kube::Client>> {
        Ok(match config {
            ValidatorConfig::Off => None,
            ValidatorConfig::TokenReview {
                url,
                ca_pem,
                token_file,
                timeout,
            } => Some(client_for(
                url,
                ca_pem.as_deref(),
                Some(token_file),
                *timeout,
            )?),
            ValidatorConfig::InCluster { timeout } => {
                let mut c = kube::Config::incluster()
                    .context("not running in a Kubernetes pod (no in-cluster configuration)")?;
                set_timeouts(&mut c, *timeout);
                Some(kube::Client::try_from(c).context("the Kubernetes client")?)
            }
            ValidatorConfig::Jwks {
                issuer,
                ca_pem,
                timeout,
            } => Some(client_for(issuer, ca_pem.as_deref(), None, *timeout)?),
        })
    }

    /// Whether Kubernetes login is configured.
    pub fn enabled(&self) -> bool {
        self.config != ValidatorConfig::Off
    }

    fn timeout(&self) -> Duration {
        match &self.config {
            ValidatorConfig::Off => Duration::ZERO,
            ValidatorConfig::TokenReview { timeout, .. }
            | ValidatorConfig::InCluster { timeout }
            | ValidatorConfig::Jwks { timeout, .. } => *timeout,
        }
    }

    /// Checks `token` for `audience`; returns whose it is.
    pub async fn validate(&self, token: &str, audience: &str) -> Result<ServiceAccount, Refusal> {
        let client = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(client) = client else {
            return Err(Refusal::Unavailable(
                "Kubernetes login is not configured on this node (see --kubernetes-api-url)".into(),
            ));
        };
        let timeout = self.timeout();
        match &self.config {
            ValidatorConfig::Jwks { issuer, .. } => {
                let now_s = crate::auth::now_ms() / 1000;
                let keys = self.keys(&client, issuer, false, timeout).await?;
                match check_locally(token, &keys, issuer, audience, now_s) {
                    // A key the cached set lacks may be new: fetch once more.
                    Err(Refusal::Invalid(why)) if why.contains("does not publish") => {
                        let keys = self.keys(&client, issuer, true, timeout).await?;
                        check_locally(token, &keys, issuer, audience, now_s)
                    }
                    other => other,
                }
            }
            _ => {
                let deadline = tokio::time::Instant::now() + timeout;
                let late = || {
                    Refusal::Unavailable(format!(
                        "the Kubernetes API server did not answer the TokenReview within {timeout:?}"
                    ))
                };
                match tokio::time::timeout_at(deadline, review(&client, token, audience)).await {
                    Ok(Err(Review::ReviewerRefused(why))) => {
                        // The reviewer's token may have rotated: a new client reads the file
                        // again; one more try.
                        tracing::info!(
                            reason = why,
                            "TokenReview unauthorized; re-reading the reviewer token"
                        );
                        let fresh = Self::client(&self.config)
                            .map_err(|e| Refusal::Unavailable(format!("{e:#}")))?
                            .ok_or_else(late)?;
                        *self.client.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(fresh.clone());
                        match tokio::time::timeout_at(deadline, review(&fresh, token, audience))
                            .await
                        {
                            Ok(Ok(sa)) => Ok(sa),
                            Ok(Err(Review::Refused(r))) => Err(r),
                            Ok(Err(Review::ReviewerRefused(why))) => {
                                Err(Refusal::Unavailable(format!(
                                    "the API server refused this node's reviewer token ({why}); check --kubernetes-reviewer-token-file and that its service account holds system:auth-delegator"
                                )))
                            }
                            Err(_) => Err(late()),
                        }
                    }
                    Ok(Ok(sa)) => Ok(sa),
                    Ok(Err(Review::Refused(r))) => Err(r),
                    Err(_) => Err(late()),
                }
            }
        }
    }

    async fn keys(
        &self,
        client: &kube::Client,
        issuer: &str,
        refresh: bool,
        timeout: Duration,
    ) -> Result<Vec<Jwk>, Refusal> {
        if let Some((at, keys)) = &*self.keys.lock().unwrap_or_else(|p| p.into_inner())
            && (at.elapsed() < KEYS_FOR && !refresh || at.elapsed() < Duration::from_secs(10))
        {
            return Ok(keys.clone());
        }
        let fetched = tokio::time::timeout(timeout, fetch_keys(client, issuer))
            .await
            .map_err(|_| {
                Refusal::Unavailable(format!(
                    "the token issuer did not publish its keys within {timeout:?}"
                ))
            })??;
        *self.keys.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), fetched.clone()));
        Ok(fetched)
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(
    client: &kube::Client,
    path: &str,
) -> Result<T, Refusal> {
    let request = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| Refusal::Unavailable(format!("{path}: {e}")))?;
    let text = client
        .request_text(request)
        .await
        .map_err(|e| Refusal::Unavailable(format!("the token issuer at {path}: {e}")))?;
    serde_json::from_str(&text).map_err(|e| {
        Refusal::Unavailable(format!(
            "the token issuer's {path} is not what OIDC discovery serves: {e}"
        ))
    })
}

async fn fetch_keys(client: &kube::Client, issuer: &str) -> Result<Vec<Jwk>, Refusal> {
    #[derive(Deserialize)]
    struct Discovery {
        issuer: String,
        jwks_uri: String,
    }
    let discovery: Discovery = get_json(client, "/.well-known/openid-configuration").await?;
    if discovery.issuer != issuer {
        return Err(Refusal::Unavailable(format!(
            "the discovery document names issuer {:?}, not {issuer:?}",
            discovery.issuer
        )));
    }
    // The keys are served by the same host (as the API server does at /openid/v1/jwks).
    let path = discovery
        .jwks_uri
        .strip_prefix(issuer.trim_end_matches('/'))
        .filter(|p| p.starts_with('/'))
        .ok_or_else(|| {
            Refusal::Unavailable(format!(
                "the keys are published at {:?}, not under the issuer {issuer:?}",
                discovery.jwks_uri
            ))
        })?;
    let set: JwkSet = get_json(client, path).await?;
    Ok(set.keys)
}

/// Why a TokenReview gave no account.
enum Review {
    /// The token (or the review) was refused.
    Refused(Refusal),
    /// The API server refused the reviewer (401).
    ReviewerRefused(String),
}

impl From<Refusal> for Review {
    fn from(r: Refusal) -> Review {
        Review::Refused(r)
    }
}

async fn review(
    client: &kube::Client,
    token: &str,
    audience: &str,
) -> Result<ServiceAccount, Review> {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![audience.to_string()]),
        },
        ..TokenReview::default()
    };
    let reviews: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let answer = reviews
        .create(&kube::api::PostParams::default(), &request)
        .await
        .map_err(|e| match e {
            kube::Error::Api(status) if status.code == 401 => {
                Review::ReviewerRefused(status.message.clone())
            }
            e => Review::Refused(Refusal::Unavailable(format!("the TokenReview failed: {e}"))),
        })?;
    Ok(account_of(answer.status, token, audience)?)
}

/// The service account a TokenReview's `status` confirms for `token` and `audience`.
fn account_of(
    status: Option<k8s_openapi::api::authentication::v1::TokenReviewStatus>,
    token: &str,
    audience: &str,
) -> Result<ServiceAccount, Refusal> {
    let status = status
        .ok_or_else(|| Refusal::Unavailable("the TokenReview came back without a status".into()))?;
    if let Some(error) = status.error.filter(|e| !e.is_empty()) {
        return Err(Refusal::Invalid(format!(
            "Kubernetes refused the token: {error}"
        )));
    }
    if status.authenticated != Some(true) {
        return Err(Refusal::Invalid(
            "Kubernetes did not authenticate the token".into(),
        ));
    }
    // An empty list means the token was checked against the API server's own audience only.
    let audiences = status.audiences.unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(Refusal::Invalid(format!(
            "Kubernetes did not confirm the audience {audience:?} (it confirmed {audiences:?})"
        )));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let mut sa = parse_username(&username).ok_or_else(|| {
        Refusal::Invalid(format!(
            "the token belongs to {username:?}, not to a service account"
        ))
    })?;
    // The token's own claims must name the same account.
    let claimed = parse_jwt(token)?.claims.service_account()?;
    if (claimed.namespace.as_str(), claimed.name.as_str())
        != (sa.namespace.as_str(), sa.name.as_str())
    {
        return Err(Refusal::Invalid(format!(
            "the token's claims name {}, but Kubernetes says it belongs to {username}",
            claimed.username()
        )));
    }
    let extra = user.extra.unwrap_or_default();
    let first = |k: &str| extra.get(k).and_then(|v| v.first().cloned());
    sa.pod_name = first("authentication.kubernetes.io/pod-name");
    sa.pod_uid = first("authentication.kubernetes.io/pod-uid");
    Ok(sa)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

    fn key() -> (EcdsaKeyPair, Jwk) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("key");
        let point = pair.public_key().as_ref();
        let jwk = Jwk {
            kty: "EC".into(),
            kid: Some("k1".into()),
            crv: Some("P-256".into()),
            x: Some(B64URL.encode(&point[1..33])),
            y: Some(B64URL.encode(&point[33..65])),
            n: None,
            e: None,
        };
        (pair, jwk)
    }

    fn token(pair: &EcdsaKeyPair, claims: serde_json::Value) -> String {
        let header = B64URL.encode(br#"{"alg":"ES256","kid":"k1"}"#);
        let body = B64URL.encode(claims.to_string());
        let signed = format!("{header}.{body}");
        let sig = pair
            .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
            .expect("sign");
        format!("{signed}.{}", B64URL.encode(sig.as_ref()))
    }

    fn claims(aud: &str, exp: u64) -> serde_json::Value {
        serde_json::json!({
            "iss": "https://kubernetes.default.svc",
            "sub": "system:serviceaccount:shop:cart",
            "aud": [aud],
            "exp": exp,
            "nbf": 1000,
            "kubernetes.io": {
                "namespace": "shop",
                "serviceaccount": {"name": "cart", "uid": "u-1"},
                "pod": {"name": "cart-0", "uid": "p-1"}
            }
        })
    }

    #[test]
    fn tokens_are_checked_for_signature_issuer_audience_and_time() {
        let (pair, jwk) = key();
        let (other, _) = key();
        let iss = "https://kubernetes.default.svc";
        let good = token(&pair, claims("coffer", 10_000));
        let sa =
            check_locally(&good, std::slice::from_ref(&jwk), iss, "coffer", 5_000).expect("valid");
        assert_eq!(sa.username(), "system:serviceaccount:shop:cart");
        assert_eq!(sa.pod_name.as_deref(), Some("cart-0"));
        let refused = |t: &str, aud: &str, now: u64| match check_locally(
            t,
            std::slice::from_ref(&jwk),
            iss,
            aud,
            now,
        ) {
            Err(Refusal::Invalid(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(refused(&good, "vault", 5_000).contains("audience"));
        assert!(refused(&good, "coffer", 10_061).contains("expired"));
        assert!(
            refused(&token(&other, claims("coffer", 10_000)), "coffer", 5_000)
                .contains("signature")
        );
        let mut forged = good.clone();
        forged.insert(good.find('.').expect("dot") + 3, 'A');
        assert!(check_locally(&forged, std::slice::from_ref(&jwk), iss, "coffer", 5_000).is_err());
        assert!(refused("not-a-jwt", "coffer", 5_000).contains("not a JWT"));
        let mut c = claims("coffer", 10_000);
        c["iss"] = "https://elsewhere".into();
        assert!(refused(&token(&pair, c), "coffer", 5_000).contains("issued by"));
    }

    #[test]
    fn roles_bind_namespaces_and_service_accounts() {
        let role = Role {
            bound_service_accounts: vec!["cart".into()],
            bound_namespaces: vec!["*".into()],
            audience: "coffer".into(),
            policies: vec![],
            max_ttl_s: None,
        };
        let sa = |ns: &str, name: &str| ServiceAccount {
            namespace: ns.into(),
            name: name.into(),
            pod_name: None,
            pod_uid: None,
        };
        assert!(role.admits(&sa("shop", "cart")).is_ok());
        assert!(
            role.admits(&sa("shop", "web"))
                .unwrap_err()
                .contains("service account")
        );
        let strict = Role {
            bound_namespaces: vec!["shop".into()],
            ..role
        };
        assert!(
            strict
                .admits(&sa("dev", "cart"))
                .unwrap_err()
                .contains("namespace")
        );
        assert_eq!(
            parse_username("system:serviceaccount:a:b").map(|s| s.name),
            Some("b".into())
        );
        assert!(parse_username("system:node:x").is_none());
    }
}
