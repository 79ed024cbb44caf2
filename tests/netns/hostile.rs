//! Local clients treated as hostile (issue 15): every attack here runs against the real agent
//! and checks that its own work goes on.
//!
//! - an idle-connection flood on the control socket from a group member: the agent's file
//!   descriptors stay bounded, root and another group member still get `status`, the nft
//!   counter reads keep working, the refusals are logged rate-limited, the idle clients are
//!   dropped after the read timeout (and a group member by supplementary group only is let
//!   in, on `SO_PEERGROUPS`);
//! - clients that ask `show` of a large history and never read: the agent's memory stays
//!   bounded, the clients are dropped after the write timeout, `show` pages;
//! - an idle flood on the metrics port: a scrape still answers; out of descriptors
//!   (`EMFILE`) the accept loop backs off instead of spinning a core.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use egressguard::netns::{Agent, Netns};

use crate::common::{agent_bin, cpu_ticks, require_root, require_tools, wait_for};

/// A system group made for one test, deleted on drop.
struct TestGroup {
    name: String,
    gid: u32,
}

impl TestGroup {
    fn new(tag: &str) -> TestGroup {
        let name = format!("egt-{tag}-{}", std::process::id());
        let _ = Command::new("groupdel").arg(&name).output();
        let out = Command::new("groupadd")
            .args(["--system", &name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "groupadd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let gid = nix::unistd::Group::from_name(&name)
            .unwrap()
            .expect("the group just added")
            .gid
            .as_raw();
        TestGroup { name, gid }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// Open file descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// One metric's value from a scrape of `port` inside `ns` (bash, so that no client library
/// is in the way); `None` when the scrape or the metric is missing.
fn scrape(ns: &Netns, port: u16) -> Option<String> {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} || exit 1; \
         printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; timeout 5 cat <&3"
    );
    ns.run(&["timeout", "8", "bash", "-c", &script]).ok()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Runs a CLI verb as `uid` with `gid` as its only (supplementary) group.
fn cli_as(uid: u32, gid: u32, sock: &std::path::Path, verb: &str) -> std::process::Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg(format!("--groups={gid}"))
        .arg(agent_bin())
        .args([verb, "--socket"])
        .arg(sock)
        .output()
        .unwrap()
}

/// Opens `n` connections to a Unix socket as nobody with supplementary group `gid`, prints
/// `connected N`, holds them `hold` seconds, then prints how many got the agent's `busy` line
/// and how many were closed by the agent, and exits. Bounded by `timeout`.
const FLOOD: &str = r#"
import socket, sys, time
path, n, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks, failed = [], 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        socks.append(s)
    except OSError:
        failed += 1
        s.close()
print(f"connected {len(socks)} failed {failed}", flush=True)
time.sleep(hold)
busy = closed = 0
for s in socks:
    s.settimeout(0.05)
    try:
        d = s.recv(65536)
        if b"busy" in d:
            busy += 1
        rest = d
        while rest:
            rest = s.recv(65536)
        closed += 1
    except OSError:
        pass
print(f"busy {busy} closed {closed}", flush=True)
"#;

/// Group member floods the control socket with idle connections.
#[test]
fn control_socket_idle_flood_leaves_the_agent_working() {
    if !require_root("control_socket_idle_flood_leaves_the_agent_working") {
        return;
    }
    require_tools(
        "control_socket_idle_flood_leaves_the_agent_working",
        &["setpriv", "python3"],
    );
    let group = TestGroup::new("flood");
    let ns = Netns::new("ctlflood").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Traversable for nobody: the socket's own mode and group decide.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let port = 9481;
    let policy = format!(
        "version: 1\nmode: enforce\nnetworks:\n  - prefix: 203.0.113.0/24\n\
         detection:\n  counter_interval: 500ms\nmetrics:\n  listen: 127.0.0.1:{port}\n"
    );
    let exe = agent_bin();
    let mut agent = Agent::start_with_args(
        Some(&ns),
        &exe,
        dir.path(),
        &policy,
        false,
        &["--socket-group", &group.name],
    )
    .unwrap();
    agent
        .wait_for(&["started"], Duration::from_secs(10))
        .unwrap();
    let pid = agent.pid();
    // The unit's LimitNOFILE: without the bound, 1100 connections take every descriptor.
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=1024:1024"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let sock = dir.path().join("control.sock");
    let reads = |what: &str| {
        let m = wait_for(what, Duration::from_secs(10), || scrape(&ns, port));
        (
            metric(&m, "egressguard_counter_reads_total").unwrap_or(-1.0),
            metric(&m, "egressguard_counter_errors_total").unwrap_or(-1.0),
        )
    };
    let (reads_before, errors_before) = reads("a scrape before the flood");
    let baseline = fds(pid);

    // 1100 idle connections from nobody, in the group by supplementary group only.
    let mut flood = Command::new("timeout")
        .arg("40")
        .arg("prlimit")
        .arg("--nofile=4096:4096")
        .arg("setpriv")
        .args(["--reuid=65534", "--regid=65534"])
        .arg(format!("--groups={}", group.gid))
        .args(["/usr/bin/python3", "-c", FLOOD])
        .arg(&sock)
        .args(["1100", "9"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut flood_out = std::io::BufReader::new(flood.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut flood_out, &mut line).unwrap();
    assert!(line.starts_with("connected 1100 failed 0"), "{line}");
    let t0 = Instant::now();

    // While the flood holds its connections: bounded descriptors, the operator answered.
    let during = fds(pid);
    assert!(
        during <= baseline + egressguard::control::server::PER_USER + 4,
        "the agent holds {during} descriptors under the flood ({baseline} before)"
    );
    let out = agent.cli(&exe, &["status"]);
    assert!(
        out.status.success(),
        "root's status under the flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another group member (by supplementary group only: SO_PEERGROUPS, no /proc) too.
    let out = cli_as(4242, group.gid, &sock, "status");
    assert!(
        out.status.success(),
        "a group member's status under the flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Counter reads go on: more reads, no new errors.
    std::thread::sleep(Duration::from_millis(1200));
    let (reads_during, errors_during) = reads("a scrape under the flood");
    assert!(
        reads_during > reads_before,
        "counter reads stopped: {reads_before} → {reads_during}"
    );
    assert_eq!(errors_during, errors_before, "counter reads failed");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "checks took too long"
    );

    // After the read timeout the idle clients are dropped, while they still hold their ends.
    wait_for("idle clients dropped", Duration::from_secs(8), || {
        (fds(pid) <= baseline + 1).then_some(())
    });
    assert!(
        t0.elapsed() < Duration::from_secs(9),
        "dropped only after the flood ended"
    );
    line.clear();
    std::io::BufRead::read_line(&mut flood_out, &mut line).unwrap();
    let _ = flood.wait();
    let nums: Vec<usize> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        nums.len() == 2 && nums[0] >= 1100 - 2 * egressguard::control::server::PER_USER,
        "most of the flood got a busy reply: {line}"
    );
    assert_eq!(
        nums[1], 1100,
        "every connection was closed by the agent: {line}"
    );

    // Refusals are logged, rate-limited: one line, not a thousand.
    agent.drain();
    let refusals = agent
        .log()
        .lines()
        .filter(|l| l.contains("connection refused, too many open"))
        .count();
    assert!(
        (1..=2).contains(&refusals),
        "{refusals} refusal warnings:\n{}",
        agent.log()
    );
    // A user outside the group is still refused (by the socket's mode, before the agent).
    let out = cli_as(4243, 4243, &sock, "status");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        agent.stop(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
}

/// An offense whose evidence is about `kib` KiB of JSON.
fn offense(target: ipnet::IpNet, i: u64, kib: usize) -> egressguard::state::Change {
    use egressguard::messages::{BlockKind, Category, Counted, Evidence, FlowSample, Time};
    let t = Time::now().saturating_sub(Duration::from_secs(100_000 - i));
    let sample = FlowSample {
        time: t,
        dst: "198.51.100.7".parse().unwrap(),
        proto: 6,
        sport: 40000,
        dport: 22,
        answered: false,
    };
    egressguard::state::Change::Offense(Box::new(egressguard::state::OffenseRecord {
        target,
        time: t,
        number: 1,
        category: Category::BruteForce,
        profile: "default".into(),
        kind: BlockKind::Quarantine,
        expires: Some(t),
        dry_run: true,
        evidence: Evidence {
            window_start: t,
            window_end: t,
            crossed: Vec::new(),
            counts: Default::default(),
            top_destinations: vec![
                Counted {
                    key: "198.51.100.7".parse().unwrap(),
                    count: 9,
                };
                8
            ],
            top_ports: Vec::new(),
            first_seen: t,
            last_seen: t,
            // About 120 bytes of JSON each.
            sample: vec![sample; kib * 1024 / 120],
            spoofing: None,
            pattern: None,
        },
    }))
}

/// Clients ask `show` of a large history and never read.
#[test]
fn control_socket_big_show_never_read_is_bounded_and_dropped() {
    if !require_root("control_socket_big_show_never_read_is_bounded_and_dropped") {
        return;
    }
    let ns = Netns::new("ctlshow").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // 3000 offenses of ~8 KiB (4 times the evidence the detector records at most, so that a
    // page of 100 is far larger than a socket buffer): 24 MiB for one unpaged `show`, 1.2 GiB
    // for 50 of them.
    let target: ipnet::IpNet = "203.0.113.50/32".parse().unwrap();
    {
        let mut store = egressguard::state::Store::open(&dir.path().join("state.db")).unwrap();
        let changes: Vec<_> = (0..3000).map(|i| offense(target, i, 8)).collect();
        store.commit(&changes).unwrap();
    }
    let exe = agent_bin();
    let mut agent = Agent::start(
        Some(&ns),
        &exe,
        dir.path(),
        "version: 1\nnetworks:\n  - prefix: 203.0.113.0/24\n",
        false,
    )
    .unwrap();
    agent
        .wait_for(&["started"], Duration::from_secs(10))
        .unwrap();
    let pid = agent.pid();
    let sock = dir.path().join("control.sock");
    // Warm up: one paged show, read in full.
    let out = agent.cli(&exe, &["show", "203.0.113.50", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let page: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        page["offenses"].as_array().unwrap().len(),
        20,
        "default page"
    );
    assert_eq!(page["offenses_omitted"], 2980);
    let out = agent.cli(&exe, &["show", "203.0.113.50", "--limit", "100", "--json"]);
    eprintln!(
        "one page of 100 offenses: {} bytes of JSON",
        out.stdout.len()
    );
    let fds_before = fds(pid);
    let rss_before = rss_kib(pid);

    // 50 clients ask for the largest page (and more than that) and never read.
    let clients: Vec<UnixStream> = (0..50)
        .map(|i| {
            let mut s = UnixStream::connect(&sock).unwrap();
            let limit = if i % 2 == 0 { 100 } else { 1_000_000 };
            writeln!(
                s,
                "{{\"verb\":\"show\",\"addr\":\"203.0.113.50/32\",\"limit\":{limit}}}"
            )
            .unwrap();
            s
        })
        .collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let rss_during = rss_kib(pid);
    let grown = rss_during.saturating_sub(rss_before);
    eprintln!("RSS {rss_before} KiB → {rss_during} KiB with 50 unread show replies");
    assert!(
        grown < 100 * 1024,
        "the agent grew by {grown} KiB holding 50 unread replies"
    );
    let out = agent.cli(&exe, &["status"]);
    assert!(out.status.success(), "status while they hang: {out:?}");

    // Dropped after the write timeout: descriptors back, each client holds a cut reply.
    wait_for("unread clients dropped", Duration::from_secs(10), || {
        (fds(pid) <= fds_before + 1).then_some(())
    });
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(10),
        "dropped after {waited:?}"
    );
    // The kernel's socket buffer takes a few hundred KiB of a reply: most clients hold a
    // reply cut short (an occasional one may have got the whole ~800 KiB page).
    let mut cut = 0;
    for mut s in clients {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        if !got.ends_with(b"\n") {
            cut += 1;
        }
    }
    assert!(cut >= 40, "only {cut} of 50 unread replies were cut short");

    // Paging as the operator uses it.
    let json = |args: &[&str]| -> serde_json::Value {
        let out = agent.cli(&exe, args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let p = json(&[
        "show",
        "203.0.113.50",
        "--limit",
        "5",
        "--offset",
        "10",
        "--json",
    ]);
    assert_eq!(p["offenses"].as_array().unwrap().len(), 5);
    assert_eq!(p["offenses_omitted"], 2995);
    let all = json(&["show", "203.0.113.50", "--all", "--json"]);
    assert_eq!(all["offenses"].as_array().unwrap().len(), 3000);
    assert_eq!(all["offenses_omitted"], 0);
    let out = agent.cli(&exe, &["show", "203.0.113.50"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2980 earlier offenses not shown: --offset 20 for the next page"),
        "{text}"
    );
    let out = agent.cli(&exe, &["show", "203.0.113.50", "--limit", "101"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        agent.stop(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
}

/// Starts an agent in `ns` with the metrics listener on `port`.
fn metrics_agent(ns: &Netns, dir: &std::path::Path, port: u16) -> Agent {
    let policy = format!(
        "version: 1\nnetworks:\n  - prefix: 203.0.113.0/24\nmetrics:\n  listen: 127.0.0.1:{port}\n"
    );
    let mut agent = Agent::start(Some(ns), &agent_bin(), dir, &policy, false).unwrap();
    agent
        .wait_for(&["metrics listening"], Duration::from_secs(10))
        .unwrap();
    agent
}

/// Opens `n` idle TCP connections to `port` inside `ns`.
fn idle_tcp(ns: &Netns, port: u16, n: usize) -> Vec<std::net::TcpStream> {
    ns.enter(|| {
        (0..n)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                    Duration::from_secs(2),
                )
                .ok()
            })
            .collect()
    })
    .unwrap()
}

/// More idle connections than the bound: a scrape still answers, the agent's descriptors
/// stay bounded, and the idle ones are dropped after the idle timeout.
#[test]
fn metrics_idle_flood_does_not_stop_a_scrape() {
    if !require_root("metrics_idle_flood_does_not_stop_a_scrape") {
        return;
    }
    let ns = Netns::new("metflood").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = 9482;
    let mut agent = metrics_agent(&ns, dir.path(), port);
    let pid = agent.pid();
    wait_for("a first scrape", Duration::from_secs(5), || {
        scrape(&ns, port)
    });
    let baseline = fds(pid);
    let idle = idle_tcp(&ns, port, 300);
    assert_eq!(idle.len(), 300);
    std::thread::sleep(Duration::from_millis(300));
    let during = fds(pid);
    assert!(
        during <= baseline + egressguard::metrics::MAX_CONNECTIONS + 2,
        "{during} descriptors under the flood ({baseline} before)"
    );
    for _ in 0..3 {
        let m = scrape(&ns, port).expect("a scrape under the flood");
        assert!(m.contains("egressguard_events_seen_total "), "{m}");
    }
    wait_for("idle connections dropped", Duration::from_secs(10), || {
        (fds(pid) <= baseline + 1).then_some(())
    });
    drop(idle);
    agent.drain();
    let evictions = agent
        .log()
        .lines()
        .filter(|l| l.contains("metrics: connection limit reached"))
        .count();
    assert!(
        (1..=2).contains(&evictions),
        "{evictions} warnings:\n{}",
        agent.log()
    );
    assert_eq!(
        agent.stop(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
}

/// Out of descriptors (`EMFILE`) with connections waiting: the accept loop backs off, so
/// the agent's CPU time stays low, and once descriptors are back a scrape answers.
#[test]
fn metrics_accept_emfile_backs_off() {
    if !require_root("metrics_accept_emfile_backs_off") {
        return;
    }
    let ns = Netns::new("metemfile").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = 9483;
    let mut agent = metrics_agent(&ns, dir.path(), port);
    let pid = agent.pid();
    wait_for("a first scrape", Duration::from_secs(5), || {
        scrape(&ns, port)
    });
    // Leave the agent 2 descriptors above what it holds now.
    let limit = fds(pid) + 2;
    // Only the soft limit moves: raising a hard limit needs CAP_SYS_RESOURCE.
    let hard: String = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|r| r.split_whitespace().nth(1).map(str::to_owned))
        .unwrap();
    let set_limit = |n: usize| {
        let out = Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={n}:{hard}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "soft limit {n}: {out:?}");
    };
    set_limit(limit);
    let held = idle_tcp(&ns, port, 40);
    assert_eq!(held.len(), 40, "the backlog takes them");
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(pid).0;
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(pid).0.saturating_sub(before);
    // Clock ticks are 1/100 s: a spinning accept loop burns ~300 in 3 s.
    assert!(
        used < 60,
        "the agent used {used} ticks of CPU in 3 s while out of descriptors"
    );
    agent.drain();
    assert!(
        agent.log().contains("metrics: accept failed"),
        "{}",
        agent.log()
    );
    set_limit(1024);
    drop(held);
    let m = wait_for(
        "a scrape after the descriptors are back",
        Duration::from_secs(10),
        || scrape(&ns, port),
    );
    assert!(m.contains("egressguard_events_seen_total "), "{m}");
    assert_eq!(
        agent.stop(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
}
