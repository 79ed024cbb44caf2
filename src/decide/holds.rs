//! The active holds, keyed by target, with a running count of holds per customer network
//! entry so the circuit breaker's per-network cap costs O(log n) per new block.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::policy::Policy;
use crate::state::BlockRecord;

/// Holds by target plus per-(network entry, dry run) counts.
#[derive(Clone, Debug, Default)]
pub(super) struct Holds {
    map: BTreeMap<IpNet, BlockRecord>,
    per_network: BTreeMap<(IpNet, bool), u32>,
}

fn network(policy: &Policy, target: &IpNet) -> Option<IpNet> {
    policy.network_of(target.addr()).map(|n| n.prefix)
}

impl Holds {
    /// Builds from records; counts per network from `policy`.
    pub(super) fn from_records(policy: &Policy, records: Vec<BlockRecord>) -> Holds {
        let mut h = Holds {
            map: records.into_iter().map(|b| (b.target, b)).collect(),
            per_network: BTreeMap::new(),
        };
        h.recount(policy);
        h
    }

    /// Recounts per network (after a policy change moved the networks).
    pub(super) fn recount(&mut self, policy: &Policy) {
        self.per_network.clear();
        for b in self.map.values() {
            if let Some(n) = network(policy, &b.target) {
                *self.per_network.entry((n, b.dry_run)).or_insert(0) += 1;
            }
        }
    }

    fn count(&mut self, policy: &Policy, b: &BlockRecord, up: bool) {
        if let Some(n) = network(policy, &b.target) {
            let c = self.per_network.entry((n, b.dry_run)).or_insert(0);
            *c = if up {
                c.saturating_add(1)
            } else {
                c.saturating_sub(1)
            };
        }
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

    /// Active holds of the given mode inside the network entry `prefix`.
    pub(super) fn in_network(&self, prefix: &IpNet, dry_run: bool) -> u32 {
        self.per_network
            .get(&(*prefix, dry_run))
            .copied()
            .unwrap_or(0)
    }
}
