//! The client side of logging in: the exact bytes each login signs, and one login exchange on
//! an `Auth` client. The server verifies signatures over these same bytes, so they never change
//! within a version of the login (`coffer/login/v1`, `coffer/kubernetes-login/v1`).

use coffer_api::v1 as pb;
use coffer_api::v1::auth_client::AuthClient;
use tonic::transport::Channel;

use crate::keys::KeyPair;
use crate::session::SessionCredentials;

/// What a client signs with its identity key to log in (Private Key Challenge): purpose,
/// cluster id, challenge, the session public key it wants and the TTL it asks for.
pub fn key_login_message(
    cluster_id: &str,
    challenge: &[u8],
    session_key: &[u8],
    ttl_s: u64,
) -> Vec<u8> {
    let mut m = b"coffer/login/v1\0".to_vec();
    m.extend_from_slice(cluster_id.as_bytes());
    m.push(0);
    m.extend_from_slice(challenge);
    m.extend_from_slice(session_key);
    m.extend_from_slice(&ttl_s.to_be_bytes());
    m
}

/// What a client signs with its new session key to log in with a Kubernetes service-account
/// token: the token itself is only present as its SHA-256.
pub fn kubernetes_login_message(
    cluster_id: &str,
    challenge: &[u8],
    role: &str,
    token: &str,
    session_key: &[u8],
    ttl_s: u64,
) -> Vec<u8> {
    let mut m = b"coffer/kubernetes-login/v1\0".to_vec();
    m.extend_from_slice(cluster_id.as_bytes());
    m.push(0);
    m.extend_from_slice(challenge);
    m.extend_from_slice(role.as_bytes());
    m.push(0);
    m.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    m.extend_from_slice(session_key);
    m.extend_from_slice(&ttl_s.to_be_bytes());
    m
}

fn fresh_session_key() -> Result<KeyPair, tonic::Status> {
    KeyPair::generate().map_err(|e| tonic::Status::internal(e.to_string()))
}

fn credentials(login: pb::LoginResponse, session: &KeyPair) -> SessionCredentials {
    SessionCredentials {
        certificate: login.certificate.clone(),
        key: session.signing_key_pkcs8_pem(),
        login,
    }
}

/// One Private Key Challenge login on `client`: a challenge, a fresh session key, the login
/// signed with `identity`. `ttl_s` 0 asks for the default lifetime.
pub async fn key_login(
    client: &mut AuthClient<Channel>,
    identity: &KeyPair,
    ttl_s: u64,
) -> Result<SessionCredentials, tonic::Status> {
    let session = fresh_session_key()?;
    let challenge = client
        .challenge(pb::ChallengeRequest {})
        .await?
        .into_inner();
    let session_key = session.public().to_bytes().to_vec();
    let signature = identity.sign(&key_login_message(
        &challenge.cluster_id,
        &challenge.challenge,
        &session_key,
        ttl_s,
    ));
    let login = client
        .login(pb::LoginRequest {
            challenge: challenge.challenge,
            public_key: identity.public().to_bytes().to_vec(),
            session_public_key: session_key,
            ttl_seconds: ttl_s,
            signature: signature.to_vec(),
        })
        .await?
        .into_inner();
    Ok(credentials(login, &session))
}

/// One Kubernetes login on `client`: a fresh session key signs the challenge, the role and the
/// service-account `token`, which is sent along.
pub async fn kubernetes_login(
    client: &mut AuthClient<Channel>,
    role: &str,
    token: &str,
    ttl_s: u64,
) -> Result<SessionCredentials, tonic::Status> {
    let session = fresh_session_key()?;
    let challenge = client
        .challenge(pb::ChallengeRequest {})
        .await?
        .into_inner();
    let session_key = session.public().to_bytes().to_vec();
    let signature = session.sign(&kubernetes_login_message(
        &challenge.cluster_id,
        &challenge.challenge,
        role,
        token,
        &session_key,
        ttl_s,
    ));
    let login = client
        .kubernetes_login(pb::KubernetesLoginRequest {
            role: role.to_string(),
            token: token.to_string(),
            challenge: challenge.challenge,
            session_public_key: session_key,
            ttl_seconds: ttl_s,
            signature: signature.to_vec(),
        })
        .await?
        .into_inner();
    Ok(credentials(login, &session))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_messages_have_their_documented_layout() {
        let m = key_login_message("c1", b"CH", b"SK", 7);
        assert_eq!(m, b"coffer/login/v1\0c1\0CHSK\0\0\0\0\0\0\0\x07".to_vec());
        let k = kubernetes_login_message("c1", b"CH", "web", "tok", b"SK", 7);
        let digest = ring::digest::digest(&ring::digest::SHA256, b"tok");
        let mut want = b"coffer/kubernetes-login/v1\0c1\0CHweb\0".to_vec();
        want.extend_from_slice(digest.as_ref());
        want.extend_from_slice(b"SK\0\0\0\0\0\0\0\x07");
        assert_eq!(k, want);
        assert!(
            !k.windows(3).any(|w| w == b"tok"),
            "the token is only hashed"
        );
    }
}
