//! Compiles the subset of etcd's v3 KV API that `coffer bench --target etcd` speaks
//! (`proto/etcd/kv.proto`) with protox (pure Rust, no system protoc). It becomes a private
//! module of the bench, not part of Coffer's public API (which lives in the `api` crate).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/etcd/kv.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto/etcd"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
