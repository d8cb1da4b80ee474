//! A private `nats-server` with JetStream for one test: its own free port on 127.0.0.1 and its
//! own temporary store folder, stopped (or killed) and restarted on the same port and store, and
//! always killed when it drops, pass or fail. [`NatsCluster`] is three of them routed into one
//! JetStream cluster.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server gets to accept connections.
const READY_PATIENCE: Duration = Duration::from_secs(20);
/// How long a graceful stop may take before the server is killed.
const STOP_PATIENCE: Duration = Duration::from_secs(10);

/// A `nats-server -js` child process owned by a test.
///
/// ```no_run
/// let mut nats = sagaflow_tests::NatsServer::start();
/// // connect clients to nats.url ...
/// nats.stop(); // SIGTERM: JetStream flushes its store
/// nats.restart(); // same port, same store: streams, consumers and messages are back
/// ```
pub struct NatsServer {
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    /// The client port.
    pub port: u16,
    dir: tempfile::TempDir,
    binary: PathBuf,
    /// Arguments after the common ones (a cluster member's name, cluster port and routes).
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free port with a fresh store, and returns once it accepts
    /// connections. Panics, with the server's log, when it cannot start.
    pub fn start() -> NatsServer {
        NatsServer::start_configured(None)
    }

    /// Starts a server as [`NatsServer::start`] does, with `config` (nats-server's configuration
    /// syntax: `authorization`, `tls`, `accounts`, ...) as its configuration file. The port,
    /// JetStream store and log given on the command line take precedence over the file.
    pub fn start_with_config(config: &str) -> NatsServer {
        NatsServer::start_configured(Some(config))
    }

    fn start_configured(config: Option<&str>) -> NatsServer {
        let binary = nats_server_binary();
        let mut failure = String::new();
        // A free port can be taken by someone else between finding and binding it: try again
        // with another.
        for _ in 0..5 {
            let port = free_port();
            let mut server = NatsServer::unstarted(&binary, port, Vec::new());
            if let Some(config) = config {
                let path = server.dir.path().join("server.conf");
                std::fs::write(&path, config).expect("write the nats-server configuration");
                server.extra_args = vec!["-c".into(), path.display().to_string()];
            }
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => failure = e,
            }
        }
        panic!("nats-server did not start: {failure}");
    }

    /// A server on `port` with a fresh store, not started yet.
    fn unstarted(binary: &Path, port: u16, extra_args: Vec<String>) -> NatsServer {
        NatsServer {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            dir: tempfile::tempdir().expect("a temporary folder for nats-server"),
            binary: binary.to_path_buf(),
            extra_args,
            child: None,
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The JetStream store folder (kept across restarts).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// The server's log file (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// The last `lines` lines of the server's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }

    /// Whether the server process is alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server gracefully (SIGTERM, so JetStream syncs its store) and waits for it to
    /// exit; kills it if it takes longer than ten seconds. Does nothing if it is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let give_up = Instant::now() + STOP_PATIENCE;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the server at once (SIGKILL), as a crash would, and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server (if it runs) and starts it again on the same port with the same store;
    /// returns once it accepts connections. Panics, with the log, when it cannot.
    pub fn restart(&mut self) {
        self.stop();
        // The port is free again once the old process is gone; a moment of TIME_WAIT does not
        // stop nats-server from listening (it sets SO_REUSEADDR), but retry a few times anyway.
        let mut failure = String::new();
        for _ in 0..5 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => {
                    failure = e;
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        panic!(
            "nats-server did not restart on port {}: {failure}",
            self.port
        );
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = self.log_path();
        let mut child = Command::new(&self.binary)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store_dir())
            .arg("-l")
            .arg(&log)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        let give_up = Instant::now() + READY_PATIENCE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "it exited with {status} on port {}; its log ends with:\n{}",
                    self.port,
                    tail(&log, 20)
                ));
            }
            if greets(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= give_up {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "it did not accept connections on port {} within {READY_PATIENCE:?}; its log \
                     ends with:\n{}",
                    self.port,
                    tail(&log, 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How many servers a [`NatsCluster`] has.
pub const CLUSTER_SIZE: usize = 3;
/// How long a starting cluster gets to elect its JetStream meta leader and take in every server.
const CLUSTER_PATIENCE: Duration = Duration::from_secs(30);
/// How long one request of the fixture's own to a server waits for the answer.
const REQUEST_PATIENCE: Duration = Duration::from_secs(2);
/// How long [`NatsCluster::stream_leader`] waits for each server: short, as it is polled during
/// elections (when the stream does not answer).
const LEADER_PATIENCE: Duration = Duration::from_millis(500);

/// Three `nats-server -js` child processes routed into one JetStream cluster, owned by a test.
/// Server `i` is named `n{i}` and has its own client port, cluster port and store folder; each
/// is killed when the cluster drops, pass or fail.
///
/// ```no_run
/// let mut cluster = sagaflow_tests::NatsCluster::start();
/// // connect clients to cluster.urls() (comma-separated) ...
/// let leader = cluster.stream_leader("SAGAFLOW_COMMANDS").expect("a leader");
/// cluster.kill(leader); // SIGKILL, as a crash would
/// cluster.restart(leader); // same ports, same store: it catches up with the others
/// ```
pub struct NatsCluster {
    servers: Vec<NatsServer>,
    /// The `--cluster_name` its servers share.
    pub name: String,
}

impl NatsCluster {
    /// Starts three servers on free ports with fresh stores, and returns once the cluster has a
    /// JetStream meta leader and can place a stream on all three. Panics, with the servers'
    /// logs, when it cannot.
    pub fn start() -> NatsCluster {
        let binary = nats_server_binary();
        let mut failure = String::new();
        // Ports found free can be taken before the servers bind them: try again with others.
        for _ in 0..3 {
            let ports = free_ports(2 * CLUSTER_SIZE);
            let (client_ports, cluster_ports) = ports.split_at(CLUSTER_SIZE);
            let name = format!("sagaflow_test_{}", client_ports[0]);
            let servers = (0..CLUSTER_SIZE)
                .map(|i| {
                    let routes: Vec<String> = (0..CLUSTER_SIZE)
                        .filter(|&j| j != i)
                        .map(|j| format!("nats://127.0.0.1:{}", cluster_ports[j]))
                        .collect();
                    let args = [
                        "--name".to_string(),
                        server_name(i),
                        "--cluster_name".to_string(),
                        name.clone(),
                        "--cluster".to_string(),
                        format!("nats://127.0.0.1:{}", cluster_ports[i]),
                        "--routes".to_string(),
                        routes.join(","),
                    ];
                    NatsServer::unstarted(&binary, client_ports[i], args.to_vec())
                })
                .collect();
            let mut cluster = NatsCluster { servers, name };
            match cluster
                .spawn_all()
                .and_then(|()| cluster.wait_until_ready())
            {
                Ok(()) => return cluster,
                // Dropping the cluster kills what did start.
                Err(e) => failure = e,
            }
        }
        panic!("the nats-server cluster did not start: {failure}");
    }

    fn spawn_all(&mut self) -> Result<(), String> {
        for (i, server) in self.servers.iter_mut().enumerate() {
            server.spawn().map_err(|e| format!("server {i}: {e}"))?;
        }
        Ok(())
    }

    /// Waits until every server answers JetStream requests (so there is a meta leader and each
    /// server is routed to it) and a stream can be placed on all three servers (so the meta
    /// leader knows every one of them).
    fn wait_until_ready(&self) -> Result<(), String> {
        let give_up = Instant::now() + CLUSTER_PATIENCE;
        for i in 0..CLUSTER_SIZE {
            self.wait_for_jetstream(i, give_up)?;
        }
        let probe = "SAGAFLOW_FIXTURE_PROBE";
        let config = format!(
            r#"{{"name":"{probe}","subjects":["sagaflow.fixture.probe"],"storage":"memory","num_replicas":{CLUSTER_SIZE}}}"#
        );
        let mut last = String::new();
        while Instant::now() < give_up {
            match request(
                self.servers[0].port,
                &format!("$JS.API.STREAM.CREATE.{probe}"),
                &config,
                REQUEST_PATIENCE,
            ) {
                Ok(answer) if !answer.contains(r#""error""#) => {
                    return request(
                        self.servers[0].port,
                        &format!("$JS.API.STREAM.DELETE.{probe}"),
                        "",
                        REQUEST_PATIENCE,
                    )
                    .map(drop);
                }
                Ok(answer) => last = answer,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "no stream with {CLUSTER_SIZE} replicas could be placed within \
             {CLUSTER_PATIENCE:?} (last answer: {last}); the logs end with:\n{}",
            self.log_tails(20)
        ))
    }

    /// Waits until server `i` answers `$JS.API.INFO` without an error.
    fn wait_for_jetstream(&self, i: usize, give_up: Instant) -> Result<(), String> {
        let mut last = String::new();
        while Instant::now() < give_up {
            match request(self.servers[i].port, "$JS.API.INFO", "", REQUEST_PATIENCE) {
                Ok(answer) if !answer.contains(r#""error""#) => return Ok(()),
                Ok(answer) => last = answer,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "server {i} did not answer JetStream requests (last answer: {last}); its log ends \
             with:\n{}",
            self.servers[i].log_tail(20)
        ))
    }

    /// The client URLs of all servers, comma-separated, as `--nats-url` takes them.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Server `i` (for its URL, log or process id).
    pub fn server(&self, i: usize) -> &NatsServer {
        &self.servers[i]
    }

    /// Kills server `i` at once (SIGKILL), as a crash would, and waits for it to exit.
    pub fn kill(&mut self, i: usize) {
        self.servers[i].kill();
    }

    /// Starts server `i` again (stopping it first if it runs) on the same ports with the same
    /// store, and returns once it answers JetStream requests. Panics, with its log, when it
    /// cannot.
    pub fn restart(&mut self, i: usize) {
        self.servers[i].restart();
        if let Err(e) = self.wait_for_jetstream(i, Instant::now() + CLUSTER_PATIENCE) {
            panic!("nats-server {i} restarted but {e}");
        }
    }

    /// Which server leads stream `stream` now, as its `$JS.API.STREAM.INFO` says (asking each
    /// running server in turn until one answers); `None` while it has no leader (an election
    /// after its leader went away), when it does not exist, or when no server answers.
    pub fn stream_leader(&mut self, stream: &str) -> Option<usize> {
        let subject = format!("$JS.API.STREAM.INFO.{stream}");
        for i in 0..CLUSTER_SIZE {
            if !self.servers[i].is_running() {
                continue;
            }
            let Ok(answer) = request(self.servers[i].port, &subject, "", LEADER_PATIENCE) else {
                continue;
            };
            if answer.contains(r#""error""#) {
                return None;
            }
            return leader_of(&answer)
                .and_then(|name| (0..CLUSTER_SIZE).find(|&j| server_name(j) == name));
        }
        None
    }

    /// The last `lines` lines of every server's log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        self.servers
            .iter()
            .enumerate()
            .map(|(i, s)| format!("--- {} ({}):\n{}", server_name(i), s.url, s.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        // Each server is killed when it drops too; this says so where the cluster is.
        for server in &mut self.servers {
            server.kill();
        }
    }
}

/// The `--name` of cluster server `i`.
fn server_name(i: usize) -> String {
    format!("n{i}")
}

/// The `cluster.leader` of a `$JS.API.STREAM.INFO` answer.
fn leader_of(answer: &str) -> Option<&str> {
    let cluster = &answer[answer.find(r#""cluster":{"#)?..];
    let leader = &cluster[cluster.find(r#""leader":""#)? + r#""leader":""#.len()..];
    leader.split('"').next().filter(|name| !name.is_empty())
}

/// One request over the NATS protocol to the server on `port`: connects, subscribes to an
/// inbox, publishes `payload` to `subject` with that reply subject and returns the first
/// answer's payload. Enough for the JetStream API, without an async client.
fn request(port: u16, subject: &str, payload: &str, patience: Duration) -> Result<String, String> {
    let give_up = Instant::now() + patience;
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&address, patience)
        .map_err(|e| format!("cannot connect to port {port}: {e}"))?;
    stream
        .set_read_timeout(Some(patience))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let inbox = format!("_INBOX.sagaflow_fixture.{}", uuid::Uuid::new_v4().simple());
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.starts_with("INFO ") {
        return Err(format!(
            "port {port} did not greet as a NATS server: {line:?}"
        ));
    }
    write!(
        writer,
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":false,\"name\":\"sagaflow-tests-fixture\"}}\r\n\
         SUB {inbox} 1\r\nPUB {subject} {inbox} {}\r\n{payload}\r\n",
        payload.len()
    )
    .map_err(|e| e.to_string())?;
    while Instant::now() < give_up {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Err(format!("port {port} closed the connection")),
            Ok(_) => {}
            Err(e) => return Err(format!("no answer to {subject} from port {port}: {e}")),
        }
        let text = line.trim_end();
        if text == "PING" {
            writer.write_all(b"PONG\r\n").map_err(|e| e.to_string())?;
        } else if text.starts_with("-ERR") {
            return Err(format!("port {port} refused {subject}: {text}"));
        } else if let Some(header) = text.strip_prefix("MSG ") {
            let size: usize = header
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("a MSG line without a size: {text}"))?;
            let mut body = vec![0; size + 2];
            reader.read_exact(&mut body).map_err(|e| e.to_string())?;
            body.truncate(size);
            return String::from_utf8(body).map_err(|e| e.to_string());
        }
    }
    Err(format!(
        "no answer to {subject} from port {port} within {patience:?}"
    ))
}

/// Whether a NATS server answers on `port` with its `INFO` greeting.
fn greets(port: u16) -> bool {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO ")
}

/// A port nobody listens on right now, from the kernel.
fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` different ports nobody listens on right now, from the kernel (all bound at once, so
/// none is handed out twice).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .expect("the port of a bound listener")
        })
        .collect()
}

/// `nats-server` from `SAGAFLOW_NATS_SERVER`, the `PATH`, or Debian's `/usr/sbin`.
fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SAGAFLOW_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_default();
    if let Some(found) = on_path {
        return found;
    }
    for candidate in ["/usr/sbin/nats-server", "/usr/local/bin/nats-server"] {
        if Path::new(candidate).is_file() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "nats-server is not installed (no `nats-server` on PATH nor in /usr/sbin); install it \
         with `apt-get install nats-server` (.ci/run does) or set SAGAFLOW_NATS_SERVER"
    );
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_stops_restarts_on_the_same_port_and_store() {
        let mut nats = NatsServer::start();
        assert!(nats.is_running());
        assert!(greets(nats.port));
        assert_eq!(nats.url(), format!("nats://127.0.0.1:{}", nats.port));
        let (port, first_pid) = (nats.port, nats.pid());
        assert!(
            nats.store_dir().join("jetstream").is_dir(),
            "JetStream store"
        );

        nats.stop();
        assert!(!nats.is_running());
        assert!(!greets(port), "stopped");
        nats.restart();
        assert_eq!(nats.port, port);
        assert!(greets(port));
        assert_ne!(nats.pid(), first_pid);

        nats.kill();
        assert!(!greets(port), "killed");
        nats.restart();
        assert!(greets(port));
        assert!(
            nats.log_tail(50).contains("Server is ready"),
            "{}",
            nats.log_tail(50)
        );
    }

    #[test]
    fn a_cluster_forms_and_a_killed_member_comes_back() {
        let mut cluster = NatsCluster::start();
        let urls = cluster.urls();
        assert_eq!(urls.split(',').count(), CLUSTER_SIZE, "{urls}");
        assert_eq!(cluster.stream_leader("NO_SUCH_STREAM"), None);
        let port = cluster.server(1).port;
        cluster.kill(1);
        assert!(!greets(port), "killed");
        cluster.restart(1);
        assert!(greets(port));
        assert_eq!(cluster.server(1).port, port);
        assert!(
            cluster
                .server(1)
                .log_tail(200)
                .contains("JetStream cluster"),
            "{}",
            cluster.log_tails(50)
        );
    }

    #[test]
    fn the_leader_is_read_from_the_cluster_section() {
        let answer = r#"{"config":{"name":"S","placement":{"cluster":"c"}},"cluster":{"name":"c","leader":"n2","replicas":[{"name":"n0"}]}}"#;
        assert_eq!(leader_of(answer), Some("n2"));
        assert_eq!(leader_of(r#"{"cluster":{"name":"c"}}"#), None);
        assert_eq!(leader_of(r#"{"cluster":{"leader":""}}"#), None);
    }
}
