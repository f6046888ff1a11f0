//! Avro binary primitives: zig-zag varints, length-prefixed bytes and
//! strings, unions, enums and maps, as the Avro 1.11 specification defines
//! them ("Binary Encoding").
//!
//! The [`Reader`] is the only place that touches untrusted bytes. Every read
//! is bounds-checked and every length is checked against what is left of the
//! input *before* anything is allocated, so a crafted length cannot make the
//! decoder allocate more than the input's own size. Errors carry the record
//! and field being read, so a bad record can be reported precisely.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::{DecodeError, DecodeProblem};

/// Longest Avro `long` varint: 64 bits in 7-bit groups.
const MAX_VARINT_BYTES: u32 = 10;

pub(crate) fn write_long(out: &mut Vec<u8>, value: i64) {
    // Zig-zag maps small magnitudes, negative or positive, to small codes.
    let mut n = ((value << 1) ^ (value >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

pub(crate) fn write_int(out: &mut Vec<u8>, value: i32) {
    write_long(out, i64::from(value));
}

pub(crate) fn write_bytes(out: &mut Vec<u8>, value: &[u8]) {
    // A slice never exceeds isize::MAX bytes, so the length fits an i64.
    write_long(out, value.len() as i64);
    out.extend_from_slice(value);
}

pub(crate) fn write_str(out: &mut Vec<u8>, value: &str) {
    write_bytes(out, value.as_bytes());
}

pub(crate) fn write_uuid(out: &mut Vec<u8>, value: &Uuid) {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = value.as_hyphenated().encode_lower(&mut text);
    write_str(out, text);
}

/// Writes the branch index of a `["null", T]` union; the caller writes the
/// value after a `true`.
pub(crate) fn write_optional_tag(out: &mut Vec<u8>, present: bool) {
    out.push(if present { 2 } else { 0 }); // zig-zag of 1 and 0
}

pub(crate) fn write_string_map(out: &mut Vec<u8>, map: &BTreeMap<String, String>) {
    if !map.is_empty() {
        // One block holding every entry, then the empty block that ends the map.
        write_long(out, map.len() as i64);
        for (key, value) in map {
            write_str(out, key);
            write_str(out, value);
        }
    }
    write_long(out, 0);
}

/// A cursor over untrusted Avro bytes.
pub(crate) struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
    record: &'static str,
    field: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(input: &'a [u8], record: &'static str) -> Self {
        Reader {
            input,
            pos: 0,
            record,
            field: "",
        }
    }

    /// Names the field that the following reads belong to, for error messages.
    pub(crate) fn field(&mut self, record: &'static str, field: &'static str) {
        self.record = record;
        self.field = field;
    }

    pub(crate) fn error(&self, problem: DecodeProblem) -> DecodeError {
        DecodeError::new(self.record, self.field, problem)
    }

    fn remaining(&self) -> usize {
        self.input.len().saturating_sub(self.pos)
    }

    /// Nothing is left to read.
    pub(crate) fn at_end(&self) -> bool {
        self.remaining() == 0
    }

    fn read_varint(&mut self) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        for i in 0..MAX_VARINT_BYTES {
            let byte = *self
                .input
                .get(self.pos)
                .ok_or_else(|| self.error(DecodeProblem::Truncated))?;
            self.pos += 1;
            let shift = 7 * i;
            // The tenth byte may only carry the 64th bit.
            if i == MAX_VARINT_BYTES - 1 && byte > 1 {
                return Err(self.error(DecodeProblem::BadVarint));
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.error(DecodeProblem::BadVarint))
    }

    pub(crate) fn read_long(&mut self) -> Result<i64, DecodeError> {
        let n = self.read_varint()?;
        Ok((n >> 1) as i64 ^ -((n & 1) as i64))
    }

    pub(crate) fn read_int(&mut self) -> Result<i32, DecodeError> {
        let value = self.read_long()?;
        i32::try_from(value).map_err(|_| self.error(DecodeProblem::IntOutOfRange(value)))
    }

    fn read_len(&mut self) -> Result<usize, DecodeError> {
        let len = self.read_long()?;
        if len < 0 {
            return Err(self.error(DecodeProblem::NegativeLength(len)));
        }
        match usize::try_from(len) {
            Ok(len) if len <= self.remaining() => Ok(len),
            _ => Err(self.error(DecodeProblem::Truncated)),
        }
    }

    pub(crate) fn read_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.read_len()?;
        let end = self.pos + len; // read_len bounded len by what is left
        let bytes = self
            .input
            .get(self.pos..end)
            .ok_or_else(|| self.error(DecodeProblem::Truncated))?;
        self.pos = end;
        Ok(bytes)
    }

    pub(crate) fn read_str(&mut self) -> Result<&'a str, DecodeError> {
        let bytes = self.read_bytes()?;
        std::str::from_utf8(bytes).map_err(|_| self.error(DecodeProblem::InvalidUtf8))
    }

    pub(crate) fn read_string(&mut self) -> Result<String, DecodeError> {
        self.read_str().map(str::to_owned)
    }

    pub(crate) fn read_uuid(&mut self) -> Result<Uuid, DecodeError> {
        let text = self.read_bytes()?;
        if text.len() != uuid::fmt::Hyphenated::LENGTH {
            return Err(self.error(DecodeProblem::InvalidUuid));
        }
        Uuid::try_parse_ascii(text).map_err(|_| self.error(DecodeProblem::InvalidUuid))
    }

    /// Reads the branch index of a `["null", T]` union: `false` for null,
    /// `true` when a `T` follows.
    pub(crate) fn read_optional_tag(&mut self) -> Result<bool, DecodeError> {
        match self.read_long()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.error(DecodeProblem::BadUnionIndex(other))),
        }
    }

    pub(crate) fn read_enum_index(&mut self, symbols: usize) -> Result<usize, DecodeError> {
        let index = self.read_long()?;
        match usize::try_from(index) {
            Ok(i) if i < symbols => Ok(i),
            _ => Err(self.error(DecodeProblem::BadEnumIndex(index))),
        }
    }

    pub(crate) fn read_string_map(&mut self) -> Result<BTreeMap<String, String>, DecodeError> {
        let mut map = BTreeMap::new();
        loop {
            let count = self.read_long()?;
            if count == 0 {
                return Ok(map);
            }
            let count = if count < 0 {
                // A negative count is followed by the block's size in bytes,
                // which lets readers skip it; we read every entry anyway.
                let size = self.read_long()?;
                if size < 0 {
                    return Err(self.error(DecodeProblem::NegativeLength(size)));
                }
                count
                    .checked_neg()
                    .ok_or_else(|| self.error(DecodeProblem::BadVarint))?
            } else {
                count
            };
            // Every entry takes at least two bytes (two empty strings): a count
            // above that is a lie, and is refused before looping over it.
            if count as u64 > (self.remaining() / 2) as u64 {
                return Err(self.error(DecodeProblem::Truncated));
            }
            for _ in 0..count {
                let key = self.read_string()?;
                let value = self.read_string()?;
                map.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long_round_trip(value: i64) -> (Vec<u8>, i64) {
        let mut out = Vec::new();
        write_long(&mut out, value);
        let mut reader = Reader::new(&out, "test");
        let back = reader.read_long().expect("own encoding decodes");
        (out, back)
    }

    #[test]
    fn zigzag_matches_the_specification_examples() {
        // The table in the Avro specification, "Binary Encoding".
        for (value, bytes) in [
            (0i64, vec![0x00u8]),
            (-1, vec![0x01]),
            (1, vec![0x02]),
            (-2, vec![0x03]),
            (2, vec![0x04]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
        ] {
            let (encoded, back) = long_round_trip(value);
            assert_eq!(encoded, bytes, "encoding of {value}");
            assert_eq!(back, value);
        }
    }

    #[test]
    fn extreme_longs_round_trip_in_ten_bytes() {
        for value in [i64::MIN, i64::MAX, i64::MIN + 1, i64::MAX - 1] {
            let (encoded, back) = long_round_trip(value);
            assert_eq!(encoded.len(), 10);
            assert_eq!(back, value);
        }
    }

    #[test]
    fn overlong_varint_is_refused() {
        let input = [0xffu8; 11];
        let err = Reader::new(&input, "test").read_long().unwrap_err();
        assert_eq!(err.problem(), &DecodeProblem::BadVarint);
        // Ten bytes whose last carries more than the 64th bit.
        let mut input = [0xffu8; 10];
        input[9] = 0x02;
        let err = Reader::new(&input, "test").read_long().unwrap_err();
        assert_eq!(err.problem(), &DecodeProblem::BadVarint);
    }

    #[test]
    fn length_beyond_input_is_truncation_not_allocation() {
        let mut input = Vec::new();
        write_long(&mut input, i64::MAX);
        let err = Reader::new(&input, "test").read_bytes().unwrap_err();
        assert_eq!(err.problem(), &DecodeProblem::Truncated);
    }

    #[test]
    fn int_out_of_range_is_refused() {
        let mut input = Vec::new();
        write_long(&mut input, i64::from(i32::MAX) + 1);
        let err = Reader::new(&input, "test").read_int().unwrap_err();
        assert_eq!(
            err.problem(),
            &DecodeProblem::IntOutOfRange(i64::from(i32::MAX) + 1)
        );
    }

    #[test]
    fn map_with_negative_block_count_is_read() {
        // Blocks written the way some writers do: negative count plus size.
        let mut input = Vec::new();
        write_long(&mut input, -1);
        write_long(&mut input, 4);
        write_str(&mut input, "a");
        write_str(&mut input, "b");
        write_long(&mut input, 0);
        let map = Reader::new(&input, "test").read_string_map().unwrap();
        assert_eq!(map.get("a").map(String::as_str), Some("b"));
    }

    #[test]
    fn map_count_larger_than_input_is_refused() {
        let mut input = Vec::new();
        write_long(&mut input, 1_000_000);
        write_str(&mut input, "a");
        let err = Reader::new(&input, "test").read_string_map().unwrap_err();
        assert_eq!(err.problem(), &DecodeProblem::Truncated);
    }
}
