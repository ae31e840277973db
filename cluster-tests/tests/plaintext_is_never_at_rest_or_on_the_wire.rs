//! The barrier's promise, checked on the bytes: a secret written through the API (a put through
//! a follower, a put through the leader and a transaction) never appears in the clear, hex or
//! base64 in any file of the cluster's directories (data, logs, keys) nor in any peer message a
//! node hands to its transport before TLS (the test build's wire tap). A follower that was down
//! catches up by snapshot, so snapshot traffic is covered too. As controls, the key paths (which
//! are not secret) are found in both places: the scan looks where the values travel.

use std::time::Duration;

use coffer_api::v1 as pb;
use coffer_cluster_tests::{
    Cluster, ClusterOptions, base64_unpadded, files_under, plaintext_forms, wait_until,
};

const MARKER: &[u8] = b"MARKER-7f3a9c-plaintext-must-never-leak";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_never_at_rest_or_on_the_wire() {
    // The encoder the needles come from (RFC 4648 test vector, padding left off).
    assert_eq!(base64_unpadded(b"foobar"), b"Zm9vYmFy");
    assert_eq!(base64_unpadded(b"fooba"), b"Zm9vYmE");
    let taps = tempfile::tempdir().expect("tempdir");
    let options = ClusterOptions {
        snapshot_logs: 50,
        logs_to_keep: 5,
        env: vec![(
            "COFFER_TEST_WIRE_TAP".into(),
            taps.path().join("wire").display().to_string(),
        )],
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(3, options).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    let follower = cluster.other_than(leader);
    let lagging = *cluster
        .running()
        .iter()
        .find(|id| **id != leader && **id != follower)
        .expect("a third node");
    let behind_at = cluster
        .status(lagging)
        .await
        .expect("status")
        .last_log_index;
    cluster.kill(lagging);

    let secret = String::from_utf8(MARKER.to_vec()).expect("ascii");
    cluster
        .must_put(follower, "secret/via-follower", &secret)
        .await;
    cluster.must_put(leader, "secret/via-leader", &secret).await;
    cluster
        .kv(follower)
        .txn(pb::TxnRequest {
            success: vec![pb::RequestOp {
                op: Some(pb::request_op::Op::Put(pb::PutRequest {
                    key: b"secret/via-txn".to_vec(),
                    value: MARKER.to_vec(),
                    request_id: Vec::new(),
                })),
            }],
            ..Default::default()
        })
        .await
        .expect("txn");
    // Enough further writes that the leader snapshots and compacts past what the stopped node
    // has, then bring it back: it must install a snapshot holding the secrets.
    for i in 0..300 {
        cluster
            .must_put(leader, &format!("filler/{i:03}"), "x")
            .await;
    }
    for id in [leader, follower] {
        cluster
            .admin(id)
            .snapshot(pb::SnapshotRequest {})
            .await
            .expect("snapshot");
    }
    wait_until(
        Duration::from_secs(20),
        "the leader to compact past the stopped node",
        || async {
            let s = cluster.status(leader).await?;
            (s.purged_index > behind_at).then_some(())
        },
    )
    .await;
    cluster.spawn(lagging);
    cluster
        .must_wait_unsealed(&[lagging], Duration::from_secs(20))
        .await;
    for key in ["secret/via-follower", "secret/via-leader", "secret/via-txn"] {
        cluster.must_get_equal(lagging, key, &secret).await;
    }
    let logs: String = [leader, follower]
        .iter()
        .map(|id| cluster.log(*id))
        .collect();
    assert!(
        logs.contains("sending snapshot"),
        "the stopped node caught up by snapshot"
    );
    cluster.must_converge(Duration::from_secs(20)).await;

    // Everything on disk: data directories, logs, keys, certificates.
    let disk = files_under(cluster.path());
    let wire = files_under(taps.path());
    assert!(
        wire.len() >= 3,
        "every node's wire tap wrote a file: {wire:?}"
    );
    let needles = plaintext_forms(MARKER);
    let mut found = Vec::new();
    let mut path_seen_on_disk = false;
    let mut path_seen_on_wire = false;
    for (place, files) in [("disk", &disk), ("wire", &wire)] {
        for file in files.iter() {
            let bytes = std::fs::read(file).expect("read");
            if contains(&bytes, b"secret/via-txn") {
                match place {
                    "disk" => path_seen_on_disk = true,
                    _ => path_seen_on_wire = true,
                }
            }
            for (form, needle) in &needles {
                if contains(&bytes, needle) {
                    found.push(format!("{form} in {}", file.display()));
                }
            }
        }
    }
    assert!(found.is_empty(), "plaintext found: {found:#?}");
    // Controls: the scan saw the data files and the replicated entries themselves.
    assert!(path_seen_on_disk, "no data file holds the key path");
    assert!(path_seen_on_wire, "no tapped message holds the key path");
}
