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
    let bytes =
        postcard::to_stdvec(v).map_err(|e| tonic::Status::internal(format!("encode: {e}")))?;
    crate::tap::outgoing(&bytes);
    Ok(bytes)
}

/// Decodes a peer message; malformed input is INVALID_ARGUMENT.
pub(crate) fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, tonic::Status> {
    postcard::from_bytes(b)
        .map_err(|e| tonic::Status::invalid_argument(format!("malformed peer message: {e}")))
}
