//! Session credentials and when to renew them.

use std::time::Duration;

/// A session certificate and the session key it certifies (PEM), as a login returns them.
#[derive(Clone)]
pub struct SessionCredentials {
    /// The certificate from the login answer (PEM).
    pub certificate: String,
    /// The session's private key (PKCS#8 PEM).
    pub key: zeroize::Zeroizing<String>,
    /// The login answer.
    pub login: coffer_api::v1::LoginResponse,
}

impl std::fmt::Debug for SessionCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SessionCredentials({} as {}, ***)",
            self.login.session_id, self.login.identity
        )
    }
}

impl SessionCredentials {
    /// How long the session has left at `now_ms` (ms since the Unix epoch).
    pub fn remaining(&self, now_ms: u64) -> Duration {
        Duration::from_millis(self.login.expires_at_ms.saturating_sub(now_ms))
    }
}

/// Renewal starts at least this long before a session ends.
pub const RENEW_MARGIN: Duration = Duration::from_secs(5);

/// How long after a login its session should be renewed, for a session that lasts `lifetime`:
/// at two thirds of it, and at least [`RENEW_MARGIN`] before it ends. A session shorter than
/// the margin is renewed half way through, so renewal never spins.
pub fn renew_after(lifetime: Duration) -> Duration {
    let at = (lifetime * 2 / 3).min(lifetime.saturating_sub(RENEW_MARGIN));
    if at.is_zero() { lifetime / 2 } else { at }
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_two_thirds_and_at_least_the_margin_before_the_end() {
        let s = Duration::from_secs;
        assert_eq!(renew_after(s(3600)), s(2400));
        // Two thirds of 12 s is 8 s, but that is only 4 s before the end.
        assert_eq!(renew_after(s(12)), s(7));
        assert_eq!(renew_after(s(6)), s(1));
        // Shorter than the margin: half way, never zero.
        assert_eq!(renew_after(s(4)), s(2));
        assert_eq!(renew_after(s(5)), Duration::from_millis(2500));
        for secs in 1..200 {
            let at = renew_after(s(secs));
            assert!(!at.is_zero() && at < s(secs), "{secs} s -> {at:?}");
        }
    }

    #[test]
    fn credentials_never_print_their_key() {
        let c = SessionCredentials {
            certificate: "CERT".into(),
            key: zeroize::Zeroizing::new("PRIVATE".into()),
            login: coffer_api::v1::LoginResponse {
                session_id: "s1".into(),
                identity: "web".into(),
                expires_at_ms: 10_000,
                certificate: String::new(),
            },
        };
        let shown = format!("{c:?}");
        assert!(
            shown.contains("s1") && !shown.contains("PRIVATE"),
            "{shown}"
        );
        assert_eq!(c.remaining(4_000), Duration::from_secs(6));
        assert_eq!(c.remaining(20_000), Duration::ZERO);
    }
}
