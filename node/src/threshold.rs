//! Threshold encryption of the master key: the only module that touches `threshold_crypto`.
//!
//! `threshold_crypto` 0.4 depends on the unmaintained `failure` crate (RUSTSEC-2020-0036); every
//! use of it is behind the byte-level functions below, so moving to a maintained fork (e.g.
//! `blsttc`, nearly the same API, not ciphertext-compatible) changes this file only.
//!
//! Thresholds here are the user's: `threshold` shares are needed. `threshold_crypto`'s
//! `SecretKeySet::random(t, ..)` needs t+1, so t = threshold - 1. Its `PublicKeySet::decrypt`
//! combines shares without checking them, so [`combine`] verifies every share first.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use threshold_crypto::serde_impl::SerdeSecret;
use threshold_crypto::{Ciphertext, DecryptionShare, PublicKeySet, SecretKeySet, SecretKeyShare};
use zeroize::Zeroizing;

/// Most operators a key set may have.
pub const MAX_OPERATORS: usize = 64;

/// What init produces: public material for the replicated seal configuration, and one secret
/// share per operator (to be encrypted to that operator's key and handed out).
#[derive(Debug)]
pub struct Dealt {
    /// The public key set (serialized).
    pub public_set: Vec<u8>,
    /// The master key encrypted under the threshold public key (serialized).
    pub ciphertext: Vec<u8>,
    /// Operator i's secret key share (serialized), in operator order.
    pub shares: Vec<Zeroizing<Vec<u8>>>,
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(v).context("cannot encode threshold material")
}

fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T> {
    postcard::from_bytes(bytes).with_context(|| format!("the {what} is corrupt"))
}

/// Checks `threshold` of `operators`.
pub fn check_threshold(operators: usize, threshold: usize) -> Result<()> {
    if operators == 0 || operators > MAX_OPERATORS {
        bail!("give between 1 and {MAX_OPERATORS} operator keys, not {operators}");
    }
    if threshold == 0 || threshold > operators {
        bail!(
            "the threshold must be between 1 and the number of operators ({operators}), not {threshold}"
        );
    }
    Ok(())
}

/// Deals a new key set for `operators` operators of which `threshold` must take part, and
/// encrypts `secret` (the master key) under it.
pub fn deal(operators: usize, threshold: usize, secret: &[u8]) -> Result<Dealt> {
    check_threshold(operators, threshold)?;
    let mut rng = rand07::rngs::OsRng;
    let sks = SecretKeySet::random(threshold - 1, &mut rng);
    let pks = sks.public_keys();
    let ciphertext = pks.public_key().encrypt_with_rng(&mut rng, secret);
    let mut shares = Vec::with_capacity(operators);
    for i in 0..operators {
        let share = sks.secret_key_share(i);
        shares.push(Zeroizing::new(encode(&SerdeSecret(&share))?));
    }
    Ok(Dealt {
        public_set: encode(&pks)?,
        ciphertext: encode(&ciphertext)?,
        shares,
    })
}

/// An operator's decryption share of the master-key ciphertext, computed with their secret
/// share (on the operator's own machine).
pub fn decryption_share(secret_share: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>> {
    let share: SerdeSecret<SecretKeyShare> = decode(secret_share, "key share")?;
    let ct: Ciphertext = decode(ciphertext, "master-key ciphertext")?;
    if !ct.verify() {
        bail!("the master-key ciphertext is invalid");
    }
    let d = share
        .into_inner()
        .decrypt_share(&ct)
        .context("the master-key ciphertext is invalid")?;
    encode(&d)
}

/// Whether operator `index`'s decryption share is valid for the ciphertext.
pub fn verify_share(
    public_set: &[u8],
    index: usize,
    share: &[u8],
    ciphertext: &[u8],
) -> Result<bool> {
    let pks: PublicKeySet = decode(public_set, "public key set")?;
    let ct: Ciphertext = decode(ciphertext, "master-key ciphertext")?;
    let Ok(d) = decode::<DecryptionShare>(share, "decryption share") else {
        return Ok(false);
    };
    Ok(pks.public_key_share(index).verify_decryption_share(&d, &ct))
}

/// Combines `threshold` or more shares (by operator index), each verified first, into the
/// secret. Returns the indexes of bad shares as an error naming them.
pub fn combine(
    public_set: &[u8],
    threshold: usize,
    shares: &BTreeMap<usize, Vec<u8>>,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let pks: PublicKeySet = decode(public_set, "public key set")?;
    let ct: Ciphertext = decode(ciphertext, "master-key ciphertext")?;
    let mut good = BTreeMap::new();
    let mut bad = Vec::new();
    for (i, bytes) in shares {
        match decode::<DecryptionShare>(bytes, "decryption share") {
            Ok(d) if pks.public_key_share(*i).verify_decryption_share(&d, &ct) => {
                good.insert(*i, d);
            }
            _ => bad.push(*i),
        }
    }
    if !bad.is_empty() {
        bail!("invalid decryption shares from operators {bad:?}");
    }
    if good.len() < threshold {
        bail!("{} of {threshold} decryption shares", good.len());
    }
    let secret = pks
        .decrypt(good.iter(), &ct)
        .map_err(|e| anyhow::anyhow!("combining the shares failed: {e:?}"))?;
    Ok(Zeroizing::new(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_shares_recover_the_secret_and_fewer_do_not() {
        let dealt = deal(3, 2, b"0123456789abcdef0123456789abcdef").expect("deal");
        let d: Vec<Vec<u8>> = dealt
            .shares
            .iter()
            .map(|s| decryption_share(s, &dealt.ciphertext).expect("share"))
            .collect();
        for (i, s) in d.iter().enumerate() {
            assert!(verify_share(&dealt.public_set, i, s, &dealt.ciphertext).expect("verify"));
        }
        // Operator 0's share does not verify as operator 1's.
        assert!(!verify_share(&dealt.public_set, 1, &d[0], &dealt.ciphertext).expect("verify"));
        let two = BTreeMap::from([(0, d[0].clone()), (2, d[2].clone())]);
        let secret = combine(&dealt.public_set, 2, &two, &dealt.ciphertext).expect("combine");
        assert_eq!(&secret[..], b"0123456789abcdef0123456789abcdef");
        let one = BTreeMap::from([(1, d[1].clone())]);
        let err = combine(&dealt.public_set, 2, &one, &dealt.ciphertext).expect_err("one");
        assert!(err.to_string().contains("1 of 2"), "{err}");
    }

    #[test]
    fn a_bad_share_is_named_and_never_combined() {
        let dealt = deal(3, 2, &[7u8; 32]).expect("deal");
        let d0 = decryption_share(&dealt.shares[0], &dealt.ciphertext).expect("share");
        let d1 = decryption_share(&dealt.shares[1], &dealt.ciphertext).expect("share");
        // Operator 2 submits operator 1's share as its own.
        let shares = BTreeMap::from([(0, d0), (2, d1)]);
        let err = combine(&dealt.public_set, 2, &shares, &dealt.ciphertext).expect_err("bad");
        assert!(err.to_string().contains("[2]"), "{err}");
        assert!(!verify_share(&dealt.public_set, 0, b"garbage", &dealt.ciphertext).expect("v"));
    }

    #[test]
    fn shares_of_another_key_set_do_not_verify() {
        let a = deal(2, 2, &[1u8; 32]).expect("deal");
        let b = deal(2, 2, &[1u8; 32]).expect("deal");
        let d = decryption_share(&b.shares[0], &a.ciphertext).expect("share");
        assert!(!verify_share(&a.public_set, 0, &d, &a.ciphertext).expect("verify"));
    }

    #[test]
    fn thresholds_are_checked() {
        assert!(check_threshold(3, 0).is_err());
        assert!(check_threshold(3, 4).is_err());
        assert!(check_threshold(0, 0).is_err());
        assert!(check_threshold(3, 3).is_ok());
        assert!(check_threshold(1, 1).is_ok());
    }
}
