//! Node identity: on the peer port a node is accepted only with a node certificate of the
//! cluster's node CA (for a member or a node that joined), or, while the cluster forms, with a
//! bootstrap-CA certificate of an initial member that has no node certificate yet. A new node
//! joins only by proving the node key an administrator registered for its id, or (a pod) with
//! a service-account token the Kubernetes role reserved for members admits.

use std::time::Duration;

use coffer_api::v1 as pb;
use coffer_cluster_tests::{Cluster, ClusterOptions, wait_until};

/// How often node `id` logged a refusal of a peer's certificate for `reason`: a refused TLS
/// handshake tells the client nothing, the node's log says why.
fn refusals(cluster: &Cluster, id: u64, reason: &str) -> usize {
    std::fs::read_to_string(&cluster.node(id).log)
        .expect("node log")
        .lines()
        .filter(|l| l.contains("refused a peer's certificate") && l.contains(reason))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_ca_opens_nothing_once_members_hold_node_certificates() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    cluster.must_wait_leader(Duration::from_secs(10)).await;

    // Every member presents a node certificate of the node CA, which a peer accepts.
    for id in [1, 2, 3] {
        let (cert, key) = cluster.node_certificate(id);
        let peer = if id == 1 { 2 } else { 1 };
        wait_until(
            Duration::from_secs(10),
            "a member's node certificate to be accepted",
            || async { cluster.peer_probe(peer, &cert, &key).await.ok() },
        )
        .await;
    }

    // The operator's bootstrap certificate of an initial member stopped counting once that
    // member recorded its node certificate.
    const BOOTSTRAP: &str = "a bootstrap certificate, which counts only for an initial member";
    let before = refusals(&cluster, 1, BOOTSTRAP);
    let (cert, key) = cluster.bootstrap_certificate(2);
    wait_until(
        Duration::from_secs(10),
        "node 1 to refuse node 2's bootstrap certificate",
        || async { cluster.peer_probe(1, &cert, &key).await.err() },
    )
    .await;
    let after = refusals(&cluster, 1, BOOTSTRAP);
    assert!(after > before, "node 1 names the check");

    // A bootstrap certificate for a node that is no initial member never counted.
    let (cert, key) = cluster.issue_bootstrap_certificate(9);
    cluster
        .peer_probe(1, &cert, &key)
        .await
        .expect_err("a stranger's bootstrap certificate");
    assert!(refusals(&cluster, 1, BOOTSTRAP) > after);

    // A node certificate of another cluster's node CA does not chain to this one.
    let keyring = coffer_node::barrier::Keyring::new().expect("keyring");
    let other = coffer_node::node_identity::NodeCa::from_keyring(&keyring).expect("CA");
    let key = coffer_node::keys::KeyPair::generate().expect("key");
    let cert = other
        .issue(
            2,
            &key.public().signing_key(),
            "127.0.0.12",
            coffer_node::auth::now_ms(),
        )
        .expect("issue");
    const UNTRUSTED: &str = "the peer certificate is not trusted: not from the node CA";
    let before = refusals(&cluster, 1, UNTRUSTED);
    cluster
        .peer_probe(1, &cert, &key.signing_key_pkcs8_pem())
        .await
        .expect_err("another cluster's node certificate");
    assert!(refusals(&cluster, 1, UNTRUSTED) > before);

    // A member's own certificate, presented by whoever holds its key, is that member: its
    // key file is what protects it (mode 0600, like the data). It can ask for the master key
    // (peer unseal is on in this cluster) as itself, never as another member.
    let (cert, key) = cluster.node_certificate(3);
    let once = coffer_node::keys::KeyPair::generate().expect("key");
    let ask = |requester: u64| {
        let request =
            coffer_node::seal::peer_unseal_request(requester, &once.public().to_bytes(), u64::MAX)
                .expect("request");
        move |mut c: coffer_raft::pb::peer_client::PeerClient<tonic::transport::Channel>| async move {
            c.app(coffer_raft::pb::Payload {
                data: request,
                ..Default::default()
            })
            .await
        }
    };
    let why = cluster
        .peer_call(1, &cert, &key, ask(2))
        .await
        .expect_err("node 3 asking as node 2");
    assert!(why.contains("not node 2's"), "{why}");
    // As itself it passes the identity check (and then meets the seal-revision check, as the
    // request claims a seal action nobody applied).
    let why = cluster
        .peer_call(1, &cert, &key, ask(3))
        .await
        .expect_err("a seal revision from the future");
    assert!(
        why.contains("has not applied the latest seal action"),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_only_with_its_registered_node_key() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;

    // Node 4 starts with a key nobody registered: it keeps asking and is not admitted.
    let key = cluster.prepare_joining_node(4, 1);
    cluster.spawn(4);
    let log = wait_until(Duration::from_secs(20), "node 4 to be refused", || async {
        let log = std::fs::read_to_string(&cluster.node(4).log).ok()?;
        log.contains("no node key is registered for node 4")
            .then_some(log)
    })
    .await;
    assert!(log.contains("coffer cluster register-node"), "{log}");
    let status = cluster.status(leader).await.expect("status");
    assert!(status.members.iter().all(|m| m.id != 4));

    // The administrator registers it: the running node is admitted on its next try, and a
    // member unseals it (peer unseal).
    let public_key = coffer_node::keys::KeyPair::load(&key)
        .expect("key")
        .public()
        .to_bytes()
        .to_vec();
    cluster
        .admin(2)
        .register_node(pb::RegisterNodeRequest { id: 4, public_key })
        .await
        .expect("register");
    cluster.must_wait_joined(4, leader).await;

    // A join for node 5 signed with a key that is not node 5's registered key is refused, as
    // is a signature over another challenge, and a good request replayed to another node.
    let registered = coffer_node::keys::KeyPair::generate().expect("key");
    cluster
        .admin(1)
        .register_node(pb::RegisterNodeRequest {
            id: 5,
            public_key: registered.public().to_bytes().to_vec(),
        })
        .await
        .expect("register node 5");
    let intruder = coffer_node::keys::KeyPair::generate().expect("key");
    let request = |key: &coffer_node::keys::KeyPair, cluster_id: &str, challenge: Vec<u8>| {
        let (api, peer) = ("127.0.0.15:1".to_string(), "127.0.0.15:2".to_string());
        pb::JoinRequest {
            node_id: 5,
            signature: key
                .sign(&coffer_node::node_identity::join_message(
                    cluster_id, &challenge, 5, &api, &peer, "",
                ))
                .to_vec(),
            public_key: key.public().to_bytes().to_vec(),
            api_addr: api,
            peer_addr: peer,
            challenge,
            kubernetes_token: String::new(),
        }
    };
    let challenge = || async {
        pb::auth_client::AuthClient::new(cluster.channel(1))
            .challenge(pb::ChallengeRequest::default())
            .await
            .expect("challenge")
            .into_inner()
    };
    let join = |id: u64, r: pb::JoinRequest| {
        let mut client = pb::cluster_client::ClusterClient::new(cluster.channel(id));
        async move {
            let mut answers = client.join(r).await?.into_inner();
            answers
                .message()
                .await?
                .ok_or_else(|| tonic::Status::internal("no answer"))
        }
    };

    let c = challenge().await;
    let refused = join(1, request(&intruder, &c.cluster_id, c.challenge))
        .await
        .expect_err("an unregistered key");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("not the one registered"),
        "{refused:?}"
    );

    let (c1, c2) = (challenge().await, challenge().await);
    let mut crossed = request(&registered, &c1.cluster_id, c1.challenge);
    crossed.challenge = c2.challenge;
    let refused = join(2, crossed)
        .await
        .expect_err("a signature over another nonce");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(refused.message().contains("join signature"), "{refused:?}");

    let c = challenge().await;
    let good = request(&registered, &c.cluster_id, c.challenge);
    let first = join(1, good.clone()).await.expect("a proven join");
    assert!(first.certificate.contains("BEGIN CERTIFICATE"));
    let refused = join(3, good)
        .await
        .expect_err("the same join replayed to node 3");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("already used"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_joins_with_the_kubernetes_role_reserved_for_members() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = coffer_cluster_tests::kube_api::KubeApi::start(dir.path()).await;
    let options = ClusterOptions {
        extra_args: api.token_review_args(),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(3, options).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    let role = coffer_node::node_identity::KUBERNETES_MEMBER_ROLE;
    cluster.must_write_member_role("vault-ns").await;

    // A pod of another service account is refused, whatever node key it brings.
    let stranger = dir.path().join("stranger.token");
    std::fs::write(
        &stranger,
        api.token(
            "vault-ns",
            "web",
            ("web-0", "uid-w"),
            &["coffer-cluster"],
            600,
        ),
    )
    .expect("token");
    cluster.prepare_joining_node(5, 1);
    cluster
        .node_mut(5)
        .extra_args
        .extend(["--join-token-file".into(), stranger.display().to_string()]);
    cluster.spawn(5);
    wait_until(Duration::from_secs(20), "node 5 to be refused", || async {
        let log = std::fs::read_to_string(&cluster.node(5).log).ok()?;
        log.contains("not bound").then_some(())
    })
    .await;

    // The cluster's own service account joins with a node key nobody registered.
    let member = dir.path().join("member.token");
    std::fs::write(
        &member,
        api.token(
            "vault-ns",
            "coffer",
            ("coffer-3", "uid-4"),
            &["coffer-cluster"],
            600,
        ),
    )
    .expect("token");
    cluster.prepare_joining_node(4, 2);
    cluster
        .node_mut(4)
        .extra_args
        .extend(["--join-token-file".into(), member.display().to_string()]);
    cluster.spawn(4);
    cluster.must_wait_joined(4, leader).await;
    let status = cluster.status(leader).await.expect("status");
    assert!(
        status.members.iter().all(|m| m.id != 5),
        "node 5 stayed out"
    );

    // No session logs in with the member role.
    let refused = coffer_node::auth::kubernetes_login(
        &cluster.target_without_session(1),
        role,
        &std::fs::read_to_string(&member).expect("token"),
        0,
    )
    .await
    .expect_err("a session with the member role");
    assert!(format!("{refused:#}").contains("reserved"), "{refused:#}");
}
