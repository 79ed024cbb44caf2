//! Real attack tools against real servers, through the router running the agent (the built
//! binary): each attack must be detected in its category, the attacker held in the kernel's
//! set, and a benign customer working at the same time never touched.
//!
//! Every generator is bounded in count and time, and only ever aims at addresses inside the
//! namespaces the test builds.

use std::path::Path;
use std::time::{Duration, Instant};

use egressguard::netns::{Agent, Proc, Topology, addr};

use crate::common::{agent_bin, require_root};

/// The policy of these tests: the shipped defaults in enforce mode, plus `extra`.
fn policy(extra: &str) -> String {
    format!(
        "version: 1\nmode: enforce\nnetworks:\n  - prefix: 203.0.113.0/24\n  - prefix: 2001:db8:c::/64\n{extra}"
    )
}

struct Lab {
    topo: Topology,
    agent: Agent,
    _dir: tempfile::TempDir,
}

impl Lab {
    /// Attacker 203.0.113.10, benign customer 203.0.113.11, internet hosts `hosts`.
    fn new(extra: &str, hosts: &[u16]) -> Lab {
        let mut topo = Topology::new().unwrap();
        topo.add_customer(10).unwrap();
        topo.add_customer(11).unwrap();
        for h in hosts {
            topo.add_internet_host(*h).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let mut agent = Agent::start(
            Some(&topo.router),
            &agent_bin(),
            dir.path(),
            &policy(extra),
            false,
        )
        .unwrap();
        agent
            .wait_for(&["started"], Duration::from_secs(10))
            .unwrap();
        Lab {
            topo,
            agent,
            _dir: dir,
        }
    }

    /// Waits for the agent to hold the attacker for `category`; returns the log line.
    fn expect_held(&mut self, category: &str) -> String {
        self.agent
            .wait_for(
                &[
                    "address held",
                    "addr=203.0.113.10/32",
                    &format!("category={category}"),
                ],
                Duration::from_secs(20),
            )
            .unwrap()
    }

    /// Whether `addr` is in the router's nft set.
    fn in_set(&self, set: &str, addr: &str) -> bool {
        self.topo
            .router
            .run(&["nft", "list", "set", "inet", "egressguard", set])
            .map(|s| s.contains(addr))
            .unwrap_or(false)
    }

    fn assert_enforced(&self, set: &str) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.in_set(set, "203.0.113.10") {
            assert!(
                Instant::now() < deadline,
                "attacker never reached {set}:\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!self.in_set(set, "203.0.113.11"), "benign customer held");
        assert!(
            !self.agent.log().contains("addr=203.0.113.11/32"),
            "the benign customer was flagged:\n{}",
            self.agent.log()
        );
    }

    /// Runs a bounded command in the attacker's namespace (124: stopped by `timeout`).
    fn attack(&self, args: &[&str]) {
        self.attack_ok(args, &[0, 124]);
    }

    fn attack_ok(&self, args: &[&str], ok: &[i32]) {
        // Some tools (hydra) leave state files in their working directory.
        let out = self.topo.customers[0]
            .ns
            .command(args)
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap();
        assert!(
            out.status.code().is_some_and(|c| ok.contains(&c)),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The benign customer fetches from a web server, bounded: `n` requests.
    fn benign(&self, target: &str, n: usize) -> Proc {
        let script = format!(
            "for i in $(seq {n}); do timeout 2 bash -c 'exec 3<>/dev/tcp/{target}/80' 2>/dev/null; sleep 0.05; done"
        );
        self.topo.customers[1]
            .ns
            .spawn(&["bash", "-c", &script])
            .unwrap()
    }
}

fn tool(name: &str) -> bool {
    let found = ["/usr/bin", "/usr/sbin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists());
    assert!(
        found || std::env::var_os("CI").is_none(),
        "{name} is not installed (.ci/packages)"
    );
    if !found {
        eprintln!("\n*** SKIPPED: {name} not installed ***\n");
    }
    found
}

/// A web server on port 80 of an internet host, bounded by the host's lifetime.
fn web(lab: &Lab, host: usize) -> Proc {
    lab.topo.internet[host]
        .ns
        .spawn(&[
            "/usr/bin/python3",
            "-m",
            "http.server",
            "80",
            "--bind",
            "0.0.0.0",
        ])
        .unwrap()
}

#[test]
fn nmap_syn_port_scan_is_quarantined() {
    if !require_root("nmap_syn_port_scan_is_quarantined") || !tool("nmap") {
        return;
    }
    let mut lab = Lab::new("", &[20, 21]);
    let _web = web(&lab, 0);
    let _benign = lab.benign("198.51.100.20", 40);
    lab.attack(&[
        "timeout",
        "60",
        "nmap",
        "-sS",
        "-Pn",
        "-n",
        "-T4",
        "--max-retries",
        "0",
        "-p",
        "1-1000",
        "198.51.100.21",
    ]);
    let line = lab.expect_held("port_scan");
    assert!(line.contains("kind=quarantine"), "{line}");
    lab.assert_enforced("quarantine4");
}

#[test]
fn nmap_horizontal_scan_of_a_24_is_quarantined() {
    if !require_root("nmap_horizontal_scan_of_a_24_is_quarantined") || !tool("nmap") {
        return;
    }
    let mut lab = Lab::new("", &[20]);
    let _web = web(&lab, 0);
    let _benign = lab.benign("198.51.100.20", 40);
    // One port across the whole /24: most addresses have no host, so nothing answers.
    lab.attack(&[
        "timeout",
        "90",
        "nmap",
        "-sS",
        "-Pn",
        "-n",
        "-T5",
        "--max-retries",
        "0",
        "--host-timeout",
        "3s",
        "-p",
        "22",
        "198.51.100.0/24",
    ]);
    lab.expect_held("network_scan");
    lab.assert_enforced("quarantine4");
}

#[test]
fn hping3_syn_flood_is_quarantined() {
    if !require_root("hping3_syn_flood_is_quarantined") || !tool("hping3") {
        return;
    }
    let mut lab = Lab::new("", &[20]);
    let _web = web(&lab, 0);
    let _benign = lab.benign("198.51.100.20", 40);
    // 20,000 SYNs at about 10,000/s to one address that never answers, each from a new port.
    // hping3 exits 1 when nothing answered, which is the point here.
    lab.attack_ok(
        &[
            "timeout",
            "20",
            "hping3",
            "-q",
            "-S",
            "-p",
            "80",
            "-i",
            "u100",
            "-c",
            "20000",
            "198.51.100.99",
        ],
        &[0, 1, 124],
    );
    lab.expect_held("flood");
    lab.assert_enforced("quarantine4");
}

#[test]
fn swaks_to_many_smtp_servers_is_quarantined() {
    if !require_root("swaks_to_many_smtp_servers_is_quarantined") || !tool("swaks") {
        return;
    }
    // 12 mail servers on one internet host (12 addresses), a real SMTP listener.
    let mut lab = Lab::new(
        "profiles:\n  default:\n    spam:\n      distinct_destinations: 10\n",
        &[20],
    );
    let mx = &lab.topo.internet[0];
    for i in 100..112 {
        addr(&mx.ns, "eth0", &format!("198.51.100.{i}/24")).unwrap();
    }
    let _smtp = mx
        .ns
        .spawn(&[
            "/usr/bin/python3",
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            "0.0.0.0:25",
        ])
        .unwrap();
    let _web = web(&lab, 0);
    let _benign = lab.benign("198.51.100.20", 40);
    std::thread::sleep(Duration::from_millis(500));
    for i in 100..112 {
        let server = format!("198.51.100.{i}");
        lab.attack(&[
            "timeout",
            "10",
            "swaks",
            "--silent",
            "2",
            "--to",
            "victim@example.net",
            "--from",
            "spam@example.org",
            "--server",
            &server,
        ]);
    }
    let line = lab.expect_held("spam");
    assert!(line.contains("kind=quarantine"), "{line}");
    lab.assert_enforced("quarantine4");
}

#[test]
fn hydra_against_sshd_is_quarantined() {
    if !require_root("hydra_against_sshd_is_quarantined") || !tool("hydra") || !tool("sshd") {
        return;
    }
    // sshd slows a guesser down (each connection waits for its failures), so a short test
    // run makes fewer connections than a real campaign: the threshold is lowered to match.
    let mut lab = Lab::new(
        "profiles:\n  default:\n    brute_force:\n      attempts: 10\n",
        &[20, 21],
    );
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("host_key");
    let keygen = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(&key)
        .status()
        .unwrap();
    assert!(keygen.success());
    std::fs::create_dir_all("/run/sshd").unwrap();
    let key = key.to_str().unwrap().to_owned();
    let _sshd = lab.topo.internet[1]
        .ns
        .spawn(&[
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-f",
            "/dev/null",
            "-h",
            &key,
            "-o",
            "ListenAddress=0.0.0.0",
            "-o",
            "PidFile=none",
            "-o",
            "UsePAM=no",
            "-o",
            "MaxStartups=200",
            "-o",
            "MaxAuthTries=1",
            "-o",
            "LoginGraceTime=10",
        ])
        .unwrap();
    let words = dir.path().join("passwords");
    let list: Vec<String> = (0..40).map(|i| format!("guess{i}")).collect();
    std::fs::write(&words, list.join("\n")).unwrap();
    let _web = web(&lab, 0);
    let _benign = lab.benign("198.51.100.20", 40);
    std::thread::sleep(Duration::from_millis(500));
    lab.attack(&[
        "timeout",
        "40",
        "hydra",
        "-I",
        "-t",
        "16",
        "-l",
        "root",
        "-P",
        words.to_str().unwrap(),
        "ssh://198.51.100.21",
    ]);
    let line = lab.expect_held("brute_force");
    assert!(line.contains("kind=quarantine"), "{line}");
    lab.assert_enforced("quarantine4");
}
