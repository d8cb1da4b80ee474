//! A private `nats-server` with JetStream for one test: its own free port on 127.0.0.1 and its
//! own temporary store folder, stopped (or killed) and restarted on the same port and store, and
//! always killed when it drops, pass or fail.

use std::io::{BufRead, BufReader};
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
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free port with a fresh store, and returns once it accepts
    /// connections. Panics, with the server's log, when it cannot start.
    pub fn start() -> NatsServer {
        let binary = nats_server_binary();
        let mut failure = String::new();
        // A free port can be taken by someone else between finding and binding it: try again
        // with another.
        for _ in 0..5 {
            let port = free_port();
            let mut server = NatsServer {
                url: format!("nats://127.0.0.1:{port}"),
                port,
                dir: tempfile::tempdir().expect("a temporary folder for nats-server"),
                binary: binary.clone(),
                child: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => failure = e,
            }
        }
        panic!("nats-server did not start: {failure}");
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
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to find a free port")
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
}
