//! The customer filter: which original source addresses the observers keep.
//!
//! Built once from the policy's customer networks (and rebuilt on reload): overlapping and
//! adjacent prefixes are merged into sorted, disjoint address ranges, one list per family, so
//! a lookup is a binary search over integers with no allocation, no lock and no hashing.
//! [`FilterHandle`] lets the daemon swap in a new filter while a listener thread runs: the
//! thread checks an atomic generation once per batch and only then takes the lock.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

use crate::policy::Policy;

/// The set of customer addresses, as disjoint sorted ranges per family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CustomerFilter {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl CustomerFilter {
    /// A filter holding exactly the addresses of `nets`.
    pub fn new<I: IntoIterator<Item = IpNet>>(nets: I) -> CustomerFilter {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match net.trunc() {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        CustomerFilter {
            v4: merge(v4),
            v6: merge(v6),
        }
    }

    /// The filter for the policy's customer networks.
    pub fn from_policy(policy: &Policy) -> CustomerFilter {
        CustomerFilter::new(policy.networks.iter().map(|n| n.prefix))
    }

    /// Whether the filter holds no address at all.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Whether an IPv4 address (as a host-order integer) is a customer address.
    #[inline]
    pub fn contains_v4(&self, a: u32) -> bool {
        lookup(&self.v4, a)
    }

    /// Whether an IPv6 address (as a host-order integer) is a customer address.
    #[inline]
    pub fn contains_v6(&self, a: u128) -> bool {
        lookup(&self.v6, a)
    }

    /// Whether `addr` is a customer address.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.contains_v4(u32::from(a)),
            IpAddr::V6(a) => self.contains_v6(u128::from(a)),
        }
    }

    /// The merged ranges, for logs: (first, last) per range.
    pub fn ranges(&self) -> impl Iterator<Item = (IpAddr, IpAddr)> + '_ {
        let v4 = self
            .v4
            .iter()
            .map(|&(a, b)| (IpAddr::V4(Ipv4Addr::from(a)), IpAddr::V4(Ipv4Addr::from(b))));
        let v6 = self
            .v6
            .iter()
            .map(|&(a, b)| (IpAddr::V6(Ipv6Addr::from(a)), IpAddr::V6(Ipv6Addr::from(b))));
        v4.chain(v6)
    }
}

/// Sorts and merges overlapping or adjacent inclusive ranges.
fn merge<T: Copy + Ord + num_like::One>(mut r: Vec<(T, T)>) -> Vec<(T, T)> {
    r.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(r.len());
    for (a, b) in r {
        if let Some(last) = out.last_mut()
            && (a <= last.1 || last.1.checked_inc() == Some(a))
        {
            if b > last.1 {
                last.1 = b;
            }
            continue;
        }
        out.push((a, b));
    }
    out
}

#[inline]
fn lookup<T: Copy + Ord>(ranges: &[(T, T)], a: T) -> bool {
    // Index of the first range starting after `a`; the one before it is the only candidate.
    let i = ranges.partition_point(|&(start, _)| start <= a);
    i > 0 && a <= ranges[i - 1].1
}

mod num_like {
    /// Checked increment, for merging adjacent ranges.
    pub trait One: Sized {
        fn checked_inc(self) -> Option<Self>;
    }
    impl One for u32 {
        fn checked_inc(self) -> Option<u32> {
            self.checked_add(1)
        }
    }
    impl One for u128 {
        fn checked_inc(self) -> Option<u128> {
            self.checked_add(1)
        }
    }
}

/// A shared, replaceable [`CustomerFilter`]: the daemon calls [`FilterHandle::replace`] on
/// policy reload; observers call [`FilterHandle::refresh`] once per batch.
#[derive(Debug)]
pub struct FilterHandle {
    generation: AtomicU64,
    current: Mutex<Arc<CustomerFilter>>,
}

impl FilterHandle {
    /// A handle holding `filter`.
    pub fn new(filter: CustomerFilter) -> Arc<FilterHandle> {
        Arc::new(FilterHandle {
            generation: AtomicU64::new(0),
            current: Mutex::new(Arc::new(filter)),
        })
    }

    /// Installs a new filter; observers pick it up at their next batch.
    pub fn replace(&self, filter: CustomerFilter) {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *cur = Arc::new(filter);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The current filter.
    pub fn get(&self) -> Arc<CustomerFilter> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces `cached` (seen at generation `*seen`) when a newer filter was installed.
    /// Costs one atomic load when nothing changed.
    pub fn refresh(&self, seen: &mut u64, cached: &mut Arc<CustomerFilter>) -> bool {
        let g = self.generation.load(Ordering::Acquire);
        if g == *seen {
            return false;
        }
        *cached = self.get();
        *seen = g;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(nets: &[&str]) -> CustomerFilter {
        CustomerFilter::new(nets.iter().map(|n| n.parse::<IpNet>().unwrap()))
    }

    #[test]
    fn contains_exactly_the_prefixes() {
        let flt = f(&["203.0.113.0/24", "2001:db8:c::/64", "10.0.0.0/8"]);
        for yes in [
            "203.0.113.0",
            "203.0.113.255",
            "10.255.255.255",
            "2001:db8:c::1",
            "2001:db8:c:0:ffff:ffff:ffff:ffff",
        ] {
            assert!(flt.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in [
            "203.0.112.255",
            "203.0.114.0",
            "11.0.0.0",
            "9.255.255.255",
            "198.51.100.1",
            "2001:db8:c:1::",
            "2001:db8:b:ffff:ffff:ffff:ffff:ffff",
            "::ffff:203.0.113.1",
        ] {
            assert!(!flt.contains(no.parse().unwrap()), "{no}");
        }
    }

    #[test]
    fn nested_overlapping_and_adjacent_prefixes_merge() {
        let flt = f(&[
            "203.0.113.128/25",
            "203.0.113.0/24",
            "198.51.100.0/25",
            "198.51.100.128/25",
            "0.0.0.0/0",
        ]);
        assert_eq!(flt.v4, vec![(0, u32::MAX)]);
        let flt = f(&["203.0.113.0/25", "203.0.113.128/25", "203.0.113.64/26"]);
        assert_eq!(flt.v4.len(), 1);
        assert!(flt.contains("203.0.113.200".parse().unwrap()));
        let flt = f(&["::/0", "2001:db8::/32"]);
        assert_eq!(flt.v6, vec![(0, u128::MAX)]);
    }

    #[test]
    fn host_bits_in_a_prefix_are_ignored() {
        let flt = f(&["203.0.113.77/24"]);
        assert!(flt.contains("203.0.113.1".parse().unwrap()));
    }

    #[test]
    fn empty_filter_holds_nothing() {
        let flt = f(&[]);
        assert!(flt.is_empty());
        assert!(!flt.contains("203.0.113.1".parse().unwrap()));
    }

    #[test]
    fn handle_refresh_sees_a_replacement_once() {
        let h = FilterHandle::new(f(&["203.0.113.0/24"]));
        let mut seen = 0;
        let mut cached = h.get();
        assert!(!h.refresh(&mut seen, &mut cached));
        h.replace(f(&["198.51.100.0/24"]));
        assert!(h.refresh(&mut seen, &mut cached));
        assert!(cached.contains("198.51.100.9".parse().unwrap()));
        assert!(!h.refresh(&mut seen, &mut cached));
    }
}
