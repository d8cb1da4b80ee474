//! Test harness: real SQLite files and real PostgreSQL databases, plus a minimal saga runner
//! that drives handlers through `Saga::run` the way an engine would.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sagaflow_sdk::{Direction, Saga, StepContext, StepError, StepKind, StepRequest};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use serde_json::Value;
use uuid::Uuid;

/// Runs `body` against a fresh SQLite file with the demo tables installed.
pub async fn on_sqlite<F, Fut>(body: F)
where
    F: FnOnce(DatabaseConnection) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("demo.sqlite");
    let mut options = ConnectOptions::new(format!("sqlite://{}?mode=rwc", path.display()));
    // Several connections, as an engine might configure, so writers really contend.
    options.max_connections(4).sqlx_logging(false);
    let db = Database::connect(options).await.expect("open sqlite file");
    sagaflow_workflows::install(&db).await.expect("install");
    sagaflow_workflows::install(&db)
        .await
        .expect("install twice");
    let result = tokio::spawn(body(db.clone())).await;
    db.close().await.expect("close sqlite");
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

fn admin_url() -> String {
    std::env::var("SAGAFLOW_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "sagaflow_wf_{}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `body` against a fresh PostgreSQL database with the demo tables installed, dropped
/// afterwards (also when `body` panics).
pub async fn on_postgres<F, Fut>(body: F)
where
    F: FnOnce(DatabaseConnection) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admin_url = admin_url();
    let mut admin_options = ConnectOptions::new(admin_url.clone());
    admin_options.max_connections(1).sqlx_logging(false);
    let admin = Database::connect(admin_options)
        .await
        .expect("connect to PostgreSQL (set SAGAFLOW_TEST_PG to its URL)");
    let name = unique_name();
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    let url = match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("PostgreSQL URL without a database: {admin_url}"),
    };
    let mut options = ConnectOptions::new(url);
    options.max_connections(8).sqlx_logging(false);
    let db = Database::connect(options)
        .await
        .expect("connect to test db");
    sagaflow_workflows::install(&db).await.expect("install");
    sagaflow_workflows::install(&db)
        .await
        .expect("install twice");
    let result = tokio::spawn(body(db.clone())).await;
    db.close().await.expect("close test db");
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .expect("drop test database");
    admin.close().await.expect("close admin connection");
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Declares each scenario `async fn name(db: DatabaseConnection)` as two tests, one per
/// backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    $crate::common::on_sqlite(super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    $crate::common::on_postgres(super::$name).await;
                }
            )*
        }
    };
}

/// A context for one attempt of `step` in `direction`.
pub fn context(
    saga: &Saga,
    saga_id: Uuid,
    step: &str,
    direction: Direction,
    attempt: u32,
    outputs: &BTreeMap<String, Value>,
) -> StepContext {
    StepContext {
        saga_id,
        saga_name: saga.spec().name.clone(),
        step: step.to_string(),
        direction,
        attempt,
        idempotency_key: StepContext::key_for(saga_id, step, direction),
        forward_key: StepContext::key_for(saga_id, step, Direction::Forward),
        deadline: None,
        outputs: Arc::new(outputs.clone()),
        partition: 0,
        epoch: 1,
    }
}

/// How a saga ended under [`run_saga`].
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every step succeeded; the outputs by step.
    Completed(BTreeMap<String, Value>),
    /// A step failed for good and the completed ones were compensated.
    Compensated { step: String, error: StepError },
    /// A compensation (or a step after the pivot) failed for good.
    Stuck { step: String, error: StepError },
}

impl Outcome {
    pub fn failed_code(&self) -> Option<&str> {
        match self {
            Outcome::Completed(_) => None,
            Outcome::Compensated { error, .. } | Outcome::Stuck { error, .. } => {
                Some(error.code.as_str())
            }
        }
    }
}

/// Runs one step in `direction` with its retry policy (1 ms between attempts; at most 50
/// attempts for unlimited policies) and returns the last result.
async fn attempt_step(
    saga: &Saga,
    saga_id: Uuid,
    index: usize,
    direction: Direction,
    input: &Value,
    outputs: &BTreeMap<String, Value>,
    output: Option<Value>,
) -> Result<Value, StepError> {
    let spec = &saga.spec().steps[index];
    let policy = match direction {
        Direction::Forward => &spec.retry,
        Direction::Compensate => &spec.compensation_retry,
    };
    let mut attempt = 1;
    loop {
        let ctx = context(saga, saga_id, &spec.name, direction, attempt, outputs);
        let request = StepRequest {
            step: index,
            ctx,
            input: input.clone(),
            output: output.clone(),
        };
        match saga.run(request).await {
            Ok(value) => return Ok(value),
            Err(error)
                if error.is_retryable()
                    && policy.retries_code(&error.code)
                    && policy.allows_attempt_after(attempt)
                    && attempt < 50 =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Runs a saga to its end the way an engine would, in one task: forward steps in order,
/// retried by their policies; on a permanent failure before the pivot, the completed steps
/// (and the failed one, when its last attempt was retryable so its outcome is unknown) are
/// compensated in reverse order.
pub async fn run_saga(saga: &Saga, input: &Value) -> Outcome {
    let saga_id = Uuid::now_v7();
    let mut outputs = BTreeMap::new();
    let steps = &saga.spec().steps;
    for (index, spec) in steps.iter().enumerate() {
        match attempt_step(
            saga,
            saga_id,
            index,
            Direction::Forward,
            input,
            &outputs,
            None,
        )
        .await
        {
            Ok(value) => {
                outputs.insert(spec.name.clone(), value);
            }
            Err(error) if spec.kind == StepKind::Retriable => {
                return Outcome::Stuck {
                    step: spec.name.clone(),
                    error,
                };
            }
            Err(error) => {
                let unknown = error.is_retryable() && spec.kind == StepKind::Compensatable;
                let mut to_undo: Vec<(usize, Option<Value>)> = steps[..index]
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.kind == StepKind::Compensatable)
                    .map(|(i, s)| (i, outputs.get(&s.name).cloned()))
                    .collect();
                if unknown {
                    to_undo.push((index, None));
                }
                for (i, output) in to_undo.into_iter().rev() {
                    if let Err(comp_error) = attempt_step(
                        saga,
                        saga_id,
                        i,
                        Direction::Compensate,
                        input,
                        &outputs,
                        output,
                    )
                    .await
                    {
                        return Outcome::Stuck {
                            step: steps[i].name.clone(),
                            error: comp_error,
                        };
                    }
                }
                return Outcome::Compensated {
                    step: spec.name.clone(),
                    error,
                };
            }
        }
    }
    Outcome::Completed(outputs)
}
