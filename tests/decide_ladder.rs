//! The decision rules replayed through the decider with an in-memory store: the ladder,
//! reconnect authorisations, termination, allowlist and infrastructure, the circuit breaker,
//! dry run, operator commands and the desired set.

#[path = "../benches/support/stream.rs"]
mod stream;
#[path = "decide_util/mod.rs"]
mod util;

use std::sync::Arc;
use std::time::Duration;

use egressguard::decide::{
    DecideError, Decider, InfraSet, OperatorRefusal, Protection, ReconnectResult, Refusal,
};
use egressguard::messages::{Announce, BlockKind, Category, Cause, Decision, proto};
use egressguard::policy::{Mode, Policy};
use egressguard::state::{Store, actions};
use util::*;

const A: &str = "203.0.113.7";

fn decider(p: Arc<Policy>) -> Decider {
    Decider::new(
        p,
        Store::open_in_memory().unwrap(),
        InfraSet::default(),
        at(0),
    )
    .unwrap()
}

fn one(ds: Vec<Decision>) -> Decision {
    assert_eq!(ds.len(), 1, "{ds:#?}");
    ds.into_iter().next().unwrap()
}

fn held(d: &Decider, addr: &str) -> Option<BlockKind> {
    d.desired().blocks.get(&net(addr)).map(|b| b.kind)
}

fn with_reconnects(entries: &[String]) -> Arc<Policy> {
    policy(&format!("reconnect:\n{}", entries.concat()))
}

/// Quarantine → (expires) → block until reconnect → (operator unblock) → terminate.
fn climb_to_block(d: &mut Decider) {
    let q = one(d
        .on_detection(&detection(A, Category::PortScan, at(10)))
        .unwrap());
    assert_eq!(q.kind, Some(BlockKind::Quarantine));
    assert_eq!(q.offense, 1);
    assert_eq!(q.expires, Some(at(10 + HOUR)));
    assert_eq!(
        q.cause,
        Cause::Detection {
            category: Category::PortScan
        }
    );
    let e = one(d.on_tick(at(10 + HOUR)).unwrap());
    assert_eq!((e.kind, e.cause), (None, Cause::Expiry));
    assert_eq!(held(d, A), None);
    let b = one(d
        .on_detection(&detection(A, Category::PortScan, at(2 * HOUR)))
        .unwrap());
    assert_eq!(
        (b.kind, b.offense, b.expires),
        (Some(BlockKind::Block), 2, None)
    );
    assert_eq!(held(d, A), Some(BlockKind::Block));
}

#[test]
fn ladder_climbs_across_offenses() {
    let mut d = decider(policy(""));
    climb_to_block(&mut d);
    // Block until reconnect does not expire.
    assert!(d.on_tick(at(10 * DAY)).unwrap().is_empty());
    one(d
        .on_operator_unblock(net(A), "ABUSE-9", "alice", at(10 * DAY))
        .unwrap());
    let t = one(d
        .on_detection(&detection(A, Category::Spam, at(11 * DAY)))
        .unwrap());
    assert_eq!(
        (t.kind, t.offense, t.expires),
        (Some(BlockKind::Terminate), 3, None)
    );
    // The last rung repeats; a terminated address is held, so nothing new happens.
    assert!(
        d.on_detection(&detection(A, Category::Spam, at(12 * DAY)))
            .unwrap()
            .is_empty()
    );
    let h = d.history(net(A)).unwrap();
    assert_eq!(h.offenses.len(), 3);
    assert_eq!(h.offenses[0].evidence.crossed[0].signal, "distinct_ports");
    assert_eq!(h.terminations.len(), 1);
    assert_eq!(h.counted_offenses, 3);
}

#[test]
fn forget_after_expires_old_offenses() {
    let mut d = decider(policy(""));
    one(d
        .on_detection(&detection(A, Category::PortScan, at(0)))
        .unwrap());
    one(d.on_tick(at(HOUR)).unwrap());
    // 29 days later the first offense still counts: block.
    let b = one(d
        .on_detection(&detection(A, Category::PortScan, at(29 * DAY)))
        .unwrap());
    assert_eq!((b.kind, b.offense), (Some(BlockKind::Block), 2));
    one(d
        .on_operator_unblock(net(A), "T", "alice", at(29 * DAY + 10))
        .unwrap());
    // 31 days after the first and 29.5 after the second: only the second counts.
    let b = one(d
        .on_detection(&detection(A, Category::PortScan, at(58 * DAY + HOUR)))
        .unwrap());
    assert_eq!((b.kind, b.offense), (Some(BlockKind::Block), 2));
    one(d
        .on_operator_unblock(net(A), "T2", "alice", at(58 * DAY + 2 * HOUR))
        .unwrap());
    // Both old ones forgotten: back to the first rung.
    let q = one(d
        .on_detection(&detection(A, Category::PortScan, at(100 * DAY)))
        .unwrap());
    assert_eq!((q.kind, q.offense), (Some(BlockKind::Quarantine), 1));
}

#[test]
fn start_at_skips_rungs() {
    let mut d = decider(policy(""));
    let b = one(d
        .on_detection(&detection(A, Category::NetworkScan, at(0)))
        .unwrap());
    assert_eq!((b.kind, b.offense), (Some(BlockKind::Block), 1));
}

#[test]
fn held_addresses_make_no_new_offense_unless_attacking_from_quarantine() {
    let mut d = decider(policy(""));
    one(d
        .on_detection(&detection(A, Category::PortScan, at(100)))
        .unwrap());
    // Same traffic (window began before the quarantine): nothing.
    assert!(
        d.on_detection(&detection(A, Category::PortScan, at(130)))
            .unwrap()
            .is_empty()
    );
    // New traffic from quarantine: escalate to the next rung.
    let e = one(d
        .on_detection(&detection(A, Category::PortScan, at(200)))
        .unwrap());
    assert_eq!(
        (e.kind, e.offense, e.expires),
        (Some(BlockKind::Block), 2, None)
    );
    // Blocked: no escalation whatever arrives.
    assert!(
        d.on_detection(&detection(A, Category::Flood, at(400)))
            .unwrap()
            .is_empty()
    );
    let s = d.status();
    assert_eq!(s.counters.while_held, 2);
    assert_eq!(s.counters.offenses, 2);
    assert_eq!(d.history(net(A)).unwrap().offenses.len(), 2);
}

#[test]
fn valid_reconnect_lifts_at_once_and_the_next_offense_climbs() {
    let mut d = decider(policy(""));
    climb_to_block(&mut d);
    let p = with_reconnects(&[reconnect_entry(A, "ABUSE-1", ALL_CONDITIONS, FAR, false)]);
    let out = d.on_policy(p.clone(), at(3 * HOUR)).unwrap();
    assert_eq!(out.reconnects.len(), 1);
    assert_eq!(out.reconnects[0].result, ReconnectResult::Applied);
    let dec = one(out.decisions);
    assert_eq!(dec.kind, None);
    assert_eq!(
        dec.cause,
        Cause::Reconnect {
            ticket: "ABUSE-1".into(),
            authorised_by: "desk@example".into()
        }
    );
    assert_eq!(held(&d, A), None);
    let h = d.history(net(A)).unwrap();
    assert_eq!(h.reconnects.len(), 1);
    assert_eq!(h.reconnects[0].applied_at, at(3 * HOUR));
    assert!(
        h.audit
            .iter()
            .any(|a| a.entry.action == actions::RECONNECT && a.entry.actor == "desk@example")
    );
    assert_eq!(d.status().last_reconnect_outcomes, out.reconnects);
    // History is not reset: the third offense terminates.
    let t = one(d
        .on_detection(&detection(A, Category::PortScan, at(4 * HOUR)))
        .unwrap());
    assert_eq!((t.kind, t.offense), (Some(BlockKind::Terminate), 3));
}

#[test]
fn an_authorisation_is_used_once() {
    let mut d = decider(policy(""));
    one(d
        .on_detection(&detection(A, Category::NetworkScan, at(0)))
        .unwrap()); // block (start_at 2)
    let p = with_reconnects(&[reconnect_entry(A, "ABUSE-1", ALL_CONDITIONS, FAR, false)]);
    one(d.on_policy(p.clone(), at(HOUR)).unwrap().decisions);
    // A new offense; the same entry is still in the file.
    let b = one(d
        .on_detection(&detection(A, Category::NetworkScan, at(2 * HOUR)))
        .unwrap());
    assert_eq!(b.kind, Some(BlockKind::Block));
    let out = d.on_policy(p, at(3 * HOUR)).unwrap();
    assert!(out.decisions.is_empty());
    assert!(matches!(
        &out.reconnects[0].result,
        ReconnectResult::Refused(Refusal::UsedBefore { applied_at, .. }) if *applied_at == at(HOUR)
    ));
    assert_eq!(held(&d, A), Some(BlockKind::Block));
}

#[test]
fn invalid_reconnects_are_refused_with_their_reason() {
    let mut d = decider(policy(""));
    for a in ["203.0.113.10", "203.0.113.11", "203.0.113.12"] {
        one(d
            .on_detection(&detection(a, Category::NetworkScan, at(0)))
            .unwrap());
    }
    let mut p = (*with_reconnects(&[
        reconnect_entry(
            "203.0.113.10",
            "EXPIRED",
            ALL_CONDITIONS,
            "2026-11-01T00:00:00Z",
            false,
        ),
        reconnect_entry("203.0.113.11", "MISSING", ALL_CONDITIONS, FAR, false),
        reconnect_entry("203.0.113.20", "NOTBLOCKED", ALL_CONDITIONS, FAR, false),
    ]))
    .clone();
    // Validation refuses a file with missing conditions; the decider checks them anyway.
    p.reconnect[1].conditions.remove("fee_paid");
    let out = d.on_policy(Arc::new(p), at(HOUR)).unwrap();
    assert!(out.decisions.is_empty());
    let r: Vec<_> = out.reconnects.iter().map(|o| o.result.clone()).collect();
    assert_eq!(
        r,
        vec![
            ReconnectResult::Refused(Refusal::Expired {
                expires: egressguard::messages::Time::parse_rfc3339("2026-11-01T00:00:00Z")
                    .unwrap()
            }),
            ReconnectResult::Refused(Refusal::MissingConditions {
                missing: vec!["fee_paid".into()]
            }),
            ReconnectResult::Refused(Refusal::NotBlocked),
        ]
    );
    assert!(r[1].clone() != ReconnectResult::Applied);
    let text = out.reconnects[1].to_string();
    assert!(text.contains("not attested: fee_paid"), "{text}");
    for a in ["203.0.113.10", "203.0.113.11", "203.0.113.12"] {
        assert_eq!(held(&d, a), Some(BlockKind::Block), "{a}");
    }
    let refused = d
        .store()
        .audit(None, 100)
        .unwrap()
        .into_iter()
        .filter(|a| a.entry.action == actions::RECONNECT_REFUSED)
        .count();
    assert_eq!(refused, 3);
}

#[test]
fn a_ticket_read_before_the_block_does_not_lift_it() {
    let mut d = decider(policy(""));
    let p = with_reconnects(&[reconnect_entry(A, "EARLY", ALL_CONDITIONS, FAR, false)]);
    let out = d.on_policy(p.clone(), at(10)).unwrap();
    assert_eq!(
        out.reconnects[0].result,
        ReconnectResult::Refused(Refusal::NotBlocked)
    );
    one(d
        .on_detection(&detection(A, Category::NetworkScan, at(100)))
        .unwrap());
    let out = d.on_policy(p, at(200)).unwrap();
    assert_eq!(
        out.reconnects[0].result,
        ReconnectResult::Refused(Refusal::PredatesBlock {
            seen: at(10),
            blocked_since: at(100)
        })
    );
    assert_eq!(held(&d, A), Some(BlockKind::Block));
}

#[test]
fn termination_holds_unless_overridden() {
    let mut d = decider(policy(""));
    climb_to_block(&mut d);
    one(d
        .on_operator_unblock(net(A), "T", "alice", at(3 * HOUR))
        .unwrap());
    one(d
        .on_detection(&detection(A, Category::PortScan, at(4 * HOUR)))
        .unwrap());
    assert_eq!(held(&d, A), Some(BlockKind::Terminate));
    // Operator unblock and a plain reconnect are refused.
    let err = d
        .on_operator_unblock(net(A), "T2", "alice", at(5 * HOUR))
        .unwrap_err();
    assert!(
        matches!(
            err,
            DecideError::Refused {
                refusal: OperatorRefusal::Terminated,
                ..
            }
        ),
        "{err}"
    );
    let err = d
        .on_operator_block(net(A), "again", None, "alice", at(5 * HOUR))
        .unwrap_err();
    assert!(matches!(
        err,
        DecideError::Refused {
            refusal: OperatorRefusal::AlreadyTerminated,
            ..
        }
    ));
    let p = with_reconnects(&[reconnect_entry(A, "PLAIN", ALL_CONDITIONS, FAR, false)]);
    let out = d.on_policy(p, at(6 * HOUR)).unwrap();
    assert_eq!(
        out.reconnects[0].result,
        ReconnectResult::Refused(Refusal::Terminated)
    );
    assert_eq!(held(&d, A), Some(BlockKind::Terminate));
    // An override lifts it, and the termination record says by which ticket.
    let p = with_reconnects(&[
        reconnect_entry(A, "PLAIN", ALL_CONDITIONS, FAR, false),
        reconnect_entry(A, "OVERRIDE", ALL_CONDITIONS, FAR, true),
    ]);
    let out = d.on_policy(p, at(7 * HOUR)).unwrap();
    assert_eq!(out.reconnects[1].result, ReconnectResult::Applied);
    assert_eq!(held(&d, A), None);
    let h = d.history(net(A)).unwrap();
    assert_eq!(h.terminations[0].lifted_by.as_deref(), Some("OVERRIDE"));
    assert_eq!(h.terminations[0].lifted_at, Some(at(7 * HOUR)));
}

#[test]
fn allowlisted_and_infrastructure_addresses_are_never_blocked() {
    let p = policy("");
    let infra = InfraSet::from_policy(&p).with([net("203.0.113.1")]);
    assert!(infra.overlaps(&net("192.0.2.2"))); // BGP peer
    assert!(infra.overlaps(&net("192.0.2.53"))); // walled garden
    let mut d = Decider::new(p, Store::open_in_memory().unwrap(), infra, at(0)).unwrap();
    for a in ["203.0.113.250", "203.0.113.1"] {
        for c in Category::ALL {
            assert!(
                d.on_detection(&detection(a, c, at(10))).unwrap().is_empty(),
                "{a} {c}"
            );
        }
    }
    assert!(d.desired().blocks.is_empty());
    assert_eq!(
        d.status().counters.protected,
        2 * Category::ALL.len() as u64
    );
    let err = d
        .on_operator_block(net("203.0.113.250"), "r", None, "alice", at(20))
        .unwrap_err();
    assert!(matches!(
        err,
        DecideError::Refused {
            refusal: OperatorRefusal::Protected {
                protection: Protection::Allowlisted
            },
            ..
        }
    ));
    // A prefix that holds allowlisted and infrastructure addresses is held with them
    // excepted (the allow guard precedes every drop), and not announced upstream.
    one(d
        .on_operator_block(net("203.0.113.0/24"), "r", None, "alice", at(20))
        .unwrap());
    let b = d.desired().blocks[&net("203.0.113.0/24")].clone();
    assert_eq!(b.except, vec![net("203.0.113.1"), net("203.0.113.250")]);
    assert!(b.announce.is_empty());
    d.on_operator_unblock(net("203.0.113.0/24"), "r", "alice", at(21))
        .unwrap();
    let err = d
        .on_operator_block(net("203.0.113.1"), "r", None, "alice", at(20))
        .unwrap_err();
    assert!(matches!(
        err,
        DecideError::Refused {
            refusal: OperatorRefusal::Protected {
                protection: Protection::Infrastructure
            },
            ..
        }
    ));
    let audit = d.store().audit(Some(net("203.0.113.250")), 100).unwrap();
    assert_eq!(audit.len(), Category::ALL.len());
    assert!(audit.iter().all(|a| a.entry.action == actions::PROTECTED));
}

/// The audit actions recorded for `addr`, oldest first.
fn audit_actions(d: &Decider, addr: &str) -> Vec<String> {
    let a: Vec<_> = d
        .store()
        .audit(Some(net(addr)), 100)
        .unwrap()
        .into_iter()
        .map(|a| a.entry.action)
        .collect();
    a
}

#[test]
fn infrastructure_protection_follows_the_policy_switch() {
    let mut p = (*policy("")).clone();
    p.protect_infrastructure = false;
    let off = Arc::new(p);
    let infra = InfraSet::new([net("203.0.113.1")]);
    let mut d = Decider::new(off.clone(), Store::open_in_memory().unwrap(), infra, at(0)).unwrap();
    one(d
        .on_detection(&detection("203.0.113.1", Category::Flood, at(10)))
        .unwrap());
    // Turning protection on suspends the hold: not enforced, not lifted, audited.
    assert!(
        d.on_policy(policy(""), at(20))
            .unwrap()
            .decisions
            .is_empty()
    );
    assert!(d.desired().blocks.is_empty());
    assert!(d.hold(&net("203.0.113.1")).is_some());
    assert_eq!(
        d.suspension(&net("203.0.113.1")),
        Some(Protection::Infrastructure)
    );
    assert_eq!(d.status().suspended, 1);
    // Turning it off again enforces the same hold again.
    assert!(d.on_policy(off, at(30)).unwrap().decisions.is_empty());
    assert_eq!(held(&d, "203.0.113.1"), Some(BlockKind::Quarantine));
    let a = audit_actions(&d, "203.0.113.1");
    assert!(
        a.ends_with(&[
            actions::PROTECTED_SUSPEND.into(),
            actions::PROTECTED_RESUME.into()
        ]),
        "{a:?}"
    );
}

#[test]
fn a_newly_allowlisted_address_is_suspended_not_released() {
    let mut d = decider(policy(""));
    one(d
        .on_detection(&detection(A, Category::PortScan, at(10)))
        .unwrap());
    let mut p = (*policy("")).clone();
    p.allow.push(net(A));
    let allowed = Arc::new(p);
    let out = d.on_policy(allowed.clone(), at(20)).unwrap();
    assert!(out.decisions.is_empty());
    assert_eq!(held(&d, A), None);
    assert_eq!(d.suspension(&net(A)), Some(Protection::Allowlisted));
    // The suspension survives a restart, and nothing is lifted by it.
    let store = d.into_store();
    let mut d = Decider::new(allowed, store, InfraSet::default(), at(30)).unwrap();
    assert_eq!(d.suspension(&net(A)), Some(Protection::Allowlisted));
    assert_eq!(held(&d, A), None);
    // Removing the allow entry enforces the hold again, with its original expiry.
    assert!(
        d.on_policy(policy(""), at(40))
            .unwrap()
            .decisions
            .is_empty()
    );
    assert_eq!(held(&d, A), Some(BlockKind::Quarantine));
    assert_eq!(d.desired().blocks[&net(A)].expires, Some(at(10 + HOUR)));
    assert!(!audit_actions(&d, A).contains(&actions::PROTECTED_LIFT.to_string()));
}

fn tripped(d: &Decider, network: &str) -> bool {
    d.status()
        .breaker
        .networks
        .iter()
        .find(|n| n.prefix == net(network))
        .is_some_and(|n| n.tripped_since.is_some())
}

#[test]
fn breaker_trips_per_network_entry_and_rearms_after_its_cool_down() {
    let p = policy(
        "circuit_breaker:\n  max_new_blocks_per_minute: 3\n  max_blocks_per_network: 100\n  cool_down: 5m\n",
    );
    let mut d = decider(p.clone());
    let mut made = 0;
    for i in 0..6u64 {
        let a = format!("203.0.113.{}", 10 + i);
        made += d
            .on_detection(&detection(&a, Category::PortScan, at(100 + i)))
            .unwrap()
            .len();
    }
    assert_eq!(made, 3);
    let s = d.status();
    assert!(s.breaker.tripped);
    assert_eq!(s.breaker.tripped_since, Some(at(103)));
    assert_eq!(s.counters.detections, 6);
    assert_eq!(s.counters.suppressed, 3);
    assert_eq!(s.counters.breaker_trips, 1);
    assert!(tripped(&d, "203.0.113.0/24"));
    // Only that entry: another network's offender is held at once.
    one(d
        .on_detection(&detection("198.51.100.5", Category::Spam, at(110)))
        .unwrap());
    assert!(!tripped(&d, "198.51.100.0/24"));
    // While tripped, new holds in the entry are suppressed, with their evidence...
    assert!(
        d.on_detection(&detection("203.0.113.30", Category::Spam, at(200)))
            .unwrap()
            .is_empty()
    );
    let sup = d.store().audit(Some(net("203.0.113.30")), 10).unwrap();
    assert_eq!(sup[0].entry.action, actions::SUPPRESSED);
    assert_eq!(sup[0].entry.detail["evidence"]["top_ports"][0]["key"], 80);
    // ...but an already quarantined address attacking again still escalates.
    let e = one(d
        .on_detection(&detection("203.0.113.10", Category::PortScan, at(250)))
        .unwrap());
    assert_eq!(e.kind, Some(BlockKind::Block));
    // It re-arms by itself after the cool-down, with an event for the notify hook.
    assert_eq!(d.next_timer(), Some(at(103 + 300)));
    d.take_breaker_events();
    d.on_tick(at(103 + 300)).unwrap();
    assert!(!tripped(&d, "203.0.113.0/24"));
    let ev = d.take_breaker_events();
    assert!(
        ev.iter().any(|e| e.network == net("203.0.113.0/24")
            && e.change == egressguard::messages::BreakerChange::Rearmed),
        "{ev:#?}"
    );
    one(d
        .on_detection(&detection("203.0.113.30", Category::Spam, at(410)))
        .unwrap());
    let audit = d.store().audit(None, 500).unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.entry.action == actions::BREAKER_TRIPPED)
    );
}

#[test]
fn breaker_reset_by_network_and_operator_blocks_never_trip_it() {
    let p =
        policy("circuit_breaker:\n  max_new_blocks_per_minute: 2\n  max_blocks_per_network: 3\n");
    let mut d = decider(p.clone());
    // Operator blocks: as many as the operator wants, no trip, no budget used.
    for i in 0..5u64 {
        let a = format!("203.0.113.{}", 100 + i);
        one(d
            .on_operator_block(net(&a), "abuse desk", None, "alice", at(10 + i))
            .unwrap());
    }
    assert!(!tripped(&d, "203.0.113.0/24"));
    for i in 0..2u64 {
        let a = format!("203.0.113.{}", 10 + i);
        one(d
            .on_detection(&detection(&a, Category::PortScan, at(20 + i)))
            .unwrap());
    }
    for i in 0..2u64 {
        let a = format!("198.51.100.{}", 10 + i);
        one(d
            .on_detection(&detection(&a, Category::PortScan, at(20 + i)))
            .unwrap());
    }
    assert!(
        d.on_detection(&detection("203.0.113.12", Category::PortScan, at(30)))
            .unwrap()
            .is_empty()
    );
    assert!(
        d.on_detection(&detection("198.51.100.12", Category::PortScan, at(30)))
            .unwrap()
            .is_empty()
    );
    assert!(tripped(&d, "203.0.113.0/24") && tripped(&d, "198.51.100.0/24"));
    // Reset one entry (by name): only that one re-arms.
    let ev = d.reset_breakers(Some("cust-a"), "alice", at(40)).unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].network, net("203.0.113.0/24"));
    assert_eq!(ev[0].by, "alice");
    assert!(!tripped(&d, "203.0.113.0/24") && tripped(&d, "198.51.100.0/24"));
    assert!(matches!(
        d.reset_breakers(Some("no-such-net"), "alice", at(41)),
        Err(DecideError::UnknownNetwork { .. })
    ));
    // Reset all.
    let ev = d.reset_breakers(None, "alice", at(42)).unwrap();
    assert_eq!(ev.len(), 1);
    assert!(!d.status().breaker.tripped);
}

#[test]
fn breaker_counts_one_customer_aggregate_once() {
    // 21 addresses of one customer /64 (held per address here) trip nothing: one customer.
    let mut p = (*policy(
        "circuit_breaker:\n  max_new_blocks_per_minute: 20\n  max_blocks_per_network: 32\n",
    ))
    .clone();
    p.enforcement.ipv6_block_prefix = 128;
    let mut d = decider(Arc::new(p));
    for i in 0..21u64 {
        let a = format!("2001:db8:0:7::{:x}", 0x10 + i);
        one(d
            .on_detection(&detection(&a, Category::PortScan, at(10 + i)))
            .unwrap());
    }
    assert!(!d.status().breaker.tripped);
    assert_eq!(d.status().counters.suppressed, 0);
}

#[test]
fn breaker_caps_blocks_per_network() {
    let p =
        policy("circuit_breaker:\n  max_new_blocks_per_minute: 100\n  max_blocks_per_network: 2\n");
    let mut d = decider(p);
    one(d
        .on_detection(&detection("203.0.113.10", Category::PortScan, at(0)))
        .unwrap());
    one(d
        .on_detection(&detection("203.0.113.11", Category::NetworkScan, at(1)))
        .unwrap());
    assert!(
        d.on_detection(&detection("203.0.113.12", Category::PortScan, at(2)))
            .unwrap()
            .is_empty()
    );
    // Another network is not affected, and the breaker as a whole is not tripped.
    one(d
        .on_detection(&detection("198.51.100.12", Category::PortScan, at(3)))
        .unwrap());
    let s = d.status();
    assert!(!s.breaker.tripped);
    assert_eq!(s.breaker.networks_at_limit.len(), 1);
    assert_eq!(
        s.breaker.networks_at_limit[0].name.as_deref(),
        Some("cust-a")
    );
    // The quarantine of .10 expires: room for one more.
    d.on_tick(at(HOUR + 10)).unwrap();
    one(d
        .on_detection(&detection(
            "203.0.113.12",
            Category::PortScan,
            at(HOUR + 20),
        ))
        .unwrap());
}

#[test]
fn dry_run_decides_and_records_but_enforces_nothing() {
    let mut p = (*policy("")).clone();
    p.mode = Mode::DryRun;
    let mut d = decider(Arc::new(p));
    let q = one(d
        .on_detection(&detection(A, Category::PortScan, at(10)))
        .unwrap());
    assert!(q.dry_run);
    assert_eq!(q.kind, Some(BlockKind::Quarantine));
    assert!(d.desired().blocks.is_empty());
    assert_eq!(
        d.would_enforce().blocks[&net(A)].kind,
        BlockKind::Quarantine
    );
    let audit = d.store().audit(Some(net(A)), 10).unwrap();
    assert!(audit[0].entry.dry_run);
    assert_eq!(d.status().dry_run_by_kind[&BlockKind::Quarantine], 1);
    // Switching to enforce discards the dry-run holds; the dry-run offense does not count.
    d.on_policy(policy(""), at(20)).unwrap();
    assert!(d.would_enforce().blocks.is_empty());
    assert!(d.desired().blocks.is_empty());
    let q = one(d
        .on_detection(&detection(A, Category::PortScan, at(30)))
        .unwrap());
    assert_eq!(
        (q.kind, q.offense, q.dry_run),
        (Some(BlockKind::Quarantine), 1, false)
    );
}

/// An operator block in dry-run mode is a would-be hold: the decision, the list and the
/// audit say dry-run, and nothing is desired of the enforcers.
#[test]
fn operator_block_in_dry_run_is_recorded_as_dry_run() {
    let mut p = (*policy("")).clone();
    p.mode = Mode::DryRun;
    let mut d = decider(Arc::new(p));
    let b = one(d
        .on_operator_block(
            net(A),
            "ticket 5",
            Some(Duration::from_secs(3600)),
            "alice",
            at(10),
        )
        .unwrap());
    assert!(b.dry_run, "{b:?}");
    assert!(d.desired().blocks.is_empty());
    assert!(d.would_enforce().blocks.contains_key(&net(A)));
    assert!(d.list().iter().all(|h| h.dry_run));
    let audit = d.store().audit(Some(net(A)), 10).unwrap();
    assert!(audit[0].entry.dry_run);
}

#[test]
fn desired_blocks_carry_announcements_and_flowspec_scope() {
    // The first rung (a quarantine) announces nothing by default; announced here, its holds
    // carry what each category's `actions:` say.
    let mut p = (*policy("")).clone();
    p.escalation.ladder[0].announce = true;
    let mut d = decider(Arc::new(p));
    d.on_detection(&detection("203.0.113.20", Category::Spam, at(1)))
        .unwrap();
    d.on_detection(&detection("203.0.113.21", Category::Flood, at(2)))
        .unwrap();
    d.on_detection(&detection("203.0.113.22", Category::BruteForce, at(3)))
        .unwrap();
    let desired = d.desired();
    let spam = &desired.blocks[&net("203.0.113.20")];
    assert_eq!(spam.announce, vec![Announce::Flowspec]);
    let fs = spam.flowspec.as_ref().unwrap();
    assert_eq!(
        (fs.proto, fs.dports.clone(), fs.rate_bytes_per_sec),
        (Some(proto::TCP), vec![25, 465, 587], 0)
    );
    let flood = &desired.blocks[&net("203.0.113.21")];
    assert_eq!(flood.announce, vec![Announce::Flowspec, Announce::Rtbh]);
    let fs = flood.flowspec.as_ref().unwrap();
    assert_eq!(
        (fs.proto, fs.dports.is_empty(), fs.rate_bytes_per_sec),
        (None, true, 1000)
    );
    let brute = &desired.blocks[&net("203.0.113.22")];
    assert!(brute.announce.is_empty() && brute.flowspec.is_none());
    assert_eq!(brute.expires, Some(at(3 + HOUR)));
    // Every change bumps the generation.
    let g = desired.generation;
    d.on_tick(at(2 * HOUR)).unwrap();
    assert!(d.desired().generation > g);
    assert!(d.desired().blocks.is_empty());
}

#[test]
fn operator_block_never_weakens_and_unblock_needs_a_hold() {
    let mut d = decider(policy(""));
    let b = one(d
        .on_operator_block(
            net(A),
            "abuse report 7",
            Some(Duration::from_secs(7200)),
            "alice",
            at(0),
        )
        .unwrap());
    assert_eq!(
        (b.kind, b.expires, b.offense),
        (Some(BlockKind::Block), Some(at(7200)), 0)
    );
    assert!(matches!(b.cause, Cause::Operator { ref user, .. } if user == "alice"));
    // A shorter block keeps the longer expiry.
    let b = one(d
        .on_operator_block(
            net(A),
            "again",
            Some(Duration::from_secs(60)),
            "bob",
            at(10),
        )
        .unwrap());
    assert_eq!(b.expires, Some(at(7200)));
    // A detection of a blocked address is no new offense.
    assert!(
        d.on_detection(&detection(A, Category::PortScan, at(20)))
            .unwrap()
            .is_empty()
    );
    one(d
        .on_operator_unblock(net(A), "T-1", "alice", at(30))
        .unwrap());
    let err = d
        .on_operator_unblock(net(A), "T-1", "alice", at(40))
        .unwrap_err();
    assert!(matches!(
        err,
        DecideError::Refused {
            refusal: OperatorRefusal::NotBlocked,
            ..
        }
    ));
    let err = d
        .on_operator_unblock(net(A), " ", "alice", at(40))
        .unwrap_err();
    assert!(matches!(
        err,
        DecideError::Refused {
            refusal: OperatorRefusal::NoTicket,
            ..
        }
    ));
    let err = d
        .on_operator_block(net(A), "", None, "alice", at(40))
        .unwrap_err();
    assert!(matches!(
        err,
        DecideError::Refused {
            refusal: OperatorRefusal::NoReason,
            ..
        }
    ));
    let actions: Vec<String> = d
        .history(net(A))
        .unwrap()
        .audit
        .into_iter()
        .map(|a| a.entry.action)
        .collect();
    assert_eq!(
        actions,
        vec!["operator_block", "operator_block", "operator_unblock"]
    );
}

#[test]
fn list_shows_reason_since_and_until() {
    let mut d = decider(policy(""));
    d.on_detection(&detection(A, Category::PortScan, at(5)))
        .unwrap();
    let l = d.list();
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].since, l[0].expires), (at(5), Some(at(5 + HOUR))));
    assert!(
        l[0].reason
            .starts_with("port_scan offense 1: distinct_ports 150 > 100"),
        "{}",
        l[0].reason
    );
    assert_eq!(d.next_expiry(), Some(at(5 + HOUR)));
}

#[test]
fn preview_changes_nothing() {
    let mut d = decider(policy(""));
    one(d
        .on_detection(&detection(A, Category::NetworkScan, at(10)))
        .unwrap());
    let p = with_reconnects(&[reconnect_entry(A, "ABUSE-1", ALL_CONDITIONS, FAR, false)]);
    let preview = d.preview_reconnects(&p, at(20));
    assert_eq!(preview[0].result, ReconnectResult::Applied);
    assert_eq!(held(&d, A), Some(BlockKind::Block));
    // The preview did not record the ticket as seen: applying later still works.
    let out = d.on_policy(p, at(30)).unwrap();
    assert_eq!(out.reconnects[0].result, ReconnectResult::Applied);
}

#[test]
fn new_infrastructure_suspends_its_holds() {
    let mut d = decider(policy(""));
    one(d
        .on_detection(&detection("198.51.100.53", Category::Flood, at(10)))
        .unwrap());
    assert!(
        d.set_infra(InfraSet::new([net("198.51.100.53")]), at(20))
            .unwrap()
            .is_empty()
    );
    assert!(d.desired().blocks.is_empty());
    assert_eq!(
        d.suspension(&net("198.51.100.53")),
        Some(Protection::Infrastructure)
    );
    assert!(
        d.on_detection(&detection("198.51.100.53", Category::Flood, at(30)))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn allowlisting_a_terminated_address_never_lifts_the_termination() {
    let mut d = decider(policy(""));
    climb_to_block(&mut d);
    one(d
        .on_operator_unblock(net(A), "T", "alice", at(3 * HOUR))
        .unwrap());
    one(d
        .on_detection(&detection(A, Category::PortScan, at(4 * HOUR)))
        .unwrap());
    assert_eq!(held(&d, A), Some(BlockKind::Terminate));
    let mut p = (*policy("")).clone();
    p.allow.push(net(A));
    assert!(
        d.on_policy(Arc::new(p), at(5 * HOUR))
            .unwrap()
            .decisions
            .is_empty()
    );
    assert_eq!(held(&d, A), None);
    let h = d.history(net(A)).unwrap();
    assert_eq!(h.terminations[0].lifted_by, None);
    assert_eq!(h.hold.map(|h| h.kind), Some(BlockKind::Terminate));
    // Only the abuse desk lifts it, by an override reconnect of its own.
    let mut p =
        (*with_reconnects(&[reconnect_entry(A, "OVERRIDE", ALL_CONDITIONS, FAR, true)])).clone();
    p.allow.push(net(A));
    let out = d.on_policy(Arc::new(p), at(6 * HOUR)).unwrap();
    assert_eq!(out.reconnects[0].result, ReconnectResult::Applied);
    let h = d.history(net(A)).unwrap();
    assert_eq!(h.terminations[0].lifted_by.as_deref(), Some("OVERRIDE"));
    assert_eq!(d.suspension(&net(A)), None);
}

/// The same inputs give the same decisions, byte for byte: a recorded stream replays.
#[test]
fn decisions_are_deterministic() {
    let run = || {
        let mut d = decider(policy("circuit_breaker:\n  max_new_blocks_per_minute: 5\n"));
        let mut out = Vec::new();
        for i in 0..40u64 {
            let a = format!("203.0.113.{}", 10 + i % 9);
            let c = Category::ALL[(i % 5) as usize];
            out.extend(d.on_detection(&detection(&a, c, at(i * 97))).unwrap());
            if i % 7 == 0 {
                out.extend(d.on_tick(at(i * 97 + 30)).unwrap());
            }
        }
        (
            serde_json::to_string(&out).unwrap(),
            serde_json::to_string(&d.desired()).unwrap(),
        )
    };
    let first = run();
    assert!(first.0.len() > 100);
    assert_eq!(first, run());
}

#[test]
fn a_forward_clock_step_lifts_no_hold_early() {
    let mut d = decider(policy(""));
    let q = one(d
        .on_detection(&detection(A, Category::PortScan, at(10)))
        .unwrap());
    assert_eq!(q.expires, Some(at(10 + HOUR)));
    // Ten minutes later the wall clock jumps a day ahead; the agent takes the step in.
    let step = i64::try_from(DAY).unwrap() * 1_000_000_000;
    assert!(d.clock_stepped(step, at(600 + DAY)).unwrap().is_empty());
    assert!(
        d.on_tick(at(600 + DAY)).unwrap().is_empty(),
        "lifted at the step"
    );
    assert_eq!(held(&d, A), Some(BlockKind::Quarantine));
    assert_eq!(
        d.desired().blocks[&net(A)].expires,
        Some(at(10 + HOUR + DAY)),
        "50 minutes left, as before the step"
    );
    let e = one(d.on_tick(at(10 + HOUR + DAY)).unwrap());
    assert_eq!(e.cause, Cause::Expiry);
    let h = d.history(net(A)).unwrap();
    assert!(
        h.audit
            .iter()
            .any(|a| a.entry.action == actions::CLOCK_STEP),
        "the step is audited"
    );
}

#[test]
fn a_backward_clock_step_extends_no_hold_and_reopens_no_authorisation() {
    let mut d = decider(policy(""));
    one(d
        .on_detection(&detection(A, Category::PortScan, at(3 * HOUR)))
        .unwrap());
    // Back by two hours: the hold still has its 1 h, not 3 h.
    let step = -2 * i64::try_from(HOUR).unwrap() * 1_000_000_000;
    d.clock_stepped(step, at(HOUR + 10)).unwrap();
    assert_eq!(d.desired().blocks[&net(A)].expires, Some(at(2 * HOUR)));
    one(d.on_tick(at(2 * HOUR)).unwrap());
    assert_eq!(held(&d, A), None);
}

#[test]
fn an_expired_authorisation_stays_expired_after_the_clock_goes_back() {
    let mut d = decider(policy(""));
    climb_to_block(&mut d);
    // The ticket expired an hour ago by the agent's clock.
    let expiry = at(3 * HOUR).to_string();
    let p = with_reconnects(&[reconnect_entry(A, "LATE", ALL_CONDITIONS, &expiry, false)]);
    let out = d.on_policy(Arc::clone(&p), at(4 * HOUR)).unwrap();
    assert!(
        matches!(
            out.reconnects[0].result,
            ReconnectResult::Refused(Refusal::Expired { .. })
        ),
        "{:?}",
        out.reconnects
    );
    // The wall clock is set back a day and the policy reloaded: still expired, still held.
    let out = d
        .on_policy(p, at(4 * HOUR).saturating_sub(Duration::from_secs(DAY)))
        .unwrap();
    assert!(
        matches!(
            out.reconnects[0].result,
            ReconnectResult::Refused(Refusal::Expired { .. })
        ),
        "re-opened by the clock: {:?}",
        out.reconnects
    );
    assert_eq!(held(&d, A), Some(BlockKind::Block));
}

#[test]
fn a_ticket_seen_before_a_hold_stays_before_it_whatever_the_clock_says() {
    let mut d = decider(policy(""));
    let p = with_reconnects(&[reconnect_entry(A, "EARLY", ALL_CONDITIONS, FAR, false)]);
    d.on_policy(Arc::clone(&p), at(10 * HOUR)).unwrap();
    // The clock goes back five hours before the detection: by wall times the hold would
    // begin before the ticket was seen, and the old ticket would lift it.
    one(d
        .on_detection(&detection(A, Category::NetworkScan, at(5 * HOUR)))
        .unwrap());
    let out = d.on_policy(p, at(5 * HOUR + 60)).unwrap();
    assert!(
        matches!(
            out.reconnects[0].result,
            ReconnectResult::Refused(Refusal::PredatesBlock { .. })
        ),
        "{:?}",
        out.reconnects
    );
    assert_eq!(held(&d, A), Some(BlockKind::Block));
}

/// Detector and decider wired as in the daemon: every decision's [`HoldChange`] goes back to
/// the engine. A SYN and packet flood that goes on into its quarantine for 30 s (the counter
/// rule counts what the hold drops; no flow passes) stays one offense; after an unblock the
/// same flood is a second offense within a second, not after the window rolls over.
#[test]
fn a_hold_is_never_its_own_evidence_and_an_unblock_re_arms_the_detector() {
    use egressguard::detect::Engine;
    use egressguard::messages::{CounterSample, HoldChange, Observation, Time};
    let p = policy("");
    let mut d = decider(Arc::clone(&p));
    let mut e = Engine::new(p);
    let src: std::net::IpAddr = A.parse().unwrap();
    let dst: std::net::IpAddr = "198.51.100.10".parse().unwrap();
    let mut decisions: Vec<Decision> = Vec::new();
    let mut flows_pass = true;
    let step = |e: &mut Engine, d: &mut Decider, ms: u64, flows_pass: bool| {
        let t = Time(at(0).as_nanos() + ms * 1_000_000);
        if ms.is_multiple_of(1000) {
            e.observe(&Observation::Counters(CounterSample {
                time: t,
                addr: src,
                packets: 2_000_000,
                bytes: 2_000_000_000,
                interval_ns: 1_000_000_000,
                udp_packets: 0,
                echo_packets: 0,
            }));
        }
        if flows_pass {
            for i in 0..300u16 {
                let sport = 1024 + (ms as u16 % 50) * 300 + i;
                e.observe(&stream::ev(t.0, stream::syn(src, dst, sport, 80)));
            }
        }
        let mut out = Vec::new();
        e.evaluate(t, &mut out);
        let ds = d.on_detections(&out).unwrap();
        for x in &ds {
            if let Some(c) = HoldChange::of(x) {
                e.on_hold_change(&c);
            }
        }
        ds
    };
    // The flood, every 250 ms, until quarantined; then 30 s more of it in the counters.
    let mut ms = 0;
    while ms <= 40_000 {
        let ds = step(&mut e, &mut d, ms, flows_pass);
        if ds.iter().any(|x| x.kind == Some(BlockKind::Quarantine)) {
            flows_pass = false;
        }
        decisions.extend(ds);
        ms += 250;
    }
    assert_eq!(decisions.len(), 1, "{decisions:#?}");
    assert_eq!(decisions[0].kind, Some(BlockKind::Quarantine));
    let quarantined_at = decisions[0].time;
    assert!(quarantined_at <= at(10), "{quarantined_at}");
    assert!(e.stats().held_samples >= 30, "{:?}", e.stats());
    // Unblocked at 41 s; the flood goes on and passes again: held again within a second.
    for x in d
        .on_operator_unblock(net(A), "T-17", "alice", at(41))
        .unwrap()
    {
        if let Some(c) = HoldChange::of(&x) {
            e.on_hold_change(&c);
        }
    }
    let mut again = None;
    let mut ms = 41_000;
    while ms <= 50_000 && again.is_none() {
        again = step(&mut e, &mut d, ms, true)
            .into_iter()
            .find(|x| x.kind.is_some());
        ms += 250;
    }
    let again = again.expect("the re-offense after the unblock is detected");
    assert_eq!((again.kind, again.offense), (Some(BlockKind::Block), 2));
    assert!(again.time <= at(42), "{}", again.time);
}
