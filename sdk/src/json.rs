//! JSON conversions with errors that name the step and the type.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::SdkError;

/// Reads `value` as `T`, or explains which value did not fit which type for which step.
pub(crate) fn from_value<T: DeserializeOwned>(
    value: Value,
    what: &str,
    step: &str,
) -> Result<T, SdkError> {
    // serde_path_to_error names the field that did not fit (`items[2].quantity`), which
    // serde_json alone does not for values.
    serde_path_to_error::deserialize(value).map_err(|e| SdkError::Deserialize {
        what: what.to_string(),
        step: step.to_string(),
        type_name: std::any::type_name::<T>(),
        detail: e.to_string(),
    })
}

/// Turns a step's output into JSON.
pub(crate) fn to_value<T: Serialize>(value: &T, step: &str) -> Result<Value, SdkError> {
    serde_json::to_value(value).map_err(|e| SdkError::Serialize {
        step: step.to_string(),
        detail: e.to_string(),
    })
}
