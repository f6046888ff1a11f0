//! The `conveyor` command line. Parsing and exit codes only; the work is
//! done by the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use conveyor::app::App;
use conveyor::codec::TaskStatus;
use conveyor::dev;
use conveyor::settings::{LogFormat, Settings, SettingsError};
use conveyor::shutdown::CancellationToken;
use conveyor::tools::{self, Submission, ToolError};
use conveyor::worker;

/// mimalloc instead of the system allocator: a task allocates on the
/// runtime's threads and much of it is freed on the producer's delivery
/// thread. In a profile of the worker glibc's malloc, free and their
/// helpers were ~18 % of the process's samples (librdkafka's included);
/// with mimalloc, conveyor's CPU per record in `ordering = "key"` fell
/// from 0.55 to 0.44 s per 100k (medians, same session; BENCHMARKS.md,
/// "Less CPU per record").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for bad configuration or a command that is not built yet.
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "conveyor",
    version,
    about = "Asynchronous task processing and workflows on Apache Kafka",
    long_about = "Asynchronous task processing and workflows on Apache Kafka.\n\n\
        Web applications submit slow work as task requests; conveyor runs it in a \
        horizontally scalable Kafka consumer group with at-least-once delivery and \
        publishes each task's result.\n\n\
        Configuration: built-in defaults, then the TOML file given with --config, then \
        environment variables CONVEYOR__<SECTION>__<KEY> (e.g. CONVEYOR__KAFKA__BROKERS). \
        conveyor.example.toml documents every key.\n\n\
        Exit status: 0 success, 1 runtime failure, 2 bad usage or configuration \
        (or a command that is not built yet)."
)]
struct Cli {
    /// TOML configuration file.
    #[arg(
        short,
        long,
        global = true,
        env = "CONVEYOR_CONFIG",
        value_name = "FILE"
    )]
    config: Option<PathBuf>,

    /// Log format; overrides `log.format`. The level comes from RUST_LOG, else `log.level`.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run conveyor on an embedded Kafka-protocol cluster, no broker needed.
    ///
    /// Starts librdkafka's in-memory mock cluster on 127.0.0.1, creates the
    /// topics of the configuration (the built-in dev configuration, with the
    /// echo, sleep and sha256 handlers, unless --config is given; its
    /// kafka.brokers is replaced by the embedded cluster), runs a worker with
    /// every processor (and the delay mover and the scheduler, as `conveyor
    /// worker` does) and the HTTP gateway, sends one echo task through them
    /// and waits for its result, then prints how to submit tasks and follow
    /// results and runs until Ctrl-C.
    Dev,
    /// Run the configured processors as consumer-group members.
    ///
    /// Each [[processors]] entry joins its consumer group, runs its handlers
    /// and produces results, committing each input offset only after the
    /// result is acknowledged (at least once). Run more copies with the same
    /// configuration to share the partitions. Each worker also moves delayed
    /// tasks through the delay tiers ([delays]) and takes its turn firing
    /// [[schedules]] (one worker at a time fires them). SIGINT or SIGTERM
    /// stops intake, drains in-flight tasks (up to drain_timeout_ms), commits
    /// and exits 0; a second signal exits at once with status 130.
    Worker,
    /// Run the HTTP gateway: submit tasks, look up their status and results.
    ///
    /// Serves the API on gateway.listen (POST /v1/tasks, POST
    /// /v1/tasks:batch, GET /v1/tasks/{id}?wait=10s, /healthz, /readyz,
    /// /metrics, /openapi.json). Accepts the task types of the
    /// configuration's [[processors]] and gateway.task_types; every topic it
    /// writes or follows must exist. The status view is built from the
    /// results and task topics (see README "HTTP gateway" for its limits).
    /// SIGINT or SIGTERM stops accepting connections, answers the requests
    /// in flight, flushes the producer and exits 0.
    Gateway,
    /// Produce task requests and print their ids, one per line.
    Submit(SubmitArgs),
    /// Print task results as JSON lines (from the start of the results topic).
    Results(ResultsArgs),
    /// Cancel a task or a workflow run, through the gateway.
    ///
    /// POSTs /v1/tasks/{ID}:cancel to the gateway (--gateway, else
    /// http://<gateway.listen>, with the first of gateway.auth_tokens). A
    /// task not yet started never runs and ends `cancelled`; a running one
    /// is asked to stop (Rust handlers see it in their context, the http
    /// handler aborts its request) and its result says how it ended; a
    /// waiting retry or rate-limited task is cancelled where it waits; a
    /// workflow run starts no further step. Exits 0 when the cancellation
    /// was written, 1 when the task had already ended (its status is
    /// printed) or is unknown, 2 for a malformed id.
    Cancel(CancelArgs),
    /// Start workflow runs.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Inspect and replay dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Create or check every topic the configuration needs.
    ///
    /// The topics: each processor's input topics and their retry topics
    /// (unless retry_topic_threshold_ms = 0 makes them unused), output and
    /// dead-letter topics, topics.results and topics.dead_letter, the task
    /// topics of gateway.task_types, each workflow join's changelog
    /// <join topic>.joins (compacted, with its join topic's partition count),
    /// the delay tier topics when [delays] is on, and scheduler.topic (one
    /// partition, compacted) when there are [[schedules]].
    /// New topics get topics.partitions, topics.replication_factor and
    /// topics.configs. Needs a broker with the admin API (not librdkafka's
    /// mock cluster: `conveyor dev` creates its topics itself).
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Show the periodic schedules ([[schedules]]).
    #[command(subcommand)]
    Schedules(SchedulesCommand),
}

#[derive(Subcommand)]
enum SchedulesCommand {
    /// Print each configured schedule with its next fire time and the last
    /// tick fired (read from scheduler.topic; null before a worker first
    /// saw the schedule), one JSON object per line.
    ///
    /// A worker fires the schedules when it owns the one-partition schedule
    /// topic: one worker of any number, the next taking over when it dies.
    List {
        /// Brokers (host:port,…); overrides kafka.brokers.
        #[arg(long)]
        brokers: Option<String>,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create the missing topics; existing ones are left alone and
    /// reported. Exit 1 if any could not be created.
    Create {
        /// Print what would be created; create nothing.
        #[arg(long)]
        dry_run: bool,
        /// Brokers (host:port,…); overrides kafka.brokers.
        #[arg(long)]
        brokers: Option<String>,
    },
    /// Report what is missing or does not fit (a changelog not compacted,
    /// or with another partition count than its join topic); exit 1 if
    /// anything is.
    Check {
        /// Brokers (host:port,…); overrides kafka.brokers.
        #[arg(long)]
        brokers: Option<String>,
        /// Wait up to this long (`90s`, `10m`) for every topic to be there
        /// and fit, checking every 5 s and saying what is still missing;
        /// then exit 1 as without it. For an init container that must not
        /// start its pod before another creates the topics.
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
    },
}

#[derive(Args)]
struct CancelArgs {
    /// Id of the task or workflow run (a UUID).
    #[arg(value_name = "ID")]
    id: String,
    /// The gateway's base URL (default: http://<gateway.listen>).
    #[arg(long, value_name = "URL")]
    gateway: Option<String>,
}

#[derive(Args)]
struct SubmitArgs {
    /// Task type; selects the handler and, unless --topic is given, the
    /// topic (<topics.task_prefix><type>).
    #[arg(long = "type", value_name = "TYPE")]
    task_type: String,
    /// The payload, as JSON.
    #[arg(long, default_value = "{}", value_name = "JSON")]
    payload: String,
    /// Ordering key; tasks with the same key run one at a time, in order,
    /// under `ordering = "key"`.
    #[arg(long)]
    key: Option<String>,
    /// How many tasks to submit, each with its own id.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Topic to produce to instead of the task type's.
    #[arg(long)]
    topic: Option<String>,
    /// Start the tasks this long from now (90s, 10m, 1h, 30d; at most
    /// delays.max_delay_s): they wait in a delay tier, not in memory.
    #[arg(long, value_name = "DURATION", conflicts_with = "run_at")]
    delay: Option<String>,
    /// Start the tasks at this time, RFC 3339 with its UTC offset
    /// (2026-12-24T18:00:00+01:00).
    #[arg(long, value_name = "TIME")]
    run_at: Option<String>,
    /// Brokers (host:port,…); overrides kafka.brokers.
    #[arg(long)]
    brokers: Option<String>,
}

#[derive(Subcommand)]
enum WorkflowCommand {
    /// Start a run of a workflow of the configuration ([[workflows]]) and
    /// print its run id; with --wait, wait for the run's result and print
    /// it as a JSON line (exit 1 if the run failed).
    ///
    /// The first step's request is produced with acks=all; the workers do
    /// the rest. Look a run up with GET /v1/workflows/<id> on the gateway.
    Start {
        /// The workflow's name.
        name: String,
        /// The first step's payload, as JSON.
        #[arg(long, default_value = "{}", value_name = "JSON")]
        payload: String,
        /// Wait up to this many seconds for the run's result.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
        /// Brokers (host:port,…); overrides kafka.brokers.
        #[arg(long)]
        brokers: Option<String>,
    },
}

#[derive(Args)]
struct ResultsArgs {
    /// Keep printing new results until Ctrl-C instead of stopping at the end.
    #[arg(long)]
    follow: bool,
    /// Brokers (host:port,…); overrides kafka.brokers.
    #[arg(long)]
    brokers: Option<String>,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// One JSON line per dead letter: where it is, task id and type, error
    /// kind and message, attempts, and where it was first read.
    List(DlqArgs),
    /// One dead letter in full: every header and the decoded request.
    Show {
        #[command(flatten)]
        common: DlqArgs,
        /// Its partition in the dead-letter topic.
        #[arg(long = "at-partition", value_name = "P")]
        at_partition: i32,
        /// Its offset in that partition.
        #[arg(long = "at-offset", value_name = "O")]
        at_offset: i64,
    },
    /// Produce the selected dead letters again to their original topics,
    /// with the attempt number reset to 1 (same task ids). Replaying twice
    /// runs the tasks twice: select with the filters, and check with
    /// --dry-run first.
    Replay {
        #[command(flatten)]
        common: DlqArgs,
        /// Print what would be replayed; produce nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args, Clone)]
struct DlqArgs {
    /// Dead-letter topic; default topics.dead_letter.
    #[arg(long)]
    topic: Option<String>,
    /// Brokers (host:port,…); overrides kafka.brokers.
    #[arg(long)]
    brokers: Option<String>,
    /// Only this partition of the dead-letter topic.
    #[arg(long)]
    partition: Option<i32>,
    /// Only offsets from this one on (inclusive).
    #[arg(long)]
    from_offset: Option<i64>,
    /// Only offsets up to this one (inclusive).
    #[arg(long)]
    to_offset: Option<i64>,
    /// Only tasks of this type.
    #[arg(long = "type", value_name = "TYPE")]
    task_type: Option<String>,
    /// Only this error kind (permanent, timeout, retryable, panic, decode, unknown_type,
    /// deadline, unknown_workflow, invalid_workflow_step…).
    #[arg(long)]
    kind: Option<String>,
}

impl DlqArgs {
    fn filter(&self) -> conveyor::dlq::Filter {
        conveyor::dlq::Filter {
            partition: self.partition,
            from_offset: self.from_offset,
            to_offset: self.to_offset,
            task_type: self.task_type.clone(),
            kind: self.kind.clone(),
        }
    }
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (defaults, file and environment
    /// merged, derived defaults filled in) as TOML and exit 0; or print every
    /// problem, each naming its key, and exit 2.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config(ConfigCommand::Check) => config_check(cli.config.as_deref()),
        Command::Dev => run_dev(cli.config.as_deref(), cli.log_format),
        Command::Worker => with_settings(cli.config.as_deref(), cli.log_format, None, run_worker),
        Command::Gateway => with_settings(cli.config.as_deref(), cli.log_format, None, run_gateway),
        Command::Submit(args) => {
            let brokers = args.brokers.clone();
            with_settings(cli.config.as_deref(), cli.log_format, brokers, |s| {
                run_submit(s, args)
            })
        }
        Command::Workflow(command) => {
            let WorkflowCommand::Start { brokers, .. } = &command;
            let brokers = brokers.clone();
            with_settings(cli.config.as_deref(), cli.log_format, brokers, |s| {
                run_workflow(s, command)
            })
        }
        Command::Dlq(command) => {
            let common = match &command {
                DlqCommand::List(c) => c,
                DlqCommand::Show { common, .. } | DlqCommand::Replay { common, .. } => common,
            };
            let brokers = common.brokers.clone();
            with_settings(cli.config.as_deref(), cli.log_format, brokers, |s| {
                run_dlq(s, command)
            })
        }
        Command::Topics(command) => {
            let brokers = match &command {
                TopicsCommand::Create { brokers, .. } | TopicsCommand::Check { brokers, .. } => {
                    brokers.clone()
                }
            };
            with_settings(cli.config.as_deref(), cli.log_format, brokers, |s| {
                run_topics(s, command)
            })
        }
        Command::Schedules(command) => {
            let SchedulesCommand::List { brokers } = &command;
            let brokers = brokers.clone();
            with_settings(
                cli.config.as_deref(),
                cli.log_format,
                brokers,
                run_schedules,
            )
        }
        Command::Cancel(args) => with_settings(cli.config.as_deref(), cli.log_format, None, |s| {
            run_cancel(s, args)
        }),
        Command::Results(args) => {
            let brokers = args.brokers.clone();
            with_settings(cli.config.as_deref(), cli.log_format, brokers, |s| {
                run_results(s, args.follow)
            })
        }
    }
}

/// Loads and validates the configuration, starts logging and a runtime,
/// and runs `command`; maps errors to exit codes.
fn with_settings<F>(
    file: Option<&Path>,
    log_format: Option<LogFormat>,
    brokers: Option<String>,
    command: F,
) -> ExitCode
where
    F: AsyncFnOnce(Settings) -> Result<(), CommandError>,
{
    let mut settings = match Settings::load(file) {
        Ok(settings) => settings,
        Err(error) => {
            report_settings_error(&error);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(brokers) = brokers {
        settings.kafka.brokers = brokers;
    }
    let _telemetry = match conveyor::telemetry::init(
        log_format.unwrap_or(settings.log.format),
        &settings.log.level,
        &settings.otlp,
    ) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("conveyor: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("conveyor: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(command(settings));
    // Tasks cut off by a drain deadline may still be running: do not wait.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(CommandError::Usage(message)) => {
            eprintln!("conveyor: {message}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(CommandError::Failed(message)) => {
            eprintln!("conveyor: {message}");
            ExitCode::FAILURE
        }
    }
}

/// How a command failed: the user's input (exit 2) or at run time (exit 1).
enum CommandError {
    Usage(String),
    Failed(String),
}

impl From<ToolError> for CommandError {
    fn from(error: ToolError) -> Self {
        match error {
            ToolError::Input(message) => CommandError::Usage(message),
            other => CommandError::Failed(other.to_string()),
        }
    }
}

impl From<worker::WorkerError> for CommandError {
    fn from(error: worker::WorkerError) -> Self {
        match error {
            worker::WorkerError::Config(message) => CommandError::Usage(message),
            other => CommandError::Failed(other.to_string()),
        }
    }
}

/// Connects as the command's clients will; an authentication or TLS
/// failure, or no answer, ends the command (exit 1) naming the setting.
async fn connect(settings: &Settings) -> Result<(), CommandError> {
    conveyor::kafka::connect(&settings.kafka)
        .await
        .map_err(CommandError::Failed)
}

/// Refuses a payload that is not JSON before anything connects.
fn json_payload(payload: &str) -> Result<(), CommandError> {
    serde_json::from_str::<serde_json::Value>(payload)
        .map(|_| ())
        .map_err(|e| CommandError::Usage(format!("--payload is not valid JSON: {e}")))
}

/// `conveyor worker`: the library's [`App`] with the built-in handlers.
async fn run_worker(settings: Settings) -> Result<(), CommandError> {
    for warning in settings.warnings() {
        tracing::warn!("{warning}");
    }
    let stop = CancellationToken::new();
    conveyor::shutdown::stop_on_signals(stop.clone());
    App::from_settings(settings)
        .run_until(stop)
        .await
        .map_err(|error| match error.exit_code() {
            EXIT_USAGE => CommandError::Usage(error.to_string()),
            _ => CommandError::Failed(error.to_string()),
        })
}

async fn run_gateway(settings: Settings) -> Result<(), CommandError> {
    connect(&settings).await?;
    let metrics = Arc::new(conveyor::metrics::Metrics::new());
    let stop = CancellationToken::new();
    conveyor::shutdown::stop_on_signals(stop.clone());
    let gateway = conveyor::gateway::start(&settings, metrics, stop)
        .await
        .map_err(gateway_error)?;
    tracing::info!(address = %gateway.address(), "gateway listening");
    gateway.finished().await.map_err(gateway_error)
}

fn gateway_error(error: conveyor::gateway::GatewayError) -> CommandError {
    match error {
        conveyor::gateway::GatewayError::Config(message) => CommandError::Usage(message),
        // A listen address that cannot be bound is the configuration's.
        bind @ conveyor::gateway::GatewayError::Bind { .. } => {
            CommandError::Usage(bind.to_string())
        }
        other => CommandError::Failed(other.to_string()),
    }
}

async fn run_cancel(settings: Settings, args: CancelArgs) -> Result<(), CommandError> {
    let id = uuid::Uuid::try_parse(args.id.trim())
        .map_err(|_| CommandError::Usage(format!("ID `{}`: not a UUID", args.id)))?;
    let base = args
        .gateway
        .unwrap_or_else(|| format!("http://{}", settings.gateway.listen));
    let url = format!("{}/v1/tasks/{id}:cancel", base.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| CommandError::Failed(format!("cannot build the HTTP client: {e}")))?;
    let mut request = client.post(&url);
    if let Some(token) = settings.gateway.auth_tokens.first() {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| CommandError::Failed(format!("POST {url}: {e}")))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status == reqwest::StatusCode::ACCEPTED {
        println!("{body}");
        return Ok(());
    }
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(|m| m.as_str().map(str::to_owned))
        })
        .unwrap_or(body);
    Err(CommandError::Failed(format!(
        "POST {url} answered {status}: {message}"
    )))
}

async fn run_submit(settings: Settings, args: SubmitArgs) -> Result<(), CommandError> {
    json_payload(&args.payload)?;
    let run_at = conveyor::delay::start_time(
        args.delay.as_deref(),
        args.run_at.as_deref(),
        &settings.delays,
        conveyor::codec::now_millis(),
    )
    .map_err(CommandError::Usage)?;
    connect(&settings).await?;
    let submission = Submission {
        task_type: args.task_type,
        payload: args.payload,
        key: args.key,
        count: args.count,
        topic: args.topic,
        run_at,
    };
    for id in tools::submit(&settings, &submission).await? {
        println!("{id}");
    }
    Ok(())
}

async fn run_workflow(settings: Settings, command: WorkflowCommand) -> Result<(), CommandError> {
    let WorkflowCommand::Start {
        name,
        payload,
        wait,
        brokers: _,
    } = command;
    json_payload(&payload)?;
    connect(&settings).await?;
    let (run, results) = tools::start_workflow(&settings, &name, &payload).await?;
    println!("{run}");
    let Some(seconds) = wait else {
        return Ok(());
    };
    let result =
        tools::wait_for_result_on(&settings, &results, run, Duration::from_secs(seconds)).await?;
    println!("{}", tools::result_json(&result));
    if result.status == TaskStatus::Failed {
        return Err(CommandError::Failed(format!("workflow run {run} failed")));
    }
    Ok(())
}

async fn run_dlq(settings: Settings, command: DlqCommand) -> Result<(), CommandError> {
    connect(&settings).await?;
    let (common, show_at, replay) = match &command {
        DlqCommand::List(c) => (c.clone(), None, None),
        DlqCommand::Show {
            common,
            at_partition,
            at_offset,
        } => (common.clone(), Some((*at_partition, *at_offset)), None),
        DlqCommand::Replay { common, dry_run } => (common.clone(), None, Some(*dry_run)),
    };
    let topic = common
        .topic
        .clone()
        .unwrap_or_else(|| settings.topics.dead_letter.clone());
    let mut filter = common.filter();
    if let Some((partition, offset)) = show_at {
        // Seek straight to it.
        filter.partition = Some(partition);
        filter.from_offset = Some(offset);
        filter.to_offset = Some(offset);
    }
    let open_settings = settings.clone();
    let open_topic = topic.clone();
    let replayer = match replay {
        Some(dry_run) => Some(conveyor::dlq::Replayer::new(&settings, dry_run)?),
        None => None,
    };
    let mut letters = tokio::task::spawn_blocking(move || {
        conveyor::dlq::Letters::open(&open_settings, &open_topic, &filter)
    })
    .await
    .map_err(|e| CommandError::Failed(e.to_string()))??;
    // Read in batches off the runtime's threads (the reader blocks), so
    // that memory stays flat however long the topic is.
    loop {
        let (back, batch) = tokio::task::spawn_blocking(move || {
            let mut batch = Vec::new();
            while batch.len() < DLQ_BATCH {
                match letters.next_letter() {
                    Ok(Some(letter)) => batch.push(letter),
                    Ok(None) => break,
                    Err(e) => return (letters, Err(e)),
                }
            }
            (letters, Ok(batch))
        })
        .await
        .map_err(|e| CommandError::Failed(e.to_string()))?;
        letters = back;
        let batch = batch?;
        if let Some((partition, offset)) = show_at {
            let letter = batch.first().ok_or_else(|| {
                CommandError::Usage(format!(
                    "no dead letter at partition {partition}, offset {offset} of {topic}"
                ))
            })?;
            let text = serde_json::to_string_pretty(&letter.detail())
                .map_err(|e| CommandError::Failed(e.to_string()))?;
            println!("{text}");
            return Ok(());
        }
        match &replayer {
            None => {
                for letter in &batch {
                    println!("{}", letter.summary());
                }
            }
            Some(replayer) => {
                for line in replayer.replay(&batch).await? {
                    println!("{line}");
                }
            }
        }
        if batch.len() < DLQ_BATCH {
            return Ok(());
        }
    }
}

/// Dead letters held at once by `conveyor dlq`.
const DLQ_BATCH: usize = 500;

/// How often `conveyor topics check --wait` looks again.
const TOPICS_WAIT_EVERY: Duration = Duration::from_secs(5);

async fn run_topics(settings: Settings, command: TopicsCommand) -> Result<(), CommandError> {
    let report = match command {
        TopicsCommand::Create { dry_run, .. } => {
            connect(&settings).await?;
            conveyor::topics::create(&settings, dry_run).await?
        }
        TopicsCommand::Check { wait: None, .. } => {
            connect(&settings).await?;
            conveyor::topics::check(&settings).await?
        }
        TopicsCommand::Check {
            wait: Some(wait), ..
        } => {
            let wait = conveyor::delay::parse_delay(&wait)
                .map_err(|why| CommandError::Usage(format!("--wait: {why}")))?;
            wait_for_topics(&settings, wait).await?
        }
    };
    for line in &report.lines {
        println!("{line}");
    }
    if report.ok() {
        Ok(())
    } else {
        Err(CommandError::Failed(
            "some topics are missing or do not fit (see above)".into(),
        ))
    }
}

/// `topics check --wait`: checks until every topic is there and fits, or
/// `wait` has passed (then the last report, or the last error, stands).
/// A broker not reachable yet is waited for too.
async fn wait_for_topics(
    settings: &Settings,
    wait: Duration,
) -> Result<conveyor::topics::Report, CommandError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let outcome = match connect(settings).await {
            Ok(()) => conveyor::topics::check(settings)
                .await
                .map_err(CommandError::from),
            Err(error) => Err(error),
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let why = match &outcome {
            Ok(report) if report.ok() => return outcome,
            Ok(report) => format!("not yet: {}", report.problems().join("; ")),
            Err(CommandError::Usage(why) | CommandError::Failed(why)) => {
                format!("cannot check yet: {why}")
            }
        };
        if left.is_zero() {
            return outcome;
        }
        eprintln!("conveyor topics check: {why} ({} s left)", left.as_secs());
        tokio::time::sleep(TOPICS_WAIT_EVERY.min(left)).await;
    }
}

async fn run_schedules(settings: Settings) -> Result<(), CommandError> {
    if settings.schedules.is_empty() {
        return Err(CommandError::Usage(
            "the configuration has no [[schedules]]".into(),
        ));
    }
    let schedules = conveyor::schedule::Schedule::all(&settings).map_err(CommandError::Usage)?;
    connect(&settings).await?;
    let reading = settings.clone();
    let fired = tokio::task::spawn_blocking(move || conveyor::tools::fired_schedules(&reading))
        .await
        .map_err(|e| CommandError::Failed(format!("reading the schedule topic: {e}")))??;
    let now = conveyor::codec::now_millis();
    for listed in conveyor::schedule::listing(&schedules, &fired, now) {
        match serde_json::to_string(&listed) {
            Ok(line) => println!("{line}"),
            Err(e) => return Err(CommandError::Failed(e.to_string())),
        }
    }
    Ok(())
}

async fn run_results(settings: Settings, follow: bool) -> Result<(), CommandError> {
    connect(&settings).await?;
    let stop = CancellationToken::new();
    conveyor::shutdown::stop_on_signals(stop.clone());
    tokio::task::spawn_blocking(move || {
        tools::print_results(&settings, follow, &stop, |line| println!("{line}"))
    })
    .await
    .map_err(|e| CommandError::Failed(e.to_string()))??;
    Ok(())
}

fn report_settings_error(error: &SettingsError) {
    let problems = error.problems();
    eprintln!(
        "configuration has {} problem{}:",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for problem in problems {
        eprintln!("  {problem}");
    }
}

fn config_check(file: Option<&std::path::Path>) -> ExitCode {
    let checked = Settings::load(file).and_then(|settings| {
        // This binary has the built-in handlers only: a name it does not
        // know is a typo here (a program built on conveyor::app::App that
        // registers it checks its own configuration).
        let handlers = if settings.processors.is_empty() {
            Ok(())
        } else {
            worker::processor_specs(&settings).map(|_| ())
        };
        for warning in settings.warnings() {
            eprintln!("warning: {warning}");
        }
        Ok((handlers, settings.redacted().to_toml()?))
    });
    match checked {
        Ok((Err(error), _)) => {
            eprintln!("conveyor: {error}");
            ExitCode::from(EXIT_USAGE)
        }
        Ok((Ok(()), text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            report_settings_error(&error);
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn run_dev(file: Option<&std::path::Path>, log_format: Option<LogFormat>) -> ExitCode {
    // The embedded cluster's address is known only once it runs, so a user's
    // file is loaded (and checked) first and its brokers replaced after.
    let user_settings = match file.map(|f| Settings::load(Some(f))).transpose() {
        Ok(settings) => settings,
        Err(error) => {
            report_settings_error(&error);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let (log, otlp) = user_settings
        .as_ref()
        .map(|s| (s.log.clone(), s.otlp.clone()))
        .unwrap_or_default();
    let _telemetry =
        match conveyor::telemetry::init(log_format.unwrap_or(log.format), &log.level, &otlp) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("conveyor dev: {error}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("conveyor dev: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dev::run(user_settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("conveyor dev: {error:#}");
            ExitCode::FAILURE
        }
    }
}
