//! The encryption barrier: a master key (in memory only while unsealed) encrypts the keyring; the
//! keyring holds numbered data keys; values are encrypted with the active data key.
//!
//! Every ciphertext is AES-256-GCM (ring) with a random 96-bit nonce and associated data that
//! binds it to its purpose, its path and its data-key number, so a ciphertext moved to another
//! key path, or relabelled with another key number, fails to decrypt. Layout of a value:
//! `version (1) | key number (4, big-endian) | nonce (12) | ciphertext and tag`.
//!
//! Key bytes live in [`Zeroizing`] buffers and are wiped when dropped; nothing here prints them.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

const VERSION: u8 = 1;
const HEADER: usize = 1 + 4 + NONCE_LEN;
const VALUE_CONTEXT: &[u8] = b"coffer/barrier/value/v1";
const KEYRING_CONTEXT: &[u8] = b"coffer/barrier/keyring/v1";

fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>> {
    let mut b = Zeroizing::new([0u8; N]);
    SystemRandom::new()
        .fill(&mut *b)
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    Ok(b)
}

fn aad(context: &[u8], number: u32, path: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(context.len() + 4 + path.len());
    a.extend_from_slice(context);
    a.extend_from_slice(&number.to_be_bytes());
    a.extend_from_slice(path);
    a
}

fn seal(key: &[u8; 32], number: u32, aad_bytes: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key).map_err(|_| anyhow::anyhow!("bad key length"))?,
    );
    let nonce = random::<NONCE_LEN>()?;
    let mut out = Vec::with_capacity(HEADER + plaintext.len() + AES_256_GCM.tag_len());
    out.push(VERSION);
    out.extend_from_slice(&number.to_be_bytes());
    out.extend_from_slice(&*nonce);
    let mut body = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(*nonce),
        Aad::from(aad_bytes),
        &mut body,
    )
    .map_err(|_| anyhow::anyhow!("encryption failed"))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// The key number a ciphertext names (after checking its version and length).
fn key_number(blob: &[u8]) -> Result<u32> {
    if blob.len() < HEADER + AES_256_GCM.tag_len() {
        bail!("the encrypted value is truncated");
    }
    if blob[0] != VERSION {
        bail!(
            "the encrypted value has an unknown format version {}",
            blob[0]
        );
    }
    Ok(u32::from_be_bytes([blob[1], blob[2], blob[3], blob[4]]))
}

fn open(key: &[u8; 32], aad_bytes: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key).map_err(|_| anyhow::anyhow!("bad key length"))?,
    );
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&blob[5..HEADER]);
    let mut body = Zeroizing::new(blob[HEADER..].to_vec());
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad_bytes),
            &mut body,
        )
        .map_err(|_| {
            anyhow::anyhow!("cannot decrypt: the value was altered or moved from another path")
        })?
        .len();
    body.truncate(len);
    Ok(body)
}

/// The master key: 256 random bits, only in memory, wiped on drop.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A new random master key.
    pub fn generate() -> Result<MasterKey> {
        Ok(MasterKey(random::<32>()?))
    }

    /// From the 32 bytes the unseal ceremony recovers.
    pub fn from_bytes(bytes: &[u8]) -> Result<MasterKey> {
        if bytes.len() != 32 {
            bail!("a master key is 32 bytes, not {}", bytes.len());
        }
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(bytes);
        Ok(MasterKey(k))
    }

    /// The key bytes (to encrypt them under the threshold key at init).
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Numbered data keys; the highest number is the active one.
pub struct Keyring {
    keys: BTreeMap<u32, Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring(keys 1..={})", self.active())
    }
}

impl Keyring {
    /// A keyring with one data key, number 1.
    pub fn new() -> Result<Keyring> {
        Ok(Keyring {
            keys: BTreeMap::from([(1, random::<32>()?)]),
        })
    }

    /// The active (newest) key number.
    pub fn active(&self) -> u32 {
        self.keys.keys().next_back().copied().unwrap_or(0)
    }

    /// A key for `purpose` (e.g. authenticating login challenges), derived from the first data
    /// key with HMAC-SHA256: the same on every unsealed node, unchanged by rotation.
    pub fn derive(&self, purpose: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        if let Some((_, first)) = self.keys.iter().next() {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &**first);
            out.copy_from_slice(ring::hmac::sign(&key, purpose).as_ref());
        }
        out
    }

    /// Adds a data key and makes it active; returns its number. Older keys stay for reading.
    pub fn rotate(&mut self) -> Result<u32> {
        let n = self.active() + 1;
        self.keys.insert(n, random::<32>()?);
        Ok(n)
    }

    /// Encrypts a value stored at `path` with the active key.
    pub fn encrypt(&self, path: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let n = self.active();
        let key = self
            .keys
            .get(&n)
            .ok_or_else(|| anyhow::anyhow!("empty keyring"))?;
        seal(key, n, &aad(VALUE_CONTEXT, n, path), plaintext)
    }

    /// Decrypts a value read from `path`.
    pub fn decrypt(&self, path: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let n = key_number(blob)?;
        let Some(key) = self.keys.get(&n) else {
            bail!(
                "the value is encrypted with data key {n}, which this keyring (1..={}) does not hold",
                self.active()
            );
        };
        open(key, &aad(VALUE_CONTEXT, n, path), blob)
    }

    /// The keyring encrypted with the master key, for the replicated state.
    pub fn seal(&self, master: &MasterKey) -> Result<Vec<u8>> {
        let mut plain = Zeroizing::new(Vec::with_capacity(self.keys.len() * 36));
        for (n, k) in &self.keys {
            plain.extend_from_slice(&n.to_be_bytes());
            plain.extend_from_slice(&**k);
        }
        seal(&master.0, 0, &aad(KEYRING_CONTEXT, 0, b""), &plain)
    }

    /// Decrypts a sealed keyring with the master key.
    pub fn open(master: &MasterKey, blob: &[u8]) -> Result<Keyring> {
        if key_number(blob)? != 0 {
            bail!("not a sealed keyring");
        }
        let plain = open(&master.0, &aad(KEYRING_CONTEXT, 0, b""), blob).map_err(|_| {
            anyhow::anyhow!("cannot open the keyring: wrong master key or a corrupt keyring")
        })?;
        if plain.is_empty() || plain.len() % 36 != 0 {
            bail!("the keyring is corrupt");
        }
        let mut keys = BTreeMap::new();
        for chunk in plain.chunks(36) {
            let n = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let mut k = Zeroizing::new([0u8; 32]);
            k.copy_from_slice(&chunk[4..]);
            keys.insert(n, k);
        }
        Ok(Keyring { keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_do_not_contain_the_plaintext() {
        let ring = Keyring::new().expect("keyring");
        let blob = ring.encrypt(b"app/db", b"marker-plaintext").expect("enc");
        assert!(!blob.windows(16).any(|w| w == b"marker-plaintext"));
        assert_eq!(
            &ring.decrypt(b"app/db", &blob).expect("dec")[..],
            b"marker-plaintext"
        );
        // Same plaintext twice: different ciphertexts (random nonces).
        assert_ne!(
            blob,
            ring.encrypt(b"app/db", b"marker-plaintext").expect("enc")
        );
    }

    #[test]
    fn a_ciphertext_moved_to_another_path_or_altered_fails() {
        let ring = Keyring::new().expect("keyring");
        let blob = ring.encrypt(b"app/db", b"v").expect("enc");
        assert!(ring.decrypt(b"app/other", &blob).is_err());
        let mut bad = blob.clone();
        bad[HEADER] ^= 1;
        assert!(ring.decrypt(b"app/db", &bad).is_err());
        assert!(ring.decrypt(b"app/db", &blob[..10]).is_err());
    }

    #[test]
    fn rotation_keeps_old_values_readable_and_writes_with_the_new_key() {
        let mut ring = Keyring::new().expect("keyring");
        let old = ring.encrypt(b"k", b"old").expect("enc");
        assert_eq!(ring.rotate().expect("rotate"), 2);
        let new = ring.encrypt(b"k", b"new").expect("enc");
        assert_eq!(key_number(&old).expect("n"), 1);
        assert_eq!(key_number(&new).expect("n"), 2);
        assert_eq!(&ring.decrypt(b"k", &old).expect("dec")[..], b"old");
        // Relabelling a ciphertext with another key number fails.
        let mut relabelled = old.clone();
        relabelled[1..5].copy_from_slice(&2u32.to_be_bytes());
        assert!(ring.decrypt(b"k", &relabelled).is_err());
    }

    #[test]
    fn derived_keys_depend_on_the_purpose_and_survive_rotation() {
        let mut ring = Keyring::new().expect("keyring");
        let a = ring.derive(b"coffer/challenge/v1");
        assert_ne!(*a, *ring.derive(b"another purpose"));
        ring.rotate().expect("rotate");
        assert_eq!(*a, *ring.derive(b"coffer/challenge/v1"));
        assert_ne!(
            *a,
            *Keyring::new()
                .expect("keyring")
                .derive(b"coffer/challenge/v1")
        );
    }

    #[test]
    fn the_keyring_opens_only_with_its_master_key() {
        let master = MasterKey::generate().expect("mk");
        let mut ring = Keyring::new().expect("keyring");
        ring.rotate().expect("rotate");
        let value = ring.encrypt(b"p", b"x").expect("enc");
        let sealed = ring.seal(&master).expect("seal");
        let reopened = Keyring::open(&master, &sealed).expect("open");
        assert_eq!(reopened.active(), 2);
        assert_eq!(&reopened.decrypt(b"p", &value).expect("dec")[..], b"x");
        let other = MasterKey::generate().expect("mk");
        let err = Keyring::open(&other, &sealed).expect_err("wrong master");
        assert!(err.to_string().contains("wrong master key"), "{err}");
        assert!(
            Keyring::open(&master, &value).is_err(),
            "a value is not a keyring"
        );
    }
}
