//! Scheduled backups: with `--snapshot-dir`, `--snapshot-interval 1s` and
//! `--snapshot-retain 2` on every node of a three-node cluster sharing one directory, only the
//! leader writes backup files (each names the node that wrote it), they verify, a backup
//! written after an acknowledged write holds it, and retention keeps the directory at two files
//! (three for the moment between a new file's rename and the oldest one's deletion) while new
//! ones keep coming.

use std::collections::BTreeSet;
use std::time::Duration;

use coffer_client::Login;
use coffer_cluster_tests::{Cluster, ClusterOptions, wait_until};
use coffer_node::keys::KeyPair;

/// The scheduled backup files in `dir` (not the temporary ones being written).
fn backups(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("coffer-") && n.ends_with(".snap"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_snapshots_are_written_by_the_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backup_dir = dir.path().join("backups");
    let cluster = Cluster::start(
        3,
        ClusterOptions {
            extra_args: vec![
                "--snapshot-dir".into(),
                backup_dir.display().to_string(),
                "--snapshot-interval".into(),
                "1s".into(),
                "--snapshot-retain".into(),
                "2".into(),
            ],
            ..ClusterOptions::default()
        },
    )
    .await;
    let key = cluster
        .must_create_identity(
            "app",
            r#"path "secret/*" { capabilities = ["create", "read"] }"#,
        )
        .await;
    let app = cluster
        .sdk(
            &cluster.running(),
            Login::Key(KeyPair::load(&key).expect("key")),
        )
        .await;
    app.kv("secret")
        .put(
            "app/db",
            std::collections::BTreeMap::from([("password".to_string(), "scheduled".to_string())]),
        )
        .await
        .expect("put");

    // Files keep coming (at least four different ones seen), never more than two at a time,
    // each written by the leader of the moment.
    let seen = std::sync::Mutex::new((BTreeSet::new(), false));
    wait_until(
        Duration::from_secs(60),
        "four scheduled backups, the newest holding the acknowledged write",
        || {
            let (seen, cluster, backup_dir) = (&seen, &cluster, &backup_dir);
            async move {
                let leader = cluster.status(1).await?.leader_id;
                let names = backups(backup_dir);
                // A new file is renamed in before the oldest is deleted (there are never fewer
                // than two complete backups), so a listing in between sees three.
                assert!(names.len() <= 3, "retention keeps two files: {names:?}");
                let mut seen = seen.lock().expect("lock");
                for name in &names {
                    if seen.0.insert(name.clone()) {
                        assert!(
                            name.ends_with(&format!("-node{leader}.snap")),
                            "{name} was not written by the leader, node {leader}"
                        );
                    }
                }
                if let Some(newest) = names.last() {
                    // It may have been pruned since the listing; then look again.
                    let bytes = std::fs::read(backup_dir.join(newest)).ok()?;
                    let backup = coffer_node::backup::decode(&bytes).expect("a valid backup");
                    seen.1 |= backup
                        .records
                        .iter()
                        .any(|(k, _)| k.windows(6).any(|w| w == b"app/db"));
                }
                (seen.0.len() >= 4 && seen.1 && names.len() == 2).then_some(())
            }
        },
    )
    .await;
}
