//! The distributed mode on a nats-server that demands TLS and credentials: the engine
//! (`sagaflow serve`), the demo worker and the harness's own client connect with each kind of
//! credentials the flags take (user and password from a file, a token from the environment, an
//! NKey seed file, a `.creds` file of an operator's user, a client certificate), and the order
//! saga runs to its end; a client whose credentials or certificate the server refuses, or whose
//! creds file is missing, fails at once with a message naming what failed, and writes nothing.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use sagaflow_sdk::protocol::{NatsAuth, NatsSecurity, NatsTls, Secret};
use sagaflow_tests::NatsServer;
use sagaflow_tests::secure_nats::{Operator, Pki, nkey_user};

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
    let setup = setups(&pki)
        .into_iter()
        .next()
        .expect("the user and password setup");
    let server =
        tokio::task::block_in_place(|| NatsServer::start_with_config(&setup.server_config));
    let mut cluster = Cluster::secured("refused", server, setup.child_options()).await;
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
    // And the broker still serves the clients it should.
    let output = run(start(&[
        "--nats-ca",
        &ca,
        "--nats-user",
        "sagaflow",
        "--nats-password-file",
        &good,
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
