//! The shipping service: shipment requests.
//!
//! `demo_shipments` has one row per idempotency key and at most one per order: asking again
//! for the same order returns the shipment already requested.

use sagaflow_sdk::Timestamp;
use schemars::JsonSchema;
use sea_orm::{DatabaseConnection, QueryResult};
use serde::{Deserialize, Serialize};

use crate::DemoError;
use crate::db::{self, get, quantity_from, quantity_value};
use crate::faults::{FaultPoint, Faults, Service};
use crate::inventory::OrderLine;

/// A shipment request (and the `Output` of the `request_shipment` step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Shipment {
    /// The idempotency key that requested it; also its id.
    pub shipment_key: String,
    /// The order shipped.
    pub order_id: String,
    /// What.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// When it was requested.
    pub requested_at: Timestamp,
}

/// The shipping service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Shipping {
    db: DatabaseConnection,
    faults: Faults,
}

const COLUMNS: &str = "shipment_key, order_id, sku, quantity, requested_at";

impl Shipping {
    /// The service over `db` (tables from [`install`](crate::install)), failing as `faults`
    /// says.
    pub fn new(db: DatabaseConnection, faults: Faults) -> Self {
        Shipping { db, faults }
    }

    /// Requests shipment of `line` under `key`. Idempotent by key, and by order: the order's
    /// existing shipment is returned.
    pub async fn request(
        &self,
        key: &str,
        line: &OrderLine,
        now: Timestamp,
    ) -> Result<Shipment, DemoError> {
        self.faults
            .check(Service::Shipping, FaultPoint::BeforeEffect)?;
        db::execute(
            &self.db,
            "requesting a shipment",
            &format!(
                "INSERT INTO demo_shipments ({COLUMNS}) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT DO NOTHING"
            ),
            vec![
                key.into(),
                line.order_id.as_str().into(),
                line.sku.as_str().into(),
                quantity_value(line.quantity),
                now.as_millis().into(),
            ],
        )
        .await?;
        let by_key = db::query_one(
            &self.db,
            "reading a shipment",
            &format!("SELECT {COLUMNS} FROM demo_shipments WHERE shipment_key = $1"),
            vec![key.into()],
        )
        .await?;
        let shipment = match by_key {
            Some(row) => from_row(&row)?,
            // The insert conflicted on the order: it was shipped under another key.
            None => self
                .shipment(&line.order_id)
                .await?
                .ok_or_else(|| DemoError::Database {
                    action: "requesting a shipment".into(),
                    source: sea_orm::DbErr::RecordNotFound(format!(
                        "the shipment of order `{}` vanished right after it was written",
                        line.order_id
                    )),
                })?,
        };
        self.faults
            .check(Service::Shipping, FaultPoint::AfterEffect)?;
        Ok(shipment)
    }

    /// The shipment of `order_id`, if requested.
    pub async fn shipment(&self, order_id: &str) -> Result<Option<Shipment>, DemoError> {
        let row = db::query_one(
            &self.db,
            "reading a shipment",
            &format!("SELECT {COLUMNS} FROM demo_shipments WHERE order_id = $1"),
            vec![order_id.into()],
        )
        .await?;
        row.as_ref().map(from_row).transpose()
    }
}

pub(crate) fn from_row(row: &QueryResult) -> Result<Shipment, DemoError> {
    Ok(Shipment {
        shipment_key: get(row, "shipment_key")?,
        order_id: get(row, "order_id")?,
        sku: get(row, "sku")?,
        quantity: quantity_from(get(row, "quantity")?),
        requested_at: Timestamp(get(row, "requested_at")?),
    })
}
