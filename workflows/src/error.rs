//! The crate's error type and how it maps onto step errors.

use sagaflow_sdk::StepError;
use sagaflow_sdk::protocol::codes;
use sea_orm::DbErr;
use thiserror::Error;

use crate::faults::{FaultPoint, Service};

/// What went wrong in a demo service.
///
/// Each variant is either *transient* (retrying the same call may succeed: see
/// [`DemoError::is_retryable`]) or *permanent* (a business refusal that no retry changes). A
/// step handler turns it into a [`StepError`] with the code from [`DemoError::code`].
#[derive(Debug, Error)]
pub enum DemoError {
    /// The database refused or failed a statement.
    #[error(
        "database error while {action}: {source}; check that the database is reachable and that \
         `sagaflow_workflows::install` has run on it"
    )]
    Database {
        /// What the service was doing.
        action: String,
        /// The driver's error.
        #[source]
        source: DbErr,
    },

    /// A fault injected by the [`FaultPlan`](crate::FaultPlan); retrying is safe.
    #[error(
        "injected transient fault in the {service} service ({point}); the call is safe to retry \
         (set the fault plan to FaultPlan::none() to stop injecting)"
    )]
    Injected {
        /// The service that failed.
        service: Service,
        /// Whether the effect was applied before the failure.
        point: FaultPoint,
    },

    /// A fault plan setting is out of range.
    #[error("invalid fault plan: {0}")]
    InvalidFaultPlan(String),

    /// The SKU was never stocked.
    #[error("unknown SKU `{sku}`: stock it first with `seed_stock` or `Inventory::restock`")]
    UnknownSku {
        /// The SKU asked for.
        sku: String,
    },

    /// A quantity of zero (or one too large to store).
    #[error("invalid quantity {quantity} for SKU `{sku}`: order at least 1 unit")]
    InvalidQuantity {
        /// The SKU.
        sku: String,
        /// The quantity asked for.
        quantity: u64,
    },

    /// Not enough available-to-promise stock for a new reservation.
    #[error(
        "out of stock: {requested} of `{sku}` requested, {available} available to promise; \
         restock the SKU or order less"
    )]
    OutOfStock {
        /// The SKU.
        sku: String,
        /// The quantity asked for.
        requested: u64,
        /// Stock on hand minus active reservations at the time of the request.
        available: i64,
    },

    /// The reservation cannot be committed: it expired, was released, or never existed.
    #[error(
        "reservation `{key}` is {state}, not held: the order can no longer be confirmed (reserve \
         again in a new saga)"
    )]
    ReservationNotHeld {
        /// The reservation key.
        key: String,
        /// Its state (`expired`, `released`, `missing`, or the order it belongs to).
        state: String,
    },

    /// A committed reservation cannot be released: the order it belongs to was confirmed.
    #[error(
        "reservation `{key}` is committed to a confirmed order and cannot be released; an operator \
         must decide whether to cancel order `{order_id}`"
    )]
    ReservationCommitted {
        /// The reservation key.
        key: String,
        /// The confirmed order.
        order_id: String,
    },

    /// A reservation or a release sent under an epoch lower than one inventory has already seen
    /// for the saga's partition: the engine node that sent it no longer owns the partition
    /// (`docs/protocol.md` rule 9.7). Nothing was changed; the partition's current owner sends
    /// the step again under its own epoch.
    #[error(
        "partition {partition}: epoch {epoch} is older than epoch {highest}, already seen by \
         inventory; the engine node that sent this request lost ownership of the partition, so \
         nothing was changed (its current owner sends the step again)"
    )]
    StaleEpoch {
        /// The saga's partition.
        partition: u32,
        /// The epoch the request came with.
        epoch: u64,
        /// The highest epoch inventory has seen for the partition.
        highest: u64,
    },

    /// The card was declined (see [`DECLINED_CARD`](crate::DECLINED_CARD)).
    #[error("card ending in {last4} declined for order `{order_id}`: use another card")]
    CardDeclined {
        /// The order.
        order_id: String,
        /// The card's last four digits.
        last4: String,
    },

    /// An amount of zero or less.
    #[error("invalid amount {amount_cents} cents for order `{order_id}`: charge at least 1 cent")]
    InvalidAmount {
        /// The order.
        order_id: String,
        /// The amount asked for.
        amount_cents: i64,
    },

    /// The order already has a live authorization under another idempotency key.
    #[error(
        "order `{order_id}` already has a live authorization `{existing_key}`; void it before \
         charging the order again"
    )]
    AlreadyCharged {
        /// The order.
        order_id: String,
        /// The key of the live authorization.
        existing_key: String,
    },

    /// The order id was confirmed by another saga.
    #[error(
        "order `{order_id}` was already confirmed under key `{existing_key}`; use a new order id"
    )]
    OrderExists {
        /// The order.
        order_id: String,
        /// The confirm key that owns it.
        existing_key: String,
    },

    /// A flight, hotel or car that has nothing left (see [`SOLD_OUT`](crate::SOLD_OUT)).
    #[error("{resource} `{item}` is sold out for trip `{trip_id}`: pick another one")]
    SoldOut {
        /// `flight`, `hotel` or `car`.
        resource: &'static str,
        /// The error code for this resource (`no_seats`, `no_rooms`, `no_cars`).
        code: &'static str,
        /// What was asked for.
        item: String,
        /// The trip.
        trip_id: String,
    },

    /// The trip already has a live booking of this kind under another idempotency key.
    #[error(
        "trip `{trip_id}` already has a live {resource} booking `{existing_key}`; cancel it before \
         booking again"
    )]
    AlreadyBooked {
        /// `flight`, `hotel` or `car`.
        resource: &'static str,
        /// The trip.
        trip_id: String,
        /// The key of the live booking.
        existing_key: String,
    },
}

impl DemoError {
    /// Wraps a database error with what the service was doing.
    pub(crate) fn db(action: impl Into<String>) -> impl FnOnce(DbErr) -> DemoError {
        let action = action.into();
        move |source| DemoError::Database { action, source }
    }

    /// Whether retrying the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DemoError::Database { .. } | DemoError::Injected { .. }
        )
    }

    /// The machine-readable code a step error carries (`out_of_stock`, `card_declined`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            DemoError::Database { .. } => "db_unavailable",
            DemoError::Injected { .. } => "injected_fault",
            DemoError::InvalidFaultPlan(_) => "invalid_fault_plan",
            DemoError::UnknownSku { .. } => "unknown_sku",
            DemoError::InvalidQuantity { .. } => "invalid_quantity",
            DemoError::OutOfStock { .. } => "out_of_stock",
            DemoError::ReservationNotHeld { .. } => "reservation_not_held",
            DemoError::ReservationCommitted { .. } => "reservation_committed",
            DemoError::StaleEpoch { .. } => codes::STALE_EPOCH,
            DemoError::CardDeclined { .. } => "card_declined",
            DemoError::InvalidAmount { .. } => "invalid_amount",
            DemoError::AlreadyCharged { .. } => "already_charged",
            DemoError::OrderExists { .. } => "order_exists",
            DemoError::SoldOut { code, .. } => code,
            DemoError::AlreadyBooked { .. } => "already_booked",
        }
    }
}

impl From<DemoError> for StepError {
    /// Transient service errors become retryable step errors, business refusals permanent ones.
    fn from(error: DemoError) -> Self {
        let code = error.code();
        if error.is_retryable() {
            StepError::retryable(code, error.to_string())
        } else {
            StepError::permanent(code, error.to_string())
        }
    }
}
