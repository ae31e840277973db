//! `coffer server --transient`: one process, in memory, TLS on. It initializes and unseals
//! itself with keys it writes (private keys 0600) and serves data at once, through the kv
//! engine (the raw store API is off, as on every node started without
//! `--raw-storage-endpoint`); after a restart its data and key set are gone and it starts over
//! with new keys.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use coffer_api::kv::v1 as kvpb;
use coffer_api::kv::v1::kv_client::KvClient;
use coffer_api::v1 as pb;
use coffer_api::v1::seal_client::SealClient;
use coffer_cluster_tests::{coffer_bin, wait_until};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, api: &str, peer: &str) -> Server {
    let tls = dir.join("tls");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .expect("log");
    Server(
        Command::new(coffer_bin())
            .args(["server", "--transient", "--node-id", "1"])
            .args(["--api-addr", api, "--peer-addr", peer])
            .arg("--tls-cert")
            .arg(tls.join("node-1.pem"))
            .arg("--tls-key")
            .arg(tls.join("node-1-key.pem"))
            .arg("--tls-ca")
            .arg(tls.join("ca.pem"))
            .arg("--keys-dir")
            .arg(dir.join("keys"))
            .stdout(Stdio::from(log.try_clone().expect("clone")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start coffer server --transient"),
    )
}

/// A channel presenting a session of the administrator key in the keys directory.
async fn admin_channel(dir: &Path, api: &str) -> Channel {
    admin_channel_with(dir, api, &dir.join("keys/admin.key")).await
}

/// A channel presenting a session of the administrator key `key` when it logs in, or none.
async fn admin_channel_with(dir: &Path, api: &str, key: &Path) -> Channel {
    let mut target = coffer_node::client::Target::new(
        &[api.to_string()],
        Some(&dir.join("tls/ca.pem")),
        Duration::from_secs(5),
    )
    .expect("target");
    if let Err(e) = target.login(key, 0).await {
        assert!(
            format!("{e:#}").contains("no identity has the key"),
            "{e:#}"
        );
    }
    target.channel_to(api).expect("channel")
}

fn channel(dir: &Path, api: &str) -> Channel {
    let ca = std::fs::read(dir.join("tls/ca.pem")).expect("ca");
    Endpoint::from_shared(format!("https://{api}"))
        .expect("endpoint")
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .expect("tls")
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// Waits until the node is unsealed and returns its key-set id.
async fn unsealed_cluster_id(dir: &Path, api: &str) -> String {
    wait_until(
        Duration::from_secs(30),
        "the transient server to unseal itself",
        || async {
            let s = SealClient::new(channel(dir, api))
                .seal_status(pb::SealStatusRequest {})
                .await
                .ok()?
                .into_inner();
            (s.initialized && !s.sealed).then_some(s.cluster_id)
        },
    )
    .await
}

/// Waits until the administrator (whose session `admin` presents) holds the dev-data policy,
/// which the transient server adds right after it unsealed itself.
async fn wait_for_dev_data(admin: &Channel) {
    wait_until(
        Duration::from_secs(10),
        "the admin to hold dev-data",
        || {
            let mut ids = coffer_api::v1::identities_client::IdentitiesClient::new(admin.clone());
            async move {
                let r = ids
                    .read(pb::IdentityReadRequest {
                        name: "admin".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                r.policies.iter().any(|p| p == "dev-data").then_some(())
            }
        },
    )
    .await;
}

fn get_request() -> kvpb::GetRequest {
    kvpb::GetRequest {
        mount: "secret".into(),
        path: "app/db".into(),
        ..Default::default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_server_initializes_itself_and_forgets_on_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let out = Command::new(coffer_bin())
        .args(["certs", "--dir"])
        .arg(d.join("tls"))
        .args(["--node", "1=127.0.0.1"])
        .output()
        .expect("coffer certs");
    assert!(out.status.success(), "{out:?}");
    let api = format!("127.0.0.1:{}", free_port());
    let peer = format!("127.0.0.1:{}", free_port());

    let server = start(d, &api, &peer);
    let first = unsealed_cluster_id(d, &api).await;
    for name in ["operator.key", "admin.key", "operator.share"] {
        let mode = std::fs::metadata(d.join("keys").join(name))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{name} is readable by others: {mode:o}");
    }
    // The generated administrator key logs in and, on a transient cluster, may use the data:
    // the server adds the dev-data policy to it right after unsealing.
    let admin = admin_channel(d, &api).await;
    wait_for_dev_data(&admin).await;
    let raw = coffer_api::v1::kv_client::KvClient::new(admin.clone())
        .get(pb::GetRequest {
            key: b"app/db".to_vec(),
            consistency: 0,
        })
        .await
        .expect_err("the raw store API is off by default");
    assert_eq!(raw.code(), tonic::Code::Unimplemented, "{raw:?}");
    assert!(raw.message().contains("coffer.kv.v1"), "{raw:?}");
    let mut kv = KvClient::new(admin);
    kv.put(kvpb::PutRequest {
        mount: "secret".into(),
        path: "app/db".into(),
        data: [("password".to_string(), "s3cret".to_string())]
            .into_iter()
            .collect(),
        ..Default::default()
    })
    .await
    .expect("put");
    let got = kv.get(get_request()).await.expect("get").into_inner();
    assert_eq!(got.data["password"], "s3cret");
    let old_key = std::fs::read(d.join("keys/operator.key")).expect("key");
    let old_admin = d.join("old-admin.key");
    std::fs::copy(d.join("keys/admin.key"), &old_admin).expect("copy the old admin key");

    // A restart replaces only the files it wrote in the keys directory.
    std::fs::write(d.join("keys/notes.txt"), "mine").expect("write");
    drop(server);
    let _server = start(d, &api, &peer);
    let second = unsealed_cluster_id(d, &api).await;
    assert_ne!(
        first, second,
        "a restarted transient server is a new cluster"
    );
    assert_ne!(
        std::fs::read(d.join("keys/operator.key")).expect("key"),
        old_key,
        "new keys replace the old ones"
    );
    let old_session = KvClient::new(admin_channel_with(d, &api, &old_admin).await)
        .get(get_request())
        .await
        .expect_err("the old administrator key is no identity of the new cluster");
    assert_eq!(old_session.code(), tonic::Code::Unauthenticated);
    let admin = admin_channel(d, &api).await;
    wait_for_dev_data(&admin).await;
    let gone = KvClient::new(admin)
        .get(get_request())
        .await
        .expect_err("the data is gone");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert_eq!(
        std::fs::read_to_string(d.join("keys/notes.txt")).expect("still there"),
        "mine"
    );
}
