//! Operator actions: resume a stuck saga, retry the current step now, skip a step by hand,
//! cancel a saga; one saga at a time ([`act`]) or by filter ([`act_in_bulk`]).
//!
//! An action is the state machine's [`Event::Operator`] applied to the saga as stored, under
//! the definition version it is pinned to, and committed like any transition: conditionally on
//! the version that was read, with its history (the operator and the reason) and the step
//! commands it dispatches written to the outbox in the same transaction. Whatever engine runs
//! (embedded or distributed) picks those commands up from the outbox and sends them to the
//! workers; an engine that had the saga in memory finds its next write stale and re-reads.
//!
//! Nothing is written when the action is refused: the machine refuses what the saga's state
//! does not allow, the output given for a skipped step must fit the step's output schema (as its
//! worker registered it with the definition the saga is pinned to), and a saga that another
//! writer changed since it was read gives [`EngineError::Conflict`].

use std::collections::HashMap;

use sagaflow_protocol::StepCommand;
use sagaflow_protocol::backoff::RandomizedDelays;
use sagaflow_protocol::{Direction, SagaSpec, Timestamp};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::query::{ListFilter, MAX_PAGE, Page, list};
use crate::EngineError;
use crate::machine::{
    Command, Event, Inputs, MachineError, OperatorAction, OperatorCommand, RecordKind, SagaStatus,
    Transition, decide,
};
use crate::runtime::commands::{Route, command_for};
use crate::store::{SagaWrite, Store, StoredSaga, WriteOutcome};
use sagaflow_protocol::names::MAX_OUTPUT_BYTES;

/// How an action is checked and when it happens.
#[derive(Debug, Clone, Default)]
pub struct ActOptions {
    /// Accept a skipped step's output that cannot be checked because the pinned definition has
    /// no output schema for the step (its worker registered none). An output that is checked
    /// and does not fit is refused regardless.
    pub unchecked_output: bool,
    /// When the action happens; the current time when `None` (tests fix it).
    pub at: Option<Timestamp>,
    /// The operator's keys, which seal the secret members of a skipped step's output (checked
    /// in clear against the step's output schema first). Required for such a step.
    pub secret_keys: Option<std::sync::Arc<sagaflow_protocol::SecretKeys>>,
}

/// Whether a skipped step's output was checked against the step's output schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputCheck {
    /// No output was given (not a skip, or the skip of a compensation).
    NoOutput,
    /// It fits the step's output schema.
    Checked,
    /// Accepted without a check (`unchecked_output`).
    Unchecked,
}

/// One attempt an action dispatched, sent to the workers through the outbox.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DispatchedAttempt {
    /// The step.
    pub step: String,
    /// Forward or compensation.
    pub direction: Direction,
    /// The attempt number (attempt numbers keep counting across resumes).
    pub attempt: u32,
    /// The command's id in the outbox (the broker de-duplicates by it).
    pub command_id: String,
    /// When the attempt times out, if the step has a timeout.
    #[serde(serialize_with = "super::time::rfc3339::option::serialize")]
    pub deadline: Option<Timestamp>,
}

/// What an action did (or, for a [`PlannedAct`] not yet committed, would do).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActReport {
    /// The saga.
    pub saga_id: Uuid,
    /// Its definition name.
    pub name: String,
    /// Its pinned definition version.
    pub version: u32,
    /// `resume`, `retry`, `skip` or `cancel`.
    pub action: &'static str,
    /// The step skipped, for a skip.
    pub step: Option<String>,
    /// Who acted, as recorded: `operator:NAME`.
    pub actor: String,
    /// Why, as recorded.
    pub reason: String,
    /// The status before the action.
    pub status_before: SagaStatus,
    /// The status after it.
    pub status: SagaStatus,
    /// Attempts dispatched (written to the outbox with the transition).
    pub dispatched: Vec<DispatchedAttempt>,
    /// How many history records the action appended.
    pub history_records: usize,
    /// The saga's row version after the commit (before it, for a plan).
    pub row_version: i64,
    /// Whether a skipped step's output was checked against its output schema.
    pub output_check: OutputCheck,
}

/// An action decided against the saga as it was read, not written yet. [`PlannedAct::commit`]
/// writes it if the saga has not changed since.
#[derive(Debug, Clone)]
pub struct PlannedAct {
    base: StoredSaga,
    spec: SagaSpec,
    transition: Transition,
    commands: Vec<StepCommand>,
    now: Timestamp,
    report: ActReport,
}

impl PlannedAct {
    /// What the action will do once committed.
    pub fn report(&self) -> &ActReport {
        &self.report
    }

    /// Commits the action: the new state, its history and its step commands (to the outbox),
    /// in one transaction, only if the saga is still at the version it was read at. Otherwise
    /// nothing is written and the answer is [`EngineError::Conflict`].
    pub async fn commit(self, store: &Store) -> Result<ActReport, EngineError> {
        let saga_id = self.report.saga_id;
        let outcomes = store
            .commit(&[SagaWrite {
                spec: &self.spec,
                base: Some(&self.base),
                state: &self.transition.state,
                records: &self.transition.history,
                start_key: None,
                dispatches: &self.commands,
                now: self.now,
            }])
            .await?;
        match outcomes.first() {
            Some(WriteOutcome::Committed { row_version, .. }) => Ok(ActReport {
                row_version: *row_version,
                ..self.report
            }),
            // An unfenced write is never `Fenced`, and an operator creates no saga (so takes
            // no start key); were either so, the saga was not written either.
            Some(WriteOutcome::Stale | WriteOutcome::Fenced | WriteOutcome::StartKeyTaken)
            | None => Err(EngineError::Conflict(saga_id)),
        }
    }
}

/// Applies an operator's action to one saga and commits it (see the module documentation).
///
/// The actor is the operator's name (recorded as `operator:NAME`); both it and the reason must
/// be given. Refusals are [`EngineError::Refused`] with what the state allows instead.
pub async fn act(
    store: &Store,
    saga_id: Uuid,
    command: OperatorCommand,
    options: &ActOptions,
) -> Result<ActReport, EngineError> {
    plan(store, saga_id, command, options)
        .await?
        .commit(store)
        .await
}

/// Decides an operator's action against the saga as stored, without writing anything.
pub async fn plan(
    store: &Store,
    saga_id: Uuid,
    command: OperatorCommand,
    options: &ActOptions,
) -> Result<PlannedAct, EngineError> {
    let stored = store
        .load(saga_id)
        .await?
        .ok_or(EngineError::UnknownSaga(saga_id))?;
    let spec = pinned_definition(store, &stored).await?;
    let route = current_route(store, saga_id).await?;
    plan_loaded(stored, spec, command, route, options)
}

async fn pinned_definition(store: &Store, stored: &StoredSaga) -> Result<SagaSpec, EngineError> {
    let (name, version) = (&stored.state.name, stored.state.version);
    store
        .definition(name, version)
        .await?
        .ok_or_else(|| EngineError::Corrupt {
            saga_id: stored.state.saga_id.to_string(),
            detail: format!("its definition {name}@{version} is not registered"),
        })
}

/// How the machine words each action in a refusal ("cannot {verb} saga ...").
fn refusal_verb(action: &OperatorAction) -> &'static str {
    match action {
        OperatorAction::Resume => "resume",
        OperatorAction::RetryNow => "retry",
        OperatorAction::SkipStep { .. } => "skip a step of",
        OperatorAction::Cancel => "cancel",
    }
}

/// The partition of `saga_id` and the epoch its lease has now: the commands an action
/// dispatches go out through the owner's outbox sweep, under the owner's epoch. (Should the
/// partition change hands before then, workers refuse them as stale and the new owner sends
/// the attempt again.)
async fn current_route(store: &Store, saga_id: Uuid) -> Result<Route, EngineError> {
    let partition = store.partition_of(saga_id);
    let epoch = store
        .partition_lease(partition)
        .await?
        .map_or(0, |lease| lease.epoch);
    Ok(Route { partition, epoch })
}

fn refused(saga_id: Uuid, action: &OperatorAction, why: String) -> EngineError {
    EngineError::Refused(MachineError::Refused {
        saga_id,
        action: refusal_verb(action),
        why,
    })
}

/// The pure part of an action: checks, the machine's decision, the output check, the commands.
fn plan_loaded(
    stored: StoredSaga,
    spec: SagaSpec,
    mut command: OperatorCommand,
    route: Route,
    options: &ActOptions,
) -> Result<PlannedAct, EngineError> {
    let saga_id = stored.state.saga_id;
    let checked_before_sealing = seal_skipped_output(saga_id, &spec, &mut command, options)?;
    let refuse = |why: String| refused(saga_id, &command.action, why);
    if command.reason.trim().is_empty() {
        return Err(refuse(
            "no reason was given; every operator action records why, with who acted".into(),
        ));
    }
    if command.actor.trim().is_empty() {
        return Err(refuse(
            "no operator name was given; every operator action records who acted".into(),
        ));
    }
    let skipped_output = match &command.action {
        OperatorAction::SkipStep { step, output } => Some((step.clone(), output.clone())),
        _ => None,
    };
    if let Some((step, Some(output))) = &skipped_output {
        let size = sagaflow_protocol::json_len(output);
        if size > MAX_OUTPUT_BYTES {
            return Err(EngineError::TooLarge {
                what: format!("the output given for step `{step}`"),
                size,
                limit: MAX_OUTPUT_BYTES,
            });
        }
        let compensating = spec.step_index(step).is_some_and(|index| {
            stored.state.current_step() == Some((index, Direction::Compensate))
        });
        if compensating {
            return Err(refuse(format!(
                "`{step}` is being compensated, and skipping a compensation takes no output; \
                 leave --output out"
            )));
        }
    }

    let now = options.at.unwrap_or_else(Timestamp::now);
    let status_before = stored.state.status;
    let action = command.action.name();
    let actor = format!("operator:{}", command.actor);
    let reason = command.reason.clone();
    let verb_action = command.action.clone();
    let mut transition = decide(
        &stored.state,
        &spec,
        Event::Operator(command),
        Inputs {
            now,
            delays: &mut RandomizedDelays,
        },
    )?;

    // The machine accepted the skip (the step exists and is the current one, forward): now the
    // output must fit what later steps will read.
    let mut output_check = OutputCheck::NoOutput;
    if let Some((step, Some(output))) = &skipped_output {
        output_check = match checked_before_sealing {
            Some(check) => check,
            None => check_output(&spec, step, output, options)
                .map_err(|why| refused(saga_id, &verb_action, why))?,
        };
        if let Some(record) = transition
            .history
            .iter_mut()
            .find(|r| r.kind == RecordKind::OperatorAction)
            && let Value::Object(detail) = &mut record.detail
        {
            detail.insert(
                "output_checked".into(),
                Value::Bool(output_check == OutputCheck::Checked),
            );
        }
    }

    let commands: Vec<StepCommand> = transition
        .commands
        .iter()
        .filter_map(|c| match c {
            Command::Dispatch(dispatch) => {
                Some(command_for(&transition.state, dispatch.clone(), route))
            }
            _ => None,
        })
        .collect();
    let report = ActReport {
        saga_id,
        name: stored.state.name.clone(),
        version: stored.state.version,
        action,
        step: skipped_output.map(|(step, _)| step),
        actor,
        reason,
        status_before,
        status: transition.state.status,
        dispatched: commands
            .iter()
            .map(|c| DispatchedAttempt {
                step: c.step.clone(),
                direction: c.direction,
                attempt: c.attempt,
                command_id: c.command_id.clone(),
                deadline: c.deadline,
            })
            .collect(),
        history_records: transition.history.len(),
        row_version: stored.row_version,
        output_check,
    };
    Ok(PlannedAct {
        base: stored,
        spec,
        transition,
        commands,
        now,
        report,
    })
}

/// Seals the secret members of the output `command` gives a skipped step, after checking the
/// output in clear against the step's schema (the sealed form cannot be checked); the check's
/// result, or `None` when the step has no secret output and nothing was done.
fn seal_skipped_output(
    saga_id: Uuid,
    spec: &SagaSpec,
    command: &mut OperatorCommand,
    options: &ActOptions,
) -> Result<Option<OutputCheck>, EngineError> {
    let action = command.action.clone();
    let OperatorAction::SkipStep {
        step,
        output: Some(output),
    } = &mut command.action
    else {
        return Ok(None);
    };
    let Some(secret) = spec
        .steps
        .iter()
        .find(|s| s.name == *step)
        .map(|s| &s.secret_output)
        .filter(|fields| !fields.is_empty())
    else {
        return Ok(None);
    };
    let refuse = |why: String| refused(saga_id, &action, why);
    let check = check_output(spec, step, output, options).map_err(refuse)?;
    let Some(keys) = &options.secret_keys else {
        return Err(refuse(format!(
            "the output of `{step}` has secret fields ({}), which are stored sealed: give the \
             key file (--secret-keys or SAGAFLOW_SECRET_KEYS_FILE) to seal them",
            secret.join(", ")
        )));
    };
    keys.seal_fields(output, secret)
        .map_err(EngineError::Secret)?;
    Ok(Some(check))
}

/// Checks a skipped step's output against the step's output schema in the pinned definition.
fn check_output(
    pinned: &SagaSpec,
    step: &str,
    output: &Value,
    options: &ActOptions,
) -> Result<OutputCheck, String> {
    let schema = pinned
        .steps
        .iter()
        .find(|s| s.name == step)
        .and_then(|s| s.output_schema.as_ref());
    let Some(schema) = schema else {
        if options.unchecked_output {
            return Ok(OutputCheck::Unchecked);
        }
        return Err(format!(
            "the output of `{step}` cannot be checked: saga {}@{} was registered without an \
             output schema for it (its worker sends none); check the output against what the \
             step returns yourself and pass --unchecked-output to skip anyway",
            pinned.name, pinned.version
        ));
    };
    match crate::schema::violation(schema, output) {
        Ok(None) => Ok(OutputCheck::Checked),
        Ok(Some(violation)) => Err(format!(
            "the output given does not fit what step `{step}` returns{}: {} (at JSON path {})",
            crate::schema::title(schema)
                .map(|title| format!(" ({title})"))
                .unwrap_or_default(),
            violation.problem,
            violation.path
        )),
        // Registration refuses unusable schemas: only a definition edited in the database
        // gets here.
        Err(_) if options.unchecked_output => Ok(OutputCheck::Unchecked),
        Err(problem) => Err(format!(
            "the output of `{step}` cannot be checked: the output schema saga {}@{} has for it \
             is not usable ({problem}); check the output yourself and pass --unchecked-output \
             to skip anyway",
            pinned.name, pinned.version
        )),
    }
}

// ----- bulk -----

/// An action that can be applied to many sagas at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BulkAction {
    /// Resume stuck sagas.
    Resume,
    /// Cancel sagas moving forward before their pivot.
    Cancel,
}

impl BulkAction {
    fn operator_action(self) -> OperatorAction {
        match self {
            BulkAction::Resume => OperatorAction::Resume,
            BulkAction::Cancel => OperatorAction::Cancel,
        }
    }

    /// The statuses selected when a filter names none: those the action can apply to.
    pub fn default_statuses(self) -> Vec<SagaStatus> {
        match self {
            BulkAction::Resume => vec![SagaStatus::Stuck],
            BulkAction::Cancel => vec![SagaStatus::Created, SagaStatus::Running, SagaStatus::Stuck],
        }
    }
}

/// A bulk action: which sagas, what to do, who and why, and whether to do it.
#[derive(Debug, Clone)]
pub struct BulkRequest {
    /// The sagas to act on, as for [`list`]. When it names no status, the action's
    /// [`BulkAction::default_statuses`] are used.
    pub filter: ListFilter,
    /// What to do to each.
    pub action: BulkAction,
    /// Who acts (recorded as `operator:NAME`).
    pub actor: String,
    /// Why.
    pub reason: String,
    /// Act; when false (a dry run), only decide and report what would change.
    pub execute: bool,
}

/// What happened, or would happen, to one saga of a bulk action.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum BulkOutcome {
    /// Dry run: the action is allowed and would move the saga to `status`.
    WouldChange {
        /// The status it would have.
        status: SagaStatus,
    },
    /// The action was committed.
    Changed {
        /// The status it has now.
        status: SagaStatus,
        /// How many attempts it dispatched.
        dispatched: usize,
    },
    /// The saga's state does not allow the action; nothing was changed.
    Refused {
        /// Why.
        message: String,
    },
    /// The action could not be committed (the saga kept changing, or the database failed);
    /// nothing was changed.
    Failed {
        /// What went wrong.
        message: String,
    },
}

/// One saga of a bulk action.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BulkEntry {
    /// The saga.
    pub saga_id: Uuid,
    /// Its definition name.
    pub name: String,
    /// Its pinned definition version.
    pub version: u32,
    /// Its status when it was read.
    pub status_before: SagaStatus,
    /// What happened, or would.
    #[serde(flatten)]
    pub outcome: BulkOutcome,
}

/// The result of [`act_in_bulk`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BulkReport {
    /// The action.
    pub action: BulkAction,
    /// Whether it was carried out (false for a dry run).
    pub executed: bool,
    /// How many sagas the filter matched.
    pub matched: usize,
    /// How many changed (or, in a dry run, would change).
    pub changed: usize,
    /// How many were refused by their state.
    pub refused: usize,
    /// How many failed to commit.
    pub failed: usize,
    /// Each saga, oldest first.
    pub sagas: Vec<BulkEntry>,
}

/// How many times a bulk action re-reads a saga that changed under it before giving up.
const BULK_CONFLICT_TRIES: usize = 3;

/// Resumes or cancels every saga the filter matches; a dry run (`execute: false`) decides each
/// without writing anything. Sagas are acted on one at a time, each in its own transaction, so
/// a refusal or a failure of one leaves the others unaffected. A saga that changes while being
/// acted on is re-read and decided again (a few times) before it counts as failed.
pub async fn act_in_bulk(store: &Store, request: &BulkRequest) -> Result<BulkReport, EngineError> {
    let mut filter = request.filter.clone();
    if filter.statuses.is_empty() {
        filter.statuses = request.action.default_statuses();
    }
    let mut matched = Vec::new();
    let mut page = Page::first(MAX_PAGE);
    loop {
        let found = list(store, &filter, &page).await?;
        matched.extend(found.sagas);
        match found.next {
            Some(next) => page.after = Some(next),
            None => break,
        }
    }
    let command = OperatorCommand {
        actor: request.actor.clone(),
        reason: request.reason.clone(),
        action: request.action.operator_action(),
    };
    let mut definitions: HashMap<(String, u32), SagaSpec> = HashMap::new();
    let mut sagas = Vec::with_capacity(matched.len());
    for summary in matched {
        let mut entry = BulkEntry {
            saga_id: summary.id,
            name: summary.name,
            version: summary.version,
            status_before: summary.status,
            outcome: BulkOutcome::Failed {
                message: String::new(),
            },
        };
        let mut tries = 0;
        entry.outcome = loop {
            tries += 1;
            match bulk_one(
                store,
                &mut definitions,
                &mut entry,
                &command,
                request.execute,
            )
            .await
            {
                Err(EngineError::Conflict(_)) if tries < BULK_CONFLICT_TRIES => continue,
                Err(error @ EngineError::Refused(_)) => {
                    break BulkOutcome::Refused {
                        message: error.to_string(),
                    };
                }
                Err(error) => {
                    break BulkOutcome::Failed {
                        message: error.to_string(),
                    };
                }
                Ok(outcome) => break outcome,
            }
        };
        sagas.push(entry);
    }
    let count = |f: fn(&BulkOutcome) -> bool| sagas.iter().filter(|s| f(&s.outcome)).count();
    Ok(BulkReport {
        action: request.action,
        executed: request.execute,
        matched: sagas.len(),
        changed: count(|o| {
            matches!(
                o,
                BulkOutcome::Changed { .. } | BulkOutcome::WouldChange { .. }
            )
        }),
        refused: count(|o| matches!(o, BulkOutcome::Refused { .. })),
        failed: count(|o| matches!(o, BulkOutcome::Failed { .. })),
        sagas,
    })
}

/// Reads one saga afresh, decides the action, and commits it unless this is a dry run.
async fn bulk_one(
    store: &Store,
    definitions: &mut HashMap<(String, u32), SagaSpec>,
    entry: &mut BulkEntry,
    command: &OperatorCommand,
    execute: bool,
) -> Result<BulkOutcome, EngineError> {
    let stored = store
        .load(entry.saga_id)
        .await?
        .ok_or(EngineError::UnknownSaga(entry.saga_id))?;
    entry.status_before = stored.state.status;
    let key = (stored.state.name.clone(), stored.state.version);
    let spec = match definitions.get(&key) {
        Some(spec) => spec.clone(),
        None => {
            let spec = pinned_definition(store, &stored).await?;
            definitions.insert(key, spec.clone());
            spec
        }
    };
    let route = current_route(store, entry.saga_id).await?;
    let planned = plan_loaded(stored, spec, command.clone(), route, &ActOptions::default())?;
    if !execute {
        return Ok(BulkOutcome::WouldChange {
            status: planned.report().status,
        });
    }
    let report = planned.commit(store).await?;
    Ok(BulkOutcome::Changed {
        status: report.status,
        dispatched: report.dispatched.len(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sagaflow_sdk::{Saga, Step, StepContext, StepError, StepHandler};
    use serde_json::{Value, json};

    use super::*;

    struct Count;

    impl StepHandler for Count {
        type Input = Value;
        type Output = u32;

        async fn execute(&self, _ctx: &StepContext, _input: Value) -> Result<u32, StepError> {
            Ok(1)
        }
    }

    fn saga(timeout: Duration) -> Saga {
        Saga::builder("counting", 1)
            .step(Step::pivot("count", Count).timeout(timeout))
            .build()
            .expect("valid saga")
    }

    fn options(unchecked_output: bool) -> ActOptions {
        ActOptions {
            unchecked_output,
            ..ActOptions::default()
        }
    }

    /// Issues a token: its output's `token` member is declared secret by hand.
    struct Issue;

    impl StepHandler for Issue {
        type Input = Value;
        type Output = Value;

        async fn execute(&self, _ctx: &StepContext, _input: Value) -> Result<Value, StepError> {
            Ok(json!({"token": "tok"}))
        }
    }

    fn skip(step: &str, output: Value) -> OperatorCommand {
        OperatorCommand {
            actor: "ada".into(),
            reason: "done by hand".into(),
            action: OperatorAction::SkipStep {
                step: step.into(),
                output: Some(output),
            },
        }
    }

    #[test]
    fn a_skipped_steps_secret_output_is_checked_in_clear_then_sealed_with_the_operators_key() {
        use sagaflow_protocol::SecretKeys;
        use sagaflow_protocol::sealed::is_envelope;

        let pinned = Saga::builder("tokens", 1)
            .step(Step::pivot("issue", Issue).secret_output("token"))
            .build()
            .expect("valid saga")
            .spec()
            .clone();
        let line = SecretKeys::generate_line("op-1").expect("a key");
        let keys = std::sync::Arc::new(SecretKeys::parse(&line, "test").expect("parses"));
        let with_keys = ActOptions {
            secret_keys: Some(keys.clone()),
            ..ActOptions::default()
        };
        let mut command = skip("issue", json!({"token": "tok-7", "n": 1}));
        let check = seal_skipped_output(Uuid::nil(), &pinned, &mut command, &with_keys);
        assert_eq!(check.expect("sealed"), Some(OutputCheck::Checked));
        let OperatorAction::SkipStep {
            output: Some(output),
            ..
        } = &command.action
        else {
            panic!("the skip lost its output");
        };
        assert!(is_envelope(&output["token"]), "{output}");
        assert_eq!(output["n"], 1, "other members stay in clear");
        assert_eq!(
            keys.open("token", &output["token"]).expect("opens"),
            "tok-7"
        );

        // Without keys it is refused, naming the secret members; nothing is sealed.
        let mut command = skip("issue", json!({"token": "tok-7"}));
        let refused =
            seal_skipped_output(Uuid::nil(), &pinned, &mut command, &ActOptions::default())
                .expect_err("refused without keys")
                .to_string();
        assert!(
            refused.contains("secret fields (token)") && refused.contains("--secret-keys"),
            "{refused}"
        );
        assert_eq!(command, skip("issue", json!({"token": "tok-7"})));

        // A step without secret members is left to the usual check.
        let plain = saga(Duration::from_secs(5)).spec().clone();
        let mut command = skip("count", json!(3));
        let check = seal_skipped_output(Uuid::nil(), &plain, &mut command, &with_keys);
        assert_eq!(check.expect("nothing to do"), None);
    }

    #[test]
    fn outputs_are_checked_against_the_step_output_schema() {
        let pinned = saga(Duration::from_secs(5)).spec().clone();
        assert_eq!(
            check_output(&pinned, "count", &json!(3), &options(false)),
            Ok(OutputCheck::Checked)
        );
        let misfit = check_output(&pinned, "count", &json!("three"), &options(true)).expect_err(
            "a checked output that does not fit is refused, even if unchecked is allowed",
        );
        assert!(
            misfit.contains("does not fit what step `count` returns (uint32)")
                && misfit.contains("\"three\" is not of type \"integer\"")
                && misfit.contains("at JSON path /"),
            "{misfit}"
        );

        // A definition registered without schemas (an older worker, another language):
        // refused unless the operator says so.
        let plain = pinned.without_schemas();
        let error = check_output(&plain, "count", &json!(3), &options(false)).expect_err("refused");
        assert!(
            error.contains("counting@1 was registered without an output schema")
                && error.contains("--unchecked-output"),
            "{error}"
        );
        assert_eq!(
            check_output(&plain, "count", &json!("anything"), &options(true)),
            Ok(OutputCheck::Unchecked)
        );
    }
}
