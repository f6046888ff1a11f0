//! `conveyor topics create|check` as a user runs it: on a broker with the
//! admin API (the external broker), every topic of a configuration with
//! two processors, retry topics and a workflow join is created once and
//! checked; on librdkafka's mock cluster, which has no CreateTopics, the
//! command says so, and `check` still finds what is missing or does not fit.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::process::{Command, Output};

use common::{unique, TestKafka};
use conveyor::settings::{
    HandlerKind, ProcessorSettings, Settings, StepSettings, TaskSettings, WorkflowSettings,
};

/// Two processors (`a`: split and count, with retry topics; `b`: sum,
/// without), and a workflow whose join runs `sum`; topic names unique to
/// this test.
fn configuration(kafka: &TestKafka) -> Settings {
    let mut s = kafka.settings();
    let prefix = unique("topics");
    s.topics.task_prefix = format!("{prefix}.");
    s.topics.results = format!("{prefix}.results");
    s.topics.dead_letter = format!("{prefix}.dlq");
    s.topics.partitions = 3;
    s.topics.replication_factor = 1;
    for (name, types) in [("a", vec!["split", "count"]), ("b", vec!["sum"])] {
        s.processors.push(ProcessorSettings {
            name: name.into(),
            tasks: types
                .into_iter()
                .map(|t| (t.to_owned(), TaskSettings::new(HandlerKind::Echo)))
                .collect(),
            ..ProcessorSettings::default()
        });
    }
    s.processors[1].retry_topic_threshold_ms = 0;
    let step = |task: &str, fan_out, join| StepSettings {
        task: task.into(),
        fan_out,
        join,
    };
    s.workflows.push(WorkflowSettings {
        name: "wc".into(),
        steps: vec![
            step("split", true, false),
            step("count", false, false),
            step("sum", false, true),
        ],
        timeout_ms: 0,
        max_fan_out: conveyor::settings::DEFAULT_MAX_FAN_OUT,
    });
    s.fill_derived();
    s.validate().expect("valid configuration");
    s
}

fn topics(settings: &Settings, args: &[&str]) -> Output {
    let config = common::config_file(settings);
    let output = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .arg("topics")
        .args(args)
        .arg("--config")
        .arg(&config)
        .env_remove("CONVEYOR_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("run conveyor topics");
    let _ = std::fs::remove_file(&config);
    output
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The printed lines, as (first word, topic).
fn lines(output: &Output) -> Vec<(String, String)> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| {
            let (word, rest) = l.split_once(' ')?;
            let topic = rest.split_whitespace().next()?;
            Some((word.to_owned(), topic.to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_makes_every_needed_topic_once_and_check_finds_what_is_missing() {
    // Needs the admin API: the external broker (the mock cluster case is
    // the next test).
    let Some(kafka) = TestKafka::external() else {
        common::announce(
            "create_makes_every_needed_topic_once_and_check_finds_what_is_missing: no external broker; skipped",
        );
        return;
    };
    common::announce(&format!(
        "create_makes_every_needed_topic_once_and_check_finds_what_is_missing: runs against {}",
        kafka.describe()
    ));
    let settings = configuration(&kafka);
    let p = &settings.topics.task_prefix;
    let expected: Vec<String> = [
        "count",
        "count.retry",
        "dlq",
        "results",
        "split",
        "split.retry",
        "sum",
        "sum.joins",
    ]
    .iter()
    .map(|t| format!("{p}{t}"))
    .collect();

    let plan = topics(&settings, &["create", "--dry-run"]);
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    let planned: Vec<String> = lines(&plan).into_iter().map(|(_, t)| t).collect();
    assert_eq!(planned, expected, "{}", text(&plan));
    assert!(lines(&plan).iter().all(|(w, _)| w == "planned"));

    let created = topics(&settings, &["create"]);
    assert_eq!(created.status.code(), Some(0), "{}", text(&created));
    assert!(
        lines(&created).iter().all(|(w, _)| w == "created"),
        "{}",
        text(&created)
    );
    let out = text(&created);
    assert!(
        out.contains(&format!(
            "created      {p}sum.joins (join changelog, 3 partitions, compacted)"
        )),
        "{out}"
    );
    // The partitions as the broker has them.
    let ends: Vec<usize> = expected
        .iter()
        .map(|t| kafka.end_offsets(t).len())
        .collect();
    assert_eq!(ends, vec![3; expected.len()]);

    let again = topics(&settings, &["create"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        lines(&again).iter().all(|(w, _)| w == "exists"),
        "a second create changes nothing: {}",
        text(&again)
    );

    let checked = topics(&settings, &["check"]);
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked));
    // The changelog's cleanup.policy was read back as compact (a broker
    // that describes no configs would add a "not verified" note).
    let out = text(&checked);
    assert!(
        out.lines()
            .any(|l| l
                == format!("exists       {p}sum.joins (join changelog, 3 partitions, compacted)")),
        "{out}"
    );

    // One more task type: its topic (and retry topic) are missing.
    let mut more = settings.clone();
    more.processors[0]
        .tasks
        .insert("extra".into(), TaskSettings::new(HandlerKind::Echo));
    more.processors[0].input_topics.clear();
    more.fill_derived();
    let missing = topics(&more, &["check"]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    let out = text(&missing);
    assert!(
        out.contains(&format!("missing      {p}extra (tasks)")),
        "{out}"
    );
    assert!(
        out.contains(&format!("missing      {p}extra.retry (retry)")),
        "{out}"
    );
    assert!(
        out.contains("some topics are missing or do not fit"),
        "{out}"
    );

    // A changelog made by hand with cleanup.policy = delete: create makes
    // the rest and reports it, exit 1. (nisshi describes only the configs
    // a topic was created with; for one made with none, `check` says the
    // policy was not verified.)
    let loose = configuration(&kafka);
    let q = loose.topics.task_prefix.clone();
    {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            conveyor::kafka::admin_config(&loose.kafka)
                .create()
                .expect("admin client");
        let name = format!("{q}sum.joins");
        let topic =
            NewTopic::new(&name, 3, TopicReplication::Fixed(1)).set("cleanup.policy", "delete");
        for result in admin
            .create_topics([&topic], &AdminOptions::new())
            .await
            .expect("CreateTopics answered")
        {
            result.expect("changelog created");
        }
    }
    let created = topics(&loose, &["create"]);
    assert_eq!(created.status.code(), Some(1), "{}", text(&created));
    let out = text(&created);
    assert!(
        out.contains(&format!(
            "mismatch     {q}sum.joins (join changelog, 3 partitions, compacted): cleanup.policy is delete, must be compact"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("created      {q}sum (tasks, 3 partitions)")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_mock_cluster_create_says_it_cannot_and_check_finds_a_misfit() {
    let kafka = TestKafka::mock();
    common::announce(&format!(
        "on_the_mock_cluster_create_says_it_cannot_and_check_finds_a_misfit: runs against {}",
        kafka.describe()
    ));
    let settings = configuration(&kafka);
    let created = topics(&settings, &["create"]);
    assert_eq!(created.status.code(), Some(1), "{}", text(&created));
    assert!(
        text(&created).contains("librdkafka's mock cluster has no CreateTopics"),
        "{}",
        text(&created)
    );

    // Made through the mock cluster's own call, with a changelog that has
    // fewer partitions than its join topic.
    let p = settings.topics.task_prefix.clone();
    for t in [
        "count",
        "count.retry",
        "dlq",
        "results",
        "split",
        "split.retry",
        "sum",
    ] {
        kafka.create_named_topic(&format!("{p}{t}"), 3).await;
    }
    kafka.create_named_topic(&format!("{p}sum.joins"), 2).await;
    let checked = topics(&settings, &["check"]);
    assert_eq!(checked.status.code(), Some(1), "{}", text(&checked));
    let out = text(&checked);
    assert!(
        out.contains(&format!(
            "mismatch     {p}sum.joins (join changelog, 2 partitions, compacted): 2 partitions, but its join topic {p}sum has 3"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("exists       {p}sum (tasks, 3 partitions)")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_wait_waits_until_another_creates_the_topics() {
    let Some(kafka) = TestKafka::external() else {
        common::announce("topics check --wait: skipped: needs the external broker (the mock cluster has no CreateTopics)");
        return;
    };
    let settings = configuration(&kafka);
    // Nothing there: a short wait gives up with the same report and exit 1.
    let gave_up = topics(&settings, &["check", "--wait", "1s"]);
    assert_eq!(gave_up.status.code(), Some(1), "{}", text(&gave_up));
    assert!(text(&gave_up).contains("missing"), "{}", text(&gave_up));
    // A waiting check, then another process creates the topics.
    let config = common::config_file(&settings);
    let waiting = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["topics", "check", "--wait", "120s", "--config"])
        .arg(&config)
        .env_remove("CONVEYOR_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start conveyor topics check --wait");
    // Let it look at least once while they are missing.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let created = topics(&settings, &["create"]);
    assert!(created.status.success(), "{}", text(&created));
    let waited = tokio::task::spawn_blocking(move || waiting.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_file(&config);
    assert!(waited.status.success(), "{}", text(&waited));
    let said = String::from_utf8_lossy(&waited.stderr);
    assert!(
        said.contains("not yet:") && said.contains("missing"),
        "{said}"
    );
    assert!(
        lines(&waited).iter().all(|(word, _)| word == "exists"),
        "{}",
        text(&waited)
    );
    common::announce("topics check --wait: waited while the topics were missing, passed once another process created them");
}
