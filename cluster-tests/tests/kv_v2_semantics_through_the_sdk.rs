//! The kv engine's Vault KV v2 rules, each checked through the Rust SDK against a three-node
//! cluster, as an identity with a policy (not the administrator): versions, reads of a given
//! version, check-and-set (given, and required per secret and per mount), patch, soft delete,
//! undelete, destroy, deleting all metadata, max_versions (enforced by the write that adds a
//! version), delete_version_after, custom metadata, listing by folder with pages, sealed
//! responses, the policy paths of each operation, and bad input that changes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use coffer_client::kv::{MetadataUpdate, MountOptions, Patch, ReadOptions};
use coffer_client::{Client, Error, Login};
use coffer_cluster_tests::{Cluster, ClusterOptions, wait_until};
use tonic::Code;

/// What the service identity may do: everything in `secret` and `team`, as a policy grants it.
const APP_POLICY: &str = r#"
path "secret/*" { capabilities = ["create", "read", "update", "patch", "delete", "list"] }
path "team/*" { capabilities = ["create", "read", "update", "patch", "delete", "list"] }
"#;

async fn app_client(cluster: &Cluster, name: &str, policy: &str) -> Client {
    let file = cluster.must_create_identity(name, policy).await;
    let key = coffer_node::keys::KeyPair::load(&file).expect("identity key");
    cluster.sdk(&cluster.running(), Login::Key(key)).await
}

fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(r: Result<T, Error>, code: Code, says: &str) {
    let e = r.expect_err("refused");
    assert_eq!(e.code(), Some(code), "{e}");
    assert!(e.to_string().contains(says), "{e} should say {says:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_check_and_set_patch_and_max_versions() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    let app = app_client(&cluster, "app", APP_POLICY).await;
    let kv = app.kv("secret");

    // Rule: a put creates a new version; get reads the latest or a given one, on every node.
    assert_eq!(
        kv.put("app/db", fields(&[("user", "app"), ("pass", "one")]))
            .await
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        kv.put("app/db", fields(&[("user", "app"), ("pass", "two")]))
            .await
            .unwrap()
            .version,
        2
    );
    for id in cluster.running() {
        let pinned = cluster.sdk(&[id], Login::Session(app.session())).await;
        let latest = pinned
            .kv("secret")
            .get("app/db")
            .await
            .expect("get on every node");
        assert_eq!(
            (latest.version.version, latest.data.get("pass")),
            (2, Some("two"))
        );
    }
    let first = kv.get_version("app/db", 1).await.unwrap();
    assert_eq!(first.data.get("pass"), Some("one"));
    assert!(first.version.created_ms > 0);
    let stale = kv
        .get_with(
            "app/db",
            ReadOptions {
                version: 0,
                stale: true,
            },
        )
        .await
        .unwrap();
    assert!(
        stale.version.version >= 1,
        "a stale read sees some applied version"
    );

    // Rule: check-and-set: the write happens only if the current version is the one given.
    assert_refused(
        kv.put_cas("app/db", fields(&[("pass", "x")]), 1).await,
        Code::FailedPrecondition,
        "the current version is 2, not 1",
    );
    assert_eq!(
        kv.put_cas("app/db", fields(&[("pass", "three")]), 2)
            .await
            .unwrap()
            .version,
        3
    );
    assert_refused(
        kv.put_cas("app/new", fields(&[("a", "1")]), 5).await,
        Code::FailedPrecondition,
        "the current version is 0",
    );
    assert_eq!(
        kv.put_cas("app/new", fields(&[("a", "1")]), 0)
            .await
            .unwrap()
            .version,
        1
    );
    assert_refused(
        kv.put_cas("app/new", fields(&[("a", "2")]), 0).await,
        Code::FailedPrecondition,
        "not 0",
    );

    // Rule: cas_required on a secret refuses writes without cas.
    kv.write_metadata(
        "app/db",
        MetadataUpdate {
            cas_required: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_refused(
        kv.put("app/db", fields(&[("pass", "x")])).await,
        Code::FailedPrecondition,
        "check-and-set is required",
    );
    assert_eq!(
        kv.put_cas("app/db", fields(&[("pass", "four")]), 3)
            .await
            .unwrap()
            .version,
        4
    );

    // Rule: cas_required on a mount applies to every secret in it.
    let admin = cluster
        .sdk(
            &cluster.running(),
            Login::Key(coffer_node::keys::KeyPair::load(&cluster.admin_key()).unwrap()),
        )
        .await;
    let mount = admin
        .mounts()
        .enable(
            "team",
            MountOptions {
                cas_required: true,
                max_versions: 2,
                ..Default::default()
            },
        )
        .await
        .expect("enable the team mount");
    assert_eq!((mount.max_versions, mount.cas_required), (2, true));
    let team = app.kv("team");
    assert_refused(
        team.put("svc/key", fields(&[("k", "1")])).await,
        Code::FailedPrecondition,
        "check-and-set is required",
    );
    team.put_cas("svc/key", fields(&[("k", "1")]), 0)
        .await
        .unwrap();
    let names: Vec<String> = admin
        .mounts()
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.path)
        .collect();
    assert_eq!(names, vec!["secret".to_string(), "team".to_string()]);

    // Rule: patch changes some fields, keeps the others, and makes a new version.
    let patched = kv
        .patch(
            "app/db",
            Patch {
                set: [("pass", "five"), ("host", "db1")].into_iter().collect(),
                remove: vec!["user".into()],
                cas: Some(4),
            },
        )
        .await
        .unwrap();
    assert_eq!(patched.version, 5);
    let now = kv.get("app/db").await.unwrap();
    assert_eq!(now.data.get("pass"), Some("five"));
    assert_eq!(now.data.get("host"), Some("db1"));
    assert_eq!(now.data.get("user"), None);
    assert_refused(
        kv.patch(
            "app/db",
            Patch {
                set: [("pass", "x")].into_iter().collect(),
                remove: Vec::new(),
                cas: Some(1),
            },
        )
        .await,
        Code::FailedPrecondition,
        "not 1",
    );
    assert_refused(
        kv.patch(
            "app/none",
            Patch {
                set: [("a", "b")].into_iter().collect(),
                ..Default::default()
            },
        )
        .await,
        Code::NotFound,
        "nothing to patch",
    );

    // Rule: versions beyond max_versions (10 by default) are removed by the write that adds
    // one: the metadata never lists more, and the removed ones read as not found.
    for n in 1..=12 {
        let v = kv
            .put("app/rotating", fields(&[("n", &n.to_string())]))
            .await
            .unwrap();
        let meta = kv.read_metadata("app/rotating").await.unwrap();
        assert!(
            meta.versions.len() <= 10,
            "after version {}: {} kept",
            v.version,
            meta.versions.len()
        );
    }
    let meta = kv.read_metadata("app/rotating").await.unwrap();
    assert_eq!(
        (
            meta.current_version,
            meta.oldest_version,
            meta.effective_max_versions
        ),
        (12, 3, 10)
    );
    assert_refused(
        kv.get_version("app/rotating", 2).await,
        Code::NotFound,
        "newest 10 versions",
    );
    assert_eq!(
        kv.get_version("app/rotating", 3)
            .await
            .unwrap()
            .data
            .get("n"),
        Some("3")
    );
    // A secret's own setting, lowered, removes the extra versions at once; the mount's
    // setting (team: 2) applies to its secrets.
    let meta = kv
        .write_metadata(
            "app/rotating",
            MetadataUpdate {
                max_versions: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((meta.oldest_version, meta.versions.len()), (10, 3));
    for cas in 1..=3 {
        team.put_cas("svc/key", fields(&[("k", "again")]), cas)
            .await
            .unwrap();
    }
    let meta = team.read_metadata("svc/key").await.unwrap();
    assert_eq!((meta.current_version, meta.oldest_version), (4, 3));

    // A read never sees metadata naming a version whose data a concurrent write removed: with
    // one version kept, every write removes the one before while reads go on.
    kv.write_metadata(
        "app/hot",
        MetadataUpdate {
            max_versions: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    kv.put("app/hot", fields(&[("n", "0")])).await.unwrap();
    let writer = {
        let kv = app.kv("secret");
        tokio::spawn(async move {
            for n in 1..=150 {
                kv.put("app/hot", fields(&[("n", &n.to_string())]))
                    .await
                    .expect("put");
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() {
        let got = kv
            .get("app/hot")
            .await
            .expect("every read finds the latest version's data");
        assert!(got.data.get("n").is_some());
        reads += 1;
    }
    writer.await.expect("writer");
    assert!(reads > 10, "reads ran alongside the writes: {reads}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_undelete_destroy_metadata_and_listing() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    let app = app_client(&cluster, "app", APP_POLICY).await;
    let kv = app.kv("secret");
    for n in 1..=3 {
        kv.put("app/db", fields(&[("v", &n.to_string())]))
            .await
            .unwrap();
    }

    // Rule: delete without versions soft-deletes the latest; the older ones stay readable.
    assert_eq!(kv.delete("app/db", &[]).await.unwrap(), vec![3]);
    assert_refused(
        kv.get("app/db").await,
        Code::NotFound,
        "version 3 of \"app/db\" was deleted",
    );
    assert_eq!(
        kv.get_version("app/db", 2).await.unwrap().data.get("v"),
        Some("2")
    );
    // Deleting given versions; deleting one already deleted changes nothing.
    assert_eq!(kv.delete("app/db", &[1, 3]).await.unwrap(), vec![1]);
    let meta = kv.read_metadata("app/db").await.unwrap();
    let deleted: Vec<u64> = meta
        .versions
        .iter()
        .filter(|v| v.deleted_ms > 0)
        .map(|v| v.version)
        .collect();
    assert_eq!(deleted, vec![1, 3]);

    // Rule: undelete brings soft-deleted versions back.
    assert_eq!(kv.undelete("app/db", &[3]).await.unwrap(), vec![3]);
    assert_eq!(kv.get("app/db").await.unwrap().data.get("v"), Some("3"));

    // Rule: destroy removes the data for good; undelete cannot bring it back.
    assert_eq!(kv.destroy("app/db", &[2]).await.unwrap(), vec![2]);
    assert_refused(
        kv.get_version("app/db", 2).await,
        Code::NotFound,
        "destroyed",
    );
    assert_eq!(
        kv.undelete("app/db", &[2]).await.unwrap(),
        Vec::<u64>::new()
    );
    assert_refused(
        kv.get_version("app/db", 2).await,
        Code::NotFound,
        "destroyed",
    );
    let meta = kv.read_metadata("app/db").await.unwrap();
    assert!(meta.versions.iter().any(|v| v.version == 2 && v.destroyed));

    // Rule: deleting the metadata removes the secret and every version; a new put starts over.
    assert!(kv.delete_metadata("app/db").await.unwrap());
    assert_refused(kv.get("app/db").await, Code::NotFound, "no secret");
    assert_refused(
        kv.read_metadata("app/db").await,
        Code::NotFound,
        "no secret",
    );
    assert!(
        !kv.delete_metadata("app/db").await.unwrap(),
        "nothing left to delete"
    );
    assert_eq!(
        kv.put("app/db", fields(&[("v", "new")]))
            .await
            .unwrap()
            .version,
        1
    );

    // Rule: metadata: times, current and oldest version, settings and custom metadata.
    let before = coffer_node::auth::now_ms();
    kv.put("app/meta", fields(&[("a", "1")])).await.unwrap();
    let custom: std::collections::HashMap<String, String> =
        [("owner".to_string(), "team-a".to_string())]
            .into_iter()
            .collect();
    let meta = kv
        .write_metadata(
            "app/meta",
            MetadataUpdate {
                custom_metadata: Some(custom.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(meta.created_ms >= before.saturating_sub(5_000) && meta.updated_ms >= meta.created_ms);
    assert_eq!((meta.current_version, meta.oldest_version), (1, 1));
    assert_eq!(meta.effective_max_versions, 10);
    assert_eq!(
        meta.custom_metadata.get("owner").map(String::as_str),
        Some("team-a")
    );
    assert_eq!(kv.get("app/meta").await.unwrap().custom_metadata, custom);

    // Rule: delete_version_after: a version expires that long after it was written.
    kv.write_metadata(
        "app/short",
        MetadataUpdate {
            delete_version_after: Some(Duration::from_millis(1500)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    kv.put("app/short", fields(&[("t", "1")])).await.unwrap();
    assert_eq!(kv.get("app/short").await.unwrap().data.get("t"), Some("1"));
    wait_until(Duration::from_secs(10), "the version to expire", || async {
        match kv.get("app/short").await {
            Err(e)
                if e.code() == Some(Code::NotFound) && e.to_string().contains("was deleted at") =>
            {
                Some(())
            }
            _ => None,
        }
    })
    .await;

    // Rule: list names what is directly under a folder (folders end in '/'), page by page.
    for i in 0..230 {
        kv.put(&format!("many/s{i:03}"), fields(&[("i", "x")]))
            .await
            .unwrap();
    }
    kv.put("many/sub/deeper/x", fields(&[("i", "x")]))
        .await
        .unwrap();
    let names = kv.list("many/").await.unwrap();
    assert_eq!(
        names.len(),
        231,
        "230 secrets and one folder, over three pages"
    );
    assert_eq!(names.first().map(String::as_str), Some("s000"));
    assert!(names.contains(&"sub/".to_string()));
    let top = kv.list("").await.unwrap();
    assert_eq!(top, vec!["app/".to_string(), "many/".to_string()]);
    assert_eq!(
        kv.list("many/sub/").await.unwrap(),
        vec!["deeper/".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_responses_policies_and_bad_input() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    let app = app_client(&cluster, "app", APP_POLICY).await;
    let kv = app.kv("secret");
    kv.put("app/db", fields(&[("pass", "sealed-value")]))
        .await
        .unwrap();

    // Rule: a sealed response is encrypted to the caller's key; the SDK opens it.
    let sealed = kv.get_sealed("app/db").await.unwrap();
    assert_eq!(sealed.data.get("pass"), Some("sealed-value"));
    // On the wire the answer holds no field, and the sealed bytes do not hold the value.
    let mut raw =
        coffer_api::kv::v1::kv_client::KvClient::new(coffer_client_channel(&cluster, &app));
    let answer = raw
        .get(coffer_api::kv::v1::GetRequest {
            mount: "secret".into(),
            path: "app/db".into(),
            seal_to_caller: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.data.is_empty());
    assert!(!answer.sealed_data.is_empty());
    assert!(!answer.sealed_data.windows(12).any(|w| w == b"sealed-value"));
    // Another identity's key does not open it.
    let other = coffer_node::keys::KeyPair::generate().unwrap();
    assert!(
        other
            .open(b"coffer sealed response v1", &answer.sealed_data)
            .is_err()
    );

    // Rule: each operation is authorized at its Vault KV v2 path.
    let reader = app_client(
        &cluster,
        "reader",
        r#"path "secret/data/app/*" { capabilities = ["read"] }
path "secret/metadata/app/*" { capabilities = ["read"] }"#,
    )
    .await;
    let rkv = reader.kv("secret");
    assert_eq!(
        rkv.get("app/db").await.unwrap().data.get("pass"),
        Some("sealed-value")
    );
    rkv.read_metadata("app/db").await.unwrap();
    for (what, r) in [
        (
            "put",
            rkv.put("app/db", fields(&[("x", "1")])).await.map(|_| ()),
        ),
        ("delete", rkv.delete("app/db", &[]).await.map(|_| ())),
        (
            "delete versions",
            rkv.delete("app/db", &[1]).await.map(|_| ()),
        ),
        ("undelete", rkv.undelete("app/db", &[1]).await.map(|_| ())),
        ("destroy", rkv.destroy("app/db", &[1]).await.map(|_| ())),
        (
            "metadata delete",
            rkv.delete_metadata("app/db").await.map(|_| ()),
        ),
        ("list", rkv.list("app/").await.map(|_| ())),
        ("other path", rkv.get("other/x").await.map(|_| ())),
    ] {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Some(Code::PermissionDenied), "{what}: {e}");
    }
    let denied = rkv.destroy("app/db", &[1]).await.unwrap_err().to_string();
    assert!(denied.contains("secret/destroy/app/db"), "{denied}");

    // Every list is paged: the administration lists too (the SDK follows the pages).
    let mut policies = coffer_api::v1::policies_client::PoliciesClient::new(cluster.channel(1));
    let first = policies
        .list(coffer_api::v1::PolicyListRequest {
            start_after: String::new(),
            limit: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.names.len(), first.more), (1, true));
    let rest = policies
        .list(coffer_api::v1::PolicyListRequest {
            start_after: first.names[0].clone(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!rest.more && !rest.names.contains(&first.names[0]));
    let mut all = first.names.clone();
    all.extend(rest.names);
    let admin_key = coffer_node::keys::KeyPair::load(&cluster.admin_key()).unwrap();
    let admin = cluster.sdk(&cluster.running(), Login::Key(admin_key)).await;
    assert_eq!(
        all,
        admin.policies().list().await.unwrap(),
        "the SDK follows the pages"
    );
    assert!(
        all.contains(&"app".to_string()) && all.contains(&"reader".to_string()),
        "{all:?}"
    );

    // Rule: bad input gets a precise status and changes nothing.
    let before = kv.read_metadata("app/db").await.unwrap();
    for (path, says) in [
        ("/app", "empty"),
        ("app//x", "empty"),
        ("app/../x", "`..`"),
        ("app/\u{1}x", "control character"),
    ] {
        assert_refused(
            kv.put(path, fields(&[("a", "b")])).await,
            Code::InvalidArgument,
            says,
        );
    }
    assert_refused(
        app.kv("nosuch").get("app/db").await,
        Code::NotFound,
        "coffer secrets enable kv --path nosuch",
    );
    assert_refused(
        app.kv("sys").get("x").await,
        Code::InvalidArgument,
        "reserved",
    );
    let big = "x".repeat(2 << 20);
    assert_refused(
        kv.put("app/db", fields(&[("big", &big)])).await,
        Code::InvalidArgument,
        "--max-value-bytes",
    );
    assert_refused(
        kv.get_version("app/db", 9).await,
        Code::NotFound,
        "newest is version 1",
    );
    assert_refused(
        kv.undelete("app/db", &[7]).await,
        Code::NotFound,
        "no version 7",
    );
    assert_refused(
        kv.undelete("app/db", &[]).await,
        Code::InvalidArgument,
        "name the versions",
    );
    assert_refused(
        kv.list("app").await,
        Code::InvalidArgument,
        "must end in '/'",
    );
    let after = kv.read_metadata("app/db").await.unwrap();
    assert_eq!(
        (
            after.current_version,
            after.updated_ms,
            after.versions.len()
        ),
        (
            before.current_version,
            before.updated_ms,
            before.versions.len()
        ),
        "refused requests changed nothing"
    );
    assert_eq!(
        kv.get("app/db").await.unwrap().data.get("pass"),
        Some("sealed-value")
    );
}

/// A plain gRPC channel to node 1 presenting `client`'s session (to look at the wire answer).
fn coffer_client_channel(cluster: &Cluster, client: &Client) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let session = client.session();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(cluster.ca_pem()))
        .identity(Identity::from_pem(
            &session.certificate,
            session.key.as_bytes(),
        ));
    Endpoint::from_shared(format!("https://{}", cluster.endpoints(&[1])[0]))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy()
}
