//! `[[workflows]]`: chains, fan-outs and joins of task types, with their
//! checks (steps must name handled types, joins follow fan-outs).

use super::*;

/// `[[workflows]]`: one workflow definition.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSettings {
    /// Unique name, used in `POST /v1/workflows/{name}` and in every step's
    /// request.
    pub name: String,
    /// The steps, run in this order.
    pub steps: Vec<StepSettings>,
    /// The whole run must finish within this many milliseconds of its
    /// start, or it fails; 0: no limit.
    #[serde(default)]
    pub timeout_ms: u64,
    /// Most children one fan-out may make: a step whose output is a longer
    /// array fails the run, naming the size and this cap (a handler's
    /// output is outside input; one array must not turn into a flood of
    /// records). At most 2147483647.
    #[serde(default = "default_max_fan_out")]
    pub max_fan_out: usize,
}

/// The default [`WorkflowSettings::max_fan_out`].
pub const DEFAULT_MAX_FAN_OUT: usize = 10_000;

pub(super) fn default_max_fan_out() -> usize {
    DEFAULT_MAX_FAN_OUT
}

/// One step of a workflow.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepSettings {
    /// The task type that runs the step; a processor of this configuration
    /// must handle it.
    pub task: String,
    /// The step's output is a JSON array; each element becomes a child task
    /// of the next step. A join must follow.
    #[serde(default)]
    pub fan_out: bool,
    /// Receives, once every child has finished, the JSON array of the
    /// children's outputs in child order.
    #[serde(default)]
    pub join: bool,
}

impl Settings {
    pub(super) fn validate_workflows(&self, bad: &mut impl FnMut(String, &str)) {
        let handled = self.task_topics();
        let mut names = std::collections::BTreeSet::new();
        for (i, w) in self.workflows.iter().enumerate() {
            let at = |k: &str| format!("workflows[{i}] ({}).{k}", w.name);
            if let Err(why) = check_topic_name(&w.name) {
                bad(
                    format!("workflows[{i}].name"),
                    &format!("workflow name {why}"),
                );
            }
            if !names.insert(w.name.as_str()) {
                bad(
                    format!("workflows[{i}].name"),
                    &format!("`{}` is defined twice", w.name),
                );
            }
            if w.steps.is_empty() {
                bad(at("steps"), "must list at least one step");
            }
            if w.max_fan_out == 0 || i32::try_from(w.max_fan_out).is_err() {
                bad(at("max_fan_out"), "must be between 1 and 2147483647");
            }
            // Whether the steps so far are inside a fan-out not yet joined.
            let mut fanned_at: Option<usize> = None;
            for (s, step) in w.steps.iter().enumerate() {
                let key = at(&format!("steps[{s}]"));
                if !handled.contains_key(&step.task) {
                    bad(
                        format!("{key}.task"),
                        &format!(
                            "unknown task type `{}`: no [[processors]] entry handles it",
                            step.task
                        ),
                    );
                }
                if step.fan_out && step.join {
                    bad(key.clone(), "cannot be both fan_out and join");
                    continue;
                }
                if step.join {
                    match fanned_at {
                        None => bad(
                            format!("{key}.join"),
                            "a join needs a fan_out step before it (with no join between)",
                        ),
                        Some(f) if f + 1 == s => bad(
                            format!("{key}.join"),
                            &format!(
                                "needs at least one step for the children between it and the fan_out at steps[{f}]"
                            ),
                        ),
                        Some(_) => {}
                    }
                    fanned_at = None;
                }
                if step.fan_out {
                    if let Some(f) = fanned_at {
                        bad(
                            format!("{key}.fan_out"),
                            &format!("steps[{f}] fans out already and is not joined yet; nested fan-outs are not supported"),
                        );
                    }
                    fanned_at = Some(s);
                }
            }
            if let Some(f) = fanned_at {
                bad(
                    at(&format!("steps[{f}].fan_out")),
                    "a fan_out must be followed by a join step",
                );
            }
        }
    }
}
