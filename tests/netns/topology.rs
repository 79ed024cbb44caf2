//! The topology builder itself: customers reach the internet through the router, v4 and v6,
//! and nothing is left behind.

use egressguard::netns::{Topology, sh};

use crate::common::require_root;

#[test]
fn customers_reach_the_internet_through_the_router_and_cleanup_is_complete() {
    if !require_root("customers_reach_the_internet_through_the_router_and_cleanup_is_complete") {
        return;
    }
    let names;
    {
        let mut topo = Topology::new().expect("build topology");
        topo.add_customer(10).expect("customer");
        topo.add_internet_host(20).expect("internet host");
        let cust = &topo.customers[0];
        for dst in [topo.internet[0].v4, topo.internet[0].v6] {
            let d = dst.to_string();
            assert!(
                cust.ns.succeeds(&["ping", "-c", "1", "-W", "2", &d]),
                "customer cannot reach {d} through the router"
            );
        }
        names = [
            topo.router.name().to_owned(),
            cust.ns.name().to_owned(),
            topo.internet[0].ns.name().to_owned(),
        ];
    }
    let left = sh(&["ip", "netns", "list"]).unwrap();
    for n in names {
        assert!(!left.contains(&n), "namespace {n} left behind:\n{left}");
    }
}
