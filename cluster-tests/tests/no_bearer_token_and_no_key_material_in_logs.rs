//! Two promises of the authentication design, checked on what exists:
//! * no code path accepts a bearer token: the server's sources never read an `authorization`
//!   header or anything called a token; requests are authorized only by the session certificate
//!   presented in TLS;
//! * session certificates and keys never reach the logs, even at `trace` level: a cluster
//!   running with `RUST_LOG=trace` logs in, serves requests and refuses some, and no node log
//!   holds any line of the certificate, its signature (hex) or the session key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use coffer_api::v1 as pb;
use coffer_cluster_tests::{Cluster, ClusterOptions};
use coffer_node::client::Target;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs" || e == "proto") {
            out.push(path);
        }
    }
}

#[test]
fn no_code_path_reads_a_bearer_token() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for crate_dir in ["node/src", "raft/src", "storage/src", "api/proto"] {
        sources(&root.join(crate_dir), &mut files);
    }
    assert!(files.len() > 20, "found only {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file)
            .expect("read source")
            .to_lowercase();
        for needle in [
            "bearer",
            "\"authorization\"",
            "x-vault-token",
            "x-coffer-token",
        ] {
            assert!(
                !text.contains(needle),
                "{} mentions {needle}: requests must be authorized by session certificates only",
                file.display()
            );
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_certificates_and_keys_never_reach_the_logs() {
    let options = ClusterOptions {
        env: vec![("RUST_LOG".into(), "trace".into())],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(3, options).await;
    // The fixture logged in as the administrator; log in again through another node, use the
    // session everywhere, and get refused once.
    let mut target = Target::new(
        &[cluster.nodes[&2].api.to_string()],
        Some(&cluster.path().join("tls/ca.pem")),
        Duration::from_secs(10),
    )
    .expect("target");
    let session = target
        .login(&cluster.admin_key(), 0)
        .await
        .expect("login")
        .clone();
    for id in 1..=3 {
        cluster.must_put(id, &format!("k/{id}"), "v").await;
    }
    let mut kv = target.kv().await.expect("kv");
    kv.put(pb::PutRequest {
        key: b"k/2".to_vec(),
        value: b"w".to_vec(),
        ..Default::default()
    })
    .await
    .expect("put with the new session");
    let refused = kv
        .get(pb::GetRequest {
            key: b"\xff-not-utf8".to_vec(),
            consistency: 0,
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    let certs: Vec<Vec<u8>> = [cluster.session().expect("fixture session"), session.clone()]
        .iter()
        .map(|s| {
            rustls_pemfile::certs(&mut s.certificate.as_bytes())
                .next()
                .expect("a certificate")
                .expect("pem")
                .to_vec()
        })
        .collect();
    let mut needles: Vec<String> = Vec::new();
    for s in [cluster.session().expect("fixture session"), session] {
        needles.extend(
            s.certificate
                .lines()
                .chain(s.key.lines())
                .filter(|l| !l.starts_with("-----") && l.len() >= 16)
                .map(str::to_string),
        );
    }
    for der in &certs {
        // The signature (the last 64 bytes, Ed25519) and the certified key, in hex and as a
        // Rust byte list.
        let signature = &der[der.len() - 64..];
        needles.push(hex(signature));
        needles.push(
            format!("{:?}", &signature[..16])
                .trim_matches(['[', ']'])
                .to_string(),
        );
    }
    let logs: Vec<String> = (1..=3).map(|id| cluster.log(id)).collect();
    assert!(
        logs.iter().all(|l| l.contains("TRACE")),
        "the nodes log at trace level"
    );
    assert!(
        logs.iter().any(|l| l.contains("login")),
        "the logins are logged (without their material)"
    );
    for (i, log) in logs.iter().enumerate() {
        for needle in &needles {
            assert!(
                !log.contains(needle.as_str()),
                "node {} logged session material: {needle}",
                i + 1
            );
        }
    }
}
