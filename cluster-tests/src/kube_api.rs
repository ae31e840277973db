//! A test Kubernetes API server. No kube-apiserver can be installed where these tests run, so
//! this stands in for one: HTTPS on loopback (a CA of its own), speaking the real TokenReview
//! protocol (`POST /apis/authentication.k8s.io/v1/tokenreviews`, the reviewer authenticated by
//! its bearer token as the API server does) and OIDC discovery with JWKS
//! (`/.well-known/openid-configuration`, `/openid/v1/jwks`), and issuing real ES256-signed
//! service-account tokens with the claims Kubernetes puts in projected tokens.
//!
//! Knobs for the bad cases: delete a service account (TokenReview refuses its tokens; local
//! validation cannot tell), answer TokenReviews with an empty audience list (an API server that
//! checked only its own audience), go silent (accept connections, never answer).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Default)]
struct State {
    deleted: BTreeSet<(String, String)>,
    empty_audiences: bool,
    silent: bool,
    reviewer_token: String,
    reviews: usize,
}

/// A running test API server.
pub struct KubeApi {
    /// `https://127.0.0.1:PORT`: the API server's URL and the token issuer.
    pub url: String,
    /// Its CA certificate (PEM file).
    pub ca_file: PathBuf,
    /// The reviewer's token file (what a Coffer node presents for TokenReview).
    pub reviewer_token_file: PathBuf,
    key: Arc<EcdsaKeyPair>,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl KubeApi {
    /// The `coffer server` flags that check tokens with this server's TokenReview.
    pub fn token_review_args(&self) -> Vec<String> {
        vec![
            "--kubernetes-api-url".into(),
            self.url.clone(),
            "--kubernetes-ca-cert".into(),
            self.ca_file.display().to_string(),
            "--kubernetes-reviewer-token-file".into(),
            self.reviewer_token_file.display().to_string(),
        ]
    }
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi").field("url", &self.url).finish()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn signing_key() -> EcdsaKeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("ES256 key");
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .expect("ES256 key")
}

const KID: &str = "test-sa-key-1";

impl KubeApi {
    /// Starts the server on 127.0.0.1, writing its CA and a reviewer token into `dir`.
    pub async fn start(dir: &Path) -> KubeApi {
        KubeApi::start_on(dir, "127.0.0.1").await
    }

    /// Like [`KubeApi::start`], listening on `ip` (e.g. a Docker network's gateway, where
    /// containers reach it as their in-cluster API server), its certificate naming `ip`.
    pub async fn start_on(dir: &Path, ip: &str) -> KubeApi {
        let ca = coffer_node::tls::CertAuthority::generate().expect("CA");
        let (cert, key) = ca
            .issue("test kube-apiserver", &[ip.to_string()])
            .expect("server certificate");
        let ca_file = dir.join("kube-ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).expect("write CA");
        let reviewer_token_file = dir.join("reviewer-token");
        std::fs::write(&reviewer_token_file, "reviewer-1").expect("write reviewer token");
        let certs = rustls_pemfile::certs(&mut cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("cert");
        let key = rustls_pemfile::private_key(&mut key.as_bytes())
            .expect("key")
            .expect("a key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("TLS config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .unwrap_or_else(|e| panic!("cannot listen on {ip}: {e}"));
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State {
            reviewer_token: "reviewer-1".into(),
            ..State::default()
        }));
        let signer = Arc::new(signing_key());
        let (st, sg, issuer) = (state.clone(), signer.clone(), url.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, st, sg, issuer) =
                    (acceptor.clone(), st.clone(), sg.clone(), issuer.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(conn).await else {
                        return;
                    };
                    if st.lock().expect("state").silent {
                        // Hold the connection and never answer, nor read: a read could end
                        // early (on a TLS alert or an error) and drop the connection, which
                        // the client would see as a broken connection rather than silence.
                        tokio::time::sleep(std::time::Duration::from_secs(120)).await;
                        drop(tls);
                        return;
                    }
                    if let Some((method, path, auth, body)) = read_request(&mut tls).await {
                        let (code, answer) =
                            route(&st, &sg, &issuer, &method, &path, auth.as_deref(), &body);
                        let reason = if code == 200 { "OK" } else { "Error" };
                        let response = format!(
                            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                            answer.len()
                        );
                        let _ = tls.write_all(response.as_bytes()).await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        KubeApi {
            url,
            ca_file,
            reviewer_token_file,
            key: signer,
            state,
            task,
        }
    }

    /// A projected service-account token for `namespace`/`name`, bound to pod `pod` (name, uid),
    /// for `audiences`, valid `ttl_s` seconds from now (negative: already expired).
    pub fn token(
        &self,
        namespace: &str,
        name: &str,
        pod: (&str, &str),
        audiences: &[&str],
        ttl_s: i64,
    ) -> String {
        sign(&self.key, &self.url, namespace, name, pod, audiences, ttl_s)
    }

    /// A token like [`KubeApi::token`] but signed by a key this server does not publish.
    pub fn token_from_unknown_key(
        &self,
        namespace: &str,
        name: &str,
        audiences: &[&str],
    ) -> String {
        sign(
            &signing_key(),
            &self.url,
            namespace,
            name,
            ("p", "u"),
            audiences,
            600,
        )
    }

    /// Deletes a service account: TokenReview stops authenticating its tokens.
    pub fn delete_service_account(&self, namespace: &str, name: &str) {
        self.state
            .lock()
            .expect("state")
            .deleted
            .insert((namespace.into(), name.into()));
    }

    /// Answers TokenReviews with an empty audience list (as when no audience was checked).
    pub fn set_empty_audiences(&self, on: bool) {
        self.state.lock().expect("state").empty_audiences = on;
    }

    /// Accepts connections but never answers.
    pub fn set_silent(&self, on: bool) {
        self.state.lock().expect("state").silent = on;
    }

    /// Rotates the reviewer's token: the file gets a new one, and only that one is accepted.
    pub fn rotate_reviewer_token(&self, new: &str) {
        std::fs::write(&self.reviewer_token_file, new).expect("write reviewer token");
        self.state.lock().expect("state").reviewer_token = new.into();
    }

    /// TokenReviews answered so far.
    pub fn reviews(&self) -> usize {
        self.state.lock().expect("state").reviews
    }
}

fn now_s() -> i64 {
    i64::try_from(coffer_node::auth::now_ms() / 1000).unwrap_or(i64::MAX)
}

fn sign(
    key: &EcdsaKeyPair,
    issuer: &str,
    namespace: &str,
    name: &str,
    pod: (&str, &str),
    audiences: &[&str],
    ttl_s: i64,
) -> String {
    let now = now_s();
    let claims = serde_json::json!({
        "iss": issuer,
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "aud": audiences,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_s,
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": format!("uid-{name}")},
            "pod": {"name": pod.0, "uid": pod.1},
        },
    });
    let header = B64URL.encode(format!(r#"{{"alg":"ES256","kid":"{KID}"}}"#));
    let signed = format!("{header}.{}", B64URL.encode(claims.to_string()));
    let sig = key
        .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
        .expect("sign");
    format!("{signed}.{}", B64URL.encode(sig.as_ref()))
}

async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> Option<(String, String, Option<String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let mut length = 0usize;
    let mut auth = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().ok()?,
                "authorization" => auth = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((method, path, auth, body))
}

/// The strings of a JSON array (none if it is not one).
fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn status_failure(code: u16, reason: &str, message: &str) -> (u16, String) {
    (
        code,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code})
        .to_string(),
    )
}

fn route(
    state: &Mutex<State>,
    key: &EcdsaKeyPair,
    issuer: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let path = path.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/.well-known/openid-configuration") => (
            200,
            serde_json::json!({
                "issuer": issuer,
                "jwks_uri": format!("{issuer}/openid/v1/jwks"),
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["ES256"],
            })
            .to_string(),
        ),
        ("GET", "/openid/v1/jwks") => {
            let point = key.public_key().as_ref();
            (
                200,
                serde_json::json!({"keys": [{
                    "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": KID,
                    "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..65]),
                }]})
                .to_string(),
            )
        }
        ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let mut st = state.lock().expect("state");
            if auth != Some(format!("Bearer {}", st.reviewer_token).as_str()) {
                return status_failure(401, "Unauthorized", "Unauthorized");
            }
            st.reviews += 1;
            let Ok(review) = serde_json::from_slice::<serde_json::Value>(body) else {
                return status_failure(400, "BadRequest", "the body is not a TokenReview");
            };
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            let wanted = strings(&review["spec"]["audiences"]);
            let status = review_token(&st, key, issuer, token, &wanted);
            let mut answer = review.clone();
            answer["status"] = status;
            (200, answer.to_string())
        }
        _ => status_failure(404, "NotFound", "the test API server serves no such path"),
    }
}

/// What a real API server puts in `status` for `token` and the wanted audiences.
fn review_token(
    st: &State,
    key: &EcdsaKeyPair,
    issuer: &str,
    token: &str,
    wanted: &[String],
) -> serde_json::Value {
    let refuse =
        |error: &str| serde_json::json!({"authenticated": false, "user": {}, "error": error});
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return refuse("invalid bearer token");
    }
    let signed = format!("{}.{}", parts[0], parts[1]);
    let Ok(sig) = B64URL.decode(parts[2]) else {
        return refuse("invalid bearer token");
    };
    let verified = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        key.public_key().as_ref(),
    )
    .verify(signed.as_bytes(), &sig)
    .is_ok();
    let claims: serde_json::Value = B64URL
        .decode(parts[1])
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if !verified || claims["iss"] != issuer {
        return refuse("invalid bearer token, square/go-jose: error in cryptographic primitive");
    }
    if claims["exp"].as_i64().unwrap_or(0) < now_s() {
        return refuse("invalid bearer token, service account token has expired");
    }
    let k = &claims["kubernetes.io"];
    let (ns, name) = (
        k["namespace"].as_str().unwrap_or_default().to_string(),
        k["serviceaccount"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    );
    if st.deleted.contains(&(ns.clone(), name.clone())) {
        return refuse(&format!(
            "invalid bearer token, service account {ns}/{name} has been deleted"
        ));
    }
    let token_audiences = strings(&claims["aud"]);
    let wanted: Vec<String> = if wanted.is_empty() {
        vec![issuer.to_string()]
    } else {
        wanted.to_vec()
    };
    let matched: Vec<String> = wanted
        .iter()
        .filter(|a| token_audiences.contains(a))
        .cloned()
        .collect();
    if matched.is_empty() {
        return refuse(
            "invalid bearer token, token audiences [..] is invalid for the target audiences",
        );
    }
    serde_json::json!({
        "authenticated": true,
        "user": {
            "username": format!("system:serviceaccount:{ns}:{name}"),
            "uid": format!("uid-{name}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/pod-name": [k["pod"]["name"]],
                "authentication.kubernetes.io/pod-uid": [k["pod"]["uid"]],
            },
        },
        "audiences": if st.empty_audiences { Vec::new() } else { matched },
    })
}
