//! Records as JSON for people and HTTP clients: an output embedded as
//! JSON when its content type says JSON and it parses, as text when it is
//! UTF-8, else as standard base64 (RFC 4648) under `<name>_base64`. One
//! rendering for the gateway's answers, `conveyor results` and `conveyor
//! dlq`.

use base64::Engine;
use serde_json::{json, Map, Value};

/// Inserts `bytes` into `map` under `name` (see the module's rules).
pub fn embed_bytes(map: &mut Map<String, Value>, name: &str, bytes: &[u8], content_type: &str) {
    let as_json = content_type
        .contains("json")
        .then(|| serde_json::from_slice::<Value>(bytes).ok())
        .flatten();
    match (as_json, std::str::from_utf8(bytes)) {
        (Some(parsed), _) => map.insert(name.into(), parsed),
        (None, Ok(text)) => map.insert(name.into(), json!(text)),
        (None, Err(_)) => map.insert(
            format!("{name}_base64"),
            json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedded(bytes: &[u8], content_type: &str) -> Value {
        let mut map = Map::new();
        embed_bytes(&mut map, "output", bytes, content_type);
        Value::Object(map)
    }

    #[test]
    fn json_then_text_then_base64() {
        assert_eq!(
            embedded(br#"{"a": 1}"#, "application/json"),
            json!({"output": {"a": 1}})
        );
        // JSON content that does not parse is shown as the text it is.
        assert_eq!(
            embedded(b"{not json", "application/json"),
            json!({"output": "{not json"})
        );
        assert_eq!(embedded(b"plain", "text/plain"), json!({"output": "plain"}));
        // RFC 4648 vectors, through the base64 crate.
        for (input, expected) in [
            (&b"\xff"[..], "/w=="),
            (&b"\xff\xfe"[..], "//4="),
            (&b"\xff\xfe\xfd"[..], "//79"),
        ] {
            assert_eq!(
                embedded(input, "application/octet-stream"),
                json!({"output_base64": expected})
            );
        }
    }
}
