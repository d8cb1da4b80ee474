//! The migrated schema is the one the engine's queries and `docs/architecture.md` §7.1 rely on,
//! on both databases; applying the migrations again changes nothing; and a database made by the
//! migrations from before the squash is refused.
//!
//! The index sets are exact, each index checked by its definition: an index lost is a query
//! that reads a whole table (`engine/src/ops/plans.rs` checks the plans on SQLite only), and an
//! index added is one more entry written on every transition.
//!
//! The PostgreSQL test makes its own database on the server at `SAGAFLOW_TEST_PG` (default
//! `postgres://postgres@127.0.0.1:5432`) and drops it afterwards.

use sagaflow_migrations::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::{
    ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
};

/// (name, table, columns, predicate) of the indexes both databases have.
const INDEXES: [(&str, &str, &str, Option<&str>); 11] = [
    // The timer poller.
    ("idx_sagas_wake_at", "sagas", "wake_at", None),
    // `stuck`.
    (
        "idx_sagas_status_updated",
        "sagas",
        "status, updated_at",
        None,
    ),
    // `list`'s keyset pages and each of its filters.
    ("idx_sagas_created_id", "sagas", "created_at, id", None),
    (
        "idx_sagas_status_created_id",
        "sagas",
        "status, created_at, id",
        None,
    ),
    (
        "idx_sagas_name_created_id",
        "sagas",
        "name, created_at, id",
        None,
    ),
    (
        "idx_sagas_current_step_created_id",
        "sagas",
        "current_step, created_at, id",
        Some("current_step IS NOT NULL"),
    ),
    (
        "idx_sagas_updated_created",
        "sagas",
        "updated_at, created_at",
        None,
    ),
    // `audit`.
    ("idx_history_kind_at", "saga_history", "kind, at", None),
    (
        "idx_history_kind_step_direction_at",
        "saga_history",
        "kind, step_name, direction, at",
        None,
    ),
    ("idx_history_at", "saga_history", "at", None),
    // The relay's sweep.
    ("idx_outbox_created", "outbox", "created_at", None),
];

/// The actor queries of `audit` on SQLite: a bytewise range, which a plain index serves.
const SQLITE_ACTOR_INDEX: (&str, &str, &str, Option<&str>) =
    ("idx_history_actor_at", "saga_history", "actor, at", None);

/// The actor queries of `audit` on PostgreSQL: a range of pattern operators.
const POSTGRES_ACTOR_INDEX: (&str, &str, &str, Option<&str>) = (
    "idx_history_actor_prefix_at",
    "saga_history",
    "actor varchar_pattern_ops, at",
    None,
);

const TABLES: [&str; 9] = [
    "cluster_settings",
    "engine_nodes",
    "outbox",
    "partition_leases",
    "saga_definitions",
    "saga_history",
    "sagas",
    "seaql_migrations",
    "step_attempts",
];

/// The outbox holds only unpublished commands: there is no `sent_at`.
const OUTBOX_COLUMNS: [&str; 4] = ["id", "saga_id", "payload", "created_at"];

/// The rows of a query whose columns are all text (or NULL, read as "").
async fn strings(db: &DatabaseConnection, sql: &str) -> Vec<Vec<String>> {
    let rows = db
        .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"));
    rows.iter()
        .map(|row| {
            row.column_names()
                .iter()
                .map(|column| {
                    row.try_get::<Option<String>>("", column)
                        .unwrap_or_else(|error| panic!("{sql}: {column}: {error}"))
                        .unwrap_or_default()
                })
                .collect()
        })
        .collect()
}

/// A query's single text column, sorted.
async fn column(db: &DatabaseConnection, sql: &str) -> Vec<String> {
    let mut values: Vec<String> = strings(db, sql)
        .await
        .into_iter()
        .map(|row| row[0].clone())
        .collect();
    values.sort();
    values
}

fn owned(values: &[&str]) -> Vec<String> {
    values.iter().map(|value| value.to_string()).collect()
}

/// Everything about the schema, to compare one migration run with the next.
async fn describe(db: &DatabaseConnection) -> Vec<Vec<Vec<String>>> {
    let queries: &[&str] = match db.get_database_backend() {
        DbBackend::Sqlite => &[
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name",
            "SELECT version FROM seaql_migrations ORDER BY version",
        ],
        _ => &[
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() \
             ORDER BY 1",
            "SELECT table_name, column_name, data_type, is_nullable, column_default \
             FROM information_schema.columns WHERE table_schema = current_schema() \
             ORDER BY table_name, ordinal_position",
            "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE connamespace = current_schema()::regnamespace ORDER BY 1",
            "SELECT proname::text FROM pg_proc WHERE pronamespace = current_schema()::regnamespace \
             ORDER BY 1",
            "SELECT version FROM seaql_migrations ORDER BY version",
        ],
    };
    let mut all = Vec::new();
    for sql in queries {
        all.push(strings(db, sql).await);
    }
    all
}

/// Applies the migrations twice; the second run finds nothing to do and changes nothing.
async fn migrate_twice(db: &DatabaseConnection) {
    Migrator::up(db, None).await.expect("apply the migrations");
    let first = describe(db).await;
    Migrator::up(db, None)
        .await
        .expect("apply the migrations again");
    assert_eq!(
        first,
        describe(db).await,
        "the second run changed the schema"
    );
    assert_eq!(
        column(db, "SELECT version FROM seaql_migrations").await,
        owned(&["m20261201_000001_schema", "m20261202_000001_partitions"])
    );
}

async fn sqlite_database() -> (tempfile::TempDir, DatabaseConnection) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("schema.db").display()
    );
    let db = Database::connect(&url).await.expect("open the SQLite file");
    (dir, db)
}

#[tokio::test]
async fn sqlite_schema_has_every_table_and_index_and_migrating_again_changes_nothing() {
    let (_dir, db) = sqlite_database().await;
    migrate_twice(&db).await;

    assert_eq!(
        column(&db, "SELECT name FROM sqlite_master WHERE type = 'table'").await,
        owned(&TABLES)
    );

    // The indexes as SQLite keeps their statements, quotes aside.
    let mut expected: Vec<Vec<String>> = INDEXES
        .iter()
        .chain([&SQLITE_ACTOR_INDEX])
        .map(|(name, table, columns, predicate)| {
            let predicate = predicate.map(|p| format!(" WHERE {p}")).unwrap_or_default();
            vec![
                name.to_string(),
                format!("CREATE INDEX {name} ON {table} ({columns}){predicate}"),
            ]
        })
        .collect();
    expected.sort();
    let mut actual: Vec<Vec<String>> = strings(
        &db,
        "SELECT name, sql FROM sqlite_master \
         WHERE type = 'index' AND name NOT LIKE 'sqlite_autoindex_%'",
    )
    .await
    .into_iter()
    .map(|row| vec![row[0].clone(), row[1].replace('"', "")])
    .collect();
    actual.sort();
    assert_eq!(actual, expected);

    // `sagas.start_key` is unique (`start` is idempotent on it).
    assert_eq!(
        column(
            &db,
            "SELECT ii.name FROM pragma_index_list('sagas') il, pragma_index_info(il.name) ii \
             WHERE il.\"unique\" = 1 AND il.origin = 'u'"
        )
        .await,
        owned(&["start_key"])
    );

    assert_eq!(
        strings(
            &db,
            "SELECT name FROM pragma_table_info('outbox') ORDER BY cid"
        )
        .await
        .concat(),
        owned(&OUTBOX_COLUMNS)
    );

    // SQLite keeps its foreign keys to `sagas`.
    let mut foreign_keys = strings(
        &db,
        "SELECT m.name, group_concat(f.\"from\", ', '), f.\"table\", f.on_delete \
         FROM sqlite_master m, pragma_foreign_key_list(m.name) f WHERE m.type = 'table' \
         GROUP BY m.name, f.id",
    )
    .await;
    foreign_keys.sort();
    assert_eq!(
        foreign_keys,
        vec![
            owned(&["outbox", "saga_id", "sagas", "CASCADE"]),
            owned(&["saga_history", "saga_id", "sagas", "CASCADE"]),
            owned(&[
                "sagas",
                "name, definition_version",
                "saga_definitions",
                "NO ACTION"
            ]),
            owned(&["step_attempts", "saga_id", "sagas", "CASCADE"]),
        ]
    );
    db.close().await.expect("close");
}

/// A PostgreSQL database of its own, dropped when the test ends, pass or fail.
struct PostgresDb {
    server: String,
    name: String,
}

impl PostgresDb {
    async fn create() -> PostgresDb {
        let server = std::env::var("SAGAFLOW_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("a clock after 1970")
            .as_nanos();
        let name = format!("sagaflow_m_{}_{nanos}", std::process::id());
        let admin = Database::connect(format!("{server}/postgres"))
            .await
            .expect("PostgreSQL must be running (see .ci/run)");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        admin.close().await.expect("close");
        PostgresDb { server, name }
    }

    fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }
}

impl Drop for PostgresDb {
    fn drop(&mut self) {
        let admin_url = format!("{}/postgres", self.server);
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Async work cannot run in Drop; a short-lived runtime on its own thread can.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(admin) = Database::connect(admin_url).await {
                    let _ = admin.execute_unprepared(&drop).await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}

#[tokio::test]
async fn postgres_schema_has_every_table_and_index_and_migrating_again_changes_nothing() {
    let database = PostgresDb::create().await;
    let db = Database::connect(database.url())
        .await
        .expect("connect to the test database");
    migrate_twice(&db).await;

    assert_eq!(
        column(
            &db,
            "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()"
        )
        .await,
        owned(&TABLES)
    );

    // The indexes that back no constraint, as PostgreSQL reports them.
    let mut expected: Vec<Vec<String>> = INDEXES
        .iter()
        .chain([&POSTGRES_ACTOR_INDEX])
        .map(|(name, table, columns, predicate)| {
            let predicate = predicate
                .map(|p| format!(" WHERE ({p})"))
                .unwrap_or_default();
            vec![
                name.to_string(),
                format!("CREATE INDEX {name} ON public.{table} USING btree ({columns}){predicate}"),
            ]
        })
        .collect();
    expected.sort();
    let mut actual = strings(
        &db,
        "SELECT indexname::text, indexdef FROM pg_indexes \
         WHERE schemaname = current_schema() \
         AND indexname NOT IN (SELECT conname FROM pg_constraint)",
    )
    .await;
    actual.sort();
    assert_eq!(actual, expected);

    // Primary keys, `start_key`'s uniqueness, and no foreign keys to `sagas`: only the one
    // from `sagas` to its definition.
    let mut constraints = strings(
        &db,
        "SELECT conrelid::regclass::text, contype::text, pg_get_constraintdef(oid) \
         FROM pg_constraint WHERE connamespace = current_schema()::regnamespace",
    )
    .await;
    constraints.sort();
    assert_eq!(
        constraints,
        vec![
            owned(&["cluster_settings", "p", "PRIMARY KEY (id)"]),
            owned(&["engine_nodes", "p", "PRIMARY KEY (id)"]),
            owned(&["outbox", "p", "PRIMARY KEY (id)"]),
            owned(&["partition_leases", "p", "PRIMARY KEY (partition_id)"]),
            owned(&["saga_definitions", "p", "PRIMARY KEY (name, version)"]),
            owned(&["saga_history", "p", "PRIMARY KEY (saga_id, seq)"]),
            owned(&[
                "sagas",
                "f",
                "FOREIGN KEY (name, definition_version) \
                 REFERENCES saga_definitions(name, version)"
            ]),
            owned(&["sagas", "p", "PRIMARY KEY (id)"]),
            owned(&["sagas", "u", "UNIQUE (start_key)"]),
            owned(&["seaql_migrations", "p", "PRIMARY KEY (version)"]),
            owned(&[
                "step_attempts",
                "p",
                "PRIMARY KEY (saga_id, step, direction, attempt)"
            ]),
        ]
    );

    assert_eq!(
        strings(
            &db,
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = 'outbox' \
             ORDER BY ordinal_position"
        )
        .await
        .concat(),
        owned(&OUTBOX_COLUMNS)
    );

    // No functions of its own (the batch statements read their rows with `json_to_recordset`).
    assert_eq!(
        column(
            &db,
            "SELECT proname::text FROM pg_proc \
             WHERE pronamespace = current_schema()::regnamespace"
        )
        .await,
        Vec::<String>::new()
    );
    db.close().await.expect("close");
}

#[tokio::test]
async fn a_database_from_before_the_squash_is_refused_with_what_to_do() {
    let (_dir, db) = sqlite_database().await;
    Migrator::install(&db).await.expect("the bookkeeping table");
    db.execute_unprepared(
        "INSERT INTO seaql_migrations (version, applied_at) \
         VALUES ('m20261126_000001_core_tables', 0), ('m20261126_000002_outbox', 0)",
    )
    .await
    .expect("record the old migrations");

    let error = Migrator::up(&db, None)
        .await
        .expect_err("an old database must be refused")
        .to_string();
    for expected in ["m20261126_000001_core_tables", "recreate"] {
        assert!(error.contains(expected), "{expected} in {error}");
    }
    assert_eq!(
        column(&db, "SELECT name FROM sqlite_master WHERE type = 'table'").await,
        owned(&["seaql_migrations"]),
        "nothing was created"
    );
    db.close().await.expect("close");
}
