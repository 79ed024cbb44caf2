//! Per-protocol packet rates for `flood.udp_pps` and `flood.icmp_pps`: UDP packets of flows
//! never answered, and echo requests, from the agent's nft class counters
//! ([`crate::messages::CounterSample::udp_packets`], `echo_packets`).
//!
//! Almost no source sends either fast, so the rates are not kept in every source's state
//! (which has no room: `source::SourceState` is at the per-source budget). A source gets one
//! of at most [`TRACKERS`] trackers when one of its samples comes to a quarter of a
//! threshold ([`ATTACH_SHARE`]) — or, for an IPv6 aggregate whose addresses each send their
//! own sample, when it sends any — and its samples from then on are charged to it, in the
//! flood window's two epochs like the source's own counters. A source whose rate over the
//! window crosses a threshold had samples far above a quarter of it, so it has a tracker by
//! then. When every tracker is taken, a newcomer takes the one with the lowest rate, and
//! only when its own sample is faster: the fastest senders, the floods among them, keep
//! theirs (at most [`TAKEN_PER_READ`] are taken in one read of the counters, each costing a
//! pass over the trackers; a flood that found none takes one at a later read). The memory is fixed (at most [`TRACKERS`] × 64 bytes plus the index), whatever the
//! number of sources; the trackers carry the source's key, so a slot reused by another source
//! never inherits a rate.

use std::collections::HashMap;

use super::sketch::{TwoEpochs, sliding};
use super::source::SrcKey;

/// Trackers at most.
pub const TRACKERS: usize = 1024;

/// The share of a threshold one sample must reach for its source to get a tracker.
pub const ATTACH_SHARE: f64 = 0.25;

/// Counts of one epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RateCounts {
    /// UDP packets of unanswered flows.
    pub udp: u32,
    /// Echo requests.
    pub echo: u32,
    /// Milliseconds covered by the samples.
    pub ms: u32,
}

/// One source's rates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tracker {
    /// The source.
    pub key: SrcKey,
    /// Its slot in the engine's table.
    pub slot: u32,
    /// The flood window's epochs.
    pub counts: TwoEpochs<RateCounts>,
    /// Time of the last sample charged: the samples of one read of the counters (one per
    /// address of an IPv6 aggregate) share it and cover its interval once.
    pub last: u64,
}

/// Rates per second in the window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RateView {
    /// UDP packets of unanswered flows per second.
    pub udp_pps: f64,
    /// Echo requests per second.
    pub echo_pps: f64,
    /// Seconds the rates cover (of the window; since the tracker attached).
    pub secs: f64,
}

impl Tracker {
    fn view(&self, t: u64, len: u64) -> RateView {
        let (c, p, pw) = self.counts.view(t, len);
        let ms = sliding(u64::from(c.ms), u64::from(p.ms), pw);
        if ms <= 0.0 {
            return RateView::default();
        }
        let rate = |a: u32, b: u32| sliding(u64::from(a), u64::from(b), pw) * 1000.0 / ms;
        RateView {
            udp_pps: rate(c.udp, p.udp),
            echo_pps: rate(c.echo, p.echo),
            secs: ms / 1000.0,
        }
    }
}

/// The trackers of the engine.
#[derive(Debug, Default)]
pub struct Pool {
    trackers: Vec<Tracker>,
    /// Slot → index in `trackers`.
    index: HashMap<u32, u16>,
    /// Samples that found every tracker taken by a faster source.
    pub refused: u64,
    /// The slowest tracker as of one read of the counters: (sample time, index, rate),
    /// found by one pass over the trackers, not one per sample of the read.
    slowest: Option<(u64, usize, f64)>,
    /// Trackers taken from slower sources in one read: (its sample time, how many).
    taken: (u64, u32),
}

/// Trackers taken from slower sources in one read of the counters at most: each costs a
/// pass over the trackers, so a read of 65,536 samples costs at most this many passes.
pub const TAKEN_PER_READ: u32 = 16;

/// One counter sample's share for the pool.
#[derive(Clone, Copy, Debug)]
pub struct Charge {
    /// Sample time (ns).
    pub t: u64,
    /// UDP packets of unanswered flows.
    pub udp: u64,
    /// Echo requests.
    pub echo: u64,
    /// Length of the sample's interval (ns).
    pub interval_ns: u64,
    /// The sample is fast enough for a tracker (see [`ATTACH_SHARE`]).
    pub attach: bool,
}

impl Pool {
    /// Bytes held.
    pub fn memory_bytes(&self) -> usize {
        self.trackers.capacity() * std::mem::size_of::<Tracker>()
            + self.index.capacity() * (std::mem::size_of::<(u32, u16)>() + 1)
    }

    fn find(&self, slot: u32, key: &SrcKey) -> Option<usize> {
        let &i = self.index.get(&slot)?;
        let i = usize::from(i);
        (self.trackers.get(i)?.key == *key).then_some(i)
    }

    /// The rates of `key` (in `slot`) at `t` over a window of `len` ns, if it has a tracker.
    pub fn view(&self, slot: u32, key: &SrcKey, t: u64, len: u64) -> Option<RateView> {
        self.find(slot, key).map(|i| self.trackers[i].view(t, len))
    }

    /// Forgets the rates of `slot` (its source started afresh).
    pub fn drop_slot(&mut self, slot: u32) {
        if let Some(i) = self.index.remove(&slot) {
            self.trackers[usize::from(i)].slot = u32::MAX;
            self.trackers[usize::from(i)].key = SrcKey::default();
        }
    }

    /// Forgets every rate (the flood window changed).
    pub fn clear(&mut self) {
        self.trackers.clear();
        self.index.clear();
        self.slowest = None;
    }

    /// The slowest tracker at `t`: index and rate.
    fn slowest_at(&mut self, t: u64, len: u64) -> Option<(usize, f64)> {
        if let Some((at, i, r)) = self.slowest
            && at == t
        {
            return Some((i, r));
        }
        let (i, r) = self
            .trackers
            .iter()
            .enumerate()
            .map(|(i, tr)| {
                let v = tr.view(t, len);
                (i, v.udp_pps.max(v.echo_pps))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))?;
        self.slowest = Some((t, i, r));
        Some((i, r))
    }

    /// Charges one sample of `key` (in `slot`), attaching a tracker when the sample asks for
    /// one and there is room (or a slower source to take it from).
    pub fn charge(&mut self, slot: u32, key: &SrcKey, c: Charge, len: u64) {
        let i = match self.find(slot, key) {
            Some(i) => i,
            None if !c.attach => return,
            None => {
                let Some(i) = self.take(slot, key, &c, len) else {
                    self.refused += 1;
                    return;
                };
                i
            }
        };
        let tr = &mut self.trackers[i];
        let once = tr.last != c.t;
        tr.last = c.t;
        let n = tr.counts.at(c.t, len);
        let sat = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        n.udp = n.udp.saturating_add(sat(c.udp));
        n.echo = n.echo.saturating_add(sat(c.echo));
        if once {
            n.ms = n.ms.saturating_add(sat(c.interval_ns / 1_000_000));
        }
    }

    /// A tracker for `key`: a free one, a new one, or the slowest if `c` is faster.
    fn take(&mut self, slot: u32, key: &SrcKey, c: &Charge, len: u64) -> Option<usize> {
        let fresh = Tracker {
            key: *key,
            slot,
            counts: TwoEpochs::default(),
            last: 0,
        };
        // A stale entry of this slot (its source was replaced) is reused first.
        if let Some(&i) = self.index.get(&slot) {
            self.trackers[usize::from(i)] = fresh;
            return Some(usize::from(i));
        }
        let i = if let Some(i) = self.trackers.iter().position(|t| t.slot == u32::MAX) {
            i
        } else if self.trackers.len() < TRACKERS {
            if self.trackers.capacity() == 0 {
                self.trackers.reserve_exact(64);
            } else if self.trackers.len() == self.trackers.capacity() {
                let add = self.trackers.len().min(TRACKERS - self.trackers.len());
                self.trackers.reserve_exact(add);
            }
            self.trackers.push(fresh);
            self.trackers.len() - 1
        } else {
            let secs = (c.interval_ns as f64 / 1e9).max(1e-3);
            let rate = (c.udp.max(c.echo)) as f64 / secs;
            let (i, slowest) = self.slowest_at(c.t, len)?;
            if self.taken.0 != c.t {
                self.taken = (c.t, 0);
            }
            if slowest >= rate || self.taken.1 >= TAKEN_PER_READ {
                return None;
            }
            self.taken.1 += 1;
            // Found again on the next sample of this read that needs one.
            self.slowest = None;
            let old = self.trackers[i].slot;
            self.index.remove(&old);
            i
        };
        self.trackers[i] = fresh;
        self.index.insert(slot, i as u16);
        Some(i)
    }

    /// Trackers in use.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no tracker is in use.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const LEN: u64 = 10 * S;

    fn key(i: u32) -> SrcKey {
        SrcKey {
            addr: [0, 0, 0, 0xcb00_7100 | i],
            len: 32,
            v6: false,
        }
    }

    fn charge(t: u64, udp: u64, echo: u64, attach: bool) -> Charge {
        Charge {
            t,
            udp,
            echo,
            interval_ns: S,
            attach,
        }
    }

    #[test]
    fn rates_are_averaged_over_the_charged_seconds() {
        let mut p = Pool::default();
        let t0 = 1_800_000_000 * S;
        // Not fast enough to attach: nothing kept.
        p.charge(1, &key(1), charge(t0, 100, 0, false), LEN);
        assert!(p.view(1, &key(1), t0, LEN).is_none());
        for s in 0..5 {
            p.charge(1, &key(1), charge(t0 + s * S, 50_000, 30_000, true), LEN);
        }
        let v = p.view(1, &key(1), t0 + 4 * S, LEN).unwrap();
        assert_eq!((v.udp_pps, v.echo_pps, v.secs), (50_000.0, 30_000.0, 5.0));
        // Another source in the same slot (recycled) sees nothing of it.
        assert!(p.view(1, &key(2), t0 + 4 * S, LEN).is_none());
        p.drop_slot(1);
        assert!(p.view(1, &key(1), t0 + 4 * S, LEN).is_none());
    }

    #[test]
    fn a_full_pool_gives_the_slowest_tracker_to_a_faster_source_only() {
        let mut p = Pool::default();
        let t0 = 1_800_000_000 * S;
        for i in 0..TRACKERS as u32 {
            p.charge(i, &key(i), charge(t0, 6_000 + u64::from(i), 0, true), LEN);
        }
        assert_eq!(p.len(), TRACKERS);
        // Slower than all: refused, memory bounded.
        p.charge(5000, &key(5000), charge(t0, 1_000, 0, true), LEN);
        assert_eq!(p.refused, 1);
        assert!(p.view(5000, &key(5000), t0, LEN).is_none());
        // A flood takes the slowest one's (slot 0).
        p.charge(5001, &key(5001), charge(t0, 50_000, 0, true), LEN);
        assert_eq!(p.view(5001, &key(5001), t0, LEN).unwrap().udp_pps, 50_000.0);
        assert!(p.view(0, &key(0), t0, LEN).is_none());
        assert_eq!(p.len(), TRACKERS);
        assert!(p.trackers.capacity() <= TRACKERS);
        // One read takes at most TAKEN_PER_READ trackers from slower sources.
        let t1 = t0 + 1_000_000_000;
        for i in 0..100u32 {
            p.charge(9000 + i, &key(9000 + i), charge(t1, 60_000, 0, true), LEN);
        }
        let taken = (0..100u32)
            .filter(|&i| p.view(9000 + i, &key(9000 + i), t1, LEN).is_some())
            .count();
        assert_eq!(taken, TAKEN_PER_READ as usize);
    }
}
