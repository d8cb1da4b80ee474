//! Connecting to NATS with credentials and TLS, the same way in the engine, the SDK worker and
//! the CLI, with errors that say which part failed and what to check.
//!
//! Credentials are one of: a user and password, a token, an NKey seed, or a `.creds` file (a
//! user JWT and its seed, from an operator's account). TLS takes a CA file (the servers'
//! certificates must chain to it) and, for mutual TLS, a client certificate and key. A
//! connection is TLS as soon as any of these is given, or the URL says `tls://`, or the server
//! requires it.
//!
//! Secrets are held as [`Secret`], whose `Debug` shows `«secret»`, so a logged configuration
//! never carries one.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, Event, ServerAddr};
use tracing::{error, warn};

use crate::backoff::Backoff;
use crate::{ProtocolError, server_addrs};

/// A secret value (a password, a token, an NKey seed): shown as `«secret»` by `Debug` and
/// `Display`; [`Secret::expose`] gives the value to what must send it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("«secret»")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("«secret»")
    }
}

/// How a client proves who it is to the NATS servers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials (a server without authorization), or those written in the URL
    /// (`nats://user:password@host`, `nats://token@host`).
    #[default]
    None,
    /// A user and password (`authorization { users = [{ user, password }] }`).
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: Secret,
    },
    /// A token (`authorization { token }`).
    Token(Secret),
    /// An NKey seed (`SU...`); the server knows the user by its public key.
    NkeySeed(Secret),
    /// A `.creds` file: a user JWT and its NKey seed (decentralized authentication).
    CredsFile(PathBuf),
}

impl NatsAuth {
    /// What kind of credentials these are, for messages (never the secret itself).
    pub fn describe(&self) -> String {
        match self {
            NatsAuth::None => "a client without credentials".into(),
            NatsAuth::UserPassword { user, .. } => format!("user `{user}` and its password"),
            NatsAuth::Token(_) => "a token".into(),
            NatsAuth::NkeySeed(_) => "an NKey seed".into(),
            NatsAuth::CredsFile(path) => format!("the creds file {}", path.display()),
        }
    }
}

/// TLS towards the NATS servers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// PEM file of the certificate authorities the servers' certificates must chain to (in
    /// place of the system's).
    pub ca_file: Option<PathBuf>,
    /// PEM files of this client's certificate and private key, for servers that verify
    /// clients (mutual TLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Refuse a server that does not offer TLS.
    pub required: bool,
}

impl NatsTls {
    /// Whether any TLS setting is given.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client_cert.is_some() || self.required
    }
}

/// Credentials and TLS for a NATS connection. The default is neither.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsSecurity {
    /// The credentials.
    pub auth: NatsAuth,
    /// The TLS settings.
    pub tls: NatsTls,
    /// The prefix of this client's reply subjects (`_INBOX` when `None`): a role of its own
    /// lets the server allow each client to subscribe to its own replies only
    /// (`docs/security.md`).
    pub inbox_prefix: Option<String>,
}

/// What [`connect`] does while no server can be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhileUnreachable {
    /// Keep trying, with growing pauses (a service started before its broker). Refused
    /// credentials and failed TLS still end it at once: trying again would not help.
    Wait,
    /// Fail at once (a command run by hand).
    Fail,
}

/// Connects to one of `servers` (one NATS URL, or several separated by commas) as
/// `client_name`, with `security`. Once connected, the client reconnects by itself; a server
/// error after that (a permission refused, credentials revoked) is logged as an error, since
/// the operation it refused only times out.
pub async fn connect(
    servers: &str,
    security: &NatsSecurity,
    client_name: &str,
    unreachable: WhileUnreachable,
) -> Result<async_nats::Client, ProtocolError> {
    connect_with(servers, security, client_name, unreachable, |options| {
        options
    })
    .await
}

/// [`connect`], with `adjust` setting the client's own options (request timeout, inbox
/// prefix) on top of the security settings.
pub async fn connect_with(
    servers: &str,
    security: &NatsSecurity,
    client_name: &str,
    unreachable: WhileUnreachable,
    adjust: impl Fn(ConnectOptions) -> ConnectOptions,
) -> Result<async_nats::Client, ProtocolError> {
    let addrs = server_addrs(servers)?;
    let shown = redact_nats_servers(servers);
    let mut backoff = Backoff::infrastructure();
    loop {
        let options = adjust(connect_options(&addrs, security, client_name).await?);
        match options.connect(addrs.clone()).await {
            Ok(client) => return Ok(client),
            Err(e) => {
                let failure = Failure::of(&e);
                if failure == Failure::Unreachable && unreachable == WhileUnreachable::Wait {
                    backoff
                        .wait_after_failure(&format!("connecting to NATS at {shown}"), &e)
                        .await;
                    continue;
                }
                return Err(ProtocolError::Connect {
                    servers: shown,
                    reason: failure.explain(&e, security),
                });
            }
        }
    }
}

/// The options of a connection with `security`: credentials, TLS, a name, and a log line for
/// every server error once connected.
async fn connect_options(
    addrs: &[ServerAddr],
    security: &NatsSecurity,
    client_name: &str,
) -> Result<ConnectOptions, ProtocolError> {
    let mut options = ConnectOptions::new()
        .name(client_name)
        // A first connection takes at most this long per server; `connect` tries again.
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move { log_event(event) });
    options = match &security.auth {
        // async-nats does not send the credentials of a URL by itself.
        NatsAuth::None => match addrs
            .iter()
            .find_map(|a| a.username().map(|user| (user, a.password())))
        {
            Some((user, Some(password))) => {
                options.user_and_password(user.to_string(), password.to_string())
            }
            Some((token, None)) => options.token(token.to_string()),
            None => options,
        },
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.expose().to_string())
        }
        NatsAuth::Token(token) => options.token(token.expose().to_string()),
        NatsAuth::NkeySeed(seed) => options.nkey(seed.expose().trim().to_string()),
        NatsAuth::CredsFile(path) => {
            options
                .credentials_file(path)
                .await
                .map_err(|e| ProtocolError::Credentials {
                    what: format!("cannot read the NATS creds file {}", path.display()),
                    reason: format!(
                        "{e}; give the path of a .creds file holding a user JWT and its seed \
                         (made with `nsc generate creds` or by your NATS operator)"
                    ),
                })?
        }
    };
    let tls = &security.tls;
    for path in tls
        .ca_file
        .iter()
        .chain(tls.client_cert.iter().flat_map(|(cert, key)| [cert, key]))
    {
        readable(path)?;
    }
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &tls.client_cert {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if tls.is_set() {
        options = options.require_tls(true);
    }
    if let Some(prefix) = &security.inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    Ok(options)
}

/// Fails with a message naming `path` when it cannot be read, before the TLS library says
/// less.
fn readable(path: &Path) -> Result<(), ProtocolError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| ProtocolError::Credentials {
            what: format!("cannot read the TLS file {}", path.display()),
            reason: format!("{e}; check the path given for the CA, certificate or key"),
        })
}

/// Logs what the server says once connected: a refused permission or revoked credentials
/// only make the refused operation time out, so the log is where an operator learns why.
fn log_event(event: Event) {
    match event {
        Event::ServerError(e) => error!(
            error = %e,
            "the NATS server refused an operation: check this client's permissions \
             (docs/security.md lists what each role needs)"
        ),
        Event::ClientError(e) => warn!(error = %e, "NATS connection problem"),
        _ => {}
    }
}

/// Why a connection failed, as far as it tells what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The server refused the credentials (or asked for some and got none).
    Refused,
    /// The credentials could not be used (a malformed seed, a bad creds file).
    BadCredentials,
    /// TLS could not be set up or the handshake failed.
    Tls,
    /// No server answered.
    Unreachable,
}

impl Failure {
    fn of(error: &async_nats::ConnectError) -> Self {
        match error.kind() {
            ConnectErrorKind::AuthorizationViolation => Failure::Refused,
            ConnectErrorKind::Authentication => Failure::BadCredentials,
            ConnectErrorKind::Tls => Failure::Tls,
            // A failed handshake comes as an I/O error carrying the TLS library's.
            _ if tls_in_chain(error) => Failure::Tls,
            _ => Failure::Unreachable,
        }
    }

    fn explain(self, error: &async_nats::ConnectError, security: &NatsSecurity) -> String {
        let detail = chain(error);
        match self {
            Failure::Refused => format!(
                "the server refused {} ({detail}); check the credentials against the server's \
                 authorization settings",
                security.auth.describe()
            ),
            Failure::BadCredentials => format!(
                "cannot use {} ({detail}); an NKey seed starts with `SU` and a creds file holds \
                 a user JWT and its seed",
                security.auth.describe()
            ),
            Failure::Tls => format!(
                "TLS failed ({detail}); check that the CA file names the authority that signed \
                 the server's certificate, that the host in the URL is one the certificate \
                 names, and, if the server verifies clients, the client certificate and key"
            ),
            Failure::Unreachable => format!(
                "no server answered ({detail}); check that nats-server runs at that address"
            ),
        }
    }
}

/// Whether a TLS library error is among `error`'s sources.
fn tls_in_chain(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = error.source();
    while let Some(e) = source {
        if e.is::<async_nats::rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// `error` and its sources, as one line.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// `servers` (a comma-separated list of NATS URLs) with the credentials in them masked:
/// `nats://user:***@host`, `nats://***@host` for a token.
pub fn redact_nats_servers(servers: &str) -> String {
    servers
        .split(',')
        .map(|entry| {
            let entry = entry.trim();
            let Some((scheme, rest)) = entry.split_once("://") else {
                return match entry.rsplit_once('@') {
                    Some((_, host)) => format!("***@{host}"),
                    None => entry.to_string(),
                };
            };
            match rest.rsplit_once('@') {
                Some((credentials, host)) => match credentials.split_once(':') {
                    Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                    None => format!("{scheme}://***@{host}"),
                },
                None => entry.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_shown_without_their_credentials() {
        assert_eq!(
            redact_nats_servers("nats://u:pw@a:4222, tls://tok@b,c:4223,pw2@d"),
            "nats://u:***@a:4222,tls://***@b,c:4223,***@d"
        );
        assert_eq!(redact_nats_servers("nats://a:4222"), "nats://a:4222");
    }

    #[test]
    fn secrets_are_not_shown_by_debug() {
        let security = NatsSecurity {
            auth: NatsAuth::UserPassword {
                user: "engine".into(),
                password: Secret::new("hunter2"),
            },
            ..NatsSecurity::default()
        };
        let shown = format!("{security:?} {}", security.auth.describe());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("«secret»"), "{shown}");
        assert!(shown.contains("engine"), "{shown}");
    }
}
