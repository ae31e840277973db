//! A wire tap for tests: in builds with the `failpoints` feature, when the environment variable
//! `COFFER_TEST_WIRE_TAP` is set to a path, every peer message this node hands to its transport
//! (before TLS) is appended to `PATH.PID`. A test then scans that file to prove that no secret
//! crosses the node-to-node channel in the clear. Release builds compile this to nothing.

/// Records bytes about to be sent to a peer (a request or a response).
#[inline]
pub(crate) fn outgoing(bytes: &[u8]) {
    #[cfg(feature = "failpoints")]
    enabled::record(bytes);
    #[cfg(not(feature = "failpoints"))]
    let _ = bytes;
}

#[cfg(feature = "failpoints")]
mod enabled {
    use std::io::Write;
    use std::sync::{Mutex, OnceLock};

    static TAP: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();

    pub(super) fn record(bytes: &[u8]) {
        let tap = TAP.get_or_init(|| {
            let path = std::env::var_os("COFFER_TEST_WIRE_TAP")?;
            let mut path = std::path::PathBuf::from(path).into_os_string();
            path.push(format!(".{}", std::process::id()));
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
                .map(Mutex::new)
        });
        if let Some(file) = tap
            && let Ok(mut f) = file.lock()
        {
            let _ = f.write_all(bytes);
        }
    }
}
