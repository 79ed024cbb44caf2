//! The shipped defaults against what a hosting provider calls normal, and against the two
//! floods a packet-rate threshold alone cannot tell from a backup stream.
//!
//! Every test runs the agent with `policies/default.yaml` as shipped, switched to enforce
//! (the lab's customer network 203.0.113.0/24 and 2001:db8:c::/64 lie inside its example
//! prefixes, so nothing else changes). The benign workloads run for a bounded time against
//! real servers in the namespaces — a backup stream (iperf3), a busy web server and a busy
//! web client of many "CDN" addresses, a resolver asking many servers, a mail relay handing
//! mail to a few MX, peer-to-peer over UDP and TCP, a monitoring poller (ICMP, SNMP, HTTP) —
//! and each test asserts what an operator would check afterwards: the customer is in no hold
//! set, `show --json` has no offense, and no detection was logged. Each prints the rates the
//! router's counters saw (`--nocapture`), which `policies/default.yaml` quotes.
//!
//! The attack side: a single-flow UDP flood (one socket, 50k pps) and a ping flood
//! (`ping -f`) are held by default, the evidence naming the pattern. The `#[ignore]`d
//! `measure_flood_start_to_hold` prints start → hold times for docs/performance.md.

use std::time::{Duration, Instant};

use egressguard::netns::{Agent, Host, Netns, Topology};
use serde_json::Value as Json;

use crate::common::{
    agent_bin, require_root, require_tools, shipped_policy_enforcing, start_agent, wait_for,
};

/// The hold sets of the agent's table.
const HOLD_SETS: [&str; 6] = [
    "blocked4",
    "blocked6",
    "quarantine4",
    "quarantine6",
    "learnt4",
    "learnt6",
];

const PYTHON: &str = "/usr/bin/python3";

/// A router running the agent with the shipped policy, customers and internet hosts.
struct Lab {
    agent: Agent,
    _dir: tempfile::TempDir,
    topo: Topology,
}

impl Lab {
    fn new(customers: &[u16], internet: &[u16]) -> Lab {
        let mut topo = Topology::new().expect("topology");
        for h in customers {
            topo.add_customer(*h).expect("customer");
        }
        for h in internet {
            topo.add_internet_host(*h).expect("internet host");
        }
        let (agent, dir) = start_agent(&topo, &shipped_policy_enforcing());
        Lab {
            agent,
            _dir: dir,
            topo,
        }
    }

    fn cust(&self) -> &Host {
        &self.topo.customers[0]
    }

    fn json(&self, args: &[&str]) -> Json {
        let out = self.agent.cli(&agent_bin(), args);
        assert!(
            out.status.success(),
            "egressguard {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON reply")
    }

    fn set(&self, name: &str) -> String {
        self.topo
            .router
            .run(&["nft", "list", "set", "inet", "egressguard", name])
            .unwrap_or_default()
    }

    /// One counter of a class set for `addr` (packets), 0 when it has no element.
    fn counter(&self, set: &str, addr: &str) -> u64 {
        let text = self.set(set);
        let needle = format!("{addr} counter packets ");
        text.find(&needle)
            .and_then(|i| {
                text[i + needle.len()..]
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    /// The router's counters of `addr` (all, unanswered UDP, echo requests).
    fn counters(&self, addr: &str) -> [u64; 3] {
        let (all, udp, echo) = if addr.contains(':') {
            ("src_counters6", "src_udp6", "src_echo6")
        } else {
            ("src_counters4", "src_udp4", "src_echo4")
        };
        [
            self.counter(all, addr),
            self.counter(udp, addr),
            self.counter(echo, addr),
        ]
    }

    /// Runs `work`, then prints the customer's rates over it as the router counted them.
    fn measured<T>(&self, name: &str, work: impl FnOnce() -> T) -> T {
        let a4 = self.cust().v4.to_string();
        let a6 = self.cust().v6.to_string();
        let (b4, b6) = (self.counters(&a4), self.counters(&a6));
        let t = Instant::now();
        let out = work();
        let secs = t.elapsed().as_secs_f64();
        let (e4, e6) = (self.counters(&a4), self.counters(&a6));
        let rate = |i: usize| ((e4[i] - b4[i]) + (e6[i] - b6[i])) as f64 / secs;
        eprintln!(
            "benign {name}: {secs:.1} s: {:.0} pps, {:.0} unanswered-UDP pps, {:.0} echo requests/s (router counters)",
            rate(0),
            rate(1),
            rate(2)
        );
        out
    }

    /// What an operator checks after a benign workload: no hold, no offense, no detection.
    fn assert_never_held(&mut self, workload: &str) {
        // Let the last counter read and evaluation happen.
        std::thread::sleep(Duration::from_millis(2_500));
        self.agent.drain();
        let log = self.agent.log();
        let detections: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("detection") && l.contains("category"))
            .collect();
        assert!(
            detections.is_empty(),
            "{workload}: the shipped policy detected a benign workload:\n{}",
            detections.join("\n")
        );
        for set in HOLD_SETS {
            let text = self.set(set);
            assert!(
                !text.contains("elements"),
                "{workload}: {set} holds something:\n{text}"
            );
        }
        for addr in [self.cust().v4, self.cust().v6] {
            let show = self.json(&["show", &addr.to_string(), "--json"]);
            let offenses = show["offenses"].as_array().map_or(0, Vec::len);
            assert_eq!(offenses, 0, "{workload}: offenses of {addr}: {show}");
        }
        let list = self.json(&["list", "--json"]);
        assert!(
            list.as_array().is_none_or(|a| a.is_empty())
                && list["holds"].as_array().is_none_or(|a| a.is_empty()),
            "{workload}: holds listed: {list}"
        );
    }

    /// Waits until `addr` is in a hold set; the time it took from `since`.
    fn wait_held(&self, addr: &str, since: Instant, limit: Duration) -> Duration {
        let set = if addr.contains(':') {
            "quarantine6"
        } else {
            "quarantine4"
        };
        wait_for(&format!("{addr} in {set}"), limit, || {
            self.set(set).contains(addr).then_some(())
        });
        since.elapsed()
    }
}

/// Adds `198.51.100.<n>` for every n in `hosts` to the internet host's eth0.
fn add_addresses(ns: &Netns, hosts: std::ops::RangeInclusive<u16>) -> Vec<String> {
    let addrs: Vec<String> = hosts.map(|h| format!("198.51.100.{h}")).collect();
    let batch: String = addrs
        .iter()
        .map(|a| format!("addr add {a}/24 dev eth0\n"))
        .collect();
    let path = std::env::temp_dir().join(format!("egd-addrs-{}-{}", std::process::id(), ns.name()));
    std::fs::write(&path, batch).expect("write batch");
    ns.run(&["ip", "-batch", path.to_str().expect("utf-8")])
        .expect("add addresses");
    let _ = std::fs::remove_file(&path);
    addrs
}

/// Runs a python program in `ns` (bounded by its own arguments), waiting for it.
fn python(ns: &Netns, program: &str, args: &[&str]) -> String {
    let mut full = vec![PYTHON, "-c", program];
    full.extend_from_slice(args);
    ns.run(&full)
        .unwrap_or_else(|e| panic!("python in {}: {e}", ns.name()))
}

/// Starts a python server in `ns`; killed with the namespace.
fn python_server(ns: &Netns, program: &str, args: &[&str]) -> egressguard::netns::Proc {
    let mut full = vec![PYTHON, "-c", program];
    full.extend_from_slice(args);
    let p = ns.spawn(&full).expect("spawn server");
    std::thread::sleep(Duration::from_millis(600));
    p
}

/// UDP responder: one socket per address (so each reply comes from the address asked) on
/// PORT, answering every datagram with its payload. Args: PORT SECONDS ADDR...
const UDP_RESPONDER: &str = r#"
import selectors, socket, sys, time
port, secs, addrs = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
sel = selectors.DefaultSelector()
for a in addrs:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((a, port)); s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
end = time.time() + secs
while time.time() < end:
    for key, _ in sel.select(0.5):
        try:
            while True:
                data, peer = key.fileobj.recvfrom(2048)
                key.fileobj.sendto(data, peer)
        except BlockingIOError:
            pass
"#;

/// HTTP server on ADDR:PORT serving SIZE bytes, for SECONDS. Args: ADDR PORT SIZE SECONDS.
const HTTP_SERVER: &str = r#"
import http.server, sys, threading, time
addr, port, size, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
body = b"x" * size
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer((addr, port), H)
srv.daemon_threads = True
threading.Timer(secs, srv.shutdown).start()
srv.serve_forever()
"#;

/// HTTP client: THREADS threads fetch from the addresses round-robin, a new connection per
/// fetch, for SECONDS. Prints the fetches done. Args: PORT THREADS SECONDS ADDR...
const HTTP_CLIENT: &str = r#"
import socket, sys, threading, time
port, threads, secs, addrs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
done = [0] * threads
end = time.time() + secs
def run(i):
    n = i
    while time.time() < end:
        a = addrs[n % len(addrs)]; n += threads
        try:
            s = socket.create_connection((a, port), timeout=2)
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            while s.recv(65536):
                pass
            s.close()
            done[i] += 1
        except OSError:
            time.sleep(0.05)
ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print(sum(done))
"#;

/// DNS-like query loop: QPS queries/s for SECONDS, each from a new socket (a new source
/// port: a new flow, as a resolver's queries are), to the addresses round-robin on PORT,
/// every answer awaited (1 s). Prints "sent answered". Args: PORT QPS SECONDS ADDR...
const QUERY_LOOP: &str = r#"
import selectors, socket, sys, time
port, qps, secs, addrs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
sel = selectors.DefaultSelector()
sent = answered = 0
start = time.time(); end = start + secs
pending = {}
n = 0
while time.time() < end or pending:
    now = time.time()
    due = int((min(now, end) - start) * qps)
    while n < due and len(pending) < 2000:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
        s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01", (addrs[n % len(addrs)], port))
        sel.register(s, selectors.EVENT_READ); pending[s] = now
        n += 1; sent += 1
    for key, _ in sel.select(0.005):
        s = key.fileobj
        try:
            s.recv(2048); answered += 1
        except OSError:
            pass
        sel.unregister(s); s.close(); pending.pop(s, None)
    for s, t in list(pending.items()):
        if now - t > 1.0:
            sel.unregister(s); s.close(); del pending[s]
print(sent, answered)
"#;

/// Peer-to-peer: one UDP socket exchanging RATE datagrams/s with every peer (one flow per
/// peer, each answered), plus TCP connections to TCP_PEERS of them, for SECONDS. Prints the
/// answers received. Args: PORT RATE TCP_PEERS SECONDS ADDR...
const P2P: &str = r#"
import socket, sys, threading, time
port, rate, tcp_peers, secs, addrs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5:]
end = time.time() + secs
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 51413)); u.settimeout(0.001)
got = [0]
def tcp(a):
    while time.time() < end:
        try:
            s = socket.create_connection((a, port), timeout=2)
            while time.time() < end:
                s.sendall(b"p" * 16384); s.recv(65536); time.sleep(0.05)
        except OSError:
            time.sleep(0.2)
ts = [threading.Thread(target=tcp, args=(a,)) for a in addrs[:tcp_peers]]
[t.start() for t in ts]
tick = 0
while time.time() < end:
    t0 = time.time()
    for a in addrs:
        u.sendto(b"d" * 200, (a, port))
    while True:
        try:
            u.recv(2048); got[0] += 1
        except OSError:
            break
    tick += 1
    time.sleep(max(0.0, 1.0 / rate - (time.time() - t0)))
[t.join() for t in ts]
print(got[0])
"#;

/// TCP echo server on 0.0.0.0:PORT for SECONDS. Args: PORT SECONDS.
const TCP_ECHO: &str = r#"
import socketserver, sys, threading
port, secs = int(sys.argv[1]), float(sys.argv[2])
class H(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            while True:
                d = self.request.recv(65536)
                if not d: break
                self.request.sendall(d[:512])
        except OSError:
            pass
srv = socketserver.ThreadingTCPServer(("0.0.0.0", port), H)
srv.daemon_threads = True
threading.Timer(secs, srv.shutdown).start()
srv.serve_forever()
"#;

#[test]
fn benign_backup_stream_is_never_held() {
    if !require_root("benign_backup_stream_is_never_held") {
        return;
    }
    require_tools("benign_backup_stream_is_never_held", &["iperf3"]);
    let mut lab = Lab::new(&[10], &[20]);
    let server = lab.topo.internet[0].v4.to_string();
    let _srv = lab.topo.internet[0]
        .ns
        .spawn(&["iperf3", "-s", "-1", "-B", &server])
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(500));
    let out = lab.measured("backup stream (iperf3, one TCP flow, 12 s)", || {
        lab.cust()
            .ns
            .run(&["iperf3", "-c", &server, "-t", "12", "-f", "g"])
            .expect("iperf3 client")
    });
    let rate = out
        .lines()
        .find(|l| l.contains("sender"))
        .unwrap_or("no sender line")
        .to_owned();
    eprintln!("benign backup stream: iperf3 says {rate}");
    assert!(out.contains("sender"), "{out}");
    lab.assert_never_held("backup stream");
}

#[test]
fn benign_busy_web_server_is_never_held() {
    if !require_root("benign_busy_web_server_is_never_held") {
        return;
    }
    let mut lab = Lab::new(&[10], &[20, 21, 22]);
    let server = lab.cust().v4.to_string();
    let _srv = python_server(
        &lab.cust().ns,
        HTTP_SERVER,
        &["0.0.0.0", "80", "200000", "20"],
    );
    let fetched = lab.measured(
        "web server (3 client hosts × 16 threads, 200 kB, 12 s)",
        || {
            std::thread::scope(|s| {
                let hs: Vec<_> = lab
                    .topo
                    .internet
                    .iter()
                    .map(|h| {
                        let server = server.clone();
                        s.spawn(move || python(&h.ns, HTTP_CLIENT, &["80", "16", "12", &server]))
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().expect("client").trim().parse::<u64>().unwrap_or(0))
                    .sum::<u64>()
            })
        },
    );
    eprintln!("benign web server: {fetched} fetches of 200 kB served");
    assert!(fetched > 100, "the clients fetched only {fetched}");
    lab.assert_never_held("busy web server");
}

#[test]
fn benign_web_client_of_many_cdn_hosts_is_never_held() {
    if !require_root("benign_web_client_of_many_cdn_hosts_is_never_held") {
        return;
    }
    let mut lab = Lab::new(&[10], &[20]);
    let cdn = add_addresses(&lab.topo.internet[0].ns, 100..=249);
    let _srv = python_server(
        &lab.topo.internet[0].ns,
        HTTP_SERVER,
        &["0.0.0.0", "80", "50000", "20"],
    );
    let mut args = vec!["80", "16", "12"];
    args.extend(cdn.iter().map(String::as_str));
    let fetched = lab.measured("web client (150 CDN addresses, 16 threads, 12 s)", || {
        python(&lab.cust().ns, HTTP_CLIENT, &args)
    });
    let fetched: u64 = fetched.trim().parse().unwrap_or(0);
    eprintln!(
        "benign web client: {fetched} fetches from {} addresses",
        cdn.len()
    );
    assert!(fetched > 150, "fetched only {fetched}");
    lab.assert_never_held("busy web client");
}

#[test]
fn benign_resolver_is_never_held() {
    if !require_root("benign_resolver_is_never_held") {
        return;
    }
    let mut lab = Lab::new(&[10], &[20]);
    let servers = add_addresses(&lab.topo.internet[0].ns, 100..=254);
    let mut rargs = vec!["53", "25"];
    rargs.extend(servers.iter().map(String::as_str));
    let _srv = python_server(&lab.topo.internet[0].ns, UDP_RESPONDER, &rargs);
    let mut args = vec!["53", "3000", "12"];
    args.extend(servers.iter().map(String::as_str));
    let out = lab.measured(
        "resolver (3000 queries/s asked, new flow each, 155 servers, 12 s)",
        || python(&lab.cust().ns, QUERY_LOOP, &args),
    );
    let mut it = out
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(0));
    let (sent, answered) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    eprintln!("benign resolver: {sent} queries sent, {answered} answered");
    assert!(sent > 10_000 && answered * 10 >= sent * 9, "{out}");
    lab.assert_never_held("resolver");
}

#[test]
fn benign_mail_relay_is_never_held() {
    if !require_root("benign_mail_relay_is_never_held") {
        return;
    }
    require_tools(
        "benign_mail_relay_is_never_held",
        &["swaks", "python3:aiosmtpd"],
    );
    let mut lab = Lab::new(&[10], &[20]);
    let mx = add_addresses(&lab.topo.internet[0].ns, 25..=27);
    let _servers: Vec<_> = mx
        .iter()
        .map(|a| {
            lab.topo.internet[0]
                .ns
                .spawn(&[PYTHON, "-m", "aiosmtpd", "-n", "-l", &format!("{a}:25")])
                .expect("aiosmtpd")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1_500));
    let sent = lab.measured("mail relay (3 MX, 12 s of messages)", || {
        let end = Instant::now() + Duration::from_secs(12);
        let mut sent = 0u32;
        while Instant::now() < end && sent < 400 {
            let to = &mx[sent as usize % mx.len()];
            let ok = lab.cust().ns.succeeds(&[
                "swaks",
                "--server",
                to,
                "--to",
                "user@example.net",
                "--from",
                "relay@customer.example",
                "--timeout",
                "5",
            ]);
            sent += u32::from(ok);
        }
        sent
    });
    eprintln!("benign mail relay: {sent} messages to {} MX", mx.len());
    assert!(sent >= 30, "only {sent} messages relayed");
    lab.assert_never_held("mail relay");
}

#[test]
fn benign_peer_to_peer_is_never_held() {
    if !require_root("benign_peer_to_peer_is_never_held") {
        return;
    }
    let mut lab = Lab::new(&[10], &[20]);
    let peers = add_addresses(&lab.topo.internet[0].ns, 30..=229);
    let mut rargs = vec!["6881", "25"];
    rargs.extend(peers.iter().map(String::as_str));
    let _udp = python_server(&lab.topo.internet[0].ns, UDP_RESPONDER, &rargs);
    let _tcp = python_server(&lab.topo.internet[0].ns, TCP_ECHO, &["6881", "25"]);
    let mut args = vec!["6881", "20", "40", "12"];
    args.extend(peers.iter().map(String::as_str));
    let got = lab.measured(
        "peer-to-peer (200 UDP peers × 20/s answered, 40 TCP peers, 12 s)",
        || python(&lab.cust().ns, P2P, &args),
    );
    let got: u64 = got.trim().parse().unwrap_or(0);
    eprintln!("benign peer-to-peer: {got} UDP answers");
    assert!(got > 10_000, "only {got} UDP answers");
    lab.assert_never_held("peer-to-peer");
}

#[test]
fn benign_monitoring_poller_is_never_held() {
    if !require_root("benign_monitoring_poller_is_never_held") {
        return;
    }
    require_tools("benign_monitoring_poller_is_never_held", &["fping"]);
    let mut lab = Lab::new(&[10], &[20]);
    let hosts = add_addresses(&lab.topo.internet[0].ns, 30..=229);
    let mut rargs = vec!["161", "25"];
    rargs.extend(hosts.iter().map(String::as_str));
    let _snmp = python_server(&lab.topo.internet[0].ns, UDP_RESPONDER, &rargs);
    let _http = python_server(
        &lab.topo.internet[0].ns,
        HTTP_SERVER,
        &["0.0.0.0", "80", "2000", "25"],
    );
    lab.measured(
        "monitoring poller (200 hosts: ping, SNMP, HTTP every 2 s, 12 s)",
        || {
            std::thread::scope(|s| {
                let c = &lab.cust().ns;
                let mut fping = vec!["fping", "-q", "-c", "6", "-p", "2000"];
                fping.extend(hosts.iter().map(String::as_str));
                let icmp = s.spawn(move || c.run(&fping));
                for _ in 0..6 {
                    let t = Instant::now();
                    // SNMP: one query per host per round, each from a new socket (as
                    // net-snmp's snmpget does), all answered.
                    let mut q = vec!["161", "200", "1"];
                    q.extend(hosts.iter().map(String::as_str));
                    python(c, QUERY_LOOP, &q);
                    let mut h = vec!["80", "8", "0.5"];
                    h.extend(hosts.iter().take(50).map(String::as_str));
                    python(c, HTTP_CLIENT, &h);
                    std::thread::sleep(Duration::from_secs(2).saturating_sub(t.elapsed()));
                }
                // fping exits 0 only when every host answered.
                icmp.join()
                    .expect("fping")
                    .expect("every host answered the poller's pings");
            });
        },
    );
    lab.assert_never_held("monitoring poller");
}

// ---------------------------------------------------------------------------------------------
// The floods a pps threshold misses
// ---------------------------------------------------------------------------------------------

/// A single-flow UDP flood: one socket (one 5-tuple, one conntrack flow) sending RATE
/// datagrams/s of 64 bytes to PORT, paced per millisecond, at most COUNT and SECONDS.
/// (hping3 `--udp -k -i u20` is the same flood, but on a loaded 2-core VM its `usleep`
/// pacing gives 13–25k pps, not 50k.) Args: ADDR PORT RATE COUNT SECONDS.
const UDP_FLOOD: &str = r#"
import socket, sys, time
addr, port, rate, count, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 40000)); s.connect((addr, port))
payload = b"f" * 64
start = time.time(); sent = 0
while sent < count and time.time() - start < secs:
    due = min(count, int((time.time() - start) * rate) + 1)
    while sent < due:
        try:
            s.send(payload)
        except OSError:
            pass
        sent += 1
    time.sleep(0.0005)
"#;

/// The single-flow UDP flood at 50k pps to `target` port 9, at most `count` packets and
/// `secs` seconds.
fn udp_flood(ns: &Netns, target: &str, count: u32, secs: u32) -> egressguard::netns::Proc {
    let count = count.to_string();
    let secs = secs.to_string();
    ns.spawn(&[PYTHON, "-c", UDP_FLOOD, target, "9", "50000", &count, &secs])
        .expect("udp flood")
}

/// `ping -f`: echo requests as fast as they are answered, at most `count` and `secs`.
fn ping_flood(ns: &Netns, target: &str, count: u32, secs: u32) -> egressguard::netns::Proc {
    let count = count.to_string();
    let secs = secs.to_string();
    ns.spawn(&["ping", "-f", "-q", "-c", &count, "-w", &secs, target])
        .expect("ping -f")
}

/// The flood offense of `addr` in `show --json`, once recorded.
fn flood_offense(lab: &Lab, addr: &str) -> Json {
    wait_for("the offense on record", Duration::from_secs(5), || {
        let show = lab.json(&["show", addr, "--json"]);
        show["offenses"].as_array().and_then(|o| o.first().cloned())
    })
}

#[test]
fn single_flow_udp_flood_is_held_by_default() {
    if !require_root("single_flow_udp_flood_is_held_by_default") {
        return;
    }
    let mut lab = Lab::new(&[10, 11], &[20]);
    let (cust, target) = (
        lab.cust().v4.to_string(),
        lab.topo.internet[0].v4.to_string(),
    );
    let before = lab.counters(&cust);
    let start = Instant::now();
    let _flood = udp_flood(&lab.cust().ns, &target, 1_500_000, 30);
    let took = lab.wait_held(&cust, start, Duration::from_secs(20));
    let after = lab.counters(&cust);
    eprintln!(
        "udp flood: start → held in {:.2} s, {:.0} unanswered-UDP pps until then",
        took.as_secs_f64(),
        (after[1] - before[1]) as f64 / took.as_secs_f64()
    );
    // The line the benign tests look for is what a detection logs.
    lab.agent
        .logged(&["detection", "category"], Duration::from_secs(5))
        .expect("the detection is logged");
    let off = flood_offense(&lab, &cust);
    assert_eq!(off["category"], "flood", "{off}");
    let ev = &off["evidence"];
    assert_eq!(ev["pattern"], "udp_flood", "{off}");
    assert!(
        ev["crossed"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["signal"] == "udp_pps")),
        "{off}"
    );
    assert_eq!(ev["top_destinations"][0]["key"], target.as_str(), "{off}");
    assert!(
        ev["counts"]["udp_pps"].as_f64().unwrap_or(0.0) >= 20_000.0,
        "{off}"
    );
    // The neighbour is untouched.
    let other = lab.topo.customers[1].v4.to_string();
    assert!(!lab.set("quarantine4").contains(&other));
}

#[test]
fn hping3_single_flow_udp_flood_is_held_by_default() {
    if !require_root("hping3_single_flow_udp_flood_is_held_by_default") {
        return;
    }
    require_tools(
        "hping3_single_flow_udp_flood_is_held_by_default",
        &["hping3"],
    );
    let lab = Lab::new(&[10], &[20]);
    let (cust, target) = (
        lab.cust().v4.to_string(),
        lab.topo.internet[0].v4.to_string(),
    );
    // The real tool, one flow (`-k` keeps the source port), as fast as it goes (`--flood`:
    // 50–60k pps on the shared VM; `-i u20` gives 13–25k there), bounded by time.
    let before = lab.counters(&cust);
    let start = Instant::now();
    let _flood = lab
        .cust()
        .ns
        .spawn(&[
            "timeout", "15", "hping3", "--udp", "-k", "-s", "40000", "-p", "9", "--flood", "-q",
            "-c", "1000000", &target,
        ])
        .expect("hping3");
    let took = lab.wait_held(&cust, start, Duration::from_secs(12));
    let after = lab.counters(&cust);
    eprintln!(
        "hping3 udp flood: start → held in {:.2} s, {:.0} unanswered-UDP pps until then",
        took.as_secs_f64(),
        (after[1] - before[1]) as f64 / took.as_secs_f64()
    );
    let off = flood_offense(&lab, &cust);
    assert_eq!(off["evidence"]["pattern"], "udp_flood", "{off}");
}

#[test]
fn ping_flood_is_held_by_default() {
    if !require_root("ping_flood_is_held_by_default") {
        return;
    }
    let lab = Lab::new(&[10, 11], &[20]);
    let (cust, target) = (
        lab.cust().v4.to_string(),
        lab.topo.internet[0].v4.to_string(),
    );
    let before = lab.counters(&cust);
    let start = Instant::now();
    let _flood = ping_flood(&lab.cust().ns, &target, 3_000_000, 30);
    let took = lab.wait_held(&cust, start, Duration::from_secs(20));
    let after = lab.counters(&cust);
    eprintln!(
        "ping flood: start → held in {:.2} s, {:.0} echo requests/s until then",
        took.as_secs_f64(),
        (after[2] - before[2]) as f64 / took.as_secs_f64()
    );
    let off = flood_offense(&lab, &cust);
    assert_eq!(off["category"], "flood", "{off}");
    let ev = &off["evidence"];
    assert_eq!(ev["pattern"], "icmp_flood", "{off}");
    assert!(
        ev["crossed"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["signal"] == "icmp_pps")),
        "{off}"
    );
    assert_eq!(ev["top_destinations"][0]["key"], target.as_str(), "{off}");
    assert!(
        ev["counts"]["icmp_pps"].as_f64().unwrap_or(0.0) >= 5_000.0,
        "{off}"
    );
    let other = lab.topo.customers[1].v4.to_string();
    assert!(!lab.set("quarantine4").contains(&other));
}

#[test]
fn ipv6_ping_flood_is_held_by_default() {
    if !require_root("ipv6_ping_flood_is_held_by_default") {
        return;
    }
    let lab = Lab::new(&[10], &[20]);
    let target = lab.topo.internet[0].v6.to_string();
    let start = Instant::now();
    let _flood = ping_flood(&lab.cust().ns, &target, 3_000_000, 30);
    // Held per /64 (the shipped ipv6_block_prefix).
    let took = lab.wait_held("2001:db8:c::/64", start, Duration::from_secs(20));
    eprintln!(
        "ipv6 ping flood: start → held in {:.2} s",
        took.as_secs_f64()
    );
}

/// Start → hold of both floods, three times each (`cargo test --test netns
/// measure_flood_start_to_hold -- --ignored --nocapture`), for docs/performance.md.
#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn measure_flood_start_to_hold() {
    if !require_root("measure_flood_start_to_hold") {
        return;
    }
    for kind in ["udp", "icmp"] {
        let mut times = Vec::new();
        let mut rates = Vec::new();
        for _ in 0..3 {
            let lab = Lab::new(&[10], &[20]);
            let (cust, target) = (
                lab.cust().v4.to_string(),
                lab.topo.internet[0].v4.to_string(),
            );
            let before = lab.counters(&cust);
            let start = Instant::now();
            let _f = if kind == "udp" {
                udp_flood(&lab.cust().ns, &target, 1_500_000, 30)
            } else {
                ping_flood(&lab.cust().ns, &target, 3_000_000, 30)
            };
            std::thread::sleep(Duration::from_secs(1));
            let mid = lab.counters(&cust);
            let took = lab.wait_held(&cust, start, Duration::from_secs(20));
            times.push(took.as_secs_f64());
            let i = if kind == "udp" { 1 } else { 2 };
            rates.push(mid[i].saturating_sub(before[i]));
        }
        eprintln!(
            "measure {kind} flood: start → held {:?} s; first-second rate {:?} pps",
            times
                .iter()
                .map(|t| (t * 100.0).round() / 100.0)
                .collect::<Vec<_>>(),
            rates
        );
    }
}
