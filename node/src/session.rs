//! Session certificates: what a client presents on every request after logging in.
//!
//! At login the client sends the public half of a fresh session key; the node answers with a
//! short-lived X.509 client certificate for it, signed by the cluster's **session CA**. The CA
//! key is derived from the keyring (so it exists only inside the barrier, is the same on every
//! unsealed node, and is never stored or sent anywhere); a certificate of another cluster does
//! not verify here.
//!
//! The API listener asks every client for a certificate but does not require one (login works
//! without). TLS proves the client holds the key of the certificate it presents; each request
//! then checks that certificate against the session CA, finds the session by its key in the
//! local replicated state, and decides with the identity's current policies (see `api/mod.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair as CertKey, KeyUsagePurpose, PublicKeyData, SerialNumber, SignatureAlgorithm,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, TrustAnchor, UnixTime};
use zeroize::Zeroizing;

use crate::barrier::Keyring;
use crate::keys::ED25519_PKCS8_PREFIX;
use crate::policy::{self, Acl};
use crate::{auth, delegation, identity, kubernetes};

const CA_PURPOSE: &[u8] = b"coffer/session-ca/v1";
const CA_NAME: &str = "coffer session CA";
/// DER of an Ed25519 SubjectPublicKeyInfo up to the 32-byte key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// Certificates start this long before they are issued, for clocks a little behind.
const BACKDATE_S: i64 = 300;

/// The id of the session whose key is `session_key` (Ed25519): the hex of the first 16 bytes of
/// its SHA-256. One key, one session.
pub fn session_id(session_key: &[u8; 32]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, session_key);
    d.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A CA whose Ed25519 key is derived from the keyring for `purpose`: the same on every
/// unsealed node, never stored or sent. Its self-signed certificate (DER) is the same bytes on
/// every node too (fixed fields, deterministic signature). Returns what signs certificates
/// under it: its parameters and key, and its certificate.
pub(crate) fn derived_ca(
    keyring: &Keyring,
    purpose: &[u8],
    name: &str,
) -> Result<(CertificateParams, CertKey, CertificateDer<'static>)> {
    let seed = keyring.derive(purpose);
    let mut pkcs8 = Zeroizing::new(ED25519_PKCS8_PREFIX.to_vec());
    pkcs8.extend_from_slice(&*seed);
    let key = CertKey::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
        &rcgen::PKCS_ED25519,
    )
    .with_context(|| format!("the {name} key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.serial_number = Some(SerialNumber::from(1u64));
    let cert = params.self_signed(&key)?.der().clone();
    Ok((params, key, cert))
}

/// A raw Ed25519 public key, to be certified.
pub(crate) struct Ed25519Public<'a>(pub(crate) &'a [u8; 32]);

impl PublicKeyData for Ed25519Public<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// The session CA of one cluster: issues and checks session certificates.
pub struct SessionCa {
    params: CertificateParams,
    key: CertKey,
    anchor: TrustAnchor<'static>,
}

impl std::fmt::Debug for SessionCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionCa(***)")
    }
}

impl SessionCa {
    /// The session CA of the cluster whose keyring this is.
    pub fn from_keyring(keyring: &Keyring) -> Result<SessionCa> {
        let (params, key, cert) = derived_ca(keyring, CA_PURPOSE, CA_NAME)?;
        let anchor = webpki::anchor_from_trusted_cert(&cert)
            .map_err(|e| anyhow::anyhow!("the session CA certificate: {e}"))?
            .to_owned();
        Ok(SessionCa {
            params,
            key,
            anchor,
        })
    }

    /// A client certificate for `session_key`, naming the identity and session, valid until
    /// `not_after_ms` (ms since the Unix epoch). PEM.
    pub fn issue(
        &self,
        session_key: &[u8; 32],
        identity: &str,
        now_ms: u64,
        not_after_ms: u64,
    ) -> Result<String> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity);
        dn.push(DnType::OrganizationalUnitName, session_id(session_key));
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let secs = |ms: u64| i64::try_from(ms / 1000).unwrap_or(i64::MAX);
        params.not_before = time::OffsetDateTime::from_unix_timestamp(secs(now_ms) - BACKDATE_S)
            .context("the clock is out of range")?;
        params.not_after = time::OffsetDateTime::from_unix_timestamp(secs(not_after_ms))
            .context("the session expiry is out of range")?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        Ok(params
            .signed_by(&Ed25519Public(session_key), &issuer)?
            .pem())
    }

    /// Checks that `cert` was issued by this CA, is a client certificate and is within its
    /// validity at `now_ms`; returns the session key it certifies.
    pub fn verify(&self, cert: &CertificateDer<'_>, now_ms: u64) -> Result<[u8; 32], String> {
        let parsed = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| format!("the client certificate is malformed ({e})"))?;
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_millis(now_ms));
        parsed
            .verify_for_usage(
                &[webpki::ring::ED25519],
                std::slice::from_ref(&self.anchor),
                &[],
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| match e {
                webpki::Error::CertExpired { .. } => {
                    "the session certificate expired; log in again".to_string()
                }
                webpki::Error::CertNotValidYet { .. } => {
                    "the session certificate is not valid yet (check this machine's clock)"
                        .to_string()
                }
                e => format!(
                    "the client certificate was not issued by this cluster's session CA ({e}); log in to this cluster"
                ),
            })?;
        let spki = parsed.subject_public_key_info();
        let spki: &[u8] = spki.as_ref();
        match spki.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            Some(key) if key.len() == 32 => {
                let mut out = [0u8; 32];
                out.copy_from_slice(key);
                Ok(out)
            }
            _ => Err("the client certificate's key is not an Ed25519 session key".into()),
        }
    }
}

/// What a session may do, as decided from the replicated state at one point.
#[derive(Debug)]
pub struct Grant {
    /// The session id.
    pub session_id: String,
    /// The session's key (what its certificate certifies).
    pub session_key: [u8; 32],
    /// The identity that logged in.
    pub identity: String,
    /// Its public key (64 bytes) for a key login; `None` for a Kubernetes login. Sealed
    /// responses are encrypted to it, and wrapped data is released to it.
    pub identity_key: Option<Vec<u8>>,
    /// When the session ends, ms since the Unix epoch.
    pub expires_ms: u64,
    /// When a grant in the decision ends: it must be decided again from then on.
    pub recheck_at_ms: Option<u64>,
    /// The identity's policies when this was decided.
    pub policies: Vec<String>,
    /// Their merged rules.
    pub acl: Acl,
}

/// A stored record by key, decrypted (`None` when absent).
pub type Reader<'a> = dyn Fn(&[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, String> + 'a;
/// Every stored record under a prefix, decrypted.
pub type Lister<'a> = dyn Fn(&[u8]) -> Result<Vec<Zeroizing<Vec<u8>>>, String> + 'a;

/// Decides what the session with `session_key` may do, from the records `read` finds: the
/// session, its identity (which must still have the key it logged in with) and the identity's
/// policies. `admin_key` gives the administrator's public key (from the seal configuration).
/// The error names the failed check.
pub fn decide(
    read: &Reader<'_>,
    list: &Lister<'_>,
    admin_key: &dyn Fn() -> Result<Vec<u8>, String>,
    session_key: &[u8; 32],
) -> Result<Grant, String> {
    let id = session_id(session_key);
    let record = read(&auth::session_key(&id))?
        .ok_or_else(|| format!("session {id} was revoked or has ended; log in again"))?;
    let s: auth::Session =
        postcard::from_bytes(&record).map_err(|e| format!("session {id} is corrupt: {e}"))?;
    if s.session_key.get(..32) != Some(&session_key[..]) {
        return Err(format!("the certificate does not belong to session {id}"));
    }
    let gone = |what: &str| format!("identity {:?} {what}; its sessions ended", s.identity);
    let mut policies = Vec::new();
    if let Some((role_name, account)) = &s.kubernetes {
        // A Kubernetes session holds its role's current policies, while the role still binds
        // its service account.
        let plain = read(&kubernetes::role_key(role_name))?.ok_or_else(|| {
            format!("Kubernetes role {role_name:?} was deleted; its sessions ended")
        })?;
        let role: kubernetes::Role = postcard::from_bytes(&plain)
            .map_err(|e| format!("Kubernetes role {role_name:?} is corrupt: {e}"))?;
        role.admits(account).map_err(|why| {
            format!("Kubernetes role {role_name:?} changed: {why}; its sessions ended")
        })?;
        policies.extend(role.policies);
    } else {
        if s.identity == identity::ADMIN {
            if admin_key()? != s.identity_key {
                return Err(gone("has another key now"));
            }
            policies.push(policy::ADMIN.to_string());
        }
        if let Some(plain) = read(&identity::store_key(&s.identity))? {
            let record: identity::Identity = postcard::from_bytes(&plain)
                .map_err(|e| format!("identity {:?} is corrupt: {e}", s.identity))?;
            if s.identity != identity::ADMIN && record.public_key != s.identity_key {
                return Err(gone("has another key now"));
            }
            policies.extend(record.policies);
        } else if s.identity != identity::ADMIN {
            return Err(gone("was deleted"));
        }
    }
    policies.sort();
    policies.dedup();
    let mut parsed = Vec::with_capacity(policies.len() + 1);
    // What others delegated to this identity, while it runs.
    let mut recheck_at_ms = None;
    if s.kubernetes.is_none() {
        let grants: Vec<delegation::Delegation> = list(&delegation::grantee_prefix(&s.identity))?
            .iter()
            .filter_map(|plain| postcard::from_bytes(plain).ok())
            .collect();
        let (delegated, first_end) = delegation::as_policy(&grants, auth::now_ms());
        if !delegated.rules.is_empty() {
            parsed.push(delegated);
        }
        recheck_at_ms = first_end;
    }
    let granted = parsed.len();
    for name in &policies {
        if name == policy::ADMIN {
            parsed.push(policy::admin().clone());
        } else if let Some(text) = read(&policy::store_key(name))? {
            // A policy that no longer parses grants nothing (writes are checked).
            if let Ok(p) = policy::parse(&String::from_utf8_lossy(&text)) {
                parsed.push(p);
            }
        }
    }
    if granted > 0 {
        policies.push("(delegated grants)".into());
    }
    Ok(Grant {
        session_id: id,
        session_key: *session_key,
        identity_key: s.kubernetes.is_none().then(|| s.identity_key.clone()),
        identity: s.identity,
        expires_ms: s.expires_ms,
        recheck_at_ms,
        acl: Acl::new(&parsed),
        policies,
    })
}

/// Per-node caches of the per-request check. Verified certificates are kept per session CA;
/// grants are kept while no reserved key changed (any login, session, identity or policy
/// change drops them all), so a revocation or policy change applies from the next request.
#[derive(Debug, Default)]
pub struct Sessions {
    ca: Mutex<Option<(Arc<Keyring>, Arc<SessionCa>)>>,
    verified: Mutex<HashMap<Vec<u8>, [u8; 32]>>,
    grants: Mutex<(u64, Grants)>,
}

/// Decisions by session key.
type Grants = HashMap<[u8; 32], Arc<Grant>>;

/// Most entries in each cache before it is cleared.
const CACHE_LIMIT: usize = 100_000;

impl Sessions {
    /// The session CA for `keyring` (made once per keyring; the same for every keyring of one
    /// cluster, whose first key never changes). Certificates verified under another CA are
    /// forgotten.
    pub fn ca(&self, keyring: &Arc<Keyring>) -> Result<Arc<SessionCa>> {
        let mut slot = self.ca.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((ring, ca)) = slot.as_ref()
            && Arc::ptr_eq(ring, keyring)
        {
            return Ok(ca.clone());
        }
        let ca = Arc::new(SessionCa::from_keyring(keyring)?);
        if slot.as_ref().is_some_and(|(_, old)| {
            old.anchor.subject_public_key_info != ca.anchor.subject_public_key_info
        }) {
            self.forget_certificates();
        }
        *slot = Some((keyring.clone(), ca.clone()));
        Ok(ca)
    }

    /// The session key `cert` certifies, checked against `ca` (cached).
    pub fn verify(
        &self,
        ca: &SessionCa,
        cert: &CertificateDer<'_>,
        now_ms: u64,
    ) -> Result<[u8; 32], String> {
        if let Some(key) = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cert.as_ref())
        {
            return Ok(*key);
        }
        let key = ca.verify(cert, now_ms)?;
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= CACHE_LIMIT {
            verified.clear();
        }
        verified.insert(cert.as_ref().to_vec(), key);
        Ok(key)
    }

    /// Forgets verified certificates.
    fn forget_certificates(&self) {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The grant of `session_key` decided at reserved-change count `generation`, if cached.
    pub fn grant(&self, generation: u64, session_key: &[u8; 32]) -> Option<Arc<Grant>> {
        let grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        (grants.0 == generation)
            .then(|| grants.1.get(session_key).cloned())
            .flatten()
    }

    /// Remembers a grant decided from the state at `generation`.
    pub fn keep(&self, generation: u64, session_key: [u8; 32], grant: Arc<Grant>) {
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        if grants.0 != generation {
            if generation < grants.0 {
                return; // decided from an older state than the cache holds
            }
            *grants = (generation, HashMap::new());
        }
        if grants.1.len() >= CACHE_LIMIT {
            grants.1.clear();
        }
        grants.1.insert(session_key, grant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;

    #[test]
    fn a_session_certificate_verifies_only_on_its_own_cluster_and_in_time() {
        let ring = Keyring::new().expect("keyring");
        let ca = SessionCa::from_keyring(&ring).expect("ca");
        let session = KeyPair::generate().expect("key");
        let key = session.public().signing_key();
        let now = 1_800_000_000_000;
        let pem = ca.issue(&key, "app", now, now + 60_000).expect("cert");
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("one cert")
            .expect("pem");
        assert_eq!(ca.verify(&der, now), Ok(key));
        // Every node derives the same CA from the same keyring.
        let again = SessionCa::from_keyring(&ring).expect("ca");
        assert_eq!(again.verify(&der, now + 59_000), Ok(key));
        let expired = ca.verify(&der, now + 61_000).expect_err("expired");
        assert!(expired.contains("expired"), "{expired}");
        let other = SessionCa::from_keyring(&Keyring::new().expect("keyring")).expect("ca");
        let foreign = other.verify(&der, now).expect_err("another cluster");
        assert!(foreign.contains("session CA"), "{foreign}");
        let mut tampered = der.as_ref().to_vec();
        let at = tampered.len() - 80;
        tampered[at] ^= 1;
        assert!(ca.verify(&CertificateDer::from(tampered), now).is_err());
        assert_eq!(session_id(&key).len(), 32);
    }

    #[test]
    fn grants_are_dropped_when_the_reserved_state_moves() {
        let sessions = Sessions::default();
        let grant = Arc::new(Grant {
            session_id: "s".into(),
            session_key: [1; 32],
            identity: "app".into(),
            identity_key: None,
            expires_ms: 1,
            recheck_at_ms: None,
            policies: Vec::new(),
            acl: Acl::default(),
        });
        sessions.keep(5, [1; 32], grant);
        assert!(sessions.grant(5, &[1; 32]).is_some());
        assert!(sessions.grant(6, &[1; 32]).is_none(), "a newer state");
        sessions.keep(
            4,
            [2; 32],
            Arc::new(Grant {
                session_id: "t".into(),
                session_key: [2; 32],
                identity: "app".into(),
                identity_key: None,
                expires_ms: 1,
                recheck_at_ms: None,
                policies: Vec::new(),
                acl: Acl::default(),
            }),
        );
        assert!(
            sessions.grant(4, &[2; 32]).is_none(),
            "older than the cache"
        );
    }
}
