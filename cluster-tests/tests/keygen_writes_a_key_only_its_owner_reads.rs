//! `coffer keygen` (and `coffer operator keygen`) write OUT.key readable by its owner only and
//! OUT.pub, print the fingerprint, and never overwrite an existing key.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use coffer_cluster_tests::coffer_bin;

#[test]
fn keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("alice");
    let run = |sub: &[&str]| {
        Command::new(coffer_bin())
            .args(sub)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("run coffer")
    };
    let first = run(&["keygen"]);
    assert!(first.status.success(), "{first:?}");
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains("fingerprint SHA256:"), "{stdout}");
    let key = dir.path().join("alice.key");
    let public = std::fs::read_to_string(dir.path().join("alice.pub")).expect("pub");
    assert!(public.starts_with("coffer-key-v1 "), "{public}");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let private = std::fs::read_to_string(&key).expect("key");
    assert!(private.contains("BEGIN COFFER PRIVATE KEY"));

    // The operator spelling is the same command; an existing key is never replaced.
    let again = run(&["operator", "keygen"]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&key).expect("key"), private);
}
