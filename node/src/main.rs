//! The `coffer` command. See `coffer --help`; exit codes are documented in [`coffer_node::cli`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    coffer_node::cli::main()
}
