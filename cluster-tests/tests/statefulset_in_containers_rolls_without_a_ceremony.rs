//! A StatefulSet-like run with containers (no Kubernetes can run here): the three-node overlay
//! is rendered with `kubectl kustomize`, and each pod of its StatefulSet becomes a container
//! of the test image with what the kubelet would give it, read from the rendered objects: the
//! container's arguments, its environment (values, `$(VAR)` references, the pod name and
//! pod-index label through the downward API, ConfigMap keys), its volumes at their mount paths
//! (the `coffer-config` ConfigMap's files, the TLS Secret, the projected join token, the data
//! volume, `emptyDir` as tmpfs), the pod's user and group and a read-only root filesystem.
//! Pod `coffer-N` answers on the network alias `coffer-N.coffer-peers.coffer.svc.cluster.local`,
//! and the in-cluster Kubernetes API is the test API server (`kube_api`, real TokenReview) on the
//! network's gateway.
//!
//! The pods start at once; an operator runs the ceremony once (init, unseal one node, peer unseal
//! on); every pod turns ready. Then a rolling restart as the StatefulSet controller does it
//! (highest ordinal first, SIGTERM with the grace period, the next pod only once the restarted
//! one is ready) while four writers put secrets through the SDK: every acknowledged write
//! reads back afterwards, none failed, and no pod needs an operator (peer unseal). Then the
//! StatefulSet is scaled to four: pod 4, with the same flags, joins through the initial members
//! with its projected token and is promoted with `coffer cluster promote`. Prints the time to serving
//! and the rolling restart's duration and failed writes (the figures in deploy/README.md).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use coffer_chaos::docker::{ensure_image, run};
use coffer_cluster_tests::kube_api::KubeApi;
use coffer_cluster_tests::{coffer_bin, must_init_with_one_operator, wait_until};
use coffer_node::keys::KeyPair;
use serde_json::Value;

const OVERLAY: &str = "overlays/three-nodes";
const PODS: u64 = 3;
const PEER_DOMAIN: &str = "coffer-peers.coffer.svc.cluster.local";
/// What `runAsUser`/`fsGroup` give the pod; files the kubelet would own so are owned by it.
const POD_UID: u32 = 65532;

/// The rendered objects of one overlay.
struct Rendered(Vec<Value>);

impl Rendered {
    fn object(&self, kind: &str, name: &str) -> &Value {
        self.0
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{OVERLAY} renders no {kind} {name}"))
    }

    fn statefulset(&self) -> &Value {
        self.object("StatefulSet", "coffer")
    }

    fn pod_spec(&self) -> &Value {
        &self.statefulset()["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        &self.pod_spec()["containers"][0]
    }
}

/// The containers of one run, removed (with their network) when dropped.
struct Pods {
    run_id: String,
    network: String,
    prefix: String,
    dir: PathBuf,
    image: String,
    rendered: Rendered,
    kube: (String, u16),
    kube_ca: String,
}

impl Drop for Pods {
    fn drop(&mut self) {
        for n in 1..=PODS + 1 {
            let _ = run("docker", &["rm", "-f", "-v", &self.name(n)]);
        }
        let _ = run("docker", &["network", "rm", &self.network]);
    }
}

impl Pods {
    fn name(&self, n: u64) -> String {
        format!("coffer-sts-{}-{n}", self.run_id)
    }

    fn ip(&self, n: u64) -> String {
        format!("{}.{}", self.prefix, 10 + n)
    }

    fn api(&self, n: u64) -> String {
        format!("{}:7000", self.ip(n))
    }

    fn pod_dir(&self, n: u64) -> PathBuf {
        self.dir.join(format!("pod-{n}"))
    }

    /// The environment the kubelet gives pod `n`, in order (later entries may refer to
    /// earlier ones with `$(NAME)`).
    fn env(&self, n: u64) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        for e in self.rendered.container()["env"]
            .as_array()
            .expect("the container has an env list")
        {
            let name = e["name"].as_str().expect("an env name").to_string();
            let value = if let Some(v) = e["value"].as_str() {
                let mut v = v.to_string();
                for (k, val) in &env {
                    v = v.replace(&format!("$({k})"), val);
                }
                v
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match path {
                    "metadata.name" => format!("coffer-{n}"),
                    "metadata.labels['apps.kubernetes.io/pod-index']" => n.to_string(),
                    other => panic!("the test does not know the downward API field {other}"),
                }
            } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_object() {
                let map = self
                    .rendered
                    .object("ConfigMap", r["name"].as_str().expect("a ConfigMap name"));
                map["data"][r["key"].as_str().expect("a key")]
                    .as_str()
                    .expect("the ConfigMap has the key")
                    .to_string()
            } else {
                panic!("the test does not know how to set {e}")
            };
            env.push((name, value));
        }
        env.push(("KUBERNETES_SERVICE_HOST".into(), self.kube.0.clone()));
        env.push(("KUBERNETES_SERVICE_PORT".into(), self.kube.1.to_string()));
        env.push(("RUST_LOG".into(), "info,openraft=warn".into()));
        // The one deviation from the manifests: scheduled backups every 2 s instead of every
        // hour, so this run sees them land on the backups volume.
        env.push(("COFFER_SNAPSHOT_INTERVAL".into(), "2s".into()));
        env
    }

    /// `-v`/`--tmpfs` arguments for pod `n`'s volumes at the container's mount paths, with
    /// their host directories filled as the kubelet would.
    fn volumes(&self, n: u64, join_token: &str) -> Vec<String> {
        let pod_dir = self.pod_dir(n);
        let mut args = Vec::new();
        let mounts: BTreeMap<&str, &str> = self.rendered.container()["volumeMounts"]
            .as_array()
            .expect("volume mounts")
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().expect("a name"),
                    m["mountPath"].as_str().expect("a path"),
                )
            })
            .collect();
        let claims: Vec<&str> = self.rendered.statefulset()["spec"]["volumeClaimTemplates"]
            .as_array()
            .map(|c| {
                c.iter()
                    .map(|t| t["metadata"]["name"].as_str().expect("a claim name"))
                    .collect()
            })
            .unwrap_or_default();
        let volumes = self.rendered.pod_spec()["volumes"]
            .as_array()
            .expect("volumes");
        for (name, path) in mounts {
            let host = pod_dir.join(name);
            if claims.contains(&name) {
                must_create_dir(&host, 0o700);
                chown(&host, POD_UID, POD_UID);
                args.extend(["-v".into(), format!("{}:{path}", host.display())]);
                continue;
            }
            let volume = volumes
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("no volume {name}"));
            if volume.get("emptyDir").is_some() {
                args.extend(["--tmpfs".into(), format!("{path}:uid={POD_UID}")]);
            } else if let Some(cm) = volume["configMap"]["name"].as_str() {
                must_create_dir(&host, 0o755);
                let data = self.rendered.object("ConfigMap", cm)["data"]
                    .as_object()
                    .expect("ConfigMap data");
                for (file, text) in data {
                    std::fs::write(host.join(file), text.as_str().expect("text"))
                        .expect("write a ConfigMap file");
                }
                args.extend(["-v".into(), format!("{}:{path}:ro", host.display())]);
            } else if volume.get("secret").is_some() {
                // The TLS Secret: made by `coffer certs` (see `Pods::start`).
                args.extend([
                    "-v".into(),
                    format!("{}:{path}:ro", self.dir.join("tls").display()),
                ]);
            } else if let Some(sources) = volume["projected"]["sources"].as_array() {
                must_create_dir(&host, 0o755);
                for s in sources {
                    let file = s["serviceAccountToken"]["path"]
                        .as_str()
                        .expect("a projected service-account token");
                    std::fs::write(host.join(file), join_token).expect("write the token");
                }
                args.extend(["-v".into(), format!("{}:{path}:ro", host.display())]);
            } else {
                panic!("the test does not know the volume {volume}");
            }
        }
        // The service account's own token, as every pod gets it: the node's TokenReview
        // credential (`kubernetes_in_cluster`).
        let sa = pod_dir.join("serviceaccount");
        must_create_dir(&sa, 0o755);
        std::fs::write(sa.join("token"), "reviewer-1").expect("token");
        std::fs::write(sa.join("ca.crt"), &self.kube_ca).expect("ca.crt");
        std::fs::write(sa.join("namespace"), "coffer").expect("namespace");
        args.extend([
            "-v".into(),
            format!(
                "{}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
                sa.display()
            ),
        ]);
        args
    }

    /// Creates and starts pod `n`'s container.
    fn run_pod(&self, n: u64, join_token: &str) {
        let name = self.name(n);
        let alias = format!("coffer-{n}.{PEER_DOMAIN}");
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            &self.network,
            "--ip",
            &self.ip(n),
            "--network-alias",
            &alias,
            "--hostname",
            &format!("coffer-{n}"),
        ]
        .map(String::from)
        .to_vec();
        let pod_sc = &self.rendered.pod_spec()["securityContext"];
        if let (Some(u), Some(g)) = (pod_sc["runAsUser"].as_u64(), pod_sc["runAsGroup"].as_u64()) {
            args.extend(["--user".into(), format!("{u}:{g}")]);
        }
        if self.rendered.container()["securityContext"]["readOnlyRootFilesystem"] == true {
            args.push("--read-only".into());
        }
        args.extend(self.volumes(n, join_token));
        for (k, v) in self.env(n) {
            args.extend(["-e".into(), format!("{k}={v}")]);
        }
        args.push(self.image.clone());
        for a in self.rendered.container()["args"]
            .as_array()
            .expect("container args")
        {
            args.push(a.as_str().expect("an argument").into());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run("docker", &refs).expect("docker run");
    }

    fn logs(&self, n: u64) -> String {
        match std::process::Command::new("docker")
            .args(["logs", &self.name(n)])
            .output()
        {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(no log: {e})"),
        }
    }

    /// Node `n`'s answer to `GET path` on its metrics port, as (status code, body).
    async fn http(&self, n: u64, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = format!("{}:9100", self.ip(n));
        let mut conn = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        .ok()?
        .ok()?;
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(2), conn.read_to_string(&mut text))
            .await
            .ok()?
            .ok()?;
        let code = text.get(9..12)?.parse().ok()?;
        let body = text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        Some((code, body))
    }

    async fn must_be_ready(&self, n: u64, timeout: Duration) {
        wait_until(timeout, &format!("pod {n} to be ready"), || async {
            matches!(self.http(n, "/ready").await, Some((200, _))).then_some(())
        })
        .await;
    }
}

fn must_create_dir(dir: &Path, mode: u32) {
    std::fs::create_dir_all(dir).expect("create a directory");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap_or_else(|e| {
        panic!(
            "chown {}: {e} (this test runs as root, as CI does)",
            path.display()
        )
    });
}

/// A Docker network with a free /24 of 10.200-249.x.0.
fn must_create_network(name: &str) -> String {
    let mut errors = Vec::new();
    for attempt in 0..32u32 {
        let x = (std::process::id().wrapping_mul(31) + attempt * 977) % 12800;
        let prefix = format!("10.{}.{}", 200 + x / 256, x % 256);
        match run(
            "docker",
            &[
                "network",
                "create",
                "--subnet",
                &format!("{prefix}.0/24"),
                name,
            ],
        ) {
            Ok(_) => return prefix,
            Err(e) => errors.push(e.to_string()),
        }
    }
    panic!("cannot create a docker network: {}", errors.join("; "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_the_statefulset_loses_no_write_and_needs_no_operator() {
    let rendered = Rendered(common::must_render(OVERLAY));
    let image = ensure_image(&coffer_bin()).expect("the test image");
    let dir = tempfile::tempdir().expect("tempdir");
    // Docker bind-mounts only absolute, canonical paths; the pod user must reach its files.
    let dir_path = std::fs::canonicalize(dir.path()).expect("canonical");
    std::fs::set_permissions(&dir_path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let run_id = format!("{:x}", std::process::id());
    let network = format!("coffer-sts-{run_id}");
    let prefix = must_create_network(&network);
    let gateway = format!("{prefix}.1");
    let kube = KubeApi::start_on(&dir_path, &gateway).await;
    let kube_port: u16 = kube
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the API server's port");
    let pods = Pods {
        run_id,
        network,
        prefix,
        dir: dir_path.clone(),
        image,
        kube: (gateway, kube_port),
        kube_ca: std::fs::read_to_string(&kube.ca_file).expect("kube CA"),
        rendered,
    };

    // The TLS Secret: the bootstrap certificates for every pod's DNS name (and its address,
    // which this test's client dials), keys readable by the pod's group only (fsGroup).
    let tls = dir_path.join("tls");
    let mut certs = vec![
        "certs".to_string(),
        "--dir".into(),
        tls.display().to_string(),
    ];
    for n in 1..=PODS + 1 {
        certs.extend([
            "--node".into(),
            format!("{n}=coffer-{n}.{PEER_DOMAIN},{}", pods.ip(n)),
        ]);
    }
    let refs: Vec<&str> = certs.iter().map(String::as_str).collect();
    run(&coffer_bin().to_string_lossy(), &refs).expect("coffer certs");
    std::fs::set_permissions(&tls, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for entry in std::fs::read_dir(&tls).expect("tls dir") {
        let path = entry.expect("entry").path();
        let key = path.to_string_lossy().ends_with("-key.pem");
        if key {
            chown(&path, 0, POD_UID);
        }
        let mode = if key { 0o440 } else { 0o444 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let ca_pem = std::fs::read(tls.join("ca.pem")).expect("ca.pem");
    let join_token = kube.token(
        "coffer",
        "coffer",
        ("coffer-x", "uid-x"),
        &["coffer-cluster"],
        3600,
    );

    // All pods at once (podManagementPolicy: Parallel).
    let started = Instant::now();
    for n in 1..=PODS {
        pods.run_pod(n, &join_token);
    }
    let all: Vec<String> = (1..=PODS).map(|n| pods.api(n)).collect();
    let target =
        coffer_node::client::Target::new(&all, Some(&tls.join("ca.pem")), Duration::from_secs(5))
            .expect("target");
    for n in 1..=PODS {
        wait_until(
            Duration::from_secs(60),
            &format!("pod {n} to answer /ready with 501 (formed, not initialized)"),
            || async { matches!(pods.http(n, "/ready").await, Some((501, _))).then_some(()) },
        )
        .await;
    }

    // The ceremony, once.
    let keys = dir_path.join("keys");
    must_init_with_one_operator(&target, &keys).await;
    let one = coffer_node::client::Target::new(
        &[pods.api(1)],
        Some(&tls.join("ca.pem")),
        Duration::from_secs(5),
    )
    .expect("target");
    coffer_node::operator::unseal(
        &one,
        &keys.join("operator.key"),
        &keys.join("operator.share"),
    )
    .await
    .expect("unseal pod 1");
    coffer_node::operator::act(
        &target,
        &keys.join("operator.key"),
        coffer_node::seal::Action::PeerUnseal(true),
    )
    .await
    .expect("peer unseal on");
    for n in 1..=PODS {
        pods.must_be_ready(n, Duration::from_secs(60)).await;
    }
    let serving_after = started.elapsed();

    // A service with a policy for its secrets, and four writers.
    let admin = coffer_client::Client::connect(coffer_client::Config::new(
        all.clone(),
        ca_pem.clone(),
        coffer_client::Login::Key(KeyPair::load(&keys.join("admin.key")).expect("admin key")),
    ))
    .await
    .expect("the administrator logs in");
    admin
        .policies()
        .write(
            "roller",
            r#"path "secret/data/roll/*" { capabilities = ["create", "read", "update"] }"#,
        )
        .await
        .expect("policy");
    let service_key = KeyPair::generate().expect("key");
    admin
        .identities()
        .create(coffer_client::admin::IdentityCreateRequest {
            name: "roller".into(),
            public_key: service_key.public().to_bytes().to_vec(),
            policies: vec!["roller".into()],
            ..Default::default()
        })
        .await
        .expect("identity");
    let service = coffer_client::Client::connect(coffer_client::Config::new(
        all.clone(),
        ca_pem.clone(),
        coffer_client::Login::Key(service_key),
    ))
    .await
    .expect("the service logs in");
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..4u32 {
        let (kv, stop, written) = (service.kv("secret"), stop.clone(), written.clone());
        writers.push(tokio::spawn(async move {
            let (mut acked, mut failed) = (Vec::new(), Vec::new());
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let path = format!("roll/w{w}-{i}");
                match kv.put(&path, [("v", i.to_string())]).await {
                    Ok(_) => {
                        acked.push((path, i));
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failed.push((path, format!("{e:#}"))),
                }
            }
            (acked, failed)
        }));
    }
    // Writes flow before the first pod stops, and again after the last one is back.
    let wait_written = |at_least: usize, what: &'static str| {
        let written = written.clone();
        async move {
            wait_until(Duration::from_secs(30), what, || async {
                (written.load(Ordering::Relaxed) >= at_least).then_some(())
            })
            .await
        }
    };
    wait_written(20, "writes before the rolling restart").await;

    // The controller's rolling update: highest ordinal first, each pod only after the one
    // before is ready again. Nobody unseals anything.
    let rolling = Instant::now();
    for n in (1..=PODS).rev() {
        run("docker", &["stop", "-t", "30", &pods.name(n)]).expect("docker stop");
        run("docker", &["start", &pods.name(n)]).expect("docker start");
        wait_until(
            Duration::from_secs(90),
            &format!("restarted pod {n} to be ready without an operator"),
            || async { matches!(pods.http(n, "/ready").await, Some((200, _))).then_some(()) },
        )
        .await;
    }
    let rolled_in = rolling.elapsed();
    let so_far = written.load(Ordering::Relaxed);
    wait_written(so_far + 20, "writes after the rolling restart").await;
    stop.store(true, Ordering::Relaxed);
    let (mut acked, mut failed) = (Vec::new(), Vec::new());
    for w in writers {
        let (a, f) = w.await.expect("writer");
        acked.extend(a);
        failed.extend(f);
    }

    // Every acknowledged write is there, through any pod.
    assert!(acked.len() >= 20, "too few writes to tell: {}", acked.len());
    let reader = service.kv("secret");
    for (path, i) in &acked {
        let secret = reader
            .get(path)
            .await
            .unwrap_or_else(|e| panic!("acknowledged {path} is lost: {e:#}"));
        assert_eq!(
            secret.data.get("v"),
            Some(i.to_string().as_str()),
            "acknowledged {path} reads back changed"
        );
    }
    let mut unknown_but_applied = 0;
    for (path, _) in &failed {
        if reader.get(path).await.is_ok() {
            unknown_but_applied += 1;
        }
    }
    for n in 1..=PODS {
        let (code, body) = pods.http(n, "/ready").await.expect("ready answers");
        assert_eq!(code, 200, "pod {n}: {body}\n{}", pods.logs(n));
        let (code, _) = pods.http(n, "/health").await.expect("health answers");
        assert_eq!(code, 200, "pod {n} is live");
    }
    assert!(
        failed.is_empty(),
        "writes failed during the rolling restart (the SDK retries for 30 s): {failed:?}"
    );

    // Scaling to 4 replicas: pod 4 has the same flags, joins through the initial members with
    // its token (TokenReview at the in-cluster API server), and is promoted by the one
    // documented command, both through the CLI as deploy/README.md shows them.
    let cli = |args: &[&str]| {
        let env = [
            ("COFFER_ADDR", all.join(",")),
            ("COFFER_CACERT", tls.join("ca.pem").display().to_string()),
            ("COFFER_KEY", keys.join("admin.key").display().to_string()),
            (
                "COFFER_SESSION_FILE",
                dir_path.join("session.json").display().to_string(),
            ),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        coffer_chaos::docker::run_env(&coffer_bin().to_string_lossy(), args, &env)
            .unwrap_or_else(|e| panic!("coffer {}: {e:#}", args.join(" ")))
    };
    cli(&[
        "auth",
        "kubernetes",
        "role",
        "write",
        "coffer-members",
        "--bound-service-account",
        "coffer",
        "--bound-namespace",
        "coffer",
        "--audience",
        "coffer-cluster",
    ]);
    pods.run_pod(PODS + 1, &join_token);
    wait_until(
        Duration::from_secs(60),
        "pod 4 to join and be ready as a learner",
        || async {
            match pods.http(PODS + 1, "/ready").await {
                Some((200, body)) if body.contains("learner") => Some(()),
                _ => None,
            }
        },
    )
    .await;
    cli(&["cluster", "promote", &(PODS + 1).to_string()]);
    wait_until(Duration::from_secs(30), "pod 4 to be a voter", || async {
        match pods.http(PODS + 1, "/ready").await {
            Some((200, body)) if body.contains("voter") => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(
        pods.logs(PODS + 1)
            .contains("joined the cluster as a learner"),
        "{}",
        pods.logs(PODS + 1)
    );

    // The scheduled backups landed on a pod's backups volume and verify.
    let backup = wait_until(
        Duration::from_secs(30),
        "a scheduled backup on a backups volume",
        || async {
            (1..=PODS).find_map(|n| {
                std::fs::read_dir(pods.pod_dir(n).join("backups"))
                    .ok()?
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .find(|p| p.extension().is_some_and(|x| x == "snap"))
            })
        },
    )
    .await;
    let inspected = run(
        &coffer_bin().to_string_lossy(),
        &["operator", "snapshot", "inspect", &backup.to_string_lossy()],
    )
    .expect("coffer operator snapshot inspect");
    assert!(inspected.contains("sha256"), "{inspected}");

    eprintln!(
        "MEASURED statefulset: {PODS} pods serving {:.1} s after start (ceremony included); rolling restart {:.1} s; writes acknowledged {}, failed {} (of which applied anyway: {}){}",
        serving_after.as_secs_f64(),
        rolled_in.as_secs_f64(),
        acked.len(),
        failed.len(),
        unknown_but_applied,
        failed
            .first()
            .map(|(p, e)| format!("; first failure {p}: {e}"))
            .unwrap_or_default()
    );
}
