//! A worker with its own Rust handlers, on conveyor's library API.
//!
//! ```sh
//! cargo run --example rust_handler -- examples/rust_handler.toml
//! ```
//!
//! `examples/rust_handler.toml` names the handlers registered here
//! (`handler = "shout"`, `handler = "count_words"`) beside a built-in one;
//! everything else — consumer group, retries, dead letters, results,
//! metrics and probes — is conveyor's, as for `conveyor worker`.
//! `tests/app.rs` runs this program end to end.

use std::process::ExitCode;

use conveyor::app::App;
use conveyor::codec::TaskRequest;
use conveyor::handlers::{Handler, HandlerError, Output, TaskContext};
use futures::future::BoxFuture;
use futures::FutureExt;

/// A handler as a type: the payload, a JSON string, upper-cased.
struct Shout;

impl Handler for Shout {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            let text: String = serde_json::from_slice(&task.payload).map_err(|e| {
                HandlerError::Permanent(format!("the payload must be a JSON string: {e}"))
            })?;
            let shouted = serde_json::to_vec(&text.to_uppercase())
                .map_err(|e| HandlerError::Permanent(e.to_string()))?;
            Ok(Output::json(shouted))
        }
        .boxed()
    }
}

fn main() -> ExitCode {
    let Some(config) = std::env::args().nth(1) else {
        eprintln!("usage: rust_handler <config.toml>");
        return ExitCode::from(2);
    };
    App::from_config(config)
        .handler("shout", Shout)
        // A handler as a closure: the number of words of a JSON string.
        .handler_fn("count_words", |task: TaskRequest| async move {
            let text: String = serde_json::from_slice(&task.payload).map_err(|e| {
                HandlerError::Permanent(format!("the payload must be a JSON string: {e}"))
            })?;
            Ok(Output::json(text.split_whitespace().count().to_string()))
        })
        .run()
}
