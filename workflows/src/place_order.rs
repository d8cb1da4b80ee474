//! The `place_order` saga: reserve stock, authorize payment, confirm (pivot), ship.
//!
//! | step                | kind          | effect                          | compensation          |
//! |---------------------|---------------|---------------------------------|-----------------------|
//! | `reserve_inventory` | compensatable | hold stock until expiry         | release the hold      |
//! | `authorize_payment` | compensatable | authorize the card              | void the authorization|
//! | `confirm_order`     | pivot         | commit the hold, record order   | (none)                |
//! | `request_shipment`  | retriable     | record a shipment request       | (none)                |
//!
//! Inventory owns the reservations, payment is decoupled from it: when the card is declined
//! the engine compensates by releasing the reservation. Every effect is keyed by the step's
//! idempotency key, and every compensation by the forward step's key.

use std::time::Duration;

use sagaflow_sdk::{
    Compensate, RetryPolicy, Saga, SdkError, Secret, Step, StepContext, StepError, StepHandler,
    Timestamp,
};
use schemars::JsonSchema;
use sea_orm::DatabaseConnection;
use serde::{Deserialize, Serialize};

use crate::faults::Faults;
use crate::inventory::{Fencing, Inventory, OrderLine, Reservation};
use crate::orders::{ConfirmedOrder, OrderDetails, Orders};
use crate::payment::{Authorization, Charge, Payment};
use crate::shipping::{Shipment, Shipping};

/// The saga's name.
pub const PLACE_ORDER: &str = "place_order";
/// The saga's definition version.
/// Version 2 made `card` a secret field.
pub const PLACE_ORDER_VERSION: u32 = 2;

/// The input of a `place_order` saga.
///
/// A card whose digits end in `0002` (see [`DECLINED_CARD`](crate::DECLINED_CARD)) is
/// declined, which makes the saga compensate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PlaceOrder {
    /// Unique per order; a second saga for the same order id is refused payment.
    pub order_id: String,
    /// Who orders.
    pub customer: String,
    /// What (must be stocked, see [`seed_stock`](crate::seed_stock)).
    pub sku: String,
    /// How many (at least 1).
    pub quantity: u32,
    /// For how much, in cents (at least 1).
    pub amount_cents: i64,
    /// The card to charge: a secret field, sealed where the saga starts and opened only by
    /// the workers that hold the key.
    pub card: Secret<String>,
}

impl PlaceOrder {
    /// The saga input as JSON, as the engine takes it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "order_id": self.order_id,
            "customer": self.customer,
            "sku": self.sku,
            "quantity": self.quantity,
            "amount_cents": self.amount_cents,
            "card": self.card,
        })
    }

    /// The order line inventory and shipping need.
    pub fn line(&self) -> OrderLine {
        OrderLine {
            order_id: self.order_id.clone(),
            sku: self.sku.clone(),
            quantity: self.quantity,
        }
    }
}

/// The services the `place_order` steps call. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OrderServices {
    /// Stock and reservations.
    pub inventory: Inventory,
    /// Card authorizations.
    pub payment: Payment,
    /// Confirmed orders.
    pub orders: Orders,
    /// Shipment requests.
    pub shipping: Shipping,
}

impl OrderServices {
    /// All four services over `db`, sharing `faults`.
    pub fn new(db: &DatabaseConnection, faults: &Faults) -> Self {
        OrderServices {
            inventory: Inventory::new(db.clone(), faults.clone()),
            payment: Payment::new(db.clone(), faults.clone()),
            orders: Orders::new(db.clone(), faults.clone()),
            shipping: Shipping::new(db.clone(), faults.clone()),
        }
    }

    /// Holds reservations for `hold_for` instead of [`DEFAULT_HOLD`](crate::DEFAULT_HOLD).
    pub fn with_hold_for(mut self, hold_for: Duration) -> Self {
        self.inventory = self.inventory.with_hold_for(hold_for);
        self
    }
}

/// Forward retries: fast, for a demo (20 ms doubling to 500 ms, 5 attempts).
pub fn forward_retry() -> Result<RetryPolicy, SdkError> {
    Ok(RetryPolicy::builder()
        .initial_interval(Duration::from_millis(20))
        .multiplier(2.0)
        .max_interval(Duration::from_millis(500))
        .max_attempts(5)
        .jitter(0.2)
        .build()?)
}

/// Compensation retries: like [`forward_retry`] with 8 attempts, since a compensation that
/// gives up leaves the saga stuck.
pub fn compensation_retry() -> Result<RetryPolicy, SdkError> {
    Ok(RetryPolicy::builder()
        .initial_interval(Duration::from_millis(20))
        .multiplier(2.0)
        .max_interval(Duration::from_millis(500))
        .max_attempts(8)
        .jitter(0.2)
        .build()?)
}

/// The pivot's retries: 10 attempts. Giving up on a pivot whose outcome is unknown leaves the
/// saga stuck (its committed reservation cannot be released), so it gets more tries.
fn pivot_retry() -> Result<RetryPolicy, SdkError> {
    Ok(RetryPolicy::builder()
        .initial_interval(Duration::from_millis(20))
        .multiplier(2.0)
        .max_interval(Duration::from_millis(500))
        .max_attempts(10)
        .jitter(0.2)
        .build()?)
}

/// After the pivot: retried until it succeeds (or an operator steps in).
fn retriable_retry() -> Result<RetryPolicy, SdkError> {
    Ok(RetryPolicy::builder()
        .initial_interval(Duration::from_millis(20))
        .multiplier(2.0)
        .max_interval(Duration::from_millis(500))
        .unlimited_attempts()
        .jitter(0.2)
        .build()?)
}

/// The per-attempt timeout of every step.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// The `place_order` saga (version 2) with handlers calling `services`.
pub fn place_order_saga(services: &OrderServices) -> Result<Saga, SdkError> {
    Saga::builder(PLACE_ORDER, PLACE_ORDER_VERSION)
        .step(
            Step::compensatable(
                "reserve_inventory",
                ReserveInventory(services.inventory.clone()),
            )
            .retry(forward_retry()?)
            .compensation_retry(compensation_retry()?)
            .timeout(STEP_TIMEOUT),
        )
        .step(
            Step::compensatable(
                "authorize_payment",
                AuthorizePayment(services.payment.clone()),
            )
            .retry(forward_retry()?)
            .compensation_retry(compensation_retry()?)
            .timeout(STEP_TIMEOUT),
        )
        .step(
            Step::pivot(
                "confirm_order",
                ConfirmOrder {
                    inventory: services.inventory.clone(),
                    orders: services.orders.clone(),
                },
            )
            .retry(pivot_retry()?)
            .timeout(STEP_TIMEOUT),
        )
        .step(
            Step::retriable(
                "request_shipment",
                RequestShipment(services.shipping.clone()),
            )
            .retry(retriable_retry()?)
            .timeout(STEP_TIMEOUT),
        )
        .build()
}

/// `reserve_inventory`: holds stock for the order. Inventory checks the attempt's fencing epoch
/// itself, so a reservation (or a release) from an engine node that lost the saga's partition is
/// refused with a permanent `stale_epoch` error even by a worker that has not seen the newer
/// epoch yet.
struct ReserveInventory(Inventory);

impl StepHandler for ReserveInventory {
    type Input = OrderLine;
    type Output = Reservation;

    async fn execute(&self, ctx: &StepContext, line: OrderLine) -> Result<Reservation, StepError> {
        Ok(self
            .0
            .reserve(
                &ctx.idempotency_key,
                &line,
                Fencing::of(ctx),
                Timestamp::now(),
            )
            .await?)
    }
}

impl Compensate for ReserveInventory {
    async fn compensate(
        &self,
        ctx: &StepContext,
        line: OrderLine,
        _output: Option<Reservation>,
    ) -> Result<(), StepError> {
        self.0
            .release(&ctx.forward_key, &line, Fencing::of(ctx), Timestamp::now())
            .await?;
        Ok(())
    }
}

/// `authorize_payment`: authorizes the card.
struct AuthorizePayment(Payment);

impl StepHandler for AuthorizePayment {
    type Input = Charge;
    type Output = Authorization;

    async fn execute(&self, ctx: &StepContext, charge: Charge) -> Result<Authorization, StepError> {
        Ok(self
            .0
            .authorize(&ctx.idempotency_key, &charge, Timestamp::now())
            .await?)
    }
}

impl Compensate for AuthorizePayment {
    async fn compensate(
        &self,
        ctx: &StepContext,
        charge: Charge,
        _output: Option<Authorization>,
    ) -> Result<(), StepError> {
        self.0
            .void(&ctx.forward_key, &charge.order_id, Timestamp::now())
            .await?;
        Ok(())
    }
}

/// `confirm_order` (pivot): commits the reservation, then records the order.
struct ConfirmOrder {
    inventory: Inventory,
    orders: Orders,
}

impl StepHandler for ConfirmOrder {
    type Input = PlaceOrder;
    type Output = ConfirmedOrder;

    async fn execute(
        &self,
        ctx: &StepContext,
        order: PlaceOrder,
    ) -> Result<ConfirmedOrder, StepError> {
        let reservation: Reservation = ctx.output("reserve_inventory")?;
        let authorization: Authorization = ctx.output("authorize_payment")?;
        let now = Timestamp::now();
        // Commit first: it is the only part that can be refused (the hold expired). Both
        // calls are idempotent, so a retry after either one is safe.
        self.inventory
            .commit(&reservation.reservation_key, &order.order_id, now)
            .await?;
        let details = OrderDetails {
            order_id: order.order_id,
            customer: order.customer,
            sku: order.sku,
            quantity: order.quantity,
            amount_cents: order.amount_cents,
            reservation_key: reservation.reservation_key,
            authorization_key: authorization.authorization_key,
        };
        Ok(self
            .orders
            .confirm(&ctx.idempotency_key, &details, now)
            .await?)
    }
}

/// `request_shipment` (retriable): asks shipping to send the order.
struct RequestShipment(Shipping);

impl StepHandler for RequestShipment {
    type Input = OrderLine;
    type Output = Shipment;

    async fn execute(&self, ctx: &StepContext, line: OrderLine) -> Result<Shipment, StepError> {
        Ok(self
            .0
            .request(&ctx.idempotency_key, &line, Timestamp::now())
            .await?)
    }
}
