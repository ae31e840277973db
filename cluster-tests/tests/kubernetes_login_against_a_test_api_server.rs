//! Kubernetes service-account login end to end, against the test API server
//! (`coffer_cluster_tests::kube_api`: no kube-apiserver can run here; it speaks the real
//! TokenReview and OIDC discovery / JWKS protocols and signs real ES256 tokens).
//!
//! With TokenReview on a 3-node cluster: a pod's token for a role logs in through any node and
//! its session holds the role's policies; a token for another audience, of an unbound namespace
//! or service account, expired, signed by an unknown key, malformed, of a deleted service
//! account, or confirmed with an empty audience list is refused with the check that failed; a
//! rotated reviewer token is picked up from its file; an API server that does not answer makes
//! Kubernetes logins UNAVAILABLE within the bounded time while key logins keep working;
//! deleting the role ends its sessions. With local validation (JWKS) on one node: the same
//! token logs in, an expired or foreign one does not, and a deleted service account's token is
//! still accepted until it expires (what local validation cannot see).

use std::time::{Duration, Instant};

use coffer_api::v1 as pb;
use coffer_api::v1::kubernetes_roles_client::KubernetesRolesClient;
use coffer_api::v1::policies_client::PoliciesClient;
use coffer_cluster_tests::kube_api::KubeApi;
use coffer_cluster_tests::{Cluster, ClusterOptions};
use coffer_node::client::{SessionCredentials, Target};
use tonic::Code;

const AUDIENCE: &str = "coffer";

fn bare(cluster: &Cluster, id: u64) -> Target {
    cluster.target_without_session(id)
}

async fn login(
    cluster: &Cluster,
    id: u64,
    role: &str,
    token: &str,
) -> Result<SessionCredentials, tonic::Status> {
    coffer_node::auth::kubernetes_login(&bare(cluster, id), role, token, 0)
        .await
        .map_err(|e| {
            // The CLI's error keeps the gRPC code in its text: "... (Unauthenticated)".
            let text = format!("{e:#}");
            let code = [
                ("(Unauthenticated)", Code::Unauthenticated),
                ("(PermissionDenied)", Code::PermissionDenied),
                ("(Unavailable)", Code::Unavailable),
                ("(InvalidArgument)", Code::InvalidArgument),
            ]
            .into_iter()
            .find(|(tag, _)| text.contains(tag))
            .map_or(Code::Unknown, |(_, c)| c);
            tonic::Status::new(code, text)
        })
}

/// Tokens both validators refuse: expired, for another audience, signed by an unknown key
/// (`unknown_key` is what the validator says about that one).
async fn refuses_bad_tokens(cluster: &Cluster, api: &KubeApi, via: u64, unknown_key: &str) {
    refused(
        login(
            cluster,
            via,
            "cart",
            &api.token("shop", "cart", ("p", "u"), &[AUDIENCE], -120),
        )
        .await,
        Code::Unauthenticated,
        "expired",
    );
    refused(
        login(
            cluster,
            via,
            "cart",
            &api.token_from_unknown_key("shop", "cart", &[AUDIENCE]),
        )
        .await,
        Code::Unauthenticated,
        unknown_key,
    );
    refused(
        login(
            cluster,
            via,
            "cart",
            &api.token("shop", "cart", ("p", "u"), &["vault"], 600),
        )
        .await,
        Code::Unauthenticated,
        "audience",
    );
}

fn refused(r: Result<SessionCredentials, tonic::Status>, code: Code, says: &str) {
    let e = r.expect_err("refused");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(e.message().contains(says), "{e:?} should say {says:?}");
}

async fn setup_role(cluster: &Cluster) {
    PoliciesClient::new(cluster.channel(1))
        .write(pb::PolicyWriteRequest {
            name: "cart".into(),
            text: r#"path "secret/data/cart/*" { capabilities = ["read"] }"#.into(),
        })
        .await
        .expect("policy");
    let role = KubernetesRolesClient::new(cluster.channel(1))
        .write(pb::KubernetesRole {
            name: "cart".into(),
            bound_service_accounts: vec!["cart".into()],
            bound_namespaces: vec!["shop".into()],
            audience: AUDIENCE.into(),
            policies: vec!["cart".into()],
            ..Default::default()
        })
        .await
        .expect("role write")
        .into_inner();
    assert!(role.warnings.is_empty(), "{role:?}");
}

async fn read_as(
    cluster: &Cluster,
    id: u64,
    session: &SessionCredentials,
    key: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let mut t = bare(cluster, id);
    t.session = Some(session.clone());
    let mut kv = coffer_api::v1::kv_client::KvClient::new(
        t.channel_to(&cluster.nodes[&id].api.to_string())
            .expect("channel"),
    );
    kv.get(pb::GetRequest {
        key: key.into(),
        consistency: 0,
    })
    .await
    .map(|r| r.into_inner().kv.map(|kv| kv.value).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_login_with_token_review() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = KubeApi::start(dir.path()).await;
    let options = ClusterOptions {
        extra_args: [
            api.token_review_args(),
            vec!["--kubernetes-timeout-ms".into(), "1000".into()],
        ]
        .concat(),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(3, options).await;
    cluster.must_put(1, "cart/db", "s3cret").await;
    cluster.must_put(1, "other/x", "1").await;
    setup_role(&cluster).await;

    // A pod's token logs in through node 3; the session holds the role's policy on every node.
    let token = api.token("shop", "cart", ("cart-0", "pod-uid-1"), &[AUDIENCE], 600);
    let started = Instant::now();
    let session = login(&cluster, 3, "cart", &token).await.expect("login");
    let first_login = started.elapsed();
    assert_eq!(session.login.identity, "k8s:shop/cart");
    for id in 1..=3 {
        assert_eq!(
            read_as(&cluster, id, &session, "cart/db")
                .await
                .expect("read"),
            b"s3cret"
        );
        let denied = read_as(&cluster, id, &session, "other/x")
            .await
            .expect_err("not the role's");
        assert_eq!(denied.code(), Code::PermissionDenied);
    }
    assert!(api.reviews() >= 1);
    assert!(first_login < Duration::from_secs(5), "{first_login:?}");

    // Each bad token is refused with the check that failed.
    refuses_bad_tokens(&cluster, &api, 2, "Kubernetes refused the token").await;
    refused(
        login(
            &cluster,
            1,
            "cart",
            &api.token("dev", "cart", ("p", "u"), &[AUDIENCE], 600),
        )
        .await,
        Code::PermissionDenied,
        "namespace \"dev\" is not bound",
    );
    refused(
        login(
            &cluster,
            2,
            "cart",
            &api.token("shop", "web", ("p", "u"), &[AUDIENCE], 600),
        )
        .await,
        Code::PermissionDenied,
        "service account \"web\" is not bound",
    );
    refused(
        login(&cluster, 1, "cart", "not.a-jwt").await,
        Code::Unauthenticated,
        "Kubernetes refused the token",
    );
    refused(
        login(&cluster, 1, "no-such-role", &token).await,
        Code::Unauthenticated,
        "no Kubernetes role",
    );
    api.set_empty_audiences(true);
    refused(
        login(
            &cluster,
            1,
            "cart",
            &api.token("shop", "cart", ("p", "u"), &[AUDIENCE], 600),
        )
        .await,
        Code::Unauthenticated,
        "did not confirm the audience",
    );
    api.set_empty_audiences(false);

    // The reviewer's token rotates on disk: the nodes re-read it.
    api.rotate_reviewer_token("reviewer-2");
    login(
        &cluster,
        2,
        "cart",
        &api.token("shop", "cart", ("p", "u"), &[AUDIENCE], 600),
    )
    .await
    .expect("login with the rotated reviewer token");

    // A deleted service account: TokenReview sees it at once.
    api.delete_service_account("shop", "gone");
    let role = KubernetesRolesClient::new(cluster.channel(1))
        .write(pb::KubernetesRole {
            name: "cart".into(),
            bound_service_accounts: vec!["cart".into(), "gone".into()],
            bound_namespaces: vec!["shop".into()],
            audience: AUDIENCE.into(),
            policies: vec!["cart".into()],
            ..Default::default()
        })
        .await;
    role.expect("role update");
    refused(
        login(
            &cluster,
            3,
            "cart",
            &api.token("shop", "gone", ("p", "u"), &[AUDIENCE], 600),
        )
        .await,
        Code::Unauthenticated,
        "has been deleted",
    );

    // The API server stops answering: Kubernetes logins fail with UNAVAILABLE within the
    // bounded time; logins with keys keep working.
    api.set_silent(true);
    let started = Instant::now();
    refused(
        login(
            &cluster,
            1,
            "cart",
            &api.token("shop", "cart", ("p", "u"), &[AUDIENCE], 600),
        )
        .await,
        Code::Unavailable,
        "did not answer",
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    bare(&cluster, 1)
        .login(&cluster.admin_key(), 0)
        .await
        .expect("key login while the API server is down");
    api.set_silent(false);

    // Deleting the role ends its sessions.
    KubernetesRolesClient::new(cluster.channel(3))
        .delete(pb::KubernetesRoleName {
            name: "cart".into(),
        })
        .await
        .expect("role delete");
    let ended = read_as(&cluster, 2, &session, "cart/db")
        .await
        .expect_err("role deleted");
    assert_eq!(ended.code(), Code::Unauthenticated);
    assert!(ended.message().contains("was deleted"), "{ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_login_with_the_issuers_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = KubeApi::start(dir.path()).await;
    let options = ClusterOptions {
        extra_args: vec![
            "--kubernetes-issuer".into(),
            api.url.clone(),
            "--kubernetes-ca-cert".into(),
            api.ca_file.display().to_string(),
        ],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(1, options).await;
    cluster.must_put(1, "cart/db", "s3cret").await;
    setup_role(&cluster).await;
    let session = login(
        &cluster,
        1,
        "cart",
        &api.token("shop", "cart", ("cart-0", "u"), &[AUDIENCE], 600),
    )
    .await
    .expect("login");
    assert_eq!(
        read_as(&cluster, 1, &session, "cart/db")
            .await
            .expect("read"),
        b"s3cret"
    );
    assert_eq!(api.reviews(), 0, "no TokenReview in local validation");
    refuses_bad_tokens(&cluster, &api, 1, "signature does not verify").await;
    // What local validation cannot see: a deleted service account's token still works until it
    // expires (TokenReview refuses it; see the other test).
    api.delete_service_account("shop", "cart");
    login(
        &cluster,
        1,
        "cart",
        &api.token("shop", "cart", ("p", "u"), &[AUDIENCE], 600),
    )
    .await
    .expect("accepted: local validation cannot see the deletion");
}
