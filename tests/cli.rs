//! The `conveyor` binary as a user meets it: `config check`, bad
//! configurations, and `conveyor dev` starting, answering its printed curl
//! commands and stopping.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use conveyor::settings::{HandlerKind, ProcessorSettings, Settings, TaskSettings};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conveyor.example.toml");

fn conveyor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(args)
        .env_remove("CONVEYOR_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("run conveyor")
}

fn temp_config(text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("conveyor-cli-{}.toml", uuid::Uuid::new_v4()));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .expect("write temp config");
    path
}

fn check(path: &Path) -> Output {
    conveyor(&[
        "config",
        "check",
        "--config",
        path.to_str().expect("utf-8 path"),
    ])
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn example_config_checks_ok_and_prints_the_effective_config() {
    let output = check(Path::new(EXAMPLE));
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    let printed = String::from_utf8(output.stdout).expect("utf-8");
    // What is printed is itself a valid configuration, equal to the example.
    let reprinted = temp_config(&printed);
    let from_print =
        Settings::load_from(Some(&reprinted), Vec::new()).expect("printed config loads");
    let _ = std::fs::remove_file(&reprinted);
    let from_example =
        Settings::load_from(Some(Path::new(EXAMPLE)), Vec::new()).expect("example loads");
    assert_eq!(from_print, from_example);
    assert_eq!(from_example.processors.len(), 1);
}

#[test]
fn typo_exits_2_naming_the_key() {
    let path = temp_config("[[processors]]\nname = \"a\"\nmax_inflight = 10\n[processors.tasks.echo]\nhandler = \"echo\"\n");
    let output = check(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    let err = stderr(&output);
    assert!(
        err.contains("processors[0].max_inflight: unknown field `max_inflight`"),
        "{err}"
    );
}

#[test]
fn zero_max_in_flight_exits_2_naming_the_key() {
    let path = temp_config("[[processors]]\nname = \"a\"\nmax_in_flight = 0\n[processors.tasks.echo]\nhandler = \"echo\"\n");
    let output = check(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        "configuration has 1 problem:\n  processors[0].max_in_flight: must be > 0\n"
    );
}

#[test]
fn bad_workflow_definitions_exit_2_naming_the_workflow_and_step() {
    let path = temp_config(
        r#"
[[processors]]
name = "a"
[processors.tasks.split]
handler = "echo"
[processors.tasks.count]
handler = "echo"

[[workflows]]
name = "typo"
steps = [{ task = "split" }, { task = "cuont" }]

[[workflows]]
name = "empty"
steps = []

[[workflows]]
name = "lonely_join"
steps = [{ task = "split" }, { task = "count", join = true }]
"#,
    );
    let output = check(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        "configuration has 3 problems:\n  \
         workflows[0] (typo).steps[1].task: unknown task type `cuont`: no [[processors]] entry handles it\n  \
         workflows[1] (empty).steps: must list at least one step\n  \
         workflows[2] (lonely_join).steps[1].join: a join needs a fan_out step before it (with no join between)\n"
    );
}

#[test]
fn a_bad_rate_limit_exits_2_naming_the_task_type() {
    let path = temp_config(
        "[[processors]]\nname = \"a\"\n[processors.tasks.pay]\nhandler = \"echo\"\nrate_limit = \"fifty/s\"\n\
         [processors.tasks.mail]\nhandler = \"echo\"\nrate_limit = \"0/min\"\nrate_limit_scope = \"cluster\"\n",
    );
    let output = check(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.contains("processors[0].tasks.mail.rate_limit_scope: `cluster` is not a scope: use group or worker"),
        "{err}"
    );
    let path = temp_config(
        "[[processors]]\nname = \"a\"\n[processors.tasks.pay]\nhandler = \"echo\"\nrate_limit = \"fifty/s\"\n\
         [processors.tasks.mail]\nhandler = \"echo\"\nrate_limit = \"0/min\"\n",
    );
    let output = check(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        "configuration has 2 problems:\n  \
         processors[0].tasks.mail.rate_limit: `0/min`: the count must be 1 to 1000000\n  \
         processors[0].tasks.pay.rate_limit: `fifty/s` is not a rate: write <count>/s, <count>/min or <count>/h, such as 50/s\n"
    );
}

#[test]
fn bad_schedules_exit_2_naming_the_schedule() {
    let path = temp_config(
        r#"
[[processors]]
name = "a"
[processors.tasks.report]
handler = "echo"

[[schedules]]
name = "nightly"
cron = "0 61 2 * *"
timezone = "Europe/Pariss"
type = "report"

[[schedules]]
name = "hourly"
cron = "every hour"
type = "report"
payload = "{not json"

[[schedules]]
name = "fine"
cron = "*/10 * * * * *"
timezone = "America/New_York"
type = "report"
misfire = "fire_all"
"#,
    );
    let output = check(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        "configuration has 4 problems:\n  \
         schedules[0] (nightly).cron: `0 61 2 * *` is not a cron expression: Component error: Number out of bounds.\n  \
         schedules[0] (nightly).timezone: `Europe/Pariss` is not an IANA time zone name (such as `UTC` or `Europe/Paris`)\n  \
         schedules[1] (hourly).cron: `every hour` has 2 fields; a cron expression has 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)\n  \
         schedules[1] (hourly).payload: is not valid JSON: key must be a string at line 1 column 2\n"
    );
    let path = temp_config(
        "[[schedules]]\nname = \"x\"\ncron = \"* * * * *\"\ntype = \"r\"\nmisfire = \"sometimes\"\n",
    );
    let output = check(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        "configuration has 1 problem:\n  schedules[0].misfire: `sometimes` is not a misfire policy: use fire_once, skip or fire_all\n"
    );
}

#[test]
fn environment_is_a_layer_of_config_check() {
    let output = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["config", "check", "--config", EXAMPLE])
        .env("CONVEYOR__KAFKA__BROKERS", "kafka-9:9093")
        .env_remove("CONVEYOR_CONFIG")
        .output()
        .expect("run conveyor");
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    let printed = String::from_utf8(output.stdout).expect("utf-8");
    assert!(printed.contains("brokers = \"kafka-9:9093\""), "{printed}");
}

#[test]
fn gateway_with_a_bad_gateway_section_exits_2_naming_the_keys() {
    let path = temp_config(
        "[gateway]\nlisten = \"localhost\"\nmax_wait_ms = 40000\nauth_tokens = [\"short\"]\n",
    );
    let output = conveyor(&["gateway", "--config", path.to_str().expect("utf-8 path")]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    for expected in [
        "gateway.listen: must be an IP address and port",
        "gateway.max_wait_ms: must be below gateway.request_timeout_ms (30000)",
        "gateway.auth_tokens[0]: must be at least 16 printable ASCII characters",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in: {text}");
    }
}

#[test]
fn worker_without_processors_exits_2_saying_what_to_add() {
    let path = temp_config("[kafka]\nbrokers = \"127.0.0.1:1\"\n");
    let output = conveyor(&["worker", "--config", path.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("no processors configured: add a [[processors]] section"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn submit_refuses_a_payload_that_is_not_json() {
    let output = conveyor(&[
        "submit",
        "--brokers",
        "127.0.0.1:1",
        "--type",
        "echo",
        "--payload",
        "{nope",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--payload is not valid JSON"),
        "{}",
        stderr(&output)
    );
}

/// Every leaf key of a fully populated configuration appears in the example
/// file, set or commented out, so the example documents every key.
#[test]
fn example_documents_every_key() {
    let mut full = Settings::default();
    full.codec.request_schema_id = Some(1);
    full.codec.result_schema_id = Some(2);
    full.kafka
        .options
        .insert("fetch.queue.backoff.ms".into(), "10".into());
    full.processors.push(ProcessorSettings {
        name: "p".into(),
        tasks: [(
            "web".to_owned(),
            TaskSettings {
                url: Some("http://x".into()),
                rate_limit: Some("1/s".into()),
                max_attempts: Some(1),
                initial_backoff_ms: Some(1),
                max_backoff_ms: Some(1),
                ..TaskSettings::new(HandlerKind::Http)
            },
        )]
        .into_iter()
        .collect(),
        ..ProcessorSettings::default()
    });
    full.schedules.push(conveyor::settings::ScheduleSettings {
        name: "s".into(),
        cron: "* * * * *".into(),
        timezone: "UTC".into(),
        task_type: "web".into(),
        payload: "{}".into(),
        key: Some("k".into()),
        misfire: Default::default(),
        misfire_grace_ms: 1,
        max_catch_up: 1,
        jitter_ms: 0,
    });
    full.workflows.push(conveyor::settings::WorkflowSettings {
        name: "w".into(),
        steps: vec![conveyor::settings::StepSettings {
            task: "web".into(),
            fan_out: false,
            join: false,
        }],
        timeout_ms: 1,
        max_fan_out: conveyor::settings::DEFAULT_MAX_FAN_OUT,
    });
    full.fill_derived();
    let tree: toml::Value = toml::Value::try_from(&full).expect("settings serialize");
    let mut keys = Vec::new();
    collect_leaf_keys(&tree, &mut keys);
    let example = std::fs::read_to_string(EXAMPLE).expect("example exists");
    let documented = |key: &str| {
        example.lines().any(|line| {
            let line = line.trim_start().trim_start_matches("# ");
            line.starts_with(&format!("{key} = ")) || line.starts_with(&format!("\"{key}\" = "))
        })
    };
    let missing: Vec<&String> = keys.iter().filter(|k| !documented(k)).collect();
    assert!(
        missing.is_empty(),
        "keys missing from conveyor.example.toml: {missing:?}"
    );
}

fn collect_leaf_keys(value: &toml::Value, keys: &mut Vec<String>) {
    let Some(table) = value.as_table() else {
        return;
    };
    for (key, child) in table {
        match child {
            toml::Value::Table(_) => collect_leaf_keys(child, keys),
            toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
                for item in items {
                    collect_leaf_keys(item, keys);
                }
            }
            _ => keys.push(key.clone()),
        }
    }
}

#[test]
fn dev_runs_a_task_through_the_worker_and_stops_on_sigint() {
    // The stop messages are logged at info: they show the stop order.
    let mut child = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .arg("dev")
        .env_remove("CONVEYOR_CONFIG")
        .env(
            "RUST_LOG",
            "warn,conveyor::gateway=info,conveyor::processor=info",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start conveyor dev");
    let child_stderr = child.stderr.take().expect("piped stderr");
    let logged = std::thread::spawn(move || {
        BufReader::new(child_stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.contains("Ctrl-C stops the gateway"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("conveyor dev did not get ready; it printed: {lines:#?}");
            }
        }
    }
    let text = lines.join("\n");
    assert!(text.contains("embedded Kafka-protocol cluster"), "{text}");
    assert!(
        text.contains("went through the worker: SUCCEEDED"),
        "{text}"
    );
    assert!(text.contains("conveyor.tasks.echo"), "{text}");

    // The printed curl commands work as printed: submit over HTTP, then a
    // GET with wait answers the result; the same for the demo workflow.
    let script = |route: &str| -> String {
        let found: Vec<&str> = lines
            .iter()
            .map(|l| l.trim_start())
            .filter(|l| {
                l.starts_with("id=$(curl")
                    || l.starts_with("run=$(curl")
                    || l.starts_with("curl -s \"")
            })
            .filter(|l| l.contains(route))
            .collect();
        assert_eq!(found.len(), 2, "two curl lines printed for {route}: {text}");
        found.join("\n")
    };
    let (tasks, workflows) = (script("/v1/tasks"), script("/v1/workflows"));
    if Command::new("curl").arg("--version").output().is_ok() {
        let run = |script: &str| -> serde_json::Value {
            let output = Command::new("sh")
                .args(["-c", script])
                .output()
                .expect("run sh");
            let answer = String::from_utf8_lossy(&output.stdout).into_owned();
            serde_json::from_str(&answer)
                .unwrap_or_else(|e| panic!("the GET printed no JSON ({e}): {answer}"))
        };
        let task = run(&tasks);
        assert_eq!(task["status"], "succeeded", "{task}");
        assert_eq!(task["result"], serde_json::json!({"slept_ms": 500}));
        let workflow = run(&workflows);
        assert_eq!(workflow["status"], "succeeded", "{workflow}");
        assert_eq!(workflow["workflow"], "wordcount");
        // "one two", "three four five", "six"
        assert_eq!(workflow["result"], 6, "{workflow}");
        assert_eq!(
            workflow["steps"][1]["outputs"],
            serde_json::json!([2, 3, 1])
        );
        // A delayed task runs too: dev runs the delay mover as a worker
        // does.
        let api = lines
            .iter()
            .find_map(|l| l.trim_start().strip_prefix("gateway: "))
            .and_then(|rest| rest.split_whitespace().next())
            .expect("the gateway's address is printed");
        let delayed = run(&format!(
            "id=$(curl -s -X POST {api}/v1/tasks -H 'content-type: application/json' \
             -d '{{\"type\": \"echo\", \"payload\": {{\"n\": 1}}, \"delay\": \"2s\"}}' \
             | sed 's/.*\"id\":\"\\([^\"]*\\)\".*/\\1/')\n\
             curl -s \"{api}/v1/tasks/$id?wait=25s\""
        ));
        assert_eq!(delayed["status"], "succeeded", "{delayed}");
        let waited = delayed["finished_at"].as_i64().unwrap_or(0)
            - delayed["submitted_at"].as_i64().unwrap_or(0);
        assert!(waited >= 2_000, "{delayed}");
        // `conveyor cancel` stops a running task through the gateway; a
        // second cancel finds it ended.
        let sleeping = run(&format!(
            "curl -s -X POST {api}/v1/tasks -H 'content-type: application/json' \
             -d '{{\"type\": \"sleep\", \"payload\": {{\"ms\": 60000}}}}'"
        ));
        let id = sleeping["id"].as_str().expect("an id").to_owned();
        let base = format!("http://{api}").replace("http://http://", "http://");
        let deadline = Instant::now() + Duration::from_secs(30);
        while run(&format!("curl -s {base}/v1/tasks/{id}"))["status"] != "running" {
            assert!(Instant::now() < deadline, "the sleep task never ran");
            std::thread::sleep(Duration::from_millis(50));
        }
        let cancelled = conveyor(&["cancel", &id, "--gateway", &base]);
        assert!(cancelled.status.success(), "{}", stderr(&cancelled));
        let answer = String::from_utf8_lossy(&cancelled.stdout).into_owned();
        assert!(answer.contains("\"cancel_requested\":true"), "{answer}");
        let ended = run(&format!("curl -s '{base}/v1/tasks/{id}?wait=20s'"));
        assert_eq!(ended["status"], "cancelled", "{ended}");
        assert_eq!(
            ended["error"]["message"],
            "cancelled while running; the handler stopped: sleep: cancelled, woke early"
        );
        let again = conveyor(&["cancel", &id, "--gateway", &base]);
        assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
        assert!(
            stderr(&again).contains("409") && stderr(&again).contains("already ended (cancelled)"),
            "{}",
            stderr(&again)
        );
        let malformed = conveyor(&["cancel", "not-a-uuid", "--gateway", &base]);
        assert_eq!(malformed.status.code(), Some(2));
        assert!(stderr(&malformed).contains("ID `not-a-uuid`: not a UUID"));
    } else {
        eprintln!("conveyor-test: curl is not installed; the printed curl commands were not run");
    }

    // So does the printed `workflow start` line (with this build's binary).
    let start = lines
        .iter()
        .find_map(|l| {
            l.trim_start()
                .strip_prefix("cargo run --release -- ")
                .filter(|rest| rest.contains("workflow start"))
        })
        .unwrap_or_else(|| panic!("a workflow start line printed: {text}"));
    let output = Command::new("sh")
        .args(["-c", &format!("{} {start}", env!("CARGO_BIN_EXE_conveyor"))])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run sh");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = printed
        .lines()
        .nth(1)
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("the run's result as the second line: {printed}"));
    assert_eq!(result["status"], "SUCCEEDED", "{printed}");
    assert_eq!(result["output"], 3, "\"a b\" and \"c\": {printed}");

    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let exit = child.wait().expect("conveyor dev exits");
    assert_eq!(exit.code(), Some(0), "exit after SIGINT");
    // The stop order: the gateway first, then the processor (whose producer
    // flush is the last thing it does).
    let log = logged.join().expect("stderr read");
    let at = |what: &str| {
        log.iter()
            .position(|l| l.contains(what))
            .unwrap_or_else(|| panic!("`{what}` logged: {log:#?}"))
    };
    let drained = log
        .iter()
        .position(|l| l.contains("drained") && l.contains("shutdown"))
        .unwrap_or_else(|| panic!("the shutdown drain logged: {log:#?}"));
    assert!(
        at("gateway stopped") < drained && drained < at("processor stopped"),
        "the gateway stops before the processor starts draining: {log:#?}"
    );
}

#[test]
fn config_check_never_prints_a_secret() {
    let key_password =
        std::env::temp_dir().join(format!("conveyor-cli-{}.secret", uuid::Uuid::new_v4()));
    std::fs::write(&key_password, "oidc-S3cret-from-file\n").expect("write secret file");
    let path = temp_config(&format!(
        "[kafka.security]\nprotocol = \"sasl_ssl\"\nsasl_mechanism = \"OAUTHBEARER\"\n\
         client_key_password = \"K3y-Secret-in-file\"\n\
         [kafka.security.oauthbearer]\ntoken_endpoint = \"https://idp.example/token\"\n\
         client_id = \"conveyor\"\nclient_secret_file = \"{}\"\n\
         [kafka.options]\n\"ssl.keystore.password\" = \"Keystore-S3cret\"\n",
        key_password.display()
    ));
    let output = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args([
            "config",
            "check",
            "--config",
            path.to_str().expect("utf-8 path"),
        ])
        .env_remove("CONVEYOR_CONFIG")
        .env("CONVEYOR__KAFKA__SECURITY__PASSWORD", "Pw-from-Env-123")
        .output()
        .expect("run conveyor");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&key_password);
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(0), "{printed}");
    for secret in [
        "Pw-from-Env-123",
        "K3y-Secret-in-file",
        "oidc-S3cret-from-file",
        "Keystore-S3cret",
    ] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    for shown in [
        "password = \"***\"",
        "client_key_password = \"***\"",
        "client_secret = \"***\"",
        "\"ssl.keystore.password\" = \"***\"",
    ] {
        assert!(printed.contains(shown), "{shown} missing:\n{printed}");
    }
}

#[test]
fn a_sasl_mechanism_missing_from_the_build_stops_a_command_naming_it() {
    let path = temp_config(
        "[kafka]\nbrokers = \"127.0.0.1:1\"\n[kafka.security]\nprotocol = \"sasl_plaintext\"\n\
         sasl_mechanism = \"PLAIN\"\nusername = \"u\"\npassword = \"Pw-not-shown-9\"\n\
         [kafka.options]\n\"sasl.mechanisms\" = \"GSSAPI\"\n",
    );
    let output = conveyor(&[
        "dlq",
        "list",
        "--config",
        path.to_str().expect("utf-8 path"),
    ]);
    let _ = std::fs::remove_file(&path);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No provider for SASL mechanism GSSAPI")
            && err.contains("check kafka.security and kafka.options"),
        "{err}"
    );
    assert!(!err.contains("Pw-not-shown-9"), "{err}");
}
