//! Node identity: who may speak on the peer port.
//!
//! Node-to-node TLS uses **node certificates** issued by the cluster's **node CA**, an Ed25519
//! key derived from the keyring (like the session CA: the same on every unsealed node, never
//! stored or sent). Init stores the node CA's certificate (public) in the replicated state, so
//! sealed members know it too. A node certificate certifies the node's key (a `coffer keygen`
//! key, the one an administrator registers for a joining node) and names the node as
//! `node-<id>.coffer.internal` besides its peer host.
//!
//! How a node gets one:
//! * an **initial member** (one of `--initial-member`) forms the cluster with a certificate of
//!   the operator's bootstrap CA (`--tls-cert`, from `coffer certs`). Once unsealed it issues
//!   its own node certificate, presents that from then on, and records itself
//!   (`\0coffer/node-cert/<id>`). From the moment a member's record is applied, the bootstrap CA
//!   is no longer accepted for it: once every initial member has unsealed once, the bootstrap
//!   CA opens nothing on the peer port;
//! * a **joining node** proves the node key an administrator registered for its id
//!   (`coffer cluster register-node`) by signing a login challenge (`Cluster.Join`); the
//!   serving node records it, issues its certificate and adds it as a learner.
//!
//! Every peer connection is checked at the handshake and every peer request again (so a
//! connection opened before a member's bootstrap window closed, or by a node since removed,
//! gets no further): the certificate chains to the node CA and names a member or a recorded
//! node, or chains to the bootstrap CA and names an initial member not yet recorded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use coffer_raft::RaftNode;
use coffer_storage::{Command, Compare, Op, Txn};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer,
    KeyPair as CertKey, KeyUsagePurpose,
};
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DistinguishedName as TlsName, SignatureScheme};
use serde::{Deserialize, Serialize};

use crate::barrier::Keyring;
use crate::keys::KeyPair;
use crate::session::{Ed25519Public, derived_ca};
use crate::tls::{SignatureAlgorithms, handshake_signatures};

/// The node CA's certificate (DER), written at init; public.
pub const NODE_CA_KEY: &[u8] = b"\0coffer/seal/node-ca";
/// `\0coffer/node-key/<id>`: the node key an administrator registered for a joining node.
pub const NODE_KEY_PREFIX: &[u8] = b"\0coffer/node-key/";
/// `\0coffer/node-cert/<id>`: a node that holds a node certificate (see [`NodeRecord`]).
pub const NODE_CERT_PREFIX: &[u8] = b"\0coffer/node-cert/";
const CA_PURPOSE: &[u8] = b"coffer/node-ca/v1";
const CA_NAME: &str = "coffer node CA";
/// Node certificates are good for a year; a node renews its own when it is unsealed and less
/// than [`RENEW_BEFORE_S`] remain.
const CERT_LIFETIME_S: i64 = 365 * 86_400;
const RENEW_BEFORE_S: i64 = 30 * 86_400;
/// Node certificates start a day before they are issued: a peer whose clock is behind (by
/// minutes, as the chaos clock-skew fault makes it) still takes them as valid.
const BACKDATE_S: i64 = 86_400;
/// How long a recorded node that is not (yet) a member is trusted: a join adds it within
/// seconds, or failed.
const JOIN_WINDOW_MS: u64 = 10 * 60 * 1000;
/// An accepted peer certificate is checked again after this long.
const ACCEPTED_FOR: Duration = Duration::from_secs(60);

/// The name every certificate of node `id` carries (DNS subject alternative name).
pub fn node_name(id: u64) -> String {
    format!("node-{id}.coffer.internal")
}

/// The reserved key of node `id`'s registered key.
pub fn node_key_record(id: u64) -> Vec<u8> {
    [NODE_KEY_PREFIX, id.to_string().as_bytes()].concat()
}

/// The reserved key of node `id`'s certificate record.
pub fn node_cert_record(id: u64) -> Vec<u8> {
    [NODE_CERT_PREFIX, id.to_string().as_bytes()].concat()
}

/// `\0coffer/node-retired/<id>`: a removed node's id, never admitted again.
pub const NODE_RETIRED_PREFIX: &[u8] = b"\0coffer/node-retired/";

/// The reserved key that retires node `id`.
pub fn node_retired_record(id: u64) -> Vec<u8> {
    [NODE_RETIRED_PREFIX, id.to_string().as_bytes()].concat()
}

/// The Kubernetes role reserved for cluster members: a pod whose service-account token it
/// admits may join (with a node key of its own); no session logs in with it.
pub const KUBERNETES_MEMBER_ROLE: &str = "coffer-members";

/// What the state records of a node that holds a node certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    /// Its API address.
    pub api_addr: String,
    /// Its peer address.
    pub peer_addr: String,
    /// When it was recorded (ms since the Unix epoch).
    pub recorded_ms: u64,
    /// How: "initial member" or "joined with a registered node key".
    pub how: String,
    /// The public signing key (Ed25519) its node certificates certify. Peers accept a node
    /// certificate for this node only with this key: a certificate issued before the node was
    /// removed and joined again (with a new key) opens nothing.
    pub signing_key: [u8; 32],
}

/// A node record as builds before key pinning wrote it (postcard is positional: the new field
/// makes those bytes too short for [`NodeRecord`]).
#[derive(Debug, Deserialize)]
struct NodeRecordV0 {
    #[allow(dead_code)]
    api_addr: String,
    #[allow(dead_code)]
    peer_addr: String,
    recorded_ms: u64,
    #[allow(dead_code)]
    how: String,
}

/// What a joining node signs with its node key (`kubernetes_token` empty when it proves a
/// registered key instead).
pub fn join_message(
    cluster_id: &str,
    challenge: &[u8],
    node_id: u64,
    api_addr: &str,
    peer_addr: &str,
    kubernetes_token: &str,
) -> Vec<u8> {
    let mut m = b"coffer/node-join/v1\0".to_vec();
    for part in [
        cluster_id.as_bytes(),
        api_addr.as_bytes(),
        peer_addr.as_bytes(),
        kubernetes_token.as_bytes(),
    ] {
        m.extend_from_slice(&(part.len() as u64).to_be_bytes());
        m.extend_from_slice(part);
    }
    m.extend_from_slice(&node_id.to_be_bytes());
    m.extend_from_slice(challenge);
    m
}

/// Checks a peer address a node asks its certificate to name: a DNS name or an IP address,
/// with a port, and never a node name or a wildcard (which would let it pass for other nodes).
pub fn check_peer_addr(addr: &str) -> Result<(), String> {
    let host = host_of(addr);
    let port_ok = addr
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
    let lower = host.to_ascii_lowercase();
    if !port_ok
        || host.is_empty()
        || host.contains('*')
        || lower.ends_with(".coffer.internal")
        || lower == "coffer.internal"
        || ServerName::try_from(host.to_string()).is_err()
    {
        return Err(format!(
            "the peer address {addr:?} must be HOST:PORT with a DNS name or an IP address (no wildcard, nothing under coffer.internal)"
        ));
    }
    Ok(())
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The node CA of one cluster.
pub struct NodeCa {
    params: CertificateParams,
    key: CertKey,
    cert: CertificateDer<'static>,
}

impl std::fmt::Debug for NodeCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCa(***)")
    }
}

impl NodeCa {
    /// The node CA of the cluster whose keyring this is.
    pub fn from_keyring(keyring: &Keyring) -> Result<NodeCa> {
        let (params, key, cert) = derived_ca(keyring, CA_PURPOSE, CA_NAME)?;
        Ok(NodeCa { params, key, cert })
    }

    /// Its certificate (DER).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// A certificate for node `id`'s key (Ed25519, raw), for server and client auth, naming
    /// [`node_name`] and `host` (its peer host). PEM.
    pub fn issue(&self, id: u64, node_key: &[u8; 32], host: &str, now_ms: u64) -> Result<String> {
        let mut names = vec![node_name(id)];
        if !host.is_empty() && host != names[0] {
            names.push(host.to_string());
        }
        let mut params = CertificateParams::new(names)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("coffer-node-{id}"));
        params.distinguished_name = dn;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        params.not_before = time::OffsetDateTime::from_unix_timestamp(now - BACKDATE_S)
            .context("the clock is out of range")?;
        params.not_after = time::OffsetDateTime::from_unix_timestamp(now + CERT_LIFETIME_S)
            .context("the clock is out of range")?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        Ok(params.signed_by(&Ed25519Public(node_key), &issuer)?.pem())
    }
}

/// The subject a node CA certificate has (the same for every cluster), as TLS hints name it.
fn node_ca_subject() -> Result<TlsName> {
    let key = CertKey::generate_for(&rcgen::PKCS_ED25519)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    let cert = params.self_signed(&key)?;
    let anchor = webpki::anchor_from_trusted_cert(cert.der())
        .map_err(|e| anyhow::anyhow!("the node CA certificate: {e}"))?;
    Ok(TlsName::in_sequence(&anchor.subject))
}

fn anchor(der: &[u8]) -> Result<TrustAnchor<'static>> {
    Ok(
        webpki::anchor_from_trusted_cert(&CertificateDer::from(der.to_vec()))
            .map_err(|e| anyhow::anyhow!("not a CA certificate: {e}"))?
            .to_owned(),
    )
}

fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .context("a PEM certificate")
}

/// A change of the trust. When it ends, still holding the lock, it bumps the generation and
/// then empties the cache of accepted certificates: an acceptance decided on the old trust is
/// either emptied out or (seeing the new generation) never cached.
struct TrustWrite<'a> {
    guard: std::sync::RwLockWriteGuard<'a, Trust>,
    tls: &'a PeerTls,
}

impl std::ops::Deref for TrustWrite<'_> {
    type Target = Trust;

    fn deref(&self) -> &Trust {
        &self.guard
    }
}

impl std::ops::DerefMut for TrustWrite<'_> {
    fn deref_mut(&mut self) -> &mut Trust {
        &mut self.guard
    }
}

impl Drop for TrustWrite<'_> {
    fn drop(&mut self) {
        self.tls
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.tls
            .accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// Whom this node trusts on the peer port.
#[derive(Debug, Default)]
struct Trust {
    /// The node CA, once known (from the applied state, or from a join answer).
    node_ca: Option<TrustAnchor<'static>>,
    /// The node CA came from a join answer and this node has no state yet: any node of the
    /// cluster is accepted (it only talks to the members that added it).
    joining: bool,
    /// The operator's bootstrap CA.
    bootstrap: Vec<TrustAnchor<'static>>,
    /// Initial members (from this node's configuration).
    initial: BTreeSet<u64>,
    /// Nodes recorded as holding a node certificate, with when (from the applied state).
    recorded: BTreeMap<u64, u64>,
    /// The key each recorded node's certificates must certify (from the same records).
    pins: BTreeMap<u64, [u8; 32]>,
    /// Removed nodes' ids (from the applied state).
    retired: BTreeSet<u64>,
    /// Voters and learners (from the applied membership).
    members: BTreeSet<u64>,
}

impl Trust {
    /// Initial members still allowed to use a bootstrap certificate: those of this node's
    /// configuration, and members without a record (a node that joined has no
    /// `--initial-member` list; every member but an initial one that never unsealed has a
    /// record), unless recorded or retired.
    fn bootstrap_open(&self) -> impl Iterator<Item = u64> + '_ {
        self.initial
            .union(&self.members)
            .copied()
            .filter(|id| !self.recorded.contains_key(id) && !self.retired.contains(id))
    }

    /// Nodes whose node certificates count: members, and nodes recorded lately that are
    /// being added (a join that never became a membership stops counting).
    fn certified(&self, now_ms: u64) -> Vec<u64> {
        let joining = self
            .recorded
            .iter()
            .filter(|(_, at)| now_ms.saturating_sub(**at) < JOIN_WINDOW_MS)
            .map(|(id, _)| *id);
        let mut ids: BTreeSet<u64> = self.members.iter().copied().chain(joining).collect();
        ids.retain(|id| !self.retired.contains(id));
        ids.into_iter().collect()
    }
}

/// This node's peer TLS: what it presents and whom it accepts. Cheap to share.
pub struct PeerTls {
    node_id: u64,
    algorithms: WebPkiSupportedAlgorithms,
    trust: RwLock<Trust>,
    /// The bootstrap certificate and key (from the TLS files).
    bootstrap: Arc<CertifiedKey>,
    /// The node key, which node certificates certify.
    node_key: Arc<KeyPair>,
    /// The node certificate, once this node uses it.
    own: RwLock<Option<(Arc<CertifiedKey>, i64)>>,
    /// Where it is kept (none for in-memory nodes).
    dir: Option<PathBuf>,
    /// TLS hints (acceptable CA names): [none, node CA, bootstrap CA, both].
    hints: [Vec<TlsName>; 4],
    node_ca_name: TlsName,
    /// Peer certificates accepted lately: certificate hash to (node id, when).
    accepted: Mutex<HashMap<[u8; 32], (u64, std::time::Instant)>>,
    /// Bumped on every change of the trust: an acceptance decided before a change is not
    /// cached after it.
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// The peer TLS of node `node_id`: `bootstrap` is its certificate chain and key from the
    /// TLS files with the bootstrap CA `bootstrap_ca` (PEM), `node_key` its node key, `dir`
    /// where its node certificate is kept (loaded from there when present), `initial` the
    /// initial members.
    pub fn new(
        node_id: u64,
        bootstrap: Arc<CertifiedKey>,
        bootstrap_ca: &[u8],
        node_key: Arc<KeyPair>,
        dir: Option<PathBuf>,
        initial: BTreeSet<u64>,
    ) -> Result<Arc<PeerTls>> {
        let provider = rustls::crypto::ring::default_provider();
        let bootstrap_anchors = pem_certs(bootstrap_ca)?
            .iter()
            .map(|c| anchor(c))
            .collect::<Result<Vec<_>>>()
            .context("the bootstrap CA (--tls-ca)")?;
        let node_ca_name = node_ca_subject()?;
        let bootstrap_names: Vec<TlsName> = bootstrap_anchors
            .iter()
            .map(|a| TlsName::in_sequence(&a.subject))
            .collect();
        let hints = [
            Vec::new(),
            vec![node_ca_name.clone()],
            bootstrap_names.clone(),
            [vec![node_ca_name.clone()], bootstrap_names].concat(),
        ];
        let tls = Arc::new(PeerTls {
            node_id,
            algorithms: provider.signature_verification_algorithms,
            trust: RwLock::new(Trust {
                bootstrap: bootstrap_anchors,
                initial,
                ..Trust::default()
            }),
            bootstrap,
            node_key,
            own: RwLock::new(None),
            dir,
            hints,
            node_ca_name,
            accepted: Mutex::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
        });
        if let Some(dir) = &tls.dir {
            let cert = dir.join("node-cert.pem");
            if cert.exists() {
                let pem = std::fs::read(&cert)
                    .with_context(|| format!("cannot read {}", cert.display()))?;
                tls.install(&pem)
                    .with_context(|| format!("the node certificate {}", cert.display()))?;
            }
            // Until its state holds the node CA (a node restarted right after joining).
            let ca = dir.join("node-ca.der");
            if ca.exists() {
                let der =
                    std::fs::read(&ca).with_context(|| format!("cannot read {}", ca.display()))?;
                let mut trust = tls.trust_mut();
                trust.node_ca = Some(anchor(&der)?);
                trust.joining = true;
            }
        }
        Ok(tls)
    }

    fn trust(&self) -> std::sync::RwLockReadGuard<'_, Trust> {
        self.trust.read().unwrap_or_else(|p| p.into_inner())
    }

    fn trust_mut(&self) -> TrustWrite<'_> {
        TrustWrite {
            guard: self.trust.write().unwrap_or_else(|p| p.into_inner()),
            tls: self,
        }
    }

    fn own_cert(&self) -> Option<(Arc<CertifiedKey>, i64)> {
        self.own.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Uses `pem` (a node certificate for this node's key) from now on.
    fn install(&self, pem: &[u8]) -> Result<()> {
        let chain = pem_certs(pem)?;
        let first = chain.first().context("no certificate in the PEM")?;
        let parsed = webpki::EndEntityCert::try_from(first)
            .map_err(|e| anyhow::anyhow!("malformed certificate: {e}"))?;
        parsed
            .verify_is_valid_for_subject_name(&ServerName::try_from(node_name(self.node_id))?)
            .map_err(|_| anyhow::anyhow!("the certificate is not for node {}", self.node_id))?;
        let spki = parsed.subject_public_key_info();
        if !spki
            .as_ref()
            .ends_with(&self.node_key.public().signing_key())
        {
            anyhow::bail!("the certificate is for another key than this node's key");
        }
        let not_after = not_after_s(first)?;
        let pkcs8 = rustls_pemfile::pkcs8_private_keys(
            &mut self.node_key.signing_key_pkcs8_pem().as_bytes(),
        )
        .next()
        .context("the node key")??;
        let key = rustls::crypto::ring::sign::any_eddsa_type(&pkcs8)
            .map_err(|e| anyhow::anyhow!("the node key: {e}"))?;
        *self.own.write().unwrap_or_else(|p| p.into_inner()) =
            Some((Arc::new(CertifiedKey::new(chain, key)), not_after));
        Ok(())
    }

    /// Saves and uses a node certificate (PEM) and the node CA it chains to. The files are
    /// replaced whole (written beside, then renamed), before the certificate is used.
    pub fn take(&self, cert_pem: &str, node_ca: &[u8]) -> Result<()> {
        if let Some(dir) = &self.dir {
            std::fs::create_dir_all(dir)?;
            for (name, bytes) in [
                ("node-ca.der", node_ca),
                ("node-cert.pem", cert_pem.as_bytes()),
            ] {
                let (tmp, path) = (dir.join(format!("{name}.new")), dir.join(name));
                std::fs::write(&tmp, bytes)
                    .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
        self.install(cert_pem.as_bytes())?;
        let mut trust = self.trust_mut();
        if trust.node_ca.is_none() {
            trust.node_ca = Some(anchor(node_ca)?);
            trust.joining = true;
        }
        Ok(())
    }

    /// Takes in the node CA and the node records from this node's applied state. Returns
    /// whether this node is recorded.
    pub fn refresh(&self, node: &RaftNode) -> Result<bool> {
        let view = node.store().read().map_err(|e| anyhow::anyhow!("{e}"))?;
        let Some(ca) = view.get(NODE_CA_KEY).map_err(|e| anyhow::anyhow!("{e}"))? else {
            return Ok(false);
        };
        // A cluster has a handful of nodes: one page holds them all.
        let (entries, _) = view
            .list(NODE_CERT_PREFIX, None, 10_000)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let id_of = |key: &[u8], prefix: &[u8]| -> Option<u64> {
            std::str::from_utf8(&key[prefix.len()..]).ok()?.parse().ok()
        };
        let mut recorded: BTreeMap<u64, u64> = BTreeMap::new();
        let mut pins: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
        for e in entries {
            let Some(id) = id_of(&e.key, NODE_CERT_PREFIX) else {
                continue;
            };
            match postcard::from_bytes::<NodeRecord>(&e.value) {
                Ok(r) => {
                    recorded.insert(id, r.recorded_ms);
                    pins.insert(id, r.signing_key);
                }
                // Written by a build before key pinning: recorded, with no pin (as then).
                Err(_) => match postcard::from_bytes::<NodeRecordV0>(&e.value) {
                    Ok(r) => {
                        recorded.insert(id, r.recorded_ms);
                    }
                    // Unreadable: recorded (its bootstrap certificate stays closed), and no
                    // certificate can match a pin of zeros.
                    Err(_) => {
                        recorded.insert(id, 0);
                        pins.insert(id, [0; 32]);
                    }
                },
            }
        }
        let (entries, _) = view
            .list(NODE_RETIRED_PREFIX, None, 10_000)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let retired: BTreeSet<u64> = entries
            .iter()
            .filter_map(|e| id_of(&e.key, NODE_RETIRED_PREFIX))
            .collect();
        let status = node.status();
        let members: BTreeSet<u64> = status
            .voters
            .keys()
            .chain(status.learners.keys())
            .copied()
            .collect();
        let me = recorded.contains_key(&self.node_id);
        let changed = {
            let t = self.trust();
            t.joining
                || t.recorded != recorded
                || t.pins != pins
                || t.members != members
                || t.retired != retired
                || t.node_ca.is_none()
        };
        if changed {
            let mut t = self.trust_mut();
            t.node_ca = Some(anchor(&ca.value)?);
            t.joining = false;
            t.recorded = recorded;
            t.pins = pins;
            t.members = members;
            t.retired = retired;
        }
        Ok(me)
    }

    /// Checks a peer's certificate chain for `usage`; returns the node it proves.
    pub fn accept(
        &self,
        chain: &[CertificateDer<'_>],
        usage: webpki::KeyUsage,
        now: UnixTime,
    ) -> Result<u64, String> {
        let (first, rest) = chain.split_first().ok_or("no certificate was presented")?;
        let cert = webpki::EndEntityCert::try_from(first)
            .map_err(|e| format!("the peer certificate is malformed ({e})"))?;
        let algorithms = self.algorithms.all;
        let chains_to = |anchors: &[TrustAnchor<'_>]| {
            cert.verify_for_usage(algorithms, anchors, rest, now, usage, None, None)
                .map(|_| ())
        };
        // The node a certificate is for: exactly one of `ids` (a certificate naming several
        // nodes, say by a wildcard, is nobody's).
        let names = |ids: Vec<u64>| {
            let mut named = ids.into_iter().filter(|id| {
                ServerName::try_from(node_name(*id))
                    .is_ok_and(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
            });
            match (named.next(), named.next()) {
                (Some(id), None) => Some(id),
                _ => None,
            }
        };
        let t = self.trust();
        let mut why = Vec::new();
        if let Some(ca) = &t.node_ca {
            match chains_to(std::slice::from_ref(ca)) {
                // Before it has any state, a joined node accepts any node of the cluster (id 0:
                // not known here; it hands nothing out while it has no state).
                Ok(()) if t.joining => return Ok(0),
                Ok(()) => {
                    let now_ms = now.as_secs().saturating_mul(1000);
                    let id = names(t.certified(now_ms)).ok_or_else(|| {
                        "a node certificate of this cluster, but for a node that is neither a \
                         member nor joining (removed, or a join that never completed)"
                            .to_string()
                    })?;
                    if let Some(pin) = t.pins.get(&id)
                        && subject_public_key(first.as_ref()) != Some(pin.as_slice())
                    {
                        return Err(format!(
                            "a node certificate for node {id}, but not for the key recorded for \
                             it (a certificate from before node {id} was removed and joined again)"
                        ));
                    }
                    return Ok(id);
                }
                Err(e) => why.push(format!("not from the node CA ({e:?})")),
            }
        }
        if !t.bootstrap.is_empty() {
            match chains_to(&t.bootstrap) {
                Ok(()) => {
                    return names(t.bootstrap_open().collect()).ok_or_else(|| {
                        "a bootstrap certificate, which counts only for an initial member (of \
                         this node's --initial-member list) that has no node certificate yet and \
                         was not removed, and only if it names that node \
                         (node-ID.coffer.internal, as `coffer certs` writes): the peer must \
                         present its node certificate"
                            .to_string()
                    });
                }
                Err(e) => why.push(format!("not from the bootstrap CA ({e:?})")),
            }
        }
        Err(format!(
            "the peer certificate is not trusted: {}",
            why.join("; ")
        ))
    }

    /// Checks the client certificate of one peer request (the handshake checked it once;
    /// the answer may have changed since). Returns the node it proves.
    pub fn check_request(&self, certs: Option<&[CertificateDer<'_>]>) -> Result<u64, String> {
        let chain = certs.ok_or("no client certificate")?;
        let first = chain.first().ok_or("no client certificate")?;
        let digest = ring::digest::digest(&ring::digest::SHA256, first.as_ref());
        let mut hash = [0u8; 32];
        hash.copy_from_slice(digest.as_ref());
        if let Some((id, at)) = self
            .accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
            && at.elapsed() < ACCEPTED_FOR
        {
            return Ok(*id);
        }
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let id = self.accept(chain, webpki::KeyUsage::client_auth(), UnixTime::now())?;
        let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(std::sync::atomic::Ordering::SeqCst) == generation {
            accepted.insert(hash, (id, std::time::Instant::now()));
        }
        Ok(id)
    }

    /// The peer listener's TLS configuration.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS versions")?
            .with_client_cert_verifier(Arc::new(Verifier(self.clone())))
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        // No resumption: a resumed session would carry the certificate of the first handshake,
        // and which one a node presents (and whether it counts) changes.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// The TLS configuration of outgoing peer connections.
    pub fn client_config(self: &Arc<Self>) -> Result<Arc<rustls::ClientConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS versions")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier(self.clone())))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

fn not_after_s(cert: &CertificateDer<'_>) -> Result<i64> {
    // rcgen parses what it can sign; x509 parsing here would be one more dependency, so the
    // validity end is read from the DER directly: tbsCertificate.validity.notAfter.
    let (_, not_after) = validity(cert.as_ref()).context("cannot read the certificate validity")?;
    Ok(not_after)
}

/// One DER element: (tag, contents, what follows it).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, head) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    let body = b.get(head..end)?;
    Some((tag, body, b.get(end..)?))
}

/// The fields of a DER certificate's tbsCertificate after the optional version: serial,
/// signature algorithm, issuer, validity, subject, subjectPublicKeyInfo, ...
fn tbs_fields(der: &[u8]) -> Option<&[u8]> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let (tag, _, after) = tlv(tbs)?;
    Some(if tag == 0xa0 { after } else { tbs })
}

/// The public key bytes a DER certificate certifies (the subjectPublicKeyInfo's bit string,
/// without its unused-bits byte): for an Ed25519 node certificate, the 32-byte key.
fn subject_public_key(der: &[u8]) -> Option<&[u8]> {
    let mut rest = tbs_fields(der)?;
    for _ in 0..5 {
        rest = tlv(rest)?.2;
    }
    let (_, spki, _) = tlv(rest)?;
    let (_, _, after_algorithm) = tlv(spki)?;
    let (tag, bits, _) = tlv(after_algorithm)?;
    if tag != 0x03 {
        return None;
    }
    bits.get(1..)
}

/// (notBefore, notAfter) in seconds since the epoch, read from a DER certificate.
fn validity(der: &[u8]) -> Option<(i64, i64)> {
    fn time(tag: u8, body: &[u8]) -> Option<i64> {
        let s = std::str::from_utf8(body).ok()?;
        let s = s.strip_suffix('Z')?;
        let (year, rest) = if tag == 0x17 {
            let y: i32 = s.get(..2)?.parse().ok()?;
            (if y >= 50 { 1900 + y } else { 2000 + y }, s.get(2..)?)
        } else {
            (s.get(..4)?.parse().ok()?, s.get(4..)?)
        };
        let n = |i: usize| rest.get(i..i + 2)?.parse::<u8>().ok();
        let date =
            time::Date::from_calendar_date(year, time::Month::try_from(n(0)?).ok()?, n(2)?).ok()?;
        let t = time::Time::from_hms(n(4)?, n(6)?, n(8)?).ok()?;
        Some(
            time::PrimitiveDateTime::new(date, t)
                .assume_utc()
                .unix_timestamp(),
        )
    }
    // Serial, signature algorithm, issuer, then validity.
    let mut rest = tbs_fields(der)?;
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    let (_, validity, _) = tlv(rest)?;
    let (t1, b1, after) = tlv(validity)?;
    let (t2, b2, _) = tlv(after)?;
    Some((time(t1, b1)?, time(t2, b2)?))
}

/// The TLS verifier of both sides of peer connections.
#[derive(Debug)]
struct Verifier(Arc<PeerTls>);

impl SignatureAlgorithms for Verifier {
    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.0.algorithms
    }
}

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[TlsName] {
        let t = self.0.trust();
        let node = usize::from(t.node_ca.is_some());
        let bootstrap = usize::from(!t.bootstrap.is_empty() && t.bootstrap_open().next().is_some());
        &self.0.hints[node | bootstrap << 1]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let chain = [std::slice::from_ref(end_entity), intermediates].concat();
        match self.0.accept(&chain, webpki::KeyUsage::client_auth(), now) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(why) => {
                tracing::warn!(reason = %why, "refused a peer's certificate");
                Err(rustls::Error::General(why))
            }
        }
    }

    handshake_signatures!();
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = [std::slice::from_ref(end_entity), intermediates].concat();
        let why = match self.0.accept(&chain, webpki::KeyUsage::server_auth(), now) {
            Ok(_) => match webpki::EndEntityCert::try_from(end_entity)
                .map_err(|e| e.to_string())
                .and_then(|c| {
                    c.verify_is_valid_for_subject_name(server_name)
                        .map_err(|e| e.to_string())
                }) {
                Ok(()) => return Ok(ServerCertVerified::assertion()),
                Err(e) => format!("the peer certificate is not valid for {server_name:?}: {e}"),
            },
            Err(why) => why,
        };
        tracing::warn!(reason = %why, "refused a peer's certificate");
        Err(rustls::Error::General(why))
    }

    handshake_signatures!();
}

/// Picks the certificate a node presents: its node certificate once it has one, except to a
/// peer that does not know the node CA yet (it hints only the bootstrap CA).
#[derive(Debug)]
struct Resolver(Arc<PeerTls>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .own_cert()
                .map_or_else(|| self.0.bootstrap.clone(), |(k, _)| k),
        )
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let own = self.0.own_cert().map(|(k, _)| k);
        let knows_node_ca = root_hint_subjects.is_empty()
            || root_hint_subjects
                .iter()
                .any(|h| *h == self.0.node_ca_name.as_ref());
        Some(match own {
            Some(own) if knows_node_ca => own,
            _ => self.0.bootstrap.clone(),
        })
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Keeps this node's node certificate: once the node is unsealed, issues it one (and renews it
/// when less than 30 days remain) and records the node; takes in the node records and the
/// membership as they are applied. Runs until the node stops.
pub async fn maintain(
    tls: Arc<PeerTls>,
    node: Arc<RaftNode>,
    seal: Arc<crate::seal::Seal>,
    record: NodeRecord,
) {
    // The trust follows every change of the node records or the membership, apart from the
    // (slower) renewal.
    let (follower, following) = (tls.clone(), node.clone());
    let _follow = AbortOnDrop(tokio::spawn(async move {
        let mut seen = TrustInputs::default();
        loop {
            if seen.changed(&following, 0)
                && let Err(e) = follower.refresh(&following)
            {
                tracing::warn!(error = %e, "cannot read the node records");
            }
            following.wait_changed(Duration::from_secs(1)).await;
        }
    }));
    let mut last_error = String::new();
    let mut seen = TrustInputs::default();
    loop {
        // Issuing the certificate also waits on the seal and on a certificate taken at join.
        let local = u64::from(seal.keyring().is_ok()) | u64::from(tls.own_cert().is_some()) << 1;
        if seen.changed(&node, local)
            && let Err(e) = maintain_once(&tls, &node, &seal, &record).await
        {
            let e = format!("{e:#}");
            if e != last_error {
                tracing::warn!(error = %e, "cannot issue, renew or record this node's certificate yet");
                last_error = e;
            }
        }
        node.wait_changed(Duration::from_secs(1)).await;
    }
}

/// What the trust in peers is derived from: the node records (reserved keys) and the
/// membership. Every applied entry wakes the maintenance loops; under write load that is
/// thousands of times a second, and reading the records each time was measured at 2 % of a
/// node's CPU (building the member lists to compare, at 1.4 %). They run again when these
/// inputs changed, or a second after the last run. Reserved-key changes, where the membership
/// was decided, and the caller's own (local) inputs.
type Inputs = (u64, Option<(u64, u64, u64)>, u64);

#[derive(Debug, Default)]
struct TrustInputs {
    last: Option<(Inputs, Instant)>,
}

impl TrustInputs {
    fn changed(&mut self, node: &RaftNode, local: u64) -> bool {
        let current: Inputs = (
            node.store().reserved_changes(),
            node.membership_position(),
            local,
        );
        let now = Instant::now();
        let due = self.last.as_ref().is_none_or(|(seen, at)| {
            *seen != current || now.duration_since(*at) >= Duration::from_millis(900)
        });
        if due {
            self.last = Some((current, now));
        }
        due
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn maintain_once(
    tls: &Arc<PeerTls>,
    node: &Arc<RaftNode>,
    seal: &crate::seal::Seal,
    record: &NodeRecord,
) -> Result<()> {
    let recorded = tls.refresh(node)?;
    let now_s = i64::try_from(crate::auth::now_ms() / 1000).unwrap_or(i64::MAX);
    let due = tls
        .own_cert()
        .is_none_or(|(_, not_after)| not_after - now_s < RENEW_BEFORE_S);
    if due && let Ok(keyring) = seal.keyring() {
        let ca = NodeCa::from_keyring(&keyring)?;
        let pem = ca.issue(
            tls.node_id,
            &tls.node_key.public().signing_key(),
            host_of(&record.peer_addr),
            crate::auth::now_ms(),
        )?;
        tls.take(&pem, ca.cert())?;
        // New connections present it; the old ones (with the bootstrap certificate) go.
        node.reset_peer_connections();
        tracing::info!("this node presents its node certificate from now on");
    }
    if !recorded && tls.own_cert().is_some() {
        // Recorded once it presents its node certificate: from then on its bootstrap
        // certificate opens nothing.
        let key = node_cert_record(tls.node_id);
        let record = NodeRecord {
            recorded_ms: crate::auth::now_ms(),
            ..record.clone()
        };
        let txn = Txn {
            compare: vec![Compare::Absent(key.clone())],
            success: vec![Op::Put {
                key,
                value: postcard::to_allocvec(&record)?,
            }],
            failure: Vec::new(),
        };
        node.write(Command {
            request_id: None,
            txn,
        })
        .await
        .map_err(|e| anyhow::anyhow!("recording this node: {e}"))?;
        tls.refresh(node)?;
    }
    Ok(())
}

/// Joins the cluster through a member's API (`via`) until it is done: proves the node key (or,
/// with `token_file`, membership with a service-account token for the member role),
/// takes the node certificate, and waits to be added as a learner. Retries (every 2 s) while
/// the member is unreachable or the key is not registered yet, saying why once per reason.
pub async fn join(
    tls: Arc<PeerTls>,
    node: Arc<RaftNode>,
    node_key: Arc<KeyPair>,
    via: crate::client::Target,
    me: coffer_raft::Member,
    token_file: Option<PathBuf>,
) {
    if via.addrs.is_empty() {
        tracing::error!("no member address to join through: give --join or --initial-member");
        return;
    }
    let mut last_error = String::new();
    for attempt in 0usize.. {
        if node.is_initialized().await.unwrap_or(false) {
            return;
        }
        // Each try goes through the next member: one that is down, sealed or not yet formed
        // does not hold the others back.
        let through = &via.addrs[attempt % via.addrs.len()];
        match join_once(
            &tls,
            &node_key,
            &via,
            through,
            node.id(),
            &me,
            token_file.as_deref(),
        )
        .await
        {
            Ok(index) => {
                tracing::info!(raft_index = index, "joined the cluster as a learner");
                return;
            }
            Err(e) => {
                let e = format!("{e:#}");
                if e != last_error {
                    tracing::warn!(error = %e, via = ?via.addrs, "cannot join yet; retrying");
                    last_error = e;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn join_once(
    tls: &PeerTls,
    node_key: &KeyPair,
    via: &crate::client::Target,
    through: &str,
    id: u64,
    me: &coffer_raft::Member,
    token_file: Option<&Path>,
) -> Result<u64> {
    use coffer_api::v1 as pb;
    // Re-read at each try: the kubelet rotates projected tokens.
    let kubernetes_token = match token_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the service-account token {}", f.display()))?
            .trim()
            .to_string(),
        None => String::new(),
    };
    let channel = via.channel_to(through)?;
    let challenge = pb::auth_client::AuthClient::new(channel.clone())
        .challenge(pb::ChallengeRequest::default())
        .await
        .map_err(|s| anyhow::anyhow!("challenge: {}", s.message()))?
        .into_inner();
    let signature = node_key.sign(&join_message(
        &challenge.cluster_id,
        &challenge.challenge,
        id,
        &me.api_addr,
        &me.peer_addr,
        &kubernetes_token,
    ));
    let mut answers = pb::cluster_client::ClusterClient::new(channel)
        .join(pb::JoinRequest {
            node_id: id,
            api_addr: me.api_addr.clone(),
            peer_addr: me.peer_addr.clone(),
            challenge: challenge.challenge,
            public_key: node_key.public().to_bytes().to_vec(),
            signature: signature.to_vec(),
            kubernetes_token,
        })
        .await
        .map_err(|s| anyhow::anyhow!("join: {}", s.message()))?
        .into_inner();
    let first = answers
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("join: {}", s.message()))?
        .context("the member closed the join without an answer")?;
    tls.take(&first.certificate, &first.node_ca)
        .context("the node certificate from the join")?;
    tracing::info!("received this node's node certificate");
    let added = answers
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("adding this node: {}", s.message()))?
        .context("the member closed the join before adding this node")?;
    Ok(added.raft_index)
}

/// The node key: `--node-key FILE`, else `node-tls/node.key` in the data directory (made on
/// first start, with `node.pub` beside it), else (in memory) a new one.
pub fn load_node_key(file: Option<&Path>, data_dir: Option<&Path>) -> Result<KeyPair> {
    if let Some(file) = file {
        return KeyPair::load(file).context("the node key (--node-key)");
    }
    let Some(dir) = data_dir else {
        return Ok(KeyPair::generate()?);
    };
    let path = dir.join("node.key");
    if path.exists() {
        return Ok(KeyPair::load(&path)?);
    }
    let key = KeyPair::generate()?;
    key.save(&dir.join("node"), "node key")?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_is_read_from_the_certificate() {
        let ring = Keyring::new().expect("keyring");
        let ca = NodeCa::from_keyring(&ring).expect("ca");
        let key = KeyPair::generate().expect("key");
        let now_ms = 1_800_000_000_000;
        let pem = ca
            .issue(7, &key.public().signing_key(), "10.0.0.7", now_ms)
            .expect("issue");
        let der = pem_certs(pem.as_bytes()).expect("pem").remove(0);
        let (from, to) = validity(der.as_ref()).expect("validity");
        assert_eq!(from, 1_800_000_000 - BACKDATE_S);
        assert_eq!(to, 1_800_000_000 + CERT_LIFETIME_S);
    }

    #[test]
    fn a_peer_address_must_not_name_nodes() {
        for good in ["10.0.0.7:7001", "coffer-2.coffer.ns.svc:7001", "[::1]:7001"] {
            assert!(check_peer_addr(good).is_ok(), "{good}");
        }
        for bad in [
            "node-1.coffer.internal:7001",
            "*.coffer.internal:7001",
            "*:7001",
            "10.0.0.7",
            "10.0.0.7:port",
            ":7001",
            "a b:7001",
        ] {
            assert!(check_peer_addr(bad).is_err(), "{bad}");
        }
    }

    fn pem_certified_key(cert: &str, key: &str) -> Arc<CertifiedKey> {
        let key = rustls_pemfile::private_key(&mut key.as_bytes())
            .expect("pem")
            .expect("key");
        Arc::new(CertifiedKey::new(
            pem_certs(cert.as_bytes()).expect("cert"),
            rustls::crypto::ring::sign::any_supported_type(&key).expect("signing key"),
        ))
    }

    #[test]
    fn who_a_certificate_is_decides_whether_it_counts() {
        let ring = Keyring::new().expect("keyring");
        let ca = NodeCa::from_keyring(&ring);
        let ca = ca.expect("node CA");
        let bootstrap = crate::tls::CertAuthority::generate().expect("bootstrap CA");
        let (cert, key) = bootstrap
            .issue("coffer-node-1", &[node_name(1)])
            .expect("bootstrap certificate");
        let tls = PeerTls::new(
            1,
            pem_certified_key(&cert, &key),
            bootstrap.cert_pem().as_bytes(),
            Arc::new(KeyPair::generate().expect("key")),
            None,
            [1, 2, 3].into(),
        )
        .expect("peer TLS");
        {
            let mut t = tls.trust_mut();
            t.node_ca = Some(anchor(ca.cert()).expect("anchor"));
            t.members = [1, 2, 3].into();
        }
        let now = crate::auth::now_ms();
        let check = |pem: &str| {
            tls.accept(
                &pem_certs(pem.as_bytes()).expect("pem"),
                webpki::KeyUsage::client_auth(),
                UnixTime::now(),
            )
        };
        let node_key = KeyPair::generate().expect("key").public().signing_key();
        assert_eq!(
            check(&ca.issue(2, &node_key, "10.0.0.2", now).expect("issue")),
            Ok(2)
        );
        // A certificate whose extra name covers every node is nobody's.
        let wildcard = ca
            .issue(9, &node_key, "*.coffer.internal", now)
            .expect("issue");
        assert!(check(&wildcard).is_err());
        // An initial member's bootstrap certificate counts until it is recorded.
        assert_eq!(check(&cert), Ok(1));
        tls.trust_mut().recorded.insert(1, now);
        assert!(check(&cert).unwrap_err().contains("bootstrap certificate"));
        // A removed node's node certificate no longer counts, nor a joiner's after the window.
        let three = ca.issue(3, &node_key, "10.0.0.3", now).expect("issue");
        assert_eq!(check(&three), Ok(3));
        {
            let mut t = tls.trust_mut();
            t.members.remove(&3);
            t.retired.insert(3);
            t.recorded.insert(4, now - JOIN_WINDOW_MS - 2_000);
            t.recorded.insert(5, now);
        }
        assert!(check(&three).unwrap_err().contains("neither a member"));
        assert!(check(&ca.issue(4, &node_key, "10.0.0.4", now).expect("issue")).is_err());
        assert_eq!(
            check(&ca.issue(5, &node_key, "10.0.0.5", now).expect("issue")),
            Ok(5)
        );
        // A recorded node's certificates count only for its recorded key: one issued for its
        // old key (before it was removed and joined again) opens nothing.
        let new_key = KeyPair::generate().expect("key").public().signing_key();
        tls.trust_mut().pins.insert(5, new_key);
        assert!(
            check(&ca.issue(5, &node_key, "10.0.0.5", now).expect("issue"))
                .unwrap_err()
                .contains("not for the key recorded")
        );
        assert_eq!(
            check(&ca.issue(5, &new_key, "10.0.0.5", now).expect("issue")),
            Ok(5)
        );
        // Another cluster's node CA is not this one.
        let other = NodeCa::from_keyring(&Keyring::new().expect("keyring")).expect("CA");
        assert!(
            check(&other.issue(2, &node_key, "10.0.0.2", now).expect("issue"))
                .unwrap_err()
                .contains("not trusted")
        );
    }

    #[test]
    fn a_node_certificate_names_the_key_it_certifies() {
        let ca = NodeCa::from_keyring(&Keyring::new().expect("keyring")).expect("CA");
        let key = KeyPair::generate().expect("key").public().signing_key();
        let pem = ca.issue(7, &key, "10.0.0.7", 0).expect("issue");
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("a certificate")
            .expect("PEM");
        assert_eq!(subject_public_key(der.as_ref()), Some(key.as_slice()));
        assert_eq!(subject_public_key(&der.as_ref()[..40]), None);
    }

    #[test]
    fn every_node_derives_the_same_node_ca_and_another_cluster_another() {
        let ring = Keyring::new().expect("keyring");
        let a = NodeCa::from_keyring(&ring).expect("a");
        let b = NodeCa::from_keyring(&ring).expect("b");
        assert_eq!(a.cert(), b.cert());
        let other = NodeCa::from_keyring(&Keyring::new().expect("keyring")).expect("other");
        assert_ne!(a.cert(), other.cert());
    }
}
