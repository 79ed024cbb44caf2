//! One peer's BGP session task: connect with backoff, the RFC 4271 state machine, hold and
//! keepalive timers, the declarative Adj-RIB-Out (desired blocks in, UPDATE diffs out), and
//! the flowspec rules learnt from the peer.
//!
//! The agent only initiates connections (no listener, so no collision detection): peers are
//! configured passive or simply accept our connection.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::flowspec::{self, Afi, LearnedRule};
use super::routes::{self, RouteKey, RouteSet, RouteVal};
use super::wire::{self, Notification, PathCtx, err, msg};
use super::{LearnedKey, LearnedRules, PeerStats, SessionState};
use crate::messages::DesiredBlocks;
use crate::policy::{Family, Peer};

/// How long a TCP connect may take (the ConnectRetry timer).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Hold time while waiting for the peer's OPEN (RFC 4271 suggests 4 minutes).
const OPEN_HOLD: Duration = Duration::from_secs(240);
/// First retry delay; doubled after each failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A session up this long resets the backoff (a flapping one keeps backing off).
const STABLE: Duration = Duration::from_secs(60);

/// A command to a peer task.
#[derive(Debug)]
pub(crate) enum PeerCmd {
    /// Send CEASE with this sub-code and stop.
    Stop(u8),
}

/// Everything a peer task owns.
pub(crate) struct PeerTask {
    pub local_as: u32,
    pub router_id: std::net::Ipv4Addr,
    pub peer: Peer,
    pub blocks: watch::Receiver<Arc<DesiredBlocks>>,
    pub stats: Arc<Mutex<PeerStats>>,
    pub learned: Arc<watch::Sender<Arc<LearnedRules>>>,
    pub cmd: mpsc::Receiver<PeerCmd>,
}

enum Ev {
    Cmd(Option<PeerCmd>),
    Hold,
    Tick,
    Blocks,
    Msg(Option<Incoming>),
}

enum End {
    /// Stopped on command.
    Stop,
    /// The session went down; retry.
    Reset,
}

/// What the reader task hands over.
enum Incoming {
    Msg(u8, Vec<u8>),
    Bad(Notification),
    Closed(Option<std::io::Error>),
}

impl PeerTask {
    fn stat(&self, f: impl FnOnce(&mut PeerStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    fn set_state(&self, st: SessionState) {
        self.stat(|s| {
            if s.state != st {
                debug!(from = ?s.state, to = ?st, "bgp state");
            }
            s.state = st;
            s.established_at = (st == SessionState::Established).then(Instant::now);
        });
    }

    /// Runs until stopped.
    pub async fn run(mut self) {
        if self.peer.md5_password_file.is_some() {
            // TCP MD5 (setsockopt TCP_MD5SIG) needs unsafe code: neither nix 0.29 nor socket2
            // 0.6 wraps it. Connecting without the password would only be refused by the peer,
            // so the session stays idle and says why.
            warn!(
                peer = %self.peer.name,
                "bgp peer needs TCP MD5, which this build does not support; session stays idle"
            );
            self.stat(|s| s.last_error = Some("TCP MD5 not supported".into()));
            self.set_state(SessionState::Idle);
            let _ = self.cmd.recv().await;
            return;
        }
        let mut backoff = BACKOFF_MIN;
        loop {
            self.set_state(SessionState::Connect);
            let stream = {
                let peer = &self.peer;
                let cmd = &mut self.cmd;
                tokio::select! {
                    r = connect(peer) => Some(r),
                    _ = cmd.recv() => None,
                }
            };
            let Some(stream) = stream else {
                self.set_state(SessionState::Idle);
                return;
            };
            match stream {
                Ok(s) => {
                    let started = Instant::now();
                    let end = self.session(s).await;
                    self.withdraw_learned();
                    if let End::Stop = end {
                        self.set_state(SessionState::Idle);
                        return;
                    }
                    self.stat(|s| s.resets += 1);
                    if started.elapsed() >= STABLE {
                        backoff = BACKOFF_MIN;
                    }
                }
                Err(e) => {
                    debug!(peer = %self.peer.name, error = %e, "bgp connect failed");
                    self.stat(|s| {
                        s.connect_failures += 1;
                        s.last_error = Some(format!("connect: {e}"));
                    });
                }
            }
            self.set_state(SessionState::Active);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                c = self.cmd.recv() => { let _ = c; self.set_state(SessionState::Idle); return; }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

async fn connect(peer: &Peer) -> std::io::Result<TcpStream> {
    {
        let addr = SocketAddr::new(peer.address, peer.port);
        let sock = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(local) = peer.local_address {
            sock.bind(SocketAddr::new(local, 0))?;
        }
        let s = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        s.set_nodelay(true)?;
        Ok(s)
    }
}

impl PeerTask {
    fn withdraw_learned(&self) {
        let name = self.peer.name.clone();
        self.learned.send_if_modified(|m| {
            let before = m.len();
            Arc::make_mut(m).retain(|k, _| k.peer != name);
            before != m.len()
        });
        self.stat(|s| s.learned = 0);
    }

    async fn send(&self, wr: &mut OwnedWriteHalf, bytes: &[u8]) -> std::io::Result<()> {
        let r = write_bounded(wr, bytes, self.peer.hold_time).await;
        if let Err(e) = &r {
            warn!(peer = %self.peer.name, error = %e, "bgp write failed, session reset");
            self.stat(|s| s.last_error = Some(format!("write: {e}")));
        }
        r
    }

    async fn notify(&self, wr: &mut OwnedWriteHalf, n: &Notification) {
        warn!(peer = %self.peer.name, notification = %n, "bgp sending NOTIFICATION, session reset");
        self.stat(|s| {
            s.notifications_sent += 1;
            s.last_error = Some(format!("sent NOTIFICATION {n}"));
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = wr.write_all(&n.encode()).await;
            let _ = wr.shutdown().await;
        })
        .await;
    }

    /// One TCP connection, from OPEN to its end.
    async fn session(&mut self, stream: TcpStream) -> End {
        let (rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Incoming>(256);
        let reader = tokio::spawn(read_loop(rd, tx));
        let _guard = AbortOnDrop(reader);

        let open = wire::encode_open(
            self.local_as,
            self.peer.hold_time,
            self.router_id,
            &self.peer.families,
        );
        if self.send(&mut wr, &open).await.is_err() {
            return End::Reset;
        }
        self.set_state(SessionState::OpenSent);

        let mut hold = OPEN_HOLD;
        let mut hold_deadline = tokio::time::Instant::now() + hold;
        let mut keepalive: Option<tokio::time::Interval> = None;
        let mut ctx = PathCtx {
            local_as: self.local_as,
            ibgp: self.local_as == self.peer.remote_as,
            four_octet: false,
        };
        let mut families: BTreeSet<Family> = BTreeSet::new();
        let mut state = SessionState::OpenSent;
        let mut sent = RouteSet::new();
        let mut eor_sent = false;

        loop {
            let established = state == SessionState::Established;
            let ev = {
                let cmd = &mut self.cmd;
                let blocks = &mut self.blocks;
                let tick = async {
                    match keepalive.as_mut() {
                        Some(k) => {
                            k.tick().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                let blocks_changed = async {
                    if !established || blocks.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                let hold_timer = async {
                    if hold.is_zero() {
                        std::future::pending::<()>().await;
                    } else {
                        tokio::time::sleep_until(hold_deadline).await;
                    }
                };
                tokio::select! {
                    c = cmd.recv() => Ev::Cmd(c),
                    _ = hold_timer => Ev::Hold,
                    _ = tick => Ev::Tick,
                    _ = blocks_changed => Ev::Blocks,
                    m = rx.recv() => Ev::Msg(m),
                }
            };
            match ev {
                Ev::Cmd(c) => {
                    let sub = match c {
                        Some(PeerCmd::Stop(s)) => s,
                        None => err::CEASE_SHUTDOWN,
                    };
                    self.notify(&mut wr, &Notification::new(err::CEASE, sub, []))
                        .await;
                    return End::Stop;
                }
                Ev::Hold => {
                    self.notify(&mut wr, &Notification::new(err::HOLD_EXPIRED, 0, []))
                        .await;
                    return End::Reset;
                }
                Ev::Tick => {
                    if self.send(&mut wr, &wire::encode_keepalive()).await.is_err() {
                        return End::Reset;
                    }
                }
                Ev::Blocks => {
                    if self
                        .sync(&mut wr, &ctx, &families, &mut sent, &mut eor_sent)
                        .await
                        .is_err()
                    {
                        return End::Reset;
                    }
                }
                Ev::Msg(m) => {
                    let (kind, m) = match m {
                        Some(Incoming::Msg(k, m)) => (k, m),
                        Some(Incoming::Bad(n)) => {
                            self.notify(&mut wr, &n).await;
                            return End::Reset;
                        }
                        Some(Incoming::Closed(e)) => {
                            info!(peer = %self.peer.name, error = ?e.map(|e| e.to_string()), "bgp connection closed by peer");
                            self.stat(|s| s.last_error = Some("connection closed by peer".into()));
                            return End::Reset;
                        }
                        None => return End::Reset,
                    };
                    if kind == msg::NOTIFICATION {
                        let n = Notification::new(m[19], m[20], &m[21..]);
                        warn!(peer = %self.peer.name, notification = %n, "bgp received NOTIFICATION, session reset");
                        self.stat(|s| {
                            s.notifications_received += 1;
                            s.last_error = Some(format!("received NOTIFICATION {n}"));
                        });
                        return End::Reset;
                    }
                    let step = match state {
                        SessionState::OpenSent => match kind {
                            msg::OPEN => match self.check_open(&m) {
                                Ok(o) => {
                                    let theirs = Duration::from_secs(u64::from(o.hold_time));
                                    let ours = Duration::from_secs(u64::from(self.peer.hold_time));
                                    hold = theirs.min(ours);
                                    ctx.four_octet = o.four_octet;
                                    families = self
                                        .peer
                                        .families
                                        .iter()
                                        .copied()
                                        .filter(|f| o.families.contains(&wire::family_code(*f)))
                                        .collect();
                                    keepalive = (!hold.is_zero()).then(|| {
                                        let every = hold / 3;
                                        let mut i = tokio::time::interval_at(
                                            tokio::time::Instant::now() + every,
                                            every,
                                        );
                                        i.set_missed_tick_behavior(
                                            tokio::time::MissedTickBehavior::Delay,
                                        );
                                        i
                                    });
                                    self.stat(|s| s.families = families.iter().copied().collect());
                                    state = SessionState::OpenConfirm;
                                    self.set_state(state);
                                    // Our KEEPALIVE goes out now, before anything else can be
                                    // sent (an UPDATE ahead of it is an FSM error to the peer).
                                    Ok(Some(wire::encode_keepalive()))
                                }
                                Err(n) => Err(n),
                            },
                            _ => Err(Notification::new(err::FSM, 1, [])),
                        },
                        SessionState::OpenConfirm => match kind {
                            msg::KEEPALIVE => {
                                state = SessionState::Established;
                                self.set_state(state);
                                info!(peer = %self.peer.name, families = ?families, hold = hold.as_secs(), "bgp session established");
                                self.blocks.mark_changed();
                                Ok(None)
                            }
                            _ => Err(Notification::new(err::FSM, 2, [])),
                        },
                        _ => match kind {
                            msg::KEEPALIVE => Ok(None),
                            msg::UPDATE => {
                                self.stat(|s| s.updates_received += 1);
                                self.on_update(&m, ctx.four_octet, &families).map(|_| None)
                            }
                            msg::ROUTE_REFRESH => {
                                // Re-send everything we hold for the family asked for.
                                let fam =
                                    wire::family_of(u16::from_be_bytes([m[19], m[20]]), m[22]);
                                if let Some(f) = fam {
                                    sent.retain(|k, _| k.family() != f);
                                    self.blocks.mark_changed();
                                }
                                Ok(None)
                            }
                            _ => Err(Notification::new(err::FSM, 3, [])),
                        },
                    };
                    if !hold.is_zero() {
                        hold_deadline = tokio::time::Instant::now() + hold;
                    }
                    match step {
                        Ok(Some(bytes)) => {
                            if self.send(&mut wr, &bytes).await.is_err() {
                                return End::Reset;
                            }
                        }
                        Ok(None) => {}
                        Err(n) => {
                            self.notify(&mut wr, &n).await;
                            return End::Reset;
                        }
                    }
                }
            }
        }
    }

    fn check_open(&self, m: &[u8]) -> Result<wire::PeerOpen, Notification> {
        let o = wire::decode_open(m)?;
        if o.asn != self.peer.remote_as {
            let two = u16::try_from(o.asn).unwrap_or(wire::AS_TRANS);
            return Err(Notification::new(
                err::OPEN,
                err::OPEN_PEER_AS,
                two.to_be_bytes(),
            ));
        }
        if o.router_id == self.router_id && self.peer.remote_as == self.local_as {
            return Err(Notification::new(
                err::OPEN,
                err::OPEN_BGP_ID,
                o.router_id.octets(),
            ));
        }
        Ok(o)
    }

    /// Applies a received UPDATE to the learned rules.
    fn on_update(
        &self,
        m: &[u8],
        four: bool,
        families: &BTreeSet<Family>,
    ) -> Result<(), Notification> {
        let u = wire::decode_update(m, four)?;
        if u.flow_reach.is_empty() && u.flow_unreach.is_empty() {
            return Ok(());
        }
        if !self.peer.accept_flowspec {
            debug!(peer = %self.peer.name, "flowspec from a peer not accepted from; ignored");
            return Ok(());
        }
        let name = &self.peer.name;
        let mut refused = 0u64;
        let mut changes: Vec<(LearnedKey, Option<LearnedRule>)> = Vec::new();
        for n in &u.flow_unreach {
            if let Ok(bytes) = n.encode() {
                changes.push((
                    LearnedKey {
                        peer: name.clone(),
                        afi: n.afi,
                        nlri: bytes,
                    },
                    None,
                ));
            }
        }
        for n in &u.flow_reach {
            let fam = if n.afi == Afi::Ipv4 {
                Family::Ipv4Flowspec
            } else {
                Family::Ipv6Flowspec
            };
            if !families.contains(&fam) {
                continue;
            }
            let Ok(bytes) = n.encode() else { continue };
            let key = LearnedKey {
                peer: name.clone(),
                afi: n.afi,
                nlri: bytes,
            };
            match flowspec::translate(name, n, &u.ext_communities) {
                Ok(rule) => {
                    info!(peer = %name, source = %rule.source, proto = ?rule.proto, dports = ?rule.dports, action = ?rule.action, "bgp learned flowspec rule");
                    changes.push((key, Some(rule)));
                }
                Err(why) => {
                    warn!(peer = %name, nlri = ?n, reason = %why, "bgp flowspec rule refused: cannot be enforced exactly");
                    refused += 1;
                    // A replaced rule that no longer translates must not stay in force.
                    changes.push((key, None));
                }
            }
        }
        let mut count = 0;
        self.learned.send_if_modified(|all| {
            let map = Arc::make_mut(all);
            let mut modified = false;
            for (k, v) in changes {
                modified |= match v {
                    Some(r) => {
                        let changed = map.get(&k) != Some(&r);
                        if changed {
                            map.insert(k, r);
                        }
                        changed
                    }
                    None => map.remove(&k).is_some(),
                };
            }
            count = map.keys().filter(|k| &k.peer == name).count();
            modified
        });
        self.stat(|s| {
            s.learned = count;
            s.learned_refused += refused;
        });
        Ok(())
    }

    /// Sends the difference between what the peer holds and what the blocks ask for.
    async fn sync(
        &mut self,
        wr: &mut OwnedWriteHalf,
        ctx: &PathCtx,
        families: &BTreeSet<Family>,
        sent: &mut RouteSet,
        eor_sent: &mut bool,
    ) -> std::io::Result<()> {
        let blocks = self.blocks.borrow_and_update().clone();
        let first = !*eor_sent;
        let (want, errors) = routes::desired_routes(&self.peer, families, &blocks);
        for (target, e) in errors {
            warn!(peer = %self.peer.name, %target, error = %e, "bgp cannot encode flowspec rule for block");
        }
        let d = routes::diff(sent, &want);
        let mut out: Vec<u8> = Vec::new();
        let mut updates = 0u64;
        let mut push = |msgs: Result<Vec<Vec<u8>>, wire::WireError>, out: &mut Vec<u8>| match msgs {
            Ok(ms) => {
                for m in ms {
                    updates += 1;
                    out.extend_from_slice(&m);
                }
                true
            }
            Err(e) => {
                warn!(error = %e, "bgp cannot encode UPDATE");
                false
            }
        };
        // Withdrawals, grouped per family.
        let mut flow_w: BTreeMap<Afi, Vec<Vec<u8>>> = BTreeMap::new();
        let mut rtbh_w: BTreeMap<bool, Vec<ipnet::IpNet>> = BTreeMap::new();
        for k in &d.withdraw {
            match k {
                RouteKey::Flow(afi, n) => flow_w.entry(*afi).or_default().push(n.clone()),
                RouteKey::Rtbh(p) => rtbh_w
                    .entry(matches!(p, ipnet::IpNet::V6(_)))
                    .or_default()
                    .push(*p),
            }
        }
        for (afi, ns) in &flow_w {
            push(wire::flow_withdraw(*afi, ns), &mut out);
        }
        for ps in rtbh_w.values() {
            push(wire::rtbh_withdraw(ps), &mut out);
        }
        // Announcements, grouped by family and value.
        let mut flow_a: BTreeMap<(Afi, u32), Vec<Vec<u8>>> = BTreeMap::new();
        let mut rtbh_a: BTreeMap<IpAddr, Vec<ipnet::IpNet>> = BTreeMap::new();
        for (k, v) in &d.announce {
            match (k, v) {
                (RouteKey::Flow(afi, n), RouteVal::Flow { rate }) => {
                    flow_a.entry((*afi, *rate)).or_default().push(n.clone())
                }
                (RouteKey::Rtbh(p), RouteVal::Rtbh { next_hop }) => {
                    rtbh_a.entry(*next_hop).or_default().push(*p)
                }
                _ => {}
            }
        }
        let asn16 = u16::try_from(self.local_as).unwrap_or(0);
        for ((afi, rate), ns) in &flow_a {
            push(
                wire::flow_announce(ctx, *afi, flowspec::traffic_rate(asn16, *rate as f32), ns),
                &mut out,
            );
        }
        for (nh, ps) in &rtbh_a {
            push(
                wire::rtbh_announce(ctx, ps, *nh, &self.peer.rtbh_communities),
                &mut out,
            );
        }
        if first {
            for f in families {
                let (afi, safi) = wire::family_code(*f);
                out.extend_from_slice(&wire::end_of_rib(afi, safi));
            }
        }
        if !out.is_empty() {
            self.send(wr, &out).await?;
        }
        *sent = want;
        let n = sent.len();
        self.stat(|s| {
            s.updates_sent += updates;
            s.routes_announced = n;
            s.generation = blocks.generation;
        });
        *eor_sent = true;
        if !d.withdraw.is_empty() || !d.announce.is_empty() {
            info!(peer = %self.peer.name, generation = blocks.generation, announced = d.announce.len(), withdrawn = d.withdraw.len(), "bgp routes updated");
        }
        Ok(())
    }
}

/// Writes, but gives up after the hold time (30 s when it is 0): a peer that stops reading
/// must not wedge the session where its hold timer cannot fire.
async fn write_bounded(wr: &mut OwnedWriteHalf, bytes: &[u8], hold: u16) -> std::io::Result<()> {
    let limit = Duration::from_secs(if hold == 0 { 30 } else { u64::from(hold) });
    tokio::time::timeout(limit, wr.write_all(bytes))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "peer stopped reading"))?
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads framed messages; checks each header before reading its body.
async fn read_loop(mut rd: OwnedReadHalf, tx: mpsc::Sender<Incoming>) {
    loop {
        let mut h = [0u8; wire::HEADER_LEN];
        if let Err(e) = rd.read_exact(&mut h).await {
            let e = (e.kind() != std::io::ErrorKind::UnexpectedEof).then_some(e);
            let _ = tx.send(Incoming::Closed(e)).await;
            return;
        }
        let (kind, len) = match wire::check_header(&h) {
            Ok(x) => x,
            Err(n) => {
                let _ = tx.send(Incoming::Bad(n)).await;
                return;
            }
        };
        let mut m = vec![0u8; len];
        m[..wire::HEADER_LEN].copy_from_slice(&h);
        if let Err(e) = rd.read_exact(&mut m[wire::HEADER_LEN..]).await {
            let _ = tx.send(Incoming::Closed(Some(e))).await;
            return;
        }
        if tx.send(Incoming::Msg(kind, m)).await.is_err() {
            return;
        }
    }
}
