//! Addresses that are never held, whatever the policy, the allowlist or an operator's flags
//! say: loopback, link-local, multicast, unspecified and limited broadcast, and any prefix
//! that contains one of them (`0.0.0.0/0`, `128.0.0.0/1`, `::/0`, ...). Holding one would cut
//! the router off from itself (loopback: the control socket, BIRD, the resolver) or its
//! neighbours (link-local: IPv6 neighbour discovery, next hops; multicast: OSPF, VRRP, mDNS).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::Protection;

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> IpNet {
    IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), len)
}

const fn v6(first: u16, last: u16, len: u8) -> IpNet {
    IpNet::new_assert(
        IpAddr::V6(Ipv6Addr::new(first, 0, 0, 0, 0, 0, 0, last)),
        len,
    )
}

/// The special ranges, in the order a refusal names them.
pub(super) const RANGES: [(IpNet, Protection); 9] = [
    (v4(127, 0, 0, 0, 8), Protection::Loopback),
    (v6(0, 1, 128), Protection::Loopback),
    // RFC 1122 3.2.1.3: "this host on this network"; 0.0.0.0 is the unspecified address.
    (v4(0, 0, 0, 0, 8), Protection::Unspecified),
    (v6(0, 0, 128), Protection::Unspecified),
    (v4(169, 254, 0, 0, 16), Protection::LinkLocal),
    (v6(0xfe80, 0, 10), Protection::LinkLocal),
    (v4(224, 0, 0, 0, 4), Protection::Multicast),
    (v6(0xff00, 0, 8), Protection::Multicast),
    (v4(255, 255, 255, 255, 32), Protection::Broadcast),
];

/// The special range `target` lies in or contains, first in [`RANGES`] order.
pub(super) fn special(target: &IpNet) -> Option<(IpNet, Protection)> {
    RANGES
        .iter()
        .find(|(r, _)| r.contains(target) || target.contains(r))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse::<IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .unwrap()
    }

    #[test]
    fn every_special_kind_is_recognised_and_prefixes_containing_one_too() {
        for (t, want) in [
            ("::1", Protection::Loopback),
            ("127.0.0.2", Protection::Loopback),
            ("fe80::1", Protection::LinkLocal),
            ("fe80::/64", Protection::LinkLocal),
            ("169.254.10.1", Protection::LinkLocal),
            ("224.0.0.5", Protection::Multicast),
            ("ff02::1", Protection::Multicast),
            ("0.0.0.0", Protection::Unspecified),
            ("::", Protection::Unspecified),
            ("255.255.255.255", Protection::Broadcast),
            // Prefixes that contain one: the first range in order is named.
            ("0.0.0.0/0", Protection::Loopback),
            ("0.0.0.0/1", Protection::Loopback),
            ("128.0.0.0/1", Protection::LinkLocal),
            ("240.0.0.0/4", Protection::Broadcast),
            ("::/0", Protection::Loopback),
            ("::/64", Protection::Loopback),
            ("8000::/1", Protection::LinkLocal),
        ] {
            assert_eq!(special(&net(t)).map(|s| s.1), Some(want), "{t}");
        }
    }

    #[test]
    fn ordinary_addresses_are_not_special() {
        for t in [
            "8.8.8.8",
            "203.0.113.7",
            "203.0.113.0/24",
            "1.0.0.0/8",
            "2001:db8:c::/64",
            "2001:db8::/32",
            "255.255.255.254",
            "fec0::1",
        ] {
            assert_eq!(special(&net(t)), None, "{t}");
        }
    }
}
