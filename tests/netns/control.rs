//! Control socket permissions as the kernel enforces them: a user who is neither root nor in
//! group `egressguard` is refused; root is let in.

use std::process::Command;

use egressguard::netns::sh;

use crate::common::{agent_bin, require_root};

#[test]
fn non_root_user_without_the_group_is_refused() {
    if !require_root("non_root_user_without_the_group_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // World-traversable directory, so only the socket's own mode decides.
    sh(&["chmod", "0755", dir.path().to_str().unwrap()]).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\nnetworks:\n  - prefix: 203.0.113.0/24\n",
    )
    .unwrap();
    let sock = dir.path().join("control.sock");
    let ns = egressguard::netns::Netns::new("ctl").unwrap();
    let mut agent = egressguard::netns::Proc::new(
        ns.command(&[])
            .arg(agent_bin())
            .arg("run")
            .arg("--policy")
            .arg(&policy)
            .arg("--state-dir")
            .arg(dir.path())
            .arg("--socket")
            .arg(&sock)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "agent did not create its socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let as_nobody = |extra_groups: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", extra_groups])
            .arg(agent_bin())
            .args(["status", "--socket"])
            .arg(&sock)
            .output()
            .unwrap()
    };
    let out = as_nobody("--clear-groups");
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");

    let out = Command::new(agent_bin())
        .args(["status", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "root is let in: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.stop(std::time::Duration::from_secs(5));
}
