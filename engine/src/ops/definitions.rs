//! The registered definitions, read once per query to name the steps the `sagas` table keeps
//! by index.

use std::collections::{BTreeMap, BTreeSet};

use sagaflow_protocol::SagaSpec;
use sea_orm::{ColumnTrait, Condition, EntityTrait};
use tracing::warn;

use crate::EngineError;
use crate::store::{Store, definition, saga};

/// The registered definitions, to name steps (the `sagas` table keeps the step index).
pub(crate) struct Definitions(BTreeMap<(String, u32), SagaSpec>);

impl Definitions {
    /// Every readable definition. One that does not parse is left out (its sagas show step
    /// numbers instead of names) rather than failing a listing of every other saga; `show`
    /// of one of its sagas reports it.
    pub(crate) async fn load(store: &Store) -> Result<Self, EngineError> {
        let rows = definition::Entity::find()
            .all(store.connection())
            .await
            .map_err(EngineError::db("reading saga definitions"))?;
        let mut specs = BTreeMap::new();
        for row in rows {
            match serde_json::from_str::<SagaSpec>(&row.spec) {
                Ok(spec) => {
                    specs.insert((spec.name.clone(), spec.version), spec);
                }
                Err(error) => warn!(
                    name = %row.name,
                    version = row.version,
                    %error,
                    "a saga definition cannot be read; its step names are left out"
                ),
            }
        }
        Ok(Definitions(specs))
    }

    pub(crate) fn get(&self, name: &str, version: u32) -> Option<&SagaSpec> {
        self.0.get(&(name.to_string(), version))
    }

    pub(crate) fn step_name(&self, name: &str, version: u32, index: usize) -> Option<String> {
        self.get(name, version)
            .and_then(|spec| spec.steps.get(index))
            .map(|step| step.name.clone())
    }

    /// `(name = N AND version = V AND current_step = I)` for every definition with the step.
    pub(super) fn current_step_condition(
        &self,
        step: &str,
        name: Option<&str>,
        version: Option<u32>,
    ) -> Result<Condition, EngineError> {
        let mut any = Condition::any();
        let mut found = false;
        let mut known = BTreeSet::new();
        for ((spec_name, spec_version), spec) in &self.0 {
            if name.is_some_and(|n| n != spec_name) || version.is_some_and(|v| v != *spec_version) {
                continue;
            }
            known.extend(spec.steps.iter().map(|s| s.name.as_str()));
            if let Some(index) = spec.step_index(step) {
                found = true;
                any = any.add(
                    Condition::all()
                        .add(saga::Column::Name.eq(spec_name.as_str()))
                        .add(saga::Column::DefinitionVersion.eq(*spec_version as i32))
                        .add(saga::Column::CurrentStep.eq(index.to_string())),
                );
            }
        }
        if !found {
            let scope = match (name, version) {
                (Some(n), Some(v)) => format!("saga `{n}` version {v}"),
                (Some(n), None) => format!("saga `{n}`"),
                (None, Some(v)) => format!("version {v} of any saga"),
                (None, None) => "any registered saga".to_string(),
            };
            let hint = if known.is_empty() {
                "no matching definition is registered; `sagaflow list` without --step shows the \
                 sagas there are"
                    .to_string()
            } else {
                format!(
                    "its steps are: {}",
                    known.into_iter().collect::<Vec<_>>().join(", ")
                )
            };
            return Err(EngineError::invalid_query(
                format!("`{step}` is not a step of {scope}"),
                hint,
            ));
        }
        Ok(any)
    }
}
