//! Enforcement on the router: the agent's own nft table, blackhole routes, and the reconcile
//! loop that keeps the kernel in step with the decided blocks.
//!
//! # What it owns
//!
//! Exactly one nft table, `inet <policy.enforcement.table>` (default `inet egressguard`),
//! and the blackhole routes tagged with `policy.enforcement.blackhole.protocol` in table
//! `policy.enforcement.blackhole.table`. Nothing else on the box is touched: no
//! `flush ruleset`, no other table, so it coexists with the operator's firewall, firewalld
//! and VyOS tables. Every write is one transaction: all of it applies, or none of it. The
//! structure (table, sets, chains, rules; rare) is written with `nft -j -f -` from the
//! `nftables` crate's schema types; element adds and deletes (blocks, quarantines, unblocks,
//! restores: the bulk of every change set) go to the kernel directly as one nfnetlink batch
//! ([`nlbatch`]): 10,000 adds take ~65 ms instead of nft's ~220 ms, 10,000 deletes ~45 ms
//! instead of tens of seconds (docs/performance.md). A change set that needs both writes
//! the structure first and the elements second (see `Enforcer::apply_plan` for why that is
//! safe); when the fast path cannot be used, the whole change set goes through nft as one
//! transaction.
//!
//! **Overlaps.** The blocked and quarantined sets are interval sets, and the kernel refuses
//! an element overlapping another. The planner never adds one: desired targets covered by a
//! wider one of the same set are left out, every listed element not wanted is deleted in the
//! same transaction (before the adds), and an element left to expire by itself is deleted
//! after all when a new element overlaps it ([`plan::plan`]). Before sending, the fast path
//! checks the result once more ([`plan::Plan::overlapping_add`]) and hands a change set that
//! would still overlap (only possible if the listing was wrong) to nft, which refuses it
//! with its own words.
//!
//! # The table
//!
//! ```text
//! table inet egressguard {
//!     set customers4   { type ipv4_addr; flags interval; }            # policy.networks
//!     set customers6   { type ipv6_addr; flags interval; }
//!     set allow4       { type ipv4_addr; flags interval; }            # policy.allow
//!     set allow6       { type ipv6_addr; flags interval; }
//!     set garden4      { type ipv4_addr; flags interval; }            # enforcement.walled_garden
//!     set garden6      { type ipv6_addr; flags interval; }
//!     set blocked4     { type ipv4_addr; flags interval,timeout; }    # Block, Terminate
//!     set blocked6     { type ipv6_addr; flags interval,timeout; }    # (/128 or /64)
//!     set quarantine4  { type ipv4_addr; flags interval,timeout; }    # Quarantine
//!     set quarantine6  { type ipv6_addr; flags interval,timeout; }
//!     set learnt4      { type ipv4_addr; flags interval; }            # learnt flowspec sources
//!     set learnt6      { type ipv6_addr; flags interval; }
//!     set src_counters4 { type ipv4_addr; size N; flags dynamic,timeout; timeout 5m; }
//!     set src_counters6 { type ipv6_addr; size N; flags dynamic,timeout; timeout 5m; }
//!     set src_udp4     { type ipv4_addr; size N; flags dynamic,timeout; timeout 5m; }  (and 6)
//!     set src_echo4    { type ipv4_addr; size N; flags dynamic,timeout; timeout 5m; }  (and 6)
//!
//!     chain forward {
//!         type filter hook forward priority filter - 10; policy accept;
//!         ip saddr @customers4 update @src_counters4 { ip saddr counter }
//!         ip6 saddr @customers6 update @src_counters6 { ip6 saddr counter }
//!         ip saddr @customers4 meta l4proto udp ct state new update @src_udp4 { ip saddr counter }
//!         ip saddr @customers4 icmp type echo-request update @src_echo4 { ip saddr counter }
//!         (the same two for ip6: icmpv6 type echo-request)
//!         ip saddr @blocked4 ip saddr != @allow4 counter drop
//!         ip daddr @blocked4 ip daddr != @allow4 counter drop
//!         ip saddr @quarantine4 ip saddr != @allow4 ip daddr != @garden4 counter drop
//!         ip daddr @quarantine4 ip saddr @garden4 ct state established,related return
//!         ip daddr @quarantine4 ip daddr != @allow4 counter drop
//!         ip saddr @learnt4 ip saddr != @allow4 counter drop     # senders only
//!         (the same six for ip6)
//!     }
//!     chain input {
//!         type filter hook input priority filter - 10; policy accept;
//!         icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } return
//!         ip saddr @blocked4 ip saddr != @allow4 counter drop
//!         ip saddr @quarantine4 ip saddr != @allow4 ip daddr != @garden4 counter drop
//!         ip saddr @learnt4 ip saddr != @allow4 counter drop
//!         (ip6 likewise)
//!     }
//!     chain output {
//!         type filter hook output priority filter - 10; policy accept;
//!         icmpv6 type { nd-... } return
//!         ip daddr @blocked4 ip daddr != @allow4 counter drop
//!         ip daddr @quarantine4 ip saddr @garden4 ct state established,related return
//!         ip daddr @quarantine4 ip daddr != @allow4 counter drop
//!         (ip6 likewise)
//!     }
//! }
//! ```
//!
//! Every rule carries a comment `egressguard:<name>`.
//!
//! **Priorities.** All three chains hook at `filter - 10` (-10): after conntrack (-200) and
//! destination NAT (-100), before the operator's filter chains (0; firewalld uses
//! `filter + 10`, VyOS 0). An `accept` in another base chain never overrides a `drop` in
//! ours, and our chains only ever drop or fall through (`return` ends our chain, not the
//! packet's path), so the operator's rules still see every packet we let pass. A raw
//! priority (-300) was not chosen: conntrack has not run there, and the quarantine's reply
//! rule needs it.
//!
//! **Why input and output too.** A compromised server attacks the router itself as readily
//! as anything behind it (SSH brute force on the router, floods of its control plane), and
//! "nothing reaches it" includes the router's own services. The walled garden may hold the
//! router's addresses (a captive portal or resolver there), which the input chain honours.
//! ICMPv6 neighbour discovery passes, so a quarantined host can still resolve its gateway.
//!
//! **Conntrack.** The `ct state` rules load conntrack for the table's families in the
//! namespace: the kernel only tracks connections once a rule uses it, and the observer's
//! ctnetlink events depend on that.
//!
//! **Allowlist.** Every drop is guarded by `!= @allowN` on the blocked side: an allowlisted
//! address is never cut off, even when a wider block (an IPv6 /64) covers it.
//!
//! # Behaviour
//!
//! * Declarative: the enforcer is handed [`DesiredBlocks`]; each sync reads the table back
//!   (`nft -j list table`), computes the difference ([`plan`]), applies it as one transaction
//!   and reads back again to verify. The same sync runs every
//!   `policy.enforcement.reconcile_interval` (500 ms by default) and repairs drift: a deleted
//!   or flushed table, a changed rule, an element removed or added by hand, a deleted route.
//!   Each repair is logged as `repaired` with `what`, `set`/`target` and `action` fields.
//! * Timeouts: an element of a block with an expiry carries the nft timeout left, so the
//!   kernel lifts it by itself even when the agent is dead; a block without expiry has none.
//! * Restart: the structure is written with `add` (idempotent), chains are flushed and their
//!   rules written again in the same transaction, and sets are never flushed. Until the first
//!   [`DesiredBlocks`] arrives after start, the blocked and quarantined elements in the kernel
//!   are kept as they are. A restart therefore never opens a gap. Stopping leaves everything
//!   in place; [`remove_all`] removes the table and the routes (package purge).
//! * Dry run (`mode: dry-run`): the table is created (counters and conntrack keep working
//!   for detection), but the blocked and quarantined sets are kept empty and no route is
//!   installed; every change is logged as `would block`, `would quarantine`,
//!   `would terminate` or `would unblock`. Switching a running agent to dry run lifts the
//!   blocks in the kernel.
//! * Blackhole routes (when `policy.enforcement.blackhole.enabled`): one `blackhole` route
//!   per Block/Terminate target, none for quarantines (the garden's replies must pass), none
//!   for a target overlapping the allowlist. See [`route`].
//!
//! # API for the daemon
//!
//! ```ignore
//! let enforcer = Enforcer::init(policy.clone()).await?;   // fails clearly at start
//! let handle = enforcer.spawn();                           // the writer task
//! handle.submit(desired_blocks);                           // never waits on the kernel
//! handle.set_policy(new_policy);                           // on reload
//! let stats = handle.stats();                              // applies, repairs, latency ...
//! handle.shutdown().await;                                 // leaves the kernel state in place
//! remove_all(&RemoveTarget::from_policy(&policy), &EnforceOptions::default()).await?; // purge
//! ```

pub mod genid;
pub mod kernel;
pub mod layout;
pub mod nft;
pub mod nlbatch;
pub mod plan;
pub mod route;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ipnet::IpNet;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::messages::{BlockKind, DesiredBlocks, Time};
use crate::policy::Policy;
use kernel::KernelTable;
use layout::{ChainId, ElemKey, Role, SetId, TableSpec};
use nft::Nft;
use plan::{ElemOp, Plan, Want};
use route::{RouteTag, RouteWriter};

/// Per-element log lines of one sync beyond this many are summarised.
const MAX_LINES: usize = 100;

/// A reconcile tick lists the table even when the generation id did not change after this
/// many ticks (30 s at the default interval): insurance, not a need.
const FULL_CHECK_TICKS: u32 = 60;

/// Why enforcement failed.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    /// The nft program could not be started.
    #[error(
        "cannot run `{}`: install the nftables package (`apt-get install nftables`)",
        program.display()
    )]
    NftMissing {
        /// The program path tried.
        program: PathBuf,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused for lack of privilege.
    #[error("permission denied ({detail}): run egressguard as root or with CAP_NET_ADMIN")]
    PermissionDenied {
        /// What was refused, with nft's or the kernel's words.
        detail: String,
    },
    /// The kernel has no (usable) nf_tables.
    #[error(
        "the kernel has no usable nf_tables ({detail}): load the modules (`modprobe nf_tables`) or use a kernel built with CONFIG_NF_TABLES, CONFIG_NF_TABLES_INET and CONFIG_NFT_CT"
    )]
    KernelUnsupported {
        /// nft's words.
        detail: String,
    },
    /// nft refused a transaction; nothing of it was applied.
    #[error(
        "nft refused a transaction of {commands} commands, nothing of it was applied: {stderr}"
    )]
    NftFailed {
        /// Commands in the transaction.
        commands: usize,
        /// nft's stderr.
        stderr: String,
    },
    /// Listing the table failed.
    #[error("`nft -j list table inet {table}` failed: {stderr}")]
    ListFailed {
        /// The table.
        table: String,
        /// nft's stderr.
        stderr: String,
    },
    /// Talking to the nft process failed.
    #[error("talking to nft failed")]
    NftIo(#[source] std::io::Error),
    /// The table's listing could not be read.
    #[error("cannot read the listing of table inet {table}")]
    Listing {
        /// The table.
        table: String,
        /// What was wrong with it.
        #[source]
        source: kernel::ParseError,
    },
    /// After a transaction the kernel did not hold what it should.
    #[error("the kernel does not hold what was just applied: {0}")]
    Verify(String),
    /// A route netlink socket could not be opened.
    #[error("cannot open a route netlink socket")]
    Netlink(#[source] std::io::Error),
    /// Listing the agent's routes failed.
    #[error("listing blackhole routes of table {table} failed")]
    RouteList {
        /// The routing table.
        table: u32,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Listing the router's routes for their next hops failed.
    #[error("cannot list the router's routes to find its next hops")]
    NextHops(#[source] rtnetlink::Error),
    /// Adding or deleting a route failed.
    #[error("cannot {action} blackhole route {target} in table {table}")]
    Route {
        /// `add` or `delete`.
        action: &'static str,
        /// The route's destination.
        target: IpNet,
        /// The routing table.
        table: u32,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// The writer task ended abnormally.
    #[error("the enforcer task failed")]
    Task(#[source] tokio::task::JoinError),
    /// The kernel refused the element batch of the fast path; nothing of it was applied.
    #[error("the kernel refused the element changes of table inet {table}")]
    Batch {
        /// The table.
        table: String,
        /// What the kernel refused.
        #[source]
        source: nlbatch::BatchError,
    },
}

/// Settings that are not in the policy.
#[derive(Clone, Debug)]
pub struct EnforceOptions {
    /// The nft program (default `nft`, looked up in `PATH`).
    pub nft: PathBuf,
    /// Send element changes as one nfnetlink batch ([`nlbatch`]) rather than through nft
    /// (default true; false is for comparisons and as an escape hatch).
    pub fast_path: bool,
}

impl Default for EnforceOptions {
    fn default() -> Self {
        EnforceOptions {
            nft: PathBuf::from(nft::DEFAULT_NFT),
            fast_path: true,
        }
    }
}

/// Counters the enforcer keeps, shared with its handle.
#[derive(Debug, Default)]
struct Stats {
    syncs: AtomicU64,
    applies: AtomicU64,
    repairs: AtomicU64,
    errors: AtomicU64,
    last_apply_us: AtomicU64,
    last_nft_us: AtomicU64,
    last_netlink_us: AtomicU64,
    last_route_apply_us: AtomicU64,
    fallbacks: AtomicU64,
    generation: AtomicU64,
    elements: AtomicU64,
    routes: AtomicU64,
}

/// A snapshot of the enforcer's counters (for `status` and metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EnforceStats {
    /// Comparisons with the kernel (applies and reconcile ticks).
    pub syncs: u64,
    /// Transactions applied.
    pub applies: u64,
    /// Repairs of drift (per element, route or structure).
    pub repairs: u64,
    /// Failed syncs.
    pub errors: u64,
    /// Wall time of the last applied sync (read, apply, verify), in microseconds.
    pub last_apply_us: u64,
    /// Of the last applied sync: wall time of its nft transactions (structure, or everything
    /// when the fast path was not used), in microseconds; 0 when it ran none.
    pub last_nft_us: u64,
    /// Of the last applied sync: wall time of its element batch over nfnetlink (send and
    /// acknowledgements, the kernel's commit included), in microseconds; 0 when it sent none.
    pub last_netlink_us: u64,
    /// Wall time of the last blackhole-route change (adds and deletes of one sync), in
    /// microseconds.
    pub last_route_apply_us: u64,
    /// Element change sets that went through nft because the fast path could not be used.
    pub fast_path_fallbacks: u64,
    /// Generation of the last desired blocks applied.
    pub generation: u64,
    /// Blocked and quarantined elements held.
    pub elements: u64,
    /// Blackhole routes held.
    pub routes: u64,
}

impl Stats {
    fn snapshot(&self) -> EnforceStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EnforceStats {
            syncs: l(&self.syncs),
            applies: l(&self.applies),
            repairs: l(&self.repairs),
            errors: l(&self.errors),
            last_apply_us: l(&self.last_apply_us),
            last_nft_us: l(&self.last_nft_us),
            last_netlink_us: l(&self.last_netlink_us),
            last_route_apply_us: l(&self.last_route_apply_us),
            fast_path_fallbacks: l(&self.fallbacks),
            generation: l(&self.generation),
            elements: l(&self.elements),
            routes: l(&self.routes),
        }
    }
}

/// What started a sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    Start,
    Desired,
    Policy,
    Tick,
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    /// A transaction was applied.
    pub applied: bool,
    /// The structure (table, sets, chains, rules) was written.
    pub rebuilt: bool,
    /// Elements added, removed, replaced.
    pub added: usize,
    /// Elements removed.
    pub removed: usize,
    /// Elements replaced (timeout changed).
    pub replaced: usize,
    /// Routes added.
    pub routes_added: usize,
    /// Routes removed.
    pub routes_removed: usize,
    /// Repairs of drift among the above.
    pub repairs: usize,
}

/// The enforcer: owns the nft table and the blackhole routes.
pub struct Enforcer {
    nft: Nft,
    policy: Arc<Policy>,
    spec: TableSpec,
    desired: Option<Arc<DesiredBlocks>>,
    routes: RouteWriter,
    route_tag: RouteTag,
    routes_checked: bool,
    applied: Want,
    baseline: Option<BTreeMap<ChainId, Vec<Value>>>,
    dry_shadow: BTreeMap<IpNet, (BlockKind, Option<Time>)>,
    stats: Arc<Stats>,
    gen_watch: Option<genid::GenWatch>,
    verified_gen: Option<u32>,
    ticks_since_full: u32,
    fast: Option<nlbatch::NlBatch>,
    fallback_logged: bool,
    sync_nft_us: u64,
    sync_netlink_us: u64,
}

fn spec_of(policy: &Policy) -> TableSpec {
    TableSpec {
        table: policy.enforcement.table.clone(),
        counter_set_size: policy.detection.max_sources.max(1024),
        meters: crate::meter::Meters::of_policy(policy),
    }
}

fn tag_of(policy: &Policy) -> RouteTag {
    RouteTag {
        table: policy.enforcement.blackhole.table,
        protocol: policy.enforcement.blackhole.protocol,
    }
}

fn chain_rules(k: &KernelTable) -> BTreeMap<ChainId, Vec<Value>> {
    ChainId::ALL
        .into_iter()
        .filter_map(|c| k.chains.get(c.name()).map(|ch| (c, ch.rules.clone())))
        .collect()
}

/// How many addresses the agent's table (as `policy` names it) holds blocked or quarantined
/// in the kernel now; 0 when there is no such table. Read before [`Enforcer::init`], which
/// would make the kernel match the decisions.
pub async fn held_in_kernel(policy: &Policy) -> Result<usize, EnforceError> {
    let nft = Nft::new(nft::DEFAULT_NFT);
    let Some(table) = nft.list_table(&policy.enforcement.table).await? else {
        return Ok(0);
    };
    Ok(SetId::all()
        .filter(|s| matches!(s.role, Role::Blocked | Role::Quarantine))
        .filter_map(|s| table.sets.get(s.name()))
        .map(|s| s.elems.len())
        .sum())
}

impl Enforcer {
    /// Starts enforcement under `policy`: checks that nft runs with enough privilege, writes
    /// the table (one transaction, so never half of it) and checks the agent's routes.
    /// Blocked and quarantined elements already in the kernel stay until the first
    /// [`DesiredBlocks`] arrives. Must run inside a tokio runtime (the route socket is driven
    /// by it); sockets and nft run in the calling thread's network namespace.
    pub async fn init(policy: Arc<Policy>) -> Result<Enforcer, EnforceError> {
        Enforcer::init_with(policy, EnforceOptions::default()).await
    }

    /// [`Enforcer::init`] with explicit options.
    pub async fn init_with(
        policy: Arc<Policy>,
        opts: EnforceOptions,
    ) -> Result<Enforcer, EnforceError> {
        let fast = if opts.fast_path {
            match nlbatch::NlBatch::open() {
                Ok(f) => Some(f),
                Err(e) => {
                    warn!(error = %DisplayChain(&e), "element changes go through nft (slower): the nfnetlink fast path is unavailable");
                    None
                }
            }
        } else {
            None
        };
        let mut e = Enforcer {
            nft: Nft::new(opts.nft),
            spec: spec_of(&policy),
            route_tag: tag_of(&policy),
            policy,
            desired: None,
            routes: RouteWriter::connect()?,
            routes_checked: false,
            applied: Want::default(),
            baseline: None,
            dry_shadow: BTreeMap::new(),
            stats: Arc::new(Stats::default()),
            gen_watch: match genid::GenWatch::open() {
                Ok(g) => Some(g),
                Err(e) => {
                    warn!(error = %DisplayChain(&e), "cannot read the nftables generation id; every reconcile tick lists the table");
                    None
                }
            },
            verified_gen: None,
            ticks_since_full: 0,
            fast,
            fallback_logged: false,
            sync_nft_us: 0,
            sync_netlink_us: 0,
        };
        e.sync(Trigger::Start).await?;
        Ok(e)
    }

    /// The enforcer's counters.
    pub fn stats(&self) -> EnforceStats {
        self.stats.snapshot()
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.spec.table
    }

    /// Makes the kernel hold `desired` (one transaction), and verifies it. A set older than
    /// the one applied last (by generation) is ignored.
    pub async fn apply(&mut self, desired: Arc<DesiredBlocks>) -> Result<SyncReport, EnforceError> {
        if let Some(cur) = &self.desired
            && desired.generation < cur.generation
        {
            debug!(
                generation = desired.generation,
                current = cur.generation,
                "stale desired blocks ignored"
            );
            return Ok(SyncReport::default());
        }
        self.desired = Some(desired);
        self.sync(Trigger::Desired).await
    }

    /// Compares the kernel with what should be there and repairs any drift.
    pub async fn reconcile(&mut self) -> Result<SyncReport, EnforceError> {
        self.sync(Trigger::Tick).await
    }

    /// Switches to a new policy (reload): networks, allowlist, garden, mode, blackhole
    /// settings and even the table's name (the new table is written before the old one is
    /// removed, so there is no gap).
    pub async fn set_policy(&mut self, policy: Arc<Policy>) -> Result<SyncReport, EnforceError> {
        let old_spec = self.spec.clone();
        let old_tag = self.route_tag;
        let new_tag = tag_of(&policy);
        self.spec = spec_of(&policy);
        self.policy = policy;
        if self.spec.table != old_spec.table || self.spec.meters != old_spec.meters {
            // Another table, or meters at other thresholds: the rules are written afresh.
            self.baseline = None;
        }
        if new_tag != old_tag {
            let old = self.routes.list(old_tag).await?;
            let old: Vec<IpNet> = old.into_iter().collect();
            self.routes.delete(&old, old_tag).await?;
            info!(
                table = old_tag.table,
                protocol = old_tag.protocol,
                removed = old.len(),
                "blackhole routes moved to the new table/protocol"
            );
            self.route_tag = new_tag;
            self.applied.routes.clear();
        }
        self.routes_checked = false;
        let report = self.sync(Trigger::Policy).await?;
        if self.spec.table != old_spec.table {
            let removed = self.nft.delete_table(&old_spec.table).await?;
            info!(
                old = %old_spec.table,
                new = %self.spec.table,
                removed,
                "nft table renamed"
            );
        }
        Ok(report)
    }

    /// Spawns the writer task on the current tokio runtime. The decision loop talks to it
    /// through the returned handle and never waits on the kernel.
    pub fn spawn(self) -> EnforcerHandle {
        let (desired_tx, desired_rx) = watch::channel(Arc::new(DesiredBlocks::default()));
        let (policy_tx, policy_rx) = watch::channel(self.policy.clone());
        let (stop_tx, stop_rx) = watch::channel(false);
        let stats = self.stats.clone();
        let task = tokio::spawn(self.run(desired_rx, policy_rx, stop_rx));
        EnforcerHandle {
            desired: desired_tx,
            policy: policy_tx,
            stop: stop_tx,
            stats,
            task,
        }
    }

    async fn run(
        mut self,
        mut desired_rx: watch::Receiver<Arc<DesiredBlocks>>,
        mut policy_rx: watch::Receiver<Arc<Policy>>,
        mut stop_rx: watch::Receiver<bool>,
    ) -> Enforcer {
        let new_interval = |p: &Policy| {
            let mut i = tokio::time::interval(p.enforcement.reconcile_interval);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        };
        let mut tick = new_interval(&self.policy);
        loop {
            let result = tokio::select! {
                biased;
                r = stop_rx.changed() => {
                    if r.is_err() || *stop_rx.borrow() { break; }
                    continue;
                }
                r = policy_rx.changed() => {
                    if r.is_err() { break; }
                    let p = policy_rx.borrow_and_update().clone();
                    if p.enforcement.reconcile_interval != self.policy.enforcement.reconcile_interval {
                        tick = new_interval(&p);
                    }
                    self.set_policy(p).await
                }
                r = desired_rx.changed() => {
                    if r.is_err() { break; }
                    let d = desired_rx.borrow_and_update().clone();
                    self.apply(d).await
                }
                _ = tick.tick() => self.reconcile().await,
            };
            if let Err(e) = result {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                error!(table = %self.spec.table, error = %DisplayChain(&e), "enforcement failed; retrying on the next tick");
            }
        }
        info!(table = %self.spec.table, "enforcer stopped; the table and routes stay in place");
        self
    }

    fn log_dry_run(&mut self, desired: &DesiredBlocks, now: Time) {
        let mut next = BTreeMap::new();
        for b in desired.blocks.values() {
            if let Some(exp) = b.expires
                && plan::remaining_secs(exp, now).is_none()
            {
                continue;
            }
            next.insert(b.target.trunc(), (b.kind, b.expires));
        }
        for (target, (kind, expires)) in &next {
            if self.dry_shadow.get(target) == Some(&(*kind, *expires)) {
                continue;
            }
            let expires = expires.map(|e| e.to_string());
            let expires = expires.as_deref().unwrap_or("never");
            match kind {
                BlockKind::Block => info!(%target, expires, dry_run = true, "would block"),
                BlockKind::Quarantine => {
                    info!(%target, expires, dry_run = true, "would quarantine")
                }
                BlockKind::Terminate => {
                    info!(%target, expires, dry_run = true, "would terminate")
                }
            }
        }
        for target in self.dry_shadow.keys() {
            if !next.contains_key(target) {
                info!(%target, dry_run = true, "would unblock");
            }
        }
        self.dry_shadow = next;
    }

    /// The ruleset generation id, when it can be read.
    async fn generation(&mut self) -> Option<u32> {
        let g = self.gen_watch.as_mut()?;
        match g.get().await {
            Ok(id) => Some(id),
            Err(e) => {
                debug!(error = %DisplayChain(&e), "generation id unreadable");
                None
            }
        }
    }

    async fn sync(&mut self, trigger: Trigger) -> Result<SyncReport, EnforceError> {
        let result = self.sync_inner(trigger).await;
        if result.is_err() {
            self.verified_gen = None;
        }
        result
    }

    async fn sync_inner(&mut self, trigger: Trigger) -> Result<SyncReport, EnforceError> {
        let started = Instant::now();
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        let now = Time::now();
        let empty = DesiredBlocks::default();
        let desired = self.desired.clone();
        let desired_ref = desired.as_deref().unwrap_or(&empty);
        if !self.policy.enforcing() && trigger != Trigger::Tick {
            self.log_dry_run(desired_ref, now);
        }
        let mut want = Want::build(&self.policy, desired_ref, now);
        // Before the first desired blocks after a start, keep the kernel's blocks.
        let keep_blocks = desired.is_none() && self.policy.enforcing();
        if trigger != Trigger::Tick && !want.covered.is_empty() {
            debug!(covered = ?want.covered, "targets covered by a wider block of the same kind");
        }

        let mut report = SyncReport::default();
        let gen_before = self.generation().await;
        if trigger == Trigger::Tick
            && gen_before.is_some()
            && gen_before == self.verified_gen
            && self.ticks_since_full < FULL_CHECK_TICKS
        {
            // Nobody committed anything since the last verified listing. Before the first
            // desired blocks `want` is empty (the kernel's blocks are adopted only from a
            // listing): the routes stay as the last full sync left them, or a restart would
            // withdraw every live hold's route until the decisions arrive.
            self.ticks_since_full += 1;
            if !keep_blocks {
                self.sync_routes(&want, trigger, &mut report).await?;
            }
            self.finish(want, desired.as_deref(), started, trigger, &report);
            return Ok(report);
        }
        self.ticks_since_full = 0;
        self.sync_nft_us = 0;
        self.sync_netlink_us = 0;
        let mut attempt = 0;
        let mut verified_gen = gen_before;
        let mut gen_listed = gen_before;
        let applied_plan: Option<Plan> = loop {
            if attempt > 0 {
                gen_listed = self.generation().await;
            }
            let kernel = self.nft.list_table(&self.spec.table).await?;
            if keep_blocks {
                adopt_blocks(&mut want, kernel.as_ref(), now, &self.policy);
            }
            let p = plan::plan(
                &self.spec,
                &want,
                kernel.as_ref(),
                self.baseline.as_ref(),
                now,
            );
            if p.is_empty() {
                break None;
            }
            match self.apply_plan(&p, kernel.as_ref(), gen_listed).await {
                Ok(()) => break Some(p),
                Err(e @ (EnforceError::NftFailed { .. } | EnforceError::Batch { .. }))
                    if attempt == 0 =>
                {
                    warn!(table = %self.spec.table, error = %DisplayChain(&e), "transaction refused; reading the table again and retrying once");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };

        if let Some(p) = &applied_plan {
            verified_gen = self.generation().await;
            let kernel = self
                .nft
                .list_table(&self.spec.table)
                .await?
                .ok_or_else(|| EnforceError::Verify("the table is missing".into()))?;
            if p.rebuild {
                self.baseline = Some(chain_rules(&kernel));
            }
            let check = plan::plan(
                &self.spec,
                &want,
                Some(&kernel),
                self.baseline.as_ref(),
                Time::now(),
            );
            if !check.is_empty() {
                return Err(EnforceError::Verify(format!(
                    "still {} element changes pending, structure: {:?}",
                    check.changes.len(),
                    check.reasons
                )));
            }
            report.applied = true;
            report.rebuilt = p.rebuild;
            self.log_plan(p, &want, trigger, &mut report);
        }

        self.verified_gen = verified_gen;
        self.sync_routes(&want, trigger, &mut report).await?;
        self.finish(want, desired.as_deref(), started, trigger, &report);
        Ok(report)
    }

    /// Applies a plan as one transaction, or two when the structure changes: the structure
    /// through nft, then the element changes as one nfnetlink batch ([`nlbatch`]).
    ///
    /// Structure first, elements second, each atomic: in between, the table (or a set
    /// recreated for a wrong definition) exists with fewer elements than wanted. That is safe
    /// in the direction that matters, as every rule only drops what is *in* a set: an empty
    /// or partly filled set blocks nothing extra (it only lets a block start a few
    /// milliseconds later, and a table that was missing blocked nothing at all). If the
    /// element batch fails, the structure stays, and the retry here or the next reconcile
    /// tick adds the elements. A restart does not go through this gap: existing sets keep
    /// their elements while the chains are rewritten.
    ///
    /// The batch carries the generation id read before the table was listed, so a commit by
    /// anyone else in between makes the kernel refuse it rather than apply a stale diff.
    /// When the fast path is unavailable (no socket, buffer or transport failure, an encoding
    /// it cannot express, or, never expected, an overlapping add), the change set goes
    /// through nft instead, and that is logged once.
    async fn apply_plan(
        &mut self,
        p: &Plan,
        kernel: Option<&KernelTable>,
        genid: Option<u32>,
    ) -> Result<(), EnforceError> {
        let rewritten;
        let p = if p.rebuild {
            match self.write_side_sets(p).await? {
                Some(rest) => {
                    rewritten = rest;
                    &rewritten
                }
                None => p,
            }
        } else {
            p
        };
        let ops = p.element_ops();
        if ops.is_empty() || self.fast.is_none() {
            return self.apply_nft(&p.to_tx(&self.spec)).await;
        }
        if let Some((set, key)) = p.overlapping_add(kernel) {
            warn!(table = %self.spec.table, set = set.name(), %key, "an added element would overlap another one; this change set goes through nft");
            return self.apply_nft(&p.to_tx(&self.spec)).await;
        }
        let mut genid = genid;
        if p.rebuild {
            self.apply_nft(&p.structure_tx(&self.spec)).await?;
            // Our own commit moved the generation on.
            genid = self.generation().await;
        }
        let Some(fast) = self.fast.as_mut() else {
            return self.apply_nft(&p.element_tx(&self.spec)).await;
        };
        let started = Instant::now();
        let table = self.spec.table.as_str();
        let result = blocking(|| fast.apply(table, &ops, genid));
        self.sync_netlink_us += started.elapsed().as_micros() as u64;
        match result {
            Ok(sent) => {
                debug!(
                    table,
                    elements = ops.len(),
                    messages = sent.messages,
                    bytes = sent.bytes,
                    "element batch applied"
                );
                Ok(())
            }
            Err(e) if e.is_transport() => {
                self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                if matches!(e, nlbatch::BatchError::Open(_)) {
                    self.fast = None;
                }
                if self.fallback_logged {
                    debug!(table = %self.spec.table, error = %DisplayChain(&e), "element batch failed; applied through nft");
                } else {
                    self.fallback_logged = true;
                    warn!(table = %self.spec.table, error = %DisplayChain(&e), "element batch failed; applied through nft (logged once)");
                }
                self.apply_nft(&p.element_tx(&self.spec)).await
            }
            Err(e) if e.is_permission() => Err(EnforceError::PermissionDenied {
                detail: DisplayChain(&e).to_string(),
            }),
            Err(source) => Err(EnforceError::Batch {
                table: self.spec.table.clone(),
                source,
            }),
        }
    }

    /// Creates the [`layout::SetId::side`] sets a rewrite needs, which nft's JSON cannot
    /// spell. One that is wrong is deleted first, by a rewrite without the rules that fill
    /// it (each step one transaction: the drops stay in force throughout); the plan's own
    /// rewrite then writes every rule again, and is returned to be applied in its place.
    async fn write_side_sets(&mut self, p: &Plan) -> Result<Option<Plan>, EnforceError> {
        let adds = p.structure.side_adds();
        if adds.is_empty() {
            return Ok(None);
        }
        let dropped = p.structure.drops_side();
        if dropped {
            let mut tx = layout::Tx::new();
            tx.structure_dropping_side(&self.spec, &p.structure);
            self.apply_nft(&tx).await?;
        }
        let script: String = adds
            .iter()
            .map(|id| self.spec.side_set_script(*id))
            .collect();
        let started = Instant::now();
        let result = self.nft.apply_script(&script).await;
        self.sync_nft_us += started.elapsed().as_micros() as u64;
        result?;
        Ok(dropped.then(|| Plan {
            structure: layout::Structure::rules_only(),
            ..p.clone()
        }))
    }

    async fn apply_nft(&mut self, tx: &layout::Tx) -> Result<(), EnforceError> {
        let started = Instant::now();
        let result = self.nft.apply(tx).await;
        self.sync_nft_us += started.elapsed().as_micros() as u64;
        result
    }

    /// Records what a sync did.
    fn finish(
        &mut self,
        want: Want,
        desired: Option<&DesiredBlocks>,
        started: Instant,
        trigger: Trigger,
        report: &SyncReport,
    ) {
        let elements: usize = want
            .sets
            .iter()
            .filter(|(id, _)| matches!(id.role, Role::Blocked | Role::Quarantine))
            .map(|(_, m)| m.len())
            .sum();
        self.stats
            .elements
            .store(elements as u64, Ordering::Relaxed);
        self.stats
            .routes
            .store(want.routes.len() as u64, Ordering::Relaxed);
        if let Some(d) = desired {
            self.stats.generation.store(d.generation, Ordering::Relaxed);
        }
        self.applied = want;
        if report.applied || report.routes_added + report.routes_removed > 0 {
            let us = started.elapsed().as_micros() as u64;
            self.stats.applies.fetch_add(1, Ordering::Relaxed);
            self.stats.last_apply_us.store(us, Ordering::Relaxed);
            if report.applied {
                self.stats
                    .last_nft_us
                    .store(self.sync_nft_us, Ordering::Relaxed);
                self.stats
                    .last_netlink_us
                    .store(self.sync_netlink_us, Ordering::Relaxed);
            }
            self.stats
                .repairs
                .fetch_add(report.repairs as u64, Ordering::Relaxed);
            info!(
                table = %self.spec.table,
                trigger = ?trigger,
                added = report.added,
                removed = report.removed,
                replaced = report.replaced,
                rebuilt = report.rebuilt,
                routes_added = report.routes_added,
                routes_removed = report.routes_removed,
                repairs = report.repairs,
                latency_ms = us as f64 / 1000.0,
                "applied"
            );
        }
    }

    fn log_plan(&self, p: &Plan, want: &Want, trigger: Trigger, report: &mut SyncReport) {
        let table = &self.spec.table;
        let steady = matches!(trigger, Trigger::Tick | Trigger::Desired);
        if p.rebuild {
            match trigger {
                Trigger::Start => info!(%table, reasons = ?p.reasons, "table written"),
                Trigger::Policy => {
                    info!(%table, reasons = ?p.reasons, "table rewritten for the new policy")
                }
                Trigger::Tick | Trigger::Desired => {
                    report.repairs += 1;
                    warn!(%table, what = "table", reasons = ?p.reasons, action = "rewritten", "repaired");
                }
            }
        }
        let mut lines = 0;
        for c in &p.changes {
            let (before, after) = match c.key {
                ElemKey::Net(n) => (
                    self.applied.sets.get(&c.set).and_then(|m| m.get(&n)),
                    want.sets.get(&c.set).and_then(|m| m.get(&n)),
                ),
                ElemKey::Range(..) => (None, None),
            };
            // Drift: the kernel changed while what is wanted did not.
            let repair = steady
                && match c.op {
                    ElemOp::Add | ElemOp::Replace => before.is_some() && before == after,
                    ElemOp::Remove => before.is_none(),
                };
            let action = match c.op {
                ElemOp::Add => {
                    report.added += 1;
                    "added"
                }
                ElemOp::Remove => {
                    report.removed += 1;
                    "removed"
                }
                ElemOp::Replace => {
                    report.replaced += 1;
                    "replaced"
                }
            };
            let set = c.set.name();
            let addr = c.key.to_string();
            if repair {
                report.repairs += 1;
                lines += 1;
                if lines <= MAX_LINES {
                    warn!(%table, what = "element", set, %addr, action, timeout = ?c.timeout, "repaired");
                }
            } else if p.changes.len() <= MAX_LINES {
                info!(%table, set, %addr, action, timeout = ?c.timeout, "enforced");
            } else {
                debug!(%table, set, %addr, action, timeout = ?c.timeout, "enforced");
            }
        }
        if lines > MAX_LINES {
            warn!(%table, what = "element", count = lines, "repaired (further lines left out)");
        }
    }

    async fn sync_routes(
        &mut self,
        want: &Want,
        trigger: Trigger,
        report: &mut SyncReport,
    ) -> Result<(), EnforceError> {
        if !self.policy.enforcement.blackhole.enabled && self.routes_checked {
            return Ok(());
        }
        // Before the first desired blocks `want.routes` are the blocked elements the kernel
        // still holds ([`adopt_blocks`]): a route without one (its hold expired while the
        // agent was down) or any route with blackholing off goes.
        let tag = self.route_tag;
        let have = self.routes.list(tag).await?;
        let add: Vec<IpNet> = want.routes.difference(&have).copied().collect();
        let del: Vec<IpNet> = have.difference(&want.routes).copied().collect();
        if !add.is_empty() || !del.is_empty() {
            let started = Instant::now();
            let now = Time::now();
            let timed: Vec<(IpNet, Option<u32>)> = add
                .iter()
                .map(|t| {
                    let fam = layout::Fam::of(t.addr());
                    let expires = want
                        .sets
                        .get(&SetId::new(Role::Blocked, fam))
                        .and_then(|m| m.get(t).copied().flatten());
                    let left = expires
                        .map(|e| u32::try_from(e.since(now).as_secs().max(1)).unwrap_or(u32::MAX));
                    (*t, left)
                })
                .collect();
            self.routes.add(&timed, tag).await?;
            self.routes.delete(&del, tag).await?;
            self.stats
                .last_route_apply_us
                .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        self.routes_checked = true;
        for t in &add {
            report.routes_added += 1;
            if self.applied.routes.contains(t) && trigger == Trigger::Tick {
                report.repairs += 1;
                warn!(what = "route", target = %t, table = tag.table, protocol = tag.protocol, action = "added", "repaired");
            } else {
                info!(target = %t, table = tag.table, protocol = tag.protocol, "blackhole route added");
            }
        }
        for t in &del {
            report.routes_removed += 1;
            if !self.applied.routes.contains(t) && trigger == Trigger::Tick {
                report.repairs += 1;
                warn!(what = "route", target = %t, table = tag.table, protocol = tag.protocol, action = "removed", "repaired");
            } else {
                info!(target = %t, table = tag.table, protocol = tag.protocol, "blackhole route removed");
            }
        }
        Ok(())
    }
}

/// Runs `f`, which blocks in a system call (the kernel's commit of a batch), without
/// stalling other tasks on a multi-threaded runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Before the first desired blocks: want exactly the blocks the kernel holds (with the
/// expiry they have), so nothing is added or removed; and blackhole routes for the blocked
/// ones only when the policy has them on (so a route of a hold that expired while the agent
/// was down, or any route at all when blackholing is off, is removed at start).
fn adopt_blocks(want: &mut Want, kernel: Option<&KernelTable>, now: Time, policy: &Policy) {
    let routes = policy.enforcement.blackhole.enabled;
    let Some(k) = kernel else { return };
    for role in [Role::Blocked, Role::Quarantine] {
        for fam in [layout::Fam::V4, layout::Fam::V6] {
            let id = SetId::new(role, fam);
            let Some(s) = k.sets.get(id.name()) else {
                continue;
            };
            let m = want.sets.entry(id).or_default();
            for e in &s.elems {
                if let ElemKey::Net(n) = e.key {
                    let exp = e
                        .expires
                        .map(|left| now.saturating_add(std::time::Duration::from_secs(left)));
                    m.insert(n, exp);
                    if routes && role == Role::Blocked && !policy.allow_overlaps(&n) {
                        want.routes.insert(n);
                    }
                }
            }
        }
    }
}

/// Formats an error with its chain of causes on one line.
pub struct DisplayChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

/// Reads the writer's counters.
#[derive(Clone, Debug)]
pub struct EnforceStatsReader(Arc<Stats>);

impl EnforceStatsReader {
    /// The counters now.
    pub fn snapshot(&self) -> EnforceStats {
        self.0.snapshot()
    }
}

/// The daemon's side of the writer task.
pub struct EnforcerHandle {
    desired: watch::Sender<Arc<DesiredBlocks>>,
    policy: watch::Sender<Arc<Policy>>,
    stop: watch::Sender<bool>,
    stats: Arc<Stats>,
    task: JoinHandle<Enforcer>,
}

impl EnforcerHandle {
    /// Hands over the complete desired blocks. Never waits: the writer picks up the latest
    /// set when it is free (intermediate sets are coalesced, which is right for declarative
    /// state). A set older than the one pending (by generation) is dropped.
    pub fn submit(&self, desired: DesiredBlocks) {
        let desired = Arc::new(desired);
        self.desired.send_if_modified(|cur| {
            if desired.generation < cur.generation {
                false
            } else {
                *cur = desired;
                true
            }
        });
    }

    /// Hands over a reloaded policy.
    pub fn set_policy(&self, policy: Arc<Policy>) {
        self.policy.send_replace(policy);
    }

    /// The writer's counters.
    pub fn stats(&self) -> EnforceStats {
        self.stats.snapshot()
    }

    /// A reader of the writer's counters that outlives the handle (for the metrics server).
    pub fn stats_reader(&self) -> EnforceStatsReader {
        EnforceStatsReader(Arc::clone(&self.stats))
    }

    /// Stops the writer task and returns the enforcer. The table and routes stay.
    pub async fn shutdown(self) -> Result<Enforcer, EnforceError> {
        let _ = self.stop.send(true);
        self.task.await.map_err(EnforceError::Task)
    }
}

/// What to remove on purge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoveTarget {
    /// The nft table (family inet).
    pub table: String,
    /// The agent's routes, by table and protocol.
    pub routes: Option<RouteTag>,
}

impl RemoveTarget {
    /// The table and routes a policy's agent owns (routes also when blackholing is off: an
    /// earlier policy may have had it on).
    pub fn from_policy(policy: &Policy) -> RemoveTarget {
        RemoveTarget {
            table: policy.enforcement.table.clone(),
            routes: Some(tag_of(policy)),
        }
    }
}

/// What [`remove_all`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemoveReport {
    /// The table existed and was deleted.
    pub table_removed: bool,
    /// Blackhole routes deleted.
    pub routes_removed: usize,
}

/// Removes everything the agent put into the kernel: its nft table and its blackhole
/// routes. For package purge and a documented command; never called on stop.
pub async fn remove_all(
    target: &RemoveTarget,
    opts: &EnforceOptions,
) -> Result<RemoveReport, EnforceError> {
    let nft = Nft::new(opts.nft.clone());
    let table_removed = nft.delete_table(&target.table).await?;
    let mut routes_removed = 0;
    if let Some(tag) = target.routes {
        let rw = RouteWriter::connect()?;
        let have: Vec<IpNet> = rw.list(tag).await?.into_iter().collect();
        rw.delete(&have, tag).await?;
        routes_removed = have.len();
    }
    info!(table = %target.table, table_removed, routes_removed, "enforcement removed");
    Ok(RemoveReport {
        table_removed,
        routes_removed,
    })
}

/// The set of routes held, for tests and `status`.
pub async fn list_routes(tag: RouteTag) -> Result<BTreeSet<IpNet>, EnforceError> {
    RouteWriter::connect()?.list(tag).await
}
