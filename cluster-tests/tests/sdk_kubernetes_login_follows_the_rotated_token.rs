//! The SDK's Kubernetes login against the test API server (TokenReview; no kube-apiserver runs
//! here): a service logs in with its projected token file and keeps short sessions renewed;
//! when the kubelet rotates the token (a new token in the same file) and the old one stops
//! being valid, the renewals use the new token and no read fails.

use std::time::{Duration, Instant};

use coffer_api::v1 as pb;
use coffer_api::v1::kubernetes_roles_client::KubernetesRolesClient;
use coffer_client::{Client, Config, Login};
use coffer_cluster_tests::kube_api::KubeApi;
use coffer_cluster_tests::{Cluster, ClusterOptions};

const AUDIENCE: &str = "coffer";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_read_the_rotated_token_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = KubeApi::start(dir.path()).await;
    let cluster = Cluster::start(
        3,
        ClusterOptions {
            extra_args: api.token_review_args(),
            ..ClusterOptions::default()
        },
    )
    .await;
    // The administrator stores the secret and lets the pods of two service accounts read it
    // (the rotation below moves the pod from one to the other, so the old token can be made
    // invalid while the role still admits the new one).
    let admin_key = coffer_node::keys::KeyPair::load(&cluster.admin_key()).expect("admin key");
    let admin = cluster.sdk(&cluster.running(), Login::Key(admin_key)).await;
    admin
        .kv("secret")
        .put("cart/db", [("pass", "s3cret")])
        .await
        .expect("put");
    admin
        .policies()
        .write(
            "cart",
            r#"path "secret/data/cart/*" { capabilities = ["read"] }"#,
        )
        .await
        .expect("policy");
    KubernetesRolesClient::new(cluster.channel(1))
        .write(pb::KubernetesRole {
            name: "cart".into(),
            bound_service_accounts: vec!["cart".into(), "cart-v2".into()],
            bound_namespaces: vec!["shop".into()],
            audience: AUDIENCE.into(),
            policies: vec!["cart".into()],
            ..Default::default()
        })
        .await
        .expect("role write");

    let token_file = dir.path().join("token");
    std::fs::write(
        &token_file,
        api.token("shop", "cart", ("cart-0", "uid-1"), &[AUDIENCE], 600),
    )
    .expect("token file");
    let mut config = Config::new(
        cluster.endpoints(&cluster.running()),
        cluster.ca_pem().to_vec(),
        Login::Kubernetes {
            role: "cart".into(),
            token_file: token_file.clone(),
        },
    );
    config.session_ttl = Duration::from_secs(4);
    let client = Client::connect(config).await.expect("Kubernetes login");
    let kv = client.kv("secret");
    assert_eq!(
        kv.get("cart/db").await.expect("read").data.get("pass"),
        Some("s3cret")
    );
    let first = client.session().login.session_id;

    // The token is rotated, and the old service account's tokens stop being valid.
    std::fs::write(
        &token_file,
        api.token("shop", "cart-v2", ("cart-0", "uid-1"), &[AUDIENCE], 600),
    )
    .expect("rotate the token");
    api.delete_service_account("shop", "cart");
    let reviews_before = api.reviews();

    let mut sessions = std::collections::BTreeSet::from([first]);
    let mut failed = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(14) {
        match kv.get("cart/db").await {
            Ok(s) => assert_eq!(s.data.get("pass"), Some("s3cret")),
            Err(e) => failed.push(format!("{:?}: {e}", started.elapsed())),
        }
        sessions.insert(client.session().login.session_id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        failed.is_empty(),
        "reads failed after the rotation: {failed:#?}"
    );
    assert!(
        sessions.len() >= 4,
        "the 4 s session was renewed (with the new token) several times: {sessions:?}"
    );
    assert!(
        api.reviews() > reviews_before,
        "the renewals were reviewed by the API server"
    );
    // The old token itself no longer logs in: the renewals could only have used the new one.
    let old = api.token("shop", "cart", ("cart-0", "uid-1"), &[AUDIENCE], 600);
    let refused =
        coffer_node::auth::kubernetes_login(&cluster.target_without_session(1), "cart", &old, 0)
            .await
            .expect_err("a deleted service account's token is refused");
    assert!(
        format!("{refused:#}").contains("Unauthenticated"),
        "{refused:#}"
    );
}
