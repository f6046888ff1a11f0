//! Delayed tasks: they wait in tier topics, not in memory.
//!
//! A tier is a topic whose records all wait the same time, the tier's
//! length, counted from when each was written (its timestamp). Records of
//! one tier partition are therefore due in the order they were written:
//! the mover reads a partition's head, and if it is not due yet, keeps
//! that one record and pauses the partition until it is. Nothing later in
//! the partition can be due sooner, so nothing waits behind it; a task
//! with a short delay never waits behind one with a long delay, which is
//! in another tier.
//!
//! A task delayed by `d` enters the longest tier not longer than `d` plus
//! the shortest tier (the precision the shortest tier sets anyway): a
//! delay just under a tier's length, such as a 60 s retry backoff that
//! reaches the tiers a few ms after it was decided, takes that one tier
//! rather than a dozen shorter ones, and comes out a few ms late. When it
//! leaves a tier, what is left of its delay decides again: another tier,
//! or, once its time has come, its task topic. The move is produced (`acks=all`,
//! idempotent) and acknowledged before the tier record's offset is stored
//! for the next commit, so a crash repeats a move and never loses one; a
//! repeated move is a duplicate task record with the same id.
//!
//! Precision: a task starts no earlier than its time, and at most the
//! shortest tier later (plus the movers' lag and the processor's). Cost:
//! one write per tier entered; with the default tiers (1 s, 10 s, 1 min,
//! 10 min, 1 h, 10 h) at most 9 + 5 + 9 + 5 + 9 writes below 10 hours and
//! one more per 10 hours above. Memory: one waiting record per tier
//! partition assigned, whatever the number of delayed tasks.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot::Canceled;
use futures::stream::{FuturesOrdered, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::Producer;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use crate::codec::now_millis;
use crate::codec::wire as headers;
use crate::metrics::Metrics;
use crate::settings::{DelaySettings, Settings};
use crate::shutdown::CancellationToken;

/// Most moves produced and not yet acknowledged: the mover reads no more
/// records while this many wait.
pub const MAX_MOVES_IN_FLIGHT: usize = 2_000;
/// Bytes of tier records librdkafka may fetch ahead, for all partitions.
const PREFETCH_BYTES: u64 = 8 * 1024 * 1024;
/// How often the mover measures the tiers' lag.
const LAG_EVERY: Duration = Duration::from_secs(5);
/// How often the mover commits the offsets of acknowledged moves.
const MOVER_COMMIT_INTERVAL_MS: u64 = 250;
/// How long a stopping mover waits for its moves to be acknowledged.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The tiers, shortest first: each one's length (ms) and topic.
#[derive(Debug, Clone)]
pub struct Tiers {
    tiers: Vec<(i64, String)>,
    max_delay_ms: i64,
}

/// Where a delayed task goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Its time has come: its task topic.
    Due,
    /// The tier with this index.
    Tier(usize),
}

impl Tiers {
    /// The tiers `settings` configure.
    pub fn new(settings: &DelaySettings) -> Self {
        let ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        Tiers {
            tiers: settings
                .tier_topics()
                .into_iter()
                .map(|(s, topic)| (ms(s), topic))
                .collect(),
            max_delay_ms: ms(settings.max_delay_s),
        }
    }

    /// The longest delay accepted, in ms.
    pub fn max_delay_ms(&self) -> i64 {
        self.max_delay_ms
    }

    /// The tier topics, shortest first.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.tiers.iter().map(|(_, t)| t.as_str())
    }

    /// A tier's topic.
    pub fn topic(&self, index: usize) -> Option<&str> {
        self.tiers.get(index).map(|(_, t)| t.as_str())
    }

    /// The length (ms) of the tier `topic`.
    pub fn length_of(&self, topic: &str) -> Option<i64> {
        self.tiers
            .iter()
            .find(|(_, t)| t == topic)
            .map(|(ms, _)| *ms)
    }

    /// The tier a wait of `remaining_ms` waits in, when it is at least the
    /// shortest tier (a shorter one would come out late by up to that
    /// tier's length).
    pub fn holding(&self, remaining_ms: i64) -> Option<&str> {
        let shortest = self.tiers.first().map(|(ms, _)| *ms)?;
        if remaining_ms < shortest {
            return None;
        }
        match self.route(remaining_ms) {
            Route::Tier(i) => self.topic(i),
            Route::Due => None,
        }
    }

    /// The tier a task to start at `run_at` (ms since the epoch) waits in
    /// when submitted at `now`; `None` when it is due already.
    pub fn tier_for(&self, run_at: i64, now: i64) -> Option<&str> {
        match self.route(run_at.saturating_sub(now)) {
            Route::Tier(i) => self.topic(i),
            Route::Due => None,
        }
    }

    /// Where a task with `remaining_ms` of its delay left goes: its task
    /// topic when nothing is left, else the longest tier not longer than
    /// what is left plus the shortest tier (see the module's notes), or
    /// the shortest when every tier is longer.
    pub fn route(&self, remaining_ms: i64) -> Route {
        let Some(shortest) = self.tiers.first().map(|(ms, _)| *ms) else {
            return Route::Due;
        };
        if remaining_ms <= 0 {
            return Route::Due;
        }
        let within = remaining_ms.saturating_add(shortest);
        let longest_within = self
            .tiers
            .iter()
            .rposition(|(ms, _)| *ms <= within)
            .unwrap_or(0);
        Route::Tier(longest_within)
    }
}

/// A delay: a duration such as `500ms`, `90s`, `10m`, `1h` or `30d`.
pub fn parse_delay(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "`{text}` is not a duration such as 90s, 10m, 1h or 30d \
             (a whole number of at most {} digits, no leading zero, \
             then ms, s, m, h or d)",
            crate::gateway::api::MAX_DURATION_DIGITS
        )
    };
    let (number, unit_s) = if let Some(n) = text.strip_suffix('h') {
        (n, 3600)
    } else if let Some(n) = text.strip_suffix('d') {
        (n, 86_400)
    } else {
        return crate::gateway::api::parse_duration(text).map_err(|_| bad());
    };
    if number.is_empty()
        || number.len() > crate::gateway::api::MAX_DURATION_DIGITS
        || !number.chars().all(|c| c.is_ascii_digit())
        || (number.len() > 1 && number.starts_with('0'))
    {
        return Err(bad());
    }
    let n: u64 = number.parse().map_err(|_| bad())?;
    n.checked_mul(unit_s)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

/// An RFC 3339 time with its UTC offset, as ms since the epoch.
pub fn parse_run_at(text: &str) -> Result<i64, String> {
    match chrono::DateTime::parse_from_rfc3339(text) {
        Ok(at) => Ok(at.timestamp_millis()),
        Err(_) => {
            let no_offset =
                chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").is_ok();
            Err(if no_offset {
                format!("`{text}` has no UTC offset: add one, such as Z or +01:00")
            } else {
                format!(
                    "`{text}` is not an RFC 3339 time with its UTC offset, such as 2026-12-24T18:00:00+01:00"
                )
            })
        }
    }
}

/// When a task given `delay` or `run_at` (at most one; as the options
/// `--delay` and `--run-at` take them) is to start: ms since the epoch, or
/// `None` for now. An error names the option at fault.
pub fn start_time(
    delay: Option<&str>,
    run_at: Option<&str>,
    settings: &DelaySettings,
    now: i64,
) -> Result<Option<i64>, String> {
    let (option, at) = match (delay, run_at) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => return Err("--run-at: give --delay or --run-at, not both".into()),
        (Some(delay), None) => {
            let after = parse_delay(delay).map_err(|why| format!("--delay: {why}"))?;
            let ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
            ("--delay", now.saturating_add(ms))
        }
        (None, Some(run_at)) => (
            "--run-at",
            parse_run_at(run_at).map_err(|why| format!("--run-at: {why}"))?,
        ),
    };
    if !settings.enabled {
        return Err(format!(
            "{option}: delayed tasks are off ([delays] enabled = false)"
        ));
    }
    let max = i64::try_from(settings.max_delay_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    within_max(at, max, now).map_err(|why| format!("{option}: {why}"))
}

/// `at` (ms since the epoch) as a start time: `None` (now) when it is not
/// after `now`, refused when it is more than `max_delay_ms` ahead. Shared
/// by the gateway and the command line.
pub fn within_max(at: i64, max_delay_ms: i64, now: i64) -> Result<Option<i64>, String> {
    if at.saturating_sub(now) > max_delay_ms {
        return Err(format!(
            "is more than {} from now, the longest delay accepted (delays.max_delay_s)",
            crate::settings::tier_label(u64::try_from(max_delay_ms / 1000).unwrap_or(0))
        ));
    }
    Ok((at > now).then_some(at))
}

/// The mover's consumer context: counts rebalances (a record held or a
/// move sent in an earlier assignment is not this one's to commit), and
/// resumes assigned partitions (librdkafka keeps a pause across
/// assignments, and a partition paused for a record no longer held would
/// never be read again).
struct MoverContext {
    generation: AtomicU64,
}

impl ClientContext for MoverContext {}

impl ConsumerContext for MoverContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Rebalance::Assign(list) = rebalance {
            if let Err(e) = consumer.resume(list) {
                warn!(error = %e, "delay mover: cannot resume assigned tier partitions");
            }
            info!(
                partitions = list.count(),
                "delay mover: tier partitions assigned"
            );
        }
    }
}

/// The records of one tier partition read and not yet moved, waiting for
/// the first one's time (the partition is paused meanwhile).
struct Waiting {
    generation: u64,
    records: VecDeque<(i64, OwnedMessage)>,
}

/// A move sent: the tier record it came from.
struct Sent {
    topic: String,
    partition: i32,
    offset: i64,
}

/// The mover's failure: it cannot go on without losing a task.
#[derive(Debug, thiserror::Error)]
pub enum MoverError {
    /// A client could not be made, or a tier topic is missing.
    #[error("delay mover: {0}")]
    Setup(String),
    /// A move was not acknowledged (librdkafka gave up after its own
    /// retries): stopping, so the tier record is read again by whoever
    /// takes its partition next.
    #[error("delay mover: a move from {topic} [{partition}] offset {offset} was not acknowledged: {error}")]
    Move {
        /// The tier topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// The tier record's offset.
        offset: i64,
        /// librdkafka's error.
        error: String,
    },
}

/// Everything the mover needs.
pub struct MoverSpec {
    /// The whole configuration (its `[kafka]`, `[delays]`, `[topics]`).
    pub settings: Settings,
    /// Where moves and problems are counted.
    pub metrics: Arc<Metrics>,
}

/// When a record read from `tier_ms`'s tier leaves it: its timestamp plus
/// the tier's length (now, when it has no timestamp).
fn leaves_at(message: &OwnedMessage, tier_ms: i64, now: i64) -> i64 {
    message
        .timestamp()
        .to_millis()
        .map_or(now, |written| written.saturating_add(tier_ms))
}

/// The header `key` of `message`, as text.
fn header(message: &OwnedMessage, key: &str) -> Option<String> {
    message.headers().and_then(|h| headers::value(h, key))
}

/// Moves delayed tasks through the tiers until `stop`; every worker runs
/// one, all in the group `delays.group_id`.
pub async fn run(spec: MoverSpec, stop: CancellationToken) -> Result<(), MoverError> {
    let settings = &spec.settings;
    let tiers = Tiers::new(&settings.delays);
    let topics: Vec<&str> = tiers.topics().collect();
    let mut config = crate::kafka::consumer_config(
        &settings.kafka,
        &settings.delays.group_id,
        settings.delays.session_timeout_ms,
    );
    for (key, value) in crate::kafka::prefetch_limits(PREFETCH_BYTES, topics.len() * 8) {
        if !settings.kafka.options.contains_key(key) {
            config.set(key, value);
        }
    }
    // Stored offsets (only of acknowledged moves) are committed every
    // quarter second: a crash repeats the moves of about its last quarter
    // second, and those in flight.
    config.set("enable.auto.commit", "true");
    config.set(
        "auto.commit.interval.ms",
        MOVER_COMMIT_INTERVAL_MS.to_string(),
    );
    config.set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer<MoverContext> = config
        .create_with_context(MoverContext {
            generation: AtomicU64::new(0),
        })
        .map_err(|e| MoverError::Setup(format!("cannot create the consumer: {e}")))?;
    let producer: FutureProducer = crate::kafka::producer_config(&settings.kafka)
        .create()
        .map_err(|e| MoverError::Setup(format!("cannot create the producer: {e}")))?;
    check_tiers(&producer, &topics)?;
    consumer
        .subscribe(&topics)
        .map_err(|e| MoverError::Setup(format!("cannot subscribe to the tiers: {e}")))?;
    info!(tiers = ?topics, group = %settings.delays.group_id, "delay mover started");

    let generation = || consumer.context().generation.load(Ordering::Acquire);
    let mut lag_check = tokio::time::interval(LAG_EVERY);
    let mut lag_task: Option<tokio::task::JoinHandle<()>> = None;
    let mut waiting: HashMap<(String, i32), Waiting> = HashMap::new();
    let mut sent = FuturesOrdered::new();
    let dead_letters = settings.topics.dead_letter.clone();
    let outcome = loop {
        // Records of earlier assignments are not this one's to move.
        let current = generation();
        waiting.retain(|_, w| w.generation == current);
        // Move what is due, in each partition's order.
        let now = now_millis();
        let mut failed = None;
        let mut resumed = TopicPartitionList::new();
        for ((topic, partition), w) in &mut waiting {
            while w.records.front().is_some_and(|(at, _)| *at <= now)
                && sent.len() < MAX_MOVES_IN_FLIGHT
            {
                let Some((_, message)) = w.records.pop_front() else {
                    break;
                };
                let delivery =
                    match send_move(&producer, &tiers, &message, &dead_letters, &spec.metrics) {
                        Ok(delivery) => delivery,
                        Err(error) => {
                            failed = Some(MoverError::Move {
                                topic: topic.clone(),
                                partition: *partition,
                                offset: message.offset(),
                                error,
                            });
                            break;
                        }
                    };
                let record = Sent {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: message.offset(),
                };
                sent.push_back(async move { (record, delivery.await) });
            }
            if w.records.is_empty() {
                resumed.add_partition(topic, *partition);
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        waiting.retain(|_, w| !w.records.is_empty());
        if resumed.count() > 0 {
            if let Err(e) = consumer.resume(&resumed) {
                warn!(error = %e, "delay mover: cannot resume tier partitions");
            }
        }
        spec.metrics
            .delay_partitions_waiting
            .with_label_values::<&str>(&[])
            .set(i64::try_from(waiting.len()).unwrap_or(i64::MAX));
        let next_due = waiting
            .values()
            .filter_map(|w| w.records.front().map(|(at, _)| *at))
            .min();
        // Due and not moved (the moves in flight are at their bound).
        let overdue_ms = next_due.map_or(0, |at| now.saturating_sub(at).max(0));
        spec.metrics
            .delay_overdue
            .with_label_values::<&str>(&[])
            .set(overdue_ms / 1000);
        let sleep = next_due.map_or(Duration::from_secs(1), |at| {
            Duration::from_millis(u64::try_from(at.saturating_sub(now)).unwrap_or(0).min(1000))
        });
        let room = sent.len() < MAX_MOVES_IN_FLIGHT;
        // At the bound, only an acknowledgement makes progress: no spinning
        // on records already due.
        let sleep = if room { sleep } else { Duration::from_secs(1) };
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            Some((record, result)) = sent.next(), if !sent.is_empty() => {
                if let Err(e) = acknowledged(&consumer, record, result) {
                    break Err(e);
                }
            }
            received = consumer.recv(), if room => match received {
                Err(e) => warn!(error = %e, "delay mover: consumer error; continuing"),
                Ok(message) => {
                    let message = message.detach();
                    let key = (message.topic().to_owned(), message.partition());
                    let tier_ms = tiers.length_of(&key.0).unwrap_or(0);
                    let at = leaves_at(&message, tier_ms, now_millis());
                    // A rebalance may have run inside `recv`: what is held
                    // of an earlier assignment is read again from the
                    // committed offset, after this record if not before.
                    let current = generation();
                    let w = waiting.entry(key.clone()).or_insert_with(|| Waiting {
                        generation: current,
                        records: VecDeque::new(),
                    });
                    if w.generation != current {
                        w.generation = current;
                        w.records.clear();
                    }
                    if w.records.is_empty() && at > now_millis() {
                        let mut list = TopicPartitionList::new();
                        list.add_partition(&key.0, key.1);
                        if let Err(e) = consumer.pause(&list) {
                            warn!(error = %e, "delay mover: cannot pause a tier partition");
                        }
                    }
                    w.records.push_back((at, message));
                }
            },
            _ = lag_check.tick() => {
                if lag_task.as_ref().is_none_or(|t| t.is_finished()) {
                    lag_task = measure_lag(&consumer, &producer, &tiers, &spec.metrics);
                }
            }
            _ = tokio::time::sleep(sleep) => {}
        }
    };
    // Let what was sent be acknowledged, then commit it.
    let grace = tokio::time::sleep(STOP_GRACE);
    tokio::pin!(grace);
    while !sent.is_empty() {
        tokio::select! {
            Some((record, result)) = sent.next() => {
                if let Err(e) = acknowledged(&consumer, record, result) {
                    error!(%e, "delay mover: stopping");
                    break;
                }
            }
            _ = &mut grace => {
                warn!(unacknowledged = sent.len(), "delay mover: stopping with moves not yet acknowledged; they are moved again");
                break;
            }
        }
    }
    if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        debug!(error = %e, "delay mover: final commit");
    }
    outcome
}

/// Sets `conveyor_delay_tier_lag_messages{tier}` in the background: per
/// tier partition this mover owns, its high watermark (asked of the
/// broker: a paused partition is not fetched, so librdkafka's own figure
/// goes stale) less the mover's position, the offset after the last record
/// it read — the records waiting behind the one it holds.
fn measure_lag(
    consumer: &StreamConsumer<MoverContext>,
    producer: &FutureProducer,
    tiers: &Tiers,
    metrics: &Arc<Metrics>,
) -> Option<tokio::task::JoinHandle<()>> {
    let positions = consumer.position().ok()?;
    let owned: Vec<(String, i32, i64)> = positions
        .elements()
        .iter()
        .map(|e| {
            let at = match e.offset() {
                Offset::Offset(at) => at,
                _ => -1,
            };
            (e.topic().to_owned(), e.partition(), at)
        })
        .collect();
    let topics: Vec<String> = tiers.topics().map(str::to_owned).collect();
    let (producer, metrics) = (producer.clone(), metrics.clone());
    Some(tokio::task::spawn_blocking(move || {
        let mut lag: HashMap<&str, i64> = topics.iter().map(|t| (t.as_str(), 0)).collect();
        for (topic, partition, at) in &owned {
            let Some(sum) = lag.get_mut(topic.as_str()) else {
                continue;
            };
            if *at < 0 {
                continue;
            }
            match producer
                .client()
                .fetch_watermarks(topic, *partition, Duration::from_secs(2))
            {
                Ok((_, high)) => *sum += (high - at).max(0),
                Err(e) => debug!(error = %e, %topic, partition, "delay mover: no high watermark"),
            }
        }
        for (topic, sum) in lag {
            metrics.delay_tier_lag.with_label_values(&[topic]).set(sum);
        }
    }))
}

/// Every tier topic exists, or the error naming the missing ones.
fn check_tiers(producer: &FutureProducer, topics: &[&str]) -> Result<(), MoverError> {
    let metadata = producer
        .client()
        .fetch_metadata(None, Duration::from_secs(30))
        .map_err(|e| MoverError::Setup(format!("cannot read the cluster's topics: {e}")))?;
    let missing: Vec<&str> = topics
        .iter()
        .copied()
        .filter(|t| {
            !metadata
                .topics()
                .iter()
                .any(|m| m.name() == *t && m.error().is_none())
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MoverError::Setup(format!(
            "the delay tier topics {} do not exist: run `conveyor topics create`, or set [delays] enabled = false",
            missing.join(", ")
        )))
    }
}

/// Stores the offset after a tier record whose move was acknowledged.
/// Moves are acknowledged in the order they were sent, so every earlier
/// record of the partition has moved too; a partition no longer owned
/// refuses the store, and one revoked and assigned again since has its
/// earlier moves repeated from the committed offset (duplicates, not a
/// gap).
fn acknowledged(
    consumer: &StreamConsumer<MoverContext>,
    record: Sent,
    result: Result<OwnedDeliveryResult, Canceled>,
) -> Result<(), MoverError> {
    let error = match result {
        Ok(Ok(_)) => None,
        Ok(Err((e, _))) => Some(e.to_string()),
        Err(Canceled) => Some("the producer stopped".to_owned()),
    };
    if let Some(error) = error {
        return Err(MoverError::Move {
            topic: record.topic,
            partition: record.partition,
            offset: record.offset,
            error,
        });
    }
    let mut list = TopicPartitionList::new();
    if let Err(e) = list
        .add_partition_offset(
            &record.topic,
            record.partition,
            Offset::Offset(record.offset.saturating_add(1)),
        )
        .and_then(|()| consumer.store_offsets(&list))
    {
        debug!(error = %e, topic = %record.topic, partition = record.partition, "delay mover: offset not stored (partition revoked)");
    }
    Ok(())
}

/// Produces the move of a due tier record: to the next tier or, when its
/// time has come, to its task topic; a record without what it takes to
/// move it (written by something else than conveyor) goes to the dead
/// letters, with why.
fn send_move(
    producer: &FutureProducer,
    tiers: &Tiers,
    message: &OwnedMessage,
    dead_letters: &str,
    metrics: &Metrics,
) -> Result<DeliveryFuture, String> {
    let now = now_millis();
    let run_at = header(message, headers::RUN_AT).and_then(|v| v.parse::<i64>().ok());
    let destination = header(message, headers::DELAY_DESTINATION).filter(|t| !t.is_empty());
    let (topic, route, problem) = match (run_at, destination) {
        (Some(run_at), Some(destination)) => match tiers.route(run_at.saturating_sub(now)) {
            Route::Due => (destination, "task", None),
            Route::Tier(i) => (
                tiers.topic(i).unwrap_or(&destination).to_owned(),
                "tier",
                None,
            ),
        },
        (None, _) => (
            dead_letters.to_owned(),
            "dead_letter",
            Some(format!(
                "header {} missing or not a number of ms",
                headers::RUN_AT
            )),
        ),
        (_, None) => (
            dead_letters.to_owned(),
            "dead_letter",
            Some(format!("header {} missing", headers::DELAY_DESTINATION)),
        ),
    };
    let mut out = message
        .headers()
        .map_or_else(OwnedHeaders::new, |h| h.as_borrowed().detach());
    if let Some(problem) = &problem {
        warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(), %problem,
              "delay mover: a tier record cannot be moved; dead-lettered");
        out = headers::replace(out, headers::ERROR_KIND, "delay");
        out = headers::replace(out, headers::ERROR_MESSAGE, problem);
        out = headers::replace(out, headers::ORIGINAL_TOPIC, message.topic());
        out = headers::replace(
            out,
            headers::ORIGINAL_PARTITION,
            &message.partition().to_string(),
        );
        out = headers::replace(out, headers::ORIGINAL_OFFSET, &message.offset().to_string());
    }
    metrics.delay_moves.with_label_values(&[route]).inc();
    let mut record = FutureRecord::to(&topic)
        .payload(message.payload().unwrap_or_default())
        .headers(out)
        .timestamp(now);
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    // The producer's queue holds far more than MAX_MOVES_IN_FLIGHT: a
    // refusal means it is closing or broken.
    producer
        .send_result(record)
        .map_err(|(e, _)| format!("cannot queue the move: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_waits_in_the_longest_tier_within_what_is_left() {
        let tiers = Tiers::new(&DelaySettings::default());
        assert_eq!(tiers.route(0), Route::Due);
        assert_eq!(tiers.route(-5), Route::Due);
        // Shorter than every tier: the shortest (late by under a second).
        assert_eq!(tiers.route(400), Route::Tier(0));
        assert_eq!(tiers.route(1_000), Route::Tier(0));
        assert_eq!(tiers.route(8_999), Route::Tier(0));
        // Within the shortest tier of a tier's length: that tier, at most
        // the shortest tier late.
        assert_eq!(tiers.route(9_000), Route::Tier(1));
        assert_eq!(tiers.route(10_000), Route::Tier(1));
        assert_eq!(tiers.route(59_999), Route::Tier(2));
        assert_eq!(tiers.route(3_598_999), Route::Tier(3));
        assert_eq!(tiers.route(3_599_999), Route::Tier(4));
        assert_eq!(tiers.route(3_600_000), Route::Tier(4));
        assert_eq!(tiers.route(30 * 24 * 3_600_000), Route::Tier(5));
        assert_eq!(tiers.topic(4), Some("conveyor.delay.1h"));
        assert_eq!(tiers.length_of("conveyor.delay.10m"), Some(600_000));
        assert_eq!(tiers.length_of("conveyor.tasks.x"), None);
        // A retry's backoff shorter than every tier waits in memory.
        assert_eq!(tiers.holding(999), None);
        assert_eq!(tiers.holding(1_000), Some("conveyor.delay.1s"));
        assert_eq!(tiers.holding(60_000), Some("conveyor.delay.1m"));
        // A minute's backoff, a few ms after it was decided: one tier.
        assert_eq!(tiers.holding(59_990), Some("conveyor.delay.1m"));
    }

    #[test]
    fn the_command_line_start_names_the_option_at_fault() {
        let on = DelaySettings::default();
        let now = 1_000;
        assert_eq!(start_time(None, None, &on, now), Ok(None));
        assert_eq!(start_time(Some("2m"), None, &on, now), Ok(Some(121_000)));
        assert_eq!(
            start_time(None, Some("1970-01-01T00:00:03+00:00"), &on, now),
            Ok(Some(3_000))
        );
        let refused = |delay, run_at, settings: &DelaySettings| {
            start_time(delay, run_at, settings, now).expect_err("refused")
        };
        assert_eq!(
            refused(Some("1s"), Some("x"), &on),
            "--run-at: give --delay or --run-at, not both"
        );
        assert!(refused(Some("soon"), None, &on).starts_with("--delay: `soon` is not a duration"));
        assert!(refused(None, Some("1970-01-01T00:00:03"), &on).contains("no UTC offset"));
        assert!(refused(Some("31d"), None, &on).starts_with("--delay: is more than 30d from now"));
        let off = DelaySettings {
            enabled: false,
            ..DelaySettings::default()
        };
        assert_eq!(
            refused(Some("1s"), None, &off),
            "--delay: delayed tasks are off ([delays] enabled = false)"
        );
    }

    #[test]
    fn every_delay_up_to_the_maximum_reaches_its_topic_in_bounded_hops() {
        // Walks the route as the mover would, leaving each tier exactly
        // when it is due: never early, at most the shortest tier late.
        let tiers = Tiers::new(&DelaySettings::default());
        for delay in [1, 999, 1_000, 61_500, 3_599_999, 7_200_000, 2_592_000_000] {
            let (mut now, mut hops) = (0i64, 0);
            loop {
                match tiers.route(delay - now) {
                    Route::Due => break,
                    Route::Tier(i) => {
                        now += tiers.tiers[i].0;
                        hops += 1;
                    }
                }
                assert!(hops < 200, "delay {delay}: too many hops");
            }
            assert!(now >= delay, "delay {delay}: left at {now}, early");
            assert!(now < delay + 1_000, "delay {delay}: left at {now}, late");
        }
    }
}
