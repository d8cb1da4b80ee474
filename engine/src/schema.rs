//! Checking JSON against the step schemas a definition carries (`StepSpec::input_schema`,
//! `StepSpec::output_schema`), so that the engine and the CLI can refuse a wrong start input or
//! a wrong operator-given output without the step's code, whatever language the worker is in.
//!
//! The draft is the one the schema names in `$schema` (2020-12 when it names none). Only
//! references inside the schema resolve: the `jsonschema` crate is built without remote
//! retrieval, so checking never touches the network or the file system, and a schema that
//! points outside itself is refused when it is registered.

use jsonschema::Validator;
use serde_json::Value;

/// Where and why a value does not fit a schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    /// The schema's complaint, e.g. `"ten" is not of type "integer"`.
    pub problem: String,
    /// Where in the value, as a JSON Pointer (RFC 6901); `/` for the value as a whole.
    pub path: String,
}

/// A schema compiled for checking.
pub(crate) struct CompiledSchema(Validator);

impl std::fmt::Debug for CompiledSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompiledSchema")
    }
}

impl CompiledSchema {
    /// Compiles `schema`, or says why it is not a usable JSON Schema.
    pub(crate) fn new(schema: &Value) -> Result<Self, String> {
        jsonschema::validator_for(schema)
            .map(CompiledSchema)
            .map_err(|e| e.to_string())
    }

    /// The first place where `value` does not fit, if any.
    pub(crate) fn violation(&self, value: &Value) -> Option<Violation> {
        self.0.iter_errors(value).next().map(|error| {
            let path = error.instance_path().to_string();
            Violation {
                problem: error.to_string(),
                path: if path.is_empty() { "/".into() } else { path },
            }
        })
    }
}

/// `schema` (of an input or an output object) as the value travels when its members `secret`
/// are sealed: each of those properties becomes "an envelope" (`docs/protocol.md` section 17),
/// since the engine sees only envelopes there and cannot check what they hold.
pub(crate) fn sealed_form(schema: &Value, secret: &[String]) -> Value {
    let mut sealed = schema.clone();
    if let Some(properties) = sealed.get_mut("properties").and_then(Value::as_object_mut) {
        for field in secret {
            properties.insert(
                field.clone(),
                serde_json::json!({
                    "type": "object",
                    "required": [sagaflow_protocol::sealed::ENVELOPE_MEMBER],
                    "properties": {sagaflow_protocol::sealed::ENVELOPE_MEMBER: {"type": "object"}}
                }),
            );
        }
    }
    sealed
}

/// Compiles `schema` and checks `value` against it: `Err` when the schema is not usable.
pub(crate) fn violation(schema: &Value, value: &Value) -> Result<Option<Violation>, String> {
    Ok(CompiledSchema::new(schema)?.violation(value))
}

/// The schema's `title` (schemars puts the Rust type's name there), for messages.
pub(crate) fn title(schema: &Value) -> Option<&str> {
    schema.get("title").and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_violation_names_the_problem_and_the_path() {
        let schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
            "required": ["items"],
            "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer"}}}}
        });
        assert_eq!(violation(&schema, &json!({"items": [{"n": 1}]})), Ok(None));
        let found = violation(&schema, &json!({"items": [{"n": 1}, {"n": "two"}]}))
            .expect("usable")
            .expect("a violation");
        assert_eq!(found.path, "/items/1/n");
        assert!(found.problem.contains("\"two\""), "{}", found.problem);
        let whole = violation(&schema, &json!(7))
            .expect("usable")
            .expect("a violation");
        assert_eq!(whole.path, "/");
    }

    #[test]
    fn a_schema_that_points_outside_itself_is_not_usable() {
        let schema = json!({"$ref": "https://example.com/elsewhere.json"});
        assert!(violation(&schema, &json!(1)).is_err());
        assert!(violation(&json!({"type": 12}), &json!(1)).is_err());
    }
}
