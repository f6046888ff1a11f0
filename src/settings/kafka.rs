//! `[kafka]` (brokers, client id, prefetch budget, options, security) and
//! `[codec]` (the wire format), with their checks.

use super::*;

/// librdkafka properties that hold secrets: printed as `***`.
pub(super) const SECRET_OPTIONS: &[&str] = &[
    "sasl.password",
    "ssl.key.password",
    "ssl.keystore.password",
    "sasl.oauthbearer.client.secret",
];

/// librdkafka properties that conveyor sets itself because its guarantees
/// depend on them, with the key that controls each instead.
pub(super) const MANAGED_KAFKA_OPTIONS: &[(&str, &str)] = &[
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("group.id", "set processors[].group_id instead"),
    (
        "session.timeout.ms",
        "set processors[].session_timeout_ms instead (the drain deadline is checked against it)",
    ),
    (
        "enable.auto.offset.store",
        "conveyor stores an offset only after the task's outputs are acknowledged",
    ),
    (
        "enable.idempotence",
        "conveyor's producers are always idempotent (at-least-once without reordering)",
    ),
    ("acks", "conveyor's producers always use acks=all"),
];

/// `[kafka]`: the cluster and client options.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Bootstrap brokers, comma-separated `host:port`.
    pub brokers: String,
    /// Prefix of each client's `client.id`; the worker adds the host name and
    /// process id, which also identify it in results (`worker`).
    pub client_id: String,
    /// Passed unchanged to librdkafka after conveyor's own defaults and
    /// `[kafka.security]`, so it can override them (`fetch.queue.backoff.ms`,
    /// any security property the typed section lacks, …). The few
    /// properties conveyor's guarantees depend on are refused here.
    pub options: BTreeMap<String, String>,
    /// TLS and SASL, for every client of the process.
    pub security: crate::security::SecuritySettings,
    /// Bytes of records a worker process lets librdkafka fetch ahead of its
    /// processors (64 MiB). Split evenly between the processors, and each
    /// share evenly over the partitions of the topics the processor reads
    /// (the most it could be assigned): a worker's prefetch stays within
    /// about twice this (see `kafka::prefetch_limits`) however many
    /// partitions it owns. `[kafka.options]` `queued.max.messages.kbytes`,
    /// `queued.min.messages` or `max.partition.fetch.bytes` override it.
    pub prefetch_bytes: u64,
    /// Characters of progress metadata each commit may carry per partition
    /// (the finished offsets above the committed one, so that a restart
    /// after a crash skips them; 4000 by default, under the brokers'
    /// default `offset.metadata.max.bytes` of 4096). 0 turns it off (every
    /// record above the committed offset runs again after a crash). A
    /// broker that refuses it as too large halves it for that partition,
    /// down to none, and the commit goes through with less.
    pub commit_metadata_bytes: usize,
}

/// Default of `kafka.prefetch_bytes`: 64 MiB.
pub const DEFAULT_PREFETCH_BYTES: u64 = 64 * 1024 * 1024;

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: "127.0.0.1:9092".into(),
            client_id: "conveyor".into(),
            options: BTreeMap::new(),
            security: crate::security::SecuritySettings::default(),
            prefetch_bytes: DEFAULT_PREFETCH_BYTES,
            commit_metadata_bytes: crate::progress::MAX_METADATA,
        }
    }
}

/// `[codec]`: the wire format of task records.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodecSettings {
    /// `avro` (bare Avro binary) or `confluent` (magic byte and schema id
    /// first, for Schema Registry tooling). Both are always accepted on input.
    pub wire_format: WireFormatName,
    /// Schema Registry id of `schemas/task_request.avsc`; required with
    /// `confluent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_schema_id: Option<u32>,
    /// Schema Registry id of `schemas/task_result.avsc`; required with
    /// `confluent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_schema_id: Option<u32>,
}

/// Name of a wire format in the configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WireFormatName {
    /// Bare Avro binary.
    #[default]
    Avro,
    /// Confluent wire format.
    Confluent,
}

impl CodecSettings {
    /// The codec writing this wire format; `None` if the settings are
    /// incomplete (which [`Settings::validate`] reports).
    pub fn codec(&self) -> Option<crate::codec::Codec> {
        self.wire_format().map(crate::codec::Codec::new)
    }

    /// The wire format to write; `None` if the settings are incomplete (which
    /// [`Settings::validate`] reports).
    pub fn wire_format(&self) -> Option<WireFormat> {
        match self.wire_format {
            WireFormatName::Avro => Some(WireFormat::Plain),
            WireFormatName::Confluent => Some(WireFormat::Confluent {
                request_schema_id: self.request_schema_id?,
                result_schema_id: self.result_schema_id?,
            }),
        }
    }
}

pub(super) fn looks_like_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

impl KafkaSettings {
    /// The problems of `[kafka]`, its security included.
    pub(super) fn validate(&self, bad: &mut impl FnMut(String, &str)) {
        if self.brokers.trim().is_empty() {
            bad("kafka.brokers".into(), "must name at least one host:port");
        }
        for broker in self.brokers.split(',').map(str::trim) {
            if !broker.is_empty() && !looks_like_host_port(broker) {
                bad(
                    "kafka.brokers".into(),
                    &format!("`{broker}` is not host:port"),
                );
            }
        }
        if self.client_id.trim().is_empty() {
            bad("kafka.client_id".into(), "must not be empty");
        }
        if self.prefetch_bytes < 1024 * 1024 {
            bad(
                "kafka.prefetch_bytes".into(),
                "must be at least 1048576 (1 MiB)",
            );
        }
        if self.commit_metadata_bytes != 0
            && !(crate::progress::MIN_METADATA..=crate::progress::MAX_METADATA * 256)
                .contains(&self.commit_metadata_bytes)
        {
            bad(
                "kafka.commit_metadata_bytes".into(),
                &format!(
                    "must be 0 (no progress metadata) or from {} to {}",
                    crate::progress::MIN_METADATA,
                    crate::progress::MAX_METADATA * 256
                ),
            );
        }
        for (option, why) in MANAGED_KAFKA_OPTIONS {
            if self.options.contains_key(*option) {
                bad(
                    format!("kafka.options.\"{option}\""),
                    &format!("managed by conveyor: {why}"),
                );
            }
        }

        for (key, message) in self.security.problems() {
            bad(key, &message);
        }
    }
}

impl CodecSettings {
    /// The problems of `[codec]`.
    pub(super) fn validate(&self, bad: &mut impl FnMut(String, &str)) {
        match self.wire_format {
            WireFormatName::Confluent => {
                if self.request_schema_id.is_none() {
                    bad(
                        "codec.request_schema_id".into(),
                        "required when codec.wire_format = \"confluent\"",
                    );
                }
                if self.result_schema_id.is_none() {
                    bad(
                        "codec.result_schema_id".into(),
                        "required when codec.wire_format = \"confluent\"",
                    );
                }
            }
            WireFormatName::Avro => {
                for (key, value) in [
                    ("codec.request_schema_id", self.request_schema_id),
                    ("codec.result_schema_id", self.result_schema_id),
                ] {
                    if value.is_some() {
                        bad(
                            key.into(),
                            "only used with codec.wire_format = \"confluent\"",
                        );
                    }
                }
            }
        }
    }
}
