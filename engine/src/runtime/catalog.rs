//! The sagas an engine knows: definitions (and, where this process runs them, handlers).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sagaflow_sdk::{Saga, SagaSpec};

use crate::EngineError;

/// Registered sagas by (name, version).
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    sagas: HashMap<(String, u32), Arc<Saga>>,
    latest: BTreeMap<String, u32>,
}

impl Catalog {
    /// A catalog of these sagas.
    pub fn new(sagas: impl IntoIterator<Item = Saga>) -> Self {
        let mut catalog = Catalog::default();
        for saga in sagas {
            catalog.add(saga);
        }
        catalog
    }

    /// Adds a saga; a later version becomes the one new starts use by default.
    pub fn add(&mut self, saga: Saga) {
        let spec = saga.spec();
        let (name, version) = (spec.name.clone(), spec.version);
        let latest = self.latest.entry(name.clone()).or_insert(version);
        *latest = (*latest).max(version);
        self.sagas.insert((name, version), Arc::new(saga));
    }

    /// The saga `name` at `version`, or at its latest version.
    pub fn get(&self, name: &str, version: Option<u32>) -> Result<&Arc<Saga>, EngineError> {
        let version = version.or_else(|| self.latest.get(name).copied());
        version
            .and_then(|v| self.sagas.get(&(name.to_string(), v)))
            .ok_or_else(|| EngineError::UnknownDefinition {
                name: name.to_string(),
                version,
                known: self.known(),
            })
    }

    /// Every registered spec.
    pub fn specs(&self) -> impl Iterator<Item = &SagaSpec> {
        self.sagas.values().map(|s| s.spec())
    }

    fn known(&self) -> String {
        let mut names: Vec<String> = self.sagas.keys().map(|(n, v)| format!("{n}@{v}")).collect();
        names.sort();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }
}
