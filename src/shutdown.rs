//! Stopping: a [`CancellationToken`] asks each part to stop (the gateway
//! stops taking requests; processors drain, commit and flush their
//! producers); process signals cancel one, the first SIGINT or SIGTERM
//! for an orderly stop.
//!
//! Where a gateway and processors run in one process (`conveyor dev`), the
//! order is: the gateway first (nothing new comes in), then the
//! processors, each ending with its producer's flush (see [`crate::dev`]).

pub use tokio_util::sync::CancellationToken;

use tokio::signal::unix::{signal, SignalKind};

/// Resolves on the first SIGINT or SIGTERM. Errors if the handlers cannot be
/// installed (which happens only when the process is out of resources).
pub async fn stop_requested() -> std::io::Result<&'static str> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}

/// Cancels `stop` on the first SIGINT or SIGTERM (an orderly stop:
/// processors drain, the gateway answers what is in flight); exits at once,
/// with status 130, on a second.
pub fn stop_on_signals(stop: CancellationToken) {
    tokio::spawn(async move {
        match stop_requested().await {
            Ok(signal) => {
                tracing::info!(
                    signal,
                    "stopping: draining in-flight tasks (a second signal exits at once)"
                );
                stop.cancel();
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for signals");
                return;
            }
        }
        if let Ok(signal) = stop_requested().await {
            tracing::warn!(signal, "second signal: exiting without draining");
            std::process::exit(130);
        }
    });
}
