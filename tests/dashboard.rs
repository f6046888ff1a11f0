//! The dashboard (`/ui`) in a real browser: tests/browser's pytest suite,
//! Playwright driving Debian's headless chromium against this build's
//! `conveyor dev` (see tests/browser/conftest.py).
//!
//! pytest's output goes straight to this process's standard output.
//! Skipped, saying so, when python3, pytest, Playwright's Python driver or
//! /usr/bin/chromium is missing, unless `CONVEYOR_REQUIRE_BROWSER` is set
//! (CI sets it, so there it fails instead).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::process::{Command, Stdio};

const SUITE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");

#[test]
fn dashboard_in_a_browser() {
    let required = std::env::var_os("CONVEYOR_REQUIRE_BROWSER").is_some();
    let chromium =
        std::env::var("CONVEYOR_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    if !std::path::Path::new(&chromium).exists() {
        assert!(
            !required,
            "CONVEYOR_REQUIRE_BROWSER is set but there is no chromium at {chromium} \
             (apt-get install chromium)"
        );
        common::announce(&format!(
            "dashboard: skipped, no chromium at {chromium} (apt-get install chromium)"
        ));
        return;
    }
    if !common::python_module_available(
        "dashboard",
        "playwright",
        "CONVEYOR_REQUIRE_BROWSER",
        "pip install -r tests/browser/requirements.txt",
    ) {
        return;
    }
    common::announce(
        "dashboard: pytest tests/browser (Playwright, headless chromium, `conveyor dev`)",
    );
    let status = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "."])
        .current_dir(SUITE)
        .env("CONVEYOR_BIN", env!("CARGO_BIN_EXE_conveyor"))
        .env("CONVEYOR_CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .status()
        .expect("run python3 -m pytest");
    assert!(
        status.success(),
        "the dashboard's browser tests failed: {status}"
    );
}
