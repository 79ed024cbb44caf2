//! `egressguard check` as an operator runs it: every shipped policy passes, every broken
//! fixture is refused with exit 1 and the errors at the right file:line:column.
//!
//! Each fixture in `tests/fixtures/policy/broken/` starts with `# expect: LINE:COL: TEXT`
//! lines; every one must appear as `FILE:LINE:COL: error: …TEXT…` and no other error may.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_egressguard"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn check(file: &Path, extra: &[&str]) -> (i32, String) {
    let out = bin()
        .arg("check")
        .arg("--policy")
        .arg(file)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn accepts_every_shipped_policy() {
    let mut files = vec![repo().join("policies/default.yaml")];
    for e in std::fs::read_dir(repo().join("policies/examples")).unwrap() {
        files.push(e.unwrap().path());
    }
    assert!(files.len() >= 4, "default plus at least three examples");
    for f in files {
        let (code, out) = check(&f, &[]);
        assert_eq!(code, 0, "{} refused:\n{out}", f.display());
        assert!(out.contains("policy OK"), "{out}");
        assert!(
            !out.contains("warning"),
            "{} has warnings:\n{out}",
            f.display()
        );
    }
}

#[test]
fn refuses_each_broken_fixture_at_the_right_place() {
    let dir = repo().join("tests/fixtures/policy/broken");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let f = e.unwrap().path();
        let text = std::fs::read_to_string(&f).unwrap();
        let expects: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|l| {
                let mut parts = l.splitn(3, ": ");
                let at = parts.next().unwrap().to_owned();
                let rest = parts.collect::<Vec<_>>().join(": ");
                (at, rest)
            })
            .collect();
        assert!(
            !expects.is_empty(),
            "{} has no `# expect:` line",
            f.display()
        );
        let (code, out) = check(&f, &[]);
        assert_eq!(code, 1, "{} was not refused:\n{out}", f.display());
        let errors: Vec<&str> = out.lines().filter(|l| l.contains(": error: ")).collect();
        assert_eq!(
            errors.len(),
            expects.len(),
            "{}: errors\n{out}",
            f.display()
        );
        for (at, msg) in &expects {
            let prefix = format!("{}:{at}: error: ", f.display());
            assert!(
                errors
                    .iter()
                    .any(|l| l.starts_with(&prefix) && l.contains(msg.as_str())),
                "{}: expected `{prefix}…{msg}…` in\n{out}",
                f.display()
            );
        }
        n += 1;
    }
    assert!(n >= 8, "only {n} fixtures");
}

#[test]
fn json_output_and_effective_policy() {
    let (code, out) = check(
        &repo().join("policies/default.yaml"),
        &["--json", "--print-effective"],
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["policy"]["mode"], "dry-run");
    assert_eq!(v["policy"]["profiles"]["default"]["flood"]["window"], "10s");
    let (code, out) = check(
        &repo().join("tests/fixtures/policy/broken/bad-prefix.yaml"),
        &["--json"],
    );
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["diagnostics"][0]["line"], 4);
    assert_eq!(v["diagnostics"][0]["column"], 13);
    assert_eq!(v["diagnostics"][0]["path"], "networks[0].prefix");
}

#[test]
fn print_effective_shows_inherited_values() {
    let (code, out) = check(
        &repo().join("policies/examples/mail-and-scanner.yaml"),
        &["--print-effective"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("# effective policy"), "{out}");
    assert!(out.contains("mailrelay:"), "{out}");
    assert!(out.contains("forget_after: 180d"), "{out}");
    assert!(out.contains("hold: for 1h"), "{out}");
}

#[test]
fn unreadable_file_is_a_clear_error() {
    let out = bin()
        .args(["check", "--policy", "/nonexistent/policy.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/policy.yaml: cannot read the policy"),
        "{err}"
    );
}

/// With `--json`, an error is a JSON object on stdout (scripts parse stdout), the message on
/// stderr as well: an unreadable policy for `check`, no agent for a control verb.
#[test]
fn json_errors_are_json_objects_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    for (args, exit, says) in [
        (
            vec!["check", "--json", "--policy", "/nonexistent/policy.yaml"],
            1,
            "/nonexistent/policy.yaml: cannot read the policy",
        ),
        (
            vec!["status", "--json", "--socket", sock.to_str().unwrap()],
            3,
            "cannot reach the agent",
        ),
        (
            vec!["list", "--json", "--socket", sock.to_str().unwrap()],
            3,
            "cannot reach the agent",
        ),
    ] {
        let out = bin().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(exit), "{args:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {out:?}"));
        assert_eq!(v["result"], "error", "{v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{v}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(says));
    }
}

#[test]
fn reconnects_without_a_running_agent_are_reported_unchecked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        "version: 1\nnetworks:\n  - prefix: 203.0.113.0/24\nreconnect:\n  - address: 203.0.113.45\n    \
         ticket: ABUSE-1\n    authorised_by: desk\n    conditions: [fee_paid, reinstalled, acknowledged]\n    \
         expires: 2099-01-01T00:00:00Z\n",
    )
    .unwrap();
    let sock = dir.path().join("no-agent.sock");
    let sock = sock.to_str().unwrap();
    let (code, out) = check(&file, &["--socket", sock]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("policy OK"), "{out}");
    assert!(
        out.contains("not checked against the agent's state") && out.contains("no-agent.sock"),
        "{out}"
    );
    let (code, out) = check(&file, &["--socket", sock, "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["reconnects_unchecked"].as_str().is_some(), "{out}");
}

/// `egressguard check --print-effective | head -1`: a reader that goes away ends the program
/// quietly (status 0), not with a panic.
#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let mut child = bin()
        .arg("check")
        .arg("--print-effective")
        .arg("--policy")
        .arg(repo().join("policies/examples/isp-edge.yaml"))
        .arg("--socket")
        .arg("/nonexistent")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before the program writes anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}
