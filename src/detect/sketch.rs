//! Fixed-size building blocks of the per-source state: hashing, linear-counting bitmaps for
//! distinct counts, two-epoch sliding windows and a small Space-Saving heavy-hitter table.
//!
//! Everything here is `Copy`, allocation-free and sized at compile time, so a source's whole
//! state is one flat struct whose size is known (see `source::SourceState`).

/// Fixed seed of the sketch hashes: detections must replay identically, so it is not random.
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's finaliser: a fast, well-mixing 64-bit permutation.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Hash of a 128-bit value (an address, IPv4 mapped into the low 32 bits).
#[inline]
pub fn hash128(v: u128) -> u64 {
    mix64((v as u64) ^ mix64(((v >> 64) as u64) ^ SEED))
}

/// Hash of a port (or any small value), independent of [`hash128`] of the same number.
#[inline]
pub fn hash16(v: u16) -> u64 {
    mix64(u64::from(v) ^ SEED.rotate_left(17))
}

/// Linear-counting estimate of distinct items from a bitmap of `m` bits with `zeros` clear.
///
/// Exact in expectation for small counts; saturates at `m ln m` when every bit is set.
#[inline]
pub fn linear_count(m: u32, zeros: u32) -> f64 {
    let m = f64::from(m);
    let z = f64::from(zeros.max(1)).min(m);
    if zeros == 0 {
        // Saturated: the estimate is a lower bound.
        m * m.ln()
    } else {
        -m * (z / m).ln()
    }
}

/// A linear-counting bitmap of `32 * W` bits: distinct counts in `4 * W` bytes. (32-bit
/// words keep the structs that embed it 4-byte aligned, so they pack without padding.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bits<const W: usize>(pub [u32; W]);

impl<const W: usize> Default for Bits<W> {
    fn default() -> Self {
        Bits([0; W])
    }
}

impl<const W: usize> Bits<W> {
    const M: u32 = 32 * W as u32;

    /// Records an item by its hash.
    #[inline]
    pub fn insert(&mut self, h: u64) {
        // Use the high bits: the low ones select words in other sketches.
        let bit = ((h >> 32) % u64::from(Self::M)) as usize;
        self.0[bit / 32] |= 1 << (bit % 32);
    }

    /// The union of two bitmaps.
    #[inline]
    pub fn union(&self, other: &Self) -> Self {
        let mut out = *self;
        for (a, b) in out.0.iter_mut().zip(other.0.iter()) {
            *a |= *b;
        }
        out
    }

    /// Number of clear bits.
    #[inline]
    pub fn zeros(&self) -> u32 {
        self.0.iter().map(|w| w.count_zeros()).sum()
    }

    /// Estimated number of distinct items inserted.
    #[inline]
    pub fn estimate(&self) -> f64 {
        linear_count(Self::M, self.zeros())
    }

    /// The same items in a bitmap of `32 * H` bits (`H` divides `W`): exactly what inserting
    /// them into a `Bits<H>` would have given, since both use the hash modulo a power of two.
    #[inline]
    pub fn fold<const H: usize>(&self) -> Bits<H> {
        let mut out = Bits::<H>::default();
        for (i, w) in self.0.iter().enumerate() {
            out.0[i % H] |= *w;
        }
        out
    }

    /// Sets the bit of `h`; returns whether it was clear (a new item, barring collisions).
    #[inline]
    pub fn insert_new(&mut self, h: u64) -> bool {
        let bit = ((h >> 32) % u64::from(Self::M)) as usize;
        let m = 1 << (bit % 32);
        let was = self.0[bit / 32] & m;
        self.0[bit / 32] |= m;
        was == 0
    }

    /// Whether the estimate is past the range where it is reliable (more items than bits).
    #[inline]
    pub fn saturated(&self) -> bool {
        self.estimate() > f64::from(Self::M)
    }
}

/// Sliding-window estimate of a distinct count from the current and previous epochs' bitmaps:
/// the items only in the previous epoch count with the share of it still inside the window.
#[inline]
pub fn sliding_distinct<const W: usize>(cur: &Bits<W>, prev: &Bits<W>, prev_weight: f64) -> f64 {
    let c = cur.estimate();
    let u = cur.union(prev).estimate();
    c + (u - c).max(0.0) * prev_weight
}

/// Like [`sliding_distinct`] with the previous epoch kept at lower resolution (`H` words):
/// the current epoch is estimated at full resolution, the previous one's extra items at `H`.
#[inline]
pub fn sliding_distinct_folded<const W: usize, const H: usize>(
    cur: &Bits<W>,
    prev: &Bits<H>,
    prev_weight: f64,
) -> f64 {
    let c = cur.estimate();
    let cf = cur.fold::<H>();
    let extra = (cf.union(prev).estimate() - cf.estimate()).max(0.0);
    c + extra * prev_weight
}

/// Sliding-window estimate of a count: `cur + prev * prev_weight`.
#[inline]
pub fn sliding(cur: u64, prev: u64, prev_weight: f64) -> f64 {
    cur as f64 + prev as f64 * prev_weight
}

/// When in their epochs a structure saw events: first and last offset, in 1/256 of the
/// epoch, for the current and the previous epoch.
///
/// The previous epoch's counts are weighted by the share of its *active span* still inside
/// the window, not by the share of the whole epoch: an attack that started late in the
/// previous epoch is counted in full, so the estimate does not lag a rising rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// First and last offset in the current epoch (`[255, 0]` when empty).
    pub cur: [u8; 2],
    /// The same for the previous epoch.
    pub prev: [u8; 2],
}

const EMPTY_SPAN: [u8; 2] = [u8::MAX, 0];

impl Default for Span {
    fn default() -> Self {
        Span {
            cur: EMPTY_SPAN,
            prev: EMPTY_SPAN,
        }
    }
}

impl Span {
    /// Notes an event at `now_ns` in the current epoch.
    #[inline]
    pub fn note(&mut self, now_ns: u64, len_ns: u64) {
        let off = (u128::from(now_ns % len_ns) * 256 / u128::from(len_ns)) as u8;
        self.cur[0] = self.cur[0].min(off);
        self.cur[1] = self.cur[1].max(off);
    }

    /// The epochs moved on by `gap`.
    #[inline]
    pub fn rolled(&mut self, gap: u32) {
        self.prev = if gap == 1 { self.cur } else { EMPTY_SPAN };
        self.cur = EMPTY_SPAN;
    }
}

/// Where `now` falls relative to a stored epoch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochView {
    /// Whether the stored current epoch is still current.
    pub same: bool,
    /// Whether the stored current epoch is the one before now's (it is now "previous").
    pub next: bool,
    /// Weight of the previous epoch: the share of its active span still inside the window
    /// `(now - len, now]`.
    pub prev_weight: f64,
}

/// Epoch number of `now_ns` for epochs of `len_ns` (truncated to 32 bits; compared wrapping).
#[inline]
pub fn epoch_of(now_ns: u64, len_ns: u64) -> u32 {
    (now_ns / len_ns.max(1)) as u32
}

/// How `now_ns` relates to the stored epoch number `stored` with activity `span`.
#[inline]
pub fn epoch_view(stored: u32, span: &Span, now_ns: u64, len_ns: u64) -> EpochView {
    let len = len_ns.max(1);
    let d = epoch_of(now_ns, len).wrapping_sub(stored);
    let (same, next) = (d == 0, d == 1);
    let prev = if same {
        span.prev
    } else if next {
        span.cur
    } else {
        EMPTY_SPAN
    };
    let prev_weight = if prev[0] > prev[1] {
        0.0
    } else {
        let cur_start = now_ns - now_ns % len;
        let prev_start = cur_start.saturating_sub(len) as f64;
        let a = prev_start + f64::from(prev[0]) * len as f64 / 256.0;
        let b = prev_start + (f64::from(prev[1]) + 1.0) * len as f64 / 256.0;
        let ws = now_ns.saturating_sub(len) as f64;
        if ws <= a {
            1.0
        } else if ws >= b {
            0.0
        } else {
            (b - ws) / (b - a)
        }
    };
    EpochView {
        same,
        next,
        prev_weight,
    }
}

/// Two epochs of some counters: `cur` (now's epoch) and `prev` (the one before).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TwoEpochs<T: Copy + Default> {
    /// Epoch number of `cur`.
    pub epoch: u32,
    /// When in the epochs events came.
    pub span: Span,
    /// Counters of the current epoch.
    pub cur: T,
    /// Counters of the previous epoch.
    pub prev: T,
}

impl<T: Copy + Default> TwoEpochs<T> {
    /// Moves the epochs on to `now_ns`, notes an event, and returns the current counters.
    #[inline]
    pub fn at(&mut self, now_ns: u64, len_ns: u64) -> &mut T {
        let now = epoch_of(now_ns, len_ns);
        let d = now.wrapping_sub(self.epoch);
        if d != 0 && d < u32::MAX / 2 {
            // (An event older than the current epoch lands in the current one.)
            if d == 1 {
                self.prev = self.cur;
            } else {
                self.prev = T::default();
            }
            self.cur = T::default();
            self.span.rolled(d);
            self.epoch = now;
        }
        if d == 0 || d < u32::MAX / 2 {
            self.span.note(now_ns, len_ns);
        }
        &mut self.cur
    }

    /// Read-only view at `now_ns`: (current, previous, previous weight).
    #[inline]
    pub fn view(&self, now_ns: u64, len_ns: u64) -> (T, T, f64) {
        let v = epoch_view(self.epoch, &self.span, now_ns, len_ns);
        if v.same {
            (self.cur, self.prev, v.prev_weight)
        } else if v.next {
            (T::default(), self.cur, v.prev_weight)
        } else {
            (T::default(), T::default(), 0.0)
        }
    }
}

/// One entry of a [`SpaceSaving`] table.
pub trait Keyed: Copy + Default {
    /// The key type.
    type Key: Copy + PartialEq;
    /// The entry's key.
    fn key(&self) -> Self::Key;
    /// The entry's weight for eviction (flows in the window).
    fn weight(&self, prev_weight: f64) -> f64;
    /// Starts a fresh entry for `key` that replaces one of weight `inherited`.
    fn fresh(key: Self::Key, inherited: u16) -> Self;
    /// Moves the entry's counters one epoch on (`gap` epochs; ≥ 2 clears them).
    fn roll(&mut self, gap: u32);
    /// Whether the entry holds anything.
    fn occupied(&self) -> bool;
}

/// Space-Saving heavy hitters (Metwally et al.) with `K` entries and two-epoch counts.
///
/// An item with more than 1/K of the flows is guaranteed to hold an entry; a newcomer takes
/// the lightest entry and inherits its weight as error, so eviction order is right while the
/// counts each entry reports (other than its weight) start from zero and are never inflated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpaceSaving<E: Keyed, const K: usize> {
    /// Epoch number the entries' current counters belong to.
    pub epoch: u32,
    /// The entries, unordered.
    pub entries: [E; K],
}

impl<E: Keyed, const K: usize> Default for SpaceSaving<E, K> {
    fn default() -> Self {
        SpaceSaving {
            epoch: 0,
            entries: [E::default(); K],
        }
    }
}

impl<E: Keyed, const K: usize> SpaceSaving<E, K> {
    /// Moves every entry on to `now_ns`'s epoch, and the owner's `span` with them (notes
    /// the event in it).
    #[inline]
    pub fn roll(&mut self, now_ns: u64, len_ns: u64, span: Option<&mut Span>) {
        let now = epoch_of(now_ns, len_ns);
        let d = now.wrapping_sub(self.epoch);
        let moved = d != 0 && d < u32::MAX / 2;
        if moved {
            for e in &mut self.entries {
                e.roll(d);
            }
            self.epoch = now;
        }
        if let Some(span) = span {
            if moved {
                span.rolled(d);
            }
            if d < u32::MAX / 2 {
                span.note(now_ns, len_ns);
            }
        }
    }

    /// The entry for `key`, if tracked.
    #[inline]
    pub fn find(&mut self, key: E::Key) -> Option<&mut E> {
        self.entries
            .iter_mut()
            .find(|e| e.occupied() && e.key() == key)
    }

    /// The entry for `key`, taking the lightest one when it is not tracked; and whether it
    /// was tracked.
    #[inline]
    pub fn upsert(&mut self, key: E::Key, prev_weight: f64) -> (&mut E, bool) {
        let mut hit = None;
        let mut min_i = 0;
        let mut min_w = f64::INFINITY;
        for (i, e) in self.entries.iter().enumerate() {
            if !e.occupied() {
                if min_w > -1.0 {
                    min_i = i;
                    min_w = -1.0;
                }
                continue;
            }
            if e.key() == key {
                hit = Some(i);
                break;
            }
            let w = e.weight(prev_weight);
            if w < min_w {
                min_w = w;
                min_i = i;
            }
        }
        let found = hit.is_some();
        let i = match hit {
            Some(i) => i,
            None => {
                let inherited = if min_w < 0.0 {
                    0
                } else {
                    min_w.min(f64::from(u16::MAX)) as u16
                };
                self.entries[min_i] = E::fresh(key, inherited);
                min_i
            }
        };
        (&mut self.entries[i], found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_counting_is_close_for_small_counts() {
        for n in [1u32, 10, 40, 100, 200, 300] {
            let mut b = Bits::<8>::default();
            for i in 0..n {
                b.insert(hash128(u128::from(i) + 7));
            }
            let e = b.estimate();
            let err = (e - f64::from(n)).abs() / f64::from(n);
            assert!(err < 0.12, "n={n} estimate={e}");
        }
    }

    #[test]
    fn folding_equals_inserting_into_the_smaller_bitmap() {
        let mut big = Bits::<8>::default();
        let mut small = Bits::<2>::default();
        for i in 0..50u32 {
            big.insert(hash128(u128::from(i)));
            small.insert(hash128(u128::from(i)));
        }
        assert_eq!(big.fold::<2>(), small);
        let prev = small;
        // Same items in both epochs: nothing extra from the previous one.
        assert!((sliding_distinct_folded(&big, &prev, 1.0) - big.estimate()).abs() < 1e-9);
    }

    #[test]
    fn saturated_bitmap_reports_a_lower_bound() {
        let mut b = Bits::<2>::default();
        for i in 0..10_000u32 {
            b.insert(hash128(u128::from(i)));
        }
        assert_eq!(b.zeros(), 0);
        assert!(b.saturated());
        assert!((b.estimate() - 64.0 * 64f64.ln()).abs() < 1e-9);
    }

    #[test]
    fn two_epochs_roll_and_weigh() {
        let len = 10_000_000_000u64; // 10 s
        let mut w: TwoEpochs<u32> = TwoEpochs::default();
        // events spread over the whole epoch
        for i in 0..10 {
            *w.at(100 * len + i * len / 10, len) += 1;
        }
        let (c, p, _) = w.view(100 * len + len - 1, len);
        assert_eq!((c, p), (10, 0));
        // next epoch: cur becomes prev, weighted by what is left of its span in the window
        let (c, p, pw) = w.view(101 * len + len / 4, len);
        assert_eq!((c, p), (0, 10));
        // active span of the previous epoch: [0, 231/256); window start 0.25 into it
        let end = 231.0 / 256.0;
        assert!((pw - (end - 0.25) / end).abs() < 1e-9, "{pw}");
        *w.at(101 * len, len) += 3;
        assert_eq!((w.cur, w.prev), (3, 10));
        // two epochs later everything is gone
        assert_eq!(w.view(103 * len, len), (0, 0, 0.0));
        *w.at(103 * len, len) += 1;
        assert_eq!((w.cur, w.prev), (1, 0));
    }

    #[test]
    fn a_burst_late_in_the_previous_epoch_counts_in_full() {
        let len = 10_000_000_000u64;
        let mut w: TwoEpochs<u32> = TwoEpochs::default();
        // 100 events in the last second of epoch 100
        for i in 0..100 {
            *w.at(100 * len + 9 * len / 10 + i * len / 1000, len) += 1;
        }
        // 5 s later the whole burst is still inside the 10 s window
        let (c, p, pw) = w.view(101 * len + len / 2, len);
        assert_eq!((c, p), (0, 100));
        assert_eq!(pw, 1.0);
        // 10.5 s after the burst began, about half of it has left the window
        let (_, _, pw) = w.view(101 * len + 9 * len / 10 + len / 20, len);
        assert!((pw - 0.5).abs() < 0.06, "{pw}");
    }

    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    struct E {
        k: u32,
        n: [u16; 2],
        err: u16,
    }
    impl Keyed for E {
        type Key = u32;
        fn key(&self) -> u32 {
            self.k
        }
        fn weight(&self, pw: f64) -> f64 {
            sliding(u64::from(self.n[0]), u64::from(self.n[1]), pw)
        }
        fn fresh(k: u32, inherited: u16) -> E {
            E {
                k,
                n: [inherited, 0],
                err: inherited,
            }
        }
        fn roll(&mut self, gap: u32) {
            self.n = if gap == 1 { [0, self.n[0]] } else { [0, 0] };
        }
        fn occupied(&self) -> bool {
            self.n != [0, 0]
        }
    }

    #[test]
    fn space_saving_keeps_the_heavy_hitter() {
        let mut t: SpaceSaving<E, 3> = SpaceSaving::default();
        for i in 0..1000u32 {
            // one heavy key among many light ones
            let k = if i % 2 == 0 { 1 } else { 100 + i };
            t.upsert(k, 1.0).0.n[0] += 1;
        }
        let heavy = t.entries.iter().find(|e| e.k == 1).expect("heavy key kept");
        assert_eq!(heavy.n[0] - heavy.err, 500);
    }
}
