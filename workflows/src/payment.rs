//! The payment service: a ledger of card authorizations.
//!
//! `demo_authorizations` has one row per idempotency key (its primary key), in state
//! `authorized` (live) or `voided`. A partial unique index allows at most one live
//! authorization per order, so an order is never charged twice, even by two different sagas.
//!
//! Declines are decided by the card number, not by chance: a card whose digits end in `0002`
//! (like [`DECLINED_CARD`]) is declined with code `card_declined`.

use sagaflow_sdk::{Secret, Timestamp};
use schemars::JsonSchema;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, QueryResult};
use serde::{Deserialize, Serialize};

use crate::DemoError;
use crate::db::{self, get};
use crate::faults::{FaultPoint, Faults, Service};

/// A card number that is always declined (any card whose digits end in `0002` is).
pub const DECLINED_CARD: &str = "4000-0000-0000-0002";

/// A card number that is always accepted.
pub const GOOD_CARD: &str = "4242-4242-4242-4242";

/// Whether the payment service declines `card`: its digits end in `0002`.
pub fn is_declined(card: &str) -> bool {
    digits(card).ends_with("0002")
}

fn digits(card: &str) -> String {
    card.chars().filter(char::is_ascii_digit).collect()
}

fn last4(card: &str) -> String {
    let digits = digits(card);
    digits[digits.len().saturating_sub(4)..].to_string()
}

/// What to charge (and the `Input` of the `authorize_payment` step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Charge {
    /// The order paid for.
    pub order_id: String,
    /// Who pays.
    pub customer: String,
    /// How much, in cents.
    pub amount_cents: i64,
    /// The card number (a secret field); only its last four digits are stored.
    pub card: Secret<String>,
}

/// The life cycle of an authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthorizationState {
    /// The money is held for the order.
    Authorized,
    /// Voided by a compensation (or a tombstone written before any authorization existed).
    Voided,
}

impl AuthorizationState {
    /// The name stored in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthorizationState::Authorized => "authorized",
            AuthorizationState::Voided => "voided",
        }
    }

    pub(crate) fn parse(stored: &str) -> Result<Self, DemoError> {
        match stored {
            "authorized" => Ok(AuthorizationState::Authorized),
            "voided" => Ok(AuthorizationState::Voided),
            other => Err(DemoError::Database {
                action: "reading an authorization".into(),
                source: DbErr::Custom(format!(
                    "unknown authorization state `{other}` in demo_authorizations"
                )),
            }),
        }
    }
}

/// A card authorization (and the `Output` of the `authorize_payment` step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Authorization {
    /// The idempotency key that created it; also its id.
    pub authorization_key: String,
    /// The order.
    pub order_id: String,
    /// Cents held (0 for a tombstone).
    pub amount_cents: i64,
    /// The card's last four digits.
    pub card_last4: String,
    /// Live or voided.
    pub state: AuthorizationState,
}

/// What [`Payment::void`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoidOutcome {
    /// A live authorization was voided.
    Voided,
    /// It was already voided: nothing to do.
    AlreadyVoided,
    /// No authorization existed for the key; a tombstone now stops a late authorization with
    /// the same key from charging.
    NotFound,
}

/// The payment service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Payment {
    db: DatabaseConnection,
    faults: Faults,
}

const COLUMNS: &str = "authorization_key, order_id, amount_cents, card_last4, state";

impl Payment {
    /// The service over `db` (tables from [`install`](crate::install)), failing as `faults`
    /// says.
    pub fn new(db: DatabaseConnection, faults: Faults) -> Self {
        Payment { db, faults }
    }

    /// Authorizes `charge` under `key`. The same key returns the same authorization (whatever
    /// its state now); a declined card fails with [`DemoError::CardDeclined`]; an order with a
    /// live authorization under another key fails with [`DemoError::AlreadyCharged`].
    pub async fn authorize(
        &self,
        key: &str,
        charge: &Charge,
        now: Timestamp,
    ) -> Result<Authorization, DemoError> {
        if charge.amount_cents <= 0 {
            return Err(DemoError::InvalidAmount {
                order_id: charge.order_id.clone(),
                amount_cents: charge.amount_cents,
            });
        }
        self.faults
            .check(Service::Payment, FaultPoint::BeforeEffect)?;
        if is_declined(charge.card.expose()) {
            return Err(DemoError::CardDeclined {
                order_id: charge.order_id.clone(),
                last4: last4(charge.card.expose()),
            });
        }
        let wanted = Authorization {
            authorization_key: key.to_string(),
            order_id: charge.order_id.clone(),
            amount_cents: charge.amount_cents,
            card_last4: last4(charge.card.expose()),
            state: AuthorizationState::Authorized,
        };
        // Conflicts on the key (a repeat) or on the live-per-order index (another saga
        // charged this order) both leave the table as it was.
        insert(&self.db, &wanted, &charge.customer, now).await?;
        let stored = match find(&self.db, key).await? {
            Some(stored) => stored,
            None => {
                let existing_key = live_for_order(&self.db, &charge.order_id)
                    .await?
                    .unwrap_or_else(|| "(voided since)".to_string());
                return Err(DemoError::AlreadyCharged {
                    order_id: charge.order_id.clone(),
                    existing_key,
                });
            }
        };
        self.faults
            .check(Service::Payment, FaultPoint::AfterEffect)?;
        Ok(stored)
    }

    /// Voids the authorization made under `key` (the forward step's key). Idempotent: voiding
    /// an unknown or voided authorization succeeds; for an unknown one a tombstone for
    /// `order_id` is recorded.
    pub async fn void(
        &self,
        key: &str,
        order_id: &str,
        now: Timestamp,
    ) -> Result<VoidOutcome, DemoError> {
        self.faults
            .check(Service::Payment, FaultPoint::BeforeEffect)?;
        let outcome = if void_live(&self.db, key, now).await? {
            VoidOutcome::Voided
        } else {
            let tombstone = Authorization {
                authorization_key: key.to_string(),
                order_id: order_id.to_string(),
                amount_cents: 0,
                card_last4: String::new(),
                state: AuthorizationState::Voided,
            };
            if insert(&self.db, &tombstone, "", now).await? > 0 {
                VoidOutcome::NotFound
            } else if void_live(&self.db, key, now).await? {
                // A late authorization with this key landed between the two statements.
                VoidOutcome::Voided
            } else {
                VoidOutcome::AlreadyVoided
            }
        };
        self.faults
            .check(Service::Payment, FaultPoint::AfterEffect)?;
        Ok(outcome)
    }

    /// The authorization made under `key`, if any.
    pub async fn authorization(&self, key: &str) -> Result<Option<Authorization>, DemoError> {
        find(&self.db, key).await
    }
}

/// Voids the live authorization `key`; false when there is none.
async fn void_live(
    conn: &impl ConnectionTrait,
    key: &str,
    now: Timestamp,
) -> Result<bool, DemoError> {
    let voided = db::execute(
        conn,
        "voiding an authorization",
        "UPDATE demo_authorizations SET state = 'voided', updated_at = $1 \
         WHERE authorization_key = $2 AND state = 'authorized'",
        vec![now.as_millis().into(), key.into()],
    )
    .await?;
    Ok(voided > 0)
}

pub(crate) fn from_row(row: &QueryResult) -> Result<Authorization, DemoError> {
    Ok(Authorization {
        authorization_key: get(row, "authorization_key")?,
        order_id: get(row, "order_id")?,
        amount_cents: get(row, "amount_cents")?,
        card_last4: get(row, "card_last4")?,
        state: AuthorizationState::parse(&get::<String>(row, "state")?)?,
    })
}

async fn insert(
    conn: &impl ConnectionTrait,
    a: &Authorization,
    customer: &str,
    now: Timestamp,
) -> Result<u64, DemoError> {
    db::execute(
        conn,
        "recording an authorization",
        "INSERT INTO demo_authorizations \
         (authorization_key, order_id, customer, amount_cents, card_last4, state, created_at, \
          updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7) ON CONFLICT DO NOTHING",
        vec![
            a.authorization_key.as_str().into(),
            a.order_id.as_str().into(),
            customer.into(),
            a.amount_cents.into(),
            a.card_last4.as_str().into(),
            a.state.as_str().into(),
            now.as_millis().into(),
        ],
    )
    .await
}

async fn find(conn: &impl ConnectionTrait, key: &str) -> Result<Option<Authorization>, DemoError> {
    let row = db::query_one(
        conn,
        "reading an authorization",
        &format!("SELECT {COLUMNS} FROM demo_authorizations WHERE authorization_key = $1"),
        vec![key.into()],
    )
    .await?;
    row.as_ref().map(from_row).transpose()
}

async fn live_for_order(
    conn: &impl ConnectionTrait,
    order_id: &str,
) -> Result<Option<String>, DemoError> {
    let row = db::query_one(
        conn,
        "reading an order's live authorization",
        "SELECT authorization_key FROM demo_authorizations \
         WHERE order_id = $1 AND state = 'authorized'",
        vec![order_id.into()],
    )
    .await?;
    row.map(|row| get(&row, "authorization_key")).transpose()
}
