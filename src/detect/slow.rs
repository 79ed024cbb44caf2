//! Slow network scans: a long-window distinct count of destinations for the sources that
//! sweep.
//!
//! A scan paced at one probe per second never reaches the 60 s network-scan threshold, but
//! fans out to hundreds of destinations within minutes. Counting destinations over an hour
//! for every source would not fit the per-source budget (the state is 496 of 512 bytes), and
//! most sources never sweep; so, like the exact port trackers ([`super::exact`]), a tracker
//! is attached only to a source whose network-scan window shows the start of a sweep: at
//! least [`ATTACH_AT`] distinct destinations on few ports, most of its flows not carried
//! through (`network_scan.min_incomplete_ratio`). That is a pace of one new destination
//! every 7.5 s or faster; a slower sweep is not tracked (an hour of it is under 480
//! destinations: see README's detection section).
//!
//! A tracker counts, over two epochs of `network_scan.slow.window` weighted as every other
//! window ([`super::sketch::epoch_view`]), the distinct destinations (linear counting over
//! 256 bits: about ±5 % at 300, saturating near 1,400), the distinct ports (64 bits), the
//! new flows and the flows carried through. It is seeded with the network-scan window's
//! current epoch (the same hashes), so what led to the attachment counts. At most
//! [`TRACKERS`] exist (about 120 KiB, allocated when first needed); when all are taken, the
//! smallest of the next [`REUSE_SAMPLE`] (a clock over the pool) is reused if it counts
//! fewer destinations than the newcomer, else nothing is attached: bounded work per
//! attachment, and a crowd of small fan-outs cannot push a real sweep (hundreds of
//! destinations) out. A spoofed flood (one flow per forged source) never attaches one.

use std::collections::HashMap;

use super::sketch::{Bits, Span, epoch_of, epoch_view, sliding, sliding_distinct};

/// Distinct destinations in the network-scan window at which a tracker attaches.
pub const ATTACH_AT: f64 = 8.0;
/// Trackers at most.
pub const TRACKERS: usize = 1024;

/// The long-window counts of one source.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tracker {
    /// The source's slot.
    pub slot: u32,
    /// Epoch number of the current counts (epochs are the slow window).
    pub epoch: u32,
    /// When in the epochs events came.
    pub span: Span,
    /// Distinct destinations, current and previous epoch.
    pub dsts: [Bits<8>; 2],
    /// Distinct destination ports, current and previous epoch.
    pub ports: [Bits<2>; 2],
    /// New flows, current and previous epoch.
    pub flows: [u32; 2],
    /// Flows carried through, current and previous epoch.
    pub completed: [u32; 2],
    /// When the tracker was attached (ns): the evidence window begins no earlier.
    pub since: u64,
}

/// The measures of a tracker at some time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct View {
    /// New flows in the window.
    pub flows: f64,
    /// Flows not carried through.
    pub incomplete: f64,
    /// Distinct destinations.
    pub dsts: f64,
    /// Distinct destination ports.
    pub ports: f64,
    /// Too many ports to count.
    pub ports_saturated: bool,
}

impl Tracker {
    #[inline]
    fn roll(&mut self, t: u64, len: u64) {
        let d = epoch_of(t, len).wrapping_sub(self.epoch);
        if d != 0 && d < u32::MAX / 2 {
            if d == 1 {
                self.dsts = [Bits::default(), self.dsts[0]];
                self.ports = [Bits::default(), self.ports[0]];
                self.flows = [0, self.flows[0]];
                self.completed = [0, self.completed[0]];
            } else {
                self.dsts = Default::default();
                self.ports = Default::default();
                self.flows = [0; 2];
                self.completed = [0; 2];
            }
            self.span.rolled(d);
            self.epoch = epoch_of(t, len);
        }
        if d < u32::MAX / 2 {
            self.span.note(t, len);
        }
    }

    /// Counts one flow event at `t` (ns) for a slow window of `len` ns: a new flow to
    /// (destination hash, port hash), and/or a flow carried through.
    #[inline]
    pub fn on_flow(&mut self, t: u64, len: u64, new: Option<(u64, u64)>, completed: bool) {
        self.roll(t, len);
        if let Some((dst_h, port_h)) = new {
            self.dsts[0].insert(dst_h);
            self.ports[0].insert(port_h);
            self.flows[0] = self.flows[0].saturating_add(1);
        }
        if completed {
            self.completed[0] = self.completed[0].saturating_add(1);
        }
    }

    /// The measures at `t` for a window of `len` ns.
    pub fn view(&self, t: u64, len: u64) -> View {
        let v = epoch_view(self.epoch, &self.span, t, len);
        let (c, p) = if v.same {
            (0, 1)
        } else if v.next {
            (2, 0)
        } else {
            return View::default();
        };
        let pick = |i: usize, a: [u32; 2]| if i < 2 { a[i] } else { 0 };
        let pw = v.prev_weight;
        let flows = sliding(
            u64::from(pick(c, self.flows)),
            u64::from(pick(p, self.flows)),
            pw,
        );
        let completed = sliding(
            u64::from(pick(c, self.completed)),
            u64::from(pick(p, self.completed)),
            pw,
        );
        let bits = |i: usize| if i < 2 { self.dsts[i] } else { Bits::default() };
        let pbits = |i: usize| {
            if i < 2 {
                self.ports[i]
            } else {
                Bits::default()
            }
        };
        let ports_c = pbits(c);
        let ports_p = pbits(p);
        View {
            flows,
            incomplete: (flows - completed).max(0.0),
            dsts: sliding_distinct(&bits(c), &bits(p), pw),
            ports: sliding_distinct(&ports_c, &ports_p, pw),
            ports_saturated: ports_c.union(&ports_p).saturated(),
        }
    }
}

/// The trackers of the engine.
#[derive(Debug, Default)]
pub struct Pool {
    trackers: Vec<Tracker>,
    /// Slot → index into `trackers`.
    index: HashMap<u32, u32>,
    /// Where the next search for a tracker to reuse starts (a clock over `trackers`).
    cursor: usize,
}

/// Trackers looked at for reuse per attachment when the pool is full: the smallest of them
/// goes, if it is smaller than the newcomer. Bounded work per attachment (no scan of the
/// whole pool); a real sweep, hundreds of destinations, is never the smallest of a sample.
const REUSE_SAMPLE: usize = 8;

/// What [`Pool::attach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A free tracker was taken.
    Yes,
    /// The tracker of this slot's source was reused (a smaller sweep).
    Replaced(u32),
    /// Every tracker looked at counts more: nothing attached.
    Full,
}

/// Distinct destinations of a tracker, as set bits (cheap: no estimate).
fn ones(t: &Tracker) -> u32 {
    256 - t.dsts[0].union(&t.dsts[1]).zeros()
}

impl Pool {
    /// Bytes held.
    pub fn memory_bytes(&self) -> usize {
        self.trackers.capacity() * std::mem::size_of::<Tracker>() + self.index.capacity() * 8
    }

    /// Whether no tracker is attached.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The tracker of `slot`.
    #[inline]
    pub fn get_mut(&mut self, slot: u32) -> Option<&mut Tracker> {
        let i = *self.index.get(&slot)?;
        self.trackers.get_mut(i as usize)
    }

    /// The tracker of `slot`, read only.
    pub fn get(&self, slot: u32) -> Option<&Tracker> {
        let i = *self.index.get(&slot)?;
        self.trackers.get(i as usize)
    }

    /// Forgets the tracker of `slot` (its source is gone or started afresh).
    pub fn drop_slot(&mut self, slot: u32) {
        if let Some(i) = self.index.remove(&slot)
            && let Some(t) = self.trackers.get_mut(i as usize)
        {
            t.slot = u32::MAX;
        }
    }

    /// Attaches a tracker to `slot` at `t`, seeded with the counts that led to it. When all
    /// are taken, the smallest of the next [`REUSE_SAMPLE`] is reused if it counts fewer
    /// destinations than the seed. `len` is the slow window.
    pub fn attach(&mut self, slot: u32, t: u64, len: u64, seed: &Tracker) -> Attached {
        let mut evicted = Attached::Yes;
        if self.trackers.capacity() == 0 {
            self.trackers.reserve_exact(TRACKERS);
            self.index.reserve(TRACKERS);
        }
        let i = if let Some(i) = self.trackers.iter().position(|x| x.slot == u32::MAX) {
            i
        } else if self.trackers.len() < TRACKERS {
            self.trackers.push(Tracker::default());
            self.trackers.len() - 1
        } else {
            let n = self.trackers.len();
            let mut best = self.cursor % n;
            let mut min = u32::MAX;
            for k in 0..REUSE_SAMPLE.min(n) {
                let i = (self.cursor + k) % n;
                // A tracker whose counts have left the window counts nothing.
                let x = &self.trackers[i];
                let c = if x.view(t, len).flows > 0.0 {
                    ones(x)
                } else {
                    0
                };
                if c < min {
                    min = c;
                    best = i;
                }
            }
            self.cursor = (self.cursor + REUSE_SAMPLE) % n;
            if min >= ones(seed) {
                return Attached::Full;
            }
            let old = self.trackers[best].slot;
            self.index.remove(&old);
            evicted = Attached::Replaced(old);
            best
        };
        let mut tr = *seed;
        tr.slot = slot;
        tr.since = t;
        tr.epoch = epoch_of(t, len);
        tr.span = Span::default();
        tr.span.note(t, len);
        self.trackers[i] = tr;
        self.index.insert(slot, i as u32);
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::super::sketch::{hash16, hash128};
    use super::*;

    const H: u64 = 3_600_000_000_000;

    #[test]
    fn the_pool_is_bounded() {
        // 1024 trackers of 120 bytes and their index: about 140 KiB at most.
        assert!(std::mem::size_of::<Tracker>() <= 120);
        let mut p = Pool::default();
        for s in 0..3 * TRACKERS as u32 {
            p.attach(s, 1_000 * H, H, &sweep(8 + s));
        }
        assert_eq!(p.trackers.len(), TRACKERS);
        assert!(p.memory_bytes() <= 160 * 1024, "{}", p.memory_bytes());
    }

    #[test]
    fn counts_destinations_over_the_long_window() {
        let mut p = Pool::default();
        let t0 = 1_000 * H;
        p.attach(7, t0, H, &Tracker::default());
        let tr = p.get_mut(7).unwrap();
        for i in 0..400u32 {
            let t = t0 + u64::from(i) * 1_000_000_000;
            tr.on_flow(t, H, Some((hash128(u128::from(i)), hash16(22))), false);
        }
        let v = tr.view(t0 + 400 * 1_000_000_000, H);
        assert!((v.dsts - 400.0).abs() < 40.0, "{v:?}");
        assert!(v.ports < 1.5 && v.incomplete == 400.0, "{v:?}");
        // Two windows later it is all gone.
        assert_eq!(tr.view(t0 + 3 * H, H), View::default());
    }

    fn sweep(n: u32) -> Tracker {
        let mut t = Tracker::default();
        for i in 0..n {
            t.dsts[0].insert(hash128(u128::from(i)));
        }
        t.flows[0] = n;
        t
    }

    #[test]
    fn a_full_pool_reuses_a_smaller_sweep_never_a_bigger_one() {
        let mut p = Pool::default();
        let t0 = 1_000 * H;
        assert_eq!(p.attach(0, t0, H, &sweep(100)), Attached::Yes);
        for s in 1..TRACKERS as u32 {
            p.attach(s, t0, H, &sweep(8));
        }
        // No bigger than what is there: nothing attached.
        assert_eq!(p.attach(5_000, t0, H, &sweep(8)), Attached::Full);
        assert!(p.get(5_000).is_none());
        // Bigger: one of the small ones goes, never the big sweep.
        for s in 0..2 * TRACKERS as u32 {
            let r = p.attach(10_000 + s, t0, H, &sweep(20));
            assert_ne!(r, Attached::Replaced(0));
        }
        assert!(p.get(0).is_some(), "the big sweep stays");
        assert_eq!(p.index.len(), TRACKERS);
    }
}
