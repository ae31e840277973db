//! The leader replicates to each follower on one long-lived `StreamAppend` stream per
//! replication session, not one HTTP/2 stream per AppendEntries call: many messages that carry
//! entries arrive on few streams, and every entry still reaches every follower.

use std::time::Duration;

use coffer_cluster_tests::{Cluster, ClusterOptions, metric};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_replicates_each_follower_on_one_stream() {
    let cluster = Cluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.must_wait_leader(Duration::from_secs(10)).await;
    let followers: Vec<u64> = cluster
        .running()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    let counts = |text: &str| {
        (
            metric(text, "coffer_append_streams_total").unwrap_or(0.0),
            metric(text, "coffer_append_messages_total").unwrap_or(0.0),
        )
    };
    let mut before = Vec::new();
    for id in &followers {
        before.push(counts(&cluster.metrics_text(*id).await.expect("metrics")));
    }
    // One write at a time: each is committed before the next is proposed, so each travels in
    // a message of its own.
    for i in 0..60 {
        cluster
            .must_put(leader, &format!("app/stream-{i}"), &format!("value-{i}"))
            .await;
    }
    let mut most = 0.0f64;
    for (id, (streams0, messages0)) in followers.iter().zip(before) {
        cluster
            .must_get_equal(*id, "app/stream-59", "value-59")
            .await;
        let (streams, messages) = counts(&cluster.metrics_text(*id).await.expect("metrics"));
        let (streams, messages) = (streams - streams0, messages - messages0);
        most = most.max(messages);
        // One stream per replication session; a late answer on a loaded machine may start a
        // new session, but a stream per message (or per few) is not a stream.
        assert!(
            streams <= 1.0 + messages / 5.0,
            "node {id} got {messages} messages with entries on {streams} new streams; the \
             leader should keep one stream per replication session"
        );
    }
    // The follower that acknowledges first gets each write in a message of its own; one that
    // falls behind gets several writes in one message.
    assert!(
        most >= 20.0,
        "the followers got the 60 writes in at most {most} messages on a stream"
    );
}
