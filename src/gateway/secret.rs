//! Comparing secrets (bearer tokens, progress tokens, signatures) without
//! telling by the answer's timing how much of a guess was right.

/// Equality whose time depends only on the lengths, not on where the bytes
/// differ (`subtle`'s constant-time comparison).
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(a, b))
}

/// The position of `presented` among `tokens` (`gateway.auth_tokens`):
/// compared with every token, each in constant time, so the timing says
/// nothing about which token or how much of it matched.
pub(super) fn token_position(tokens: &[String], presented: &str) -> Option<usize> {
    tokens.iter().enumerate().fold(None, |found, (i, token)| {
        if constant_time_eq(token.as_bytes(), presented.as_bytes()) {
            Some(i)
        } else {
            found
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn a_token_is_found_by_its_position() {
        let tokens = vec!["a".to_owned(), "bb".to_owned()];
        assert_eq!(token_position(&tokens, "bb"), Some(1));
        assert_eq!(token_position(&tokens, "b"), None);
        assert_eq!(token_position(&[], "a"), None);
    }
}
