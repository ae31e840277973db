//! The peer wire and on-disk encoding of openraft types: postcard.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Encodes for disk or wire.
pub(crate) fn encode_io<T: Serialize>(v: &T) -> std::io::Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| std::io::Error::other(format!("encode: {e}")))
}

/// Decodes from disk or wire.
pub(crate) fn decode_io<T: DeserializeOwned>(b: &[u8]) -> std::io::Result<T> {
    postcard::from_bytes(b)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("decode: {e}")))
}

/// Encodes a peer message. Our own types always encode; a failure is reported, not panicked on.
pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, tonic::Status> {
    postcard::to_stdvec(v).map_err(|e| tonic::Status::internal(format!("encode: {e}")))
}

/// Decodes a peer message; malformed input is INVALID_ARGUMENT.
pub(crate) fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, tonic::Status> {
    postcard::from_bytes(b)
        .map_err(|e| tonic::Status::invalid_argument(format!("malformed peer message: {e}")))
}

/// Runs blocking storage work on the current task. On a multi-threaded runtime the worker is
/// handed over first (`block_in_place`), so other tasks (heartbeats, RPCs) keep running while
/// redb waits for the flusher's fsync; on a single-threaded runtime it just runs.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
