//! Key pairs for operators, administrators and (later) every client identity: one format for all.
//!
//! A key pair is an Ed25519 signing key (to sign unseal submissions, logins and requests) and an
//! X25519 key (to receive data encrypted to it with HPKE, RFC 9180: share files, wrapped data,
//! sealed responses).
//!
//! Files: `NAME.key` holds both private keys, PEM-armoured, mode 0600 (a key file that group or
//! others can read is refused when loaded); `NAME.pub` is one line, `coffer-key-v1 <base64 of the
//! two public keys> [comment]`, safe to share.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use zeroize::{Zeroize, Zeroizing};

/// Why a key could not be made, loaded, saved or used. No variant carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A key, key file or encrypted input is malformed (the message says what to do).
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing a key file failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done ("cannot read the key file").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The data was encrypted to another key, for another purpose or with other associated
    /// data, or it was altered.
    #[error("cannot decrypt: it was encrypted to another key, for another purpose, or altered")]
    Decrypt,
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// Results of this module.
pub type Result<T, E = KeyError> = std::result::Result<T, E>;

fn invalid(message: impl Into<String>) -> KeyError {
    KeyError::Invalid(message.into())
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KeyError {
    let path = path.to_path_buf();
    move |source| KeyError::Io { what, path, source }
}

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

const PRIVATE_LABEL: &str = "COFFER PRIVATE KEY";
const PUBLIC_PREFIX: &str = "coffer-key-v1";
const VERSION: u8 = 1;
/// DER of a PKCS#8 v1 Ed25519 private key up to the 32-byte seed (RFC 8410).
pub const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// Bytes of an HPKE encapsulated key (X25519).
pub const ENC_LEN: usize = 32;

/// A public key: what an operator or client hands out.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    sign: [u8; 32],
    encrypt: [u8; 32],
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

/// A private key pair. Its secret bytes are wiped when it is dropped and never printed.
pub struct KeyPair {
    seed: Zeroizing<[u8; 32]>,
    x25519: Zeroizing<[u8; 32]>,
    signer: Ed25519KeyPair,
    public: PublicKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair({}, private)", self.public.fingerprint())
    }
}

/// The operating system's generator (through ring), in the `rand_core` version `hpke` takes.
struct SystemRng;

impl hpke::rand_core::RngCore for SystemRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        // The kernel's generator does not fail once booted; if it did, no key may be made.
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), dest)
            .expect("the system random number generator failed");
    }
}

impl hpke::rand_core::CryptoRng for SystemRng {}

fn random_32() -> Result<Zeroizing<[u8; 32]>> {
    let mut b = Zeroizing::new([0u8; 32]);
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut *b)
        .map_err(|_| KeyError::Random)?;
    Ok(b)
}

impl KeyPair {
    /// A new random key pair.
    pub fn generate() -> Result<KeyPair> {
        KeyPair::from_secrets(random_32()?, random_32()?)
    }

    fn from_secrets(seed: Zeroizing<[u8; 32]>, x25519: Zeroizing<[u8; 32]>) -> Result<KeyPair> {
        let signer = Ed25519KeyPair::from_seed_unchecked(&*seed)
            .map_err(|_| invalid("invalid Ed25519 private key"))?;
        let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(&*x25519)
            .map_err(|_| invalid("invalid X25519 private key"))?;
        let pk = Kem::sk_to_pk(&sk);
        let mut encrypt = [0u8; 32];
        encrypt.copy_from_slice(&pk.to_bytes());
        let mut sign = [0u8; 32];
        sign.copy_from_slice(signer.public_key().as_ref());
        Ok(KeyPair {
            seed,
            x25519,
            signer,
            public: PublicKey { sign, encrypt },
        })
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// An Ed25519 signature over `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut sig = [0u8; 64];
        sig.copy_from_slice(self.signer.sign(message).as_ref());
        sig
    }

    /// Decrypts what [`PublicKey::seal`] encrypted to this key with the same `info`.
    pub fn open(&self, info: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if sealed.len() < ENC_LEN {
            return Err(invalid("the encrypted data is truncated"));
        }
        let (enc, ct) = sealed.split_at(ENC_LEN);
        self.open_with_aad(info, &[], enc, ct)
    }

    /// Decrypts what [`PublicKey::seal_with_aad`] encrypted to this key with the same `info`
    /// and associated data `aad`: `enc` is the encapsulated key, `ciphertext` includes the tag.
    /// Any other key, info or aad, or an altered input, gives [`KeyError::Decrypt`].
    pub fn open_with_aad(
        &self,
        info: &[u8],
        aad: &[u8],
        enc: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc)
            .map_err(|_| invalid("the encapsulated key is corrupt (not 32 bytes of X25519)"))?;
        let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(&*self.x25519)
            .map_err(|_| invalid("invalid X25519 private key"))?;
        let pt = hpke::single_shot_open::<Aead, Kdf, Kem>(
            &OpModeR::Base,
            &sk,
            &enc,
            info,
            ciphertext,
            aad,
        )
        .map_err(|_| KeyError::Decrypt)?;
        Ok(Zeroizing::new(pt))
    }

    /// The Ed25519 signing key as a PKCS#8 v1 PEM (`PRIVATE KEY`), the form TLS libraries load:
    /// a session key pair presents its session certificate with it.
    pub fn signing_key_pkcs8_pem(&self) -> Zeroizing<String> {
        // RFC 8410: SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET
        // STRING seed } }.
        let mut der = Zeroizing::new(ED25519_PKCS8_PREFIX.to_vec());
        der.extend_from_slice(&*self.seed);
        let b64 = Zeroizing::new(B64.encode(&*der));
        let mut pem = Zeroizing::new(String::from("-----BEGIN PRIVATE KEY-----\n"));
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        pem
    }

    /// The private key file's text.
    fn to_pem(&self) -> Zeroizing<String> {
        let mut raw = Zeroizing::new(Vec::with_capacity(65));
        raw.push(VERSION);
        raw.extend_from_slice(&*self.seed);
        raw.extend_from_slice(&*self.x25519);
        let b64 = Zeroizing::new(B64.encode(&*raw));
        Zeroizing::new(format!(
            "-----BEGIN {PRIVATE_LABEL}-----\n{}\n-----END {PRIVATE_LABEL}-----\n",
            *b64
        ))
    }

    /// Parses a private key file's text.
    pub fn from_pem(text: &str) -> Result<KeyPair> {
        let body: String = text
            .lines()
            .map(str::trim)
            .skip_while(|l| *l != format!("-----BEGIN {PRIVATE_LABEL}-----"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        if body.is_empty() {
            return Err(invalid(format!(
                "not a Coffer private key (expected a {PRIVATE_LABEL} block; make one with `coffer keygen`)"
            )));
        }
        let mut raw = Zeroizing::new(
            B64.decode(body.as_bytes())
                .map_err(|_| invalid("the private key is corrupt (bad base64)"))?,
        );
        if raw.len() != 65 || raw[0] != VERSION {
            raw.zeroize();
            return Err(invalid(
                "the private key is corrupt or of an unknown version",
            ));
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        let mut x = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&raw[1..33]);
        x.copy_from_slice(&raw[33..65]);
        KeyPair::from_secrets(seed, x)
    }

    /// Loads a private key file, refusing one that group or others can read.
    pub fn load(path: &Path) -> Result<KeyPair> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(io("cannot read the key file", path))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(invalid(format!(
                    "the key file {} can be read by others (mode {mode:o}); run `chmod 600 {}` and check nobody copied it",
                    path.display(),
                    path.display()
                )));
            }
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(io("cannot read the key file", path))?,
        );
        KeyPair::from_pem(&text).map_err(|e| match e {
            KeyError::Invalid(m) => invalid(format!("{m} (in {})", path.display())),
            other => other,
        })
    }

    /// Writes `OUT.key` (0600) and `OUT.pub`; never overwrites an existing file.
    pub fn save(&self, out: &Path, comment: &str) -> Result<(PathBuf, PathBuf)> {
        let (key, public) = (with_ext(out, "key"), with_ext(out, "pub"));
        for p in [&key, &public] {
            if p.exists() {
                return Err(invalid(format!(
                    "{} already exists: remove it or choose another --out (a key is never overwritten)",
                    p.display()
                )));
            }
        }
        if let Some(dir) = key.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        }
        write_private(&key, &self.to_pem())?;
        std::fs::write(&public, format!("{}\n", self.public.to_line(comment)))
            .map_err(io("cannot write", &public))?;
        Ok((key, public))
    }
}

/// Writes a file only its owner can read (mode 0600 on Unix), replacing its contents.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(io("cannot write", path))?;
        f.write_all(contents.as_bytes())
            .map_err(io("cannot write", path))
    }
    #[cfg(not(unix))]
    {
        std::fs::write(path, contents).map_err(io("cannot write", path))
    }
}

fn with_ext(out: &Path, ext: &str) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

impl PublicKey {
    /// The public key file's line.
    pub fn to_line(&self, comment: &str) -> String {
        let mut raw = Vec::with_capacity(64);
        raw.extend_from_slice(&self.sign);
        raw.extend_from_slice(&self.encrypt);
        let line = format!("{PUBLIC_PREFIX} {}", B64.encode(raw));
        if comment.is_empty() {
            line
        } else {
            format!("{line} {comment}")
        }
    }

    /// Parses a public key line (`coffer-key-v1 BASE64 [comment]`).
    pub fn parse(line: &str) -> Result<PublicKey> {
        let mut parts = line.split_whitespace();
        if parts.next() != Some(PUBLIC_PREFIX) {
            return Err(invalid(format!(
                "not a Coffer public key (expected a line starting with {PUBLIC_PREFIX}; `coffer keygen` writes NAME.pub)"
            )));
        }
        let raw = B64
            .decode(parts.next().unwrap_or("").as_bytes())
            .map_err(|_| invalid("the public key is corrupt (bad base64)"))?;
        if raw.len() != 64 {
            return Err(invalid("the public key is corrupt (wrong length)"));
        }
        let (mut sign, mut encrypt) = ([0u8; 32], [0u8; 32]);
        sign.copy_from_slice(&raw[..32]);
        encrypt.copy_from_slice(&raw[32..]);
        <Kem as hpke::Kem>::PublicKey::from_bytes(&encrypt)
            .map_err(|_| invalid("the public key's X25519 part is invalid"))?;
        Ok(PublicKey { sign, encrypt })
    }

    /// Loads a public key file.
    pub fn load(path: &Path) -> Result<PublicKey> {
        let text =
            std::fs::read_to_string(path).map_err(io("cannot read the public key file", path))?;
        PublicKey::parse(text.trim()).map_err(|e| match e {
            KeyError::Invalid(m) => invalid(format!("{m} (in {})", path.display())),
            other => other,
        })
    }

    /// Both public keys, 64 bytes (for storing in replicated state).
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut raw = [0u8; 64];
        raw[..32].copy_from_slice(&self.sign);
        raw[32..].copy_from_slice(&self.encrypt);
        raw
    }

    /// From [`PublicKey::to_bytes`].
    pub fn from_bytes(raw: &[u8]) -> Result<PublicKey> {
        if raw.len() != 64 {
            return Err(invalid(format!(
                "a public key is 64 bytes, not {}",
                raw.len()
            )));
        }
        let mut line = String::from(PUBLIC_PREFIX);
        line.push(' ');
        line.push_str(&B64.encode(raw));
        PublicKey::parse(&line)
    }

    /// The Ed25519 public key (what a session certificate certifies).
    pub fn signing_key(&self) -> [u8; 32] {
        self.sign
    }

    /// `SHA256:` and the hex of the first 16 bytes of the SHA-256 of both public keys.
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.to_bytes());
        let hex: String = d.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("SHA256:{hex}")
    }

    /// Checks an Ed25519 signature over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<()> {
        UnparsedPublicKey::new(&ED25519, &self.sign)
            .verify(message, signature)
            .map_err(|_| invalid(format!("bad signature for key {}", self.fingerprint())))
    }

    /// Encrypts `plaintext` to this key with HPKE (base mode, DHKEM(X25519, HKDF-SHA256),
    /// HKDF-SHA256, ChaCha20-Poly1305). `info` names the purpose; opening needs the same.
    /// Output: the encapsulated key (32 bytes), then the ciphertext and tag.
    pub fn seal(&self, info: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let (enc, ct) = self.seal_with_aad(info, &[], plaintext)?;
        let mut out = enc.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Encrypts `plaintext` to this key like [`PublicKey::seal`], binding it to the associated
    /// data `aad` as well (not encrypted; opening needs the same bytes). Returns the
    /// encapsulated key and the ciphertext with its tag.
    pub fn seal_with_aad(
        &self,
        info: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<([u8; ENC_LEN], Vec<u8>)> {
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&self.encrypt)
            .map_err(|_| invalid("invalid X25519 public key"))?;
        let mut rng = SystemRng;
        let (enc, ct) = hpke::single_shot_seal::<Aead, Kdf, Kem, _>(
            &OpModeS::Base,
            &pk,
            info,
            plaintext,
            aad,
            &mut rng,
        )
        .map_err(|e| invalid(format!("encryption failed: {e}")))?;
        let mut out = [0u8; ENC_LEN];
        out.copy_from_slice(&enc.to_bytes());
        Ok((out, ct))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_and_reject_tampering() {
        let k = KeyPair::generate().expect("keygen");
        let sig = k.sign(b"unseal share 1");
        k.public().verify(b"unseal share 1", &sig).expect("good");
        assert!(k.public().verify(b"unseal share 2", &sig).is_err());
        let other = KeyPair::generate().expect("keygen");
        assert!(other.public().verify(b"unseal share 1", &sig).is_err());
    }

    #[test]
    fn seal_opens_only_with_the_right_key_and_purpose() {
        let k = KeyPair::generate().expect("keygen");
        let sealed = k.public().seal(b"share", b"secret bytes").expect("seal");
        assert_eq!(
            &k.open(b"share", &sealed).expect("open")[..],
            b"secret bytes"
        );
        assert!(k.open(b"wrap", &sealed).is_err(), "other purpose");
        let other = KeyPair::generate().expect("keygen");
        assert!(other.open(b"share", &sealed).is_err(), "other key");
        let mut bad = sealed.clone();
        *bad.last_mut().expect("non-empty") ^= 1;
        assert!(k.open(b"share", &bad).is_err(), "altered");
        assert!(k.open(b"share", &sealed[..10]).is_err(), "truncated");
    }

    #[test]
    fn sealing_with_aad_opens_only_with_the_same_key_info_and_aad() {
        let k = KeyPair::generate().expect("keygen");
        let (enc, ct) = k
            .public()
            .seal_with_aad(b"coffer wrap v1", b"wrap 1", b"payload")
            .expect("seal");
        let opened = k
            .open_with_aad(b"coffer wrap v1", b"wrap 1", &enc, &ct)
            .expect("open");
        assert_eq!(&opened[..], b"payload");
        assert!(matches!(
            k.open_with_aad(b"coffer wrap v1", b"wrap 2", &enc, &ct),
            Err(KeyError::Decrypt)
        ));
        let other = KeyPair::generate().expect("keygen");
        assert!(matches!(
            other.open_with_aad(b"coffer wrap v1", b"wrap 1", &enc, &ct),
            Err(KeyError::Decrypt)
        ));
        let mut tampered = ct.clone();
        tampered[0] ^= 1;
        assert!(matches!(
            k.open_with_aad(b"coffer wrap v1", b"wrap 1", &enc, &tampered),
            Err(KeyError::Decrypt)
        ));
        // Without associated data it is the same construction as `seal`.
        let sealed = k.public().seal(b"share", b"x").expect("seal");
        let (e, c) = sealed.split_at(ENC_LEN);
        assert_eq!(
            &k.open_with_aad(b"share", b"", e, c).expect("open")[..],
            b"x"
        );
    }

    #[test]
    fn files_round_trip_and_are_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("ops/alice");
        let k = KeyPair::generate().expect("keygen");
        let (key, public) = k.save(&out, "alice@example").expect("save");
        let loaded = KeyPair::load(&key).expect("load");
        assert_eq!(loaded.public(), k.public());
        let p = PublicKey::load(&public).expect("load pub");
        assert_eq!(&p, k.public());
        assert_eq!(PublicKey::from_bytes(&p.to_bytes()).expect("bytes"), p);
        let err = k.save(&out, "").expect_err("exists");
        assert!(err.to_string().contains("already exists"), "{err}");
        // The private key never shows in Debug output.
        assert!(!format!("{loaded:?}").contains(&B64.encode(*loaded.seed)));
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let (key, _) = KeyPair::generate()
            .expect("keygen")
            .save(&dir.path().join("k"), "")
            .expect("save");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = KeyPair::load(&key).expect_err("refused");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn corrupt_files_get_clear_errors() {
        assert!(KeyPair::from_pem("hello").is_err());
        let bad = format!("-----BEGIN {PRIVATE_LABEL}-----\n!!!\n-----END {PRIVATE_LABEL}-----\n");
        assert!(
            KeyPair::from_pem(&bad)
                .expect_err("bad")
                .to_string()
                .contains("corrupt")
        );
        assert!(PublicKey::parse("ssh-ed25519 AAAA").is_err());
        assert!(PublicKey::parse("coffer-key-v1 AAAA").is_err());
    }
}
