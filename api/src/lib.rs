//! Coffer's public gRPC API: messages, client and server stubs, and the descriptor set served by
//! gRPC reflection. **Architecture invariant:** the only crate that defines the public wire
//! format; it has no logic.
#![forbid(unsafe_code)]

/// The raw replicated store below the engines (`coffer.raw.v1.Kv`), off unless a node runs
/// with `--raw-storage-endpoint`.
pub mod raw {
    /// Version 1.
    #[allow(missing_docs, missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("coffer.raw.v1");
    }
}

/// Cluster status, membership, snapshots and joining (`coffer.cluster.v1`).
pub mod cluster {
    /// Version 1.
    #[allow(missing_docs, missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("coffer.cluster.v1");
    }
}

/// Initialization, the unseal ceremony and operator actions (`coffer.seal.v1`).
pub mod seal {
    /// Version 1.
    #[allow(missing_docs, missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("coffer.seal.v1");
    }
}

/// Logins: the Private Key Challenge and Kubernetes (`coffer.auth.v1`).
pub mod auth {
    /// Version 1.
    #[allow(missing_docs, missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("coffer.auth.v1");
    }
}

/// Listing and revoking sessions (`coffer.sessions.v1`).
pub mod sessions {
    /// Version 1.
    #[allow(missing_docs, missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("coffer.sessions.v1");
    }
}

/// Path policies (`coffer.policies.v1`).
pub mod policies {
    /// Version 1.
    #[allow(missing_docs, missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("coffer.policies.v1");
    }
}

/// Identities (`coffer.identities.v1`).
pub mod identities {
    /// Version 1.
    #[allow(missing_docs, missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("coffer.identities.v1");
    }
}

/// Cluster-wide settings (`coffer.settings.v1`).
pub mod settings {
    /// Version 1.
    #[allow(missing_docs, missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("coffer.settings.v1");
    }
}

/// Kubernetes roles (`coffer.kubernetes.v1`).
pub mod kubernetes {
    /// Version 1.
    #[allow(missing_docs, missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("coffer.kubernetes.v1");
    }
}

/// Delegation grants (`coffer.grants.v1`).
pub mod grants {
    /// Version 1.
    #[allow(missing_docs, missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("coffer.grants.v1");
    }
}

/// Every administration and cluster package's version 1 in one place (they share no names), for
/// code that uses several of them: `coffer_api::v1::cluster_client::ClusterClient`,
/// `coffer_api::v1::LoginRequest`, ...
pub mod v1 {
    pub use crate::auth::v1::*;
    pub use crate::cluster::v1::*;
    pub use crate::grants::v1::*;
    pub use crate::identities::v1::*;
    pub use crate::kubernetes::v1::*;
    pub use crate::policies::v1::*;
    pub use crate::raw::v1::*;
    pub use crate::seal::v1::*;
    pub use crate::sessions::v1::*;
    pub use crate::settings::v1::*;
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
