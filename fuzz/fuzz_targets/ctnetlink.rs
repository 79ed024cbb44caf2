//! Fuzzes the ctnetlink parser (src/observe/ctnetlink.rs): any bytes a netlink socket could
//! hand us must give flows or counted errors, never a panic, and never read out of bounds.

#![no_main]

use egressguard::messages::Time;
use egressguard::observe::CustomerFilter;
use egressguard::observe::ctnetlink::{messages, parse, parse_buffer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Everything a customer: every tuple is parsed to the end.
    let all = CustomerFilter::new(["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
    // The test networks: the early-exit path of the filter.
    let some = CustomerFilter::new([
        "203.0.113.0/24".parse().unwrap(),
        "2001:db8:c::/64".parse().unwrap(),
    ]);
    let mut n = 0u64;
    let c = parse_buffer(data, Time(1), &all, |_| n += 1, |_, _| {});
    assert_eq!(c.kept, n);
    let _ = parse_buffer(data, Time(1), &some, |_| {}, |_, _| {});
    for m in messages(data).flatten() {
        if let Ok(egressguard::observe::ctnetlink::Parsed::Flow(e)) = parse(&m, Time(1), &all) {
            assert_eq!(e.src.is_ipv4(), e.dst.is_ipv4());
        }
    }
});
