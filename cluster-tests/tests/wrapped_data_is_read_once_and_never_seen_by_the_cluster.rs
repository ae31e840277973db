//! The wrap engine through the SDK on a three-node cluster:
//! - wrapped data is read exactly once, by its recipient only, until it expires; each refusal
//!   has a precise status and changes nothing;
//! - 32 concurrent readers of one wrap id spread over all nodes while the leader is killed:
//!   exactly one gets the data, over 20 repetitions;
//! - the plaintext never reaches the cluster: it is in no file of the data directories, no peer
//!   message (the test build's wire tap), and not even in the API traffic as a TLS-terminating
//!   proxy between the SDK and a node sees it (decrypted). As controls, that proxy does see a
//!   kv put's value and a plain get's answer, but not a sealed get's.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coffer_client::{Client, Config, Login};
use coffer_cluster_tests::{Cluster, ClusterOptions, files_under, plaintext_forms};
use coffer_node::keys::KeyPair;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const SENDER_POLICY: &str = r#"
path "wrap/to/bob" { capabilities = ["create"] }
path "secret/*" { capabilities = ["create", "read", "update", "list"] }
"#;

/// The sender `alice` (may wrap for `bob` only), the recipient `bob`, and `eve` (may wrap for
/// alice only), each with an SDK client over every node; with their key files.
async fn parties(cluster: &Cluster) -> [(Client, PathBuf); 3] {
    let mut out = Vec::new();
    for (name, policy) in [
        ("alice", SENDER_POLICY),
        (
            "bob",
            r#"path "secret/data/bob/*" { capabilities = ["read"] }"#,
        ),
        (
            "eve",
            r#"path "wrap/to/alice" { capabilities = ["create"] }"#,
        ),
    ] {
        let file = cluster.must_create_identity(name, policy).await;
        let key = KeyPair::load(&file).expect("key");
        out.push((cluster.sdk(&cluster.running(), Login::Key(key)).await, file));
    }
    out.try_into().expect("three parties")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapped_data_is_read_once_by_its_recipient_until_it_expires() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    let [(alice, _), (bob, bob_file), (eve, eve_file)] = parties(&cluster).await;
    let (bob_key, eve_key) = (
        KeyPair::load(&bob_file).unwrap(),
        KeyPair::load(&eve_file).unwrap(),
    );
    let payload = b"db password: correct horse battery staple";

    let wrapped = alice
        .wrap()
        .wrap(bob_key.public(), payload, Duration::from_secs(600))
        .await
        .expect("alice wraps for bob");
    assert_eq!(wrapped.recipient, "bob");
    assert!(
        wrapped.id.starts_with("w_") && wrapped.id.len() == 34,
        "{}",
        wrapped.id
    );
    let info = alice
        .wrap()
        .lookup(&wrapped.id)
        .await
        .expect("the sender looks it up");
    assert_eq!(
        (
            info.sender.as_str(),
            info.recipient.as_str(),
            info.consumed_ms
        ),
        ("alice", "bob", 0)
    );

    // Somebody else cannot read it, and trying does not consume it.
    let e = eve
        .wrap()
        .unwrap(&wrapped.id)
        .await
        .expect_err("eve is not the recipient");
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    assert!(
        e.to_string().contains("wrapped for identity \"bob\""),
        "{e}"
    );
    assert_eq!(
        eve.wrap().lookup(&wrapped.id).await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );

    // The recipient reads it once; the second read is refused and says when it was consumed.
    let got = bob.wrap().unwrap(&wrapped.id).await.expect("bob unwraps");
    assert_eq!(got.payload.as_slice(), payload);
    assert_eq!(got.sender, "alice");
    let again = bob.wrap().unwrap(&wrapped.id).await.expect_err("read once");
    assert_eq!(again.code(), Some(Code::NotFound), "{again}");
    assert!(again.to_string().contains("already consumed at"), "{again}");
    assert!(bob.wrap().lookup(&wrapped.id).await.unwrap().consumed_ms > 0);

    // Who may wrap for whom is a policy: eve may not wrap for bob, alice may not for eve.
    let e = eve
        .wrap()
        .wrap(bob_key.public(), b"x", Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    assert!(e.to_string().contains("wrap/to/bob"), "{e}");
    let e = alice
        .wrap()
        .wrap(eve_key.public(), b"x", Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    // A key no identity has: nobody could log in to read it.
    let stranger = KeyPair::generate().unwrap();
    let e = alice
        .wrap()
        .wrap(stranger.public(), b"x", Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
    assert!(e.to_string().contains("no identity has the key"), "{e}");

    // Expired data is unreadable at once (and then removed by the leader).
    let short = alice
        .wrap()
        .wrap(bob_key.public(), b"short-lived", Duration::from_secs(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let e = bob.wrap().unwrap(&short.id).await.expect_err("expired");
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    assert!(e.to_string().contains("expired at"), "{e}");

    // Malformed requests, sent as a client could: precise INVALID_ARGUMENT, nothing stored.
    let mut raw = coffer_api::wrap::v1::wrap_client::WrapClient::new(cluster.channel(1));
    let good = coffer_client::wrap::seal_wrap(bob_key.public(), b"x").unwrap();
    let request = coffer_api::wrap::v1::CreateRequest {
        recipient_key: bob_key.public().to_bytes().to_vec(),
        encapsulated_key: good.encapsulated_key.to_vec(),
        ciphertext: good.ciphertext.clone(),
        ttl_ms: 60_000,
        wrap_id: good.wrap_id.clone(),
        request_id: Vec::new(),
    };
    for (what, broken, says) in [
        (
            "an Ed25519 key alone",
            coffer_api::wrap::v1::CreateRequest {
                recipient_key: bob_key.public().signing_key().to_vec(),
                ..request.clone()
            },
            "X25519",
        ),
        (
            "a short encapsulated key",
            coffer_api::wrap::v1::CreateRequest {
                encapsulated_key: vec![1; 16],
                ..request.clone()
            },
            "malformed ciphertext",
        ),
        (
            "no ciphertext",
            coffer_api::wrap::v1::CreateRequest {
                ciphertext: vec![1; 3],
                ..request.clone()
            },
            "malformed ciphertext",
        ),
        (
            "a ttl of a year",
            coffer_api::wrap::v1::CreateRequest {
                ttl_ms: 365 * 86_400_000,
                ..request.clone()
            },
            "30 days",
        ),
        (
            "no wrap id",
            coffer_api::wrap::v1::CreateRequest {
                wrap_id: Vec::new(),
                ..request.clone()
            },
            "16 random bytes",
        ),
    ] {
        let e = raw.create(broken).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains(says), "{what}: {e:?}");
    }
    let e = bob.wrap().unwrap("w_nothex").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    let never = format!("w_{}", "ab".repeat(16));
    assert_eq!(
        bob.wrap().unwrap(&never).await.unwrap_err().code(),
        Some(Code::NotFound)
    );
    // Ciphertext tampered with on its way: stored, but the recipient's SDK refuses it.
    let mut tampered = request.clone();
    tampered.ciphertext[0] ^= 1;
    let id = raw
        .create(tampered)
        .await
        .expect("stored as given")
        .into_inner()
        .id;
    let e = bob.wrap().unwrap(&id).await.expect_err("tampered");
    assert!(e.to_string().contains("does not decrypt"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_readers_and_a_leader_kill_one_wins_every_time() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await;
    let [(alice, _), (_, bob_file), _] = parties(&cluster).await;
    let bob_key = KeyPair::load(&bob_file).unwrap();
    // One SDK client per node, each starting there and failing over to the others.
    let mut readers = Vec::new();
    for first in cluster.running() {
        let mut order = vec![first];
        order.extend(cluster.running().into_iter().filter(|id| *id != first));
        let key = KeyPair::load(&bob_file).unwrap();
        readers.push(cluster.sdk(&order, Login::Key(key)).await);
    }
    let mut rounds_with_readers_past_the_kill = 0;
    for round in 0..20 {
        let payload = format!("round {round}");
        let id = alice
            .wrap()
            .wrap(
                bob_key.public(),
                payload.as_bytes(),
                Duration::from_secs(600),
            )
            .await
            .expect("wrap")
            .id;
        let leader = cluster.must_wait_leader(Duration::from_secs(20)).await;
        let mut tasks = Vec::new();
        for i in 0..32 {
            let client = readers[i % readers.len()].clone();
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                let r = client.wrap().unwrap(&id).await;
                (r, std::time::Instant::now())
            }));
        }
        // Kill the leader while the reads are in flight (at a different moment each round).
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..30))).await;
        cluster.kill(leader);
        let killed_at = std::time::Instant::now();
        let mut won = Vec::new();
        let mut after_kill = false;
        for t in tasks {
            let (r, done) = t.await.expect("reader task");
            after_kill |= done > killed_at;
            match r {
                Ok(u) => won.push(String::from_utf8(u.payload.to_vec()).unwrap()),
                Err(e) => {
                    assert_eq!(e.code(), Some(Code::NotFound), "round {round}: {e}");
                    assert!(
                        e.to_string().contains("already consumed"),
                        "round {round}: {e}"
                    );
                }
            }
        }
        assert_eq!(
            won,
            vec![payload],
            "round {round}: exactly one reader gets the data"
        );
        rounds_with_readers_past_the_kill += u32::from(after_kill);
        cluster.spawn(leader);
        cluster
            .must_wait_unsealed(&[leader], Duration::from_secs(30))
            .await;
    }
    // The kill lands among the reads, not after them: in most rounds some reader was still
    // waiting for its answer when the leader died.
    assert!(
        rounds_with_readers_past_the_kill >= 10,
        "only {rounds_with_readers_past_the_kill} of 20 rounds had reads in flight at the kill"
    );
}

/// A TLS-terminating proxy in front of node `node`: it serves TLS to the client with a
/// certificate of the cluster CA, forwards the decrypted bytes to the node over TLS presenting
/// `session`, and records everything it saw in both directions.
async fn terminating_proxy(
    cluster: &Cluster,
    node: u64,
    session: &coffer_client::SessionCredentials,
) -> (String, Arc<Mutex<Vec<u8>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (cert_pem, key_pem) = cluster.issue_bootstrap_certificate(node);
    let pem_certs = |pem: &str| {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("certificates")
    };
    let pem_key = |pem: &str| {
        rustls_pemfile::private_key(&mut pem.as_bytes())
            .expect("key")
            .expect("a key")
    };
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(pem_certs(&cert_pem), pem_key(&key_pem))
        .expect("server config");
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    for ca in pem_certs(std::str::from_utf8(cluster.ca_pem()).unwrap()) {
        roots.add(ca).expect("CA");
    }
    let mut client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(pem_certs(&session.certificate), pem_key(&session.key))
        .expect("client config");
    client.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let upstream = cluster.endpoints(&[node])[0].clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, connector, upstream, record) = (
                acceptor.clone(),
                connector.clone(),
                upstream.clone(),
                record.clone(),
            );
            tokio::spawn(async move {
                let Ok(down) = acceptor.accept(tcp).await else {
                    return;
                };
                let host = upstream.rsplit_once(':').unwrap().0.to_string();
                let name = rustls::pki_types::ServerName::try_from(host).unwrap();
                let Ok(tcp) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let Ok(up) = connector.connect(name, tcp).await else {
                    return;
                };
                let (mut dr, mut dw) = tokio::io::split(down);
                let (mut ur, mut uw) = tokio::io::split(up);
                let (r1, r2) = (record.clone(), record);
                let a = async move {
                    let mut buf = vec![0u8; 16 << 10];
                    while let Ok(n @ 1..) = dr.read(&mut buf).await {
                        r1.lock().unwrap().extend_from_slice(&buf[..n]);
                        if uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let b = async move {
                    let mut buf = vec![0u8; 16 << 10];
                    while let Ok(n @ 1..) = ur.read(&mut buf).await {
                        r2.lock().unwrap().extend_from_slice(&buf[..n]);
                        if dw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::join!(a, b);
            });
        }
    });
    (addr, seen)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrapped_plaintext_never_reaches_the_cluster() {
    const MARKER: &[u8] = b"WRAP-MARKER-5c1e-never-seen-by-any-node";
    let taps = tempfile::tempdir().expect("tempdir");
    let options = ClusterOptions {
        env: vec![(
            "COFFER_TEST_WIRE_TAP".into(),
            taps.path().join("wire").display().to_string(),
        )],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(3, options).await;
    let [(alice, alice_file), (bob, bob_file), _] = parties(&cluster).await;
    let bob_key = KeyPair::load(&bob_file).unwrap();
    let ca = cluster.ca_pem().to_vec();
    let through = |addr: String, key: KeyPair, session: coffer_client::SessionCredentials| {
        let ca = ca.clone();
        async move {
            let mut config = Config::new([addr], ca, Login::Key(key));
            config.initial_session = Some(session);
            Client::connect(config)
                .await
                .expect("a client through the proxy")
        }
    };
    let (alice_proxy, alice_seen) = terminating_proxy(&cluster, 1, &alice.session()).await;
    let alice_via = through(
        alice_proxy,
        KeyPair::load(&alice_file).unwrap(),
        alice.session(),
    )
    .await;
    let (bob_proxy, bob_seen) = terminating_proxy(&cluster, 2, &bob.session()).await;
    let bob_via = through(bob_proxy, KeyPair::load(&bob_file).unwrap(), bob.session()).await;

    let wrapped = alice_via
        .wrap()
        .wrap(bob_key.public(), MARKER, Duration::from_secs(600))
        .await
        .expect("wrap through the proxy");
    let got = bob_via
        .wrap()
        .unwrap(&wrapped.id)
        .await
        .expect("unwrap through the proxy");
    assert_eq!(got.payload.as_slice(), MARKER);

    // Controls: the proxy sees what is not wrapped or sealed.
    alice_via
        .kv("secret")
        .put("alice/put", [("v", "CONTROL-PUT-VALUE-visible")])
        .await
        .unwrap();
    alice
        .kv("secret")
        .put("alice/plain", [("v", "CONTROL-GET-VALUE-visible")])
        .await
        .unwrap();
    alice
        .kv("secret")
        .put("alice/sealed", [("v", "SEALED-VALUE-hidden-from-proxy")])
        .await
        .unwrap();
    assert_eq!(
        alice_via
            .kv("secret")
            .get("alice/plain")
            .await
            .unwrap()
            .data
            .get("v"),
        Some("CONTROL-GET-VALUE-visible")
    );
    let sealed = alice_via
        .kv("secret")
        .get_sealed("alice/sealed")
        .await
        .unwrap();
    assert_eq!(sealed.data.get("v"), Some("SEALED-VALUE-hidden-from-proxy"));
    let proxied: Vec<u8> = [
        alice_seen.lock().unwrap().clone(),
        bob_seen.lock().unwrap().clone(),
    ]
    .concat();
    assert!(
        contains(&proxied, b"CONTROL-PUT-VALUE-visible"),
        "the proxy sees a put's value"
    );
    assert!(
        contains(&proxied, b"CONTROL-GET-VALUE-visible"),
        "the proxy sees a get's answer"
    );
    assert!(
        !contains(&proxied, b"SEALED-VALUE-hidden-from-proxy"),
        "a sealed answer hides it"
    );

    cluster.must_converge(Duration::from_secs(20)).await;
    let mut found = Vec::new();
    for (form, needle) in plaintext_forms(MARKER) {
        if contains(&proxied, &needle) {
            found.push(format!("{form} in the API traffic"));
        }
        for file in files_under(cluster.path())
            .iter()
            .chain(&files_under(taps.path()))
        {
            if contains(&std::fs::read(file).expect("read"), &needle) {
                found.push(format!("{form} in {}", file.display()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "wrapped plaintext reached the cluster: {found:#?}"
    );
    let wire = files_under(taps.path());
    assert!(
        wire.len() >= 3,
        "every node's wire tap wrote a file: {wire:?}"
    );
}
