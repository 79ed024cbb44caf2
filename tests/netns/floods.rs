//! Every kind of flood at twice its threshold, start → drop (issue 17 item 1): the kernel's
//! per-source meters ([`egressguard::meter`]) report the flood after
//! `detection.flood_tolerance` (200 ms at twice the rate), the detector decides on the report
//! and the enforcer puts the source in `quarantine4`.
//!
//! One lab per round: the router runs the built agent in enforce mode with every flood
//! threshold far out of reach except the one under test, so the hold is that threshold's
//! (the evidence must name it). The flood is a paced Python sender in the customer namespace
//! (bounded in packets and seconds) that prints when its first packet left; the test polls
//! the quarantine set every few milliseconds. Start → drop is first packet → element in the
//! set, from then on the kernel drops the source.
//!
//! `floods_at_twice_the_threshold_are_dropped_within_a_second` runs each kind once and
//! asserts the p99 target (≤ 1 s); `measure_flood_latency` (ignored) runs `EGD_ROUNDS`
//! rounds of each and prints the table of docs/performance.md.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use egressguard::netns::{Agent, Proc, Topology};
use serde_json::Value as Json;

use crate::common::{agent_bin, cpu_ticks, require_root, start_agent};

const PYTHON: &str = "/usr/bin/python3";

/// A paced flood. Args: MODE ADDR RATE SIZE SECONDS. MODE: `single` (one UDP flow to port
/// 9), `flows` (a new UDP flow per datagram, source ports cycling), `echo` (ICMP echo
/// requests of one id: one flow, like ping), `syn` (TCP SYNs from a raw socket to port 80
/// and up, source ports cycling and the destination port moving on after each 60,000: each
/// a new flow; a sixth argument is the source address for the checksum). Prints `first <unix time>` once the first packet
/// is sent and `rate <pps>` over the first half second.
const FLOOD: &str = r#"
import socket, struct, sys, time
mode, addr, rate, size, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return (~s) & 0xffff
payload = b"f" * size
if mode == "single":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 40000)); s.connect((addr, 9))
    send = lambda i: s.send(payload)
elif mode == "flows":
    socks = []
    for p in range(64):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 41000 + p)); socks.append(u)
    send = lambda i: socks[i % 64].sendto(payload, (addr, 1024 + (i // 64) % 60000))
elif mode == "echo":
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    def send(i):
        h = struct.pack("!BBHHH", 8, 0, 0, 4242, i & 0xffff)
        s.sendto(struct.pack("!BBHHH", 8, 0, csum(h + payload), 4242, i & 0xffff) + payload, (addr, 0))
elif mode == "syn":
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    src = sys.argv[6]
    pseudo = socket.inet_aton(src) + socket.inet_aton(addr)
    def send(i):
        # Every SYN a new flow: the source port cycles, the destination port moves on
        # after each cycle.
        sport, dport = 1024 + i % 60000, 80 + (i // 60000) % 1000
        h = struct.pack("!HHIIBBHHH", sport, dport, i, 0, 5 << 4, 0x02, 64240, 0, 0)
        c = csum(pseudo + struct.pack("!BBH", 0, 6, len(h)) + h)
        s.sendto(h[:16] + struct.pack("!H", c) + h[18:], (addr, 0))
start = time.time(); sent = 0; told = False; count = int(rate * secs)
while sent < count and time.time() - start < secs:
    due = min(count, int((time.time() - start) * rate) + 1)
    while sent < due:
        try:
            send(sent)
        except OSError:
            pass
        if sent == 0:
            print("first %.6f" % time.time(), flush=True)
        sent += 1
    if not told and time.time() - start >= 0.5:
        print("rate %d" % (sent / (time.time() - start)), flush=True); told = True
    time.sleep(0.0005)
"#;

/// One kind of flood: its threshold key, the lab threshold, and the sender at twice it.
struct Kind {
    key: &'static str,
    threshold: u64,
    mode: &'static str,
    /// Packets per second at twice the threshold.
    rate: u64,
    /// UDP/ICMP payload bytes.
    size: u32,
}

const KINDS: [Kind; 6] = [
    Kind {
        key: "udp_pps",
        threshold: 10_000,
        mode: "single",
        rate: 20_000,
        size: 64,
    },
    Kind {
        key: "icmp_pps",
        threshold: 5_000,
        mode: "echo",
        rate: 10_000,
        size: 56,
    },
    Kind {
        key: "pps",
        threshold: 20_000,
        mode: "single",
        rate: 40_000,
        size: 64,
    },
    // 100 Mbit/s: 1400-byte datagrams (1428 bytes on the wire) at 17,507/s are 200 Mbit/s.
    Kind {
        key: "bps",
        threshold: 100_000_000,
        mode: "single",
        rate: 17_507,
        size: 1400,
    },
    Kind {
        key: "new_flows_per_sec",
        threshold: 1_000,
        mode: "flows",
        rate: 2_000,
        size: 32,
    },
    Kind {
        key: "unreplied_syn_per_sec",
        threshold: 500,
        mode: "syn",
        rate: 1_000,
        size: 0,
    },
];

/// The lab's policy: enforce, every flood threshold out of reach but `kind`'s.
fn policy(kind: &Kind) -> String {
    let far = [
        ("pps", "100M"),
        ("bps", "1000G"),
        ("udp_pps", "100M"),
        ("icmp_pps", "100M"),
        ("new_flows_per_sec", "100M"),
        ("unreplied_syn_per_sec", "100M"),
    ];
    let mut flood = String::new();
    for (k, v) in far {
        let v = if k == kind.key {
            kind.threshold.to_string()
        } else {
            v.to_owned()
        };
        flood.push_str(&format!("      {k}: {v}\n"));
    }
    format!(
        "version: 1\nmode: enforce\nnetworks:\n  - prefix: 203.0.113.0/24\n  - prefix: 2001:db8:c::/64\nprofiles:\n  default:\n    flood:\n{flood}"
    )
}

/// Makes the host of `ns` drop what it receives of the protocols `l4` (nft's syntax).
fn drops_at(ns: &egressguard::netns::Netns, l4: &str) {
    ns.run(&[
        "nft",
        &format!(
            "add table inet sink; add chain inet sink in {{ type filter hook input priority 0; }}; \
             add rule inet sink in meta l4proto {l4} drop"
        ),
    ])
    .expect("target's drop rule");
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One round: a fresh lab, the flood, first packet → the source in `quarantine4` (seconds),
/// the sender's rate over its first half second and the offense's evidence.
fn round(kind: &Kind) -> (f64, u64, Json) {
    let mut topo = Topology::new().expect("topology");
    topo.add_customer(10).expect("customer");
    topo.add_internet_host(20).expect("internet host");
    let target = topo.internet[0].v4.to_string();
    let cust = topo.customers[0].v4.to_string();
    // The target answers nothing: SYNs and datagrams go unanswered (ICMP errors are no
    // answer to conntrack), as from a flood's victim that has stopped answering.
    drops_at(&topo.internet[0].ns, "{ tcp, udp }");
    let (agent, _dir) = start_agent(&topo, &policy(kind));
    let rate = kind.rate.to_string();
    let size = kind.size.to_string();
    let mut args = vec![
        PYTHON, "-c", FLOOD, kind.mode, &target, &rate, &size, "3", &cust,
    ];
    if kind.mode != "syn" {
        args.pop();
    }
    let child = topo.customers[0]
        .ns
        .command(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("flood");
    let mut flood = Proc::new(child);
    let limit = Instant::now() + Duration::from_secs(5);
    let held_at = loop {
        let set = topo
            .router
            .run(&["nft", "list", "set", "inet", "egressguard", "quarantine4"])
            .unwrap_or_default();
        if set.contains(&cust) {
            break unix_now();
        }
        assert!(
            Instant::now() < limit,
            "{}: {cust} not in quarantine4 after 5 s at {} pps\n{}",
            kind.key,
            kind.rate,
            agent_log(&agent)
        );
        std::thread::sleep(Duration::from_millis(3));
    };
    // The sender stops by itself after its 3 s; its output ends then.
    let mut out = String::new();
    if let Some(mut stdout) = flood.child().stdout.take() {
        stdout
            .read_to_string(&mut out)
            .expect("the sender's output");
    }
    let first = out
        .lines()
        .find_map(|l| l.strip_prefix("first ")?.parse::<f64>().ok())
        .expect("the sender's first packet time");
    let sent_rate = out
        .lines()
        .find_map(|l| l.strip_prefix("rate ")?.parse::<u64>().ok())
        .unwrap_or(0);
    let show = cli_json(&agent, &["show", &cust, "--json"]);
    let offense = show["offenses"][0].clone();
    (held_at - first, sent_rate, offense)
}

fn agent_log(agent: &Agent) -> String {
    let log = agent.log();
    let start = log.len().saturating_sub(4000);
    log[start..].to_owned()
}

fn cli_json(agent: &Agent, args: &[&str]) -> Json {
    let out = agent.cli(&agent_bin(), args);
    assert!(out.status.success(), "egressguard {args:?}");
    serde_json::from_slice(&out.stdout).expect("JSON reply")
}

#[test]
fn floods_at_twice_the_threshold_are_dropped_within_a_second() {
    if !require_root("floods_at_twice_the_threshold_are_dropped_within_a_second") {
        return;
    }
    for kind in &KINDS {
        let (took, rate, offense) = round(kind);
        eprintln!(
            "{} at twice {} ({rate} pps sent): start → drop {:.0} ms",
            kind.key,
            kind.threshold,
            took * 1e3
        );
        assert_eq!(offense["category"], "flood", "{}: {offense}", kind.key);
        let crossed = offense["evidence"]["crossed"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            crossed.iter().any(|c| c["signal"] == kind.key),
            "{}: the evidence names another threshold: {offense}",
            kind.key
        );
        assert!(
            took <= 1.0,
            "{}: start → drop {took:.3} s, above the 1 s p99 target",
            kind.key
        );
    }
}

/// `EGD_ROUNDS=10 sudo -E cargo test --release --test netns measure_flood_latency --
/// --ignored --nocapture`: median, p99 and max start → drop of each kind.
#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn measure_flood_latency() {
    if !require_root("measure_flood_latency") {
        return;
    }
    let rounds: usize = std::env::var("EGD_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    for kind in &KINDS {
        let mut times = Vec::new();
        let mut rates = Vec::new();
        for _ in 0..rounds {
            let (took, rate, _) = round(kind);
            times.push(took * 1e3);
            rates.push(rate);
        }
        times.sort_by(f64::total_cmp);
        let q = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
        eprintln!(
            "| `{}` {} | {} pps sent (median; {}–{}) | {rounds} | {:.0} ms | {:.0} ms | {:.0} ms |",
            kind.key,
            kind.threshold,
            {
                let mut r = rates.clone();
                r.sort_unstable();
                r[r.len() / 2]
            },
            rates.iter().min().unwrap_or(&0),
            rates.iter().max().unwrap_or(&0),
            q(0.5),
            q(0.99),
            times.last().unwrap_or(&0.0)
        );
    }
}

/// FastNetMon 1.2.4's configuration for the side-by-side run: AF_PACKET on the router's
/// internet side, the lab's customer network, bans off (the flood stays unblocked, as for
/// the agent in dry-run), its shipped thresholds, nothing sent anywhere.
const FASTNETMON_CONF: &str = "\
logging_level = info
logging_local_syslog_logging = off
disable_usage_report = on
enable_ban = off
enable_ban_ipv6 = off
process_incoming_traffic = on
process_outgoing_traffic = on
networks_list_path = NETWORKS
white_list_path = WHITELIST
check_period = 1
enable_connection_tracking = on
ban_for_pps = on
ban_for_bandwidth = on
ban_for_flows = off
threshold_pps = 20000
threshold_mbps = 1000
threshold_flows = 3500
mirror_afpacket = on
mirror_af_packet_custom_sampling_rate = 1
mirror_af_packet_fanout_mode = cpu
interfaces = br-inet
average_calculation_time = 5
speed_calculation_delay = 1
";

/// `sudo -E cargo test --release --test netns measure_unblocked_syn_flood_cpu -- --ignored
/// --nocapture` (issue 17 item 6): a 25k SYN/s flood from one customer for 23 s, unanswered
/// and never blocked (the shipped policy as shipped, in dry-run), and the agent's CPU over
/// it: its own (utime + stime) and its `nft` children's. `EGD_SAMPLE=0` turns the kernel's
/// sampling off (`detection.sample_flows_above: 0`) for comparison; `EGD_FASTNETMON=1` runs
/// FastNetMon 1.2.4 (AF_PACKET) on the same router and flood, side by side.
#[test]
#[ignore = "measurement: run with --release --ignored --nocapture"]
fn measure_unblocked_syn_flood_cpu() {
    if !require_root("measure_unblocked_syn_flood_cpu") {
        return;
    }
    let mut topo = Topology::new().expect("topology");
    topo.add_customer(10).expect("customer");
    topo.add_internet_host(20).expect("internet host");
    let target = topo.internet[0].v4.to_string();
    let cust = topo.customers[0].v4.to_string();
    drops_at(&topo.internet[0].ns, "tcp");
    let mut policy = egressguard::demo::DEFAULT_POLICY.to_owned();
    if std::env::var("EGD_SAMPLE").as_deref() == Ok("0") {
        assert!(
            policy.contains("\n  sample_flows_above: 5000"),
            "default.yaml changed shape"
        );
        policy = policy.replace("\n  sample_flows_above: 5000", "\n  sample_flows_above: 0");
    }
    let (agent, _dir) = start_agent(&topo, &policy);
    let dir = tempfile::tempdir().expect("tempdir");
    let fnm = (std::env::var("EGD_FASTNETMON").as_deref() == Ok("1")).then(|| {
        let nets = dir.path().join("networks");
        let white = dir.path().join("whitelist");
        std::fs::write(&nets, "203.0.113.0/24\n").expect("networks");
        std::fs::write(&white, "").expect("whitelist");
        let conf = dir.path().join("fastnetmon.conf");
        let text = FASTNETMON_CONF
            .replace("NETWORKS", nets.to_str().expect("utf-8"))
            .replace("WHITELIST", white.to_str().expect("utf-8"));
        std::fs::write(&conf, text).expect("config");
        let log = dir.path().join("fastnetmon.log");
        let p = topo
            .router
            .spawn(&[
                "fastnetmon",
                "--configuration_file",
                conf.to_str().expect("utf-8"),
                "--log_file",
                log.to_str().expect("utf-8"),
                "--disable_pid_logic",
            ])
            .expect("fastnetmon");
        std::thread::sleep(Duration::from_secs(3));
        p
    });
    std::thread::sleep(Duration::from_secs(2));
    let tck = 100.0;
    let a0 = cpu_ticks(agent.pid());
    let f0 = fnm.as_ref().map(|p| cpu_ticks(p.id()));
    let t = Instant::now();
    // EGD_PERF=1: a perf profile of the agent over the flood, in /tmp/egd-flood.perf;
    // EGD_IDLE=1: one SYN a second instead, for the agent's idle cost.
    let _perf = (std::env::var("EGD_PERF").as_deref() == Ok("1")).then(|| {
        let pid = agent.pid().to_string();
        Proc::new(
            std::process::Command::new("perf")
                .args(["record", "-g", "-o", "/tmp/egd-flood.perf", "-p", &pid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("perf"),
        )
    });
    let rate = if std::env::var("EGD_IDLE").as_deref() == Ok("1") {
        "1"
    } else {
        "25000"
    };
    let out = topo.customers[0]
        .ns
        .run(&[PYTHON, "-c", FLOOD, "syn", &target, rate, "0", "23", &cust])
        .expect("flood");
    let secs = t.elapsed().as_secs_f64();
    let a1 = cpu_ticks(agent.pid());
    let f1 = fnm.as_ref().map(|p| cpu_ticks(p.id()));
    let rate = out
        .lines()
        .find_map(|l| l.strip_prefix("rate ")?.parse::<u64>().ok())
        .unwrap_or(0);
    let status = cli_json(&agent, &["status", "--json"]);
    let (seen, reports, sampled) = (
        &status["events_seen"],
        &status["meter_reports"],
        &status["sampled_flows"],
    );
    eprintln!(
        "SYN flood {rate} SYN/s for {secs:.1} s: agent {:.2} s CPU ({:.2} s nft children); \
         {seen} events seen, {reports} meter reports, {sampled} sampled flows",
        (a1.0 - a0.0) as f64 / tck,
        (a1.1 - a0.1) as f64 / tck,
    );
    let mut agent = agent;
    agent.drain();
    for l in agent.log().lines().filter(|l| {
        ["dump", "lost", "resync", "WARN", "ERROR"]
            .iter()
            .any(|w| l.contains(w))
    }) {
        eprintln!("agent: {l}");
    }
    if let (Some(f0), Some(f1)) = (f0, f1) {
        eprintln!(
            "FastNetMon over the same flood: {:.2} s CPU",
            (f1.0 - f0.0) as f64 / tck
        );
    }
}
