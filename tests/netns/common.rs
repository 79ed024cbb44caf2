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

/// An outside tool a test drives: a program, or a Python module, and its Debian package.
const TOOLS: &[(&str, &str)] = &[
    ("nmap", "nmap"),
    ("hping3", "hping3"),
    ("masscan", "masscan"),
    ("hydra", "hydra"),
    ("swaks", "swaks"),
    ("sshd", "openssh-server"),
    ("ssh-keygen", "openssh-client"),
    ("bird", "bird2"),
    ("birdc", "bird2"),
    ("gobgpd", "gobgpd"),
    ("gobgp", "gobgpd"),
    ("curl", "curl"),
    ("iperf3", "iperf3"),
    ("fping", "fping"),
    ("conntrack", "conntrack"),
    ("setpriv", "util-linux"),
    ("python3", "python3"),
    ("python3:aiosmtpd", "python3-aiosmtpd"),
];

/// Whether `tool` (a program name, or `python3:<module>`) is installed.
fn installed(tool: &str) -> bool {
    if let Some(module) = tool.strip_prefix("python3:") {
        // The tests run /usr/bin/python3 (Debian's, which the python3-* packages serve).
        return std::process::Command::new("/usr/bin/python3")
            .args(["-c", &format!("import {module}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    }
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| std::path::Path::new(d).join(tool).exists())
}

/// Panics naming every missing tool of `tools` and its Debian package, so a test never
/// times out on a server that could not start. (Root-only tests call it after
/// [`require_root`]: a missing tool is a failure, in and outside CI.)
pub fn require_tools(test: &str, tools: &[&str]) {
    let missing: Vec<String> = tools
        .iter()
        .filter(|t| !installed(t))
        .map(|t| {
            let pkg = TOOLS.iter().find(|(n, _)| n == t).map_or("?", |(_, p)| p);
            format!("{t} (apt-get install {pkg})")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{test}: missing {}; scripts/install-prerequisites installs every tool the tests use",
        missing.join(", ")
    );
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

/// The shipped `policies/default.yaml`, switched from dry-run to enforce; every threshold
/// stays the shipped one (the tests of what the defaults detect and spare).
pub fn shipped_policy_enforcing() -> String {
    let p = egressguard::demo::DEFAULT_POLICY;
    assert!(
        p.contains("\nmode: dry-run\n"),
        "default.yaml changed shape"
    );
    p.replace("\nmode: dry-run\n", "\nmode: enforce\n")
}

/// Starts the built agent in `topo`'s router with `policy` in a fresh state directory and
/// waits until it has started.
pub fn start_agent(
    topo: &egressguard::netns::Topology,
    policy: &str,
) -> (egressguard::netns::Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agent = egressguard::netns::Agent::start(
        Some(&topo.router),
        &agent_bin(),
        dir.path(),
        policy,
        false,
    )
    .expect("agent starts");
    agent
        .wait_for(&["started"], std::time::Duration::from_secs(10))
        .expect("agent started");
    (agent, dir)
}

/// CPU time of process `pid` in clock ticks from `/proc/PID/stat`: (its own user + system,
/// its waited-for children's); zeros when the process is gone.
pub fn cpu_ticks(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // rest starts at field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    (at(11) + at(12), at(13) + at(14))
}
