//! The `coffer` command. See `coffer --help`; exit codes are documented in [`coffer_node::cli`].
#![forbid(unsafe_code)]

/// mimalloc instead of glibc's malloc: a node allocates per request and per log entry, and
/// glibc's allocator (its free-list consolidation in particular) took a fifth of a node's CPU
/// under write load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    coffer_node::cli::main()
}
