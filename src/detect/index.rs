//! The source table: a fixed-capacity slab of [`SourceState`], an open-addressing index from
//! source key to slot, and an intrusive LRU list so the idlest source is evicted first.
//!
//! Nothing allocates after the slab has grown to its cap: the index is sized at creation
//! (twice the cap, a power of two, linear probing with backward-shift deletion).

use super::source::{OCCUPIED, SourceState, SrcKey, TOUCHED};

const EMPTY: u32 = u32::MAX;
const NIL: u32 = u32::MAX;

/// Slab + index + LRU list.
#[derive(Debug)]
pub struct Table {
    /// The slots; grows up to `cap`.
    pub slots: Vec<SourceState>,
    index: Vec<u32>,
    mask: usize,
    cap: usize,
    len: usize,
    /// Most recently seen.
    head: u32,
    /// Least recently seen.
    tail: u32,
    free: Vec<u32>,
}

/// What [`Table::get_or_insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Got {
    /// The source was tracked.
    Found(u32),
    /// A free slot was taken.
    New(u32),
    /// The idlest source was evicted to make room.
    Evicted(u32),
}

impl Table {
    /// A table for at most `cap` sources.
    pub fn new(cap: usize) -> Table {
        let cap = cap.max(1);
        let size = (cap * 2).next_power_of_two();
        Table {
            slots: Vec::new(),
            index: vec![EMPTY; size],
            mask: size - 1,
            cap,
            len: 0,
            head: NIL,
            tail: NIL,
            free: Vec::new(),
        }
    }

    /// Tracked sources.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Bytes held by the table's allocations.
    pub fn memory_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<SourceState>()
            + self.index.capacity() * 4
            + self.free.capacity() * 4
    }

    #[inline]
    fn find_pos(&self, key: &SrcKey) -> Result<usize, usize> {
        let mut pos = key.hash() as usize & self.mask;
        loop {
            let s = self.index[pos];
            if s == EMPTY {
                return Err(pos);
            }
            if self.slots[s as usize].key == *key {
                return Ok(pos);
            }
            pos = (pos + 1) & self.mask;
        }
    }

    /// The slot of `key`, if tracked.
    pub fn get(&self, key: &SrcKey) -> Option<u32> {
        self.find_pos(key).ok().map(|p| self.index[p])
    }

    /// The slot of `key`, taking a free slot or evicting the idlest source when untracked.
    /// The slot is moved to the head of the LRU list either way. A new or recycled slot is
    /// reset and holds `key`.
    #[inline]
    pub fn get_or_insert(&mut self, key: &SrcKey) -> Got {
        match self.find_pos(key) {
            Ok(pos) => {
                let s = self.index[pos];
                self.touch(s);
                Got::Found(s)
            }
            Err(_) => {
                let (slot, evicted) = if let Some(s) = self.free.pop() {
                    (s, false)
                } else if self.slots.len() < self.cap {
                    if self.slots.len() == self.slots.capacity() {
                        // Double, but never past the cap: the slab's size is the bound.
                        let add = self.slots.len().max(64).min(self.cap - self.slots.len());
                        self.slots.reserve_exact(add);
                    }
                    self.slots.push(SourceState::default());
                    ((self.slots.len() - 1) as u32, false)
                } else {
                    let victim = self.tail;
                    self.remove(victim);
                    // `remove` pushed it on the free list.
                    self.free.pop();
                    (victim, true)
                };
                let st = &mut self.slots[slot as usize];
                // A recycled slot may still be on the engine's touch list: keep that mark so
                // the list never holds a slot twice.
                let touched = st.flags & TOUCHED;
                *st = SourceState::default();
                st.key = *key;
                st.flags = OCCUPIED | touched;
                // The index may have shifted when removing: look the position up again.
                let pos = match self.find_pos(key) {
                    Ok(p) | Err(p) => p,
                };
                self.index[pos] = slot;
                self.len += 1;
                self.push_head(slot);
                if evicted {
                    Got::Evicted(slot)
                } else {
                    Got::New(slot)
                }
            }
        }
    }

    /// Stops tracking the source in `slot`.
    pub fn remove(&mut self, slot: u32) {
        let key = self.slots[slot as usize].key;
        if let Ok(mut pos) = self.find_pos(&key) {
            // Backward-shift deletion keeps every probe chain unbroken.
            self.index[pos] = EMPTY;
            let mut next = (pos + 1) & self.mask;
            while self.index[next] != EMPTY {
                let s = self.index[next];
                let home = self.slots[s as usize].key.hash() as usize & self.mask;
                // Move the entry back when its home is not within (pos, next].
                let dist_next = next.wrapping_sub(home) & self.mask;
                let dist_pos = pos.wrapping_sub(home) & self.mask;
                if dist_pos < dist_next {
                    self.index[pos] = s;
                    self.index[next] = EMPTY;
                    pos = next;
                }
                next = (next + 1) & self.mask;
            }
        }
        self.unlink(slot);
        self.slots[slot as usize].flags &= TOUCHED;
        self.len -= 1;
        self.free.push(slot);
    }

    /// The source in `slot` saw an event: move it to the head of the LRU list.
    #[inline]
    pub fn touch(&mut self, slot: u32) {
        if self.head != slot {
            self.unlink(slot);
            self.push_head(slot);
        }
    }

    #[inline]
    fn unlink(&mut self, s: u32) {
        let (older, newer) = {
            let st = &self.slots[s as usize];
            (st.older, st.newer)
        };
        if newer == NIL {
            self.head = older;
        } else {
            self.slots[newer as usize].older = older;
        }
        if older == NIL {
            self.tail = newer;
        } else {
            self.slots[older as usize].newer = newer;
        }
    }

    #[inline]
    fn push_head(&mut self, s: u32) {
        let old_head = self.head;
        {
            let st = &mut self.slots[s as usize];
            st.older = old_head;
            st.newer = NIL;
        }
        if old_head != NIL {
            self.slots[old_head as usize].newer = s;
        }
        self.head = s;
        if self.tail == NIL {
            self.tail = s;
        }
    }

    /// The least recently seen source.
    pub fn idlest(&self) -> Option<u32> {
        (self.tail != NIL).then_some(self.tail)
    }

    /// Occupied slots.
    pub fn occupied(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.flags & OCCUPIED != 0)
            .map(|(i, _)| i as u32)
    }

    /// Rebuilds for a new cap, keeping the most recently seen sources. Returns how many were
    /// dropped.
    pub fn resize(&mut self, cap: usize) -> usize {
        let cap = cap.max(1);
        // Most recent first.
        let mut order = Vec::with_capacity(self.len);
        let mut s = self.head;
        while s != NIL {
            order.push(s);
            s = self.slots[s as usize].older;
        }
        let dropped = order.len().saturating_sub(cap);
        order.truncate(cap);
        let kept: Vec<SourceState> = order.iter().map(|&s| self.slots[s as usize]).collect();
        *self = Table::new(cap);
        for st in kept.into_iter().rev() {
            let slot = match self.get_or_insert(&st.key) {
                Got::Found(s) | Got::New(s) | Got::Evicted(s) => s,
            };
            let (older, newer) = {
                let x = &self.slots[slot as usize];
                (x.older, x.newer)
            };
            self.slots[slot as usize] = SourceState { older, newer, ..st };
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> SrcKey {
        SrcKey {
            addr: [0, 0, 0, i],
            len: 32,
            v6: false,
        }
    }

    #[test]
    fn evicts_the_idlest_and_keeps_the_index_consistent() {
        let mut t = Table::new(4);
        for i in 0..4 {
            assert!(matches!(t.get_or_insert(&key(i)), Got::New(_)));
        }
        // 0 is seen again: 1 is now the idlest.
        assert!(matches!(t.get_or_insert(&key(0)), Got::Found(_)));
        assert!(matches!(t.get_or_insert(&key(9)), Got::Evicted(_)));
        assert_eq!(t.len(), 4);
        assert!(t.get(&key(1)).is_none());
        for i in [0, 2, 3, 9] {
            let s = t.get(&key(i)).expect("tracked");
            assert_eq!(t.slots[s as usize].key, key(i));
        }
    }

    #[test]
    fn many_keys_through_a_small_table() {
        let mut t = Table::new(64);
        for i in 0..100_000u32 {
            t.get_or_insert(&key(i.wrapping_mul(2_654_435_761)));
            assert!(t.len() <= 64);
        }
        // The last 64 keys are exactly the tracked ones.
        for i in 100_000 - 64..100_000u32 {
            assert!(t.get(&key(i.wrapping_mul(2_654_435_761))).is_some(), "{i}");
        }
        assert!(t.get(&key(0)).is_none());
    }

    #[test]
    fn resize_keeps_the_most_recent() {
        let mut t = Table::new(8);
        for i in 0..8 {
            t.get_or_insert(&key(i));
        }
        assert_eq!(t.resize(3), 5);
        assert_eq!(t.len(), 3);
        for i in 5..8 {
            assert!(t.get(&key(i)).is_some());
        }
        // LRU order survived: inserting evicts 5.
        t.get_or_insert(&key(100));
        assert!(t.get(&key(5)).is_none());
    }
}
