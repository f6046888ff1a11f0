//! [`OffsetTracker`]: which offset of a partition may be committed.
//!
//! Tasks of one partition finish out of order (different keys run
//! concurrently; acknowledgements come back from different output
//! partitions). Committing offset `n` tells the group that everything before
//! `n` is done, so the committable offset is the first offset that is *not*
//! finished — the end of the contiguous prefix of finished offsets. This type
//! is that rule and nothing else: pure, no I/O, unit- and property-tested.
//!
//! Offsets are those actually dispatched, which need not be contiguous
//! numbers (compaction and transaction markers leave gaps), so the tracker
//! never assumes `n + 1` follows `n`.

use std::collections::VecDeque;

/// Tracks dispatched and finished offsets of one partition.
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    /// Dispatched offsets not yet below the watermark, increasing, with
    /// whether each has finished.
    pending: VecDeque<(i64, bool)>,
    /// The offset after the highest dispatched one.
    next: Option<i64>,
    /// The last watermark reported by [`OffsetTracker::finished`].
    reported: Option<i64>,
    /// Dispatched offsets not finished.
    unfinished: usize,
}

/// An offset that cannot be dispatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("offset {offset} is not above the last dispatched offset {last}")]
pub struct NotIncreasing {
    /// The offset refused.
    pub offset: i64,
    /// The highest offset dispatched so far.
    pub last: i64,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was handed to a task. Offsets must increase: a
    /// record delivered again (after a seek) is refused, since its first copy
    /// is still tracked.
    pub fn dispatched(&mut self, offset: i64) -> Result<(), NotIncreasing> {
        if let Some(next) = self.next {
            if offset < next {
                return Err(NotIncreasing {
                    offset,
                    last: next - 1,
                });
            }
        }
        // Until something finishes, the committable offset is the first one
        // dispatched: nothing to report yet.
        self.reported.get_or_insert(offset);
        self.pending.push_back((offset, false));
        self.next = Some(offset + 1);
        self.unfinished += 1;
        Ok(())
    }

    /// Records that `offset` finished (its outputs are acknowledged).
    /// Returns the new committable offset when it advanced: the next offset
    /// to consume, as Kafka commits it. Unknown or already finished offsets
    /// change nothing.
    pub fn finished(&mut self, offset: i64) -> Option<i64> {
        let index = self
            .pending
            .binary_search_by_key(&offset, |&(o, _)| o)
            .ok()?;
        let entry = self.pending.get_mut(index)?;
        if entry.1 {
            return None;
        }
        entry.1 = true;
        self.unfinished -= 1;
        while self.pending.front().is_some_and(|&(_, done)| done) {
            self.pending.pop_front();
        }
        let watermark = self.watermark()?;
        if self.reported == Some(watermark) {
            return None;
        }
        self.reported = Some(watermark);
        Some(watermark)
    }

    /// The committable offset now: the first unfinished dispatched offset, or
    /// the offset after the last dispatched one when all have finished.
    /// `None` before anything was dispatched.
    pub fn watermark(&self) -> Option<i64> {
        match self.pending.front() {
            Some(&(offset, _)) => Some(offset),
            None => self.next,
        }
    }

    /// Dispatched offsets that have not finished.
    pub fn unfinished(&self) -> usize {
        self.unfinished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn advances_only_over_the_contiguous_prefix() {
        let mut t = OffsetTracker::new();
        for o in 10..15 {
            t.dispatched(o).unwrap();
        }
        assert_eq!(t.watermark(), Some(10));
        assert_eq!(t.finished(12), None, "12 done, 10 and 11 not");
        assert_eq!(t.finished(11), None, "10 still not done");
        assert_eq!(t.finished(10), Some(13), "10..=12 done");
        assert_eq!(t.finished(14), None, "13 not done");
        assert_eq!(t.finished(13), Some(15), "all done: next to consume");
        assert_eq!(t.unfinished(), 0);
    }

    #[test]
    fn gaps_in_offsets_are_not_waited_for() {
        let mut t = OffsetTracker::new();
        for o in [3, 7, 8, 20] {
            t.dispatched(o).unwrap();
        }
        assert_eq!(t.finished(3), Some(7));
        assert_eq!(t.finished(7), Some(8));
        assert_eq!(t.finished(20), None);
        assert_eq!(t.finished(8), Some(21));
    }

    #[test]
    fn redelivered_and_unknown_offsets_change_nothing() {
        let mut t = OffsetTracker::new();
        t.dispatched(5).unwrap();
        t.dispatched(6).unwrap();
        assert_eq!(t.dispatched(6), Err(NotIncreasing { offset: 6, last: 6 }));
        assert_eq!(t.dispatched(2), Err(NotIncreasing { offset: 2, last: 6 }));
        assert_eq!(t.finished(99), None);
        assert_eq!(t.finished(5), Some(6));
        assert_eq!(t.finished(5), None, "finishing twice is harmless");
        assert_eq!(t.unfinished(), 1);
    }

    #[test]
    fn nothing_dispatched_means_nothing_to_commit() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.watermark(), None);
        assert_eq!(t.finished(0), None);
    }

    proptest! {
        /// Whatever the order tasks finish in, the committable offset never
        /// passes an unfinished offset, never goes back, and reaches the end
        /// once everything finished.
        #[test]
        fn watermark_never_passes_unfinished_work(
            gaps in proptest::collection::vec(1i64..4, 1..200),
            order_seed in proptest::collection::vec(any::<u32>(), 200),
        ) {
            let mut offsets = Vec::new();
            let mut o = 100;
            for g in &gaps {
                o += g;
                offsets.push(o);
            }
            let mut t = OffsetTracker::new();
            for &o in &offsets {
                t.dispatched(o).unwrap();
            }
            // A permutation of the offsets, from the seed.
            let mut order: Vec<(u32, i64)> =
                offsets.iter().zip(order_seed.iter().cycle()).map(|(&o, &s)| (s, o)).collect();
            order.sort();
            let mut done = std::collections::BTreeSet::new();
            let mut last = None;
            for (_, o) in order {
                done.insert(o);
                let reported = t.finished(o);
                let watermark = t.watermark().unwrap();
                let first_unfinished = offsets.iter().find(|x| !done.contains(x)).copied();
                match first_unfinished {
                    Some(u) => prop_assert_eq!(watermark, u),
                    None => prop_assert_eq!(watermark, offsets.last().unwrap() + 1),
                }
                if let Some(r) = reported {
                    prop_assert_eq!(r, watermark);
                    prop_assert!(last.is_none_or(|l| r > l), "watermark went back");
                    last = Some(r);
                }
            }
            prop_assert_eq!(last, Some(offsets.last().unwrap() + 1));
            prop_assert_eq!(t.unfinished(), 0);
        }
    }
}
