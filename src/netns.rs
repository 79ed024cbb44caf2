//! Network namespaces for the demo and the root-only tests: a small topology builder whose
//! every piece cleans up on drop.
//!
//! Traffic in a [`Topology`] never leaves the namespaces it creates: the customer, router and
//! "internet" hosts are joined by veth pairs created directly inside the namespaces, and the
//! addresses are documentation prefixes (RFC 5737, RFC 3849) that exist nowhere else here.
//!
//! Names carry the creating process id (`egd-<pid>-<n>-<role>`), so [`sweep_stale`] can remove
//! the namespaces of a run that was killed before its guards could drop.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

/// Why a namespace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command could not be started.
    #[error("cannot run `{cmd}`")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A command ran and failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Entering a namespace failed.
    #[error("cannot enter network namespace {name}")]
    Enter {
        /// The namespace.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs a command to completion; an error carries its stderr.
pub fn sh(args: &[&str]) -> Result<String, NetnsError> {
    let cmd = args.join(" ");
    let out: Output = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            cmd,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted on drop (with every process still running in it).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `egd-<pid>-<seq>-<role>` with loopback up.
    pub fn new(role: &str) -> Result<Netns, NetnsError> {
        let name = format!(
            "egd-{}-{}-{role}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        // No duplicate address detection: addresses are usable at once, link-locals included.
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Command` that runs `args` inside the namespace.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Runs `args` inside the namespace to completion; fails on a non-zero exit.
    pub fn run(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut full = vec!["ip", "netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs `args` inside the namespace and returns whether it exited 0 (output discarded).
    pub fn succeeds(&self, args: &[&str]) -> bool {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Starts `args` inside the namespace; the process is stopped when the guard drops.
    pub fn spawn(&self, args: &[&str]) -> Result<Proc, NetnsError> {
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| NetnsError::Spawn {
                cmd: args.join(" "),
                source,
            })?;
        Ok(Proc { child: Some(child) })
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        self.run(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets opened by `f` stay in the
    /// namespace, also when used later from another thread.
    pub fn enter<F, R>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let fd = File::open(&path).map_err(|source| NetnsError::Enter {
                    name: self.name.clone(),
                    source,
                })?;
                setns(&fd, CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Enter {
                    name: self.name.clone(),
                    source: io::Error::from(e),
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Stop whatever still runs in the namespace, then delete it.
        if let Ok(pids) = sh(&["ip", "netns", "pids", &self.name]) {
            for pid in pids.split_whitespace() {
                let _ = sh(&["kill", "-9", pid]);
            }
        }
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// A process started in a namespace: SIGTERM on drop, SIGKILL when it does not stop in 3 s.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    /// Wraps a child process.
    pub fn new(child: Child) -> Proc {
        Proc { child: Some(child) }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Mutable access to the child (to take its pipes).
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until drop")
    }

    /// Sends SIGTERM and waits up to `grace`; then SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGKILL at once, as a crash or the OOM killer would; returns the exit status.
    pub fn kill(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// Joins two namespaces with a veth pair, named `a_if` in `a` and `b_if` in `b`, both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<(), NetnsError> {
    sh(&[
        "ip",
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.run(&["ip", "link", "set", a_if, "up"])?;
    b.run(&["ip", "link", "set", b_if, "up"])?;
    Ok(())
}

/// Adds an address (with prefix length) to an interface, without IPv6 duplicate detection.
pub fn addr(ns: &Netns, ifname: &str, cidr: &str) -> Result<(), NetnsError> {
    if cidr.contains(':') {
        ns.run(&["ip", "-6", "addr", "add", cidr, "dev", ifname, "nodad"])
            .map(drop)
    } else {
        ns.run(&["ip", "addr", "add", cidr, "dev", ifname])
            .map(drop)
    }
}

/// Deletes namespaces left behind by earlier runs whose process is gone.
pub fn sweep_stale() {
    let Ok(list) = sh(&["ip", "netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("egd-") else {
            continue;
        };
        let pid: Option<i32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = sh(&["ip", "netns", "del", name]);
        }
    }
}

/// One customer server.
#[derive(Debug)]
pub struct Host {
    /// Its namespace.
    pub ns: Netns,
    /// Its IPv4 address.
    pub v4: IpAddr,
    /// Its IPv6 address.
    pub v6: IpAddr,
}

/// The standard test topology:
///
/// ```text
///  customer hosts (203.0.113.0/24, 2001:db8:c::/64)        internet hosts (198.51.100.0/24, 2001:db8:1::/64)
///   cust-N: eth0 ──veth──┐                                 ┌──veth── inet-N: eth0
///                        br-cust ─ router (forwarding) ─ br-inet
///   203.0.113.1 / 2001:db8:c::1 on br-cust    198.51.100.1 / 2001:db8:1::1 on br-inet
/// ```
///
/// Customers and internet hosts are added with [`Topology::add_customer`] and
/// [`Topology::add_internet_host`]. The router namespace is where the agent runs.
#[derive(Debug)]
pub struct Topology {
    /// Hosts on the customer side (declared before `router`, so they drop first).
    pub customers: Vec<Host>,
    /// Hosts on the internet side.
    pub internet: Vec<Host>,
    /// The router.
    pub router: Netns,
}

impl Topology {
    /// Customer IPv4 network.
    pub const CUSTOMER_V4: &'static str = "203.0.113.0/24";
    /// Customer IPv6 network.
    pub const CUSTOMER_V6: &'static str = "2001:db8:c::/64";
    /// Internet IPv4 network.
    pub const INTERNET_V4: &'static str = "198.51.100.0/24";
    /// Internet IPv6 network.
    pub const INTERNET_V6: &'static str = "2001:db8:1::/64";

    /// Builds the router with its two bridges and forwarding on.
    pub fn new() -> Result<Topology, NetnsError> {
        sweep_stale();
        let router = Netns::new("router")?;
        for (br, v4, v6) in [
            ("br-cust", "203.0.113.1/24", "2001:db8:c::1/64"),
            ("br-inet", "198.51.100.1/24", "2001:db8:1::1/64"),
        ] {
            router.run(&["ip", "link", "add", br, "type", "bridge"])?;
            router.run(&["ip", "link", "set", br, "up"])?;
            addr(&router, br, v4)?;
            addr(&router, br, v6)?;
        }
        router.sysctl("net.ipv4.ip_forward", "1")?;
        router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        Ok(Topology {
            customers: Vec::new(),
            internet: Vec::new(),
            router,
        })
    }

    fn add_host(
        &self,
        role: &str,
        bridge: &str,
        host: u16,
        v4_net: &str,
        v6_net: &str,
    ) -> Result<Host, NetnsError> {
        let ns = Netns::new(role)?;
        let port = format!("p{}-{host}", &bridge[3..]);
        veth(&ns, "eth0", &self.router, &port)?;
        self.router
            .run(&["ip", "link", "set", &port, "master", bridge])?;
        let v4 = format!("{v4_net}.{host}");
        let v6 = format!("{v6_net}::{host:x}");
        addr(&ns, "eth0", &format!("{v4}/24"))?;
        addr(&ns, "eth0", &format!("{v6}/64"))?;
        ns.run(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("{v4_net}.1"),
        ])?;
        ns.run(&[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("{v6_net}::1"),
        ])?;
        Ok(Host {
            ns,
            v4: v4.parse().expect("valid v4"),
            v6: v6.parse().expect("valid v6"),
        })
    }

    /// Adds a customer server at `203.0.113.<host>` and `2001:db8:c::<host in hex>`.
    pub fn add_customer(&mut self, host: u16) -> Result<&Host, NetnsError> {
        let h = self.add_host(
            &format!("cust{host}"),
            "br-cust",
            host,
            "203.0.113",
            "2001:db8:c",
        )?;
        self.customers.push(h);
        Ok(self.customers.last().expect("just pushed"))
    }

    /// Adds an internet host at `198.51.100.<host>` and `2001:db8:1::<host in hex>`.
    pub fn add_internet_host(&mut self, host: u16) -> Result<&Host, NetnsError> {
        let h = self.add_host(
            &format!("inet{host}"),
            "br-inet",
            host,
            "198.51.100",
            "2001:db8:1",
        )?;
        self.internet.push(h);
        Ok(self.internet.last().expect("just pushed"))
    }
}

/// Whether this process runs as root (the namespace tests and the demo need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The agent running in a namespace, its log captured line by line. Stopped on drop.
#[derive(Debug)]
pub struct Agent {
    proc: Proc,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    /// The scratch directory: policy, state database, control socket.
    pub dir: std::path::PathBuf,
    echo: bool,
}

impl Agent {
    /// Writes `policy` into `dir` and starts `exe run` inside `ns` (or in the caller's own
    /// namespace when `None`) with its state and socket in `dir`. With `echo`, every log line
    /// is also printed (for the demo).
    pub fn start(
        ns: Option<&Netns>,
        exe: &std::path::Path,
        dir: &std::path::Path,
        policy: &str,
        echo: bool,
    ) -> Result<Agent, NetnsError> {
        Agent::start_with_args(ns, exe, dir, policy, echo, &[])
    }

    /// [`Agent::start`] with more arguments to `run` (e.g. `--fresh-state`).
    pub fn start_with_args(
        ns: Option<&Netns>,
        exe: &std::path::Path,
        dir: &std::path::Path,
        policy: &str,
        echo: bool,
        extra: &[&str],
    ) -> Result<Agent, NetnsError> {
        let io = |source| NetnsError::Spawn {
            cmd: format!("write {}", dir.display()),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::write(dir.join("policy.yaml"), policy).map_err(io)?;
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = ns.command(&[]);
                c.arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.arg("run")
            .arg("--policy")
            .arg(dir.join("policy.yaml"))
            .arg("--state-dir")
            .arg(dir)
            .arg("--socket")
            .arg(dir.join("control.sock"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|source| NetnsError::Spawn {
            cmd: format!("{} run", exe.display()),
            source,
        })?;
        let mut proc = Proc::new(child);
        let (tx, lines) = std::sync::mpsc::channel();
        if let Some(stderr) = proc.child().stderr.take() {
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    if echo {
                        println!("   agent | {line}");
                    }
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Agent {
            proc,
            lines,
            seen: Vec::new(),
            dir: dir.to_owned(),
            echo,
        })
    }

    /// Waits until a log line contains every needle; returns it, or an error that quotes the
    /// log so far.
    pub fn wait_for(&mut self, needles: &[&str], limit: Duration) -> Result<String, String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if needles.iter().all(|n| l.contains(n)) {
                        return Ok(l);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no log line with {needles:?} within {limit:?}; log:\n{}",
                        self.log()
                    ));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("the agent exited; log:\n{}", self.log()));
                }
            }
        }
    }

    /// Like [`Agent::wait_for`], but a line already read counts too (several events whose
    /// lines may come in any order).
    pub fn logged(&mut self, needles: &[&str], limit: Duration) -> Result<String, String> {
        self.drain();
        if let Some(l) = self
            .seen
            .iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
        {
            return Ok(l.clone());
        }
        self.wait_for(needles, limit)
    }

    /// Reads, without waiting, every line the agent has logged so far.
    pub fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }

    /// Every log line read so far.
    pub fn log(&self) -> String {
        self.seen.join("\n")
    }

    /// Runs a CLI verb against this agent's socket (`exe VERB ARGS --socket ...`).
    pub fn cli(&self, exe: &std::path::Path, args: &[&str]) -> Output {
        let mut c = Command::new(exe);
        c.args(args)
            .arg("--socket")
            .arg(self.dir.join("control.sock"));
        c.output().unwrap_or_else(|e| Output {
            status: std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
            stdout: Vec::new(),
            stderr: e.to_string().into_bytes(),
        })
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// SIGKILL: the agent dies mid-work, nothing of its own shutdown runs.
    pub fn kill(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.kill()
    }

    /// SIGTERM, then waits; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let status = self.proc.stop(grace);
        if self.echo {
            // Let the echo thread print the last lines.
            std::thread::sleep(Duration::from_millis(50));
        }
        status
    }
}
