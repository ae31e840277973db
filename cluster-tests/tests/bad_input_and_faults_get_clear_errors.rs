//! Bad input gets a precise status and writes nothing; a node refuses a data directory that
//! belongs to another node; without a quorum, writes fail with UNAVAILABLE within a bounded
//! time instead of hanging.

use std::time::{Duration, Instant};

use coffer_api::v1 as pb;
use coffer_cluster_tests::{Cluster, ClusterOptions, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_faults_get_clear_errors() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    let mut kv = cluster.kv(leader);

    let empty = kv
        .put(pb::PutRequest {
            key: vec![],
            value: b"x".to_vec(),
            request_id: vec![],
        })
        .await
        .expect_err("empty key");
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    let big = kv
        .put(pb::PutRequest {
            key: b"big".to_vec(),
            value: vec![0; (1 << 20) + 1],
            request_id: vec![],
        })
        .await
        .expect_err("oversize value");
    assert_eq!(big.code(), tonic::Code::InvalidArgument);
    assert!(
        big.message().contains("max-value-bytes"),
        "{}",
        big.message()
    );
    let bad_id = kv
        .put(pb::PutRequest {
            key: b"k".to_vec(),
            value: vec![],
            request_id: vec![1, 2, 3],
        })
        .await
        .expect_err("bad request id");
    assert_eq!(bad_id.code(), tonic::Code::InvalidArgument);
    let missing = kv
        .get(pb::GetRequest {
            key: b"big".to_vec(),
            consistency: 0,
        })
        .await
        .expect_err("nothing was written");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let bad_consistency = kv
        .get(pb::GetRequest {
            key: b"big".to_vec(),
            consistency: 7,
        })
        .await
        .expect_err("unknown consistency");
    assert_eq!(bad_consistency.code(), tonic::Code::InvalidArgument);

    // Exactly once: the same request id twice applies once.
    let id = uuid::Uuid::new_v4().as_bytes().to_vec();
    for _ in 0..2 {
        kv.put(pb::PutRequest {
            key: b"once".to_vec(),
            value: b"1".to_vec(),
            request_id: id.clone(),
        })
        .await
        .expect("put");
    }
    let once = kv
        .get(pb::GetRequest {
            key: b"once".to_vec(),
            consistency: 0,
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        once.kv.expect("kv").version,
        1,
        "a retried request applied twice"
    );

    // A data directory of node 2 offered to node 1 is refused with a message saying so.
    let follower = cluster.other_than(leader);
    let foreign_dir = cluster.nodes[&follower].data_dir.clone();
    cluster.kill(follower);
    let other_id = if follower == 1 { 2 } else { 1 };
    let mut cmd = cluster.offline_command(follower, other_id, &foreign_dir);
    let out = cmd.output().expect("run server on a foreign data dir");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("belongs to node {follower}")),
        "{stderr}"
    );

    // A corrupt database file is refused, never reinitialized.
    let corrupt_dir = cluster.path().join("corrupt");
    std::fs::create_dir_all(&corrupt_dir).expect("mkdir");
    std::fs::write(corrupt_dir.join("coffer.redb"), vec![0x5a; 8192]).expect("garbage");
    let mut cmd = cluster.offline_command(follower, follower, &corrupt_dir);
    let out = cmd.output().expect("run server on a corrupt data dir");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("corrupt") && stderr.contains("never reinitializes"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(corrupt_dir.join("coffer.redb")).expect("still there"),
        vec![0x5a; 8192],
        "the corrupt file was modified"
    );

    // No quorum: with two of three nodes down, a write fails with UNAVAILABLE, boundedly.
    let survivor = leader;
    for id in cluster.running() {
        if id != survivor {
            cluster.kill(id);
        }
    }
    // Wait until the survivor notices it lost its quorum (it stops being a confirmed leader).
    let started = Instant::now();
    let err = wait_until(
        Duration::from_secs(20),
        "a write to fail without quorum",
        || async {
            let r = cluster
                .kv(survivor)
                .put(pb::PutRequest {
                    key: b"nq".to_vec(),
                    value: b"1".to_vec(),
                    request_id: vec![],
                })
                .await;
            r.err()
        },
    )
    .await;
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the write hung for {:?}",
        started.elapsed()
    );
}
