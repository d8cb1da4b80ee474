//! Helpers for a demo run: stocking SKUs and generating saga inputs.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sea_orm::DatabaseConnection;

use crate::DemoError;
use crate::bookings::{Resource, SOLD_OUT};
use crate::faults::Faults;
use crate::inventory::Inventory;
use crate::payment::{DECLINED_CARD, GOOD_CARD};
use crate::place_order::PlaceOrder;
use crate::trip::BookTrip;
use sagaflow_sdk::Secret;

/// Adds stock: `(sku, units)` pairs, creating SKUs that do not exist yet.
pub async fn seed_stock(db: &DatabaseConnection, stock: &[(&str, u32)]) -> Result<(), DemoError> {
    let inventory = Inventory::new(db.clone(), Faults::none());
    for (sku, units) in stock {
        inventory.restock(sku, *units).await?;
    }
    Ok(())
}

/// The demo's stock per SKU; `SKU-4` is scarce on purpose, so some orders find it sold out.
pub const DEMO_STOCK: [(&str, u32); 4] = [
    ("SKU-1", 400),
    ("SKU-2", 400),
    ("SKU-3", 400),
    ("SKU-4", 25),
];

/// Stocks each SKU of `stock` that has never been stocked, so running a demo again (or
/// restarting a worker) adds nothing.
pub async fn seed_stock_once(
    db: &DatabaseConnection,
    stock: &[(&str, u32)],
) -> Result<(), DemoError> {
    let inventory = Inventory::new(db.clone(), Faults::none());
    for (sku, units) in stock {
        if inventory.stock(sku).await?.is_none() {
            inventory.restock(sku, *units).await?;
        }
    }
    Ok(())
}

/// What [`generate_orders`] produces.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderMix {
    /// Order ids are `{prefix}-{n}`; use a fresh prefix per run on a reused database.
    pub prefix: String,
    /// How many orders.
    pub count: usize,
    /// SKUs to order from (picked uniformly).
    pub skus: Vec<String>,
    /// Each order is for 1 to this many units.
    pub max_quantity: u32,
    /// The price of one unit, in cents.
    pub unit_price_cents: i64,
    /// The share of orders paid with [`DECLINED_CARD`], in `0.0..=1.0` (rounded to a count).
    pub decline_ratio: f64,
    /// The same seed gives the same orders.
    pub seed: u64,
}

impl Default for OrderMix {
    /// 20 orders of 1-3 units over `SKU-1`..`SKU-3` at 19.99, 20% declined.
    fn default() -> Self {
        OrderMix {
            prefix: "order".into(),
            count: 20,
            skus: vec!["SKU-1".into(), "SKU-2".into(), "SKU-3".into()],
            max_quantity: 3,
            unit_price_cents: 1999,
            decline_ratio: 0.2,
            seed: 42,
        }
    }
}

/// `count` flags, `round(count * ratio)` of them true, in a seeded random order.
fn pick(count: usize, ratio: f64, rng: &mut StdRng) -> Vec<bool> {
    let ratio = if ratio.is_nan() {
        0.0
    } else {
        ratio.clamp(0.0, 1.0)
    };
    // `ratio` is in 0..=1, so the product is in 0..=count and the cast is exact enough.
    let chosen = (count as f64 * ratio).round() as usize;
    let mut flags: Vec<bool> = (0..count).map(|i| i < chosen).collect();
    flags.shuffle(rng);
    flags
}

/// Generates `place_order` inputs; exactly `round(count * decline_ratio)` of them use a card
/// that is declined. Deterministic for a given mix.
pub fn generate_orders(mix: &OrderMix) -> Vec<PlaceOrder> {
    let mut rng = StdRng::seed_from_u64(mix.seed);
    let declined = pick(mix.count, mix.decline_ratio, &mut rng);
    declined
        .into_iter()
        .enumerate()
        .map(|(i, declined)| {
            let sku = mix
                .skus
                .choose(&mut rng)
                .cloned()
                .unwrap_or_else(|| "SKU-1".to_string());
            let quantity = rng.gen_range(1..=mix.max_quantity.max(1));
            PlaceOrder {
                order_id: format!("{}-{i}", mix.prefix),
                customer: format!("customer-{}", rng.gen_range(1..=10)),
                sku,
                quantity,
                amount_cents: mix.unit_price_cents.max(1) * i64::from(quantity),
                card: Secret::new(if declined { DECLINED_CARD } else { GOOD_CARD }.to_string()),
            }
        })
        .collect()
}

/// What [`generate_trips`] produces.
#[derive(Debug, Clone, PartialEq)]
pub struct TripMix {
    /// Trip ids are `{prefix}-{n}`.
    pub prefix: String,
    /// How many trips.
    pub count: usize,
    /// The share of trips with one sold-out item (flight, hotel or car), in `0.0..=1.0`.
    pub sold_out_ratio: f64,
    /// The same seed gives the same trips.
    pub seed: u64,
}

impl Default for TripMix {
    /// 10 trips, 30% with a sold-out item.
    fn default() -> Self {
        TripMix {
            prefix: "trip".into(),
            count: 10,
            sold_out_ratio: 0.3,
            seed: 7,
        }
    }
}

/// Generates `book_trip` inputs; exactly `round(count * sold_out_ratio)` of them have one
/// item containing [`SOLD_OUT`]. Deterministic for a given mix.
pub fn generate_trips(mix: &TripMix) -> Vec<BookTrip> {
    const FLIGHTS: [&str; 4] = ["SF101", "SF202", "SF303", "SF404"];
    const HOTELS: [&str; 3] = ["Harbour Inn", "Grand Central", "Parkside"];
    const CARS: [&str; 3] = ["compact", "estate", "van"];
    let mut rng = StdRng::seed_from_u64(mix.seed);
    let sold_out = pick(mix.count, mix.sold_out_ratio, &mut rng);
    sold_out
        .into_iter()
        .enumerate()
        .map(|(i, sold_out)| {
            let mut trip = BookTrip {
                trip_id: format!("{}-{i}", mix.prefix),
                traveller: format!("traveller-{}", rng.gen_range(1..=10)),
                flight: FLIGHTS[rng.gen_range(0..FLIGHTS.len())].to_string(),
                hotel: HOTELS[rng.gen_range(0..HOTELS.len())].to_string(),
                car: CARS[rng.gen_range(0..CARS.len())].to_string(),
            };
            if sold_out {
                let item = match Resource::ALL[rng.gen_range(0..Resource::ALL.len())] {
                    Resource::Flight => &mut trip.flight,
                    Resource::Hotel => &mut trip.hotel,
                    Resource::Car => &mut trip.car,
                };
                *item = format!("{item} {SOLD_OUT}");
            }
            trip
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bookings::is_sold_out;
    use crate::payment::is_declined;

    #[test]
    fn orders_are_deterministic_with_the_exact_decline_count() {
        let mix = OrderMix {
            count: 50,
            decline_ratio: 0.3,
            ..OrderMix::default()
        };
        let orders = generate_orders(&mix);
        assert_eq!(orders, generate_orders(&mix));
        assert_eq!(orders.len(), 50);
        assert_eq!(
            orders
                .iter()
                .filter(|o| is_declined(o.card.expose()))
                .count(),
            15
        );
        assert!(orders.iter().all(|o| (1..=3).contains(&o.quantity)));
        assert!(
            orders
                .iter()
                .all(|o| o.amount_cents == 1999 * i64::from(o.quantity))
        );
        let other = generate_orders(&OrderMix { seed: 1, ..mix });
        assert_ne!(orders, other);
    }

    #[test]
    fn ratios_out_of_range_are_clamped() {
        let all = generate_orders(&OrderMix {
            count: 4,
            decline_ratio: 7.0,
            ..OrderMix::default()
        });
        assert!(all.iter().all(|o| is_declined(o.card.expose())));
        let none = generate_orders(&OrderMix {
            decline_ratio: f64::NAN,
            ..OrderMix::default()
        });
        assert!(!none.iter().any(|o| is_declined(o.card.expose())));
    }

    #[test]
    fn trips_have_the_exact_sold_out_count() {
        let trips = generate_trips(&TripMix {
            count: 20,
            sold_out_ratio: 0.25,
            ..TripMix::default()
        });
        let sold_out = |t: &BookTrip| {
            [&t.flight, &t.hotel, &t.car]
                .into_iter()
                .filter(|i| is_sold_out(i))
                .count()
        };
        assert_eq!(trips.iter().map(sold_out).sum::<usize>(), 5);
        assert!(trips.iter().all(|t| sold_out(t) <= 1));
    }
}
