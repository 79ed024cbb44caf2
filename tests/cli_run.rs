//! `egressguard run` as systemd drives it: starts, reloads on SIGHUP (refusing a broken
//! policy and keeping the old one), stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const GOOD: &str = "version: 1\nmode: dry-run\nnetworks:\n  - prefix: 203.0.113.0/24\n";

struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Agent {
    fn start(dir: &Path) -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_egressguard"))
            .arg("run")
            .arg("--policy")
            .arg(dir.join("policy.yaml"))
            .arg("--state-dir")
            .arg(dir)
            .arg("--socket")
            .arg(dir.join("control.sock"))
            .env("EGRESSGUARD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Agent {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits up to 10 s for a log line containing every needle.
    fn expect(&mut self, needles: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if needles.iter().all(|n| l.contains(n)) {
                        return l;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no log line with {needles:?}; saw:\n{}",
            self.seen.join("\n")
        );
    }

    fn signal(&self, s: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), s).unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn starts_reloads_refuses_broken_policy_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, GOOD).unwrap();
    let mut agent = Agent::start(dir.path());
    let started = agent.expect(&["started", "mode=\"dry-run\""]);
    let version = started
        .split("version=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();

    // A broken policy is refused with its error position; the old one stays in force.
    std::fs::write(
        &policy,
        "version: 1\nnetworks:\n  - prefix: 203.0.113.0/33\n",
    )
    .unwrap();
    agent.signal(Signal::SIGHUP);
    agent.expect(&["policy refused", "policy.yaml:3:13"]);
    agent.expect(&[
        "policy refused, keeping the previous policy",
        &format!("kept={version}"),
    ]);
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "agent exited after a broken reload"
    );

    // A good one is taken.
    std::fs::write(&policy, GOOD.replace("dry-run", "enforce")).unwrap();
    agent.signal(Signal::SIGHUP);
    agent.expect(&[
        "policy reloaded",
        &format!("previous={version}"),
        "mode=\"enforce\"",
    ]);

    agent.signal(Signal::SIGTERM);
    agent.expect(&["stopping", "SIGTERM"]);
    agent.expect(&["stopped"]);
    let status = agent.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}

#[test]
fn refuses_to_start_with_a_broken_policy() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), "version: 1\nnetworks: []\n").unwrap();
    let mut agent = Agent::start(dir.path());
    agent.expect(&["policy refused", "no customer networks"]);
    let status = agent.child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "exit code for an invalid policy");
}

fn cli(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_egressguard"))
        .args(args)
        .arg("--socket")
        .arg(dir.join("control.sock"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn control_socket_status_and_reload() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, GOOD).unwrap();
    let mut agent = Agent::start(dir.path());
    let started = agent.expect(&["started"]);
    let version = started
        .split("version=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();

    let mode = std::fs::metadata(dir.path().join("control.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "control socket mode");

    let (code, out, err) = cli(dir.path(), &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["mode"], "dry-run");
    assert_eq!(v["policy_version"], version.as_str());
    for field in [
        "sources_tracked",
        "events_seen",
        "events_lost",
        "blocked",
        "quarantined",
        "breaker",
        "bgp",
    ] {
        assert!(v.get(field).is_some(), "status --json lacks {field}: {out}");
    }

    // `reload` waits for the outcome: a broken policy exits 1 with its errors.
    std::fs::write(
        &policy,
        "version: 1\nnetworks:\n  - prefix: 203.0.113.0/33\n",
    )
    .unwrap();
    let (code, _, err) = cli(dir.path(), &["reload"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("policy.yaml:3:13: error: networks[0].prefix"),
        "{err}"
    );
    let (_, out, _) = cli(dir.path(), &["status", "--json"]);
    assert!(
        out.contains(&version),
        "old policy must stay in force: {out}"
    );

    std::fs::write(&policy, GOOD.replace("dry-run", "enforce")).unwrap();
    let (code, out, err) = cli(dir.path(), &["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("policy reloaded"), "{out}");

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.child.wait().unwrap().code(), Some(0));
    assert!(
        !dir.path().join("control.sock").exists(),
        "socket removed on stop"
    );
    let (code, _, err) = cli(dir.path(), &["status"]);
    assert_eq!(code, 3);
    assert!(err.contains("is it running?"), "{err}");
}
