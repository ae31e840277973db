//! The `coffer` program, for the multi-node tests (same entry point as the shipped binary).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    coffer_node::cli::main()
}
