//! The wrap engine (`coffer.wrap.v1`): data encrypted here to a recipient's key, stored by the
//! cluster as ciphertext only, readable once by the recipient.

use std::time::Duration;

use coffer_api::wrap::v1 as pb;
use coffer_api::wrap::v1::wrap_client::WrapClient;
use prost::Message as _;
use zeroize::Zeroizing;

use crate::client::{Client, random_16};
use crate::error::{Error, Result};
use crate::keys::{KeyError, KeyPair, PublicKey};
use crate::retry::CallKind;

pub use pb::LookupResponse;

/// The HPKE info wrapped data is encrypted with.
pub const WRAP_INFO: &[u8] = b"coffer wrap v1";

/// The associated data a wrap's payload is sealed with: the protobuf encoding of `WrapAad`.
pub fn wrap_aad(wrap_id: &[u8], recipient: &PublicKey) -> Vec<u8> {
    pb::WrapAad {
        wrap_id: wrap_id.to_vec(),
        recipient_fingerprint: recipient.fingerprint(),
    }
    .encode_to_vec()
}

/// A payload sealed to a recipient, ready to send.
#[derive(Debug, Clone)]
pub struct SealedWrap {
    /// The 16 random bytes the associated data names.
    pub wrap_id: Vec<u8>,
    /// The HPKE encapsulated key.
    pub encapsulated_key: [u8; 32],
    /// The ciphertext with its tag.
    pub ciphertext: Vec<u8>,
}

/// Seals `payload` to `recipient` under a new random wrap id (no network).
pub fn seal_wrap(recipient: &PublicKey, payload: &[u8]) -> Result<SealedWrap> {
    let wrap_id = random_16()?;
    let aad = wrap_aad(&wrap_id, recipient);
    let (encapsulated_key, ciphertext) = recipient.seal_with_aad(WRAP_INFO, &aad, payload)?;
    Ok(SealedWrap {
        wrap_id,
        encapsulated_key,
        ciphertext,
    })
}

/// Opens a wrap's ciphertext with the recipient's key (no network).
pub fn open_wrap(
    key: &KeyPair,
    wrap_id: &[u8],
    encapsulated_key: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let aad = wrap_aad(wrap_id, key.public());
    key.open_with_aad(WRAP_INFO, &aad, encapsulated_key, ciphertext)
        .map_err(|e| match e {
            KeyError::Decrypt | KeyError::Invalid(_) => Error::NotForThisKey,
            other => Error::Key(other),
        })
}

/// A wrap as created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    /// The printable wrap id to give the recipient (`w_` and 32 hex digits).
    pub id: String,
    /// When it expires, ms since the Unix epoch.
    pub expires_ms: u64,
    /// The recipient identity.
    pub recipient: String,
}

/// Wrapped data as unwrapped.
#[derive(Debug)]
pub struct Unwrapped {
    /// The payload (wiped when dropped).
    pub payload: Zeroizing<Vec<u8>>,
    /// The identity that wrapped it.
    pub sender: String,
    /// When it was created, ms since the Unix epoch.
    pub created_ms: u64,
}

/// The wrap engine: `client.wrap()`.
#[derive(Debug, Clone)]
pub struct Wrap {
    client: Client,
}

impl Wrap {
    pub(crate) fn new(client: Client) -> Wrap {
        Wrap { client }
    }

    /// Encrypts `payload` here to `recipient` and stores the ciphertext for `ttl` (1 s to 30
    /// days). The cluster never sees the payload.
    pub async fn wrap(
        &self,
        recipient: &PublicKey,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<Wrapped> {
        let sealed = seal_wrap(recipient, payload)?;
        let request = pb::CreateRequest {
            recipient_key: recipient.to_bytes().to_vec(),
            encapsulated_key: sealed.encapsulated_key.to_vec(),
            ciphertext: sealed.ciphertext,
            ttl_ms: ttl.as_millis().try_into().unwrap_or(u64::MAX),
            wrap_id: sealed.wrap_id,
            request_id: Vec::new(),
        };
        let answer = self
            .client
            .unary(
                CallKind::IdempotentWrite,
                &request,
                |ch, request| async move { WrapClient::new(ch).create(request).await },
            )
            .await?
            .into_inner();
        Ok(Wrapped {
            id: answer.id,
            expires_ms: answer.expires_ms,
            recipient: answer.recipient,
        })
    }

    /// Reads wrapped data once (consuming it) and decrypts it with the caller's key. A retry
    /// after an unknown outcome reuses the request id, so the data still comes back to this
    /// call. Needs a [`crate::Login::Key`] client.
    pub async fn unwrap(&self, id: &str) -> Result<Unwrapped> {
        let key = self
            .client
            .key_pair()
            .ok_or(Error::NeedsKey("unwrapping"))?;
        let request = pb::UnwrapRequest {
            id: id.to_string(),
            request_id: Vec::new(),
        };
        let answer = self
            .client
            .unary(
                CallKind::IdempotentWrite,
                &request,
                |ch, request| async move { WrapClient::new(ch).unwrap(request).await },
            )
            .await?
            .into_inner();
        // The printable id is the wrap id in hex: an answer for another wrap (even one for this
        // key) is refused before it is opened.
        let hex: String = answer.wrap_id.iter().map(|b| format!("{b:02x}")).collect();
        if !id.eq_ignore_ascii_case(&format!("w_{hex}")) {
            return Err(Error::Protocol(format!(
                "asked for wrap {id}, got the data of w_{hex}"
            )));
        }
        let payload = open_wrap(
            key,
            &answer.wrap_id,
            &answer.encapsulated_key,
            &answer.ciphertext,
        )?;
        Ok(Unwrapped {
            payload,
            sender: answer.sender,
            created_ms: answer.created_ms,
        })
    }

    /// What is known about a wrap without consuming it.
    pub async fn lookup(&self, id: &str) -> Result<LookupResponse> {
        let request = pb::LookupRequest { id: id.to_string() };
        let answer = self
            .client
            .unary(CallKind::Read, &request, |ch, request| async move {
                WrapClient::new(ch).lookup(request).await
            })
            .await?;
        Ok(answer.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrap_opens_for_its_recipient_only_and_only_untouched() {
        let alice = KeyPair::generate().expect("keygen");
        let sealed = seal_wrap(alice.public(), b"db password").expect("seal");
        assert_eq!(sealed.wrap_id.len(), 16);
        let opened = open_wrap(
            &alice,
            &sealed.wrap_id,
            &sealed.encapsulated_key,
            &sealed.ciphertext,
        )
        .expect("recipient opens");
        assert_eq!(&opened[..], b"db password");

        let mallory = KeyPair::generate().expect("keygen");
        let err = open_wrap(
            &mallory,
            &sealed.wrap_id,
            &sealed.encapsulated_key,
            &sealed.ciphertext,
        )
        .expect_err("another key");
        assert!(
            err.to_string().contains("not wrapped for this key"),
            "{err}"
        );

        // The ciphertext is bound to its wrap id: served under another id, it does not open.
        let other_id = [0u8; 16];
        assert!(matches!(
            open_wrap(
                &alice,
                &other_id,
                &sealed.encapsulated_key,
                &sealed.ciphertext
            ),
            Err(Error::NotForThisKey)
        ));
        let mut tampered = sealed.ciphertext.clone();
        tampered[3] ^= 0x80;
        assert!(matches!(
            open_wrap(&alice, &sealed.wrap_id, &sealed.encapsulated_key, &tampered),
            Err(Error::NotForThisKey)
        ));
        assert!(matches!(
            open_wrap(&alice, &sealed.wrap_id, &[1, 2, 3], &sealed.ciphertext),
            Err(Error::NotForThisKey)
        ));
    }

    #[test]
    fn the_associated_data_is_the_protobuf_wrap_aad() {
        let k = KeyPair::generate().expect("keygen");
        let aad = wrap_aad(&[9; 16], k.public());
        let decoded = pb::WrapAad::decode(aad.as_slice()).expect("decodes");
        assert_eq!(decoded.wrap_id, vec![9; 16]);
        assert_eq!(decoded.recipient_fingerprint, k.public().fingerprint());
        assert_ne!(aad, wrap_aad(&[8; 16], k.public()));
    }

    #[test]
    fn each_wrap_gets_a_new_id() {
        let k = KeyPair::generate().expect("keygen");
        let a = seal_wrap(k.public(), b"x").expect("seal");
        let b = seal_wrap(k.public(), b"x").expect("seal");
        assert_ne!(a.wrap_id, b.wrap_id);
    }
}
