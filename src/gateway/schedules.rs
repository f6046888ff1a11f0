//! `GET /v1/schedules`: the configured periodic schedules, their next fire
//! times and the last tick each fired (read from the schedule topic).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::api::ApiError;
use super::Shared;
use crate::schedule::{listing, Fired};

/// How long a read of the schedule topic answers listings: however often
/// they are asked, the topic is read at most once per this.
pub(super) const READ_EVERY: Duration = Duration::from_secs(2);

/// The last read of the schedule topic, and when it was made.
pub(super) type LastRead = tokio::sync::Mutex<Option<(Instant, HashMap<String, Fired>)>>;

pub(super) async fn list_schedules(
    State(shared): State<Arc<Shared>>,
) -> Result<Json<Value>, ApiError> {
    let fired = if shared.schedules.is_empty() {
        HashMap::new()
    } else {
        // One read at a time; the others wait for it and share it.
        let mut last = shared.schedule_reads.lock().await;
        match last.as_ref() {
            Some((at, fired)) if at.elapsed() < READ_EVERY => fired.clone(),
            _ => {
                let config = shared.config.clone();
                let read =
                    tokio::task::spawn_blocking(move || crate::tools::fired_schedules(&config))
                        .await;
                let fired = match read {
                    Ok(Ok(fired)) => fired,
                    Ok(Err(e)) => return Err(unavailable(e.to_string())),
                    Err(e) => return Err(unavailable(e.to_string())),
                };
                *last = Some((Instant::now(), fired.clone()));
                fired
            }
        }
    };
    let listed = listing(&shared.schedules, &fired, crate::codec::now_millis());
    Ok(Json(json!({ "schedules": listed })))
}

fn unavailable(why: String) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "schedules_unavailable",
        format!("cannot read the schedule topic: {why}"),
    )
}
