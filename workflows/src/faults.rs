//! Failure injection for the demo services.
//!
//! A [`FaultPlan`] says, per [`Service`], how often a call fails transiently:
//!
//! - `transient`: the call fails *before* touching the database, so nothing happened and a
//!   retry is trivially safe;
//! - `lost_reply`: the call applies its effect (commits) and *then* fails, as if the reply got
//!   lost on the way back; the retry must be absorbed by the service's idempotency key.
//!
//! Both surface as [`DemoError::Injected`], a retryable error. Business refusals (declined
//! cards, sold-out hotels) are not random: they follow from the input (see
//! [`DECLINED_CARD`](crate::DECLINED_CARD) and [`SOLD_OUT`](crate::SOLD_OUT)).
//!
//! The services share one [`Faults`] handle (cheap to clone), so the plan can be changed while
//! sagas run, and tests can script exact failures with [`Faults::fail_next`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::DemoError;

/// A demo service that can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    /// Stock reservations.
    Inventory,
    /// Card authorizations.
    Payment,
    /// Order confirmation.
    Orders,
    /// Shipment requests.
    Shipping,
    /// Flight bookings.
    Flights,
    /// Hotel bookings.
    Hotels,
    /// Car rentals.
    Cars,
}

impl Service {
    /// Every service, in a fixed order.
    pub const ALL: [Service; 7] = [
        Service::Inventory,
        Service::Payment,
        Service::Orders,
        Service::Shipping,
        Service::Flights,
        Service::Hotels,
        Service::Cars,
    ];

    /// The service's name in lower case.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Inventory => "inventory",
            Service::Payment => "payment",
            Service::Orders => "orders",
            Service::Shipping => "shipping",
            Service::Flights => "flights",
            Service::Hotels => "hotels",
            Service::Cars => "cars",
        }
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where in a call an injected fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultPoint {
    /// Before the effect: nothing was applied.
    BeforeEffect,
    /// After the effect was committed: the reply is lost.
    AfterEffect,
}

impl std::fmt::Display for FaultPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FaultPoint::BeforeEffect => "before the effect, nothing applied",
            FaultPoint::AfterEffect => "after the effect was applied, reply lost",
        })
    }
}

/// Fault probabilities for one service, each in `0.0..=1.0`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServiceFaults {
    /// Probability that a call fails before applying its effect.
    pub transient: f64,
    /// Probability that a call fails after applying its effect (reply lost).
    pub lost_reply: f64,
}

impl ServiceFaults {
    fn validate(self, service: Service) -> Result<Self, DemoError> {
        for (name, p) in [
            ("transient", self.transient),
            ("lost_reply", self.lost_reply),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(DemoError::InvalidFaultPlan(format!(
                    "{service}.{name} must be a probability between 0.0 and 1.0, got {p}"
                )));
            }
        }
        Ok(self)
    }
}

/// How often each service fails transiently. The default injects nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPlan {
    services: BTreeMap<Service, ServiceFaults>,
}

impl FaultPlan {
    /// No injected faults.
    pub fn none() -> Self {
        FaultPlan::default()
    }

    /// The same probabilities for every service.
    pub fn uniform(transient: f64, lost_reply: f64) -> Result<Self, DemoError> {
        Service::ALL
            .into_iter()
            .try_fold(FaultPlan::none(), |plan, service| {
                plan.with(
                    service,
                    ServiceFaults {
                        transient,
                        lost_reply,
                    },
                )
            })
    }

    /// Sets the probabilities of one service.
    pub fn with(mut self, service: Service, faults: ServiceFaults) -> Result<Self, DemoError> {
        self.services.insert(service, faults.validate(service)?);
        Ok(self)
    }

    /// The probabilities of `service` (zero unless set).
    pub fn get(&self, service: Service) -> ServiceFaults {
        self.services.get(&service).copied().unwrap_or_default()
    }
}

#[derive(Debug)]
struct FaultState {
    plan: FaultPlan,
    rng: StdRng,
    scripted: BTreeMap<(Service, FaultPoint), u32>,
    injected: BTreeMap<(Service, FaultPoint), u64>,
}

/// The shared fault injector the services consult on every call. Clones share state.
#[derive(Debug, Clone)]
pub struct Faults {
    state: Arc<Mutex<FaultState>>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults::none()
    }
}

impl Faults {
    /// An injector following `plan`, drawing from a random generator seeded with `seed` (the
    /// same seed gives the same sequence of draws).
    pub fn new(plan: FaultPlan, seed: u64) -> Self {
        Faults {
            state: Arc::new(Mutex::new(FaultState {
                plan,
                rng: StdRng::seed_from_u64(seed),
                scripted: BTreeMap::new(),
                injected: BTreeMap::new(),
            })),
        }
    }

    /// An injector that never fails a call (unless scripted with [`Faults::fail_next`]).
    pub fn none() -> Self {
        Faults::new(FaultPlan::none(), 0)
    }

    fn lock(&self) -> MutexGuard<'_, FaultState> {
        // A panic while holding this lock cannot leave the counters half-updated in a way that
        // matters for a demo, so a poisoned lock is still used.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the plan; calls already in flight finish under the old one.
    pub fn set_plan(&self, plan: FaultPlan) {
        self.lock().plan = plan;
    }

    /// The current plan.
    pub fn plan(&self) -> FaultPlan {
        self.lock().plan.clone()
    }

    /// Makes the next `times` calls of `service` fail at `point`, whatever the plan says.
    pub fn fail_next(&self, service: Service, point: FaultPoint, times: u32) {
        *self.lock().scripted.entry((service, point)).or_default() += times;
    }

    /// How many faults were injected into `service` at `point` so far.
    pub fn injected(&self, service: Service, point: FaultPoint) -> u64 {
        self.lock()
            .injected
            .get(&(service, point))
            .copied()
            .unwrap_or(0)
    }

    /// How many faults were injected in all.
    pub fn injected_total(&self) -> u64 {
        self.lock().injected.values().sum()
    }

    /// Called by a service at `point` of a call: fails with [`DemoError::Injected`] when the
    /// script or the plan says so.
    pub(crate) fn check(&self, service: Service, point: FaultPoint) -> Result<(), DemoError> {
        let mut state = self.lock();
        let scripted = match state.scripted.get_mut(&(service, point)) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        };
        let fail = scripted || {
            let faults = state.plan.get(service);
            let p = match point {
                FaultPoint::BeforeEffect => faults.transient,
                FaultPoint::AfterEffect => faults.lost_reply,
            };
            p > 0.0 && state.rng.gen_bool(p)
        };
        if !fail {
            return Ok(());
        }
        *state.injected.entry((service, point)).or_default() += 1;
        tracing::debug!(%service, ?point, "injecting a transient fault");
        Err(DemoError::Injected { service, point })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_probabilities_out_of_range() {
        let err = FaultPlan::uniform(1.5, 0.0).unwrap_err();
        assert!(err.to_string().contains("inventory.transient"), "{err}");
        let err = FaultPlan::none()
            .with(
                Service::Payment,
                ServiceFaults {
                    transient: 0.0,
                    lost_reply: -0.1,
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("payment.lost_reply"), "{err}");
        assert!(FaultPlan::uniform(f64::NAN, 0.0).is_err());
    }

    #[test]
    fn scripted_faults_come_first_and_are_counted() {
        let faults = Faults::none();
        faults.fail_next(Service::Payment, FaultPoint::AfterEffect, 2);
        assert!(
            faults
                .check(Service::Payment, FaultPoint::BeforeEffect)
                .is_ok()
        );
        assert!(
            faults
                .check(Service::Payment, FaultPoint::AfterEffect)
                .is_err()
        );
        assert!(
            faults
                .check(Service::Inventory, FaultPoint::AfterEffect)
                .is_ok()
        );
        let err = faults
            .check(Service::Payment, FaultPoint::AfterEffect)
            .unwrap_err();
        assert!(err.is_retryable());
        assert!(
            faults
                .check(Service::Payment, FaultPoint::AfterEffect)
                .is_ok()
        );
        assert_eq!(
            faults.injected(Service::Payment, FaultPoint::AfterEffect),
            2
        );
        assert_eq!(faults.injected_total(), 2);
    }

    #[test]
    fn the_plan_is_followed_and_seeded() {
        let draw = |seed| {
            let faults = Faults::new(FaultPlan::uniform(0.5, 0.0).unwrap(), seed);
            (0..64)
                .map(|_| {
                    faults
                        .check(Service::Orders, FaultPoint::BeforeEffect)
                        .is_err()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let failures = draw(7).into_iter().filter(|f| *f).count();
        assert!((10..=54).contains(&failures), "{failures} of 64");

        let always = Faults::new(FaultPlan::uniform(1.0, 1.0).unwrap(), 1);
        assert!(
            always
                .check(Service::Cars, FaultPoint::AfterEffect)
                .is_err()
        );
        always.set_plan(FaultPlan::none());
        assert!(always.check(Service::Cars, FaultPoint::AfterEffect).is_ok());
    }
}
