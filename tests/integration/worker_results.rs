//! The worker's idempotency store on PostgreSQL: its lookups stay index lookups while the table
//! grows from empty, whether the store opened its own pool or was handed the worker's, and a
//! store handed a pool keeps that pool's schema.

use std::time::Duration;

use sagaflow_sdk::protocol::StepOutcome;
use sagaflow_sdk::worker::ResultStore;
use sagaflow_tests::{Backend, TestDb};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, Statement};
use serde_json::json;

fn succeeded(n: usize) -> StepOutcome {
    StepOutcome::Succeeded { output: json!(n) }
}

/// `worker_results`' table and index scans so far.
async fn scans(db: &DatabaseConnection) -> (i64, i64) {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT seq_scan, COALESCE(idx_scan, 0) AS idx_scan FROM pg_stat_user_tables \
             WHERE relname = 'worker_results'",
        ))
        .await
        .expect("read the table statistics")
        .expect("worker_results has statistics");
    (
        row.try_get("", "seq_scan").expect("seq_scan"),
        row.try_get("", "idx_scan").expect("idx_scan"),
    )
}

/// Looks up `key-N` for every N at once.
async fn look_up(store: &ResultStore, numbers: Vec<usize>) -> Vec<Option<StepOutcome>> {
    let lookups = numbers.into_iter().map(|n| {
        let store = store.clone();
        async move { store.lookup(&format!("key-{n}")).await.expect("lookup") }
    });
    futures::future::join_all(lookups).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_never_scan_the_whole_table_as_it_grows() {
    for shared_pool in [false, true] {
        let db = TestDb::new(Backend::Postgres).await;
        let handlers = Database::connect(&db.url).await.expect("connect");
        let store = if shared_pool {
            ResultStore::with_connection(handlers.clone()).await
        } else {
            ResultStore::open(&db.url).await
        }
        .expect("open the store");
        // While the table holds three rows and has been analysed so (as autovacuum does to a
        // new table early), PostgreSQL settles on a cached plan for the lookups (sixteen at
        // once, which the store reads in one statement, as on a busy worker).
        for n in 0..3 {
            store
                .record(&format!("key-{n}"), &format!("cmd-{n}"), &succeeded(n))
                .await
                .expect("record");
        }
        handlers
            .execute_unprepared("ANALYZE worker_results")
            .await
            .expect("analyse");
        let mut lookups = 0;
        for _ in 0..10 {
            let found = look_up(&store, (0..16).collect()).await;
            for (n, found) in found.into_iter().enumerate() {
                assert_eq!(found, (n < 3).then(|| succeeded(n)), "key-{n}");
            }
            lookups += 1;
        }
        // Then it grows to 5,000 rows, and every lookup still finds its row.
        for chunk in 0..20 {
            let records = (0..250).map(|i| {
                let (store, n) = (store.clone(), 3 + chunk * 250 + i);
                async move {
                    store
                        .record(&format!("key-{n}"), &format!("cmd-{n}"), &succeeded(n))
                        .await
                }
            });
            for recorded in futures::future::join_all(records).await {
                recorded.expect("record");
            }
        }
        for first in (0..5_000).step_by(50) {
            let keys: Vec<usize> = (first..first + 16).collect();
            let found = look_up(&store, keys.clone()).await;
            for (n, found) in keys.into_iter().zip(found) {
                assert_eq!(found, Some(succeeded(n)), "key-{n}");
            }
            lookups += 1;
        }
        assert_eq!(store.lookup("key-absent").await.expect("lookup"), None);
        lookups += 1;

        // A session reports its statistics when it ends (an idle one only up to ten seconds
        // later): close the store's connections, then read what they reported.
        store.close().await.expect("close the store");
        let mut seen = scans(&handlers).await;
        let mut steady_since = std::time::Instant::now();
        for _ in 0..100 {
            if seen.1 >= lookups && steady_since.elapsed() >= Duration::from_secs(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = scans(&handlers).await;
            if now != seen {
                (seen, steady_since) = (now, std::time::Instant::now());
            }
        }
        let (table_scans, index_scans) = seen;
        assert!(
            index_scans >= lookups,
            "{lookups} lookup statements at least, {index_scans} index scans reported \
             (shared pool: {shared_pool})"
        );
        // Building the new table's primary key read the (empty) table once; nothing else may.
        assert!(
            table_scans <= 1,
            "lookups scanned worker_results whole: {table_scans} table scans \
             (shared pool: {shared_pool})"
        );

        // The handlers' own connections keep the planner's full choice.
        let setting = handlers
            .query_one_raw(Statement::from_string(
                handlers.get_database_backend(),
                "SELECT current_setting('enable_seqscan') AS setting",
            ))
            .await
            .expect("read the setting")
            .expect("one row");
        let setting: String = setting.try_get("", "setting").expect("setting");
        assert_eq!(setting, "on");
        let _ = handlers.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_handed_a_pool_keeps_its_schema() {
    let db = TestDb::new(Backend::Postgres).await;
    let admin = Database::connect(&db.url).await.expect("connect");
    admin
        .execute_unprepared("CREATE SCHEMA worker_side")
        .await
        .expect("create the schema");
    let mut options = ConnectOptions::new(db.url.clone());
    options.set_schema_search_path("worker_side");
    let handlers = Database::connect(options).await.expect("connect");

    let store = ResultStore::with_connection(handlers.clone())
        .await
        .expect("open the store");
    store
        .record("key-1", "cmd-1", &succeeded(1))
        .await
        .expect("record");
    assert_eq!(
        store.lookup("key-1").await.expect("lookup"),
        Some(succeeded(1))
    );

    let count = |table: &'static str| {
        let admin = admin.clone();
        async move {
            admin
                .query_one_raw(Statement::from_string(
                    admin.get_database_backend(),
                    format!(
                        "SELECT count(*) AS n FROM pg_tables \
                         WHERE schemaname || '.' || tablename = '{table}'"
                    ),
                ))
                .await
                .expect("read the catalog")
                .expect("one row")
                .try_get::<i64>("", "n")
                .expect("n")
        }
    };
    assert_eq!(count("worker_side.worker_results").await, 1);
    assert_eq!(count("public.worker_results").await, 0);
    drop(store);
    let _ = handlers.close().await;
    let _ = admin.close().await;
}
