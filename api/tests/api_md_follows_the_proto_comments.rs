//! `docs/api.md` documents every RPC of every API package with the first sentence of the RPC's
//! comment in its `.proto` file: a changed comment or a new RPC fails this test until the page
//! says the same (the failure prints the rows to paste). Every package is versioned
//! (`coffer.NAME.v1`) and every RPC has a comment.

use std::path::Path;

/// (package.Service, rpc, first sentence of its comment) for every RPC in `proto`.
fn rpcs(proto: &str) -> Vec<(String, String, String)> {
    let package = proto
        .lines()
        .find_map(|l| l.strip_prefix("package "))
        .expect("a package line")
        .trim_end_matches(';')
        .to_string();
    let mut out = Vec::new();
    let mut service = String::new();
    let mut comment = String::new();
    for line in proto.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("service ") {
            service = rest.trim_end_matches('{').trim().to_string();
            comment.clear();
        } else if let Some(c) = line.strip_prefix("//") {
            comment.push_str(c.trim());
            comment.push(' ');
        } else if let Some(rest) = line.strip_prefix("rpc ") {
            let name = rest.split('(').next().expect("rpc name").trim().to_string();
            let first = comment
                .split_inclusive(". ")
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            out.push((format!("{package}.{service}"), name, first));
            comment.clear();
        } else {
            comment.clear();
        }
    }
    out
}

#[test]
fn every_versioned_rpc_is_documented_with_its_proto_comment() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("../docs/api.md")).expect("docs/api.md");
    let mut missing = Vec::new();
    let mut checked = 0;
    let mut protos = Vec::new();
    for package in std::fs::read_dir(root.join("proto/coffer")).expect("proto/coffer") {
        let dir = package.expect("entry").path().join("v1");
        for file in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            protos.push(file.expect("entry").path());
        }
    }
    assert!(
        !root.join("proto/coffer.proto").exists(),
        "one package per service: no unversioned proto"
    );
    for proto in &protos {
        let text = std::fs::read_to_string(proto).expect("proto");
        let dir = proto
            .parent()
            .and_then(|p| p.parent())
            .and_then(|p| p.file_name());
        let expected = format!("package coffer.{}.v1;", dir.expect("dir").to_string_lossy());
        assert!(
            text.contains(&expected),
            "{} declares {expected}",
            proto.display()
        );
        for (service, rpc, first) in rpcs(&text) {
            checked += 1;
            assert!(
                !first.is_empty(),
                "{service}.{rpc} has no comment in {}",
                proto.display()
            );
            let row = format!("| `{service}.{rpc}` | {first} |");
            if !doc.lines().any(|l| l.trim() == row) {
                missing.push(row);
            }
        }
    }
    assert!(checked >= 50, "the protos were read ({checked} RPCs)");
    assert!(
        missing.is_empty(),
        "docs/api.md lacks these rows (or says something else):\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_comment_parser_takes_the_first_sentence() {
    let rows = rpcs(
        "package a.v1;\nservice S {\n  // Does X. More text\n  // here.\n  rpc Do(R) returns (R);\n  rpc Bare(R) returns (R);\n}\n",
    );
    assert_eq!(rows[0], ("a.v1.S".into(), "Do".into(), "Does X.".into()));
    assert_eq!(rows[1].2, "", "no comment");
    assert_eq!(rows.len(), 2);
}
