//! The configuration tree: every key conveyor reads, its default, and the
//! checks it must pass before anything starts.
//!
//! Layers, later ones winning: the defaults written on these structs → the
//! TOML file given with `--config` → environment variables
//! `CONVEYOR__<SECTION>__<KEY>` (for example `CONVEYOR__KAFKA__BROKERS`).
//! Unknown keys are errors, not silently ignored, so a typo cannot quietly
//! fall back to a default. Durations are whole milliseconds in keys ending
//! in `_ms`. `conveyor.example.toml` documents every key; these `///` docs
//! are the same text for library users.
//!
//! [`Settings::load`] deserializes, fills the defaults that depend on other
//! keys (a processor's group id, input and output topics), then runs
//! [`Settings::validate`], which reports *every* problem found, each naming
//! its key, such as `processors[1].max_in_flight: must be > 0`.
//!
//! One file a section, each with its types and its checks: `kafka.rs`
//! (`[kafka]`, `[codec]`), `processor.rs` (`[[processors]]`), `workflow.rs`,
//! `gateway.rs`, `topics.rs`, `observe.rs` (`[log]`, `[metrics]`,
//! `[otlp]`); this file holds the whole tree, loading and the list of
//! problems.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerConfig;
use crate::codec::WireFormat;
use crate::retry::RetryPolicy;

mod delays;
mod gateway;
mod kafka;
mod lifecycle;
mod observe;
mod processor;
mod schedules;
mod topics;
mod workflow;

pub use delays::*;
pub use gateway::*;
pub use kafka::*;
pub use lifecycle::*;
pub use observe::*;
pub use processor::*;
pub use schedules::*;
pub use topics::*;
pub use workflow::*;

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "CONVEYOR";
/// Separator between the prefix, sections and keys in those variables.
pub const ENV_SEPARATOR: &str = "__";

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Connection to the Kafka cluster, shared by every client.
    pub kafka: KafkaSettings,
    /// How task records are framed on the wire.
    pub codec: CodecSettings,
    /// Log level and format.
    pub log: LogSettings,
    /// Default topic names.
    pub topics: TopicSettings,
    /// The Prometheus endpoint.
    pub metrics: MetricsSettings,
    /// Span export over OpenTelemetry's OTLP.
    pub otlp: OtlpSettings,
    /// The HTTP gateway.
    pub gateway: GatewaySettings,
    /// The processors a worker runs, each its own consumer-group member.
    pub processors: Vec<ProcessorSettings>,
    /// Workflow definitions: named sequences of steps (task types), with
    /// fan-out and join.
    pub workflows: Vec<WorkflowSettings>,
    /// Delayed tasks: the tier topics they wait in.
    pub delays: DelaySettings,
    /// Periodic tasks, fired on cron schedules (`[[schedules]]`).
    pub schedules: Vec<ScheduleSettings>,
    /// How the workers share the firing of the schedules.
    pub scheduler: SchedulerSettings,
    /// The task events topic (started, progress, retrying, cancelled).
    pub events: EventSettings,
    /// Cancellations: the control topic every worker reads.
    pub cancel: CancelSettings,
    /// Worker reports: the topic every worker reports itself to.
    pub workers: WorkerSettings,
}

impl Settings {
    /// The task types the gateway accepts and the topic each is produced
    /// to: every processor's types (to its input topic named after the type,
    /// or its only input topic), then `gateway.task_types`.
    pub fn gateway_task_topics(&self) -> BTreeMap<String, String> {
        let mut topics = self.task_topics();
        for task_type in &self.gateway.task_types {
            topics
                .entry(task_type.clone())
                .or_insert_with(|| self.topics.task_topic(task_type));
        }
        topics
    }

    /// The topic each task type of the processors is read from (the first
    /// processor handling a type decides).
    pub fn task_topics(&self) -> BTreeMap<String, String> {
        let mut topics = BTreeMap::new();
        for p in &self.processors {
            for task_type in p.tasks.keys() {
                let default = self.topics.task_topic(task_type);
                let topic = match p.input_topics.as_slice() {
                    [only] if !p.input_topics.contains(&default) => only.clone(),
                    _ => default,
                };
                topics.entry(task_type.clone()).or_insert(topic);
            }
        }
        topics
    }
}

/// One problem found in the configuration: the key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the key, with list indices: `processors[1].max_in_flight`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The file could not be read or parsed.
    #[error("cannot read configuration: {0}")]
    Read(String),
    /// A key is unknown or has a value of the wrong type.
    #[error("{0}")]
    Parse(Problem),
    /// Values that parse but cannot work, every one found.
    #[error("invalid configuration:\n{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

impl SettingsError {
    /// Every problem with its key, one per entry.
    pub fn problems(&self) -> Vec<String> {
        match self {
            SettingsError::Read(message) => vec![message.clone()],
            SettingsError::Parse(problem) => vec![problem.to_string()],
            SettingsError::Invalid(problems) => problems.iter().map(Problem::to_string).collect(),
        }
    }
}

fn display_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Settings {
    /// Loads defaults → `file` (if any) → the environment, fills derived
    /// defaults and validates.
    pub fn load(file: Option<&Path>) -> Result<Settings, SettingsError> {
        Self::load_from(file, std::env::vars())
    }

    /// [`Settings::load`] with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, SettingsError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(SettingsError::Read(format!(
                    "{}: no such file",
                    path.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}")))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .source(Some(env)),
        );
        let layered = builder
            .build()
            .map_err(|e| SettingsError::Read(e.to_string()))?;
        let mut settings: Settings = serde_path_to_error::deserialize(layered).map_err(|e| {
            let key = e.path().to_string();
            let mut message = e.into_inner().to_string();
            // The config crate appends the enclosing key, which the path
            // already names more precisely.
            if let Some(at) = message.rfind(" for key `") {
                message.truncate(at);
            }
            SettingsError::Parse(Problem {
                key: if key == "." { "<root>".into() } else { key },
                message,
            })
        })?;
        settings
            .kafka
            .security
            .read_secret_files()
            .map_err(|(key, message)| SettingsError::Invalid(vec![Problem { key, message }]))?;
        settings
            .gateway
            .read_token_file()
            .map_err(|(key, message)| SettingsError::Invalid(vec![Problem { key, message }]))?;
        settings.fill_derived();
        settings.validate().map_err(SettingsError::Invalid)?;
        Ok(settings)
    }

    /// These settings with every secret shown as `***` (for printing).
    pub fn redacted(&self) -> Settings {
        let mut s = self.clone();
        s.kafka.security = s.kafka.security.redacted();
        for token in &mut s.gateway.auth_tokens {
            *token = "***".into();
        }
        for (key, value) in &mut s.kafka.options {
            if SECRET_OPTIONS.contains(&key.as_str()) && !value.is_empty() {
                *value = "***".into();
            }
        }
        s
    }

    /// Fills the defaults that depend on other keys, so the effective
    /// configuration is explicit.
    pub fn fill_derived(&mut self) {
        for p in &mut self.processors {
            if p.group_id.is_none() && !p.name.is_empty() {
                p.group_id = Some(format!("conveyor.{}", p.name));
            }
            if p.input_topics.is_empty() {
                p.input_topics = p.tasks.keys().map(|t| self.topics.task_topic(t)).collect();
            }
            if p.output_topic.is_none() {
                p.output_topic = Some(self.topics.results.clone());
            }
            if p.dead_letter_topic.is_none() {
                p.dead_letter_topic = Some(self.topics.dead_letter.clone());
            }
        }
    }

    /// Every problem with the values, each naming its key. Empty means usable.
    /// What is allowed but likely a mistake, each naming its key: a
    /// processor whose `drain_timeout_ms` is shorter than its slowest
    /// handler's `timeout_ms` (a task started just before a shutdown is
    /// cut off by the drain and runs again on another worker).
    pub fn warnings(&self) -> Vec<String> {
        let mut found = Vec::new();
        for (i, p) in self.processors.iter().enumerate() {
            let slowest = p.tasks.iter().max_by_key(|(_, t)| t.timeout_ms);
            if let Some((task_type, t)) = slowest {
                if t.timeout_ms > p.drain_timeout_ms {
                    found.push(format!(
                        "processors[{i}].drain_timeout_ms: {} is below the slowest handler's \
                         timeout_ms ({}, tasks.{task_type}): a task started just before a \
                         shutdown is cut off by the drain and runs again on another worker",
                        p.drain_timeout_ms, t.timeout_ms
                    ));
                }
            }
        }
        found
    }

    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let mut bad = |key: String, message: &str| {
            problems.push(Problem {
                key,
                message: message.to_owned(),
            })
        };

        self.kafka.validate(&mut bad);
        self.codec.validate(&mut bad);
        self.validate_telemetry(&mut bad);
        self.validate_gateway(&mut bad);
        self.validate_topics(&mut bad);
        self.delays.validate(&mut bad);
        self.events.validate(&mut bad);
        self.cancel.validate(&mut bad);
        self.workers.validate(&mut bad);
        self.validate_schedules(&mut bad);
        self.validate_workflows(&mut bad);
        let mut names = BTreeMap::new();
        for (i, p) in self.processors.iter().enumerate() {
            let at = |key: &str| format!("processors[{i}].{key}");
            if p.name.is_empty() {
                bad(at("name"), "required");
            } else if !p
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                bad(at("name"), "use only letters, digits, `_` and `-`");
            } else if let Some(first) = names.insert(p.name.as_str(), i) {
                bad(
                    at("name"),
                    &format!("`{}` is also the name of processors[{first}]", p.name),
                );
            }
            p.validate(i, self.metrics.poll_stall_ms, &mut bad);
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The effective configuration as TOML, for `conveyor config check`.
    pub fn to_toml(&self) -> Result<String, SettingsError> {
        toml::to_string_pretty(self).map_err(|e| SettingsError::Read(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_toml(text: &str) -> Result<Settings, SettingsError> {
        load_toml_env(text, &[])
    }

    fn load_toml_env(text: &str, env: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let mut file = tempfile();
        file.1.write_all(text.as_bytes()).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let result = Settings::load_from(Some(&file.0), env);
        let _ = std::fs::remove_file(&file.0);
        result
    }

    fn tempfile() -> (std::path::PathBuf, std::fs::File) {
        let path =
            std::env::temp_dir().join(format!("conveyor-test-{}.toml", uuid::Uuid::new_v4()));
        let file = std::fs::File::create(&path).unwrap();
        (path, file)
    }

    fn problems(result: Result<Settings, SettingsError>) -> Vec<String> {
        result
            .expect_err("configuration should be refused")
            .problems()
    }

    const ONE_PROCESSOR: &str = r#"
        [[processors]]
        name = "main"
        [processors.tasks.echo]
        handler = "echo"
    "#;

    #[test]
    fn the_prefetch_budget_is_at_least_one_mib() {
        let e = load_toml("[kafka]\nprefetch_bytes = 1048575\n").expect_err("under 1 MiB");
        assert!(
            e.to_string()
                .contains("kafka.prefetch_bytes: must be at least 1048576 (1 MiB)"),
            "{e}"
        );
        let s = load_toml("[kafka]\nprefetch_bytes = 1048576\n").expect("1 MiB");
        assert_eq!(s.kafka.prefetch_bytes, 1_048_576);
        assert_eq!(
            Settings::default().kafka.prefetch_bytes,
            DEFAULT_PREFETCH_BYTES
        );
    }

    #[test]
    fn handlers_are_built_ins_or_names_a_program_registers() {
        let toml = |handler: &str| {
            format!("[[processors]]\nname = \"p\"\n[processors.tasks.t]\nhandler = \"{handler}\"\n")
        };
        let s = load_toml(&toml("split_lines")).expect("built-in");
        assert_eq!(s.processors[0].tasks["t"].handler, HandlerKind::SplitLines);
        let s = load_toml(&toml("resize_image")).expect("a registered name");
        assert_eq!(
            s.processors[0].tasks["t"].handler,
            HandlerKind::Custom("resize_image".into())
        );
        assert_eq!(s.processors[0].tasks["t"].handler.name(), "resize_image");
        let e = load_toml(&toml("two words")).expect_err("not a name");
        assert!(
            e.to_string()
                .contains("processors[0].tasks.t.handler: `two words` is not a handler name"),
            "{e}"
        );
        for name in HandlerKind::BUILT_IN {
            let mut text = toml(name);
            if *name == "http" {
                text.push_str("url = \"http://127.0.0.1:1/t\"\n");
            }
            let s = load_toml(&text).expect("built-in");
            let kind = &s.processors[0].tasks["t"].handler;
            assert!(!matches!(kind, HandlerKind::Custom(_)), "{name}");
            assert_eq!(kind.name(), *name);
        }
    }

    #[test]
    fn defaults_alone_are_valid() {
        let settings = Settings::load_from(None, Vec::new()).unwrap();
        assert_eq!(settings, Settings::default());
    }

    #[test]
    fn derived_defaults_are_filled() {
        let s = load_toml(ONE_PROCESSOR).unwrap();
        let p = &s.processors[0];
        assert_eq!(p.group_id.as_deref(), Some("conveyor.main"));
        assert_eq!(p.input_topics, ["conveyor.tasks.echo"]);
        assert_eq!(p.output_topic.as_deref(), Some("conveyor.results"));
        assert_eq!(p.dead_letter_topic.as_deref(), Some("conveyor.dlq"));
        assert_eq!(p.ordering, Ordering::Key);
        // 60 s max backoff ≥ 5 s threshold: retry topics are in use.
        assert!(p.uses_retry_topics());
        assert_eq!(
            p.retry_topic("conveyor.tasks.echo"),
            "conveyor.tasks.echo.retry"
        );
    }

    #[test]
    fn typo_names_the_key_with_its_path() {
        let text = format!("{ONE_PROCESSOR}\n[[processors]]\nname = \"b\"\nmax_in_fligth = 3\n");
        let found = problems(load_toml(&text));
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with(
                "processors[1].max_in_fligth: unknown field `max_in_fligth`, expected one of `name`,"
            ),
            "{found:?}"
        );
    }

    #[test]
    fn zero_max_in_flight_names_the_key() {
        let text = format!("{ONE_PROCESSOR}\n[[processors]]\nname = \"b\"\nmax_in_flight = 0\n[processors.tasks.echo]\nhandler = \"echo\"\n");
        let found = problems(load_toml(&text));
        assert_eq!(found, ["processors[1].max_in_flight: must be > 0"]);
    }

    const WORKFLOW_PROCESSOR: &str = r#"
        [[processors]]
        name = "main"
        [processors.tasks.split]
        handler = "echo"
        [processors.tasks.count]
        handler = "echo"
        [processors.tasks.sum]
        handler = "echo"
    "#;

    fn workflow(steps: &str) -> Result<Settings, SettingsError> {
        load_toml(&format!(
            "{WORKFLOW_PROCESSOR}\n[[workflows]]\nname = \"wc\"\nsteps = [{steps}]\n"
        ))
    }

    #[test]
    fn a_well_formed_workflow_is_accepted() {
        let s = workflow(
            r#"{ task = "split", fan_out = true }, { task = "count" }, { task = "count" }, { task = "sum", join = true }, { task = "count" }"#,
        )
        .unwrap();
        assert_eq!(s.workflows[0].steps.len(), 5);
        assert!(s.workflows[0].steps[0].fan_out);
        assert!(s.workflows[0].steps[3].join);
        assert_eq!(s.workflows[0].timeout_ms, 0);
    }

    #[test]
    fn bad_workflows_name_the_workflow_and_step() {
        let cases = [
            ("", "workflows[0] (wc).steps: must list at least one step"),
            (
                r#"{ task = "split" }, { task = "resize" }"#,
                "workflows[0] (wc).steps[1].task: unknown task type `resize`: no [[processors]] entry handles it",
            ),
            (
                r#"{ task = "count" }, { task = "sum", join = true }"#,
                "workflows[0] (wc).steps[1].join: a join needs a fan_out step before it (with no join between)",
            ),
            (
                r#"{ task = "split", fan_out = true }, { task = "sum", join = true }"#,
                "workflows[0] (wc).steps[1].join: needs at least one step for the children between it and the fan_out at steps[0]",
            ),
            (
                r#"{ task = "split", fan_out = true }, { task = "count" }"#,
                "workflows[0] (wc).steps[0].fan_out: a fan_out must be followed by a join step",
            ),
            (
                r#"{ task = "split", fan_out = true }, { task = "split", fan_out = true }, { task = "count" }, { task = "sum", join = true }"#,
                "workflows[0] (wc).steps[1].fan_out: steps[0] fans out already and is not joined yet; nested fan-outs are not supported",
            ),
            (
                r#"{ task = "split", fan_out = true, join = true }"#,
                "workflows[0] (wc).steps[0]: cannot be both fan_out and join",
            ),
        ];
        for (steps, expected) in cases {
            let found = problems(workflow(steps));
            assert_eq!(found, [expected], "steps = [{steps}]");
        }
        let twice = format!(
            "{WORKFLOW_PROCESSOR}\n[[workflows]]\nname = \"a\"\nsteps = [{{ task = \"sum\" }}]\n[[workflows]]\nname = \"a\"\nsteps = [{{ task = \"sum\" }}]\n"
        );
        assert_eq!(
            problems(load_toml(&twice)),
            ["workflows[1].name: `a` is defined twice"]
        );
    }

    #[test]
    fn otlp_export_settings_are_checked() {
        let found = problems(load_toml(
            "[otlp]\nendpoint = \"collector:4318\"\nservice_name = \" \"\ntimeout_ms = 0\n",
        ));
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].starts_with("otlp.endpoint: must be an http:// or https:// URL"));
        assert!(found[1].starts_with("otlp.service_name: must not be empty"));
        assert!(found[2].starts_with("otlp.timeout_ms: must be at least 1"));
        let s = load_toml("[otlp]\nendpoint = \"http://127.0.0.1:4318/v1/traces\"\n").unwrap();
        assert_eq!(s.otlp.endpoint, "http://127.0.0.1:4318/v1/traces");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let found = problems(load_toml(
            "[kafka]\nbrokers = 5\n[codec]\nwire_format = \"xml\"\n",
        ));
        // The first error stops deserialization; it names its key.
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("codec.wire_format: "), "{found:?}");
        assert!(found[0].contains("xml"), "{found:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [kafka]
            brokers = "nohost"
            [kafka.options]
            "enable.auto.offset.store" = "true"
            [codec]
            wire_format = "confluent"
            [[processors]]
            name = "a"
            session_timeout_ms = 6000
            drain_timeout_ms = 6000
            [processors.tasks.web]
            handler = "http"
        "#;
        let found = problems(load_toml(text));
        assert_eq!(
            found,
            [
                "kafka.brokers: `nohost` is not host:port",
                "kafka.options.\"enable.auto.offset.store\": managed by conveyor: conveyor stores an offset only after the task's outputs are acknowledged",
                "codec.request_schema_id: required when codec.wire_format = \"confluent\"",
                "codec.result_schema_id: required when codec.wire_format = \"confluent\"",
                "processors[0].tasks.web.url: required by the http handler",
                "processors[0].drain_timeout_ms: must be below session_timeout_ms (6000), or the group evicts this member while it drains",
            ]
        );
    }

    #[test]
    fn a_drain_shorter_than_the_slowest_handler_is_warned_of() {
        let text = r#"
            [[processors]]
            name = "a"
            drain_timeout_ms = 20000
            session_timeout_ms = 45000
            [processors.tasks.quick]
            handler = "echo"
            timeout_ms = 1000
            [processors.tasks.slow]
            handler = "sleep"
            timeout_ms = 30000
        "#;
        let s = load_toml(text).unwrap();
        assert_eq!(
            s.warnings(),
            ["processors[0].drain_timeout_ms: 20000 is below the slowest handler's timeout_ms (30000, tasks.slow): a task started just before a shutdown is cut off by the drain and runs again on another worker"]
        );
        let s = load_toml(&text.replace("20000", "30000")).unwrap();
        assert!(s.warnings().is_empty());
    }

    #[test]
    fn gateway_tokens_come_from_a_file_and_are_never_printed() {
        let dir = std::env::temp_dir().join(format!("conveyor-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(
            &path,
            "# the web app\nfirst-token-of-the-tests\n\nsecond-token-of-the-tests\n",
        )
        .unwrap();
        let text = format!(
            "[gateway]\nauth_tokens_file = {:?}\n",
            path.display().to_string()
        );
        let s = load_toml(&text).unwrap();
        assert_eq!(
            s.gateway.auth_tokens,
            ["first-token-of-the-tests", "second-token-of-the-tests"]
        );
        let shown = s.redacted().to_toml().unwrap();
        assert!(!shown.contains("token-of-the-tests"), "{shown}");
        std::fs::write(&path, "short\n").unwrap();
        let error = problems(load_toml(&text));
        assert_eq!(error.len(), 1);
        assert!(
            error[0].starts_with("gateway.auth_tokens_file: "),
            "{error:?}"
        );
        assert!(
            error[0].contains("line 1") && !error[0].contains("short\n"),
            "{error:?}"
        );
        let both = format!("{text}auth_tokens = [\"first-token-of-the-tests\"]\n");
        assert!(problems(load_toml(&both))[0].contains("not both"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn signing_secrets_are_for_http_handlers_from_one_source() {
        let text = r#"
            [[processors]]
            name = "a"
            [processors.tasks.web]
            handler = "http"
            url = "http://127.0.0.1:1/t"
            signing_secret_env = "HOOK_SECRET"
            signing_secret_file = "/run/secrets/hook"
            [processors.tasks.local]
            handler = "echo"
            signing_secret_env = "HOOK_SECRET"
            [processors.tasks.odd]
            handler = "http"
            url = "http://127.0.0.1:1/t"
            signing_secret_env = "A=B"
        "#;
        assert_eq!(
            problems(load_toml(text)),
            [
                "processors[0].tasks.local.signing_secret_env: only used by the http handler",
                "processors[0].tasks.odd.signing_secret_env: must name an environment variable",
                "processors[0].tasks.web.signing_secret_file: set signing_secret_env or signing_secret_file, not both",
            ]
        );
    }

    #[test]
    fn a_signing_secret_is_read_when_the_handler_is_built_and_never_quoted() {
        let dir = std::env::temp_dir().join(format!("conveyor-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "tiny\n").unwrap();
        let mut task = TaskSettings::new(HandlerKind::Http);
        task.signing_secret_file = Some(path.display().to_string());
        let error = crate::handlers::http_secrets(&task).unwrap_err();
        assert!(error.starts_with("signing_secret_file: "), "{error}");
        assert!(error.contains("shorter than 16 bytes"), "{error}");
        assert!(!error.contains("tiny"), "{error}");
        std::fs::write(&path, "a-secret-of-enough-length\n").unwrap();
        assert!(crate::handlers::http_secrets(&task).unwrap().is_some());
        task.signing_secret_file = Some(dir.join("absent").display().to_string());
        std::fs::remove_dir_all(&dir).unwrap();
        let error = crate::handlers::http_secrets(&task).unwrap_err();
        assert!(error.contains("cannot read"), "{error}");
        task.signing_secret_file = None;
        task.signing_secret_env = Some("CONVEYOR_TEST_NO_SUCH_SECRET_VARIABLE".into());
        let error = crate::handlers::http_secrets(&task).unwrap_err();
        assert!(
            error.contains("CONVEYOR_TEST_NO_SUCH_SECRET_VARIABLE"),
            "{error}"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let s = load_toml_env(
            "[kafka]\nbrokers = \"a:1\"\n",
            &[
                ("CONVEYOR__KAFKA__BROKERS", "b:2"),
                ("CONVEYOR__LOG__FORMAT", "json"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(s.kafka.brokers, "b:2");
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn environment_typo_is_refused() {
        let found = problems(load_toml_env("", &[("CONVEYOR__KAFKA__BROKER", "b:2")]));
        assert_eq!(
            found,
            ["kafka.broker: unknown field `broker`, expected one of `brokers`, `client_id`, `options`, `security`, `prefetch_bytes`, `commit_metadata_bytes`"]
        );
    }

    #[test]
    fn kafka_options_keep_dotted_names() {
        let s = load_toml("[kafka.options]\n\"fetch.queue.backoff.ms\" = \"10\"\n\"security.protocol\" = \"SSL\"\n").unwrap();
        assert_eq!(
            s.kafka
                .options
                .get("fetch.queue.backoff.ms")
                .map(String::as_str),
            Some("10")
        );
        assert_eq!(
            s.kafka.options.get("security.protocol").map(String::as_str),
            Some("SSL")
        );
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let err = Settings::load_from(Some(Path::new("/nonexistent/conveyor.toml")), Vec::new())
            .unwrap_err();
        assert_eq!(err.problems(), ["/nonexistent/conveyor.toml: no such file"]);
    }

    #[test]
    fn effective_config_round_trips_through_toml() {
        let s = load_toml(ONE_PROCESSOR).unwrap();
        let printed = s.to_toml().unwrap();
        assert_eq!(load_toml(&printed).unwrap(), s);
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(check_topic_name("conveyor.tasks.resize_image-2").is_ok());
        assert!(check_topic_name("").is_err());
        assert!(check_topic_name("..").is_err());
        assert!(check_topic_name("a b").is_err());
        assert!(check_topic_name(&"x".repeat(250)).is_err());
    }
}
