//! Support for the cross-crate integration tests: throwaway databases on the real servers.
//!
//! Every test gets its own SQLite file in a temporary folder, or its own PostgreSQL database
//! (created on the server at `SAGAFLOW_TEST_PG`, default `postgres://postgres@127.0.0.1:5432`,
//! and dropped when the test ends, pass or fail). Distributed tests get a private `nats-server`
//! with JetStream ([`NatsServer`]).

use sea_orm::{ConnectionTrait, Database};

pub mod metrics;
mod nats;
pub mod otlp;
pub mod secure_nats;

pub use nats::{CLUSTER_SIZE, NatsCluster, NatsServer};

/// The key of secret fields every test process uses unless a test says otherwise (a key file's
/// text: `ID:BASE64`). A test key, known to everyone: never use it for real data.
pub const TEST_SECRET_KEYS: &str = "test-1:9J80Qs/7rQHhENjYPL46u4DiAd5rBsOEV7sSHJ5eEH0=";

/// A second test key, for rotations: `ROTATED_SECRET_KEYS` seals with it and still opens what
/// [`TEST_SECRET_KEYS`] sealed.
pub const NEXT_SECRET_KEY: &str = "test-2:OGkANGf7t2/IVk3wPR8+fjBSGfLsfdZe6IFBcFoJCi4=";

/// The members of the test sagas' inputs that are secret: `place_order`'s card number and
/// `py_transfer`'s payer reference.
pub const SECRET_MEMBERS: [&str; 2] = ["card", "reference"];

/// `input` with its [`SECRET_MEMBERS`] sealed with [`TEST_SECRET_KEYS`], as a client that
/// starts a saga on a distributed engine sends it.
pub fn sealed(mut input: serde_json::Value) -> serde_json::Value {
    test_secret_keys()
        .seal_fields(&mut input, &SECRET_MEMBERS.map(String::from))
        .expect("seal the secret members");
    input
}

/// [`TEST_SECRET_KEYS`] as keys.
pub fn test_secret_keys() -> std::sync::Arc<sagaflow_protocol::SecretKeys> {
    std::sync::Arc::new(
        sagaflow_protocol::SecretKeys::parse(TEST_SECRET_KEYS, "the test keys")
            .expect("the test keys parse"),
    )
}

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL database of its own.
    Postgres,
}

/// A database that exists for one test.
pub struct TestDb {
    /// The URL to hand to the engine.
    pub url: String,
    postgres_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

fn postgres_server() -> String {
    std::env::var("SAGAFLOW_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

impl TestDb {
    /// A fresh database on `backend`.
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary folder");
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("sagaflow.db").display()
                );
                TestDb {
                    url,
                    postgres_name: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let name = format!("sagaflow_t_{}", uuid::Uuid::new_v4().simple());
                let admin = Database::connect(format!("{}/postgres", postgres_server()))
                    .await
                    .expect("PostgreSQL must be running (see .ci/run)");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create the test database");
                let _ = admin.close().await;
                TestDb {
                    url: format!("{}/{name}", postgres_server()),
                    postgres_name: Some(name),
                    _dir: None,
                }
            }
        }
    }

    /// The SQLite file's folder, for tests that keep more files beside it.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self._dir.as_ref().map(|d| d.path())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.postgres_name.take() else {
            return;
        };
        // Async work cannot run in Drop; a short-lived runtime on its own thread can.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(admin) =
                    Database::connect(format!("{}/postgres", postgres_server())).await
                {
                    let _ = admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}
