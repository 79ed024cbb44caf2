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
//! Each peer task ([`session`]) runs the RFC 4271 state machine, computes the routes the peer
//! should hold from the latest desired blocks ([`routes`]) and sends only the difference;
//! after a reset it starts from nothing and re-announces the whole set, then End-of-RIB.
//! Messages go through [`wire`] (bgpkit-parser plus the fixes it needs) and [`flowspec`].
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
//! // tx.send(Arc::new(new_blocks)) after every decision; speaker.stats() for `status`;
//! // speaker.update_policy(new_bgp) on reload; speaker.shutdown().await on exit.
//! # let _ = (tx, &mut learned);
//! # }
//! ```

pub mod flowspec;
pub mod routes;
mod session;
pub mod wire;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{Instrument, info, info_span};

pub use flowspec::{LearnedAction, LearnedRule};

use crate::messages::DesiredBlocks;
use crate::policy::{Bgp, Family, Peer};
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
    /// Flowspec rules from the peer refused as untranslatable.
    pub learned_refused: u64,
    /// The last error, for `status`.
    pub last_error: Option<String>,
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
            last_error: None,
        }
    }
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
    stop: mpsc::Sender<PeerCmd>,
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
    learned: watch::Receiver<Arc<LearnedRules>>,
}

impl Speaker {
    /// Starts the sessions of `policy` on the current tokio runtime. `blocks` carries the
    /// complete desired set; every peer follows its latest value.
    pub fn spawn(policy: Bgp, blocks: watch::Receiver<Arc<DesiredBlocks>>) -> SpeakerHandle {
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let stats = Arc::new(Mutex::new(Vec::new()));
        let (learned_tx, learned_rx) = watch::channel(Arc::new(LearnedRules::new()));
        let sup = Supervisor {
            blocks,
            peers: BTreeMap::new(),
            stats: stats.clone(),
            learned: Arc::new(learned_tx),
        };
        tokio::spawn(sup.run(policy, cmd_rx));
        SpeakerHandle {
            cmd: cmd_tx,
            stats,
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

struct Supervisor {
    blocks: watch::Receiver<Arc<DesiredBlocks>>,
    peers: BTreeMap<IpAddr, Running>,
    stats: Arc<Mutex<Vec<Arc<Mutex<PeerStats>>>>>,
    learned: Arc<watch::Sender<Arc<LearnedRules>>>,
}

impl Supervisor {
    async fn run(mut self, policy: Bgp, mut cmd: mpsc::Receiver<Cmd>) {
        self.apply(policy).await;
        while let Some(c) = cmd.recv().await {
            match c {
                Cmd::Policy(p) => self.apply(p).await,
                Cmd::Shutdown(done) => {
                    let all: Vec<IpAddr> = self.peers.keys().copied().collect();
                    for a in all {
                        self.stop(a, wire::err::CEASE_SHUTDOWN).await;
                    }
                    self.publish();
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    async fn stop(&mut self, addr: IpAddr, sub: u8) {
        if let Some(r) = self.peers.remove(&addr) {
            let _ = r.stop.send(PeerCmd::Stop(sub)).await;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), r.task).await;
        }
    }

    fn publish(&self) {
        if let Ok(mut l) = self.stats.lock() {
            *l = self.peers.values().map(|r| r.stats.clone()).collect();
        }
    }

    async fn apply(&mut self, policy: Bgp) {
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
            let (stop_tx, stop_rx) = mpsc::channel(1);
            let stats = Arc::new(Mutex::new(PeerStats::new(&w.2)));
            let task = PeerTask {
                local_as: w.0,
                router_id: w.1,
                peer: w.2.clone(),
                blocks: self.blocks.clone(),
                stats: stats.clone(),
                learned: self.learned.clone(),
                cmd: stop_rx,
            };
            let span = info_span!("bgp", peer = %w.2.name, addr = %a);
            let handle = tokio::spawn(task.run().instrument(span));
            self.peers.insert(
                a,
                Running {
                    policy: w,
                    stop: stop_tx,
                    task: handle,
                    stats,
                },
            );
        }
        self.publish();
    }
}
