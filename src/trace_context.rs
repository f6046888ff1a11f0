//! W3C trace context (`traceparent`, version 00): the one parser the
//! gateway (which accepts a caller's header or makes a new one) and
//! telemetry (which makes a task's span a child of it) share, so the two
//! never disagree about what is well formed.
//!
//! `00-<trace id: 32 hex>-<parent id: 16 hex>-<flags: 2 hex>`, lower-case
//! hex only, neither id all zeros (W3C Trace Context, §3.2: other values
//! are to be ignored).

/// A well-formed `traceparent`'s parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent<'a> {
    /// 32 lower-case hex digits, not all zero.
    pub trace_id: &'a str,
    /// 16 lower-case hex digits, not all zero.
    pub parent_id: &'a str,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

/// The parts of `value`, if it is a well-formed version-00 `traceparent`.
pub fn parse(value: &str) -> Option<TraceParent<'_>> {
    let mut parts = value.split('-');
    let (version, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let not_zero = |s: &str| s.bytes().any(|b| b != b'0');
    let well_formed = version == "00"
        && parts.next().is_none()
        && hex(trace_id, 32)
        && hex(parent_id, 16)
        && hex(flags, 2)
        && not_zero(trace_id)
        && not_zero(parent_id);
    if !well_formed {
        return None;
    }
    Some(TraceParent {
        trace_id,
        parent_id,
        flags: u8::from_str_radix(flags, 16).ok()?,
    })
}

/// Whether `value` is a well-formed version-00 `traceparent`.
pub fn is_valid(value: &str) -> bool {
    parse(value).is_some()
}

/// A new sampled `traceparent` with random trace and parent ids.
pub fn generate() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let parent = format!("{:016x}", fastrand::u64(1..));
    format!("00-{trace}-{parent}-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_traceparents_parse_and_nothing_else_does() {
        let parsed = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(
            parsed,
            Some(TraceParent {
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
                parent_id: "00f067aa0ba902b7",
                flags: 1,
            })
        );
        for bad in [
            "",
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "00-é4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            // Upper-case hex is not W3C's: the gateway and telemetry
            // both ignore it (they used to disagree).
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
        ] {
            assert!(parse(bad).is_none(), "{bad:?} parsed");
            assert!(!is_valid(bad), "{bad:?} valid");
        }
    }

    #[test]
    fn generated_traceparents_are_well_formed_and_sampled() {
        for _ in 0..100 {
            let made = generate();
            assert_eq!(parse(&made).map(|p| p.flags), Some(1), "{made}");
        }
    }
}
