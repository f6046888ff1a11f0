//! Workflows through real processors: a chain runs step by step to the
//! run's result; a fan-out of 100 children is joined with every output in
//! child order; a failing middle step fails the run and nothing after it
//! runs; a flaky step is retried (in place, then through the retry topic)
//! and the run goes on; a failing child or a timeout fails the run; a join
//! survives a rebalance and a member leaving (its state read back from the
//! changelog) and completes once; the gateway and the command line start
//! runs and show them. Against the mock cluster and, when configured, the
//! external broker (the failing-child, timeout and command-line tests on the
//! mock cluster only: they do not depend on the broker).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, InProcessWorker, Pipeline, TestGateway, TestKafka};
use conveyor::codec::{Codec, TaskRequest, TaskResult, TaskStatus};
use conveyor::handlers::{Handler, HandlerError, Output, Registry, TaskContext};
use conveyor::settings::{HandlerKind, Ordering, Settings, StepSettings, WorkflowSettings};
use conveyor::workflow::{step_id, Workflows, JOINS_SUFFIX};
use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::message::Message;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(120);

/// A handler from a function of the JSON payload.
struct Json<F>(F);

impl<F> Handler for Json<F>
where
    F: Fn(serde_json::Value) -> Result<serde_json::Value, HandlerError> + Send + Sync + 'static,
{
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        let outcome = serde_json::from_slice(&task.payload)
            .map_err(|e| HandlerError::Permanent(format!("payload: {e}")))
            .and_then(&self.0)
            .map(|v| Output {
                bytes: v.to_string().into_bytes(),
                content_type: "application/json".into(),
            });
        async move {
            // A little work per task, so runs take long enough to be
            // interrupted.
            tokio::time::sleep(Duration::from_millis(2)).await;
            outcome
        }
        .boxed()
    }
}

fn number(v: &serde_json::Value) -> Result<i64, HandlerError> {
    v.as_i64()
        .ok_or_else(|| HandlerError::Permanent(format!("not an integer: {v}")))
}

/// `inc`: n → n + 1; `range`: n → [0, …, n-1]; `square`: n → n²;
/// `sum`: [a, b, …] → a + b + …; `broken`: always fails for good.
fn registry() -> Registry {
    let mut r = Registry::new();
    r.register("inc", Arc::new(Json(|v| Ok((number(&v)? + 1).into()))));
    r.register(
        "range",
        Arc::new(Json(|v| Ok((0..number(&v)?).collect::<Vec<i64>>().into()))),
    );
    r.register(
        "square",
        Arc::new(Json(|v| {
            let n = number(&v)?;
            Ok((n * n).into())
        })),
    );
    r.register(
        "sum",
        Arc::new(Json(|v: serde_json::Value| {
            let items = v
                .as_array()
                .ok_or_else(|| HandlerError::Permanent("not an array".into()))?;
            items
                .iter()
                .map(number)
                .sum::<Result<i64, _>>()
                .map(Into::into)
        })),
    );
    r.register(
        "broken",
        Arc::new(Json(|_| {
            Err::<serde_json::Value, _>(HandlerError::Permanent("step is broken".into()))
        })),
    );
    r
}

fn step(task: &str) -> StepSettings {
    StepSettings {
        task: task.into(),
        fan_out: false,
        join: false,
    }
}

/// Settings with one processor running every test task type on
/// `pipeline`, and these workflows.
fn settings(kafka: &TestKafka, pipeline: &Pipeline, workflows: Vec<WorkflowSettings>) -> Settings {
    let types = ["inc", "range", "square", "sum", "broken", "flaky"];
    let tasks: Vec<(&str, HandlerKind)> = types.iter().map(|t| (*t, HandlerKind::Echo)).collect();
    let mut settings = kafka.worker_settings(pipeline, Ordering::None, &tasks);
    settings.workflows = workflows;
    settings.validate().expect("workflow settings are valid");
    settings
}

/// A test pipeline plus the join changelog of its input topic.
async fn workflow_pipeline(kafka: &TestKafka, partitions: i32) -> Pipeline {
    let pipeline = kafka.pipeline(partitions).await;
    kafka
        .create_named_topic(&format!("{}{JOINS_SUFFIX}", pipeline.input), partitions)
        .await;
    pipeline
}

/// Produces the first request of a run of `name` with `payload`; returns
/// the run id.
async fn start(kafka: &TestKafka, settings: &Settings, name: &str, payload: &str) -> Uuid {
    let workflows = Workflows::from_settings(settings);
    let (topic, request) = workflows
        .start(
            name,
            payload.as_bytes().to_vec(),
            "application/json".into(),
            BTreeMap::new(),
        )
        .expect("workflow defined");
    kafka
        .produce_requests(&topic, std::slice::from_ref(&request))
        .await;
    request.workflow.expect("workflow ref").id
}

/// Every result on the output topic once the runs' results are there,
/// grouped by task id.
async fn results(
    kafka: &TestKafka,
    pipeline: &Pipeline,
    runs: &[Uuid],
) -> HashMap<Uuid, Vec<TaskResult>> {
    kafka
        .collect_results(&pipeline.output, &runs.iter().copied().collect(), LONG)
        .await
        .by_id
}

fn output(result: &TaskResult) -> serde_json::Value {
    serde_json::from_slice(result.output.as_deref().unwrap_or_default()).expect("JSON output")
}

/// The requests written to the input topic, decoded.
async fn requests_on(kafka: &TestKafka, topic: &str, at_least: usize) -> Vec<TaskRequest> {
    let codec = Codec::default();
    kafka
        .read_records(topic, at_least, LONG)
        .await
        .iter()
        .map(|m| {
            codec
                .decode_request(m.payload().unwrap_or_default())
                .expect("request decodes")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_step_chain_runs_to_completion_one_step_after_the_other() {
    for kafka in TestKafka::all("a_three_step_chain_runs_to_completion_one_step_after_the_other") {
        let pipeline = workflow_pipeline(&kafka, 2).await;
        let chain = chain("chain", ["inc", "square", "inc"]);
        let settings = settings(&kafka, &pipeline, vec![chain]);
        let worker = InProcessWorker::start(&settings, "worker", Some(registry()));
        let run = start(&kafka, &settings, "chain", "2").await;
        // The last step's result and the run's are written side by side.
        let by_id = results(&kafka, &pipeline, &[run, step_id(run, 2, None)]).await;
        worker.stop().await;

        let result = &by_id[&run];
        assert_eq!(result.len(), 1, "one result for the run");
        assert_eq!(result[0].status, TaskStatus::Succeeded);
        // (2 + 1)² + 1
        assert_eq!(output(&result[0]), serde_json::json!(10));
        assert_eq!(result[0].workflow.as_ref().map(|w| w.step), Some(3));
        // Each step has its own result, with its own output.
        for (index, expected) in [(0, 3), (1, 9), (2, 10)] {
            let step = &by_id[&step_id(run, index, None)];
            assert_eq!(step[0].status, TaskStatus::Succeeded, "step {index}");
            assert_eq!(
                output(&step[0]),
                serde_json::json!(expected),
                "step {index}"
            );
            assert_eq!(step[0].workflow.as_ref().unwrap().step, index);
        }
    }
}

/// A workflow `name` of three plain steps.
fn chain(name: &str, steps: [&str; 3]) -> WorkflowSettings {
    WorkflowSettings {
        name: name.into(),
        steps: steps.iter().map(|t| step(t)).collect(),
        timeout_ms: 0,
        max_fan_out: conveyor::settings::DEFAULT_MAX_FAN_OUT,
    }
}

fn word_count_like(timeout_ms: u64) -> WorkflowSettings {
    WorkflowSettings {
        name: "squares".into(),
        steps: vec![
            StepSettings {
                fan_out: true,
                ..step("range")
            },
            step("square"),
            StepSettings {
                join: true,
                ..step("sum")
            },
        ],
        timeout_ms,
        max_fan_out: conveyor::settings::DEFAULT_MAX_FAN_OUT,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fan_out_of_100_children_is_joined_with_every_output_in_child_order() {
    for kafka in
        TestKafka::all("a_fan_out_of_100_children_is_joined_with_every_output_in_child_order")
    {
        let pipeline = workflow_pipeline(&kafka, 4).await;
        let settings = settings(&kafka, &pipeline, vec![word_count_like(0)]);
        let worker = InProcessWorker::start(&settings, "worker", Some(registry()));
        let run = start(&kafka, &settings, "squares", "100").await;
        let by_id = results(&kafka, &pipeline, &[run, step_id(run, 2, None)]).await;
        worker.stop().await;

        let result = &by_id[&run];
        assert_eq!(result.len(), 1, "one result for the run");
        assert_eq!(
            result[0].status,
            TaskStatus::Succeeded,
            "{:?}",
            result[0].error
        );
        let expected: i64 = (0..100).map(|n| n * n).sum();
        assert_eq!(output(&result[0]), serde_json::json!(expected));
        for child in 0..100 {
            let id = step_id(run, 1, Some(child));
            assert_eq!(by_id[&id][0].status, TaskStatus::Succeeded, "child {child}");
        }
        // The join's request holds all 100 outputs, in child order.
        let join_id = step_id(run, 2, None);
        let written = requests_on(&kafka, &pipeline.input, 1).await;
        let joins: Vec<&TaskRequest> = written.iter().filter(|r| r.id == join_id).collect();
        assert_eq!(joins.len(), 1, "the join was asked for once");
        let input: serde_json::Value = serde_json::from_slice(&joins[0].payload).unwrap();
        let squares: Vec<i64> = (0..100).map(|n| n * n).collect();
        assert_eq!(input, serde_json::json!(squares));
        assert_eq!(by_id[&join_id].len(), 1, "the join ran once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_middle_step_fails_the_run_and_later_steps_never_run() {
    for kafka in TestKafka::all("a_failing_middle_step_fails_the_run_and_later_steps_never_run") {
        let pipeline = workflow_pipeline(&kafka, 2).await;
        let chain = chain("doomed", ["inc", "broken", "inc"]);
        let settings = settings(&kafka, &pipeline, vec![chain]);
        let worker = InProcessWorker::start(&settings, "worker", Some(registry()));
        let run = start(&kafka, &settings, "doomed", "1").await;
        let by_id = results(&kafka, &pipeline, &[run, step_id(run, 1, None)]).await;
        // Whatever the worker was going to do is done once it drained.
        worker.stop().await;

        let result = &by_id[&run];
        assert_eq!(result.len(), 1);
        assert_eq!(result[0].status, TaskStatus::Failed);
        let error = result[0].error.as_ref().expect("error");
        assert_eq!(error.kind, "step_failed");
        assert_eq!(
            error.message,
            "step 1 (`broken`) failed: permanent: step is broken"
        );
        assert_eq!(by_id[&step_id(run, 1, None)][0].status, TaskStatus::Failed);
        let third = step_id(run, 2, None);
        assert!(!by_id.contains_key(&third), "step 2 has a result");
        let written = requests_on(&kafka, &pipeline.input, 2).await;
        assert!(
            written.iter().all(|r| r.id != third),
            "step 2 was requested"
        );
        assert_eq!(written.len(), 2, "requests for steps 0 and 1 only");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steps_are_retried_by_the_failure_rules_in_place_and_through_the_retry_topic() {
    for kafka in TestKafka::all(
        "steps_are_retried_by_the_failure_rules_in_place_and_through_the_retry_topic",
    ) {
        let pipeline = workflow_pipeline(&kafka, 2).await;
        let mut settings = settings(
            &kafka,
            &pipeline,
            vec![chain("flaky", ["inc", "flaky", "inc"])],
        );
        let p = &mut settings.processors[0];
        // The first retry waits 80 ms (in place), the second 160 ms (over
        // the threshold: parked in the retry topic).
        p.initial_backoff_ms = 80;
        p.max_backoff_ms = 400;
        p.backoff_jitter = 0.0;
        p.retry_topic_threshold_ms = 100;
        p.max_attempts = 5;
        settings.validate().expect("valid settings");
        let mut registry = registry();
        // n → n + 100, failing (retryably) on the first two attempts.
        registry.register("flaky", Arc::new(Flaky));
        let worker = InProcessWorker::start(&settings, "worker", Some(registry));
        let run = start(&kafka, &settings, "flaky", "1").await;
        let by_id = results(&kafka, &pipeline, &[run, step_id(run, 2, None)]).await;
        worker.stop().await;
        let result = &by_id[&run][0];
        assert_eq!(result.status, TaskStatus::Succeeded, "{:?}", result.error);
        assert_eq!(output(result), serde_json::json!(103));
        let flaky = &by_id[&step_id(run, 1, None)][0];
        assert_eq!(flaky.attempts, 3, "two retries, then success");
        let parked = kafka
            .read_records(&format!("{}.retry", pipeline.input), 1, LONG)
            .await;
        assert_eq!(
            parked.len(),
            1,
            "the second retry went through the retry topic"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_of_a_workflow_the_worker_does_not_define_is_dead_lettered_unrun() {
    let kafka = TestKafka::mock();
    let pipeline = workflow_pipeline(&kafka, 1).await;
    let settings = settings(&kafka, &pipeline, vec![]);
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut registry = registry();
    let counted = runs.clone();
    registry.register(
        "inc",
        Arc::new(Json(move |v| {
            counted.fetch_add(1, AtomicOrdering::Relaxed);
            Ok((number(&v)? + 1).into())
        })),
    );
    let worker = InProcessWorker::start(&settings, "worker", Some(registry));
    // What another worker's configuration would start.
    let elsewhere = Workflows::from_settings(&Settings {
        workflows: vec![chain("ghost", ["inc", "inc", "inc"])],
        ..settings.clone()
    });
    let (_, first) = elsewhere
        .start(
            "ghost",
            b"1".to_vec(),
            "application/json".into(),
            BTreeMap::new(),
        )
        .unwrap();
    let run = first.workflow.as_ref().unwrap().id;
    kafka
        .produce_requests(&pipeline.input, std::slice::from_ref(&first))
        .await;
    let by_id = results(&kafka, &pipeline, &[run, first.id]).await;
    let dead = kafka.read_records(&pipeline.dead_letter, 1, LONG).await;
    worker.stop().await;
    assert_eq!(runs.load(AtomicOrdering::Relaxed), 0, "the handler ran");
    let step = &by_id[&first.id][0];
    assert_eq!(step.status, TaskStatus::Failed);
    let error = step.error.as_ref().unwrap();
    assert_eq!(error.kind, "unknown_workflow");
    assert_eq!(
        error.message,
        "processor `test`: workflow `ghost` is not defined in this configuration"
    );
    assert_eq!(by_id[&run][0].status, TaskStatus::Failed);
    assert_eq!(dead.len(), 1, "dead-lettered, to replay once defined");
}

/// Fails retryably on attempts 1 and 2; then n → n + 100.
struct Flaky;

impl Handler for Flaky {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        let outcome = if task.attempt < 3 {
            Err(HandlerError::Retryable(format!(
                "attempt {} fails",
                task.attempt
            )))
        } else {
            serde_json::from_slice::<i64>(&task.payload)
                .map_err(|e| HandlerError::Permanent(e.to_string()))
                .map(|n| Output {
                    bytes: (n + 100).to_string().into_bytes(),
                    content_type: "application/json".into(),
                })
        };
        std::future::ready(outcome).boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_child_fails_the_run_and_its_join_never_runs() {
    let kafka = TestKafka::mock();
    let pipeline = workflow_pipeline(&kafka, 2).await;
    let mut workflow = word_count_like(0);
    workflow.steps[1] = step("broken");
    let settings = settings(&kafka, &pipeline, vec![workflow]);
    let worker = InProcessWorker::start(&settings, "worker", Some(registry()));
    let run = start(&kafka, &settings, "squares", "5").await;
    let by_id = results(&kafka, &pipeline, &[run]).await;
    // Every child fails; each failure is told to the join, which closes.
    let changelog = format!("{}{JOINS_SUFFIX}", pipeline.input);
    let closed = kafka.read_records(&changelog, 1, LONG).await;
    worker.stop().await;
    assert_eq!(by_id[&run][0].status, TaskStatus::Failed);
    assert!(
        by_id[&run][0]
            .error
            .as_ref()
            .unwrap()
            .message
            .starts_with("step 1 (`broken`), child "),
        "{:?}",
        by_id[&run][0].error
    );
    assert!(!by_id.contains_key(&step_id(run, 2, None)), "the join ran");
    let done = format!("{run}/done");
    assert!(
        closed.iter().any(|m| m.key() == Some(done.as_bytes())),
        "the join's state was closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_that_outlives_the_workflow_timeout_fails_the_run() {
    let kafka = TestKafka::mock();
    let pipeline = workflow_pipeline(&kafka, 1).await;
    let settings = settings(&kafka, &pipeline, vec![word_count_like(1_500)]);
    let worker = InProcessWorker::start(&settings, "worker", Some(registry()));
    // A run whose children never all report: contributions for 2 of 3
    // children, written by hand as a crashed fan-out would leave them.
    let workflows = Workflows::from_settings(&settings);
    let (_, first) = workflows
        .start(
            "squares",
            b"3".to_vec(),
            "application/json".into(),
            BTreeMap::new(),
        )
        .unwrap();
    let run = first.workflow.as_ref().unwrap().id;
    let done_child = |i: i32| {
        let mut child = first.clone();
        let w = child.workflow.as_mut().unwrap();
        w.step = 1;
        w.child_index = Some(i);
        w.child_count = Some(3);
        child.task_type = "square".into();
        child.id = step_id(run, 1, Some(i));
        child.payload = i.to_string().into_bytes();
        child
    };
    let contributions: Vec<TaskRequest> = (0..2)
        .map(|i| {
            let child = done_child(i);
            let result = TaskResult {
                id: child.id,
                task_type: child.task_type.clone(),
                status: TaskStatus::Succeeded,
                output: Some(child.payload.clone()),
                content_type: "application/json".into(),
                error: None,
                attempts: 1,
                started_at: 0,
                finished_at: 0,
                worker: "test".into(),
                workflow: child.workflow.clone(),
            };
            match workflows.after_success(&child, &result, "test").remove(0) {
                conveyor::workflow::Next::Request { request, .. } => request,
                other => panic!("expected a contribution, got {other:?}"),
            }
        })
        .collect();
    // And one no fan-out makes (child 7 of 3), which must not count.
    let mut bogus = contributions[0].clone();
    if let Some(w) = bogus.workflow.as_mut() {
        w.child_index = Some(7);
        bogus.id = step_id(run, w.step, Some(7));
    }
    let mut contributions = contributions;
    contributions.push(bogus);
    kafka
        .produce_requests(&pipeline.input, &contributions)
        .await;
    let by_id = results(&kafka, &pipeline, &[run]).await;
    worker.stop().await;
    let result = &by_id[&run][0];
    assert_eq!(result.status, TaskStatus::Failed);
    let error = result.error.as_ref().unwrap();
    assert_eq!(error.kind, "timeout");
    assert!(
        error.message.contains("(2 of 3 finished)"),
        "{}",
        error.message
    );
}

/// `square`, except that children in the second half of their fan-out wait
/// until `open` is set.
fn gated_registry(open: Arc<AtomicBool>) -> Registry {
    struct Gated(Arc<AtomicBool>);
    impl Handler for Gated {
        fn handle<'a>(
            &'a self,
            task: &'a TaskRequest,
            _context: &'a TaskContext,
        ) -> BoxFuture<'a, Result<Output, HandlerError>> {
            async move {
                let w = task.workflow.as_ref();
                let late = w
                    .and_then(|w| w.child_index.zip(w.child_count))
                    .is_some_and(|(i, n)| i >= n / 2);
                while late && !self.0.load(AtomicOrdering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let n: i64 = serde_json::from_slice(&task.payload)
                    .map_err(|e| HandlerError::Permanent(e.to_string()))?;
                Ok(Output {
                    bytes: (n * n).to_string().into_bytes(),
                    content_type: "application/json".into(),
                })
            }
            .boxed()
        }
    }
    let mut r = registry();
    r.register("square", Arc::new(Gated(open)));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joins_survive_a_rebalance_and_a_member_leaving_and_complete_once() {
    const RUNS: usize = 4;
    const CHILDREN: i64 = 100;
    for kafka in TestKafka::all("joins_survive_a_rebalance_and_a_member_leaving_and_complete_once")
    {
        // Children on one topic and processor, joins on another, so that the
        // first member gathers (and commits) half of every join while the
        // other half of the children cannot finish.
        let pipeline = kafka.pipeline(4).await;
        let joins_topic = kafka.create_topic("joins", 4).await;
        let changelog = format!("{joins_topic}{JOINS_SUFFIX}");
        kafka.create_named_topic(&changelog, 4).await;
        let mut settings = kafka.worker_settings(
            &pipeline,
            Ordering::None,
            &[("range", HandlerKind::Echo), ("square", HandlerKind::Echo)],
        );
        // Room for every waiting child: the partitions keep being read.
        settings.processors[0].max_in_flight = 4_096;
        settings.processors[0].max_in_flight_per_partition = 4_096;
        let mut joiner = settings.processors[0].clone();
        joiner.name = "joiner".into();
        joiner.group_id = Some(format!("{}-joins", pipeline.group));
        joiner.input_topics = vec![joins_topic.clone()];
        joiner.retry_topic_threshold_ms = 0;
        joiner.tasks = [(
            "sum".to_owned(),
            conveyor::settings::TaskSettings::new(HandlerKind::Echo),
        )]
        .into_iter()
        .collect();
        settings.processors.push(joiner);
        settings.workflows = vec![word_count_like(0)];
        settings.validate().expect("settings are valid");

        let open = Arc::new(AtomicBool::new(false));
        let a = InProcessWorker::start(&settings, "worker-a", Some(gated_registry(open.clone())));
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            runs.push(start(&kafka, &settings, "squares", &CHILDREN.to_string()).await);
        }
        let half = RUNS * CHILDREN as usize / 2;
        wait_until(
            "the first half of every join is in the changelog",
            LONG,
            || kafka.end_offsets(&changelog).values().sum::<i64>() as usize >= half,
        )
        .await;
        // A second member arrives (some partitions move to it), then the
        // first leaves: every join continues on the second member, from the
        // state it reads back from the changelog.
        let b = InProcessWorker::start(&settings, "worker-b", Some(gated_registry(open.clone())));
        wait_until("the second member owns join partitions", LONG, || {
            b.statuses[1].assigned_partitions() > 0
        })
        .await;
        a.stop().await;
        open.store(true, AtomicOrdering::Relaxed);
        let mut expected = runs.clone();
        expected.extend(runs.iter().map(|run| step_id(*run, 2, None)));
        let by_id = results(&kafka, &pipeline, &expected).await;
        b.stop().await;

        let expected: i64 = (0..CHILDREN).map(|n| n * n).sum();
        for run in &runs {
            let result = &by_id[run];
            assert_eq!(
                result.len(),
                1,
                "{}: run {run} completed once",
                kafka.describe()
            );
            assert_eq!(
                result[0].status,
                TaskStatus::Succeeded,
                "{:?}",
                result[0].error
            );
            assert_eq!(output(&result[0]), serde_json::json!(expected));
            assert_eq!(
                by_id[&step_id(*run, 2, None)].len(),
                1,
                "{}: the join of {run} ran once",
                kafka.describe()
            );
        }
    }
}

/// Sends `request` and reads the answer: status and JSON body.
async fn call(request: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let response = request.send().await.expect("the gateway answers");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body");
    (status, serde_json::from_slice(&bytes).expect("a JSON body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_starts_runs_and_shows_their_status_step_by_step() {
    for kafka in TestKafka::all("the_gateway_starts_runs_and_shows_their_status_step_by_step") {
        let pipeline = workflow_pipeline(&kafka, 2).await;
        let chain = chain("chain", ["inc", "square", "inc"]);
        let settings = settings(&kafka, &pipeline, vec![chain, word_count_like(0)]);
        let worker = InProcessWorker::start(&settings, "worker", Some(registry()));
        let gateway = TestGateway::start(&settings, worker.metrics.clone()).await;
        let http = reqwest::Client::new();
        let post = |name: &str, body: serde_json::Value| {
            call(
                http.post(format!("{}/v1/workflows/{name}", gateway.base))
                    .header("content-type", "application/json")
                    .body(body.to_string()),
            )
        };
        let get = |path: String| call(http.get(format!("{}{path}", gateway.base)));
        // The run's result and its last step's are written side by side, to
        // different partitions: the view can show the run over a moment
        // before its last step. Ask until both are there.
        let finished = |run: String| {
            let get = &get;
            async move {
                let deadline = tokio::time::Instant::now() + LONG;
                loop {
                    let (code, status) = get(format!("/v1/workflows/{run}?wait=20s")).await;
                    let last = status["steps"].as_array().and_then(|s| s.last()).cloned();
                    let settled =
                        last.is_some_and(|l| l["status"] != "queued" && l["status"] != "pending");
                    if settled || tokio::time::Instant::now() >= deadline {
                        return (code, status);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };

        let (code, started) = post(
            "chain",
            serde_json::json!({"payload": 2, "idempotency_key": "chain-1"}),
        )
        .await;
        assert_eq!(code, 202, "{started}");
        let run = started["id"].as_str().expect("run id").to_owned();
        assert_eq!(started["workflow"], "chain");
        assert_eq!(started["status"], "queued");
        assert_eq!(started["status_url"], format!("/v1/workflows/{run}"));

        let (code, status) = finished(run.clone()).await;
        assert_eq!(code, 200);
        assert_eq!(status["status"], "succeeded", "{status:#}");
        assert_eq!(status["result"], 10);
        let steps = status["steps"].as_array().expect("steps");
        assert_eq!(steps.len(), 3);
        for (i, (task_type, output)) in [("inc", 3), ("square", 9), ("inc", 10)].iter().enumerate()
        {
            assert_eq!(steps[i]["index"], i);
            assert_eq!(steps[i]["type"], *task_type);
            assert_eq!(steps[i]["status"], "succeeded", "{status:#}");
            assert_eq!(steps[i]["attempts"], 1);
            assert_eq!(steps[i]["output"], *output);
        }

        // The same idempotency key answers the same run.
        let (code, again) = post(
            "chain",
            serde_json::json!({"payload": 2, "idempotency_key": "chain-1"}),
        )
        .await;
        assert_eq!(code, 202);
        assert_eq!(again["id"].as_str(), Some(run.as_str()));
        assert_eq!(again["idempotent_replay"], true);
        assert_eq!(again["status"], "succeeded");

        // A fan-out: children counted, outputs in child order; the trace
        // context the gateway answered with reaches the run's result,
        // through the children and the join.
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let (_, fan) = call(
            http.post(format!("{}/v1/workflows/squares", gateway.base))
                .header("content-type", "application/json")
                .header("traceparent", traceparent)
                .body(serde_json::json!({"payload": 5}).to_string()),
        )
        .await;
        let fan_id = fan["id"].as_str().expect("run id").to_owned();
        let (_, status) = finished(fan_id.clone()).await;
        assert_eq!(status["status"], "succeeded", "{status:#}");
        assert_eq!(status["result"], 30);
        assert_eq!(
            status["steps"][0]["output"],
            serde_json::json!([0, 1, 2, 3, 4])
        );
        assert_eq!(
            status["steps"][1]["children"],
            serde_json::json!({"count": 5, "succeeded": 5, "failed": 0})
        );
        assert_eq!(
            status["steps"][1]["outputs"],
            serde_json::json!([0, 1, 4, 9, 16])
        );
        assert_eq!(status["steps"][2]["status"], "succeeded");
        assert_eq!(status["steps"][2]["output"], 30);
        let records = kafka.read_records(&pipeline.output, 1, LONG).await;
        let run_records: Vec<_> = records
            .iter()
            .filter(|m| m.key() == Some(fan_id.as_bytes()))
            .collect();
        assert_eq!(run_records.len(), 1, "one result record for the run");
        assert_eq!(
            common::header(run_records[0], "traceparent").as_deref(),
            Some(traceparent)
        );

        // Refusals name the problem.
        let (code, body) = post("nope", serde_json::json!({"payload": 1})).await;
        assert_eq!(code, 404);
        assert_eq!(body["error"]["code"], "unknown_workflow");
        assert_eq!(
            body["error"]["message"],
            "no workflow `nope` is defined; this gateway knows: chain, squares"
        );
        let (code, body) = post("chain", serde_json::json!({"input": 1})).await;
        assert_eq!(code, 422);
        assert_eq!(body["error"]["field"], "input");
        let (code, _) = get(format!("/v1/workflows/{}", Uuid::new_v4())).await;
        assert_eq!(code, 404);
        let (code, body) = get("/v1/workflows/chain".into()).await;
        assert_eq!(code, 400);
        assert_eq!(body["error"]["field"], "id");

        gateway.stop().await;
        worker.stop().await;
    }
}

/// Runs `conveyor <args>` to its end: exit code, standard output, error.
async fn conveyor(args: Vec<String>) -> (Option<i32>, String, String) {
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
            .args(&args)
            .env_remove("CONVEYOR_CONFIG")
            .env("RUST_LOG", "warn")
            .output()
            .expect("run conveyor");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .expect("command thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_command_line_starts_a_run_and_waits_for_its_result() {
    // The command produces and reads like any client: the mock cluster
    // suffices.
    let kafka = TestKafka::mock();
    let pipeline = workflow_pipeline(&kafka, 2).await;
    let chain = chain("chain", ["inc", "square", "inc"]);
    let settings = settings(&kafka, &pipeline, vec![chain]);
    let config = common::config_file(&settings);
    let config_arg = config.to_string_lossy().into_owned();
    let worker = InProcessWorker::start(&settings, "worker", Some(registry()));
    let args = |extra: &[&str]| -> Vec<String> {
        ["--config", config_arg.as_str(), "workflow", "start"]
            .iter()
            .chain(extra)
            .map(|s| (*s).to_owned())
            .collect()
    };

    let (code, stdout, stderr) = conveyor(args(&["chain", "--payload", "4", "--wait", "60"])).await;
    assert_eq!(code, Some(0), "{stderr}");
    let mut lines = stdout.lines();
    let run = Uuid::parse_str(lines.next().unwrap_or_default()).expect("the run id first");
    let result: serde_json::Value =
        serde_json::from_str(lines.next().unwrap_or_default()).expect("the result as JSON");
    assert_eq!(result["id"], run.to_string());
    assert_eq!(result["status"], "SUCCEEDED");
    assert_eq!(result["output"], 26, "(4 + 1)² + 1");

    let (code, _, stderr) = conveyor(args(&["nope"])).await;
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("no workflow `nope` in the configuration; defined: chain"),
        "{stderr}"
    );
    let (code, _, stderr) = conveyor(args(&["chain", "--payload", "{"])).await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--payload is not valid JSON"), "{stderr}");
    worker.stop().await;
    let _ = std::fs::remove_file(&config);
}
