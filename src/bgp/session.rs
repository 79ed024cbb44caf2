//! One peer's BGP session task: outbound connects with backoff (TCP MD5 signed when the
//! policy asks), inbound connections handed over by the speaker's listener, the RFC 4271
//! state machine with connection collision detection (section 6.8), hold and keepalive
//! timers, the declarative Adj-RIB-Out (desired blocks in, UPDATE diffs out), and the
//! flowspec rules learnt from the peer.
//!
//! Every connection, outbound or inbound, first runs a *handshake* in its own task (send our
//! OPEN, wait for the peer's, check it). The first connection through it becomes the session
//! (OpenConfirm, then Established); one that completes while a session exists is a collision:
//! in OpenConfirm the BGP Identifiers decide which survives, an Established session always
//! survives, and the loser gets CEASE / Connection Collision Resolution (RFC 4486 subcode 7).

use crate::logging::error_chain;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, warn};

use super::flowspec::{self, Afi, LearnedRule};
use super::md5::{self, Password};
use super::routes::{self, RouteKey, RouteSet, RouteVal};
use super::wire::{self, Notification, PathCtx, err, msg};
use super::{LearnedKey, LearnedRules, PeerStats, SessionState};
use crate::messages::DesiredBlocks;
use crate::policy::{Family, GracefulRestart, LearnBounds, Peer};
use ipnet::IpNet;

/// At most one WARN line a minute per peer about refused flowspec rules, and one about
/// malformed flowspec NLRI.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// How long a TCP connect may take (the ConnectRetry timer).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Hold time while waiting for the peer's OPEN (RFC 4271 suggests 4 minutes).
const OPEN_HOLD: Duration = Duration::from_secs(240);
/// First retry delay; doubled after each failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest wait for the first desired set (generation 1) before End-of-RIB is sent anyway.
const FIRST_SET_WAIT: Duration = Duration::from_secs(30);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A session up this long resets the backoff (a flapping one keeps backing off).
const STABLE: Duration = Duration::from_secs(60);

/// A command to a peer task.
#[derive(Debug)]
pub(crate) enum PeerCmd {
    /// Send CEASE with this sub-code and stop.
    Stop(u8),
    /// The agent stops: close without a NOTIFICATION when graceful restart is negotiated
    /// (the peer keeps our routes), with CEASE / administrative shutdown otherwise.
    Close,
    /// An inbound connection from the peer's address, accepted by the listener.
    Inbound(TcpStream),
}

/// Everything a peer task owns.
pub(crate) struct PeerTask {
    pub local_as: u32,
    pub router_id: std::net::Ipv4Addr,
    pub peer: Peer,
    pub blocks: watch::Receiver<Arc<DesiredBlocks>>,
    pub stats: Arc<Mutex<PeerStats>>,
    pub learned: Arc<watch::Sender<Arc<LearnedRules>>>,
    pub bounds: watch::Receiver<LearnBounds>,
    /// Graceful restart to advertise.
    pub gr: watch::Receiver<GracefulRestart>,
    /// No session has been established since the agent started: the Restart State bit is
    /// set in our OPEN (RFC 4724 section 3).
    pub restarted: bool,
    pub cmd: mpsc::Receiver<PeerCmd>,
}

enum Ev {
    Cmd(Option<PeerCmd>),
    Hold,
    Tick,
    Blocks,
    Msg(Option<Incoming>),
    Handshake(Option<Attempt>),
}

enum End {
    /// Stopped on command.
    Stop,
    /// The session went down; retry.
    Reset,
    /// A colliding connection won (RFC 4271 section 6.8); continue on it.
    Replace(Opened),
}

/// What the reader task hands over.
enum Incoming {
    Msg(u8, Vec<u8>),
    Bad(Notification),
    Closed(Option<std::io::Error>),
}

/// A connection whose OPEN exchange is done: our OPEN sent, the peer's received and checked.
pub(crate) struct Opened {
    stream: TcpStream,
    open: wire::PeerOpen,
    /// We initiated it.
    outbound: bool,
}

/// Why a connection did not get through its handshake.
struct Failed {
    /// For `status`.
    error: String,
    /// The TCP connect itself failed (counted as a connect failure).
    connect: bool,
    /// We sent this NOTIFICATION.
    sent: Option<Notification>,
    /// The peer sent this NOTIFICATION.
    received: Option<Notification>,
}

impl Failed {
    fn new(error: impl Into<String>) -> Failed {
        Failed {
            error: error.into(),
            connect: false,
            sent: None,
            received: None,
        }
    }
}

/// The end of one handshake task.
struct Attempt {
    outbound: bool,
    result: Result<Opened, Failed>,
}

/// What a handshake needs to know, cloned into its task.
#[derive(Clone)]
struct HandshakeCtx {
    open: Vec<u8>,
    local_as: u32,
    router_id: std::net::Ipv4Addr,
    remote_as: u32,
    stats: Arc<Mutex<PeerStats>>,
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

    fn handshake_ctx(&self) -> HandshakeCtx {
        HandshakeCtx {
            open: {
                let gr = *self.gr.borrow();
                wire::encode_open_gr(
                    self.local_as,
                    self.peer.hold_time,
                    self.router_id,
                    &self.peer.families,
                    gr.enabled().then_some(wire::GrOffer {
                        restart_time: gr.restart_time,
                        restarted: self.restarted,
                        long_lived_stale_time: gr.long_lived_stale_time,
                    }),
                )
            },
            local_as: self.local_as,
            router_id: self.router_id,
            remote_as: self.peer.remote_as,
            stats: self.stats.clone(),
        }
    }

    /// Starts the handshake of an inbound connection.
    fn accept(&self, hs: &mut JoinSet<Attempt>, stream: TcpStream) {
        let ctx = self.handshake_ctx();
        info!(peer = %self.peer.name, remote = ?stream.peer_addr().ok(), "bgp inbound connection");
        hs.spawn(
            async move {
                Attempt {
                    outbound: false,
                    result: handshake(stream, &ctx).await,
                }
            }
            .in_current_span(),
        );
    }

    /// Starts an outbound connection and its handshake; `false` when the MD5 password
    /// cannot be read (the reason is in `status`).
    fn dial(&self, hs: &mut JoinSet<Attempt>) -> bool {
        let password = match &self.peer.md5_password_file {
            None => None,
            Some(f) => match Password::read(f) {
                Ok(p) => Some(p),
                Err(e) => {
                    warn!(peer = %self.peer.name, error = %e, "bgp session not started: TCP MD5 password unusable");
                    self.stat(|s| {
                        s.connect_failures += 1;
                        s.last_error = Some(error_chain(&e));
                    });
                    return false;
                }
            },
        };
        let ctx = self.handshake_ctx();
        let peer = self.peer.clone();
        hs.spawn(
            async move {
                let result = match connect(&peer, password.as_ref()).await {
                    Ok(s) => handshake(s, &ctx).await.map(|o| Opened {
                        outbound: true,
                        ..o
                    }),
                    Err(e) => Err(Failed {
                        connect: true,
                        ..Failed::new(e)
                    }),
                };
                Attempt {
                    outbound: true,
                    result,
                }
            }
            .in_current_span(),
        );
        true
    }

    /// Books a failed handshake.
    fn failed(&self, outbound: bool, f: &Failed) {
        debug!(peer = %self.peer.name, outbound, error = %f.error, "bgp connection attempt failed");
        self.stat(|s| {
            s.connect_failures += u64::from(f.connect);
            s.notifications_sent += u64::from(f.sent.is_some());
            s.notifications_received += u64::from(f.received.is_some());
            s.last_error = Some(f.error.clone());
        });
    }

    /// Runs until stopped.
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut hs: JoinSet<Attempt> = JoinSet::new();
        let mut outbound_in_flight = false;
        // When the next outbound attempt may start; never for a passive peer.
        let mut next_dial = (!self.peer.passive).then(tokio::time::Instant::now);
        let mut next: Option<Opened> = None;
        // The TCP MD5 password could not be read: Idle until it can.
        let mut unusable = false;
        loop {
            if let Some(o) = next.take() {
                let started = Instant::now();
                let end = self.session(o, &mut hs, &mut outbound_in_flight).await;
                match end {
                    End::Replace(o) => {
                        next = Some(o);
                        continue;
                    }
                    End::Stop => {
                        self.withdraw_learned();
                        self.set_state(SessionState::Idle);
                        return;
                    }
                    End::Reset => {
                        self.withdraw_learned();
                        self.stat(|s| s.resets += 1);
                        if started.elapsed() >= STABLE {
                            backoff = BACKOFF_MIN;
                        }
                        if !self.peer.passive {
                            next_dial = Some(tokio::time::Instant::now() + backoff);
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
            }
            self.set_state(if outbound_in_flight {
                SessionState::Connect
            } else if unusable {
                SessionState::Idle
            } else {
                SessionState::Active
            });
            let dial_at = next_dial.filter(|_| !outbound_in_flight);
            tokio::select! {
                c = self.cmd.recv() => match c {
                    Some(PeerCmd::Inbound(s)) => self.accept(&mut hs, s),
                    Some(PeerCmd::Stop(_) | PeerCmd::Close) | None => {
                        hs.shutdown().await;
                        self.set_state(SessionState::Idle);
                        return;
                    }
                },
                _ = async { tokio::time::sleep_until(dial_at.unwrap_or_else(tokio::time::Instant::now)).await }, if dial_at.is_some() => {
                    unusable = !self.dial(&mut hs);
                    if !unusable {
                        outbound_in_flight = true;
                        next_dial = None;
                    } else {
                        next_dial = Some(tokio::time::Instant::now() + backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
                a = hs.join_next(), if !hs.is_empty() => {
                    let Some(Ok(a)) = a else { continue };
                    if a.outbound {
                        outbound_in_flight = false;
                    }
                    match a.result {
                        Ok(o) => next = Some(o),
                        Err(f) => {
                            self.failed(a.outbound, &f);
                            if a.outbound {
                                next_dial = Some(tokio::time::Instant::now() + backoff);
                                backoff = (backoff * 2).min(BACKOFF_MAX);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Opens the TCP connection to `peer`, with the TCP MD5 key installed before `connect`
/// (the SYN is signed). Errors are strings for `status`.
async fn connect(peer: &Peer, password: Option<&Password>) -> Result<TcpStream, String> {
    let addr = SocketAddr::new(peer.address, peer.port);
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(p) = password {
        md5::set_key(&sock, peer.address, Some(p)).map_err(|e| error_chain(&e))?;
    }
    if let Some(local) = peer.local_address {
        sock.bind(SocketAddr::new(local, 0))
            .map_err(|e| format!("bind {local}: {e}"))?;
    }
    let s = match tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Err(_) if password.is_some() => {
            return Err("connect: timed out (TCP MD5 is configured: a password that differs from the peer's, or none on the peer, looks like this)".into());
        }
        Err(_) => return Err("connect: timed out".into()),
    };
    s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    Ok(s)
}

/// Reads one framed message from a connection not yet split.
async fn read_one(s: &mut TcpStream) -> Result<(u8, Vec<u8>), Incoming> {
    let mut h = [0u8; wire::HEADER_LEN];
    if let Err(e) = s.read_exact(&mut h).await {
        return Err(Incoming::Closed(
            (e.kind() != std::io::ErrorKind::UnexpectedEof).then_some(e),
        ));
    }
    let (kind, len) = wire::check_header(&h).map_err(Incoming::Bad)?;
    let mut m = vec![0u8; len];
    m[..wire::HEADER_LEN].copy_from_slice(&h);
    s.read_exact(&mut m[wire::HEADER_LEN..])
        .await
        .map_err(|e| Incoming::Closed(Some(e)))?;
    Ok((kind, m))
}

/// Sends `n` and closes, bounded in time.
async fn notify_stream(s: &mut TcpStream, n: &Notification) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = s.write_all(&n.encode()).await;
        let _ = s.shutdown().await;
    })
    .await;
}

/// Our OPEN out, the peer's OPEN in and checked (RFC 4271 OpenSent).
async fn handshake(mut s: TcpStream, ctx: &HandshakeCtx) -> Result<Opened, Failed> {
    tokio::time::timeout(Duration::from_secs(30), s.write_all(&ctx.open))
        .await
        .map_err(|_| Failed::new("write OPEN: timed out"))?
        .map_err(|e| Failed::new(format!("write OPEN: {e}")))?;
    if let Ok(mut st) = ctx.stats.lock()
        && matches!(
            st.state,
            SessionState::Idle | SessionState::Connect | SessionState::Active
        )
    {
        st.state = SessionState::OpenSent;
    }
    let n = match tokio::time::timeout(OPEN_HOLD, read_one(&mut s)).await {
        Err(_) => Notification::new(err::HOLD_EXPIRED, 0, []),
        Ok(Err(Incoming::Bad(n))) => n,
        Ok(Err(Incoming::Closed(Some(e)))) => {
            return Err(Failed::new(format!(
                "connection closed during OPEN exchange: {e}"
            )));
        }
        Ok(Err(_)) => {
            return Err(Failed::new(
                "connection closed by peer during OPEN exchange",
            ));
        }
        Ok(Ok((msg::OPEN, m))) => {
            match check_open(&m, ctx.remote_as, ctx.local_as, ctx.router_id) {
                Ok(open) => {
                    return Ok(Opened {
                        stream: s,
                        open,
                        outbound: false,
                    });
                }
                Err(n) => n,
            }
        }
        Ok(Ok((msg::NOTIFICATION, m))) => {
            let n = Notification::new(m[19], m[20], &m[21..]);
            warn!(notification = %n, "bgp received NOTIFICATION in OpenSent");
            return Err(Failed {
                received: Some(n.clone()),
                ..Failed::new(format!("received NOTIFICATION {n}"))
            });
        }
        // Anything but OPEN in OpenSent.
        Ok(Ok(_)) => Notification::new(err::FSM, 1, []),
    };
    warn!(notification = %n, "bgp sending NOTIFICATION in OpenSent, connection closed");
    notify_stream(&mut s, &n).await;
    Err(Failed {
        sent: Some(n.clone()),
        ..Failed::new(format!("sent NOTIFICATION {n}"))
    })
}

fn check_open(
    m: &[u8],
    remote_as: u32,
    local_as: u32,
    router_id: std::net::Ipv4Addr,
) -> Result<wire::PeerOpen, Notification> {
    let o = wire::decode_open(m)?;
    if o.asn != remote_as {
        let two = u16::try_from(o.asn).unwrap_or(wire::AS_TRANS);
        return Err(Notification::new(
            err::OPEN,
            err::OPEN_PEER_AS,
            two.to_be_bytes(),
        ));
    }
    if o.router_id == router_id && remote_as == local_as {
        return Err(Notification::new(
            err::OPEN,
            err::OPEN_BGP_ID,
            o.router_id.octets(),
        ));
    }
    Ok(o)
}

/// RFC 4271 section 6.8: of two connections in OpenConfirm, the one initiated by the speaker
/// with the higher BGP Identifier survives. Returns whether the *new* connection survives.
/// Two connections in the same direction cannot be told apart that way; the older stays.
pub(crate) fn new_connection_wins(
    local_id: std::net::Ipv4Addr,
    remote_id: std::net::Ipv4Addr,
    current_outbound: bool,
    new_outbound: bool,
) -> bool {
    if current_outbound == new_outbound {
        return false;
    }
    // The surviving connection is the one the higher identifier initiated.
    let keep_outbound = u32::from(local_id) > u32::from(remote_id);
    new_outbound == keep_outbound
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

    /// Books a collision whose losing connection (`outbound` or not) is being closed.
    fn collision(&self, outbound: bool, why: &str) -> Notification {
        info!(peer = %self.peer.name, closed = if outbound { "outbound" } else { "inbound" }, why, "bgp connection collision resolved");
        self.stat(|s| {
            s.collisions += 1;
            s.notifications_sent += 1;
        });
        Notification::new(err::CEASE, err::CEASE_COLLISION, [])
    }

    /// Closes a new connection that lost a collision with CEASE / Connection Collision
    /// Resolution.
    async fn close_collision(&self, s: &mut TcpStream, outbound: bool, why: &str) {
        let n = self.collision(outbound, why);
        notify_stream(s, &n).await;
    }

    /// Closes the current connection, which lost a collision, the same way.
    async fn close_collision_wr(&self, wr: &mut OwnedWriteHalf, outbound: bool) {
        let n = self.collision(outbound, "BGP identifier");
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = wr.write_all(&n.encode()).await;
            let _ = wr.shutdown().await;
        })
        .await;
    }

    /// One session, from OpenConfirm to its end. Connections that complete their handshake
    /// meanwhile (`hs`) are collisions and resolved here.
    async fn session(
        &mut self,
        opened: Opened,
        hs: &mut JoinSet<Attempt>,
        outbound_in_flight: &mut bool,
    ) -> End {
        let Opened {
            stream,
            open: o,
            outbound,
        } = opened;
        let (rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Incoming>(256);
        let reader = tokio::spawn(read_loop(rd, tx));
        let _guard = AbortOnDrop(reader);

        let theirs = Duration::from_secs(u64::from(o.hold_time));
        let ours = Duration::from_secs(u64::from(self.peer.hold_time));
        let hold = theirs.min(ours);
        let mut hold_deadline = tokio::time::Instant::now() + hold;
        let mut keepalive: Option<tokio::time::Interval> = (!hold.is_zero()).then(|| {
            let every = hold / 3;
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        let ctx = PathCtx {
            local_as: self.local_as,
            ibgp: self.local_as == self.peer.remote_as,
            four_octet: o.four_octet,
        };
        let families: BTreeSet<Family> = self
            .peer
            .families
            .iter()
            .copied()
            .filter(|f| o.families.contains(&wire::family_code(*f)))
            .collect();
        // Families disabled on this session (RFC 4760 section 7): each new session starts
        // with all of them enabled again.
        let mut disabled: BTreeMap<(u16, u8), &'static str> = BTreeMap::new();
        self.stat(|s| {
            s.families = families.iter().copied().collect();
            s.inbound = !outbound;
            s.disabled_families.clear();
        });
        let mut state = SessionState::OpenConfirm;
        self.set_state(state);
        // Our KEEPALIVE goes out now, before anything else can be sent (an UPDATE ahead of
        // it is an FSM error to the peer).
        if self.send(&mut wr, &wire::encode_keepalive()).await.is_err() {
            return End::Reset;
        }
        let mut sent = RouteSet::new();
        let mut eor_sent = false;
        // Graceful restart negotiated: both OPENs carry the capability (ours when enabled).
        let gr_negotiated = self.gr.borrow().enabled() && o.graceful_restart.is_some();
        // After a restart the decision task restores the holds from the state store before
        // its first desired set (generation 1). End-of-RIB for the empty generation 0 would
        // make a graceful-restart peer flush every stale route of ours: wait for the first
        // real set, at most FIRST_SET_WAIT.
        let first_set_deadline = tokio::time::Instant::now() + FIRST_SET_WAIT;

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
                let waiting_first = established && !eor_sent;
                let blocks_changed = async {
                    if !established || blocks.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                let first_set_wait = async {
                    if waiting_first {
                        tokio::time::sleep_until(first_set_deadline).await;
                    } else {
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
                let handshakes = async {
                    if hs.is_empty() {
                        std::future::pending::<()>().await;
                    }
                    hs.join_next().await.and_then(|r| r.ok())
                };
                tokio::select! {
                    c = cmd.recv() => Ev::Cmd(c),
                    _ = hold_timer => Ev::Hold,
                    _ = tick => Ev::Tick,
                    _ = blocks_changed => Ev::Blocks,
                    _ = first_set_wait => Ev::Blocks,
                    m = rx.recv() => Ev::Msg(m),
                    a = handshakes => Ev::Handshake(a),
                }
            };
            match ev {
                Ev::Cmd(Some(PeerCmd::Inbound(s))) => self.accept(hs, s),
                Ev::Cmd(Some(PeerCmd::Close)) if gr_negotiated => {
                    info!(peer = %self.peer.name, "bgp session closed without NOTIFICATION: graceful restart is negotiated, the peer keeps our routes as stale until we are back");
                    let _ = tokio::time::timeout(Duration::from_secs(2), wr.shutdown()).await;
                    hs.shutdown().await;
                    return End::Stop;
                }
                Ev::Cmd(c) => {
                    let sub = match c {
                        Some(PeerCmd::Stop(s)) => s,
                        _ => err::CEASE_SHUTDOWN,
                    };
                    self.notify(&mut wr, &Notification::new(err::CEASE, sub, []))
                        .await;
                    hs.shutdown().await;
                    return End::Stop;
                }
                Ev::Handshake(None) => {}
                Ev::Handshake(Some(Attempt {
                    outbound: new_out,
                    result,
                })) => {
                    // Our own attempt that started before this session came up has ended.
                    *outbound_in_flight &= !new_out;
                    let mut new = match result {
                        Err(f) => {
                            self.failed(new_out, &f);
                            continue;
                        }
                        Ok(new) => new,
                    };
                    if state == SessionState::Established {
                        // RFC 4271 6.8: a collision with an Established session closes the
                        // new connection.
                        self.close_collision(&mut new.stream, new_out, "session established")
                            .await;
                    } else if new_connection_wins(
                        self.router_id,
                        new.open.router_id,
                        outbound,
                        new_out,
                    ) {
                        self.close_collision_wr(&mut wr, outbound).await;
                        return End::Replace(new);
                    } else {
                        self.close_collision(&mut new.stream, new_out, "BGP identifier")
                            .await;
                    }
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
                    if !eor_sent
                        && self.blocks.borrow().generation == 0
                        && tokio::time::Instant::now() < first_set_deadline
                    {
                        debug!(peer = %self.peer.name, "bgp End-of-RIB held back until the first desired set");
                        continue;
                    }
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
                        SessionState::OpenConfirm => match kind {
                            msg::KEEPALIVE => {
                                state = SessionState::Established;
                                self.set_state(state);
                                self.restarted = false;
                                info!(peer = %self.peer.name, families = ?families, hold = hold.as_secs(), inbound = !outbound, "bgp session established");
                                self.blocks.mark_changed();
                                Ok(())
                            }
                            _ => Err(Notification::new(err::FSM, 2, [])),
                        },
                        _ => match kind {
                            msg::KEEPALIVE => Ok(()),
                            msg::UPDATE => {
                                self.stat(|s| s.updates_received += 1);
                                self.on_update(&m, ctx.four_octet, &families, &mut disabled)
                            }
                            msg::ROUTE_REFRESH => {
                                // Re-send everything we hold for the family asked for.
                                let fam =
                                    wire::family_of(u16::from_be_bytes([m[19], m[20]]), m[22]);
                                if let Some(f) = fam {
                                    sent.retain(|k, _| k.family() != f);
                                    self.blocks.mark_changed();
                                }
                                Ok(())
                            }
                            _ => Err(Notification::new(err::FSM, 3, [])),
                        },
                    };
                    if !hold.is_zero() {
                        hold_deadline = tokio::time::Instant::now() + hold;
                    }
                    if let Err(n) = step {
                        self.notify(&mut wr, &n).await;
                        return End::Reset;
                    }
                }
            }
        }
    }

    /// "AFI/SAFI disable" (RFC 4760 section 7): every rule learnt from the peer in the
    /// family leaves enforcement, and the session ignores the family's routes from now on.
    /// Only what we receive is affected: our own announcements in every family, this one
    /// included, keep going to the peer (blocks stay announced; RFC 4760 asks nothing of the
    /// sending side).
    fn disable_family(&self, f: &wire::FamilyError) {
        let name = &self.peer.name;
        let afi = (f.safi == flowspec::SAFI_FLOWSPEC)
            .then(|| Afi::from_u16(f.afi))
            .flatten();
        let mut dropped = 0;
        let mut count = 0;
        self.learned.send_if_modified(|all| {
            let before = all.len();
            if let Some(afi) = afi {
                Arc::make_mut(all).retain(|k, _| !(&k.peer == name && k.afi == afi));
            }
            dropped = before - all.len();
            count = all.keys().filter(|k| &k.peer == name).count();
            dropped > 0
        });
        warn!(peer = %name, family = %f.family(), reason = f.reason, rules_dropped = dropped, "bgp family disabled for the rest of the session: its MP_REACH_NLRI/MP_UNREACH_NLRI could not be parsed (RFC 4760 section 7); its learnt rules are dropped and its UPDATEs ignored, the other families and our announcements continue");
        self.stat(|s| {
            s.families_disabled += 1;
            s.learned = count;
            s.disabled_families.push(super::DisabledFamily {
                family: f.family(),
                reason: f.reason,
            });
        });
    }

    /// Applies a received UPDATE to the learned rules. `disabled` holds the session's
    /// disabled families, to which the UPDATE may add.
    fn on_update(
        &self,
        m: &[u8],
        four: bool,
        families: &BTreeSet<Family>,
        disabled: &mut BTreeMap<(u16, u8), &'static str>,
    ) -> Result<(), Notification> {
        let mut u = wire::decode_update(m, four)?;
        for f in &u.disabled {
            if disabled.insert((f.afi, f.safi), f.reason).is_none() {
                self.disable_family(f);
            }
        }
        if !disabled.is_empty() {
            let off = |afi: Afi| disabled.contains_key(&(afi as u16, flowspec::SAFI_FLOWSPEC));
            let before = u.flow_reach.len() + u.flow_unreach.len() + u.bad_nlri.len();
            u.flow_reach.retain(|n| !off(n.afi));
            u.flow_unreach.retain(|n| !off(n.afi));
            u.bad_nlri.retain(|n| !off(n.afi));
            let ignored = before - (u.flow_reach.len() + u.flow_unreach.len() + u.bad_nlri.len());
            if ignored > 0 {
                debug!(peer = %self.peer.name, ignored, "bgp routes of a disabled family ignored");
            }
        }
        if !u.bad_nlri.is_empty() {
            let n = u.bad_nlri.len() as u64;
            let now = Instant::now();
            let mut log = false;
            self.stat(|s| {
                s.nlri_treat_as_withdraw += n;
                log = log_due(&mut s.nlri_logged_at, now);
            });
            let b = &u.bad_nlri[0];
            let bytes: String = b.nlri.iter().map(|x| format!("{x:02x}")).collect();
            if log {
                warn!(peer = %self.peer.name, afi = ?b.afi, error = %b.error, nlri = %bytes, in_update = n, "bgp malformed flowspec NLRI treated as withdrawn, the rest of the UPDATE applied (RFC 7606, RFC 8955 section 4.2; logged at most once a minute per peer, `egressguard status` counts them)");
            } else {
                debug!(peer = %self.peer.name, afi = ?b.afi, error = %b.error, nlri = %bytes, "bgp malformed flowspec NLRI treated as withdrawn");
            }
        }
        if let Some(why) = &u.treat_as_withdraw {
            warn!(peer = %self.peer.name, reason = %why, withdrawn = u.flow_unreach.len(), "bgp UPDATE with a malformed attribute: its routes are treated as withdrawn (RFC 7606)");
            self.stat(|s| s.treat_as_withdraw += 1);
        }
        for d in &u.discarded {
            info!(peer = %self.peer.name, reason = %d, "bgp path attribute discarded (RFC 7606)");
        }
        if !u.discarded.is_empty() {
            let n = u.discarded.len() as u64;
            self.stat(|s| s.attributes_discarded += n);
        }
        if u.flow_reach.is_empty() && u.flow_unreach.is_empty() && u.bad_nlri.is_empty() {
            return Ok(());
        }
        if !self.peer.accept_flowspec {
            debug!(peer = %self.peer.name, "flowspec from a peer not accepted from; ignored");
            return Ok(());
        }
        let name = &self.peer.name;
        let bounds = self.bounds.borrow().clone();
        let mut refused: Vec<(Option<IpNet>, flowspec::Refusal)> = Vec::new();
        let mut changes: Vec<(LearnedKey, Option<LearnedRule>)> = Vec::new();
        // Treat-as-withdraw of a malformed NLRI: under the bytes it came with.
        for b in &u.bad_nlri {
            changes.push((
                LearnedKey {
                    peer: name.clone(),
                    afi: b.afi,
                    nlri: b.nlri.clone(),
                },
                None,
            ));
        }
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
            let rule = flowspec::translate(name, n, &u.ext_communities)
                .map_err(flowspec::Refusal::from)
                .and_then(|r| flowspec::admit(&r, &bounds).map(|()| r));
            match rule {
                Ok(rule) => changes.push((key, Some(rule))),
                Err(why) => {
                    refused.push((n.source(), why));
                    // A replaced rule that is refused now must not stay in force.
                    changes.push((key, None));
                }
            }
        }
        // The per-peer cap: a new rule beyond `max_learned` is refused (a replaced one keeps
        // its place). Refused rules are not kept: the peer's route refresh brings them back.
        let cap = self.peer.max_learned as usize;
        let mut added = Vec::new();
        let mut count = 0;
        self.learned.send_if_modified(|all| {
            let map = Arc::make_mut(all);
            count = map.keys().filter(|k| &k.peer == name).count();
            let mut modified = false;
            for (k, v) in changes {
                modified |= match v {
                    Some(r) => match map.get(&k) {
                        Some(old) if *old == r => false,
                        Some(_) => {
                            map.insert(k, r);
                            true
                        }
                        None if count >= cap => {
                            refused.push((Some(r.source), flowspec::Refusal::PeerCap(cap as u32)));
                            false
                        }
                        None => {
                            count += 1;
                            added.push(r.clone());
                            map.insert(k, r);
                            true
                        }
                    },
                    None => {
                        let gone = map.remove(&k).is_some();
                        count -= usize::from(gone);
                        gone
                    }
                };
            }
            modified
        });
        for r in &added {
            info!(peer = %name, source = %r.source, "bgp learned flowspec rule");
        }
        let now = Instant::now();
        let mut log = false;
        self.stat(|s| {
            s.learned = count;
            for (source, why) in &refused {
                s.refused(*source, why);
            }
            log = !refused.is_empty() && log_due(&mut s.refusal_logged_at, now);
        });
        if let Some((source, why)) = refused.first() {
            let total = self.stats.lock().map(|s| s.learned_refused).unwrap_or(0);
            if log {
                warn!(peer = %name, source = ?source, reason = %why, in_update = refused.len(), refused_total = total, "bgp flowspec rule refused (logged at most once a minute per peer; `egressguard status` counts them by reason)");
            } else {
                debug!(peer = %name, source = ?source, reason = %why, "bgp flowspec rule refused");
            }
        }
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
        // Apply latency: from the peer task seeing the new desired blocks to the UPDATEs
        // being written to the socket.
        let t0 = Instant::now();
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
                wire::flow_announce(
                    ctx,
                    *afi,
                    flowspec::traffic_rate(asn16, *rate as f32),
                    &self.peer.flowspec_communities,
                    ns,
                ),
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
        let mut took = None;
        if !out.is_empty() {
            self.send(wr, &out).await?;
            // Only route changes count (not an End-of-RIB alone).
            if !d.withdraw.is_empty() || !d.announce.is_empty() {
                took = Some(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
        }
        *sent = want;
        let n = sent.len();
        self.stat(|s| {
            s.updates_sent += updates;
            s.routes_announced = n;
            s.generation = blocks.generation;
            if let Some(us) = took {
                s.apply_latency_us = Some(us);
                s.apply_latency_sum_us = s.apply_latency_sum_us.saturating_add(us);
                s.applies += 1;
            }
        });
        *eor_sent = true;
        if !d.withdraw.is_empty() || !d.announce.is_empty() {
            info!(peer = %self.peer.name, generation = blocks.generation, announced = d.announce.len(), withdrawn = d.withdraw.len(), "bgp routes updated");
        }
        Ok(())
    }
}

/// Whether a rate-limited WARN may go out now (at most one per [`REFUSAL_LOG_EVERY`]);
/// books it in `last` when so.
fn log_due(last: &mut Option<Instant>, now: Instant) -> bool {
    let due = last.is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_EVERY);
    if due {
        *last = Some(now);
    }
    due
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

#[cfg(test)]
mod tests {
    use super::new_connection_wins;

    #[test]
    fn collision_rule_of_rfc_4271_section_6_8() {
        let low = "192.0.2.1".parse().unwrap();
        let high = "192.0.2.2".parse().unwrap();
        // We are lower: the peer-initiated (inbound) connection survives.
        assert!(new_connection_wins(low, high, true, false));
        assert!(!new_connection_wins(low, high, false, true));
        // We are higher: our own (outbound) connection survives.
        assert!(new_connection_wins(high, low, false, true));
        assert!(!new_connection_wins(high, low, true, false));
        // Identifiers compare as unsigned 32-bit numbers, not per octet sign.
        let big = "200.0.0.1".parse().unwrap();
        let small = "10.255.255.255".parse().unwrap();
        assert!(new_connection_wins(big, small, false, true));
        // Two connections in the same direction: the older stays.
        assert!(!new_connection_wins(low, high, false, false));
        assert!(!new_connection_wins(high, low, true, true));
    }
}
