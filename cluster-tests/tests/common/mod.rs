//! Shared by the tests that read the deployment manifests: rendering them as `kubectl` does.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `deploy/kubernetes` in the workspace.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cluster-tests/ is inside the workspace")
        .join("deploy/kubernetes")
}

/// `kubectl kustomize DIR` (relative to `deploy/kubernetes`), each object as JSON; panics with
/// what to install when kubectl is missing.
pub fn must_render(dir: &str) -> Vec<Value> {
    let path = deploy_dir().join(dir);
    let out = match Command::new("kubectl").arg("kustomize").arg(&path).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run `kubectl kustomize {}` ({e}): this test needs kubectl (1.27 or later, which embeds kustomize 5) on the PATH",
            path.display()
        ),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("kubectl prints UTF-8");
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_yaml::Value =
            serde::Deserialize::deserialize(doc).expect("kubectl prints valid YAML");
        if !value.is_null() {
            docs.push(serde_json::to_value(value).expect("a manifest is representable as JSON"));
        }
    }
    assert!(!docs.is_empty(), "{dir} renders no object");
    docs
}
