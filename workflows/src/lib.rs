//! # Sagaflow example workflows
//!
//! Two sagas with demo services that keep their effects in their own tables (all prefixed
//! `demo_`), on SQLite or PostgreSQL through one [`sea_orm::DatabaseConnection`]:
//!
//! - [`place_order_saga`] (`place_order` v1): `reserve_inventory` → `authorize_payment` →
//!   `confirm_order` (pivot) → `request_shipment`. Inventory holds stock with an expiry,
//!   payment is decoupled, and a declined card releases the reservation.
//! - [`book_trip_saga`] (`book_trip` v1): `book_flight` → `book_hotel` → `book_car`, all
//!   compensatable, no pivot.
//!
//! Every service applies its effect at most once per idempotency key and undoes it by the
//! forward step's key, idempotently, even when the forward outcome is unknown (a tombstone then
//! stops a late forward call from taking effect). [`Faults`] injects transient errors before or
//! after the effect; business refusals follow from the input ([`DECLINED_CARD`],
//! [`SOLD_OUT`]). [`check_invariants`] checks the tables afterwards.
//!
//! ```no_run
//! # async fn demo(db: sea_orm::DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
//! use sagaflow_workflows::*;
//!
//! install(&db).await?;
//! seed_stock(&db, &[("SKU-1", 100), ("SKU-2", 100), ("SKU-3", 100)]).await?;
//! let faults = Faults::new(FaultPlan::uniform(0.1, 0.05)?, 42);
//! let services = OrderServices::new(&db, &faults);
//! let saga = place_order_saga(&services)?; // register it with the engine
//! let orders = generate_orders(&OrderMix::default()); // start one saga per order.to_json()
//! // ... once the sagas have ended:
//! let report = check_invariants(&db, &SagaOutcomes::default()).await?;
//! assert!(report.is_ok(), "{report}");
//! # let _ = (saga, orders);
//! # Ok(())
//! # }
//! ```

mod bookings;
mod db;
mod demo;
mod error;
mod faults;
mod invariants;
mod inventory;
mod orders;
mod payment;
mod place_order;
mod schema;
mod shipping;
mod trip;

pub use bookings::{
    Booking, BookingRequest, BookingState, Bookings, CancelOutcome, Resource, SOLD_OUT, is_sold_out,
};
pub use demo::{
    DEMO_STOCK, OrderMix, TripMix, generate_orders, generate_trips, seed_stock, seed_stock_once,
};
pub use error::DemoError;
pub use faults::{FaultPlan, FaultPoint, Faults, Service, ServiceFaults};
pub use invariants::{InvariantReport, SagaOutcomes, check_invariants};
pub use inventory::{
    DEFAULT_HOLD, Fencing, Inventory, OrderLine, RESERVATIONS_METRIC, ReleaseOutcome, Reservation,
    ReservationState, StockLevel, describe_metrics,
};
pub use orders::{ConfirmedOrder, OrderDetails, Orders};
pub use payment::{
    Authorization, AuthorizationState, Charge, DECLINED_CARD, GOOD_CARD, Payment, VoidOutcome,
    is_declined,
};
pub use place_order::{
    OrderServices, PLACE_ORDER, PLACE_ORDER_VERSION, PlaceOrder, STEP_TIMEOUT, compensation_retry,
    forward_retry, place_order_saga,
};
pub use schema::install;
pub use shipping::{Shipment, Shipping};
pub use trip::{BOOK_TRIP, BOOK_TRIP_VERSION, BookTrip, TripServices, book_trip_saga};
