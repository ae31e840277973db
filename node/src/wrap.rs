//! The wrap engine's records: data encrypted on the sender's machine to a recipient identity's
//! key (HPKE), stored only as that ciphertext, readable once by the recipient until it expires.
//!
//! A wrap lives at `\x01wrap/ID` (ID: 16 bytes the sender chose, as 32 hex digits), inside the
//! barrier like every value. Reading it once replaces it with a tombstone that says when it was
//! consumed; the tombstone keeps the ciphertext for [`RETRY_WINDOW_MS`] so that the same request,
//! retried after an unknown outcome (e.g. a leader crash), still gets it, and nobody else does.
//! The leader removes expired wraps and tombstones, and empties tombstones past the window.

use serde::{Deserialize, Serialize};

/// Where wraps live: this prefix, then the id as hex.
pub const PREFIX: &[u8] = b"\x01wrap/";
/// A consumed wrap's ciphertext is kept this long for a retry of the request that consumed it.
pub const RETRY_WINDOW_MS: u64 = 120_000;
/// Shortest and longest lifetime of a wrap.
pub const TTL_RANGE_MS: std::ops::RangeInclusive<u64> = 1_000..=30 * 86_400_000;
/// HPKE `info` of wrapped data.
pub const INFO: &[u8] = b"coffer wrap v1";

/// A stored wrap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wrapped {
    /// The identity that created it.
    pub sender: String,
    /// The identity it is for, and that identity's key (64 bytes) when it was created.
    pub recipient: String,
    /// See `recipient`.
    pub recipient_key: Vec<u8>,
    /// When it was created and when it expires, ms since the Unix epoch.
    pub created_ms: u64,
    /// See `created_ms`.
    pub expires_ms: u64,
    /// HPKE encapsulated key and ciphertext (empty in a tombstone past its retry window).
    pub encapsulated_key: Vec<u8>,
    /// See `encapsulated_key`.
    pub ciphertext: Vec<u8>,
    /// Set once read: when, and the request id of the read.
    pub consumed: Option<(u64, Vec<u8>)>,
}

/// The printable id of wrap `raw` ("w_" and 32 hex digits).
pub fn printable_id(raw: &[u8]) -> String {
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    format!("w_{hex}")
}

/// The raw 16 bytes of a printable id.
pub fn parse_id(id: &str) -> Result<[u8; 16], String> {
    let bad =
        || format!("{id:?} is not a wrap id (\"w_\" and 32 hex digits, as `coffer wrap` prints)");
    let hex = id.strip_prefix("w_").ok_or_else(bad)?;
    if hex.len() != 32 {
        return Err(bad());
    }
    let mut raw = [0u8; 16];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(raw)
}

/// The stored key of wrap `raw`.
pub fn store_key(raw: &[u8]) -> Vec<u8> {
    let mut k = PREFIX.to_vec();
    k.extend(printable_id(raw).bytes().skip(2));
    k
}

impl Wrapped {
    /// What the leader does with this record at `now`.
    pub fn clean_up(&self, now_ms: u64) -> CleanUp {
        if now_ms >= self.expires_ms {
            return CleanUp::Remove;
        }
        match &self.consumed {
            Some((at, _))
                if !self.ciphertext.is_empty() && now_ms >= at.saturating_add(RETRY_WINDOW_MS) =>
            {
                CleanUp::Empty
            }
            _ => CleanUp::Keep,
        }
    }
}

/// See [`Wrapped::clean_up`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleanUp {
    /// Still readable, or a tombstone within its window.
    Keep,
    /// A tombstone past its retry window: drop the ciphertext.
    Empty,
    /// Expired: remove the record.
    Remove,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_bad_ones_are_refused() {
        let raw = [0xab; 16];
        let id = printable_id(&raw);
        assert_eq!(id.len(), 34);
        assert_eq!(parse_id(&id), Ok(raw));
        assert!(store_key(&raw).ends_with(&id.as_bytes()[2..]));
        for bad in [
            "",
            "w_",
            "x_abababababababababababababababab",
            "w_zz",
            &id[..33],
        ] {
            assert!(parse_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expired_wraps_are_removed_and_old_tombstones_emptied() {
        let mut w = Wrapped {
            sender: "a".into(),
            recipient: "b".into(),
            recipient_key: vec![0; 64],
            created_ms: 0,
            expires_ms: 1_000_000,
            encapsulated_key: vec![1; 32],
            ciphertext: vec![2; 40],
            consumed: None,
        };
        assert_eq!(w.clean_up(10), CleanUp::Keep);
        assert_eq!(w.clean_up(1_000_000), CleanUp::Remove);
        w.consumed = Some((100, vec![3; 16]));
        assert_eq!(w.clean_up(100 + RETRY_WINDOW_MS - 1), CleanUp::Keep);
        assert_eq!(w.clean_up(100 + RETRY_WINDOW_MS), CleanUp::Empty);
        w.ciphertext.clear();
        assert_eq!(w.clean_up(100 + RETRY_WINDOW_MS), CleanUp::Keep);
    }
}
