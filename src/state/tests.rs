use super::*;
use crate::messages::Evidence;
use std::collections::BTreeMap;

fn evidence() -> Evidence {
    Evidence {
        window_start: Time::from_secs(1),
        window_end: Time::from_secs(2),
        crossed: vec![],
        counts: BTreeMap::new(),
        top_destinations: vec![],
        top_ports: vec![],
        first_seen: Time::from_secs(1),
        last_seen: Time::from_secs(2),
        sample: vec![],
        spoofing: None,
        pattern: None,
    }
}

fn block(target: &str, expires: Option<u64>) -> BlockRecord {
    BlockRecord {
        target: target.parse().unwrap(),
        kind: BlockKind::Quarantine,
        since: Time::from_secs(10),
        expires: expires.map(Time::from_secs),
        offense: 1,
        category: Some(Category::PortScan),
        reason: "port_scan offense 1".into(),
        actor: "egressguard".into(),
        dry_run: false,
        service: Service {
            proto: Some(6),
            dports: vec![22],
        },
    }
}

#[test]
fn round_trip_every_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let target: IpNet = "203.0.113.7/32".parse().unwrap();
    {
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), 1);
        s.commit(&[
            Change::Offense(Box::new(OffenseRecord {
                target,
                time: Time::from_secs(10),
                number: 1,
                category: Category::PortScan,
                profile: "default".into(),
                kind: BlockKind::Quarantine,
                expires: Some(Time::from_secs(3610)),
                dry_run: false,
                evidence: evidence(),
            })),
            Change::PutBlock(block("203.0.113.7/32", Some(3610))),
            Change::PutBlock(block("203.0.113.8/32", None)),
            Change::Terminate(TerminationRecord {
                target,
                since: Time::from_secs(10),
                offense: 3,
                reason: "r".into(),
                lifted_at: None,
                lifted_by: None,
            }),
            Change::LiftTermination {
                target,
                time: Time::from_secs(20),
                ticket: "T-1".into(),
            },
            Change::Reconnect(ReconnectRecord {
                ticket: "T-1".into(),
                target,
                authorised_by: "desk".into(),
                applied_at: Time::from_secs(20),
                conditions: vec!["fee_paid".into()],
                override_termination: true,
            }),
            Change::TicketSeen {
                ticket: "T-1".into(),
                target,
                time: Time::from_secs(15),
            },
            Change::TicketSeen {
                ticket: "T-1".into(),
                target,
                time: Time::from_secs(99),
            },
            Change::Audit(AuditEntry {
                time: Time::from_secs(10),
                actor: "egressguard".into(),
                action: actions::HOLD.into(),
                target: Some(target),
                reason: "why".into(),
                dry_run: false,
                detail: serde_json::json!({"offense": 1}),
            }),
        ])
        .unwrap();
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.blocks().unwrap().len(), 2);
    let active = s.active_blocks(Time::from_secs(4000)).unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0], block("203.0.113.8/32", None));
    let offenses = s.offenses(target).unwrap();
    assert_eq!(offenses.len(), 1);
    assert_eq!(offenses[0].evidence, evidence());
    let terms = s.terminations().unwrap();
    assert_eq!(terms[0].lifted_by.as_deref(), Some("T-1"));
    assert_eq!(s.reconnects().unwrap()[0].conditions, vec!["fee_paid"]);
    assert_eq!(
        s.tickets_seen().unwrap(),
        vec![("T-1".to_owned(), Time::from_secs(15))]
    );
    let audit = s.audit(Some(target), 10).unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].entry.detail["offense"], 1);
    assert_eq!(s.audit(None, 10).unwrap().len(), 1);
}

#[test]
fn audit_trail_is_append_only() {
    let mut s = Store::open_in_memory().unwrap();
    s.commit(&[Change::Audit(AuditEntry {
        time: Time::from_secs(1),
        actor: "a".into(),
        action: "x".into(),
        target: None,
        reason: String::new(),
        dry_run: false,
        detail: serde_json::Value::Null,
    })])
    .unwrap();
    let err = s.conn.execute("DELETE FROM audit", []).unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    let err = s
        .conn
        .execute("UPDATE audit SET actor = 'b'", [])
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
}

#[test]
fn a_failed_batch_leaves_nothing() {
    let mut s = Store::open_in_memory().unwrap();
    let r = Change::Reconnect(ReconnectRecord {
        ticket: "T".into(),
        target: "203.0.113.7/32".parse().unwrap(),
        authorised_by: "d".into(),
        applied_at: Time::from_secs(1),
        conditions: vec![],
        override_termination: false,
    });
    s.commit(std::slice::from_ref(&r)).unwrap();
    // The same ticket twice violates the primary key: the block before it must not stay.
    let err = s
        .commit(&[Change::PutBlock(block("203.0.113.9/32", None)), r])
        .unwrap_err();
    assert!(matches!(err, StateError::Sql { .. }), "{err:?}");
    assert!(s.blocks().unwrap().is_empty());
}

#[test]
fn another_programs_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StateError::Foreign { .. }), "{err:?}");
    assert!(err.to_string().contains("other.db"), "{err}");
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    drop(Store::open(&path).unwrap());
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA user_version = 99;").unwrap();
    }
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(err, StateError::TooNew { found: 99, .. }),
        "{err:?}"
    );
}

#[test]
fn a_second_agent_on_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let _first = Store::open(&path).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StateError::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains("another egressguard"), "{err}");
}
