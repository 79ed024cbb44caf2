//! Blackhole routes over rtnetlink: one `blackhole` route per blocked target, in the
//! policy's table, tagged with the policy's route protocol number so the agent lists and
//! removes only its own.
//!
//! Routes drop traffic *to* a blocked address at the routing layer, also for packets that
//! never reach the agent's nft chains (e.g. fast-pathed ones); the nft table stays the primary
//! enforcement. Quarantined addresses get no route: it would break the walled garden's
//! replies. Deleting a route that is already gone is success.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::{StreamExt, TryStreamExt, stream};
use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType, RouteVia,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::EnforceError;

/// How many route requests are in flight at once.
const CONCURRENCY: usize = 64;

/// Where the agent's blackhole routes live and how they are tagged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteTag {
    /// Routing table id.
    pub table: u32,
    /// Route protocol number.
    pub protocol: u8,
}

/// A route netlink connection for the agent's blackhole routes.
#[derive(Clone, Debug)]
pub struct RouteWriter {
    handle: Handle,
}

const ESRCH: i32 = 3;
const ENOENT: i32 = 2;
const EPERM: i32 = 1;
const EEXIST: i32 = 17;

fn message(net: IpNet, tag: RouteTag) -> RouteMessage {
    let proto = RouteProtocol::from(tag.protocol);
    match net {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .table_id(tag.table)
            .protocol(proto)
            .kind(RouteType::BlackHole)
            .build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .table_id(tag.table)
            .protocol(proto)
            .kind(RouteType::BlackHole)
            .build(),
    }
}

/// `m` with `RTA_EXPIRES` of `left` seconds when it is an IPv6 route (the kernel takes the
/// attribute for IPv6 only).
fn with_expiry(mut m: RouteMessage, left: Option<u32>) -> RouteMessage {
    if let Some(secs) = left
        && m.header.address_family == netlink_packet_route::AddressFamily::Inet6
    {
        m.attributes.push(RouteAttribute::Expires(secs.max(1)));
    }
    m
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

fn route_error(
    action: &'static str,
    target: IpNet,
    tag: RouteTag,
    e: rtnetlink::Error,
) -> EnforceError {
    if errno(&e) == Some(EPERM) {
        return EnforceError::PermissionDenied {
            detail: format!("{action} blackhole route {target} refused by the kernel"),
        };
    }
    EnforceError::Route {
        action,
        target,
        table: tag.table,
        source: e,
    }
}

/// The table a listed route is in (`RTA_TABLE` when present, else the header's).
fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// The destination of a listed route, when it is one of ours.
fn own_destination(m: &RouteMessage, tag: RouteTag) -> Option<IpNet> {
    if u8::from(m.header.protocol) != tag.protocol
        || m.header.kind != RouteType::BlackHole
        || table_of(m) != tag.table
    {
        return None;
    }
    destination(m)
}

/// The destination prefix of a listed route.
fn destination(m: &RouteMessage) -> Option<IpNet> {
    let addr: IpAddr = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
            _ => None,
        })
        .unwrap_or(match m.header.address_family {
            netlink_packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        });
    IpNet::new(addr, m.header.destination_prefix_length).ok()
}

/// The gateways a route's attributes name: `RTA_GATEWAY`, `RTA_VIA` and those of each
/// multipath next hop.
fn gateways(attrs: &[RouteAttribute]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for a in attrs {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => out.push(IpAddr::V4(*g)),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => out.push(IpAddr::V6(*g)),
            RouteAttribute::Via(RouteVia::Inet(g)) => out.push(IpAddr::V4(*g)),
            RouteAttribute::Via(RouteVia::Inet6(g)) => out.push(IpAddr::V6(*g)),
            RouteAttribute::MultiPath(hops) => {
                for h in hops {
                    out.extend(gateways(&h.attributes));
                }
            }
            _ => {}
        }
    }
    out
}

impl RouteWriter {
    /// Opens a route netlink socket (in the calling thread's network namespace) and drives it
    /// on the current tokio runtime.
    pub fn connect() -> Result<RouteWriter, EnforceError> {
        let (conn, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(EnforceError::Netlink)?;
        tokio::spawn(conn);
        Ok(RouteWriter { handle })
    }

    /// The agent's routes: blackhole routes in `tag.table` with protocol `tag.protocol`.
    pub async fn list(&self, tag: RouteTag) -> Result<BTreeSet<IpNet>, EnforceError> {
        let mut out = BTreeSet::new();
        let filters = [
            RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(tag.table)
                .protocol(RouteProtocol::from(tag.protocol))
                .kind(RouteType::BlackHole)
                .build(),
            RouteMessageBuilder::<Ipv6Addr>::new()
                .table_id(tag.table)
                .protocol(RouteProtocol::from(tag.protocol))
                .kind(RouteType::BlackHole)
                .build(),
        ];
        for f in filters {
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(f)
                .execute()
                .try_collect()
                .await
                .map_err(|source| EnforceError::RouteList {
                    table: tag.table,
                    source,
                })?;
            out.extend(routes.iter().filter_map(|m| own_destination(m, tag)));
        }
        Ok(out)
    }

    /// Every gateway of the router's routes, all tables and both families, with the route's
    /// destination (one pair per gateway of a multipath route): the router's next hops.
    pub async fn next_hops(&self) -> Result<Vec<(IpNet, IpAddr)>, EnforceError> {
        let mut out = Vec::new();
        for family in [
            netlink_packet_route::AddressFamily::Inet,
            netlink_packet_route::AddressFamily::Inet6,
        ] {
            // No table, protocol or type in the request: a strict-checking kernel then dumps
            // every route of every table.
            let mut req = RouteMessage::default();
            req.header.address_family = family;
            let mut routes = self.handle.route().get(req).execute();
            while let Some(m) = routes.try_next().await.map_err(EnforceError::NextHops)? {
                let Some(dest) = destination(&m) else {
                    continue;
                };
                for gw in gateways(&m.attributes) {
                    out.push((dest, gw));
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Adds (or replaces) blackhole routes for `targets`, each with the seconds its hold has
    /// left (`None`: until lifted). IPv6 routes carry that as the kernel's route expiry
    /// (`RTA_EXPIRES`), so they go by themselves while the agent is down where the kernel
    /// honours it; IPv4 has no route expiry (the agent removes those at start).
    pub async fn add(
        &self,
        targets: &[(IpNet, Option<u32>)],
        tag: RouteTag,
    ) -> Result<(), EnforceError> {
        let results: Vec<Result<(), EnforceError>> = stream::iter(targets.iter().copied())
            .map(|(t, left)| {
                let h = self.handle.clone();
                async move {
                    match h
                        .route()
                        .add(with_expiry(message(t, tag), left))
                        .replace()
                        .execute()
                        .await
                    {
                        Ok(()) => Ok(()),
                        Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
                        Err(e) => Err(route_error("add", t, tag, e)),
                    }
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Deletes the agent's blackhole routes for `targets`; one already gone is success.
    pub async fn delete(&self, targets: &[IpNet], tag: RouteTag) -> Result<(), EnforceError> {
        let results: Vec<Result<(), EnforceError>> = stream::iter(targets.iter().copied())
            .map(|t| {
                let h = self.handle.clone();
                async move {
                    match h.route().del(message(t, tag)).execute().await {
                        Ok(()) => Ok(()),
                        Err(e) if matches!(errno(&e), Some(ESRCH | ENOENT)) => Ok(()),
                        Err(e) => Err(route_error("delete", t, tag, e)),
                    }
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_own_blackhole_routes_are_listed() {
        let tag = RouteTag {
            table: 1000,
            protocol: 201,
        };
        let mine = message("203.0.113.5/32".parse().unwrap(), tag);
        assert_eq!(
            own_destination(&mine, tag),
            Some("203.0.113.5/32".parse().unwrap())
        );
        let other_proto = message(
            "203.0.113.5/32".parse().unwrap(),
            RouteTag {
                table: 1000,
                protocol: 4,
            },
        );
        assert_eq!(own_destination(&other_proto, tag), None);
        let other_table = message(
            "2001:db8:c::/64".parse().unwrap(),
            RouteTag {
                table: 254,
                protocol: 201,
            },
        );
        assert_eq!(own_destination(&other_table, tag), None);
        let v6 = message("2001:db8:c::/64".parse().unwrap(), tag);
        let timed = with_expiry(v6.clone(), Some(90));
        assert!(timed.attributes.contains(&RouteAttribute::Expires(90)));
        let v4 = with_expiry(mine.clone(), Some(90));
        assert!(
            !v4.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Expires(_)))
        );
        assert_eq!(
            own_destination(&v6, tag),
            Some("2001:db8:c::/64".parse().unwrap())
        );
    }
}
