//! Removing commands from the outbox once they need no publishing.

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use super::{INSERT_CHUNK, Store, outbox};
use crate::EngineError;

impl Store {
    /// Deletes published commands from the outbox: deleted rather than marked sent, so the
    /// table stays as small as what is in flight (docs/architecture.md §7.1).
    pub async fn forget_sent(&self, command_ids: &[String]) -> Result<(), EngineError> {
        for chunk in command_ids.chunks(INSERT_CHUNK) {
            outbox::Entity::delete_many()
                .filter(outbox::Column::Id.is_in(chunk.iter().cloned()))
                .exec(&self.db)
                .await
                .map_err(EngineError::db("deleting published outbox commands"))?;
        }
        Ok(())
    }

    /// Empties the outbox: the embedded engine re-sends in-flight attempts from the sagas'
    /// states when it starts, which covers every command there.
    pub async fn clear_outbox(&self) -> Result<u64, EngineError> {
        let result = outbox::Entity::delete_many()
            .exec(&self.db)
            .await
            .map_err(EngineError::db("clearing the outbox"))?;
        Ok(result.rows_affected)
    }
}
