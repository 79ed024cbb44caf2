//! Exact distinct destination ports for the evidence of port scans.
//!
//! The per-target port bitmaps of [`super::source::Target`] (128 bits) drive the threshold
//! within the per-source memory budget, but saturate near 600 ports: a 1000-port scan was
//! reported as 621. So once a destination of a source reaches [`ATTACH_AT`] distinct ports,
//! the engine gives the pair one of at most [`TRACKERS`] exact trackers (a bitmap of all
//! 65,536 ports for the current and the previous epoch of the source's target table, 16 KiB,
//! allocated once when first needed and reused), seeded with the ports of that destination
//! in the source's flow samples. A tracker is *complete* when the seed held every port seen
//! before it was attached; then its count is exact for what the agent saw in the two
//! epochs, else it is a lower bound (reported as `distinct_ports_at_least`). When every
//! tracker is taken, the one of the smallest scan is reused.

/// Distinct ports (estimated by the bitmap) of one destination at which a tracker attaches.
pub const ATTACH_AT: u32 = 8;
/// Trackers at most (16 KiB each: 1 MiB).
pub const TRACKERS: usize = 64;

/// One exact port set: (source slot, destination) over the target table's epochs.
#[derive(Debug)]
pub struct Tracker {
    /// The source's slot.
    pub slot: u32,
    /// The destination ([`super::source::split4`]).
    pub dst: [u32; 4],
    /// Epoch of `cur` (the source's target-table epoch).
    pub epoch: u32,
    /// Whether every port seen before attaching was in the seed.
    pub complete: bool,
    /// New flows counted since attaching, current and previous epoch.
    pub flows: [u32; 2],
    /// Of those, UDP.
    pub udp: [u32; 2],
    cur: Box<[u64; 1024]>,
    prev: Box<[u64; 1024]>,
}

impl Tracker {
    fn roll(&mut self, epoch: u32) {
        let d = epoch.wrapping_sub(self.epoch);
        if d == 0 || d >= u32::MAX / 2 {
            return;
        }
        if d == 1 {
            std::mem::swap(&mut self.cur, &mut self.prev);
            self.flows = [0, self.flows[0]];
            self.udp = [0, self.udp[0]];
        } else {
            self.prev.fill(0);
            self.flows = [0; 2];
            self.udp = [0; 2];
        }
        self.cur.fill(0);
        self.epoch = epoch;
    }

    /// Adds a port seen in `epoch`.
    #[inline]
    pub fn insert(&mut self, epoch: u32, port: u16) {
        self.roll(epoch);
        self.cur[usize::from(port) / 64] |= 1 << (port % 64);
    }

    /// Counts a new flow in `epoch` (the share of UDP flows tells a UDP scan).
    #[inline]
    pub fn note_flow(&mut self, epoch: u32, udp: bool) {
        self.roll(epoch);
        self.flows[0] = self.flows[0].saturating_add(1);
        if udp {
            self.udp[0] = self.udp[0].saturating_add(1);
        }
    }

    /// Distinct ports outside `skip` (inclusive ranges) in the window, as of `epoch`: the
    /// current epoch's, plus those only in the previous one weighted by `prev_weight`; and
    /// the (flows, UDP flows) counted in the window the same way.
    pub fn window_ports(
        &self,
        epoch: u32,
        prev_weight: f64,
        skip: &[(u16, u16)],
    ) -> (f64, f64, f64) {
        let d = epoch.wrapping_sub(self.epoch);
        let count = |b: &[u64; 1024], other: Option<&[u64; 1024]>| -> u64 {
            let mut n: u64 = b
                .iter()
                .enumerate()
                .map(|(i, w)| u64::from((w & !other.map_or(0, |o| o[i])).count_ones()))
                .sum();
            for &(lo, hi) in skip {
                for port in lo..=hi {
                    let (i, bit) = (usize::from(port) / 64, port % 64);
                    let set =
                        b[i] & (1 << bit) != 0 && other.is_none_or(|o| o[i] & (1 << bit) == 0);
                    n -= u64::from(set);
                }
            }
            n
        };
        let w = |c: u32, p: u32| f64::from(c) + f64::from(p) * prev_weight;
        match d {
            0 => {
                let cur = count(&self.cur, None) as f64;
                let only_prev = count(&self.prev, Some(&self.cur)) as f64;
                (
                    cur + only_prev * prev_weight,
                    w(self.flows[0], self.flows[1]),
                    w(self.udp[0], self.udp[1]),
                )
            }
            1 => (
                count(&self.cur, None) as f64 * prev_weight,
                w(0, self.flows[0]),
                w(0, self.udp[0]),
            ),
            _ => (0.0, 0.0, 0.0),
        }
    }

    /// Distinct ports in the current and previous epoch, as of `epoch`.
    pub fn count(&self, epoch: u32) -> u64 {
        let d = epoch.wrapping_sub(self.epoch);
        let ones = |b: &[u64; 1024]| b.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        match d {
            0 => self
                .cur
                .iter()
                .zip(self.prev.iter())
                .map(|(a, b)| u64::from((a | b).count_ones()))
                .sum(),
            1 => ones(&self.cur),
            _ => 0,
        }
    }
}

/// The trackers of the engine.
#[derive(Debug, Default)]
pub struct Pool {
    trackers: Vec<Tracker>,
}

impl Pool {
    /// Bytes held.
    pub fn memory_bytes(&self) -> usize {
        self.trackers.capacity() * std::mem::size_of::<Tracker>() + self.trackers.len() * 16_384
    }

    /// The tracker of (slot, dst).
    #[inline]
    pub fn get_mut(&mut self, slot: u32, dst: [u32; 4]) -> Option<&mut Tracker> {
        self.trackers
            .iter_mut()
            .find(|t| t.slot == slot && t.dst == dst)
    }

    /// The tracker of (slot, dst), read only.
    pub fn get(&self, slot: u32, dst: [u32; 4]) -> Option<&Tracker> {
        self.trackers
            .iter()
            .find(|t| t.slot == slot && t.dst == dst)
    }

    /// Whether `slot` has any tracker.
    pub fn has(&self, slot: u32) -> bool {
        self.trackers.iter().any(|t| t.slot == slot)
    }

    /// Forgets the trackers of `slot` (its source is gone or started afresh).
    pub fn drop_slot(&mut self, slot: u32) {
        for t in self.trackers.iter_mut().filter(|t| t.slot == slot) {
            t.slot = u32::MAX;
        }
    }

    /// A tracker for (slot, dst) at `epoch`, seeded with `seed`; `complete` when the seed
    /// holds every port seen so far.
    pub fn attach(&mut self, slot: u32, dst: [u32; 4], epoch: u32, seed: &[u16], complete: bool) {
        let i = if let Some(i) = self.trackers.iter().position(|t| t.slot == u32::MAX) {
            i
        } else if self.trackers.len() < TRACKERS {
            self.trackers.push(Tracker {
                slot,
                dst,
                epoch,
                complete,
                flows: [0; 2],
                udp: [0; 2],
                cur: Box::new([0; 1024]),
                prev: Box::new([0; 1024]),
            });
            self.trackers.len() - 1
        } else {
            // Reuse the smallest scan.
            let mut best = 0;
            let mut min = u64::MAX;
            for (i, t) in self.trackers.iter().enumerate() {
                let n = t.count(t.epoch);
                if n < min {
                    min = n;
                    best = i;
                }
            }
            best
        };
        let t = &mut self.trackers[i];
        t.slot = slot;
        t.dst = dst;
        t.epoch = epoch;
        t.complete = complete;
        t.flows = [0; 2];
        t.udp = [0; 2];
        t.cur.fill(0);
        t.prev.fill(0);
        for &p in seed {
            t.insert(epoch, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_exact_over_two_epochs() {
        let mut p = Pool::default();
        p.attach(1, [0, 0, 0, 9], 5, &[1, 2, 3], true);
        let t = p.get_mut(1, [0, 0, 0, 9]).unwrap();
        for port in 1..=1000 {
            t.insert(5, port);
        }
        assert_eq!(t.count(5), 1000);
        t.insert(6, 2000);
        assert_eq!(t.count(6), 1001);
        assert_eq!(t.count(7), 1);
        t.insert(8, 7);
        assert_eq!(t.count(8), 1);
    }
}
