//! Unit tests of the ctnetlink parser on messages captured from this kernel (6.18) by
//! `capture_ctnetlink_fixtures` in tests/netns/observe.rs, plus hostile variants of them.

use super::*;
use crate::messages::{ct_status, proto};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/ctnetlink/{name}.bin",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const FIXTURES: [&str; 9] = [
    "tcp4", "tcp6", "udp4", "udp6", "icmp4", "icmp6", "inbound4", "inbound6", "dump",
];

fn customers() -> CustomerFilter {
    CustomerFilter::new([
        "203.0.113.0/24".parse().unwrap(),
        "2001:db8:c::/64".parse().unwrap(),
    ])
}

/// Every parse result of a fixture, in order.
fn parse_all(buf: &[u8], filter: &CustomerFilter) -> Vec<Result<Parsed, ParseError>> {
    messages(buf)
        .map(|m| m.and_then(|m| parse(&m, Time(7), filter)))
        .collect()
}

fn flows(name: &str) -> Vec<FlowEvent> {
    parse_all(&fixture(name), &customers())
        .into_iter()
        .filter_map(|r| match r.unwrap() {
            Parsed::Flow(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn tcp4_lifecycle() {
    let evs = flows("tcp4");
    let states: Vec<_> = evs.iter().map(|e| (e.kind, e.tcp_state)).collect();
    use FlowEventKind::*;
    use TcpState::*;
    assert_eq!(
        states,
        vec![
            (New, Some(SynSent)),
            (Update, Some(SynRecv)),
            (Update, Some(Established)),
            (Update, Some(FinWait)),
            (Update, Some(LastAck)),
            (Update, Some(TimeWait)),
            (Destroy, Some(TimeWait)),
        ]
    );
    for e in &evs {
        assert_eq!(e.time, Time(7));
        assert_eq!(e.src, ip("203.0.113.10"));
        assert_eq!(e.dst, ip("198.51.100.20"));
        assert_eq!((e.proto, e.sport, e.dport), (proto::TCP, 52834, 8080));
        assert_eq!(e.icmp, Option::None);
    }
    assert_eq!(evs[0].status, ct_status::CONFIRMED);
    assert_eq!(evs[1].status, ct_status::CONFIRMED | ct_status::SEEN_REPLY);
    assert_eq!(
        evs[2].status,
        ct_status::CONFIRMED | ct_status::SEEN_REPLY | ct_status::ASSURED
    );
    let d = evs[6];
    assert_eq!(
        (d.orig_packets, d.orig_bytes, d.reply_packets, d.reply_bytes),
        (Some(6), Some(324), Some(4), Some(220))
    );
    assert_eq!(d.start, Some(Time(1_795_580_446_269_801_650)));
    assert_eq!(d.stop, Some(Time(1_795_580_446_290_042_153)));
    // Only destroy events carry counters and timestamps.
    assert!(
        evs[..6]
            .iter()
            .all(|e| e.orig_packets.is_none() && e.start.is_none())
    );
}

#[test]
fn tcp6_tuple_and_counters() {
    let evs = flows("tcp6");
    assert_eq!(evs.len(), 7);
    assert_eq!(evs[0].src, ip("2001:db8:c::a"));
    assert_eq!(evs[0].dst, ip("2001:db8:1::14"));
    assert_eq!((evs[0].sport, evs[0].dport), (33680, 8080));
    assert_eq!(evs[6].kind, FlowEventKind::Destroy);
    assert_eq!(evs[6].orig_bytes, Some(444));
    assert_eq!(evs[6].reply_bytes, Some(300));
}

#[test]
fn udp_new_reply_destroy_v4_and_v6() {
    for (name, src, bytes) in [("udp4", "203.0.113.10", 33), ("udp6", "2001:db8:c::a", 53)] {
        let evs: Vec<_> = flows(name)
            .into_iter()
            .filter(|e| e.proto == proto::UDP)
            .collect();
        let kinds: Vec<_> = evs.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                FlowEventKind::New,
                FlowEventKind::Update,
                FlowEventKind::Destroy
            ],
            "{name}"
        );
        assert!(!evs[0].seen_reply());
        assert!(evs[1].seen_reply());
        let d = evs[2];
        assert_eq!(d.src, ip(src));
        assert_eq!((d.sport, d.dport), (40053, 5353));
        assert_eq!(d.tcp_state, None);
        assert_eq!(
            (d.orig_packets, d.orig_bytes, d.reply_packets, d.reply_bytes),
            (Some(1), Some(bytes), Some(1), Some(bytes))
        );
    }
}

#[test]
fn icmp_type_and_code() {
    for (name, p, ty, bytes) in [
        ("icmp4", proto::ICMP, 8, 84),
        ("icmp6", proto::ICMPV6, 128, 104),
    ] {
        let evs = flows(name);
        assert_eq!(evs.len(), 3, "{name}");
        for e in &evs {
            assert_eq!(e.proto, p);
            assert_eq!(e.icmp, Some((ty, 0)));
            assert_eq!((e.sport, e.dport), (0, 0));
        }
        assert_eq!(evs[2].orig_bytes, Some(bytes));
    }
}

#[test]
fn inbound_flows_are_foreign() {
    for name in ["inbound4", "inbound6"] {
        let r = parse_all(&fixture(name), &customers());
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|p| *p == Ok(Parsed::Foreign)), "{name}: {r:?}");
    }
    // And with every address a customer, they are flows from the internet host.
    let all = CustomerFilter::new(["0.0.0.0/0".parse().unwrap()]);
    let r = parse_all(&fixture("inbound4"), &all);
    match r[0] {
        Ok(Parsed::Flow(e)) => assert_eq!(e.src, ip("198.51.100.20")),
        ref other => panic!("{other:?}"),
    }
}

#[test]
fn dump_entries_are_new_flows_and_end_with_done() {
    let r = parse_all(&fixture("dump"), &customers());
    assert_eq!(r.last(), Some(&Ok(Parsed::Done)));
    let evs: Vec<_> = r
        .iter()
        .filter_map(|p| match p {
            Ok(Parsed::Flow(e)) if e.proto == proto::UDP => Some(*e),
            _ => None,
        })
        .collect();
    assert_eq!(evs.len(), 2);
    for (e, (src, sport, bytes)) in evs
        .iter()
        .zip([("203.0.113.10", 40054, 33), ("2001:db8:c::a", 40055, 53)])
    {
        assert_eq!(e.kind, FlowEventKind::Existing);
        assert_eq!((e.src, e.sport, e.dport), (ip(src), sport, 5353));
        assert!(e.seen_reply());
        assert_eq!(e.orig_bytes, Some(bytes));
        assert!(e.start.is_some() && e.stop.is_none());
    }
    assert_eq!(
        r.iter().filter(|p| **p == Ok(Parsed::Foreign)).count(),
        2,
        "the inbound ping and one more non-customer flow: {r:?}"
    );
}

#[test]
fn parse_buffer_counts() {
    let b = fixture("icmp4");
    let mut n = 0;
    let c = parse_buffer(&b, Time(1), &customers(), |_| n += 1, |_, _| {});
    assert_eq!(
        c,
        BufferCounts {
            kept: 3,
            foreign: 1,
            errors: 0,
            other: 0
        }
    );
    assert_eq!(n, 3);
}

#[test]
fn dump_request_bytes() {
    let mut b = [0u8; 20];
    assert_eq!(dump_request(&mut b, 0x01020304), 20);
    let m = messages(&b).next().unwrap().unwrap();
    assert_eq!(m.kind, 0x0101);
    assert_eq!(m.flags, NLM_F_REQUEST | NLM_F_DUMP);
    assert_eq!(m.seq, 0x01020304);
    assert_eq!(m.payload, &[0, 0, 0, 0]);
}

// ---- hostile input ----

/// Every prefix of every fixture: no panic, and each message either parses as before or is
/// an error; a cut never invents a flow that was not there.
#[test]
fn truncation_at_every_offset_is_an_error_not_a_panic() {
    let filter = customers();
    for name in FIXTURES {
        let full = fixture(name);
        let whole = parse_all(&full, &filter);
        for cut in 0..full.len() {
            let r = parse_all(&full[..cut], &filter);
            for (i, p) in r.iter().enumerate() {
                if p.is_ok() && i < whole.len() {
                    // A message that parsed must be one that was complete before the cut.
                    assert_eq!(p, &whole[i], "{name} cut at {cut}, message {i}");
                }
            }
        }
    }
}

/// A message whose own length was shortened (the datagram is intact but the nlmsghdr lies)
/// must fail inside the attributes, never read past the claimed length.
#[test]
fn shortened_message_length_is_caught() {
    let filter = customers();
    let full = fixture("tcp4");
    let first_len = u32::from_ne_bytes(full[..4].try_into().unwrap()) as usize;
    for len in 0..first_len {
        let mut b = full[..first_len].to_vec();
        b[..4].copy_from_slice(&(len as u32).to_ne_bytes());
        let r = parse_all(&b, &filter);
        if len < NLMSG_HDRLEN {
            assert!(
                matches!(r[0], Err(ParseError::MessageLength { .. })),
                "{len}: {r:?}"
            );
        }
    }
}

#[test]
fn oversized_lengths_are_errors() {
    let filter = customers();
    let mut b = fixture("udp4");
    // Message length beyond the buffer.
    let mut m = b.clone();
    m[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
    assert!(matches!(
        parse_all(&m, &filter)[0],
        Err(ParseError::MessageLength { .. })
    ));
    // First attribute (the tuple) claims more than the message holds.
    let at = NLMSG_HDRLEN + NFGENMSG_LEN;
    b[at..at + 2].copy_from_slice(&u16::MAX.to_ne_bytes());
    assert!(matches!(
        parse_all(&b, &filter)[0],
        Err(ParseError::AttrLength(_))
    ));
    // An attribute length below its own header.
    b[at..at + 2].copy_from_slice(&2u16.to_ne_bytes());
    assert!(matches!(
        parse_all(&b, &filter)[0],
        Err(ParseError::AttrLength(_))
    ));
}

#[test]
fn garbled_messages_never_panic() {
    // Deterministic pseudo-random byte flips over every fixture.
    let filter = customers();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for name in FIXTURES {
        let full = fixture(name);
        for _ in 0..3000 {
            let mut b = full.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            let _ = parse_all(&b, &filter);
            let _ = parse_buffer(&b, Time(0), &filter, |_| {}, |_, _| {});
        }
    }
}

#[test]
fn missing_tuple_and_mixed_families() {
    let filter = customers();
    // A NEW message with only a status attribute.
    let mut m = Vec::new();
    let len = (NLMSG_HDRLEN + NFGENMSG_LEN + 8) as u32;
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&0x0100u16.to_ne_bytes());
    m.extend_from_slice(&NLM_F_CREATE.to_ne_bytes());
    m.extend_from_slice(&[0; 8]);
    m.extend_from_slice(&[2, 0, 0, 0]);
    m.extend_from_slice(&8u16.to_ne_bytes());
    m.extend_from_slice(&3u16.to_ne_bytes());
    m.extend_from_slice(&8u32.to_be_bytes());
    assert_eq!(
        parse_all(&m, &filter),
        vec![Err(ParseError::Missing("CTA_TUPLE_ORIG"))]
    );

    // A tuple with a v4 source and a v6 destination.
    let v4 = {
        let mut a = Vec::new();
        a.extend_from_slice(&8u16.to_ne_bytes());
        a.extend_from_slice(&1u16.to_ne_bytes());
        a.extend_from_slice(&[203, 0, 113, 10]);
        a
    };
    let v6 = {
        let mut a = Vec::new();
        a.extend_from_slice(&20u16.to_ne_bytes());
        a.extend_from_slice(&4u16.to_ne_bytes());
        a.extend_from_slice(&[0x20, 1, 0xd, 0xb8, 0, 0xc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        a
    };
    let ip_nest = nest(1 | 0x8000, &[v4, v6].concat());
    let tuple = nest(1 | 0x8000, &ip_nest);
    let msg = message(0x0100, NLM_F_CREATE, &tuple);
    assert_eq!(parse_all(&msg, &filter), vec![Err(ParseError::MixedFamily)]);
}

fn nest(ty: u16, inner: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&((4 + inner.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&ty.to_ne_bytes());
    a.extend_from_slice(inner);
    while a.len() % 4 != 0 {
        a.push(0);
    }
    a
}

fn message(kind: u16, flags: u16, attrs: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    let len = (NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len()) as u32;
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&[0; 8]);
    m.extend_from_slice(&[2, 0, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

#[test]
fn control_messages() {
    let filter = customers();
    let mut err = message(NLMSG_ERROR, 0, &[]);
    // nlmsgerr: error code replaces the nfgenmsg bytes here.
    err[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
    assert_eq!(parse_all(&err, &filter), vec![Ok(Parsed::Error(-1))]);
    let short_err = {
        let mut m = Vec::new();
        m.extend_from_slice(&16u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m
    };
    assert_eq!(
        parse_all(&short_err, &filter),
        vec![Err(ParseError::Short("nlmsgerr"))]
    );
    // NFNL_SUBSYS_CTNETLINK_EXP: expectations.
    let other_subsys = message(0x0200, 0, &[]);
    assert_eq!(parse_all(&other_subsys, &filter), vec![Ok(Parsed::Ignored)]);
    // A GET request echoed back (not an event) is not a flow either.
    let get = message(0x0101, 0, &[]);
    assert_eq!(parse_all(&get, &filter), vec![Ok(Parsed::Ignored)]);
    let overrun = message(NLMSG_OVERRUN, 0, &[]);
    assert_eq!(parse_all(&overrun, &filter), vec![Ok(Parsed::Overrun)]);
    let no_nfgen = {
        let mut m = Vec::new();
        m.extend_from_slice(&18u32.to_ne_bytes());
        m.extend_from_slice(&0x0100u16.to_ne_bytes());
        m.extend_from_slice(&[0; 12]);
        m
    };
    assert_eq!(
        parse_all(&no_nfgen, &filter),
        vec![Err(ParseError::Short("nfgenmsg"))]
    );
}
