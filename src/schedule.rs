//! Periodic schedules (`[[schedules]]`): tasks fired on cron ticks, once per
//! tick whichever workers run.
//!
//! Every worker with schedules joins the group `scheduler.group_id` on the
//! one-partition topic `scheduler.topic`; the member that owns the
//! partition fires. Firing a tick produces its task (`acks=all`), then a
//! record `{schedule, tick}` to the schedule topic (keyed by the schedule,
//! the topic compacted): the last tick fired is durable, and the owner
//! reads it back. A worker that takes the partition over reads the topic
//! from its beginning to its end before it fires anything, so it goes on
//! from the last tick recorded: a failover skips no tick. A crash between
//! a task and its record fires that tick again; the task's id is derived
//! from (schedule, tick), so the duplicate has the same id as the first
//! (and the same idempotency key, which the gateway's status view and a
//! handler can use to recognise it).
//!
//! A schedule fires ticks after the last recorded one, up to now. A tick
//! fired more than `misfire_grace_ms` after its time is a misfire and the
//! schedule's policy decides (`fire_once`: one task for all of them, the
//! latest; `skip`: none; `fire_all`: each, at most `max_catch_up`). A
//! schedule never fired before starts from the moment a worker first saw
//! it (that moment is recorded), not from the past. A schedule removed from
//! the configuration is not fired; its records stay in the topic until
//! compaction (one per name).
//!
//! Time zones and daylight saving: the expression is read in the
//! schedule's IANA zone (the tz database through `chrono-tz`), and `croner`
//! decides DST transitions: a fixed-time job (`0 30 2 * * *`) whose time
//! falls in a spring-forward gap fires at the first valid time after the
//! gap, and once (at the first occurrence) in a fall-back overlap; an
//! interval or wildcard job (`*/5 * * * *`) skips times in a gap and fires
//! each matching wall-clock time of an overlap (croner's documented rule).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientContext;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::codec::{now_millis, Codec, TaskRequest};
use crate::metrics::Metrics;
use crate::settings::{Misfire, ScheduleSettings, Settings};

/// How often the owner looks for due ticks.
const TICK_EVERY: Duration = Duration::from_millis(100);
/// Most ticks one look walks through (a long outage of a frequent
/// schedule is caught up over several looks).
const MAX_TICKS_PER_LOOK: usize = 100_000;
/// The namespace of schedule task ids (v5 UUIDs of `<schedule>/<tick ms>`).
const TASK_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5c4e_d01e_c0f3_4e1a_9a7d_6b1c_2f3e_4d5a);
/// Metadata keys a fired task carries.
pub const META_SCHEDULE: &str = "conveyor.schedule";
/// The tick (ms since the epoch) a fired task is for.
pub const META_TICK: &str = "conveyor.schedule.tick";

/// `text` as a cron expression: five fields, or six with seconds first.
pub fn parse_cron(text: &str) -> Result<Cron, String> {
    let fields = text.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(format!(
            "`{text}` has {fields} fields; a cron expression has 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)"
        ));
    }
    Cron::from_str(text).map_err(|e| format!("`{text}` is not a cron expression: {e}"))
}

/// `text` as an IANA time zone name.
pub fn parse_timezone(text: &str) -> Result<Tz, String> {
    Tz::from_str(text).map_err(|_| {
        format!("`{text}` is not an IANA time zone name (such as `UTC` or `Europe/Paris`)")
    })
}

/// A schedule ready to fire: its settings, expression, zone and topic.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// As configured.
    pub settings: ScheduleSettings,
    cron: Cron,
    zone: Tz,
    /// Where its tasks go.
    pub topic: String,
}

/// What one look at a schedule found to do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Ticks to fire, oldest first.
    pub fire: Vec<i64>,
    /// Ticks passed over without a task.
    pub missed: u64,
    /// The last tick looked at (to record), if any.
    pub last: Option<i64>,
}

impl Schedule {
    /// The schedules of `settings` (which [`Settings::validate`] checked).
    pub fn all(settings: &Settings) -> Result<Vec<Schedule>, String> {
        let topics = settings.gateway_task_topics();
        settings
            .schedules
            .iter()
            .map(|s| {
                let at = |e: String| format!("schedules `{}`: {e}", s.name);
                Ok(Schedule {
                    cron: parse_cron(&s.cron).map_err(at)?,
                    zone: parse_timezone(&s.timezone).map_err(at)?,
                    topic: topics
                        .get(&s.task_type)
                        .cloned()
                        .unwrap_or_else(|| settings.topics.task_topic(&s.task_type)),
                    settings: s.clone(),
                })
            })
            .collect()
    }

    /// The first tick strictly after `after_ms` (ms since the epoch).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let after = self.zone.timestamp_millis_opt(after_ms).single()?;
        self.cron
            .find_next_occurrence(&after, false)
            .ok()
            .map(|t| t.timestamp_millis())
    }

    /// How long after its time `tick` fires: the same for every worker.
    pub fn jitter(&self, tick: i64) -> i64 {
        let span = self.settings.jitter_ms;
        if span == 0 {
            return 0;
        }
        // FNV-1a: stable across processes and builds.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.settings.name.bytes().chain(tick.to_be_bytes()) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        i64::try_from(hash % span.saturating_add(1)).unwrap_or(0)
    }

    /// The id of the task fired for `tick`.
    pub fn task_id(&self, tick: i64) -> Uuid {
        Uuid::new_v5(
            &TASK_ID_NAMESPACE,
            format!("{}/{tick}", self.settings.name).as_bytes(),
        )
    }

    /// What to fire at `now`, the last recorded tick being `last`.
    pub fn plan(&self, last: i64, now: i64) -> Plan {
        let grace = i64::try_from(self.settings.misfire_grace_ms).unwrap_or(i64::MAX);
        let mut on_time = Vec::new();
        let mut late = Vec::new();
        let mut at = last;
        let mut walked = 0;
        while walked < MAX_TICKS_PER_LOOK {
            let Some(tick) = self.next_after(at) else {
                break;
            };
            let fires_at = tick.saturating_add(self.jitter(tick));
            if fires_at > now {
                break;
            }
            if now - fires_at > grace {
                late.push(tick);
            } else {
                on_time.push(tick);
            }
            at = tick;
            walked += 1;
        }
        let last = (walked > 0).then_some(at);
        if walked == MAX_TICKS_PER_LOOK {
            // More ticks follow (a long outage of a frequent schedule):
            // the policy applies to the missed ticks of the last look, so
            // these late ones are all passed over.
            return Plan {
                missed: u64::try_from(late.len()).unwrap_or(u64::MAX),
                fire: on_time,
                last,
            };
        }
        let (mut fire, missed) = match self.settings.misfire {
            Misfire::FireOnce => {
                let missed = late.len().saturating_sub(1);
                (late.last().copied().into_iter().collect(), missed)
            }
            Misfire::Skip => (Vec::new(), late.len()),
            Misfire::FireAll => {
                let most = usize::try_from(self.settings.max_catch_up).unwrap_or(usize::MAX);
                let missed = late.len().saturating_sub(most);
                (late.split_off(missed), missed)
            }
        };
        fire.extend(on_time);
        Plan {
            fire,
            missed: u64::try_from(missed).unwrap_or(u64::MAX),
            last,
        }
    }

    /// The task fired for `tick`.
    pub fn task(&self, tick: i64) -> TaskRequest {
        let mut task = TaskRequest::new(
            self.settings.task_type.clone(),
            self.settings.payload.clone().into_bytes(),
        );
        task.id = self.task_id(tick);
        task.key = self.settings.key.clone();
        task.metadata
            .insert(META_SCHEDULE.into(), self.settings.name.clone());
        task.metadata.insert(META_TICK.into(), tick.to_string());
        // The gateway's status view indexes it: a duplicate of the tick
        // answers as the first.
        task.metadata.insert(
            crate::codec::wire::IDEMPOTENCY_KEY.into(),
            format!("schedule:{}:{tick}", self.settings.name),
        );
        task
    }
}

/// A schedule topic record: `schedule` fired (or, when first seen,
/// started from) `tick`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fired {
    /// The schedule's name (also the record's key).
    pub schedule: String,
    /// The last tick done with, ms since the epoch.
    pub tick: i64,
    /// When it was recorded, ms since the epoch.
    pub at: i64,
}

impl Fired {
    /// Reads a schedule topic record; `None` for anything else.
    pub fn read(payload: Option<&[u8]>) -> Option<Fired> {
        payload.and_then(|p| serde_json::from_slice(p).ok())
    }
}

/// One schedule as `conveyor schedules list` and `GET /v1/schedules` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listed {
    /// Its name.
    pub name: String,
    /// Its cron expression.
    pub cron: String,
    /// The zone the expression is read in.
    pub timezone: String,
    /// The task type it fires.
    #[serde(rename = "type")]
    pub task_type: String,
    /// Its misfire policy.
    pub misfire: &'static str,
    /// When it fires next (jitter included), RFC 3339 UTC.
    pub next: Option<String>,
    /// The last tick recorded as fired (or, before the first, the moment
    /// it was first seen), RFC 3339 UTC; `None`: never seen by a worker.
    pub last_fired: Option<String>,
}

/// The configured `schedules` at `now`, with what `fired` recorded.
pub fn listing(schedules: &[Schedule], fired: &HashMap<String, Fired>, now: i64) -> Vec<Listed> {
    schedules
        .iter()
        .map(|s| {
            let last = fired.get(&s.settings.name).map(|f| f.tick);
            // Due ticks not fired yet come first.
            let next = s
                .next_after(last.unwrap_or(now).min(now))
                .map(|tick| rfc3339(tick.saturating_add(s.jitter(tick))));
            Listed {
                name: s.settings.name.clone(),
                cron: s.settings.cron.clone(),
                timezone: s.settings.timezone.clone(),
                task_type: s.settings.task_type.clone(),
                misfire: s.settings.misfire.name(),
                next,
                last_fired: last.map(rfc3339),
            }
        })
        .collect()
}

/// RFC 3339 in UTC, for listings.
pub fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Why the scheduler stopped.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// It could not start: the configuration or the cluster's topics.
    #[error("scheduler: {0}")]
    Setup(String),
    /// A task or record could not be produced.
    #[error("scheduler: {0}")]
    Fire(String),
}

/// Counts rebalances, so that the owner knows when it must read the
/// schedule topic again before firing.
struct OwnerContext {
    generation: AtomicU64,
}

impl ClientContext for OwnerContext {}

impl ConsumerContext for OwnerContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Rebalance::Assign(list) = rebalance {
            info!(
                owner = list.count() > 0,
                "scheduler: schedule topic assignment"
            );
        }
    }
}

/// Where the owner is in taking the schedules over.
enum Owning {
    /// Not the owner.
    No,
    /// Reading the topic up to `end` (its end when the assignment came).
    CatchingUp { generation: u64, end: i64 },
    /// Read: fires.
    Firing { generation: u64 },
}

/// Fires `settings.schedules` while this worker owns the schedule topic,
/// until `stop`.
pub async fn run(
    settings: Settings,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<(), SchedulerError> {
    let schedules = Schedule::all(&settings).map_err(SchedulerError::Setup)?;
    if schedules.is_empty() {
        return Ok(());
    }
    let topic = settings.scheduler.topic.clone();
    let codec = settings
        .codec
        .codec()
        .ok_or_else(|| SchedulerError::Setup("codec settings are incomplete".into()))?;
    let mut config = crate::kafka::consumer_config(
        &settings.kafka,
        &settings.scheduler.group_id,
        settings.scheduler.session_timeout_ms,
    );
    // Never committed: every owner reads the (compacted) topic whole.
    config.set("enable.auto.commit", "false");
    config.set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer<OwnerContext> = config
        .create_with_context(OwnerContext {
            generation: AtomicU64::new(0),
        })
        .map_err(|e| SchedulerError::Setup(format!("cannot create the consumer: {e}")))?;
    let producer: FutureProducer = crate::kafka::producer_config(&settings.kafka)
        .create()
        .map_err(|e| SchedulerError::Setup(format!("cannot create the producer: {e}")))?;
    let metadata = producer
        .client()
        .fetch_metadata(Some(&topic), Duration::from_secs(30))
        .map_err(|e| SchedulerError::Setup(format!("cannot read the cluster's topics: {e}")))?;
    if !metadata
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
    {
        return Err(SchedulerError::Setup(format!(
            "the schedule topic {topic} does not exist: run `conveyor topics create`"
        )));
    }
    consumer
        .subscribe(&[&topic])
        .map_err(|e| SchedulerError::Setup(format!("cannot subscribe to {topic}: {e}")))?;
    info!(schedules = schedules.len(), %topic, "scheduler started");

    let generation = || consumer.context().generation.load(Ordering::Acquire);
    // The last tick recorded per configured schedule (only ever raised:
    // every value came from the topic, so none is ahead of the truth).
    let mut last: HashMap<String, i64> = HashMap::new();
    // How far this assignment has read (offset of the next record).
    let mut read_to: (u64, i64) = (0, 0);
    let mut owning = Owning::No;
    let mut look = tokio::time::interval(TICK_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            received = consumer.recv() => match received {
                Err(e) => warn!(error = %e, "scheduler: consumer error; continuing"),
                Ok(message) => {
                    let current = generation();
                    if read_to.0 != current {
                        read_to = (current, 0);
                    }
                    read_to.1 = message.offset().saturating_add(1);
                    if let Some(fired) = Fired::read(message.payload()) {
                        if schedules.iter().any(|s| s.settings.name == fired.schedule) {
                            let entry = last.entry(fired.schedule).or_insert(fired.tick);
                            *entry = (*entry).max(fired.tick);
                        }
                    }
                }
            },
            _ = look.tick() => {
                let current = generation();
                let owns = consumer
                    .assignment()
                    .is_ok_and(|a| a.elements_for_topic(&topic).iter().any(|e| e.partition() == 0));
                owning = match owning {
                    _ if !owns => Owning::No,
                    Owning::Firing { generation } if generation == current => owning,
                    Owning::CatchingUp { generation, end } if generation == current => {
                        // Read to the end it had: by the records seen, or
                        // by the position (offsets can have gaps).
                        let position = consumer
                            .position()
                            .ok()
                            .and_then(|p| {
                                p.find_partition(&topic, 0).and_then(|e| e.offset().to_raw())
                            })
                            .unwrap_or(0);
                        if read_to.0 == current && read_to.1 >= end || position >= end || end <= 0 {
                            info!(schedules = schedules.len(), "scheduler: this worker fires the schedules");
                            Owning::Firing { generation }
                        } else {
                            Owning::CatchingUp { generation, end }
                        }
                    }
                    _ => {
                        let p = producer.clone();
                        let t = topic.clone();
                        let end = tokio::task::spawn_blocking(move || {
                            p.client().fetch_watermarks(&t, 0, Duration::from_secs(10))
                        })
                        .await;
                        match end {
                            Ok(Ok((_, high))) => Owning::CatchingUp { generation: current, end: high },
                            Ok(Err(e)) => {
                                warn!(error = %e, "scheduler: cannot read the schedule topic's end; trying again");
                                Owning::No
                            }
                            Err(e) => {
                                warn!(error = %e, "scheduler: reading the schedule topic's end failed");
                                Owning::No
                            }
                        }
                    }
                };
                metrics
                    .schedule_owner
                    .with_label_values::<&str>(&[])
                    .set(i64::from(matches!(owning, Owning::Firing { .. })));
                if matches!(owning, Owning::Firing { .. }) {
                    if let Err(e) = fire_due(&schedules, &mut last, &producer, &codec, &topic, &metrics).await {
                        break Err(e);
                    }
                }
            }
        }
    };
    metrics.schedule_owner.with_label_values::<&str>(&[]).set(0);
    let _ = producer.flush(Duration::from_secs(10));
    outcome
}

/// Fires every schedule's due ticks: each task, then the record of the
/// last tick done with, each acknowledged before the next step.
async fn fire_due(
    schedules: &[Schedule],
    last: &mut HashMap<String, i64>,
    producer: &FutureProducer,
    codec: &Codec,
    topic: &str,
    metrics: &Metrics,
) -> Result<(), SchedulerError> {
    let now = now_millis();
    for schedule in schedules {
        let name = &schedule.settings.name;
        let plan = match last.get(name) {
            Some(&from) => schedule.plan(from, now),
            // Never fired: it starts now.
            None => Plan {
                last: Some(now),
                ..Plan::default()
            },
        };
        let Some(done_with) = plan.last else {
            continue;
        };
        for &tick in &plan.fire {
            let task = schedule.task(tick);
            let mut value = Vec::new();
            codec.encode_request(&task, &mut value);
            let key = task.key.clone().unwrap_or_else(|| task.id.to_string());
            let record = FutureRecord::to(&schedule.topic).key(&key).payload(&value);
            send(producer, record, &schedule.topic).await?;
            metrics.schedule_fires.with_label_values(&[name]).inc();
            info!(schedule = %name, tick = %rfc3339(tick), task_id = %task.id, "schedule fired");
        }
        if plan.missed > 0 {
            warn!(schedule = %name, missed = plan.missed, policy = schedule.settings.misfire.name(),
                  "schedule ticks missed (not fired within misfire_grace_ms)");
            metrics
                .schedule_misfires
                .with_label_values(&[name])
                .inc_by(plan.missed);
        }
        let fired = Fired {
            schedule: name.clone(),
            tick: done_with,
            at: now,
        };
        let payload = serde_json::to_vec(&fired).unwrap_or_default();
        send(
            producer,
            FutureRecord::to(topic).key(name).payload(&payload),
            topic,
        )
        .await?;
        last.insert(name.clone(), done_with);
    }
    Ok(())
}

async fn send(
    producer: &FutureProducer,
    record: FutureRecord<'_, String, Vec<u8>>,
    topic: &str,
) -> Result<(), SchedulerError> {
    match producer.send(record, Duration::from_secs(30)).await {
        Ok(_) => Ok(()),
        Err((e, _)) => Err(SchedulerError::Fire(format!("producing to {topic}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(cron: &str, zone: &str, misfire: Misfire) -> Schedule {
        let mut settings = Settings::default();
        settings.schedules.push(ScheduleSettings {
            name: "nightly".into(),
            cron: cron.into(),
            timezone: zone.into(),
            task_type: "report".into(),
            payload: "{}".into(),
            key: None,
            misfire,
            misfire_grace_ms: 1_000,
            max_catch_up: 3,
            jitter_ms: 0,
        });
        Schedule::all(&settings).expect("valid").pop().expect("one")
    }

    fn ms(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .expect("a time")
            .timestamp_millis()
    }

    #[test]
    fn bad_expressions_and_zones_say_what_is_wrong() {
        assert!(parse_cron("*/5 * * * *").is_ok());
        assert!(parse_cron("*/2 * * * * *").is_ok());
        assert_eq!(
            parse_cron("* * *").unwrap_err(),
            "`* * *` has 3 fields; a cron expression has 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)"
        );
        assert!(parse_cron("61 * * * *")
            .unwrap_err()
            .starts_with("`61 * * * *` is not a cron expression"));
        assert!(parse_timezone("Europe/Paris").is_ok());
        assert_eq!(
            parse_timezone("Mars/Olympus").unwrap_err(),
            "`Mars/Olympus` is not an IANA time zone name (such as `UTC` or `Europe/Paris`)"
        );
    }

    #[test]
    fn ticks_are_read_in_the_schedule_time_zone() {
        let s = schedule("0 2 * * *", "Europe/Paris", Misfire::FireOnce);
        // 02:00 in Paris in winter is 01:00 UTC.
        assert_eq!(
            s.next_after(ms("2026-12-03T00:00:00Z")),
            Some(ms("2026-12-03T01:00:00Z"))
        );
        // In summer, 00:00 UTC.
        assert_eq!(
            s.next_after(ms("2026-07-01T00:30:00Z")),
            Some(ms("2026-07-02T00:00:00Z"))
        );
    }

    #[test]
    fn a_fixed_time_in_a_spring_forward_gap_fires_after_the_gap() {
        // 2027-03-28: Paris goes from 02:00 to 03:00 (UTC+1 to UTC+2).
        let s = schedule("30 2 * * *", "Europe/Paris", Misfire::FireOnce);
        let tick = s.next_after(ms("2027-03-27T23:00:00Z")).expect("a tick");
        assert_eq!(tick, ms("2027-03-28T01:00:00Z"), "03:00 Paris, once");
    }

    #[test]
    fn on_time_ticks_fire_and_late_ones_follow_the_policy() {
        let at = ms("2026-12-03T10:00:00Z");
        let every_second = |misfire| schedule("* * * * * *", "UTC", misfire);
        // Last fired 10 s ago, grace 1 s: ticks -9..-2 are late, -1 and 0
        // on time.
        let s = every_second(Misfire::FireOnce);
        let plan = s.plan(at - 10_000, at);
        assert_eq!(plan.fire, vec![at - 2_000, at - 1_000, at]);
        assert_eq!(plan.missed, 7);
        assert_eq!(plan.last, Some(at));
        let plan = every_second(Misfire::Skip).plan(at - 10_000, at);
        assert_eq!(plan.fire, vec![at - 1_000, at]);
        assert_eq!(plan.missed, 8);
        let plan = every_second(Misfire::FireAll).plan(at - 10_000, at);
        assert_eq!(
            plan.fire,
            vec![at - 4_000, at - 3_000, at - 2_000, at - 1_000, at],
            "the latest max_catch_up (3) late ticks, then the on-time ones"
        );
        assert_eq!(plan.missed, 5);
        // Nothing due.
        assert_eq!(s.plan(at, at + 999), Plan::default());
    }

    #[test]
    fn a_long_outage_is_caught_up_over_several_looks_firing_once() {
        let at = ms("2026-12-03T10:00:00Z");
        let s = schedule("* * * * * *", "UTC", Misfire::FireOnce);
        let mut from = at - 150_000_000;
        let mut fired = Vec::new();
        let mut missed = 0;
        let mut looks = 0;
        loop {
            let plan = s.plan(from, at);
            looks += 1;
            fired.extend(plan.fire);
            missed += plan.missed;
            match plan.last {
                Some(last) if last < at => from = last,
                _ => break,
            }
        }
        assert_eq!(looks, 2, "150,000 ticks: two looks of at most 100,000");
        // The latest missed tick once, then the two on time (grace 1 s).
        assert_eq!(fired, vec![at - 2_000, at - 1_000, at]);
        assert_eq!(missed, 150_000 - 3);
    }

    #[test]
    fn a_tick_has_one_id_and_one_jitter_whoever_fires_it() {
        let mut s = schedule("* * * * *", "UTC", Misfire::FireOnce);
        let tick = ms("2026-12-03T10:00:00Z");
        assert_eq!(s.task_id(tick), s.task_id(tick));
        assert_ne!(s.task_id(tick), s.task_id(tick + 60_000));
        let task = s.task(tick);
        assert_eq!(task.id, s.task_id(tick));
        assert_eq!(task.metadata[META_TICK], tick.to_string());
        assert_eq!(
            task.metadata[crate::codec::wire::IDEMPOTENCY_KEY],
            format!("schedule:nightly:{tick}")
        );
        assert_eq!(s.jitter(tick), 0);
        s.settings.jitter_ms = 5_000;
        let offsets: Vec<i64> = (0..50).map(|i| s.jitter(tick + i * 60_000)).collect();
        assert!(offsets.iter().all(|o| (0..=5_000).contains(o)));
        assert!(offsets.iter().any(|o| *o != offsets[0]), "spread");
        assert_eq!(s.jitter(tick), s.jitter(tick));
    }
}
