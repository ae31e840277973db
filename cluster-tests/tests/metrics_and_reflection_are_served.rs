//! Every node serves Prometheus metrics on its own port (Raft positions, request counts and
//! latencies, fsync latency and the group commit batch size) and gRPC reflection on the API
//! port, so `grpcurl list` shows the public services.

use std::time::Duration;

use coffer_cluster_tests::{Cluster, ClusterOptions, metric, wait_until};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_reflection_are_served() {
    let cluster = Cluster::start(1, ClusterOptions::default()).await;
    for i in 0..20 {
        cluster.must_put(1, &format!("m/{i}"), "v").await;
    }
    cluster.must_get_equal(1, "m/0", "v").await;

    // Every fixture node serves metrics on its own port.
    let text = wait_until(Duration::from_secs(10), "the metrics endpoint", || {
        cluster.metrics_text(1)
    })
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        metric(&text, "coffer_requests_total{code=\"Ok\",method=\"Put\"").unwrap_or(0.0) >= 20.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "coffer_request_duration_seconds_count{method=\"Get\""
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(metric(&text, "coffer_storage_fsyncs_total").unwrap_or(0.0) >= 1.0);
    assert!(metric(&text, "coffer_storage_entries_per_fsync_count").unwrap_or(0.0) >= 1.0);
    assert!(metric(&text, "coffer_storage_fsync_duration_seconds_count").unwrap_or(0.0) >= 1.0);
    assert!(
        metric(&text, "coffer_raft_index{kind=\"applied\"").unwrap_or(0.0) >= 20.0,
        "{text}"
    );
    assert_eq!(metric(&text, "coffer_raft_is_leader"), Some(1.0));
    assert_eq!(metric(&text, "coffer_fatal"), Some(0.0));
    let health = cluster.metrics_http(1, "/health").await.expect("health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    let mut reflection = ServerReflectionClient::new(cluster.channel(1));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("message")
        .expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"coffer.raw.v1.Kv".to_string()), "{names:?}");
    // One versioned package per service.
    for service in [
        "coffer.cluster.v1.Cluster",
        "coffer.kv.v1.Kv",
        "coffer.kv.v1.Mounts",
        "coffer.wrap.v1.Wrap",
        "coffer.auth.v1.Auth",
        "coffer.seal.v1.Seal",
        "coffer.policies.v1.Policies",
        "coffer.identities.v1.Identities",
    ] {
        assert!(names.contains(&service.to_string()), "{service}: {names:?}");
    }
}
