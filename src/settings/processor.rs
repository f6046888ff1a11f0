//! `[[processors]]` and their `[processors.tasks.<type>]`: ordering,
//! bounds, retries, the breaker and each type's handler, with their checks.

use super::*;

/// `[[processors]]`: one consumer-group member of a worker.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorSettings {
    /// Unique name, used in logs, metrics and the default group id.
    pub name: String,
    /// Consumer group; copies with the same group share the partitions.
    /// Default: `conveyor.<name>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Topics to read. Default: the task topic of each type in `tasks`.
    pub input_topics: Vec<String>,
    /// Where results go. Default: `topics.results`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_topic: Option<String>,
    /// Task type → handler. At least one.
    pub tasks: BTreeMap<String, TaskSettings>,
    /// `partition`: one task at a time per partition. `key`: one at a time
    /// per key, different keys concurrently. `none`: as concurrent as the
    /// bounds allow.
    pub ordering: Ordering,
    /// Most tasks running or awaiting acknowledgement in this processor;
    /// its partitions are not read while it is reached.
    pub max_in_flight: usize,
    /// Most such tasks from any one partition.
    pub max_in_flight_per_partition: usize,
    /// Most bytes of request records held by such tasks; its partitions are
    /// not read while it is reached. A record larger than this still runs,
    /// alone.
    pub max_in_flight_bytes: usize,
    /// Most records of one partition dispatched at or above its oldest
    /// unfinished record, finished or not. Kafka commits a watermark: while
    /// one slow task sits at a partition's head, the tasks behind it finish
    /// but stay uncommitted. At this bound the partition is not read
    /// further until the head finishes, which bounds the memory they hold
    /// and what runs again after a crash on a broker that drops commit
    /// metadata. At least `max_in_flight_per_partition`.
    pub max_uncommitted_per_partition: usize,
    /// How often finished offsets are committed (with the finished offsets
    /// above the watermark in the commit's metadata), in milliseconds.
    pub commit_interval_ms: u64,
    /// Consumer-group session timeout, in milliseconds.
    pub session_timeout_ms: u64,
    /// How long a revoke or shutdown waits for in-flight tasks before letting
    /// go of the partitions, in milliseconds; must be below
    /// `session_timeout_ms`.
    pub drain_timeout_ms: u64,
    /// Attempts in all (the first included) for a task that fails with a
    /// retryable error, a timeout or a panic. Task types may override it.
    pub max_attempts: u32,
    /// Backoff after the first failed attempt, in milliseconds; it doubles
    /// with each further attempt. Task types may override it.
    pub initial_backoff_ms: u64,
    /// Longest backoff, in milliseconds. Task types may override it.
    pub max_backoff_ms: u64,
    /// Spread of each backoff, as a fraction (0.2: ±20%).
    pub backoff_jitter: f64,
    /// Backoffs at least this long (in milliseconds) go through the retry
    /// topic instead of holding the partition; 0 turns retry topics off.
    pub retry_topic_threshold_ms: u64,
    /// The retry topic of input topic `T` is `T<retry_topic_suffix>`. It must
    /// exist when retry topics are in use.
    pub retry_topic_suffix: String,
    /// Where tasks that fail for good, and records that cannot be decoded,
    /// are copied. Default: `topics.dead_letter`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// The poison-pill breaker.
    pub breaker: BreakerSettings,
}

/// `[processors.breaker]`: stop instead of dead-lettering a whole topic when
/// most tasks fail.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Whether the breaker is on.
    pub enabled: bool,
    /// How many recent terminal outcomes it looks at.
    pub window: usize,
    /// Share of failures among them that trips it (0.5: more than half).
    pub failure_ratio: f64,
    /// How long it stays open before trying again, in milliseconds.
    pub cooldown_ms: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            enabled: true,
            window: 1000,
            failure_ratio: 0.5,
            cooldown_ms: 60_000,
        }
    }
}

impl ProcessorSettings {
    /// The retry policy of `task_type`: the processor's settings with the
    /// task type's overrides.
    pub fn retry_policy(&self, task_type: &str) -> RetryPolicy {
        let task = self.tasks.get(task_type);
        let pick = |over: Option<u64>, base: u64| Duration::from_millis(over.unwrap_or(base));
        RetryPolicy {
            max_attempts: task
                .and_then(|t| t.max_attempts)
                .unwrap_or(self.max_attempts),
            initial_backoff: pick(
                task.and_then(|t| t.initial_backoff_ms),
                self.initial_backoff_ms,
            ),
            max_backoff: pick(task.and_then(|t| t.max_backoff_ms), self.max_backoff_ms),
            jitter: self.backoff_jitter,
            retry_topic_threshold: (self.retry_topic_threshold_ms > 0)
                .then(|| Duration::from_millis(self.retry_topic_threshold_ms)),
        }
    }

    /// Whether any task type can back off long enough to use the retry
    /// topics (the worker then reads them too).
    pub fn uses_retry_topics(&self) -> bool {
        self.tasks.keys().any(|t| {
            let p = self.retry_policy(t);
            p.max_attempts > 1
                && p.retry_topic_threshold.is_some_and(|threshold| {
                    // The longest backoff, jitter included.
                    p.max_backoff.as_secs_f64() * (1.0 + p.jitter) >= threshold.as_secs_f64()
                })
        })
    }

    /// The retry topic of input topic `input`.
    pub fn retry_topic(&self, input: &str) -> String {
        format!("{input}{}", self.retry_topic_suffix)
    }

    /// The breaker's settings, when it is on.
    pub fn breaker_config(&self) -> Option<BreakerConfig> {
        self.breaker.enabled.then(|| BreakerConfig {
            window: self.breaker.window,
            failure_ratio: self.breaker.failure_ratio,
            cooldown: Duration::from_millis(self.breaker.cooldown_ms),
        })
    }
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        ProcessorSettings {
            name: String::new(),
            group_id: None,
            input_topics: Vec::new(),
            output_topic: None,
            tasks: BTreeMap::new(),
            ordering: Ordering::Key,
            max_in_flight: 10_000,
            max_in_flight_per_partition: 2_500,
            max_in_flight_bytes: 64 * 1024 * 1024,
            max_uncommitted_per_partition: 10_000,
            commit_interval_ms: 1000,
            session_timeout_ms: 10_000,
            drain_timeout_ms: 5_000,
            max_attempts: 3,
            initial_backoff_ms: 500,
            max_backoff_ms: 60_000,
            backoff_jitter: 0.2,
            retry_topic_threshold_ms: 5_000,
            retry_topic_suffix: ".retry".into(),
            dead_letter_topic: None,
            breaker: BreakerSettings::default(),
        }
    }
}

/// How tasks of one processor may overlap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// One at a time per partition, in offset order.
    Partition,
    /// One at a time per key, in offset order; keys run concurrently. The
    /// default: a task without a key (keyed by its id) runs as concurrently
    /// as with `None`, as task queues usually do, and tasks that share a
    /// key keep their order, which is what users ask for when they need
    /// order.
    #[default]
    Key,
    /// No ordering.
    None,
}

/// `[processors.tasks.<type>]`: the handler of one task type.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSettings {
    /// Built-in handler: `echo`, `sleep`, `sha256` or `http`.
    pub handler: HandlerKind,
    /// `http` only: the URL each task is POSTed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Longest one attempt may run, in milliseconds.
    #[serde(default = "default_task_timeout_ms")]
    pub timeout_ms: u64,
    /// `http` only: the largest response body taken, in bytes (read in
    /// chunks, never held past this). A larger answer fails the task for
    /// good, naming its size: it could not be a result anyway (brokers
    /// take ~1 MB per record by default).
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// Overrides the processor's `max_attempts` for this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Overrides the processor's `initial_backoff_ms` for this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_backoff_ms: Option<u64>,
    /// Overrides the processor's `max_backoff_ms` for this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff_ms: Option<u64>,
    /// At most this many attempts of this type start per second, minute
    /// or hour: `"50/s"`, `"100/min"`, `"3600/h"`. Tasks wait for their
    /// turn without holding up other types. None by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// `"group"` (the default): `rate_limit` holds for the whole consumer
    /// group, each member taking the share of the type's partitions it
    /// owns. `"worker"`: for each worker.
    #[serde(default)]
    pub rate_limit_scope: RateScope,
    /// `http` only: the environment variable holding the secret(s) each
    /// request is signed with (`Conveyor-Signature`, HMAC-SHA256 over a
    /// timestamp and the body). One secret, or two separated by a comma or
    /// a newline while rotating (each request is then signed with both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_env: Option<String>,
    /// `http` only: a file holding the secret(s), as `signing_secret_env`
    /// (a mounted Kubernetes secret, say). Not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_file: Option<String>,
}

/// Whom a task type's `rate_limit` holds for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum RateScope {
    /// The consumer group as a whole.
    #[default]
    Group,
    /// Each worker.
    Worker,
}

impl TryFrom<String> for RateScope {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        match name.as_str() {
            "group" => Ok(RateScope::Group),
            "worker" => Ok(RateScope::Worker),
            _ => Err(format!("`{name}` is not a scope: use group or worker")),
        }
    }
}

impl TaskSettings {
    /// A task type run by `handler` with the default timeout and the
    /// processor's retry settings.
    pub fn new(handler: HandlerKind) -> Self {
        TaskSettings {
            handler,
            url: None,
            timeout_ms: default_task_timeout_ms(),
            max_response_bytes: default_max_response_bytes(),
            max_attempts: None,
            initial_backoff_ms: None,
            max_backoff_ms: None,
            rate_limit: None,
            rate_limit_scope: RateScope::default(),
            signing_secret_env: None,
            signing_secret_file: None,
        }
    }
}

pub(super) fn default_task_timeout_ms() -> u64 {
    30_000
}

pub(super) fn default_max_response_bytes() -> u64 {
    1024 * 1024
}

/// Which handler runs a task type: a built-in, or one the program
/// registered by name ([`crate::app::App::handler`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerKind {
    /// Returns the payload as the output.
    Echo,
    /// Waits `payload.ms` milliseconds: stands in for I/O-bound work.
    Sleep,
    /// Hashes the payload repeatedly: stands in for CPU-bound work.
    Sha256,
    /// POSTs the task to `url`: handlers in any language.
    Http,
    /// Splits `payload.text` into parts of `payload.lines` lines: a JSON
    /// array, for a fan-out step.
    SplitLines,
    /// Counts the words of a JSON string payload.
    WordCount,
    /// Adds up a JSON array of numbers, for a join step.
    Sum,
    /// A handler registered by the program under this name (conveyor's
    /// own binary registers none: a name it does not know is an error
    /// listing the ones it has).
    #[serde(untagged)]
    Custom(String),
}

impl HandlerKind {
    /// The built-in handlers' names, as written in a configuration.
    pub const BUILT_IN: &'static [&'static str] = &[
        "echo",
        "http",
        "sha256",
        "sleep",
        "split_lines",
        "sum",
        "word_count",
    ];

    /// The name a configuration gives this handler.
    pub fn name(&self) -> &str {
        match self {
            HandlerKind::Echo => "echo",
            HandlerKind::Sleep => "sleep",
            HandlerKind::Sha256 => "sha256",
            HandlerKind::Http => "http",
            HandlerKind::SplitLines => "split_lines",
            HandlerKind::WordCount => "word_count",
            HandlerKind::Sum => "sum",
            HandlerKind::Custom(name) => name,
        }
    }
}

impl ProcessorSettings {
    /// The problems of `processors[i]` (its name's are the list's to check:
    /// they depend on the others). `poll_stall_ms`: `metrics.poll_stall_ms`,
    /// which a drain must stay below.
    pub(super) fn validate(
        &self,
        i: usize,
        poll_stall_ms: u64,
        bad: &mut impl FnMut(String, &str),
    ) {
        let p = self;
        let at = |key: &str| format!("processors[{i}].{key}");
        if let Some(group) = &p.group_id {
            if group.trim().is_empty() {
                bad(at("group_id"), "must not be empty");
            }
        }
        if p.tasks.is_empty() {
            bad(
                at("tasks"),
                "at least one task type is required, e.g. [processors.tasks.echo] handler = \"echo\"",
            );
        }
        for (task_type, task) in &p.tasks {
            let key = |k: &str| format!("processors[{i}].tasks.{task_type}.{k}");
            if let Err(why) = check_topic_name(task_type) {
                bad(
                    format!("processors[{i}].tasks.{task_type}"),
                    &format!("task type {why}"),
                );
            }
            if let HandlerKind::Custom(name) = &task.handler {
                let fine = !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if !fine {
                    bad(
                        key("handler"),
                        &format!(
                            "`{name}` is not a handler name: a built-in ({}) or a name \
                             the program registers (letters, digits, _ and -)",
                            HandlerKind::BUILT_IN.join(", ")
                        ),
                    );
                }
            }
            match (&task.handler, &task.url) {
                (HandlerKind::Http, None) => bad(key("url"), "required by the http handler"),
                (HandlerKind::Http, Some(url))
                    if !(url.starts_with("http://") || url.starts_with("https://")) =>
                {
                    bad(key("url"), "must start with http:// or https://")
                }
                (HandlerKind::Http, Some(_)) => {}
                (_, Some(_)) => bad(key("url"), "only used by the http handler"),
                (_, None) => {}
            }
            match (&task.signing_secret_env, &task.signing_secret_file) {
                (Some(_), Some(_)) => bad(
                    key("signing_secret_file"),
                    "set signing_secret_env or signing_secret_file, not both",
                ),
                (Some(_), None) | (None, Some(_)) if task.handler != HandlerKind::Http => {
                    let field = if task.signing_secret_env.is_some() {
                        "signing_secret_env"
                    } else {
                        "signing_secret_file"
                    };
                    bad(key(field), "only used by the http handler");
                }
                (Some(name), None) if name.is_empty() || name.contains('=') => bad(
                    key("signing_secret_env"),
                    "must name an environment variable",
                ),
                (None, Some(path)) if path.is_empty() => {
                    bad(key("signing_secret_file"), "must not be empty")
                }
                _ => {}
            }
            if task.timeout_ms == 0 {
                bad(key("timeout_ms"), "must be > 0");
            }
            if task.max_attempts == Some(0) {
                bad(key("max_attempts"), "must be > 0");
            }
            if let Some(Err(why)) = task.rate_limit.as_deref().map(crate::rate::parse_rate) {
                bad(key("rate_limit"), &why);
            }
            let initial = task.initial_backoff_ms.unwrap_or(p.initial_backoff_ms);
            let max = task.max_backoff_ms.unwrap_or(p.max_backoff_ms);
            if (task.initial_backoff_ms.is_some() || task.max_backoff_ms.is_some()) && initial > max
            {
                bad(
                    key("initial_backoff_ms"),
                    &format!("{initial} is above the max_backoff_ms in force ({max})"),
                );
            }
        }
        for (j, topic) in p.input_topics.iter().enumerate() {
            if let Err(why) = check_topic_name(topic) {
                bad(at(&format!("input_topics[{j}]")), &why);
            }
        }
        if let Some(topic) = &p.output_topic {
            if let Err(why) = check_topic_name(topic) {
                bad(at("output_topic"), &why);
            }
        }
        if p.max_in_flight == 0 {
            bad(at("max_in_flight"), "must be > 0");
        }
        if p.max_in_flight_bytes == 0 {
            bad(at("max_in_flight_bytes"), "must be > 0");
        }
        if p.max_in_flight_per_partition == 0 {
            bad(at("max_in_flight_per_partition"), "must be > 0");
        } else if p.max_in_flight_per_partition > p.max_in_flight && p.max_in_flight > 0 {
            bad(
                at("max_in_flight_per_partition"),
                &format!("must not exceed max_in_flight ({})", p.max_in_flight),
            );
        }
        if p.max_uncommitted_per_partition < p.max_in_flight_per_partition {
            bad(
                at("max_uncommitted_per_partition"),
                &format!(
                    "must be at least max_in_flight_per_partition ({})",
                    p.max_in_flight_per_partition
                ),
            );
        }
        if p.drain_timeout_ms >= poll_stall_ms {
            bad(
                at("drain_timeout_ms"),
                &format!(
                    "must be below metrics.poll_stall_ms ({}): a drain blocks the poll loop, and /healthz would fail meanwhile",
                    poll_stall_ms
                ),
            );
        }
        if p.commit_interval_ms == 0 {
            bad(at("commit_interval_ms"), "must be > 0");
        }
        // librdkafka's own limits for session.timeout.ms.
        if !(1_000..=3_600_000).contains(&p.session_timeout_ms) {
            bad(at("session_timeout_ms"), "must be between 1000 and 3600000");
        }
        if p.max_attempts == 0 {
            bad(at("max_attempts"), "must be > 0 (1 means no retries)");
        }
        if p.initial_backoff_ms > p.max_backoff_ms {
            bad(
                at("initial_backoff_ms"),
                &format!("must not exceed max_backoff_ms ({})", p.max_backoff_ms),
            );
        }
        if !(0.0..=1.0).contains(&p.backoff_jitter) {
            bad(at("backoff_jitter"), "must be between 0 and 1");
        }
        if let Err(why) = check_topic_name(&format!("x{}", p.retry_topic_suffix)) {
            bad(at("retry_topic_suffix"), &why);
        } else if p.retry_topic_suffix.is_empty() {
            bad(
                at("retry_topic_suffix"),
                "must not be empty (the retry topic would be the input topic)",
            );
        }
        if let Some(topic) = &p.dead_letter_topic {
            if let Err(why) = check_topic_name(topic) {
                bad(at("dead_letter_topic"), &why);
            }
        }
        if p.breaker.window == 0 {
            bad(at("breaker.window"), "must be > 0");
        }
        if !(p.breaker.failure_ratio > 0.0 && p.breaker.failure_ratio <= 1.0) {
            bad(at("breaker.failure_ratio"), "must be above 0 and at most 1");
        }
        if p.breaker.cooldown_ms == 0 {
            bad(at("breaker.cooldown_ms"), "must be > 0");
        }
        if p.drain_timeout_ms == 0 {
            bad(at("drain_timeout_ms"), "must be > 0");
        } else if p.drain_timeout_ms >= p.session_timeout_ms {
            bad(
                at("drain_timeout_ms"),
                &format!(
                    "must be below session_timeout_ms ({}), or the group evicts this member while it drains",
                    p.session_timeout_ms
                ),
            );
        }
    }
}
