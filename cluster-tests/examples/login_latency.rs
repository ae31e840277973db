//! Login latency and logins per second on a 3-node cluster (file storage, fsync), one client,
//! logins one after another through the three nodes in turn: the Private Key Challenge, and
//! Kubernetes service-account logins checked with TokenReview and with the issuer's keys
//! (JWKS) against the test API server (`kube_api`: no kube-apiserver runs here, so the
//! TokenReview round trip is a local HTTPS call, not a real API server's).
//!
//! ```sh
//! cargo build --release -p coffer-cluster-tests --bins --examples
//! target/release/examples/login_latency [LOGINS, default 200]
//! ```

use std::time::{Duration, Instant};

use coffer_api::v1 as pb;
use coffer_cluster_tests::kube_api::KubeApi;
use coffer_cluster_tests::{Cluster, ClusterOptions};

const AUDIENCE: &str = "coffer";

/// Runs `login` `n` times through nodes 1, 2, 3 in turn; prints the median, the 99th
/// percentile and the rate.
async fn measure<F, Fut>(what: &str, n: usize, mut login: F)
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut took = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        login(1 + (i as u64 % 3))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        took.push(t.elapsed());
    }
    let total = started.elapsed();
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    println!(
        "{what:<34} logins={n} p50={:.2}ms p99={:.2}ms logins/s={:.0}",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        n as f64 / total.as_secs_f64()
    );
}

async fn kubernetes(n: usize, jwks: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = KubeApi::start(dir.path()).await;
    let mut args = if jwks {
        vec![
            "--kubernetes-issuer".into(),
            api.url.clone(),
            "--kubernetes-ca-cert".into(),
            api.ca_file.display().to_string(),
        ]
    } else {
        api.token_review_args()
    };
    args.extend(["--login-rate-per-second".into(), "100000".into()]);
    let cluster = Cluster::start(
        3,
        ClusterOptions {
            extra_args: args,
            ..ClusterOptions::default()
        },
    )
    .await;
    cluster.must_wait_leader(Duration::from_secs(10)).await;
    pb::kubernetes_roles_client::KubernetesRolesClient::new(cluster.channel(1))
        .write(pb::KubernetesRole {
            name: "cart".into(),
            bound_service_accounts: vec!["cart".into()],
            bound_namespaces: vec!["shop".into()],
            audience: AUDIENCE.into(),
            ..Default::default()
        })
        .await
        .expect("role");
    if !jwks {
        // The Private Key Challenge on the same cluster, for the ratio.
        let key = cluster.admin_key();
        measure("key login (Private Key Challenge)", n, |id| {
            let (target, key) = (cluster.target_without_session(id), key.clone());
            async move { coffer_node::auth::login(&target, &key, 0).await.map(|_| ()) }
        })
        .await;
    }
    let token = api.token("shop", "cart", ("cart-0", "uid"), &[AUDIENCE], 3600);
    let what = if jwks {
        "kubernetes login (JWKS)"
    } else {
        "kubernetes login (TokenReview)"
    };
    measure(what, n, |id| {
        let (target, token) = (cluster.target_without_session(id), token.clone());
        async move {
            coffer_node::auth::kubernetes_login(&target, "cart", &token, 0)
                .await
                .map(|_| ())
        }
    })
    .await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    kubernetes(n, false).await;
    kubernetes(n, true).await;
}
