//! How secret fields are shown: as `«secret»` ([`Disclosure::Redacted`], what every view shows
//! unless told otherwise) or opened with the operator's keys ([`Disclosure::Revealed`],
//! `--reveal`).
//!
//! The store holds secret fields as envelopes (`docs/protocol.md` section 17); the views read
//! them as stored, and the CLI passes each view through [`Disclose::disclose`] before printing.

use std::sync::Arc;

use sagaflow_protocol::SecretKeys;
use sagaflow_protocol::sealed::{holds_envelope, redact_in_place};
use serde_json::Value;

use super::{AuditEntry, AuditPage, HistoryView, SagaDetail};
use crate::store::HistoryEntry;

/// Whether secret fields are shown.
#[derive(Debug, Clone, Default)]
pub enum Disclosure {
    /// Every envelope shows as `«secret»`.
    #[default]
    Redacted,
    /// Envelopes these keys open show their value; others show as `«secret»`.
    Revealed(Arc<SecretKeys>),
}

impl Disclosure {
    /// Applies the disclosure to `value` in place.
    pub fn apply(&self, value: &mut Value) {
        if !holds_envelope(value) {
            return;
        }
        match self {
            Disclosure::Redacted => redact_in_place(value),
            Disclosure::Revealed(keys) => *value = keys.reveal(value),
        }
    }
}

/// A view whose secret fields can be shown one way or the other.
pub trait Disclose {
    /// The view with its envelopes shown as `how` says.
    fn disclose(self, how: &Disclosure) -> Self;
}

impl Disclose for SagaDetail {
    fn disclose(mut self, how: &Disclosure) -> Self {
        how.apply(&mut self.input);
        for step in &mut self.steps {
            if let Some(output) = &mut step.output {
                how.apply(output);
            }
        }
        self
    }
}

impl<X> Disclose for HistoryEntry<X> {
    fn disclose(mut self, how: &Disclosure) -> Self {
        how.apply(&mut self.detail);
        self
    }
}

impl Disclose for HistoryView {
    fn disclose(mut self, how: &Disclosure) -> Self {
        self.entries = self.entries.into_iter().map(|e| e.disclose(how)).collect();
        self
    }
}

impl Disclose for AuditPage {
    fn disclose(mut self, how: &Disclosure) -> Self {
        self.entries = self
            .entries
            .into_iter()
            .map(|e: AuditEntry| e.disclose(how))
            .collect();
        self
    }
}
