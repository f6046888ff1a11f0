//! What a commit says beyond its offset: which offsets *above* the
//! committed one have already finished.
//!
//! Kafka's committed offset is a watermark: everything below it is done.
//! When one slow task sits at a partition's head, thousands of tasks behind
//! it may finish while the watermark stays put; after a crash, the next
//! owner would run all of them again. So each commit carries, in its
//! metadata string, the finished offsets above the watermark, and a member
//! that is assigned the partition skips those records instead of running
//! them again (Confluent's Parallel Consumer does the same for Java).
//!
//! The rule that keeps this safe: **a record is skipped only when a
//! metadata blob that this module wrote, for exactly the committed offset,
//! says it finished.** Anything else — no metadata (a broker that drops it,
//! a commit made by another tool), a different format, a checksum that does
//! not match, a base that is not the committed offset — is ignored, and the
//! partition is read from the watermark as plain Kafka would. When the set
//! does not fit in [`MAX_METADATA`] characters, only the ranges nearest the
//! watermark are written: a record left out runs again, never the reverse.
//!
//! Format (version 1): `cv1.` then unpadded URL-safe base64 of
//! `varint(base)`, then per finished range `varint(start - previous end)`
//! and `varint(length)` (the first "previous end" is `base + 1`: the base
//! itself is the first unfinished offset), then the first four bytes of the
//! SHA-256 of everything before them. Pure; unit- and property-tested.

use std::collections::VecDeque;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Longest metadata string written: below the brokers' default
/// `offset.metadata.max.bytes` of 4096.
pub const MAX_METADATA: usize = 4000;

const PREFIX: &str = "cv1.";
const CHECKSUM: usize = 4;

/// A half-open range of offsets, `start..end`.
pub type Range = (i64, i64);

/// An encoded progress record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The metadata string (empty when no budget was given).
    pub metadata: String,
    /// Whether finished ranges were left out (they did not fit).
    pub left_out: bool,
}

/// Why a metadata string is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    /// Empty: nothing was written, or the broker dropped it.
    #[error("no progress metadata")]
    Missing,
    /// Not something this module wrote for this offset.
    #[error("progress metadata ignored: {0}")]
    Invalid(&'static str),
}

/// The shortest budget written: below it, nothing is written (an empty
/// string, which readers take as "no progress"). The longest metadata
/// without a range (prefix, a ten-byte base, checksum) takes 23.
pub const MIN_METADATA: usize = 24;

/// Encodes the finished `ranges` above the first unfinished offset `base`
/// in at most `max_len` characters. Ranges must be increasing, non-empty,
/// disjoint and above `base`; encoding stops at the first one that is not,
/// or that does not fit (what is written is always a prefix of the set:
/// a record left out runs again, never the reverse). Below
/// [`MIN_METADATA`] the metadata is empty.
pub fn encode(base: i64, ranges: impl IntoIterator<Item = Range>, max_len: usize) -> Encoded {
    let mut ranges = ranges.into_iter().peekable();
    if max_len < MIN_METADATA {
        return Encoded {
            metadata: String::new(),
            left_out: ranges.peek().is_some(),
        };
    }
    let mut body = Vec::with_capacity(64);
    put_varint(&mut body, base as u64);
    // Base64 of n bytes is ceil(4n / 3) characters.
    let fits = |raw: usize| PREFIX.len() + (4 * (raw + CHECKSUM)).div_ceil(3) <= max_len;
    let mut previous_end = base.saturating_add(1);
    let mut left_out = false;
    let mut scratch = Vec::with_capacity(20);
    for (start, end) in ranges {
        if start < previous_end || end <= start {
            left_out = true;
            break;
        }
        scratch.clear();
        put_varint(&mut scratch, (start - previous_end) as u64);
        put_varint(&mut scratch, (end - start) as u64);
        if !fits(body.len() + scratch.len()) {
            left_out = true;
            break;
        }
        body.extend_from_slice(&scratch);
        previous_end = end;
    }
    let digest = Sha256::digest(&body);
    body.extend_from_slice(&digest[..CHECKSUM]);
    let mut metadata = String::with_capacity(PREFIX.len() + body.len() * 4 / 3 + 4);
    metadata.push_str(PREFIX);
    URL_SAFE_NO_PAD.encode_string(&body, &mut metadata);
    Encoded { metadata, left_out }
}

/// The most ranges [`encode`] can write in `max_len` characters (each
/// takes at least two bytes, hence more than two characters): a caller
/// copying ranges to encode later need copy no more.
pub fn most_ranges(max_len: usize) -> usize {
    max_len / 2
}

/// The finished ranges `metadata` records above `committed`, when this
/// module wrote it for exactly that offset.
pub fn decode(committed: i64, metadata: &str) -> Result<Vec<Range>, Unusable> {
    if metadata.is_empty() {
        return Err(Unusable::Missing);
    }
    let encoded = metadata
        .strip_prefix(PREFIX)
        .ok_or(Unusable::Invalid("unknown format"))?;
    if encoded.len() > MAX_METADATA * 256 {
        return Err(Unusable::Invalid("too long"));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| Unusable::Invalid("not base64"))?;
    let split = bytes
        .len()
        .checked_sub(CHECKSUM)
        .ok_or(Unusable::Invalid("truncated"))?;
    let (body, checksum) = bytes.split_at(split);
    if Sha256::digest(body).get(..CHECKSUM) != Some(checksum) {
        return Err(Unusable::Invalid("checksum mismatch"));
    }
    let mut input = body;
    let base = take_varint(&mut input).ok_or(Unusable::Invalid("truncated"))?;
    if i64::try_from(base).ok() != Some(committed) {
        return Err(Unusable::Invalid("written for another offset"));
    }
    let mut ranges = Vec::new();
    let mut previous_end = committed
        .checked_add(1)
        .ok_or(Unusable::Invalid("offset overflow"))?;
    while !input.is_empty() {
        let gap = take_varint(&mut input).ok_or(Unusable::Invalid("truncated"))?;
        let len = take_varint(&mut input).ok_or(Unusable::Invalid("truncated"))?;
        let start = i64::try_from(gap)
            .ok()
            .and_then(|g| previous_end.checked_add(g))
            .ok_or(Unusable::Invalid("offset overflow"))?;
        let end = i64::try_from(len)
            .ok()
            .filter(|&l| l > 0)
            .and_then(|l| start.checked_add(l))
            .ok_or(Unusable::Invalid("bad range"))?;
        ranges.push((start, end));
        previous_end = end;
    }
    Ok(ranges)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(input: &mut &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return None;
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Offsets known to have finished before this member was assigned their
/// partition: records there are skipped as they arrive. Offsets are
/// asked about in increasing order, so each range is dropped once passed.
#[derive(Debug, Default, Clone)]
pub struct Finished {
    ranges: VecDeque<Range>,
}

impl Finished {
    /// The ranges read from a commit's metadata.
    pub fn new(ranges: Vec<Range>) -> Self {
        Finished {
            ranges: ranges.into(),
        }
    }

    /// Whether `offset` finished; forgets every range below it.
    pub fn take(&mut self, offset: i64) -> bool {
        while self.ranges.front().is_some_and(|&(_, end)| end <= offset) {
            self.ranges.pop_front();
        }
        self.ranges
            .front()
            .is_some_and(|&(start, end)| (start..end).contains(&offset))
    }

    /// The finished ranges from `from` on, clipped to it.
    pub fn from(&self, from: i64) -> impl Iterator<Item = Range> + '_ {
        self.ranges
            .iter()
            .filter(move |&&(_, end)| end > from)
            .map(move |&(start, end)| (start.max(from), end))
    }

    /// Whether nothing is left to skip.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_ranges_above_the_base() {
        let ranges = vec![(12, 15), (20, 21), (1_000_000, 1_000_500)];
        let e = encode(10, ranges.clone(), MAX_METADATA);
        assert!(!e.left_out);
        assert!(e.metadata.starts_with("cv1."));
        assert_eq!(decode(10, &e.metadata), Ok(ranges));
        let empty = encode(7, [], MAX_METADATA);
        assert_eq!(decode(7, &empty.metadata), Ok(vec![]));
    }

    #[test]
    fn a_blob_for_another_offset_or_tampered_is_never_used() {
        let e = encode(100, [(105, 200)], MAX_METADATA);
        assert_eq!(
            decode(101, &e.metadata),
            Err(Unusable::Invalid("written for another offset"))
        );
        assert_eq!(decode(100, ""), Err(Unusable::Missing));
        assert_eq!(
            decode(100, "hello"),
            Err(Unusable::Invalid("unknown format"))
        );
        assert_eq!(decode(100, "cv1.***"), Err(Unusable::Invalid("not base64")));
        assert_eq!(decode(100, "cv1.AA"), Err(Unusable::Invalid("truncated")));
        // Truncated by a broker or a tool: the checksum no longer matches.
        let cut = &e.metadata[..e.metadata.len() - 3];
        assert!(matches!(decode(100, cut), Err(Unusable::Invalid(_))));
        // One character changed.
        let mut bytes = e.metadata.clone().into_bytes();
        let last = bytes.len() - 6;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let changed = String::from_utf8(bytes).unwrap();
        assert_eq!(
            decode(100, &changed),
            Err(Unusable::Invalid("checksum mismatch"))
        );
    }

    #[test]
    fn what_does_not_fit_is_left_out_from_the_far_end() {
        // Alternating finished and unfinished offsets: one range each.
        let ranges: Vec<Range> = (0..5_000).map(|i| (2 * i + 1, 2 * i + 2)).collect();
        let e = encode(0, ranges.clone(), MAX_METADATA);
        assert!(e.metadata.len() <= MAX_METADATA);
        assert!(e.left_out);
        let kept = decode(0, &e.metadata).unwrap();
        assert!(kept.len() > 1_000 && kept.len() < ranges.len());
        assert_eq!(
            kept[..],
            ranges[..kept.len()],
            "the nearest ranges are kept"
        );
    }

    #[test]
    fn malformed_ranges_are_left_out_not_written() {
        let e = encode(10, [(5, 8), (12, 12), (20, 25)], MAX_METADATA);
        assert!(e.left_out, "everything after a bad range is left out");
        assert_eq!(decode(10, &e.metadata), Ok(vec![]));
    }

    #[test]
    fn finished_skips_in_order_and_forgets_what_passed() {
        let mut f = Finished::new(vec![(5, 8), (10, 11)]);
        assert!(!f.take(4));
        assert!(f.take(5));
        assert!(f.take(7));
        assert_eq!(f.from(8).collect::<Vec<_>>(), vec![(10, 11)]);
        assert!(!f.take(9));
        assert!(f.take(10));
        assert!(!f.take(11));
        assert!(f.is_empty());
    }

    proptest! {
        /// Whatever the ranges, a decoded blob never claims an offset that
        /// was not in them, and keeps everything when it fits.
        #[test]
        fn decoding_never_claims_more_than_was_encoded(
            base in 0i64..1_000_000,
            spans in proptest::collection::vec((1i64..50, 1i64..50), 0..400),
            limit in 0usize..MAX_METADATA,
        ) {
            let mut ranges = Vec::new();
            let mut at = base + 1;
            for (gap, len) in spans {
                at += gap - 1;
                ranges.push((at, at + len));
                at += len + 1;
            }
            let e = encode(base, ranges.clone(), limit);
            prop_assert!(e.metadata.len() <= limit);
            if limit < MIN_METADATA {
                prop_assert!(e.metadata.is_empty());
                prop_assert_eq!(e.left_out, !ranges.is_empty());
                return Ok(());
            }
            let decoded = decode(base, &e.metadata).unwrap();
            prop_assert_eq!(&decoded[..], &ranges[..decoded.len()]);
            prop_assert_eq!(e.left_out, decoded.len() < ranges.len());
            prop_assert!(decode(base + 1, &e.metadata).is_err());
        }

        /// Arbitrary strings never decode to anything but an error or
        /// increasing ranges above the committed offset, and never panic.
        #[test]
        fn garbage_is_refused_or_harmless(s in ".{0,200}", committed in 0i64..1000) {
            if let Ok(ranges) = decode(committed, &format!("cv1.{s}")) {
                let mut previous = committed;
                for (start, end) in ranges {
                    prop_assert!(start > previous && end > start);
                    previous = end - 1;
                }
            }
        }
    }
}
