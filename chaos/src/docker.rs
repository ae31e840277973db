//! Coffer nodes as Docker containers on a private network: the image (built here, `FROM
//! scratch`, from the `coffer` binary and the libraries it links, since no registry can be
//! reached), one container and one data directory per node, and the faults a container can
//! suffer: SIGKILL, freeze, iptables rules in its network namespace, runtime failpoints, a
//! skewed clock.
//!
//! Everything goes through the `docker`, `nsenter` and `iptables` programs, as an operator
//! would type them; a failing command is an error that quotes what it printed.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use coffer_api::v1 as pb;
use coffer_api::v1::cluster_client::ClusterClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The client API port inside every container.
pub const API_PORT: u16 = 7000;
/// The peer (Raft) port inside every container.
pub const PEER_PORT: u16 = 7001;
/// The metrics (and, in test builds, failpoint control) port inside every container.
pub const METRICS_PORT: u16 = 9100;
/// Where the `faketime` package puts its preload library (Debian, x86_64 and others).
const FAKETIME_LIBS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
];

/// Runs a command and returns its stdout, or an error quoting its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    run_env(program, args, &[])
}

/// [`run`] with extra environment variables.
pub fn run_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}: is it installed and on PATH?"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn docker(args: &[&str]) -> Result<String> {
    run("docker", args)
}

/// Feeds a file's content to `h`, to tag the image it goes into.
fn file_hash(path: &Path, h: &mut std::collections::hash_map::DefaultHasher) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        h.write(&buf[..n]);
    }
}

/// The shared libraries a dynamically linked program needs, as absolute paths (`ldd`).
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = run("ldd", &[&program.to_string_lossy()])?;
    let mut libs = Vec::new();
    for line in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// The preload library for clock skew, when the `faketime` package is installed.
pub fn faketime_library() -> Option<&'static str> {
    FAKETIME_LIBS
        .iter()
        .copied()
        .find(|p| Path::new(p).exists())
}

/// Makes sure an image holding `binary` exists and returns its tag. The image is built `FROM
/// scratch`: the binary as `/coffer`, the libraries `ldd` lists at their own paths, and
/// libfaketime when installed (for the clock-skew fault). The tag is a hash of those files, so
/// a rebuilt binary gets a new image and an unchanged one is reused.
pub fn ensure_image(binary: &Path) -> Result<String> {
    if !binary.exists() {
        bail!(
            "the coffer binary {} does not exist: build it with `cargo build -p coffer-cluster-tests --bins` (the test build with failpoints) or pass --coffer-bin",
            binary.display()
        );
    }
    let mut files: Vec<(PathBuf, PathBuf)> = vec![(binary.to_path_buf(), "coffer".into())];
    let mut libs = shared_libraries(binary)?;
    if let Some(ft) = faketime_library() {
        libs.push(PathBuf::from(ft));
        libs.extend(shared_libraries(Path::new(ft))?);
    }
    libs.sort();
    libs.dedup();
    for lib in libs {
        let inside = lib.strip_prefix("/").unwrap_or(&lib).to_path_buf();
        files.push((lib, inside));
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (src, dst) in &files {
        h.write(dst.to_string_lossy().as_bytes());
        file_hash(src, &mut h)?;
    }
    let tag = format!("coffer-chaos:{:016x}", h.finish());
    if docker(&["image", "inspect", &tag]).is_ok() {
        return Ok(tag);
    }
    let root = std::env::temp_dir().join(format!("coffer-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for (src, dst) in &files {
        let to = root.join(dst);
        std::fs::create_dir_all(to.parent().expect("a file has a parent"))?;
        std::fs::copy(src, &to).with_context(|| format!("copy {}", src.display()))?;
    }
    for dir in ["tmp", "data", "tls", "skew"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    let mut tar = Command::new("tar")
        .args(["--owner=0", "--group=0", "-C"])
        .arg(&root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run tar")?;
    let out = Command::new("docker")
        .args([
            "import",
            "--change",
            "ENTRYPOINT [\"/coffer\"]",
            "--change",
            "ENV RUST_BACKTRACE=1",
            "-",
            &tag,
        ])
        .stdin(tar.stdout.take().expect("piped"))
        .output()
        .context("cannot run docker import")?;
    let _ = tar.wait();
    let _ = std::fs::remove_dir_all(&root);
    if !out.status.success() {
        bail!(
            "docker import failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(tag)
}

/// One node's container.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Node id.
    pub id: u64,
    /// Its address on the private network.
    pub ip: String,
    /// Bootstraps with the initial members (else it joins).
    pub initial: bool,
    /// The member API address a joining node joins through.
    pub join: Option<String>,
    /// Extra environment (e.g. the clock-skew preload) for its next container.
    pub env: Vec<(String, String)>,
}

/// A cluster of Coffer containers on their own network.
#[derive(Debug)]
pub struct DockerCluster {
    /// A short id naming this run's containers and network.
    pub run_id: String,
    network: String,
    prefix: String,
    dir: PathBuf,
    image: String,
    binary: PathBuf,
    /// The nodes by id (running or not).
    pub nodes: BTreeMap<u64, NodeSpec>,
    initial_members: Vec<String>,
    ca_pem: Vec<u8>,
    /// Keep the data and logs directory when dropped.
    pub keep: bool,
    base_env: Vec<(String, String)>,
    /// The administrator's session certificate and key (PEM), once initialized.
    session: std::sync::Mutex<Option<(String, String)>>,
}

impl DockerCluster {
    /// Creates the network and the certificates, and starts `n` voters that bootstrap a new
    /// cluster. `dir` holds the certificates and each node's data directory.
    pub fn create(
        binary: &Path,
        image: &str,
        dir: &Path,
        n: u64,
        seed: u64,
        env: Vec<(String, String)>,
    ) -> Result<Self> {
        let run_id = format!("{:x}-{:x}", std::process::id(), seed & 0xffff_ffff);
        let network = format!("coffer-chaos-{run_id}");
        let mut prefix = None;
        let mut errors = Vec::new();
        for attempt in 0..16u64 {
            let x = (seed.wrapping_add(attempt * 7919) ^ u64::from(std::process::id())) % 4096;
            let p = format!("10.{}.{}", 200 + x / 256 % 50, x % 256);
            match docker(&[
                "network",
                "create",
                "--driver",
                "bridge",
                "--subnet",
                &format!("{p}.0/24"),
                "--label",
                "coffer-chaos=1",
                &network,
            ]) {
                Ok(_) => {
                    prefix = Some(p);
                    break;
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let Some(prefix) = prefix else {
            bail!("cannot create a docker network: {}", errors.join("; "));
        };
        std::fs::create_dir_all(dir.join("tls"))?;
        // Docker takes only absolute paths as bind mounts.
        let dir = &std::fs::canonicalize(dir)?;
        let mut cluster = DockerCluster {
            run_id,
            network,
            prefix,
            dir: dir.to_path_buf(),
            image: image.to_string(),
            binary: binary.to_path_buf(),
            nodes: BTreeMap::new(),
            initial_members: Vec::new(),
            ca_pem: Vec::new(),
            keep: false,
            base_env: env,
            session: std::sync::Mutex::new(None),
        };
        for id in 1..=n {
            cluster.prepare(id, true)?;
        }
        cluster.ca_pem = std::fs::read(dir.join("tls/ca.pem")).context("read ca.pem")?;
        for id in 1..=n {
            cluster.run_container(id)?;
        }
        Ok(cluster)
    }

    /// Initializes the new cluster through node `via` with the `coffer` CLI, as an operator
    /// would: one generated operator key (threshold 1 of 1) and an administrator key in
    /// `keys/`, the unseal ceremony, and peer unseal turned on, so that a restarted or newly
    /// joined member unseals itself from any live one. (A fault that stops every member at
    /// once would need the ceremony again; no scenario does that.)
    pub fn initialize(&self, via: u64) -> Result<()> {
        let bin = self.binary.to_string_lossy().into_owned();
        let keys = self.dir.join("keys");
        let p = |name: &str| keys.join(name).to_string_lossy().into_owned();
        let addr = self.api_addr(via);
        let ca = self.dir.join("tls/ca.pem").to_string_lossy().into_owned();
        for name in ["operator", "admin"] {
            run(&bin, &["keygen", "--out", &p(name)])?;
        }
        let client = ["--addr", addr.as_str(), "--ca-cert", ca.as_str()];
        let with = |args: &[&str]| -> Vec<String> {
            args.iter()
                .chain(client.iter())
                .map(|a| a.to_string())
                .collect()
        };
        let runv = |args: Vec<String>| {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&bin, &refs)
        };
        runv(with(&[
            "operator",
            "init",
            "--operator-key",
            &p("operator.pub"),
            "--threshold",
            "1",
            "--admin-key",
            &p("admin.pub"),
            "--share-dir",
            &p(""),
        ]))?;
        runv(with(&[
            "operator",
            "unseal",
            "--key",
            &p("operator.key"),
            "--share",
            &p("operator.share"),
        ]))?;
        runv(with(&[
            "operator",
            "peer-unseal",
            "on",
            "--key",
            &p("operator.key"),
        ]))?;
        // The workload logs in as the administrator, with access to every key (as in
        // `coffer dev`); its session goes into keys/session.json.
        std::fs::write(
            keys.join("data.hcl"),
            "path \"secret/*\" {\n  capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\"]\n}\n",
        )?;
        let session = p("session.json");
        let admin = ["--identity-key".to_string(), p("admin.key")];
        let as_admin = |args: &[&str]| -> Result<String> {
            let mut all = with(args);
            all.extend(admin.iter().cloned());
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            run_env(&bin, &refs, &[("COFFER_SESSION_FILE", &session)])
        };
        as_admin(&["policy", "write", "chaos-data", &p("data.hcl")])?;
        as_admin(&["identity", "update", "admin", "--policy", "chaos-data"])?;
        let stored: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&session).context("the administrator's session")?,
        )?;
        let field = |name: &str| {
            stored[name]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("the stored session has no {name}"))
        };
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((field("certificate")?, field("key")?));
        Ok(())
    }

    /// Makes the node key of prepared node `id` (in its data directory, where the node looks
    /// for it) and registers it as the administrator through node `via` with the CLI; the
    /// node's next container joins through `via`.
    pub fn register_joining_node(&mut self, id: u64, via: u64) -> Result<()> {
        let bin = self.binary.to_string_lossy().into_owned();
        let out = self.data_dir(id).join("node-tls/node");
        let out = out.to_string_lossy().into_owned();
        run(&bin, &["keygen", "--out", &out])?;
        let keys = self.dir.join("keys");
        let p = |name: &str| keys.join(name).to_string_lossy().into_owned();
        let addr = self.api_addr(via);
        let ca = self.dir.join("tls/ca.pem").to_string_lossy().into_owned();
        run_env(
            &bin,
            &[
                "cluster",
                "register-node",
                "--id",
                &id.to_string(),
                "--public-key",
                &format!("{out}.pub"),
                "--addr",
                &addr,
                "--ca-cert",
                &ca,
                "--identity-key",
                &p("admin.key"),
            ],
            &[("COFFER_SESSION_FILE", &p("session.json"))],
        )?;
        if let Some(spec) = self.nodes.get_mut(&id) {
            spec.join = Some(addr);
        }
        Ok(())
    }

    /// Issues node `id`'s certificate and reserves its address; `initial` nodes bootstrap.
    pub fn prepare(&mut self, id: u64, initial: bool) -> Result<()> {
        let ip = format!("{}.{}", self.prefix, 10 + id);
        let node = format!("{id}={ip}");
        run(
            &self.binary.to_string_lossy(),
            &[
                "certs",
                "--dir",
                &self.dir.join("tls").to_string_lossy(),
                "--node",
                &node,
            ],
        )?;
        std::fs::create_dir_all(self.data_dir(id))?;
        if initial {
            self.initial_members
                .push(format!("{id}={ip}:{PEER_PORT}/{ip}:{API_PORT}",));
        }
        self.nodes.insert(
            id,
            NodeSpec {
                id,
                ip,
                initial,
                join: None,
                env: Vec::new(),
            },
        );
        Ok(())
    }

    fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    /// The container name of node `id`.
    pub fn container(&self, id: u64) -> String {
        format!("coffer-chaos-{}-n{id}", self.run_id)
    }

    /// The API address of node `id`.
    pub fn api_addr(&self, id: u64) -> String {
        format!("{}:{API_PORT}", self.nodes[&id].ip)
    }

    /// Creates and starts node `id`'s container (removing an old one of the same name).
    pub fn run_container(&mut self, id: u64) -> Result<()> {
        let name = self.container(id);
        let _ = docker(&["rm", "-f", &name]);
        let spec = self.nodes[&id].clone();
        let ip = &spec.ip;
        let data = format!("{}:/data", self.data_dir(id).display());
        let tls = format!("{}:/tls:ro", self.dir.join("tls").display());
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            name,
            "--label".into(),
            "coffer-chaos=1".into(),
            "--network".into(),
            self.network.clone(),
            "--ip".into(),
            ip.clone(),
            "-v".into(),
            data,
            "-v".into(),
            tls,
            "-e".into(),
            "RUST_LOG=info,openraft=warn".into(),
        ];
        for (k, v) in self.base_env.iter().chain(&spec.env) {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        args.push(self.image.clone());
        args.extend(
            [
                "server",
                "--node-id",
                &id.to_string(),
                "--data-dir",
                "/data",
                "--api-addr",
                &format!("{ip}:{API_PORT}"),
                "--peer-addr",
                &format!("{ip}:{PEER_PORT}"),
                "--metrics-addr",
                &format!("{ip}:{METRICS_PORT}"),
                "--tls-cert",
                &format!("/tls/node-{id}.pem"),
                "--tls-key",
                &format!("/tls/node-{id}-key.pem"),
                "--tls-ca",
                "/tls/ca.pem",
                "--write-timeout-ms",
                "3000",
                "--read-timeout-ms",
                "3000",
            ]
            .map(String::from),
        );
        if spec.initial {
            for m in &self.initial_members {
                args.push("--initial-member".into());
                args.push(m.clone());
            }
        }
        if let Some(via) = &spec.join {
            // Its node key is /data/node-tls/node.key (see `register_joining_node`).
            args.push("--join".into());
            args.push(via.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args)?;
        Ok(())
    }

    /// Whether node `id`'s container runs (paused counts as running), and its exit code.
    pub fn state(&self, id: u64) -> Result<(bool, i64)> {
        let out = docker(&[
            "inspect",
            "-f",
            "{{.State.Running}} {{.State.ExitCode}}",
            &self.container(id),
        ])?;
        let mut parts = out.split_whitespace();
        let running = parts.next() == Some("true");
        let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or(-1);
        Ok((running, code))
    }

    /// kill -9 (PodChaos pod-kill): no shutdown path runs.
    pub fn kill(&self, id: u64) -> Result<()> {
        docker(&["kill", "--signal", "KILL", &self.container(id)])?;
        let _ = docker(&["wait", &self.container(id)]);
        Ok(())
    }

    /// Starts a stopped node's container again, with its data.
    pub fn start(&self, id: u64) -> Result<()> {
        docker(&["start", &self.container(id)])?;
        Ok(())
    }

    /// Stops the node's process with SIGSTOP (a long GC pause, a stalled VM). The process is
    /// the container's PID 1 (no init), so the signal reaches it directly; `docker pause` needs
    /// the cgroup freezer, which nested Docker engines often lack.
    pub fn pause(&self, id: u64) -> Result<()> {
        docker(&["kill", "--signal", "STOP", &self.container(id)])?;
        Ok(())
    }

    /// Resumes a stopped process with SIGCONT.
    pub fn unpause(&self, id: u64) -> Result<()> {
        docker(&["kill", "--signal", "CONT", &self.container(id)])?;
        Ok(())
    }

    /// Removes node `id`'s container and data for good (after it left the membership).
    pub fn destroy_node(&mut self, id: u64) -> Result<()> {
        let _ = docker(&["rm", "-f", &self.container(id)]);
        let _ = std::fs::remove_dir_all(self.data_dir(id));
        self.nodes.remove(&id);
        Ok(())
    }

    fn pid(&self, id: u64) -> Option<String> {
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &self.container(id)]).ok()?;
        let pid = pid.trim().to_string();
        (pid != "0" && !pid.is_empty()).then_some(pid)
    }

    fn iptables(&self, id: u64, rule: &[&str]) -> Result<()> {
        let Some(pid) = self.pid(id) else {
            return Ok(()); // not running: nothing reaches it anyway, and a restart starts clean
        };
        let mut args = vec!["-t", &pid, "-n", "iptables", "-w"];
        args.extend_from_slice(rule);
        run("nsenter", &args)?;
        Ok(())
    }

    /// Drops every packet from `from` to `to` (one way), in both nodes' network namespaces.
    pub fn drop_packets(&self, from: u64, to: u64) -> Result<()> {
        let (fip, tip) = (&self.nodes[&from].ip, &self.nodes[&to].ip);
        self.iptables(from, &["-A", "OUTPUT", "-d", tip, "-j", "DROP"])?;
        self.iptables(to, &["-A", "INPUT", "-s", fip, "-j", "DROP"])
    }

    /// Cuts `a` and `b` apart in both directions (NetworkChaos partition, direction both).
    pub fn cut(&self, a: u64, b: u64) -> Result<()> {
        self.drop_packets(a, b)?;
        self.drop_packets(b, a)
    }

    /// Removes every partition rule.
    pub fn heal_network(&self) -> Result<()> {
        for id in self.nodes.keys() {
            self.iptables(*id, &["-F", "INPUT"])?;
            self.iptables(*id, &["-F", "OUTPUT"])?;
        }
        Ok(())
    }

    /// Sets (`Some(action)`) or removes (`None`) a failpoint in node `id`'s running process,
    /// through its metrics port (test builds only).
    pub async fn failpoint(&self, id: u64, name: &str, action: Option<&str>) -> Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = format!("{}:{METRICS_PORT}", self.nodes[&id].ip);
        let body = action.unwrap_or("");
        let method = if action.is_some() { "PUT" } else { "DELETE" };
        let request = format!(
            "{method} /failpoints/{name} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(&addr).await?;
            s.write_all(request.as_bytes()).await?;
            let mut response = String::new();
            s.read_to_string(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(3), exchange)
            .await
            .with_context(|| format!("node {id}'s metrics port did not answer"))??;
        if !response.starts_with("HTTP/1.1 200") {
            bail!(
                "setting failpoint {name} on node {id} failed (is the image a failpoints build?): {}",
                response.lines().next().unwrap_or("")
            );
        }
        Ok(())
    }

    /// The cluster CA certificate (PEM).
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// A lazily connecting TLS channel to node `id`'s API, each request bounded by `timeout`.
    pub fn channel(&self, id: u64, timeout: Duration) -> Result<Channel> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &*self.session.lock().unwrap_or_else(|e| e.into_inner()) {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Ok(
            Endpoint::from_shared(format!("https://{}", self.api_addr(id)))?
                .tls_config(tls)?
                .connect_timeout(Duration::from_secs(1))
                .timeout(timeout)
                .tcp_nodelay(true)
                .connect_lazy(),
        )
    }

    /// Node `id`'s status, if it answers within a second.
    pub async fn status(&self, id: u64, digest: bool) -> Option<pb::StatusResponse> {
        let channel = self.channel(id, Duration::from_secs(1)).ok()?;
        ClusterClient::new(channel)
            .status(pb::StatusRequest { digest })
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// The leader as the first answering node sees it (0 when none is known).
    pub async fn leader(&self) -> u64 {
        for id in self.nodes.keys() {
            if let Some(s) = self.status(*id, false).await
                && s.leader_id != 0
            {
                return s.leader_id;
            }
        }
        0
    }

    /// A node's container log (stdout and stderr, across restarts).
    pub fn logs(&self, id: u64) -> String {
        let out = Command::new("docker")
            .args(["logs", &self.container(id)])
            .output();
        match out {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(no log: {e})"),
        }
    }

    /// The directory with certificates and data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        for id in self.nodes.keys() {
            let _ = docker(&["rm", "-f", "-v", &self.container(*id)]);
        }
        let _ = docker(&["network", "rm", &self.network]);
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
