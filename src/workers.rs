//! Worker presence: every worker process reports itself every
//! `workers.report_interval_ms` to a compacted topic keyed by its id (host,
//! pid, version, each processor's assigned partitions with their lag, tasks
//! in flight, tasks a second, breaker state), and a last report marked
//! `stopped` when it shuts down cleanly. Gateways read the topic whole into
//! a [`Directory`] and serve it at `GET /v1/workers` and on the dashboard:
//! live workers, and for `workers.forget_after_ms` those gone (stopped, or
//! silent for three report intervals: killed).
//!
//! A report is JSON, not Avro: only conveyor's gateways read it, every
//! field but the identity has a default, and unknown fields are ignored,
//! so gateways and workers of different versions read each other's. A
//! report is at most [`MAX_REPORT_BYTES`]: past it, partitions are left out
//! of the listing (and counted in `partitions_left_out`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::Offset;
use serde::{Deserialize, Serialize};

use crate::codec::now_millis;
use crate::kafka::{Read, Reader};
use crate::metrics::Metrics;
use crate::processor::{ProcessorSpec, ProcessorStatus};
use crate::settings::{KafkaSettings, WorkerSettings};
use crate::shutdown::CancellationToken;

/// Largest report a worker writes (and a gateway reads), in bytes.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;

/// Most time the last report (`stopped`) may take at shutdown.
const LAST_REPORT_BUDGET: Duration = Duration::from_secs(2);

/// A worker is gone when it has not reported for this many intervals.
const SILENT_INTERVALS: i64 = 3;

/// What one worker process says of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Its id (`<kafka.client_id>-<host>-<pid>`), the record's key.
    pub worker: String,
    /// Host name.
    #[serde(default)]
    pub host: String,
    /// Process id.
    #[serde(default)]
    pub pid: u32,
    /// conveyor's version.
    #[serde(default)]
    pub version: String,
    /// When the process started, ms since the epoch.
    #[serde(default)]
    pub started_at: i64,
    /// When this report was made, ms since the epoch.
    #[serde(default)]
    pub at: i64,
    /// How often it reports, in ms.
    #[serde(default)]
    pub interval_ms: u64,
    /// Its last report: it stopped cleanly.
    #[serde(default)]
    pub stopped: bool,
    /// Its processors.
    #[serde(default)]
    pub processors: Vec<ProcessorReport>,
}

/// One processor of a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ProcessorReport {
    /// Its name.
    pub name: String,
    /// Its consumer group.
    pub group: String,
    /// The topics it reads.
    pub topics: Vec<String>,
    /// Partitions assigned to it.
    pub assigned: usize,
    /// Tasks dispatched and not finished.
    pub in_flight: usize,
    /// Records parked until a retry is due.
    pub parked: usize,
    /// Tasks finished since the process started.
    pub finished: u64,
    /// Tasks finished a second since the previous report.
    pub tasks_per_s: f64,
    /// Whether its poison-pill breaker is open.
    pub breaker_open: bool,
    /// Its partitions with their lag (from librdkafka's statistics, every
    /// `metrics.lag_interval_ms`; none while metrics are off).
    pub partitions: Vec<PartitionReport>,
    /// Partitions left out to keep the report within [`MAX_REPORT_BYTES`].
    pub partitions_left_out: usize,
}

/// One assigned partition and its lag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PartitionReport {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Records after the group's committed offset.
    pub committed_lag: i64,
    /// Records after what this member has read.
    pub processing_lag: i64,
}

/// One processor as the reporter sees it.
struct Watched {
    name: String,
    group: String,
    topics: Vec<String>,
    status: Arc<ProcessorStatus>,
    /// `finished` at the previous report, and when.
    last: (usize, Instant),
}

/// Writes this worker's reports until stopped.
pub struct Presence {
    done: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Presence {
    /// Starts reporting the processors of `specs` (one worker process);
    /// `None` when `[workers]` is off or the producer cannot be made
    /// (logged: reports are for people, the tasks run without them).
    pub fn start(
        settings: &WorkerSettings,
        kafka: &KafkaSettings,
        specs: &[ProcessorSpec],
        metrics: Arc<Metrics>,
    ) -> Option<Presence> {
        if !settings.enabled {
            return None;
        }
        let producer: FutureProducer = match crate::kafka::producer_config(kafka)
            .set("message.timeout.ms", "10000")
            .create()
        {
            Ok(p) => p,
            Err(error) => {
                tracing::warn!(%error, "cannot create the worker report's producer; this worker is not listed");
                return None;
            }
        };
        let worker = specs
            .first()
            .map(|s| s.worker.clone())
            .unwrap_or_else(|| crate::worker::worker_id(&kafka.client_id));
        let watched: Vec<Watched> = specs
            .iter()
            .map(|s| Watched {
                name: s.settings.name.clone(),
                group: s.settings.group(),
                topics: s.settings.read_topics(),
                status: s.status.clone(),
                last: (s.status.finished(), Instant::now()),
            })
            .collect();
        let reporter = Reporter {
            identity: Report {
                host: crate::worker::host_name(),
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_at: now_millis(),
                at: 0,
                interval_ms: settings.report_interval_ms,
                stopped: false,
                processors: Vec::new(),
                worker,
            },
            topic: settings.topic.clone(),
            watched,
            metrics,
            producer,
        };
        let done = CancellationToken::new();
        let task = tokio::spawn(reporter.run(done.clone()));
        Some(Presence { done, task })
    }

    /// Writes the last report (`stopped`) and waits for it to be sent.
    pub async fn stop(self) {
        self.done.cancel();
        let _ = self.task.await;
    }
}

struct Reporter {
    /// The fixed part of every report.
    identity: Report,
    topic: String,
    watched: Vec<Watched>,
    metrics: Arc<Metrics>,
    producer: FutureProducer,
}

impl Reporter {
    async fn run(mut self, done: CancellationToken) {
        let every = Duration::from_millis(self.identity.interval_ms.max(100));
        // A stop does not wait on a report under way (a broker that does
        // not answer holds one for up to `message.timeout.ms`).
        loop {
            tokio::select! {
                () = done.cancelled() => break,
                () = self.send(false) => {}
            }
            tokio::select! {
                () = done.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
        }
        // The last report comes after the processors drained, inside the
        // shutdown budget: it gets at most LAST_REPORT_BUDGET (a broker
        // that does not answer then costs that, and the worker is listed
        // silent instead of stopped).
        let producer = self.producer.clone();
        let last = async {
            self.send(true).await;
            let _ = tokio::task::spawn_blocking(move || producer.flush(LAST_REPORT_BUDGET)).await;
        };
        if tokio::time::timeout(LAST_REPORT_BUDGET, last)
            .await
            .is_err()
        {
            tracing::warn!(topic = %self.topic, "the last worker report was not written in time; this worker will be listed as silent, not stopped");
        }
    }

    async fn send(&mut self, stopped: bool) {
        let report = self.report(stopped);
        let body = encode(&report);
        let record = FutureRecord::to(&self.topic)
            .key(report.worker.as_bytes())
            .payload(&body);
        let outcome = match self.producer.send(record, Duration::from_secs(5)).await {
            Ok(_) => "written",
            Err((error, _)) => {
                tracing::warn!(%error, topic = %self.topic, "cannot write this worker's report");
                "failed"
            }
        };
        self.metrics
            .worker_reports
            .with_label_values(&[outcome])
            .inc();
    }

    fn report(&mut self, stopped: bool) -> Report {
        let lags = lags(&self.metrics);
        let now = Instant::now();
        let processors = self
            .watched
            .iter_mut()
            .map(|w| {
                let finished = w.status.finished();
                let seconds = now.duration_since(w.last.1).as_secs_f64();
                let rate = if seconds > 0.0 {
                    finished.saturating_sub(w.last.0) as f64 / seconds
                } else {
                    0.0
                };
                w.last = (finished, now);
                ProcessorReport {
                    name: w.name.clone(),
                    group: w.group.clone(),
                    topics: w.topics.clone(),
                    assigned: w.status.assigned_partitions(),
                    in_flight: w.status.in_flight(),
                    parked: w.status.parked(),
                    finished: finished as u64,
                    tasks_per_s: (rate * 10.0).round() / 10.0,
                    breaker_open: w.status.breaker_open(),
                    partitions: lags.get(&w.name).cloned().unwrap_or_default(),
                    partitions_left_out: 0,
                }
            })
            .collect();
        Report {
            at: now_millis(),
            stopped,
            processors,
            ..self.identity.clone()
        }
    }
}

/// The report as JSON, within [`MAX_REPORT_BYTES`]: the longest partition
/// listings are cut until it fits.
pub fn encode(report: &Report) -> Vec<u8> {
    let mut report = report.clone();
    loop {
        let body = serde_json::to_vec(&report).unwrap_or_default();
        if body.len() <= MAX_REPORT_BYTES {
            return body;
        }
        let Some(longest) = report
            .processors
            .iter_mut()
            .filter(|p| !p.partitions.is_empty())
            .max_by_key(|p| p.partitions.len())
        else {
            // Nothing more to leave out: the identity alone.
            report.processors.clear();
            return serde_json::to_vec(&report).unwrap_or_default();
        };
        let cut = longest.partitions.len().div_ceil(2);
        longest.partitions.truncate(longest.partitions.len() - cut);
        longest.partitions_left_out += cut;
    }
}

/// Each processor's partitions with their lag, from the lag gauges.
fn lags(metrics: &Metrics) -> HashMap<String, Vec<PartitionReport>> {
    let mut by_partition: HashMap<(String, String, i32), PartitionReport> = HashMap::new();
    for (gauge, processing) in [
        (&metrics.committed_lag, false),
        (&metrics.processing_lag, true),
    ] {
        for family in gauge.collect() {
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                let Ok(partition) = label("partition").parse::<i32>() else {
                    continue;
                };
                let (processor, topic) = (label("processor"), label("topic"));
                let value = metric.get_gauge().get_value() as i64;
                let entry = by_partition
                    .entry((processor, topic.clone(), partition))
                    .or_insert(PartitionReport {
                        topic,
                        partition,
                        ..PartitionReport::default()
                    });
                if processing {
                    entry.processing_lag = value;
                } else {
                    entry.committed_lag = value;
                }
            }
        }
    }
    let mut lags: HashMap<String, Vec<PartitionReport>> = HashMap::new();
    for ((processor, _, _), partition) in by_partition {
        lags.entry(processor).or_default().push(partition);
    }
    for list in lags.values_mut() {
        list.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    }
    lags
}

/// Where a listed worker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Liveness {
    /// Reporting.
    Live,
    /// Stopped cleanly.
    Stopped,
    /// Silent for three report intervals (killed, or cut off).
    Silent,
}

impl Liveness {
    /// A word for pages and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Liveness::Live => "live",
            Liveness::Stopped => "stopped",
            Liveness::Silent => "silent",
        }
    }
}

/// What a gateway knows of the workers: the latest report of each,
/// bounded by `workers.max_workers` (past it the one heard from least
/// recently is dropped, counted in `conveyor_gateway_workers_dropped_total`)
/// and forgotten `workers.forget_after_ms` after its last report.
#[derive(Debug)]
pub struct Directory {
    reports: HashMap<String, Report>,
    max_workers: usize,
    forget_after_ms: i64,
    /// Whether the reader has read the topic to its end once.
    caught_up: bool,
}

impl Directory {
    /// An empty directory.
    pub fn new(max_workers: usize, forget_after_ms: u64) -> Directory {
        Directory {
            reports: HashMap::new(),
            max_workers: max_workers.max(1),
            forget_after_ms: i64::try_from(forget_after_ms).unwrap_or(i64::MAX),
            caught_up: false,
        }
    }

    /// Takes a report in (a newer one replaces the worker's older one);
    /// returns how many workers were dropped to stay within the bound.
    pub fn apply(&mut self, report: Report) -> usize {
        match self.reports.get(&report.worker) {
            Some(known) if known.at > report.at => return 0,
            _ => {}
        }
        self.reports.insert(report.worker.clone(), report);
        let mut dropped = 0;
        while self.reports.len() > self.max_workers {
            let Some(oldest) = self
                .reports
                .values()
                .min_by(|a, b| (a.at, &a.worker).cmp(&(b.at, &b.worker)))
                .map(|r| r.worker.clone())
            else {
                break;
            };
            self.reports.remove(&oldest);
            dropped += 1;
        }
        dropped
    }

    /// Drops a worker (a tombstone on the topic).
    pub fn remove(&mut self, worker: &str) {
        self.reports.remove(worker);
    }

    /// Forgets workers gone longer than `forget_after_ms`.
    pub fn expire(&mut self, now: i64) {
        let forget = self.forget_after_ms;
        self.reports
            .retain(|_, r| now.saturating_sub(r.at) <= forget);
    }

    /// Where `report` stands at `now`.
    pub fn liveness(report: &Report, now: i64) -> Liveness {
        let interval = i64::try_from(report.interval_ms.max(100)).unwrap_or(i64::MAX);
        if report.stopped {
            Liveness::Stopped
        } else if now.saturating_sub(report.at) > interval.saturating_mul(SILENT_INTERVALS) {
            Liveness::Silent
        } else {
            Liveness::Live
        }
    }

    /// Every known worker: live ones first, then by id.
    pub fn list(&self, now: i64) -> Vec<(Liveness, Report)> {
        let mut list: Vec<(Liveness, Report)> = self
            .reports
            .values()
            .map(|r| (Self::liveness(r, now), r.clone()))
            .collect();
        list.sort_by(|(la, a), (lb, b)| {
            (*la != Liveness::Live, &a.worker).cmp(&(*lb != Liveness::Live, &b.worker))
        });
        list
    }

    /// How many workers it holds.
    pub fn len(&self) -> usize {
        self.reports.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.reports.is_empty()
    }

    /// Whether the topic has been read to its end once.
    pub fn caught_up(&self) -> bool {
        self.caught_up
    }
}

/// A report as `GET /v1/workers` shows it.
pub fn to_json(liveness: Liveness, report: &Report) -> serde_json::Value {
    let mut value = serde_json::to_value(report).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("state".into(), liveness.name().into());
    }
    value
}

/// The gateway's directory, filled by a thread reading the workers topic.
pub struct Workers {
    directory: Mutex<Directory>,
    metrics: Arc<Metrics>,
}

impl Workers {
    /// A directory kept by `settings`, read from `kafka`'s cluster until
    /// `stop`; the reader thread starts here.
    pub fn start(
        settings: &WorkerSettings,
        kafka: &KafkaSettings,
        metrics: Arc<Metrics>,
        stop: &CancellationToken,
    ) -> Arc<Workers> {
        let workers = Arc::new(Workers {
            directory: Mutex::new(Directory::new(
                settings.max_workers,
                settings.forget_after_ms,
            )),
            metrics,
        });
        if settings.enabled {
            let (reader, kafka, topic, stop) = (
                workers.clone(),
                kafka.clone(),
                settings.topic.clone(),
                stop.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name("conveyor-workers".into())
                .spawn(move || reader.read(&kafka, &topic, &stop));
            if let Err(error) = spawned {
                tracing::error!(%error, "cannot start the workers topic's reader; no worker is listed");
            }
        }
        workers
    }

    /// The directory.
    pub fn directory(&self) -> MutexGuard<'_, Directory> {
        self.directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn read(&self, kafka: &KafkaSettings, topic: &str, stop: &CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        while !stop.is_cancelled() {
            match self.follow(kafka, topic, stop) {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, %topic, "reading the workers topic; trying again");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn follow(
        &self,
        kafka: &KafkaSettings,
        topic: &str,
        stop: &CancellationToken,
    ) -> Result<(), String> {
        use rdkafka::Message;
        let reader = Reader::new(kafka, "workers").map_err(|e| e.to_string())?;
        let partitions = reader.partitions(topic).map_err(|e| e.to_string())?;
        reader
            .assign(topic, &partitions, Offset::Beginning)
            .map_err(|e| e.to_string())?;
        let mut at_end = std::collections::HashSet::new();
        let mut last_expiry = Instant::now();
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            if last_expiry.elapsed() >= Duration::from_secs(1) {
                self.tick(now_millis());
                last_expiry = Instant::now();
            }
            match reader.read(Duration::from_millis(200)) {
                Read::Idle => {}
                Read::Error(error) => tracing::debug!(%error, "workers topic reader"),
                Read::End(p) => {
                    at_end.insert(p);
                    if at_end.len() == partitions.len() {
                        self.directory().caught_up = true;
                        self.tick(now_millis());
                    }
                }
                Read::Record(message) => {
                    let key = message
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned());
                    self.take(key, message.payload());
                }
            }
        }
    }

    /// Forgets the workers gone too long and sets the gauges (once a
    /// second, not per record: a catch-up reads many records).
    pub fn tick(&self, now: i64) {
        let mut directory = self.directory();
        directory.expire(now);
        self.gauge(&directory, now);
    }

    /// Takes one record of the topic in: a report, or a tombstone.
    pub fn take(&self, key: Option<String>, payload: Option<&[u8]>) {
        let mut directory = self.directory();
        match payload {
            None => {
                if let Some(key) = key {
                    directory.remove(&key);
                }
            }
            Some(body) if body.len() > MAX_REPORT_BYTES => {
                self.metrics
                    .gateway_worker_reports_refused
                    .with_label_values(&["too_large"])
                    .inc();
            }
            Some(body) => match serde_json::from_slice::<Report>(body) {
                Ok(report) if !report.worker.is_empty() => {
                    let dropped = directory.apply(report);
                    if dropped > 0 {
                        self.metrics
                            .gateway_workers_dropped
                            .with_label_values(&[] as &[&str])
                            .inc_by(dropped as u64);
                    }
                }
                _ => {
                    self.metrics
                        .gateway_worker_reports_refused
                        .with_label_values(&["unreadable"])
                        .inc();
                }
            },
        }
    }

    fn gauge(&self, directory: &Directory, now: i64) {
        let mut counts: HashMap<Liveness, i64> = HashMap::new();
        for r in directory.reports.values() {
            *counts.entry(Directory::liveness(r, now)).or_default() += 1;
        }
        for state in [Liveness::Live, Liveness::Stopped, Liveness::Silent] {
            self.metrics
                .gateway_workers
                .with_label_values(&[state.name()])
                .set(counts.get(&state).copied().unwrap_or(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(worker: &str, at: i64) -> Report {
        Report {
            worker: worker.into(),
            host: "h".into(),
            pid: 1,
            version: "0".into(),
            started_at: 0,
            at,
            interval_ms: 1000,
            stopped: false,
            processors: Vec::new(),
        }
    }

    #[test]
    fn the_directory_keeps_the_newest_report_and_holds_its_bound() {
        let mut d = Directory::new(3, 60_000);
        assert_eq!(d.apply(report("a", 10)), 0);
        assert_eq!(d.apply(report("a", 5)), 0, "an older report is ignored");
        assert_eq!(d.list(10)[0].1.at, 10);
        for (i, w) in ["b", "c", "d", "e"].iter().enumerate() {
            d.apply(report(w, 20 + i as i64));
        }
        assert_eq!(d.len(), 3, "the bound holds");
        let kept: Vec<String> = d.list(30).into_iter().map(|(_, r)| r.worker).collect();
        assert_eq!(
            kept,
            ["c", "d", "e"],
            "the least recently heard were dropped"
        );
        d.expire(60_000 + 22);
        let kept: Vec<String> = d.list(0).into_iter().map(|(_, r)| r.worker).collect();
        assert_eq!(kept, ["d", "e"], "forgotten after forget_after_ms");
    }

    #[test]
    fn a_gateway_counts_the_workers_it_drops_and_the_records_it_refuses() {
        let settings = WorkerSettings {
            enabled: false,
            max_workers: 2,
            ..WorkerSettings::default()
        };
        let metrics = Arc::new(Metrics::new());
        let workers = Workers::start(
            &settings,
            &KafkaSettings::default(),
            metrics.clone(),
            &CancellationToken::new(),
        );
        let now = now_millis();
        for (i, w) in ["a", "b", "c"].iter().enumerate() {
            let body = encode(&report(w, now + i as i64));
            workers.take(Some((*w).into()), Some(&body));
        }
        let dropped = metrics
            .gateway_workers_dropped
            .with_label_values::<&str>(&[]);
        assert_eq!(dropped.get(), 1, "the third worker pushed the first out");
        assert_eq!(workers.directory().len(), 2);
        workers.tick(now);
        let live = metrics.gateway_workers.with_label_values(&["live"]);
        assert_eq!(live.get(), 2);
        workers.take(Some("x".into()), Some(b"not json"));
        workers.take(Some("y".into()), Some(&vec![b' '; MAX_REPORT_BYTES + 1]));
        let refused = |why: &str| {
            metrics
                .gateway_worker_reports_refused
                .with_label_values(&[why])
                .get()
        };
        assert_eq!((refused("unreadable"), refused("too_large")), (1, 1));
        // A tombstone removes its worker.
        workers.take(Some("c".into()), None);
        assert_eq!(workers.directory().len(), 1);
    }

    #[test]
    fn liveness_follows_the_reports() {
        let mut r = report("a", 1_000);
        assert_eq!(Directory::liveness(&r, 3_900), Liveness::Live);
        assert_eq!(Directory::liveness(&r, 4_001), Liveness::Silent);
        r.stopped = true;
        assert_eq!(Directory::liveness(&r, 1_000), Liveness::Stopped);
    }

    #[test]
    fn a_report_fits_its_bound_by_leaving_partitions_out() {
        let mut r = report("a", 1);
        r.processors.push(ProcessorReport {
            name: "p".into(),
            partitions: (0..5_000)
                .map(|i| PartitionReport {
                    topic: "conveyor.tasks.some-long-topic-name".into(),
                    partition: i,
                    committed_lag: 1_000_000,
                    processing_lag: 1_000_000,
                })
                .collect(),
            ..ProcessorReport::default()
        });
        let body = encode(&r);
        assert!(body.len() <= MAX_REPORT_BYTES, "{}", body.len());
        let back: Report = serde_json::from_slice(&body).expect("readable");
        let p = &back.processors[0];
        assert!(p.partitions_left_out > 0);
        assert_eq!(p.partitions.len() + p.partitions_left_out, 5_000);
    }

    #[test]
    fn old_and_new_readers_read_each_other() {
        // A report from a newer worker with a field this reader lacks, and
        // one from an older worker with only the identity.
        let newer = br#"{"worker":"w","at":5,"cpu":0.5,"processors":[{"name":"p","gpu":1}]}"#;
        let r: Report = serde_json::from_slice(newer).expect("unknown fields are ignored");
        assert_eq!(
            (r.worker.as_str(), r.at, r.processors[0].name.as_str()),
            ("w", 5, "p")
        );
        let older: Report = serde_json::from_slice(br#"{"worker":"w"}"#).expect("defaults");
        assert_eq!(older.processors, Vec::new());
        assert!(!older.stopped);
    }
}
