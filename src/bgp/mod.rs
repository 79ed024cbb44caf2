//! BGP speaker: sessions to the policy's peers, flowspec (RFC 8955/8956) and RTBH (RFC 7999)
//! announcements computed declaratively from [`DesiredBlocks`], and the flowspec rules
//! learnt from peers that are trusted for it.
//!
//! ```text
//!  decide ──watch<Arc<DesiredBlocks>>──▶ Speaker (supervisor task)
//!                                          ├─▶ peer task "rr1" ──TCP──▶ route reflector
//!                                          └─▶ peer task "up1" ──TCP──▶ upstream
//!  peer tasks ──watch<Arc<LearnedRules>>──▶ enforcer (flowspec learnt from the fleet)
//! ```
//!
//! Learnt rules are bounded where they arrive: a peer task keeps only a plain discard of a
//! source inside the policy's networks and no wider than the block width
//! ([`flowspec::admit`] with [`Bgp::learn`](crate::policy::Bgp::learn)), at most the peer's
//! `max_learned`; every other rule is counted by reason ([`PeerStats::refused`]) and
//! dropped, so what a peer sends costs at most its cap in memory. The daemon checks them
//! again against protection and turns them into source-only drops
//! ([`DesiredBlocks::learnt`]), never announced onward.
//!
//! With `bgp.listen` set, a listener task accepts inbound connections; the supervisor hands
//! each to the task of the peer it comes from (TCP MD5 keys of the peers are installed on the
//! listening socket) and refuses and counts every other source ([`ListenerStats`]).
//!
//! Each peer task (`session`) runs the RFC 4271 state machine, computes the routes the peer
//! should hold from the latest desired blocks ([`routes`]) and sends only the difference;
//! after a reset it starts from nothing and re-announces the whole set, then End-of-RIB.
//! Messages go through [`wire`] (bgpkit-parser plus the fixes it needs, and RFC 7606 error
//! handling on receipt: treat-as-withdraw of an UPDATE or of a single flowspec NLRI,
//! attribute discard, AFI/SAFI disable of a family for the rest of the session, and session
//! reset only where nothing less will do; counted in [`PeerStats`]) and [`flowspec`]; TCP
//! MD5 keys through [`md5`], the crate's one unsafe island.
//!
//! Use from the daemon:
//!
//! ```no_run
//! # async fn f(policy: egressguard::policy::Bgp) {
//! use std::sync::Arc;
//! use egressguard::bgp::Speaker;
//! use egressguard::messages::DesiredBlocks;
//! let (tx, rx) = tokio::sync::watch::channel(Arc::new(DesiredBlocks::default()));
//! let speaker = Speaker::spawn(policy, rx);
//! let mut learned = speaker.learned(); // flowspec rules from `accept_flowspec` peers
//! // tx.send(Arc::new(new_blocks)) after every decision; speaker.stats() for `status` and
//! // metrics (per peer: collisions, treat_as_withdraw, apply_latency_us, ...);
//! // speaker.listener_stats() for the inbound listener (`bgp.listen`);
//! // speaker.update_policy(new_bgp) on reload; speaker.shutdown().await on exit.
//! # let _ = (tx, &mut learned);
//! # }
//! ```

pub mod flowspec;
pub mod md5;
pub mod routes;
mod session;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::Serialize;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{Instrument, debug, error, info, info_span, warn};

pub use flowspec::{LearnedAction, LearnedRule};

use crate::messages::DesiredBlocks;
use crate::policy::{Bgp, Family, GracefulRestart, LearnBounds, Peer};
use session::{PeerCmd, PeerTask};

/// RFC 4271 session states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Not trying (stopped, or waiting for something the build lacks).
    Idle,
    /// TCP connection being opened.
    Connect,
    /// Waiting before the next connection attempt.
    Active,
    /// OPEN sent, waiting for the peer's.
    OpenSent,
    /// OPENs exchanged, waiting for KEEPALIVE.
    OpenConfirm,
    /// Up: routes flow.
    Established,
}

/// Counters and state of one peer, for `status` and metrics.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStats {
    /// The peer's policy name.
    pub name: String,
    /// Its address.
    pub address: IpAddr,
    /// Session state.
    pub state: SessionState,
    /// Seconds the session has been established (filled in by [`SpeakerHandle::stats`]).
    pub uptime_secs: Option<u64>,
    /// When it was established.
    #[serde(skip)]
    pub established_at: Option<Instant>,
    /// Families negotiated on the current (or last) session.
    pub families: Vec<Family>,
    /// UPDATE messages sent.
    pub updates_sent: u64,
    /// UPDATE messages received.
    pub updates_received: u64,
    /// NOTIFICATIONs sent.
    pub notifications_sent: u64,
    /// NOTIFICATIONs received.
    pub notifications_received: u64,
    /// Established or opening sessions that went down.
    pub resets: u64,
    /// TCP connection attempts that failed.
    pub connect_failures: u64,
    /// Routes in the peer's Adj-RIB-Out.
    pub routes_announced: usize,
    /// Generation of the desired blocks last applied.
    pub generation: u64,
    /// Flowspec rules learnt from the peer and in force.
    pub learned: usize,
    /// Flowspec rules from the peer refused (see [`flowspec::Refusal`]).
    pub learned_refused: u64,
    /// The refusals by reason ([`flowspec::Refusal::kind`]): a fixed set of keys.
    pub learned_refused_by: BTreeMap<&'static str, u64>,
    /// The last few refusals, newest last (at most [`RECENT_REFUSALS`]).
    pub recent_refusals: VecDeque<RefusedRule>,
    /// When a refusal was last logged at WARN (at most one a minute per peer).
    #[serde(skip)]
    pub refusal_logged_at: Option<Instant>,
    /// The last error, for `status`.
    pub last_error: Option<String>,
    /// The current (or last) session was initiated by the peer (accepted by the listener).
    pub inbound: bool,
    /// Connection collisions resolved (RFC 4271 section 6.8): connections closed with CEASE
    /// subcode 7.
    pub collisions: u64,
    /// Received UPDATEs whose routes were treated as withdrawn (RFC 7606 malformed
    /// attributes) instead of resetting the session.
    pub treat_as_withdraw: u64,
    /// Malformed attributes discarded from received UPDATEs (RFC 7606 attribute discard).
    pub attributes_discarded: u64,
    /// Received flowspec NLRI that could be located but did not decode (RFC 8955 section
    /// 4.2), each treated as withdrawn alone while the rest of its UPDATE was applied.
    pub nlri_treat_as_withdraw: u64,
    /// Families disabled because an MP_REACH/MP_UNREACH hid its NLRI (RFC 4760 section 7
    /// "AFI/SAFI disable"), counted over all sessions.
    pub families_disabled: u64,
    /// The families disabled on the current session and why: their learnt rules are gone and
    /// their UPDATEs ignored until the next session. Our announcements continue.
    pub disabled_families: Vec<DisabledFamily>,
    /// When a malformed NLRI was last logged at WARN (at most one a minute per peer).
    #[serde(skip)]
    pub nlri_logged_at: Option<Instant>,
    /// Apply latency of the last change that sent UPDATEs: microseconds from the peer task
    /// seeing new desired blocks to the UPDATEs written to the socket.
    pub apply_latency_us: Option<u64>,
    /// Sum of all apply latencies in microseconds (with `applies`, a Prometheus summary).
    pub apply_latency_sum_us: u64,
    /// Changes that sent UPDATEs (the count behind `apply_latency_sum_us`).
    pub applies: u64,
}

impl PeerStats {
    fn new(p: &Peer) -> PeerStats {
        PeerStats {
            name: p.name.clone(),
            address: p.address,
            state: SessionState::Idle,
            uptime_secs: None,
            established_at: None,
            families: Vec::new(),
            updates_sent: 0,
            updates_received: 0,
            notifications_sent: 0,
            notifications_received: 0,
            resets: 0,
            connect_failures: 0,
            routes_announced: 0,
            generation: 0,
            learned: 0,
            learned_refused: 0,
            learned_refused_by: BTreeMap::new(),
            recent_refusals: VecDeque::new(),
            refusal_logged_at: None,
            last_error: None,
            inbound: false,
            collisions: 0,
            treat_as_withdraw: 0,
            attributes_discarded: 0,
            nlri_treat_as_withdraw: 0,
            families_disabled: 0,
            disabled_families: Vec::new(),
            nlri_logged_at: None,
            apply_latency_us: None,
            apply_latency_sum_us: 0,
            applies: 0,
        }
    }
}

/// A family disabled on a session (RFC 4760 section 7), as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DisabledFamily {
    /// Its policy name (`ipv4-flowspec`), or `afi A safi S`.
    pub family: String,
    /// What was wrong with the MP_REACH_NLRI / MP_UNREACH_NLRI that disabled it.
    pub reason: &'static str,
}

/// Refusals kept per peer for `status`: the memory of refused rules is this and the
/// counters, whatever the peer sends.
pub const RECENT_REFUSALS: usize = 8;

/// One refused learnt rule, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RefusedRule {
    /// The rule's source prefix, when it has one.
    pub source: Option<IpNet>,
    /// Why it is not enforced.
    pub reason: String,
}

impl PeerStats {
    /// Counts one refusal and keeps it among the recent ones.
    pub fn refused(&mut self, source: Option<IpNet>, why: &flowspec::Refusal) {
        self.learned_refused += 1;
        *self.learned_refused_by.entry(why.kind()).or_default() += 1;
        if self.recent_refusals.len() == RECENT_REFUSALS {
            self.recent_refusals.pop_front();
        }
        self.recent_refusals.push_back(RefusedRule {
            source,
            reason: why.to_string(),
        });
    }
}

/// The inbound listener's address and counters, for `status` and metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ListenerStats {
    /// The address bound (`None` when `bgp.listen` is off or binding failed).
    pub address: Option<SocketAddr>,
    /// Connections accepted and handed to a peer's session.
    pub accepted: u64,
    /// Connections refused: the source is no configured peer (or its TCP MD5 key could not
    /// be installed).
    pub refused: u64,
    /// Source of the last refused connection.
    pub last_refused: Option<IpAddr>,
    /// The last error (binding, TCP MD5 keys), for `status`.
    pub last_error: Option<String>,
}

/// Identifies a learned rule: the peer and the rule's NLRI.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LearnedKey {
    /// Peer name.
    pub peer: String,
    /// Family.
    pub afi: flowspec::Afi,
    /// The NLRI as encoded (canonical).
    pub nlri: Vec<u8>,
}

/// Every flowspec rule learnt and in force. A peer's rules leave with its session.
pub type LearnedRules = BTreeMap<LearnedKey, LearnedRule>;

enum Cmd {
    Policy(Bgp),
    Shutdown(oneshot::Sender<()>),
}

struct Running {
    policy: (u32, std::net::Ipv4Addr, Peer),
    cmd: mpsc::Sender<PeerCmd>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<Mutex<PeerStats>>,
}

/// The BGP speaker: one supervisor task and one task per peer.
pub struct Speaker;

/// Handle on a running [`Speaker`].
#[derive(Clone)]
pub struct SpeakerHandle {
    cmd: mpsc::Sender<Cmd>,
    stats: Arc<Mutex<Vec<Arc<Mutex<PeerStats>>>>>,
    listener: Arc<Mutex<ListenerStats>>,
    learned: watch::Receiver<Arc<LearnedRules>>,
}

impl Speaker {
    /// Starts the sessions of `policy` on the current tokio runtime. `blocks` carries the
    /// complete desired set; every peer follows its latest value.
    pub fn spawn(policy: Bgp, blocks: watch::Receiver<Arc<DesiredBlocks>>) -> SpeakerHandle {
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let stats = Arc::new(Mutex::new(Vec::new()));
        let (learned_tx, learned_rx) = watch::channel(Arc::new(LearnedRules::new()));
        let listener = Arc::new(Mutex::new(ListenerStats::default()));
        let (accepted_tx, accepted_rx) = mpsc::channel(16);
        let sup = Supervisor {
            blocks,
            peers: BTreeMap::new(),
            stats: stats.clone(),
            learned: Arc::new(learned_tx),
            bounds: watch::channel(LearnBounds::default()).0,
            gr: watch::channel(GracefulRestart::default()).0,
            listener: None,
            listener_stats: listener.clone(),
            accepted_tx,
            md5_installed: BTreeSet::new(),
            last_refusal_log: None,
        };
        tokio::spawn(sup.run(policy, cmd_rx, accepted_rx));
        SpeakerHandle {
            cmd: cmd_tx,
            stats,
            listener,
            learned: learned_rx,
        }
    }
}

impl SpeakerHandle {
    /// A snapshot of every peer's state and counters.
    pub fn stats(&self) -> Vec<PeerStats> {
        let list = self.stats.lock().map(|l| l.clone()).unwrap_or_default();
        list.iter()
            .filter_map(|s| s.lock().ok().map(|s| s.clone()))
            .map(|mut s| {
                s.uptime_secs = s.established_at.map(|t| t.elapsed().as_secs());
                s
            })
            .collect()
    }

    /// The inbound listener's address and counters (all zero when `bgp.listen` is off).
    pub fn listener_stats(&self) -> ListenerStats {
        self.listener.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The flowspec rules learnt from peers with `accept_flowspec`, updated as they change.
    pub fn learned(&self) -> watch::Receiver<Arc<LearnedRules>> {
        self.learned.clone()
    }

    /// Applies a reloaded policy: removed or changed peers get CEASE and (when changed) a new
    /// session; unchanged peers keep theirs.
    pub async fn update_policy(&self, policy: Bgp) {
        let _ = self.cmd.send(Cmd::Policy(policy)).await;
    }

    /// Sends CEASE (administrative shutdown) to every peer and waits for the tasks to end.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The bound listening socket and its accept task.
struct Listening {
    /// The address from the policy (what a reload compares).
    configured: SocketAddr,
    socket: Arc<TcpListener>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// At most one log line per this interval about refused inbound connections.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

struct Supervisor {
    blocks: watch::Receiver<Arc<DesiredBlocks>>,
    peers: BTreeMap<IpAddr, Running>,
    stats: Arc<Mutex<Vec<Arc<Mutex<PeerStats>>>>>,
    learned: Arc<watch::Sender<Arc<LearnedRules>>>,
    /// The bounds of learnt rules, updated on reload without resetting sessions.
    bounds: watch::Sender<LearnBounds>,
    /// Graceful restart as advertised in the next OPENs (a reload changes it without
    /// resetting sessions).
    gr: watch::Sender<GracefulRestart>,
    listener: Option<Listening>,
    listener_stats: Arc<Mutex<ListenerStats>>,
    accepted_tx: mpsc::Sender<(TcpStream, SocketAddr)>,
    /// Peers whose TCP MD5 key is on the listening socket.
    md5_installed: BTreeSet<IpAddr>,
    last_refusal_log: Option<Instant>,
}

impl Supervisor {
    async fn run(
        mut self,
        policy: Bgp,
        mut cmd: mpsc::Receiver<Cmd>,
        mut accepted: mpsc::Receiver<(TcpStream, SocketAddr)>,
    ) {
        self.apply(policy).await;
        loop {
            let c = tokio::select! {
                c = cmd.recv() => c,
                Some((s, from)) = accepted.recv() => {
                    self.inbound(s, from);
                    continue;
                }
            };
            match c {
                Some(Cmd::Policy(p)) => self.apply(p).await,
                Some(Cmd::Shutdown(done)) => {
                    self.listener = None;
                    let all: Vec<IpAddr> = self.peers.keys().copied().collect();
                    for a in all {
                        self.shutdown_peer(a).await;
                    }
                    self.publish();
                    let _ = done.send(());
                    return;
                }
                None => return,
            }
        }
    }

    fn listener_stat(&self, f: impl FnOnce(&mut ListenerStats)) {
        if let Ok(mut l) = self.listener_stats.lock() {
            f(&mut l);
        }
    }

    /// Hands an accepted connection to its peer's task, or refuses it.
    fn inbound(&mut self, s: TcpStream, from: SocketAddr) {
        let ip = from.ip().to_canonical();
        let refusal = match self.peers.get(&ip) {
            None => Some("not a configured peer"),
            Some(r)
                if r.policy.2.md5_password_file.is_some() && !self.md5_installed.contains(&ip) =>
            {
                Some("the peer's TCP MD5 key is not installed")
            }
            Some(r) => match r.cmd.try_send(PeerCmd::Inbound(s)) {
                Ok(()) => {
                    self.listener_stat(|l| l.accepted += 1);
                    return;
                }
                Err(_) => Some("the peer's session task is busy"),
            },
        };
        let why = refusal.unwrap_or_default();
        self.listener_stat(|l| {
            l.refused += 1;
            l.last_refused = Some(ip);
        });
        let now = Instant::now();
        if self
            .last_refusal_log
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_EVERY)
        {
            self.last_refusal_log = Some(now);
            let refused = self.listener_stats.lock().map(|l| l.refused).unwrap_or(0);
            warn!(from = %from, reason = why, refused_total = refused, "bgp inbound connection refused (logged at most once a minute)");
        } else {
            debug!(from = %from, reason = why, "bgp inbound connection refused");
        }
    }

    /// Binds (or keeps, or drops) the listener and installs the peers' TCP MD5 keys on it.
    fn apply_listener(&mut self, policy: &Bgp) {
        if self.listener.as_ref().map(|l| l.configured) != policy.listen {
            self.listener = None;
            self.md5_installed.clear();
            self.listener_stat(|l| *l = ListenerStats::default());
            if let Some(addr) = policy.listen {
                match bind(addr) {
                    Ok(socket) => {
                        let socket = Arc::new(socket);
                        let bound = socket.local_addr().ok();
                        info!(listen = ?bound, "bgp listening for peers");
                        let task = tokio::spawn(
                            accept_loop(socket.clone(), self.accepted_tx.clone()).in_current_span(),
                        );
                        self.listener_stat(|l| l.address = bound);
                        self.listener = Some(Listening {
                            configured: addr,
                            socket,
                            task,
                        });
                    }
                    Err(e) => {
                        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied
                            && addr.port() < 1024
                        {
                            " (a port below 1024 needs CAP_NET_BIND_SERVICE: add it to \
                             AmbientCapabilities= and CapabilityBoundingSet= with \
                             `systemctl edit egressguard`)"
                        } else {
                            ""
                        };
                        error!(listen = %addr, error = %e, hint, "bgp cannot listen; only outbound sessions run");
                        self.listener_stat(|l| {
                            l.last_error = Some(format!("listen {addr}: {e}{hint}"))
                        });
                    }
                }
            }
        }
        let Some(l) = &self.listener else { return };
        let v6_socket = l.configured.is_ipv6();
        let key_addr = |a: IpAddr| match a {
            IpAddr::V4(v4) if v6_socket => IpAddr::V6(v4.to_ipv6_mapped()),
            a => a,
        };
        let mut installed = BTreeSet::new();
        let mut errors = Vec::new();
        for p in &policy.peers {
            let Some(f) = &p.md5_password_file else {
                continue;
            };
            if v6_socket != p.address.is_ipv6() && !v6_socket {
                continue; // an IPv6 peer cannot reach an IPv4 listener
            }
            let r = md5::Password::read(f)
                .and_then(|pw| md5::set_key(&*l.socket, key_addr(p.address), Some(&pw)));
            match r {
                Ok(()) => {
                    installed.insert(p.address);
                }
                Err(e) => {
                    let msg = crate::logging::error_chain(&e);
                    warn!(peer = %p.name, error = %msg, "bgp TCP MD5 key not installed on the listener; inbound connections from the peer are refused");
                    errors.push(msg);
                }
            }
        }
        for gone in self.md5_installed.difference(&installed) {
            let _ = md5::set_key(&*l.socket, key_addr(*gone), None);
        }
        self.md5_installed = installed;
        self.listener_stat(|l| l.last_error = errors.pop());
    }

    /// Agent shutdown: a session with graceful restart negotiated closes without a
    /// NOTIFICATION (RFC 4724: a NOTIFICATION ends graceful restart, and BIRD 2.0 has no
    /// RFC 8538), so the peer keeps our routes; others get CEASE.
    async fn shutdown_peer(&mut self, addr: IpAddr) {
        if let Some(r) = self.peers.remove(&addr) {
            let _ = r.cmd.send(PeerCmd::Close).await;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), r.task).await;
        }
    }

    async fn stop(&mut self, addr: IpAddr, sub: u8) {
        if let Some(r) = self.peers.remove(&addr) {
            let _ = r.cmd.send(PeerCmd::Stop(sub)).await;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), r.task).await;
        }
    }

    fn publish(&self) {
        if let Ok(mut l) = self.stats.lock() {
            *l = self.peers.values().map(|r| r.stats.clone()).collect();
        }
    }

    async fn apply(&mut self, policy: Bgp) {
        self.bounds.send_replace(policy.learn.clone());
        self.gr.send_replace(policy.graceful_restart);
        let wanted: BTreeMap<IpAddr, (u32, std::net::Ipv4Addr, Peer)> = policy
            .peers
            .iter()
            .map(|p| (p.address, (policy.local_as, policy.router_id, p.clone())))
            .collect();
        let existing: Vec<IpAddr> = self.peers.keys().copied().collect();
        for a in existing {
            match wanted.get(&a) {
                None => {
                    info!(peer = %a, "bgp peer removed from policy");
                    self.stop(a, wire::err::CEASE_DECONFIGURED).await;
                }
                Some(w) if self.peers.get(&a).is_some_and(|r| r.policy != *w) => {
                    info!(peer = %a, "bgp peer changed in policy, restarting session");
                    // RFC 4486: Other Configuration Change.
                    self.stop(a, 6).await;
                }
                Some(_) => {}
            }
        }
        for (a, w) in wanted {
            if self.peers.contains_key(&a) {
                continue;
            }
            let (cmd_tx, cmd_rx) = mpsc::channel(8);
            let stats = Arc::new(Mutex::new(PeerStats::new(&w.2)));
            let task = PeerTask {
                local_as: w.0,
                router_id: w.1,
                peer: w.2.clone(),
                blocks: self.blocks.clone(),
                stats: stats.clone(),
                learned: self.learned.clone(),
                bounds: self.bounds.subscribe(),
                gr: self.gr.subscribe(),
                restarted: true,
                cmd: cmd_rx,
            };
            let span = info_span!("bgp", peer = %w.2.name, addr = %a);
            let handle = tokio::spawn(task.run().instrument(span));
            self.peers.insert(
                a,
                Running {
                    policy: w,
                    cmd: cmd_tx,
                    task: handle,
                    stats,
                },
            );
        }
        self.apply_listener(&policy);
        self.publish();
    }
}

/// The listening socket: address reuse (a restarted agent binds at once), backlog 64.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(64)
}

async fn accept_loop(l: Arc<TcpListener>, tx: mpsc::Sender<(TcpStream, SocketAddr)>) {
    loop {
        match l.accept().await {
            Ok((s, from)) => {
                let _ = s.set_nodelay(true);
                if tx.send((s, from)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                warn!(error = %e, "bgp accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
