//! Shared test harness: a real Kafka-protocol broker for every test.
//!
//! Every test runs against librdkafka's in-process mock cluster, so
//! `cargo test` needs nothing installed. When `CONVEYOR_TEST_BROKERS`
//! (`host:port`) is set, the same test runs a second time against that
//! external broker (`.ci/run` starts nisshi and sets it). Topic and group
//! names are random per test, so tests never see each other's records.
//!
//! Which broker a test ran against is written straight to the process's
//! standard error, past the test harness's output capture, so a passing run
//! still shows it.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::io::Write;
use std::time::Duration;

use conveyor::settings::Settings;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::ClientConfig;

/// Environment variable naming an external broker (`host:port`).
pub const BROKERS_ENV: &str = "CONVEYOR_TEST_BROKERS";

/// How long test set-up waits for a broker to answer.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

enum Backend {
    Mock(MockCluster<'static, DefaultProducerContext>),
    External,
}

/// A broker a test runs against. Not `Send` (the mock cluster is not); keep
/// it on the test's own task.
pub struct TestKafka {
    backend: Backend,
    brokers: String,
}

impl TestKafka {
    /// A fresh in-process mock cluster with one broker.
    pub fn mock() -> TestKafka {
        let cluster = MockCluster::new(1).expect("librdkafka starts a mock cluster");
        let brokers = cluster.bootstrap_servers();
        TestKafka {
            backend: Backend::Mock(cluster),
            brokers,
        }
    }

    /// The external broker named by `CONVEYOR_TEST_BROKERS`, if set.
    pub fn external() -> Option<TestKafka> {
        let brokers = std::env::var(BROKERS_ENV).ok()?;
        let brokers = brokers.trim().to_owned();
        (!brokers.is_empty()).then_some(TestKafka {
            backend: Backend::External,
            brokers,
        })
    }

    /// The brokers `test` runs against: the mock cluster, then the external
    /// broker when configured. Announces each on standard error.
    pub fn all(test: &str) -> Vec<TestKafka> {
        let all: Vec<TestKafka> = std::iter::once(TestKafka::mock())
            .chain(TestKafka::external())
            .collect();
        let names: Vec<String> = all.iter().map(TestKafka::describe).collect();
        announce(&format!("{test}: runs against {}", names.join(" and ")));
        all
    }

    /// `mock cluster at …` or `external broker at …`.
    pub fn describe(&self) -> String {
        match self.backend {
            Backend::Mock(_) => format!("the mock cluster at {}", self.brokers),
            Backend::External => format!("the external broker at {}", self.brokers),
        }
    }

    /// Whether this is the in-process mock cluster.
    pub fn is_mock(&self) -> bool {
        matches!(self.backend, Backend::Mock(_))
    }

    /// `bootstrap.servers` of this broker.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// Default settings pointed at this broker.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::default();
        settings.kafka.brokers = self.brokers.clone();
        settings.kafka.client_id = "conveyor-test".into();
        settings
    }

    /// Creates a topic with a random name starting with `prefix` and
    /// `partitions` partitions; returns its name.
    pub async fn create_topic(&self, prefix: &str, partitions: i32) -> String {
        let name = unique(prefix);
        match &self.backend {
            // The mock cluster has no admin CreateTopics.
            Backend::Mock(cluster) => cluster
                .create_topic(&name, partitions, 1)
                .expect("mock cluster creates the topic"),
            Backend::External => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", &self.brokers)
                    .create()
                    .expect("admin client");
                let topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
                let options = AdminOptions::new().operation_timeout(Some(SETUP_TIMEOUT));
                let results = admin
                    .create_topics([&topic], &options)
                    .await
                    .expect("CreateTopics request answered");
                for result in results {
                    result.expect("topic created");
                }
            }
        }
        name
    }
}

/// A name that no other test uses: `prefix-<random>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Writes a line to the process's standard error, bypassing libtest's
/// capture (which only intercepts the `print!` family).
pub fn announce(line: &str) {
    let _ = std::io::stderr().write_all(format!("conveyor-test: {line}\n").as_bytes());
}
