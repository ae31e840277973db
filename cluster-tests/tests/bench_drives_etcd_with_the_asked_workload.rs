//! `coffer bench --target etcd` drives a real etcd with the workload it was asked for: the
//! operations, value size, read ratio and concurrencies reach etcd and come back in the JSON
//! report, and the open loop offers exactly the asked rate on its schedule. It needs `etcd` on
//! PATH (Debian's `etcd-server`, which `.ci/run` installs); without it the test fails and says
//! so. Nothing here asserts how fast either system is.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use coffer_cluster_tests::{coffer_bin, wait_until};
use coffer_node::bench::etcd::etcdpb;
use coffer_node::bench::etcd::etcdpb::kv_client::KvClient;
use serde_json::Value;

/// A one-member etcd on loopback, killed on drop.
struct Etcd {
    child: Child,
    client_addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

fn must_start_etcd() -> Etcd {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join("etcd").is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "etcd is not on PATH: this test drives a real etcd. Install Debian's etcd-server \
         (`apt-get install -y etcd-server`, as .ci/run does) and run it again"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (client, peer) = (free_port(), free_port());
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
    let child = Command::new("etcd")
        .args(["--name", "bench"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start etcd");
    Etcd {
        child,
        client_addr: format!("127.0.0.1:{client}"),
        _dir: dir,
    }
}

fn etcd_log(etcd: &Etcd) -> String {
    std::fs::read_to_string(etcd._dir.path().join("etcd.log")).unwrap_or_default()
}

async fn must_wait_serving(etcd: &Etcd) -> KvClient<tonic::transport::Channel> {
    let channel = coffer_node::bench::etcd::channel_to(&etcd.client_addr, Duration::from_secs(2))
        .expect("channel");
    let kv = KvClient::new(channel);
    wait_until(
        Duration::from_secs(30),
        "etcd to serve a linearizable read",
        || {
            let mut kv = kv.clone();
            async move {
                kv.range(etcdpb::RangeRequest {
                    key: b"ready".to_vec(),
                    ..Default::default()
                })
                .await
                .ok()
                .map(|_| ())
            }
        },
    )
    .await;
    kv
}

/// Runs `coffer bench` with `args` and returns its JSON lines, or panics with its output.
fn must_bench(args: &[&str]) -> Vec<Value> {
    let out = Command::new(coffer_bin())
        .arg("bench")
        .args(args)
        .arg("--json")
        .env("HOME", Path::new("/nonexistent"))
        .output()
        .expect("run coffer bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "coffer bench {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn num(report: &Value, field: &str) -> f64 {
    report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_drives_etcd_with_the_asked_workload() {
    let etcd = must_start_etcd();
    let mut kv = must_wait_serving(&etcd).await;
    let endpoints = etcd.client_addr.clone();

    // Puts of 4 KiB values over ten 8-byte keys, at two concurrencies: one report each.
    let reports = must_bench(&[
        "--target",
        "etcd",
        "--endpoints",
        &endpoints,
        "--op",
        "put",
        "--value-size",
        "4096",
        "--keys",
        "10",
        "--concurrency",
        "1,4",
        "--duration",
        "1",
    ]);
    assert_eq!(reports.len(), 2, "{reports:?}");
    for (report, concurrency) in reports.iter().zip([1.0, 4.0]) {
        assert_eq!(report["target"], "etcd", "{report}");
        assert_eq!(report["op"], "put", "{report}");
        assert_eq!(num(report, "concurrency"), concurrency, "{report}");
        assert_eq!(num(report, "value_size"), 4096.0, "{report}");
        assert!(num(report, "ok") > 0.0, "{report}");
        assert_eq!(num(report, "errors"), 0.0, "{report}");
        assert!(num(report, "p50_ms") <= num(report, "p99_ms"), "{report}");
    }
    // The puts reached etcd as asked: the keys are 8-byte padded numbers, the values 4 KiB.
    let stored = kv
        .range(etcdpb::RangeRequest {
            key: b"00000000".to_vec(),
            range_end: b"00000010".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range over the bench keys")
        .into_inner()
        .kvs;
    assert_eq!(stored.len(), 10, "every key of the set was put");
    assert!(stored.iter().all(|kv| kv.value.len() == 4096));

    // A 90 % read mix: the ratio is reported, and the reads found the preloaded keys.
    let mix = must_bench(&[
        "--target",
        "etcd",
        "--endpoints",
        &endpoints,
        "--op",
        "mix",
        "--read-ratio",
        "0.9",
        "--concurrency",
        "4",
        "--duration",
        "1",
    ]);
    assert_eq!(mix.len(), 1);
    assert_eq!(mix[0]["op"], "mix");
    assert_eq!(num(&mix[0], "read_ratio"), 0.9);
    assert!(num(&mix[0], "ok") > 0.0, "{}", mix[0]);
    assert_eq!(num(&mix[0], "errors"), 0.0, "{}", mix[0]);

    // Open loop: 200 serializable gets per second for 2 s are due on a schedule, every one is
    // sent (none early: the run lasts until the last one is due), latency counted from the
    // due time.
    let open = must_bench(&[
        "--target",
        "etcd",
        "--endpoints",
        &endpoints,
        "--op",
        "get-stale",
        "--rate",
        "200",
        "--concurrency",
        "8",
        "--duration",
        "2",
    ]);
    let open = &open[0];
    assert_eq!(num(open, "rate"), 200.0, "{open}");
    assert_eq!(num(open, "offered"), 400.0, "{open}");
    assert_eq!(num(open, "issued"), 400.0, "{open}");
    assert_eq!(num(open, "ok"), 400.0, "{open}\n{}", etcd_log(&etcd));
    assert!(num(open, "seconds") >= 1.99, "{open}");

    // An operation etcd does not have is refused with what to do instead.
    let out = Command::new(coffer_bin())
        .args([
            "bench",
            "--target",
            "etcd",
            "--endpoints",
            &endpoints,
            "--op",
            "login",
        ])
        .output()
        .expect("run coffer bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("use --target coffer"), "{stderr}");
}
