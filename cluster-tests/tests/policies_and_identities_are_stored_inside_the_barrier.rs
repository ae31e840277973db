//! `coffer policy write|read|list|delete` on a three-node cluster: a policy written through one
//! node is read back through another; one that does not parse is refused with its line and
//! column and nothing is stored; an exact path with keys under it gets a warning; the built-in
//! `admin` policy can be read but not changed; the policy text is stored only encrypted.
//! Identities: the administrator key is the built-in `admin`; names and keys are unique; policies
//! are replaced by update; a deleted identity frees its key.

use std::path::Path;
use std::process::{Command, Output};

use coffer_cluster_tests::{Cluster, ClusterOptions, coffer_bin, files_under};

const POLICY: &str = r#"# readers of the app's secrets
path "secret/data/app" {
  capabilities = ["read"]
}
path "secret/data/app/*" { capabilities = ["read", "list"] }
path "zz-policy-marker-6d1f/+/db" { capabilities = ["deny"] }
"#;

fn coffer(cluster: &Cluster, via: u64, args: &[&str]) -> Output {
    Command::new(coffer_bin())
        .args(args)
        .args(["--addr", &cluster.nodes[&via].api.to_string()])
        .arg("--ca-cert")
        .arg(cluster.path().join("tls/ca.pem"))
        .envs(cluster.cli_env())
        .output()
        .expect("run coffer")
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of_failure(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_stored_inside_the_barrier() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    cluster.must_put(1, "app/db", "x").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("readers.hcl");
    std::fs::write(&file, POLICY).expect("write policy file");
    let file = file.display().to_string();

    // Written through node 1, with a warning about the exact path `app`.
    let out = coffer(&cluster, 1, &["policy", "write", "app-readers", &file]);
    assert!(stdout(&out).contains("policy app-readers written"));
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains("\"secret/data/app\" is an exact path")
            && warning.contains("\"secret/data/app/*\""),
        "{warning}"
    );
    // Read back through node 3; listed with the built-in policy.
    assert_eq!(
        stdout(&coffer(&cluster, 3, &["policy", "read", "app-readers"])),
        POLICY
    );
    assert_eq!(
        stdout(&coffer(&cluster, 2, &["policy", "list"])),
        "admin\napp-readers\ndev-data\n"
    );

    // A policy that does not parse: refused with line and column, nothing stored.
    let bad = dir.path().join("bad.hcl");
    std::fs::write(
        &bad,
        "path \"a\" {\n  capabilities = [\"read\", \"fly\"]\n}\n",
    )
    .expect("write");
    let err = stderr_of_failure(&coffer(
        &cluster,
        2,
        &["policy", "write", "broken", &bad.display().to_string()],
    ));
    assert!(
        err.contains("line 2, column 27") && err.contains("unknown capability \"fly\""),
        "{err}"
    );
    assert_eq!(
        stdout(&coffer(&cluster, 1, &["policy", "list"])),
        "admin\napp-readers\ndev-data\n"
    );
    // Bad names and the built-in policy.
    let err = stderr_of_failure(&coffer(&cluster, 1, &["policy", "write", "App", &file]));
    assert!(err.contains("lowercase letters"), "{err}");
    let err = stderr_of_failure(&coffer(&cluster, 1, &["policy", "write", "admin", &file]));
    assert!(err.contains("built in"), "{err}");
    let err = stderr_of_failure(&coffer(&cluster, 1, &["policy", "delete", "admin"]));
    assert!(err.contains("built in"), "{err}");
    assert!(stdout(&coffer(&cluster, 1, &["policy", "read", "admin"])).contains("sys/*"));

    // The text is stored only encrypted: its marker is in no file of the cluster.
    cluster
        .must_converge(std::time::Duration::from_secs(20))
        .await;
    for f in &files_under(cluster.path()) {
        let bytes = std::fs::read(f).expect("read");
        assert!(
            !bytes
                .windows(b"zz-policy-marker-6d1f".len())
                .any(|w| w == b"zz-policy-marker-6d1f"),
            "policy text in the clear in {}",
            f.display()
        );
    }

    // Deleted through node 3: gone everywhere; deleting again says so.
    assert!(
        stdout(&coffer(&cluster, 3, &["policy", "delete", "app-readers"]))
            .contains("policy app-readers deleted")
    );
    let err = stderr_of_failure(&coffer(&cluster, 1, &["policy", "read", "app-readers"]));
    assert!(err.contains("no policy"), "{err}");
    let err = stderr_of_failure(&coffer(&cluster, 2, &["policy", "delete", "app-readers"]));
    assert!(err.contains("nothing deleted"), "{err}");
    assert_eq!(
        stdout(&coffer(&cluster, 2, &["policy", "list"])),
        "admin\ndev-data\n"
    );
}

fn keygen(dir: &Path, name: &str) -> String {
    let out = Command::new(coffer_bin())
        .args(["keygen", "--out"])
        .arg(dir.join(name))
        .output()
        .expect("keygen");
    assert!(out.status.success(), "{out:?}");
    dir.join(format!("{name}.pub")).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_are_registered_with_unique_keys() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let alice = keygen(dir.path(), "alice");
    let bob = keygen(dir.path(), "bob");
    let admin_pub = cluster.path().join("keys/admin.pub").display().to_string();
    let admin_fp = coffer_node::keys::PublicKey::load(Path::new(&admin_pub))
        .expect("admin key")
        .fingerprint();

    // The administrator key given at init is the built-in identity.
    assert_eq!(
        stdout(&coffer(&cluster, 1, &["identity", "list"])),
        "admin\n"
    );
    let admin = stdout(&coffer(&cluster, 2, &["identity", "read", "admin"]));
    assert!(
        admin.contains(&admin_fp) && admin.contains("policies: admin"),
        "{admin}"
    );

    // Alice, with a policy that does not exist yet: stored, with a warning.
    let out = coffer(
        &cluster,
        1,
        &[
            "identity",
            "create",
            "alice",
            "--public-key",
            &alice,
            "--policy",
            "app-readers",
        ],
    );
    assert!(stdout(&out).contains("policies: app-readers"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"app-readers\" does not exist"),
        "{out:?}"
    );
    // Names and keys are unique; the administrator's key is taken.
    for (name, key) in [("alice", &bob), ("carol", &alice), ("dave", &admin_pub)] {
        let err = stderr_of_failure(&coffer(
            &cluster,
            2,
            &["identity", "create", name, "--public-key", key],
        ));
        assert!(
            err.contains("already") || err.contains("administrator's"),
            "{err}"
        );
    }
    // Read through another node; update the policies; admin cannot be changed.
    assert!(
        stdout(&coffer(&cluster, 3, &["identity", "read", "alice"])).contains("alice  SHA256:")
    );
    let out = stdout(&coffer(
        &cluster,
        3,
        &[
            "identity",
            "update",
            "alice",
            "--policy",
            "app-readers",
            "--policy",
            "admin",
        ],
    ));
    assert!(out.contains("policies: admin, app-readers"), "{out}");
    let err = stderr_of_failure(&coffer(&cluster, 1, &["identity", "delete", "admin"]));
    assert!(err.contains("cannot be changed"), "{err}");

    // Deleting alice frees her key for another identity.
    assert!(stdout(&coffer(&cluster, 2, &["identity", "delete", "alice"])).contains("deleted"));
    let err = stderr_of_failure(&coffer(&cluster, 1, &["identity", "read", "alice"]));
    assert!(err.contains("no identity"), "{err}");
    stdout(&coffer(
        &cluster,
        1,
        &["identity", "create", "carol", "--public-key", &alice],
    ));
    assert_eq!(
        stdout(&coffer(&cluster, 3, &["identity", "list"])),
        "admin\ncarol\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_challenge_works_once_cluster_wide() {
    use coffer_api::v1 as pb;
    use coffer_api::v1::auth_client::AuthClient;
    use coffer_node::keys::KeyPair;

    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let alice_pub = keygen(dir.path(), "alice");
    keygen(dir.path(), "mallory");
    let key = |name: &str| dir.path().join(format!("{name}.key")).display().to_string();
    stdout(&coffer(
        &cluster,
        1,
        &["identity", "create", "alice", "--public-key", &alice_pub],
    ));

    // The CLI logs in through any node, as a registered identity or as the administrator.
    let out = stdout(&coffer(&cluster, 2, &["login", "--key", &key("alice")]));
    assert!(out.contains("logged in as alice for "), "{out}");
    let admin_key = cluster.path().join("keys/admin.key").display().to_string();
    let out = stdout(&coffer(&cluster, 3, &["login", "--key", &admin_key]));
    assert!(out.contains("logged in as admin"), "{out}");
    let err = stderr_of_failure(&coffer(&cluster, 1, &["login", "--key", &key("mallory")]));
    assert!(err.contains("no identity has the key"), "{err}");

    // By hand: a challenge from node 1, the login through node 2, the same login replayed to
    // node 3: refused, the nonce is used cluster-wide.
    let alice = KeyPair::load(std::path::Path::new(&key("alice"))).expect("key");
    let first_session = KeyPair::generate().expect("session key");
    let c = AuthClient::new(cluster.channel(1))
        .challenge(pb::ChallengeRequest {})
        .await
        .expect("challenge")
        .into_inner();
    let request_with = |session: &KeyPair, challenge: Vec<u8>, cluster_id: &str| pb::LoginRequest {
        signature: alice
            .sign(&coffer_node::auth::login_message(
                cluster_id,
                &challenge,
                &session.public().to_bytes(),
                600,
            ))
            .to_vec(),
        challenge,
        public_key: alice.public().to_bytes().to_vec(),
        session_public_key: session.public().to_bytes().to_vec(),
        ttl_seconds: 600,
    };
    let request =
        |challenge: Vec<u8>, cluster_id: &str| request_with(&first_session, challenge, cluster_id);
    let ok = AuthClient::new(cluster.channel(2))
        .login(request(c.challenge.clone(), &c.cluster_id))
        .await
        .expect("login")
        .into_inner();
    assert_eq!(ok.identity, "alice");
    let replay = AuthClient::new(cluster.channel(3))
        .login(request(c.challenge.clone(), &c.cluster_id))
        .await
        .expect_err("replayed");
    assert_eq!(replay.code(), tonic::Code::Unauthenticated);
    assert!(replay.message().contains("already used"), "{replay:?}");

    // A signature over another cluster's id, and an altered challenge.
    let fresh = AuthClient::new(cluster.channel(1))
        .challenge(pb::ChallengeRequest {})
        .await
        .expect("challenge")
        .into_inner();
    let wrong = AuthClient::new(cluster.channel(1))
        .login(request(fresh.challenge.clone(), "another-cluster"))
        .await
        .expect_err("wrong cluster in the signature");
    assert!(
        wrong.message().contains("signature does not match"),
        "{wrong:?}"
    );
    let mut altered = fresh.challenge.clone();
    altered[0] ^= 1;
    let forged = AuthClient::new(cluster.channel(2))
        .login(request(altered, &fresh.cluster_id))
        .await
        .expect_err("altered challenge");
    assert!(
        forged.message().contains("not issued by this cluster"),
        "{forged:?}"
    );
    // The refused attempts did not use the fresh challenge up. A session key serves one login
    // only: each login makes a new one.
    let reused = AuthClient::new(cluster.channel(3))
        .login(request(fresh.challenge.clone(), &fresh.cluster_id))
        .await
        .expect_err("the session key has a session already");
    assert!(reused.message().contains("new session key"), "{reused:?}");
    let second_session = KeyPair::generate().expect("session key");
    AuthClient::new(cluster.channel(3))
        .login(request_with(
            &second_session,
            fresh.challenge,
            &fresh.cluster_id,
        ))
        .await
        .expect("the fresh challenge still works once");

    // Logins add reserved keys, which sort before every user key: a listing from the start
    // skips them, so even a page of one holds the user's key.
    cluster.must_put(1, "app/x", "1").await;
    let page = cluster
        .kv(2)
        .list(pb::ListRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page.kvs.len(), 1, "{page:?}");
    assert_eq!(page.kvs[0].key, b"app/x");

    // Challenges and logins are rate-limited per source on each node (a burst of 20).
    let mut auth = AuthClient::new(cluster.channel(2));
    let mut limited = None;
    for i in 0..40 {
        if let Err(e) = auth.challenge(pb::ChallengeRequest {}).await {
            limited = Some((i, e));
            break;
        }
    }
    let (after, e) = limited.expect("a burst of challenges is refused at some point");
    assert!(after >= 15, "refused after only {after} challenges");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.message()
            .contains("too many challenges and logins from 127.0.0."),
        "{e:?}"
    );
}
