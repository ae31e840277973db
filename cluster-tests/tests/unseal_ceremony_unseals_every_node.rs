//! The key ceremony on a three-node cluster: three operators and an administrator make keys;
//! init with threshold 2 writes one share file per operator; a second init is refused; a share
//! opened with the wrong key, a corrupt share file, a decryption share that does not verify
//! (named, not counted) and a duplicate submission each get their own clear error; then two
//! operators' shares, sent to two different nodes, unseal all three nodes; a restarted node is
//! sealed again, and with peer unseal turned on by an operator, a restarted node unseals itself
//! from a peer. No data is served before init or while sealed. A second test shows that unseal
//! progress expires; a third rekeys 2-of-3 operators to 3-of-5 and unseals with the new shares.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use coffer_api::v1 as pb;
use coffer_api::v1::seal_client::SealClient;
use coffer_cluster_tests::{Cluster, ClusterOptions, coffer_bin, wait_until};
use coffer_node::keys::KeyPair;
use coffer_node::seal::{SHARE_INFO, ShareFile, unseal_message};

fn run(cluster: &Cluster, via: u64, args: &[&str]) -> Output {
    Command::new(coffer_bin())
        .args(args)
        .args(["--addr", &cluster.nodes[&via].api.to_string()])
        .arg("--ca-cert")
        .arg(cluster.path().join("tls/ca.pem"))
        .output()
        .expect("run coffer")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// `coffer keygen --out DIR/NAME` for each name.
fn keygen(dir: &Path, names: &[&str]) {
    for name in names {
        ok(&Command::new(coffer_bin())
            .args(["keygen", "--out", &p(dir, name)])
            .output()
            .expect("keygen"));
    }
}

/// `coffer operator init` through node 1 with the operators' keys (and admin.pub) from `dir`.
fn init(cluster: &Cluster, dir: &Path, operators: &[&str], threshold: u32, shares: &str) -> Output {
    let mut args = vec!["operator".to_string(), "init".to_string()];
    for op in operators {
        args.push("--operator-key".into());
        args.push(p(dir, &format!("{op}.pub")));
    }
    args.extend([
        "--threshold".into(),
        threshold.to_string(),
        "--admin-key".into(),
        p(dir, "admin.pub"),
        "--share-dir".into(),
        p(dir, shares),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(cluster, 1, &args)
}

/// `coffer operator unseal` through node `via` with `key` and `share` (in `dir`/shares).
fn unseal(cluster: &Cluster, via: u64, dir: &Path, key: &str, share: &str) -> Output {
    run(
        cluster,
        via,
        &[
            "operator",
            "unseal",
            "--key",
            &p(dir, key),
            "--share",
            &p(&dir.join("shares"), share),
        ],
    )
}

async fn seal_of(cluster: &Cluster, id: u64) -> Option<String> {
    cluster.status(id).await.map(|s| s.seal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unseal_ceremony_unseals_every_node_and_names_bad_shares() {
    let uninitialized = ClusterOptions {
        initialize: false,
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(3, uninitialized).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let k = keys.path();
    keygen(k, &["alice", "bob", "carol", "admin"]);
    assert_eq!(seal_of(&cluster, 1).await.as_deref(), Some("uninitialized"));

    // No data is served before init, nor while sealed: each error says what to do.
    let mut kv = cluster.kv(1);
    let put = pb::PutRequest {
        key: b"app/early".to_vec(),
        value: b"v".to_vec(),
        request_id: Vec::new(),
    };
    let early = kv.put(put.clone()).await.expect_err("uninitialized");
    assert_eq!(early.code(), tonic::Code::FailedPrecondition);
    assert!(
        early.message().contains("coffer operator init"),
        "{early:?}"
    );

    let operators = ["alice", "bob", "carol"];
    let out = ok(&init(&cluster, k, &operators, 2, "shares"));
    assert!(out.contains("2 of 3 operators"), "{out}");
    refused(
        &init(&cluster, k, &operators, 2, "again"),
        "already initialized",
    );

    // Every node applies the configuration and is sealed.
    for id in 1..=3 {
        wait_until(Duration::from_secs(10), "every node sealed", || async {
            (seal_of(&cluster, id).await.as_deref() == Some("sealed (0 of 2)")).then_some(())
        })
        .await;
    }

    let sealed = kv.put(put.clone()).await.expect_err("sealed");
    assert_eq!(sealed.code(), tonic::Code::FailedPrecondition);
    assert!(
        sealed
            .message()
            .contains("sealed: 0 of 2 decryption shares received")
            && sealed.message().contains("coffer operator unseal"),
        "{sealed:?}"
    );
    let sealed = cluster
        .kv(3)
        .list(pb::ListRequest::default())
        .await
        .expect_err("sealed");
    assert_eq!(sealed.code(), tonic::Code::FailedPrecondition);

    let shares = k.join("shares");
    let unseal = |via: u64, key: &str, share: &str| unseal(&cluster, via, k, key, share);
    // Another operator's share file with my key.
    refused(&unseal(1, "bob.key", "alice.share"), "use your own key");
    // A corrupt share file.
    std::fs::write(shares.join("broken.share"), "{ not json").expect("write");
    refused(&unseal(1, "carol.key", "broken.share"), "is corrupt");

    // Carol signs a decryption share made from Alice's share: it does not verify as Carol's.
    let alice = KeyPair::load(&k.join("alice.key")).expect("alice");
    let carol = KeyPair::load(&k.join("carol.key")).expect("carol");
    let file: ShareFile =
        serde_json::from_str(&std::fs::read_to_string(shares.join("alice.share")).expect("read"))
            .expect("share file");
    let mut seal = SealClient::new(cluster.channel(2));
    let status = seal
        .seal_status(pb::SealStatusRequest {})
        .await
        .expect("seal status")
        .into_inner();
    let sealed_share = coffer_node::operator::unhex(&file.encrypted_share).expect("hex");
    let mut info = SHARE_INFO.to_vec();
    info.extend_from_slice(file.cluster_id.as_bytes());
    let alices_secret = alice.open(&info, &sealed_share).expect("open");
    let decryption =
        coffer_node::threshold::decryption_share(&alices_secret, &status.master_ciphertext)
            .expect("decryption share");
    let carol_index = 2;
    let signature = carol.sign(&unseal_message(
        &status.cluster_id,
        &status.master_ciphertext,
        status.seal_revision,
        carol_index,
        &decryption,
    ));
    let bad = seal
        .unseal(pb::UnsealRequest {
            cluster_id: status.cluster_id.clone(),
            seal_revision: status.seal_revision,
            operator_index: carol_index,
            decryption_share: decryption.clone(),
            signature: signature.to_vec(),
        })
        .await
        .expect_err("a share that does not verify is refused");
    assert_eq!(bad.code(), tonic::Code::FailedPrecondition);
    assert!(
        bad.message().contains("operator carol") && bad.message().contains("does not count"),
        "{}",
        bad.message()
    );
    // Signed by someone else than the operator it claims to be.
    let forged = seal
        .unseal(pb::UnsealRequest {
            cluster_id: status.cluster_id.clone(),
            seal_revision: status.seal_revision,
            operator_index: 0,
            decryption_share: decryption,
            signature: signature.to_vec(),
        })
        .await
        .expect_err("forged");
    assert!(
        forged.message().contains("not signed"),
        "{}",
        forged.message()
    );
    // For another cluster.
    let other = seal
        .unseal(pb::UnsealRequest {
            cluster_id: "another-cluster".into(),
            seal_revision: 0,
            operator_index: 0,
            decryption_share: Vec::new(),
            signature: Vec::new(),
        })
        .await
        .expect_err("other cluster");
    assert!(
        other.message().contains("another-cluster"),
        "{}",
        other.message()
    );
    assert_eq!(
        seal_of(&cluster, 2).await.as_deref(),
        Some("sealed (0 of 2)")
    );

    // Alice through node 2: one of two. Again: refused as a duplicate, progress kept.
    let out = ok(&unseal(2, "alice.key", "alice.share"));
    assert!(
        out.contains("1 of 2") && out.contains("still sealed"),
        "{out}"
    );
    refused(&unseal(2, "alice.key", "alice.share"), "already submitted");
    // The share reached the other nodes too.
    wait_until(Duration::from_secs(10), "alice's share relayed", || async {
        (seal_of(&cluster, 3).await.as_deref() == Some("sealed (1 of 2: alice)")).then_some(())
    })
    .await;

    // Bob through node 3: every node unseals.
    let out = ok(&unseal(3, "bob.key", "bob.share"));
    assert!(out.contains("unsealed"), "{out}");
    for id in 1..=3 {
        wait_until(Duration::from_secs(10), "every node unsealed", || async {
            (seal_of(&cluster, id).await.as_deref() == Some("unsealed")).then_some(())
        })
        .await;
    }

    // The seal configuration lives under a reserved key that clients can neither reach nor see
    // (not even the administrator, given data access).
    cluster.must_login_admin(&k.join("admin.key")).await;
    let mut kv = cluster.kv(2);
    let reserved = kv
        .get(pb::GetRequest {
            key: coffer_node::seal::CONFIG_KEY.to_vec(),
            consistency: 0,
        })
        .await
        .expect_err("reserved key");
    assert_eq!(reserved.code(), tonic::Code::InvalidArgument);
    cluster.must_put(2, "app/visible", "1").await;
    let listed = kv
        .list(pb::ListRequest::default())
        .await
        .expect("list everything")
        .into_inner();
    assert!(!listed.kvs.is_empty());
    assert!(listed.kvs.iter().all(|e| e.key.first() != Some(&0)));

    // A restarted node starts sealed; the others stay unsealed.
    cluster.kill(1);
    cluster.spawn(1);
    wait_until(Duration::from_secs(20), "node 1 back, sealed", || async {
        (seal_of(&cluster, 1).await.as_deref() == Some("sealed (0 of 2)")).then_some(())
    })
    .await;
    assert_eq!(seal_of(&cluster, 2).await.as_deref(), Some("unsealed"));

    // Peer unseal is off by default: node 1 stays sealed through several of its attempts.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        seal_of(&cluster, 1).await.as_deref(),
        Some("sealed (0 of 2)")
    );
    // Only an operator may turn it on; then a restarted node unseals itself from a peer.
    refused(
        &run(
            &cluster,
            2,
            &["operator", "peer-unseal", "on", "--key", &p(k, "admin.key")],
        ),
        "is not one of this cluster's operators",
    );
    let out = ok(&run(
        &cluster,
        2,
        &["operator", "peer-unseal", "on", "--key", &p(k, "carol.key")],
    ));
    assert!(out.contains("peer unseal is on"), "{out}");
    wait_until(
        Duration::from_secs(20),
        "node 1 unsealed by a peer",
        || async { (seal_of(&cluster, 1).await.as_deref() == Some("unsealed")).then_some(()) },
    )
    .await;
    cluster.kill(3);
    cluster.spawn(3);
    wait_until(
        Duration::from_secs(20),
        "restarted node 3 unsealed by a peer",
        || async { (seal_of(&cluster, 3).await.as_deref() == Some("unsealed")).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unseal_progress_expires_and_the_ceremony_starts_over() {
    let options = ClusterOptions {
        extra_args: vec!["--unseal-progress-ttl-s".into(), "1".into()],
        initialize: false,
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(1, options).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let k = keys.path();
    keygen(k, &["alice", "bob", "admin"]);
    ok(&init(&cluster, k, &["alice", "bob"], 2, "shares"));
    let unseal = |who: &str| {
        unseal(
            &cluster,
            1,
            k,
            &format!("{who}.key"),
            &format!("{who}.share"),
        )
    };
    assert!(ok(&unseal("alice")).contains("1 of 2"));
    // Alice's share expires after a second; Bob's then starts a new ceremony.
    wait_until(
        Duration::from_secs(10),
        "alice's share to expire",
        || async {
            (seal_of(&cluster, 1).await.as_deref() == Some("sealed (0 of 2)")).then_some(())
        },
    )
    .await;
    let out = ok(&unseal("bob"));
    assert!(
        out.contains("1 of 2 (bob)") && out.contains("still sealed"),
        "{out}"
    );
}

/// `coffer operator rekey --key K --share S --new-operator-key ... --new-threshold T` by `who`
/// through node 1, new share files into `dir`/new.
fn rekey(cluster: &Cluster, dir: &Path, who: &str, new: &[&str], threshold: u32) -> Output {
    let mut args = vec![
        "operator".to_string(),
        "rekey".into(),
        "--key".into(),
        p(dir, &format!("{who}.key")),
        "--share".into(),
        p(&dir.join("shares"), &format!("{who}.share")),
        "--new-threshold".into(),
        threshold.to_string(),
        "--share-dir".into(),
        p(dir, "new"),
    ];
    for n in new {
        args.push("--new-operator-key".into());
        args.push(p(dir, &format!("{n}.pub")));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(cluster, 1, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_to_five_operators_replaces_the_shares_and_keeps_the_data() {
    let uninitialized = ClusterOptions {
        initialize: false,
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(3, uninitialized).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let k = keys.path();
    let new = ["dave", "erin", "frank", "grace", "heidi"];
    keygen(k, &["alice", "bob", "carol", "admin"]);
    keygen(k, &new);
    ok(&init(&cluster, k, &["alice", "bob", "carol"], 2, "shares"));
    ok(&unseal(&cluster, 1, k, "alice.key", "alice.share"));
    ok(&unseal(&cluster, 1, k, "bob.key", "bob.share"));
    cluster
        .must_wait_unsealed(&[1, 2, 3], Duration::from_secs(20))
        .await;
    cluster.must_login_admin(&k.join("admin.key")).await;
    cluster.must_put(2, "app/kept", "across-the-rekey").await;

    // Alice authorizes 5 operators, 3 needed; Carol proposing something else meanwhile is
    // refused; Bob's matching authorization completes it and writes five new share files.
    let out = ok(&rekey(&cluster, k, "alice", &new, 3));
    assert!(out.contains("authorized by 1 of 2 (alice)"), "{out}");
    refused(&rekey(&cluster, k, "carol", &new[..4], 3), "another rekey");
    let out = ok(&rekey(&cluster, k, "bob", &new, 3));
    assert!(out.contains("3 of 5 operators"), "{out}");
    for n in new {
        assert!(k.join(format!("new/{n}.share")).exists(), "{n}'s share");
    }

    // The old operators are gone: Alice can no longer act, and her old share is refused.
    let old_seal = run(
        &cluster,
        1,
        &["operator", "seal", "--key", &p(k, "alice.key")],
    );
    refused(&old_seal, "is not one of this cluster's operators");
    // The new operators seal the cluster; the old shares cannot unseal it.
    ok(&run(
        &cluster,
        2,
        &["operator", "seal", "--key", &p(k, "dave.key")],
    ));
    for id in 1..=3 {
        wait_until(Duration::from_secs(10), "every node sealed", || async {
            seal_of(&cluster, id)
                .await?
                .starts_with("sealed")
                .then_some(())
        })
        .await;
    }
    refused(
        &unseal(&cluster, 1, k, "alice.key", "alice.share"),
        "replaced by a rekey",
    );
    // Two new shares: still sealed; the third unseals every node; the data is intact.
    let new_share = |who: &str| {
        run(
            &cluster,
            3,
            &[
                "operator",
                "unseal",
                "--key",
                &p(k, &format!("{who}.key")),
                "--share",
                &p(&k.join("new"), &format!("{who}.share")),
            ],
        )
    };
    assert!(ok(&new_share("erin")).contains("1 of 3"));
    assert!(ok(&new_share("grace")).contains("2 of 3"));
    assert!(ok(&new_share("heidi")).contains("unsealed"));
    cluster
        .must_wait_unsealed(&[1, 2, 3], Duration::from_secs(20))
        .await;
    for id in 1..=3 {
        cluster
            .must_get_equal(id, "app/kept", "across-the-rekey")
            .await;
    }
}
