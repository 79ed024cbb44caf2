//! The daemon: loads the policy, spawns the stages, owns the decisions, handles signals.
//!
//! Task graph (every arrow is a channel; every message type lives in `messages`):
//!
//! ```text
//!  conntrack listener (thread) ──Vec<Observation>──┐
//!  counter reader (thread) ─────Vec<Observation>──┤
//!                                                  ▼
//!                                      detect task (Engine; evaluates every
//!                                      detection.evaluation_interval)
//!                                                  │ Event::Detections
//!  signal thread (SIGHUP, SIGTERM, SIGINT) ─Event──┤
//!  control socket (a task per connection) ─Event───┤ request + oneshot reply
//!                                                  ▼
//!                                      decision task (this module: Decider, the one
//!                                      owner of every hold; expiry timer)
//!       ┌──────────────────────┬───────────────────┼────────────────────────┐
//!       ▼ DesiredBlocks        ▼ watch<DesiredBlocks>▼ Notification          ▼ watch<status>
//!  enforcer task (nft,    BGP speaker (a task    notifier task (hook,    metrics server
//!  blackhole routes,      per peer) ──learned    abuse reports)
//!  reconcile)             flowspec──▶ decision task
//! ```
//!
//! The decision task never waits on kernel I/O: the enforcer, the speaker and the notifier
//! are writer tasks fed by channels. Every decision is written to the state database before
//! it is handed to them (write-ahead, in `decide`).
//!
//! Start order: policy → state database → decisions restored → enforcement (restored blocks
//! back in the kernel before anything is observed) → BGP → notifier → observers → detect →
//! control socket and metrics → READY.
//!
//! Shutdown order, fixed: stop taking control requests → stop the observers → stop detect →
//! the decision task finishes the event in hand → the enforcer finishes its batch (blocks
//! stay in the kernel: a restart must never open a gap) → BGP sessions close with CEASE →
//! exit. Removal of the agent's table is explicit (package purge, `nft delete table`).

use crate::logging::error_chain;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::bgp::flowspec::{self, Refusal};
use crate::bgp::{LearnedRules, PeerStats, Speaker, SpeakerHandle};
use crate::cli::{Exit, RunArgs};
use crate::control::protocol::{
    AntiSpoofView, AuditView, BgpListenerView, BlockView, Body, BreakerView, DisabledFamilyView,
    HistoryView, LearntView, NetworkBreakerView, OffenseView, PeerView, ReconnectView, RefusedView,
    Reply, Request, StatusView,
};
use crate::control::protocol::{DEFAULT_PAGE, MAX_PAGE};
use crate::control::server::{self, ControlError, ControlRequest};
use crate::decide::{BlockScope, DecideError, DecideStatus, Decider, InfraSet, Protection};
use crate::detect::{Engine, EngineStats};
use crate::enforce::{EnforceError, EnforceStats, EnforceStatsReader, Enforcer, EnforcerHandle};
use crate::messages::{BlockKind, DesiredBlocks, Detection, HoldChange, Observation, Time};
use crate::notify::{BreakerNotification, Notification, Notifier};
use crate::observe::{
    ConntrackListener, CounterReader, CustomerFilter, FilterHandle, ListenerOptions, ObserveError,
    ObserveStats,
};
use crate::policy::{LearnBounds, Policy, PolicyError};
use crate::state::{AuditEntry, Change, StateError, Store, actions};

/// File name of the state database inside the state directory (`run --state-dir`).
pub const STATE_DB: &str = "state.db";

/// File descriptors the agent may need at once: the control socket's and the metrics
/// listener's connection bounds, and a reserve for its own work (the database, netlink
/// sockets, nft and notify children with their pipes, BGP sessions). The unit's
/// `LimitNOFILE=` is above it (test `unit_limit_nofile_covers_the_budget`); at start the
/// agent warns when its limit is below.
pub const FD_BUDGET: u64 = (server::MAX_CONNECTIONS + crate::metrics::MAX_CONNECTIONS) as u64 + 224;

/// The soft `RLIMIT_NOFILE` from `/proc/self/limits` (readable under `ProtectProc=`).
fn open_files_limit(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

/// Batches of observations that may wait for the detector (see where the channel is made).
const OBSERVATION_BATCHES: usize = 16;

/// What the decision task is told.
#[derive(Debug)]
pub enum Event {
    /// Re-read the policy file (SIGHUP).
    Reload,
    /// Stop (SIGTERM, SIGINT).
    Shutdown {
        /// The signal's name, for the log.
        why: &'static str,
    },
    /// A request from the control socket.
    Control(ControlRequest),
    /// Detections from the detect task.
    Detections(Vec<Detection>),
    /// A `check` preview of reconnects, its policy already read and validated off the
    /// decision task (a large policy takes a while; decisions must not wait for it).
    Preview {
        /// The candidate policy.
        policy: Box<Policy>,
        /// Where the answer goes.
        reply: tokio::sync::oneshot::Sender<Reply>,
    },
}

/// Most candidate policies read at once for previews; later ones wait their turn.
const PREVIEW_READS: usize = 2;

/// Reads a preview's candidate policy on a blocking thread (at most [`PREVIEW_READS`] at
/// once) and hands it to the decision task; an unreadable one is answered here.
async fn preview(
    req: ControlRequest,
    policy: String,
    path: String,
    reads: Arc<tokio::sync::Semaphore>,
    tx: mpsc::Sender<Event>,
) {
    let Ok(_permit) = reads.acquire_owned().await else {
        return;
    };
    let read = tokio::task::spawn_blocking(move || Policy::from_text(&policy, Path::new(&path)));
    match read.await {
        Ok(Ok(p)) => {
            let event = Event::Preview {
                policy: Box::new(p),
                reply: req.reply,
            };
            if let Err(mpsc::error::SendError(Event::Preview { reply, .. })) = tx.send(event).await
            {
                let _ = reply.send(Reply::Error {
                    error: "the agent is shutting down".into(),
                });
            }
        }
        Ok(Err(e)) => {
            let _ = req.reply.send(Reply::Error {
                error: error_chain(&e),
            });
        }
        Err(e) => {
            let _ = req.reply.send(Reply::Error {
                error: format!("the policy could not be read: {e}"),
            });
        }
    }
}

/// Errors that stop the daemon at start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The policy did not validate.
    #[error("cannot start")]
    Policy(#[source] PolicyError),
    /// The anti-spoofing thread could not start.
    #[error("cannot start the anti-spoofing thread")]
    AntiSpoof(#[source] std::io::Error),
    /// Started without CAP_NET_ADMIN (not root, no capability granted).
    #[error(
        "permission denied: `egressguard run` is the agent and needs root (or CAP_NET_ADMIN) \
         for its nft table, conntrack events and routes. The Debian package runs it as root \
         from its systemd unit: `systemctl start egressguard`. To look at a running agent as \
         a user, use `egressguard status` (members of the group `egressguard`)"
    )]
    NotPrivileged,
    /// The state directory could not be created.
    #[error("cannot create the state directory {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state database could not be opened.
    #[error("cannot start")]
    State(#[source] StateError),
    /// The decisions could not be restored.
    #[error("cannot restore the decisions")]
    Decide(#[source] DecideError),
    /// Enforcement could not start.
    #[error("cannot start enforcement")]
    Enforce(#[source] EnforceError),
    /// Observation could not start.
    #[error("cannot start observing")]
    Observe(#[source] ObserveError),
    /// The database is empty or missing while the kernel still holds addresses.
    #[error(
        "the state database {path} is empty or was missing, but the nft table `{table}` still \
         holds {held} blocked or quarantined address(es): starting now would lift every one of \
         them. Restore the database from a backup (the agent keeps it in --state-dir), or, to \
         drop those holds on purpose, start once with `egressguard run --fresh-state` (audited)"
    )]
    StateLost {
        /// The database.
        path: PathBuf,
        /// The agent's table.
        table: String,
        /// Blocked and quarantined elements in the kernel.
        held: usize,
    },
    /// The async runtime could not be built.
    #[error("cannot build the async runtime")]
    Runtime(#[source] std::io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The control socket could not be created.
    #[error("cannot start")]
    Control(#[source] ControlError),
}

/// `egressguard run`: returns when the daemon has stopped.
pub fn run(args: &RunArgs) -> Exit {
    match start(args) {
        Ok(()) => Exit::Ok,
        Err(DaemonError::Policy(e)) => {
            for d in e.diagnostics() {
                error!(diagnostic = %d.one_line(), "policy refused");
            }
            error!(file = %args.policy.display(), "cannot start: {}", first_line(&error_chain(&e)));
            Exit::InvalidPolicy
        }
        Err(e) => {
            error!("{}", error_chain(&e));
            Exit::Failure
        }
    }
}

/// The settings that differ between `old` and `new` and are read only at start (a reload
/// that changes one is refused, naming it: applying the rest would leave the agent half on
/// the old policy while the reply said "reloaded").
fn restart_only_changes(old: &Policy, new: &Policy) -> Vec<String> {
    let mut changed = Vec::new();
    if old.enforcement.table != new.enforcement.table {
        changed.push(format!(
            "enforcement.table ({} → {})",
            old.enforcement.table, new.enforcement.table
        ));
    }
    if old.metrics != new.metrics {
        let show = |m: &Option<std::net::SocketAddr>| {
            m.map_or_else(|| "off".to_owned(), |a| a.to_string())
        };
        changed.push(format!(
            "metrics.listen ({} → {})",
            show(&old.metrics),
            show(&new.metrics)
        ));
    }
    if old.detection.counter_interval != new.detection.counter_interval {
        changed.push(format!(
            "detection.counter_interval ({} → {})",
            humantime::format_duration(old.detection.counter_interval),
            humantime::format_duration(new.detection.counter_interval)
        ));
    }
    if old.bgp.is_some() != new.bgp.is_some() {
        changed.push(
            if new.bgp.is_some() {
                "bgp (section added)"
            } else {
                "bgp (section removed)"
            }
            .to_owned(),
        );
    }
    changed
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn start(args: &RunArgs) -> Result<(), DaemonError> {
    let policy = Arc::new(Policy::load(&args.policy).map_err(DaemonError::Policy)?);
    if !has_net_admin(&std::fs::read_to_string("/proc/self/status").unwrap_or_default()) {
        return Err(DaemonError::NotPrivileged);
    }
    if !args.state_dir.exists() {
        std::fs::create_dir_all(&args.state_dir).map_err(|source| DaemonError::StateDir {
            path: args.state_dir.clone(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&args.state_dir, std::fs::Permissions::from_mode(0o750));
    }
    let db = args.state_dir.join(STATE_DB);
    let mut store = Store::open(&db).map_err(DaemonError::State)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("egressguard")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    rt.block_on(guard_lost_state(args, &policy, &db, &mut store))?;
    let (tx, rx) = mpsc::channel::<Event>(256);
    let signals = spawn_signal_thread(tx.clone())?;
    let outcome = rt.block_on(serve(args, policy, store, tx, rx));
    signals.close();
    outcome?;
    info!("stopped");
    Ok(())
}

/// Whether the `CapEff` line of a `/proc/<pid>/status` text has CAP_NET_ADMIN (bit 12). An
/// unreadable status counts as privileged: the kernel still refuses what is not allowed.
fn has_net_admin(status: &str) -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_none_or(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Refuses to start on an empty database while the kernel still holds addresses (the
/// database was deleted, or the state directory is wrong): the enforcer would make the kernel
/// match the empty decisions and lift every block and termination. With `--fresh-state` the
/// operator's choice is recorded in the audit trail, which also makes the database non-empty
/// for the next start.
async fn guard_lost_state(
    args: &RunArgs,
    policy: &Policy,
    db: &Path,
    store: &mut Store,
) -> Result<(), DaemonError> {
    let empty = store.blocks().map_err(DaemonError::State)?.is_empty()
        && store.audit_len().map_err(DaemonError::State)? == 0
        && store.offense_count().map_err(DaemonError::State)? == 0;
    if !empty {
        return Ok(());
    }
    let held = match crate::enforce::held_in_kernel(policy).await {
        Ok(n) => n,
        // Enforcement's own start reports what is wrong with nft.
        Err(_) => return Ok(()),
    };
    if held == 0 {
        return Ok(());
    }
    let table = policy.enforcement.table.clone();
    if !args.fresh_state {
        return Err(DaemonError::StateLost {
            path: db.to_owned(),
            table,
            held,
        });
    }
    warn!(%table, held, "starting with a fresh state database (--fresh-state): the addresses held in the kernel are released");
    store
        .commit(&[Change::Audit(AuditEntry {
            time: Time::now(),
            actor: nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map_or_else(|| "root".into(), |u| u.name),
            action: actions::FRESH_STATE.into(),
            target: None,
            reason: format!(
                "started with --fresh-state on an empty database; {held} address(es) held in \
                 the nft table `{table}` were released"
            ),
            dry_run: !policy.enforcing(),
            detail: serde_json::json!({ "held_in_kernel": held, "table": table }),
        })])
        .map_err(DaemonError::State)
}

fn spawn_signal_thread(
    tx: mpsc::Sender<Event>,
) -> Result<signal_hook::iterator::Handle, DaemonError> {
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGTERM, SIGINT])
        .map_err(DaemonError::Signals)?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let ev = match sig {
                    SIGHUP => Event::Reload,
                    SIGTERM => Event::Shutdown { why: "SIGTERM" },
                    _ => Event::Shutdown { why: "SIGINT" },
                };
                if tx.blocking_send(ev).is_err() {
                    break;
                }
            }
        })
        .map_err(DaemonError::Signals)?;
    Ok(handle)
}

/// The addresses the agent must never block besides the allowlist: what the policy names
/// (BGP peers, walled garden) plus the router's own addresses and its resolvers; and, always
/// protected whatever the policy says, the router's next hops toward outside the customer
/// networks (from `routes`, see [`router_routes`]) and its connected IPv4 subnets' network
/// and broadcast addresses.
fn infrastructure(policy: &Policy, routes: &[(IpNet, IpAddr)]) -> InfraSet {
    InfraSet::from_policy(policy)
        .with(host_addresses().into_iter().map(IpNet::from))
        .with_always(
            InfraSet::upstream_next_hops(routes, policy)
                .into_iter()
                .chain(subnet_edges()),
        )
}

/// The router's routes as (destination, gateway), every table; empty, with a warning, when
/// they cannot be listed (the next hops are then not protected beyond the policy).
async fn router_routes() -> Vec<(IpNet, IpAddr)> {
    let listed = match crate::enforce::route::RouteWriter::connect() {
        Ok(w) => w.next_hops().await,
        Err(e) => Err(e),
    };
    listed.unwrap_or_else(|e| {
        warn!(error = %error_chain(&e), "cannot list the router's routes: its next hops are not protected from operator blocks");
        Vec::new()
    })
}

/// [`router_routes`] from synchronous code on the agent's (multi-threaded) runtime.
fn router_routes_now() -> Vec<(IpNet, IpAddr)> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(router_routes()))
}

/// The network and broadcast addresses of the router's connected IPv4 subnets (/30 and
/// wider): holding one would hit every host on the link.
fn subnet_edges() -> Vec<(IpNet, Protection)> {
    let mut out = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for a in addrs {
        let (Some(addr), Some(mask)) = (
            a.address
                .as_ref()
                .and_then(|s| s.as_sockaddr_in().map(|v| v.ip())),
            a.netmask
                .as_ref()
                .and_then(|s| s.as_sockaddr_in().map(|v| v.ip())),
        ) else {
            continue;
        };
        let len = u32::from(mask).leading_ones() as u8;
        if len > 30 || addr.is_loopback() {
            continue;
        }
        if let Ok(net) = ipnet::Ipv4Net::new(addr, len) {
            for edge in [net.network(), net.broadcast()] {
                out.push((IpNet::from(IpAddr::V4(edge)), Protection::Broadcast));
            }
        }
    }
    out
}

/// This host's own addresses: every interface address but loopback and IPv6 link-local, and
/// the resolvers of /etc/resolv.conf. (`check` warns about held widths that include them.)
pub(crate) fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(sa) = a.address else { continue };
            if let Some(v4) = sa.as_sockaddr_in() {
                out.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                let ip = v6.ip();
                if !ip.is_loopback() && (ip.segments()[0] & 0xffc0) != 0xfe80 {
                    out.push(IpAddr::V6(ip));
                }
            }
        }
    }
    if let Ok(resolv) = std::fs::read_to_string("/etc/resolv.conf") {
        for l in resolv.lines() {
            if let Some(ns) = l.trim().strip_prefix("nameserver")
                && let Ok(ip) = ns.trim().parse::<IpAddr>()
            {
                out.push(ip);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Shared counters the decision task reads for `status` and metrics.
struct Observed {
    conntrack: Arc<ObserveStats>,
    counters: Arc<ObserveStats>,
    engine: watch::Receiver<EngineStats>,
    /// Time of the last flow event (ns since epoch), 0 when none yet.
    last_event: Arc<AtomicU64>,
    /// The anti-spoofing task's counters.
    spoof: Arc<crate::antispoof::SpoofStats>,
}

async fn serve(
    args: &RunArgs,
    policy: Arc<Policy>,
    store: Store,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
) -> Result<(), DaemonError> {
    let now = Time::now();
    let infra = infrastructure(&policy, &router_routes().await);
    let mut decider =
        Decider::new(Arc::clone(&policy), store, infra, now).map_err(DaemonError::Decide)?;
    let startup = decider.take_startup_decisions();

    // Enforcement first: the blocks that should hold are back in the kernel before anything
    // else happens.
    let enforcer = Enforcer::init(Arc::clone(&policy))
        .await
        .map_err(DaemonError::Enforce)?
        .spawn();
    let (blocks_tx, blocks_rx) = watch::channel(Arc::new(DesiredBlocks::default()));
    let speaker = policy.bgp.clone().map(|b| Speaker::spawn(b, blocks_rx));
    let notifier = Notifier::spawn(policy.notify.clone());

    // Observation, then detection.
    let filter = FilterHandle::new(CustomerFilter::from_policy(&policy));
    // The queue between the observers and the detector is bounded in observations, not only
    // in batches: OBSERVATION_BATCHES × max_batch (4096) observations of ~160 B, about 10 MiB.
    // A detector that falls behind makes the kernel drop events (ENOBUFS: counted, then a
    // resync dump) instead of growing the agent's memory (1024 batches allowed ~640 MiB).
    let (obs_tx, obs_rx) = mpsc::channel::<Vec<Observation>>(OBSERVATION_BATCHES);
    let listener = ConntrackListener::open(
        Arc::clone(&filter),
        ListenerOptions::default(),
        obs_tx.clone(),
    )
    .map_err(DaemonError::Observe)?;
    let counters = CounterReader::new(policy.enforcement.table.clone(), Arc::clone(&filter))
        .spawn(policy.detection.counter_interval, obs_tx)
        .map_err(DaemonError::Observe)?;
    let (engine_tx, engine_rx) = watch::channel(EngineStats::default());
    let (policy_tx, policy_rx) = watch::channel(Arc::clone(&policy));
    let last_event = Arc::new(AtomicU64::new(0));
    // The holds restored from the state database are in force: the detector knows them from
    // the start (their counter samples are what the holds drop).
    let mut engine = Engine::new(Arc::clone(&policy));
    for h in decider.list().iter().filter(|h| !h.dry_run) {
        engine.on_hold_change(&HoldChange::Held {
            target: h.target,
            since: h.since,
            kind: h.kind,
        });
    }
    let (holds_tx, holds_rx) = mpsc::unbounded_channel::<Vec<HoldChange>>();
    let detect = tokio::spawn(detect_task(
        engine,
        holds_rx,
        obs_rx,
        policy_rx,
        tx.clone(),
        engine_tx,
        Arc::clone(&last_event),
    ));
    let observed = Observed {
        conntrack: listener.stats(),
        counters: counters.stats(),
        engine: engine_rx,
        last_event,
        spoof: Arc::new(crate::antispoof::SpoofStats::default()),
    };

    // The operator's side.
    if let Some(limit) = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .as_deref()
        .and_then(open_files_limit)
        && limit < FD_BUDGET
    {
        warn!(
            limit,
            needed = FD_BUDGET,
            "the open files limit (RLIMIT_NOFILE) is below what the agent may need: raise LimitNOFILE= of the unit"
        );
    }
    let access = server::Access::of_group(&args.socket_group);
    let listener_sock = server::bind(&args.socket, &access).map_err(DaemonError::Control)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let antispoof = crate::antispoof::spawn(
        policy_tx.subscribe(),
        tx.clone(),
        stop_rx.clone(),
        Arc::clone(&observed.spoof),
    )
    .map_err(DaemonError::AntiSpoof)?;
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ControlRequest>(16);
    let control = tokio::spawn(server::serve(
        listener_sock,
        access,
        ctl_tx,
        stop_rx.clone(),
    ));
    let forward = {
        let tx = tx.clone();
        let reads = Arc::new(tokio::sync::Semaphore::new(PREVIEW_READS));
        tokio::spawn(async move {
            while let Some(mut req) = ctl_rx.recv().await {
                if let Request::PreviewReconnects { policy, path } = &mut req.request {
                    let (policy, path) = (std::mem::take(policy), std::mem::take(path));
                    tokio::spawn(preview(req, policy, path, Arc::clone(&reads), tx.clone()));
                } else if tx.send(Event::Control(req)).await.is_err() {
                    break;
                }
            }
        })
    };
    let (status_tx, status_rx) = watch::channel(decider.status());
    let metrics = policy.metrics.map(|addr| {
        let render = metrics_render(
            status_rx.clone(),
            Arc::clone(&observed.conntrack),
            Arc::clone(&observed.counters),
            observed.engine.clone(),
            enforcer.stats_reader(),
            speaker.clone(),
            Arc::clone(notifier.stats()),
        );
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, render, stop).await {
                error!(%addr, error = %e, "metrics server failed");
            }
        })
    });
    drop(tx);

    let mut agent = Agent {
        policy_path: args.policy.clone(),
        policy,
        started: now,
        decider,
        enforcer,
        blocks_tx,
        speaker,
        notifier,
        filter,
        policy_tx,
        holds_tx,
        status_tx,
        observed,
        learned: Arc::new(LearnedRules::new()),
        learnt: BTreeMap::new(),
        generation: 0,
        router: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "router".into()),
    };
    agent.started(args, startup);
    agent.run(rx).await;

    // Shutdown, in the documented order.
    let _ = stop_tx.send(true);
    let _ = control.await;
    let _ = tokio::task::spawn_blocking(move || antispoof.join()).await;
    forward.abort();
    let _ = std::fs::remove_file(&args.socket);
    listener.stop();
    counters.stop();
    let _ = detect.await;
    agent.finish().await;
    if let Some(m) = metrics {
        let _ = m.await;
    }
    Ok(())
}

/// The detect task: feeds every observation to the engine and evaluates on the interval.
async fn detect_task(
    mut engine: Engine,
    mut holds: mpsc::UnboundedReceiver<Vec<HoldChange>>,
    mut rx: mpsc::Receiver<Vec<Observation>>,
    mut policy_rx: watch::Receiver<Arc<Policy>>,
    tx: mpsc::Sender<Event>,
    stats: watch::Sender<EngineStats>,
    last_event: Arc<AtomicU64>,
) {
    let new_tick = |p: &Policy| {
        let mut t = tokio::time::interval(p.detection.evaluation_interval);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        t
    };
    let mut tick = new_tick(engine.policy());
    let mut out: Vec<Detection> = Vec::new();
    loop {
        tokio::select! {
            // Hold changes first: the observations queued behind one are judged with it.
            biased;
            Some(changes) = holds.recv() => {
                for c in &changes {
                    engine.on_hold_change(c);
                }
            }
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                let mut last = 0;
                for o in &batch {
                    engine.observe(o);
                    if let Observation::Flow(f) = o {
                        last = last.max(f.time.as_nanos());
                    }
                }
                if last > 0 {
                    last_event.fetch_max(last, Ordering::Relaxed);
                }
                // A kernel meter reported a flood: decide now, not at the next tick.
                if engine.take_urgent() {
                    engine.evaluate_floods(Time::now(), &mut out);
                    if !out.is_empty() && tx.send(Event::Detections(std::mem::take(&mut out))).await.is_err() {
                        break;
                    }
                }
            }
            _ = tick.tick() => {
                engine.evaluate(Time::now(), &mut out);
                if !out.is_empty() && tx.send(Event::Detections(std::mem::take(&mut out))).await.is_err() {
                    break;
                }
                stats.send_replace(engine.stats());
            }
            changed = policy_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let p = Arc::clone(&policy_rx.borrow_and_update());
                if p.detection.evaluation_interval != engine.policy().detection.evaluation_interval {
                    tick = new_tick(&p);
                }
                engine.set_policy(p);
            }
        }
    }
}

/// The decision task wakes at least this often, and then takes in a step of the system clock.
const CLOCK_CHECK: Duration = Duration::from_secs(10);

/// Retry pacing for a step that keeps failing (the state database on a full disk): the pause
/// doubles from 100 ms to 30 s, and only some failures are logged (the first three, then
/// each power of two, then one every ten at the longest pause: about every five minutes).
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    /// How long to wait before the next try (zero when not failing).
    fn wait(&self) -> Duration {
        self.until
            .map(|u| u.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::ZERO)
    }

    /// Records a failure: the count, the pause before the next try, and whether to log it.
    fn failed(&mut self) -> (u32, Duration, bool) {
        self.failures = self.failures.saturating_add(1);
        let pause = Self::FIRST
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(Self::MAX);
        self.until = Some(Instant::now() + pause);
        let n = self.failures;
        let log = n <= 3
            || (pause < Self::MAX && n.is_power_of_two())
            || (pause == Self::MAX && n.is_multiple_of(10));
        (n, pause, log)
    }

    /// Records a success; the failures before it, if there were any.
    fn succeeded(&mut self) -> Option<u32> {
        self.until = None;
        let n = std::mem::take(&mut self.failures);
        (n > 0).then_some(n)
    }
}

/// The decision task: the one owner of the policy and of every decision.
struct Agent {
    policy_path: PathBuf,
    policy: Arc<Policy>,
    started: Time,
    decider: Decider,
    enforcer: EnforcerHandle,
    blocks_tx: watch::Sender<Arc<DesiredBlocks>>,
    speaker: Option<SpeakerHandle>,
    notifier: Notifier,
    filter: Arc<FilterHandle>,
    policy_tx: watch::Sender<Arc<Policy>>,
    /// Holds begun and lifted, to the detect task (it starts afresh for those sources).
    holds_tx: mpsc::UnboundedSender<Vec<HoldChange>>,
    status_tx: watch::Sender<DecideStatus>,
    observed: Observed,
    learned: Arc<LearnedRules>,
    /// The learnt rules as last submitted: enforced, or why not (for `status`, `list`).
    learnt: BTreeMap<(String, IpNet), LearntView>,
    generation: u64,
    router: String,
}

impl Agent {
    fn mode(&self) -> &'static str {
        if self.policy.enforcing() {
            "enforce"
        } else {
            "dry-run"
        }
    }

    fn started(&mut self, args: &RunArgs, startup: Vec<crate::messages::Decision>) {
        let p = &self.policy;
        info!(
            policy = %self.policy_path.display(),
            version = %p.source.digest,
            mode = self.mode(),
            networks = p.networks.len(),
            state_dir = %args.state_dir.display(),
            socket = %args.socket.display(),
            table = %p.enforcement.table,
            "started"
        );
        self.log_reconnects();
        self.publish(startup, &[]);
        sd_notify("READY=1");
    }

    async fn run(&mut self, mut rx: mpsc::Receiver<Event>) {
        let mut learned_rx = self.speaker.as_ref().map(SpeakerHandle::learned);
        let mut tick_retry = Backoff::default();
        loop {
            self.check_clock();
            let mut next = self
                .decider
                .next_timer()
                .map(|t| t.since(Time::now()).min(CLOCK_CHECK))
                .unwrap_or(CLOCK_CHECK);
            // A failed expiry (disk full) is retried after a growing pause, not at once: the
            // hold stays due, and retrying it in a loop burnt a core and flooded the log.
            next = next.max(tick_retry.wait());
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    match ev {
                        Event::Reload => {
                            let _ = self.reload();
                        }
                        Event::Shutdown { why } => {
                            info!(signal = why, "stopping");
                            sd_notify("STOPPING=1");
                            break;
                        }
                        Event::Control(req) => {
                            let reply = self.control(req.request, &req.peer.user);
                            let _ = req.reply.send(reply);
                        }
                        Event::Detections(ds) => self.detections(ds),
                        Event::Preview { policy, reply } => {
                            let reconnects = self
                                .decider
                                .preview_reconnects(&policy, Time::now())
                                .iter()
                                .map(reconnect_view)
                                .collect();
                            let _ = reply.send(Reply::Ok {
                                body: Body::Reconnects { reconnects },
                            });
                        }
                    }
                }
                _ = tokio::time::sleep(next) => {
                    // A step while sleeping must move the expiries before they are judged.
                    self.check_clock();
                    match self.decider.on_tick(Time::now()) {
                        Ok(decisions) => {
                            if let Some(failures) = tick_retry.succeeded() {
                                info!(failures, "expiry check recorded again; the held-back expiries are done");
                            }
                            self.publish(decisions, &[]);
                        }
                        Err(e) => {
                            let (failures, pause, log) = tick_retry.failed();
                            if log {
                                error!(error = %error_chain(&e), failures,
                                    retry_in_ms = pause.as_millis() as u64,
                                    "expiry check failed; nothing is lifted until it is recorded (retrying with back-off)");
                            }
                        }
                    }
                }
                changed = async {
                    match learned_rx.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match (changed, learned_rx.as_ref()) {
                        (Ok(()), Some(rx)) => {
                            self.learned = Arc::clone(&rx.borrow());
                            self.submit();
                        }
                        _ => learned_rx = None,
                    }
                }
            }
        }
    }

    fn detections(&mut self, ds: Vec<Detection>) {
        for d in &ds {
            let top = d
                .evidence
                .top_destinations
                .first()
                .map(|t| format!("{} ({})", t.key, t.count))
                .unwrap_or_default();
            let crossed: Vec<String> = d
                .evidence
                .crossed
                .iter()
                .map(|c| format!("{}={}>={}", c.signal, c.value, c.threshold))
                .collect();
            info!(
                addr = %d.source,
                category = %d.category,
                profile = %d.profile,
                crossed = %crossed.join(","),
                top_destination = %top,
                "detection"
            );
        }
        match self.decider.on_detections(&ds) {
            Ok(decisions) => self.publish(decisions, &ds),
            Err(e) => error!(error = %error_chain(&e), "detections not decided"),
        }
    }

    /// After a batch of decisions: notify, then hand the new desired state to the writers.
    /// Takes a step of the system clock into the agent's time ([`crate::time::resync`]) and
    /// moves the hold expiries with it, when there was one.
    fn check_clock(&mut self) {
        let Some(delta) = crate::time::resync() else {
            return;
        };
        warn!(
            delta_ms = delta / 1_000_000,
            "the wall clock stepped; hold expiries move with it (their remaining time is kept)"
        );
        match self.decider.clock_stepped(delta, Time::now()) {
            Ok(d) => self.publish(d, &[]),
            Err(e) => error!(error = %error_chain(&e),
                "the clock step could not be recorded; hold expiries keep their wall times"),
        }
    }

    fn publish(&mut self, decisions: Vec<crate::messages::Decision>, detections: &[Detection]) {
        let changes: Vec<HoldChange> = decisions.iter().filter_map(HoldChange::of).collect();
        if !changes.is_empty() {
            // The detect task has stopped only at shutdown.
            let _ = self.holds_tx.send(changes);
        }
        for d in decisions {
            let evidence = detections
                .iter()
                .find(|x| self.decider.target_of(x.source) == d.target)
                .map(|x| x.evidence.clone());
            self.notifier.notify(Notification {
                schema: crate::notify::SCHEMA.into(),
                router: self.router.clone(),
                policy_version: self.policy.source.digest.clone(),
                decision: d,
                evidence,
            });
        }
        for ev in self.decider.take_breaker_events() {
            self.notifier.notify_breaker(BreakerNotification {
                schema: crate::notify::SCHEMA.into(),
                router: self.router.clone(),
                policy_version: self.policy.source.digest.clone(),
                breaker: ev,
            });
        }
        self.submit();
        self.status_tx.send_replace(self.decider.status());
    }

    /// Sends the desired blocks to the enforcer and the BGP speaker.
    ///
    /// The enforcer gets the decided holds (in dry-run mode also the would-be holds, which it
    /// only logs) plus the flowspec rules learnt from the fleet that translate exactly into
    /// a source block. BGP gets only the decided, enforced holds: learnt rules are never
    /// announced back, and dry-run announces nothing.
    fn submit(&mut self) {
        self.generation += 1;
        let own = self.decider.desired();
        let mut local = own.clone();
        for (t, b) in self.decider.would_enforce().blocks {
            local.blocks.entry(t).or_insert(b);
        }
        // Learnt rules: the speaker keeps only those inside the bounds; checked again here
        // because a reload may have narrowed them, and against protection, which only the
        // decider knows (a learnt rule carries no exceptions).
        let no_bounds = LearnBounds::default();
        let bounds = self.policy.bgp.as_ref().map_or(&no_bounds, |b| &b.learn);
        let mut learnt = BTreeMap::new();
        for rule in self.learned.values() {
            let verdict = flowspec::admit(rule, bounds).and_then(|()| {
                let protected = self.decider.protection(&rule.source).is_some()
                    || !self.decider.exceptions(&rule.source).is_empty();
                if protected {
                    Err(Refusal::Protected(rule.source))
                } else {
                    Ok(())
                }
            });
            let key = (rule.peer.clone(), rule.source);
            let was = self.learnt.get(&key).map(|v| v.enforced);
            match &verdict {
                Ok(()) => {
                    local.learnt.insert(rule.source);
                }
                Err(why) if was != Some(false) => warn!(
                    peer = %rule.peer,
                    source = %rule.source,
                    reason = %why,
                    "learnt flowspec rule not enforced here"
                ),
                Err(_) => {}
            }
            learnt.insert(
                key,
                LearntView {
                    peer: rule.peer.clone(),
                    source: rule.source,
                    enforced: verdict.is_ok(),
                    refused: verdict.err().map(|e| e.to_string()),
                },
            );
        }
        self.learnt = learnt;
        local.generation = self.generation;
        self.enforcer.submit(local);
        let mut bgp = if self.policy.enforcing() {
            own
        } else {
            DesiredBlocks::default()
        };
        bgp.generation = self.generation;
        self.blocks_tx.send_replace(Arc::new(bgp));
    }

    fn log_reconnects(&self) {
        for r in &self.decider.status().last_reconnect_outcomes {
            info!(ticket = %r.ticket, addr = %r.address, outcome = %r, "reconnect authorisation checked");
        }
    }

    /// Loads the policy file again; a policy that fails validation is refused and the old one
    /// stays in force.
    fn reload(&mut self) -> Result<String, String> {
        sd_notify("RELOADING=1");
        let outcome = match Policy::load(&self.policy_path) {
            Ok(p) if !restart_only_changes(&self.policy, &p).is_empty() => {
                let changed = restart_only_changes(&self.policy, &p);
                let msg = format!(
                    "policy refused: {} cannot change while the agent runs; restart it \
                     (systemctl restart egressguard) to apply the new policy. \
                     The previous policy stays in force.",
                    changed.join(", ")
                );
                error!(
                    policy = %self.policy_path.display(),
                    kept = %self.policy.source.digest,
                    "{msg}"
                );
                Err(msg)
            }
            Ok(p) => {
                let p = Arc::new(p);
                let msg = format!(
                    "policy reloaded: version {} (was {})",
                    p.source.digest, self.policy.source.digest
                );
                info!(
                    policy = %self.policy_path.display(),
                    version = %p.source.digest,
                    previous = %self.policy.source.digest,
                    mode = if p.enforcing() { "enforce" } else { "dry-run" },
                    "policy reloaded"
                );
                self.policy = Arc::clone(&p);
                self.filter.replace(CustomerFilter::from_policy(&p));
                self.policy_tx.send_replace(Arc::clone(&p));
                self.enforcer.set_policy(Arc::clone(&p));
                self.notifier.set_config(p.notify.clone());
                if let (Some(s), Some(b)) = (&self.speaker, &p.bgp) {
                    let (s, b) = (s.clone(), b.clone());
                    tokio::spawn(async move { s.update_policy(b).await });
                }
                let now = Time::now();
                if let Err(e) = self
                    .decider
                    .set_infra(infrastructure(&p, &router_routes_now()), now)
                {
                    error!(error = %error_chain(&e), "infrastructure update not recorded");
                }
                match self.decider.on_policy(p, now) {
                    Ok(out) => {
                        self.log_reconnects();
                        self.publish(out.decisions, &[]);
                    }
                    Err(e) => {
                        error!(error = %error_chain(&e), "reconnect check after reload failed")
                    }
                }
                Ok(msg)
            }
            Err(e) => {
                for d in e.diagnostics() {
                    error!(diagnostic = %d.one_line(), "policy refused");
                }
                error!(
                    policy = %self.policy_path.display(),
                    kept = %self.policy.source.digest,
                    errors = e.diagnostics().len(),
                    "policy refused, keeping the previous policy: {}",
                    first_line(&error_chain(&e))
                );
                Err(e.to_string())
            }
        };
        sd_notify("READY=1");
        outcome
    }

    /// Answers one control request.
    fn control(&mut self, req: Request, user: &str) -> Reply {
        let done = |message: String| Reply::Ok {
            body: Body::Done { message },
        };
        let now = Time::now();
        match req {
            Request::Status => Reply::Ok {
                body: Body::Status(Box::new(self.status())),
            },
            Request::List => Reply::Ok {
                body: Body::List(
                    self.decider
                        .list()
                        .iter()
                        .map(|b| block_view(b, &self.decider))
                        .collect(),
                ),
            },
            Request::Show {
                addr,
                limit,
                offset,
            } => {
                let limit = limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
                match self.decider.history_page(addr, Some(limit), limit, offset) {
                    Ok(h) => Reply::Ok {
                        body: Body::Show(Box::new(HistoryView {
                            offenses_omitted: h
                                .offenses_total
                                .saturating_sub(h.offenses.len() as u64),
                            audit_omitted: h.audit_total.saturating_sub(h.audit.len() as u64),
                            target: h.target,
                            current: h.hold.as_ref().map(|b| block_view(b, &self.decider)),
                            offenses: h
                                .offenses
                                .iter()
                                .map(|o| OffenseView {
                                    time: o.time,
                                    number: o.number,
                                    category: o.category,
                                    decision: format!(
                                        "{}{}{}",
                                        o.kind,
                                        o.expires
                                            .map(|t| format!(" until {t}"))
                                            .unwrap_or_default(),
                                        if o.dry_run { " (dry-run)" } else { "" }
                                    ),
                                    evidence: Some(o.evidence.clone()),
                                })
                                .collect(),
                            audit: h
                                .audit
                                .iter()
                                .map(|a| AuditView {
                                    time: a.entry.time,
                                    actor: a.entry.actor.clone(),
                                    action: a.entry.action.clone(),
                                    detail: a.entry.reason.clone(),
                                })
                                .collect(),
                        })),
                    },
                    Err(e) => Reply::Error {
                        error: error_chain(&e),
                    },
                }
            }
            Request::Block {
                addr,
                reason,
                for_secs,
                outside_networks,
            } => {
                let target = addr;
                let scope = if outside_networks {
                    BlockScope::Anywhere
                } else {
                    BlockScope::Networks
                };
                match self.decider.on_operator_block_scoped(
                    target,
                    &reason,
                    Some(Duration::from_secs(for_secs)),
                    user,
                    now,
                    scope,
                ) {
                    Ok(decisions) => {
                        let msg = decisions
                            .iter()
                            .map(|d| {
                                format!(
                                    "{} {}{}{}",
                                    d.kind.map(|k| k.as_str()).unwrap_or("released"),
                                    d.target,
                                    d.expires.map(|t| format!(" until {t}")).unwrap_or_default(),
                                    if d.dry_run {
                                        " (dry-run: recorded, not enforced)"
                                    } else {
                                        ""
                                    }
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("; ");
                        self.publish(decisions, &[]);
                        done(if msg.is_empty() {
                            format!("{target} already held at least as long")
                        } else {
                            msg
                        })
                    }
                    Err(e) => Reply::Error {
                        error: error_chain(&e),
                    },
                }
            }
            Request::BreakerReset { network } => {
                match self.decider.reset_breakers(network.as_deref(), user, now) {
                    Ok(events) => {
                        self.publish(Vec::new(), &[]);
                        let reset: Vec<IpNet> = events.iter().map(|e| e.network).collect();
                        let message = if reset.is_empty() {
                            "no circuit breaker was tripped".to_owned()
                        } else {
                            format!(
                                "circuit breaker re-armed for {}",
                                reset
                                    .iter()
                                    .map(IpNet::to_string)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        };
                        Reply::Ok {
                            body: Body::BreakerReset { reset, message },
                        }
                    }
                    Err(e) => Reply::Error {
                        error: error_chain(&e),
                    },
                }
            }
            Request::Unblock { addr, ticket } => {
                match self.decider.on_operator_unblock(addr, &ticket, user, now) {
                    Ok(decisions) => {
                        let n = decisions.len();
                        self.publish(decisions, &[]);
                        done(if n == 0 {
                            format!("{addr} was not held")
                        } else {
                            format!("unblocked {addr} (ticket {ticket})")
                        })
                    }
                    Err(e) => Reply::Error {
                        error: error_chain(&e),
                    },
                }
            }
            // Read off the decision task and answered as an [`Event::Preview`].
            Request::PreviewReconnects { .. } => Reply::Error {
                error: "a reconnect preview is answered off the decision task".into(),
            },
            Request::Reload => {
                info!(user, "reload requested on the control socket");
                match self.reload() {
                    Ok(message) => done(message),
                    Err(error) => Reply::Error { error },
                }
            }
        }
    }

    fn status(&self) -> StatusView {
        let p = &self.policy;
        let d = self.decider.status();
        let ct = self.observed.conntrack.snapshot();
        let engine = self.observed.engine.borrow().clone();
        let last = self.observed.last_event.load(Ordering::Relaxed);
        let now = Time::now();
        let by = |k: BlockKind| d.blocks_by_kind.get(&k).copied().unwrap_or(0) as u64;
        let mut warnings = Vec::new();
        if ct.events_seen == 0 && now.since(self.started) > Duration::from_secs(30) {
            warnings.push(
                "no conntrack events seen since start: is traffic forwarded through this router, \
                 and is the agent's nft table in place?"
                    .to_owned(),
            );
        }
        if d.breaker.tripped {
            warnings.push(format!(
                "circuit breaker tripped: new blocks are held back ({})",
                d.breaker.reason.clone().unwrap_or_default()
            ));
        }
        let enf = self.enforcer.stats();
        if enf.errors > 0 {
            warnings.push(format!(
                "{} enforcement syncs failed since start (see the log)",
                enf.errors
            ));
        }
        if d.suspended > 0 {
            warnings.push(format!(
                "{} holds suspended because their addresses became protected (allowlist or \
                 infrastructure): not enforced, not lifted; `egressguard list` shows them, lift \
                 each with `unblock` or a reconnect, or remove the protection",
                d.suspended
            ));
        }
        if d.excepted > 0 {
            warnings.push(format!(
                "{} holds contain protected addresses (the router's own, allowlisted ones), \
                 which stay reachable: they are enforced on this router only, neither announced \
                 by BGP nor blackholed",
                d.excepted
            ));
        }
        if !p.enforcing() {
            warnings.push(
                "dry-run mode: decisions are logged, nothing is enforced or announced".into(),
            );
        }
        StatusView {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: self.mode().to_owned(),
            policy_file: self.policy_path.display().to_string(),
            policy_version: p.source.digest.clone(),
            started: self.started,
            now,
            sources_tracked: engine.tracked_sources,
            max_sources: engine.max_sources,
            source_evictions: engine.evictions,
            flows_recovered: engine.recovered_flows,
            detector_memory_bytes: engine.memory_bytes,
            meter_reports: engine.meter_hints,
            sampled_flows: engine.sampled_flows,
            events_seen: ct.events_seen,
            events_lost: ct.lost,
            last_event: (last > 0).then_some(Time(last)),
            quarantined: by(BlockKind::Quarantine),
            blocked: by(BlockKind::Block),
            terminated: by(BlockKind::Terminate),
            suspended: d.suspended as u64,
            breaker: BreakerView {
                tripped: d.breaker.tripped,
                since: d.breaker.tripped_since,
                reason: d.breaker.reason.clone(),
                held_back: d.breaker.suppressed,
                cool_down_secs: d.breaker.cool_down_secs,
                networks: d
                    .breaker
                    .networks
                    .iter()
                    .map(|n| NetworkBreakerView {
                        network: n.prefix,
                        name: n.name.clone(),
                        state: if n.tripped_since.is_some() {
                            "tripped"
                        } else {
                            "armed"
                        }
                        .into(),
                        since: n.tripped_since,
                        rearms_at: n.rearms_at,
                        reason: n.reason.clone(),
                        customer_prefix: n.customer_prefix,
                        new_last_minute: n.new_last_minute,
                        max_new_per_minute: d.breaker.max_new_blocks_per_minute,
                        active: n.active,
                        max_active: d.breaker.max_blocks_per_network,
                        suppressed: n.suppressed,
                    })
                    .collect(),
            },
            anti_spoofing: {
                let s = &self.observed.spoof;
                AntiSpoofView {
                    enabled: p.anti_spoofing.enabled,
                    bindings: s.bindings.load(Ordering::Relaxed),
                    forged_packets: s.dropped.load(Ordering::Relaxed),
                    detections: s.detections.load(Ordering::Relaxed),
                }
            },
            bgp: self
                .speaker
                .as_ref()
                .map(|s| {
                    s.stats()
                        .into_iter()
                        .map(|ps| PeerView {
                            name: ps.name,
                            address: ps.address,
                            // The serde name (`established`, `open_sent`, ...), as in the
                            // rest of the JSON.
                            state: serde_json::to_value(ps.state)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_owned))
                                .unwrap_or_else(|| format!("{:?}", ps.state)),
                            since: ps
                                .uptime_secs
                                .map(|u| now.saturating_sub(Duration::from_secs(u))),
                            announced: ps.routes_announced as u64,
                            inbound: ps.inbound,
                            last_error: ps.last_error,
                            learned: ps.learned as u64,
                            learned_refused: ps.learned_refused,
                            learned_refused_by: ps
                                .learned_refused_by
                                .iter()
                                .map(|(k, v)| ((*k).to_owned(), *v))
                                .collect(),
                            recent_refusals: ps
                                .recent_refusals
                                .iter()
                                .map(|r| RefusedView {
                                    source: r.source,
                                    reason: r.reason.clone(),
                                })
                                .collect(),
                            treat_as_withdraw: ps.treat_as_withdraw,
                            attributes_discarded: ps.attributes_discarded,
                            nlri_treat_as_withdraw: ps.nlri_treat_as_withdraw,
                            families_disabled: ps.families_disabled,
                            disabled_families: ps
                                .disabled_families
                                .iter()
                                .map(|d| DisabledFamilyView {
                                    family: d.family.clone(),
                                    reason: d.reason.to_owned(),
                                })
                                .collect(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            bgp_listener: self
                .speaker
                .as_ref()
                .filter(|_| p.bgp.as_ref().is_some_and(|b| b.listen.is_some()))
                .map(|s| {
                    let l = s.listener_stats();
                    BgpListenerView {
                        address: l.address,
                        accepted: l.accepted,
                        refused: l.refused,
                        last_error: l.last_error,
                    }
                }),
            learnt: self.learnt.values().cloned().collect(),
            reconnects: d
                .last_reconnect_outcomes
                .iter()
                .map(reconnect_view)
                .collect(),
            warnings,
        }
    }

    async fn finish(self) {
        match self.enforcer.shutdown().await {
            Ok(_) => info!("enforcement stopped; blocks stay in the kernel"),
            Err(e) => {
                warn!(error = %error_chain(&e), "enforcer stopped with an error; blocks stay in the kernel")
            }
        }
        if let Some(s) = &self.speaker {
            s.shutdown().await;
        }
    }
}

fn block_view(b: &crate::state::BlockRecord, decider: &Decider) -> BlockView {
    BlockView {
        target: b.target,
        kind: b.kind,
        category: b.category,
        reason: b.reason.clone(),
        since: b.since,
        until: b.expires,
        offense: b.offense,
        dry_run: b.dry_run,
        suspended: decider.suspension(&b.target).map(|p| p.to_string()),
    }
}

/// The metrics document: every stage's counters.
fn metrics_render(
    status: watch::Receiver<DecideStatus>,
    conntrack: Arc<ObserveStats>,
    counters: Arc<ObserveStats>,
    engine: watch::Receiver<EngineStats>,
    enforcer: EnforceStatsReader,
    speaker: Option<SpeakerHandle>,
    notify: Arc<crate::notify::NotifyStats>,
) -> crate::metrics::Render {
    Arc::new(move || {
        let mut e = crate::metrics::Exposition::default();
        let ct = conntrack.snapshot();
        let cs = counters.snapshot();
        e.counter(
            "egressguard_events_seen_total",
            "Conntrack flow messages received.",
            ct.events_seen,
        );
        e.counter(
            "egressguard_events_kept_total",
            "Flow messages from customer sources.",
            ct.events_kept,
        );
        e.counter(
            "egressguard_events_lost_total",
            "Times the kernel dropped conntrack events (ENOBUFS).",
            ct.lost,
        );
        e.counter(
            "egressguard_parse_errors_total",
            "Malformed conntrack messages.",
            ct.parse_errors,
        );
        e.counter(
            "egressguard_resync_dumps_total",
            "Conntrack table dumps taken.",
            ct.dumps,
        );
        e.counter(
            "egressguard_counter_reads_total",
            "nft counter reads that succeeded.",
            cs.counter_reads,
        );
        e.counter(
            "egressguard_counter_errors_total",
            "nft counter reads that failed.",
            cs.counter_errors,
        );
        let en = engine.borrow().clone();
        e.gauge(
            "egressguard_sources_tracked",
            "Customer sources the detector tracks.",
            en.tracked_sources as f64,
        );
        e.counter(
            "egressguard_source_evictions_total",
            "Sources evicted at the cap.",
            en.evictions,
        );
        e.gauge(
            "egressguard_detector_memory_bytes",
            "Bytes held by the detector's tables (slab, index, sample ring).",
            en.memory_bytes as f64,
        );
        e.counter(
            "egressguard_meter_reports_total",
            "Flow events carrying a kernel flood meter's label (a source above a flood threshold).",
            en.meter_hints,
        );
        e.counter(
            "egressguard_sampled_flows_total",
            "New flows reported as one of 16 by the kernel's sampling of a fast source.",
            en.sampled_flows,
        );
        let by_cat: Vec<(String, f64)> = en
            .detections_by_category
            .iter()
            .map(|(c, n)| (c.as_str().to_owned(), *n as f64))
            .collect();
        let by_cat: Vec<(&str, f64)> = by_cat.iter().map(|(c, n)| (c.as_str(), *n)).collect();
        e.family(
            "egressguard_detections_total",
            "Detections by category.",
            "counter",
            "category",
            &by_cat,
        );
        let st = status.borrow().clone();
        let kinds: Vec<(&str, f64)> = [
            BlockKind::Quarantine,
            BlockKind::Block,
            BlockKind::Terminate,
        ]
        .iter()
        .map(|k| {
            (
                k.as_str(),
                st.blocks_by_kind.get(k).copied().unwrap_or(0) as f64,
            )
        })
        .collect();
        e.family(
            "egressguard_active_blocks",
            "Active holds by kind.",
            "gauge",
            "kind",
            &kinds,
        );
        let c = &st.counters;
        let decisions = [
            ("offense", c.offenses as f64),
            ("expired", c.expired as f64),
            ("reconnect", c.reconnects_applied as f64),
            ("operator_block", c.operator_blocks as f64),
            ("operator_unblock", c.operator_unblocks as f64),
            ("suppressed", c.suppressed as f64),
        ];
        e.family(
            "egressguard_decisions_total",
            "Decisions by kind.",
            "counter",
            "kind",
            &decisions,
        );
        e.counter(
            "egressguard_breaker_trips_total",
            "Circuit breaker trips.",
            c.breaker_trips,
        );
        e.gauge(
            "egressguard_breaker_tripped",
            "1 while any network entry's circuit breaker holds new blocks back.",
            f64::from(u8::from(st.breaker.tripped)),
        );
        let names: Vec<String> = st
            .breaker
            .networks
            .iter()
            .map(|n| n.prefix.to_string())
            .collect();
        let per: Vec<(&str, f64)> = names
            .iter()
            .zip(&st.breaker.networks)
            .map(|(name, n)| {
                (
                    name.as_str(),
                    f64::from(u8::from(n.tripped_since.is_some())),
                )
            })
            .collect();
        e.family(
            "egressguard_breaker_network_tripped",
            "1 while this network entry's circuit breaker holds its new blocks back.",
            "gauge",
            "network",
            &per,
        );
        let en: EnforceStats = enforcer.snapshot();
        e.counter(
            "egressguard_enforce_applies_total",
            "nft/route transactions applied.",
            en.applies,
        );
        e.counter(
            "egressguard_enforce_repairs_total",
            "Drift repairs.",
            en.repairs,
        );
        e.counter(
            "egressguard_enforce_errors_total",
            "Failed enforcement syncs.",
            en.errors,
        );
        e.gauge(
            "egressguard_enforce_last_apply_seconds",
            "Duration of the last applied sync.",
            en.last_apply_us as f64 / 1e6,
        );
        for (name, help, us) in [
            (
                "egressguard_enforce_last_nft_seconds",
                "The last `nft -j -f` transaction (table structure, or elements on fallback).",
                en.last_nft_us,
            ),
            (
                "egressguard_enforce_last_netlink_seconds",
                "The last nfnetlink element batch (send, kernel commit, acks).",
                en.last_netlink_us,
            ),
            (
                "egressguard_enforce_last_route_seconds",
                "The last blackhole route change (rtnetlink).",
                en.last_route_apply_us,
            ),
        ] {
            e.gauge(name, help, us as f64 / 1e6);
        }
        e.counter(
            "egressguard_enforce_fast_path_fallbacks_total",
            "Element changes sent through nft because the netlink batch could not be used.",
            en.fast_path_fallbacks,
        );
        if let Some(s) = &speaker {
            let peers = s.stats();
            type PeerMetric = (
                &'static str,
                &'static str,
                &'static str,
                fn(&PeerStats) -> f64,
            );
            let per_peer: [PeerMetric; 11] = [
                (
                    "egressguard_bgp_session_up",
                    "1 when the BGP session is established.",
                    "gauge",
                    |p| f64::from(u8::from(p.state == crate::bgp::SessionState::Established)),
                ),
                (
                    "egressguard_bgp_routes_announced",
                    "Routes announced to the peer.",
                    "gauge",
                    |p| p.routes_announced as f64,
                ),
                (
                    "egressguard_bgp_session_resets_total",
                    "Sessions that went down.",
                    "counter",
                    |p| p.resets as f64,
                ),
                (
                    "egressguard_bgp_collisions_total",
                    "Connection collisions resolved (RFC 4271 6.8).",
                    "counter",
                    |p| p.collisions as f64,
                ),
                (
                    "egressguard_bgp_treat_as_withdraw_total",
                    "Received UPDATEs treated as withdraw (RFC 7606).",
                    "counter",
                    |p| p.treat_as_withdraw as f64,
                ),
                (
                    "egressguard_bgp_attributes_discarded_total",
                    "Malformed attributes discarded (RFC 7606).",
                    "counter",
                    |p| p.attributes_discarded as f64,
                ),
                (
                    "egressguard_bgp_nlri_treat_as_withdraw_total",
                    "Malformed flowspec NLRI treated as withdrawn alone, the rest of their UPDATE applied (RFC 8955 4.2, RFC 7606).",
                    "counter",
                    |p| p.nlri_treat_as_withdraw as f64,
                ),
                (
                    "egressguard_bgp_families_disabled_total",
                    "Families disabled because an MP_REACH/MP_UNREACH hid its NLRI (RFC 4760 7 AFI/SAFI disable).",
                    "counter",
                    |p| p.families_disabled as f64,
                ),
                (
                    "egressguard_bgp_families_disabled",
                    "Families disabled on the current session (their UPDATEs ignored until the session restarts).",
                    "gauge",
                    |p| p.disabled_families.len() as f64,
                ),
                (
                    "egressguard_bgp_flowspec_learned",
                    "Flowspec rules learnt from the peer and kept (at most its max_learned).",
                    "gauge",
                    |p| p.learned as f64,
                ),
                (
                    "egressguard_bgp_flowspec_refused_total",
                    "Flowspec rules from the peer refused: outside the networks, too wide, not a plain source discard, over max_learned, untranslatable.",
                    "counter",
                    |p| p.learned_refused as f64,
                ),
            ];
            for (name, help, kind, value) in per_peer {
                let series: Vec<(&str, f64)> =
                    peers.iter().map(|p| (p.name.as_str(), value(p))).collect();
                e.family(name, help, kind, "peer", &series);
            }
            let apply: Vec<(&str, f64, u64)> = peers
                .iter()
                .map(|p| {
                    (
                        p.name.as_str(),
                        p.apply_latency_sum_us as f64 / 1e6,
                        p.applies,
                    )
                })
                .collect();
            e.summary_family(
                "egressguard_bgp_apply_seconds",
                "Time from new desired blocks to the peer's UPDATEs written to the socket.",
                "peer",
                &apply,
            );
            let l = s.listener_stats();
            e.counter(
                "egressguard_bgp_inbound_accepted_total",
                "Inbound BGP connections accepted from configured peers.",
                l.accepted,
            );
            e.counter(
                "egressguard_bgp_inbound_refused_total",
                "Inbound BGP connections refused (not a configured peer).",
                l.refused,
            );
        }
        e.counter(
            "egressguard_notify_sent_total",
            "Notify hook runs that succeeded.",
            notify.sent.load(Ordering::Relaxed),
        );
        e.counter(
            "egressguard_notify_failed_total",
            "Notifications whose every attempt failed.",
            notify.failed.load(Ordering::Relaxed),
        );
        e.counter(
            "egressguard_notify_dropped_total",
            "Notifications dropped (queue full).",
            notify.dropped.load(Ordering::Relaxed),
        );
        e.finish()
    })
}

/// Tells systemd about our state when it started us with `Type=notify`; does nothing otherwise.
pub fn sd_notify(state: &str) {
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let _ = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
}

/// A reconnect outcome for `status` and `check`: `applied`, or `refused: <why>`.
fn reconnect_view(r: &crate::decide::ReconnectOutcome) -> ReconnectView {
    ReconnectView {
        ticket: r.ticket.clone(),
        address: r.address,
        outcome: match &r.result {
            crate::decide::ReconnectResult::Applied => "applied".to_owned(),
            crate::decide::ReconnectResult::Refused(why) => format!("refused: {why}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::{FD_BUDGET, has_net_admin, open_files_limit};

    #[test]
    fn unit_limit_nofile_covers_the_budget() {
        let unit = include_str!("../packaging/deb/egressguard.service");
        let limit: u64 = unit
            .lines()
            .find_map(|l| l.strip_prefix("LimitNOFILE="))
            .expect("the unit sets LimitNOFILE=")
            .trim()
            .parse()
            .unwrap();
        assert!(
            limit >= 2 * FD_BUDGET,
            "LimitNOFILE={limit} leaves too little above the agent's budget of {FD_BUDGET}"
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(open_files_limit(limits), Some(1024));
        assert_eq!(open_files_limit("Max cpu time unlimited\n"), None);
    }

    #[test]
    fn net_admin_is_read_from_the_effective_capabilities() {
        let status = |caps: &str| format!("Name:\tegressguard\nCapPrm:\t{caps}\nCapEff:\t{caps}\n");
        assert!(has_net_admin(&status("000001ffffffffff")), "root");
        assert!(
            has_net_admin(&status("0000000000001000")),
            "CAP_NET_ADMIN alone"
        );
        assert!(!has_net_admin(&status("0000000000000000")), "a user");
        assert!(
            !has_net_admin(&status("0000000000000400")),
            "CAP_NET_BIND_SERVICE only"
        );
        assert!(
            has_net_admin("Name:\tx\n"),
            "no CapEff line: the kernel decides"
        );
    }

    #[test]
    fn a_failing_step_backs_off_to_thirty_seconds_and_logs_rarely() {
        let mut b = super::Backoff::default();
        assert_eq!(b.wait(), std::time::Duration::ZERO);
        let mut logged = 0;
        let mut pauses = Vec::new();
        for _ in 0..100 {
            let (_, pause, log) = b.failed();
            pauses.push(pause.as_millis());
            logged += u32::from(log);
        }
        assert_eq!(&pauses[..4], &[100, 200, 400, 800]);
        assert_eq!(*pauses.last().unwrap(), 30_000);
        assert!(b.wait() > std::time::Duration::from_secs(29));
        // 100 failures (~45 minutes at the longest pause) make about 17 lines.
        assert!(logged <= 20, "{logged} lines");
        assert_eq!(b.succeeded(), Some(100));
        assert_eq!(b.succeeded(), None);
        assert_eq!(b.wait(), std::time::Duration::ZERO);
    }
}
