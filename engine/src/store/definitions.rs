//! Registered definitions: registering one (and what registering the same name and version
//! again does), listing them, and reading one back (the version a saga is pinned to).

use sagaflow_protocol::{ProtocolError, SagaSpec, Timestamp};
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use tracing::info;

use super::{Store, definition};
use crate::EngineError;
use crate::schema::CompiledSchema;

impl Store {
    /// Registers a definition. Registering the same spec again is a no-op; a different spec
    /// under an existing version is refused, because running sagas are pinned to it. The one
    /// difference accepted is step schemas added where the stored definition has none: the
    /// richer definition is stored ([`SagaSpec::merge_schemas`]).
    pub async fn register_definition(&self, spec: &SagaSpec) -> Result<(), EngineError> {
        // Definitions also arrive from workers over the network: check them like the SDK does.
        spec.validate().map_err(EngineError::InvalidDefinition)?;
        check_schemas(spec)?;
        let text = serde_json::to_string(spec).map_err(|e| EngineError::CorruptDefinition {
            name: spec.name.clone(),
            version: i64::from(spec.version),
            detail: e.to_string(),
        })?;
        let existing = definition::Entity::find_by_id((spec.name.clone(), spec.version as i32))
            .one(&self.db)
            .await
            .map_err(EngineError::db("reading a saga definition"))?;
        if let Some(row) = existing {
            return self.register_again(spec, row).await;
        }
        let row = definition::ActiveModel {
            name: Set(spec.name.clone()),
            version: Set(spec.version as i32),
            spec: Set(text),
            registered_at: Set(Timestamp::now().as_millis()),
        };
        definition::Entity::insert(row)
            .on_conflict_do_nothing()
            .exec_without_returning(&self.db)
            .await
            .map_err(EngineError::db("registering a saga definition"))?;
        Ok(())
    }

    /// Every registered definition, by name then version.
    pub async fn definitions(&self) -> Result<Vec<SagaSpec>, EngineError> {
        let rows = definition::Entity::find()
            .order_by_asc(definition::Column::Name)
            .order_by_asc(definition::Column::Version)
            .all(&self.db)
            .await
            .map_err(EngineError::db("listing saga definitions"))?;
        rows.into_iter()
            .map(|row| {
                serde_json::from_str(&row.spec).map_err(|e| EngineError::CorruptDefinition {
                    name: row.name.clone(),
                    version: i64::from(row.version),
                    detail: e.to_string(),
                })
            })
            .collect()
    }

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
            serde_json::from_str(&row.spec).map_err(|e| EngineError::CorruptDefinition {
                name: row.name.clone(),
                version: i64::from(row.version),
                detail: e.to_string(),
            })
        })
        .transpose()
    }

    /// `spec` registered again under a name and version that `row` already holds: a no-op when
    /// it is the stored definition (or the stored one with fewer schemas), an update when it
    /// adds step schemas the stored one lacks, refused as a changed definition otherwise.
    async fn register_again(
        &self,
        spec: &SagaSpec,
        mut row: definition::Model,
    ) -> Result<(), EngineError> {
        let changed = || EngineError::DefinitionChanged {
            name: spec.name.clone(),
            version: spec.version,
        };
        // Each round reads the row once; a lost race re-reads it, and a few rounds settle
        // anything but a storm of workers adding different schemas at once.
        for _ in 0..3 {
            let Ok(stored) = serde_json::from_str::<SagaSpec>(&row.spec) else {
                return Err(changed());
            };
            if stored == *spec {
                return Ok(());
            }
            let merged = stored.merge_schemas(spec).ok_or_else(changed)?;
            if merged == stored {
                return Ok(());
            }
            let text =
                serde_json::to_string(&merged).map_err(|e| EngineError::CorruptDefinition {
                    name: spec.name.clone(),
                    version: i64::from(spec.version),
                    detail: e.to_string(),
                })?;
            // Conditional on the text read: of two engines adding different schemas at once,
            // one wins and the other's worker is told its definition changed.
            let updated = definition::Entity::update_many()
                .col_expr(definition::Column::Spec, Expr::value(text))
                .filter(definition::Column::Name.eq(row.name.clone()))
                .filter(definition::Column::Version.eq(row.version))
                .filter(definition::Column::Spec.eq(row.spec.clone()))
                .exec(self.connection())
                .await
                .map_err(EngineError::db("adding step schemas to a saga definition"))?;
            if updated.rows_affected > 0 {
                info!(saga = %spec.name, version = spec.version, "step schemas added to a registered definition");
                return Ok(());
            }
            row = definition::Entity::find_by_id((row.name.clone(), row.version))
                .one(self.connection())
                .await
                .map_err(EngineError::db("reading a saga definition"))?
                .ok_or_else(changed)?;
        }
        Err(changed())
    }
}

/// Every step schema of `spec` must be a usable JSON Schema, self-contained: a worker's mistake
/// in one is refused at registration rather than met later by every start or skip.
fn check_schemas(spec: &SagaSpec) -> Result<(), EngineError> {
    for step in &spec.steps {
        for (what, schema) in [
            ("input_schema", &step.input_schema),
            ("output_schema", &step.output_schema),
        ] {
            if let Some(schema) = schema
                && let Err(problem) = CompiledSchema::new(schema)
            {
                return Err(EngineError::InvalidDefinition(
                    ProtocolError::InvalidDefinition {
                        saga: spec.name.clone(),
                        reason: format!(
                            "the {what} of step `{}` is not a usable JSON Schema ({problem}); \
                             send a draft 2020-12 schema whose `$ref`s point inside it, or none",
                            step.name
                        ),
                    },
                ));
            }
        }
    }
    Ok(())
}
