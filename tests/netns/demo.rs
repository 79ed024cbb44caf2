//! `egressguard demo` runs end to end as root and leaves no namespace behind, also when it
//! is interrupted with Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use egressguard::netns::sh;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::{agent_bin, require_root};

fn namespaces_of(out: &str) -> Vec<String> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("namespaces: "))
        .map(|l| l.split(", ").map(str::to_owned).collect())
        .unwrap_or_default()
}

fn assert_gone(names: &[String]) {
    let left = sh(&["ip", "netns", "list"]).unwrap();
    for n in names {
        assert!(
            !left.contains(n.as_str()),
            "namespace {n} left behind:\n{left}"
        );
    }
}

#[test]
fn demo_runs_end_to_end_and_cleans_up() {
    if !require_root("demo_runs_end_to_end_and_cleans_up") {
        return;
    }
    let out = Command::new(agent_bin())
        .args(["demo", "--pause", "0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Before the incident every customer reaches the internet, v4 and v6.
    assert_eq!(
        stdout.matches("ping ok      tcp/8080 ok      \n").count(),
        4,
        "{stdout}"
    );
    // The scan is detected and the scanner quarantined: only the walled garden answers it;
    // its neighbour is untouched; the reconnect lets it back on.
    assert!(
        stdout.contains("address held addr=203.0.113.10/32 category=port_scan"),
        "{stdout}"
    );
    for line in [
        "ping BLOCKED tcp/8080 BLOCKED (must fail: quarantined)",
        "ping ok      tcp/8080 ok      (walled garden: must pass)",
        "ping ok      tcp/8080 ok      (neighbour: must pass)",
        "ping ok      tcp/8080 ok      (reconnected: must pass)",
        "203.0.113.10/32  quarantine  1",
        "distinct ports contacted on one server (distinct_ports)",
        "reconnect applied addr=203.0.113.10/32 ticket=ABUSE-DEMO-1",
        "no active blocks",
    ] {
        assert!(
            stdout.contains(line),
            "demo output lacks `{line}`:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("agent | ") && stdout.contains("started"),
        "{stdout}"
    );
    assert!(stdout.contains("all namespaces removed"), "{stdout}");
    let names = namespaces_of(&stdout);
    assert_eq!(names.len(), 5, "{stdout}");
    assert_gone(&names);
}

#[test]
fn demo_interrupted_with_ctrl_c_cleans_up() {
    if !require_root("demo_interrupted_with_ctrl_c_cleans_up") {
        return;
    }
    let mut child = Command::new(agent_bin())
        .args(["demo", "--pause", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut names = Vec::new();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        text.push_str(&line);
        text.push('\n');
        if line.contains("namespaces: ") {
            names = namespaces_of(&text);
            kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
        }
        assert!(Instant::now() < deadline, "demo did not stop:\n{text}");
    }
    let status = child.wait().unwrap();
    assert!(!names.is_empty(), "never saw the namespaces:\n{text}");
    assert!(
        !status.success(),
        "an interrupted demo must not report success"
    );
    let err = {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut s).unwrap();
        s
    };
    assert!(err.contains("interrupted"), "{err}");
    assert_gone(&names);
}
