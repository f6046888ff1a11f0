//! Command-line helpers around the topics: `conveyor submit` produces task
//! requests, `conveyor results` prints decoded results, and
//! [`wait_for_result`] follows the results topic until one task's result
//! arrives (used by `conveyor dev` to prove the whole path works).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Offset;
use serde_json::json;
use uuid::Uuid;

use crate::codec::{TaskRequest, TaskResult};
use crate::kafka::{self, codec_of, Read, Reader};
use crate::settings::Settings;
use crate::shutdown::CancellationToken;

pub(crate) use crate::kafka::kafka_error;
/// Why a tool failed.
pub use crate::kafka::ClientError as ToolError;

/// What `conveyor submit` sends.
#[derive(Debug, Clone)]
pub struct Submission {
    /// Task type.
    pub task_type: String,
    /// JSON payload text.
    pub payload: String,
    /// Optional ordering key.
    pub key: Option<String>,
    /// How many tasks (each with its own id).
    pub count: u32,
    /// Topic; default: the task type's topic.
    pub topic: Option<String>,
    /// Not to start before (ms since the epoch): the tasks wait in a delay
    /// tier (see [`crate::delay::start_time`]).
    pub run_at: Option<i64>,
}

/// Produces the submission's tasks with `acks=all` and returns their ids
/// once the broker has acknowledged every one.
pub async fn submit(settings: &Settings, submission: &Submission) -> Result<Vec<Uuid>, ToolError> {
    if let Err(e) = serde_json::from_str::<serde_json::Value>(&submission.payload) {
        return Err(ToolError::Input(format!(
            "--payload is not valid JSON: {e}"
        )));
    }
    if let Err(e) = crate::settings::check_topic_name(&submission.task_type) {
        return Err(ToolError::Input(format!("--type: task type {e}")));
    }
    if submission.count == 0 {
        return Err(ToolError::Input("--count must be at least 1".into()));
    }
    let codec = codec_of(settings)?;
    let topic = submission
        .topic
        .clone()
        .unwrap_or_else(|| settings.topics.task_topic(&submission.task_type));
    let producer: FutureProducer = kafka::producer_config(&settings.kafka)
        .create()
        .map_err(kafka_error("creating the producer"))?;
    let tiers = crate::delay::Tiers::new(&settings.delays);
    let mut pending = std::collections::VecDeque::new();
    let mut ids = Vec::with_capacity(submission.count as usize);
    for _ in 0..submission.count {
        let mut request = TaskRequest::new(&submission.task_type, submission.payload.clone());
        request.key = submission.key.clone();
        let mut value = Vec::new();
        codec.encode_request(&request, &mut value);
        let key = request
            .key
            .clone()
            .unwrap_or_else(|| request.id.to_string());
        // A delayed task waits in a tier, which knows where it goes.
        let tier = submission
            .run_at
            .and_then(|at| tiers.tier_for(at, crate::codec::now_millis()));
        loop {
            let record = FutureRecord::to(tier.unwrap_or(&topic))
                .key(&key)
                .payload(&value)
                .headers(crate::codec::wire::build([
                    (
                        crate::codec::wire::RUN_AT,
                        submission.run_at.map(|at| at.to_string()),
                    ),
                    (
                        crate::codec::wire::DELAY_DESTINATION,
                        tier.map(|_| topic.clone()),
                    ),
                ]));
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Make room by waiting for the oldest acknowledgement.
                    match pending.pop_front() {
                        Some(oldest) => acknowledged(oldest, &topic).await?,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((e, _)) => return Err(kafka_error(format!("producing to {topic}"))(e)),
            }
        }
        ids.push(request.id);
    }
    for delivery in pending {
        acknowledged(delivery, &topic).await?;
    }
    Ok(ids)
}

/// Starts a run of workflow `name` with `payload` (JSON text): produces
/// its first step's request with `acks=all`; returns the run id and the
/// topic its result will be written to.
pub async fn start_workflow(
    settings: &Settings,
    name: &str,
    payload: &str,
) -> Result<(Uuid, String), ToolError> {
    if let Err(e) = serde_json::from_str::<serde_json::Value>(payload) {
        return Err(ToolError::Input(format!(
            "--payload is not valid JSON: {e}"
        )));
    }
    let workflows = crate::workflow::Workflows::from_settings(settings);
    let Some(definition) = workflows.get(name) else {
        let known: Vec<&str> = workflows.definitions().map(|w| w.name.as_str()).collect();
        return Err(ToolError::Input(format!(
            "no workflow `{name}` in the configuration; defined: {}",
            if known.is_empty() {
                "none (add [[workflows]])".to_owned()
            } else {
                known.join(", ")
            }
        )));
    };
    // The run's result is written by the processor of its last step.
    let last = definition.steps.last().map(|s| s.task.as_str());
    let results = settings
        .processors
        .iter()
        .find(|p| last.is_some_and(|t| p.tasks.contains_key(t)))
        .and_then(|p| p.output_topic.clone())
        .unwrap_or_else(|| settings.topics.results.clone());
    let (topic, request) = workflows
        .start(
            name,
            payload.as_bytes().to_vec(),
            crate::codec::DEFAULT_CONTENT_TYPE.into(),
            Default::default(),
        )
        .map_err(|e| ToolError::Input(e.to_string()))?;
    let codec = codec_of(settings)?;
    let mut value = Vec::new();
    codec.encode_request(&request, &mut value);
    let producer: FutureProducer = kafka::producer_config(&settings.kafka)
        .create()
        .map_err(kafka_error("creating the producer"))?;
    let key = request.id.to_string();
    let delivery = producer
        .send_result(FutureRecord::to(&topic).key(&key).payload(&value))
        .map_err(|(e, _)| kafka_error(format!("producing to {topic}"))(e))?;
    acknowledged(delivery, &topic).await?;
    let run = request.workflow.map_or(request.id, |w| w.id);
    Ok((run, results))
}

async fn acknowledged(
    delivery: rdkafka::producer::DeliveryFuture,
    topic: &str,
) -> Result<(), ToolError> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(kafka_error(format!("producing to {topic}"))(e)),
        Err(_) => Err(ToolError::Stopped(format!(
            "the producer stopped before acknowledging the record to {topic}"
        ))),
    }
}

/// A result as one JSON object: the output is embedded as JSON when its
/// content type says JSON and it parses, else as UTF-8 text when it is
/// text, else as base64 under `output_base64`.
pub fn result_json(result: &TaskResult) -> serde_json::Value {
    let mut value = json!({
        "id": result.id.to_string(),
        "type": result.task_type,
        "status": result.status.symbol(),
        "attempts": result.attempts,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "worker": result.worker,
    });
    if let (Some(output), Some(map)) = (&result.output, value.as_object_mut()) {
        map.insert("content_type".into(), json!(result.content_type));
        embed_bytes(map, "output", output, &result.content_type);
    }
    if let (Some(error), Some(map)) = (&result.error, value.as_object_mut()) {
        map.insert(
            "error".into(),
            json!({ "kind": error.kind, "message": error.message }),
        );
    }
    value
}

pub use crate::codec::render::embed_bytes;

/// Every record of `topic`, from the start to the end it had when read.
pub fn read_topic(
    settings: &Settings,
    topic: &str,
) -> Result<Vec<rdkafka::message::OwnedMessage>, ToolError> {
    let mut records = Vec::new();
    let never = CancellationToken::new();
    scan(settings, topic, false, &never, |m| records.push(m.detach()))?;
    Ok(records)
}

/// The last tick recorded for each configured schedule, read from the
/// whole schedule topic (blocking; records of schedules no longer
/// configured are left out, so the map is bounded by the configuration).
pub fn fired_schedules(
    settings: &Settings,
) -> Result<HashMap<String, crate::schedule::Fired>, ToolError> {
    let mut fired: HashMap<String, crate::schedule::Fired> = HashMap::new();
    let never = CancellationToken::new();
    let configured: HashSet<&str> = settings.schedules.iter().map(|s| s.name.as_str()).collect();
    scan(settings, &settings.scheduler.topic, false, &never, |m| {
        if let Some(f) = crate::schedule::Fired::read(m.payload()) {
            if configured.contains(f.schedule.as_str())
                && fired.get(&f.schedule).is_none_or(|seen| seen.tick < f.tick)
            {
                fired.insert(f.schedule.clone(), f);
            }
        }
    })?;
    Ok(fired)
}

/// Calls `each` with every record of `topic` from the start, until the end
/// of every partition (or, with `follow`, until `stop` is set).
fn scan(
    settings: &Settings,
    topic: &str,
    follow: bool,
    stop: &CancellationToken,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<(), ToolError> {
    let reader = reader(settings, topic)?;
    let partitions = reader
        .client()
        .assignment()
        .map_err(kafka_error("reading the assignment"))?
        .count();
    let mut at_end = HashSet::new();
    while !stop.is_cancelled() {
        if !follow && at_end.len() >= partitions {
            break;
        }
        match reader.read(Duration::from_millis(200)) {
            Read::Idle => {}
            Read::End(p) => {
                at_end.insert(p);
            }
            Read::Error(e) => return Err(kafka_error(format!("reading {topic}"))(e)),
            Read::Record(message) => {
                at_end.remove(&message.partition());
                each(&message);
            }
        }
    }
    Ok(())
}

/// A reader of every partition of `topic` from the beginning.
fn reader(settings: &Settings, topic: &str) -> Result<Reader, ToolError> {
    let reader = Reader::new(&settings.kafka, "reader")?;
    let partitions = reader.partitions(topic)?;
    reader.assign(topic, &partitions, Offset::Beginning)?;
    Ok(reader)
}

/// Prints the results topic's records as JSON lines through `print`, until
/// the end of every partition (or forever with `follow`, until `stop`).
pub fn print_results(
    settings: &Settings,
    follow: bool,
    stop: &CancellationToken,
    mut print: impl FnMut(&str),
) -> Result<usize, ToolError> {
    let codec = codec_of(settings)?;
    let mut printed = 0;
    scan(
        settings,
        &settings.topics.results,
        follow,
        stop,
        |message| {
            let line = match codec.decode_result(message.payload().unwrap_or_default()) {
                Ok(result) => result_json(&result).to_string(),
                Err(e) => json!({
                    "undecodable": e.to_string(),
                    "partition": message.partition(),
                    "offset": message.offset(),
                })
                .to_string(),
            };
            print(&line);
            printed += 1;
        },
    )?;
    Ok(printed)
}

/// Follows the results topic until the result of task `id` arrives.
pub async fn wait_for_result(
    settings: &Settings,
    id: Uuid,
    timeout: Duration,
) -> Result<TaskResult, ToolError> {
    wait_for_result_on(settings, &settings.topics.results, id, timeout).await
}

/// Follows `topic` until the result of task (or workflow run) `id` arrives.
pub async fn wait_for_result_on(
    settings: &Settings,
    topic: &str,
    id: Uuid,
    timeout: Duration,
) -> Result<TaskResult, ToolError> {
    let topic = topic.to_owned();
    let codec = codec_of(settings)?;
    let reader = reader(settings, &topic)?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match reader.read(Duration::ZERO) {
            Read::Record(message) => {
                if let Ok(result) = codec.decode_result(message.payload().unwrap_or_default()) {
                    if result.id == id {
                        return Ok(result);
                    }
                }
            }
            Read::End(_) | Read::Idle => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(ToolError::Timeout(format!(
                        "no result for task {id} on {topic} within {timeout:?}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Read::Error(e) => return Err(kafka_error(format!("reading {topic}"))(e)),
        }
    }
}
