//! Past its bound on writes in flight, a node answers RESOURCE_EXHAUSTED at once instead of
//! queueing without bound; the writes it accepted still succeed.

use std::time::{Duration, Instant};

use coffer_api::v1 as pb;
use coffer_cluster_tests::{Cluster, ClusterOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_quickly() {
    let options = ClusterOptions {
        extra_args: vec!["--max-pending-writes".into(), "2".into()],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(1, options).await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut kv = cluster.kv(1);
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = kv
                .put(pb::PutRequest {
                    key: format!("k{i}").into(),
                    value: vec![b'x'; 64 * 1024],
                    request_id: vec![],
                })
                .await;
            (r.map(|_| ()).map_err(|s| s.code()), started.elapsed())
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            (Ok(()), _) => ok += 1,
            (Err(tonic::Code::ResourceExhausted), took) => {
                refused += 1;
                assert!(took < Duration::from_secs(2), "a refusal took {took:?}");
            }
            (Err(code), _) => panic!("unexpected status {code:?}"),
        }
    }
    assert!(ok >= 2, "accepted writes must succeed ({ok} ok)");
    assert!(
        refused > 0,
        "64 concurrent writes against a bound of 2 were all accepted"
    );
}
