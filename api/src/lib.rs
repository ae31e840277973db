//! Coffer's public gRPC API: messages, client and server stubs, and the descriptor set served by
//! gRPC reflection. **Architecture invariant:** the only crate that defines the public wire
//! format; it has no logic.
#![forbid(unsafe_code)]

/// Generated messages and services of `coffer.v1`.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("coffer.v1");
}

/// The kv secrets engine (`coffer.kv.v1`): versioned secrets with Vault KV v2 semantics.
pub mod kv {
    /// Version 1.
    #[allow(missing_docs, missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("coffer.kv.v1");
    }
}

/// The wrap engine (`coffer.wrap.v1`): data encrypted to a recipient, readable once.
pub mod wrap {
    /// Version 1.
    #[allow(missing_docs, missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("coffer.wrap.v1");
    }
}

/// The encoded `FileDescriptorSet` of the API, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/coffer_descriptor.bin"));
