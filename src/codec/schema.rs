//! The `.avsc` contracts, embedded at build time from `schemas/`.
//!
//! These texts are what other producers and consumers (and a Schema
//! Registry) are given; the hand-written codec in this module's parent
//! follows them field by field, and `tests/codec_interop.rs` holds it to
//! them with `apache-avro`.

/// `schemas/task_request.avsc`.
pub const TASK_REQUEST_AVSC: &str = include_str!("../../schemas/task_request.avsc");

/// `schemas/task_result.avsc`.
pub const TASK_RESULT_AVSC: &str = include_str!("../../schemas/task_result.avsc");

/// `schemas/task_event.avsc`.
pub const TASK_EVENT_AVSC: &str = include_str!("../../schemas/task_event.avsc");

/// `schemas/task_control.avsc`.
pub const TASK_CONTROL_AVSC: &str = include_str!("../../schemas/task_control.avsc");

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::schema::Schema;

    fn task_request_schema() -> Result<Schema, apache_avro::Error> {
        Schema::parse_str(TASK_REQUEST_AVSC)
    }

    fn task_result_schema() -> Result<Schema, apache_avro::Error> {
        Schema::parse_str(TASK_RESULT_AVSC)
    }

    fn field_names(schema: &Schema) -> Vec<String> {
        match schema {
            Schema::Record(record) => record.fields.iter().map(|f| f.name.clone()).collect(),
            other => panic!("expected a record schema, got {other:?}"),
        }
    }

    #[test]
    fn schemas_parse_and_every_field_is_documented() {
        for (text, schema) in [
            (TASK_REQUEST_AVSC, task_request_schema()),
            (TASK_RESULT_AVSC, task_result_schema()),
            (TASK_EVENT_AVSC, Schema::parse_str(TASK_EVENT_AVSC)),
            (TASK_CONTROL_AVSC, Schema::parse_str(TASK_CONTROL_AVSC)),
        ] {
            let schema = schema.expect("embedded schema parses");
            assert!(!field_names(&schema).is_empty());
            // apache-avro keeps `doc`s on record fields; check them all,
            // nested records included, on the JSON itself.
            let json: serde_json::Value = serde_json::from_str(text).expect("schema is JSON");
            let mut missing = Vec::new();
            collect_undocumented(&json, "", &mut missing);
            assert!(missing.is_empty(), "fields without a doc: {missing:?}");
        }
    }

    fn collect_undocumented(node: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
        match node {
            serde_json::Value::Object(map) => {
                let named = map.get("name").and_then(|n| n.as_str()).unwrap_or("");
                let here = if named.is_empty() {
                    path.to_owned()
                } else {
                    format!("{path}/{named}")
                };
                if map.contains_key("type") && !named.is_empty() && !map.contains_key("doc") {
                    missing.push(here.clone());
                }
                for value in map.values() {
                    collect_undocumented(value, &here, missing);
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    collect_undocumented(item, path, missing);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn field_order_is_what_the_codec_writes() {
        let request = task_request_schema().unwrap();
        assert_eq!(
            field_names(&request),
            [
                "id",
                "type",
                "key",
                "payload",
                "content_type",
                "attempt",
                "submitted_at",
                "deadline",
                "workflow",
                "metadata"
            ]
        );
        let result = task_result_schema().unwrap();
        assert_eq!(
            field_names(&result),
            [
                "id",
                "type",
                "status",
                "output",
                "content_type",
                "error",
                "attempts",
                "started_at",
                "finished_at",
                "worker",
                "workflow"
            ]
        );
    }
}
