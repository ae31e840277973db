//! The SDK's error type.

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered with an error (or the call failed in transit after every retry):
    /// the gRPC code and the server's message, which says what to do.
    #[error("{message} ({code:?})")]
    Status {
        /// The gRPC status code (e.g. `NotFound`, `PermissionDenied`, `FailedPrecondition`).
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// The client's configuration cannot work (no endpoint, a bad address or CA).
    #[error("{0}")]
    Config(String),
    /// The operation needs the identity's private key (a `Login::Key` client): sealed reads
    /// and unwrapping decrypt with it.
    #[error(
        "{0} needs the identity's private key: connect with Login::Key (the CLI: --identity-key or COFFER_KEY)"
    )]
    NeedsKey(&'static str),
    /// The session ended and this client cannot log in again (it was given a session, not a
    /// key or a Kubernetes role).
    #[error("the session has ended; log in again (`coffer login`, or give the client a key)")]
    SessionEnded,
    /// Wrapped data that does not decrypt with the caller's key.
    #[error("the wrapped data does not decrypt: not wrapped for this key, or tampered")]
    NotForThisKey,
    /// The server's answer is malformed or does not match the request.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// A key could not be loaded or used.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// The Kubernetes token file could not be read.
    #[error("cannot read the service-account token {}: {source}", path.display())]
    TokenFile {
        /// The token file.
        path: std::path::PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The gRPC code, when the error is a server's answer.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<tonic::Status> for Error {
    /// The server's message; for a failure on this side of the connection, with its causes
    /// ("tcp connect error: Connection refused").
    fn from(s: tonic::Status) -> Self {
        let mut message = s.message().to_string();
        let mut source = std::error::Error::source(&s);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        Error::Status {
            code: s.code(),
            message,
        }
    }
}

/// Results of the SDK.
pub type Result<T, E = Error> = std::result::Result<T, E>;
