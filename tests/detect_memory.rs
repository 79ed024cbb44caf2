//! Bounded memory under a spoofed or very wide source: 5 million distinct sources pushed
//! through the engine; the tracked count stays at the cap and the bytes actually allocated
//! (counted by a global allocator) stay within the per-source budget.
//!
//! Alone in its test binary: the counting allocator sees every allocation of the process.

// The one exception to `unsafe_code = "deny"` in this crate's tests: a `GlobalAlloc` is an
// unsafe trait. It only forwards to `System` and counts; nothing else here is unsafe.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use egressguard::detect::Engine;
use egressguard::messages::{FlowEvent, FlowEventKind, Observation, TcpState, Time, proto};
use egressguard::policy::Policy;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; the counter is only arithmetic on the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Budget per tracked source, everything included (slab, index, touch list, sample ring).
const PER_SOURCE: usize = 512;

#[test]
fn five_million_sources_stay_within_the_cap() {
    let cap: usize = 65_536;
    let text = format!(
        "version: 1\nnetworks:\n  - prefix: 10.0.0.0/8\ndetection:\n  max_sources: {cap}\n"
    );
    let policy = Arc::new(Policy::from_text(&text, Path::new("<memory>")).unwrap());
    let mut out = Vec::with_capacity(1024);
    let base = LIVE.load(Ordering::Relaxed);
    let mut engine = Engine::new(policy);
    let t0 = 1_800_000_000u64 * 1_000_000_000;
    let n: u32 = 5_000_000;
    let mut after_fill = 0;
    for i in 0..n {
        // Spoofed sources across 10.0.0.0/8: every event a new address.
        let src = Ipv4Addr::from(0x0a00_0000 | (i.wrapping_mul(2_654_435_761) & 0x00ff_ffff));
        let time = Time(t0 + u64::from(i) * 1_000);
        engine.observe(&Observation::Flow(FlowEvent {
            time,
            kind: FlowEventKind::New,
            src: IpAddr::V4(src),
            dst: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
            proto: proto::TCP,
            sport: 1024,
            dport: 80,
            icmp: None,
            status: 0,
            tcp_state: Some(TcpState::SynSent),
            orig_packets: None,
            orig_bytes: None,
            reply_packets: None,
            reply_bytes: None,
            start: None,
            stop: None,
            labels: 0,
        }));
        if i % 250_000 == 249_999 {
            engine.evaluate(time, &mut out);
            out.clear();
        }
        if i == 2 * cap as u32 {
            after_fill = LIVE.load(Ordering::Relaxed) - base;
        }
    }
    let live = LIVE.load(Ordering::Relaxed) - base;
    let stats = engine.stats();
    eprintln!(
        "tracked {} evictions {} accounted {} B allocated {} B ({:.1} B/source), after fill {} B",
        stats.tracked_sources,
        stats.evictions,
        stats.memory_bytes,
        live,
        live as f64 / cap as f64,
        after_fill,
    );
    assert_eq!(stats.tracked_sources, cap as u64);
    // The multiplier is odd, so the 5M addresses are distinct: every one past the cap evicts.
    assert_eq!(stats.evictions, u64::from(n) - cap as u64);
    assert!(
        stats.memory_bytes as usize <= cap * PER_SOURCE,
        "accounting over budget"
    );
    assert!(
        live <= cap * PER_SOURCE,
        "allocated {live} B for {cap} sources"
    );
    // Steady state: nothing grows once the table is full.
    assert!(
        live <= after_fill + 4096,
        "grew from {after_fill} to {live}"
    );
    // The accounting agrees with the allocator (it leaves out small bookkeeping only).
    assert!(
        live - stats.memory_bytes as usize <= 64 * 1024,
        "{live} vs {}",
        stats.memory_bytes
    );
}
