//! Helpers shared by the namespace tests.

#![allow(dead_code)]

use std::path::PathBuf;

/// Whether the test may run: true as root. Not root: panics under CI, otherwise prints a loud
/// notice and returns false so the test returns early.
pub fn require_root(test: &str) -> bool {
    if egressguard::netns::is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root (network namespaces, nftables); CI must run the tests as root");
    }
    eprintln!(
        "\n*** SKIPPED {test}: not root. Run the namespace tests as root: sudo -E cargo test --test netns ***\n"
    );
    false
}

/// The built agent binary.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_egressguard"))
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Polls `f` until it returns `Some`, at most `timeout`; panics naming `what` otherwise.
pub fn wait_for<T>(
    what: &str,
    timeout: std::time::Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
