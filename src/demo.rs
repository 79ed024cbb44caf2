//! `egressguard demo`: the newcomer's first command.
//!
//! As root, it builds a small network in namespaces — two customer servers, the router, and
//! an "internet" host — starts the agent on the router with the shipped default policy, sends
//! traffic through it and shows what happens. Everything it creates is removed when it ends,
//! also on Ctrl-C. No packet leaves the namespaces it creates.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cli::{DemoArgs, Exit};
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
        let names: Vec<String> = std::iter::once(topo.router.name().to_owned())
            .chain(topo.customers.iter().map(|h| h.ns.name().to_owned()))
            .chain(topo.internet.iter().map(|h| h.ns.name().to_owned()))
            .collect();
        println!(
            "\n   customer servers                  router (runs egressguard)           the internet\n   \
             203.0.113.10 2001:db8:c::a  ─┐                                     ┌─ 198.51.100.20\n   \
             203.0.113.11 2001:db8:c::b  ─┴─ 203.0.113.1 ══ 198.51.100.1 ──────┴─ 2001:db8:1::14\n"
        );
        println!("   namespaces: {}", names.join(", "));

        self.step("2. Starting the agent on the router with the shipped default policy")?;
        let scratch =
            Scratch(std::env::temp_dir().join(format!("egressguard-demo-{}", std::process::id())));
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut agent = Agent::start(Some(&topo.router), &exe, &scratch.0, DEFAULT_POLICY, true)
            .map_err(|e| e.to_string())?;
        self.await_line(&mut agent, "started", Duration::from_secs(10))?;

        self.step("3. Customers talk to the internet through the router")?;
        let server = topo.internet[0]
            .ns
            .enter(|| TcpListener::bind("[::]:8080"))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot start the web server: {e}"))?;
        let clients = topo.customers.len() * 2;
        let srv = std::thread::spawn(move || serve(server, clients));
        let inet = &topo.internet[0];
        for cust in &topo.customers {
            for (src, dst) in [(cust.v4, inet.v4), (cust.v6, inet.v6)] {
                let ping = cust
                    .ns
                    .succeeds(&["ping", "-c", "1", "-W", "2", &dst.to_string()]);
                let tcp = cust
                    .ns
                    .enter(|| fetch(SocketAddr::new(dst, 8080)))
                    .map_err(|e| e.to_string())?;
                println!(
                    "   {src:>15} -> {dst:<15} ping {}  tcp/8080 {}",
                    if ping { "ok" } else { "FAILED" },
                    match &tcp {
                        Ok(reply) => format!("ok ({reply:?})"),
                        Err(e) => format!("FAILED ({e})"),
                    }
                );
                self.wait(Duration::ZERO)?;
            }
        }
        let _ = srv.join();

        self.step("4. What comes next")?;
        println!(
            "   This build watches and enforces nothing yet: the observe, detect, enforce and BGP\n   \
             stages are being built (README, \"What is not done yet\"). When they land, this demo\n   \
             shows a customer server scanning the internet, the router quarantining it within a\n   \
             second, the evidence for the abuse desk, and the reconnect that lets it back on."
        );

        self.step("5. Stopping the agent and removing the namespaces")?;
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

    fn await_line(&self, agent: &mut Agent, needle: &str, limit: Duration) -> Result<(), String> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            self.wait(Duration::ZERO)?;
            match agent.wait_for(&[needle], Duration::from_millis(100)) {
                Ok(_) => return Ok(()),
                Err(e) if e.starts_with("the agent exited") => return Err(e),
                Err(_) => {}
            }
        }
        Err(format!("the agent did not say `{needle}` within {limit:?}"))
    }
}

/// Answers `n` connections with a short greeting, then returns.
fn serve(listener: TcpListener, n: usize) {
    let _ = listener.set_nonblocking(false);
    for _ in 0..n {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"hello from the internet");
    }
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
