//! `conveyor dev`: an embedded Kafka-protocol cluster so a newcomer sees
//! conveyor work with no broker installed: [`run`] starts it, a worker and
//! a gateway on it, checks a task goes through and says how to try more.
//!
//! The cluster is librdkafka's mock cluster (`rdkafka::mocking::MockCluster`):
//! real Kafka protocol on 127.0.0.1, in memory, gone when the process exits.
//! It has no admin CreateTopics, so topics are created through it here, and
//! it keeps at most 5 MiB per partition.

use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::codec::TaskStatus;
use crate::settings::{
    HandlerKind, ProcessorSettings, Settings, StepSettings, TaskSettings, WorkflowSettings,
};
use crate::shutdown::CancellationToken;
use crate::tools::{self, Submission};
use crate::worker;

/// Partitions of every topic the dev cluster creates.
pub const DEV_PARTITIONS: i32 = 4;

/// Why the dev cluster could not start or answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// librdkafka refused to create the mock cluster or a topic.
    #[error("embedded cluster: {0}")]
    Cluster(rdkafka::error::KafkaError),
}

/// A running embedded cluster. Dropping it shuts the cluster down.
pub struct DevCluster {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl DevCluster {
    /// Starts a cluster of `brokers` brokers listening on 127.0.0.1.
    pub fn start(brokers: i32) -> Result<Self, DevError> {
        let cluster = MockCluster::new(brokers).map_err(DevError::Cluster)?;
        Ok(DevCluster { cluster })
    }

    /// The `bootstrap.servers` list of the cluster.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), DevError> {
        self.cluster
            .create_topic(topic, partitions, 1)
            .map_err(DevError::Cluster)
    }

    /// Creates every topic `settings` needs ([`Settings::topology`]; the
    /// mock cluster has no admin CreateTopics, so `conveyor topics` cannot
    /// do it here). Returns them, sorted.
    pub fn create_topics_for(&self, settings: &Settings) -> Result<Vec<String>, DevError> {
        let topics: Vec<String> = settings.topology().into_iter().map(|t| t.name).collect();
        for topic in &topics {
            self.create_topic(topic, DEV_PARTITIONS)?;
        }
        Ok(topics)
    }
}

/// The demo workflow of `conveyor dev`: count the words of a text, its
/// lines counted in parallel.
pub const DEV_WORKFLOW: &str = "wordcount";

/// The configuration `conveyor dev` runs: one processor with the built-in
/// handlers and the demo workflow ([`DEV_WORKFLOW`]: `split_lines` fans a
/// text out into lines, `word_count` counts each, `sum` joins the counts),
/// against the embedded cluster at `bootstrap`.
pub fn dev_settings(bootstrap: &str) -> Settings {
    let mut settings = Settings::default();
    settings.kafka.brokers = bootstrap.to_owned();
    settings.kafka.client_id = "conveyor-dev".into();
    // Any free port: several dev instances may run on one machine.
    settings.metrics.listen = "127.0.0.1:0".into();
    let task = TaskSettings::new;
    settings.processors.push(ProcessorSettings {
        name: "dev".into(),
        tasks: [
            ("echo".to_owned(), task(HandlerKind::Echo)),
            ("sleep".to_owned(), task(HandlerKind::Sleep)),
            ("sha256".to_owned(), task(HandlerKind::Sha256)),
            ("split_lines".to_owned(), task(HandlerKind::SplitLines)),
            ("word_count".to_owned(), task(HandlerKind::WordCount)),
            ("sum".to_owned(), task(HandlerKind::Sum)),
        ]
        .into_iter()
        .collect(),
        ..ProcessorSettings::default()
    });
    let step = |task: &str, fan_out: bool, join: bool| StepSettings {
        task: task.into(),
        fan_out,
        join,
    };
    settings.workflows.push(WorkflowSettings {
        name: DEV_WORKFLOW.into(),
        steps: vec![
            step("split_lines", true, false),
            step("word_count", false, false),
            step("sum", false, true),
        ],
        timeout_ms: 60_000,
        max_fan_out: crate::settings::DEFAULT_MAX_FAN_OUT,
    });
    settings.fill_derived();
    settings
}

/// Submits one `echo` task and waits for its result (`conveyor dev`'s
/// start-up check).
async fn check_round_trip(settings: &Settings) -> anyhow::Result<()> {
    let submission = Submission {
        task_type: "echo".into(),
        payload: r#"{"hello":"conveyor"}"#.into(),
        key: None,
        count: 1,
        topic: None,
        run_at: None,
    };
    let started = Instant::now();
    let ids = tools::submit(settings, &submission).await?;
    if let Some(&id) = ids.first() {
        let result = tools::wait_for_result(settings, id, Duration::from_secs(30)).await?;
        println!(
            "  check: task {id} (echo) went through the worker: {} in {} ms",
            result.status.symbol(),
            started.elapsed().as_millis()
        );
        anyhow::ensure!(
            result.status == TaskStatus::Succeeded,
            "the check task failed: {:?}",
            result.error
        );
    }
    Ok(())
}

/// Runs `conveyor dev`: the embedded cluster with `user_settings`' topics
/// (or [`dev_settings`]), the worker, the gateway and the start-up check;
/// prints where everything is and how to try it, and returns once a signal
/// stopped it all.
pub async fn run(user_settings: Option<Settings>) -> anyhow::Result<()> {
    let cluster = DevCluster::start(1)?;
    let bootstrap = cluster.bootstrap_servers();
    let settings = match user_settings {
        Some(mut settings) => {
            settings.kafka.brokers = bootstrap.clone();
            settings
        }
        None => dev_settings(&bootstrap),
    };
    let topics = cluster.create_topics_for(&settings)?;
    println!(
        "conveyor dev: embedded Kafka-protocol cluster (librdkafka mock, in memory) on {bootstrap}"
    );
    println!(
        "  topics, {DEV_PARTITIONS} partitions each: {}",
        topics.join(", ")
    );

    let specs = worker::processor_specs(&settings).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(address) = crate::app::serve_probes(&settings, &specs)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
    {
        println!("  metrics: http://{address}/metrics");
    }
    for spec in &specs {
        let types: Vec<&str> = spec.settings.tasks.keys().map(String::as_str).collect();
        println!(
            "  worker: processor `{}` runs task types {}",
            spec.settings.name,
            types.join(", ")
        );
    }
    // The stop order: a signal stops the gateway (nothing new comes in);
    // once it has answered what was in flight, the processors drain,
    // commit and flush their producers. A worker that ends by itself (it
    // failed) stops the gateway too.
    let stop = CancellationToken::new();
    crate::shutdown::stop_on_signals(stop.clone());
    let worker_stop = CancellationToken::new();
    // The delay mover and the scheduler, as `conveyor worker` runs them:
    // they stop with the processors, and their failure stops everything.
    let companions = crate::app::Companions::start(&settings, &specs, &worker_stop, &stop);
    let metrics = specs.first().map(|s| s.metrics.clone()).unwrap_or_default();
    let running = {
        let (worker_stop, stop) = (worker_stop.clone(), stop.clone());
        tokio::spawn(async move {
            let ran = worker::run(specs, worker_stop).await;
            stop.cancel();
            ran
        })
    };
    let started = match crate::gateway::start(&settings, metrics.clone(), stop.clone()).await {
        Err(crate::gateway::GatewayError::Bind { .. }) => {
            // Another program has the port: any free one will do here.
            let mut settings = settings.clone();
            settings.gateway.listen = "127.0.0.1:0".into();
            crate::gateway::start(&settings, metrics, stop.clone()).await
        }
        other => other,
    };
    let gateway = match started {
        Ok(gateway) => gateway,
        Err(error) => {
            worker_stop.cancel();
            let _ = running.await;
            let _ = companions.finish().await;
            return Err(error.into());
        }
    };
    let api = format!("http://{}", gateway.address());
    println!("  gateway: {api} (API described at {api}/openapi.json)");
    if settings.gateway.ui {
        println!("  dashboard: {api}/ui");
    }

    // Prove the whole path: a task in, its result out. Only with the
    // built-in echo handler: another type's handler may be a user's web
    // endpoint that is not up yet, or may refuse the check's payload.
    let has_echo = settings
        .processors
        .iter()
        .flat_map(|p| p.tasks.iter())
        .any(|(name, task)| name == "echo" && task.handler == HandlerKind::Echo);
    if has_echo {
        if let Err(error) = check_round_trip(&settings).await {
            // Stop what runs before the cluster goes, or the worker would
            // keep calling a broker that is gone.
            stop.cancel();
            let _ = gateway.finished().await;
            worker_stop.cancel();
            let _ = running.await;
            let _ = companions.finish().await;
            return Err(error);
        }
    } else {
        println!("  check: skipped (no task type with the built-in `echo` handler to try)");
    }
    let exe = "cargo run --release --";
    // The examples below use `sleep` when configured, else the first type.
    let types: Vec<&String> = settings
        .processors
        .iter()
        .flat_map(|p| p.tasks.keys())
        .collect();
    let (try_type, try_payload) = match types.iter().find(|t| t.as_str() == "sleep") {
        Some(_) => ("sleep", r#"{"ms": 500}"#),
        None => (
            types.first().map_or("echo", |t| t.as_str()),
            r#"{"hello": "conveyor"}"#,
        ),
    };
    println!(
        "  try, in another shell: submit a task over HTTP, then wait up to 10 s for its result:"
    );
    println!(
        "    id=$(curl -s -X POST {api}/v1/tasks -H 'content-type: application/json' \
         -d '{{\"type\": \"{try_type}\", \"payload\": {try_payload}}}' | sed 's/.*\"id\":\"\\([^\"]*\\)\".*/\\1/')"
    );
    println!("    curl -s \"{api}/v1/tasks/$id?wait=10s\"");
    let has_workflow = settings.workflows.iter().any(|w| w.name == DEV_WORKFLOW);
    if has_workflow {
        println!(
            "  a workflow: split a text into lines, count each line's words in parallel, add them up:"
        );
        println!(
            "    run=$(curl -s -X POST {api}/v1/workflows/{} -H 'content-type: application/json' \
             -d '{{\"payload\": {{\"text\": \"one two\\nthree four five\\nsix\"}}}}' | sed 's/.*\"id\":\"\\([^\"]*\\)\".*/\\1/')",
            DEV_WORKFLOW
        );
        println!("    curl -s \"{api}/v1/workflows/$run?wait=10s\"");
    }
    println!("  or with the command line:");
    println!(
        "    {exe} submit --brokers {bootstrap} --type {try_type} --payload '{try_payload}' --count 3"
    );
    println!("    {exe} results --brokers {bootstrap} --follow");
    // The command line knows workflows from a configuration file: write
    // this one's where the commands can read it.
    let dev_config = std::env::temp_dir().join(format!("conveyor-dev-{}.toml", std::process::id()));
    if has_workflow {
        let written = settings
            .to_toml()
            .map_err(|e| anyhow::anyhow!("{e}"))
            .and_then(|text| std::fs::write(&dev_config, text).map_err(Into::into));
        if written.is_ok() {
            println!(
                "    {exe} --config {} workflow start {} --payload '{{\"text\": \"a b\\nc\"}}' --wait 10",
                dev_config.display(),
                DEV_WORKFLOW
            );
        }
    }
    println!("  Ctrl-C stops the gateway, the worker (draining in-flight tasks) and the cluster.");
    let served = gateway.finished().await;
    worker_stop.cancel();
    let ran = running.await;
    companions.finish().await?;
    ran??;
    served?;
    if has_workflow {
        let _ = std::fs::remove_file(&dev_config);
    }
    drop(cluster);
    Ok(())
}
