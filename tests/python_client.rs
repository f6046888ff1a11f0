//! The Python client and handler kit (clients/python): its pytest suite,
//! run against this build's `conveyor dev` (the embedded cluster, a worker
//! and the gateway in one process; see clients/python/tests/conftest.py).
//!
//! pytest's output goes straight to this process's standard output, so its
//! summary line shows in `cargo test`'s output. Skipped, saying so, when
//! python3 or pytest is missing, unless `CONVEYOR_REQUIRE_PYTHON` is set
//! (CI sets it, so there it fails instead).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::process::{Command, Stdio};

const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python");

#[test]
fn python_client_suite() {
    if !common::python_module_available(
        "python_client",
        "pytest",
        "CONVEYOR_REQUIRE_PYTHON",
        "pip install -e 'clients/python[test]'",
    ) {
        return;
    }
    common::announce("python_client: pytest clients/python against `conveyor dev` (mock cluster)");
    let status = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(CLIENT)
        .env("CONVEYOR_BIN", env!("CARGO_BIN_EXE_conveyor"))
        .env("PYTHONPATH", format!("{CLIENT}/src"))
        .stdin(Stdio::null())
        .status()
        .expect("run python3 -m pytest");
    assert!(
        status.success(),
        "the Python client's tests failed: {status}"
    );
}
