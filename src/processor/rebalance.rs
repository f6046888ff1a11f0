//! Partitions coming and going: the consumer's rebalance callbacks (a
//! revoke drains and commits before the partitions go; an assignment
//! restores the progress recorded in the committed metadata), sending the
//! commits, and the lag figures from librdkafka's statistics. What may be
//! committed is the ledger's to say (`ledger.rs`); this file sends it.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::ledger::{Progress, TopicPartition};
use super::Shared;
use crate::progress;

/// Longest wait for the committed offsets of newly assigned partitions.
const PROGRESS_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a drain waits, after its deadline, for the handlers it
/// cancelled to let go (a cancelled task must be polled once more).
const CANCEL_GRACE: Duration = Duration::from_millis(250);

/// Synchronous attempts of a commit whose metadata is refused: enough to
/// halve the largest budget down to none.
const METADATA_ATTEMPTS: usize = 10;

impl Shared {
    /// Reads the committed offsets of newly assigned `partitions` with
    /// their metadata, and marks the offsets it records as finished for
    /// skipping (see [`progress`]). Metadata that is missing or not usable
    /// is said once per partition and counted; the partition is then read
    /// from the committed offset as usual. Poll thread only.
    pub(super) fn restore_progress<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: &[TopicPartition],
    ) {
        if partitions.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (topic, partition) in partitions {
            list.add_partition(topic, *partition);
        }
        let committed = match consumer.committed_offsets(list, PROGRESS_READ_TIMEOUT) {
            Ok(committed) => committed,
            Err(e) => {
                warn!(processor = %self.name, error = %e,
                      "cannot read the committed offsets' metadata; work finished above them runs again");
                return;
            }
        };
        let mut restored = Vec::new();
        for element in committed.elements() {
            let Offset::Offset(offset) = element.offset() else {
                continue; // nothing committed yet
            };
            let (topic, partition) = (element.topic(), element.partition());
            // rdkafka panics on metadata that is not UTF-8, which another
            // client could have written.
            let metadata = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                element.metadata().to_owned()
            }))
            .map_err(|_| progress::Unusable::Invalid("not UTF-8"));
            let outcome = match metadata.and_then(|m| progress::decode(offset, &m)) {
                Ok(ranges) => {
                    let records: i64 = ranges.iter().map(|(s, e)| e - s).sum();
                    if records > 0 {
                        info!(processor = %self.name, topic, partition, committed = offset,
                              ranges = ranges.len(), offsets = records,
                              "skipping records above the committed offset that finished before");
                    }
                    restored.push(((Arc::from(topic), partition), ranges));
                    "used"
                }
                Err(progress::Unusable::Missing) => {
                    warn!(processor = %self.name, topic, partition, committed = offset,
                          "the committed offset carries no progress metadata (the broker may drop commit metadata):                            records above it that had finished run again");
                    "missing"
                }
                Err(e) => {
                    warn!(processor = %self.name, topic, partition, committed = offset, error = %e,
                          "progress metadata not used: records above the committed offset that had finished run again");
                    "invalid"
                }
            };
            if self.metrics.enabled() {
                self.metrics
                    .progress_restored
                    .with_label_values(&[&self.name, outcome])
                    .inc();
            }
        }
        let mut state = self.lock();
        for (tp, ranges) in restored {
            state.ledger.skip(&tp, ranges);
        }
    }

    /// After a rebalance: group-scoped rate limits take this member's
    /// share of their partitions (see [`crate::rate`]). The partition
    /// counts come from the cluster's metadata, read here (only when some
    /// type is limited); when it cannot be read, the last counts known
    /// serve. Poll thread only.
    pub(super) fn rescale_limits<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        if self.limits.is_empty() {
            return;
        }
        let mut counts = self
            .partition_counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match consumer.fetch_metadata(None, Duration::from_secs(5)) {
            Ok(metadata) => {
                for topic in metadata.topics() {
                    if topic.error().is_none() {
                        counts.insert(topic.name().to_owned(), topic.partitions().len());
                    }
                }
            }
            Err(e) => {
                warn!(processor = %self.name, error = %e, "cannot read partition counts for the rate limits' shares; using the last known");
            }
        }
        let owned = self.lock().ledger.owned_by_topic();
        self.limits.rescale(&owned, &counts);
    }

    pub(super) fn publish_assigned(&self, assigned: usize) {
        self.status
            .assigned
            .store(assigned, AtomicOrdering::Relaxed);
        if self.metrics.enabled() {
            self.metrics
                .partitions_assigned
                .with_label_values(&[&self.name])
                .set(i64::try_from(assigned).unwrap_or(i64::MAX));
        }
    }

    /// Commits the progress (watermark, and the finished offsets above it
    /// in the metadata) of each chosen partition (all when `None`): those
    /// whose finished offsets changed since, or, with `all`, every one.
    /// Poll thread only.
    ///
    /// conveyor commits by itself instead of librdkafka's auto-commit,
    /// which sends nothing while the watermark stands still (a head that
    /// does not finish) although the metadata changes, and whose timer
    /// can send an older stored offset after a newer explicit commit.
    /// Asynchronous commits are sent in order from this thread; one that
    /// fails unseen is healed by the next full commit (every
    /// [`FULL_COMMIT_EVERY`] intervals) and by the synchronous commit of
    /// every drain, whose outcome is known.
    pub(super) fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: Option<&[TopicPartition]>,
        mode: CommitMode,
        all: bool,
    ) -> Result<(), KafkaError> {
        let mut chosen: Option<Vec<TopicPartition>> = partitions.map(<[_]>::to_vec);
        let mut all = all;
        let mut last = Ok(());
        // A commit whose metadata is refused is sent again at once with
        // less (each refusal halves the budget, down to none). librdkafka
        // reports the outcome of an explicit asynchronous commit to no one
        // (only auto-commits raise commit events, and conveyor turns those
        // off: hence no `commit_callback`), so a commit carrying metadata
        // longer than any taken before for its partition is sent
        // synchronously: a broker's limit is then found out, and shorter
        // metadata goes asynchronously after.
        for _ in 0..METADATA_ATTEMPTS {
            let (list, lengths, unconfirmed) = self.commit_list(chosen.as_deref(), all);
            if list.count() == 0 {
                return last;
            }
            let sync = matches!(mode, CommitMode::Sync) || unconfirmed;
            let outcome = consumer.commit(
                &list,
                if sync {
                    CommitMode::Sync
                } else {
                    CommitMode::Async
                },
            );
            self.count_commit(&outcome, sync);
            let e = match outcome {
                Ok(()) => {
                    if sync {
                        let mut state = self.lock();
                        for (tp, length) in &lengths {
                            state.ledger.metadata_accepted(tp, *length);
                        }
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            let refused = self.commit_refused(&e, &list);
            if refused.is_empty() || !sync {
                return Err(e);
            }
            last = Err(e);
            chosen = Some(refused);
            all = true;
        }
        last
    }

    /// Counts a commit sent (`conveyor_offset_commits_total`) or, when its
    /// outcome is known to be a failure, a failed one.
    fn count_commit(&self, outcome: &Result<(), KafkaError>, sync: bool) {
        let failed = outcome.is_err();
        if failed {
            debug!(processor = %self.name, sync, error = ?outcome.as_ref().err(), "offset commit failed");
            self.count_error("commit");
        }
        if self.metrics.enabled() {
            let counter = if failed {
                &self.metrics.offset_commit_failures
            } else {
                &self.metrics.offset_commits
            };
            counter.with_label_values(&[&self.name]).inc();
        }
    }

    /// The commit of the chosen partitions' progress: snapshots taken under
    /// the engine's lock, metadata encoded outside it (or reused while a
    /// partition's progress is unchanged). With it, each partition's
    /// metadata length, and whether any is longer than its partition's
    /// longest known to be taken.
    fn commit_list(
        &self,
        partitions: Option<&[TopicPartition]>,
        all: bool,
    ) -> (TopicPartitionList, Vec<(TopicPartition, usize)>, bool) {
        let snapshots = self.lock().ledger.progress(partitions, all);
        let mut list = TopicPartitionList::with_capacity(snapshots.len());
        let mut lengths = Vec::with_capacity(snapshots.len());
        let mut unconfirmed = false;
        if snapshots.is_empty() {
            return (list, lengths, unconfirmed);
        }
        let mut overflowed = 0;
        let mut fresh = Vec::new();
        let mut failed = Vec::new();
        for snapshot in &snapshots {
            let encoded = match &snapshot.progress {
                Progress::Encoded(encoded) => encoded.clone(),
                Progress::Ranges(ranges) => {
                    let encoded = Arc::new(progress::encode(
                        snapshot.watermark,
                        ranges.iter().copied(),
                        snapshot.budget,
                    ));
                    fresh.push((snapshot, encoded.clone()));
                    encoded
                }
            };
            if encoded.left_out {
                overflowed += 1;
            }
            let tp = &snapshot.partition;
            if let Err(e) =
                list.add_partition_offset(&tp.0, tp.1, Offset::Offset(snapshot.watermark))
            {
                // Left for the next commit; the others go now.
                warn!(processor = %self.name, topic = %tp.0, partition = tp.1, error = %e,
                      "cannot put the partition's offset in a commit");
                failed.push(tp);
                continue;
            }
            if !encoded.metadata.is_empty() {
                if let Some(mut element) = list.find_partition(&tp.0, tp.1) {
                    element.set_metadata(&encoded.metadata);
                }
            }
            unconfirmed |= encoded.metadata.len() > snapshot.accepted;
            lengths.push((tp.clone(), encoded.metadata.len()));
        }
        if !fresh.is_empty() || !failed.is_empty() {
            let mut state = self.lock();
            for (snapshot, encoded) in fresh {
                state.ledger.encoded(snapshot, encoded);
            }
            for tp in failed {
                state.ledger.commit_failed(tp);
            }
        }
        if overflowed > 0 {
            if let Some(counter) = &self.hot.progress_overflow {
                counter.inc_by(overflowed);
            }
        }
        (list, lengths, unconfirmed)
    }

    /// Marks the partitions of a failed commit for the next one. Those
    /// whose metadata the broker refused as too large get a smaller budget
    /// (a warning on a partition's first refusal in its assignment); they
    /// are returned.
    fn commit_refused(&self, error: &KafkaError, list: &TopicPartitionList) -> Vec<TopicPartition> {
        let too_large = |code: Option<RDKafkaErrorCode>| {
            matches!(
                code,
                Some(
                    RDKafkaErrorCode::OffsetMetadataTooLarge
                        | RDKafkaErrorCode::InvalidCommitOffsetSize
                )
            )
        };
        let whole = too_large(error.rdkafka_error_code());
        let mut refused = Vec::new();
        let mut state = self.lock();
        for element in list.elements() {
            let tp: TopicPartition = (Arc::from(element.topic()), element.partition());
            let this = match element.error() {
                Err(e) => too_large(e.rdkafka_error_code()),
                Ok(()) => whole && !element.metadata().is_empty(),
            };
            if !this {
                state.ledger.commit_failed(&tp);
                continue;
            }
            if let Some((budget, first)) = state.ledger.metadata_refused(&tp) {
                if first {
                    warn!(processor = %self.name, topic = %tp.0, partition = tp.1, %error, budget,
                          "the broker refused the commit's progress metadata as too large; \
                           committing with less (raise the broker's offset.metadata.max.bytes, \
                           or lower kafka.commit_metadata_bytes)");
                } else {
                    debug!(processor = %self.name, topic = %tp.0, partition = tp.1, budget,
                           "progress metadata refused again; committing with less");
                }
                if let Some(counter) = &self.hot.metadata_refused {
                    counter.inc();
                }
            }
            refused.push(tp);
        }
        refused
    }

    /// Stops intake on `partitions` (all when `None`), drops their records
    /// that have not started, waits until the running ones finish or the
    /// drain deadline passes, stores what finished and commits it
    /// synchronously. Poll thread only (it may be inside a rebalance).
    pub(super) fn drain<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: Option<&[TopicPartition]>,
        why: &str,
    ) {
        // After an error that stops the processor, nothing that is still
        // running can be trusted to finish: commit what is safe and go.
        let wait = match self.fatal_error() {
            Some(_) => Duration::ZERO,
            None => Duration::from_millis(self.settings.drain_timeout_ms),
        };
        let mut deadline = Instant::now() + wait;
        let mut state = self.lock();
        state.draining = true;
        let not_started = state.ledger.begin_drain(partitions);
        let dropped = not_started.iter().filter(|j| !j.ticket.parked).count();
        drop(not_started);
        debug!(processor = %self.name, why, running = state.ledger.running(partitions), "draining");
        self.publish_in_flight(&state);
        // Tasks that only wait (a retry not due, a backoff, the breaker)
        // are let go of now: they produced nothing, the next owner runs them.
        self.drain_begun.send_modify(|n| *n = n.wrapping_add(1));
        loop {
            let running = state.ledger.running(partitions);
            let now = Instant::now();
            if running == 0 {
                info!(processor = %self.name, why, not_started = dropped, "drained");
                break;
            }
            if now >= deadline {
                if state.cancelling {
                    warn!(
                        processor = %self.name,
                        why,
                        still_running = running,
                        drain_timeout_ms = self.settings.drain_timeout_ms,
                        "tasks still running after the drain deadline (handlers that do not yield, or outputs \
                         not yet acknowledged); their offsets are not committed"
                    );
                    break;
                }
                // Handlers still running are cancelled (their futures are
                // dropped, nothing is produced, the next owner runs them):
                // a key must not run here and at the next owner at once.
                warn!(
                    processor = %self.name,
                    why,
                    still_running = running,
                    drain_timeout_ms = self.settings.drain_timeout_ms,
                    "drain deadline passed; cancelling the handlers still running"
                );
                state.cancelling = true;
                self.drain_deadline.send_modify(|n| *n = n.wrapping_add(1));
                deadline = now + CANCEL_GRACE;
            }
            state = match self.finished.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        state.draining = false;
        state.cancelling = false;
        drop(state);
        if let Err(e) = self.commit(consumer, partitions, CommitMode::Sync, true) {
            self.status
                .drain_commit_failures
                .fetch_add(1, AtomicOrdering::Relaxed);
            warn!(processor = %self.name, why, error = %e, "synchronous commit failed");
        }
    }
}

/// The consumer's context: rebalance callbacks that drain and commit.
pub(crate) struct EngineContext {
    pub(super) shared: Arc<Shared>,
}

impl ClientContext for EngineContext {
    /// Authentication and certificate failures stop the processor (exit
    /// 1) instead of being retried forever in the log.
    fn error(&self, error: KafkaError, reason: &str) {
        match crate::security::fatal_connection_error(error.rdkafka_error_code(), reason) {
            Some(message) => self.shared.fail(message),
            None => {
                warn!(processor = %self.shared.name, %error, reason, "librdkafka consumer error")
            }
        }
    }

    /// Consumer lag per owned partition, from librdkafka's statistics.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let shared = &self.shared;
        let now = shared.tick();
        let state = shared.lock();
        for ((topic, partition), tracker) in state.ledger.trackers() {
            let Some(stats) = statistics
                .topics
                .get(topic.as_ref())
                .and_then(|t| t.partitions.get(partition))
            else {
                continue;
            };
            let high = stats.hi_offset;
            if high < 0 {
                continue; // not known yet
            }
            // Nothing committed yet: everything from the log start is lag.
            let committed = if stats.committed_offset >= 0 {
                stats.committed_offset
            } else {
                stats.lo_offset.max(0)
            };
            let next_unfinished = tracker.watermark().unwrap_or(committed);
            let labels = [shared.name.as_str(), topic.as_ref(), &partition.to_string()];
            let m = &shared.metrics;
            let age = tracker
                .oldest_unfinished_tick()
                .map_or(0, |tick| now.saturating_sub(tick));
            m.oldest_unfinished
                .with_label_values(&labels)
                .set(i64::from(age));
            m.committed_lag
                .with_label_values(&labels)
                .set((high - committed).max(0));
            m.processing_lag
                .with_label_values(&labels)
                .set((high - next_unfinished).max(0));
        }
    }
}

impl ConsumerContext for EngineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions = topic_partitions(list);
                if consumer.assignment_lost() {
                    // Another member may own them already: committing now
                    // could move its offsets backwards. Just let go.
                    warn!(processor = %self.shared.name, partitions = ?partitions, "assignment lost; letting go without committing");
                } else {
                    info!(processor = %self.shared.name, partitions = ?partitions, "partitions revoked; draining");
                    self.shared.drain(consumer, Some(&partitions), "revoke");
                }
                let shared = &self.shared;
                let event = if consumer.assignment_lost() {
                    "lost"
                } else {
                    "revoked"
                };
                if shared.metrics.enabled() {
                    shared
                        .metrics
                        .rebalance_events
                        .with_label_values(&[&shared.name, event])
                        .inc_by(partitions.len() as u64);
                }
                shared.joins.forget(&partitions);
                let mut state = shared.lock();
                state.ledger.revoke(&partitions);
                for tp in &partitions {
                    // No stale lag series for partitions this member let go.
                    let labels = [shared.name.as_str(), tp.0.as_ref(), &tp.1.to_string()];
                    let _ = shared.metrics.committed_lag.remove_label_values(&labels);
                    let _ = shared.metrics.processing_lag.remove_label_values(&labels);
                    let _ = shared
                        .metrics
                        .oldest_unfinished
                        .remove_label_values(&labels);
                }
                shared.publish_assigned(state.ledger.owned());
                shared.publish_in_flight(&state);
                let still_owns = state.ledger.owned() > 0;
                drop(state);
                // Some partitions kept (an incremental revoke): a new
                // share now; none kept: the next assignment sets it.
                if still_owns {
                    shared.rescale_limits(consumer);
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                error!(processor = %self.shared.name, error = %e, "rebalance failed");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let partitions = topic_partitions(list);
            info!(processor = %self.shared.name, partitions = ?partitions, "partitions assigned");
            let fresh = self.shared.lock().ledger.assign(partitions);
            // Before any record of these partitions is dispatched (that
            // happens on this thread, after this callback).
            self.shared.restore_progress(consumer, &fresh);
            let state = self.shared.lock();
            self.shared.publish_assigned(state.ledger.owned());
            drop(state);
            self.shared.rescale_limits(consumer);
            if self.shared.metrics.enabled() {
                self.shared
                    .metrics
                    .rebalance_events
                    .with_label_values(&[&self.shared.name, "assigned"])
                    .inc_by(list.count() as u64);
            }
        }
    }
}

fn topic_partitions(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements()
        .iter()
        .map(|e| (Arc::from(e.topic()), e.partition()))
        .collect()
}
