//! Process signals: the first SIGINT or SIGTERM asks for an orderly stop.

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

/// Sets `stop` on the first SIGINT or SIGTERM (an orderly stop: processors
/// drain, the gateway answers what is in flight); exits at once, with
/// status 130, on a second.
pub fn stop_on_signals(stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    tokio::spawn(async move {
        match stop_requested().await {
            Ok(signal) => {
                tracing::info!(
                    signal,
                    "stopping: draining in-flight tasks (a second signal exits at once)"
                );
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
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
