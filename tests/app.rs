//! The library API (`conveyor::app::App`) end to end: examples/rust_handler.rs,
//! a program with its own Rust handlers, runs tasks from a real broker
//! (each test broker) and writes their results; a configuration naming a
//! handler a program does not have is refused, listing the ones it has.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{config_file, ids, init_logs, TestKafka};
use conveyor::codec::{TaskRequest, TaskStatus};
use conveyor::settings::{HandlerKind, Ordering};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The example's binary: built by `cargo test` with the other targets, or
/// here when this test runs alone.
fn example_binary() -> PathBuf {
    let conveyor = PathBuf::from(env!("CARGO_BIN_EXE_conveyor"));
    let dir = conveyor.parent().expect("target dir").join("examples");
    let binary = dir.join("rust_handler");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--example", "rust_handler"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo build --example rust_handler");
        assert!(status.success(), "building the example failed");
    }
    binary
}

struct Program(Child);

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_with_its_own_rust_handlers_runs_tasks_end_to_end() {
    init_logs();
    let binary = example_binary();
    for kafka in TestKafka::all("a_program_with_its_own_rust_handlers_runs_tasks_end_to_end") {
        let pipeline = kafka.pipeline(2).await;
        let mut settings = kafka.worker_settings(
            &pipeline,
            Ordering::Key,
            &[
                ("shout", HandlerKind::Custom("shout".into())),
                ("count_words", HandlerKind::Custom("count_words".into())),
                ("echo", HandlerKind::Echo),
            ],
        );
        settings.metrics.listen = String::new();
        let config = config_file(&settings);
        let mut program = Program(
            Command::new(&binary)
                .arg(&config)
                .env("RUST_LOG", "error")
                .stdin(Stdio::null())
                .spawn()
                .expect("start the example"),
        );

        let requests = vec![
            TaskRequest::new("shout", br#""hello conveyor""#.to_vec()),
            TaskRequest::new("count_words", br#""one two three""#.to_vec()),
            TaskRequest::new("echo", br#"{"x": 1}"#.to_vec()),
            TaskRequest::new("shout", b"42".to_vec()),
        ];
        kafka.produce_requests(&pipeline.input, &requests).await;
        let results = kafka
            .collect_results(&pipeline.output, &ids(&requests), TIMEOUT)
            .await;
        let only = |i: usize| {
            let all = &results.by_id[&requests[i].id];
            assert_eq!(all.len(), 1, "{}: {all:?}", kafka.describe());
            all[0].clone()
        };
        let shouted = only(0);
        assert_eq!(shouted.status, TaskStatus::Succeeded, "{shouted:?}");
        assert_eq!(shouted.output.as_deref(), Some(&br#""HELLO CONVEYOR""#[..]));
        let counted = only(1);
        assert_eq!(counted.output.as_deref(), Some(&b"3"[..]), "{counted:?}");
        let echoed = only(2);
        assert_eq!(echoed.output.as_deref(), Some(&br#"{"x": 1}"#[..]));
        // The program's handler refusing its input: a permanent failure
        // with the handler's words, as for a built-in.
        let refused = only(3);
        assert_eq!(refused.status, TaskStatus::Failed, "{refused:?}");
        let error = refused.error.expect("an error");
        assert_eq!(error.kind, "permanent");
        assert!(
            error.message.contains("must be a JSON string"),
            "{}",
            error.message
        );

        // SIGTERM: drains and exits 0, like `conveyor worker`.
        let pid = program.0.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success());
        let status = program.0.wait().expect("wait");
        assert!(status.success(), "{}: exit {status}", kafka.describe());
        let _ = std::fs::remove_file(&config);
    }
}

#[test]
fn a_handler_the_program_does_not_have_is_a_configuration_error_naming_the_ones_it_has() {
    let kafka = TestKafka::mock();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let pipeline = runtime.block_on(kafka.pipeline(1));
    let settings = kafka.worker_settings(
        &pipeline,
        Ordering::None,
        &[("resize", HandlerKind::Custom("resize_image".into()))],
    );
    let config = config_file(&settings);
    for (program, args) in [
        (example_binary(), vec![config.as_os_str().to_owned()]),
        (
            PathBuf::from(env!("CARGO_BIN_EXE_conveyor")),
            vec![
                "worker".into(),
                "--config".into(),
                config.as_os_str().to_owned(),
            ],
        ),
        (
            PathBuf::from(env!("CARGO_BIN_EXE_conveyor")),
            vec![
                "config".into(),
                "check".into(),
                "--config".into(),
                config.as_os_str().to_owned(),
            ],
        ),
    ] {
        let out = Command::new(&program)
            .args(&args)
            .env("RUST_LOG", "off")
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{program:?} {args:?}: {stderr}");
        assert!(
            stderr.contains("task type `resize`: no handler `resize_image` in this program"),
            "{stderr}"
        );
        // The example lists its own handlers beside the built-ins.
        let expected = if program.ends_with("rust_handler") {
            "count_words, echo, http, sha256, shout, sleep, split_lines, sum, word_count"
        } else {
            "echo, http, sha256, sleep, split_lines, sum, word_count"
        };
        assert!(stderr.contains(expected), "{stderr}");
    }
    let _ = std::fs::remove_file(&config);
}
