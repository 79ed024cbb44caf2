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
    let m = &flow_announce(&ctx(false), Afi::Ipv4, traffic_rate(0, 0.0), &[nlri]).unwrap()[0];
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
    let ms = flow_announce(&ctx(true), Afi::Ipv4, traffic_rate(0, 0.0), &nlris).unwrap();
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
    // Withdrawn length past the end.
    assert_eq!(
        decode_update(&upd(&[0, 9, 0, 0]), true).unwrap_err(),
        Notification::new(3, 1, [])
    );
    // Attribute length past the end.
    let e = decode_update(&upd(&[0, 0, 0, 4, 0x40, 1, 5, 0]), true).unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 5));
    // Bad ORIGIN value.
    let e = decode_update(&upd(&[0, 0, 0, 4, 0x40, 1, 1, 7]), true).unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 6));
    // NLRI without ORIGIN.
    let e = decode_update(
        &upd(&[0, 0, 0, 7, 0x40, 3, 4, 192, 0, 2, 1, 24, 192, 0, 2]),
        true,
    )
    .unwrap_err();
    assert_eq!(e, Notification::new(3, 3, [1]));
    // Prefix length 33.
    let e = decode_update(&upd(&[0, 0, 0, 0, 33, 1, 2, 3, 4, 5]), true).unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 10));
    // Duplicate attribute.
    let e = decode_update(&upd(&[0, 0, 0, 8, 0x40, 1, 1, 0, 0x40, 1, 1, 0]), true).unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 1));
    // Malformed AS_PATH.
    let e = decode_update(&upd(&[0, 0, 0, 5, 0x40, 2, 2, 2, 1]), true).unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 11));
    // Flowspec NLRI with components out of order.
    let bad = [
        0, 0, 0, 23, 0x40, 1, 1, 0, 0x40, 2, 0, 0x80, 14, 13, 0, 1, 133, 0, 0, 0x07, 0x03, 0x81,
        0x06, 0x02, 0x08, 0x0a, 0x00,
    ];
    let e = decode_update(&upd(&bad[..]), true).unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 9));
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
        "bgpkit-parser now writes 0x8006: drop traffic_rate()"
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
    let m = &flow_announce(&ctx(false), Afi::Ipv4, traffic_rate(0, 0.0), &[nlri]).unwrap()[0];
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
