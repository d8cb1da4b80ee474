//! Secret fields in step types: [`Secret`], and what the SDK does with them.
//!
//! A member of a step's `Input` or `Output` struct typed `Secret<T>` is declared secret in the
//! definition the SDK builds ([`SagaSpec::secret_input`](crate::SagaSpec::secret_input),
//! [`StepSpec::secret_output`](crate::StepSpec::secret_output)). Whoever starts the saga seals
//! the secret input fields with [`SecretKeys`]; the engine stores and forwards the envelopes
//! without reading them; the worker runtime opens them before the handler runs and seals the
//! secret fields of the handler's output before it replies. The handler sees plain values.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::protocol::SecretKeys;
use crate::protocol::sealed::REDACTED;

/// The JSON Schema keyword that marks a property as secret, set by [`Secret`]'s schema.
pub const SECRET_KEYWORD: &str = "x-sagaflow-secret";

/// A value that is sealed whenever it leaves the worker (or the client that starts the saga),
/// and shows as `«secret»` in `Debug` and `Display`.
///
/// Serialized as the bare `T`: the runtime seals it by the field's name, so the same type reads
/// the plain value the runtime opened for the handler.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps `value`.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The value, to use it (the name makes every use easy to find in a review).
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// The value, unwrapped.
    pub fn into_exposed(self) -> T {
        self.0
    }
}

impl<T> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Secret(value)
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T: Serialize> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Secret)
    }
}

impl<T: JsonSchema> JsonSchema for Secret<T> {
    fn inline_schema() -> bool {
        // Inline, so that the keyword sits on the property itself where the SDK looks for it.
        true
    }

    fn schema_name() -> Cow<'static, str> {
        format!("Secret_{}", T::schema_name()).into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let mut schema = generator.subschema_for::<T>();
        schema.insert(SECRET_KEYWORD.to_string(), Value::Bool(true));
        schema
    }
}

/// The properties of the object schema `schema` marked secret (directly, or in one of the
/// alternatives of an `Option`), in the schema's order.
pub(crate) fn secret_properties(schema: &Value) -> Vec<String> {
    fn is_secret(property: &Value) -> bool {
        property.get(SECRET_KEYWORD) == Some(&Value::Bool(true))
            || ["anyOf", "oneOf", "allOf"].iter().any(|keyword| {
                property
                    .get(*keyword)
                    .and_then(Value::as_array)
                    .is_some_and(|alternatives| alternatives.iter().any(is_secret))
            })
    }
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|properties| {
            properties
                .iter()
                .filter(|(_, property)| is_secret(property))
                .map(|(name, _)| name.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Opens every envelope among the members of `value` with `keys`; without keys, an envelope is
/// an error naming its field and key.
pub(crate) fn open_members(
    keys: Option<&SecretKeys>,
    value: &mut Value,
) -> Result<(), crate::protocol::ProtocolError> {
    match keys {
        Some(keys) => keys.open_fields(value),
        None => match value.as_object().and_then(|object| {
            object
                .iter()
                .find(|(_, member)| crate::protocol::sealed::is_envelope(member))
        }) {
            Some((field, member)) => Err(crate::protocol::ProtocolError::SecretField {
                field: field.clone(),
                kid: crate::protocol::Envelope::of(member)
                    .and_then(Result::ok)
                    .map_or_else(|| "none".to_string(), |envelope| envelope.kid),
                reason: "this process has no secret keys; give it the key file \
                         (--secret-keys or SAGAFLOW_SECRET_KEYS_FILE)"
                    .to_string(),
            }),
            None => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::*;

    #[derive(Serialize, Deserialize, JsonSchema)]
    #[schemars(crate = "schemars")]
    struct Payment {
        card: Secret<String>,
        pin: Option<Secret<u32>>,
        amount: u64,
    }

    #[test]
    fn secret_members_are_found_in_the_schema_and_hidden_in_debug_output() {
        let schema = crate::schema_of::<Payment>();
        assert_eq!(secret_properties(&schema), ["card", "pin"], "{schema}");
        let payment: Payment =
            serde_json::from_value(json!({"card": "4111", "pin": 1234, "amount": 5}))
                .expect("reads the plain values");
        assert_eq!(payment.card.expose(), "4111");
        assert_eq!(
            format!("{:?} {}", payment.card, payment.card),
            "«secret» «secret»"
        );
        assert_eq!(
            serde_json::to_value(&payment).expect("writes"),
            json!({"card": "4111", "pin": 1234, "amount": 5})
        );
    }
}
