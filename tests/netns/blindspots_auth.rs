//! Blind spots of the shipped defaults (issue 18, items 4, 6, 7), each closed and run with
//! the real tool against the agent running the shipped `policies/default.yaml` in enforce
//! mode (its placeholder networks, 203.0.113.0/24 and 2001:db8:c::/56, are the lab's):
//!
//! - spread brute force: hydra against 30 sshd addresses, four guesses each, while a
//!   deployment tool sshes to 10 hosts three times and a user to two servers;
//! - submission-port spam: swaks on 587 to 48 mail servers, while a relay sends to three MX
//!   on 25 and a client submits to its two submission servers;
//! - an IPv6 prober rotating through 32 addresses of the router's own /64: the /64 is held,
//!   the router's address in it stays reachable from the internet and neighbour discovery
//!   goes on.
//!
//! Every generator is bounded in count and time and aims only at the lab's namespaces.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use egressguard::netns::{Agent, Netns, Proc, Topology};
use serde_json::Value as Json;

use crate::common::{
    agent_bin, require_root, require_tools, shipped_policy_enforcing, start_agent, wait_for,
};
use crate::scenarios::sshd;

/// The router with customers `203.0.113.<host>` and internet hosts `198.51.100.<host>`, the
/// agent running the default policy in it.
struct Rig {
    agent: Agent,
    _dir: tempfile::TempDir,
    topo: Topology,
}

impl Rig {
    fn new(customers: &[u16], internet: &[u16]) -> Rig {
        let mut topo = Topology::new().expect("topology");
        for h in customers {
            topo.add_customer(*h).expect("customer");
        }
        for h in internet {
            topo.add_internet_host(*h).expect("internet host");
        }
        let (agent, dir) = start_agent(&topo, &shipped_policy_enforcing());
        Rig {
            agent,
            _dir: dir,
            topo,
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.agent.cli(&agent_bin(), args)
    }

    fn show(&self, addr: &str) -> Json {
        let out = self.cli(&["show", addr, "--json"]);
        assert!(
            out.status.success(),
            "show {addr}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("show --json")
    }

    /// The elements of one set of the agent's table, as `nft list set` prints them.
    fn set(&self, name: &str) -> String {
        self.topo
            .router
            .run(&["nft", "list", "set", "inet", "egressguard", name])
            .unwrap_or_default()
    }

    /// Whether `element` is in any hold set (quarantine or block, v4 or v6).
    fn held(&self, element: &str) -> bool {
        ["quarantine4", "blocked4", "quarantine6", "blocked6"]
            .iter()
            .any(|s| self.set(s).contains(element))
    }

    /// Waits until `element` is in `set`; panics with the agent's log otherwise. Meanwhile
    /// none of `benign` may be held.
    fn wait_held(&mut self, element: &str, set: &str, limit: Duration, benign: &[&str]) {
        let deadline = Instant::now() + limit;
        loop {
            for b in benign {
                assert!(!self.held(b), "benign {b} held");
            }
            if self.set(set).contains(element) {
                return;
            }
            if Instant::now() > deadline {
                self.agent.drain();
                let status = self.cli(&["status"]);
                panic!(
                    "{element} not in {set} within {limit:?}\nstatus:\n{}\nlog:\n{}",
                    String::from_utf8_lossy(&status.stdout),
                    self.agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs `script` in `ns` with its output discarded.
fn spawn(ns: &Netns, script: &str) -> Proc {
    ns.spawn(&["bash", "-c", &format!("( {script} ) >/dev/null 2>&1")])
        .expect("spawn")
}

/// Waits for `p` to end (it is bounded by its own `timeout`s), at most `limit`.
fn finish(mut p: Proc, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = p.child().try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    p.kill();
}

/// The one offense of `addr` as `show --json` reports it.
fn offense(rig: &Rig, addr: &str) -> Json {
    let show = rig.show(addr);
    let offs = show["offenses"].as_array().cloned().unwrap_or_default();
    assert_eq!(offs.len(), 1, "offenses of {addr}: {show:#}");
    offs[0].clone()
}

/// No offense recorded for `addr`.
fn no_offense(rig: &Rig, addr: &str) {
    let show = rig.show(addr);
    let offs = show["offenses"].as_array().cloned().unwrap_or_default();
    assert!(offs.is_empty(), "benign {addr} has offenses: {show:#}");
}

/// Waits (at most `secs`) for the attacker, customer 203.0.113.10, to be quarantined, no
/// benign address held meanwhile; its one offense, of `category`.
fn attacker_held(
    rig: &mut Rig,
    category: &str,
    secs: u64,
    started: Instant,
    benign: &[&str],
) -> Json {
    rig.wait_held(
        "203.0.113.10",
        "quarantine4",
        Duration::from_secs(secs),
        benign,
    );
    eprintln!("{category}: held after {:?}", started.elapsed());
    let off = offense(rig, "203.0.113.10");
    assert_eq!(off["category"], category, "{off:#}");
    off
}

/// After the hold: the attacker (customer 0) no longer connects to `service` (addr:port),
/// customer `witness` still does; the attack and the benign workloads end (each bounded by
/// its own timeouts), and no benign address was held or charged with an offense.
fn cut_off_benign_untouched(
    rig: &Rig,
    service: &str,
    witness: usize,
    attack: Proc,
    workloads: Vec<Proc>,
    benign: &[&str],
) {
    let (addr, port) = service.split_once(':').expect("addr:port");
    let probe = format!("timeout 3 bash -c 'echo > /dev/tcp/{addr}/{port}'");
    assert!(!rig.topo.customers[0].ns.succeeds(&["bash", "-c", &probe]));
    assert!(
        rig.topo.customers[witness]
            .ns
            .succeeds(&["bash", "-c", &probe])
    );
    finish(attack, Duration::from_secs(5));
    for w in workloads {
        finish(w, Duration::from_secs(90));
    }
    for b in benign {
        assert!(!rig.held(b), "benign {b} held");
        no_offense(rig, b);
    }
}

/// Adds `addrs` (CIDR) to `eth0` of `ns` in one `ip -batch`, without duplicate address
/// detection (the addresses are used at once).
fn add_addrs(ns: &Netns, addrs: &[String], dir: &Path, name: &str) {
    let batch: String = addrs
        .iter()
        .map(|a| format!("address add {a} dev eth0 nodad\n"))
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, batch).expect("batch");
    ns.run(&["ip", "-batch", path.to_str().expect("utf-8 path")])
        .expect("ip -batch");
}

#[test]
fn blindspot_spread_ssh_brute_force_is_held_and_a_deployment_tool_is_not() {
    let test = "blindspot_spread_ssh_brute_force_is_held_and_a_deployment_tool_is_not";
    if !require_root(test) {
        return;
    }
    require_tools(test, &["hydra", "sshd", "ssh-keygen"]);
    // Customers: .10 the attacker, .11 a deployment tool, .12 a user. Internet: .21 with
    // sshd on 30 more addresses, 198.51.100.100-129.
    let mut rig = Rig::new(&[10, 11, 12], &[21]);
    let work = tempfile::tempdir().expect("tempdir");
    let server = &rig.topo.internet[0].ns;
    let targets: Vec<String> = (100..130).map(|i| format!("198.51.100.{i}")).collect();
    let cidrs: Vec<String> = targets.iter().map(|t| format!("{t}/24")).collect();
    add_addrs(server, &cidrs, work.path(), "inet-addrs");
    // One guess per connection (`MaxAuthTries 1`): hydra opens a connection per guess.
    let _sshd = sshd(server, work.path());
    let list = work.path().join("targets");
    std::fs::write(&list, targets.join("\n") + "\n").expect("targets");
    let words = work.path().join("words");
    std::fs::write(&words, "guess0\nguess1\nguess2\nguess3\n").expect("words");
    wait_for("sshd listening", Duration::from_secs(5), || {
        rig.topo.customers[1]
            .ns
            .succeeds(&["bash", "-c", "echo > /dev/tcp/198.51.100.100/22"])
            .then_some(())
    });

    // The benign ones first, alongside the attack: a deployment tool reaching 10 hosts
    // three times (30 short sessions: key authentication refused), a user's sessions to two
    // servers. BatchMode: no password prompt; no key of this machine is offered.
    let ssh = "timeout 8 ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no \
               -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes \
               -o IdentityFile=/nonexistent -o ConnectTimeout=3";
    let deploy = spawn(
        &rig.topo.customers[1].ns,
        &format!(
            "for r in 1 2 3; do for i in $(seq 100 109); do {ssh} deploy@198.51.100.$i true; \
             done; done"
        ),
    );
    let user = spawn(
        &rig.topo.customers[2].ns,
        &format!(
            "for r in 1 2 3 4 5; do for i in 120 121; do {ssh} alice@198.51.100.$i true; \
             sleep 1; done; done"
        ),
    );
    // The botnet pattern: four guesses at each of 30 servers, 64 connections at a time.
    let started = Instant::now();
    let hydra = spawn(
        &rig.topo.customers[0].ns,
        &format!(
            "cd {} && timeout 60 hydra -I -t 4 -T 64 -l root -P {} -M {} ssh",
            work.path().display(),
            words.display(),
            list.display()
        ),
    );
    let benign = ["203.0.113.11", "203.0.113.12"];
    // Within the brute-force window (60 s).
    let off = attacker_held(&mut rig, "brute_force", 60, started, &benign);
    let ev = &off["evidence"];
    assert_eq!(ev["pattern"], "spread", "{off:#}");
    let n = ev["counts"]["distinct_targets"].as_f64().unwrap_or(0.0);
    assert!((20.0..=32.0).contains(&n), "distinct_targets {n}: {off:#}");
    assert!(
        ev["counts"]["attempts"].as_f64().unwrap_or(0.0) >= 60.0,
        "{off:#}"
    );
    assert!(ev["counts"]["attempts_per_target"].as_f64().unwrap_or(0.0) >= 2.0);
    let tops = ev["top_destinations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!tops.is_empty(), "{off:#}");
    for t in &tops {
        let a = t["key"].as_str().unwrap_or("");
        assert!(
            targets.iter().any(|x| x == a),
            "top target {a} not attacked"
        );
    }
    assert_eq!(ev["top_ports"][0]["key"], 22, "{off:#}");
    // Cut off: the attacker reaches no sshd any more; the deployment tool still does.
    cut_off_benign_untouched(
        &rig,
        "198.51.100.125:22",
        1,
        hydra,
        vec![deploy, user],
        &benign,
    );
}

#[test]
fn blindspot_submission_port_spam_is_held_and_a_relay_is_not() {
    let test = "blindspot_submission_port_spam_is_held_and_a_relay_is_not";
    if !require_root(test) {
        return;
    }
    require_tools(test, &["swaks", "python3:aiosmtpd"]);
    // Customers: .10 the spammer (587), .11 a mail relay (three MX on 25), .12 a client
    // submitting to its provider's two servers (587). Internet: .23 with 48 more addresses,
    // 198.51.100.150-197, SMTP on 25 and 587.
    let mut rig = Rig::new(&[10, 11, 12], &[23]);
    let work = tempfile::tempdir().expect("tempdir");
    let mx = &rig.topo.internet[0].ns;
    let cidrs: Vec<String> = (150..198).map(|i| format!("198.51.100.{i}/24")).collect();
    add_addrs(mx, &cidrs, work.path(), "inet-addrs");
    let _smtp: Vec<Proc> = [25, 587]
        .iter()
        .map(|p| {
            spawn(
                mx,
                &format!("exec /usr/bin/python3 -m aiosmtpd -n -l 0.0.0.0:{p}"),
            )
        })
        .collect();
    wait_for("SMTP listening", Duration::from_secs(10), || {
        let ns = &rig.topo.customers[1].ns;
        (ns.succeeds(&["bash", "-c", "echo > /dev/tcp/198.51.100.150/587"])
            && ns.succeeds(&["bash", "-c", "echo > /dev/tcp/198.51.100.150/25"]))
        .then_some(())
    });
    let swaks = "timeout 10 swaks --silent 2 --from a@example.org --to b@example.net";
    let relay = spawn(
        &rig.topo.customers[1].ns,
        &format!(
            "for r in $(seq 10); do for i in 150 151 152; do {swaks} --server 198.51.100.$i \
             --port 25; done; done"
        ),
    );
    let client = spawn(
        &rig.topo.customers[2].ns,
        &format!(
            "for r in $(seq 15); do for i in 160 161; do {swaks} --server 198.51.100.$i \
             --port 587; done; done"
        ),
    );
    let started = Instant::now();
    let spam = spawn(
        &rig.topo.customers[0].ns,
        &format!("for i in $(seq 150 197); do {swaks} --server 198.51.100.$i --port 587; done"),
    );
    let benign = ["203.0.113.11", "203.0.113.12"];
    // Within the spam window (300 s); the run itself takes a few seconds.
    let off = attacker_held(&mut rig, "spam", 120, started, &benign);
    let ev = &off["evidence"];
    assert!(
        ev["counts"]["distinct_destinations"]
            .as_f64()
            .unwrap_or(0.0)
            >= 40.0,
        "{off:#}"
    );
    // The evidence says which port: only 587.
    let ports = ev["top_ports"].as_array().cloned().unwrap_or_default();
    assert_eq!(ports.len(), 1, "{off:#}");
    assert_eq!(ports[0]["key"], 587, "{off:#}");
    // Cut off; the client still submits.
    cut_off_benign_untouched(
        &rig,
        "198.51.100.160:587",
        2,
        spam,
        vec![relay, client],
        &benign,
    );
}

#[test]
fn blindspot_ipv6_rotation_in_the_routers_64_is_held_and_the_router_stays_reachable() {
    let test = "blindspot_ipv6_rotation_in_the_routers_64_is_held_and_the_router_stays_reachable";
    if !require_root(test) {
        return;
    }
    require_tools(test, &["nmap"]);
    // The customer /64 is the router's own (2001:db8:c::1 on br-cust). The prober rotates
    // through 32 addresses of it, 8 ports of one server from each: no address comes near
    // the port-scan threshold (100), the /64 does (256).
    let mut rig = Rig::new(&[10], &[20]);
    let work = tempfile::tempdir().expect("tempdir");
    let prober = &rig.topo.customers[0].ns;
    let rotating: Vec<String> = (0x100..0x120)
        .map(|i| format!("2001:db8:c::{i:x}"))
        .collect();
    let cidrs: Vec<String> = rotating.iter().map(|a| format!("{a}/64")).collect();
    add_addrs(prober, &cidrs, work.path(), "cust-addrs");
    assert!(rig.topo.internet[0].ns.succeeds(&[
        "ping",
        "-6",
        "-c",
        "1",
        "-W",
        "2",
        "2001:db8:c::1"
    ]));
    let script: String = rotating
        .iter()
        .enumerate()
        .map(|(i, a)| {
            format!(
                "timeout 10 nmap -6 -Pn -n --max-retries 0 -sS -T4 -e eth0 -S {a} -p {}-{} \
                 2001:db8:1::14; ",
                1 + 8 * i,
                8 + 8 * i
            )
        })
        .collect();
    let started = Instant::now();
    let scan = spawn(prober, &script);
    // Within the port-scan window (60 s).
    rig.wait_held(
        "2001:db8:c::/64",
        "quarantine6",
        Duration::from_secs(60),
        &[],
    );
    let prober = &rig.topo.customers[0].ns;
    let inet = &rig.topo.internet[0].ns;
    eprintln!("rotating /64 held after {:?}", started.elapsed());
    finish(scan, Duration::from_secs(5));
    let off = offense(&rig, "2001:db8:c::/64");
    assert_eq!(off["category"], "port_scan", "{off:#}");
    // The router's own address is excepted by the allow guard before every drop.
    assert!(
        rig.set("allow6").contains("2001:db8:c::1"),
        "the router's address is not excepted: {}",
        rig.set("allow6")
    );
    // The rotating addresses are dropped, each of them, and the drop rule counts them.
    let drops = || -> u64 {
        let t = rig
            .topo
            .router
            .run(&["nft", "list", "chain", "inet", "egressguard", "forward"])
            .unwrap_or_default();
        t.lines()
            .filter(|l| l.contains("quarantine6") && l.contains("saddr") && l.contains("drop"))
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let i = w.iter().position(|x| *x == "packets")?;
                w.get(i + 1)?.parse::<u64>().ok()
            })
            .sum()
    };
    let before = drops();
    for a in rotating.iter().step_by(7) {
        assert!(
            !prober.succeeds(&[
                "ping",
                "-6",
                "-c",
                "1",
                "-W",
                "1",
                "-I",
                a,
                "2001:db8:1::14"
            ]),
            "{a} not dropped"
        );
    }
    assert!(
        drops() >= before + 5,
        "drop counter {before} -> {}",
        drops()
    );
    // The router's own address in the held /64: reachable from the internet, and it still
    // reaches out.
    for _ in 0..3 {
        assert!(
            inet.succeeds(&["ping", "-6", "-c", "1", "-W", "2", "2001:db8:c::1"]),
            "the router's own address in the held /64 is unreachable from the internet"
        );
    }
    assert!(rig.topo.router.succeeds(&[
        "ping",
        "-6",
        "-c",
        "1",
        "-W",
        "2",
        "-I",
        "2001:db8:c::1",
        "2001:db8:1::14"
    ]));
    // Neighbour discovery in the held /64 goes on: the held host resolves its gateway anew.
    prober
        .run(&["ip", "-6", "neigh", "flush", "dev", "eth0"])
        .expect("flush");
    let _ = prober.succeeds(&["ping", "-6", "-c", "1", "-W", "1", "2001:db8:c::1"]);
    let neigh = prober
        .run(&["ip", "-6", "neigh", "show", "2001:db8:c::1", "dev", "eth0"])
        .unwrap_or_default();
    assert!(
        ["REACHABLE", "STALE", "DELAY", "PROBE"]
            .iter()
            .any(|s| neigh.contains(s)),
        "the router did not answer neighbour discovery: {neigh:?}"
    );
    let list: Json =
        serde_json::from_slice(&rig.cli(&["list", "--json"]).stdout).expect("list --json");
    assert_eq!(list[0]["target"], "2001:db8:c::/64", "{list:#}");
}
