//! The README's quick start works as written: `coffer dev` starts a transient three-node
//! cluster and writes an `env` file; with it, the CLI puts and gets a secret from any node,
//! prints JSON on request, shows every member in `coffer status`, and reports errors once on
//! stderr with exit code 1 (2 for usage errors).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use coffer_cluster_tests::coffer_bin;

struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read_env(path: &Path) -> Option<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let vars: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ["COFFER_ADDR", "COFFER_CACERT", "COFFER_OPERATOR_KEY"]
        .iter()
        .all(|k| vars.contains_key(*k))
        .then_some(vars)
}

fn coffer(env: &HashMap<String, String>, args: &[&str]) -> Output {
    Command::new(coffer_bin())
        .args(args)
        .envs(env)
        .output()
        .expect("run coffer")
}

#[test]
fn cli_and_dev_quick_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = std::fs::File::create(dir.path().join("dev.log")).expect("log");
    let _dev = Dev(Command::new(coffer_bin())
        .args(["dev", "--nodes", "3", "--dir"])
        .arg(dir.path().join("dev"))
        .stdout(Stdio::from(log.try_clone().expect("clone")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start coffer dev"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let env = loop {
        if let Some(env) = read_env(&dir.path().join("dev/env")) {
            break env;
        }
        assert!(
            Instant::now() < deadline,
            "coffer dev wrote no env file: {}",
            std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(env["COFFER_ADDR"].split(',').count(), 3);

    let put = coffer(
        &env,
        &["kv", "put", "secret/app/db", "password=s3cret", "user=app"],
    );
    assert!(put.status.success(), "{put:?}");
    // Read it back through each node in turn.
    for addr in env["COFFER_ADDR"].split(',') {
        let get = coffer(
            &env,
            &[
                "kv",
                "get",
                "secret/app/db",
                "--format",
                "json",
                "--addr",
                addr,
            ],
        );
        assert!(get.status.success(), "{get:?}");
        let json: serde_json::Value = serde_json::from_slice(&get.stdout).expect("json");
        assert_eq!(json["data"]["password"], "s3cret");
        assert_eq!(json["data"]["user"], "app");
        assert_eq!(json["version"]["version"], 1);
    }
    let table = coffer(&env, &["kv", "get", "secret/app/db"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("password") && text.contains("s3cret"),
        "{text}"
    );
    let field = coffer(&env, &["kv", "get", "secret/app/db", "--field", "user"]);
    assert_eq!(String::from_utf8_lossy(&field.stdout).trim(), "app");

    let status = coffer(&env, &["status", "--format", "json"]);
    assert!(status.status.success(), "{status:?}");
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    let nodes = json["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3);
    let leaders: Vec<_> = nodes.iter().filter(|n| n["state"] == "Leader").collect();
    assert_eq!(leaders.len(), 1, "{json}");
    // The transient cluster is initialized and unsealed, by the same ceremony as a real one,
    // with keys the tool generated (private ones readable by their owner only).
    assert!(nodes.iter().all(|n| n["seal"] == "unsealed"), "{json}");
    let keys = Path::new(&env["COFFER_OPERATOR_KEY"])
        .parent()
        .expect("keys dir")
        .to_path_buf();
    for f in [
        "operator.key",
        "admin.key",
        "operator.pub",
        "admin.pub",
        "operator.share",
    ] {
        assert!(keys.join(f).exists(), "{f} in {}", keys.display());
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(keys.join("admin.key"))
        .expect("admin key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Every node served a linearizable read of the put, so every node applied it.
    assert!(
        nodes.iter().all(|n| n["applied_index"].as_u64() >= Some(2)),
        "{json}"
    );

    let missing = coffer(&env, &["kv", "get", "secret/app/nope"]);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
    assert!(stderr.contains("no secret"), "{stderr}");

    let usage = coffer(&env, &["kv", "frobnicate"]);
    assert_eq!(usage.status.code(), Some(2));

    let list = coffer(&env, &["kv", "list", "secret/app/"]);
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "db");
    let second = coffer(
        &env,
        &["kv", "put", "secret/app/db", "password=n3w", "user=app"],
    );
    assert!(second.status.success(), "{second:?}");
    let delete = coffer(&env, &["kv", "delete", "secret/app/db"]);
    assert!(
        String::from_utf8_lossy(&delete.stdout).contains("version(s) 2"),
        "{delete:?}"
    );
    let gone = coffer(&env, &["kv", "get", "secret/app/db"]);
    assert_eq!(gone.status.code(), Some(1));
    let older = coffer(
        &env,
        &[
            "kv",
            "get",
            "secret/app/db",
            "--version",
            "1",
            "--field",
            "password",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&older.stdout).trim(),
        "s3cret",
        "{older:?}"
    );

    // Wrapped data, to the administrator's own key: read once.
    let wrap = coffer(
        &env,
        &[
            "wrap",
            "--to",
            &format!("{}/admin.pub", keys.display()),
            "--ttl",
            "10m",
            "token=abc123",
        ],
    );
    assert!(wrap.status.success(), "{wrap:?}");
    let id = String::from_utf8_lossy(&wrap.stdout).trim().to_string();
    let unwrap = coffer(&env, &["unwrap", &id]);
    assert!(unwrap.status.success(), "{unwrap:?}");
    assert!(
        String::from_utf8_lossy(&unwrap.stdout).contains("abc123"),
        "{unwrap:?}"
    );
    let again = coffer(&env, &["unwrap", &id]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already consumed"),
        "{again:?}"
    );

    let no_ca = Command::new(coffer_bin())
        .args([
            "kv",
            "get",
            "secret/x",
            "--addr",
            env["COFFER_ADDR"].split(',').next().expect("addr"),
        ])
        .env_remove("COFFER_CACERT")
        .output()
        .expect("run");
    assert_eq!(no_ca.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_ca.stderr).contains("COFFER_CACERT"));
}
