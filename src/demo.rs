//! `egressguard demo`: the newcomer's first command.
//!
//! As root, it builds a small network in namespaces — two customer servers, the router, and
//! an "internet" host — starts the agent on the router with the shipped default policy, sends
//! traffic through it and shows what happens. Everything it creates is removed when it ends,
//! also on Ctrl-C. No packet leaves the namespaces it creates.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cli::{DemoArgs, Exit};
use crate::messages::Time;
use crate::netns::{Agent, Topology, is_root, sh};

/// The shipped default policy, as installed at /etc/egressguard/policy.yaml.
pub const DEFAULT_POLICY: &str = include_str!("../policies/default.yaml");

/// Runs the demo; returns the exit code.
pub fn run(args: &DemoArgs) -> Exit {
    if !is_root() {
        eprintln!(
            "egressguard demo builds network namespaces and needs root: run `sudo egressguard demo`"
        );
        return Exit::Failure;
    }
    if sh(&["ip", "-V"]).is_err() {
        eprintln!("egressguard demo needs the `ip` command: install the iproute2 package");
        return Exit::Failure;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, Arc::clone(&stop));
    }
    let demo = Demo {
        pause: Duration::from_secs_f64(args.pause.clamp(0.0, 30.0)),
        stop,
    };
    match demo.play() {
        Ok(()) => Exit::Ok,
        Err(e) => {
            eprintln!("\ndemo stopped: {e}");
            Exit::Failure
        }
    }
}

struct Demo {
    pause: Duration,
    stop: Arc<AtomicBool>,
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Demo {
    fn step(&self, title: &str) -> Result<(), String> {
        self.wait(self.pause)?;
        println!("\n== {title}");
        Ok(())
    }

    fn wait(&self, d: Duration) -> Result<(), String> {
        let end = Instant::now() + d;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err("interrupted; cleaning up".into());
            }
            if Instant::now() >= end {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn play(&self) -> Result<(), String> {
        println!(
            "egressguard demo: an edge router that cuts compromised customer servers off the network."
        );
        self.step("1. Building the network in namespaces")?;
        let mut topo = Topology::new().map_err(|e| e.to_string())?;
        topo.add_customer(10).map_err(|e| e.to_string())?;
        topo.add_customer(11).map_err(|e| e.to_string())?;
        topo.add_internet_host(20).map_err(|e| e.to_string())?;
        topo.add_internet_host(21).map_err(|e| e.to_string())?;
        let names: Vec<String> = std::iter::once(topo.router.name().to_owned())
            .chain(topo.customers.iter().map(|h| h.ns.name().to_owned()))
            .chain(topo.internet.iter().map(|h| h.ns.name().to_owned()))
            .collect();
        println!(
            "\n   customer servers              router (runs egressguard)        the internet\n   \
             203.0.113.10  2001:db8:c::a ─┐                                ┌─ 198.51.100.20 abuse portal (walled garden)\n   \
             203.0.113.11  2001:db8:c::b ─┴─ 203.0.113.1 ══ 198.51.100.1 ─┴─ 198.51.100.21 somebody's server\n"
        );
        println!("   namespaces: {}", names.join(", "));

        self.step(
            "2. Starting the agent on the router (shipped default policy, switched to enforce)",
        )?;
        let scratch =
            Scratch(std::env::temp_dir().join(format!("egressguard-demo-{}", std::process::id())));
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let policy = demo_policy();
        let mut agent = Agent::start(Some(&topo.router), &exe, &scratch.0, &policy, true)
            .map_err(|e| e.to_string())?;
        self.await_line(&mut agent, "started", Duration::from_secs(10))?;

        let serving = Arc::new(AtomicBool::new(true));
        for h in &topo.internet {
            let l =
                h.ns.enter(|| TcpListener::bind("[::]:8080"))
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("cannot start the web server: {e}"))?;
            let flag = Arc::clone(&serving);
            std::thread::spawn(move || serve(l, &flag));
        }
        let (portal, victim) = (&topo.internet[0], &topo.internet[1]);

        self.step("3. Customers talk to the internet through the router")?;
        for cust in &topo.customers {
            for (dst, label) in [(victim.v4, ""), (victim.v6, "")] {
                self.probe(cust, dst, label)?;
            }
        }

        self.step("4. 203.0.113.10 is compromised: it scans ports 1-300 of 198.51.100.21")?;
        let scanner = &topo.customers[0];
        let target = victim.v4;
        let open = scanner
            .ns
            .enter(|| scan(target, 1..=300))
            .map_err(|e| e.to_string())?;
        println!("   (the scan found {open} open port(s))");
        let held = self.await_line(&mut agent, "address held", Duration::from_secs(10))?;
        self.await_line(&mut agent, "trigger=Desired", Duration::from_secs(10))?;
        println!("\n   The agent detected the scan and quarantined the address:\n   {held}");

        self.step(
            "5. Quarantine: the scanner reaches only the walled garden; its neighbour is untouched",
        )?;
        self.probe(scanner, victim.v4, "(must fail: quarantined)")?;
        self.probe(scanner, portal.v4, "(walled garden: must pass)")?;
        self.probe(&topo.customers[1], victim.v4, "(neighbour: must pass)")?;
        self.cli(&agent, &exe, &["list"]);

        self.step("6. The evidence the abuse desk forwards to the customer")?;
        self.cli(&agent, &exe, &["show", "203.0.113.10"]);

        self.step("7. Fee paid, server reinstalled, incident acknowledged: the abuse desk authorises the reconnect")?;
        let text = format!(
            "{policy}\nreconnect:\n  - address: 203.0.113.10\n    ticket: ABUSE-DEMO-1\n    authorised_by: demo@abuse-desk\n    \
             conditions: [fee_paid, reinstalled, acknowledged]\n    expires: {}\n",
            Time::now().saturating_add(Duration::from_secs(86_400))
        )
        .replace("\nreconnect: []\n", "\n");
        std::fs::write(scratch.0.join("policy.yaml"), text).map_err(|e| e.to_string())?;
        println!("   reconnect entry written to the policy; `egressguard reload`:");
        self.cli(&agent, &exe, &["reload"]);
        self.await_line(&mut agent, "reconnect applied", Duration::from_secs(10))?;
        self.await_line(&mut agent, "trigger=Desired", Duration::from_secs(10))?;
        self.probe(scanner, victim.v4, "(reconnected: must pass)")?;
        self.cli(&agent, &exe, &["list"]);

        self.step("8. Stopping the agent and removing the namespaces")?;
        serving.store(false, Ordering::Relaxed);
        let status = agent.stop(Duration::from_secs(5));
        println!(
            "   agent stopped: {}",
            status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "not running".into())
        );
        drop(topo);
        let left = sh(&["ip", "netns", "list"]).unwrap_or_default();
        let leftover: Vec<&String> = names.iter().filter(|n| left.contains(n.as_str())).collect();
        if leftover.is_empty() {
            println!("   all namespaces removed. Done.");
            Ok(())
        } else {
            Err(format!("namespaces left behind: {leftover:?}"))
        }
    }

    /// Pings and fetches from `dst` and prints the outcome.
    fn probe(&self, from: &crate::netns::Host, dst: IpAddr, label: &str) -> Result<(), String> {
        self.wait(Duration::ZERO)?;
        let src = if dst.is_ipv4() { from.v4 } else { from.v6 };
        let ping = from
            .ns
            .succeeds(&["ping", "-c", "1", "-W", "1", &dst.to_string()]);
        let tcp = from
            .ns
            .enter(|| fetch(SocketAddr::new(dst, 8080)))
            .map_err(|e| e.to_string())?;
        println!(
            "   {src:>15} -> {dst:<15} ping {:<7} tcp/8080 {:<7} {label}",
            if ping { "ok" } else { "BLOCKED" },
            if tcp.is_ok() { "ok" } else { "BLOCKED" },
        );
        Ok(())
    }

    /// Runs a CLI verb against the agent and prints its output, indented.
    fn cli(&self, agent: &Agent, exe: &std::path::Path, args: &[&str]) {
        println!("   $ egressguard {}", args.join(" "));
        let out = agent.cli(exe, args);
        for l in String::from_utf8_lossy(&out.stdout)
            .lines()
            .chain(String::from_utf8_lossy(&out.stderr).lines())
        {
            println!("     {l}");
        }
    }

    fn await_line(
        &self,
        agent: &mut Agent,
        needle: &str,
        limit: Duration,
    ) -> Result<String, String> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            self.wait(Duration::ZERO)?;
            match agent.wait_for(&[needle], Duration::from_millis(100)) {
                Ok(line) => return Ok(line),
                Err(e) if e.starts_with("the agent exited") => return Err(e),
                Err(_) => {}
            }
        }
        Err(format!("the agent did not say `{needle}` within {limit:?}"))
    }
}

/// Answers connections with a short greeting until `serving` turns false.
fn serve(listener: TcpListener, serving: &AtomicBool) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while serving.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"hello from the internet");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A TCP connect scan of `ports` on `target`, bounded: 150 ms per port at most.
fn scan(target: IpAddr, ports: std::ops::RangeInclusive<u16>) -> usize {
    ports
        .filter(|p| {
            TcpStream::connect_timeout(&SocketAddr::new(target, *p), Duration::from_millis(150))
                .is_ok()
        })
        .count()
}

/// The shipped default policy, in enforce mode, with the demo's abuse portal as walled garden.
fn demo_policy() -> String {
    DEFAULT_POLICY
        .replace("\nmode: dry-run\n", "\nmode: enforce\n")
        .replace("walled_garden: []", "walled_garden: [198.51.100.20]")
}

/// One bounded request to the demo web server.
fn fetch(addr: SocketAddr) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}
