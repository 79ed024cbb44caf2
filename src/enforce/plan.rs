//! The enforcer's pure core: what the table should hold ([`Want`], from the policy and the
//! desired blocks) and the difference with what the kernel holds ([`Plan`]), turned into one
//! transaction ([`Plan::to_tx`]).
//!
//! Nothing here does I/O or reads the clock: `now` comes in as an argument, so every rule of
//! the diff is unit-tested.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde_json::Value;

use super::kernel::{KernelElem, KernelTable};
use super::layout::{
    ChainId, ElemKey, Fam, MAX_TIMEOUT_SECS, Role, SetId, Structure, TableSpec, Tx,
};
use super::nlbatch::{Op, Verb};
use crate::messages::{BlockKind, DesiredBlocks, Time};
use crate::policy::Policy;

/// A timed element whose kernel expiry differs from the wanted one by more than this many
/// seconds is replaced.
pub const TOLERANCE_SECS: u64 = 2;

/// A block that would expire within this many seconds is not put into the kernel any more,
/// and one in the kernel is left to expire by itself rather than deleted (a delete racing the
/// kernel's own expiry would fail the whole transaction).
pub const EXPIRY_GRACE_SECS: u64 = 1;

/// What the agent's table and routes should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Want {
    /// Elements of every managed set, with their absolute expiry.
    pub sets: BTreeMap<SetId, BTreeMap<IpNet, Option<Time>>>,
    /// Blackhole routes (empty when they are disabled).
    pub routes: BTreeSet<IpNet>,
    /// Targets left out because a wider target of the same set covers them.
    pub covered: Vec<IpNet>,
}

/// Seconds from `now` to `expires`, rounded up; `None` when the block would lift within
/// [`EXPIRY_GRACE_SECS`] (so it is not wanted any more).
pub fn remaining_secs(expires: Time, now: Time) -> Option<u64> {
    let ns = expires.as_nanos().checked_sub(now.as_nanos())?;
    let secs = ns.div_ceil(1_000_000_000);
    (secs > EXPIRY_GRACE_SECS).then_some(secs.min(MAX_TIMEOUT_SECS))
}

fn fam_of(net: &IpNet) -> Fam {
    Fam::of(net.addr())
}

fn aggregate(nets: &[IpNet]) -> BTreeMap<IpNet, Option<Time>> {
    IpNet::aggregate(&nets.iter().map(IpNet::trunc).collect::<Vec<_>>())
        .into_iter()
        .map(|n| (n, None))
        .collect()
}

/// Drops every entry covered by a wider one of the same map (nft interval sets refuse
/// overlapping elements); returns the dropped targets.
fn drop_covered(m: &mut BTreeMap<IpNet, Option<Time>>) -> Vec<IpNet> {
    // Sorted by (network, prefix length): a covering prefix comes before what it covers, and
    // prefixes are either nested or disjoint, so one running "coverer" suffices.
    let mut covered = Vec::new();
    let mut cover: Option<IpNet> = None;
    for net in m.keys() {
        match cover {
            Some(c) if c.contains(net) => covered.push(*net),
            _ => cover = Some(*net),
        }
    }
    for n in &covered {
        m.remove(n);
    }
    covered
}

impl Want {
    /// What to hold for `desired` under `policy` at `now`. In dry-run mode the block,
    /// quarantine and learnt sets and the routes stay empty.
    ///
    /// The allow guard holds the policy's allowlist plus every block's exceptions (protected
    /// addresses inside a held prefix, such as the router's own address in a customer /64):
    /// it precedes every drop, so they stay reachable while the rest of the prefix is held.
    pub fn build(policy: &Policy, desired: &DesiredBlocks, now: Time) -> Want {
        let mut sets: BTreeMap<SetId, BTreeMap<IpNet, Option<Time>>> = BTreeMap::new();
        let excepted: Vec<IpNet> = if policy.enforcing() {
            desired
                .blocks
                .values()
                .flat_map(|b| b.except.iter().copied())
                .collect()
        } else {
            Vec::new()
        };
        for fam in [Fam::V4, Fam::V6] {
            let pick = |nets: &mut dyn Iterator<Item = IpNet>| -> Vec<IpNet> {
                nets.filter(|n| fam_of(n) == fam).collect()
            };
            let customers = pick(&mut policy.networks.iter().map(|n| n.prefix));
            let allow = pick(&mut policy.allow.iter().chain(&excepted).copied());
            let garden = pick(&mut policy.enforcement.walled_garden.iter().copied());
            sets.insert(SetId::new(Role::Customers, fam), aggregate(&customers));
            sets.insert(SetId::new(Role::Allow, fam), aggregate(&allow));
            sets.insert(SetId::new(Role::Garden, fam), aggregate(&garden));
            sets.insert(SetId::new(Role::Blocked, fam), BTreeMap::new());
            sets.insert(SetId::new(Role::Quarantine, fam), BTreeMap::new());
            sets.insert(SetId::new(Role::Learnt, fam), BTreeMap::new());
        }
        let mut want = Want {
            sets,
            routes: BTreeSet::new(),
            covered: Vec::new(),
        };
        if !policy.enforcing() {
            return want;
        }
        for block in desired.blocks.values() {
            if let Some(exp) = block.expires
                && remaining_secs(exp, now).is_none()
            {
                continue;
            }
            let target = block.target.trunc();
            let role = match block.kind {
                BlockKind::Quarantine => Role::Quarantine,
                BlockKind::Block | BlockKind::Terminate => Role::Blocked,
            };
            let id = SetId::new(role, fam_of(&target));
            let slot = want.sets.entry(id).or_default();
            // Two desired entries for one target (differently written): the later expiry wins.
            let exp = match (slot.get(&target), block.expires) {
                (Some(None), _) | (_, None) => None,
                (Some(Some(a)), Some(b)) => Some((*a).max(b)),
                (None, Some(b)) => Some(b),
            };
            slot.insert(target, exp);
        }
        for source in &desired.learnt {
            let source = source.trunc();
            want.sets
                .entry(SetId::new(Role::Learnt, fam_of(&source)))
                .or_default()
                .insert(source, None);
        }
        for role in [Role::Blocked, Role::Quarantine, Role::Learnt] {
            for fam in [Fam::V4, Fam::V6] {
                if let Some(m) = want.sets.get_mut(&SetId::new(role, fam)) {
                    want.covered.extend(drop_covered(m));
                }
            }
        }
        if policy.enforcement.blackhole.enabled {
            for fam in [Fam::V4, Fam::V6] {
                for net in want.sets[&SetId::new(Role::Blocked, fam)].keys() {
                    // A route takes the whole prefix: never blackhole one with allowlisted
                    // addresses or exceptions inside (the nft sets except them, a route
                    // cannot).
                    let excepts = desired
                        .blocks
                        .get(net)
                        .is_some_and(|b| !b.except.is_empty())
                        || excepted.iter().any(|e| net.contains(e));
                    if !policy.allow_overlaps(net) && !excepts {
                        want.routes.insert(*net);
                    }
                }
            }
        }
        want
    }

    /// The blocks as (target, kind, expires), for logging a dry run.
    pub fn holds(&self) -> BTreeMap<IpNet, (Role, Option<Time>)> {
        let mut out = BTreeMap::new();
        for (id, m) in &self.sets {
            if matches!(id.role, Role::Blocked | Role::Quarantine) {
                for (n, e) in m {
                    out.insert(*n, (id.role, *e));
                }
            }
        }
        out
    }
}

/// What happens to one element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemOp {
    /// Put in.
    Add,
    /// Taken out.
    Remove,
    /// Taken out and put in again with another timeout.
    Replace,
}

/// One element change of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElemChange {
    /// The set.
    pub set: SetId,
    /// The element.
    pub key: ElemKey,
    /// Add, remove or replace.
    pub op: ElemOp,
    /// The timeout it is put in with (seconds), for adds and replaces.
    pub timeout: Option<u64>,
}

/// The difference between the kernel and what is wanted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The table, its sets, chains and rules are (re)written.
    pub rebuild: bool,
    /// Why the structure is rewritten (empty when it is not).
    pub reasons: Vec<String>,
    /// What the rewrite does (when `rebuild`).
    pub structure: Structure,
    /// Element changes, in set order.
    pub changes: Vec<ElemChange>,
}

impl Plan {
    /// Whether the kernel already holds what is wanted.
    pub fn is_empty(&self) -> bool {
        !self.rebuild && self.changes.is_empty()
    }

    /// The one transaction that makes it so.
    pub fn to_tx(&self, spec: &TableSpec) -> Tx {
        let mut tx = self.structure_tx(spec);
        self.push_elements(spec, &mut tx);
        tx
    }

    /// The element changes alone as an nft transaction (the fast path's fallback once the
    /// structure is written).
    pub fn element_tx(&self, spec: &TableSpec) -> Tx {
        let mut tx = Tx::new();
        self.push_elements(spec, &mut tx);
        tx
    }

    fn push_elements(&self, spec: &TableSpec, tx: &mut Tx) {
        let mut dels: BTreeMap<SetId, Vec<ElemKey>> = BTreeMap::new();
        let mut adds: BTreeMap<SetId, Vec<(ElemKey, Option<u64>)>> = BTreeMap::new();
        for c in &self.changes {
            if matches!(c.op, ElemOp::Remove | ElemOp::Replace) {
                dels.entry(c.set).or_default().push(c.key);
            }
            if matches!(c.op, ElemOp::Add | ElemOp::Replace) {
                adds.entry(c.set).or_default().push((c.key, c.timeout));
            }
        }
        for (set, keys) in &dels {
            tx.delete_elements(spec, *set, keys);
        }
        for (set, elems) in &adds {
            tx.add_elements(spec, *set, elems);
        }
    }
}

impl Plan {
    /// The structure part alone (empty when the structure is fine).
    pub fn structure_tx(&self, spec: &TableSpec) -> Tx {
        let mut tx = Tx::new();
        if self.rebuild {
            tx.structure(spec, &self.structure);
        }
        tx
    }

    /// The element changes as fast-path operations (a replace is a delete and an add).
    pub fn element_ops(&self) -> Vec<Op> {
        let mut ops = Vec::with_capacity(self.changes.len());
        for c in &self.changes {
            if matches!(c.op, ElemOp::Remove | ElemOp::Replace) {
                ops.push(Op {
                    set: c.set,
                    key: c.key,
                    verb: Verb::Delete,
                    timeout_secs: None,
                });
            }
            if matches!(c.op, ElemOp::Add | ElemOp::Replace) {
                ops.push(Op {
                    set: c.set,
                    key: c.key,
                    verb: Verb::Add,
                    timeout_secs: c.timeout,
                });
            }
        }
        ops
    }

    /// The first added element that would overlap another element of its set once the plan
    /// is applied (deletes first, then adds) to `kernel`, or `None` when every interval set
    /// stays free of overlaps. The planner never produces one; this is the guard the fast
    /// path checks before it sends (the kernel would refuse the whole batch).
    pub fn overlapping_add(&self, kernel: Option<&KernelTable>) -> Option<(SetId, ElemKey)> {
        let sets: BTreeSet<SetId> = self
            .changes
            .iter()
            .filter(|c| matches!(c.op, ElemOp::Add | ElemOp::Replace))
            .map(|c| c.set)
            .collect();
        for id in sets {
            let deleted: BTreeSet<ElemKey> = self
                .changes
                .iter()
                .filter(|c| c.set == id && matches!(c.op, ElemOp::Remove | ElemOp::Replace))
                .map(|c| c.key)
                .collect();
            let fresh = self.structure.add_sets.contains(&id);
            let remaining = kernel
                .filter(|_| !fresh)
                .and_then(|k| k.sets.get(id.name()))
                .map(|s| s.elems.as_slice())
                .unwrap_or_default()
                .iter()
                .filter(|e| !deleted.contains(&e.key))
                .map(|e| (e.key, false));
            let adds = self
                .changes
                .iter()
                .filter(|c| c.set == id && matches!(c.op, ElemOp::Add | ElemOp::Replace))
                .map(|c| (c.key, true));
            let mut all: Vec<((u128, u128), ElemKey, bool)> = Vec::new();
            for (key, added) in remaining.chain(adds) {
                match span(&key) {
                    Some(s) => all.push((s, key, added)),
                    None if added => return Some((id, key)),
                    None => {}
                }
            }
            all.sort_unstable_by_key(|(s, _, _)| *s);
            // The element reaching furthest so far: any later one starting at or before its
            // end overlaps it.
            let mut reach: Option<(u128, ElemKey, bool)> = None;
            for (s, key, added) in all {
                if let Some((end, other, other_added)) = reach
                    && s.0 <= end
                {
                    if added {
                        return Some((id, key));
                    }
                    if other_added {
                        return Some((id, other));
                    }
                }
                if reach.is_none_or(|(end, _, _)| s.1 > end) {
                    reach = Some((s.1, key, added));
                }
            }
        }
        None
    }
}

fn timeout_matches(kernel: &KernelElem, want: Option<Time>, now: Time) -> bool {
    match (want, kernel.timeout, kernel.expires) {
        (None, None, _) => true,
        (Some(exp), Some(_), Some(left)) => match remaining_secs(exp, now) {
            Some(rem) => rem.abs_diff(left) <= TOLERANCE_SECS,
            None => true,
        },
        _ => false,
    }
}

/// Compares the kernel's table (`None`: it does not exist) with `want`.
///
/// `baseline` holds the normalised rules of each chain as last verified after the agent wrote
/// them; without one (at start) the rules are always written again, which is atomic and so
/// opens no gap.
pub fn plan(
    spec: &TableSpec,
    want: &Want,
    kernel: Option<&KernelTable>,
    baseline: Option<&BTreeMap<ChainId, Vec<Value>>>,
    now: Time,
) -> Plan {
    let mut p = Plan::default();
    let empty = KernelTable::default();
    let k = match kernel {
        Some(k) => k,
        None => {
            p.rebuild = true;
            p.reasons.push("table missing".into());
            &empty
        }
    };
    // Sets.
    let mut fresh: BTreeSet<SetId> = BTreeSet::new();
    for id in SetId::all() {
        match k.sets.get(id.name()) {
            None => {
                if kernel.is_some() {
                    p.rebuild = true;
                    p.reasons.push(format!("set {} missing", id.name()));
                }
                fresh.insert(id);
                p.structure.add_sets.push(id);
            }
            Some(s) => {
                let flags: Vec<&str> = s.flags.iter().map(String::as_str).collect();
                let (size, timeout) = spec.listed_size_timeout(id);
                if s.set_type != id.fam.type_name()
                    || flags != id.listed_flags()
                    || s.size != size
                    || s.timeout != timeout
                    || (id.side() && s.comment != spec.listed_comment(id))
                {
                    p.rebuild = true;
                    p.reasons
                        .push(format!("set {} has the wrong definition", id.name()));
                    p.structure.drop_sets.push(id);
                    p.structure.add_sets.push(id);
                    fresh.insert(id);
                }
            }
        }
    }
    // Chains and rules.
    for c in ChainId::ALL {
        match k.chains.get(c.name()) {
            None => {
                if kernel.is_some() {
                    p.rebuild = true;
                    p.reasons.push(format!("chain {} missing", c.name()));
                }
                p.structure.add_chains.push(c);
            }
            Some(kc) => {
                p.structure.flush.push(c);
                let props_ok = kc.chain_type.as_deref() == Some("filter")
                    && kc.hook.as_deref() == Some(c.hook_name())
                    && kc.prio == Some(i64::from(super::layout::CHAIN_PRIORITY))
                    && kc.policy.as_deref() == Some("accept");
                if !props_ok {
                    p.rebuild = true;
                    p.reasons
                        .push(format!("chain {} has the wrong definition", c.name()));
                    p.structure.drop_chains.push(c);
                    p.structure.add_chains.push(c);
                    continue;
                }
                match baseline.and_then(|b| b.get(&c)) {
                    Some(rules) if *rules == kc.rules => {}
                    Some(_) => {
                        p.rebuild = true;
                        p.reasons
                            .push(format!("rules of chain {} changed", c.name()));
                    }
                    None => {
                        p.rebuild = true;
                        if baseline.is_some() {
                            p.reasons
                                .push(format!("rules of chain {} unknown", c.name()));
                        } else {
                            p.reasons.push("start: rules written afresh".into());
                        }
                    }
                }
            }
        }
    }
    if !p.rebuild {
        p.structure = Structure::default();
    }
    p.reasons.dedup();
    // Elements.
    let no_elems = BTreeMap::new();
    for id in SetId::managed() {
        let wanted = want.sets.get(&id).unwrap_or(&no_elems);
        let have: &[KernelElem] = match k.sets.get(id.name()) {
            Some(s) if !fresh.contains(&id) => &s.elems,
            _ => &[],
        };
        let mut seen: BTreeSet<IpNet> = BTreeSet::new();
        let mut lingering: Vec<ElemKey> = Vec::new();
        for e in have {
            let wanted_exp = match e.key {
                ElemKey::Net(n) => wanted.get(&n).map(|x| (n, *x)),
                ElemKey::Range(..) => None,
            };
            match wanted_exp {
                Some((n, exp)) => {
                    seen.insert(n);
                    if !timeout_matches(e, exp, now) {
                        p.changes.push(ElemChange {
                            set: id,
                            key: e.key,
                            op: ElemOp::Replace,
                            timeout: exp.and_then(|x| remaining_secs(x, now)),
                        });
                    }
                }
                None => {
                    if e.expires.is_some_and(|left| left <= EXPIRY_GRACE_SECS) {
                        lingering.push(e.key);
                        continue;
                    }
                    p.changes.push(ElemChange {
                        set: id,
                        key: e.key,
                        op: ElemOp::Remove,
                        timeout: None,
                    });
                }
            }
        }
        for (n, exp) in wanted {
            if seen.contains(n) {
                continue;
            }
            let timeout = match exp {
                None => None,
                Some(x) => match remaining_secs(*x, now) {
                    Some(t) => Some(t),
                    None => continue,
                },
            };
            p.changes.push(ElemChange {
                set: id,
                key: ElemKey::Net(*n),
                op: ElemOp::Add,
                timeout,
            });
        }
        // An element left to expire by itself must not overlap an added one (the kernel
        // refuses overlapping intervals, and so does nft): such an element is deleted after
        // all, in the same transaction before the add. Should the kernel expire it first, the
        // delete fails the transaction and the enforcer's retry reads the table again.
        if !lingering.is_empty() {
            let adds = add_spans(p.changes.iter().filter(|c| c.set == id));
            for key in lingering {
                if span(&key).is_some_and(|s| overlaps_any(&adds, s)) {
                    p.changes.push(ElemChange {
                        set: id,
                        key,
                        op: ElemOp::Remove,
                        timeout: None,
                    });
                }
            }
        }
    }
    p
}

/// The addresses an element covers, first and last (inclusive), as integers.
pub fn span(key: &ElemKey) -> Option<(u128, u128)> {
    use std::net::IpAddr;
    let (a, b) = match key {
        ElemKey::Net(n) => (n.network(), n.broadcast()),
        ElemKey::Range(a, b) => (*a, *b),
    };
    let s = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b))),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b)),
        _ => return None,
    };
    (s.0 <= s.1).then_some(s)
}

/// The spans of the adds among `changes`, sorted by start.
fn add_spans<'a>(changes: impl Iterator<Item = &'a ElemChange>) -> Vec<(u128, u128)> {
    let mut v: Vec<(u128, u128)> = changes
        .filter(|c| matches!(c.op, ElemOp::Add | ElemOp::Replace))
        .filter_map(|c| span(&c.key))
        .collect();
    v.sort_unstable();
    v
}

/// Whether `s` overlaps one of `sorted` (sorted by start, pairwise disjoint).
fn overlaps_any(sorted: &[(u128, u128)], s: (u128, u128)) -> bool {
    // The last span starting at or before `s`'s end is the only candidate.
    let i = sorted.partition_point(|x| x.0 <= s.1);
    i > 0 && sorted[i - 1].1 >= s.0
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::enforce::kernel::{KernelChain, KernelSet};
    use crate::messages::DesiredBlock;

    fn policy(extra: &str) -> Policy {
        let mode = if extra.contains("mode:") {
            ""
        } else {
            "mode: enforce\n"
        };
        let text = format!(
            "version: 1\n{mode}networks:\n  - prefix: 203.0.113.0/24\n  - prefix: 2001:db8:c::/48\n{extra}"
        );
        Policy::from_text(&text, Path::new("<test>")).unwrap()
    }

    fn spec() -> TableSpec {
        TableSpec {
            table: "egressguard".into(),
            counter_set_size: 65536,
            meters: Default::default(),
        }
    }

    fn block(t: &str, kind: BlockKind, expires: Option<Time>) -> DesiredBlock {
        DesiredBlock {
            target: t.parse().unwrap(),
            kind,
            expires,
            announce: vec![],
            flowspec: None,
            except: vec![],
        }
    }

    fn desired(blocks: Vec<DesiredBlock>) -> DesiredBlocks {
        DesiredBlocks {
            generation: 1,
            blocks: blocks.into_iter().map(|b| (b.target, b)).collect(),
            ..DesiredBlocks::default()
        }
    }

    const NOW: Time = Time::from_secs(1_000_000);

    fn kernel_from(want: &Want) -> KernelTable {
        let spec = spec();
        let mut k = KernelTable::default();
        for id in SetId::all() {
            let (size, timeout) = spec.listed_size_timeout(id);
            let elems = want
                .sets
                .get(&id)
                .map(|m| {
                    m.iter()
                        .map(|(n, e)| {
                            let left = e.and_then(|x| remaining_secs(x, NOW));
                            KernelElem {
                                key: ElemKey::Net(*n),
                                timeout: left,
                                expires: left.map(|l| l - 1),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            k.sets.insert(
                id.name().into(),
                KernelSet {
                    set_type: id.fam.type_name().into(),
                    flags: id.listed_flags().iter().map(|s| s.to_string()).collect(),
                    size,
                    timeout,
                    comment: spec.listed_comment(id),
                    elems,
                },
            );
        }
        for c in ChainId::ALL {
            k.chains.insert(
                c.name().into(),
                KernelChain {
                    chain_type: Some("filter".into()),
                    hook: Some(c.hook_name().into()),
                    prio: Some(-10),
                    policy: Some("accept".into()),
                    rules: vec![serde_json::json!({"comment": c.name()})],
                },
            );
        }
        k
    }

    /// The plan's element changes, as (element, operation).
    fn ops(pl: &Plan) -> Vec<(String, ElemOp)> {
        pl.changes
            .iter()
            .map(|c| (c.key.to_string(), c.op))
            .collect()
    }

    fn baseline(k: &KernelTable) -> BTreeMap<ChainId, Vec<Value>> {
        ChainId::ALL
            .into_iter()
            .map(|c| (c, k.chains[c.name()].rules.clone()))
            .collect()
    }

    #[test]
    fn kinds_go_to_their_sets_with_timeouts() {
        let p = policy("");
        let d = desired(vec![
            block("203.0.113.5/32", BlockKind::Block, None),
            block("203.0.113.6/32", BlockKind::Terminate, None),
            block(
                "203.0.113.7/32",
                BlockKind::Quarantine,
                Some(NOW.saturating_add(std::time::Duration::from_millis(59_500))),
            ),
            block("2001:db8:c:1::/64", BlockKind::Block, None),
        ]);
        let w = Want::build(&p, &d, NOW);
        let b4 = &w.sets[&SetId::new(Role::Blocked, Fam::V4)];
        assert_eq!(b4.len(), 2);
        let q4 = &w.sets[&SetId::new(Role::Quarantine, Fam::V4)];
        assert_eq!(q4.len(), 1);
        assert_eq!(w.sets[&SetId::new(Role::Blocked, Fam::V6)].len(), 1);
        let pl = plan(&spec(), &w, None, None, NOW);
        assert!(pl.rebuild);
        let q = pl
            .changes
            .iter()
            .find(|c| c.set == SetId::new(Role::Quarantine, Fam::V4))
            .unwrap();
        assert_eq!(q.timeout, Some(60), "rounded up");
        let b = pl
            .changes
            .iter()
            .find(|c| c.key == ElemKey::Net("203.0.113.5/32".parse().unwrap()))
            .unwrap();
        assert_eq!(b.timeout, None, "no expiry, no timeout");
    }

    #[test]
    fn learnt_sources_go_to_their_own_sets_never_to_routes() {
        let p = policy("enforcement:\n  blackhole:\n    enabled: true\n");
        let mut d = desired(vec![]);
        d.learnt = ["203.0.113.9/32", "2001:db8:c:1::/64", "2001:db8:c:1::7/128"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let w = Want::build(&p, &d, NOW);
        let l4: Vec<String> = w.sets[&SetId::new(Role::Learnt, Fam::V4)]
            .keys()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(l4, ["203.0.113.9/32"]);
        let l6 = &w.sets[&SetId::new(Role::Learnt, Fam::V6)];
        assert_eq!(l6.len(), 1, "the /128 inside the /64 is covered: {l6:?}");
        assert!(w.sets[&SetId::new(Role::Blocked, Fam::V4)].is_empty());
        assert!(w.routes.is_empty(), "learnt rules are never blackholed");
        let pl = plan(&spec(), &w, None, None, NOW);
        assert!(
            pl.changes
                .iter()
                .any(|c| c.set == SetId::new(Role::Learnt, Fam::V4) && c.timeout.is_none())
        );
        // Dry-run enforces nothing, learnt rules included.
        let dry = Want::build(&policy("mode: dry-run\n"), &d, NOW);
        assert!(dry.sets[&SetId::new(Role::Learnt, Fam::V4)].is_empty());
    }

    #[test]
    fn expired_blocks_are_not_wanted() {
        let p = policy("");
        let d = desired(vec![
            block("203.0.113.5/32", BlockKind::Block, Some(NOW)),
            block(
                "203.0.113.6/32",
                BlockKind::Block,
                Some(NOW.saturating_add(std::time::Duration::from_millis(900))),
            ),
        ]);
        let w = Want::build(&p, &d, NOW);
        assert!(w.sets[&SetId::new(Role::Blocked, Fam::V4)].is_empty());
    }

    #[test]
    fn dry_run_wants_no_blocks_and_no_routes() {
        let p = policy("mode: dry-run\nenforcement:\n  blackhole:\n    enabled: true\n");
        let d = desired(vec![block("203.0.113.5/32", BlockKind::Block, None)]);
        let w = Want::build(&p, &d, NOW);
        assert!(w.sets[&SetId::new(Role::Blocked, Fam::V4)].is_empty());
        assert!(w.routes.is_empty());
        assert_eq!(w.sets[&SetId::new(Role::Customers, Fam::V4)].len(), 1);
    }

    #[test]
    fn routes_for_blocks_only_and_never_for_allowlisted() {
        let p = policy(
            "allow:\n  - 2001:db8:c:1::9/128\nenforcement:\n  blackhole:\n    enabled: true\n",
        );
        let d = desired(vec![
            block("203.0.113.5/32", BlockKind::Block, None),
            block("203.0.113.7/32", BlockKind::Quarantine, None),
            block("2001:db8:c:1::/64", BlockKind::Block, None),
        ]);
        let w = Want::build(&p, &d, NOW);
        assert_eq!(
            w.routes.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["203.0.113.5/32"]
        );
    }

    #[test]
    fn covered_targets_are_left_out() {
        let p = policy("");
        let d = desired(vec![
            block("203.0.113.0/28", BlockKind::Block, None),
            block("203.0.113.5/32", BlockKind::Block, None),
            block("203.0.113.17/32", BlockKind::Block, None),
        ]);
        let w = Want::build(&p, &d, NOW);
        let b4: Vec<String> = w.sets[&SetId::new(Role::Blocked, Fam::V4)]
            .keys()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(b4, ["203.0.113.0/28", "203.0.113.17/32"]);
        assert_eq!(w.covered.len(), 1);
    }

    #[test]
    fn a_kernel_in_step_needs_nothing() {
        let p = policy("");
        let d = desired(vec![
            block("203.0.113.5/32", BlockKind::Block, None),
            block(
                "203.0.113.7/32",
                BlockKind::Quarantine,
                Some(NOW.saturating_add(std::time::Duration::from_secs(600))),
            ),
        ]);
        let w = Want::build(&p, &d, NOW);
        let k = kernel_from(&w);
        let pl = plan(&spec(), &w, Some(&k), Some(&baseline(&k)), NOW);
        assert!(pl.is_empty(), "{pl:?}");
    }

    #[test]
    fn drift_is_found_element_by_element() {
        let p = policy("");
        let d = desired(vec![
            block("203.0.113.5/32", BlockKind::Block, None),
            block(
                "203.0.113.7/32",
                BlockKind::Block,
                Some(NOW.saturating_add(std::time::Duration::from_secs(600))),
            ),
        ]);
        let w = Want::build(&p, &d, NOW);
        let mut k = kernel_from(&w);
        let b4 = k.sets.get_mut("blocked4").unwrap();
        // .5 removed by hand, .7's timeout changed, .99 added by hand, .98 about to expire.
        b4.elems
            .retain(|e| e.key != ElemKey::Net("203.0.113.5/32".parse().unwrap()));
        b4.elems[0].expires = Some(30);
        b4.elems.push(KernelElem {
            key: ElemKey::Net("203.0.113.99/32".parse().unwrap()),
            timeout: None,
            expires: None,
        });
        b4.elems.push(KernelElem {
            key: ElemKey::Net("203.0.113.98/32".parse().unwrap()),
            timeout: Some(10),
            expires: Some(1),
        });
        let pl = plan(&spec(), &w, Some(&k), Some(&baseline(&k)), NOW);
        assert!(!pl.rebuild);
        assert_eq!(
            ops(&pl),
            [
                ("203.0.113.7".to_string(), ElemOp::Replace),
                ("203.0.113.99".to_string(), ElemOp::Remove),
                ("203.0.113.5".to_string(), ElemOp::Add),
            ]
        );
        let json = pl.to_tx(&spec()).to_json();
        let del = json.find(r#"{"delete""#).unwrap();
        let add = json.find(r#"{"add""#).unwrap();
        assert!(del < add, "deletes before adds: {json}");
    }

    #[test]
    fn structural_drift_rebuilds_without_touching_good_sets() {
        let p = policy("");
        let d = desired(vec![block("203.0.113.5/32", BlockKind::Block, None)]);
        let w = Want::build(&p, &d, NOW);
        let k0 = kernel_from(&w);
        let base = baseline(&k0);
        // Rules flushed by an admin.
        let mut k = k0.clone();
        k.chains.get_mut("forward").unwrap().rules.clear();
        let pl = plan(&spec(), &w, Some(&k), Some(&base), NOW);
        assert!(pl.rebuild);
        assert!(pl.changes.is_empty(), "elements untouched: {pl:?}");
        assert_eq!(pl.structure.flush, ChainId::ALL);
        assert!(
            pl.structure.add_sets.is_empty(),
            "existing sets are not re-added"
        );
        let json = pl.to_tx(&spec()).to_json();
        assert!(
            !json.contains(r#""flush":{"set""#),
            "sets are never flushed"
        );
        // A set recreated with the wrong flags: dropped, recreated and refilled.
        let mut k = k0.clone();
        k.sets.get_mut("blocked4").unwrap().flags = vec!["interval".into()];
        let pl = plan(&spec(), &w, Some(&k), Some(&base), NOW);
        assert_eq!(pl.structure.drop_sets, [SetId::new(Role::Blocked, Fam::V4)]);
        assert_eq!(pl.structure.add_sets, [SetId::new(Role::Blocked, Fam::V4)]);
        assert!(pl.changes.iter().any(
            |c| c.op == ElemOp::Add && c.key == ElemKey::Net("203.0.113.5/32".parse().unwrap())
        ));
        // The byte meter's window changed (a reload with another tolerance): the listing's
        // whole seconds cannot tell, its comment does.
        let mut k = k0.clone();
        k.sets.get_mut("meter_bytes4").unwrap().comment =
            Some("egressguard: byte quota window 600 ms".into());
        let pl = plan(&spec(), &w, Some(&k), Some(&base), NOW);
        let bytes4 = SetId::new(Role::Meter(crate::meter::Kind::Bps), Fam::V4);
        assert_eq!(pl.structure.drop_sets, [bytes4]);
        assert!(pl.structure.drops_side() && pl.structure.side_adds() == [bytes4]);
        // Chain priority changed: dropped and recreated.
        let mut k = k0.clone();
        k.chains.get_mut("input").unwrap().prio = Some(0);
        let pl = plan(&spec(), &w, Some(&k), Some(&base), NOW);
        assert_eq!(pl.structure.drop_chains, [ChainId::Input]);
        // Start: rules always rewritten, elements kept.
        let pl = plan(&spec(), &w, Some(&k0), None, NOW);
        assert!(pl.rebuild && pl.changes.is_empty());
        assert!(pl.structure.drop_sets.is_empty() && pl.structure.drop_chains.is_empty());
    }

    #[test]
    fn an_expiring_element_under_a_new_wider_block_is_deleted_first() {
        let p = policy("");
        let d = desired(vec![block("2001:db8:c:1::/64", BlockKind::Block, None)]);
        let w = Want::build(&p, &d, NOW);
        let mut k = kernel_from(&w);
        let b6 = k.sets.get_mut("blocked6").unwrap();
        b6.elems.clear();
        // A /128 inside the /64, about to expire; another one elsewhere, also expiring.
        for (a, left) in [("2001:db8:c:1::5/128", 1), ("2001:db8:c:2::5/128", 1)] {
            b6.elems.push(KernelElem {
                key: ElemKey::Net(a.parse().unwrap()),
                timeout: Some(60),
                expires: Some(left),
            });
        }
        let pl = plan(&spec(), &w, Some(&k), Some(&baseline(&k)), NOW);
        assert_eq!(
            ops(&pl),
            [
                ("2001:db8:c:1::/64".to_string(), ElemOp::Add),
                ("2001:db8:c:1::5".to_string(), ElemOp::Remove),
            ],
            "the unrelated expiring element is left to the kernel"
        );
        assert_eq!(pl.overlapping_add(Some(&k)), None);
        let ops = pl.element_ops();
        assert_eq!(ops.len(), 2);
        assert!(ops.iter().any(|o| o.verb == Verb::Delete));
    }

    #[test]
    fn overlaps_are_found_against_the_kernel_and_among_adds() {
        let p = policy("");
        let d = desired(vec![block("203.0.113.0/28", BlockKind::Block, None)]);
        let w = Want::build(&p, &d, NOW);
        let mut k = kernel_from(&w);
        k.sets.get_mut("blocked4").unwrap().elems.clear();
        let pl = plan(&spec(), &w, Some(&k), Some(&baseline(&k)), NOW);
        assert_eq!(pl.overlapping_add(Some(&k)), None);
        // Someone else's element (a range) appears in the listing the plan did not see.
        k.sets.get_mut("blocked4").unwrap().elems.push(KernelElem {
            key: ElemKey::Range(
                "203.0.113.15".parse().unwrap(),
                "203.0.113.20".parse().unwrap(),
            ),
            timeout: None,
            expires: None,
        });
        assert_eq!(
            pl.overlapping_add(Some(&k)),
            Some((
                SetId::new(Role::Blocked, Fam::V4),
                ElemKey::Net("203.0.113.0/28".parse().unwrap())
            ))
        );
        // Two adds overlapping each other.
        let mut pl2 = pl.clone();
        pl2.changes.push(ElemChange {
            set: SetId::new(Role::Blocked, Fam::V4),
            key: ElemKey::Net("203.0.113.4/32".parse().unwrap()),
            op: ElemOp::Add,
            timeout: None,
        });
        assert!(pl2.overlapping_add(None).is_some());
        // A replaced element does not overlap its own old copy; adjacent ones do not overlap.
        let mut pl3 = pl.clone();
        pl3.changes.push(ElemChange {
            set: SetId::new(Role::Blocked, Fam::V4),
            key: ElemKey::Net("203.0.113.16/32".parse().unwrap()),
            op: ElemOp::Add,
            timeout: None,
        });
        assert_eq!(pl3.overlapping_add(None), None);
    }
}
