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

/// The operator's workflow through the CLI against a running agent: a manual block lands in
/// the kernel's set and in `list --json`, `show --json` has the audit trail, the metrics
/// endpoint counts it, and `unblock` lifts it.
#[test]
fn operator_block_list_show_metrics_unblock() {
    if !require_root("operator_block_list_show_metrics_unblock") {
        return;
    }
    let ns = egressguard::netns::Netns::new("ops").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = "version: 1\nmode: enforce\nnetworks:\n  - prefix: 203.0.113.0/24\nmetrics:\n  listen: 127.0.0.1:9474\n";
    let exe = agent_bin();
    let mut agent =
        egressguard::netns::Agent::start(Some(&ns), &exe, dir.path(), policy, false).unwrap();
    agent
        .wait_for(&["started"], std::time::Duration::from_secs(10))
        .unwrap();
    let run = |args: &[&str]| {
        let out = agent.cli(&exe, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let out = run(&[
        "block",
        "203.0.113.66",
        "--reason",
        "abuse ticket 7",
        "--for",
        "1h",
    ]);
    assert!(out.contains("203.0.113.66/32"), "{out}");
    let list: serde_json::Value = serde_json::from_str(&run(&["list", "--json"])).unwrap();
    assert_eq!(list[0]["target"], "203.0.113.66/32", "{list}");
    assert_eq!(list[0]["kind"], "block");
    assert!(list[0]["until"].is_u64(), "{list}");
    let in_set = || {
        ns.run(&["nft", "list", "set", "inet", "egressguard", "blocked4"])
            .map(|s| s.contains("203.0.113.66"))
            .unwrap_or(false)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !in_set() {
        assert!(
            std::time::Instant::now() < deadline,
            "block never reached the nft set"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // A reason with a newline and a terminal escape cannot forge a row or drive the
    // terminal of whoever runs `list` or `show` later.
    run(&[
        "block",
        "203.0.113.67",
        "--reason",
        "x\n203.0.113.99  block  1  forged\u{1b}[2J",
        "--for",
        "1h",
    ]);
    for verb in [vec!["list"], vec!["show", "203.0.113.67"]] {
        let text = run(&verb);
        assert!(
            !text.contains('\u{1b}'),
            "{verb:?} prints ESC raw: {text:?}"
        );
        assert!(
            !text.lines().any(|l| l.starts_with("203.0.113.99")),
            "{verb:?} prints a forged row: {text}"
        );
        assert!(text.contains("x\\n203.0.113.99"), "{verb:?}: {text}");
    }
    // `egressguard status | head -1` with the reader gone: quiet, status 0.
    let mut status = std::process::Command::new(&exe)
        .args(["status", "--socket"])
        .arg(dir.path().join("control.sock"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(status.stdout.take());
    let out = status.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");

    let show: serde_json::Value =
        serde_json::from_str(&run(&["show", "203.0.113.66", "--json"])).unwrap();
    assert_eq!(show["current"]["kind"], "block", "{show}");
    assert!(
        show["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["actor"] == "root"),
        "the operator is in the audit trail: {show}"
    );

    // One HTTP request to the metrics endpoint, from inside the agent's namespace.
    let scrape = "exec 3<>/dev/tcp/127.0.0.1/9474; \
                  printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; timeout 5 cat <&3";
    let metrics = ns.run(&["bash", "-c", scrape]).unwrap();
    assert!(
        metrics.contains("egressguard_active_blocks{kind=\"block\"} 2"), // .66 and .67
        "{metrics}"
    );

    run(&["unblock", "203.0.113.67", "--ticket", "T-8"]);
    let out = run(&["unblock", "203.0.113.66", "--ticket", "T-7"]);
    assert!(out.contains("unblocked"), "{out}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while in_set() {
        assert!(
            std::time::Instant::now() < deadline,
            "unblock never reached the nft set"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(run(&["list", "--json"]).trim(), "[]");
    assert_eq!(
        agent
            .stop(std::time::Duration::from_secs(5))
            .and_then(|s| s.code()),
        Some(0)
    );
}
