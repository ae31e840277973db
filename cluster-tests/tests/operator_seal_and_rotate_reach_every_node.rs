//! Operators' seal actions on a running three-node cluster: `coffer operator rotate` makes a new
//! data key active on every node while values written under the old one stay readable; `coffer
//! operator seal` seals every node (no data served, peer unseal cannot undo it), replays of a
//! signed seal request or of an unseal submission made before the seal are refused, and one
//! unseal ceremony brings back every value. An administrator seals every node with a session
//! (`sudo` on sys/seal) and no operator key; an identity without that capability cannot.

use std::process::{Command, Output};
use std::time::Duration;

use coffer_api::v1 as pb;
use coffer_api::v1::seal_client::SealClient;
use coffer_cluster_tests::{Cluster, ClusterOptions, coffer_bin, wait_until};
use coffer_node::seal::{SHARE_INFO, ShareFile, unseal_message};
use coffer_node::threshold::decryption_share;

fn operator(cluster: &Cluster, via: u64, action: &str) -> Output {
    let (key, _) = cluster.operator_files();
    Command::new(coffer_bin())
        .args(["operator", action, "--key"])
        .arg(key)
        .args(["--addr", &cluster.nodes[&via].api.to_string()])
        .arg("--ca-cert")
        .arg(cluster.path().join("tls/ca.pem"))
        .output()
        .expect("run coffer operator")
}

async fn seal_status(cluster: &Cluster, id: u64) -> pb::SealStatusResponse {
    SealClient::new(cluster.channel(id))
        .seal_status(pb::SealStatusRequest {})
        .await
        .expect("seal status")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_and_seal_reach_every_node() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    for id in 1..=3 {
        assert_eq!(seal_status(&cluster, id).await.data_key, 1);
    }
    cluster.must_put(1, "app/old", "written-under-key-1").await;

    // Rotate through node 2: every node takes in data key 2 as it applies the new keyring.
    let out = operator(&cluster, 2, "rotate");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("data key 2 is active"),
        "{out:?}"
    );
    for id in 1..=3 {
        wait_until(Duration::from_secs(10), "data key 2 everywhere", || async {
            (seal_status(&cluster, id).await.data_key == 2).then_some(())
        })
        .await;
    }
    cluster.must_put(3, "app/new", "written-under-key-2").await;
    for id in 1..=3 {
        cluster
            .must_get_equal(id, "app/old", "written-under-key-1")
            .await;
        cluster
            .must_get_equal(id, "app/new", "written-under-key-2")
            .await;
    }

    // Seal through node 1; keep a signed seal request and a signed unseal submission made
    // before it, to replay them later.
    let before = seal_status(&cluster, 1).await;
    let (key, share) = cluster.operator_files();
    let pair = coffer_node::keys::KeyPair::load(&key).expect("key");
    let file: ShareFile =
        serde_json::from_str(&std::fs::read_to_string(&share).expect("share")).expect("json");
    let mut info = SHARE_INFO.to_vec();
    info.extend_from_slice(file.cluster_id.as_bytes());
    let secret = pair
        .open(
            &info,
            &coffer_node::operator::unhex(&file.encrypted_share).expect("hex"),
        )
        .expect("open share");
    let decryption = decryption_share(&secret, &before.master_ciphertext).expect("share");
    let old_submission = pb::UnsealRequest {
        cluster_id: before.cluster_id.clone(),
        operator_index: 0,
        signature: pair
            .sign(&unseal_message(
                &before.cluster_id,
                &before.master_ciphertext,
                before.seal_revision,
                0,
                &decryption,
            ))
            .to_vec(),
        decryption_share: decryption,
        seal_revision: before.seal_revision,
    };
    let out = operator(&cluster, 1, "seal");
    assert!(out.status.success(), "{out:?}");
    for id in 1..=3 {
        wait_until(Duration::from_secs(10), "every node sealed", || async {
            cluster
                .status(id)
                .await?
                .seal
                .starts_with("sealed")
                .then_some(())
        })
        .await;
        let refused = cluster
            .kv(id)
            .get(pb::GetRequest {
                key: b"app/old".to_vec(),
                consistency: 0,
            })
            .await
            .expect_err("a sealed node serves no data");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains("sealed"), "{refused:?}");
    }
    // Peer unseal is on in this cluster, but every member is sealed: they stay sealed through
    // several rounds of asking each other.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for id in 1..=3 {
        assert!(seal_status(&cluster, id).await.sealed, "node {id} unsealed");
    }

    // A recorded unseal submission from before the seal cannot undo it.
    let replayed = SealClient::new(cluster.channel(3))
        .unseal(old_submission)
        .await
        .expect_err("a submission from before the seal");
    assert!(replayed.message().contains("seal revision"), "{replayed:?}");
    assert!(seal_status(&cluster, 3).await.sealed);

    // The same signed seal request again (its revision is stale now): refused.
    let signature = pair.sign(&coffer_node::seal::action_message(
        &before.cluster_id,
        coffer_node::seal::Action::Seal,
        before.seal_revision,
    ));
    let replay = SealClient::new(cluster.channel(2))
        .operator_action(pb::OperatorActionRequest {
            action: "seal".into(),
            operator_index: 0,
            revision: before.seal_revision,
            signature: signature.to_vec(),
        })
        .await
        .expect_err("a replayed request");
    assert!(
        replay
            .message()
            .contains("changed since the request was signed"),
        "{replay:?}"
    );

    // One ceremony (the fixture's single operator) unseals all three; both values are back.
    cluster.must_unseal(2).await;
    cluster
        .must_wait_unsealed(&[1, 2, 3], Duration::from_secs(20))
        .await;
    for id in 1..=3 {
        assert_eq!(seal_status(&cluster, id).await.data_key, 2);
        cluster
            .must_get_equal(id, "app/old", "written-under-key-1")
            .await;
        cluster
            .must_get_equal(id, "app/new", "written-under-key-2")
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_seals_every_node_in_an_emergency() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    cluster.must_put(1, "app/x", "kept").await;

    // An identity whose policies hold no `sudo` on sys/seal is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let key = coffer_node::keys::KeyPair::generate().expect("key");
    let (key_file, _) = key.save(&dir.path().join("app"), "app").expect("save");
    coffer_api::v1::identities_client::IdentitiesClient::new(cluster.channel(1))
        .create(pb::IdentityCreateRequest {
            name: "app".into(),
            public_key: key.public().to_bytes().to_vec(),
            policies: vec![coffer_node::dev::DEV_DATA_POLICY.into()],
            ..Default::default()
        })
        .await
        .expect("identity create");
    let mut app = cluster.target();
    app.session = None;
    app.login(&key_file, 0).await.expect("login");
    let denied = SealClient::new(app.connect().await.expect("connect"))
        .emergency_seal(pb::EmergencySealRequest {})
        .await
        .expect_err("no sudo on sys/seal");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(!seal_status(&cluster, 1).await.sealed);

    // The administrator's session seals every node: `coffer operator seal` without an
    // operator key.
    let out = Command::new(coffer_bin())
        .args([
            "operator",
            "seal",
            "--addr",
            &cluster.nodes[&3].api.to_string(),
        ])
        .envs(cluster.cli_env())
        .env_remove("COFFER_OPERATOR_KEY")
        .output()
        .expect("run coffer operator seal");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("emergency seal"),
        "{out:?}"
    );
    for id in 1..=3 {
        wait_until(Duration::from_secs(10), "every node sealed", || async {
            seal_status(&cluster, id).await.sealed.then_some(())
        })
        .await;
    }
    // The operators' ceremony brings everything back.
    cluster.must_unseal(1).await;
    cluster
        .must_wait_unsealed(&[1, 2, 3], Duration::from_secs(20))
        .await;
    cluster.must_get_equal(2, "app/x", "kept").await;
}
