//! The orders service: the record of confirmed orders.
//!
//! `demo_orders` has one row per order id, written once by the `confirm_order` pivot and keyed
//! by its idempotency key (`confirm_key`, unique): the same key confirms the same order once.

use sagaflow_sdk::Timestamp;
use schemars::JsonSchema;
use sea_orm::{DatabaseConnection, QueryResult};
use serde::{Deserialize, Serialize};

use crate::DemoError;
use crate::db::{self, get, quantity_from, quantity_value};
use crate::faults::{FaultPoint, Faults, Service};

/// What a confirmed order records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderDetails {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub customer: String,
    /// What.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// For how much, in cents.
    pub amount_cents: i64,
    /// The committed stock reservation.
    pub reservation_key: String,
    /// The live card authorization.
    pub authorization_key: String,
}

/// A confirmed order (and the `Output` of the `confirm_order` step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ConfirmedOrder {
    /// The idempotency key that confirmed it.
    pub confirm_key: String,
    /// What was confirmed.
    #[serde(flatten)]
    pub details: OrderDetails,
    /// When.
    pub confirmed_at: Timestamp,
}

/// The orders service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Orders {
    db: DatabaseConnection,
    faults: Faults,
}

const COLUMNS: &str = "order_id, confirm_key, customer, sku, quantity, amount_cents, \
                       reservation_key, authorization_key, confirmed_at";

impl Orders {
    /// The service over `db` (tables from [`install`](crate::install)), failing as `faults`
    /// says.
    pub fn new(db: DatabaseConnection, faults: Faults) -> Self {
        Orders { db, faults }
    }

    /// Records `details` as confirmed under `key`. The same key returns the first
    /// confirmation; an order id confirmed under another key fails with
    /// [`DemoError::OrderExists`].
    pub async fn confirm(
        &self,
        key: &str,
        details: &OrderDetails,
        now: Timestamp,
    ) -> Result<ConfirmedOrder, DemoError> {
        self.faults
            .check(Service::Orders, FaultPoint::BeforeEffect)?;
        db::execute(
            &self.db,
            "confirming an order",
            &format!(
                "INSERT INTO demo_orders ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT DO NOTHING"
            ),
            vec![
                details.order_id.as_str().into(),
                key.into(),
                details.customer.as_str().into(),
                details.sku.as_str().into(),
                quantity_value(details.quantity),
                details.amount_cents.into(),
                details.reservation_key.as_str().into(),
                details.authorization_key.as_str().into(),
                now.as_millis().into(),
            ],
        )
        .await?;
        let stored = self.order(&details.order_id).await?;
        let confirmed = match stored {
            Some(order) if order.confirm_key == key => order,
            Some(order) => {
                return Err(DemoError::OrderExists {
                    order_id: details.order_id.clone(),
                    existing_key: order.confirm_key,
                });
            }
            None => {
                // The insert conflicted on the key, so the key confirmed another order id.
                let other = db::query_one(
                    &self.db,
                    "reading an order",
                    &format!("SELECT {COLUMNS} FROM demo_orders WHERE confirm_key = $1"),
                    vec![key.into()],
                )
                .await?;
                match other {
                    Some(row) => from_row(&row)?,
                    None => {
                        return Err(DemoError::Database {
                            action: "confirming an order".into(),
                            source: sea_orm::DbErr::RecordNotFound(format!(
                                "order `{}` vanished right after it was written",
                                details.order_id
                            )),
                        });
                    }
                }
            }
        };
        self.faults
            .check(Service::Orders, FaultPoint::AfterEffect)?;
        Ok(confirmed)
    }

    /// The confirmed order `order_id`, if any.
    pub async fn order(&self, order_id: &str) -> Result<Option<ConfirmedOrder>, DemoError> {
        let row = db::query_one(
            &self.db,
            "reading an order",
            &format!("SELECT {COLUMNS} FROM demo_orders WHERE order_id = $1"),
            vec![order_id.into()],
        )
        .await?;
        row.as_ref().map(from_row).transpose()
    }
}

pub(crate) fn from_row(row: &QueryResult) -> Result<ConfirmedOrder, DemoError> {
    Ok(ConfirmedOrder {
        confirm_key: get(row, "confirm_key")?,
        details: OrderDetails {
            order_id: get(row, "order_id")?,
            customer: get(row, "customer")?,
            sku: get(row, "sku")?,
            quantity: quantity_from(get(row, "quantity")?),
            amount_cents: get(row, "amount_cents")?,
            reservation_key: get(row, "reservation_key")?,
            authorization_key: get(row, "authorization_key")?,
        },
        confirmed_at: Timestamp(get(row, "confirmed_at")?),
    })
}
