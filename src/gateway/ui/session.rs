//! The dashboard's sessions and CSRF tokens, kept by no one: a session is
//! a cookie the gateway signed (HMAC-SHA256), a CSRF token is derived from
//! the session's nonce with the same key. So the gateway holds no session
//! table to bound. The key is derived from `gateway.auth_tokens`: every
//! replica with the same tokens signs alike (a load balancer may send a
//! browser to any of them), a restart keeps sessions, and changing the
//! tokens ends every session. Without tokens (the dashboard open to all)
//! it is derived from the cluster's address and the results topic, shared
//! by the replicas of one deployment: there a session grants nothing, it
//! only carries the CSRF token.
//!
//! Cookie: `conveyor_ui=<nonce>.<expires ms>.<token>.<mac hex>`,
//! `HttpOnly; SameSite=Strict; Path=/ui`, where `<token>` is `-`, or the
//! position in `gateway.auth_tokens` of the token the session signed in
//! with (named in the logs of its actions: who did it). With tokens set,
//! only a signed-in session sees pages; without tokens any session does
//! (one is made on first visit).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The cookie's name.
pub(super) const COOKIE: &str = "conveyor_ui";

/// How long a session lasts, in ms (12 hours).
pub(super) const SESSION_MS: i64 = 12 * 3600 * 1000;

/// The key sessions and CSRF tokens are signed with.
pub(crate) struct Keys {
    key: [u8; 32],
}

/// A session the gateway signed and that has not expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Session {
    /// Its random part (32 hex digits).
    pub nonce: String,
    /// When it ends, ms since the epoch.
    pub expires: i64,
    /// The position in `gateway.auth_tokens` of the token it signed in
    /// with; `None`: not signed in.
    pub token: Option<usize>,
}

impl Keys {
    /// The key of a gateway with `tokens` (`gateway.auth_tokens`), or,
    /// without tokens, of one whose deployment `open_material` names.
    pub(crate) fn derive(tokens: &[String], open_material: &str) -> Keys {
        use sha2::Digest;
        let mut hash = Sha256::new();
        hash.update(b"conveyor dashboard sessions v1\0");
        if tokens.is_empty() {
            hash.update(b"open\0");
            hash.update(open_material.as_bytes());
        } else {
            for token in tokens {
                hash.update(token.as_bytes());
                hash.update(b"\0");
            }
        }
        Keys {
            key: hash.finalize().into(),
        }
    }

    /// A key of its own (tests).
    #[cfg(test)]
    pub(crate) fn random() -> Keys {
        Keys::derive(&[uuid::Uuid::new_v4().to_string()], "")
    }

    fn mac(&self, parts: &[&str]) -> String {
        // An HMAC key may have any length: this cannot fail.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return String::new();
        };
        for part in parts {
            mac.update(part.as_bytes());
            mac.update(b"|");
        }
        hex::encode(mac.finalize().into_bytes())
    }

    /// A new session ending `SESSION_MS` after `now`.
    pub(super) fn new_session(&self, token: Option<usize>, now: i64) -> Session {
        Session {
            nonce: uuid::Uuid::new_v4().simple().to_string(),
            expires: now.saturating_add(SESSION_MS),
            token,
        }
    }

    /// The cookie's value for `session`.
    pub(super) fn cookie_value(&self, session: &Session) -> String {
        let expires = session.expires.to_string();
        let token = session
            .token
            .map_or_else(|| "-".to_owned(), |t| t.to_string());
        let mac = self.mac(&["session", &session.nonce, &expires, &token]);
        format!("{}.{expires}.{token}.{mac}", session.nonce)
    }

    /// The session a cookie value carries, if the gateway signed it and it
    /// has not expired at `now`.
    pub(super) fn session_of(&self, value: &str, now: i64) -> Option<Session> {
        let mut parts = value.split('.');
        let (nonce, expires, token, mac) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let expected = self.mac(&["session", nonce, expires, token]);
        if !super::super::secret::constant_time_eq(expected.as_bytes(), mac.as_bytes()) {
            return None;
        }
        let expires: i64 = expires.parse().ok()?;
        let token = match token {
            "-" => None,
            index => Some(index.parse().ok()?),
        };
        (expires > now).then(|| Session {
            nonce: nonce.to_owned(),
            expires,
            token,
        })
    }

    /// The CSRF token of `session`'s forms.
    pub(super) fn csrf(&self, session: &Session) -> String {
        self.mac(&["csrf", &session.nonce])
    }

    /// Whether `presented` is `session`'s CSRF token.
    pub(super) fn csrf_ok(&self, session: &Session, presented: &str) -> bool {
        super::super::secret::constant_time_eq(self.csrf(session).as_bytes(), presented.as_bytes())
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub(super) fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value)
    })
}

/// The `Set-Cookie` header for `value` (empty with `max_age` 0: removal).
pub(super) fn set_cookie(value: &str, max_age_s: i64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_good_until_it_expires_and_only_as_signed() {
        let keys = Keys::random();
        let session = keys.new_session(Some(1), 1_000);
        let value = keys.cookie_value(&session);
        assert_eq!(keys.session_of(&value, 2_000), Some(session.clone()));
        assert_eq!(keys.session_of(&value, 1_000 + SESSION_MS), None, "expired");
        // Claiming another token, no token, or a longer life breaks the
        // signature.
        for forged in [
            value.replacen(".1.", ".0.", 1),
            value.replacen(".1.", ".-.", 1),
        ] {
            assert_eq!(keys.session_of(&forged, 2_000), None);
        }
        let anonymous = keys.new_session(None, 1_000);
        assert_eq!(
            keys.session_of(&keys.cookie_value(&anonymous), 2_000),
            Some(anonymous)
        );
        let later = value.replacen(
            &session.expires.to_string(),
            &(session.expires + 1).to_string(),
            1,
        );
        assert_eq!(keys.session_of(&later, 2_000), None);
        // A gateway with other tokens does not know it.
        assert_eq!(Keys::random().session_of(&value, 2_000), None);
        for junk in ["", "a.b.c", "a.1.1.x.y", "x.notanumber.1.00", "x.5.-1.00"] {
            assert_eq!(keys.session_of(junk, 0), None, "{junk}");
        }
    }

    #[test]
    fn replicas_with_the_same_tokens_sign_alike_and_new_tokens_end_sessions() {
        let tokens = vec!["t1".to_owned(), "t2".to_owned()];
        let (a, b) = (Keys::derive(&tokens, "x"), Keys::derive(&tokens, "y"));
        let session = a.new_session(Some(0), 0);
        let value = a.cookie_value(&session);
        assert_eq!(
            b.session_of(&value, 1),
            Some(session.clone()),
            "another replica"
        );
        assert_eq!(b.csrf(&session), a.csrf(&session));
        let rotated = Keys::derive(&["t1".to_owned(), "t3".to_owned()], "x");
        assert_eq!(rotated.session_of(&value, 1), None, "tokens changed");
        // Without tokens: the deployment's material decides.
        let open = Keys::derive(&[], "brokers|results");
        let session = open.new_session(None, 0);
        let value = open.cookie_value(&session);
        assert!(Keys::derive(&[], "brokers|results")
            .session_of(&value, 1)
            .is_some());
        assert!(Keys::derive(&[], "other|results")
            .session_of(&value, 1)
            .is_none());
        assert!(Keys::derive(&["brokers|results".to_owned()], "")
            .session_of(&value, 1)
            .is_none());
    }

    #[test]
    fn csrf_tokens_belong_to_one_session() {
        let keys = Keys::random();
        let (a, b) = (keys.new_session(None, 0), keys.new_session(None, 0));
        let token = keys.csrf(&a);
        assert!(keys.csrf_ok(&a, &token));
        assert!(!keys.csrf_ok(&b, &token));
        assert!(!keys.csrf_ok(&a, ""));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let header = "other=1; conveyor_ui=abc.1.0.ff; x=y";
        assert_eq!(cookie(header, COOKIE), Some("abc.1.0.ff"));
        assert_eq!(cookie("conveyor_uix=1", COOKIE), None);
        assert!(set_cookie("v", 10, true).contains("HttpOnly; SameSite=Strict"));
    }
}
