//! The active holds, keyed by target, with a running count per customer network entry of the
//! customer aggregates its automatic holds span, so the circuit breaker's per-network cap
//! costs O(log n) per new block.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::policy::Policy;
use crate::state::BlockRecord;

/// Holds by target plus, per (network entry, dry run), the customer aggregates held.
#[derive(Clone, Debug, Default)]
pub(super) struct Holds {
    map: BTreeMap<IpNet, BlockRecord>,
    /// (entry, dry run, aggregate) → automatic holds inside the aggregate.
    per_aggregate: BTreeMap<(IpNet, bool, IpNet), u32>,
    /// (entry, dry run) → aggregates with at least one automatic hold.
    per_network: BTreeMap<(IpNet, bool), u32>,
}

/// The (entry, aggregate) an automatic hold counts toward; operator holds count toward none.
fn slot(policy: &Policy, b: &BlockRecord) -> Option<(IpNet, IpNet)> {
    if b.actor != super::AGENT {
        return None;
    }
    policy
        .network_of(b.target.addr())
        .map(|n| (n.prefix, n.aggregate_of(&b.target)))
}

/// Counts `b` in (`up`) or out of the per-aggregate and per-network counts.
fn count(
    per_aggregate: &mut BTreeMap<(IpNet, bool, IpNet), u32>,
    per_network: &mut BTreeMap<(IpNet, bool), u32>,
    policy: &Policy,
    b: &BlockRecord,
    up: bool,
) {
    let Some((net, agg)) = slot(policy, b) else {
        return;
    };
    let key = (net, b.dry_run, agg);
    let c = per_aggregate.entry(key).or_insert(0);
    let was = *c;
    *c = if up {
        c.saturating_add(1)
    } else {
        c.saturating_sub(1)
    };
    let now = *c;
    if now == 0 {
        per_aggregate.remove(&key);
    }
    let n = per_network.entry((net, b.dry_run)).or_insert(0);
    match (was, now) {
        (0, x) if x > 0 => *n = n.saturating_add(1),
        (x, 0) if x > 0 => *n = n.saturating_sub(1),
        _ => {}
    }
}

impl Holds {
    /// Builds from records; counts per network from `policy`.
    pub(super) fn from_records(policy: &Policy, records: Vec<BlockRecord>) -> Holds {
        let mut h = Holds {
            map: records.into_iter().map(|b| (b.target, b)).collect(),
            per_aggregate: BTreeMap::new(),
            per_network: BTreeMap::new(),
        };
        h.recount(policy);
        h
    }

    /// Recounts per network (after a policy change moved the networks).
    pub(super) fn recount(&mut self, policy: &Policy) {
        self.per_aggregate.clear();
        self.per_network.clear();
        for b in self.map.values() {
            count(
                &mut self.per_aggregate,
                &mut self.per_network,
                policy,
                b,
                true,
            );
        }
    }

    fn count(&mut self, policy: &Policy, b: &BlockRecord, up: bool) {
        count(
            &mut self.per_aggregate,
            &mut self.per_network,
            policy,
            b,
            up,
        );
    }

    pub(super) fn insert(&mut self, policy: &Policy, b: BlockRecord) -> Option<BlockRecord> {
        self.count(policy, &b, true);
        let old = self.map.insert(b.target, b);
        if let Some(o) = &old {
            self.count(policy, o, false);
        }
        old
    }

    pub(super) fn remove(&mut self, policy: &Policy, target: &IpNet) -> Option<BlockRecord> {
        let old = self.map.remove(target);
        if let Some(o) = &old {
            self.count(policy, o, false);
        }
        old
    }

    pub(super) fn get(&self, target: &IpNet) -> Option<&BlockRecord> {
        self.map.get(target)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &BlockRecord> {
        self.map.values()
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Customer aggregates with an automatic hold of the given mode inside the network entry
    /// `prefix`.
    pub(super) fn in_network(&self, prefix: &IpNet, dry_run: bool) -> u32 {
        self.per_network
            .get(&(*prefix, dry_run))
            .copied()
            .unwrap_or(0)
    }

    /// Whether the aggregate `agg` of the entry `prefix` has an automatic hold of the given
    /// mode.
    pub(super) fn holds_aggregate(&self, prefix: &IpNet, dry_run: bool, agg: &IpNet) -> bool {
        self.per_aggregate.contains_key(&(*prefix, dry_run, *agg))
    }
}
