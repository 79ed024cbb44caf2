//! A fixed ring of recent flow samples shared by all sources, read when a detection needs
//! its "sample of flows". Each source writes at most [`PER_SOURCE_EPOCH`] samples per target
//! epoch, so one loud source cannot wash out the others' evidence.

use std::net::IpAddr;

use super::source::{bits_addr, join};
use crate::messages::{FlowSample, Time};

/// Samples one source may write per target epoch.
pub const PER_SOURCE_EPOCH: u8 = 16;

/// One recorded flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Hash of the source key (0: empty).
    pub source: u64,
    /// When.
    pub time: u64,
    /// Destination bits.
    pub dst: [u64; 2],
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Bit 0: answered; bit 1: IPv6.
    pub flags: u8,
}

/// The ring.
#[derive(Debug)]
pub struct Ring {
    buf: Vec<Sample>,
    next: usize,
}

impl Ring {
    /// A ring of `n` samples (allocated once).
    pub fn new(n: usize) -> Ring {
        Ring {
            buf: vec![Sample::default(); n.max(1)],
            next: 0,
        }
    }

    /// Bytes held.
    pub fn memory_bytes(&self) -> usize {
        self.buf.capacity() * std::mem::size_of::<Sample>()
    }

    /// Records a sample, overwriting the oldest.
    #[inline]
    pub fn push(&mut self, s: Sample) {
        self.buf[self.next] = s;
        self.next = (self.next + 1) % self.buf.len();
    }

    /// The time of the oldest sample of `source` since `since`.
    pub fn first(&self, source: u64, since: Time) -> Option<Time> {
        self.buf
            .iter()
            .filter(|s| s.source == source && s.time >= since.as_nanos())
            .map(|s| Time(s.time))
            .min()
    }

    /// Up to `max` most recent samples of `source` since `since`, one per flow (a flow's
    /// answer and its start merge into one sample), oldest first.
    pub fn collect(&self, source: u64, since: Time, max: usize) -> Vec<FlowSample> {
        let n = self.buf.len();
        let mut out: Vec<FlowSample> = Vec::new();
        for i in 1..=n {
            let s = &self.buf[(self.next + n - i) % n];
            if s.source != source || s.time < since.as_nanos() || s.source == 0 {
                continue;
            }
            let dst: IpAddr = bits_addr(join(s.dst), s.flags & 2 != 0);
            let answered = s.flags & 1 != 0;
            if let Some(f) = out.iter_mut().find(|f| {
                f.dst == dst && f.sport == s.sport && f.dport == s.dport && f.proto == s.proto
            }) {
                // An older record of the same flow: keep its start time.
                f.answered |= answered;
                f.time = Time(s.time);
                continue;
            }
            if out.len() == max {
                continue;
            }
            out.push(FlowSample {
                time: Time(s.time),
                dst,
                proto: s.proto,
                sport: s.sport,
                dport: s.dport,
                answered,
            });
        }
        out.sort_by_key(|f| f.time);
        out
    }

    /// The destination ports of `source`'s samples to `dst` since `since` (ns), appended to
    /// `out` once each.
    pub fn ports_to(&self, source: u64, dst: [u64; 2], since: u64, out: &mut Vec<u16>) {
        for s in &self.buf {
            if s.source == source
                && s.source != 0
                && s.dst == dst
                && s.time >= since
                && !out.contains(&s.dport)
            {
                out.push(s.dport);
            }
        }
    }
}
