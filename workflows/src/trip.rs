//! The `book_trip` saga: three compensatable bookings and no pivot.
//!
//! | step          | kind          | effect         | compensation       |
//! |---------------|---------------|----------------|--------------------|
//! | `book_flight` | compensatable | book a seat    | cancel the booking |
//! | `book_hotel`  | compensatable | book a room    | cancel the booking |
//! | `book_car`    | compensatable | rent a car     | cancel the booking |
//!
//! Either the whole trip is booked or every booking made is cancelled. An item whose name
//! contains [`SOLD_OUT`](crate::SOLD_OUT) fails its step permanently.

use sagaflow_sdk::{
    Compensate, Saga, SdkError, Step, StepContext, StepError, StepHandler, Timestamp,
};
use schemars::JsonSchema;
use sea_orm::DatabaseConnection;
use serde::{Deserialize, Serialize};

use crate::bookings::{Booking, BookingRequest, Bookings, Resource};
use crate::faults::Faults;
use crate::place_order::{STEP_TIMEOUT, compensation_retry, forward_retry};

/// The saga's name.
pub const BOOK_TRIP: &str = "book_trip";
/// The saga's definition version.
pub const BOOK_TRIP_VERSION: u32 = 1;

/// The input of a `book_trip` saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BookTrip {
    /// Unique per trip.
    pub trip_id: String,
    /// Who travels.
    pub traveller: String,
    /// The flight number.
    pub flight: String,
    /// The hotel.
    pub hotel: String,
    /// The car class.
    pub car: String,
}

impl BookTrip {
    /// The saga input as JSON, as the engine takes it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "trip_id": self.trip_id,
            "traveller": self.traveller,
            "flight": self.flight,
            "hotel": self.hotel,
            "car": self.car,
        })
    }

    /// What to ask the `resource` service for.
    pub fn request(&self, resource: Resource) -> BookingRequest {
        let item = match resource {
            Resource::Flight => &self.flight,
            Resource::Hotel => &self.hotel,
            Resource::Car => &self.car,
        };
        BookingRequest {
            trip_id: self.trip_id.clone(),
            traveller: self.traveller.clone(),
            item: item.clone(),
        }
    }
}

/// The services the `book_trip` steps call. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TripServices {
    /// Flight bookings.
    pub flights: Bookings,
    /// Hotel bookings.
    pub hotels: Bookings,
    /// Car rentals.
    pub cars: Bookings,
}

impl TripServices {
    /// All three services over `db`, sharing `faults`.
    pub fn new(db: &DatabaseConnection, faults: &Faults) -> Self {
        let service = |resource| Bookings::new(resource, db.clone(), faults.clone());
        TripServices {
            flights: service(Resource::Flight),
            hotels: service(Resource::Hotel),
            cars: service(Resource::Car),
        }
    }
}

/// The `book_trip` saga (version 1) with handlers calling `services`.
pub fn book_trip_saga(services: &TripServices) -> Result<Saga, SdkError> {
    let step = |name: &str, bookings: &Bookings| -> Result<Step, SdkError> {
        Ok(Step::compensatable(name, Book(bookings.clone()))
            .retry(forward_retry()?)
            .compensation_retry(compensation_retry()?)
            .timeout(STEP_TIMEOUT))
    };
    Saga::builder(BOOK_TRIP, BOOK_TRIP_VERSION)
        .step(step("book_flight", &services.flights)?)
        .step(step("book_hotel", &services.hotels)?)
        .step(step("book_car", &services.cars)?)
        .build()
}

/// One booking step; the service decides which item of the trip it books.
struct Book(Bookings);

impl StepHandler for Book {
    type Input = BookTrip;
    type Output = Booking;

    async fn execute(&self, ctx: &StepContext, trip: BookTrip) -> Result<Booking, StepError> {
        let request = trip.request(self.0.resource());
        Ok(self
            .0
            .book(&ctx.idempotency_key, &request, Timestamp::now())
            .await?)
    }
}

impl Compensate for Book {
    async fn compensate(
        &self,
        ctx: &StepContext,
        trip: BookTrip,
        _output: Option<Booking>,
    ) -> Result<(), StepError> {
        let request = trip.request(self.0.resource());
        self.0
            .cancel(&ctx.forward_key, &request, Timestamp::now())
            .await?;
        Ok(())
    }
}
