//! Workflows: named sequences of steps over topics, with fan-out and join.
//!
//! A run is a chain of ordinary task requests, each carrying a
//! [`WorkflowRef`] (run id, definition name, step, and for a fan-out's
//! children their index and count). When a step succeeds, the processor
//! that ran it produces what comes next — the next step's request, a
//! fan-out's children, a child's contribution to its join, or the run's own
//! result — in the same at-least-once unit as the step's input offset
//! ([`Workflows::after_success`]); when a step fails for good it produces
//! the run's FAILED result ([`Workflows::after_failure`]).
//!
//! Every request a run makes has an id derived from (run id, step, child
//! index) ([`step_id`]), so a redelivered step makes the same next request
//! again, which readers can recognise as the same task. A run's own result
//! has the run id as its task id and carries `step` = the number of steps.
//!
//! Joins keep their state (which children have finished and their outputs)
//! per partition of the join task's topic, in memory and in a compacted
//! changelog topic `<topic>.joins` ([`JOINS_SUFFIX`]); the records of that
//! changelog are [`ChangelogEntry`] values. The processor side is in
//! `processor::join`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use sha2::Digest;
use uuid::Uuid;

use crate::codec::{
    now_millis, FailureKind, TaskError, TaskRequest, TaskResult, TaskStatus, WorkflowRef,
    DEFAULT_CONTENT_TYPE,
};
use crate::settings::{Settings, WorkflowSettings};

/// A join's changelog topic is its task topic with this suffix.
pub const JOINS_SUFFIX: &str = ".joins";
/// Metadata key marking a contribution that reports a failed child.
pub use crate::codec::wire::CHILD_FAILED;
/// Metadata key of an idempotency key; not carried to later steps.
use crate::codec::wire::IDEMPOTENCY_KEY as IDEMPOTENCY_METADATA;

/// The deterministic task id of `workflow`'s request for `step` (and
/// `child`, for a fan-out's children and their contributions).
pub fn step_id(workflow: Uuid, step: i32, child: Option<i32>) -> Uuid {
    let mut hash = sha2::Sha256::new();
    hash.update(b"conveyor-workflow-step\0");
    hash.update(workflow.as_bytes());
    hash.update(step.to_be_bytes());
    match child {
        Some(c) => {
            hash.update([1]);
            hash.update(c.to_be_bytes());
        }
        None => hash.update([0]),
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// A record a finished step asks for, besides its own result.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// A task request to `topic`, with this record key.
    Request {
        /// The task type's topic.
        topic: String,
        /// Record key.
        key: Vec<u8>,
        /// The request.
        request: TaskRequest,
    },
    /// The run's own result, to the results topic.
    Result(TaskResult),
}

/// The definitions of a configuration and where each task type is read.
#[derive(Debug, Clone, Default)]
pub struct Workflows {
    definitions: BTreeMap<String, WorkflowSettings>,
    topics: BTreeMap<String, String>,
}

/// Why a run could not be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// No definition by that name.
    #[error("unknown workflow `{0}`")]
    Unknown(String),
}

impl Workflows {
    /// The workflows `settings` defines.
    pub fn from_settings(settings: &Settings) -> Self {
        Workflows {
            definitions: settings
                .workflows
                .iter()
                .map(|w| (w.name.clone(), w.clone()))
                .collect(),
            topics: settings.task_topics(),
        }
    }

    /// Whether any workflow is defined.
    pub fn is_empty(&self) -> bool {
        self.definitions.is_empty()
    }

    /// The definition called `name`.
    pub fn get(&self, name: &str) -> Option<&WorkflowSettings> {
        self.definitions.get(name)
    }

    /// Every definition, by name.
    pub fn definitions(&self) -> impl Iterator<Item = &WorkflowSettings> {
        self.definitions.values()
    }

    /// The topic a task type is read from.
    pub fn topic(&self, task_type: &str) -> Option<&str> {
        self.topics.get(task_type).map(String::as_str)
    }

    /// Topics of every task type that is a join step somewhere.
    pub fn join_topics(&self) -> BTreeSet<String> {
        self.definitions
            .values()
            .flat_map(|w| w.steps.iter().filter(|s| s.join))
            .filter_map(|s| self.topic(&s.task).map(str::to_owned))
            .collect()
    }

    /// Topics of every step of the workflows that use one of `task_types`:
    /// where a processor running those types may write next requests.
    pub fn topics_after(&self, task_types: &BTreeSet<&str>) -> BTreeSet<String> {
        self.definitions
            .values()
            .filter(|w| w.steps.iter().any(|s| task_types.contains(s.task.as_str())))
            .flat_map(|w| w.steps.iter())
            .filter_map(|s| self.topic(&s.task).map(str::to_owned))
            .collect()
    }

    /// The first step's request of a new run of `name`, and its topic.
    pub fn start(
        &self,
        name: &str,
        payload: Vec<u8>,
        content_type: String,
        metadata: BTreeMap<String, String>,
    ) -> Result<(String, TaskRequest), StartError> {
        let unknown = || StartError::Unknown(name.to_owned());
        let definition = self.get(name).ok_or_else(unknown)?;
        let first = definition.steps.first().ok_or_else(unknown)?;
        let topic = self.topic(&first.task).ok_or_else(unknown)?;
        let id = Uuid::new_v4();
        let now = now_millis();
        let deadline = (definition.timeout_ms > 0)
            .then(|| now.saturating_add(i64::try_from(definition.timeout_ms).unwrap_or(i64::MAX)));
        let at = WorkflowRef {
            id,
            name: name.to_owned(),
            step: 0,
            child_index: None,
            child_count: None,
        };
        let request = step_request(at, &first.task, payload, content_type, deadline, metadata);
        Ok((topic.to_owned(), request))
    }

    /// Whether `request`, a step of a workflow, fits its definition: the
    /// definition exists, the step is one of its steps and runs this task
    /// type, and a child index lies within its count. The error says what
    /// does not fit, with the kind to report it under.
    pub fn check(&self, request: &TaskRequest) -> Result<(), (FailureKind, String)> {
        let Some(w) = &request.workflow else {
            return Ok(());
        };
        let Some(definition) = self.get(&w.name) else {
            return Err((
                FailureKind::UnknownWorkflow,
                format!("workflow `{}` is not defined in this configuration", w.name),
            ));
        };
        let bad = |why: String| Err((FailureKind::InvalidWorkflowStep, why));
        let Some(step) = step_at(definition, w.step) else {
            return bad(format!(
                "workflow `{}` has {} steps; this request is for step {}",
                w.name,
                definition.steps.len(),
                w.step
            ));
        };
        if step.task != request.task_type {
            return bad(format!(
                "step {} of workflow `{}` runs `{}`, not `{}`",
                w.step, w.name, step.task, request.task_type
            ));
        }
        match (w.child_index, w.child_count) {
            (None, None) => Ok(()),
            (Some(i), Some(n)) if (0..n).contains(&i) => Ok(()),
            (i, n) => bad(format!(
                "child index {i:?} and count {n:?} do not fit together"
            )),
        }
    }

    /// Whether `request` is a child's contribution to a join (which the
    /// processor gathers instead of running a handler).
    pub fn is_contribution(&self, request: &TaskRequest) -> bool {
        let Some(w) = &request.workflow else {
            return false;
        };
        w.child_index.is_some()
            && self
                .get(&w.name)
                .and_then(|d| step_at(d, w.step))
                .is_some_and(|s| s.join)
    }

    /// What follows the success of `request` (a workflow step) with
    /// `result`: the next step's request, a fan-out's children, a child's
    /// contribution to its join, or the run's result. A run that cannot go
    /// on (an unknown definition, a fan-out output that is not a JSON array)
    /// gets its FAILED result instead.
    pub fn after_success(
        &self,
        request: &TaskRequest,
        result: &TaskResult,
        worker: &str,
    ) -> Vec<Next> {
        let Some(w) = &request.workflow else {
            return Vec::new();
        };
        let Some(definition) = self.get(&w.name) else {
            return vec![self.unknown_definition(w, worker)];
        };
        let output = result.output.clone().unwrap_or_default();
        let content_type = result.content_type.clone();
        let last = definition.steps.len().saturating_sub(1);
        let Ok(step) = usize::try_from(w.step) else {
            return vec![self.unknown_definition(w, worker)];
        };
        if step >= last {
            return vec![Next::Result(run_result(
                w,
                definition.steps.len(),
                TaskStatus::Succeeded,
                Some((output, content_type)),
                None,
                worker,
            ))];
        }
        let this = &definition.steps[step];
        let next = &definition.steps[step + 1];
        let next_step = w.step.saturating_add(1);
        let Some(topic) = self.topic(&next.task) else {
            return vec![self.unknown_definition(w, worker)];
        };
        let follow = |payload: Vec<u8>, content_type: String, child: Option<(i32, i32)>| {
            step_request(
                at_step(w, next_step, child),
                &next.task,
                payload,
                content_type,
                request.deadline,
                carried(&request.metadata),
            )
        };
        if this.fan_out {
            let elements = match serde_json::from_slice::<serde_json::Value>(&output) {
                Ok(serde_json::Value::Array(elements)) => elements,
                _ => {
                    let message = format!(
                        "step {} (`{}`) fans out, but its output is not a JSON array",
                        w.step, this.task
                    );
                    let error = TaskError {
                        kind: FailureKind::FanOut.into(),
                        message,
                    };
                    return vec![Next::Result(failed_run(
                        w,
                        definition.steps.len(),
                        error,
                        worker,
                    ))];
                }
            };
            let count = match i32::try_from(elements.len()) {
                Ok(count) if elements.len() <= definition.max_fan_out => count,
                _ => {
                    let error = TaskError {
                        kind: FailureKind::FanOut.into(),
                        message: format!(
                            "step {} (`{}`) fans out into {} children; the workflow's max_fan_out is {}",
                            w.step,
                            this.task,
                            elements.len(),
                            definition.max_fan_out
                        ),
                    };
                    return vec![Next::Result(failed_run(
                        w,
                        definition.steps.len(),
                        error,
                        worker,
                    ))];
                }
            };
            if count == 0 {
                // Nothing to wait for: straight to the join, with no outputs.
                return self.skip_to_join(w, definition, request, worker);
            }
            return elements
                .iter()
                .zip(0..)
                .map(|(element, index)| {
                    let payload = serde_json::to_vec(element).unwrap_or_default();
                    let request =
                        follow(payload, DEFAULT_CONTENT_TYPE.into(), Some((index, count)));
                    Next::Request {
                        topic: topic.to_owned(),
                        key: crate::codec::uuid_key(&request.id),
                        request,
                    }
                })
                .collect();
        }
        let child = w.child_index.zip(w.child_count);
        let request = follow(output, content_type, child);
        // A contribution is keyed by the run, so every child of one join
        // lands on the same partition (and the same join state).
        let key = if next.join && child.is_some() {
            crate::codec::uuid_key(&w.id)
        } else {
            crate::codec::uuid_key(&request.id)
        };
        vec![Next::Request {
            topic: topic.to_owned(),
            key,
            request,
        }]
    }

    /// What follows the terminal failure of `request` (a workflow step):
    /// the run's FAILED result naming the step, and for a fan-out's child,
    /// a contribution telling its join to give up.
    pub fn after_failure(
        &self,
        request: &TaskRequest,
        error: &TaskError,
        worker: &str,
    ) -> Vec<Next> {
        let Some(w) = &request.workflow else {
            return Vec::new();
        };
        let Some(definition) = self.get(&w.name) else {
            return vec![self.unknown_definition(w, worker)];
        };
        // A cancelled step cancels its run; any other failure fails it.
        let kind = if error.kind == FailureKind::Cancelled.as_str() {
            FailureKind::Cancelled
        } else {
            FailureKind::StepFailed
        };
        let step_error = TaskError {
            kind: kind.into(),
            message: format!(
                "step {} (`{}`){} failed: {}: {}",
                w.step,
                request.task_type,
                w.child_index
                    .map(|c| format!(", child {c}"))
                    .unwrap_or_default(),
                error.kind,
                error.message
            ),
        };
        let mut next = vec![Next::Result(failed_run(
            w,
            definition.steps.len(),
            step_error.clone(),
            worker,
        ))];
        // A child: tell the join, so its state is dropped now.
        let child = w.child_index.zip(w.child_count);
        let join = join_after(definition, w.step);
        if let (Some(child), Some((join_step, join))) = (child, join) {
            if let Some(topic) = self.topic(&join.task) {
                let mut metadata = carried(&request.metadata);
                metadata.insert(CHILD_FAILED.into(), step_error.message);
                next.push(Next::Request {
                    topic: topic.to_owned(),
                    key: crate::codec::uuid_key(&w.id),
                    request: step_request(
                        at_step(w, join_step, Some(child)),
                        &join.task,
                        Vec::new(),
                        DEFAULT_CONTENT_TYPE.into(),
                        request.deadline,
                        metadata,
                    ),
                });
            }
        }
        next
    }

    /// The request that runs the join step `step` of run `w` on `outputs`
    /// (every child's output, in child order): what a complete join asks
    /// for. `None` if the definition or topic is unknown.
    pub fn join_request(
        &self,
        w: &WorkflowRef,
        outputs: Vec<serde_json::Value>,
        deadline: Option<i64>,
        metadata: BTreeMap<String, String>,
    ) -> Option<(String, TaskRequest)> {
        let definition = self.get(&w.name)?;
        let join = step_at(definition, w.step)?;
        let topic = self.topic(&join.task)?;
        let payload = serde_json::to_vec(&serde_json::Value::Array(outputs)).unwrap_or_default();
        Some((
            topic.to_owned(),
            step_request(
                at_step(w, w.step, None),
                &join.task,
                payload,
                DEFAULT_CONTENT_TYPE.into(),
                deadline,
                carried(&metadata),
            ),
        ))
    }

    /// The FAILED result of run `w`, for a join that timed out.
    pub fn timed_out(&self, w: &WorkflowRef, have: usize, worker: &str) -> TaskResult {
        let error = TaskError {
            kind: FailureKind::Timeout.into(),
            message: format!(
                "the workflow's timeout passed while step {} waited for its children ({have} of {} finished)",
                w.step,
                w.child_count.unwrap_or_default()
            ),
        };
        let steps = self.get(&w.name).map_or(0, |d| d.steps.len());
        failed_run(w, steps, error, worker)
    }

    fn skip_to_join(
        &self,
        w: &WorkflowRef,
        definition: &WorkflowSettings,
        request: &TaskRequest,
        worker: &str,
    ) -> Vec<Next> {
        let Some((join_step, _)) = join_after(definition, w.step) else {
            return vec![self.unknown_definition(w, worker)];
        };
        match self.join_request(
            &at_step(w, join_step, None),
            Vec::new(),
            request.deadline,
            request.metadata.clone(),
        ) {
            Some((topic, request)) => vec![Next::Request {
                topic,
                key: crate::codec::uuid_key(&request.id),
                request,
            }],
            None => vec![self.unknown_definition(w, worker)],
        }
    }

    fn unknown_definition(&self, w: &WorkflowRef, worker: &str) -> Next {
        Next::Result(failed_run(
            w,
            0,
            TaskError {
                kind: FailureKind::UnknownWorkflow.into(),
                message: format!(
                    "workflow `{}` (step {}) is not defined in this worker's configuration",
                    w.name, w.step
                ),
            },
            worker,
        ))
    }
}

/// Where run `w` stands at `step` (and `child`: index and count).
fn at_step(w: &WorkflowRef, step: i32, child: Option<(i32, i32)>) -> WorkflowRef {
    WorkflowRef {
        id: w.id,
        name: w.name.clone(),
        step,
        child_index: child.map(|c| c.0),
        child_count: child.map(|c| c.1),
    }
}

/// A first attempt at the step `at` names, its id derived from run, step
/// and child ([`step_id`]), so that asking again asks for the same task.
fn step_request(
    at: WorkflowRef,
    task_type: &str,
    payload: Vec<u8>,
    content_type: String,
    deadline: Option<i64>,
    metadata: BTreeMap<String, String>,
) -> TaskRequest {
    TaskRequest {
        id: step_id(at.id, at.step, at.child_index),
        task_type: task_type.to_owned(),
        key: None,
        payload,
        content_type,
        attempt: 1,
        submitted_at: now_millis(),
        deadline,
        workflow: Some(at),
        metadata,
    }
}

/// The first join step after `step`, with its index.
fn join_after(
    definition: &WorkflowSettings,
    step: i32,
) -> Option<(i32, &crate::settings::StepSettings)> {
    let after = usize::try_from(step).ok()?.checked_add(1)?;
    definition
        .steps
        .iter()
        .enumerate()
        .skip(after)
        .find(|(_, s)| s.join)
        .and_then(|(i, s)| Some((i32::try_from(i).ok()?, s)))
}

fn step_at(definition: &WorkflowSettings, step: i32) -> Option<&crate::settings::StepSettings> {
    usize::try_from(step)
        .ok()
        .and_then(|s| definition.steps.get(s))
}

/// Metadata carried to the next steps: all but the idempotency key, which
/// names the run's first request only.
fn carried(metadata: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    metadata
        .iter()
        .filter(|(k, _)| k.as_str() != IDEMPOTENCY_METADATA && k.as_str() != CHILD_FAILED)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The result of run `w` itself: task id = run id, `step` = `steps`, the
/// number of steps of its definition (0 when the definition is unknown).
fn run_result(
    w: &WorkflowRef,
    steps: usize,
    status: TaskStatus,
    output: Option<(Vec<u8>, String)>,
    error: Option<TaskError>,
    worker: &str,
) -> TaskResult {
    let now = now_millis();
    let (output, content_type) = match output {
        Some((bytes, content_type)) => (Some(bytes), content_type),
        None => (None, String::new()),
    };
    TaskResult {
        id: w.id,
        task_type: w.name.clone(),
        status,
        output,
        content_type,
        error,
        attempts: 1,
        started_at: now,
        finished_at: now,
        worker: worker.to_owned(),
        workflow: Some(WorkflowRef {
            id: w.id,
            name: w.name.clone(),
            step: i32::try_from(steps).unwrap_or(i32::MAX),
            child_index: None,
            child_count: None,
        }),
    }
}

/// The FAILED result of run `w`.
fn failed_run(w: &WorkflowRef, steps: usize, error: TaskError, worker: &str) -> TaskResult {
    run_result(w, steps, TaskStatus::Failed, None, Some(error), worker)
}

/// `output` as a JSON value for a join's input: itself if it is JSON, else
/// a JSON string of its text.
pub fn output_as_json(output: &[u8]) -> serde_json::Value {
    serde_json::from_slice(output)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(output).into_owned()))
}

/// One record of a join's changelog, keyed `<run id>/<child index>` for a
/// child's output and `<run id>/done` once the join is over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChangelogEntry {
    /// A child finished with this output.
    Child {
        /// Definition name.
        name: String,
        /// The join's step.
        step: i32,
        /// How many children the fan-out made.
        count: i32,
        /// The run's deadline, if any.
        deadline: Option<i64>,
        /// The child's output.
        output: serde_json::Value,
        /// Metadata carried to the join step.
        #[serde(default)]
        metadata: BTreeMap<String, String>,
    },
    /// The join ran (or gave up) at this time; later contributions are
    /// duplicates.
    Done {
        /// Milliseconds since the Unix epoch.
        at: i64,
    },
}

/// The key of a child's changelog record.
pub fn child_key(run: Uuid, child: i32) -> String {
    format!("{run}/{child}")
}

/// The key of a join's "done" record.
pub fn done_key(run: Uuid) -> String {
    format!("{run}/done")
}

/// One join being gathered.
#[derive(Debug, Clone, Default)]
pub struct OpenJoin {
    /// Definition name.
    pub name: String,
    /// The join's step.
    pub step: i32,
    /// Children expected.
    pub count: i32,
    /// The run's deadline.
    pub deadline: Option<i64>,
    /// Outputs by child index.
    pub outputs: BTreeMap<i32, serde_json::Value>,
    /// Metadata for the join step.
    pub metadata: BTreeMap<String, String>,
}

impl OpenJoin {
    /// Whether every child has reported.
    pub fn complete(&self) -> bool {
        usize::try_from(self.count).is_ok_and(|c| self.outputs.len() >= c)
    }
}

/// The joins of one partition, as its changelog describes them.
#[derive(Debug, Default)]
pub struct PartitionJoins {
    /// Joins still gathering, by run id.
    pub open: HashMap<Uuid, OpenJoin>,
    /// Joins that are over, with when.
    pub done: HashMap<Uuid, i64>,
}

impl PartitionJoins {
    /// Applies one changelog record (`value` `None` is a tombstone).
    /// Records it cannot read are skipped (and reported).
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        let key = std::str::from_utf8(key).map_err(|_| "key is not UTF-8".to_owned())?;
        let (run, what) = key
            .split_once('/')
            .ok_or_else(|| format!("key `{key}` is not <run>/<child|done>"))?;
        let run = Uuid::parse_str(run).map_err(|e| format!("key `{key}`: {e}"))?;
        let Some(value) = value else {
            if what == "done" {
                self.done.remove(&run);
            } else if let (Some(open), Ok(child)) = (self.open.get_mut(&run), what.parse::<i32>()) {
                open.outputs.remove(&child);
                if open.outputs.is_empty() {
                    self.open.remove(&run);
                }
            }
            return Ok(());
        };
        let entry: ChangelogEntry =
            serde_json::from_slice(value).map_err(|e| format!("record `{key}`: {e}"))?;
        match entry {
            ChangelogEntry::Done { at } => {
                self.open.remove(&run);
                self.done.insert(run, at);
            }
            ChangelogEntry::Child {
                name,
                step,
                count,
                deadline,
                output,
                metadata,
            } => {
                let child: i32 = what
                    .parse()
                    .map_err(|_| format!("key `{key}`: `{what}` is not a child index"))?;
                if self.done.contains_key(&run) {
                    return Ok(());
                }
                let open = self.open.entry(run).or_insert_with(|| OpenJoin {
                    name,
                    step,
                    count,
                    deadline,
                    metadata,
                    ..OpenJoin::default()
                });
                open.outputs.insert(child, output);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::StepSettings;

    fn step(task: &str, fan_out: bool, join: bool) -> StepSettings {
        StepSettings {
            task: task.into(),
            fan_out,
            join,
        }
    }

    fn workflows() -> Workflows {
        let mut definitions = BTreeMap::new();
        definitions.insert(
            "chain".to_owned(),
            WorkflowSettings {
                name: "chain".into(),
                steps: vec![
                    step("a", false, false),
                    step("b", false, false),
                    step("c", false, false),
                ],
                timeout_ms: 0,
                max_fan_out: crate::settings::DEFAULT_MAX_FAN_OUT,
            },
        );
        definitions.insert(
            "wc".to_owned(),
            WorkflowSettings {
                name: "wc".into(),
                steps: vec![
                    step("split", true, false),
                    step("count", false, false),
                    step("sum", false, true),
                    step("c", false, false),
                ],
                timeout_ms: 60_000,
                max_fan_out: crate::settings::DEFAULT_MAX_FAN_OUT,
            },
        );
        let topics = ["a", "b", "c", "split", "count", "sum"]
            .iter()
            .map(|t| ((*t).to_owned(), format!("t.{t}")))
            .collect();
        Workflows {
            definitions,
            topics,
        }
    }

    /// The first request of a new run of `wc`.
    fn start_wc(w: &Workflows) -> TaskRequest {
        let (_, first) = w
            .start(
                "wc",
                b"x".to_vec(),
                DEFAULT_CONTENT_TYPE.into(),
                BTreeMap::new(),
            )
            .unwrap();
        first
    }

    fn succeeded(request: &TaskRequest, output: &str) -> TaskResult {
        TaskResult {
            id: request.id,
            task_type: request.task_type.clone(),
            status: TaskStatus::Succeeded,
            output: Some(output.as_bytes().to_vec()),
            content_type: DEFAULT_CONTENT_TYPE.into(),
            error: None,
            attempts: 1,
            started_at: 0,
            finished_at: 0,
            worker: "w".into(),
            workflow: request.workflow.clone(),
        }
    }

    fn requests(next: Vec<Next>) -> Vec<(String, Vec<u8>, TaskRequest)> {
        next.into_iter()
            .map(|n| match n {
                Next::Request {
                    topic,
                    key,
                    request,
                } => (topic, key, request),
                Next::Result(r) => panic!("expected requests, got the run's result {r:?}"),
            })
            .collect()
    }

    #[test]
    fn step_ids_are_deterministic_and_distinct() {
        let run = Uuid::new_v4();
        assert_eq!(step_id(run, 1, Some(3)), step_id(run, 1, Some(3)));
        let ids: BTreeSet<Uuid> = [
            step_id(run, 0, None),
            step_id(run, 1, None),
            step_id(run, 1, Some(0)),
            step_id(run, 1, Some(1)),
            step_id(run, 2, Some(0)),
            step_id(Uuid::new_v4(), 0, None),
        ]
        .into_iter()
        .collect();
        assert_eq!(ids.len(), 6);
    }

    #[test]
    fn a_chain_moves_step_by_step_and_ends_with_the_run_result() {
        let w = workflows();
        let mut metadata = BTreeMap::new();
        metadata.insert(IDEMPOTENCY_METADATA.to_owned(), "k".to_owned());
        metadata.insert("tenant".to_owned(), "t1".to_owned());
        let (topic, first) = w
            .start("chain", b"1".to_vec(), "text/plain".into(), metadata)
            .unwrap();
        assert_eq!(topic, "t.a");
        let run = first.workflow.clone().unwrap().id;
        assert_eq!(first.id, step_id(run, 0, None));
        let next = requests(w.after_success(&first, &succeeded(&first, "2"), "w"));
        assert_eq!(next.len(), 1);
        let (topic, key, second) = &next[0];
        assert_eq!(topic, "t.b");
        assert_eq!(second.id, step_id(run, 1, None));
        assert_eq!(key, &second.id.to_string().into_bytes());
        assert_eq!(second.payload, b"2");
        assert_eq!(second.task_type, "b");
        assert_eq!(second.workflow.as_ref().unwrap().step, 1);
        assert_eq!(
            second.metadata.get("tenant").map(String::as_str),
            Some("t1")
        );
        assert!(!second.metadata.contains_key(IDEMPOTENCY_METADATA));
        let third = requests(w.after_success(second, &succeeded(second, "3"), "w"));
        let done = w.after_success(&third[0].2, &succeeded(&third[0].2, "4"), "w");
        match done.as_slice() {
            [Next::Result(r)] => {
                assert_eq!(r.id, run);
                assert_eq!(r.status, TaskStatus::Succeeded);
                assert_eq!(r.output.as_deref(), Some(&b"4"[..]));
                assert_eq!(r.workflow.as_ref().unwrap().step, 3);
            }
            other => panic!("expected the run's result, got {other:?}"),
        }
    }

    #[test]
    fn a_fan_out_makes_children_that_contribute_to_the_join() {
        let w = workflows();
        let first = start_wc(&w);
        let run = first.workflow.clone().unwrap().id;
        assert!(first.deadline.is_some(), "timeout_ms gives a deadline");
        let children =
            requests(w.after_success(&first, &succeeded(&first, r#"["a b", {"x":1}, 3]"#), "w"));
        assert_eq!(children.len(), 3);
        for (i, (topic, _, child)) in children.iter().enumerate() {
            let r = child.workflow.as_ref().unwrap();
            assert_eq!(topic, "t.count");
            assert_eq!(r.child_index, Some(i as i32));
            assert_eq!(r.child_count, Some(3));
            assert_eq!(child.id, step_id(run, 1, Some(i as i32)));
            assert_eq!(child.deadline, first.deadline);
        }
        assert_eq!(children[0].2.payload, br#""a b""#);
        assert_eq!(children[1].2.payload, br#"{"x":1}"#);
        let child = &children[1].2;
        assert!(!w.is_contribution(child));
        let contribution = requests(w.after_success(child, &succeeded(child, "2"), "w"));
        let (topic, key, c) = &contribution[0];
        assert_eq!(topic, "t.sum");
        assert_eq!(key, &run.to_string().into_bytes(), "keyed by the run");
        assert!(w.is_contribution(c));
        assert_eq!(c.workflow.as_ref().unwrap().child_index, Some(1));
        let (topic, join) = w
            .join_request(
                c.workflow.as_ref().unwrap(),
                vec![1.into(), 2.into(), 3.into()],
                None,
                BTreeMap::new(),
            )
            .unwrap();
        assert_eq!(topic, "t.sum");
        assert_eq!(join.payload, b"[1,2,3]");
        assert!(!w.is_contribution(&join));
        assert_eq!(join.id, step_id(run, 2, None));
    }

    #[test]
    fn a_fan_out_of_no_elements_goes_straight_to_the_join() {
        let w = workflows();
        let first = start_wc(&w);
        let next = requests(w.after_success(&first, &succeeded(&first, "[]"), "w"));
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].2.task_type, "sum");
        assert_eq!(next[0].2.payload, b"[]");
        assert!(!w.is_contribution(&next[0].2));
    }

    #[test]
    fn a_fan_out_over_its_cap_fails_the_run_naming_size_and_cap() {
        let mut w = workflows();
        if let Some(wc) = w.definitions.get_mut("wc") {
            wc.max_fan_out = 3;
        }
        let first = start_wc(&w);
        let within = w.after_success(&first, &succeeded(&first, "[1,2,3]"), "w");
        assert_eq!(requests(within).len(), 3, "at the cap: three children");
        match w
            .after_success(&first, &succeeded(&first, "[1,2,3,4]"), "w")
            .as_slice()
        {
            [Next::Result(r)] => {
                assert_eq!(r.status, TaskStatus::Failed);
                let e = r.error.as_ref().unwrap();
                assert_eq!(e.kind, "fan_out");
                assert_eq!(
                    e.message,
                    "step 0 (`split`) fans out into 4 children; the workflow's max_fan_out is 3"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fan_out_output_that_is_not_an_array_fails_the_run() {
        let w = workflows();
        let first = start_wc(&w);
        match w
            .after_success(&first, &succeeded(&first, r#"{"a":1}"#), "w")
            .as_slice()
        {
            [Next::Result(r)] => {
                assert_eq!(r.status, TaskStatus::Failed);
                let e = r.error.as_ref().unwrap();
                assert_eq!(
                    e.message,
                    "step 0 (`split`) fans out, but its output is not a JSON array"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_child_fails_the_run_and_tells_the_join() {
        let w = workflows();
        let first = start_wc(&w);
        let children = requests(w.after_success(&first, &succeeded(&first, "[1,2]"), "w"));
        let error = TaskError {
            kind: "permanent".into(),
            message: "bad chunk".into(),
        };
        let next = w.after_failure(&children[1].2, &error, "w");
        assert_eq!(next.len(), 2);
        match &next[0] {
            Next::Result(r) => {
                assert_eq!(r.status, TaskStatus::Failed);
                assert_eq!(
                    r.error.as_ref().unwrap().message,
                    "step 1 (`count`), child 1 failed: permanent: bad chunk"
                );
            }
            other => panic!("{other:?}"),
        }
        match &next[1] {
            Next::Request { topic, request, .. } => {
                assert_eq!(topic, "t.sum");
                assert!(w.is_contribution(request));
                assert!(request.metadata.contains_key(CHILD_FAILED));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_that_do_not_fit_their_definition_are_named() {
        let w = workflows();
        let first = start_wc(&w);
        assert_eq!(w.check(&first), Ok(()));
        let mut wrong_type = first.clone();
        wrong_type.task_type = "count".into();
        let mut past_the_end = first.clone();
        if let Some(r) = past_the_end.workflow.as_mut() {
            r.step = 9;
        }
        let mut bad_child = first.clone();
        if let Some(r) = bad_child.workflow.as_mut() {
            r.child_index = Some(3);
            r.child_count = Some(3);
        }
        let mut unknown = first.clone();
        if let Some(r) = unknown.workflow.as_mut() {
            r.name = "nope".into();
        }
        let problems: Vec<_> = [wrong_type, past_the_end, bad_child, unknown]
            .iter()
            .map(|r| {
                w.check(r)
                    .map_err(|(k, why)| (k.as_str(), why))
                    .unwrap_err()
            })
            .collect();
        assert_eq!(
            problems,
            [
                (
                    "invalid_workflow_step",
                    "step 0 of workflow `wc` runs `split`, not `count`".to_owned()
                ),
                (
                    "invalid_workflow_step",
                    "workflow `wc` has 4 steps; this request is for step 9".to_owned()
                ),
                (
                    "invalid_workflow_step",
                    "child index Some(3) and count Some(3) do not fit together".to_owned()
                ),
                (
                    "unknown_workflow",
                    "workflow `nope` is not defined in this configuration".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn the_changelog_rebuilds_open_and_done_joins() {
        let run = Uuid::new_v4();
        let other = Uuid::new_v4();
        let child = |i: i32| {
            serde_json::to_vec(&ChangelogEntry::Child {
                name: "wc".into(),
                step: 2,
                count: 2,
                deadline: None,
                output: i.into(),
                metadata: BTreeMap::new(),
            })
            .unwrap()
        };
        let mut joins = PartitionJoins::default();
        joins
            .apply(child_key(run, 0).as_bytes(), Some(&child(0)))
            .unwrap();
        joins
            .apply(child_key(run, 0).as_bytes(), Some(&child(0)))
            .unwrap();
        assert!(!joins.open[&run].complete());
        joins
            .apply(child_key(run, 1).as_bytes(), Some(&child(1)))
            .unwrap();
        assert!(joins.open[&run].complete());
        joins
            .apply(child_key(other, 0).as_bytes(), Some(&child(0)))
            .unwrap();
        let done = serde_json::to_vec(&ChangelogEntry::Done { at: 5 }).unwrap();
        joins.apply(done_key(run).as_bytes(), Some(&done)).unwrap();
        assert!(!joins.open.contains_key(&run));
        assert_eq!(joins.done.get(&run), Some(&5));
        // A late duplicate after done does not reopen the join.
        joins
            .apply(child_key(run, 1).as_bytes(), Some(&child(1)))
            .unwrap();
        assert!(!joins.open.contains_key(&run));
        joins.apply(child_key(run, 0).as_bytes(), None).unwrap();
        joins.apply(child_key(other, 0).as_bytes(), None).unwrap();
        assert!(joins.open.is_empty());
        joins.apply(done_key(run).as_bytes(), None).unwrap();
        assert!(joins.done.is_empty());
        for (key, value) in [
            (&b"\xff"[..], None),
            (b"no-slash", None),
            (b"not-a-uuid/1", None),
            (child_key(run, 0).as_bytes(), Some(&b"{"[..])),
        ] {
            assert!(joins.apply(key, value).is_err());
        }
        let bad_child = format!("{run}/x");
        assert!(joins.apply(bad_child.as_bytes(), Some(&child(0))).is_err());
    }
}
