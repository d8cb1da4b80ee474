//! Reading one registered definition back: the version a saga is pinned to.

use sagaflow_protocol::SagaSpec;
use sea_orm::EntityTrait;

use super::{Store, definition};
use crate::EngineError;

impl Store {
    /// The definition registered as `name` at `version`, if there is one.
    pub async fn definition(
        &self,
        name: &str,
        version: u32,
    ) -> Result<Option<SagaSpec>, EngineError> {
        let Ok(stored_version) = i32::try_from(version) else {
            return Ok(None);
        };
        let row = definition::Entity::find_by_id((name.to_string(), stored_version))
            .one(self.connection())
            .await
            .map_err(EngineError::db("reading a saga definition"))?;
        row.map(|row| {
            serde_json::from_str(&row.spec).map_err(|e| EngineError::Corrupt {
                saga_id: format!("definition {}@{}", row.name, row.version),
                detail: e.to_string(),
            })
        })
        .transpose()
    }
}
