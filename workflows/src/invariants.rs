//! Invariant checks over the demo services' tables.
//!
//! What must hold whatever crashed, retried or was redelivered:
//!
//! - **Stock is conserved.** Per SKU, the `reserved` counter equals the quantities of its
//!   `held` and `committed` reservations, and `0 <= reserved <= total` (available-to-promise is
//!   never negative).
//! - **Reservations match orders.** A `committed` reservation belongs to a confirmed order, a
//!   confirmed order's reservation is `committed`, and no confirmed order points at a
//!   `released` or `expired` reservation.
//! - **Nobody is charged twice.** At most one live authorization per order and one row per
//!   idempotency key; every confirmed order has a live authorization.
//! - **Outcomes are whole.** For each saga the caller says was compensated: no confirmed order,
//!   no held or committed reservation, no live authorization, no shipment. For each completed
//!   one: order confirmed, reservation committed, authorization live, shipment requested.
//!   Likewise for trips: all three bookings live, or none.
//!
//! Held reservations of sagas in neither list are not violations: they are in flight, or will
//! expire.

use std::collections::{BTreeMap, BTreeSet};

use sea_orm::{
    AccessMode, ConnectionTrait, DatabaseConnection, DbBackend, IsolationLevel, TransactionTrait,
};

use crate::DemoError;
use crate::bookings::{self, BookingState, Resource};
use crate::db::{self, get};
use crate::inventory::{self, Reservation, ReservationState};
use crate::orders::{self, ConfirmedOrder};
use crate::payment::{self, Authorization, AuthorizationState};
use crate::shipping;

/// How the caller saw sagas end, by order id and trip id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SagaOutcomes {
    /// `place_order` sagas that completed.
    pub completed_orders: Vec<String>,
    /// `place_order` sagas that were compensated.
    pub compensated_orders: Vec<String>,
    /// `book_trip` sagas that completed.
    pub completed_trips: Vec<String>,
    /// `book_trip` sagas that were compensated.
    pub compensated_trips: Vec<String>,
}

/// What [`check_invariants`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvariantReport {
    /// SKUs stocked.
    pub skus: usize,
    /// Reservations by state.
    pub reservations: BTreeMap<String, usize>,
    /// Authorizations by state.
    pub authorizations: BTreeMap<String, usize>,
    /// Confirmed orders.
    pub orders_confirmed: usize,
    /// Shipment requests.
    pub shipments: usize,
    /// Trip bookings by resource and state (`flight/booked`, ...).
    pub bookings: BTreeMap<String, usize>,
    /// Sagas whose outcome was checked (completed plus compensated, orders plus trips).
    pub sagas_checked: usize,
    /// Every broken invariant, one sentence each.
    pub violations: Vec<String>,
}

impl InvariantReport {
    /// Whether every invariant holds.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl std::fmt::Display for InvariantReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        writeln!(
            f,
            "skus={} orders_confirmed={} shipments={} sagas_checked={}",
            self.skus, self.orders_confirmed, self.shipments, self.sagas_checked
        )?;
        writeln!(f, "reservations: {}", counts(&self.reservations))?;
        writeln!(f, "authorizations: {}", counts(&self.authorizations))?;
        writeln!(f, "bookings: {}", counts(&self.bookings))?;
        if self.is_ok() {
            write!(f, "all invariants hold")
        } else {
            write!(f, "{} violation(s):", self.violations.len())?;
            for v in &self.violations {
                write!(f, "\n  - {v}")?;
            }
            Ok(())
        }
    }
}

struct Snapshot {
    stock: Vec<(String, i64, i64)>,
    reservations: Vec<Reservation>,
    authorizations: Vec<Authorization>,
    orders: Vec<ConfirmedOrder>,
    shipped: BTreeSet<String>,
    bookings: Vec<(Resource, bookings::Booking)>,
}

async fn read_snapshot(conn: &impl ConnectionTrait) -> Result<Snapshot, DemoError> {
    let action = "reading the demo tables";
    let all = |sql: &'static str| db::query_all(conn, action, sql, vec![]);
    let mut stock = Vec::new();
    for row in all("SELECT sku, total, reserved FROM demo_stock").await? {
        stock.push((
            get(&row, "sku")?,
            get(&row, "total")?,
            get(&row, "reserved")?,
        ));
    }
    let reservations = all(
        "SELECT reservation_key, order_id, sku, quantity, state, expires_at FROM demo_reservations",
    )
    .await?
    .iter()
    .map(inventory::from_row)
    .collect::<Result<_, _>>()?;
    let authorizations = all(
        "SELECT authorization_key, order_id, amount_cents, card_last4, state \
         FROM demo_authorizations",
    )
    .await?
    .iter()
    .map(payment::from_row)
    .collect::<Result<_, _>>()?;
    let orders = all(
        "SELECT order_id, confirm_key, customer, sku, quantity, amount_cents, reservation_key, \
         authorization_key, confirmed_at FROM demo_orders",
    )
    .await?
    .iter()
    .map(orders::from_row)
    .collect::<Result<_, _>>()?;
    let shipped =
        all("SELECT shipment_key, order_id, sku, quantity, requested_at FROM demo_shipments")
            .await?
            .iter()
            .map(|row| shipping::from_row(row).map(|s| s.order_id))
            .collect::<Result<_, _>>()?;
    let mut bookings = Vec::new();
    for resource in Resource::ALL {
        let sql = format!(
            "SELECT booking_key, trip_id, item, state FROM {}",
            resource.table()
        );
        for row in db::query_all(conn, action, &sql, vec![]).await? {
            bookings.push((resource, bookings::from_row(&row)?));
        }
    }
    Ok(Snapshot {
        stock,
        reservations,
        authorizations,
        orders,
        shipped,
        bookings,
    })
}

/// Checks every invariant over the demo tables in `db`, given how the caller saw sagas end.
///
/// Reads one consistent snapshot (a repeatable-read transaction on PostgreSQL, a read
/// transaction on SQLite), so it can run while sagas are in flight. Fails only when the tables
/// cannot be read; broken invariants are listed in the report.
pub async fn check_invariants(
    db: &DatabaseConnection,
    outcomes: &SagaOutcomes,
) -> Result<InvariantReport, DemoError> {
    let action = "starting a snapshot of the demo tables";
    let txn = if db.get_database_backend() == DbBackend::Postgres {
        db.begin_with_config(
            Some(IsolationLevel::RepeatableRead),
            Some(AccessMode::ReadOnly),
        )
        .await
    } else {
        db.begin().await
    }
    .map_err(DemoError::db(action))?;
    let snapshot = read_snapshot(&txn).await?;
    db::commit(txn, "ending the snapshot").await?;
    Ok(evaluate(&snapshot, outcomes))
}

fn evaluate(s: &Snapshot, outcomes: &SagaOutcomes) -> InvariantReport {
    let mut report = InvariantReport {
        skus: s.stock.len(),
        orders_confirmed: s.orders.len(),
        shipments: s.shipped.len(),
        sagas_checked: outcomes.completed_orders.len()
            + outcomes.compensated_orders.len()
            + outcomes.completed_trips.len()
            + outcomes.compensated_trips.len(),
        ..InvariantReport::default()
    };
    let v = &mut report.violations;

    // Stock conserved.
    let mut promised: BTreeMap<&str, i64> = BTreeMap::new();
    for r in &s.reservations {
        *report
            .reservations
            .entry(r.state.as_str().to_string())
            .or_default() += 1;
        if matches!(
            r.state,
            ReservationState::Held | ReservationState::Committed
        ) {
            *promised.entry(r.sku.as_str()).or_default() += i64::from(r.quantity);
        }
    }
    let stocked: BTreeSet<&str> = s.stock.iter().map(|(sku, _, _)| sku.as_str()).collect();
    for (sku, total, reserved) in &s.stock {
        let sum = promised.get(sku.as_str()).copied().unwrap_or(0);
        if *reserved != sum {
            v.push(format!(
                "sku `{sku}`: reserved counter is {reserved} but its held and committed \
                 reservations add up to {sum}"
            ));
        }
        if *reserved < 0 || reserved > total {
            v.push(format!(
                "sku `{sku}`: available-to-promise is negative or above stock \
                 (total {total}, reserved {reserved})"
            ));
        }
    }
    for (sku, sum) in &promised {
        if !stocked.contains(sku) && *sum > 0 {
            v.push(format!(
                "sku `{sku}` has {sum} units reserved but is not stocked"
            ));
        }
    }

    // Reservations match orders.
    let order_by_reservation: BTreeMap<&str, &ConfirmedOrder> = s
        .orders
        .iter()
        .map(|o| (o.details.reservation_key.as_str(), o))
        .collect();
    let reservation_by_key: BTreeMap<&str, &Reservation> = s
        .reservations
        .iter()
        .map(|r| (r.reservation_key.as_str(), r))
        .collect();
    for r in &s.reservations {
        let order = order_by_reservation.get(r.reservation_key.as_str());
        match (r.state, order) {
            (ReservationState::Committed, None) => v.push(format!(
                "reservation `{}` of order `{}` is committed but no confirmed order uses it",
                r.reservation_key, r.order_id
            )),
            (ReservationState::Released | ReservationState::Expired, Some(o)) => v.push(format!(
                "reservation `{}` is {} but confirmed order `{}` uses it",
                r.reservation_key, r.state, o.details.order_id
            )),
            _ => {}
        }
    }

    // Nobody charged twice.
    let mut live_by_order: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut rows_by_key: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &s.authorizations {
        *report
            .authorizations
            .entry(a.state.as_str().to_string())
            .or_default() += 1;
        *rows_by_key.entry(a.authorization_key.as_str()).or_default() += 1;
        if a.state == AuthorizationState::Authorized {
            live_by_order
                .entry(a.order_id.as_str())
                .or_default()
                .push(a.authorization_key.as_str());
        }
    }
    for (order_id, keys) in &live_by_order {
        if keys.len() > 1 {
            v.push(format!(
                "order `{order_id}` is charged {} times: live authorizations {}",
                keys.len(),
                keys.join(", ")
            ));
        }
    }
    for (key, rows) in &rows_by_key {
        if *rows > 1 {
            v.push(format!("authorization key `{key}` has {rows} rows"));
        }
    }
    let auth_by_key: BTreeMap<&str, &Authorization> = s
        .authorizations
        .iter()
        .map(|a| (a.authorization_key.as_str(), a))
        .collect();
    for o in &s.orders {
        let d = &o.details;
        match reservation_by_key.get(d.reservation_key.as_str()) {
            Some(r) if r.state == ReservationState::Committed => {}
            Some(r) => v.push(format!(
                "confirmed order `{}` has reservation `{}` in state {}, not committed",
                d.order_id, d.reservation_key, r.state
            )),
            None => v.push(format!(
                "confirmed order `{}` has no reservation `{}`",
                d.order_id, d.reservation_key
            )),
        }
        match auth_by_key.get(d.authorization_key.as_str()) {
            Some(a) if a.state == AuthorizationState::Authorized => {}
            _ => v.push(format!(
                "confirmed order `{}` has no live authorization `{}`",
                d.order_id, d.authorization_key
            )),
        }
    }

    // Outcomes of place_order sagas.
    let confirmed: BTreeSet<&str> = s
        .orders
        .iter()
        .map(|o| o.details.order_id.as_str())
        .collect();
    for order_id in &outcomes.compensated_orders {
        let id = order_id.as_str();
        if confirmed.contains(id) {
            v.push(format!("compensated order `{id}` is confirmed"));
        }
        for r in s.reservations.iter().filter(|r| r.order_id == id) {
            if matches!(
                r.state,
                ReservationState::Held | ReservationState::Committed
            ) {
                v.push(format!(
                    "compensated order `{id}` still has reservation `{}` {}",
                    r.reservation_key, r.state
                ));
            }
        }
        if live_by_order.contains_key(id) {
            v.push(format!(
                "compensated order `{id}` still has a live authorization"
            ));
        }
        if s.shipped.contains(id) {
            v.push(format!("compensated order `{id}` has a shipment request"));
        }
    }
    for order_id in &outcomes.completed_orders {
        let id = order_id.as_str();
        if !confirmed.contains(id) {
            v.push(format!("completed order `{id}` is not confirmed"));
        }
        // Its reservation and authorization were checked with the confirmed orders above.
        if !s.shipped.contains(id) {
            v.push(format!("completed order `{id}` has no shipment request"));
        }
    }

    // Trips: at most one live booking per trip and resource; outcomes whole.
    let mut live: BTreeMap<(Resource, &str), usize> = BTreeMap::new();
    for (resource, b) in &s.bookings {
        *report
            .bookings
            .entry(format!("{}/{}", resource.noun(), b.state.as_str()))
            .or_default() += 1;
        if b.state == BookingState::Booked {
            *live.entry((*resource, b.trip_id.as_str())).or_default() += 1;
        }
    }
    for ((resource, trip_id), count) in &live {
        if *count > 1 {
            v.push(format!(
                "trip `{trip_id}` has {count} live {} bookings",
                resource.noun()
            ));
        }
    }
    for trip_id in &outcomes.completed_trips {
        for resource in Resource::ALL {
            if !live.contains_key(&(resource, trip_id.as_str())) {
                v.push(format!(
                    "completed trip `{trip_id}` has no live {} booking",
                    resource.noun()
                ));
            }
        }
    }
    for trip_id in &outcomes.compensated_trips {
        for resource in Resource::ALL {
            if live.contains_key(&(resource, trip_id.as_str())) {
                v.push(format!(
                    "compensated trip `{trip_id}` still has a live {} booking",
                    resource.noun()
                ));
            }
        }
    }
    report
}
