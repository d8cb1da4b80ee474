//! The trip services: flight, hotel and car bookings, one table each.
//!
//! The three services behave alike, so one type serves them all, parameterized by
//! [`Resource`]. Each table has one row per idempotency key, in state `booked` or `cancelled`,
//! and a partial unique index allows at most one live booking per trip.
//!
//! Availability is decided by the input, not by chance: an item whose name contains
//! [`SOLD_OUT`] (any case) is sold out, failing permanently with `no_seats`, `no_rooms` or
//! `no_cars`.

use sagaflow_sdk::Timestamp;
use schemars::JsonSchema;
use sea_orm::{DatabaseConnection, DbErr, QueryResult};
use serde::{Deserialize, Serialize};

use crate::DemoError;
use crate::db::{self, get};
use crate::faults::{FaultPoint, Faults, Service};

/// An item whose name contains this word (any case) is sold out.
pub const SOLD_OUT: &str = "SOLDOUT";

/// Whether the booking services consider `item` sold out.
pub fn is_sold_out(item: &str) -> bool {
    item.to_ascii_uppercase().contains(SOLD_OUT)
}

/// What a booking service books.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// A seat on a flight.
    Flight,
    /// A hotel room.
    Hotel,
    /// A rental car.
    Car,
}

impl Resource {
    /// Every resource, in saga order.
    pub const ALL: [Resource; 3] = [Resource::Flight, Resource::Hotel, Resource::Car];

    /// `flight`, `hotel` or `car`.
    pub fn noun(self) -> &'static str {
        match self {
            Resource::Flight => "flight",
            Resource::Hotel => "hotel",
            Resource::Car => "car",
        }
    }

    /// The table holding its bookings.
    pub fn table(self) -> &'static str {
        match self {
            Resource::Flight => "demo_flight_bookings",
            Resource::Hotel => "demo_hotel_bookings",
            Resource::Car => "demo_car_bookings",
        }
    }

    /// The service it belongs to, for fault injection.
    pub fn service(self) -> Service {
        match self {
            Resource::Flight => Service::Flights,
            Resource::Hotel => Service::Hotels,
            Resource::Car => Service::Cars,
        }
    }

    /// The error code of a sold-out item.
    pub fn sold_out_code(self) -> &'static str {
        match self {
            Resource::Flight => "no_seats",
            Resource::Hotel => "no_rooms",
            Resource::Car => "no_cars",
        }
    }
}

/// What to book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BookingRequest {
    /// The trip.
    pub trip_id: String,
    /// Who travels.
    pub traveller: String,
    /// The flight number, hotel or car class.
    pub item: String,
}

/// The life cycle of a booking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BookingState {
    /// Live.
    Booked,
    /// Cancelled by a compensation (or a tombstone written before any booking existed).
    Cancelled,
}

impl BookingState {
    /// The name stored in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            BookingState::Booked => "booked",
            BookingState::Cancelled => "cancelled",
        }
    }

    pub(crate) fn parse(stored: &str) -> Result<Self, DemoError> {
        match stored {
            "booked" => Ok(BookingState::Booked),
            "cancelled" => Ok(BookingState::Cancelled),
            other => Err(DemoError::Database {
                action: "reading a booking".into(),
                source: DbErr::Custom(format!("unknown booking state `{other}`")),
            }),
        }
    }
}

/// A booking (and the `Output` of each trip step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Booking {
    /// The idempotency key that made it; also its id.
    pub booking_key: String,
    /// The trip.
    pub trip_id: String,
    /// What was booked.
    pub item: String,
    /// Live or cancelled.
    pub state: BookingState,
}

/// What [`Bookings::cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// A live booking was cancelled.
    Cancelled,
    /// It was already cancelled: nothing to do.
    AlreadyCancelled,
    /// No booking existed for the key; a tombstone now stops a late booking with the same key.
    NotFound,
}

/// A flight, hotel or car booking service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Bookings {
    resource: Resource,
    db: DatabaseConnection,
    faults: Faults,
}

impl Bookings {
    /// The `resource` booking service over `db` (tables from [`install`](crate::install)),
    /// failing as `faults` says.
    pub fn new(resource: Resource, db: DatabaseConnection, faults: Faults) -> Self {
        Bookings {
            resource,
            db,
            faults,
        }
    }

    /// What this service books.
    pub fn resource(&self) -> Resource {
        self.resource
    }

    /// Books `request` under `key`. The same key returns the same booking (whatever its state
    /// now); a sold-out item fails with [`DemoError::SoldOut`]; a trip with a live booking under
    /// another key fails with [`DemoError::AlreadyBooked`].
    pub async fn book(
        &self,
        key: &str,
        request: &BookingRequest,
        now: Timestamp,
    ) -> Result<Booking, DemoError> {
        let service = self.resource.service();
        self.faults.check(service, FaultPoint::BeforeEffect)?;
        if is_sold_out(&request.item) {
            return Err(DemoError::SoldOut {
                resource: self.resource.noun(),
                code: self.resource.sold_out_code(),
                item: request.item.clone(),
                trip_id: request.trip_id.clone(),
            });
        }
        self.insert(key, request, BookingState::Booked, now).await?;
        let Some(booking) = self.booking(key).await? else {
            let live = db::query_one(
                &self.db,
                "reading a trip's live booking",
                &format!(
                    "SELECT booking_key FROM {} WHERE trip_id = $1 AND state = 'booked'",
                    self.resource.table()
                ),
                vec![request.trip_id.as_str().into()],
            )
            .await?;
            let existing_key = match live {
                Some(row) => get(&row, "booking_key")?,
                None => "(cancelled since)".to_string(),
            };
            return Err(DemoError::AlreadyBooked {
                resource: self.resource.noun(),
                trip_id: request.trip_id.clone(),
                existing_key,
            });
        };
        self.faults.check(service, FaultPoint::AfterEffect)?;
        Ok(booking)
    }

    /// Cancels the booking made under `key` (the forward step's key). Idempotent: cancelling
    /// an unknown or cancelled booking succeeds; for an unknown one a tombstone is recorded.
    pub async fn cancel(
        &self,
        key: &str,
        request: &BookingRequest,
        now: Timestamp,
    ) -> Result<CancelOutcome, DemoError> {
        let service = self.resource.service();
        self.faults.check(service, FaultPoint::BeforeEffect)?;
        let outcome = if self.cancel_live(key, now).await? {
            CancelOutcome::Cancelled
        } else if self
            .insert(key, request, BookingState::Cancelled, now)
            .await?
            > 0
        {
            CancelOutcome::NotFound
        } else if self.cancel_live(key, now).await? {
            // A late booking with this key landed between the two statements.
            CancelOutcome::Cancelled
        } else {
            CancelOutcome::AlreadyCancelled
        };
        self.faults.check(service, FaultPoint::AfterEffect)?;
        Ok(outcome)
    }

    /// The booking made under `key`, if any.
    pub async fn booking(&self, key: &str) -> Result<Option<Booking>, DemoError> {
        let row = db::query_one(
            &self.db,
            "reading a booking",
            &format!(
                "SELECT booking_key, trip_id, item, state FROM {} WHERE booking_key = $1",
                self.resource.table()
            ),
            vec![key.into()],
        )
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    async fn insert(
        &self,
        key: &str,
        request: &BookingRequest,
        state: BookingState,
        now: Timestamp,
    ) -> Result<u64, DemoError> {
        db::execute(
            &self.db,
            "recording a booking",
            &format!(
                "INSERT INTO {} (booking_key, trip_id, traveller, item, state, created_at, \
                 updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT DO NOTHING",
                self.resource.table()
            ),
            vec![
                key.into(),
                request.trip_id.as_str().into(),
                request.traveller.as_str().into(),
                request.item.as_str().into(),
                state.as_str().into(),
                now.as_millis().into(),
            ],
        )
        .await
    }

    async fn cancel_live(&self, key: &str, now: Timestamp) -> Result<bool, DemoError> {
        let cancelled = db::execute(
            &self.db,
            "cancelling a booking",
            &format!(
                "UPDATE {} SET state = 'cancelled', updated_at = $1 \
                 WHERE booking_key = $2 AND state = 'booked'",
                self.resource.table()
            ),
            vec![now.as_millis().into(), key.into()],
        )
        .await?;
        Ok(cancelled > 0)
    }
}

pub(crate) fn from_row(row: &QueryResult) -> Result<Booking, DemoError> {
    Ok(Booking {
        booking_key: get(row, "booking_key")?,
        trip_id: get(row, "trip_id")?,
        item: get(row, "item")?,
        state: BookingState::parse(&get::<String>(row, "state")?)?,
    })
}
