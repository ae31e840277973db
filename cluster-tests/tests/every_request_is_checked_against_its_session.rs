//! Session certificates and per-request authorization on a three-node cluster: a request
//! without a session certificate, with a certificate of another cluster, of an ended, revoked
//! or deleted identity's session is UNAUTHENTICATED, naming the failed check; one its policies
//! do not allow is PERMISSION_DENIED. A policy change applies to the next linearizable request
//! on every node; a revocation made through node 1 reaches node 3's local checks within its
//! replication lag.

use std::time::{Duration, Instant};

use coffer_api::v1 as pb;
use coffer_api::v1::identities_client::IdentitiesClient;
use coffer_api::v1::kv_client::KvClient;
use coffer_api::v1::policies_client::PoliciesClient;
use coffer_api::v1::sessions_client::SessionsClient;
use coffer_cluster_tests::{Cluster, ClusterOptions, wait_until};
use coffer_node::client::{SessionCredentials, Target};
use coffer_node::keys::KeyPair;
use tonic::Code;
use tonic::transport::Channel;

const READ_APP: &str = r#"path "secret/data/app/*" { capabilities = ["read"] }"#;
const DENY_APP: &str = r#"path "secret/data/app/*" { capabilities = ["deny"] }"#;

/// A target for one node without a session.
fn bare(cluster: &Cluster, id: u64) -> Target {
    cluster.target_without_session(id)
}

fn kv_as(cluster: &Cluster, id: u64, session: &SessionCredentials) -> KvClient<Channel> {
    KvClient::new(kv_channel(cluster, id, session))
}

/// Registers the identity `app` with `key` and the policy `app-read`.
async fn create_app(cluster: &Cluster, key: &KeyPair) {
    IdentitiesClient::new(cluster.channel(2))
        .create(pb::IdentityCreateRequest {
            name: "app".into(),
            public_key: key.public().to_bytes().to_vec(),
            policies: vec!["app-read".into()],
            ..Default::default()
        })
        .await
        .expect("identity create");
}

async fn get(kv: &mut KvClient<Channel>, key: &str, stale: bool) -> Result<Vec<u8>, tonic::Status> {
    let consistency = if stale {
        pb::Consistency::Stale
    } else {
        pb::Consistency::Linearizable
    };
    kv.get(pb::GetRequest {
        key: key.into(),
        consistency: consistency as i32,
    })
    .await
    .map(|r| r.into_inner().kv.map(|kv| kv.value).unwrap_or_default())
}

async fn write_policy(cluster: &Cluster, text: &str) {
    PoliciesClient::new(cluster.channel(1))
        .write(pb::PolicyWriteRequest {
            name: "app-read".into(),
            text: text.into(),
        })
        .await
        .expect("policy write");
}

fn assert_refused(r: Result<Vec<u8>, tonic::Status>, code: Code, says: &str) {
    let e = r.expect_err("refused");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(e.message().contains(says), "{e:?} should say {says:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_checked_against_its_session() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    cluster.must_put(1, "app/db", "s3cret").await;
    cluster.must_put(1, "other/x", "1").await;
    write_policy(&cluster, READ_APP).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let app_key = KeyPair::generate().expect("key");
    let (app_key_file, _) = app_key.save(&dir.path().join("app"), "app").expect("save");
    create_app(&cluster, &app_key).await;

    // Logged in through node 2; the session works on every node, for what its policy allows.
    let mut app = bare(&cluster, 2);
    let session = app.login(&app_key_file, 0).await.expect("login").clone();
    assert_eq!(session.login.identity, "app");
    for id in 1..=3 {
        let mut kv = kv_as(&cluster, id, &session);
        assert_eq!(
            get(&mut kv, "app/db", false).await.expect("read"),
            b"s3cret"
        );
        assert_refused(
            get(&mut kv, "other/x", false).await,
            Code::PermissionDenied,
            "may not read \"secret/data/other/x\"",
        );
    }
    let denied = kv_as(&cluster, 3, &session)
        .put(pb::PutRequest {
            key: "app/db".into(),
            value: b"mine".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("no update capability");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = PoliciesClient::new(kv_channel(&cluster, 1, &session))
        .list(pb::PolicyListRequest::default())
        .await
        .expect_err("not an administrator");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // No certificate, and a certificate of another cluster's session CA.
    let mut anonymous = bare(&cluster, 1).kv().await.expect("kv");
    assert_refused(
        get(&mut anonymous, "app/db", false).await,
        Code::Unauthenticated,
        "no session certificate",
    );
    let foreign_ca = coffer_node::session::SessionCa::from_keyring(
        &coffer_node::barrier::Keyring::new().expect("keyring"),
    )
    .expect("ca");
    let stranger = KeyPair::generate().expect("key");
    let now = coffer_node::auth::now_ms();
    let foreign = SessionCredentials {
        certificate: foreign_ca
            .issue(&stranger.public().signing_key(), "app", now, now + 600_000)
            .expect("cert"),
        key: stranger.signing_key_pkcs8_pem(),
        login: session.login.clone(),
    };
    assert_refused(
        get(&mut kv_as(&cluster, 1, &foreign), "app/db", false).await,
        Code::Unauthenticated,
        "session CA",
    );

    // A policy change through node 1 applies to the next linearizable request on every node.
    write_policy(&cluster, DENY_APP).await;
    for id in 1..=3 {
        assert_refused(
            get(&mut kv_as(&cluster, id, &session), "app/db", false).await,
            Code::PermissionDenied,
            "may not read",
        );
    }
    write_policy(&cluster, READ_APP).await;

    // Revoked through node 1: node 3's local (stale) check refuses it once it applied that.
    let mut on_3 = kv_as(&cluster, 3, &session);
    get(&mut on_3, "app/db", true).await.expect("stale read");
    let revoked_at = Instant::now();
    let r = SessionsClient::new(cluster.channel(1))
        .revoke(pb::SessionRevokeRequest {
            session_id: session.login.session_id.clone(),
        })
        .await
        .expect("revoke")
        .into_inner();
    assert!(r.revoked);
    wait_until(
        Duration::from_secs(5),
        "node 3 to refuse the revoked session",
        || {
            let mut on_3 = on_3.clone();
            async move {
                match get(&mut on_3, "app/db", true).await {
                    Err(e) if e.code() == Code::Unauthenticated => Some(e),
                    _ => None,
                }
            }
        },
    )
    .await;
    let delay = revoked_at.elapsed();
    assert!(delay < Duration::from_secs(5), "{delay:?}");
    assert_refused(
        get(&mut on_3, "app/db", false).await,
        Code::Unauthenticated,
        "was revoked or has ended",
    );

    // A session ends itself (log out) without any policy.
    let mut again = bare(&cluster, 1);
    let second = again.login(&app_key_file, 0).await.expect("login").clone();
    let listed = SessionsClient::new(cluster.channel(2))
        .list(pb::SessionListRequest {
            identity: "app".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        listed
            .sessions
            .iter()
            .map(|s| s.session_id.as_str())
            .collect::<Vec<_>>(),
        vec![second.login.session_id.as_str()],
        "the revoked session is gone, the new one listed"
    );
    let r = SessionsClient::new(kv_channel(&cluster, 2, &second))
        .revoke(pb::SessionRevokeRequest::default())
        .await
        .expect("log out")
        .into_inner();
    assert!(r.revoked);
    assert_refused(
        get(&mut kv_as(&cluster, 2, &second), "app/db", false).await,
        Code::Unauthenticated,
        "was revoked or has ended",
    );

    // Deleting the identity ends its sessions.
    let third = bare(&cluster, 3)
        .login(&app_key_file, 0)
        .await
        .expect("login")
        .clone();
    get(&mut kv_as(&cluster, 3, &third), "app/db", false)
        .await
        .expect("read");
    IdentitiesClient::new(cluster.channel(1))
        .delete(pb::IdentityDeleteRequest { name: "app".into() })
        .await
        .expect("delete");
    assert_refused(
        get(&mut kv_as(&cluster, 3, &third), "app/db", false).await,
        Code::Unauthenticated,
        "was deleted",
    );

    // A session ends at its time: a 1-second session is refused once it passed.
    create_app(&cluster, &app_key).await;
    let short = bare(&cluster, 1)
        .login(&app_key_file, 1)
        .await
        .expect("login")
        .clone();
    let ended = wait_until(Duration::from_secs(5), "the 1 s session to end", || {
        let short = short.clone();
        let cluster = &cluster;
        async move {
            match get(&mut kv_as(cluster, 1, &short), "app/db", false).await {
                Err(e) if e.code() == Code::Unauthenticated => Some(e),
                _ => None,
            }
        }
    })
    .await;
    assert!(
        ended.message().contains("ended") || ended.message().contains("expired"),
        "{ended:?}"
    );
}

/// A channel to node `id` presenting `session`.
fn kv_channel(cluster: &Cluster, id: u64, session: &SessionCredentials) -> Channel {
    let mut t = bare(cluster, id);
    t.session = Some(session.clone());
    t.channel_to(&cluster.nodes[&id].api.to_string())
        .expect("channel")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_removes_used_challenges_and_ended_sessions() {
    let options = ClusterOptions {
        extra_args: [
            "--login-challenge-ttl-ms",
            "1000",
            "--login-cleanup-interval-ms",
            "100",
            "--login-cleanup-grace-ms",
            "0",
        ]
        .map(String::from)
        .to_vec(),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(3, options).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = KeyPair::generate().expect("key");
    let (key_file, _) = key.save(&dir.path().join("app"), "app").expect("save");
    write_policy(&cluster, READ_APP).await;
    create_app(&cluster, &key).await;
    let mut short = bare(&cluster, 3);
    short.login(&key_file, 1).await.expect("login");
    let lasting = bare(&cluster, 1)
        .login(&key_file, 0)
        .await
        .expect("login")
        .clone();

    // The fixture's administrator login and these two: three nonces (1 s challenges) and the
    // 1 s session are removed by the leader; the lasting sessions stay.
    let removed = |text: &str, kind: &str| {
        coffer_cluster_tests::metric(
            text,
            &format!("coffer_login_state_removed_total{{kind=\"{kind}\""),
        )
        .unwrap_or(0.0)
    };
    wait_until(
        Duration::from_secs(20),
        "the leader to remove 3 nonces and 1 session",
        || async {
            let (mut nonces, mut sessions) = (0.0, 0.0);
            for id in 1..=3 {
                let text = cluster.metrics_text(id).await?;
                nonces += removed(&text, "nonce");
                sessions += removed(&text, "session");
            }
            (nonces >= 3.0 && sessions >= 1.0).then_some(())
        },
    )
    .await;
    let listed = SessionsClient::new(cluster.channel(2))
        .list(pb::SessionListRequest::default())
        .await
        .expect("list")
        .into_inner();
    let mut who: Vec<&str> = listed
        .sessions
        .iter()
        .map(|s| s.identity.as_str())
        .collect();
    who.sort();
    assert_eq!(who, ["admin", "app"], "{listed:?}");
    let missing = get(&mut kv_as(&cluster, 2, &lasting), "app/x", false)
        .await
        .expect_err("no such key");
    assert_eq!(
        missing.code(),
        Code::NotFound,
        "the lasting session still works: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lifetimes_follow_the_identity_within_the_clusters_settings() {
    use coffer_api::v1::settings_client::SettingsClient;
    let cluster = Cluster::start(1, ClusterOptions::default()).await;
    let mut settings = SettingsClient::new(cluster.channel(1));
    let bad = settings
        .write(pb::SettingsWriteRequest {
            default_session_ttl_seconds: 2000,
            max_session_ttl_seconds: 1000,
        })
        .await
        .expect_err("default above the maximum");
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    settings
        .write(pb::SettingsWriteRequest {
            default_session_ttl_seconds: 600,
            max_session_ttl_seconds: 1200,
        })
        .await
        .expect("settings write");
    let read = settings
        .read(pb::SettingsReadRequest {})
        .await
        .expect("settings read")
        .into_inner();
    assert_eq!(
        (
            read.default_session_ttl_seconds,
            read.max_session_ttl_seconds
        ),
        (600, 1200)
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let key = KeyPair::generate().expect("key");
    let (key_file, _) = key.save(&dir.path().join("app"), "app").expect("save");
    write_policy(&cluster, READ_APP).await;
    IdentitiesClient::new(cluster.channel(1))
        .create(pb::IdentityCreateRequest {
            name: "app".into(),
            public_key: key.public().to_bytes().to_vec(),
            policies: vec!["app-read".into()],
            default_session_ttl_seconds: None,
            max_session_ttl_seconds: Some(300),
        })
        .await
        .expect("identity create");
    let lasts = |login: &pb::LoginResponse| {
        login
            .expires_at_ms
            .saturating_sub(coffer_node::auth::now_ms())
            .div_ceil(1000)
    };
    // The cluster's default (600 s) is capped by the identity's own maximum (300 s).
    let s = bare(&cluster, 1)
        .login(&key_file, 0)
        .await
        .expect("login")
        .clone();
    assert!((295..=300).contains(&lasts(&s.login)), "{:?}", s.login);
    let refused = bare(&cluster, 1)
        .login(&key_file, 301)
        .await
        .expect_err("longer than the identity's maximum");
    assert!(
        format!("{refused:#}").contains("at most 300 s"),
        "{refused:#}"
    );
    // Back to the cluster's limits.
    IdentitiesClient::new(cluster.channel(1))
        .update(pb::IdentityUpdateRequest {
            name: "app".into(),
            policies: vec!["app-read".into()],
            max_session_ttl_seconds: Some(0),
            ..Default::default()
        })
        .await
        .expect("identity update");
    let s = bare(&cluster, 1)
        .login(&key_file, 0)
        .await
        .expect("login")
        .clone();
    assert!((595..=600).contains(&lasts(&s.login)), "{:?}", s.login);
    let refused = bare(&cluster, 1)
        .login(&key_file, 1201)
        .await
        .expect_err("longer than the cluster's maximum");
    assert!(
        format!("{refused:#}").contains("at most 1200 s"),
        "{refused:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegated_grant_works_until_it_ends_or_is_revoked() {
    use coffer_api::v1::grants_client::GrantsClient;
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    cluster.must_put(1, "team/db", "s3cret").await;
    cluster.must_put(1, "team/keys", "k").await;
    PoliciesClient::new(cluster.channel(1))
        .write(pb::PolicyWriteRequest {
            name: "team-lead".into(),
            text: r#"path "secret/data/team/*" { capabilities = ["read", "delegate"] }
path "secret/data/team/keys" { capabilities = ["read"] }"#
                .into(),
        })
        .await
        .expect("policy");
    PoliciesClient::new(cluster.channel(1))
        .write(pb::PolicyWriteRequest {
            name: "no-keys".into(),
            text: r#"path "secret/data/team/keys" { capabilities = ["deny"] }"#.into(),
        })
        .await
        .expect("policy");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sessions = Vec::new();
    for (name, policies) in [("alice", vec!["team-lead"]), ("bob", vec!["no-keys"])] {
        let key = KeyPair::generate().expect("key");
        let (file, _) = key.save(&dir.path().join(name), name).expect("save");
        IdentitiesClient::new(cluster.channel(1))
            .create(pb::IdentityCreateRequest {
                name: name.into(),
                public_key: key.public().to_bytes().to_vec(),
                policies: policies.into_iter().map(String::from).collect(),
                ..Default::default()
            })
            .await
            .expect("identity");
        sessions.push(
            bare(&cluster, 2)
                .login(&file, 0)
                .await
                .expect("login")
                .clone(),
        );
    }
    let (alice, bob) = (&sessions[0], &sessions[1]);
    let grants = |s: &SessionCredentials, id: u64| GrantsClient::new(kv_channel(&cluster, id, s));
    assert_refused(
        get(&mut kv_as(&cluster, 3, bob), "team/db", false).await,
        Code::PermissionDenied,
        "may not read",
    );

    // Alice may grant only what she holds with delegate: not update, not team/keys alone.
    let refused_grant = |path: &str, cap: &str| pb::GrantCreateRequest {
        grantee: "bob".into(),
        path: path.into(),
        capabilities: vec![cap.into()],
        ttl_seconds: 60,
    };
    for (path, cap) in [
        ("secret/data/team/db", "update"),
        ("secret/data/team/*", "read"),
    ] {
        let e = grants(alice, 1)
            .create(refused_grant(path, cap))
            .await
            .expect_err("not hers to grant");
        assert_eq!(e.code(), Code::PermissionDenied, "{path} {cap}: {e:?}");
    }
    let e = grants(bob, 1)
        .create(pb::GrantCreateRequest {
            grantee: "alice".into(),
            ..refused_grant("secret/data/team/db", "read")
        })
        .await
        .expect_err("bob holds no delegate");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // A 2-second grant of read on team/db: bob reads through every node, then it ends.
    let grant = grants(alice, 1)
        .create(pb::GrantCreateRequest {
            grantee: "bob".into(),
            path: "secret/data/team/db".into(),
            capabilities: vec!["read".into()],
            ttl_seconds: 2,
        })
        .await
        .expect("grant")
        .into_inner();
    for id in 1..=3 {
        assert_eq!(
            get(&mut kv_as(&cluster, id, bob), "team/db", false)
                .await
                .expect("granted read"),
            b"s3cret"
        );
    }
    let listed = grants(bob, 2)
        .list(pb::GrantListRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.grants.len(), 1, "{listed:?}");
    assert_eq!(listed.grants[0].id, grant.id);
    wait_until(Duration::from_secs(10), "the grant to end", || async {
        match get(&mut kv_as(&cluster, 3, bob), "team/db", false).await {
            Err(e) if e.code() == Code::PermissionDenied => Some(()),
            _ => None,
        }
    })
    .await;

    // A longer grant, revoked by alice: bob's next read is refused. A grant never overrides a
    // deny in the grantee's own policies.
    let grant = grants(alice, 2)
        .create(pb::GrantCreateRequest {
            grantee: "bob".into(),
            path: "secret/data/team/db".into(),
            capabilities: vec!["read".into()],
            ttl_seconds: 600,
        })
        .await
        .expect("grant")
        .into_inner();
    get(&mut kv_as(&cluster, 1, bob), "team/db", false)
        .await
        .expect("granted read");
    let revoked = grants(alice, 3)
        .revoke(pb::GrantRevokeRequest { id: grant.id })
        .await
        .expect("revoke")
        .into_inner();
    assert!(revoked.revoked);
    assert_refused(
        get(&mut kv_as(&cluster, 1, bob), "team/db", false).await,
        Code::PermissionDenied,
        "may not read",
    );
    let mut policies = PoliciesClient::new(cluster.channel(1));
    policies
        .write(pb::PolicyWriteRequest {
            name: "team-lead".into(),
            text: r#"path "secret/data/team/*" { capabilities = ["read", "delegate"] }"#.into(),
        })
        .await
        .expect("policy");
    grants(alice, 1)
        .create(pb::GrantCreateRequest {
            grantee: "bob".into(),
            path: "secret/data/team/*".into(),
            capabilities: vec!["read".into()],
            ttl_seconds: 600,
        })
        .await
        .expect("grant on the prefix");
    get(&mut kv_as(&cluster, 2, bob), "team/db", false)
        .await
        .expect("granted read");
    assert_refused(
        get(&mut kv_as(&cluster, 2, bob), "team/keys", false).await,
        Code::PermissionDenied,
        "may not read",
    );
}
