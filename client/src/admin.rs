//! Thin typed clients over the Policies (`coffer.policies.v1`) and Identities
//! (`coffer.identities.v1`) services.

use coffer_api::v1 as pb;
use coffer_api::v1::identities_client::IdentitiesClient;
use coffer_api::v1::policies_client::PoliciesClient;

use crate::client::Client;
use crate::error::Result;
use crate::retry::CallKind;

pub use pb::{IdentityCreateRequest, IdentityResponse, IdentityUpdateRequest, PolicyReadResponse};

/// Path policies (Vault HCL): `client.policies()`.
#[derive(Debug, Clone)]
pub struct Policies {
    client: Client,
}

impl Policies {
    pub(crate) fn new(client: Client) -> Policies {
        Policies { client }
    }

    /// Creates or replaces a policy. Returns the server's warnings (likely mistakes).
    pub async fn write(&self, name: &str, hcl: &str) -> Result<Vec<String>> {
        let request = pb::PolicyWriteRequest {
            name: name.into(),
            text: hcl.into(),
        };
        let answer = self
            .client
            .unary(CallKind::Write, &request, |ch, request| async move {
                PoliciesClient::new(ch).write(request).await
            })
            .await?;
        Ok(answer.into_inner().warnings)
    }

    /// A policy's text.
    pub async fn read(&self, name: &str) -> Result<PolicyReadResponse> {
        let request = pb::PolicyReadRequest { name: name.into() };
        let answer = self
            .client
            .unary(CallKind::Read, &request, |ch, request| async move {
                PoliciesClient::new(ch).read(request).await
            })
            .await?;
        Ok(answer.into_inner())
    }

    /// Every policy's name.
    pub async fn list(&self) -> Result<Vec<String>> {
        crate::paging::all_pages(
            |start_after| {
                let request = pb::PolicyListRequest {
                    start_after,
                    limit: 0,
                };
                async move {
                    let r = self
                        .client
                        .unary(CallKind::Read, &request, |ch, request| async move {
                            PoliciesClient::new(ch).list(request).await
                        })
                        .await?
                        .into_inner();
                    Ok((r.names, r.more))
                }
            },
            String::clone,
        )
        .await
    }

    /// Deletes a policy. Returns false when there was none.
    pub async fn delete(&self, name: &str) -> Result<bool> {
        let request = pb::PolicyDeleteRequest { name: name.into() };
        let answer = self
            .client
            .unary(CallKind::Write, &request, |ch, request| async move {
                PoliciesClient::new(ch).delete(request).await
            })
            .await?;
        Ok(answer.into_inner().deleted)
    }
}

/// Identities: `client.identities()`.
#[derive(Debug, Clone)]
pub struct Identities {
    client: Client,
}

impl Identities {
    pub(crate) fn new(client: Client) -> Identities {
        Identities { client }
    }

    /// Registers an identity.
    pub async fn create(&self, request: IdentityCreateRequest) -> Result<IdentityResponse> {
        let answer = self
            .client
            .unary(CallKind::Write, &request, |ch, request| async move {
                IdentitiesClient::new(ch).create(request).await
            })
            .await?;
        Ok(answer.into_inner())
    }

    /// Reads an identity.
    pub async fn read(&self, name: &str) -> Result<IdentityResponse> {
        let request = pb::IdentityReadRequest { name: name.into() };
        let answer = self
            .client
            .unary(CallKind::Read, &request, |ch, request| async move {
                IdentitiesClient::new(ch).read(request).await
            })
            .await?;
        Ok(answer.into_inner())
    }

    /// Every identity's name.
    pub async fn list(&self) -> Result<Vec<String>> {
        crate::paging::all_pages(
            |start_after| {
                let request = pb::IdentityListRequest {
                    start_after,
                    limit: 0,
                };
                async move {
                    let r = self
                        .client
                        .unary(CallKind::Read, &request, |ch, request| async move {
                            IdentitiesClient::new(ch).list(request).await
                        })
                        .await?
                        .into_inner();
                    Ok((r.names, r.more))
                }
            },
            String::clone,
        )
        .await
    }

    /// Replaces an identity's policies (and its session lifetimes when given).
    pub async fn update(&self, request: IdentityUpdateRequest) -> Result<IdentityResponse> {
        let answer = self
            .client
            .unary(CallKind::Write, &request, |ch, request| async move {
                IdentitiesClient::new(ch).update(request).await
            })
            .await?;
        Ok(answer.into_inner())
    }

    /// Deletes an identity. Returns false when there was none.
    pub async fn delete(&self, name: &str) -> Result<bool> {
        let request = pb::IdentityDeleteRequest { name: name.into() };
        let answer = self
            .client
            .unary(CallKind::Write, &request, |ch, request| async move {
                IdentitiesClient::new(ch).delete(request).await
            })
            .await?;
        Ok(answer.into_inner().deleted)
    }
}
