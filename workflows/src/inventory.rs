//! The inventory service: stock levels and reservations with an expiry.
//!
//! Inventory owns three tables:
//!
//! - `demo_stock(sku, total, reserved)`: `total` is the stock on hand and stays fixed (except
//!   by [`Inventory::restock`]); `reserved` is the sum of the quantities of `held` and
//!   `committed` reservations. Available-to-promise is `total - reserved`, and a `CHECK`
//!   constraint keeps `0 <= reserved <= total`.
//! - `demo_reservations`: one row per idempotency key, in state `held` (until it expires),
//!   `committed` (its order was confirmed), `released` (compensated) or `expired`.
//! - `demo_inventory_epochs(partition_id, epoch)`: the highest fencing epoch inventory has seen
//!   per saga partition (`docs/protocol.md` rule 9.7). A reservation or a release carries the
//!   [`Fencing`] of the step that asks for it; one whose epoch is lower than the highest seen for
//!   its partition comes from an engine node that lost the partition, and is refused with
//!   [`DemoError::StaleEpoch`] without changing anything. The check raises the highest and runs
//!   in the transaction of the change it guards, whose row lock makes a request under a higher
//!   epoch wait for it: once a higher epoch is committed, nothing under a lower one lands.
//!
//! Every change to the reservations of a SKU first locks that SKU's stock row (a no-op
//! `UPDATE`), so per SKU there is a single writer at a time, on PostgreSQL and SQLite alike; the
//! reservation itself is taken with a conditional `UPDATE ... WHERE total - reserved >= qty`, so
//! available-to-promise never goes below zero.

use std::time::Duration;

use sagaflow_sdk::{StepContext, Timestamp};
use schemars::JsonSchema;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, QueryResult};
use serde::{Deserialize, Serialize};

use crate::DemoError;
use crate::db::{self, get, quantity_from, quantity_value};
use crate::faults::{FaultPoint, Faults, Service};

/// How long a reservation is held unless configured otherwise.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(10 * 60);

/// The life cycle of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    /// Counts against stock until it expires.
    Held,
    /// Its order was confirmed: the stock is promised for good.
    Committed,
    /// Released by a compensation (or a tombstone written before any reservation existed).
    Released,
    /// Released by the inventory service because it outlived its hold.
    Expired,
}

impl ReservationState {
    /// The name stored in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationState::Held => "held",
            ReservationState::Committed => "committed",
            ReservationState::Released => "released",
            ReservationState::Expired => "expired",
        }
    }

    pub(crate) fn parse(stored: &str) -> Result<Self, DemoError> {
        match stored {
            "held" => Ok(ReservationState::Held),
            "committed" => Ok(ReservationState::Committed),
            "released" => Ok(ReservationState::Released),
            "expired" => Ok(ReservationState::Expired),
            other => Err(DemoError::Database {
                action: "reading a reservation".into(),
                source: DbErr::Custom(format!(
                    "unknown reservation state `{other}` in demo_reservations"
                )),
            }),
        }
    }
}

impl std::fmt::Display for ReservationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an order asks of inventory (and the `Input` of the `reserve_inventory` step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderLine {
    /// The order.
    pub order_id: String,
    /// What to reserve.
    pub sku: String,
    /// How many units.
    pub quantity: u32,
}

/// A stock reservation (and the `Output` of the `reserve_inventory` step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Reservation {
    /// The idempotency key that created it; also its id.
    pub reservation_key: String,
    /// The order it is for.
    pub order_id: String,
    /// The SKU.
    pub sku: String,
    /// Units reserved (0 for a tombstone).
    pub quantity: u32,
    /// Where it stands.
    pub state: ReservationState,
    /// When a `held` reservation stops counting against stock.
    pub expires_at: Timestamp,
}

/// Who asks for a reservation or a release: the partition of the saga it is for, and the
/// fencing epoch under which the engine node owning that partition sent the step (the step's
/// [`StepContext::partition`] and [`StepContext::epoch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fencing {
    /// The saga's partition.
    pub partition: u32,
    /// The epoch the step was sent under; epochs only grow per partition.
    pub epoch: u64,
}

impl Fencing {
    /// The fencing of the attempt `ctx` serves.
    pub fn of(ctx: &StepContext) -> Self {
        Fencing {
            partition: ctx.partition,
            epoch: ctx.epoch,
        }
    }
}

impl From<&StepContext> for Fencing {
    fn from(ctx: &StepContext) -> Self {
        Fencing::of(ctx)
    }
}

/// A SKU's stock row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StockLevel {
    /// Stock on hand.
    pub total: i64,
    /// Units in held or committed reservations.
    pub reserved: i64,
}

/// What [`Inventory::release`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// A held reservation was released; its stock is available again.
    Released,
    /// The reservation was already released or expired: nothing to do.
    AlreadyReleased,
    /// No reservation existed for the key; a tombstone now stops a late reservation with the
    /// same key from taking stock.
    NotFound,
}

/// The inventory service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Inventory {
    db: DatabaseConnection,
    faults: Faults,
    hold_for: Duration,
}

const COLUMNS: &str = "reservation_key, order_id, sku, quantity, state, expires_at";

impl Inventory {
    /// The service over `db` (tables from [`install`](crate::install)), failing as `faults`
    /// says, holding reservations for [`DEFAULT_HOLD`].
    pub fn new(db: DatabaseConnection, faults: Faults) -> Self {
        Inventory {
            db,
            faults,
            hold_for: DEFAULT_HOLD,
        }
    }

    /// Holds new reservations for `hold_for` instead.
    pub fn with_hold_for(mut self, hold_for: Duration) -> Self {
        self.hold_for = hold_for;
        self
    }

    /// How long new reservations are held.
    pub fn hold_for(&self) -> Duration {
        self.hold_for
    }

    /// Adds `quantity` units of `sku` to stock on hand, creating the SKU if needed.
    pub async fn restock(&self, sku: &str, quantity: u32) -> Result<(), DemoError> {
        db::execute(
            &self.db,
            "restocking",
            "INSERT INTO demo_stock (sku, total, reserved) VALUES ($1, $2, 0) \
             ON CONFLICT (sku) DO UPDATE SET total = demo_stock.total + excluded.total",
            vec![sku.into(), quantity_value(quantity)],
        )
        .await
        .map(drop)
    }

    /// Reserves `line.quantity` units of `line.sku` under `key` until `now + hold_for`, for a
    /// step sent under `fencing`.
    ///
    /// The same key always returns the same reservation, whatever its state now. A reservation
    /// that does not fit in available-to-promise fails with [`DemoError::OutOfStock`].
    /// Reservations of the SKU held past their expiry are expired first, so they do not count.
    /// A request whose epoch is lower than one already seen for its partition fails with
    /// [`DemoError::StaleEpoch`] and changes nothing, not even for a key already reserved.
    pub async fn reserve(
        &self,
        key: &str,
        line: &OrderLine,
        fencing: Fencing,
        now: Timestamp,
    ) -> Result<Reservation, DemoError> {
        if line.quantity == 0 {
            return Err(DemoError::InvalidQuantity {
                sku: line.sku.clone(),
                quantity: 0,
            });
        }
        self.faults
            .check(Service::Inventory, FaultPoint::BeforeEffect)?;
        let action = "reserving stock";
        let txn = db::begin_write(&self.db, action).await?;
        let stocked = lock_sku(&txn, &line.sku).await?;
        // Before anything else is decided: a stale request learns nothing and changes nothing
        // (dropping the transaction rolls it back).
        check_fencing(&txn, fencing).await?;
        if !stocked {
            return Err(DemoError::UnknownSku {
                sku: line.sku.clone(),
            });
        }
        if let Some(existing) = find(&txn, key).await? {
            db::commit(txn, action).await?;
            self.faults
                .check(Service::Inventory, FaultPoint::AfterEffect)?;
            return Ok(existing);
        }
        let expired = expire_held(&txn, &line.sku, now).await?;
        let quantity = quantity_value(line.quantity);
        let taken = db::execute(
            &txn,
            action,
            "UPDATE demo_stock SET reserved = reserved + $1 WHERE sku = $2 AND total - reserved >= $1",
            vec![quantity.clone(), line.sku.as_str().into()],
        )
        .await?;
        if taken == 0 {
            let level = stock_level(&txn, &line.sku).await?;
            // Keep the expiries done above; they are right regardless of this request.
            db::commit(txn, action).await?;
            count_reservations(ReservationEvent::Expired, expired);
            return Err(DemoError::OutOfStock {
                sku: line.sku.clone(),
                requested: u64::from(line.quantity),
                available: level.map_or(0, |l| l.total - l.reserved),
            });
        }
        let reservation = Reservation {
            reservation_key: key.to_string(),
            order_id: line.order_id.clone(),
            sku: line.sku.clone(),
            quantity: line.quantity,
            state: ReservationState::Held,
            expires_at: now.plus(self.hold_for),
        };
        insert(&txn, &reservation, now).await?;
        db::commit(txn, action).await?;
        count_reservations(ReservationEvent::Expired, expired);
        count_reservations(ReservationEvent::Created, 1);
        self.faults
            .check(Service::Inventory, FaultPoint::AfterEffect)?;
        Ok(reservation)
    }

    /// Releases the reservation made under `key` (the forward step's key), for a compensation
    /// sent under `fencing`. Idempotent: releasing an unknown, released or expired reservation
    /// succeeds. `line` names the SKU and order for the tombstone written when no reservation
    /// exists yet. A committed reservation is refused with [`DemoError::ReservationCommitted`].
    /// A request whose epoch is lower than one already seen for its partition fails with
    /// [`DemoError::StaleEpoch`] and changes nothing (no release, no tombstone).
    pub async fn release(
        &self,
        key: &str,
        line: &OrderLine,
        fencing: Fencing,
        now: Timestamp,
    ) -> Result<ReleaseOutcome, DemoError> {
        self.faults
            .check(Service::Inventory, FaultPoint::BeforeEffect)?;
        let action = "releasing a reservation";
        // The SKU of a reservation never changes, so it can be read before taking the lock.
        let sku = match find(&self.db, key).await? {
            Some(existing) => existing.sku,
            None => line.sku.clone(),
        };
        let txn = db::begin_write(&self.db, action).await?;
        let stocked = lock_sku(&txn, &sku).await?;
        check_fencing(&txn, fencing).await?;
        if !stocked {
            // No such SKU: no reservation can ever exist for it.
            db::commit(txn, action).await?;
            return Ok(ReleaseOutcome::NotFound);
        }
        let outcome = match find(&txn, key).await? {
            None => {
                let tombstone = Reservation {
                    reservation_key: key.to_string(),
                    order_id: line.order_id.clone(),
                    sku,
                    quantity: 0,
                    state: ReservationState::Released,
                    expires_at: now,
                };
                insert(&txn, &tombstone, now).await?;
                ReleaseOutcome::NotFound
            }
            Some(r) if r.state == ReservationState::Held => {
                set_state(&txn, &r, ReservationState::Released, now).await?;
                ReleaseOutcome::Released
            }
            Some(r) if r.state == ReservationState::Committed => {
                return Err(DemoError::ReservationCommitted {
                    key: key.to_string(),
                    order_id: r.order_id,
                });
            }
            Some(_) => ReleaseOutcome::AlreadyReleased,
        };
        db::commit(txn, action).await?;
        if outcome == ReleaseOutcome::Released {
            count_reservations(ReservationEvent::Released, 1);
        }
        self.faults
            .check(Service::Inventory, FaultPoint::AfterEffect)?;
        Ok(outcome)
    }

    /// Commits the held reservation `key` to `order_id`: the stock is promised for good.
    /// Idempotent. A reservation that expired (by `now`), was released, belongs to another
    /// order or does not exist fails with [`DemoError::ReservationNotHeld`].
    pub async fn commit(
        &self,
        key: &str,
        order_id: &str,
        now: Timestamp,
    ) -> Result<Reservation, DemoError> {
        self.faults
            .check(Service::Inventory, FaultPoint::BeforeEffect)?;
        let action = "committing a reservation";
        let not_held = |state: String| DemoError::ReservationNotHeld {
            key: key.to_string(),
            state,
        };
        let Some(existing) = find(&self.db, key).await? else {
            return Err(not_held("missing".into()));
        };
        let txn = db::begin_write(&self.db, action).await?;
        lock_sku(&txn, &existing.sku).await?;
        let mut reservation = find(&txn, key)
            .await?
            .ok_or_else(|| not_held("missing".into()))?;
        if reservation.order_id != order_id {
            return Err(not_held(format!(
                "held for order `{}`",
                reservation.order_id
            )));
        }
        let confirmed = match reservation.state {
            ReservationState::Held if reservation.expires_at > now => {
                set_state(&txn, &reservation, ReservationState::Committed, now).await?;
                reservation.state = ReservationState::Committed;
                true
            }
            ReservationState::Held => {
                let expired = expire_held(&txn, &reservation.sku, now).await?;
                db::commit(txn, action).await?;
                count_reservations(ReservationEvent::Expired, expired);
                return Err(not_held(ReservationState::Expired.to_string()));
            }
            ReservationState::Committed => false,
            other => return Err(not_held(other.to_string())),
        };
        db::commit(txn, action).await?;
        if confirmed {
            count_reservations(ReservationEvent::Confirmed, 1);
        }
        self.faults
            .check(Service::Inventory, FaultPoint::AfterEffect)?;
        Ok(reservation)
    }

    /// Expires every reservation held past its expiry at `now` and returns how many. Meant to
    /// be called periodically (reservations also expire lazily when their SKU is reserved).
    pub async fn release_expired(&self, now: Timestamp) -> Result<u64, DemoError> {
        let action = "releasing expired reservations";
        let rows = db::query_all(
            &self.db,
            action,
            "SELECT DISTINCT sku FROM demo_reservations WHERE state = 'held' AND expires_at <= $1",
            vec![now.as_millis().into()],
        )
        .await?;
        let mut expired = 0;
        for row in rows {
            let sku: String = get(&row, "sku")?;
            let txn = db::begin_write(&self.db, action).await?;
            lock_sku(&txn, &sku).await?;
            let expired_here = expire_held(&txn, &sku, now).await?;
            db::commit(txn, action).await?;
            count_reservations(ReservationEvent::Expired, expired_here);
            expired += expired_here;
        }
        if expired > 0 {
            tracing::debug!(expired, "released expired reservations");
        }
        Ok(expired)
    }

    /// Available-to-promise of `sku` at `now`: stock on hand minus committed reservations and
    /// held reservations that have not expired by `now`.
    pub async fn available(&self, sku: &str, now: Timestamp) -> Result<i64, DemoError> {
        let level = stock_level(&self.db, sku)
            .await?
            .ok_or_else(|| DemoError::UnknownSku {
                sku: sku.to_string(),
            })?;
        let rows = db::query_all(
            &self.db,
            "computing available-to-promise",
            "SELECT quantity, state, expires_at FROM demo_reservations \
             WHERE sku = $1 AND state IN ('held', 'committed')",
            vec![sku.into()],
        )
        .await?;
        let mut promised = 0;
        for row in rows {
            let state: String = get(&row, "state")?;
            let expires_at: i64 = get(&row, "expires_at")?;
            if state == "committed" || expires_at > now.as_millis() {
                promised += get::<i64>(&row, "quantity")?;
            }
        }
        Ok(level.total - promised)
    }

    /// The stock row of `sku`, if stocked.
    pub async fn stock(&self, sku: &str) -> Result<Option<StockLevel>, DemoError> {
        stock_level(&self.db, sku).await
    }

    /// The reservation made under `key`, if any.
    pub async fn reservation(&self, key: &str) -> Result<Option<Reservation>, DemoError> {
        find(&self.db, key).await
    }
}

/// Raises the highest epoch seen for `fencing.partition` to `fencing.epoch`, and refuses the
/// request with [`DemoError::StaleEpoch`] when a higher one was seen before. In the caller's
/// transaction, after its SKU lock (always in that order, so two requests cannot deadlock on
/// the two): the partition's row stays locked until the caller commits or rolls back, so a
/// request under a higher epoch waits for it, and a lower one that comes later is refused.
async fn check_fencing(conn: &impl ConnectionTrait, fencing: Fencing) -> Result<(), DemoError> {
    let action = "checking the fencing epoch";
    let greatest = match conn.get_database_backend() {
        DbBackend::Postgres => "GREATEST",
        _ => "MAX",
    };
    // Epochs start at 1 and grow by one per change of owner: far below i64::MAX.
    let stored = i64::try_from(fencing.epoch).unwrap_or(i64::MAX);
    let row = db::query_one(
        conn,
        action,
        &format!(
            "INSERT INTO demo_inventory_epochs (partition_id, epoch) VALUES ($1, $2) \
             ON CONFLICT (partition_id) DO UPDATE \
             SET epoch = {greatest}(demo_inventory_epochs.epoch, excluded.epoch) \
             RETURNING epoch"
        ),
        vec![i64::from(fencing.partition).into(), stored.into()],
    )
    .await?
    .ok_or_else(|| DemoError::Database {
        action: action.into(),
        source: DbErr::Custom(format!(
            "recording the epoch of partition {} returned no row",
            fencing.partition
        )),
    })?;
    let highest = u64::try_from(get::<i64>(&row, "epoch")?).unwrap_or(0);
    if fencing.epoch < highest {
        return Err(DemoError::StaleEpoch {
            partition: fencing.partition,
            epoch: fencing.epoch,
            highest,
        });
    }
    Ok(())
}

/// Takes the per-SKU write lock; false when the SKU is not stocked.
async fn lock_sku(conn: &impl ConnectionTrait, sku: &str) -> Result<bool, DemoError> {
    let locked = db::execute(
        conn,
        "locking a SKU",
        "UPDATE demo_stock SET reserved = reserved WHERE sku = $1",
        vec![sku.into()],
    )
    .await?;
    Ok(locked > 0)
}

async fn stock_level(
    conn: &impl ConnectionTrait,
    sku: &str,
) -> Result<Option<StockLevel>, DemoError> {
    let row = db::query_one(
        conn,
        "reading a stock level",
        "SELECT total, reserved FROM demo_stock WHERE sku = $1",
        vec![sku.into()],
    )
    .await?;
    row.map(|row| {
        Ok(StockLevel {
            total: get(&row, "total")?,
            reserved: get(&row, "reserved")?,
        })
    })
    .transpose()
}

pub(crate) fn from_row(row: &QueryResult) -> Result<Reservation, DemoError> {
    Ok(Reservation {
        reservation_key: get(row, "reservation_key")?,
        order_id: get(row, "order_id")?,
        sku: get(row, "sku")?,
        quantity: quantity_from(get(row, "quantity")?),
        state: ReservationState::parse(&get::<String>(row, "state")?)?,
        expires_at: Timestamp(get(row, "expires_at")?),
    })
}

async fn find(conn: &impl ConnectionTrait, key: &str) -> Result<Option<Reservation>, DemoError> {
    let row = db::query_one(
        conn,
        "reading a reservation",
        &format!("SELECT {COLUMNS} FROM demo_reservations WHERE reservation_key = $1"),
        vec![key.into()],
    )
    .await?;
    row.as_ref().map(from_row).transpose()
}

async fn insert(
    conn: &impl ConnectionTrait,
    r: &Reservation,
    now: Timestamp,
) -> Result<(), DemoError> {
    db::execute(
        conn,
        "recording a reservation",
        "INSERT INTO demo_reservations \
         (reservation_key, order_id, sku, quantity, state, created_at, expires_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $6)",
        vec![
            r.reservation_key.as_str().into(),
            r.order_id.as_str().into(),
            r.sku.as_str().into(),
            quantity_value(r.quantity),
            r.state.as_str().into(),
            now.as_millis().into(),
            r.expires_at.as_millis().into(),
        ],
    )
    .await
    .map(drop)
}

/// Moves a held reservation to `to`; when it leaves the held/committed pair, its stock goes
/// back. The caller holds the SKU lock.
async fn set_state(
    conn: &impl ConnectionTrait,
    r: &Reservation,
    to: ReservationState,
    now: Timestamp,
) -> Result<(), DemoError> {
    let action = "updating a reservation";
    db::execute(
        conn,
        action,
        "UPDATE demo_reservations SET state = $1, updated_at = $2 WHERE reservation_key = $3",
        vec![
            to.as_str().into(),
            now.as_millis().into(),
            r.reservation_key.as_str().into(),
        ],
    )
    .await?;
    if matches!(to, ReservationState::Released | ReservationState::Expired) {
        db::execute(
            conn,
            action,
            "UPDATE demo_stock SET reserved = reserved - $1 WHERE sku = $2",
            vec![quantity_value(r.quantity), r.sku.as_str().into()],
        )
        .await?;
    }
    Ok(())
}

/// Reservations made, confirmed, released and expired by the inventory (counter; `event`): an
/// example of a participant's own metrics through the SDK, and the seed's "reservation expiry
/// volume".
pub const RESERVATIONS_METRIC: &str = "sagaflow_demo_reservations_total";

/// What happened to a reservation, as [`RESERVATIONS_METRIC`] counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReservationEvent {
    Created,
    Confirmed,
    Released,
    Expired,
}

impl ReservationEvent {
    const ALL: [ReservationEvent; 4] = [
        ReservationEvent::Created,
        ReservationEvent::Confirmed,
        ReservationEvent::Released,
        ReservationEvent::Expired,
    ];

    fn as_str(self) -> &'static str {
        match self {
            ReservationEvent::Created => "created",
            ReservationEvent::Confirmed => "confirmed",
            ReservationEvent::Released => "released",
            ReservationEvent::Expired => "expired",
        }
    }
}

/// Counts `n` reservation events of one kind, once their transaction committed.
fn count_reservations(event: ReservationEvent, n: u64) {
    if n > 0 {
        sagaflow_sdk::metrics::counter!(RESERVATIONS_METRIC, "event" => event.as_str())
            .increment(n);
    }
}

/// Describes the inventory's metric and starts each of its events at zero. Call once after
/// installing a recorder.
pub fn describe_metrics() {
    sagaflow_sdk::metrics::describe_counter!(
        RESERVATIONS_METRIC,
        sagaflow_sdk::metrics::Unit::Count,
        "Reservations made, confirmed, released and expired by the demo inventory."
    );
    for event in ReservationEvent::ALL {
        sagaflow_sdk::metrics::counter!(RESERVATIONS_METRIC, "event" => event.as_str()).absolute(0);
    }
}

/// Expires the reservations of `sku` held past `now`; the caller holds the SKU lock.
async fn expire_held(
    conn: &impl ConnectionTrait,
    sku: &str,
    now: Timestamp,
) -> Result<u64, DemoError> {
    let rows = db::query_all(
        conn,
        "finding expired reservations",
        &format!(
            "SELECT {COLUMNS} FROM demo_reservations \
             WHERE sku = $1 AND state = 'held' AND expires_at <= $2"
        ),
        vec![sku.into(), now.as_millis().into()],
    )
    .await?;
    for row in &rows {
        set_state(conn, &from_row(row)?, ReservationState::Expired, now).await?;
    }
    Ok(rows.len() as u64)
}
