use super::*;
use crate::bgp::flowspec::{block_nlri, traffic_rate};

fn ctx(ibgp: bool) -> PathCtx {
    PathCtx {
        local_as: 65001,
        ibgp,
        four_octet: true,
    }
}

#[test]
fn open_puts_as_trans_and_4_octet_capability() {
    let m = encode_open(
        4_200_000_000,
        90,
        "192.0.2.1".parse().unwrap(),
        &[Family::Ipv4Flowspec, Family::Ipv6Unicast],
    );
    assert_eq!(&m[..16], &[0xff; 16]);
    assert_eq!(usize::from(u16::from_be_bytes([m[16], m[17]])), m.len());
    assert_eq!(m[18], msg::OPEN);
    assert_eq!(m[19], 4);
    assert_eq!(&m[20..22], &AS_TRANS.to_be_bytes());
    assert_eq!(&m[22..24], &90u16.to_be_bytes());
    assert_eq!(&m[24..28], &[192, 0, 2, 1]);
    let caps = &m[29..];
    // Capability 65 (4-octet AS) with the real AS.
    let asn = 4_200_000_000u32.to_be_bytes();
    assert!(
        caps.windows(6)
            .any(|w| w == [65, 4, asn[0], asn[1], asn[2], asn[3]])
    );
    // Multiprotocol IPv4 flowspec (1/133) and IPv6 unicast (2/1).
    assert!(caps.windows(6).any(|w| w == [1, 4, 0, 1, 0, 133]));
    assert!(caps.windows(6).any(|w| w == [1, 4, 0, 2, 0, 1]));
    // Route refresh.
    assert!(caps.windows(2).any(|w| w == [2, 0]));
    let o = decode_open(&m).unwrap();
    assert_eq!(o.asn, 4_200_000_000);
    assert!(o.four_octet && o.route_refresh);
    assert_eq!(o.families, [(1, 133), (2, 1)].into());
}

#[test]
fn open_errors() {
    let good = encode_open(
        65001,
        90,
        "192.0.2.1".parse().unwrap(),
        &[Family::Ipv4Flowspec],
    );
    let mut v = good.clone();
    v[19] = 3;
    assert_eq!(
        decode_open(&v).unwrap_err(),
        Notification::new(2, 1, [0, 4])
    );
    let mut h = good.clone();
    h[22..24].copy_from_slice(&2u16.to_be_bytes());
    assert_eq!(decode_open(&h).unwrap_err().subcode, err::OPEN_HOLD);
    let mut id = good.clone();
    id[24..28].copy_from_slice(&[0, 0, 0, 0]);
    assert_eq!(decode_open(&id).unwrap_err().subcode, err::OPEN_BGP_ID);
    let mut short = good.clone();
    short.pop();
    assert_eq!(decode_open(&short).unwrap_err().code, err::HEADER);
}

#[test]
fn header_checks() {
    let mut h = [0xffu8; HEADER_LEN];
    h[16..18].copy_from_slice(&19u16.to_be_bytes());
    h[18] = msg::KEEPALIVE;
    assert_eq!(check_header(&h), Ok((msg::KEEPALIVE, 19)));
    let mut bad = h;
    bad[3] = 0;
    assert_eq!(check_header(&bad).unwrap_err().subcode, err::HEADER_SYNC);
    let mut t = h;
    t[18] = 9;
    assert_eq!(check_header(&t), Err(Notification::new(1, 3, [9])));
    let mut l = h;
    l[16..18].copy_from_slice(&4097u16.to_be_bytes());
    assert_eq!(check_header(&l), Err(Notification::new(1, 2, [0x10, 0x01])));
    let mut k = h;
    k[16..18].copy_from_slice(&20u16.to_be_bytes());
    assert_eq!(check_header(&k).unwrap_err().subcode, err::HEADER_LENGTH);
}

#[test]
fn keepalive_and_notification_bytes() {
    let k = encode_keepalive();
    assert_eq!(k.len(), 19);
    assert_eq!(k[18], 4);
    let n = Notification::new(6, 2, []).encode();
    assert_eq!(&n[16..], &[0, 21, 3, 6, 2]);
}

#[test]
fn flowspec_update_bytes() {
    let nlri = block_nlri(&"203.0.113.7/32".parse().unwrap(), None, &[])
        .encode()
        .unwrap();
    let ms = flow_announce(
        &ctx(true),
        Afi::Ipv4,
        traffic_rate(0, 0.0),
        &[],
        std::slice::from_ref(&nlri),
    )
    .unwrap();
    assert_eq!(ms.len(), 1);
    let m = &ms[0];
    let body = &m[19..];
    assert_eq!(&body[..2], &[0, 0]); // no withdrawn routes
    let attrs = &body[4..];
    // ORIGIN IGP, empty AS_PATH, LOCAL_PREF 100 (bgpkit-parser), ext communities, MP_REACH.
    let expected: Vec<u8> = [
        &[0x40, 1, 1, 0][..],
        &[0x40, 2, 0],
        &[0x40, 5, 4, 0, 0, 0, 100],
        &[0xd0, 16, 0, 8, 0x80, 0x06, 0, 0, 0, 0, 0, 0],
        &[0x90, 14, 0, 12, 0, 1, 133, 0, 0],
        &[0x06, 0x02, 0x20, 203, 0, 113, 7],
    ]
    .concat();
    assert_eq!(attrs, &expected[..]);
    assert_eq!(
        usize::from(u16::from_be_bytes([body[2], body[3]])),
        expected.len()
    );
    // And our own decoder reads it back.
    let u = decode_update(m, true).unwrap();
    assert_eq!(u.flow_reach.len(), 1);
    assert_eq!(u.flow_reach[0].encode().unwrap(), nlri);
    assert_eq!(u.ext_communities, vec![[0x80, 0x06, 0, 0, 0, 0, 0, 0]]);

    let w = flow_withdraw(Afi::Ipv4, std::slice::from_ref(&nlri)).unwrap();
    assert_eq!(
        &w[0][19..],
        &[
            0, 0, 0, 14, 0x90, 15, 0, 10, 0, 1, 133, 0x06, 0x02, 0x20, 203, 0, 113, 7
        ]
    );
    let u = decode_update(&w[0], true).unwrap();
    assert_eq!(u.flow_unreach.len(), 1);
}

#[test]
fn ebgp_flowspec_has_our_as_in_the_path() {
    let nlri = block_nlri(&"203.0.113.7/32".parse().unwrap(), None, &[])
        .encode()
        .unwrap();
    let m = &flow_announce(&ctx(false), Afi::Ipv4, traffic_rate(0, 0.0), &[], &[nlri]).unwrap()[0];
    // AS_SEQUENCE of one 4-octet AS 65001.
    let asp = [0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9];
    assert!(m.windows(asp.len()).any(|w| w == asp));
    assert!(!m.windows(2).any(|w| w == [0x40, 5]));
}

#[test]
fn many_flow_routes_are_packed_below_4096() {
    let nlris: Vec<Vec<u8>> = (0..2000u32)
        .map(|i| {
            let a = std::net::Ipv4Addr::from(0xcb00_7100u32 + i);
            block_nlri(&IpNet::from(IpAddr::V4(a)), Some(6), &[25])
                .encode()
                .unwrap()
        })
        .collect();
    let ms = flow_announce(&ctx(true), Afi::Ipv4, traffic_rate(0, 0.0), &[], &nlris).unwrap();
    assert!(ms.len() > 1);
    let mut total = 0;
    for m in &ms {
        assert!(m.len() <= MAX_MESSAGE);
        total += decode_update(m, true).unwrap().flow_reach.len();
    }
    assert_eq!(total, 2000);
    let ws = flow_withdraw(Afi::Ipv4, &nlris).unwrap();
    assert!(ws.iter().all(|m| m.len() <= MAX_MESSAGE));
    let total: usize = ws
        .iter()
        .map(|m| decode_update(m, true).unwrap().flow_unreach.len())
        .sum();
    assert_eq!(total, 2000);
}

#[test]
fn rtbh_update_bytes() {
    let p: IpNet = "203.0.113.7/32".parse().unwrap();
    let m = &rtbh_announce(
        &ctx(false),
        &[p],
        "192.0.2.66".parse().unwrap(),
        &[
            Community::Standard(65001, 666),
            Community::Large(65001, 1, 2),
        ],
    )
    .unwrap()[0];
    // COMMUNITIES: BLACKHOLE, NO_EXPORT, the peer's own.
    let comm = [
        0xc0, 8, 12, 0xff, 0xff, 0x02, 0x9a, 0xff, 0xff, 0xff, 0x01, 0xfd, 0xe9, 0x02, 0x9a,
    ];
    assert!(m.windows(comm.len()).any(|w| w == comm), "{m:02x?}");
    let large = [0xc0, 32, 12, 0, 0, 0xfd, 0xe9, 0, 0, 0, 1, 0, 0, 0, 2];
    assert!(m.windows(large.len()).any(|w| w == large));
    let nh = [0x40, 3, 4, 192, 0, 2, 66];
    assert!(m.windows(nh.len()).any(|w| w == nh));
    assert!(m.ends_with(&[32, 203, 0, 113, 7]));
    let u = decode_update(m, true).unwrap();
    assert_eq!(u.unicast, 1);

    let p6: IpNet = "2001:db8:c::/64".parse().unwrap();
    let m6 = &rtbh_announce(&ctx(true), &[p6], "100::1".parse().unwrap(), &[]).unwrap()[0];
    let mp = [0, 2, 1, 16];
    assert!(m6.windows(4).any(|w| w == mp));
    assert!(m6.ends_with(&[64, 0x20, 0x01, 0x0d, 0xb8, 0, 0x0c, 0, 0]));
    assert_eq!(decode_update(m6, true).unwrap().unicast, 1);

    let w = &rtbh_withdraw(&[p]).unwrap()[0];
    assert_eq!(&w[19..], &[0, 5, 32, 203, 0, 113, 7, 0, 0]);
    let w6 = &rtbh_withdraw(&[p6]).unwrap()[0];
    assert_eq!(decode_update(w6, true).unwrap().unicast, 1);
}

#[test]
fn flow_routes_carry_the_peers_communities() {
    let nlri = block_nlri(&"203.0.113.7/32".parse().unwrap(), None, &[])
        .encode()
        .unwrap();
    let ms = flow_announce(
        &ctx(false),
        Afi::Ipv4,
        traffic_rate(0, 0.0),
        &[
            Community::Standard(65001, 777),
            Community::Large(65001, 3, 4),
        ],
        std::slice::from_ref(&nlri),
    )
    .unwrap();
    let m = &ms[0];
    // COMMUNITIES: only the peer's (no BLACKHOLE, no NO_EXPORT on a flowspec route).
    let comm = [0xc0, 8, 4, 0xfd, 0xe9, 0x03, 0x09];
    assert!(m.windows(comm.len()).any(|w| w == comm), "{m:02x?}");
    let large = [0xc0, 32, 12, 0, 0, 0xfd, 0xe9, 0, 0, 0, 3, 0, 0, 0, 4];
    assert!(m.windows(large.len()).any(|w| w == large), "{m:02x?}");
    let u = decode_update(m, true).unwrap();
    assert_eq!(u.flow_reach.len(), 1);
    assert_eq!(u.ext_communities, vec![traffic_rate(0, 0.0)]);
    // Without communities neither attribute is there.
    let plain = &flow_announce(
        &ctx(false),
        Afi::Ipv4,
        traffic_rate(0, 0.0),
        &[],
        std::slice::from_ref(&nlri),
    )
    .unwrap()[0];
    assert!(!plain.windows(2).any(|w| w == [0xc0, 8] || w == [0xc0, 32]));
}

/// The most communities the policy accepts ([`crate::policy::defaults::MAX_COMMUNITIES`],
/// all large: the biggest attribute) still leave every UPDATE within 4096 bytes, flowspec
/// and RTBH, IPv4 and IPv6, with many routes.
#[test]
fn updates_with_the_most_communities_stay_within_4096() {
    let most: Vec<Community> = (0..crate::policy::defaults::MAX_COMMUNITIES as u32)
        .map(|i| Community::Large(4_200_000_000, i, i))
        .collect();
    let nlris: Vec<Vec<u8>> = (0..3000u32)
        .map(|i| {
            let t = IpNet::new(std::net::Ipv4Addr::from(0xc612_0000 + i).into(), 32).unwrap();
            block_nlri(&t, Some(6), &[25, 587]).encode().unwrap()
        })
        .collect();
    let ms = flow_announce(&ctx(true), Afi::Ipv4, traffic_rate(0, 0.0), &most, &nlris).unwrap();
    assert!(ms.iter().all(|m| m.len() <= MAX_MESSAGE));
    let total: usize = ms
        .iter()
        .map(|m| decode_update(m, true).unwrap().flow_reach.len())
        .sum();
    assert_eq!(total, 3000);
    let v4: Vec<IpNet> = (0..1000u32)
        .map(|i| IpNet::new(std::net::Ipv4Addr::from(0xc612_0000 + i).into(), 32).unwrap())
        .collect();
    let v6: Vec<IpNet> = (0..1000u32)
        .map(|i| format!("2001:db8:{i:x}::/64").parse().unwrap())
        .collect();
    for (ps, nh) in [(v4, "192.0.2.66"), (v6, "100::1")] {
        let ms = rtbh_announce(&ctx(false), &ps, nh.parse().unwrap(), &most).unwrap();
        assert!(ms.iter().all(|m| m.len() <= MAX_MESSAGE), "{nh}");
        let n: usize = ms
            .iter()
            .map(|m| decode_update(m, true).unwrap().unicast)
            .sum();
        assert_eq!(n, 1000);
    }
    // More than fits is an error, never a panic or an oversized message.
    let far_too_many: Vec<Community> = (0..400).map(|i| Community::Large(1, i, i)).collect();
    assert!(matches!(
        flow_announce(
            &ctx(true),
            Afi::Ipv4,
            traffic_rate(0, 0.0),
            &far_too_many,
            &nlris[..1]
        ),
        Err(WireError::TooBig(_))
    ));
}

#[test]
fn end_of_rib_markers() {
    assert_eq!(&end_of_rib(1, 1)[16..], &[0, 23, 2, 0, 0, 0, 0]);
    let e = end_of_rib(2, 133);
    assert_eq!(&e[19..], &[0, 0, 0, 6, 0x80, 15, 3, 0, 2, 133]);
    assert_eq!(decode_update(&e, true).unwrap().end_of_rib, Some((2, 133)));
    assert_eq!(
        decode_update(&end_of_rib(1, 1), true).unwrap().end_of_rib,
        Some((1, 1))
    );
}

#[test]
fn malformed_updates_get_the_right_notification() {
    let upd = |body: &[u8]| frame(msg::UPDATE, body);
    // What still resets the session under RFC 7606: the message framing, MP_REACH /
    // MP_UNREACH and NLRI that cannot be parsed.
    // Withdrawn length past the end.
    assert_eq!(
        decode_update(&upd(&[0, 9, 0, 0]), true).unwrap_err(),
        Notification::new(3, 1, [])
    );
    // Total path attribute length past the end.
    let e = decode_update(&upd(&[0, 0, 0, 9, 0x40, 1, 1, 0]), true).unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 1));
    // Prefix length 33.
    let e = decode_update(&upd(&[0, 0, 0, 0, 33, 1, 2, 3, 4, 5]), true).unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 10));
    // Flowspec NLRI with components out of order: located by its length, so no reset any
    // more (it is treated as withdrawn alone, see rfc7606_malformed_flowspec_nlri_*).
    let bad = [
        0, 0, 0, 23, 0x40, 1, 1, 0, 0x40, 2, 0, 0x80, 14, 13, 0, 1, 133, 0, 0, 0x07, 0x03, 0x81,
        0x06, 0x02, 0x08, 0x0a, 0x00,
    ];
    let u = decode_update(&upd(&bad[..]), true).unwrap();
    assert_eq!(u.bad_nlri.len(), 1);
    assert_eq!(
        u.bad_nlri[0].error,
        FlowspecError::Order {
            previous: 3,
            found: 2
        }
    );
}

// RFC 7606, byte by byte. Each UPDATE below announces one IPv4 flowspec route
// (`src 203.0.113.8/32`) in MP_REACH after the attribute under test, so treat-as-withdraw
// shows as that route moving to the withdrawn list.

const FLOW_NLRI: [u8; 7] = [6, 0x02, 32, 203, 0, 113, 8];

fn a(flags: u8, code: u8, value: &[u8]) -> Vec<u8> {
    let mut v = vec![flags, code, value.len() as u8];
    v.extend_from_slice(value);
    v
}

fn mp_reach_flow() -> Vec<u8> {
    let mut v = vec![0, 1, 133, 0, 0];
    v.extend_from_slice(&FLOW_NLRI);
    a(0x80, 14, &v)
}

fn origin() -> Vec<u8> {
    a(0x40, 1, &[0])
}

fn as_path() -> Vec<u8> {
    a(0x40, 2, &[])
}

fn rate_zero() -> Vec<u8> {
    a(0xc0, 16, &[0x80, 0x06, 0, 0, 0, 0, 0, 0])
}

/// An UPDATE of the given attributes (in order) and unicast NLRI.
fn update_of(attrs: &[Vec<u8>], nlri: &[u8]) -> Vec<u8> {
    let all: Vec<u8> = attrs.concat();
    let mut b = vec![0, 0];
    b.extend_from_slice(&(all.len() as u16).to_be_bytes());
    b.extend_from_slice(&all);
    b.extend_from_slice(nlri);
    frame(msg::UPDATE, &b)
}

/// The standard attributes with `bad` inserted first.
fn with(bad: Vec<u8>) -> Vec<u8> {
    update_of(
        &[bad, origin(), as_path(), rate_zero(), mp_reach_flow()],
        &[],
    )
}

#[track_caller]
fn assert_withdrawn(m: &[u8], four: bool, code: u8) {
    let u = decode_update(m, four).expect("treat-as-withdraw is not a session reset");
    let w = u.treat_as_withdraw.expect("treat-as-withdraw");
    assert_eq!(w.code, code, "{w}");
    assert!(u.flow_reach.is_empty(), "{u:?}");
    assert_eq!(
        u.flow_unreach.len(),
        1,
        "the announced route is withdrawn instead"
    );
    assert!(u.ext_communities.is_empty());
}

#[track_caller]
fn assert_discarded(m: &[u8], four: bool, code: u8) {
    let u = decode_update(m, four).expect("attribute discard is not a session reset");
    assert_eq!(u.treat_as_withdraw, None);
    assert_eq!(u.flow_reach.len(), 1, "the route stays announced");
    assert_eq!(
        u.discarded.iter().map(|d| d.code).collect::<Vec<_>>(),
        vec![code]
    );
}

#[test]
fn rfc7606_the_well_formed_update_announces() {
    let u = decode_update(
        &update_of(&[origin(), as_path(), rate_zero(), mp_reach_flow()], &[]),
        true,
    )
    .unwrap();
    assert_eq!(u.flow_reach.len(), 1);
    assert_eq!(u.treat_as_withdraw, None);
    assert!(u.discarded.is_empty());
    assert_eq!(u.ext_communities.len(), 1);
}

#[test]
fn rfc7606_treat_as_withdraw_attributes() {
    // Section 7.1: ORIGIN of a bad length or an undefined value (replacing the good one).
    let m = update_of(
        &[a(0x40, 1, &[7]), as_path(), rate_zero(), mp_reach_flow()],
        &[],
    );
    assert_withdrawn(&m, true, 1);
    let m = update_of(
        &[a(0x40, 1, &[0, 0]), as_path(), rate_zero(), mp_reach_flow()],
        &[],
    );
    assert_withdrawn(&m, true, 1);
    // Section 7.2: AS_PATH segment running past the attribute; bad segment type; 2-octet
    // path on a 4-octet session.
    let m = update_of(
        &[origin(), a(0x40, 2, &[2, 1]), rate_zero(), mp_reach_flow()],
        &[],
    );
    assert_withdrawn(&m, true, 2);
    let m = update_of(
        &[
            origin(),
            a(0x40, 2, &[9, 1, 0, 0, 0, 1]),
            rate_zero(),
            mp_reach_flow(),
        ],
        &[],
    );
    assert_withdrawn(&m, true, 2);
    let m = update_of(
        &[
            origin(),
            a(0x40, 2, &[2, 1, 0xfd, 0xe9]),
            rate_zero(),
            mp_reach_flow(),
        ],
        &[],
    );
    assert_withdrawn(&m, true, 2);
    decode_update(&m, false).expect("the same path is fine on a 2-octet session");
    // Sections 7.3-7.5, 7.8-7.10, 7.14 and RFC 8092: length errors.
    for bad in [
        a(0x40, 3, &[192, 0, 2]),         // NEXT_HOP
        a(0x80, 4, &[0, 1]),              // MULTI_EXIT_DISC
        a(0x40, 5, &[0]),                 // LOCAL_PREF
        a(0xc0, 8, &[0xff, 0xff, 0]),     // COMMUNITIES
        a(0xc0, 8, &[]),                  // COMMUNITIES, empty
        a(0x80, 9, &[1, 2, 3]),           // ORIGINATOR_ID
        a(0x80, 10, &[]),                 // CLUSTER_LIST
        a(0xc0, 16, &[0x80, 6, 0, 0, 0]), // EXTENDED_COMMUNITIES
        a(0xc0, 16, &[]),                 // EXTENDED_COMMUNITIES, empty
        a(0xc0, 32, &[0; 11]),            // LARGE_COMMUNITY
    ] {
        let code = bad[1];
        assert_withdrawn(&with(bad), true, code);
    }
}

#[test]
fn rfc7606_ext_communities_only_from_a_well_formed_attribute() {
    // A malformed EXTENDED_COMMUNITIES must not lend a truncated action to the rule.
    let m = update_of(
        &[
            origin(),
            as_path(),
            a(0xc0, 16, &[0x80, 6, 0, 0, 0, 0, 0, 0, 1]),
            mp_reach_flow(),
        ],
        &[],
    );
    assert_withdrawn(&m, true, 16);
}

#[test]
fn rfc7606_attribute_discard() {
    // Section 7.6: ATOMIC_AGGREGATE must be empty.
    assert_discarded(&with(a(0x40, 6, &[1])), true, 6);
    // Section 7.7: AGGREGATOR is 8 bytes with 4-octet AS numbers, 6 without.
    assert_discarded(&with(a(0xc0, 7, &[0; 6])), true, 7);
    assert_discarded(&with(a(0xc0, 7, &[0; 8])), false, 7);
    let ok = decode_update(&with(a(0xc0, 7, &[0; 6])), false).unwrap();
    assert!(ok.discarded.is_empty());
    // RFC 6793 section 6: malformed AS4_PATH and AS4_AGGREGATOR.
    assert_discarded(&with(a(0xc0, 17, &[2, 2, 0, 0, 0, 1])), true, 17);
    assert_discarded(&with(a(0xc0, 18, &[0; 6])), true, 18);
    // Section 3 g: a repeated attribute (other than MP_*) is discarded after the first.
    let m = update_of(
        &[
            origin(),
            as_path(),
            a(0x40, 1, &[9]),
            rate_zero(),
            mp_reach_flow(),
        ],
        &[],
    );
    assert_discarded(&m, true, 1);
}

#[test]
fn rfc7606_attribute_flags() {
    // Section 3 c: Optional/Transitive bits in conflict with the definition.
    let m = update_of(
        &[a(0xc0, 1, &[0]), as_path(), rate_zero(), mp_reach_flow()],
        &[],
    );
    assert_withdrawn(&m, true, 1);
    assert_withdrawn(&with(a(0x40, 8, &[0, 0, 0, 1])), true, 8);
    assert_withdrawn(&with(a(0x40, 16, &[0x80, 6, 0, 0, 0, 0, 0, 0])), true, 16);
    // ... where the attribute is one discarded when malformed, it is discarded.
    assert_discarded(&with(a(0x40, 7, &[0; 8])), true, 7);
    assert_discarded(&with(a(0x80, 6, &[])), true, 6);
    // MP_REACH with wrong flags: its routes cannot be trusted to be located; its family is
    // disabled (section 5.3; reset 3/4 when not even the family can be read, see
    // rfc7606_mp_attributes_reset_the_session).
    let mut mp = mp_reach_flow();
    mp[0] = 0x40;
    let u = decode_update(
        &update_of(&[origin(), as_path(), rate_zero(), mp], &[]),
        true,
    )
    .unwrap();
    assert_disabled(&u, (1, 133), "attribute flags");
    // The partial and extended-length bits do not matter.
    let mut mp = mp_reach_flow();
    mp[0] = 0xa0;
    decode_update(
        &update_of(&[origin(), as_path(), rate_zero(), mp], &[]),
        true,
    )
    .unwrap();
}

#[test]
fn rfc7606_missing_well_known_attributes() {
    // Section 3 d: missing ORIGIN / AS_PATH with flowspec routes; missing NEXT_HOP with
    // NLRI-field routes.
    assert_withdrawn(
        &update_of(&[as_path(), rate_zero(), mp_reach_flow()], &[]),
        true,
        1,
    );
    assert_withdrawn(
        &update_of(&[origin(), rate_zero(), mp_reach_flow()], &[]),
        true,
        2,
    );
    let m = update_of(&[origin(), as_path()], &[24, 192, 0, 2]);
    let u = decode_update(&m, true).unwrap();
    assert_eq!(u.treat_as_withdraw.unwrap().code, 3);
    assert_eq!(u.unicast, 1);
    // A withdrawal-only UPDATE needs none of them.
    let mut v = vec![0, 1, 133];
    v.extend_from_slice(&FLOW_NLRI);
    let u = decode_update(&update_of(&[a(0x80, 15, &v)], &[]), true).unwrap();
    assert_eq!((u.treat_as_withdraw, u.flow_unreach.len()), (None, 1));
    // ... and a malformed attribute beside MP_UNREACH leaves the withdrawals in place.
    let u = decode_update(&update_of(&[a(0x40, 1, &[5]), a(0x80, 15, &v)], &[]), true).unwrap();
    assert_eq!(u.treat_as_withdraw.unwrap().code, 1);
    assert_eq!(u.flow_unreach.len(), 1);
}

#[test]
fn rfc7606_attribute_length_overruns() {
    // Section 4: the last attribute runs past the attribute field: treat-as-withdraw, the
    // NLRI (in MP_REACH, parsed before it) still found.
    let mut bad = a(0xc0, 8, &[0, 0, 0, 1]);
    bad[2] = 9;
    let m = update_of(&[origin(), as_path(), mp_reach_flow(), bad], &[]);
    assert_withdrawn(&m, true, 8);
    // Fewer octets left than an attribute header.
    let m = update_of(&[origin(), as_path(), mp_reach_flow(), vec![0x40]], &[]);
    assert_withdrawn(&m, true, 0);
    let m = update_of(
        &[origin(), as_path(), mp_reach_flow(), vec![0x50, 1, 0]],
        &[],
    );
    assert_withdrawn(&m, true, 1);
    // The overrunning attribute is MP_REACH itself: its NLRI cannot be located, but its
    // AFI/SAFI can be read: that family is disabled (RFC 4760 section 7), and the rest of
    // the UPDATE is treat-as-withdraw.
    let mut mp = mp_reach_flow();
    mp[2] += 1;
    let u = decode_update(&update_of(&[origin(), as_path(), mp], &[]), true).unwrap();
    assert_disabled(
        &u,
        (1, 133),
        "attribute length overruns the path attributes",
    );
    assert_eq!(u.treat_as_withdraw.unwrap().code, 14);
    // ... unless not even the AFI/SAFI are there: reset 3/5.
    let e = decode_update(&frame(msg::UPDATE, &[0, 0, 0, 5, 0x80, 14, 9, 0, 1]), true).unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 5));
    // The old bad-peer case: ORIGIN claiming 5 bytes in a 4-byte field.
    let e = decode_update(&frame(msg::UPDATE, &[0, 0, 0, 4, 0x40, 1, 5, 0]), true).unwrap();
    assert_eq!(e.treat_as_withdraw.unwrap().code, 1);
}

#[track_caller]
fn assert_disabled(u: &UpdateIn, family: (u16, u8), reason: &str) {
    assert_eq!(
        u.disabled
            .iter()
            .map(|d| ((d.afi, d.safi), d.reason))
            .collect::<Vec<_>>(),
        vec![(family, reason)],
        "{u:?}"
    );
    assert!(
        u.flow_reach.is_empty(),
        "nothing of the family is read: {u:?}"
    );
}

/// MP_REACH_NLRI of IPv4 flowspec with the given NLRI field (next hop length 0).
fn mp_reach_flow_of(nlri: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 1, 133, 0, 0];
    v.extend_from_slice(nlri);
    a(0x80, 14, &v)
}

#[test]
fn rfc7606_mp_attributes_whose_nlri_cannot_be_located_disable_the_family() {
    // Section 7.11 / RFC 4760 section 7: MP_REACH cut before its next hop and reserved
    // octet, or a next-hop length that overruns the attribute.
    let u = decode_update(
        &update_of(&[origin(), as_path(), a(0x80, 14, &[0, 1, 133])], &[]),
        true,
    )
    .unwrap();
    assert_disabled(&u, (1, 133), "MP_REACH_NLRI shorter than its fixed fields");
    let u = decode_update(
        &update_of(&[origin(), as_path(), a(0x80, 14, &[0, 1, 133, 0])], &[]),
        true,
    )
    .unwrap();
    assert_disabled(&u, (1, 133), "next-hop length overruns MP_REACH_NLRI");
    let u = decode_update(
        &update_of(&[origin(), as_path(), a(0x80, 14, &[0, 1, 133, 9, 0])], &[]),
        true,
    )
    .unwrap();
    assert_disabled(&u, (1, 133), "next-hop length overruns MP_REACH_NLRI");
    // A unicast next hop of a length the family does not have (IPv6: 16 or 32).
    let mut v = vec![
        0, 2, 1, 4, 192, 0, 2, 1, 0, 64, 0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0,
    ];
    let u = decode_update(
        &update_of(&[origin(), as_path(), a(0x80, 14, &v)], &[]),
        true,
    )
    .unwrap();
    assert_disabled(&u, (2, 1), "next-hop length inconsistent with the family");
    // Section 5.3: a prefix longer than the family's, an NLRI overrunning the attribute.
    v = vec![0, 2, 1, 16];
    v.extend_from_slice(&[0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    v.extend_from_slice(&[129, 0x20]);
    let u = decode_update(
        &update_of(&[origin(), as_path(), a(0x80, 14, &v)], &[]),
        true,
    )
    .unwrap();
    assert_disabled(
        &u,
        (2, 1),
        "a prefix is longer than the family's or overruns the attribute",
    );
    // The last flowspec NLRI claims 20 octets, 6 are there (one- and two-octet lengths).
    for nlri in [
        [&FLOW_NLRI[..], &[20, 0x02, 32, 203, 0, 113, 9]].concat(),
        [&FLOW_NLRI[..], &[0xf0, 0x14, 0x02, 32, 203, 0, 113]].concat(),
        vec![0xf0],
    ] {
        let u = decode_update(
            &update_of(
                &[origin(), as_path(), rate_zero(), mp_reach_flow_of(&nlri)],
                &[],
            ),
            true,
        )
        .unwrap();
        assert_disabled(
            &u,
            (1, 133),
            "a flowspec NLRI length overruns the attribute",
        );
        assert!(u.bad_nlri.is_empty(), "{u:?}");
    }
    // The same in MP_UNREACH: the family is disabled, its other withdrawals unread.
    let u = decode_update(&update_of(&[a(0x80, 15, &[0, 2, 133, 30, 1])], &[]), true).unwrap();
    assert_eq!(u.disabled[0].family(), "ipv6-flowspec");
    assert!(u.flow_unreach.is_empty());
    // Section 5.3: MP attribute flags inconsistent with RFC 4760 (transitive set).
    let mut mp = mp_reach_flow();
    mp[0] = 0xc0;
    let u = decode_update(&update_of(&[origin(), as_path(), mp], &[]), true).unwrap();
    assert_disabled(&u, (1, 133), "attribute flags");
    // The other family's routes in the same UPDATE stand (a good IPv4 flowspec MP_REACH,
    // a broken IPv6 flowspec MP_UNREACH).
    let u = decode_update(
        &update_of(
            &[
                origin(),
                as_path(),
                rate_zero(),
                mp_reach_flow(),
                a(0x80, 15, &[0, 2, 133, 30, 1]),
            ],
            &[],
        ),
        true,
    )
    .unwrap();
    assert_eq!(u.flow_reach.len(), 1, "{u:?}");
    assert_eq!(u.disabled[0].family(), "ipv6-flowspec");
    // A family we have no name for is named by its numbers.
    let u = decode_update(&update_of(&[a(0x80, 15, &[0, 1, 128, 200])], &[]), true);
    assert!(
        u.unwrap().disabled.is_empty(),
        "an unknown family's NLRI are not read"
    );
    let e = FamilyError {
        afi: 25,
        safi: 70,
        reason: "x",
    };
    assert_eq!(e.to_string(), "afi 25 safi 70: x");
}

#[test]
fn rfc7606_malformed_flowspec_nlri_of_known_length_is_withdrawn_alone() {
    // Three NLRI in one MP_REACH: good, malformed (each way below), good. The malformed one
    // is located by its length prefix; it alone is treat-as-withdraw.
    let good2 = [6, 0x02, 32, 203, 0, 113, 10];
    let malformed: [(&[u8], FlowspecError); 7] = [
        // Components out of order (source before destination is fine, 2 then 1 is not).
        (
            &[12, 0x02, 32, 203, 0, 113, 9, 0x01, 32, 198, 51, 100, 1],
            FlowspecError::Order {
                previous: 2,
                found: 1,
            },
        ),
        // Unknown component type 14.
        (&[3, 14, 0x81, 1], FlowspecError::UnknownComponent(14)),
        // Prefix length 33 for IPv4.
        (
            &[7, 0x02, 33, 203, 0, 113, 9, 0],
            FlowspecError::Prefix {
                length: 33,
                offset: 0,
            },
        ),
        // First operator with the AND bit.
        (&[3, 0x03, 0xc1, 6], FlowspecError::FirstAnd(3)),
        // Numeric operator with the reserved bit.
        (&[3, 0x03, 0x89, 6], FlowspecError::Reserved(3)),
        // A component running past its NLRI's own length (the list's framing holds).
        (&[3, 0x02, 32, 203], FlowspecError::Truncated),
        // An empty NLRI.
        (&[0], FlowspecError::Length(0)),
    ];
    for (bad, error) in malformed {
        let nlri = [&FLOW_NLRI[..], bad, &good2[..]].concat();
        let m = update_of(
            &[origin(), as_path(), rate_zero(), mp_reach_flow_of(&nlri)],
            &[],
        );
        let u = decode_update(&m, true).expect("no session reset");
        assert_eq!(u.flow_reach.len(), 2, "the good ones stand: {u:?}");
        assert_eq!(u.bad_nlri.len(), 1, "{u:?}");
        assert_eq!(u.bad_nlri[0].nlri, bad, "the bytes as received");
        assert_eq!(u.bad_nlri[0].error, error);
        assert_eq!(u.bad_nlri[0].afi, Afi::Ipv4);
        assert!(u.disabled.is_empty() && u.treat_as_withdraw.is_none());
        assert_eq!(u.ext_communities.len(), 1);
        // In MP_UNREACH the same: the good withdrawals apply.
        let mut v = vec![0, 1, 133];
        v.extend_from_slice(&nlri);
        let u = decode_update(&update_of(&[a(0x80, 15, &v)], &[]), true).unwrap();
        assert_eq!((u.flow_unreach.len(), u.bad_nlri.len()), (2, 1), "{u:?}");
    }
    // With a malformed attribute as well, the whole UPDATE is treat-as-withdraw.
    let nlri = [&FLOW_NLRI[..], &[3, 14, 0x81, 1], &good2[..]].concat();
    let m = update_of(&[a(0x40, 1, &[7]), as_path(), mp_reach_flow_of(&nlri)], &[]);
    let u = decode_update(&m, true).unwrap();
    assert_eq!(
        (u.flow_reach.len(), u.flow_unreach.len(), u.bad_nlri.len()),
        (0, 2, 1)
    );
}

#[test]
fn rfc7606_mp_attributes_reset_the_session() {
    // Sections 7.11, 7.12 and 3 g: not even the AFI/SAFI can be read.
    let e = decode_update(
        &update_of(&[origin(), as_path(), a(0x80, 14, &[0, 1])], &[]),
        true,
    )
    .unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 9));
    let e = decode_update(&update_of(&[a(0x80, 15, &[0, 1])], &[]), true).unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 9));
    // Flags in conflict and too short to read the family: 3/4.
    let e = decode_update(&update_of(&[a(0xc0, 15, &[0, 1])], &[]), true).unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 4));
    let e = decode_update(
        &update_of(
            &[origin(), as_path(), mp_reach_flow(), mp_reach_flow()],
            &[],
        ),
        true,
    )
    .unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 1));
}

// The bgpkit-parser 0.23 gaps the workarounds above exist for. Each test pins the gap; when
// one fails after an upgrade, the codec got fixed and the workaround can go.

#[test]
fn bgpkit_gap_traffic_rate_written_with_type_0x40() {
    use bgpkit_parser::models::{ExtendedCommunity, FlowSpecTrafficRate};
    let attrs = Attributes::from_iter([AttributeValue::ExtendedCommunities(vec![
        ExtendedCommunity::FlowSpecTrafficRate(FlowSpecTrafficRate {
            as_number: 0,
            rate_bytes_per_sec: 0.0,
        }),
    ])]);
    let mut buf = BytesMut::new();
    attrs.encode_to(AsnLength::Bits32, &mut buf).unwrap();
    let value = &buf[buf.len() - 8..];
    assert_eq!(&value[..2], &[0x40, 0x06], "{value:02x?}");
    assert_ne!(
        value[0], 0x80,
        "bgpkit-parser now writes 0x8006: drop rate_zero()"
    );
    // Ours is right.
    assert_eq!(
        &crate::bgp::flowspec::traffic_rate(0, 0.0)[..2],
        &[0x80, 0x06]
    );
}

#[test]
fn bgpkit_gap_mp_reach_omits_the_zero_next_hop_length() {
    let nlri = Nlri {
        afi: KAfi::Ipv4,
        safi: KSafi::FlowSpec,
        next_hop: None,
        prefixes: vec![],
        labeled_prefixes: None,
        link_state_nlris: None,
        flowspec_nlris: Some(vec![]),
    };
    let attrs = Attributes::from_iter([AttributeValue::MpReachNlri(nlri)]);
    let mut buf = BytesMut::new();
    attrs.encode_to(AsnLength::Bits32, &mut buf).unwrap();
    // flags, type, length, AFI(2), SAFI, then RFC 4760 wants next-hop length 0 and reserved 0:
    // bgpkit-parser writes only the reserved byte.
    assert_eq!(
        &buf[3..],
        &[0, 1, 133, 0],
        "bgpkit-parser fixed MP_REACH without next hop"
    );
}

#[test]
fn bgpkit_gap_open_truncates_a_4_octet_as() {
    let open = BgpOpenMessage {
        version: 4,
        asn: 4_200_000_000u32.into(),
        hold_time: 90,
        bgp_identifier: "192.0.2.1".parse().unwrap(),
        extended_length: false,
        opt_params: vec![],
    };
    let m = BgpMessage::Open(open).encode(AsnLength::Bits32).unwrap();
    assert_ne!(
        &m[20..22],
        &AS_TRANS.to_be_bytes(),
        "bgpkit-parser now writes AS_TRANS"
    );
    // The low 16 bits of the AS, truncated.
    assert_eq!(&m[20..22], &(4_200_000_000u32 as u16).to_be_bytes());
    // Ours does.
    let ours = encode_open(4_200_000_000, 90, "192.0.2.1".parse().unwrap(), &[]);
    assert_eq!(&ours[20..22], &AS_TRANS.to_be_bytes());
}

#[test]
fn bgpkit_gap_received_flowspec_nlri_not_decoded() {
    let nlri = block_nlri(&"203.0.113.7/32".parse().unwrap(), Some(6), &[25])
        .encode()
        .unwrap();
    let m = &flow_announce(&ctx(false), Afi::Ipv4, traffic_rate(0, 0.0), &[], &[nlri]).unwrap()[0];
    let mut b = Bytes::copy_from_slice(m);
    let parsed =
        bgpkit_parser::parser::bgp::messages::parse_bgp_message(&mut b, false, &AsnLength::Bits32);
    let Ok(BgpMessage::Update(u)) = parsed else {
        panic!("bgpkit-parser parses the UPDATE frame: {parsed:?}");
    };
    let decoded = u.attributes.iter().any(|a| {
        matches!(a, AttributeValue::MpReachNlri(n) if n.flowspec_nlris.as_ref().is_some_and(|v| !v.is_empty()))
    });
    assert!(!decoded, "bgpkit-parser now decodes SAFI 133 NLRI");
    // Ours does.
    assert_eq!(decode_update(m, true).unwrap().flow_reach.len(), 1);
}
