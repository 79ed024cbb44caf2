//! The circuit breaker: per customer network entry, a cap on new automatic holds per minute
//! (a fuse that trips and re-arms by itself) and a cap on active automatic holds, both counted
//! per *customer aggregate*, so that a bad threshold cannot take a whole network offline and
//! no customer can switch the agent off for anybody else.
//!
//! Rules (see also the `decide` module documentation):
//!
//! * **Customer aggregate.** Each network entry says how wide one customer's allocation is
//!   (`networks[i].customer_prefix`, IPv4 default /32, IPv6 default /64). Holds inside one
//!   aggregate count once: a customer using 25 addresses of its /64 (whatever
//!   `ipv6_block_prefix` is) uses one unit of its entry's budget, not 25. A hold wider than
//!   the aggregate counts once too.
//! * **Per entry.** Every budget and every trip belongs to the network entry the hold falls
//!   in (`policy.networks`, longest prefix). A tripped entry never stops holds in another.
//! * **Per minute.** At most `max_new_blocks_per_minute` aggregates get a new automatic hold
//!   (a target that was not held becoming held) within any 60 s of event time, per entry. The
//!   hold after that *trips* the entry: it takes no new automatic holds, its detections go on
//!   and are recorded as suppressed with their evidence. The trip is logged, audited, sent to
//!   the notify hook and counted in the metrics.
//! * **Re-arm.** A tripped entry re-arms by itself `circuit_breaker.cool_down` (default 10m)
//!   after it tripped, or when an operator resets it (`egressguard breaker reset [NETWORK]`,
//!   [`super::Decider::reset_breaker`]). Re-arming starts a fresh per-minute budget, so a storm
//!   that is still going makes at most `max_new_blocks_per_minute` more holds in that entry
//!   before it trips again. A reload keeps the state of every entry still in the policy (the
//!   new `cool_down` applies to a trip in progress); a restart re-arms every entry but counts
//!   the automatic holds of the last minute again.
//! * **Active holds.** An entry whose active automatic holds span `max_blocks_per_network`
//!   aggregates takes no new aggregate until some lift (holds inside an aggregate already held
//!   are still made). This does not trip anything: it is a cap, not a fuse.
//! * **Outside every entry.** A detection whose target lies in no network entry is never held
//!   (suppressed as `outside_networks`): the agent acts on its customers only. The observers
//!   only watch customer sources, so this happens only when a reload removed the entry while
//!   the detection was on its way.
//! * Escalating an address that is already held (quarantine → block) is not a new hold and is
//!   not capped. Operator blocks are neither capped nor counted: a human asked for them, and
//!   they never use up an entry's automatic budget.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::holds::Holds;
use crate::messages::{BreakerChange, BreakerEvent, Time};
use crate::policy::{Network, Policy};

const WINDOW: Duration = Duration::from_secs(60);

/// Why a new hold was not made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum Suppression {
    /// The network entry's breaker is tripped.
    Tripped {
        /// The network entry.
        network: IpNet,
        /// When it tripped.
        since: Time,
        /// When it re-arms by itself.
        rearms_at: Time,
    },
    /// This hold would have been one more than the entry's per-minute cap: its breaker trips
    /// now.
    PerMinute {
        /// The network entry.
        network: IpNet,
        /// Customer aggregates newly held in the entry in the last minute.
        count: u32,
        /// The cap.
        limit: u32,
        /// When it re-arms by itself.
        rearms_at: Time,
    },
    /// The customer network entry is at its cap of active holds.
    Network {
        /// The network entry.
        prefix: IpNet,
        /// Customer aggregates held inside it.
        active: u32,
        /// The cap.
        limit: u32,
    },
    /// The target lies in no customer network entry.
    OutsideNetworks,
}

impl fmt::Display for Suppression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Suppression::Tripped {
                network,
                since,
                rearms_at,
            } => write!(
                f,
                "the circuit breaker of network {network} is tripped since {since}; it re-arms \
                 at {rearms_at}, or run `egressguard breaker reset {network}`"
            ),
            Suppression::PerMinute {
                network,
                count,
                limit,
                rearms_at,
            } => write!(
                f,
                "{count} customers newly held in network {network} within a minute reached its \
                 limit of {limit}: its circuit breaker trips until {rearms_at}"
            ),
            Suppression::Network {
                prefix,
                active,
                limit,
            } => write!(
                f,
                "network {prefix} already holds {active} customers, its limit is {limit}"
            ),
            Suppression::OutsideNetworks => {
                f.write_str("the address is in no customer network of the policy")
            }
        }
    }
}

/// The breaker as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerStatus {
    /// Whether any network entry is tripped.
    pub tripped: bool,
    /// Since when the earliest trip in force.
    pub tripped_since: Option<Time>,
    /// Why the earliest trip in force tripped.
    pub reason: Option<String>,
    /// Customer aggregates newly held in the last minute, all entries together.
    pub new_blocks_last_minute: u32,
    /// The per-minute cap of each entry.
    pub max_new_blocks_per_minute: u32,
    /// The per-network cap.
    pub max_blocks_per_network: u32,
    /// How long a trip lasts unless reset.
    #[serde(default)]
    pub cool_down_secs: u64,
    /// Customer networks at their cap.
    pub networks_at_limit: Vec<NetworkLoad>,
    /// Every network entry's breaker, in policy order (most specific first).
    #[serde(default)]
    pub networks: Vec<NetworkBreaker>,
    /// Detections that would have made a hold but were suppressed, since start.
    pub suppressed: u64,
}

/// Active holds of one customer network entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkLoad {
    /// The network entry.
    pub prefix: IpNet,
    /// Its label.
    pub name: Option<String>,
    /// Customer aggregates held inside it.
    pub active: u32,
    /// The cap.
    pub limit: u32,
}

/// One network entry's breaker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkBreaker {
    /// The network entry.
    pub prefix: IpNet,
    /// Its label.
    pub name: Option<String>,
    /// The width of one customer aggregate in it.
    pub customer_prefix: u8,
    /// When it tripped, while tripped.
    pub tripped_since: Option<Time>,
    /// When it re-arms by itself, while tripped.
    pub rearms_at: Option<Time>,
    /// Why it tripped, while tripped.
    pub reason: Option<String>,
    /// Customer aggregates newly held in the last minute.
    pub new_last_minute: u32,
    /// Customer aggregates held now (automatic holds of the current mode).
    pub active: u32,
    /// Detections suppressed in this entry since start.
    pub suppressed: u64,
}

/// One entry's state: the aggregates newly held in the window, and the trip.
#[derive(Clone, Debug, Default)]
struct Entry {
    /// Aggregate → the time of its latest new hold within the window.
    recent: BTreeMap<IpNet, Time>,
    /// The same, ordered by time, for pruning.
    order: BTreeSet<(Time, IpNet)>,
    /// When it tripped and why.
    tripped: Option<(Time, String)>,
    suppressed: u64,
}

impl Entry {
    fn prune(&mut self, now: Time) {
        let start = now.saturating_sub(WINDOW);
        while let Some(&(t, agg)) = self.order.first() {
            if t > start {
                break;
            }
            self.order.pop_first();
            self.recent.remove(&agg);
        }
    }

    fn count(&self, now: Time) -> u32 {
        let start = now.saturating_sub(WINDOW);
        let n = self
            .order
            .iter()
            .rev()
            .take_while(|(t, _)| *t > start)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn record(&mut self, now: Time, agg: IpNet) {
        if let Some(old) = self.recent.insert(agg, now) {
            self.order.remove(&(old, agg));
        }
        self.order.insert((now, agg));
    }

    fn rearm(&mut self) -> Option<(Time, String)> {
        let t = self.tripped.take();
        if t.is_some() {
            self.recent.clear();
            self.order.clear();
        }
        t
    }
}

/// Breaker state of every network entry; small and cheap to clone (a batch keeps a copy to
/// roll back to).
#[derive(Clone, Debug, Default)]
pub(super) struct Breaker {
    entries: BTreeMap<IpNet, Entry>,
    pub(super) suppressed: u64,
}

// One field per argument of the event it builds.
#[allow(clippy::too_many_arguments)]
fn event(
    net: &Network,
    change: BreakerChange,
    time: Time,
    by: &str,
    reason: String,
    rearms_at: Option<Time>,
    count: u32,
    limit: u32,
) -> BreakerEvent {
    BreakerEvent {
        time,
        change,
        network: net.prefix,
        name: net.name.clone(),
        count,
        limit,
        rearms_at,
        by: by.to_owned(),
        reason,
    }
}

impl Breaker {
    /// Whether a new automatic hold on `target` may be made at `now`. On a per-minute
    /// overflow the target's entry trips and the event is returned with the suppression (the
    /// caller logs, audits and notifies it).
    // The rare refusal carries the trip event by value; the common path returns `Ok(())`.
    #[allow(clippy::result_large_err)]
    pub(super) fn check(
        &mut self,
        now: Time,
        target: &IpNet,
        policy: &Policy,
        holds: &Holds,
        dry_run: bool,
    ) -> Result<(), (Suppression, Option<BreakerEvent>)> {
        let Some(net) = policy.network_of(target.addr()) else {
            self.suppressed += 1;
            return Err((Suppression::OutsideNetworks, None));
        };
        let cool_down = policy.circuit_breaker.cool_down;
        let agg = net.aggregate_of(target);
        let e = self.entries.entry(net.prefix).or_default();
        e.prune(now);
        let refuse = |e: &mut Entry, s: Suppression, ev: Option<BreakerEvent>| {
            e.suppressed += 1;
            Err((s, ev))
        };
        if let Some((since, _)) = &e.tripped {
            let since = *since;
            self.suppressed += 1;
            return refuse(
                e,
                Suppression::Tripped {
                    network: net.prefix,
                    since,
                    rearms_at: since.saturating_add(cool_down),
                },
                None,
            );
        }
        let limit = policy.circuit_breaker.max_new_blocks_per_minute;
        let count = e.count(now);
        if !e.recent.contains_key(&agg) && count >= limit {
            let rearms_at = now.saturating_add(cool_down);
            let s = Suppression::PerMinute {
                network: net.prefix,
                count,
                limit,
                rearms_at,
            };
            e.tripped = Some((now, s.to_string()));
            let ev = event(
                net,
                BreakerChange::Tripped,
                now,
                super::AGENT,
                s.to_string(),
                Some(rearms_at),
                count,
                limit,
            );
            self.suppressed += 1;
            return refuse(e, s, Some(ev));
        }
        let cap = policy.circuit_breaker.max_blocks_per_network;
        let active = holds.in_network(&net.prefix, dry_run);
        if active >= cap && !holds.holds_aggregate(&net.prefix, dry_run, &agg) {
            self.suppressed += 1;
            return refuse(
                e,
                Suppression::Network {
                    prefix: net.prefix,
                    active,
                    limit: cap,
                },
                None,
            );
        }
        Ok(())
    }

    /// Counts a new automatic hold on `target` made at `now`.
    pub(super) fn record(&mut self, now: Time, target: &IpNet, policy: &Policy) {
        if let Some(net) = policy.network_of(target.addr()) {
            let agg = net.aggregate_of(target);
            let e = self.entries.entry(net.prefix).or_default();
            e.prune(now);
            e.record(now, agg);
        }
    }

    /// Re-arms the entries whose cool-down is over by `now`; returns their events.
    pub(super) fn rearm_due(&mut self, now: Time, policy: &Policy) -> Vec<BreakerEvent> {
        let cool_down = policy.circuit_breaker.cool_down;
        let mut out = Vec::new();
        for net in &policy.networks {
            let Some(e) = self.entries.get_mut(&net.prefix) else {
                continue;
            };
            if e.tripped
                .as_ref()
                .is_some_and(|(since, _)| since.saturating_add(cool_down) <= now)
            {
                let (since, _) = e.rearm().unwrap_or_default();
                out.push(event(
                    net,
                    BreakerChange::Rearmed,
                    now,
                    "cool-down",
                    format!(
                        "the cool-down of {} since the trip at {since} is over",
                        crate::policy::format_duration(cool_down)
                    ),
                    None,
                    0,
                    policy.circuit_breaker.max_new_blocks_per_minute,
                ));
            }
        }
        out
    }

    /// The earliest time a tripped entry re-arms by itself.
    pub(super) fn next_rearm(&self, policy: &Policy) -> Option<Time> {
        let cool_down = policy.circuit_breaker.cool_down;
        self.entries
            .values()
            .filter_map(|e| e.tripped.as_ref().map(|(t, _)| t.saturating_add(cool_down)))
            .min()
    }

    /// Resets the tripped entries among `which` (all when `None`); returns their events.
    pub(super) fn reset(
        &mut self,
        which: Option<&IpNet>,
        by: &str,
        now: Time,
        policy: &Policy,
    ) -> Vec<BreakerEvent> {
        let mut out = Vec::new();
        for net in &policy.networks {
            if which.is_some_and(|w| *w != net.prefix) {
                continue;
            }
            let Some(e) = self.entries.get_mut(&net.prefix) else {
                continue;
            };
            if let Some((since, _)) = e.rearm() {
                out.push(event(
                    net,
                    BreakerChange::Rearmed,
                    now,
                    by,
                    format!("reset by {by} (tripped at {since})"),
                    None,
                    0,
                    policy.circuit_breaker.max_new_blocks_per_minute,
                ));
            }
        }
        out
    }

    /// Forgets the entries the policy no longer has (after a reload).
    pub(super) fn retain(&mut self, policy: &Policy) {
        self.entries
            .retain(|p, _| policy.networks.iter().any(|n| n.prefix == *p));
    }

    /// Whether any entry is tripped.
    pub(super) fn is_tripped(&self) -> bool {
        self.entries.values().any(|e| e.tripped.is_some())
    }

    /// Whether the entry `network` is tripped.
    pub(super) fn is_tripped_in(&self, network: &IpNet) -> bool {
        self.entries
            .get(network)
            .is_some_and(|e| e.tripped.is_some())
    }

    pub(super) fn status(
        &self,
        now: Time,
        policy: &Policy,
        holds: &Holds,
        dry_run: bool,
    ) -> BreakerStatus {
        let cb = &policy.circuit_breaker;
        let empty = Entry::default();
        let mut networks = Vec::with_capacity(policy.networks.len());
        for n in &policy.networks {
            let e = self.entries.get(&n.prefix).unwrap_or(&empty);
            networks.push(NetworkBreaker {
                prefix: n.prefix,
                name: n.name.clone(),
                customer_prefix: n.customer_prefix,
                tripped_since: e.tripped.as_ref().map(|t| t.0),
                rearms_at: e.tripped.as_ref().map(|t| t.0.saturating_add(cb.cool_down)),
                reason: e.tripped.as_ref().map(|t| t.1.clone()),
                new_last_minute: e.count(now),
                active: holds.in_network(&n.prefix, dry_run),
                suppressed: e.suppressed,
            });
        }
        let first = networks
            .iter()
            .filter(|n| n.tripped_since.is_some())
            .min_by_key(|n| n.tripped_since);
        let networks_at_limit = networks
            .iter()
            .filter(|n| n.active >= cb.max_blocks_per_network)
            .map(|n| NetworkLoad {
                prefix: n.prefix,
                name: n.name.clone(),
                active: n.active,
                limit: cb.max_blocks_per_network,
            })
            .collect();
        BreakerStatus {
            tripped: first.is_some(),
            tripped_since: first.and_then(|n| n.tripped_since),
            reason: first.and_then(|n| n.reason.clone()),
            new_blocks_last_minute: networks
                .iter()
                .fold(0u32, |a, n| a.saturating_add(n.new_last_minute)),
            max_new_blocks_per_minute: cb.max_new_blocks_per_minute,
            max_blocks_per_network: cb.max_blocks_per_network,
            cool_down_secs: cb.cool_down.as_secs(),
            networks_at_limit,
            networks,
            suppressed: self.suppressed,
        }
    }
}
