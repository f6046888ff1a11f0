//! Secured clusters: TLS and SASL/SCRAM against nisshi, which serves TLS
//! (`--cert`/`--key`) and requires SCRAM (`--authentication`, users kept in
//! sqlite). The test makes its own certificate authorities and broker
//! certificates with the `openssl` command and starts its own brokers on
//! loopback, so nothing secret is committed. Needs `nisshi` and `openssl`
//! on PATH: skipped (and said) without them, unless
//! `CONVEYOR_REQUIRE_NISSHI` is set (CI sets it), which makes that a
//! failure.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ids, requests, InProcessWorker, TestGateway, TestKafka};
use conveyor::codec::TaskStatus;
use conveyor::security::{Mechanism, Protocol, Secret, SecuritySettings};
use conveyor::settings::{HandlerKind, Ordering};

const LONG: Duration = Duration::from_secs(120);
const ALICE_PASSWORD: &str = "alice-Pw-7e1c";
const BOB_PASSWORD: &str = "bob-Pw-93d0";

fn tools_present() -> bool {
    let ok = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let present = ok("nisshi", "--version") && ok("openssl", "version");
    if !present {
        assert!(
            std::env::var_os("CONVEYOR_REQUIRE_NISSHI").is_none(),
            "CONVEYOR_REQUIRE_NISSHI is set but nisshi or openssl is not on PATH"
        );
    }
    present
}

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .expect("run a set-up command");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate authority (`<name>.pem`, `<name>.key`) in `dir`.
fn authority(dir: &Path, name: &str) -> PathBuf {
    run(
        dir,
        &[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-subj",
            &format!("/CN=conveyor test {name}"),
        ],
    );
    dir.join(format!("{name}.pem"))
}

/// A broker certificate for `host`, signed by authority `ca`: returns
/// (certificate, PKCS#8 key).
fn broker_certificate(dir: &Path, ca: &str, name: &str, host: &str) -> (PathBuf, PathBuf) {
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName=DNS:{host}\n"),
    )
    .expect("write extension file");
    run(
        dir,
        &[
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={host}"),
        ],
    );
    run(
        dir,
        &[
            "openssl",
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// A nisshi broker started by the test, stopped when dropped.
struct Nisshi {
    child: Child,
    port: u16,
}

impl Nisshi {
    fn start(dir: &Path, port: u16, advertised_host: &str, extra: &[&str]) -> Nisshi {
        let log = std::fs::File::create(dir.join(format!("nisshi-{port}.log"))).expect("log");
        let child = Command::new("nisshi")
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{advertised_host}:{port}"))
            .arg("--group-initial-rebalance-delay")
            .arg("0s")
            .args(extra)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nisshi");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nisshi did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nisshi { child, port }
    }
}

impl Drop for Nisshi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything the tests share: a directory with two authorities, a broker
/// certificate for `localhost` from the first, and two brokers: one that
/// requires SCRAM over TLS (users alice, SCRAM-SHA-512, and bob,
/// SCRAM-SHA-256) and one that serves TLS without authentication.
struct Secured {
    dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    sasl: Nisshi,
    tls: Nisshi,
}

impl Secured {
    fn start() -> Secured {
        let dir = std::env::temp_dir().join(common::unique("conveyor-secure"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = authority(&dir, "ca");
        let other_ca = authority(&dir, "other-ca");
        let (cert, key) = broker_certificate(&dir, "ca", "broker", "localhost");
        // nisshi reads a .env from its working directory: an empty one.
        let sasl_dir = dir.join("sasl");
        std::fs::create_dir_all(&sasl_dir).expect("broker dir");
        let storage = "sqlite://nisshi.db";
        // Users are made on a plaintext start of the same storage.
        {
            let setup = Nisshi::start(
                &sasl_dir,
                common::free_port(),
                "127.0.0.1",
                &["--storage-engine", storage],
            );
            let broker = format!("tcp://127.0.0.1:{}", setup.port);
            run(
                &sasl_dir,
                &[
                    "nisshi",
                    "user",
                    "create",
                    "--broker",
                    &broker,
                    "alice",
                    ALICE_PASSWORD,
                    "--mechanism",
                    "scram512",
                ],
            );
            run(
                &sasl_dir,
                &[
                    "nisshi",
                    "user",
                    "create",
                    "--broker",
                    &broker,
                    "bob",
                    BOB_PASSWORD,
                    "--mechanism",
                    "scram256",
                ],
            );
        }
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        let sasl = Nisshi::start(
            &sasl_dir,
            common::free_port(),
            "localhost",
            &[
                "--storage-engine",
                storage,
                "--authentication",
                "--cert",
                &cert,
                "--key",
                &key,
            ],
        );
        let tls_dir = dir.join("tls");
        std::fs::create_dir_all(&tls_dir).expect("broker dir");
        let tls = Nisshi::start(
            &tls_dir,
            common::free_port(),
            "localhost",
            &["--cert", &cert, "--key", &key],
        );
        Secured {
            dir,
            ca,
            other_ca,
            sasl,
            tls,
        }
    }

    fn scram(&self, mechanism: Mechanism, user: &str, password: &str) -> SecuritySettings {
        SecuritySettings {
            protocol: Protocol::SaslSsl,
            sasl_mechanism: Some(mechanism),
            username: user.into(),
            password: Secret::new(password),
            ca_file: self.ca.display().to_string(),
            ..SecuritySettings::default()
        }
    }

    fn tls_only(&self) -> SecuritySettings {
        SecuritySettings {
            protocol: Protocol::Ssl,
            ca_file: self.ca.display().to_string(),
            ..SecuritySettings::default()
        }
    }
}

impl Drop for Secured {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Echo tasks through an in-process worker (and, with `gateway`, submitted
/// over HTTP): every result succeeds.
async fn round_trip(kafka: &TestKafka, gateway: bool) {
    let pipeline = kafka.pipeline(2).await;
    let mut settings =
        kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
    settings.topics.results = pipeline.output.clone();
    let worker = InProcessWorker::start(&settings, "secure", None);
    if gateway {
        let gateway =
            TestGateway::start(&settings, Arc::new(conveyor::metrics::Metrics::new())).await;
        let http = reqwest::Client::new();
        let response = http
            .post(format!("{}/v1/tasks", gateway.base))
            .header("content-type", "application/json")
            .body(r#"{"type": "echo", "payload": {"n": 7}}"#)
            .send()
            .await
            .expect("submit");
        assert_eq!(
            response.status().as_u16(),
            202,
            "{:?}",
            response.text().await
        );
        let body: serde_json::Value =
            serde_json::from_str(&response.text().await.expect("body")).expect("json");
        let id = body["id"].as_str().expect("an id").to_owned();
        let answer = http
            .get(format!("{}/v1/tasks/{id}?wait=30s", gateway.base))
            .send()
            .await
            .expect("status")
            .text()
            .await
            .expect("body");
        let answer: serde_json::Value = serde_json::from_str(&answer).expect("json");
        assert_eq!(answer["status"], "succeeded", "{answer}");
        assert_eq!(answer["result"], serde_json::json!({"n": 7}), "{answer}");
        gateway.stop().await;
    } else {
        let sent = requests("echo", r#"{"n":1}"#, 20);
        kafka.produce_requests(&pipeline.input, &sent).await;
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        assert_eq!(results.by_id.len(), 20);
        assert!(results.all().all(|r| r.status == TaskStatus::Succeeded));
    }
    worker.stop().await;
}

/// Runs `conveyor <args>` with `security` against `brokers`; returns its
/// exit code, how long it took and what it printed.
fn conveyor_with(kafka: &TestKafka, args: &[&str]) -> (Option<i32>, Duration, String) {
    let mut settings = kafka.settings();
    settings
        .processors
        .push(conveyor::settings::ProcessorSettings {
            name: "p".into(),
            tasks: [(
                "echo".to_owned(),
                conveyor::settings::TaskSettings::new(HandlerKind::Echo),
            )]
            .into(),
            ..Default::default()
        });
    settings.metrics.listen = "127.0.0.1:0".into();
    settings.gateway.listen = "127.0.0.1:0".into();
    settings.fill_derived();
    let config = common::config_file(&settings);
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(args)
        .arg("--config")
        .arg(&config)
        .env_remove("CONVEYOR_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run conveyor");
    let took = started.elapsed();
    let _ = std::fs::remove_file(&config);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), took, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sasl_ssl_and_tls_round_trips_and_clear_failures() {
    if !tools_present() {
        common::announce(
            "sasl_ssl_and_tls_round_trips_and_clear_failures: nisshi or openssl missing; skipped",
        );
        return;
    }
    let secured = Secured::start();
    let sasl = format!("localhost:{}", secured.sasl.port);
    let tls = format!("localhost:{}", secured.tls.port);
    common::announce(&format!(
        "sasl_ssl_and_tls_round_trips_and_clear_failures: nisshi with SCRAM over TLS at {sasl}, TLS only at {tls}"
    ));

    // SASL_SSL, SCRAM-SHA-512, the test's own CA: worker and gateway, HTTP
    // submit to result.
    let alice = TestKafka::secured(
        &sasl,
        secured.scram(Mechanism::ScramSha512, "alice", ALICE_PASSWORD),
    );
    round_trip(&alice, true).await;
    // SCRAM-SHA-256.
    let bob = TestKafka::secured(
        &sasl,
        secured.scram(Mechanism::ScramSha256, "bob", BOB_PASSWORD),
    );
    round_trip(&bob, false).await;
    // TLS without SASL.
    let tls_kafka = TestKafka::secured(&tls, secured.tls_only());
    round_trip(&tls_kafka, false).await;

    // A wrong password: worker, gateway and a CLI tool stop with exit 1
    // within 10 s naming authentication, and never print the password.
    let wrong = "not-alices-Pw-5b2a";
    let intruder = TestKafka::secured(&sasl, secured.scram(Mechanism::ScramSha512, "alice", wrong));
    for args in [&["worker"][..], &["gateway"][..], &["dlq", "list"][..]] {
        let (code, took, text) = conveyor_with(&intruder, args);
        common::announce(&format!(
            "wrong password, conveyor {args:?}: exit {code:?} after {:.1} s",
            took.as_secs_f64()
        ));
        assert_eq!(code, Some(1), "{args:?}: {text}");
        assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
        assert!(
            text.contains("authentication failed") && text.contains("kafka.security.username"),
            "{args:?}: {text}"
        );
        assert!(!text.contains(wrong), "the password was printed: {text}");
    }

    // A certificate that does not name the host connected to.
    let by_address = TestKafka::secured(
        &format!("127.0.0.1:{}", secured.tls.port),
        secured.tls_only(),
    );
    let (code, took, text) = conveyor_with(&by_address, &["worker"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {text}");
    assert!(
        text.contains("conveyor: TLS: the broker's certificate could not be verified")
            && text.contains("kafka.brokers names a host the certificate holds"),
        "{text}"
    );

    // An authority the client does not trust.
    let mut untrusting = secured.tls_only();
    untrusting.ca_file = secured.other_ca.display().to_string();
    let stranger = TestKafka::secured(&tls, untrusting);
    let (code, took, text) = conveyor_with(&stranger, &["worker"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        text.contains("conveyor: TLS: the broker's certificate could not be verified")
            && text.contains("check kafka.security.ca_file"),
        "{text}"
    );
}
