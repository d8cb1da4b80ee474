//! The sagas an engine knows: definitions, and handlers where this process runs them.
//!
//! The embedded engine knows every saga with its handlers. A distributed engine knows only
//! definitions: those in its database, and those workers announce over NATS.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use sagaflow_protocol::SagaSpec;
use sagaflow_sdk::Saga;
use tracing::warn;

use crate::EngineError;
use crate::schema::CompiledSchema;

#[derive(Debug, Clone)]
struct Entry {
    spec: Arc<SagaSpec>,
    handlers: Option<Arc<Saga>>,
    /// The first step's input schema, compiled once: every start is checked against it.
    first_input: Option<Arc<CompiledSchema>>,
}

#[derive(Debug, Default)]
struct Entries {
    by_key: HashMap<(String, u32), Entry>,
    latest: BTreeMap<String, u32>,
}

/// Registered sagas by (name, version). Shared between the engine's tasks.
#[derive(Debug, Default)]
pub struct Catalog {
    entries: RwLock<Entries>,
}

impl Catalog {
    /// A catalog of these sagas, handlers included.
    pub fn new(sagas: impl IntoIterator<Item = Saga>) -> Self {
        let catalog = Catalog::default();
        for saga in sagas {
            let spec = Arc::new(saga.spec().clone());
            catalog.insert(spec, Some(Arc::new(saga)));
        }
        catalog
    }

    /// Adds a definition without handlers (they run in workers elsewhere). A definition that
    /// is already known keeps its handlers, and gains the step schemas `spec` adds to it (the
    /// store accepts the same definition announced again with schemas added, and stores that).
    pub fn add_spec(&self, spec: SagaSpec) {
        let known = self
            .entries
            .read()
            .ok()
            .and_then(|e| e.by_key.get(&(spec.name.clone(), spec.version)).cloned());
        match known {
            None => self.insert(Arc::new(spec), None),
            Some(entry) => {
                if let Some(merged) = entry.spec.merge_schemas(&spec)
                    && merged != *entry.spec
                {
                    self.insert(Arc::new(merged), entry.handlers);
                }
            }
        }
    }

    fn insert(&self, spec: Arc<SagaSpec>, handlers: Option<Arc<Saga>>) {
        // A poisoned lock only means another thread panicked mid-insert of a whole entry; the
        // map itself is still consistent, so keep using it.
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let latest = entries
            .latest
            .entry(spec.name.clone())
            .or_insert(spec.version);
        *latest = (*latest).max(spec.version);
        let first_input = first_input_schema(&spec);
        entries.by_key.insert(
            (spec.name.clone(), spec.version),
            Entry {
                spec,
                handlers,
                first_input,
            },
        );
    }

    fn entry(&self, name: &str, version: Option<u32>) -> Result<Entry, EngineError> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let version = version.or_else(|| entries.latest.get(name).copied());
        version
            .and_then(|v| entries.by_key.get(&(name.to_string(), v)).cloned())
            .ok_or_else(|| EngineError::UnknownDefinition {
                name: name.to_string(),
                version,
                known: known(&entries),
            })
    }

    /// The definition of `name` at `version`, or at its latest version.
    pub fn spec(&self, name: &str, version: Option<u32>) -> Result<Arc<SagaSpec>, EngineError> {
        self.entry(name, version).map(|e| e.spec)
    }

    /// The handlers of `name` at `version`, when this process runs them.
    pub fn handlers(&self, name: &str, version: u32) -> Result<Option<Arc<Saga>>, EngineError> {
        self.entry(name, Some(version)).map(|e| e.handlers)
    }

    /// The compiled input schema of the first step of `name` at `version`, if it has one.
    pub(crate) fn first_input_schema(
        &self,
        name: &str,
        version: u32,
    ) -> Result<Option<Arc<CompiledSchema>>, EngineError> {
        self.entry(name, Some(version)).map(|e| e.first_input)
    }

    /// Every known definition.
    pub fn specs(&self) -> Vec<Arc<SagaSpec>> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries.by_key.values().map(|e| e.spec.clone()).collect()
    }
}

fn first_input_schema(spec: &SagaSpec) -> Option<Arc<CompiledSchema>> {
    let schema = spec.steps.first()?.input_schema.as_ref()?;
    // Starts arrive with their secret members sealed.
    match CompiledSchema::new(&crate::schema::sealed_form(schema, &spec.secret_input)) {
        Ok(compiled) => Some(Arc::new(compiled)),
        Err(problem) => {
            // Registration refuses such a schema, so only a definition edited in the database
            // gets here; its starts go unchecked, as for a definition without schemas.
            warn!(saga = %spec.name, version = spec.version, %problem, "the first step's input schema is not usable; starts are not checked against it");
            None
        }
    }
}

fn known(entries: &Entries) -> String {
    let mut names: Vec<String> = entries
        .by_key
        .keys()
        .map(|(n, v)| format!("{n}@{v}"))
        .collect();
    names.sort();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
