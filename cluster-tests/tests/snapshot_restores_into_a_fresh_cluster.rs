//! Backup and restore: a snapshot saved with `coffer operator snapshot save` from a three-node
//! cluster holds every secret version, policy and identity as ciphertext only (no plaintext of a
//! secret in the file); restored with `coffer operator snapshot restore` into a second, fresh
//! three-node cluster that was never initialized, it leaves that cluster sealed under the first
//! cluster's seal configuration, and the first cluster's operator share unseals it. Then every
//! secret and version reads back equal (with the same metadata), the identities log in with
//! their keys and their policies decide as before, and the old cluster's sessions are not
//! valid there. Bad input changes nothing: a file with one byte flipped and a truncated file are
//! refused (by the CLI, and by the node when sent directly) with a clear message, as is a
//! restore signed by a key that is not one of the snapshot's operators, and the target stays
//! uninitialized; a restore stopped before its last transaction (a failpoint, as a crash)
//! leaves the cluster uninitialized and refuses init, and running it again completes it; once
//! restored, a second restore is refused because the cluster is initialized.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use coffer_api::v1 as pb;
use coffer_client::{Client, Login};
use coffer_cluster_tests::{Cluster, ClusterOptions, coffer_bin, plaintext_forms, wait_until};
use coffer_node::keys::KeyPair;
use tonic::Code;

/// Part of every secret value written: the backup file must not contain it in any form.
const MARKER: &str = "snapshot-plaintext-4c1d9e";

const APP_POLICY: &str = r#"
path "secret/*" { capabilities = ["create", "read", "update", "patch", "delete", "list"] }
"#;
const READER_POLICY: &str = r#"
path "secret/data/app/*" { capabilities = ["read"] }
"#;

/// The secrets written: (path, number of versions).
const SECRETS: [(&str, u64); 3] = [("app/db", 3), ("app/api", 2), ("team/x/cfg", 4)];

fn value(path: &str, version: u64) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "password".to_string(),
            format!("{MARKER}/{path}/v{version}"),
        ),
        ("version".to_string(), version.to_string()),
    ])
}

fn coffer(cluster: &Cluster, args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(coffer_bin())
        .args(args)
        .arg("--addr")
        .arg(cluster.endpoints(&cluster.running()).join(","))
        .arg("--ca-cert")
        .arg(cluster.path().join("tls/ca.pem"))
        .envs(env.iter().cloned())
        .env(
            "COFFER_SESSION_FILE",
            cluster.path().join("cli-session.json"),
        )
        .output()
        .expect("run coffer")
}

/// `coffer operator snapshot restore FILE --key KEY` against `cluster`.
fn restore_cli(cluster: &Cluster, file: &Path, key: &Path) -> Output {
    let (file, key) = (file.display().to_string(), key.display().to_string());
    coffer(
        cluster,
        &["operator", "snapshot", "restore", &file, "--key", &key],
        &[],
    )
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn refused(out: &Output, says: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(says), "expected {says:?} in: {err}");
}

async fn client_as(cluster: &Cluster, key_file: &Path) -> Client {
    let key = KeyPair::load(key_file).expect("identity key");
    cluster.sdk(&cluster.running(), Login::Key(key)).await
}

/// Every node of `cluster` reports itself uninitialized, and none has a seal configuration.
async fn must_be_uninitialized(cluster: &Cluster) {
    for id in cluster.running() {
        let status = cluster.status(id).await.expect("status");
        assert_eq!(status.seal, "uninitialized", "node {id}");
        let seal = coffer_api::v1::seal_client::SealClient::new(cluster.channel(id))
            .seal_status(pb::SealStatusRequest {})
            .await
            .expect("seal status")
            .into_inner();
        assert!(!seal.initialized, "node {id} has a seal configuration");
    }
}

/// Sets (`Some(action)`) or removes failpoint `name` on node `id` through its metrics port.
async fn must_set_failpoint(cluster: &Cluster, id: u64, name: &str, action: Option<&str>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = cluster.nodes[&id].metrics;
    let (method, body) = match action {
        Some(a) => ("PUT", a),
        None => ("DELETE", ""),
    };
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics port");
    conn.write_all(
        format!(
            "{method} /failpoints/{name} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("send");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Sends `file` to node 1 of `cluster` with the Restore RPC directly (no check in the CLI).
async fn restore_rpc(cluster: &Cluster, file: Vec<u8>, signature: Vec<u8>) -> tonic::Status {
    let first = pb::SnapshotRestoreRequest {
        data: file,
        operator_index: 0,
        signature,
    };
    cluster
        .admin(1)
        .snapshot_restore(tokio_stream::iter(vec![first]))
        .await
        .expect_err("the node refuses the restore")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restores_into_a_fresh_cluster() {
    let source = Cluster::start(3, ClusterOptions::default()).await;

    // --- step: secrets with several versions, one deleted version, policies and identities.
    let app_key = source.must_create_identity("app", APP_POLICY).await;
    let reader_key = source.must_create_identity("reader", READER_POLICY).await;
    let app = client_as(&source, &app_key).await;
    let kv = app.kv("secret");
    for (path, versions) in SECRETS {
        for v in 1..=versions {
            let written = kv.put(path, value(path, v)).await.expect("put");
            assert_eq!(written.version, v);
        }
    }
    kv.delete("app/db", &[1])
        .await
        .expect("soft-delete version 1");
    let mut metadata = BTreeMap::new();
    for (path, _) in SECRETS {
        let mut m = kv.read_metadata(path).await.expect("metadata");
        m.header = None;
        metadata.insert(path, m);
    }

    // --- step: save through the CLI, as the administrator.
    let file = source.path().join("backup.snap");
    let file_arg = file.display().to_string();
    let started = Instant::now();
    let saved = ok(&coffer(
        &source,
        &["operator", "snapshot", "save", &file_arg],
        &[(
            "COFFER_KEY".into(),
            source.admin_key().display().to_string(),
        )],
    ));
    let save_time = started.elapsed();
    let bytes = std::fs::read(&file).expect("the backup file");
    assert!(
        saved.contains(&format!("{} bytes", bytes.len())) && saved.contains("sha256 "),
        "{saved}"
    );
    assert!(
        !source.path().join("backup.snap.tmp").exists(),
        "the temporary file was renamed"
    );
    for (form, needle) in plaintext_forms(MARKER.as_bytes()) {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
            "the backup holds a secret's plaintext ({form})"
        );
    }
    // An existing backup is never overwritten.
    refused(
        &coffer(
            &source,
            &["operator", "snapshot", "save", &file_arg],
            &[(
                "COFFER_KEY".into(),
                source.admin_key().display().to_string(),
            )],
        ),
        "already exists",
    );
    let inspected = ok(&Command::new(coffer_bin())
        .args(["operator", "snapshot", "inspect", &file_arg])
        .output()
        .expect("inspect"));
    assert!(inspected.contains("a valid backup"), "{inspected}");

    // --- step: a fresh cluster that was never initialized.
    let target = Cluster::start(
        3,
        ClusterOptions {
            initialize: false,
            ..ClusterOptions::default()
        },
    )
    .await;
    let (operator_key, operator_share) = source.operator_files();

    // --- step: bad input is refused and changes nothing.
    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x20;
    let truncated = bytes[..bytes.len() - 100].to_vec();
    for (name, bad) in [("flipped.snap", &flipped), ("truncated.snap", &truncated)] {
        let path = target.path().join(name);
        std::fs::write(&path, bad).expect("write a bad file");
        refused(
            &restore_cli(&target, &path, &operator_key),
            "the backup file is corrupt or truncated: its SHA-256 checksum does not match",
        );
        // Sent to the node directly, it is refused there too.
        let status = restore_rpc(&target, bad.clone(), vec![0; 64]).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("corrupt or truncated")
                && status.message().contains("nothing was restored"),
            "{status:?}"
        );
    }
    // Signed by a key that is not one of the snapshot's operators.
    let stranger = KeyPair::generate().expect("key");
    let (stranger_file, _) = stranger
        .save(&target.path().join("stranger"), "not an operator")
        .expect("save key");
    refused(
        &restore_cli(&target, &file, &stranger_file),
        "is not one of the backup's operators",
    );
    let checksum: [u8; 32] = bytes[bytes.len() - 32..].try_into().expect("32 bytes");
    let forged = stranger.sign(&coffer_node::backup::restore_message(&checksum));
    let status = restore_rpc(&target, bytes.clone(), forged.to_vec()).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    must_be_uninitialized(&target).await;

    // --- step: a restore that stops before its last transaction (as after a crash) leaves the
    // cluster uninitialized, serving nothing; init is refused; running the restore again
    // completes it.
    for id in target.running() {
        must_set_failpoint(&target, id, "backup::restore_last", Some("return")).await;
    }
    refused(
        &restore_cli(&target, &file, &operator_key),
        "the restore stopped with at most",
    );
    must_be_uninitialized(&target).await;
    let (stranger_pub, shares) = (
        target.path().join("stranger.pub"),
        target.path().join("init-shares"),
    );
    let init = coffer_node::operator::init(
        &target.target_without_session(1),
        std::slice::from_ref(&stranger_pub),
        1,
        &stranger_pub,
        &shares,
    )
    .await
    .expect_err("init is refused while a restore has started");
    assert!(
        format!("{init:#}").contains("a snapshot restore has started"),
        "{init:#}"
    );
    for id in target.running() {
        must_set_failpoint(&target, id, "backup::restore_last", None).await;
    }

    // --- step: restore, signed by the operator, through the CLI.
    let started = Instant::now();
    let restored = ok(&restore_cli(&target, &file, &operator_key));
    let restore_time = started.elapsed();
    assert!(restored.contains("the cluster is sealed"), "{restored}");
    for id in target.running() {
        wait_until(
            Duration::from_secs(20),
            &format!("node {id} to apply the restore (sealed, 0 of 1)"),
            || async { (target.status(id).await?.seal.starts_with("sealed")).then_some(()) },
        )
        .await;
    }
    // The data is there but sealed: nothing is served yet.
    let sealed = coffer_node::operator::snapshot_restore(
        &target.target_without_session(2),
        &file,
        &operator_key,
    )
    .await
    .expect_err("a second restore is refused");
    assert!(
        format!("{sealed:#}").contains("already initialized"),
        "{sealed:#}"
    );

    // --- step: the first cluster's operator share unseals the restored cluster.
    let unsealed = coffer_node::operator::unseal(
        &target.target_without_session(1),
        &operator_key,
        &operator_share,
    )
    .await
    .expect("the old share unseals the restored cluster");
    assert!(!unsealed.sealed);
    target
        .must_wait_unsealed(&target.running(), Duration::from_secs(30))
        .await;

    // --- step: every secret and version, the metadata, the identities and their policies.
    let app_there = client_as(&target, &app_key).await;
    let kv_there = app_there.kv("secret");
    for (path, versions) in SECRETS {
        for v in 1..=versions {
            if (path, v) == ("app/db", 1) {
                let e = kv_there
                    .get_version(path, v)
                    .await
                    .expect_err("the deleted version stays deleted");
                assert_eq!(e.code(), Some(Code::NotFound), "{e}");
                continue;
            }
            let got = kv_there.get_version(path, v).await.expect("get a version");
            let fields: BTreeMap<String, String> = got
                .data
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(fields, value(path, v), "{path} version {v}");
        }
        let mut m = kv_there.read_metadata(path).await.expect("metadata");
        m.header = None;
        assert_eq!(m, metadata[path], "{path}'s metadata");
    }
    // New writes work and continue the version numbers.
    let next = kv_there
        .put("app/db", value("app/db", 4))
        .await
        .expect("put after restore");
    assert_eq!(next.version, 4);
    let reader = client_as(&target, &reader_key).await;
    let read = reader
        .kv("secret")
        .get("app/api")
        .await
        .expect("the reader's policy lets it read");
    assert_eq!(read.version.version, 2);
    let e = reader
        .kv("secret")
        .put("app/api", value("app/api", 9))
        .await
        .expect_err("the reader's policy does not let it write");
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    // The old cluster's sessions were left out: a session certificate from it is refused.
    let old_session = target.sdk(&[1], Login::Session(app.session())).await;
    let e = old_session
        .kv("secret")
        .get("app/db")
        .await
        .expect_err("an old session is not valid in the restored cluster");
    assert!(
        matches!(e, coffer_client::Error::SessionEnded),
        "the node refuses the old session as ended: {e}"
    );

    println!(
        "backup: {} bytes; save {save_time:?}, restore {restore_time:?}",
        bytes.len()
    );
}
