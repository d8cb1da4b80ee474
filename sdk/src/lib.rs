//! # Sagaflow SDK
//!
//! Declare sagas and write their step handlers in Rust. A saga is an ordered list of steps; each
//! step has a forward action and, when it is *compensatable*, a compensation that undoes it. One
//! step may be the *pivot* (the go/no-go point); the steps after it are *retriable*: never
//! compensated, retried until they succeed or an operator steps in. When a step before the pivot
//! fails for good, the engine compensates every completed step in reverse order.
//!
//! Handlers are typed: a step reads its `Input` from the saga's input JSON (only the fields it
//! declares) and returns an `Output` that the engine records, hands to later steps
//! ([`StepContext::output`]) and gives back to the step's compensation. Every attempt carries an
//! idempotency key that stays the same across retries and redeliveries, so the resource behind a
//! step can apply its effect at most once.
//!
//! Step types also derive [`JsonSchema`] (from the `schemars` crate, re-exported as
//! [`schemars`]): the definition a worker registers carries the JSON Schema of every step's
//! `Input` and `Output`, so the engine can check a saga's input when it starts and an output an
//! operator gives by hand, without the step's code. Derive it next to `Deserialize`; without a
//! `schemars` dependency of your own, add `#[schemars(crate = "sagaflow_sdk::schemars")]`.
//!
//! ```
//! use std::time::Duration;
//!
//! use sagaflow_sdk::{
//!     Compensate, Direction, RetryPolicy, Saga, Step, StepContext, StepError, StepHandler,
//!     StepRequest,
//! };
//! use schemars::JsonSchema;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize, JsonSchema)]
//! struct Order {
//!     sku: String,
//!     quantity: u32,
//! }
//!
//! #[derive(Serialize, Deserialize, JsonSchema)]
//! struct Reservation {
//!     reservation_id: String,
//! }
//!
//! struct ReserveStock;
//!
//! impl StepHandler for ReserveStock {
//!     type Input = Order;
//!     type Output = Reservation;
//!
//!     async fn execute(&self, ctx: &StepContext, order: Order) -> Result<Reservation, StepError> {
//!         if order.quantity == 0 {
//!             return Err(StepError::permanent("empty_order", "nothing to reserve"));
//!         }
//!         // A real handler passes ctx.idempotency_key to the inventory service.
//!         Ok(Reservation { reservation_id: format!("{}/{}", ctx.idempotency_key, order.sku) })
//!     }
//! }
//!
//! impl Compensate for ReserveStock {
//!     async fn compensate(
//!         &self,
//!         _ctx: &StepContext,
//!         _order: Order,
//!         _reservation: Option<Reservation>,
//!     ) -> Result<(), StepError> {
//!         Ok(()) // release the reservation, keyed by ctx.forward_key
//!     }
//! }
//!
//! struct ConfirmOrder;
//!
//! impl StepHandler for ConfirmOrder {
//!     type Input = serde_json::Value;
//!     type Output = ();
//!
//!     async fn execute(&self, ctx: &StepContext, _input: serde_json::Value) -> Result<(), StepError> {
//!         let reservation: Reservation = ctx.output("reserve_stock")?;
//!         assert!(!reservation.reservation_id.is_empty());
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let saga = Saga::builder("place_order", 1)
//!     .step(
//!         Step::compensatable("reserve_stock", ReserveStock)
//!             .retry(RetryPolicy::builder().max_attempts(3).non_retryable("empty_order").build()?)
//!             .timeout(Duration::from_secs(5)),
//!     )
//!     .step(Step::pivot("confirm_order", ConfirmOrder))
//!     .deadline(Duration::from_secs(60))
//!     .build()?;
//!
//! // The engine refuses a start whose input fits no step's `Input` type.
//! assert!(saga.validate_input(&serde_json::json!({"sku": "A-1"})).is_err());
//! // The definition carries the types as JSON Schema, for engines that do not run the handlers.
//! let schema = saga.spec().steps[0].input_schema.as_ref().expect("derived");
//! assert_eq!(schema["required"], serde_json::json!(["sku", "quantity"]));
//!
//! // Runtimes run one attempt like this; workflow authors normally never call it.
//! let saga_id = uuid::Uuid::now_v7();
//! let ctx = sagaflow_sdk::StepContext {
//!     saga_id,
//!     saga_name: "place_order".into(),
//!     step: "reserve_stock".into(),
//!     direction: Direction::Forward,
//!     attempt: 1,
//!     idempotency_key: StepContext::key_for(saga_id, "reserve_stock", Direction::Forward),
//!     forward_key: StepContext::key_for(saga_id, "reserve_stock", Direction::Forward),
//!     deadline: None,
//!     outputs: Default::default(),
//!     partition: 0,
//!     epoch: 1,
//! };
//! let input = serde_json::json!({"sku": "A-1", "quantity": 2});
//! let output = saga.run(StepRequest { step: 0, ctx, input, output: None }).await?;
//! assert!(output["reservation_id"].as_str().unwrap().ends_with("/A-1"));
//! # Ok(())
//! # }
//! ```
//!
//! The engine (`sagaflow-engine`) runs sagas declared this way, embedded in one process or with
//! workers over NATS.

mod error;
mod handler;
mod json;
#[cfg(feature = "keys")]
pub mod keys;
pub mod metrics;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "process")]
pub mod process;
mod saga;
mod secret;
pub mod telemetry;
#[cfg(feature = "worker")]
pub mod worker;

/// The wire protocol between the engine and workers (`docs/protocol.md`), for runtimes and
/// workers that speak it by hand.
pub use sagaflow_protocol as protocol;

pub use error::SdkError;
pub use handler::{Compensate, StepContext, StepHandler};
pub use saga::{DEFAULT_STEP_TIMEOUT, Saga, SagaBuilder, Step, StepRequest, schema_of};
pub use sagaflow_protocol::{
    Direction, ErrorClass, RetryPolicy, RetryPolicyBuilder, SagaSpec, SecretKeys, StepError,
    StepKind, StepSpec, Timestamp, database_url,
};
/// JSON Schema generation for step types: derive [`JsonSchema`] on each `Input` and `Output`.
pub use schemars;
pub use schemars::JsonSchema;
pub use secret::{SECRET_KEYWORD, Secret};
