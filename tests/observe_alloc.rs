//! The conntrack hot path allocates nothing: parse + filter of every captured message, many
//! times over, under a global allocator that counts allocations.
//!
//! This file is the crate's one `unsafe` island outside dependencies: a `GlobalAlloc` impl
//! must be `unsafe impl`. It only forwards to the system allocator and counts calls, and it
//! lives in this test binary alone.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use egressguard::messages::Time;
use egressguard::observe::CustomerFilter;
use egressguard::observe::ctnetlink::parse_buffer;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call unchanged to `System`, which upholds the GlobalAlloc contract.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same layout the caller gave us.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn parse_and_filter_allocate_nothing() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ctnetlink");
    let bufs: Vec<Vec<u8>> = [
        "tcp4", "tcp6", "udp4", "udp6", "icmp4", "icmp6", "inbound4", "inbound6", "dump",
    ]
    .iter()
    .map(|n| std::fs::read(format!("{dir}/{n}.bin")).expect("fixture"))
    .collect();
    let filter = CustomerFilter::new([
        "203.0.113.0/24".parse().unwrap(),
        "2001:db8:c::/64".parse().unwrap(),
    ]);
    // The counter works: a heap allocation shows up.
    let probe = ALLOCS.load(Ordering::Relaxed);
    std::hint::black_box(vec![0u8; 64]);
    assert!(
        ALLOCS.load(Ordering::Relaxed) > probe,
        "the counting allocator counts"
    );

    let mut kept = 0u64;
    let mut foreign = 0u64;
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..1000 {
        for b in &bufs {
            let c = parse_buffer(
                b,
                Time(1),
                &filter,
                |e| {
                    std::hint::black_box(e);
                },
                |_, _| {},
            );
            kept += c.kept;
            foreign += c.foreign;
        }
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert_eq!(allocs, 0, "allocations on the hot path");
    assert!(kept > 0 && foreign > 0, "{kept} kept, {foreign} foreign");
}
