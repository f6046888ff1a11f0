//! The `conveyor` command line. Parsing and exit codes only; the work is
//! done by the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use conveyor::codec::TaskRequest;
use conveyor::dev::{self, DevCluster, DEV_PARTITIONS};
use conveyor::settings::{LogFormat, Settings, SettingsError};

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
    /// topics of the configuration (the built-in dev configuration unless
    /// --config is given; its kafka.brokers is replaced by the embedded
    /// cluster), sends one task request through it and reads it back decoded,
    /// then keeps the cluster up until Ctrl-C. The processor engine and the
    /// HTTP gateway will run here too once they are built.
    Dev,
    /// Run the configured processors as consumer-group members. Not built yet.
    Worker,
    /// Run the HTTP gateway (submit tasks, look up results). Not built yet.
    Gateway,
    /// Produce task requests from the command line. Not built yet.
    Submit,
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
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
        Command::Worker => not_built("worker", "the processor engine"),
        Command::Gateway => not_built("gateway", "the HTTP gateway"),
        Command::Submit => not_built("submit", "task submission from the command line"),
    }
}

fn not_built(command: &str, what: &str) -> ExitCode {
    eprintln!(
        "conveyor {command}: not built yet: {what} is planned work (see \"Status\" in README.md); \
         nothing was done."
    );
    ExitCode::from(EXIT_USAGE)
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
    match Settings::load(file).and_then(|s| s.to_toml()) {
        Ok(text) => {
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
    let log = user_settings
        .as_ref()
        .map(|s| s.log.clone())
        .unwrap_or_default();
    if let Err(error) = conveyor::telemetry::init(log_format.unwrap_or(log.format), &log.level) {
        eprintln!("conveyor dev: {error}");
        return ExitCode::from(EXIT_USAGE);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("conveyor dev: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dev_main(user_settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("conveyor dev: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dev_main(user_settings: Option<Settings>) -> anyhow::Result<()> {
    let cluster = DevCluster::start(1)?;
    let bootstrap = cluster.bootstrap_servers();
    let settings = match user_settings {
        Some(mut settings) => {
            settings.kafka.brokers = bootstrap.clone();
            settings
        }
        None => dev::dev_settings(&bootstrap),
    };
    let topics = cluster.create_topics_for(&settings)?;
    println!(
        "conveyor dev: embedded Kafka-protocol cluster (librdkafka mock, in memory) on {bootstrap}"
    );
    println!(
        "  topics, {DEV_PARTITIONS} partitions each: {}",
        topics.join(", ")
    );

    let first_type = settings
        .processors
        .iter()
        .flat_map(|p| p.tasks.keys())
        .next()
        .cloned()
        .unwrap_or_else(|| "echo".into());
    let check_topic = settings.topics.task_topic(&first_type);
    if !topics.contains(&check_topic) {
        cluster.create_topic(&check_topic, DEV_PARTITIONS)?;
    }
    let sent = TaskRequest::new(first_type, br#"{"hello":"conveyor"}"#.to_vec());
    let back = dev::round_trip(&settings, &check_topic, &sent, Duration::from_secs(10)).await?;
    anyhow::ensure!(
        back == sent,
        "the request read back differs from the one sent"
    );
    println!(
        "  check: task {} ({}) produced to {check_topic} with acks=all, read back and decoded intact",
        sent.id, sent.task_type
    );
    println!("  not running yet: the processor engine and the HTTP gateway (planned; see README.md \"Status\")");
    println!("  any Kafka client can use {bootstrap} meanwhile; Ctrl-C stops the cluster.");
    let signal = conveyor::shutdown::stop_requested().await?;
    tracing::info!(signal, "stopping the embedded cluster");
    drop(cluster);
    Ok(())
}
