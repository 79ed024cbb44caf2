//! The circuit breaker: a cap on new blocks per minute across the router and on active blocks
//! per customer network entry, so that a bad threshold cannot take a whole network offline.
//!
//! Rules (see also the `decide` module documentation):
//!
//! * **Per minute.** At most `max_new_blocks_per_minute` new holds (an address that was not
//!   held becoming held) within any 60 s of event time. The one after that *trips* the
//!   breaker. A tripped breaker latches: no new holds at all, detections go on and are
//!   recorded as suppressed, until an operator resets it ([`super::Decider::reset_breaker`])
//!   or the policy is reloaded. The new holds of the last minute still count after a reset, so
//!   a storm that is still going trips it again at once.
//! * **Per network.** A customer network entry (`policy.networks`) holding
//!   `max_blocks_per_network` active holds takes no new ones until some lift. This does not
//!   latch: it is a cap, not a fuse, and it only stops that network.
//! * Escalating an address that is already held (quarantine → block) is not a new hold and is
//!   not capped. Operator blocks are not capped either: a human asked for them.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::holds::Holds;
use crate::messages::Time;
use crate::policy::Policy;

const WINDOW: Duration = Duration::from_secs(60);

/// Why a new hold was not made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum Suppression {
    /// The breaker is tripped (latched) since this time.
    Tripped {
        /// When it tripped.
        since: Time,
    },
    /// This hold would have been one more than the per-minute cap: the breaker trips now.
    PerMinute {
        /// New holds in the last minute.
        count: u32,
        /// The cap.
        limit: u32,
    },
    /// The customer network entry is at its cap of active holds.
    Network {
        /// The network entry.
        prefix: IpNet,
        /// Active holds inside it.
        active: u32,
        /// The cap.
        limit: u32,
    },
}

impl fmt::Display for Suppression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Suppression::Tripped { since } => write!(
                f,
                "the circuit breaker is tripped since {since}; reset it or reload the policy"
            ),
            Suppression::PerMinute { count, limit } => write!(
                f,
                "{count} new blocks in the last minute reached the limit of {limit}: the circuit breaker trips"
            ),
            Suppression::Network {
                prefix,
                active,
                limit,
            } => write!(
                f,
                "network {prefix} already holds {active} blocks, its limit is {limit}"
            ),
        }
    }
}

/// The breaker as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerStatus {
    /// Whether it is tripped (no new holds anywhere).
    pub tripped: bool,
    /// Since when.
    pub tripped_since: Option<Time>,
    /// Why it tripped.
    pub reason: Option<String>,
    /// New holds in the last minute.
    pub new_blocks_last_minute: u32,
    /// The per-minute cap.
    pub max_new_blocks_per_minute: u32,
    /// The per-network cap.
    pub max_blocks_per_network: u32,
    /// Customer networks at their cap.
    pub networks_at_limit: Vec<NetworkLoad>,
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
    /// Active holds inside it.
    pub active: u32,
    /// The cap.
    pub limit: u32,
}

/// Breaker state; small and cheap to clone (a batch keeps a copy to roll back to).
#[derive(Clone, Debug, Default)]
pub(super) struct Breaker {
    recent: VecDeque<Time>,
    tripped: Option<(Time, String)>,
    pub(super) suppressed: u64,
}

impl Breaker {
    fn prune(&mut self, now: Time) {
        let start = now.saturating_sub(WINDOW);
        while self.recent.front().is_some_and(|t| *t <= start) {
            self.recent.pop_front();
        }
    }

    /// Whether a new hold on `target` may be made at `now`. On a per-minute overflow the
    /// breaker trips (the caller logs and audits it).
    pub(super) fn check(
        &mut self,
        now: Time,
        target: &IpNet,
        policy: &Policy,
        holds: &Holds,
        dry_run: bool,
    ) -> Result<(), Suppression> {
        self.prune(now);
        if let Some((since, _)) = &self.tripped {
            return Err(Suppression::Tripped { since: *since });
        }
        let limit = policy.circuit_breaker.max_new_blocks_per_minute;
        let count = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        if count >= limit {
            let s = Suppression::PerMinute { count, limit };
            self.tripped = Some((now, s.to_string()));
            return Err(s);
        }
        if let Some(net) = policy.network_of(target.addr()) {
            let limit = policy.circuit_breaker.max_blocks_per_network;
            let active = holds.in_network(&net.prefix, dry_run);
            if active >= limit {
                return Err(Suppression::Network {
                    prefix: net.prefix,
                    active,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// Counts a new hold made at `now`.
    pub(super) fn record(&mut self, now: Time) {
        self.recent.push_back(now);
    }

    /// Resets a tripped breaker; returns whether it was tripped.
    pub(super) fn reset(&mut self) -> bool {
        self.tripped.take().is_some()
    }

    /// Whether it is tripped.
    pub(super) fn is_tripped(&self) -> bool {
        self.tripped.is_some()
    }

    pub(super) fn status(
        &self,
        now: Time,
        policy: &Policy,
        holds: &Holds,
        dry_run: bool,
    ) -> BreakerStatus {
        let start = now.saturating_sub(WINDOW);
        let recent = self.recent.iter().filter(|t| **t > start).count();
        let limit = policy.circuit_breaker.max_blocks_per_network;
        let networks_at_limit = policy
            .networks
            .iter()
            .filter_map(|n| {
                let active = holds.in_network(&n.prefix, dry_run);
                (active >= limit).then(|| NetworkLoad {
                    prefix: n.prefix,
                    name: n.name.clone(),
                    active,
                    limit,
                })
            })
            .collect();
        BreakerStatus {
            tripped: self.tripped.is_some(),
            tripped_since: self.tripped.as_ref().map(|t| t.0),
            reason: self.tripped.as_ref().map(|t| t.1.clone()),
            new_blocks_last_minute: u32::try_from(recent).unwrap_or(u32::MAX),
            max_new_blocks_per_minute: policy.circuit_breaker.max_new_blocks_per_minute,
            max_blocks_per_network: limit,
            networks_at_limit,
            suppressed: self.suppressed,
        }
    }
}
