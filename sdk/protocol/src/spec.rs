//! The data form of a saga definition: what the engine stores and the state machine reads.
//!
//! A [`SagaSpec`] carries no code. The engine registers it under its name and version, and each
//! saga instance pins the exact version it started with, so changing a definition never changes
//! a saga already running.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_with::{DurationMilliSeconds, serde_as};

use crate::{ProtocolError, RetryPolicy};

/// Where a step stands in the classic saga model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// Undone by its compensation when a later step before the pivot fails permanently.
    Compensatable,
    /// The go/no-go point: once it succeeds the saga only moves forward.
    Pivot,
    /// After the pivot: never compensated, retried until it succeeds or an operator steps in.
    Retriable,
}

/// Which action of a step runs.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::EnumString,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Direction {
    /// The step's forward action.
    Forward,
    /// The step's compensating action.
    Compensate,
}

impl Direction {
    /// `forward` or `compensate`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a [`SagaSpec`].
#[serde_as]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpec {
    /// Unique within the saga; appears in history, idempotency keys and the CLI.
    pub name: String,
    /// Compensatable, pivot or retriable.
    pub kind: StepKind,
    /// How failed forward attempts are retried.
    pub retry: RetryPolicy,
    /// How failed compensation attempts are retried (only used for compensatable steps). When it
    /// runs out the saga becomes stuck.
    pub compensation_retry: RetryPolicy,
    /// How long one attempt may take before it counts as failed (retryable) and is retried.
    #[serde(rename = "timeout_ms")]
    #[serde_as(as = "Option<DurationMilliSeconds<u64>>", no_default)]
    pub timeout: Option<Duration>,
    /// The JSON Schema (draft 2020-12) of what the step reads from the saga input, when the
    /// worker sent one. The engine checks a start's input against the first step's schema.
    /// Absent from definitions of workers that send none, which still parse and compare equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// The JSON Schema (draft 2020-12) of the step's output, when the worker sent one. The
    /// engine checks an output an operator gives for the step (`skip-step --output`) against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    /// The members of the step's output object that are secret: the worker seals them before
    /// it replies, and every later reader sees an envelope (`docs/protocol.md` section 17).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_output: Vec<String>,
}

impl StepSpec {
    /// Whether the step carries a schema for its input or its output.
    pub fn has_schemas(&self) -> bool {
        self.input_schema.is_some() || self.output_schema.is_some()
    }
}

/// A saga definition as data: ordered steps plus an optional overall deadline.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaSpec {
    /// The saga's name, e.g. `place_order`.
    pub name: String,
    /// The definition version; instances pin it.
    pub version: u32,
    /// The steps, in order.
    pub steps: Vec<StepSpec>,
    /// If the saga has not passed its pivot (or finished, when it has none) this long after it
    /// started, it stops moving forward and compensates.
    #[serde(rename = "deadline_ms")]
    #[serde_as(as = "Option<DurationMilliSeconds<u64>>", no_default)]
    pub deadline: Option<Duration>,
    /// The members of the saga's input object that are secret: whoever starts the saga seals
    /// them, the engine refuses them in clear, and workers open them for their handlers
    /// (`docs/protocol.md` section 17).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_input: Vec<String>,
}

impl SagaSpec {
    /// Checks the definition against the saga model; every path that accepts a definition
    /// (the SDK builder, an engine receiving one from a worker) calls this.
    ///
    /// The rules: a name and a version of at least 1; at least one step; saga and step names
    /// of letters, digits, `_` and `-` (they appear in idempotency keys and NATS subjects), step
    /// names unique; steps ordered as compensatable steps, then at most one pivot, then
    /// retriable steps, which need a pivot before them.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let invalid = |reason: String| ProtocolError::InvalidDefinition {
            saga: self.name.clone(),
            reason,
        };
        if !is_plain_name(&self.name) {
            return Err(invalid(
                "a saga name is letters, digits, `_` and `-` (it is part of NATS subjects)".into(),
            ));
        }
        if self.version == 0 {
            return Err(invalid("versions start at 1".into()));
        }
        if self.steps.is_empty() {
            return Err(invalid("a saga needs at least one step".into()));
        }
        check_field_names(&self.secret_input, "secret input").map_err(&invalid)?;
        for step in &self.steps {
            check_field_names(
                &step.secret_output,
                &format!("step `{}` secret output", step.name),
            )
            .map_err(&invalid)?;
        }
        let mut seen_pivot = false;
        for (i, step) in self.steps.iter().enumerate() {
            let name = &step.name;
            if !is_plain_name(name) {
                return Err(invalid(format!(
                    "step {i} has name `{name}`: use letters, digits, `_` and `-` (step names \
                     appear in idempotency keys and NATS subjects)"
                )));
            }
            if self.steps[..i].iter().any(|s| &s.name == name) {
                return Err(invalid(format!("two steps are called `{name}`")));
            }
            match step.kind {
                StepKind::Compensatable if seen_pivot => {
                    return Err(invalid(format!(
                        "compensatable step `{name}` comes after the pivot; steps after the \
                         pivot must be retriable"
                    )));
                }
                StepKind::Pivot if seen_pivot => {
                    return Err(invalid(format!(
                        "`{name}` is a second pivot; a saga has at most one"
                    )));
                }
                StepKind::Retriable if !seen_pivot => {
                    return Err(invalid(format!(
                        "retriable step `{name}` has no pivot before it; mark the go/no-go step \
                         with Step::pivot"
                    )));
                }
                StepKind::Pivot => seen_pivot = true,
                _ => {}
            }
        }
        Ok(())
    }

    /// The index of the step called `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// `self` (the stored definition) with the step schemas of `other` (the same name and
    /// version, announced again) added where `self` has none, or `None` when `other` is a
    /// different definition: anything but the schemas differs, or a step has a schema in both
    /// that is not the same one.
    ///
    /// This is what lets a definition registered without schemas (by an older worker) gain them
    /// when a newer worker announces the same definition with them, while a changed schema
    /// under the same version is refused like any other change: sagas pin their version.
    pub fn merge_schemas(&self, other: &SagaSpec) -> Option<SagaSpec> {
        if self.without_schemas() != other.without_schemas() {
            return None;
        }
        let mut merged = self.clone();
        for (step, theirs) in merged.steps.iter_mut().zip(&other.steps) {
            step.input_schema = merge_one(step.input_schema.take(), &theirs.input_schema)?;
            step.output_schema = merge_one(step.output_schema.take(), &theirs.output_schema)?;
        }
        Some(merged)
    }

    /// The definition with every step schema removed.
    pub fn without_schemas(&self) -> SagaSpec {
        let mut plain = self.clone();
        for step in &mut plain.steps {
            step.input_schema = None;
            step.output_schema = None;
        }
        plain
    }

    /// The step names, comma separated, for error messages.
    pub fn step_names(&self) -> String {
        self.steps
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Secret field names: not empty, each named once.
fn check_field_names(fields: &[String], what: &str) -> Result<(), String> {
    for (i, field) in fields.iter().enumerate() {
        if field.is_empty() {
            return Err(format!("a {what} field has an empty name"));
        }
        if fields[..i].contains(field) {
            return Err(format!("{what} field `{field}` is named twice"));
        }
    }
    Ok(())
}

/// One schema of [`SagaSpec::merge_schemas`]: `Some(result)` when compatible.
fn merge_one(ours: Option<Value>, theirs: &Option<Value>) -> Option<Option<Value>> {
    match (ours, theirs) {
        (Some(ours), Some(theirs)) if ours != *theirs => None,
        (Some(ours), _) => Some(Some(ours)),
        (None, theirs) => Some(theirs.clone()),
    }
}

/// Letters, digits, `_` and `-`, at least one: safe in keys and NATS subject tokens.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(input_schema: Option<Value>, timeout_ms: u64) -> SagaSpec {
        SagaSpec {
            name: "s".into(),
            version: 1,
            steps: vec![StepSpec {
                name: "a".into(),
                kind: StepKind::Pivot,
                retry: RetryPolicy::default(),
                compensation_retry: RetryPolicy::default(),
                timeout: Some(Duration::from_millis(timeout_ms)),
                input_schema,
                output_schema: None,
                secret_output: Vec::new(),
            }],
            deadline: None,
            secret_input: Vec::new(),
        }
    }

    #[test]
    fn a_definition_without_schemas_reads_and_writes_as_before() {
        let plain = spec(None, 10);
        let text = serde_json::to_string(&plain).expect("serializes");
        assert!(!text.contains("schema"), "{text}");
        let read: SagaSpec = serde_json::from_str(&text).expect("parses");
        assert_eq!(read, plain);
    }

    #[test]
    fn schemas_are_added_to_a_definition_without_but_never_changed() {
        let schema = json!({"type": "object"});
        let plain = spec(None, 10);
        let rich = spec(Some(schema.clone()), 10);
        assert_eq!(plain.merge_schemas(&rich), Some(rich.clone()), "added");
        assert_eq!(rich.merge_schemas(&plain), Some(rich.clone()), "kept");
        assert_eq!(rich.merge_schemas(&rich), Some(rich.clone()), "same");
        let other = spec(Some(json!({"type": "string"})), 10);
        assert_eq!(rich.merge_schemas(&other), None, "a changed schema");
        assert_eq!(
            plain.merge_schemas(&spec(Some(schema), 20)),
            None,
            "a changed timeout"
        );
    }
}
