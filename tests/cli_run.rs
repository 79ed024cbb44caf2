//! `egressguard run` as systemd drives it: starts, reloads on SIGHUP (refusing a broken
//! policy and keeping the old one), stops cleanly on SIGTERM; the control socket answers
//! `status` and `reload`.

use std::path::Path;
use std::time::Duration;

use egressguard::netns::{Agent, Netns, is_root};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const GOOD: &str = "version: 1\nmode: dry-run\nnetworks:\n  - prefix: 203.0.113.0/24\n";
const WAIT: Duration = Duration::from_secs(10);

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_egressguard"))
}

/// The agent needs root (its nft table, conntrack); it runs in a namespace of its own so the
/// host's tables are never touched. Not root: fails under CI, skips loudly elsewhere.
fn sandbox(test: &str) -> Option<Netns> {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: needs root; CI must run the tests as root"
        );
        eprintln!("\n*** SKIPPED {test}: not root ***\n");
        return None;
    }
    Some(Netns::new("clirun").unwrap())
}

/// Starts the agent in `ns` with its files in `dir`; returns it with the policy version it logged.
fn start(ns: &Netns, dir: &Path, policy: &str) -> (Agent, String) {
    let mut agent = Agent::start(Some(ns), exe(), dir, policy, false).unwrap();
    let started = agent.wait_for(&["started"], WAIT).unwrap();
    let version = started
        .split("version=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    (agent, version)
}

fn signal(agent: &Agent, s: Signal) {
    kill(Pid::from_raw(agent.pid() as i32), s).unwrap();
}

fn cli(agent: &Agent, args: &[&str]) -> (i32, String, String) {
    let out = agent.cli(exe(), args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn starts_reloads_refuses_broken_policy_and_stops_on_sigterm() {
    let Some(ns) = sandbox("starts_reloads_refuses_broken_policy_and_stops_on_sigterm") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    let (mut agent, version) = start(&ns, dir.path(), GOOD);
    assert!(agent.log().contains("mode=\"dry-run\""), "{}", agent.log());

    // A broken policy is refused with its error position; the old one stays in force.
    std::fs::write(
        &policy,
        "version: 1\nnetworks:\n  - prefix: 203.0.113.0/33\n",
    )
    .unwrap();
    signal(&agent, Signal::SIGHUP);
    agent
        .wait_for(&["policy refused", "policy.yaml:3:13"], WAIT)
        .unwrap();
    agent
        .wait_for(
            &[
                "policy refused, keeping the previous policy",
                &format!("kept={version}"),
            ],
            WAIT,
        )
        .unwrap();

    // A good one is taken.
    std::fs::write(&policy, GOOD.replace("dry-run", "enforce")).unwrap();
    signal(&agent, Signal::SIGHUP);
    agent
        .wait_for(
            &[
                "policy reloaded",
                &format!("previous={version}"),
                "mode=\"enforce\"",
            ],
            WAIT,
        )
        .unwrap();

    signal(&agent, Signal::SIGTERM);
    agent.wait_for(&["stopping", "SIGTERM"], WAIT).unwrap();
    agent.wait_for(&["stopped"], WAIT).unwrap();
    let status = agent.stop(WAIT).unwrap();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}

#[test]
fn refuses_to_start_with_a_broken_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent =
        Agent::start(None, exe(), dir.path(), "version: 1\nnetworks: []\n", false).unwrap();
    agent
        .wait_for(&["policy refused", "no customer networks"], WAIT)
        .unwrap();
    // Reads the log to its end: the pipe closes when the agent exits.
    let _ = agent.wait_for(&["never printed"], Duration::from_secs(5));
    let status = agent.stop(WAIT).unwrap();
    assert_eq!(status.code(), Some(1), "exit code for an invalid policy");
}

#[test]
fn run_as_a_user_says_permission_denied_and_touches_nothing() {
    if sandbox("run_as_a_user_says_permission_denied_and_touches_nothing").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, GOOD).unwrap();
    let state = dir.path().join("state");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(exe())
        .arg("run")
        .arg("--policy")
        .arg(&policy)
        .arg("--state-dir")
        .arg(&state)
        .arg("--socket")
        .arg(dir.path().join("sock"))
        .output()
        .expect("setpriv (util-linux) runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit status: a run-time failure: {err}"
    );
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    assert!(err.contains("systemctl start egressguard"), "{err}");
    assert!(!err.contains("database"), "blames the database: {err}");
    assert!(!state.exists(), "a state directory was created");
}

#[test]
fn control_socket_status_and_reload() {
    use std::os::unix::fs::PermissionsExt;
    let Some(ns) = sandbox("control_socket_status_and_reload") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    let (mut agent, version) = start(&ns, dir.path(), GOOD);

    let mode = std::fs::metadata(dir.path().join("control.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "control socket mode");

    let (code, out, err) = cli(&agent, &["status", "--json"]);
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
    let (code, _, err) = cli(&agent, &["reload"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("policy.yaml:3:13: error: networks[0].prefix"),
        "{err}"
    );
    let (_, out, _) = cli(&agent, &["status", "--json"]);
    assert!(
        out.contains(&version),
        "old policy must stay in force: {out}"
    );

    std::fs::write(&policy, GOOD.replace("dry-run", "enforce")).unwrap();
    let (code, out, err) = cli(&agent, &["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("policy reloaded"), "{out}");

    assert_eq!(agent.stop(WAIT).unwrap().code(), Some(0));
    assert!(
        !dir.path().join("control.sock").exists(),
        "socket removed on stop"
    );
    let (code, _, err) = cli(&agent, &["status"]);
    assert_eq!(code, 3);
    assert!(err.contains("is it running?"), "{err}");
}

/// A reload that changes a setting read only at start is refused, naming the setting, and the
/// old policy stays in force; a changed `notify.command` is applied by the reload (the next
/// incident runs the new hook, not the old one).
#[test]
fn reload_refuses_restart_only_settings_and_applies_notify() {
    let Some(ns) = sandbox("reload_refuses_restart_only_settings_and_applies_notify") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hook = |name: &str| {
        format!(
            "notify:\n  command: [/bin/sh, -c, 'cat > {}']\n",
            dir.path().join(name).display()
        )
    };
    let base = format!("{GOOD}{}", hook("old.json"));
    let (agent, version) = start(&ns, dir.path(), &base);
    let policy = dir.path().join("policy.yaml");

    for (extra, setting) in [
        (
            "enforcement:\n  table: egressguard2\n",
            "enforcement.table (egressguard → egressguard2)",
        ),
        (
            "metrics:\n  listen: 127.0.0.1:9591\n",
            "metrics.listen (off → 127.0.0.1:9591)",
        ),
        (
            "detection:\n  counter_interval: 2s\n",
            "detection.counter_interval (1s → 2s)",
        ),
    ] {
        std::fs::write(&policy, format!("{base}{extra}")).unwrap();
        let (code, _, err) = cli(&agent, &["reload"]);
        assert_eq!(code, 1, "reload of {extra:?} accepted: {err}");
        assert!(err.contains(setting), "{setting} not named: {err}");
        assert!(err.contains("restart"), "{err}");
        let (_, out, _) = cli(&agent, &["status", "--json"]);
        assert!(
            out.contains(&version),
            "old policy must stay in force: {out}"
        );
    }

    std::fs::write(&policy, format!("{GOOD}{}", hook("new.json"))).unwrap();
    let (code, out, err) = cli(&agent, &["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("policy reloaded"), "{out}");
    let (code, _, err) = cli(
        &agent,
        &[
            "block",
            "203.0.113.7",
            "--for",
            "1h",
            "--reason",
            "reload test",
        ],
    );
    assert_eq!(code, 0, "{err}");
    // The hook creates the file before it writes it: wait for the whole report.
    let new = dir.path().join("new.json");
    let deadline = std::time::Instant::now() + WAIT;
    let mut body = String::new();
    while !body.contains("203.0.113.7") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        body = std::fs::read_to_string(&new).unwrap_or_default();
    }
    assert!(
        body.contains("203.0.113.7"),
        "the reloaded notify.command never reported the block: {body:?}"
    );
    assert!(
        !dir.path().join("old.json").exists(),
        "the notify.command of the old policy ran after the reload"
    );
    drop(agent);
}

/// Unmounts the tmpfs on drop (also when the test fails).
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The agent's CPU time so far (user + system), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

#[test]
fn a_full_disk_backs_off_and_the_expiry_is_recorded_once_space_returns() {
    let Some(ns) = sandbox("a_full_disk_backs_off_and_the_expiry_is_recorded_once_space_returns")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    let _mounted = Mounted(dir.path().to_owned());
    let (mut agent, _) = start(&ns, dir.path(), GOOD);
    let (code, out, err) = cli(
        &agent,
        &["block", "203.0.113.9", "--reason", "r", "--for", "3s"],
    );
    assert_eq!(code, 0, "{out}{err}");
    // The disk fills up before the hold is due.
    let fill = dir.path().join("fill");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&fill).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    agent
        .wait_for(&["expiry check failed"], Duration::from_secs(8))
        .expect("the expiry fails on the full disk");
    let cpu = cpu_time(agent.pid());
    std::thread::sleep(Duration::from_secs(4));
    let spent = cpu_time(agent.pid()) - cpu;
    assert!(
        spent < Duration::from_millis(400),
        "the agent spent {spent:?} of CPU in 4 s retrying"
    );
    agent.drain();
    let failures = agent
        .log()
        .lines()
        .filter(|l| l.contains("expiry check failed"))
        .count();
    assert!(
        failures <= 6,
        "{failures} error lines in ~5 s:\n{}",
        agent.log()
    );
    // Still held in the records: nothing was decided that was not recorded.
    let (_, list, _) = cli(&agent, &["list"]);
    assert!(list.contains("203.0.113.9"), "{list}");
    // Space returns: the expiry is recorded without a restart.
    std::fs::remove_file(&fill).unwrap();
    agent
        .wait_for(&["expiry check recorded again"], Duration::from_secs(15))
        .expect("recovered");
    let (_, list, _) = cli(&agent, &["list"]);
    assert!(!list.contains("203.0.113.9"), "{list}");
    let (_, show, _) = cli(&agent, &["show", "203.0.113.9", "--json"]);
    assert!(show.contains("expired"), "{show}");
    signal(&agent, Signal::SIGTERM);
    let _ = agent.stop(WAIT);
}
