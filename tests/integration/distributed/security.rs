//! The distributed mode on a nats-server that demands TLS and credentials: the engine
//! (`sagaflow serve`), the demo worker and the harness's own client connect with each kind of
//! credentials the flags take (user and password from a file, a token from the environment, an
//! NKey seed file, a `.creds` file of an operator's user, a client certificate), and the order
//! saga runs to its end; a client whose credentials or certificate the server refuses, or whose
//! creds file is missing, fails at once with a message naming what failed, and writes nothing.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use sagaflow_engine::machine::{RecordKind, SagaStatus};
use sagaflow_sdk::protocol::{Envelope, NatsAuth, NatsSecurity, NatsTls, Secret, SecretKeys};
use sagaflow_tests::NatsServer;
use sagaflow_tests::secure_nats::{Operator, Pki, nkey_user};
use sagaflow_workflows::{PlaceOrder, is_declined};

use super::harness::*;

/// Orders run on each secured broker.
const ORDERS_EACH: usize = 12;

/// One way of connecting: the server's configuration, the flags and environment of the
/// engine and worker, and the harness client's settings.
struct Setup {
    name: &'static str,
    server_config: String,
    nats_args: Vec<String>,
    env: Vec<(String, String)>,
    client: NatsSecurity,
}

impl Setup {
    /// The engine and worker both connect with the setup's flags and environment.
    fn child_options(self) -> ChildOptions {
        ChildOptions {
            env: self.env,
            engine_args: self.nats_args.clone(),
            worker_args: self.nats_args,
            client: self.client,
            ..ChildOptions::default()
        }
    }
}

fn tls_client(pki: &Pki) -> NatsTls {
    NatsTls {
        ca_file: Some(pki.ca.clone()),
        client_cert: None,
        required: true,
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn write_secret(pki: &Pki, file: &str, value: &str) -> String {
    let at = pki.dir().join(file);
    std::fs::write(&at, format!("{value}\n")).expect("write a secret");
    path(&at)
}

fn setups(pki: &Pki) -> Vec<Setup> {
    let ca = vec!["--nats-ca".to_string(), path(&pki.ca)];
    let password = "pw-3f9c1b7e";
    let token = "tok-8d2a6c40";
    let (seed, public_key) = nkey_user();
    let operator = Operator::new(pki.dir());
    let creds = pki.dir().join("user.creds");
    operator.user_creds(&creds);
    vec![
        Setup {
            name: "user_password",
            server_config: format!(
                "{}authorization {{ users = [ {{ user: sagaflow, password: {password:?} }} ] }}\n",
                pki.tls_block(false)
            ),
            nats_args: [
                ca.clone(),
                vec![
                    "--nats-user".into(),
                    "sagaflow".into(),
                    "--nats-password-file".into(),
                    write_secret(pki, "password", password),
                ],
            ]
            .concat(),
            env: Vec::new(),
            client: NatsSecurity {
                auth: NatsAuth::UserPassword {
                    user: "sagaflow".into(),
                    password: Secret::new(password),
                },
                tls: tls_client(pki),
                inbox_prefix: None,
            },
        },
        Setup {
            name: "token",
            server_config: format!(
                "{}authorization {{ token: {token:?} }}\n",
                pki.tls_block(false)
            ),
            nats_args: ca.clone(),
            env: vec![("SAGAFLOW_NATS_TOKEN".into(), token.into())],
            client: NatsSecurity {
                auth: NatsAuth::Token(Secret::new(token)),
                tls: tls_client(pki),
                inbox_prefix: None,
            },
        },
        Setup {
            name: "nkey",
            server_config: format!(
                "{}authorization {{ users = [ {{ nkey: {public_key} }} ] }}\n",
                pki.tls_block(false)
            ),
            nats_args: [
                ca.clone(),
                vec![
                    "--nats-nkey-seed-file".into(),
                    write_secret(pki, "seed", &seed),
                ],
            ]
            .concat(),
            env: Vec::new(),
            client: NatsSecurity {
                auth: NatsAuth::NkeySeed(Secret::new(seed.clone())),
                tls: tls_client(pki),
                inbox_prefix: None,
            },
        },
        Setup {
            name: "creds",
            server_config: format!("{}{}", pki.tls_block(false), operator.server_block()),
            nats_args: [ca.clone(), vec!["--nats-creds".into(), path(&creds)]].concat(),
            env: Vec::new(),
            client: NatsSecurity {
                auth: NatsAuth::CredsFile(creds.clone()),
                tls: tls_client(pki),
                inbox_prefix: None,
            },
        },
        Setup {
            name: "mutual_tls",
            server_config: pki.tls_block(true),
            nats_args: [
                ca.clone(),
                vec![
                    "--nats-cert".into(),
                    path(&pki.client.0),
                    "--nats-key".into(),
                    path(&pki.client.1),
                ],
            ]
            .concat(),
            env: Vec::new(),
            client: NatsSecurity {
                auth: NatsAuth::None,
                tls: NatsTls {
                    client_cert: Some(pki.client.clone()),
                    ..tls_client(pki)
                },
                inbox_prefix: None,
            },
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_saga_runs_over_tls_with_every_kind_of_credentials() {
    let _turn = SERIAL.lock().await;
    let pki = Pki::generate();
    for setup in setups(&pki) {
        let server =
            tokio::task::block_in_place(|| NatsServer::start_with_config(&setup.server_config));
        let name = setup.name;
        let mut cluster = Cluster::secured("secured", server, setup.child_options()).await;
        cluster.phase(&format!("{name}: engine and worker connected"));
        let starts = cluster.spawn_starts(cluster.orders(ORDERS_EACH, 3), Duration::ZERO);
        let started = starts.finish().await;
        let findings = settle_and_verify(&mut cluster, &started).await;
        println!("secured/{name}: {findings:?}");
    }
}

/// The one-engine-one-worker cluster of the first setup: TLS, and a user with a password.
async fn password_cluster(name: &'static str, pki: &Pki) -> Cluster {
    let setup = setups(pki)
        .into_iter()
        .next()
        .expect("the user and password setup");
    let server =
        tokio::task::block_in_place(|| NatsServer::start_with_config(&setup.server_config));
    Cluster::secured(name, server, setup.child_options()).await
}

/// Runs the `sagaflow` binary with `args` (at most 60 s).
fn sagaflow(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(&binaries().engine);
    command
        .args(args)
        .env_remove("SAGAFLOW_NATS_TOKEN")
        .env_remove("SAGAFLOW_NATS_PASSWORD")
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1");
    for (key, value) in env {
        command.env(key, value);
    }
    tokio::task::block_in_place(|| {
        let child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run sagaflow");
        wait_at_most(child, Duration::from_secs(60))
    })
}

fn wait_at_most(mut child: std::process::Child, patience: Duration) -> Output {
    let give_up = std::time::Instant::now() + patience;
    while matches!(child.try_wait(), Ok(None)) {
        if std::time::Instant::now() > give_up {
            let _ = child.kill();
            let output = child.wait_with_output().expect("reap sagaflow");
            panic!(
                "sagaflow did not exit within {patience:?} (it must fail at once on refused \
                 credentials, not retry): {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("collect sagaflow's output")
}

/// Asserts that `output` is a failure whose stderr says `expected`, and carries none of
/// `secrets`.
fn refused(what: &str, output: &Output, expected: &str, secrets: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{what}: it succeeded\n{stderr}");
    assert!(
        stderr.contains(expected),
        "{what}: stderr does not say `{expected}`:\n{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    for secret in secrets {
        assert!(
            !stderr.contains(secret) && !stdout.contains(secret),
            "{what}: the output shows a secret:\n{stderr}"
        );
    }
    println!("{what}: {}", stderr.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_fail_at_once_with_a_clear_message_and_write_nothing() {
    let _turn = SERIAL.lock().await;
    let pki = Pki::generate();
    let mut cluster = password_cluster("refused", &pki).await;
    let url = cluster.nats_server().url();
    let engine_db = cluster.engine_db_url().to_string();
    let wrong = write_secret(&pki, "wrong-password", "not-the-password-71c2");
    let good = write_secret(&pki, "password", "pw-3f9c1b7e");
    let ca = path(&pki.ca);
    let other_ca = path(&pki.other_ca);
    let order = cluster.orders(1, 9).remove(0).to_json().to_string();
    let input = order.as_str();
    let start = |extra: &[&str]| {
        let mut args = vec!["start", "place_order", "--input", input, "--nats-url", &url];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--timeout-secs", "5"]);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sagaflow(&args, &[])
    };

    let cases: [(&str, Vec<&str>, &str); 4] = [
        (
            "start with a wrong password",
            vec![
                "--nats-ca",
                &ca,
                "--nats-user",
                "sagaflow",
                "--nats-password-file",
                &wrong,
            ],
            "the server refused user `sagaflow` and its password",
        ),
        (
            "start trusting another CA",
            vec![
                "--nats-ca",
                &other_ca,
                "--nats-user",
                "sagaflow",
                "--nats-password-file",
                &good,
            ],
            "TLS failed",
        ),
        (
            "start with a missing creds file",
            vec!["--nats-ca", &ca, "--nats-creds", "/nonexistent/user.creds"],
            "cannot read the NATS creds file /nonexistent/user.creds",
        ),
        (
            "start without credentials",
            vec!["--nats-ca", &ca],
            "the server refused a client without credentials",
        ),
    ];
    for (what, extra, expected) in cases {
        let output = run(start(&extra));
        refused(
            what,
            &output,
            expected,
            &["not-the-password-71c2", "pw-3f9c1b7e"],
        );
    }
    // An engine refused by the broker stops at once instead of waiting for it.
    let output = run(vec![
        "serve".into(),
        "--database-url".into(),
        engine_db.clone(),
        "--nats-url".into(),
        url.clone(),
        "--nats-ca".into(),
        ca.clone(),
        "--nats-user".into(),
        "sagaflow".into(),
        "--nats-password-file".into(),
        wrong.clone(),
    ]);
    refused(
        "serve with a wrong password",
        &output,
        "the server refused user `sagaflow` and its password",
        &["not-the-password-71c2"],
    );

    // Nothing was started or written by any of them.
    let sagas = count(cluster.store.connection(), "SELECT COUNT(*) FROM sagas").await;
    assert_eq!(sagas, 0, "a refused client started a saga");
    // And the broker still serves the clients it should (the card sealed by `start`).
    let keys = write_secret(&pki, "secret.keys", sagaflow_tests::TEST_SECRET_KEYS);
    let output = run(start(&[
        "--nats-ca",
        &ca,
        "--nats-user",
        "sagaflow",
        "--nats-password-file",
        &good,
        "--seal",
        "card",
        "--secret-keys",
        &keys,
    ]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "start with the right password failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let id: uuid::Uuid = stdout.trim().parse().expect("start prints the saga id");
    println!("start with the right password: saga {id}");
}

/// The `authorization` block of `docs/security.md`, as it stands there.
fn documented_permissions() -> String {
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/security.md"))
            .expect("read docs/security.md");
    let begin = docs
        .find("<!-- permissions:begin -->")
        .expect("docs/security.md marks where the permissions begin");
    let end = docs
        .find("<!-- permissions:end -->")
        .expect("docs/security.md marks where the permissions end");
    let block = &docs[begin..end];
    let body = block
        .split_once("```conf\n")
        .and_then(|(_, rest)| rest.rsplit_once("```"))
        .map(|(body, _)| body)
        .expect("a ```conf block between the markers");
    body.to_string()
}

fn credentials(user: &str, password: &str, prefix: &str) -> NatsSecurity {
    NatsSecurity {
        auth: NatsAuth::UserPassword {
            user: user.into(),
            password: Secret::new(password),
        },
        tls: NatsTls::default(),
        inbox_prefix: Some(prefix.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_may_touch_only_its_own_saga() {
    let _turn = SERIAL.lock().await;
    let secrets = tempfile::tempdir().expect("a folder for the passwords");
    let passwords = [
        ("ENGINE_PASSWORD", "engine-pw-51d0"),
        ("WORKER_PASSWORD", "worker-pw-8e7b"),
        ("CLIENT_PASSWORD", "client-pw-2c44"),
        ("OPERATOR_PASSWORD", "operator-pw-93fa"),
    ];
    let config = passwords
        .iter()
        .map(|(name, value)| format!("{name}: {value:?}\n"))
        .collect::<String>()
        + &documented_permissions();
    let server = tokio::task::block_in_place(|| NatsServer::start_with_config(&config));
    let log = server.log_path();
    let file = |name: &str, value: &str| {
        let at = secrets.path().join(name);
        std::fs::write(&at, value).expect("write a password");
        path(&at)
    };
    let engine_password = file("engine", passwords[0].1);
    let worker_password = file("worker", passwords[1].1);
    let options = ChildOptions {
        engine_args: [
            "--nats-user",
            "engine",
            "--nats-password-file",
            &engine_password,
            "--nats-inbox-prefix",
            "_INBOX_engine",
        ]
        .map(String::from)
        .to_vec(),
        worker_args: [
            "--saga",
            "place_order",
            "--nats-user",
            "worker-place-order",
            "--nats-password-file",
            &worker_password,
            "--nats-inbox-prefix",
            "_INBOX_worker_place_order",
        ]
        .map(String::from)
        .to_vec(),
        client: credentials("client", passwords[2].1, "_INBOX_client"),
        ..ChildOptions::default()
    };
    let mut cluster = Cluster::secured("least_privilege", server, options).await;
    // Each role does its job with exactly these permissions: the client starts, the engine
    // dispatches, the worker serves place_order.
    let starts = cluster.spawn_starts(cluster.orders(ORDERS_EACH, 5), Duration::ZERO);
    let started = starts.finish().await;
    settle_and_verify(&mut cluster, &started).await;

    // With the worker's credentials: a reply for another saga, a command, a start.
    let sagas_before = count(cluster.store.connection(), "SELECT COUNT(*) FROM sagas").await;
    let history_before = count(
        cluster.store.connection(),
        "SELECT COUNT(*) FROM saga_history",
    )
    .await;
    let url = cluster.nats_server().url();
    let worker = sagaflow_sdk::protocol::connect_with(
        &url,
        &credentials(
            "worker-place-order",
            passwords[1].1,
            "_INBOX_worker_place_order",
        ),
        "forger",
        sagaflow_sdk::protocol::WhileUnreachable::Fail,
        |o| o.request_timeout(Some(Duration::from_secs(2))),
    )
    .await
    .expect("the worker's user connects");
    let js = async_nats::jetstream::new(worker.clone());
    let forged_reply = "sagaflow.reply.0.book_trip";
    let forged_command = "sagaflow.cmd.place_order.reserve_inventory";
    for subject in [forged_reply, forged_command] {
        let stored = match js.publish(subject, "{}".into()).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        assert!(!stored, "the worker's user published on {subject}");
    }
    let start = serde_json::json!({
        "v": 1, "saga": "place_order", "key": "forged-start",
        "input": cluster.orders(1, 77).remove(0).to_json(),
    });
    let answer = worker
        .request("sagaflow.start", start.to_string().into())
        .await;
    assert!(
        answer.is_err(),
        "the worker's user started a saga: {answer:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count(cluster.store.connection(), "SELECT COUNT(*) FROM sagas").await,
        sagas_before,
        "a refused message started a saga"
    );
    assert_eq!(
        count(
            cluster.store.connection(),
            "SELECT COUNT(*) FROM saga_history"
        )
        .await,
        history_before,
        "a refused message changed a saga's history"
    );
    let server_log = std::fs::read_to_string(&log).expect("read the server's log");
    for subject in [forged_reply, forged_command, "sagaflow.start"] {
        assert!(
            server_log
                .lines()
                .any(|l| l.contains("Publish Violation") && l.contains(subject)),
            "the server did not refuse {subject}:\n{}",
            server_log
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Runs the `sagaflow` binary with `args`, reading its output as it comes (a command that
/// prints much would block on a full pipe under [`sagaflow`]).
fn sagaflow_reading(args: &[&str]) -> Output {
    tokio::task::block_in_place(|| {
        Command::new(&binaries().engine)
            .args(args)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .output()
            .expect("run sagaflow")
    })
}

/// The run's orders with card numbers of their own (declined ones still end in 0002), so that
/// finding one anywhere means it leaked from this run.
fn with_own_cards(mut orders: Vec<PlaceOrder>, run: u64) -> Vec<PlaceOrder> {
    for (i, order) in orders.iter_mut().enumerate() {
        // Order ids (the start keys) of their own too: each run's generator starts again.
        order.order_id = format!("{}-run{run}", order.order_id);
        let ending = if is_declined(order.card.expose()) {
            "0002"
        } else {
            "1111"
        };
        order.card = sagaflow_sdk::Secret::new(format!("4{run:03}-{i:04}-7{i:03}-{ending}"));
    }
    orders
}

/// Starts `orders`, their cards sealed with `keys`, adding each saga's id to `started`.
async fn start_orders_sealed(
    cluster: &Cluster,
    orders: &[PlaceOrder],
    keys: &SecretKeys,
    started: &mut std::collections::BTreeMap<String, uuid::Uuid>,
) {
    for order in orders {
        let id = start_sealed_with(
            &cluster.client,
            "place_order",
            &order.order_id,
            order.to_json(),
            keys,
        )
        .await;
        started.insert(order.order_id.clone(), id);
    }
}

/// Each card number as given and as digits only.
fn card_needles(orders: &[PlaceOrder]) -> Vec<String> {
    orders
        .iter()
        .flat_map(|o| {
            let card = o.card.expose().clone();
            let digits = card.chars().filter(char::is_ascii_digit).collect();
            [card, digits]
        })
        .collect()
}

/// The first of `needles` found in `text`.
fn leaked<'a>(text: &str, needles: &'a [String]) -> Option<&'a str> {
    needles
        .iter()
        .find(|n| text.contains(n.as_str()))
        .map(String::as_str)
}

/// Every text and JSON column of every table of `db`, as `(table, column)`.
async fn text_columns(db: &sea_orm::DatabaseConnection) -> Vec<(String, String)> {
    rows(
        db,
        "SELECT table_name::text AS t, column_name::text AS c FROM information_schema.columns \
         WHERE table_schema = 'public' \
         AND data_type IN ('text', 'character varying', 'json', 'jsonb', 'character')",
    )
    .await
    .iter()
    .map(|row| {
        (
            row.try_get::<String>("", "t").expect("a table"),
            row.try_get::<String>("", "c").expect("a column"),
        )
    })
    .collect()
}

/// Asserts that no text or JSON column of any table of `db` holds one of `needles`, and says
/// how many columns it searched.
async fn assert_no_table_holds(
    db: &sea_orm::DatabaseConnection,
    which: &str,
    needles: &[String],
) -> usize {
    let columns = text_columns(db).await;
    assert!(!columns.is_empty(), "{which}: no text column found");
    for (table, column) in &columns {
        for needle in needles {
            let found = count(
                db,
                &format!(
                    "SELECT COUNT(*) FROM \"{table}\" WHERE \"{column}\"::text LIKE '%{needle}%'"
                ),
            )
            .await;
            assert_eq!(
                found, 0,
                "{which}: {table}.{column} holds {needle} in clear"
            );
        }
    }
    columns.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_numbers_are_sealed_everywhere_but_inside_the_workers_and_keys_rotate() {
    let _turn = SERIAL.lock().await;
    let pki = Pki::generate();
    let password = "pw-3f9c1b7e";
    let mut cluster = password_cluster("secrets", &pki).await;
    // Everything published on the broker during the run: starts, registrations, commands,
    // replies.
    let mut wire = cluster
        .client
        .subscribe(">")
        .await
        .expect("subscribe to every subject");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(message) = futures::StreamExt::next(&mut wire).await {
                let text = format!(
                    "{} {:?} {}",
                    message.subject,
                    message.headers,
                    String::from_utf8_lossy(&message.payload)
                );
                seen.lock().unwrap().push(text);
            }
        })
    };

    // Phase 1: orders sealed with the test key, served by a worker holding it; the engine
    // holds no key at all.
    let before = with_own_cards(cluster.orders(ORDERS_EACH, 11), 1);
    let started = cluster
        .spawn_starts(before.clone(), Duration::ZERO)
        .finish()
        .await;
    cluster.wait_settled(started.len()).await;

    // Phase 2, the rotation: orders sealed with the old key wait while the worker is down; it
    // comes back with the new key first and the old one after it, and serves them, and the
    // orders sealed with the new key after them.
    cluster.kill_worker(0);
    cluster.restock(2).await;
    let old_keys = sagaflow_tests::test_secret_keys();
    let waiting = with_own_cards(cluster.orders(ORDERS_EACH, 12), 2);
    let mut all_started = started;
    start_orders_sealed(&cluster, &waiting, &old_keys, &mut all_started).await;
    let rotated_text = format!(
        "{}\n{}",
        sagaflow_tests::NEXT_SECRET_KEY,
        sagaflow_tests::TEST_SECRET_KEYS
    );
    cluster.set_child_env("SAGAFLOW_SECRET_KEYS", &rotated_text);
    cluster.start_worker(0);
    cluster.worker_ready(0).await;
    let rotated = std::sync::Arc::new(
        SecretKeys::parse(&rotated_text, "the rotated keys").expect("the rotated keys parse"),
    );
    let after = with_own_cards(cluster.orders(ORDERS_EACH, 13), 3);
    start_orders_sealed(&cluster, &after, &rotated, &mut all_started).await;
    let findings = settle_and_verify(&mut cluster, &all_started).await;
    println!("secrets: {findings:?}");
    let every_order: Vec<PlaceOrder> = [before, waiting, after].concat();
    let cards = card_needles(&every_order);
    let mut secrets = cards.clone();
    secrets.push(password.to_string());
    secrets.push(
        sagaflow_tests::TEST_SECRET_KEYS
            .split_once(':')
            .map(|(_, key)| key.to_string())
            .expect("an ID:KEY line"),
    );

    // Every envelope opened, whichever key sealed it: no step failed on a secret, the declined
    // cards compensated, and sagas of each key completed. (A good card may still compensate
    // when the worker's restart outlasts a step's retries; that is not the key's doing.)
    let mut completed_by_run = std::collections::BTreeMap::<String, usize>::new();
    for order in &every_order {
        let id = all_started[&order.order_id];
        let saga = cluster.store.load(id).await.unwrap().expect("the saga");
        let history = cluster.store.history(id).await.expect("the history");
        assert!(
            !history
                .iter()
                .any(|h| h.detail["code"] == "secret_unreadable"),
            "{}: {history:#?}",
            order.order_id
        );
        if is_declined(order.card.expose()) {
            assert_eq!(
                saga.state.status,
                SagaStatus::Compensated,
                "{}",
                order.order_id
            );
        } else if saga.state.status == SagaStatus::Completed {
            let run = order.order_id.rsplit('-').next().unwrap_or_default();
            *completed_by_run.entry(run.to_string()).or_default() += 1;
        }
    }
    assert_eq!(
        completed_by_run.keys().collect::<Vec<_>>(),
        ["run1", "run2", "run3"],
        "sagas of every phase completed: {completed_by_run:?}"
    );
    let mut kids = std::collections::BTreeSet::new();
    for order in &every_order {
        let history = cluster
            .store
            .history(all_started[&order.order_id])
            .await
            .expect("the history");
        let envelope = Envelope::of(&history[0].detail["input"]["card"])
            .expect("the stored card is an envelope")
            .expect("a well-formed one");
        kids.insert(envelope.kid);
    }
    assert_eq!(
        kids,
        ["test-1", "test-2"].map(String::from).into(),
        "both keys sealed"
    );

    // No table of either database holds a card number (or the password) in clear.
    let engine_columns =
        assert_no_table_holds(cluster.store.connection(), "engine database", &secrets).await;
    let worker_columns =
        assert_no_table_holds(cluster.demo_db(), "worker database", &secrets).await;
    // Nothing on the wire, and nothing left in the streams.
    tokio::time::sleep(Duration::from_millis(500)).await;
    recorder.abort();
    let wire_text = seen.lock().unwrap().join("\n");
    assert!(
        wire_text.contains("$sagaflow_secret"),
        "the recorder saw the envelopes"
    );
    assert_eq!(
        leaked(&wire_text, &secrets),
        None,
        "a message on the broker"
    );
    for stream in ["SAGAFLOW_COMMANDS", "SAGAFLOW_REPLIES"] {
        let mut stream = cluster.js.get_stream(stream).await.expect("the stream");
        let info = stream.info().await.expect("stream info");
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if let Ok(message) = stream.get_raw_message(seq).await {
                let text = String::from_utf8_lossy(&message.payload);
                assert_eq!(leaked(&text, &secrets), None, "stream message {seq}");
            }
        }
    }
    // Nothing in any log.
    let logs = cluster.all_logs();
    assert_eq!(leaked(&logs, &secrets), None, "the logs");

    // The CLI shows «secret» without the keys, and the card with them.
    let url = cluster.engine_db_url().to_string();
    let first = every_order
        .iter()
        .find(|o| !is_declined(o.card.expose()))
        .expect("a completed order");
    let id = all_started[&first.order_id].to_string();
    let key_file = write_secret(&pki, "secret.keys", &rotated_text);
    let mut outputs = String::new();
    for args in [
        vec!["show", &id, "--database-url", &url],
        vec!["history", &id, "--database-url", &url, "--json"],
        vec!["audit", "--jsonl", "--database-url", &url],
    ] {
        let output = sagaflow_reading(&args);
        assert!(output.status.success(), "{args:?}: {output:?}");
        let text = String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(
            text.contains("«secret»"),
            "{args:?} shows the card as «secret»: {text}"
        );
        outputs.push_str(&text);
    }
    assert_eq!(
        leaked(&outputs, &secrets),
        None,
        "the CLI's output without --reveal"
    );
    let revealed = sagaflow_reading(&[
        "show",
        &id,
        "--database-url",
        &url,
        "--reveal",
        "--secret-keys",
        &key_file,
    ]);
    assert!(revealed.status.success(), "{revealed:?}");
    assert!(
        String::from_utf8_lossy(&revealed.stdout).contains(first.card.expose().as_str()),
        "show --reveal shows the card: {revealed:?}"
    );
    println!(
        "searched {engine_columns} engine and {worker_columns} worker columns, {} broker \
         messages, {} bytes of logs: no card number, password or key in clear",
        seen.lock().unwrap().len(),
        logs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_that_do_not_open_fail_the_step_for_good_and_clear_cards_are_refused() {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::secured("badseal", NatsServer::start(), ChildOptions::default()).await;
    let keys = sagaflow_tests::test_secret_keys();
    let unknown = SecretKeys::parse(sagaflow_tests::NEXT_SECRET_KEY, "an unknown key").unwrap();
    let orders = cluster.orders(3, 21);
    let sealed_card = |order: &PlaceOrder, keys: &SecretKeys| {
        keys.seal("card", &serde_json::json!(order.card.expose()))
            .expect("seal")
    };
    // A card sealed for another member, an altered ciphertext, a key the worker lacks.
    let mut moved = orders[0].to_json();
    moved["card"] = keys
        .seal("iban", &serde_json::json!(orders[0].card.expose()))
        .unwrap();
    let mut altered = orders[1].to_json();
    altered["card"] = sealed_card(&orders[1], &keys);
    altered["card"]["$sagaflow_secret"]["ct"] = serde_json::json!("AAAAAAAAAAAAAAAAAAAAAAAA");
    let mut foreign = orders[2].to_json();
    foreign["card"] = sealed_card(&orders[2], &unknown);
    let mut ids = Vec::new();
    for (key, input, kid) in [
        ("moved", moved, "test-1"),
        ("altered", altered, "test-1"),
        ("foreign", foreign, "test-2"),
    ] {
        let id = start_saga(&cluster.client, key, input).await;
        ids.push((id, kid));
    }
    cluster.wait_settled(ids.len()).await;
    for (id, kid) in ids {
        let history = cluster.store.history(id).await.expect("history");
        let saga = cluster.store.load(id).await.unwrap().expect("saga");
        assert_eq!(saga.state.status, SagaStatus::Compensated, "{history:#?}");
        let failures: Vec<_> = history
            .iter()
            .filter(|h| h.kind == RecordKind::AttemptFailed)
            .collect();
        // authorize_payment reads the card: one attempt, a permanent error, no retry.
        assert_eq!(failures.len(), 1, "{history:#?}");
        let failure = failures[0];
        assert_eq!(
            failure.step.as_deref(),
            Some("reserve_inventory"),
            "the first step opens the input"
        );
        assert_eq!(failure.detail["code"], "secret_unreadable", "{failure:?}");
        assert_eq!(failure.detail["class"], "permanent", "{failure:?}");
        let message = failure.error.as_deref().unwrap_or_default();
        assert!(
            message.contains("`card`") && message.contains(&format!("`{kid}`")),
            "{message}"
        );
    }
    // A card in clear, or a malformed envelope, is refused at the start: nothing is stored.
    let before = count(cluster.store.connection(), "SELECT COUNT(*) FROM sagas").await;
    let mut malformed = orders[0].to_json();
    malformed["card"] = serde_json::json!({"$sagaflow_secret": {"v": 1, "alg": "A256GCM"}});
    for (what, input) in [("clear", orders[0].to_json()), ("malformed", malformed)] {
        let request =
            serde_json::json!({"v": 2, "saga": "place_order", "key": what, "input": input});
        let answer = cluster
            .client
            .request("sagaflow.start", request.to_string().into())
            .await
            .expect("an answer");
        let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
        assert_eq!(answer["code"], "secret_in_clear", "{what}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("`card`"),
            "{answer}"
        );
        assert!(
            !answer
                .to_string()
                .contains(orders[0].card.expose().as_str()),
            "the refusal repeats the card: {answer}"
        );
    }
    assert_eq!(
        count(cluster.store.connection(), "SELECT COUNT(*) FROM sagas").await,
        before
    );
}
