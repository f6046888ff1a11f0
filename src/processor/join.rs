//! Joins: gathering a fan-out's children for the step that receives all
//! their outputs.
//!
//! Each child's contribution is a record keyed by its run id on the join
//! task's topic, so every contribution of one run reaches the same
//! partition and the member that owns it. That member keeps, per owned
//! partition, the open joins of the runs hashed there, and writes each
//! child's output to partition *p* of the compacted changelog
//! `<topic>.joins` before the contribution's offset may be stored. The
//! first contribution a member handles for a partition reads that
//! partition of the changelog from its start, so a restarted or rebalanced
//! member resumes with every child counted so far.
//!
//! A child is counted once: its output is keyed `<run>/<child>`, and a
//! contribution whose child is already known changes nothing. When the last
//! child arrives the join's request (id derived from run and step, so a
//! repeat is the same task) is produced and acknowledged, then a
//! `<run>/done` record and tombstones for the children's records are
//! written; contributions after that are dropped. A run that fails (a child
//! failed for good) or whose deadline passes is closed the same way.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::Offset;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::delivery::{produce, Outgoing};
use super::{Job, Shared, TopicPartition};
use crate::codec::{now_millis, TaskRequest, WorkflowRef};
use crate::kafka;
use crate::settings::KafkaSettings;
use crate::workflow::{
    child_key, done_key, output_as_json, ChangelogEntry, OpenJoin, PartitionJoins, CHILD_FAILED,
    JOINS_SUFFIX,
};

/// How long a finished join's `done` record is kept (in memory and in the
/// changelog) to recognise late duplicate contributions.
const DONE_RETENTION_MS: i64 = 3_600_000;
/// Longest a changelog partition may take to read back.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
/// Wait before reading a changelog partition again after a failure.
const RESTORE_RETRY: Duration = Duration::from_secs(1);

/// The join state of every owned partition of this processor.
pub(crate) struct Joins {
    kafka: KafkaSettings,
    partitions: Mutex<HashMap<TopicPartition, Arc<JoinPartition>>>,
}

/// The joins of one partition.
struct JoinPartition {
    /// Set once the changelog partition was read back.
    restored: tokio::sync::OnceCell<()>,
    state: Mutex<PartitionJoins>,
    /// Runs whose join is being finished by some task now.
    closing: Mutex<HashSet<Uuid>>,
}

impl JoinPartition {
    fn state(&self) -> MutexGuard<'_, PartitionJoins> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the right to close `run`'s join; false if another task has it.
    fn claim(&self, run: Uuid) -> bool {
        self.closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(run)
    }

    fn release(&self, run: Uuid) {
        self.closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&run);
    }
}

impl Joins {
    pub(crate) fn new(kafka: KafkaSettings) -> Self {
        Joins {
            kafka,
            partitions: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<TopicPartition, Arc<JoinPartition>>> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn partition(&self, tp: &TopicPartition) -> Arc<JoinPartition> {
        self.lock()
            .entry(tp.clone())
            .or_insert_with(|| {
                Arc::new(JoinPartition {
                    restored: tokio::sync::OnceCell::new(),
                    state: Mutex::new(PartitionJoins::default()),
                    closing: Mutex::new(HashSet::new()),
                })
            })
            .clone()
    }

    /// Drops the state of partitions this member let go: their new owner
    /// reads it back from the changelog, and so does this member if they
    /// come back.
    pub(crate) fn forget(&self, partitions: &[TopicPartition]) {
        let mut all = self.lock();
        for tp in partitions {
            all.remove(tp);
        }
    }
}

/// Handles a child's contribution (`request`, read from `job`): counts it
/// once, durably, and when it completes the join produces the join's
/// request. Returns once everything it wrote is acknowledged.
pub(super) async fn contribute(shared: &Shared, job: &Job, request: &TaskRequest) {
    let Some(w) = &request.workflow else {
        return;
    };
    let (Some(child), Some(count)) = (w.child_index, w.child_count) else {
        return;
    };
    if !(0..count).contains(&child) {
        // Not something a fan-out makes: counting it could complete the
        // join with a child missing.
        warn!(run = %w.id, child, count, "contribution with a child index outside 0..count; dropped");
        return;
    }
    let tp: TopicPartition = (job.ticket.topic.clone(), job.ticket.partition);
    let changelog = format!("{}{JOINS_SUFFIX}", job.ticket.topic);
    let part = shared.joins.partition(&tp);
    restore(shared, &part, &changelog, job.ticket.partition).await;

    let (done, known) = {
        let state = part.state();
        (
            state.done.contains_key(&w.id),
            state
                .open
                .get(&w.id)
                .is_some_and(|o| o.outputs.contains_key(&child)),
        )
    };
    if done {
        debug!(run = %w.id, child, "contribution to a join that is over; dropped");
        return;
    }
    if let Some(why) = request.metadata.get(CHILD_FAILED) {
        // The run's FAILED result is out already (the child's processor
        // wrote it): only the state is left to clean up.
        info!(run = %w.id, child, reason = %why, "a child failed; closing its join");
        if part.claim(w.id) {
            close(shared, &part, &changelog, job.ticket.partition, w.id).await;
            part.release(w.id);
        }
        return;
    }
    if !known {
        let entry = ChangelogEntry::Child {
            name: w.name.clone(),
            step: w.step,
            count,
            deadline: request.deadline,
            output: output_as_json(&request.payload),
            metadata: request.metadata.clone(),
        };
        let key = child_key(w.id, child);
        let value = serde_json::to_vec(&entry).unwrap_or_default();
        write(
            shared,
            &changelog,
            job.ticket.partition,
            &key,
            Some(value.clone()),
        )
        .await;
        if let Err(e) = part.state().apply(key.as_bytes(), Some(&value)) {
            warn!(run = %w.id, error = %e, "join state refused its own record");
        }
    }
    let ready = {
        let state = part.state();
        state.open.get(&w.id).filter(|o| o.complete()).cloned()
    };
    if let Some(open) = ready {
        if part.claim(w.id) {
            let traceparent = job.headers.traceparent.clone();
            complete(
                shared,
                &part,
                &changelog,
                job.ticket.partition,
                w,
                open,
                traceparent,
            )
            .await;
            part.release(w.id);
        }
    }
}

/// Produces the join's request from `open`'s outputs (with the trace
/// context of the contribution that completed it), then closes it.
async fn complete(
    shared: &Shared,
    part: &JoinPartition,
    changelog: &str,
    partition: i32,
    w: &WorkflowRef,
    open: OpenJoin,
    traceparent: Option<String>,
) {
    let outputs: Vec<serde_json::Value> = (0..open.count)
        .map(|i| open.outputs.get(&i).cloned().unwrap_or_default())
        .collect();
    let at_join = WorkflowRef {
        id: w.id,
        name: open.name.clone(),
        step: open.step,
        child_index: None,
        child_count: None,
    };
    match shared
        .workflows
        .join_request(&at_join, outputs, open.deadline, open.metadata.clone())
    {
        Some((topic, request)) => {
            let mut value = Vec::new();
            shared.codec.encode_request(&request, &mut value);
            let key = request.id.to_string();
            info!(run = %w.id, children = open.count, "every child finished; running the join");
            produce(
                shared,
                Outgoing {
                    topic: Arc::from(topic),
                    partition: None,
                    key: Some(key.into_bytes()),
                    value: Some(value),
                    headers: traceparent
                        .map(|t| super::headers::build([(super::headers::TRACEPARENT, Some(t))])),
                },
            )
            .await;
        }
        None => {
            warn!(run = %w.id, workflow = %open.name, "join of a workflow this worker does not define; dropping it")
        }
    }
    close(shared, part, changelog, partition, w.id).await;
}

/// Marks `run`'s join over (a `done` record), then deletes its children's
/// records (tombstones) and forgets them.
async fn close(shared: &Shared, part: &JoinPartition, changelog: &str, partition: i32, run: Uuid) {
    let done = ChangelogEntry::Done { at: now_millis() };
    let value = serde_json::to_vec(&done).unwrap_or_default();
    let key = done_key(run);
    write(shared, changelog, partition, &key, Some(value.clone())).await;
    let children: Vec<i32> = part
        .state()
        .open
        .get(&run)
        .map(|o| o.outputs.keys().copied().collect())
        .unwrap_or_default();
    let tombstones = children.iter().map(|child| {
        let key = child_key(run, *child);
        async move { write(shared, changelog, partition, &key, None).await }
    });
    futures::future::join_all(tombstones).await;
    if let Err(e) = part.state().apply(key.as_bytes(), Some(&value)) {
        warn!(%run, error = %e, "join state refused its own record");
    }
}

/// Fails the runs whose joins are still open past their deadline, and
/// forgets `done` records older than the retention. Called periodically.
pub(super) async fn sweep(shared: &Shared) {
    let partitions: Vec<(TopicPartition, Arc<JoinPartition>)> = shared
        .joins
        .lock()
        .iter()
        .filter(|(_, p)| p.restored.initialized())
        .map(|(tp, p)| (tp.clone(), p.clone()))
        .collect();
    let now = now_millis();
    for ((topic, partition), part) in partitions {
        let changelog = format!("{topic}{JOINS_SUFFIX}");
        let (expired, old): (Vec<(Uuid, OpenJoin)>, Vec<Uuid>) = {
            let state = part.state();
            (
                state
                    .open
                    .iter()
                    .filter(|(_, o)| o.deadline.is_some_and(|d| d < now))
                    .map(|(run, o)| (*run, o.clone()))
                    .collect(),
                state
                    .done
                    .iter()
                    .filter(|(_, at)| now.saturating_sub(**at) > DONE_RETENTION_MS)
                    .map(|(run, _)| *run)
                    .collect(),
            )
        };
        for (run, open) in expired {
            if !part.claim(run) {
                continue;
            }
            let w = WorkflowRef {
                id: run,
                name: open.name.clone(),
                step: open.step,
                child_index: None,
                child_count: Some(open.count),
            };
            warn!(%run, workflow = %open.name, have = open.outputs.len(), of = open.count, "workflow timed out waiting for its join");
            let result = shared
                .workflows
                .timed_out(&w, open.outputs.len(), &shared.worker);
            let mut value = Vec::new();
            shared.codec.encode_result(&result, &mut value);
            let key = result.id.to_string();
            produce(
                shared,
                Outgoing {
                    topic: shared.output_topic.clone(),
                    partition: None,
                    key: Some(key.into_bytes()),
                    value: Some(value),
                    headers: None,
                },
            )
            .await;
            close(shared, &part, &changelog, partition, run).await;
            part.release(run);
        }
        for run in old {
            let key = done_key(run);
            write(shared, &changelog, partition, &key, None).await;
            let _ = part.state().apply(key.as_bytes(), None);
        }
    }
}

/// Writes one changelog record (or a tombstone) to `partition` and waits
/// for its acknowledgement.
async fn write(
    shared: &Shared,
    changelog: &str,
    partition: i32,
    key: &str,
    value: Option<Vec<u8>>,
) {
    produce(
        shared,
        Outgoing {
            topic: Arc::from(changelog),
            partition: Some(partition),
            key: Some(key.as_bytes().to_vec()),
            value,
            headers: None,
        },
    )
    .await;
}

/// Reads `partition` of `changelog` back into `part`, once; tries again
/// until it succeeds (the contribution waiting on it keeps its offset
/// unstored meanwhile). Records are applied as they are read, into a fresh
/// state that replaces `part`'s only once the whole partition was read:
/// memory holds the joins, not the changelog.
async fn restore(shared: &Shared, part: &JoinPartition, changelog: &str, partition: i32) {
    part.restored
        .get_or_init(|| async {
            loop {
                let kafka = shared.joins.kafka.clone();
                let topic = changelog.to_owned();
                let read = tokio::task::spawn_blocking(move || {
                    let mut state = PartitionJoins::default();
                    let mut unreadable = 0usize;
                    let records = read_changelog(&kafka, &topic, partition, |key, value| {
                        if let Err(e) = state.apply(key, value) {
                            unreadable += 1;
                            debug!(error = %e, "changelog record skipped");
                        }
                    })?;
                    Ok::<_, String>((state, records, unreadable))
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
                match read {
                    Ok((restored, records, unreadable)) => {
                        if unreadable > 0 {
                            warn!(changelog, partition, unreadable, "changelog records that are not join state were skipped");
                        }
                        let mut state = part.state();
                        *state = restored;
                        info!(
                            changelog,
                            partition,
                            records,
                            open = state.open.len(),
                            "join state restored"
                        );
                        return;
                    }
                    Err(e) => {
                        warn!(changelog, partition, error = %e, "cannot read the join changelog; trying again");
                        tokio::time::sleep(RESTORE_RETRY).await;
                    }
                }
            }
        })
        .await;
}

/// Calls `apply` with every record (key, value) of `partition` of `topic`
/// from its start to its current end, in order; returns how many.
fn read_changelog(
    kafka: &KafkaSettings,
    topic: &str,
    partition: i32,
    mut apply: impl FnMut(&[u8], Option<&[u8]>),
) -> Result<usize, String> {
    let reader = kafka::Reader::new(kafka, "join-restore").map_err(|e| e.to_string())?;
    let (low, high) = reader
        .client()
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map_err(|e| format!("watermarks of {topic}/{partition}: {e}"))?;
    let mut records = 0;
    if high <= low {
        return Ok(records);
    }
    reader
        .assign(topic, &[partition], Offset::Beginning)
        .map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + RESTORE_TIMEOUT;
    loop {
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "{topic}/{partition}: not read to offset {high} within {RESTORE_TIMEOUT:?}"
            ));
        }
        match reader.read(Duration::from_millis(100)) {
            kafka::Read::Record(m) => {
                records += 1;
                apply(m.key().unwrap_or_default(), m.payload());
                if m.offset() + 1 >= high {
                    return Ok(records);
                }
            }
            kafka::Read::End(_) => return Ok(records),
            kafka::Read::Error(e) => return Err(format!("{topic}/{partition}: {e}")),
            kafka::Read::Idle => {}
        }
    }
}
