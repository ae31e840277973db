//! Which failures are retried, and the retry loop.
//!
//! A read is retried on the next endpoint when the call did not complete (UNAVAILABLE,
//! DEADLINE_EXCEEDED, or a transport error). A write that carries a `request_id` is retried
//! the same way with the **same** request id, which the server applies at most once. A write
//! without one (mounts, policies, identities) is retried only when the server said UNAVAILABLE
//! or ABORTED (the server's promise: not applied; ABORTED is the kv engine giving up a write
//! that kept losing races with other writes to the same secret). A session that ended is renewed once and the call
//! retried. Everything else is returned at once.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::{Code, Status};

use crate::error::Error;

/// What kind of call is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// Changes nothing (Get, ReadMetadata, List, Lookup, Status, logins).
    Read,
    /// Changes state and carries a `request_id` reused by every retry (Put, Patch, Delete,
    /// Unwrap, Create...).
    IdempotentWrite,
    /// Changes state without a request id: never retried when the outcome is unknown.
    Write,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try again (on the next endpoint).
    Retry,
    /// The session ended: log in again, then try again.
    Relogin,
    /// Return the error.
    Fail,
}

/// Whether `status` came from this side of the connection (the connection failed or the call
/// timed out here) rather than from a server: statuses decoded from a server's answer carry no
/// Rust error source, those tonic makes from a transport error do.
fn is_transport(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// Whether the request certainly never left this machine: the connection was refused.
fn never_sent(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// A session that ended, in the server's words ("session ... has ended; log in again").
pub fn is_session_ended(status: &Status) -> bool {
    status.code() == Code::Unauthenticated && status.message().contains("has ended")
}

/// The verdict on a failed attempt of a `kind` call.
pub fn classify(kind: CallKind, status: &Status) -> Verdict {
    if is_session_ended(status) {
        // Refused before anything was applied, whatever the call.
        return Verdict::Relogin;
    }
    let unknown_outcome = status.code() == Code::DeadlineExceeded
        || (is_transport(status)
            && matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
            ));
    let not_applied = (matches!(status.code(), Code::Unavailable | Code::Aborted)
        && !is_transport(status))
        || never_sent(status);
    match kind {
        CallKind::Read | CallKind::IdempotentWrite if unknown_outcome || not_applied => {
            Verdict::Retry
        }
        CallKind::Write if not_applied => Verdict::Retry,
        _ => Verdict::Fail,
    }
}

/// How long to keep trying.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// No retry starts after this much time since the first attempt.
    pub budget: Duration,
    /// Each attempt's own deadline.
    pub attempt_timeout: Duration,
    /// The pause before the first retry; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    /// The longest pause.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            budget: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(10),
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// Runs `attempt(n, request_id)` (n = 0, 1, ...; the caller picks the endpoint from n) until
/// it succeeds, fails in a way that is not retried, or the budget is spent. `request_id` is
/// made once per call (16 bytes, time-ordered and random, see `client::request_id`): every attempt gets the same, which is what makes retrying
/// a write safe. On a session that ended, `relogin()` runs once before the next attempt.
pub async fn with_retries<T, A, AF, R, RF>(
    policy: &RetryPolicy,
    kind: CallKind,
    mut attempt: A,
    mut relogin: R,
) -> Result<T, Error>
where
    A: FnMut(usize, Vec<u8>) -> AF,
    AF: Future<Output = Result<T, Status>>,
    R: FnMut() -> RF,
    RF: Future<Output = Result<(), Error>>,
{
    let start = Instant::now();
    let request_id = crate::client::request_id()?;
    let mut backoff = policy.first_backoff;
    let mut relogged = false;
    for n in 0.. {
        let status = match tokio::time::timeout(
            policy.attempt_timeout,
            attempt(n, request_id.clone()),
        )
        .await
        {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(status)) => status,
            Err(_) => {
                Status::deadline_exceeded(format!("no answer within {:?}", policy.attempt_timeout))
            }
        };
        match classify(kind, &status) {
            Verdict::Relogin if !relogged => {
                relogged = true;
                tracing::debug!("session ended; logging in again before retrying");
                relogin().await?;
            }
            Verdict::Retry if start.elapsed() + backoff < policy.budget => {
                tracing::debug!(attempt = n, code = ?status.code(), "retrying on the next endpoint");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(policy.max_backoff);
            }
            Verdict::Retry => {
                let mut error = Error::from(status);
                if let Error::Status { message, .. } = &mut error {
                    message.push_str(&format!(
                        "; gave up after {} attempts in {:.1?}, every endpoint tried",
                        n + 1,
                        start.elapsed()
                    ));
                }
                return Err(error);
            }
            _ => return Err(status.into()),
        }
    }
    unreachable!("the attempt loop only ends by returning")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn transport_failure() -> Status {
        Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset",
        )))
    }

    fn refused() -> Status {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let mut s = Status::unavailable("tcp connect error");
        s.set_source(std::sync::Arc::new(refused));
        s
    }

    #[test]
    fn reads_and_idempotent_writes_retry_what_did_not_complete_and_nothing_else() {
        let retried = [
            Status::unavailable("no leader"),
            Status::aborted("secret kept changing"),
            Status::deadline_exceeded("slow"),
            transport_failure(),
        ];
        for kind in [CallKind::Read, CallKind::IdempotentWrite] {
            for s in &retried {
                assert_eq!(classify(kind, s), Verdict::Retry, "{kind:?} {s:?}");
            }
            for s in [
                Status::invalid_argument("bad path"),
                Status::not_found("no such secret"),
                Status::failed_precondition("cas mismatch"),
                Status::permission_denied("no policy"),
                Status::unauthenticated("bad certificate"),
                Status::internal("bug"),
            ] {
                assert_eq!(classify(kind, &s), Verdict::Fail, "{kind:?} {s:?}");
            }
        }
    }

    #[test]
    fn writes_without_a_request_id_retry_only_what_the_server_did_not_apply() {
        assert_eq!(
            classify(CallKind::Write, &Status::unavailable("sealed")),
            Verdict::Retry
        );
        assert_eq!(
            classify(CallKind::Write, &Status::aborted("lost every race")),
            Verdict::Retry
        );
        assert_eq!(
            classify(CallKind::Write, &Status::deadline_exceeded("slow")),
            Verdict::Fail
        );
        assert!(is_transport(&transport_failure()));
        assert_eq!(
            classify(CallKind::Write, &transport_failure()),
            Verdict::Fail
        );
        // A refused connection never carried the request: any write may go to the next node.
        assert_eq!(classify(CallKind::Write, &refused()), Verdict::Retry);
        // The cause of a transport failure is kept in the message.
        let err = Error::from(transport_failure());
        assert!(err.to_string().contains("connection reset"), "{err}");
    }

    #[test]
    fn an_ended_session_means_log_in_again() {
        let ended = Status::unauthenticated("session 1f2e has ended; log in again");
        for kind in [CallKind::Read, CallKind::IdempotentWrite, CallKind::Write] {
            assert_eq!(classify(kind, &ended), Verdict::Relogin);
        }
    }

    fn quick() -> RetryPolicy {
        RetryPolicy {
            budget: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(5),
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn a_write_is_retried_with_the_same_request_id_on_each_endpoint() {
        let seen = Mutex::new(Vec::new());
        let out = with_retries(
            &quick(),
            CallKind::IdempotentWrite,
            |n, request_id| {
                seen.lock().expect("lock").push((n % 3, request_id));
                async move {
                    if n < 2 {
                        Err(Status::unavailable("leader changed"))
                    } else {
                        Ok("applied")
                    }
                }
            },
            || async { Ok(()) },
        )
        .await
        .expect("third attempt succeeds");
        assert_eq!(out, "applied");
        let seen = seen.into_inner().expect("lock");
        assert_eq!(seen.len(), 3);
        let first = &seen[0].1;
        assert_eq!(first.len(), 16);
        assert!(seen.iter().all(|(_, id)| id == first), "{seen:?}");
        // The next call is another request.
        let next = with_retries(
            &quick(),
            CallKind::IdempotentWrite,
            |_, request_id| async move { Ok(request_id) },
            || async { Ok(()) },
        )
        .await
        .expect("ok");
        assert_ne!(&next, first);
        assert_eq!(
            seen.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
            [0, 1, 2],
            "each attempt goes to the next endpoint"
        );
    }

    #[tokio::test]
    async fn errors_that_are_not_retried_come_back_at_once_with_their_code() {
        let attempts = Mutex::new(0);
        let err = with_retries(
            &quick(),
            CallKind::Read,
            |_, _| {
                *attempts.lock().expect("lock") += 1;
                async { Err::<(), _>(Status::not_found("no secret app/db")) }
            },
            || async { Ok(()) },
        )
        .await
        .expect_err("not found");
        assert_eq!(*attempts.lock().expect("lock"), 1);
        assert_eq!(err.code(), Some(Code::NotFound));
        assert!(err.to_string().contains("no secret app/db"), "{err}");
    }

    #[tokio::test]
    async fn an_ended_session_is_renewed_once_then_the_error_is_returned() {
        let logins = Mutex::new(0);
        let err = with_retries(
            &quick(),
            CallKind::Read,
            |_, _| async {
                Err::<(), _>(Status::unauthenticated("session x has ended; log in again"))
            },
            || {
                *logins.lock().expect("lock") += 1;
                async { Ok(()) }
            },
        )
        .await
        .expect_err("still ended");
        assert_eq!(*logins.lock().expect("lock"), 1);
        assert_eq!(err.code(), Some(Code::Unauthenticated));
    }

    #[tokio::test]
    async fn retries_stop_when_the_budget_is_spent() {
        let policy = RetryPolicy {
            budget: Duration::from_millis(30),
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            ..quick()
        };
        let attempts = Mutex::new(0);
        let err = with_retries(
            &policy,
            CallKind::Read,
            |_, _| {
                *attempts.lock().expect("lock") += 1;
                async { Err::<(), _>(Status::unavailable("down")) }
            },
            || async { Ok(()) },
        )
        .await
        .expect_err("gives up");
        assert_eq!(err.code(), Some(Code::Unavailable));
        assert!(err.to_string().contains("gave up after"), "{err}");
        let n = *attempts.lock().expect("lock");
        assert!((2..=4).contains(&n), "{n} attempts in a 30 ms budget");
    }
}
