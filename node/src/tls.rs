//! TLS material: loading PEM files, and generating a cluster CA and node certificates (for
//! `coffer dev` and `coffer certs`).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::DistinguishedName as TlsName;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

/// PEM files of one node: its certificate (server and client auth), its key, the cluster CA.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Node certificate (PEM).
    pub cert: PathBuf,
    /// Node private key (PEM); must not be readable by group or others.
    pub key: PathBuf,
    /// Cluster CA certificate (PEM).
    pub ca: PathBuf,
}

/// Loaded TLS material.
#[derive(Clone)]
pub struct TlsMaterial {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial(***)")
    }
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let bytes =
        fs::read(path).with_context(|| format!("cannot read the {what} at {}", path.display()))?;
    if !bytes.starts_with(b"-----BEGIN") {
        bail!(
            "{} is not a PEM file (the {what} must be PEM)",
            path.display()
        );
    }
    Ok(bytes)
}

impl TlsMaterial {
    /// Loads and checks the files. A key readable by others is refused (see
    /// [`key_file_refusal`]).
    pub fn load(files: &TlsFiles) -> Result<TlsMaterial> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let meta = fs::metadata(&files.key)
                .with_context(|| format!("cannot read the TLS key at {}", files.key.display()))?;
            if let Some(why) = key_file_refusal(meta.mode(), meta.uid()) {
                bail!("the TLS key {} {why}", files.key.display());
            }
        }
        Ok(TlsMaterial {
            cert: read_pem(&files.cert, "TLS certificate")?,
            key: read_pem(&files.key, "TLS key")?,
            ca: read_pem(&files.ca, "CA certificate")?,
        })
    }

    /// The API listener's TLS: the node certificate; clients are asked for a session
    /// certificate but may connect without one (to log in). The handshake proves the client
    /// holds the key of the certificate it presents; whether the session CA issued it, and what
    /// the session may do, is checked per request (`session.rs`), against the cluster's state
    /// at that moment.
    pub fn api_acceptor(&self) -> Result<tokio_rustls::TlsAcceptor> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(AnyClientCertificate {
            algorithms: provider.signature_verification_algorithms,
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                self.certified_key()?,
            )));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    /// The node's certificate from the TLS files with its key: what the API listener serves,
    /// and what an initial member presents on the peer port until it has its node certificate
    /// (see `node_identity.rs`).
    pub fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>> {
        let certs = rustls_pemfile::certs(&mut self.cert.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .context("the node certificate PEM")?;
        let key = rustls_pemfile::private_key(&mut self.key.as_slice())
            .context("the node key PEM")?
            .context("the node key file holds no private key")?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| anyhow::anyhow!("the node key: {e}"))?;
        let certified = rustls::sign::CertifiedKey::new(certs, key);
        certified
            .keys_match()
            .context("the node certificate and key do not match")?;
        Ok(Arc::new(certified))
    }

    /// The CA certificate of the TLS files (PEM).
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca
    }
}

/// What checks the handshake signatures of a TLS verifier.
pub trait SignatureAlgorithms {
    /// The algorithms (ring's).
    fn algorithms(&self) -> &WebPkiSupportedAlgorithms;
}

/// The handshake-signature methods of a rustls verifier (`ClientCertVerifier` or
/// `ServerCertVerifier`) whose type implements [`SignatureAlgorithms`].
#[macro_export]
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            let algorithms = $crate::tls::SignatureAlgorithms::algorithms(self);
            rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            let algorithms = $crate::tls::SignatureAlgorithms::algorithms(self);
            rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            $crate::tls::SignatureAlgorithms::algorithms(self).supported_schemes()
        }
    };
}
pub use handshake_signatures;

impl SignatureAlgorithms for AnyClientCertificate {
    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.algorithms
    }
}

/// Accepts any client certificate whose key the client proves it holds; the API checks the
/// certificate itself on each request.
#[derive(Debug)]
struct AnyClientCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[TlsName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Subject name of every Coffer cluster CA made by `coffer certs` and `coffer dev`.
const CA_NAME: &str = "coffer cluster CA";

/// A CA that signs node certificates.
pub struct CertAuthority {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertAuthority(***)")
    }
}

impl CertAuthority {
    /// The CA's parameters: its certificates are issued under this subject, and certificates
    /// it signs name it as issuer (with the key identifier derived from its key).
    fn params() -> Result<CertificateParams> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CA_NAME);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(params)
    }

    /// A new self-signed CA.
    pub fn generate() -> Result<CertAuthority> {
        let params = Self::params()?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(CertAuthority {
            pem: cert.pem(),
            params,
            key,
        })
    }

    /// A CA from its certificate and key (PEM), to issue more node certificates.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<CertAuthority> {
        let key = KeyPair::from_pem(key_pem).context("the CA key is not a PEM private key")?;
        let params = Self::params()?;
        Ok(CertAuthority {
            params,
            key,
            pem: cert_pem.to_string(),
        })
    }

    /// The CA private key (PEM).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// A node certificate for `hosts` (DNS names or IPs), good for server and client auth.
    /// Returns (certificate PEM, key PEM).
    pub fn issue(&self, common_name: &str, hosts: &[String]) -> Result<(String, String)> {
        let mut params = CertificateParams::new(hosts.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes a file that holds secret material, readable by the owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    Ok(coffer_client::keys::write_private(path, contents)?)
}

/// Writes one certificate per node into `dir` (`node-<id>.pem`, `node-<id>-key.pem`), signed by
/// the CA in `dir` (`ca.pem`, `ca-key.pem`), which is created when missing: run it again later
/// to issue certificates for new nodes. Each node certificate names the node
/// (`node-<id>.coffer.internal`), `localhost`, `127.0.0.1` and its hosts. It serves the API, and
/// on the peer port it only lets an initial member form the cluster: from its first unseal on,
/// a member uses its node certificate there. Keep `ca-key.pem` offline in production.
pub fn generate_cluster_certs(dir: &Path, nodes: &[(u64, Vec<String>)]) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let ca = if ca_cert.exists() && ca_key.exists() {
        CertAuthority::load(
            &fs::read_to_string(&ca_cert)?,
            &fs::read_to_string(&ca_key)?,
        )?
    } else if ca_cert.exists() {
        bail!(
            "{} exists without its key {}: use another directory, or put the key there",
            ca_cert.display(),
            ca_key.display()
        );
    } else {
        let ca = CertAuthority::generate()?;
        write_private(&ca_key, &ca.key_pem())?;
        fs::write(&ca_cert, ca.cert_pem())?;
        ca
    };
    for (id, hosts) in nodes {
        // The node name says which node the certificate is for (see `node_identity.rs`).
        let mut all = vec![
            crate::node_identity::node_name(*id),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ];
        for h in hosts {
            if !all.contains(h) {
                all.push(h.clone());
            }
        }
        let (cert, key) = ca.issue(&format!("coffer-node-{id}"), &all)?;
        fs::write(dir.join(format!("node-{id}.pem")), cert)?;
        write_private(&dir.join(format!("node-{id}-key.pem")), &key)?;
    }
    Ok(())
}

/// The files [`generate_cluster_certs`] wrote for node `id`.
pub fn node_files(dir: &Path, id: u64) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("node-{id}.pem")),
        key: dir.join(format!("node-{id}-key.pem")),
        ca: dir.join("ca.pem"),
    }
}

/// Why a TLS key file with this mode and owner is refused, if it is. Others may never read it.
/// Its group may read it only when root owns it and nobody but root can write it: that is how
/// Kubernetes mounts a Secret for a pod with an `fsGroup` (owner root, group the pod's, mode
/// 0440), and PostgreSQL accepts its server key in the same case.
#[cfg_attr(not(unix), allow(dead_code))]
fn key_file_refusal(mode: u32, owner_uid: u32) -> Option<String> {
    let perms = mode & 0o777;
    let root_owned_group_read = owner_uid == 0 && perms & 0o077 == 0o040;
    if perms & 0o077 == 0 || root_owned_group_read {
        None
    } else {
        Some(format!(
            "is readable by others (mode {perms:o}); run chmod 600 on it (0440 or 0640 is accepted only for a file root owns, as Kubernetes mounts a Secret)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::key_file_refusal;

    #[test]
    fn a_key_is_private_or_a_root_owned_group_readable_mount() {
        assert_eq!(key_file_refusal(0o100600, 1000), None);
        assert_eq!(key_file_refusal(0o100400, 65532), None);
        // A Secret mounted for a pod with an fsGroup: owner root, group read only.
        assert_eq!(key_file_refusal(0o100440, 0), None);
        assert_eq!(key_file_refusal(0o100640, 0), None);
        for (mode, uid) in [
            (0o100640, 1000),
            (0o100440, 65532),
            (0o100660, 0),
            (0o100444, 0),
            (0o100604, 1000),
            (0o100644, 0),
        ] {
            let why = key_file_refusal(mode, uid).expect("refused");
            assert!(why.contains("chmod 600"), "{why}");
        }
    }
}
