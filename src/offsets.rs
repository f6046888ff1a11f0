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
//! never assumes `n + 1` follows `n`. It remembers the gaps it was shown
//! (the last [`MAX_GAPS`] of them), so that an offset arriving below the
//! highest one dispatched can be told apart: dispatched before (a true
//! redelivery, harmless) or never (a record read out of order, which must
//! not be dropped, since the watermark would pass it unseen).

use std::collections::VecDeque;

/// Gaps between dispatched offsets remembered per partition (16 bytes
/// each); an offset below the oldest one forgotten counts as never seen.
pub const MAX_GAPS: usize = 256;

/// Tracks dispatched and finished offsets of one partition.
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    /// Dispatched offsets not yet below the watermark, increasing.
    pending: VecDeque<Entry>,
    /// The offset after the highest dispatched one.
    next: Option<i64>,
    /// The last watermark reported by [`OffsetTracker::finished`].
    reported: Option<i64>,
    /// Dispatched offsets not finished.
    unfinished: usize,
    /// The first offset dispatched.
    first: Option<i64>,
    /// Half-open ranges skipped between dispatched offsets, increasing.
    gaps: VecDeque<(i64, i64)>,
    /// Below this, gaps were forgotten ([`MAX_GAPS`]).
    forgotten_below: Option<i64>,
}

/// One dispatched offset: 16 bytes.
#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: i64,
    /// When it was dispatched, in the caller's ticks.
    tick: u32,
    done: bool,
}

/// An offset that cannot be dispatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("offset {offset} is not above the last dispatched offset {last}")]
pub struct NotIncreasing {
    /// The offset refused.
    pub offset: i64,
    /// The highest offset dispatched so far.
    pub last: i64,
    /// Whether `offset` was dispatched before (a true redelivery). When
    /// false it never was: the record arrived out of order, and dropping
    /// it would let the watermark pass a record that never ran.
    pub seen: bool,
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
        self.dispatched_at(offset, 0)
    }

    /// [`OffsetTracker::dispatched`], remembering `tick` (any clock the
    /// caller keeps, e.g. seconds since it started) for
    /// [`OffsetTracker::oldest_unfinished_tick`].
    pub fn dispatched_at(&mut self, offset: i64, tick: u32) -> Result<(), NotIncreasing> {
        self.check(offset)?;
        if let Some(next) = self.next {
            if offset > next {
                self.gaps.push_back((next, offset));
                if self.gaps.len() > MAX_GAPS {
                    if let Some((_, end)) = self.gaps.pop_front() {
                        self.forgotten_below = Some(end);
                    }
                }
            }
        }
        self.first.get_or_insert(offset);
        // Until something finishes, the committable offset is the first one
        // dispatched: nothing to report yet.
        self.reported.get_or_insert(offset);
        self.pending.push_back(Entry {
            offset,
            tick,
            done: false,
        });
        self.next = Some(offset + 1);
        self.unfinished += 1;
        Ok(())
    }

    /// Whether `offset` may be dispatched next (changes nothing): an
    /// offset not above the last one dispatched is refused, saying whether
    /// it was dispatched before.
    pub fn check(&self, offset: i64) -> Result<(), NotIncreasing> {
        match self.next {
            Some(next) if offset < next => Err(NotIncreasing {
                offset,
                last: next - 1,
                seen: self.seen(offset),
            }),
            _ => Ok(()),
        }
    }

    /// Whether `offset`, below the next one expected, was dispatched:
    /// it is not below the first, nor in a gap this tracker was shown
    /// (an offset below a forgotten gap counts as never dispatched).
    fn seen(&self, offset: i64) -> bool {
        if self
            .pending
            .binary_search_by_key(&offset, |e| e.offset)
            .is_ok()
        {
            return true;
        }
        if self.first.is_none_or(|first| offset < first)
            || self.forgotten_below.is_some_and(|below| offset < below)
        {
            return false;
        }
        let in_gap = self
            .gaps
            .binary_search_by(|&(start, end)| {
                if end <= offset {
                    std::cmp::Ordering::Less
                } else if start > offset {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok();
        !in_gap
    }

    /// Records that `offset` finished (its outputs are acknowledged).
    /// Returns the new committable offset when it advanced: the next offset
    /// to consume, as Kafka commits it. Unknown or already finished offsets
    /// change nothing.
    pub fn finished(&mut self, offset: i64) -> Option<i64> {
        // Offsets are usually consecutive: try the slot `offset` would
        // have then, before searching (gaps are possible, see above).
        let guess = self
            .pending
            .front()
            .and_then(|front| usize::try_from(offset.checked_sub(front.offset)?).ok())
            .filter(|&i| self.pending.get(i).is_some_and(|e| e.offset == offset));
        let index = match guess {
            Some(index) => index,
            None => self
                .pending
                .binary_search_by_key(&offset, |e| e.offset)
                .ok()?,
        };
        let entry = self.pending.get_mut(index)?;
        if entry.done {
            return None;
        }
        entry.done = true;
        self.unfinished -= 1;
        while self.pending.front().is_some_and(|e| e.done) {
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
            Some(e) => Some(e.offset),
            None => self.next,
        }
    }

    /// Dispatched offsets that have not finished.
    pub fn unfinished(&self) -> usize {
        self.unfinished
    }

    /// Dispatched offsets at or above the watermark, finished or not: what
    /// a crash now could make the partition's next owner see again.
    pub fn uncommitted(&self) -> usize {
        self.pending.len()
    }

    /// The offset after the highest dispatched one.
    pub fn next(&self) -> Option<i64> {
        self.next
    }

    /// The tick the first unfinished offset was dispatched at.
    pub fn oldest_unfinished_tick(&self) -> Option<u32> {
        self.pending.front().map(|e| e.tick)
    }

    /// The finished offsets above the watermark, as increasing half-open
    /// ranges. Offsets never dispatched between two finished ones (gaps
    /// in the log) fall inside a range: no record is there.
    pub fn finished_ranges(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        let mut entries = self.pending.iter().peekable();
        std::iter::from_fn(move || {
            let first = entries.find(|e| e.done)?;
            let mut last = first.offset;
            while let Some(e) = entries.next_if(|e| e.done) {
                last = e.offset;
            }
            Some((first.offset, last + 1))
        })
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
        assert_eq!(
            t.dispatched(6),
            Err(NotIncreasing {
                offset: 6,
                last: 6,
                seen: true
            })
        );
        assert_eq!(
            t.dispatched(2),
            Err(NotIncreasing {
                offset: 2,
                last: 6,
                seen: false
            }),
            "below the first dispatched: never seen"
        );
        assert_eq!(t.finished(99), None);
        assert_eq!(t.finished(5), Some(6));
        assert_eq!(t.finished(5), None, "finishing twice is harmless");
        assert_eq!(t.unfinished(), 1);
    }

    #[test]
    fn finished_ranges_above_the_watermark_bridge_gaps_only() {
        let mut t = OffsetTracker::new();
        for (o, tick) in [
            (10, 1),
            (11, 2),
            (12, 3),
            (14, 4),
            (15, 5),
            (16, 6),
            (20, 7),
        ] {
            t.dispatched_at(o, tick).unwrap();
        }
        for o in [11, 12, 14, 16, 20] {
            t.finished(o);
        }
        assert_eq!(t.watermark(), Some(10));
        assert_eq!(t.oldest_unfinished_tick(), Some(1));
        assert_eq!(
            t.finished_ranges().collect::<Vec<_>>(),
            vec![(11, 15), (16, 21)],
            "13 was never dispatched; 15 is unfinished"
        );
        assert_eq!(t.uncommitted(), 7);
        t.finished(10);
        assert_eq!(t.watermark(), Some(15));
        assert_eq!(t.oldest_unfinished_tick(), Some(5));
        assert_eq!(t.finished_ranges().collect::<Vec<_>>(), vec![(16, 21)]);
        assert_eq!(t.uncommitted(), 3);
    }

    #[test]
    fn an_offset_arriving_late_is_told_apart_from_a_redelivery() {
        let mut t = OffsetTracker::new();
        for o in [10, 11, 15, 16, 30] {
            t.dispatched(o).unwrap();
        }
        for o in [10, 11, 15, 16] {
            t.finished(o);
        }
        assert_eq!(t.watermark(), Some(30));
        let seen = |t: &mut OffsetTracker, o| t.dispatched(o).map_err(|e| e.seen);
        // Finished and below the watermark, or still tracked: redeliveries.
        assert_eq!(seen(&mut t, 11), Err(true));
        assert_eq!(seen(&mut t, 16), Err(true));
        assert_eq!(seen(&mut t, 30), Err(true));
        // Never dispatched: below the first, or in a gap the watermark
        // passed over.
        assert_eq!(seen(&mut t, 9), Err(false));
        assert_eq!(seen(&mut t, 12), Err(false));
        assert_eq!(seen(&mut t, 14), Err(false));
        assert_eq!(seen(&mut t, 20), Err(false));
        assert_eq!(seen(&mut t, 29), Err(false));
        // Only the last MAX_GAPS gaps are kept; below them, never seen.
        let mut many = OffsetTracker::new();
        for i in 0..=i64::try_from(MAX_GAPS).unwrap() + 1 {
            many.dispatched(i * 2).unwrap();
        }
        assert_eq!(seen(&mut many, 0), Err(true), "still tracked");
        for i in 0..=i64::try_from(MAX_GAPS).unwrap() + 1 {
            many.finished(i * 2);
        }
        assert_eq!(seen(&mut many, 0), Err(false), "forgotten: not trusted");
        assert_eq!(seen(&mut many, 1), Err(false));
        let last = i64::try_from(MAX_GAPS).unwrap() * 2;
        assert_eq!(seen(&mut many, last), Err(true));
        assert_eq!(seen(&mut many, last - 1), Err(false));
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
                // The ranges a commit records hold every finished offset
                // above the watermark and no unfinished one.
                let ranges: Vec<(i64, i64)> = t.finished_ranges().collect();
                for &x in &offsets {
                    let inside = ranges.iter().any(|&(s, e)| (s..e).contains(&x));
                    prop_assert_eq!(inside, x > watermark && done.contains(&x));
                }
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
