//! The whole incident, end to end: several customer networks behind a router running the
//! built agent with `policies/examples/isp-edge.yaml` (its addresses replaced by the lab's),
//! an upstream namespace with a real BIRD 2 peering with the agent (flowspec to the route
//! reflector, RTBH to the transit), and "the internet" with real servers (web, sshd, SMTP,
//! the abuse portal). Real tools attack from their own customers *at the same time*, while
//! other customers run benign workloads. For every attacker: the detection in its category,
//! the enforcement (nft set, blackhole route, flowspec and RTBH in BIRD), the evidence
//! (`show --json`), the notification (the hook's JSON) and the abuse report, then the
//! reconnect; and the benign customers are never touched.
//!
//! Every generator is bounded in count and time and aims only at the lab's namespaces.
//! `measure_detection_latency` (ignored) repeats the attack round and prints the latency
//! distribution per category recorded in docs/performance.md.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use egressguard::netns::{Agent, Netns, Proc, Topology, addr, veth};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use crate::bird::Bird;
use crate::common::{agent_bin, repo, require_root, require_tools, wait_for};

/// The lab's changes to the example policy: its own addresses, the BIRD peers, the notify
/// hook and reports, blackhole routes on. Thresholds stay the example's, except two that a
/// short test run cannot reach with real servers in the way (sshd makes each guess wait; 12
/// SMTP servers stand for a spammer's thousands): see `brute_force` and `spam`.
const LAB: &str = r#"
networks:
  - prefix: 203.0.113.0/24
    name: lab-customers-v4
  - prefix: 2001:db8:c::/56
    name: lab-customers-v6
allow:
  - 203.0.113.1
  - 2001:db8:c::1
profiles:
  default:
    brute_force:
      attempts: 10
    spam:
      distinct_destinations: 10
enforcement:
  walled_garden:
    - 198.51.100.80
    - 2001:db8:1::50
  blackhole:
    enabled: true
bgp:
  router_id: 192.0.2.1
  peers:
    - name: rr1
      address: 192.0.2.2
      remote_as: 64500
      families: [ipv4-flowspec, ipv6-flowspec]
      announce: [flowspec]
      accept_flowspec: true
    - name: upstream-a
      address: 192.0.2.66
      remote_as: 64496
      families: [ipv4-unicast, ipv6-unicast]
      announce: [rtbh]
      rtbh_communities: ["64496:666"]
      rtbh_next_hop_v4: 192.0.2.99
      rtbh_next_hop_v6: 2001:db8:b:1::99
notify:
  reporter: abuse@lab.example
"#;

/// BIRD: the fleet's route reflector (iBGP, flowspec) and the transit (eBGP, unicast), one
/// link each to the router. (One BIRD, two links: BIRD 2.0.12 tells passive sessions apart
/// by the neighbour's address.)
const BIRD_CONF: &str = r#"
router id 192.0.2.2;
log "{log}" all;
flow4 table flowtab4;
flow6 table flowtab6;
protocol device { }
protocol direct { ipv4; ipv6; interface "eth*"; }
protocol bgp rr1 {
  local 192.0.2.2 as 64500;
  neighbor 192.0.2.1 as 64500;
  passive on;
  hold time 9;
  flow4 { table flowtab4; import all; export none; };
  flow6 { table flowtab6; import all; export none; };
}
protocol bgp transit {
  local 192.0.2.66 as 64496;
  neighbor 192.0.2.65 as 64500;
  passive on;
  hold time 9;
  ipv4 { import all; export none; };
  ipv6 { import all; export none; };
}
"#;

/// Merges `over` into `base`: mappings key by key (recursively), anything else replaced.
fn merge(base: &mut Yaml, over: Yaml) {
    match (base, over) {
        (Yaml::Mapping(b), Yaml::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// The example policy with the lab's changes, the notify hook writing into `dir`, and
/// `reconnects` (address, ticket) authorised.
fn policy(dir: &Path, reconnects: &[(String, String)]) -> String {
    policy_with(dir, reconnects, "")
}

/// [`policy`] with `extra` (YAML) merged over it.
fn policy_with(dir: &Path, reconnects: &[(String, String)], extra: &str) -> String {
    let example = std::fs::read_to_string(repo().join("policies/examples/isp-edge.yaml"))
        .expect("example policy");
    let mut p: Yaml = serde_yaml::from_str(&example).expect("example parses");
    merge(
        &mut p,
        serde_yaml::from_str(LAB).expect("lab overrides parse"),
    );
    let notify = format!(
        "notify:\n  command: [/bin/sh, -c, 'cat > \"$0/notify-$(date +%s%N)-$$.json\"', {hooks}]\n  report_dir: {reports}\n",
        hooks = dir.join("hooks").display(),
        reports = dir.join("reports").display(),
    );
    merge(
        &mut p,
        serde_yaml::from_str(&notify).expect("notify parses"),
    );
    if !reconnects.is_empty() {
        let list: Vec<String> = reconnects
            .iter()
            .map(|(a, t)| {
                format!(
                    "  - address: {a}\n    ticket: {t}\n    authorised_by: desk@lab.example\n    conditions: [fee_paid, reinstalled, acknowledged]\n    expires: 2099-01-01T00:00:00Z\n"
                )
            })
            .collect();
        let text = format!("reconnect:\n{}", list.concat());
        merge(
            &mut p,
            serde_yaml::from_str(&text).expect("reconnects parse"),
        );
    }
    if !extra.is_empty() {
        merge(
            &mut p,
            serde_yaml::from_str(extra).expect("extra overrides parse"),
        );
    }
    serde_yaml::to_string(&p).expect("policy serialises")
}

/// One attack: who runs it, what it must be detected as, where it must land.
pub(crate) struct Attack {
    pub(crate) name: &'static str,
    /// Index into `topo.customers`.
    pub(crate) customer: usize,
    /// The held target as the agent reports it.
    pub(crate) target: &'static str,
    /// The element as it appears in the nft set.
    pub(crate) element: &'static str,
    pub(crate) category: &'static str,
    pub(crate) set: &'static str,
    /// The exact flowspec rule BIRD must show, v4 or v6 table.
    pub(crate) flowspec: &'static str,
    /// A blackhole route and an RTBH announcement (blocks, not quarantines).
    pub(crate) blackhole: bool,
    pub(crate) script: String,
}

/// What happened to one attack.
#[derive(Clone, Debug)]
struct Outcome {
    name: &'static str,
    category: &'static str,
    /// Attack start → the attacker's element in the kernel's set (its traffic dropped).
    start_to_drop: Duration,
    /// Detection (the decision's time) → the element in the set.
    detect_to_drop: Option<Duration>,
}

/// Customers: attackers 10–17 (IPv4) and 40 (a /64 of its own, many addresses), benign 30
/// and 31. Internet: 20 web server and mirrors, 21 sshd and scan target, 23 twelve SMTP
/// servers, 80 the abuse portal (walled garden).
pub(crate) struct Lab {
    pub(crate) bird: Bird,
    pub(crate) agent: Agent,
    pub(crate) dir: tempfile::TempDir,
    _servers: Vec<Proc>,
    pub(crate) upstream: Netns,
    pub(crate) topo: Topology,
}

const ATTACKERS: [u16; 8] = [10, 11, 12, 13, 14, 15, 16, 17];
const V6_ATTACKER: usize = 8;
const BENIGN: [usize; 2] = [9, 10];

impl Lab {
    pub(crate) fn new() -> Lab {
        Lab::with("")
    }

    /// The lab with `extra` (YAML) merged over its policy.
    pub(crate) fn with(extra: &str) -> Lab {
        let mut topo = Topology::new().expect("topology");
        for h in ATTACKERS {
            topo.add_customer(h).expect("customer");
        }
        topo.add_customer(40).expect("customer");
        topo.add_customer(30).expect("customer");
        topo.add_customer(31).expect("customer");
        for h in [20, 21, 23, 80] {
            topo.add_internet_host(h).expect("internet host");
        }
        // The v6 attacker has a /64 of its own routed to it, as a provider routes a /64 to
        // a VPS (an IPv6 customer is blocked per /64, so it must not share one with its
        // neighbours); it uses many addresses of it.
        topo.router
            .run(&[
                "ip",
                "-6",
                "route",
                "add",
                "2001:db8:c:1::/64",
                "via",
                "2001:db8:c::28",
                "dev",
                "br-cust",
            ])
            .expect("route");
        let v6 = &topo.customers[V6_ATTACKER].ns;
        for i in 0x10..0x20 {
            addr(v6, "eth0", &format!("2001:db8:c:1::{i:x}/128")).expect("addr");
        }
        // Mirrors for the benign downloader; twelve mail servers. (The portal, host 80, is
        // 2001:db8:1::50 by the topology's numbering.)
        let web = &topo.internet[0].ns;
        for i in 50..58 {
            addr(web, "eth0", &format!("198.51.100.{i}/24")).expect("addr");
        }
        let mx = &topo.internet[2].ns;
        for i in 100..112 {
            addr(mx, "eth0", &format!("198.51.100.{i}/24")).expect("addr");
        }

        // The upstream: BIRD as route reflector on one link, as transit on another.
        let upstream = Netns::new("upstream").expect("upstream ns");
        for (r, u, v4, v6) in [
            (
                "up0",
                "eth0",
                ("192.0.2.1/26", "192.0.2.2/26"),
                ("2001:db8:b::1/64", "2001:db8:b::2/64"),
            ),
            (
                "up1",
                "eth1",
                ("192.0.2.65/26", "192.0.2.66/26"),
                ("2001:db8:b:1::1/64", "2001:db8:b:1::2/64"),
            ),
        ] {
            veth(&topo.router, r, &upstream, u).expect("veth");
            addr(&topo.router, r, v4.0).expect("addr");
            addr(&upstream, u, v4.1).expect("addr");
            addr(&topo.router, r, v6.0).expect("addr");
            addr(&upstream, u, v6.1).expect("addr");
        }
        let bird = Bird::start_with(&upstream, BIRD_CONF);

        let dir = tempfile::tempdir().expect("tempdir");
        let servers = vec![
            web_server(&topo.internet[0].ns),
            web_server(&topo.internet[3].ns),
            sshd(&topo.internet[1].ns, dir.path()),
            quiet(
                &topo.internet[1].ns,
                &format!("/usr/bin/python3 -c \"{UDP_ECHO}\""),
            ),
            quiet(mx, "/usr/bin/python3 -m aiosmtpd -n -l 0.0.0.0:25"),
        ];

        std::fs::create_dir_all(dir.path().join("hooks")).expect("hooks dir");
        let mut agent = Agent::start(
            Some(&topo.router),
            &agent_bin(),
            dir.path(),
            &policy_with(dir.path(), &[], extra),
            false,
        )
        .expect("agent starts");
        agent
            .wait_for(&["started"], Duration::from_secs(10))
            .expect("agent started");
        let lab = Lab {
            bird,
            agent,
            dir,
            _servers: servers,
            upstream,
            topo,
        };
        let mut lab = lab;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = lab.bird.try_birdc("show protocols").unwrap_or_default();
            if o.lines().filter(|l| l.contains("Established")).count() == 2 {
                break;
            }
            if Instant::now() > deadline {
                lab.agent.drain();
                panic!(
                    "BGP sessions not Established in 30 s:\n{}\n{}\nagent log:\n{}",
                    lab.bird.try_birdc("show protocols all").unwrap_or_default(),
                    lab.bird.log(),
                    lab.agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_for("servers listening", Duration::from_secs(10), || {
            let s = lab.topo.internet[2].ns.run(&["ss", "-ltn"]).ok()?;
            let w = lab.topo.internet[0].ns.run(&["ss", "-ltn"]).ok()?;
            let h = lab.topo.internet[1].ns.run(&["ss", "-ltn"]).ok()?;
            (s.contains(":25 ") && w.contains(":80 ") && h.contains(":22 ")).then_some(())
        });
        lab
    }

    /// Starts the agent again on the same state directory and policy file (after a kill).
    pub(crate) fn restart(&mut self) {
        let policy =
            std::fs::read_to_string(self.dir.path().join("policy.yaml")).expect("policy file");
        self.agent = Agent::start(
            Some(&self.topo.router),
            &agent_bin(),
            self.dir.path(),
            &policy,
            false,
        )
        .expect("agent starts again");
        self.agent
            .wait_for(&["started"], Duration::from_secs(10))
            .expect("agent started again");
    }

    pub(crate) fn cli(&self, args: &[&str]) -> String {
        let out = self.agent.cli(&agent_bin(), args);
        assert!(
            out.status.success(),
            "egressguard {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The elements of every set of the agent's table, by set name.
    pub(crate) fn sets(&self) -> BTreeMap<String, BTreeSet<String>> {
        let Ok(text) = self
            .topo
            .router
            .run(&["nft", "-j", "list", "table", "inet", "egressguard"])
        else {
            return BTreeMap::new();
        };
        let v: Json = serde_json::from_str(&text).expect("nft JSON");
        let mut out = BTreeMap::new();
        for o in v["nftables"].as_array().into_iter().flatten() {
            let Some(set) = o.get("set") else { continue };
            let name = set["name"].as_str().unwrap_or_default().to_owned();
            let elems = set["elem"]
                .as_array()
                .into_iter()
                .flatten()
                .map(element)
                .collect();
            out.insert(name, elems);
        }
        out
    }

    pub(crate) fn blackholes(&self) -> String {
        let v4 = self
            .topo
            .router
            .run(&["ip", "route", "show", "type", "blackhole"])
            .unwrap_or_default();
        let v6 = self
            .topo
            .router
            .run(&["ip", "-6", "route", "show", "type", "blackhole"])
            .unwrap_or_default();
        v4 + &v6
    }

    pub(crate) fn flowspec(&self) -> String {
        self.bird.birdc("show route table flowtab4 all")
            + &self.bird.birdc("show route table flowtab6 all")
    }

    /// The hook's documents so far.
    fn notifications(&self) -> Vec<Json> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.path().join("hooks"))
            .expect("hooks dir")
            .flatten()
        {
            if let Ok(text) = std::fs::read_to_string(e.path())
                && let Ok(v) = serde_json::from_str(&text)
            {
                out.push(v);
            }
        }
        out
    }

    fn reload_with(&self, reconnects: &[(String, String)]) {
        let text = policy(self.dir.path(), reconnects);
        std::fs::write(self.dir.path().join("policy.yaml"), text).expect("write policy");
        self.cli(&["reload"]);
    }
}

/// An element of `nft -j` as text: `203.0.113.10`, `2001:db8:c:1::/64`.
fn element(e: &Json) -> String {
    match e {
        Json::String(s) => s.clone(),
        Json::Object(m) if m.contains_key("elem") => element(&m["elem"]["val"]),
        Json::Object(m) if m.contains_key("prefix") => format!(
            "{}/{}",
            m["prefix"]["addr"].as_str().unwrap_or_default(),
            m["prefix"]["len"]
        ),
        Json::Object(m) if m.contains_key("range") => format!("{}", m["range"]),
        other => other.to_string(),
    }
}

const UDP_ECHO: &str = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',53))\nwhile True:\n d,a=s.recvfrom(512)\n s.sendto(d,a)\n";

/// Runs a server in `ns` with its output discarded (request logs would flood the test's).
fn quiet(ns: &Netns, cmd: &str) -> Proc {
    ns.spawn(&["bash", "-c", &format!("exec {cmd} >/dev/null 2>&1")])
        .expect("server starts")
}

fn web_server(ns: &Netns) -> Proc {
    quiet(ns, "/usr/bin/python3 -m http.server 80 --bind ::")
}

/// An sshd in `ns` with a fresh host key in `dir` (the test's temporary directory, removed
/// with it).
pub(crate) fn sshd(ns: &Netns, dir: &Path) -> Proc {
    let key = dir.join("sshd_host_key");
    let ok = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(&key)
        .status()
        .expect("ssh-keygen (openssh-client) runs");
    assert!(ok.success(), "ssh-keygen failed");
    std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
    quiet(
        ns,
        &format!(
            "/usr/sbin/sshd -D -e -f /dev/null -h {} -o ListenAddress=0.0.0.0 -o PidFile=none \
             -o UsePAM=no -o MaxStartups=200 -o MaxAuthTries=1 -o LoginGraceTime=10",
            key.display()
        ),
    )
}

fn attacks(words: &Path) -> Vec<Attack> {
    let nmap = "timeout 60 nmap -Pn -n --max-retries 0";
    vec![
        Attack {
            name: "nmap TCP SYN scan",
            customer: 0,
            target: "203.0.113.10/32",
            element: "203.0.113.10",
            category: "port_scan",
            set: "quarantine4",
            flowspec: "flow4 { src 203.0.113.10/32; }",
            blackhole: false,
            script: format!("{nmap} -sS -T4 -p 1-1000 198.51.100.21"),
        },
        Attack {
            name: "nmap TCP connect scan",
            customer: 1,
            target: "203.0.113.11/32",
            element: "203.0.113.11",
            category: "port_scan",
            set: "quarantine4",
            flowspec: "flow4 { src 203.0.113.11/32; }",
            blackhole: false,
            script: format!("{nmap} -sT -T4 -p 1-1000 198.51.100.21"),
        },
        Attack {
            name: "nmap UDP scan",
            customer: 2,
            target: "203.0.113.12/32",
            element: "203.0.113.12",
            category: "port_scan",
            set: "quarantine4",
            flowspec: "flow4 { src 203.0.113.12/32; }",
            blackhole: false,
            script: format!("{nmap} -sU -T5 --min-rate 2000 -p 1000-1400 198.51.100.21"),
        },
        Attack {
            name: "nmap horizontal scan of a /24",
            customer: 3,
            target: "203.0.113.13/32",
            element: "203.0.113.13",
            category: "network_scan",
            set: "quarantine4",
            flowspec: "flow4 { src 203.0.113.13/32; }",
            blackhole: false,
            script: format!("{nmap} -sS -T5 --host-timeout 3s -p 22 198.51.100.0/24"),
        },
        Attack {
            name: "hping3 SYN flood",
            customer: 4,
            target: "203.0.113.14/32",
            element: "203.0.113.14",
            category: "flood",
            set: "blocked4",
            flowspec: "flow4 { src 203.0.113.14/32; }",
            blackhole: true,
            // 20,000 SYNs at about 10,000/s to one address that never answers.
            script: "timeout 20 hping3 -q -S -p 80 -i u100 -c 20000 198.51.100.99".into(),
        },
        Attack {
            name: "hping3 UDP flood",
            customer: 5,
            target: "203.0.113.15/32",
            element: "203.0.113.15",
            category: "flood",
            set: "blocked4",
            flowspec: "flow4 { src 203.0.113.15/32; }",
            blackhole: true,
            script: "timeout 20 hping3 -q --udp -p 9999 -i u100 -c 20000 198.51.100.98".into(),
        },
        Attack {
            name: "hydra against sshd",
            customer: 6,
            target: "203.0.113.16/32",
            element: "203.0.113.16",
            category: "brute_force",
            set: "quarantine4",
            // flowspec_match: service — the profile's authentication ports only.
            flowspec: "flow4 { src 203.0.113.16/32; proto 6; \
                       dport 21,22,23,110,143,445,1433,3306,3389,5432,5900,8291; }",
            blackhole: false,
            script: format!(
                "cd /tmp && timeout 40 hydra -I -t 16 -l root -P {} ssh://198.51.100.21",
                words.display()
            ),
        },
        Attack {
            name: "swaks to twelve mail servers",
            customer: 7,
            target: "203.0.113.17/32",
            element: "203.0.113.17",
            category: "spam",
            set: "quarantine4",
            // flowspec_match: service — only SMTP.
            flowspec: "flow4 { src 203.0.113.17/32; proto 6; dport 25,465,587; }",
            blackhole: false,
            script:
                "for i in $(seq 100 111); do timeout 10 swaks --silent 2 --to victim@example.net \
                     --from spam@example.org --server 198.51.100.$i; done"
                    .into(),
        },
        Attack {
            name: "nmap IPv6 SYN scan from four addresses of one /64",
            customer: V6_ATTACKER,
            target: "2001:db8:c:1::/64",
            element: "2001:db8:c:1::/64",
            category: "port_scan",
            set: "quarantine6",
            flowspec: "flow6 { src 2001:db8:c:1::/64; }",
            blackhole: false,
            // 40 ports from each address: none crosses distinct_ports (100) alone, the /64
            // does (160).
            script: (0..4)
                .map(|i| {
                    format!(
                        "{nmap} -6 -sS -T4 -e eth0 -S 2001:db8:c:1::1{i} -p {}-{} 2001:db8:1::15; ",
                        1 + 40 * i,
                        40 + 40 * i
                    )
                })
                .collect(),
        },
    ]
}

/// For each attacker, in parallel: does it reach (the abuse portal, the web server)? From
/// its own source address, over its own address family.
pub(crate) fn probe_all(lab: &Lab, attacks: &[Attack]) -> Vec<(bool, bool)> {
    std::thread::scope(|sc| {
        let hs: Vec<_> = attacks
            .iter()
            .map(|a| {
                let ns = &lab.topo.customers[a.customer].ns;
                sc.spawn(move || {
                    let (src, portal, web) = if a.set.ends_with('6') {
                        (
                            "2001:db8:c:1::10",
                            "http://[2001:db8:1::50]/",
                            "http://[2001:db8:1::14]/",
                        )
                    } else {
                        (a.element, "http://198.51.100.80/", "http://198.51.100.20/")
                    };
                    let get = |url: &str| {
                        ns.succeeds(&[
                            "curl",
                            "-s",
                            "-o",
                            "/dev/null",
                            "-m",
                            "2",
                            "--interface",
                            src,
                            url,
                        ])
                    };
                    (get(portal), get(web))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("probe")).collect()
    })
}

/// Benign customers at work the whole time: a downloader fetching from eight mirrors over
/// IPv4 and from the web server over IPv6, and a host resolving names at its resolver.
/// Bounded: a fixed number of rounds. Each writes `ok …` or `FAIL …` per request to `log`.
fn benign(lab: &Lab, log: &Path) -> Vec<Proc> {
    let fetch = format!(
        "for r in $(seq 60); do for u in $(seq 50 57 | sed 's|.*|http://198.51.100.&/|') \
         'http://[2001:db8:1::14]/'; do \
         if curl -s -o /dev/null -m 5 \"$u\"; then echo \"ok $u\"; else echo \"FAIL $u\"; fi >> {log}; \
         done; sleep 0.2; done",
        log = log.display()
    );
    let dns = format!(
        "for r in $(seq 600); do if timeout 5 python3 -c 'import socket; s=socket.socket(2,2); s.settimeout(3); \
         s.sendto(b\"q\",(\"198.51.100.21\",53)); s.recv(9)'; then echo 'ok dns'; else echo 'FAIL dns'; fi >> {log}; \
         sleep 0.05; done",
        log = log.display()
    );
    vec![
        lab.topo.customers[BENIGN[0]]
            .ns
            .spawn(&["bash", "-c", &format!("( {fetch} ) >/dev/null 2>&1")])
            .expect("benign fetch"),
        lab.topo.customers[BENIGN[1]]
            .ns
            .spawn(&["bash", "-c", &format!("( {dns} ) >/dev/null 2>&1")])
            .expect("benign dns"),
    ]
}

/// Every tool the scenario lab runs (attackers, servers, BIRD); panics naming a missing one.
pub(crate) fn require_lab_tools(test: &str) {
    require_tools(
        test,
        &[
            "nmap",
            "hping3",
            "hydra",
            "swaks",
            "sshd",
            "ssh-keygen",
            "bird",
            "birdc",
            "curl",
            "python3",
            "python3:aiosmtpd",
        ],
    );
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Runs every attack at once with the benign workloads alongside; waits for each attacker
/// to be held and checks everything about the incident; then reconnects all of them.
/// The benign customers' addresses.
pub(crate) fn benign_addrs(lab: &Lab) -> Vec<String> {
    BENIGN
        .iter()
        .flat_map(|&i| {
            let h = &lab.topo.customers[i];
            [h.v4.to_string(), h.v6.to_string()]
        })
        .collect()
}

/// The wordlist hydra guesses from.
fn wordlist(lab: &Lab) -> std::path::PathBuf {
    let words = lab.dir.path().join("passwords");
    let list: Vec<String> = (0..40).map(|i| format!("guess{i}")).collect();
    std::fs::write(&words, list.join("\n")).expect("wordlist");
    words
}

/// The attacks named in `names` (all when empty).
pub(crate) fn chosen(lab: &Lab, names: &[&str]) -> Vec<Attack> {
    attacks(&wordlist(lab))
        .into_iter()
        .filter(|a| names.is_empty() || names.contains(&a.name))
        .collect()
}

/// Starts every attack; returns the running tools and their start times.
pub(crate) fn launch(lab: &Lab, attacks: &[Attack]) -> (Vec<Proc>, Vec<Instant>) {
    let mut running = Vec::new();
    let mut started = Vec::new();
    for a in attacks {
        started.push(Instant::now());
        running.push(
            lab.topo.customers[a.customer]
                .ns
                .spawn(&["bash", "-c", &format!("( {} ) >/dev/null 2>&1", a.script)])
                .expect("attack starts"),
        );
    }
    (running, started)
}

/// Watches the kernel's sets until every attacker is held (the benign customers never may
/// be); returns for each the time from its start and the wall clock (ns) it was seen held.
pub(crate) fn wait_held(
    lab: &mut Lab,
    attacks: &[Attack],
    started: &[Instant],
    limit: Duration,
) -> Vec<(Duration, u64)> {
    let benign = benign_addrs(lab);
    let mut held: Vec<Option<(Duration, u64)>> = vec![None; attacks.len()];
    let deadline = Instant::now() + limit;
    while held.iter().any(Option::is_none) {
        let sets = lab.sets();
        let t = now_ns();
        for (i, a) in attacks.iter().enumerate() {
            if held[i].is_none() && sets.get(a.set).is_some_and(|s| s.contains(a.element)) {
                held[i] = Some((started[i].elapsed(), t));
            }
        }
        for (name, elems) in sets
            .iter()
            .filter(|(n, _)| n.starts_with("blocked") || n.starts_with("quarantine"))
        {
            for b in &benign {
                assert!(!elems.contains(b), "benign customer {b} put in {name}");
            }
        }
        if Instant::now() > deadline {
            lab.agent.drain();
            let missing: Vec<_> = attacks
                .iter()
                .zip(&held)
                .filter(|(_, h)| h.is_none())
                .map(|(a, _)| a.name)
                .collect();
            let status = lab.agent.cli(&agent_bin(), &["status"]);
            panic!(
                "not held within {limit:?}: {missing:?}\nsets: {sets:?}\nstatus:\n{}\nlog:\n{}",
                String::from_utf8_lossy(&status.stdout),
                lab.agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    held.into_iter().flatten().collect()
}

fn attack_round(lab: &mut Lab) -> Vec<Outcome> {
    let benign_log = lab.dir.path().join("benign.log");
    let _benign = benign(lab, &benign_log);
    // EGD_ONLY=<name> runs only that attack (for debugging).
    let only = std::env::var("EGD_ONLY").ok();
    let attacks = chosen(lab, only.as_deref().as_slice());
    let (running, started) = launch(lab, &attacks);
    let held = wait_held(lab, &attacks, &started, Duration::from_secs(90));
    drop(running);

    // The agent's word for each: detection, category, kind.
    for a in &attacks {
        let line = lab
            .agent
            .logged(
                &[
                    "address held",
                    &format!("addr={}", a.target),
                    &format!("category={}", a.category),
                ],
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", a.name));
        let kind = if a.set.starts_with("blocked") {
            "kind=block"
        } else {
            "kind=quarantine"
        };
        assert!(line.contains(kind), "{}: {line}", a.name);
    }

    // Flowspec in BIRD for every one, RTBH and a blackhole route for the blocks only.
    let deadline = Instant::now() + Duration::from_secs(10);
    let flows = loop {
        let f = lab.flowspec();
        let missing: Vec<_> = attacks
            .iter()
            .filter(|a| !f.contains(a.flowspec))
            .map(|a| a.flowspec)
            .collect();
        if missing.is_empty() {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "flowspec rules missing in BIRD: {missing:?}\n{f}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        flows.contains("(generic, 0x8006fbf4, 0x0)"),
        "no traffic-rate 0 from AS 64500:\n{flows}"
    );
    let holes = lab.blackholes();
    for a in &attacks {
        let ip = a.element.trim_end_matches("/64");
        assert_eq!(
            holes.contains(ip),
            a.blackhole,
            "{}: blackhole route expected {}:\n{holes}",
            a.name,
            a.blackhole
        );
        if a.blackhole {
            let r = wait_for("RTBH route at the transit", Duration::from_secs(10), || {
                let o = lab
                    .bird
                    .birdc(&format!("show route table master4 {} all", a.target));
                o.contains(a.target).then_some(o)
            });
            for c in ["(65535,666)", "(65535,65281)", "(64496,666)", "192.0.2.99"] {
                assert!(r.contains(c), "{}: RTBH route lacks {c}:\n{r}", a.name);
            }
        }
    }

    // Quarantined attackers reach the abuse portal and nothing else; blocked ones nothing.
    let reach = probe_all(lab, &attacks);
    for (a, (portal, web)) in attacks.iter().zip(reach) {
        let quarantined = a.set.starts_with("quarantine");
        assert_eq!(
            portal, quarantined,
            "{}: reaches the walled garden: {portal}",
            a.name
        );
        assert!(!web, "{}: still reaches the web while held", a.name);
    }

    // Evidence, notification and abuse report for each.
    let notes = wait_for(
        "a notification per attacker",
        Duration::from_secs(10),
        || {
            let n = lab.notifications();
            attacks
                .iter()
                .all(|a| {
                    n.iter()
                        .any(|d| d["decision"]["target"] == a.target && d["evidence"].is_object())
                })
                .then_some(n)
        },
    );
    let mut outcomes = Vec::new();
    for (i, a) in attacks.iter().enumerate() {
        let show: Json =
            serde_json::from_str(&lab.cli(&["show", a.target, "--json"])).expect("show --json");
        let off = &show["offenses"][0];
        assert_eq!(off["category"], a.category, "{}: {show}", a.name);
        let crossed = &off["evidence"]["crossed"];
        assert!(
            crossed.as_array().is_some_and(|c| !c.is_empty()),
            "{}: evidence without a crossed threshold: {show}",
            a.name
        );
        let note = notes
            .iter()
            .find(|d| d["decision"]["target"] == a.target && d["evidence"].is_object())
            .expect("notification");
        assert_eq!(note["schema"], "egressguard.notify.v1");
        assert_eq!(note["decision"]["cause"]["category"], a.category);
        let (start_to_drop, in_set_at) = held[i];
        let decided = note["decision"]["time"].as_u64().unwrap_or(0);
        outcomes.push(Outcome {
            name: a.name,
            category: a.category,
            start_to_drop,
            detect_to_drop: in_set_at.checked_sub(decided).map(Duration::from_nanos),
        });
    }
    let reports: Vec<String> = std::fs::read_dir(lab.dir.path().join("reports"))
        .expect("report dir")
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect();
    for a in &attacks {
        let ip = a.element.trim_end_matches("/64");
        assert!(
            reports
                .iter()
                .any(|r| r.contains(ip) && r.contains("X-XARF: PLAIN")),
            "{}: no X-ARF report naming {ip}",
            a.name
        );
    }

    // The abuse desk reconnects every one of them: everything is lifted and withdrawn.
    let mut tickets: Vec<(String, String)> = attacks
        .iter()
        .enumerate()
        .map(|(i, a)| (a.target.to_owned(), format!("ABUSE-LAB-{i}")))
        .collect();
    // One the desk got wrong: that address was never blocked.
    tickets.push(("203.0.113.99".into(), "ABUSE-LAB-WRONG".into()));
    // `check` first: it asks the running agent what each authorisation would do now.
    let candidate = lab.dir.path().join("candidate.yaml");
    std::fs::write(&candidate, policy(lab.dir.path(), &tickets)).expect("candidate policy");
    let check = lab.cli(&["check", "--policy", candidate.to_str().expect("utf-8")]);
    for (i, a) in attacks.iter().enumerate() {
        let want = format!(
            "reconnect ABUSE-LAB-{i} for {}: would be applied now",
            a.target
        );
        assert!(check.contains(&want), "check lacks `{want}`:\n{check}");
    }
    assert!(
        check.contains(
            "reconnect ABUSE-LAB-WRONG for 203.0.113.99/32: refused: the address is not blocked"
        ),
        "{check}"
    );
    lab.reload_with(&tickets);
    for a in &attacks {
        lab.agent
            .logged(
                &["reconnect applied", &format!("addr={}", a.target)],
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", a.name));
    }
    lab.agent
        .logged(
            &["reconnect refused", "ticket=ABUSE-LAB-WRONG"],
            Duration::from_secs(10),
        )
        .expect("the wrong authorisation is refused in the log");
    let status: Json =
        serde_json::from_str(&lab.cli(&["status", "--json"])).expect("status --json");
    assert!(
        status["reconnects"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| {
                r["ticket"] == "ABUSE-LAB-WRONG"
                    && r["outcome"]
                        .as_str()
                        .is_some_and(|o| o.contains("not blocked"))
            })),
        "status does not report the refused reconnect: {status}"
    );
    wait_for("sets emptied", Duration::from_secs(5), || {
        let sets = lab.sets();
        attacks
            .iter()
            .all(|a| !sets.get(a.set).is_some_and(|s| s.contains(a.element)))
            .then_some(())
    });
    wait_for("flowspec withdrawn", Duration::from_secs(10), || {
        let f = lab.flowspec();
        attacks
            .iter()
            .all(|a| !f.contains(a.flowspec))
            .then_some(())
    });
    wait_for("RTBH withdrawn", Duration::from_secs(10), || {
        (!lab
            .bird
            .birdc("show route table master4 all")
            .contains("203.0.113.1"))
        .then_some(())
    });
    wait_for("blackhole routes removed", Duration::from_secs(5), || {
        (!lab.blackholes().contains("203.0.113.")).then_some(())
    });
    wait_for("reconnect notifications", Duration::from_secs(10), || {
        let n = lab.notifications();
        attacks
            .iter()
            .all(|a| {
                n.iter().any(|d| {
                    d["decision"]["target"] == a.target
                        && d["decision"]["cause"]["by"] == "reconnect"
                        && d["decision"]["kind"].is_null()
                })
            })
            .then_some(())
    });
    for (a, (_, web)) in attacks.iter().zip(probe_all(lab, &attacks)) {
        assert!(web, "{}: reconnected, still cannot reach the web", a.name);
    }
    // The benign customers worked all along and were never named.
    lab.agent.drain();
    let log = lab.agent.log();
    for b in &benign_addrs(lab) {
        assert!(
            !log.contains(&format!("addr={b}/")),
            "benign customer {b} named by the agent:\n{log}"
        );
    }
    let done = std::fs::read_to_string(&benign_log).unwrap_or_default();
    assert!(!done.contains("FAIL"), "a benign workload failed:\n{done}");
    for what in [
        "ok http://198.51.100.50/",
        "ok http://[2001:db8:1::14]/",
        "ok dns",
    ] {
        assert!(
            done.contains(what),
            "benign workload `{what}` never ran:\n{done}"
        );
    }
    outcomes
}

fn print_outcomes(outcomes: &[Outcome]) {
    eprintln!(
        "attack                                              category      start→drop  detection→drop"
    );
    for o in outcomes {
        eprintln!(
            "{:<50}  {:<12}  {:>8.0} ms  {:>10}",
            o.name,
            o.category,
            o.start_to_drop.as_secs_f64() * 1e3,
            o.detect_to_drop
                .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
                .unwrap_or_else(|| "-".into())
        );
    }
}

#[test]
fn every_attack_at_once_detected_enforced_announced_reported_and_reconnected() {
    let test = "every_attack_at_once_detected_enforced_announced_reported_and_reconnected";
    if !require_root(test) {
        return;
    }
    require_lab_tools(test);
    let mut lab = Lab::new();
    let outcomes = attack_round(&mut lab);
    print_outcomes(&outcomes);
    // Detection fires within one evaluation interval of the threshold; the decision and the
    // nft transaction follow at once. Generous for a loaded 2-core CI machine.
    for o in &outcomes {
        if let Some(d) = o.detect_to_drop {
            assert!(
                d < Duration::from_secs(2),
                "{}: {d:?} from the decision to the drop",
                o.name
            );
        }
    }
    let m = lab
        .topo
        .router
        .run(&["curl", "-s", "http://127.0.0.1:9474/metrics"])
        .unwrap_or_default();
    for want in [
        "egressguard_detections_total{category=\"port_scan\"}",
        "egressguard_detections_total{category=\"flood\"}",
        "egressguard_bgp_session_up{peer=\"rr1\"} 1",
        "egressguard_bgp_session_up{peer=\"upstream-a\"} 1",
        "# TYPE egressguard_bgp_apply_seconds summary",
        "egressguard_bgp_apply_seconds_count{peer=\"rr1\"}",
        "egressguard_enforce_last_netlink_seconds",
        "egressguard_enforce_last_route_seconds",
        "egressguard_enforce_fast_path_fallbacks_total 0",
    ] {
        assert!(m.contains(want), "metrics lack {want}:\n{m}");
    }
}

/// Repeats the attack round `EGD_ROUNDS` times (default 10, a fresh lab each) and prints
/// the latency distribution per category: median and p99 (the maximum for fewer than 100
/// samples) from attack start to drop and from detection to drop.
#[test]
#[ignore = "measurement: sudo -E cargo test --release --test netns measure_detection_latency -- --ignored --nocapture"]
fn measure_detection_latency() {
    if !require_root("measure_detection_latency") {
        return;
    }
    require_lab_tools("measure_detection_latency");
    let rounds: usize = std::env::var("EGD_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut all: BTreeMap<&str, Vec<Outcome>> = BTreeMap::new();
    for r in 0..rounds {
        let mut lab = Lab::new();
        let outcomes = attack_round(&mut lab);
        eprintln!("round {}:", r + 1);
        print_outcomes(&outcomes);
        for o in outcomes {
            all.entry(o.category).or_default().push(o);
        }
    }
    let q = |v: &mut Vec<f64>, p: f64| -> f64 {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    eprintln!(
        "\n| category | n | start→drop median | start→drop p99 | detection→drop median | detection→drop p99 |"
    );
    eprintln!("| --- | --- | --- | --- | --- | --- |");
    for (cat, os) in &all {
        let mut s: Vec<f64> = os
            .iter()
            .map(|o| o.start_to_drop.as_secs_f64() * 1e3)
            .collect();
        let mut d: Vec<f64> = os
            .iter()
            .filter_map(|o| o.detect_to_drop.map(|d| d.as_secs_f64() * 1e3))
            .collect();
        eprintln!(
            "| {cat} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
            s.len(),
            q(&mut s, 0.5),
            q(&mut s, 0.99),
            q(&mut d, 0.5),
            q(&mut d, 0.99)
        );
    }
}

/// The lab's policy for `holds_are_not_evidence_and_a_lift_re_arms_at_once`: a flood's first
/// offense is a quarantine (the example blocks it at once), and a short port-scan window
/// (the one with which a scan through the auth ports used to be held as brute force).
const HOLD_LAB: &str = "
actions:
  flood:
    start_at: 1
profiles:
  default:
    port_scan:
      window: 2s
";

/// The agent's offenses of `target` (`show --json`).
fn offenses(lab: &Lab, target: &str) -> Vec<Json> {
    let show: Json =
        serde_json::from_str(&lab.cli(&["show", target, "--json"])).expect("show --json");
    show["offenses"].as_array().cloned().unwrap_or_default()
}

/// Packets dropped so far by the forward chain's rule for quarantined senders.
fn quarantine_drops(lab: &Lab) -> u64 {
    let text = lab
        .topo
        .router
        .run(&["nft", "list", "chain", "inet", "egressguard", "forward"])
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("ip saddr @quarantine4") && l.contains("drop"))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "packets")?;
            w.get(i + 1)?.parse::<u64>().ok()
        })
        .sum()
}

/// Waits until `element` is in one of `sets`; the time it took.
fn wait_in_sets(lab: &mut Lab, element: &str, sets: &[&str], limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let now = lab.sets();
        if sets
            .iter()
            .any(|s| now.get(*s).is_some_and(|e| e.contains(element)))
        {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            lab.agent.drain();
            panic!(
                "{element} not in {sets:?} within {limit:?}: {now:?}\nlog:\n{}",
                lab.agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 17, items 3, 4 and 5: a flood continuing into its quarantine stays at the first
/// offense (what the hold drops is not charged: the drop counters show it); a scan of 1000
/// ports that passes 21, 22, 23, 110, 143 and 445 is held as a port scan, not brute force,
/// even with a 2 s port-scan window; after `egressguard unblock` a new scan is held again
/// within seconds (not after the window and hold-down roll over).
#[test]
fn holds_are_not_evidence_and_a_lift_re_arms_at_once() {
    let test = "holds_are_not_evidence_and_a_lift_re_arms_at_once";
    if !require_root(test) {
        return;
    }
    require_lab_tools(test);
    let mut lab = Lab::with(HOLD_LAB);

    // (3) A SYN flood of ~10,000/s for up to 40 s; held as quarantine, then 20 s more.
    let flood = lab.topo.customers[4]
        .ns
        .spawn(&[
            "bash",
            "-c",
            "exec timeout 40 hping3 -q -S -p 80 -i u100 -c 400000 198.51.100.99 >/dev/null 2>&1",
        ])
        .expect("hping3 starts");
    let took = wait_in_sets(
        &mut lab,
        "203.0.113.14",
        &["quarantine4"],
        Duration::from_secs(25),
    );
    eprintln!("flood quarantined after {took:?}");
    let dropped_at_hold = quarantine_drops(&lab);
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        let sets = lab.sets();
        assert!(
            !sets
                .get("blocked4")
                .is_some_and(|s| s.contains("203.0.113.14")),
            "the flood continuing into its quarantine was escalated to a block: {:?}",
            offenses(&lab, "203.0.113.14/32")
        );
        assert!(
            sets.get("quarantine4")
                .is_some_and(|s| s.contains("203.0.113.14")),
            "quarantine lifted: {sets:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let dropped = quarantine_drops(&lab) - dropped_at_hold;
    drop(flood);
    let off = offenses(&lab, "203.0.113.14/32");
    assert_eq!(off.len(), 1, "one offense only: {off:#?}");
    assert_eq!(off[0]["category"], "flood");
    // The attempts the hold dropped are in its counters: the flood went on.
    assert!(
        dropped > 20_000,
        "the quarantine's drop rule counted only {dropped} packets in 20 s"
    );
    eprintln!("20 s of flood into the quarantine: {dropped} packets dropped, one offense");

    // (5) A 1000-port SYN scan through the auth ports, with a 2 s port-scan window.
    let scan = "exec timeout 30 nmap -Pn -n --max-retries 0 -sS -T4 -p 1-1000 198.51.100.21 \
                >/dev/null 2>&1";
    // What the target received: its own count of the SYNs' distinct ports from the scanner
    // (a table in the target's namespace, which the test made).
    let victim = &lab.topo.internet[1].ns;
    victim
        .run(&[
            "nft",
            "add table inet seen; \
             add set inet seen ports { type inet_service; size 65536; flags dynamic; }; \
             add chain inet seen in { type filter hook input priority 0; }; \
             add rule inet seen in ip saddr 203.0.113.10 tcp flags & (syn|ack) == syn \
             add @ports { tcp dport }",
        ])
        .expect("counting table in the target");
    let s1 = lab.topo.customers[0]
        .ns
        .spawn(&["bash", "-c", scan])
        .expect("nmap starts");
    wait_in_sets(
        &mut lab,
        "203.0.113.10",
        &["quarantine4"],
        Duration::from_secs(20),
    );
    drop(s1);
    let off = offenses(&lab, "203.0.113.10/32");
    assert_eq!(off.len(), 1, "{off:#?}");
    let seen: Json = serde_json::from_str(
        &lab.topo.internet[1]
            .ns
            .run(&["nft", "-j", "list", "set", "inet", "seen", "ports"])
            .expect("list the target's count"),
    )
    .expect("nft JSON");
    let received = seen["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("set"))
        .map(|s| s["elem"].as_array().map_or(0, Vec::len))
        .sum::<usize>() as f64;
    let counts = &off[0]["evidence"]["counts"];
    eprintln!("scan: the target received {received} distinct ports; evidence: {counts}");
    // Exact for what the agent saw: every port the target received passed the router before
    // the drop (nmap's 1000 ports take well under the detection's quarter second).
    assert_eq!(
        counts["distinct_ports"].as_f64(),
        Some(received),
        "evidence distinct ports vs the target's count: {counts}"
    );
    assert!(counts.get("distinct_ports_at_least").is_none(), "{counts}");
    assert_eq!(received, 1000.0, "the scan was cut short: {counts}");
    assert_eq!(
        off[0]["category"], "port_scan",
        "a scan through the auth ports held as {}: {:#}",
        off[0]["category"], off[0]["evidence"]
    );

    // (4) The desk unblocks it; a new scan right after is held again within seconds.
    lab.cli(&["unblock", "203.0.113.10", "--ticket", "T-17"]);
    wait_for("unblocked", Duration::from_secs(5), || {
        let sets = lab.sets();
        (!["quarantine4", "blocked4"]
            .iter()
            .any(|n| sets.get(*n).is_some_and(|s| s.contains("203.0.113.10"))))
        .then_some(())
    });
    let s2 = lab.topo.customers[0]
        .ns
        .spawn(&["bash", "-c", scan])
        .expect("nmap starts again");
    let again = wait_in_sets(
        &mut lab,
        "203.0.113.10",
        &["quarantine4", "blocked4"],
        Duration::from_secs(10),
    );
    drop(s2);
    eprintln!("re-offense after unblock held in {again:?}");
    assert!(
        again < Duration::from_secs(5),
        "re-offense after unblock held only after {again:?}"
    );
    let off = offenses(&lab, "203.0.113.10/32");
    assert_eq!(off.len(), 2, "{off:#?}");
    assert!(off.iter().all(|o| o["category"] == "port_scan"), "{off:#?}");
}
