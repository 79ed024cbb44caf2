//! Decisions: the escalation ladder, reconnect authorisations, allowlists and infrastructure
//! protection, the circuit breaker, and the write-ahead recording of every decision.
//!
//! [`Decider`] is the single owner of all block state (STYLE.md rule 3). It is a deterministic
//! state machine: its only inputs are the messages it is given (detections, operator
//! commands, ticks, policies), each carrying its own time; it never reads the clock. Every
//! input is handled as one *batch*: the decider works out the decisions, writes them to the
//! [`Store`] in one transaction, and only then returns them (write-ahead). When the commit
//! fails, the in-memory state is reloaded from the database, the error is returned, and
//! nothing was decided — the caller must not enforce anything for that batch.
//!
//! # Rules
//!
//! * **Ladder.** The Nth offense of a target within `escalation.forget_after` (offenses older
//!   than that are forgotten) gets rung `Escalation::rung(N, actions[category].start_at)`.
//!   Reconnects and expiries do not reset the count: the next offense climbs.
//! * **Already held.** A detection of a held target makes no new offense, with one exception:
//!   a *quarantined* target (it still reaches the walled garden) that is detected again with
//!   an evidence window starting at or after the quarantine began (so not the same traffic
//!   that caused it) escalates to the next rung when that rung is harsher than quarantine.
//!   A target held by `block` or `terminate` reaches nothing; a detection then is an
//!   artefact and never escalates. A hold's own effect is never new evidence: the daemon
//!   tells the detector of every hold begun and lifted ([`HoldChange`]), and the detector
//!   starts afresh for the target, charging neither the traffic from before the hold nor,
//!   while held, the packet counters (counted before the hold's drop: what it drops); so a
//!   detection of a quarantined target is abuse that passed the quarantine, with an
//!   evidence window starting after the hold began.
//!
//! [`HoldChange`]: crate::messages::HoldChange
//! * **Termination.** A terminated target stays blocked whatever the reconnect list says;
//!   only a reconnect with `override_termination: true` lifts it (or the target becoming
//!   protected, below). Operator `unblock` refuses a terminated target.
//! * **Protected targets.** A target that lies in or contains a special address (loopback,
//!   link-local, multicast, unspecified, limited broadcast: `special.rs`), one of the router's
//!   next hops or a connected subnet's network or broadcast address ([`InfraSet::with_always`]),
//!   whatever the policy says; or overlaps an allowlisted prefix (`Policy::allow_overlaps`);
//!   or, with `protect_infrastructure`, the [`InfraSet`], is never held: its detections are
//!   audited as `protected`, an operator block is refused, and a hold whose target becomes
//!   protected (policy reload, new infrastructure) is lifted at once. This wins over a termination too (the termination record is kept, marked lifted
//!   by `policy: allowlisted` or `infrastructure: infrastructure`): a protected address must
//!   never be held, and validation refuses reconnect entries for allowlisted addresses, so
//!   no override could lift it otherwise.
//! * **Circuit breaker.** See [`breaker`]: per network entry, counted per customer aggregate,
//!   tripping only the entry concerned and re-arming after `circuit_breaker.cool_down` or an
//!   operator reset. Suppressed detections are audited with their evidence but are not
//!   offenses. A trip and a re-arm are audited and returned by
//!   [`Decider::take_breaker_events`] (for the notify hook).
//! * **Reconnects.** See [`reconnect`]. A valid authorisation lifts the hold at once, records
//!   the ticket (used once, for good), and leaves the offense history as it is.
//! * **Operator block.** Holds the target as `block` for the given time (or until unblocked /
//!   reconnected). It never weakens a hold: the kind is the harsher and the expiry the later
//!   of the existing and the new one. It is enforced even in dry-run mode (a human asked
//!   for it) and is neither an offense nor capped by the breaker, nor counted toward any
//!   network's automatic budget. A target that is not inside one customer network entry is
//!   refused unless the operator asks for [`BlockScope::Anywhere`] (`--outside-networks`);
//!   protected targets (above) are refused whatever the scope.
//! * **Dry run.** Decisions are made and recorded exactly as in enforce mode, marked
//!   `dry_run` (holds, offenses, audit, [`Decision::dry_run`]), but [`Decider::desired`] leaves
//!   them out; [`Decider::would_enforce`] lists them. Dry-run offenses count only in dry-run
//!   mode. When a reload switches to enforce, the dry-run holds are discarded (audited as
//!   `dry_run_discarded`); enforce → dry-run keeps the enforced holds.
//! * **Restart.** [`Decider::new`] restores every hold still due from the database, drops
//!   (and audits) the ones that expired while the agent was down, and checks the reconnect
//!   list; [`Decider::take_startup_decisions`] returns what that changed.
//!
//! # Wiring (for the daemon)
//!
//! ```text
//! detect ──Detection──▶ Decider::on_detections ─┐
//! timer  ──────────────▶ Decider::on_tick        ├─▶ Vec<Decision> (log, notify hook, metrics)
//! control socket ──────▶ on_operator_block/...   │
//! reload ──────────────▶ Decider::on_policy      ┘   then Decider::desired() ──▶ enforcers
//! ```

pub mod breaker;
mod holds;
pub mod reconnect;
mod special;

use crate::logging::error_chain;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{debug, error, info, warn};

use crate::messages::{
    Announce, BlockKind, BreakerChange, BreakerEvent, Category, Cause, Decision, DesiredBlock,
    DesiredBlocks, Detection, FlowspecScope, Time, proto,
};
use crate::policy::{FlowspecMatch, Hold, Mode, Policy};
use crate::state::{
    AuditEntry, AuditRecord, BlockRecord, Change, OffenseRecord, ReconnectRecord, Service,
    StateError, Store, TerminationRecord, actions,
};

pub use breaker::{BreakerStatus, NetworkBreaker, NetworkLoad, Suppression};
pub use reconnect::{ReconnectOutcome, ReconnectResult, Refusal};

/// The actor name of the agent's own decisions in the audit trail.
pub const AGENT: &str = "egressguard";

/// Most flowspec service ports taken from the evidence of a flood or scan.
const MAX_SERVICE_PORTS: usize = 8;

/// What can go wrong in the decision task.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The batch could not be recorded, so nothing in it was decided; the in-memory state was
    /// reloaded from the database.
    #[error("the decision batch could not be recorded, so it was not taken")]
    State(#[source] StateError),
    /// An operator command was refused; nothing changed.
    #[error("{target}: {refusal}")]
    Refused {
        /// The target of the command.
        target: IpNet,
        /// Why.
        refusal: OperatorRefusal,
    },
    /// `breaker reset NETWORK` named no network entry of the policy; nothing changed.
    #[error("`{spec}` is no entry of `networks:` in the policy; the entries are: {}", known.join(", "))]
    UnknownNetwork {
        /// What was asked for.
        spec: String,
        /// The entries (prefix and name).
        known: Vec<String>,
    },
}

impl From<StateError> for DecideError {
    fn from(e: StateError) -> DecideError {
        DecideError::State(e)
    }
}

/// Why a target is never held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protection {
    /// It overlaps an allowlisted prefix.
    Allowlisted,
    /// It overlaps the router's infrastructure (own addresses, BGP peers, walled garden,
    /// resolvers).
    Infrastructure,
    /// Loopback (127.0.0.0/8, ::1). Always protected.
    Loopback,
    /// Link-local (169.254.0.0/16, fe80::/10). Always protected.
    LinkLocal,
    /// Multicast (224.0.0.0/4, ff00::/8). Always protected.
    Multicast,
    /// Unspecified (0.0.0.0/8, ::). Always protected.
    Unspecified,
    /// The limited broadcast address, or a network or broadcast address of one of the
    /// router's connected IPv4 subnets. Always protected.
    Broadcast,
    /// A next hop of the router's routes toward outside the customer networks. Always
    /// protected.
    NextHop,
}

impl Protection {
    /// Whether it holds whatever the policy says (`protect_infrastructure`, flags).
    pub fn always(self) -> bool {
        !matches!(self, Protection::Allowlisted | Protection::Infrastructure)
    }
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protection::Allowlisted => "allowlisted",
            Protection::Infrastructure => "infrastructure",
            Protection::Loopback => "loopback",
            Protection::LinkLocal => "link-local",
            Protection::Multicast => "multicast",
            Protection::Unspecified => "an unspecified address",
            Protection::Broadcast => "a broadcast address",
            Protection::NextHop => "a next hop of the router",
        })
    }
}

/// Where an operator block may reach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockScope {
    /// Only targets inside one customer network entry (`networks:`).
    #[default]
    Networks,
    /// Anywhere (`--outside-networks`), protected targets still excepted.
    Anywhere,
}

/// Why an operator command was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "refusal", rename_all = "snake_case")]
pub enum OperatorRefusal {
    /// The target is protected and is never blocked.
    Protected {
        /// How.
        protection: Protection,
    },
    /// `unblock` of a target that is not held.
    NotBlocked,
    /// `unblock` of a terminated target.
    Terminated,
    /// `block` of a target that is already terminated.
    AlreadyTerminated,
    /// `block` without a reason.
    NoReason,
    /// `unblock` without a ticket.
    NoTicket,
    /// `block` of a target outside every customer network entry, without
    /// `--outside-networks`.
    OutsideNetworks,
    /// `block` of a target that lies in or contains an address that is never held, whatever
    /// the flags.
    Never {
        /// What it is.
        protection: Protection,
        /// The protected range or address.
        range: IpNet,
        /// True when the target lies inside `range`, false when it contains it.
        inside: bool,
    },
}

impl fmt::Display for OperatorRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OperatorRefusal::Protected { protection } => {
                write!(f, "the address is {protection} and is never blocked")
            }
            OperatorRefusal::NotBlocked => f.write_str("the address is not blocked"),
            OperatorRefusal::Terminated => f.write_str(
                "the address is terminated; lift it with a reconnect authorisation with \
                 `override_termination: true` in the policy",
            ),
            OperatorRefusal::AlreadyTerminated => f.write_str("the address is already terminated"),
            OperatorRefusal::NoReason => f.write_str("a block needs a reason"),
            OperatorRefusal::NoTicket => f.write_str("an unblock needs a ticket"),
            OperatorRefusal::OutsideNetworks => f.write_str(
                "the target is not inside any customer network of the policy (`networks:`); \
                 give --outside-networks to block it anyway",
            ),
            OperatorRefusal::Never {
                protection,
                range,
                inside: true,
            } => write!(
                f,
                "the address is {protection} ({range}) and is never blocked, with or without \
                 --outside-networks"
            ),
            OperatorRefusal::Never {
                protection,
                range,
                inside: false,
            } => write!(
                f,
                "the prefix contains {protection} ({range}), which is never blocked, with or \
                 without --outside-networks"
            ),
        }
    }
}

/// Addresses that must never be blocked besides the allowlist: the router's own addresses,
/// BGP peers, walled-garden destinations, resolvers. Applies when the policy says
/// `protect_infrastructure: true` (the default).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfraSet {
    nets: Vec<IpNet>,
    /// Protected whatever `protect_infrastructure` says: the router's next hops, its
    /// connected subnets' network and broadcast addresses.
    #[serde(default)]
    always: Vec<(IpNet, Protection)>,
}

impl InfraSet {
    /// A set of the given addresses and prefixes.
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> InfraSet {
        let mut nets: Vec<IpNet> = nets.into_iter().map(|n| n.trunc()).collect();
        nets.sort();
        nets.dedup();
        InfraSet {
            nets,
            always: Vec::new(),
        }
    }

    /// This set plus addresses protected whatever `protect_infrastructure` says, each with
    /// its kind ([`Protection::NextHop`], [`Protection::Broadcast`]).
    pub fn with_always(mut self, more: impl IntoIterator<Item = (IpNet, Protection)>) -> InfraSet {
        self.always
            .extend(more.into_iter().map(|(n, p)| (n.trunc(), p)));
        self.always.sort();
        self.always.dedup();
        self
    }

    /// The router's next hops among `routes` (destination, gateway) that must never be
    /// held: the gateways of every route except those toward a customer network (a subnet
    /// routed to a customer's server has that server as its gateway, and the server stays
    /// holdable like any customer address).
    pub fn upstream_next_hops(
        routes: &[(IpNet, std::net::IpAddr)],
        policy: &Policy,
    ) -> Vec<(IpNet, Protection)> {
        routes
            .iter()
            .filter(|(dest, _)| !policy.networks.iter().any(|n| n.prefix.contains(dest)))
            .map(|(_, gw)| (IpNet::from(*gw), Protection::NextHop))
            .collect()
    }

    /// The always-protected address `net` lies in or contains, with its kind.
    pub fn always_overlaps(&self, net: &IpNet) -> Option<(IpNet, Protection)> {
        self.always
            .iter()
            .find(|(i, _)| i.contains(net) || net.contains(i))
            .copied()
    }

    /// The infrastructure the policy itself names: BGP peers (and their local addresses)
    /// and the walled garden. The daemon adds the router's own addresses and resolvers.
    pub fn from_policy(policy: &Policy) -> InfraSet {
        let mut nets: Vec<IpNet> = policy.enforcement.walled_garden.clone();
        if let Some(bgp) = &policy.bgp {
            for p in &bgp.peers {
                nets.push(IpNet::from(p.address));
                nets.extend(p.local_address.map(IpNet::from));
            }
        }
        InfraSet::new(nets)
    }

    /// This set plus `more`.
    pub fn with(mut self, more: impl IntoIterator<Item = IpNet>) -> InfraSet {
        self.nets.extend(more);
        let always = std::mem::take(&mut self.always);
        InfraSet::new(self.nets).with_always(always)
    }

    /// Whether blocking `net` would touch the infrastructure.
    pub fn overlaps(&self, net: &IpNet) -> bool {
        self.nets.iter().any(|i| i.contains(net) || net.contains(i))
    }

    /// Whether `net` lies wholly inside the infrastructure (so it is never held).
    pub fn covers(&self, net: &IpNet) -> bool {
        self.nets.iter().any(|i| i.contains(net))
    }

    /// The infrastructure strictly inside `net`: a hold of `net` keeps it reachable.
    pub fn inside<'a>(&'a self, net: &'a IpNet) -> impl Iterator<Item = IpNet> + 'a {
        self.nets
            .iter()
            .filter(move |i| net.contains(*i) && !i.contains(net))
            .copied()
    }

    /// The addresses and prefixes.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }
}

/// Counters since start, for `status` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Detections received.
    pub detections: u64,
    /// Offenses recorded (new holds and escalations).
    pub offenses: u64,
    /// Detections of protected targets, ignored.
    pub protected: u64,
    /// Detections of targets already held, no new offense.
    pub while_held: u64,
    /// Detections suppressed by the circuit breaker.
    pub suppressed: u64,
    /// Holds that expired.
    pub expired: u64,
    /// Reconnects applied.
    pub reconnects_applied: u64,
    /// Reconnects refused (each distinct refusal once).
    pub reconnects_refused: u64,
    /// Operator blocks.
    pub operator_blocks: u64,
    /// Operator unblocks.
    pub operator_unblocks: u64,
    /// Circuit breaker trips.
    pub breaker_trips: u64,
}

/// What `status` shows of the decision task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecideStatus {
    /// Enforce or dry run.
    pub mode: Mode,
    /// Digest of the policy in force.
    pub policy_digest: String,
    /// Enforced holds by kind.
    pub blocks_by_kind: BTreeMap<BlockKind, usize>,
    /// Dry-run holds (decided, not enforced) by kind.
    pub dry_run_by_kind: BTreeMap<BlockKind, usize>,
    /// The circuit breaker.
    pub breaker: BreakerStatus,
    /// The outcome of each reconnect authorisation at the last start or reload.
    pub last_reconnect_outcomes: Vec<ReconnectOutcome>,
    /// Counters since start.
    pub counters: Counters,
    /// Generation of the desired set.
    pub generation: u64,
    /// The next time a hold expires, when one does.
    pub next_expiry: Option<Time>,
    /// Holds suspended because their target became protected.
    pub suspended: usize,
    /// Enforced holds with protected addresses excepted inside (local enforcement only).
    pub excepted: usize,
}

/// What `show ADDR` shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// The target (normalised as the agent blocks it).
    pub target: IpNet,
    /// Its current hold.
    pub hold: Option<BlockRecord>,
    /// Offenses that count now (within `forget_after`, in the current mode).
    pub counted_offenses: u32,
    /// Every offense recorded, with evidence, oldest first.
    pub offenses: Vec<OffenseRecord>,
    /// Its terminations.
    pub terminations: Vec<TerminationRecord>,
    /// The reconnects applied to it.
    pub reconnects: Vec<ReconnectRecord>,
    /// Its last audit entries, oldest first.
    pub audit: Vec<AuditRecord>,
    /// Offenses on record for it, `offenses` or not.
    pub offenses_total: u64,
    /// Audit entries on record about it, `audit` or not.
    pub audit_total: u64,
}

/// What a policy load changed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyOutcome {
    /// Decisions (reconnects applied, protected targets released).
    pub decisions: Vec<Decision>,
    /// The outcome of every reconnect entry.
    pub reconnects: Vec<ReconnectOutcome>,
}

#[derive(Clone, Copy, Debug)]
struct Mark {
    time: Time,
    dry_run: bool,
}

#[derive(Default)]
struct Batch {
    changes: Vec<Change>,
    decisions: Vec<Decision>,
    /// Circuit breaker trips and re-arms, for the notify hook once the batch is recorded.
    events: Vec<BreakerEvent>,
    dirty: bool,
}

impl Batch {
    #[allow(clippy::too_many_arguments)]
    fn audit(
        &mut self,
        time: Time,
        actor: &str,
        action: &str,
        target: Option<IpNet>,
        reason: String,
        dry_run: bool,
        detail: serde_json::Value,
    ) {
        self.push_audit(time, actor, action, target, reason, dry_run, detail);
    }

    /// A breaker trip or re-arm: logged, audited, and kept for the notify hook.
    fn breaker_event(&mut self, ev: BreakerEvent, dry_run: bool) {
        let action = match ev.change {
            BreakerChange::Tripped => {
                error!(
                    network = %ev.network,
                    name = ev.name.as_deref().unwrap_or(""),
                    count = ev.count,
                    limit = ev.limit,
                    rearms_at = %ev.rearms_at.map(|t| t.to_string()).unwrap_or_default(),
                    "circuit breaker tripped: this network takes no new automatic blocks until it re-arms; other networks are not affected"
                );
                actions::BREAKER_TRIPPED
            }
            BreakerChange::Rearmed => {
                warn!(network = %ev.network, by = %ev.by, "circuit breaker re-armed");
                if ev.by == "cool-down" {
                    actions::BREAKER_REARMED
                } else {
                    actions::BREAKER_RESET
                }
            }
        };
        let actor = if ev.by == "cool-down" {
            AGENT.to_owned()
        } else {
            ev.by.clone()
        };
        self.push_audit(
            ev.time,
            &actor,
            action,
            Some(ev.network),
            ev.reason.clone(),
            dry_run,
            json!({ "breaker": ev }),
        );
        self.events.push(ev);
    }

    #[allow(clippy::too_many_arguments)]
    fn push_audit(
        &mut self,
        time: Time,
        actor: &str,
        action: &str,
        target: Option<IpNet>,
        reason: String,
        dry_run: bool,
        detail: serde_json::Value,
    ) {
        self.changes.push(Change::Audit(AuditEntry {
            time,
            actor: actor.to_owned(),
            action: action.to_owned(),
            target,
            reason,
            dry_run,
            detail,
        }));
    }
}

/// The decision task's state machine. See the module documentation for the rules.
pub struct Decider {
    policy: Arc<Policy>,
    store: Store,
    infra: InfraSet,
    holds: holds::Holds,
    suspended: BTreeMap<IpNet, Protection>,
    offenses: BTreeMap<IpNet, Vec<Mark>>,
    used: BTreeMap<String, ReconnectRecord>,
    seen: BTreeMap<String, Time>,
    refusals_logged: BTreeMap<String, Refusal>,
    breaker: breaker::Breaker,
    /// Breaker events of recorded batches, until the daemon takes them.
    breaker_events: Vec<BreakerEvent>,
    counters: Counters,
    generation: u64,
    outcomes: Vec<ReconnectOutcome>,
    startup: Vec<Decision>,
    now: Time,
    /// The latest ordering stamp handed out or recorded ([`Decider::stamp`]).
    last_stamp: Time,
    next_prune: Time,
}

impl fmt::Debug for Decider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decider")
            .field("store", &self.store)
            .field("holds", &self.holds.len())
            .field("generation", &self.generation)
            .finish()
    }
}

impl Decider {
    /// Restores the decision state from `store` at `now`: holds still due are kept, holds that
    /// expired while the agent was down are dropped (and audited), dry-run holds are discarded
    /// when the policy enforces, and the reconnect list is checked. What that changed is in
    /// [`Decider::take_startup_decisions`]; the reconnect outcomes are in [`Decider::status`].
    pub fn new(
        policy: Arc<Policy>,
        store: Store,
        infra: InfraSet,
        now: Time,
    ) -> Result<Decider, DecideError> {
        let mut d = Decider {
            policy,
            store,
            infra,
            holds: holds::Holds::default(),
            suspended: BTreeMap::new(),
            offenses: BTreeMap::new(),
            used: BTreeMap::new(),
            seen: BTreeMap::new(),
            refusals_logged: BTreeMap::new(),
            breaker: breaker::Breaker::default(),
            breaker_events: Vec::new(),
            counters: Counters::default(),
            generation: 0,
            outcomes: Vec::new(),
            startup: Vec::new(),
            now,
            last_stamp: Time::EPOCH,
            next_prune: now,
        };
        d.load(now)?;
        // Holds made in the last minute count toward the breaker across a restart.
        let minute_ago = now.saturating_sub(Duration::from_secs(60));
        let mut recent: Vec<(Time, IpNet)> = d
            .holds
            .values()
            .filter(|h| h.actor == AGENT && h.since > minute_ago)
            .map(|h| (h.since, h.target))
            .collect();
        recent.sort_by_key(|h| h.0);
        for (t, target) in recent {
            d.breaker.record(t, &target, &d.policy);
        }

        let snapshot = d.breaker.clone();
        let mut b = Batch::default();
        let expired: Vec<IpNet> = d
            .holds
            .values()
            .filter(|h| h.expires.is_some_and(|e| e <= now))
            .map(|h| h.target)
            .collect();
        for t in expired {
            d.expire(t, now, "expired while the agent was not running", &mut b);
        }
        for h in d.holds.values() {
            b.decisions.push(Decision {
                time: now,
                target: h.target,
                kind: Some(h.kind),
                expires: h.expires,
                offense: h.offense,
                cause: Cause::Restore,
                dry_run: h.dry_run,
            });
        }
        let restored = d.holds.len();
        b.audit(
            now,
            AGENT,
            actions::RESTORE,
            None,
            format!("{restored} holds restored from the state database"),
            false,
            json!({ "restored": restored, "policy": d.policy.source.digest }),
        );
        info!(restored, path = %d.store.path().display(), "state restored");
        if d.policy.enforcing() {
            d.discard_dry_run(now, &mut b);
        }
        d.review_protection(now, "policy", &mut b);
        let outcomes = d.check_reconnects(now, &mut b);
        d.outcomes = outcomes;
        b.dirty = true;
        d.startup = d.finish(b, snapshot, now)?;
        Ok(d)
    }

    /// The decisions [`Decider::new`] took (expired holds dropped, holds restored, reconnects
    /// applied); empty after the first call.
    pub fn take_startup_decisions(&mut self) -> Vec<Decision> {
        std::mem::take(&mut self.startup)
    }

    /// Rebuilds the in-memory state from the database.
    fn load(&mut self, now: Time) -> Result<(), StateError> {
        // The high-water time survives restarts: the latest time the records hold.
        if let Some(latest) = self.store.latest_time()? {
            self.tick_time(latest);
            self.last_stamp = self.last_stamp.max(latest);
        }
        self.holds = holds::Holds::from_records(&self.policy, self.store.blocks()?);
        self.used = self
            .store
            .reconnects()?
            .into_iter()
            .map(|r| (r.ticket.clone(), r))
            .collect();
        self.seen = self.store.tickets_seen()?.into_iter().collect();
        self.load_offenses(now)
    }

    fn load_offenses(&mut self, now: Time) -> Result<(), StateError> {
        let since = now.saturating_sub(self.policy.escalation.forget_after);
        self.offenses.clear();
        for (target, time, dry_run) in self.store.offense_marks_since(since)? {
            self.offenses
                .entry(target)
                .or_default()
                .push(Mark { time, dry_run });
        }
        Ok(())
    }

    /// Commits a batch (write-ahead) and returns its decisions; on failure rolls the
    /// in-memory state back to the database's.
    fn finish(
        &mut self,
        b: Batch,
        breaker_snapshot: breaker::Breaker,
        now: Time,
    ) -> Result<Vec<Decision>, DecideError> {
        match self.store.commit(&b.changes) {
            Ok(()) => {
                if b.dirty {
                    self.generation += 1;
                }
                self.breaker_events.extend(b.events);
                Ok(b.decisions)
            }
            Err(e) => {
                error!(error = %error_chain(&e), "decision batch not recorded: nothing in it is decided");
                self.breaker = breaker_snapshot;
                if let Err(e2) = self.load(now) {
                    error!(error = %error_chain(&e2), "reloading the state after a failed batch failed");
                }
                Err(DecideError::State(e))
            }
        }
    }

    /// Removes the hold on `target` (and its suspension).
    fn drop_hold(&mut self, target: &IpNet) -> Option<BlockRecord> {
        self.suspended.remove(target);
        self.holds.remove(&self.policy, target)
    }

    fn dry(&self) -> bool {
        !self.policy.enforcing()
    }

    /// A time for ordering — a hold's start, a ticket's first sighting — after everything
    /// recorded before: `now`, or just after the high-water time when the wall clock is
    /// behind it (stepped back). So a ticket seen before a hold stays before it.
    fn stamp(&mut self, now: Time) -> Time {
        let t = if now > self.last_stamp {
            now
        } else {
            Time(self.last_stamp.0.saturating_add(1))
        };
        self.last_stamp = t;
        self.tick_time(t);
        t
    }

    fn tick_time(&mut self, now: Time) {
        if now > self.now {
            self.now = now;
        }
    }

    /// The target the agent holds for an offending source: an address (IPv6 widened to
    /// `enforcement.ipv6_block_prefix`), or a prefix as given.
    pub fn target_of(&self, source: IpNet) -> IpNet {
        if source.prefix_len() == source.max_prefix_len() {
            self.policy.block_target(source.addr())
        } else {
            source.trunc()
        }
    }

    /// Whether `target` is protected (it lies wholly inside allowlisted space or the
    /// infrastructure), and how. A target that merely *contains* protected addresses is not
    /// protected: it is held with them excepted ([`Decider::exceptions`]).
    pub fn protection(&self, target: &IpNet) -> Option<Protection> {
        self.protected_range(target).map(|(_, p)| p)
    }

    /// The protection of `target` with the range it overlaps, when it is one that holds
    /// whatever the policy says: special addresses (loopback, link-local, multicast, ...),
    /// in or around the target; next hops and connected subnets' network and broadcast
    /// addresses when the target lies inside one (a wider target holds them excepted).
    fn always_protected(&self, target: &IpNet) -> Option<(IpNet, Protection)> {
        special::special(target).or_else(|| {
            self.infra
                .always_overlaps(target)
                .filter(|(r, _)| r.contains(target))
        })
    }

    fn protected_range(&self, target: &IpNet) -> Option<(Option<IpNet>, Protection)> {
        if let Some((r, p)) = self.always_protected(target) {
            Some((Some(r), p))
        } else if self.policy.allow_covers(target) {
            Some((None, Protection::Allowlisted))
        } else if self.policy.protect_infrastructure && self.infra.covers(target) {
            Some((None, Protection::Infrastructure))
        } else {
            None
        }
    }

    /// The protected addresses and prefixes strictly inside `target` (allowlisted, and with
    /// `protect_infrastructure` the infrastructure): a hold of `target` excepts them.
    pub fn exceptions(&self, target: &IpNet) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self.policy.allow_inside(target).collect();
        if self.policy.protect_infrastructure {
            out.extend(self.infra.inside(target));
        }
        // Next hops and subnet edges inside a wider target, whatever the policy says.
        out.extend(
            self.infra
                .always
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| target.contains(n) && !n.contains(target)),
        );
        IpNet::aggregate(&out)
    }

    /// Whether the hold on `target` is suspended because its target became protected, and
    /// by what. A suspended hold stays recorded but is not enforced; only an operator
    /// (`unblock`, a reconnect) lifts it, and it is enforced again once the protection goes.
    pub fn suspension(&self, target: &IpNet) -> Option<Protection> {
        self.suspended.get(target).copied()
    }

    fn counted_offenses(&self, target: &IpNet, now: Time) -> u32 {
        let forget = self.policy.escalation.forget_after;
        let dry = self.dry();
        let n = self.offenses.get(target).map_or(0, |marks| {
            marks
                .iter()
                .filter(|m| (dry || !m.dry_run) && now.since(m.time) < forget)
                .count()
        });
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Handles one detection; see [`Decider::on_detections`].
    pub fn on_detection(&mut self, d: &Detection) -> Result<Vec<Decision>, DecideError> {
        self.on_detections(std::slice::from_ref(d))
    }

    /// Handles a batch of detections (the daemon drains its channel into one batch): one
    /// transaction for all of them. Returns the holds made, escalated and expired.
    pub fn on_detections(&mut self, ds: &[Detection]) -> Result<Vec<Decision>, DecideError> {
        let snapshot = self.breaker.clone();
        let mut b = Batch::default();
        let mut now = self.now;
        for d in ds {
            now = now.max(d.time);
            self.detection(d, &mut b);
        }
        self.tick_time(now);
        self.finish(b, snapshot, now)
    }

    fn detection(&mut self, d: &Detection, b: &mut Batch) {
        let now = d.time;
        let target = self.target_of(d.source);
        let dry = self.dry();
        self.counters.detections += 1;
        let crossed: Vec<String> = d
            .evidence
            .crossed
            .iter()
            .map(|c| format!("{} {} > {}", c.signal, c.value, c.threshold))
            .collect();

        if let Some(p) = self.protection(&target) {
            self.counters.protected += 1;
            info!(addr = %target, category = %d.category, protection = %p, "detection ignored: protected address");
            b.audit(
                now,
                AGENT,
                actions::PROTECTED,
                Some(target),
                format!("{} detected, but the address is {p}", d.category),
                dry,
                json!({ "category": d.category, "profile": d.profile, "crossed": crossed, "protection": p }),
            );
            return;
        }

        // A hold that ran out but was not ticked away yet is gone.
        if self
            .holds
            .get(&target)
            .is_some_and(|h| h.expires.is_some_and(|e| e <= now))
        {
            self.expire(target, now, "expired", b);
        }

        let action = self.policy.action(d.category).clone();
        let number = self.counted_offenses(&target, now).saturating_add(1);
        let rung = *self.policy.escalation.rung(number, action.start_at);
        let existing = self.holds.get(&target).cloned();
        match &existing {
            Some(h) => {
                let escalates = h.kind == BlockKind::Quarantine
                    && rung.kind > h.kind
                    && d.evidence.window_start >= h.since;
                if !escalates {
                    self.counters.while_held += 1;
                    debug!(addr = %target, category = %d.category, held = %h.kind, "detection of a held address: no new offense");
                    return;
                }
            }
            None => {
                self.rearm_due(now, b);
                if let Err((s, trip)) =
                    self.breaker
                        .check(now, &target, &self.policy, &self.holds, dry)
                {
                    self.suppress(d, target, s, trip, crossed, b);
                    return;
                }
            }
        }

        let expires = match rung.hold {
            Hold::For(dur) => Some(now.saturating_add(dur)),
            Hold::UntilReconnect | Hold::Forever => None,
        };
        let reason = format!(
            "{} offense {number}: {}",
            d.category,
            if crossed.is_empty() {
                "threshold crossed".to_owned()
            } else {
                crossed.join(", ")
            }
        );
        b.changes.push(Change::Offense(Box::new(OffenseRecord {
            target,
            time: now,
            number,
            category: d.category,
            profile: d.profile.clone(),
            kind: rung.kind,
            expires,
            dry_run: dry,
            evidence: d.evidence.clone(),
        })));
        self.offenses.entry(target).or_default().push(Mark {
            time: now,
            dry_run: dry,
        });
        let since = self.stamp(now);
        let block = BlockRecord {
            target,
            kind: rung.kind,
            since,
            expires,
            offense: number,
            category: Some(d.category),
            reason: reason.clone(),
            actor: AGENT.to_owned(),
            dry_run: dry,
            service: self.service_of(d, &target),
        };
        b.changes.push(Change::PutBlock(block.clone()));
        self.holds.insert(&self.policy, block);
        if rung.kind == BlockKind::Terminate && !dry {
            b.changes.push(Change::Terminate(TerminationRecord {
                target,
                since: now,
                offense: number,
                reason: reason.clone(),
                lifted_at: None,
                lifted_by: None,
            }));
        }
        if existing.is_none() {
            self.breaker.record(now, &target, &self.policy);
        }
        self.counters.offenses += 1;
        b.audit(
            now,
            AGENT,
            actions::HOLD,
            Some(target),
            reason,
            dry,
            json!({
                "kind": rung.kind,
                "offense": number,
                "expires": expires,
                "category": d.category,
                "profile": d.profile,
                "escalated_from": existing.as_ref().map(|h| h.kind),
            }),
        );
        info!(
            addr = %target,
            category = %d.category,
            offense = number,
            kind = %rung.kind,
            expires = ?expires.map(|e| e.to_string()),
            dry_run = dry,
            "address held"
        );
        b.decisions.push(Decision {
            time: now,
            target,
            kind: Some(rung.kind),
            expires,
            offense: number,
            cause: Cause::Detection {
                category: d.category,
            },
            dry_run: dry,
        });
        b.dirty = true;
    }

    fn suppress(
        &mut self,
        d: &Detection,
        target: IpNet,
        s: Suppression,
        trip: Option<BreakerEvent>,
        crossed: Vec<String>,
        b: &mut Batch,
    ) {
        let dry = self.dry();
        self.counters.suppressed += 1;
        if let Some(ev) = trip {
            self.counters.breaker_trips += 1;
            b.breaker_event(ev, dry);
        }
        match &s {
            Suppression::PerMinute { .. } => {}
            Suppression::Network {
                prefix,
                active,
                limit,
            } => {
                error!(network = %prefix, active, limit, addr = %target, "circuit breaker: network at its block limit, block suppressed");
            }
            Suppression::Tripped { network, .. } => {
                warn!(addr = %target, network = %network, category = %d.category, "circuit breaker of this network tripped: block suppressed");
            }
            Suppression::OutsideNetworks => {
                warn!(addr = %target, category = %d.category, "detection outside every customer network: not blocked");
            }
        }
        b.audit(
            d.time,
            AGENT,
            actions::SUPPRESSED,
            Some(target),
            format!("{} detected; not blocked: {s}", d.category),
            dry,
            json!({
                "category": d.category,
                "profile": d.profile,
                "crossed": crossed,
                "suppression": s,
                "evidence": d.evidence,
            }),
        );
    }

    /// Re-arms the network entries whose cool-down is over.
    fn rearm_due(&mut self, now: Time, b: &mut Batch) {
        let dry = self.dry();
        for ev in self.breaker.rearm_due(now, &self.policy) {
            b.breaker_event(ev, dry);
        }
    }

    fn service_of(&self, d: &Detection, target: &IpNet) -> Service {
        let profile = self
            .policy
            .profiles
            .get(&d.profile)
            .or_else(|| self.policy.profile_of(target.addr()).map(|p| p.1));
        match (d.category, profile) {
            (Category::Spam, Some(p)) => Service {
                proto: Some(proto::TCP),
                dports: p.spam.ports.clone(),
            },
            (Category::BruteForce, Some(p)) => Service {
                proto: Some(proto::TCP),
                dports: p.brute_force.ports.clone(),
            },
            _ => {
                let mut dports: Vec<u16> = d
                    .evidence
                    .top_ports
                    .iter()
                    .take(MAX_SERVICE_PORTS)
                    .map(|c| c.key)
                    .collect();
                dports.sort_unstable();
                dports.dedup();
                let first = d.evidence.sample.first().map(|s| s.proto);
                let proto = first.filter(|p| d.evidence.sample.iter().all(|s| s.proto == *p));
                Service { proto, dports }
            }
        }
    }

    /// Removes the hold on `target` because it ran out.
    fn expire(&mut self, target: IpNet, now: Time, why: &str, b: &mut Batch) {
        let Some(h) = self.drop_hold(&target) else {
            return;
        };
        self.counters.expired += 1;
        b.changes.push(Change::RemoveBlock(target));
        b.audit(
            now,
            AGENT,
            actions::EXPIRE,
            Some(target),
            why.to_owned(),
            h.dry_run,
            json!({ "kind": h.kind, "since": h.since, "expires": h.expires, "offense": h.offense }),
        );
        info!(addr = %target, kind = %h.kind, "block expired");
        b.decisions.push(Decision {
            time: now,
            target,
            kind: None,
            expires: None,
            offense: h.offense,
            cause: Cause::Expiry,
            dry_run: h.dry_run,
        });
        b.dirty = true;
    }

    /// Lifts the holds that ran out by `now`, forgets offenses older than `forget_after`.
    /// Call it on a timer (at least at [`Decider::next_expiry`]).
    pub fn on_tick(&mut self, now: Time) -> Result<Vec<Decision>, DecideError> {
        self.tick_time(now);
        let due: Vec<IpNet> = self
            .holds
            .values()
            .filter(|h| h.expires.is_some_and(|e| e <= now))
            .map(|h| h.target)
            .collect();
        // Counting ignores old offenses anyway; dropping them only frees memory, so once a
        // minute is enough (a walk over every offender of the last `forget_after`).
        if now >= self.next_prune {
            self.next_prune = now.saturating_add(Duration::from_secs(60));
            let forget = self.policy.escalation.forget_after;
            self.offenses.retain(|_, marks| {
                marks.retain(|m| now.since(m.time) < forget);
                !marks.is_empty()
            });
        }
        let rearm = self
            .breaker
            .next_rearm(&self.policy)
            .is_some_and(|t| t <= now);
        if due.is_empty() && !rearm {
            return Ok(Vec::new());
        }
        let snapshot = self.breaker.clone();
        let mut b = Batch::default();
        for t in due {
            self.expire(t, now, "expired", &mut b);
        }
        self.rearm_due(now, &mut b);
        self.finish(b, snapshot, now)
    }

    /// The wall clock stepped by `delta_ns` (positive: forward) at `now`, as the daemon's
    /// monotonic clock tells. Hold durations are monotonic — the kernel's timeouts are
    /// relative — so every hold's expiry moves by the same amount: a forward step lifts
    /// nothing early, a backward one extends nothing. Recorded and audited as one batch.
    pub fn clock_stepped(
        &mut self,
        delta_ns: i64,
        now: Time,
    ) -> Result<Vec<Decision>, DecideError> {
        let shift = |t: Time| {
            Time(if delta_ns >= 0 {
                t.0.saturating_add(delta_ns.unsigned_abs())
            } else {
                t.0.saturating_sub(delta_ns.unsigned_abs())
            })
        };
        let moved: Vec<BlockRecord> = self
            .holds
            .values()
            .filter(|h| h.expires.is_some())
            .map(|h| BlockRecord {
                expires: h.expires.map(shift),
                ..h.clone()
            })
            .collect();
        let snapshot = self.breaker.clone();
        let mut b = Batch::default();
        let secs = delta_ns as f64 / 1e9;
        let when = now.max(self.now);
        for h in &moved {
            b.changes.push(Change::PutBlock(h.clone()));
            b.audit(
                when,
                AGENT,
                actions::CLOCK_STEP,
                Some(h.target),
                format!(
                    "the wall clock stepped {} by {:.1} s; the hold's expiry moved with it to {} (its remaining time is unchanged)",
                    if delta_ns >= 0 { "forward" } else { "back" },
                    secs.abs(),
                    h.expires.map(|t| t.to_string()).unwrap_or_default()
                ),
                h.dry_run,
                serde_json::json!({ "delta_ns": delta_ns }),
            );
            self.holds.insert(&self.policy, h.clone());
        }
        b.dirty = !moved.is_empty();
        info!(
            delta_ms = delta_ns / 1_000_000,
            holds = moved.len(),
            "hold expiries moved with the clock step"
        );
        self.tick_time(now);
        self.finish(b, snapshot, now)
    }

    /// The earliest expiry of any hold.
    pub fn next_expiry(&self) -> Option<Time> {
        self.holds.values().filter_map(|h| h.expires).min()
    }

    /// When [`Decider::on_tick`] has work next: the earliest hold expiry or circuit breaker
    /// re-arm.
    pub fn next_timer(&self) -> Option<Time> {
        [self.next_expiry(), self.breaker.next_rearm(&self.policy)]
            .into_iter()
            .flatten()
            .min()
    }

    /// The circuit breaker trips and re-arms of the batches recorded since the last call (for
    /// the notify hook).
    pub fn take_breaker_events(&mut self) -> Vec<BreakerEvent> {
        std::mem::take(&mut self.breaker_events)
    }

    /// `egressguard block TARGET --reason R --for D` from `user`. `duration: None` holds until
    /// an unblock or a reconnect. Only targets inside a customer network entry: see
    /// [`Decider::on_operator_block_scoped`].
    pub fn on_operator_block(
        &mut self,
        target: IpNet,
        reason: &str,
        duration: Option<Duration>,
        user: &str,
        now: Time,
    ) -> Result<Vec<Decision>, DecideError> {
        self.on_operator_block_scoped(target, reason, duration, user, now, BlockScope::Networks)
    }

    /// `egressguard block TARGET --reason R --for D [--outside-networks]` from `user`. A
    /// target outside every customer network entry is refused unless `scope` is
    /// [`BlockScope::Anywhere`]; a protected target is refused whatever the scope.
    pub fn on_operator_block_scoped(
        &mut self,
        target: IpNet,
        reason: &str,
        duration: Option<Duration>,
        user: &str,
        now: Time,
        scope: BlockScope,
    ) -> Result<Vec<Decision>, DecideError> {
        let target = self.target_of(target);
        self.tick_time(now);
        let refuse = |refusal| Err(DecideError::Refused { target, refusal });
        if reason.trim().is_empty() {
            return refuse(OperatorRefusal::NoReason);
        }
        match self.protected_range(&target) {
            Some((Some(range), protection)) => {
                warn!(addr = %target, user, %protection, %range, "operator block refused: never blocked");
                return refuse(OperatorRefusal::Never {
                    protection,
                    range,
                    inside: range.contains(&target),
                });
            }
            Some((None, protection)) => {
                warn!(addr = %target, user, %protection, "operator block refused: protected address");
                return refuse(OperatorRefusal::Protected { protection });
            }
            None => {}
        }
        let inside = self
            .policy
            .networks
            .iter()
            .any(|n| n.prefix.contains(&target));
        if !inside && scope != BlockScope::Anywhere {
            warn!(addr = %target, user, "operator block refused: outside the customer networks");
            return refuse(OperatorRefusal::OutsideNetworks);
        }
        let snapshot = self.breaker.clone();
        let mut b = Batch::default();
        if self
            .holds
            .get(&target)
            .is_some_and(|h| h.expires.is_some_and(|e| e <= now))
        {
            self.expire(target, now, "expired", &mut b);
        }
        let existing = self.holds.get(&target).cloned();
        if existing
            .as_ref()
            .is_some_and(|h| h.kind == BlockKind::Terminate)
        {
            return refuse(OperatorRefusal::AlreadyTerminated);
        }
        let new_expiry = duration.map(|d| now.saturating_add(d));
        let (kind, expires, offense, category, service, since) = match &existing {
            Some(h) => (
                h.kind.max(BlockKind::Block),
                match (h.expires, new_expiry) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                },
                h.offense,
                h.category,
                h.service.clone(),
                h.since,
            ),
            None => (
                BlockKind::Block,
                new_expiry,
                0,
                None,
                Service::default(),
                self.stamp(now),
            ),
        };
        // In dry-run mode an operator block is a would-be hold like any other: recorded,
        // listed and replied to as dry-run, enforced by nothing. An enforced hold it extends
        // (kept from before a switch to dry-run) stays enforced.
        let dry = existing
            .as_ref()
            .map_or(!self.policy.enforcing(), |h| h.dry_run);
        let block = BlockRecord {
            target,
            kind,
            since,
            expires,
            offense,
            category,
            reason: reason.to_owned(),
            actor: user.to_owned(),
            dry_run: dry,
            service,
        };
        b.changes.push(Change::PutBlock(block.clone()));
        self.holds.insert(&self.policy, block);
        self.counters.operator_blocks += 1;
        b.audit(
            now,
            user,
            actions::OPERATOR_BLOCK,
            Some(target),
            reason.to_owned(),
            dry,
            json!({ "kind": kind, "expires": expires, "duration": duration.map(|d| humantime::format_duration(d).to_string()), "previous": existing.as_ref().map(|h| h.kind) }),
        );
        info!(addr = %target, user, reason, kind = %kind, "operator block");
        b.decisions.push(Decision {
            time: now,
            target,
            kind: Some(kind),
            expires,
            offense: 0,
            cause: Cause::Operator {
                user: user.to_owned(),
                reason: reason.to_owned(),
            },
            dry_run: dry,
        });
        b.dirty = true;
        self.finish(b, snapshot, now)
    }

    /// `egressguard unblock TARGET --ticket T` from `user`. Refuses terminated targets.
    /// The offense history stays: the next offense climbs the ladder.
    pub fn on_operator_unblock(
        &mut self,
        target: IpNet,
        ticket: &str,
        user: &str,
        now: Time,
    ) -> Result<Vec<Decision>, DecideError> {
        let target = self.target_of(target);
        self.tick_time(now);
        let refuse = |refusal| Err(DecideError::Refused { target, refusal });
        if ticket.trim().is_empty() {
            return refuse(OperatorRefusal::NoTicket);
        }
        let Some(h) = self
            .holds
            .get(&target)
            .filter(|h| h.expires.is_none_or(|e| e > now))
            .cloned()
        else {
            return refuse(OperatorRefusal::NotBlocked);
        };
        if h.kind == BlockKind::Terminate {
            warn!(addr = %target, user, ticket, "operator unblock refused: terminated");
            return refuse(OperatorRefusal::Terminated);
        }
        let snapshot = self.breaker.clone();
        let mut b = Batch::default();
        self.drop_hold(&target);
        b.changes.push(Change::RemoveBlock(target));
        self.counters.operator_unblocks += 1;
        b.audit(
            now,
            user,
            actions::OPERATOR_UNBLOCK,
            Some(target),
            ticket.to_owned(),
            h.dry_run,
            json!({ "kind": h.kind, "since": h.since, "offense": h.offense }),
        );
        info!(addr = %target, user, ticket, "operator unblock");
        b.decisions.push(Decision {
            time: now,
            target,
            kind: None,
            expires: None,
            offense: h.offense,
            cause: Cause::Operator {
                user: user.to_owned(),
                reason: ticket.to_owned(),
            },
            dry_run: h.dry_run,
        });
        b.dirty = true;
        self.finish(b, snapshot, now)
    }

    /// Resets every tripped circuit breaker (operator command); returns whether one was
    /// tripped.
    pub fn reset_breaker(&mut self, user: &str, now: Time) -> Result<bool, DecideError> {
        Ok(!self.reset_breakers(None, user, now)?.is_empty())
    }

    /// `egressguard breaker reset [NETWORK]` from `user`: re-arms the network entry `network`
    /// names (its prefix, an address or prefix inside it, or its name), or every entry when
    /// `None`. Returns the entries that were tripped and are re-armed now (audited, and
    /// in [`Decider::take_breaker_events`]).
    pub fn reset_breakers(
        &mut self,
        network: Option<&str>,
        user: &str,
        now: Time,
    ) -> Result<Vec<BreakerEvent>, DecideError> {
        self.tick_time(now);
        let which = match network {
            None => None,
            Some(spec) => match self.policy.find_network(spec) {
                Some(n) => Some(n.prefix),
                None => {
                    return Err(DecideError::UnknownNetwork {
                        spec: spec.to_owned(),
                        known: self
                            .policy
                            .networks
                            .iter()
                            .map(|n| match &n.name {
                                Some(name) => format!("{} ({name})", n.prefix),
                                None => n.prefix.to_string(),
                            })
                            .collect(),
                    });
                }
            },
        };
        let snapshot = self.breaker.clone();
        let mut b = Batch::default();
        let events = self.breaker.reset(which.as_ref(), user, now, &self.policy);
        let dry = self.dry();
        for ev in &events {
            b.breaker_event(ev.clone(), dry);
        }
        if events.is_empty() {
            info!(
                user,
                network = network.unwrap_or("all"),
                "circuit breaker reset: nothing was tripped"
            );
        }
        self.finish(b, snapshot, now)?;
        Ok(events)
    }

    /// A new (validated) policy, on reload: swaps it in, discards dry-run holds when it
    /// switches to enforce, keeps the circuit breaker state of the network entries still in
    /// the policy (re-arming those whose new cool-down is over), releases targets that became
    /// protected, and checks every reconnect authorisation.
    pub fn on_policy(
        &mut self,
        policy: Arc<Policy>,
        now: Time,
    ) -> Result<PolicyOutcome, DecideError> {
        self.tick_time(now);
        let was_dry = self.dry();
        self.policy = policy;
        self.holds.recount(&self.policy);
        if let Err(e) = self.load_offenses(now) {
            return Err(DecideError::State(e));
        }
        let snapshot = self.breaker.clone();
        let mut b = Batch::default();
        if was_dry && self.policy.enforcing() {
            self.discard_dry_run(now, &mut b);
        }
        self.breaker.retain(&self.policy);
        self.rearm_due(now, &mut b);
        self.review_protection(now, "policy", &mut b);
        let reconnects = self.check_reconnects(now, &mut b);
        b.dirty = true;
        let decisions = self.finish(b, snapshot, now)?;
        self.outcomes = reconnects.clone();
        Ok(PolicyOutcome {
            decisions,
            reconnects,
        })
    }

    /// Replaces the infrastructure set (the router's addresses changed); releases holds
    /// whose targets became protected.
    pub fn set_infra(&mut self, infra: InfraSet, now: Time) -> Result<Vec<Decision>, DecideError> {
        self.tick_time(now);
        self.infra = infra;
        let snapshot = self.breaker.clone();
        let mut b = Batch::default();
        self.review_protection(now, "infrastructure", &mut b);
        self.finish(b, snapshot, now)
    }

    fn discard_dry_run(&mut self, now: Time, b: &mut Batch) {
        let dry: Vec<IpNet> = self
            .holds
            .values()
            .filter(|h| h.dry_run)
            .map(|h| h.target)
            .collect();
        if dry.is_empty() {
            return;
        }
        for t in &dry {
            self.drop_hold(t);
            b.changes.push(Change::RemoveBlock(*t));
        }
        warn!(
            count = dry.len(),
            "policy now enforces: dry-run holds discarded"
        );
        b.audit(
            now,
            AGENT,
            actions::DRY_RUN_DISCARDED,
            None,
            format!(
                "{} dry-run holds discarded: the policy now enforces",
                dry.len()
            ),
            false,
            json!({ "targets": dry }),
        );
        b.dirty = true;
    }

    /// Suspends the holds whose target became protected and resumes the ones that are not
    /// protected any more, auditing each change. Nothing is lifted here: a protection change
    /// is the policy's or the router's, never an operator's decision about the customer, so
    /// a hold (a termination included) stays recorded until an operator lifts it.
    fn review_protection(&mut self, now: Time, actor: &str, b: &mut Batch) {
        let mut now_suspended = BTreeMap::new();
        for h in self.holds.values() {
            if let Some(p) = self.protection(&h.target) {
                now_suspended.insert(h.target, p);
            }
        }
        for (t, p) in &now_suspended {
            if self.suspended.get(t) == Some(p) {
                continue;
            }
            let Some(h) = self.holds.get(t) else { continue };
            let reason = format!(
                "the address is now {p}: the {} is suspended (not enforced) until an operator \
                 lifts it with `unblock` or a reconnect, or the protection is removed",
                h.kind
            );
            warn!(addr = %t, protection = %p, kind = %h.kind, "hold suspended: address is protected; lift it by unblock or reconnect");
            b.audit(
                now,
                actor,
                actions::PROTECTED_SUSPEND,
                Some(*t),
                reason,
                h.dry_run,
                json!({ "kind": h.kind, "protection": p, "offense": h.offense }),
            );
            b.dirty = true;
        }
        for (t, p) in &self.suspended {
            if now_suspended.contains_key(t) {
                continue;
            }
            let Some(h) = self.holds.get(t) else { continue };
            warn!(addr = %t, was = %p, kind = %h.kind, "suspended hold enforced again: the address is not protected any more");
            b.audit(
                now,
                actor,
                actions::PROTECTED_RESUME,
                Some(*t),
                format!(
                    "the address is not {p} any more: the {} is enforced again",
                    h.kind
                ),
                h.dry_run,
                json!({ "kind": h.kind, "was": p, "offense": h.offense }),
            );
            b.dirty = true;
        }
        self.suspended = now_suspended;
    }

    fn check_reconnects(&mut self, now: Time, b: &mut Batch) -> Vec<ReconnectOutcome> {
        let policy = Arc::clone(&self.policy);
        let mut out = Vec::with_capacity(policy.reconnect.len());
        for r in &policy.reconnect {
            let target = r.address;
            let result = match self.check_one(r, now, b) {
                Ok(h) => {
                    self.apply_reconnect(r, h, now, b);
                    ReconnectResult::Applied
                }
                Err(refusal) => {
                    let first = self.refusals_logged.get(&r.ticket) != Some(&refusal);
                    if first && !matches!(refusal, Refusal::UsedBefore { .. }) {
                        self.counters.reconnects_refused += 1;
                        warn!(addr = %target, ticket = %r.ticket, reason = %refusal, "reconnect refused");
                        b.audit(
                            now,
                            &r.authorised_by,
                            actions::RECONNECT_REFUSED,
                            Some(target),
                            r.ticket.clone(),
                            self.dry(),
                            json!({ "refusal": refusal, "text": refusal.to_string() }),
                        );
                    }
                    self.refusals_logged
                        .insert(r.ticket.clone(), refusal.clone());
                    ReconnectResult::Refused(refusal)
                }
            };
            out.push(ReconnectOutcome {
                ticket: r.ticket.clone(),
                address: target,
                result,
            });
        }
        out
    }

    fn check_one(
        &mut self,
        r: &crate::policy::Reconnect,
        now: Time,
        b: &mut Batch,
    ) -> Result<BlockRecord, Refusal> {
        if !self.used.contains_key(&r.ticket) && !self.seen.contains_key(&r.ticket) {
            let stamp = self.stamp(now);
            self.seen.insert(r.ticket.clone(), stamp);
            b.changes.push(Change::TicketSeen {
                ticket: r.ticket.clone(),
                target: r.address,
                time: stamp,
            });
        }
        self.evaluate(&self.policy, r, now).cloned()
    }

    /// The reconnect rules of one entry against the current state, without changing it.
    fn evaluate(
        &self,
        policy: &Policy,
        r: &crate::policy::Reconnect,
        now: Time,
    ) -> Result<&BlockRecord, Refusal> {
        if let Some(u) = self.used.get(&r.ticket) {
            return Err(Refusal::UsedBefore {
                applied_at: u.applied_at,
                address: u.target,
            });
        }
        // A ticket not seen yet would be seen now. Both are judged by the agent's high-water
        // time: a wall clock stepped back re-opens no authorisation that had expired, and
        // cannot order a ticket after a hold it preceded.
        let hwm = now.max(self.now);
        let seen = self.seen.get(&r.ticket).copied().unwrap_or(hwm);
        if hwm > r.expires {
            return Err(Refusal::Expired { expires: r.expires });
        }
        let missing: Vec<String> = policy
            .reconnect_requires
            .difference(&r.conditions)
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(Refusal::MissingConditions { missing });
        }
        let Some(h) = self
            .holds
            .get(&r.address)
            .filter(|h| h.expires.is_none_or(|e| e > now))
        else {
            return Err(Refusal::NotBlocked);
        };
        if h.since > seen {
            return Err(Refusal::PredatesBlock {
                seen,
                blocked_since: h.since,
            });
        }
        if h.kind == BlockKind::Terminate && !r.override_termination {
            return Err(Refusal::Terminated);
        }
        Ok(h)
    }

    /// What `policy`'s reconnect list would do if it were loaded at `now`, without applying
    /// anything or recording any ticket (for `check` and a reload preview over the control
    /// socket).
    pub fn preview_reconnects(&self, policy: &Policy, now: Time) -> Vec<ReconnectOutcome> {
        policy
            .reconnect
            .iter()
            .map(|r| ReconnectOutcome {
                ticket: r.ticket.clone(),
                address: r.address,
                result: match self.evaluate(policy, r, now) {
                    Ok(_) => ReconnectResult::Applied,
                    Err(refusal) => ReconnectResult::Refused(refusal),
                },
            })
            .collect()
    }

    fn apply_reconnect(
        &mut self,
        r: &crate::policy::Reconnect,
        h: BlockRecord,
        now: Time,
        b: &mut Batch,
    ) {
        let target = h.target;
        self.drop_hold(&target);
        b.changes.push(Change::RemoveBlock(target));
        if h.kind == BlockKind::Terminate && !h.dry_run {
            b.changes.push(Change::LiftTermination {
                target,
                time: now,
                ticket: r.ticket.clone(),
            });
        }
        let rec = ReconnectRecord {
            ticket: r.ticket.clone(),
            target,
            authorised_by: r.authorised_by.clone(),
            applied_at: now,
            conditions: r.conditions.iter().cloned().collect(),
            override_termination: r.override_termination,
        };
        b.changes.push(Change::Reconnect(rec.clone()));
        self.used.insert(r.ticket.clone(), rec);
        self.counters.reconnects_applied += 1;
        b.audit(
            now,
            &r.authorised_by,
            actions::RECONNECT,
            Some(target),
            r.ticket.clone(),
            h.dry_run,
            json!({
                "lifted": h.kind,
                "offense": h.offense,
                "conditions": r.conditions,
                "override_termination": r.override_termination,
            }),
        );
        info!(addr = %target, ticket = %r.ticket, authorised_by = %r.authorised_by, lifted = %h.kind, "reconnect applied");
        b.decisions.push(Decision {
            time: now,
            target,
            kind: None,
            expires: None,
            offense: h.offense,
            cause: Cause::Reconnect {
                ticket: r.ticket.clone(),
                authorised_by: r.authorised_by.clone(),
            },
            dry_run: h.dry_run,
        });
        b.dirty = true;
    }

    /// Whether `h` is announced at all: by its rung's `announce:` (a hold whose kind no
    /// longer matches its rung, after a reload or an operator's escalation, by its kind's
    /// default); an operator's own hold (no category) is a block, announced.
    fn announced(&self, h: &BlockRecord) -> bool {
        let default = crate::policy::defaults::rung_announce(h.kind);
        match h.category {
            Some(c) if h.offense > 0 => {
                let rung = self
                    .policy
                    .escalation
                    .rung(h.offense, self.policy.action(c).start_at);
                if rung.kind == h.kind {
                    rung.announce
                } else {
                    default
                }
            }
            _ => default,
        }
    }

    fn desired_block(&self, h: &BlockRecord) -> DesiredBlock {
        // What to announce and how narrowly: the category's action, or for an operator's
        // hold the `operator_blocks:` setting (the whole source: it names no service).
        let (announce, proto, dports, rate) = match h.category {
            Some(c) => {
                let a = self.policy.action(c);
                let (proto, dports) = match a.flowspec_match {
                    FlowspecMatch::Source => (None, Vec::new()),
                    FlowspecMatch::Service => (h.service.proto, h.service.dports.clone()),
                };
                (&a.announce, proto, dports, a.rate_limit)
            }
            None => {
                let o = &self.policy.operator_blocks;
                (&o.announce, None, Vec::new(), o.rate_limit)
            }
        };
        let announce = if self.announced(h) {
            announce.clone()
        } else {
            Vec::new()
        };
        let flowspec = announce
            .contains(&Announce::Flowspec)
            .then_some(FlowspecScope {
                proto,
                dports,
                rate_bytes_per_sec: rate,
            });
        let except = self.exceptions(&h.target);
        // A hold with protected addresses inside is enforced here only: a BGP announcement
        // or a blackhole route of the whole target would cut them off elsewhere.
        let (announce, flowspec) = if except.is_empty() {
            (announce, flowspec)
        } else {
            (Vec::new(), None)
        };
        DesiredBlock {
            target: h.target,
            kind: h.kind,
            expires: h.expires,
            announce,
            flowspec,
            except,
        }
    }

    fn desired_where(&self, dry_run: bool) -> DesiredBlocks {
        DesiredBlocks {
            generation: self.generation,
            blocks: self
                .holds
                .values()
                .filter(|h| h.dry_run == dry_run && !self.suspended.contains_key(&h.target))
                .map(|h| (h.target, self.desired_block(h)))
                .collect(),
            learnt: Default::default(),
        }
    }

    /// The complete set of blocks the enforcers should hold now (enforced holds only). Send
    /// it to the enforcers after every batch that returned decisions, and after start.
    pub fn desired(&self) -> DesiredBlocks {
        self.desired_where(false)
    }

    /// The dry-run holds: what would be enforced if the policy enforced.
    pub fn would_enforce(&self) -> DesiredBlocks {
        self.desired_where(true)
    }

    /// The generation of the desired set; it changes with every batch that changed holds.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every hold, enforced and dry-run, ordered by target (for `list`).
    pub fn list(&self) -> Vec<BlockRecord> {
        self.holds.values().cloned().collect()
    }

    /// The hold on `target`, when one.
    pub fn hold(&self, target: &IpNet) -> Option<&BlockRecord> {
        self.holds.get(&self.target_of(*target))
    }

    /// Offenses, hold, reconnects and audit of one target (for `show ADDR`).
    pub fn history(&self, target: IpNet) -> Result<History, DecideError> {
        self.history_page(target, None, 100, 0)
    }

    /// One page of the history of `target` (`show`): at most `limit` offenses (all when
    /// `None`) and `audit_limit` audit entries, after skipping the `offset` newest of each.
    pub fn history_page(
        &self,
        target: IpNet,
        limit: Option<usize>,
        audit_limit: usize,
        offset: usize,
    ) -> Result<History, DecideError> {
        let target = self.target_of(target);
        Ok(History {
            target,
            hold: self.holds.get(&target).cloned(),
            counted_offenses: self.counted_offenses(&target, self.now),
            offenses: self.store.offenses_page(target, limit, offset)?,
            offenses_total: self.store.offense_count_of(target)?,
            audit_total: self.store.audit_count_of(target)?,
            terminations: self
                .store
                .terminations()?
                .into_iter()
                .filter(|t| t.target == target)
                .collect(),
            reconnects: self
                .used
                .values()
                .filter(|r| r.target == target)
                .cloned()
                .collect(),
            audit: self.store.audit_page(Some(target), audit_limit, offset)?,
        })
    }

    /// The state for `status`.
    pub fn status(&self) -> DecideStatus {
        let mut blocks_by_kind = BTreeMap::new();
        let mut dry_run_by_kind = BTreeMap::new();
        for h in self.holds.values() {
            let m = if h.dry_run {
                &mut dry_run_by_kind
            } else {
                &mut blocks_by_kind
            };
            *m.entry(h.kind).or_insert(0) += 1;
        }
        DecideStatus {
            mode: self.policy.mode,
            policy_digest: self.policy.source.digest.clone(),
            blocks_by_kind,
            dry_run_by_kind,
            breaker: self
                .breaker
                .status(self.now, &self.policy, &self.holds, self.dry()),
            last_reconnect_outcomes: self.outcomes.clone(),
            counters: self.counters.clone(),
            generation: self.generation,
            next_expiry: self.next_expiry(),
            suspended: self.suspended.len(),
            excepted: self
                .holds
                .values()
                .filter(|h| !h.dry_run && !self.exceptions(&h.target).is_empty())
                .count(),
        }
    }

    /// Whether the circuit breaker of any network entry is tripped.
    pub fn breaker_tripped(&self) -> bool {
        self.breaker.is_tripped()
    }

    /// Whether the circuit breaker of the network entry `network` is tripped.
    pub fn breaker_tripped_in(&self, network: &IpNet) -> bool {
        self.breaker.is_tripped_in(network)
    }

    /// The policy in force.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// The store (read access, e.g. the audit trail for the CLI).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Gives the store back (shutdown).
    pub fn into_store(self) -> Store {
        self.store
    }
}

#[cfg(test)]
mod tests;
