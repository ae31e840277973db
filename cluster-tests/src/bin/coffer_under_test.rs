//! The `coffer` program, for the multi-node tests (same entry point as the shipped binary), with
//! storage failpoints that a test turns on through the `FAILPOINTS` environment variable, e.g.
//! `FAILPOINTS=storage::fsync=20*off->return` (the 21st durable commit fails).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    let scenario = fail::FailScenario::setup();
    let code = coffer_node::cli::main();
    scenario.teardown();
    code
}
