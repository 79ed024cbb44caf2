//! Fuzzes the BGP receive path: header checks, UPDATE decoding (flowspec included, with the
//! RFC 7606 outcomes: treat-as-withdraw of the UPDATE or of single flowspec NLRI, AFI/SAFI
//! disable, NOTIFICATION), OPEN decoding and the translation of received flowspec rules.
//! Nothing may panic; every malformed input must come back as a value.

#![no_main]

use egressguard::bgp::flowspec::{Afi, FlowNlri, translate};
use egressguard::bgp::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a whole message after its header passed the checks.
    if data.len() >= wire::HEADER_LEN {
        let mut h = [0u8; wire::HEADER_LEN];
        h.copy_from_slice(&data[..wire::HEADER_LEN]);
        let _ = wire::check_header(&h);
    }
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((data.len() + 19).min(65535) as u16).to_be_bytes());
    m.push(wire::msg::UPDATE);
    m.extend_from_slice(data);
    for four in [false, true] {
        if let Ok(u) = wire::decode_update(&m, four) {
            for n in u.flow_reach.iter().chain(&u.flow_unreach) {
                let _ = n.encode();
                let _ = translate("fuzz", n, &u.ext_communities);
            }
            // Treat-as-withdraw of single NLRI: each is one whole NLRI that does not decode.
            for b in &u.bad_nlri {
                assert!(FlowNlri::decode(b.afi, &b.nlri).is_err());
            }
            // AFI/SAFI disable: named for `status`.
            for d in &u.disabled {
                let _ = d.to_string();
            }
        }
    }
    m[18] = wire::msg::OPEN;
    let _ = wire::decode_open(&m);
    for afi in [Afi::Ipv4, Afi::Ipv6] {
        if let Ok(list) = FlowNlri::decode_all(afi, data) {
            for n in list {
                // What decodes must encode again.
                let _ = n.encode();
            }
        }
        // NLRI by NLRI: the same list decodes the same way (all of it, or the framing
        // fails for both, or some NLRI is malformed).
        match FlowNlri::decode_each(afi, data) {
            Ok(each) => {
                let good: Option<Vec<_>> = each.into_iter().map(Result::ok).collect();
                assert_eq!(good, FlowNlri::decode_all(afi, data).ok());
            }
            Err(_) => assert!(FlowNlri::decode_all(afi, data).is_err()),
        }
    }
});
