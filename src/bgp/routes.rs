//! The routes one peer should hold for a set of desired blocks (flowspec and RTBH), and the
//! difference between two such sets: the speaker's declarative Adj-RIB-Out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::flowspec::{Afi, FlowspecError, block_nlri};
use crate::messages::{Announce, DesiredBlocks};
use crate::policy::{Family, Peer};

/// What identifies one announced route.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKey {
    /// A flowspec route: its family and encoded NLRI (length prefix included).
    Flow(Afi, Vec<u8>),
    /// An RTBH unicast route.
    Rtbh(IpNet),
}

impl RouteKey {
    /// The route's family.
    pub fn family(&self) -> Family {
        match self {
            RouteKey::Flow(Afi::Ipv4, _) => Family::Ipv4Flowspec,
            RouteKey::Flow(Afi::Ipv6, _) => Family::Ipv6Flowspec,
            RouteKey::Rtbh(IpNet::V4(_)) => Family::Ipv4Unicast,
            RouteKey::Rtbh(IpNet::V6(_)) => Family::Ipv6Unicast,
        }
    }
}

/// The part of a route that can change while its key stays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteVal {
    /// Flowspec traffic-rate in bytes per second; 0 discards.
    Flow {
        /// Bytes per second.
        rate: u32,
    },
    /// RTBH route with the given next hop (communities come from the peer's policy).
    Rtbh {
        /// Next hop from the policy.
        next_hop: IpAddr,
    },
}

/// A peer's Adj-RIB-Out.
pub type RouteSet = BTreeMap<RouteKey, RouteVal>;

/// The routes `peer` should hold for `blocks`, restricted to the `families` negotiated on
/// the session. A block whose flowspec rule cannot be encoded is skipped and reported.
pub fn desired_routes(
    peer: &Peer,
    families: &BTreeSet<Family>,
    blocks: &DesiredBlocks,
) -> (RouteSet, Vec<(IpNet, FlowspecError)>) {
    let mut out = RouteSet::new();
    let mut errors = Vec::new();
    let flow = peer.announce.contains(&Announce::Flowspec);
    let rtbh = peer.announce.contains(&Announce::Rtbh);
    for (target, b) in &blocks.blocks {
        let v6 = matches!(target, IpNet::V6(_));
        if flow && b.announce.contains(&Announce::Flowspec) {
            let fam = if v6 {
                Family::Ipv6Flowspec
            } else {
                Family::Ipv4Flowspec
            };
            if families.contains(&fam) {
                let (proto, dports, rate) = match &b.flowspec {
                    Some(s) => (s.proto, s.dports.as_slice(), s.rate_bytes_per_sec),
                    None => (None, &[][..], 0),
                };
                let nlri = block_nlri(target, proto, dports);
                match nlri.encode() {
                    Ok(bytes) => {
                        out.insert(RouteKey::Flow(nlri.afi, bytes), RouteVal::Flow { rate });
                    }
                    Err(e) => errors.push((*target, e)),
                }
            }
        }
        if rtbh && b.announce.contains(&Announce::Rtbh) {
            let (fam, nh) = if v6 {
                (Family::Ipv6Unicast, peer.rtbh_next_hop_v6.map(IpAddr::V6))
            } else {
                (Family::Ipv4Unicast, peer.rtbh_next_hop_v4.map(IpAddr::V4))
            };
            if let Some(next_hop) = nh
                && families.contains(&fam)
            {
                out.insert(RouteKey::Rtbh(target.trunc()), RouteVal::Rtbh { next_hop });
            }
        }
    }
    (out, errors)
}

/// What to send to go from `sent` to `want`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Routes to withdraw.
    pub withdraw: Vec<RouteKey>,
    /// Routes to announce (new, or with a changed value).
    pub announce: Vec<(RouteKey, RouteVal)>,
}

/// The difference between what was sent and what is wanted.
pub fn diff(sent: &RouteSet, want: &RouteSet) -> Diff {
    let mut d = Diff::default();
    for k in sent.keys() {
        if !want.contains_key(k) {
            d.withdraw.push(k.clone());
        }
    }
    for (k, v) in want {
        if sent.get(k) != Some(v) {
            d.announce.push((k.clone(), *v));
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{BlockKind, DesiredBlock, FlowspecScope};
    use std::path::Path;

    fn peer(announce: &str, families: &str) -> Peer {
        let text = format!(
            "version: 1\nnetworks:\n  - prefix: 203.0.113.0/24\nbgp:\n  local_as: 65001\n  router_id: 192.0.2.1\n  peers:\n    - address: 192.0.2.2\n      remote_as: 65002\n      announce: [{announce}]\n      families: [{families}]\n      rtbh_next_hop_v4: 192.0.2.66\n      rtbh_next_hop_v6: 100::1\n"
        );
        let p = crate::policy::Policy::from_text(&text, Path::new("<t>")).expect("policy");
        p.bgp.expect("bgp").peers.remove(0)
    }

    fn blocks(list: &[(&str, &[Announce], Option<FlowspecScope>)]) -> DesiredBlocks {
        let mut b = DesiredBlocks::default();
        for (t, a, f) in list {
            let target: IpNet = t.parse().unwrap();
            b.blocks.insert(
                target,
                DesiredBlock {
                    target,
                    kind: BlockKind::Block,
                    expires: None,
                    announce: a.to_vec(),
                    flowspec: f.clone(),
                    except: vec![],
                },
            );
        }
        b
    }

    #[test]
    fn routes_follow_peer_block_and_family() {
        let p = peer(
            "flowspec, rtbh",
            "ipv4-flowspec, ipv4-unicast, ipv6-unicast",
        );
        let fams: BTreeSet<Family> = p.families.iter().copied().collect();
        let b = blocks(&[
            (
                "203.0.113.7/32",
                &[Announce::Flowspec, Announce::Rtbh],
                None,
            ),
            (
                "2001:db8:c::/64",
                &[Announce::Flowspec, Announce::Rtbh],
                None,
            ),
            (
                "203.0.113.8/32",
                &[Announce::Flowspec],
                Some(FlowspecScope {
                    proto: Some(6),
                    dports: vec![25],
                    rate_bytes_per_sec: 1000,
                }),
            ),
        ]);
        let (r, errs) = desired_routes(&p, &fams, &b);
        assert!(errs.is_empty());
        // v4 flow x2, v4 rtbh, v6 rtbh; no v6 flowspec (family not configured).
        assert_eq!(r.len(), 4);
        assert!(r.values().any(|v| *v == RouteVal::Flow { rate: 1000 }));
        assert_eq!(
            r.get(&RouteKey::Rtbh("2001:db8:c::/64".parse().unwrap())),
            Some(&RouteVal::Rtbh {
                next_hop: "100::1".parse().unwrap()
            })
        );
        // Negotiated without IPv4 unicast: no v4 RTBH.
        let fams2: BTreeSet<Family> = [Family::Ipv4Flowspec].into();
        assert_eq!(desired_routes(&p, &fams2, &b).0.len(), 2);
        // A flowspec-only peer announces no RTBH.
        let p2 = peer("flowspec", "ipv4-flowspec, ipv4-unicast");
        assert!(
            desired_routes(&p2, &fams, &b)
                .0
                .keys()
                .all(|k| matches!(k, RouteKey::Flow(..)))
        );
    }

    #[test]
    fn diff_withdraws_and_announces_changes() {
        let k1 = RouteKey::Rtbh("192.0.2.1/32".parse().unwrap());
        let k2 = RouteKey::Flow(Afi::Ipv4, vec![1, 2]);
        let k3 = RouteKey::Flow(Afi::Ipv4, vec![3]);
        let sent: RouteSet = [
            (k1.clone(), RouteVal::Flow { rate: 0 }),
            (k2.clone(), RouteVal::Flow { rate: 0 }),
        ]
        .into();
        let want: RouteSet = [
            (k2.clone(), RouteVal::Flow { rate: 5 }),
            (k3.clone(), RouteVal::Flow { rate: 0 }),
        ]
        .into();
        let d = diff(&sent, &want);
        assert_eq!(d.withdraw, vec![k1]);
        assert_eq!(
            d.announce,
            vec![
                (k2, RouteVal::Flow { rate: 5 }),
                (k3, RouteVal::Flow { rate: 0 })
            ]
        );
        assert_eq!(diff(&want, &want), Diff::default());
    }
}
