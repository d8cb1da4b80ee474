//! The NATS connection settings every Sagaflow binary takes: flatten [`NatsArgs`] into a clap
//! command and pass [`NatsArgs::security`] to the engine, the worker or the client.
//!
//! Secrets are read from files (or, for a password or token, from an environment variable),
//! never from a command's arguments, which other users of a host can read in its process list.
//!
//! ```
//! use clap::Parser;
//! use sagaflow_sdk::nats::NatsArgs;
//!
//! #[derive(Parser)]
//! struct Args {
//!     #[command(flatten)]
//!     nats: NatsArgs,
//! }
//!
//! let args = Args::parse_from(["my-worker", "--nats-creds", "/etc/sagaflow/worker.creds"]);
//! let security = args.nats.security().expect("valid settings");
//! assert_eq!(security.auth.describe(), "the creds file /etc/sagaflow/worker.creds");
//! ```

use std::path::{Path, PathBuf};

pub use sagaflow_protocol::{NatsAuth, NatsSecurity, NatsTls, Secret};

/// Environment variable holding the NATS password itself (for `--nats-user`), when no
/// password file is given.
pub const PASSWORD_VARIABLE: &str = "SAGAFLOW_NATS_PASSWORD";
/// Environment variable holding the NATS token itself, when no token file is given.
pub const TOKEN_VARIABLE: &str = "SAGAFLOW_NATS_TOKEN";

/// How to authenticate to NATS and encrypt the connection (flags, each with a `SAGAFLOW_NATS_*`
/// environment variable). At most one kind of credentials; TLS combines with any.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsArgs {
    /// User name; the password comes from --nats-password-file or SAGAFLOW_NATS_PASSWORD.
    #[arg(long, env = "SAGAFLOW_NATS_USER", value_name = "USER")]
    pub nats_user: Option<String>,
    /// File holding the password of --nats-user.
    #[arg(long, env = "SAGAFLOW_NATS_PASSWORD_FILE", value_name = "PATH")]
    pub nats_password_file: Option<PathBuf>,
    /// File holding a token (or set SAGAFLOW_NATS_TOKEN to the token itself).
    #[arg(long, env = "SAGAFLOW_NATS_TOKEN_FILE", value_name = "PATH")]
    pub nats_token_file: Option<PathBuf>,
    /// File holding an NKey user seed (`SU...`).
    #[arg(long, env = "SAGAFLOW_NATS_NKEY_SEED_FILE", value_name = "PATH")]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file: a user JWT and its seed.
    #[arg(long, env = "SAGAFLOW_NATS_CREDS", value_name = "PATH")]
    pub nats_creds: Option<PathBuf>,
    /// PEM file of the CA that signed the servers' certificates (turns TLS on).
    #[arg(long, env = "SAGAFLOW_NATS_CA", value_name = "PATH")]
    pub nats_ca: Option<PathBuf>,
    /// PEM file of this client's certificate, for servers that verify clients (with --nats-key).
    #[arg(
        long,
        env = "SAGAFLOW_NATS_CERT",
        value_name = "PATH",
        requires = "nats_key"
    )]
    pub nats_cert: Option<PathBuf>,
    /// PEM file of the private key of --nats-cert.
    #[arg(
        long,
        env = "SAGAFLOW_NATS_KEY",
        value_name = "PATH",
        requires = "nats_cert"
    )]
    pub nats_key: Option<PathBuf>,
    /// Refuse servers that do not offer TLS (implied by --nats-ca and --nats-cert).
    #[arg(long, env = "SAGAFLOW_NATS_TLS")]
    pub nats_tls: bool,
    /// Prefix of this client's reply subjects (default `_INBOX`): give each role its own
    /// (docs/security.md), so the server lets it read its own replies only.
    #[arg(long, env = "SAGAFLOW_NATS_INBOX_PREFIX", value_name = "PREFIX")]
    pub nats_inbox_prefix: Option<String>,
}

/// The NATS settings are contradictory or a secret cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NatsSettingsError(String);

impl NatsArgs {
    /// The credentials and TLS these flags (and the environment) describe, with the secrets
    /// read from their files.
    pub fn security(&self) -> Result<NatsSecurity, NatsSettingsError> {
        self.security_from(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    fn security_from(
        &self,
        variable: impl Fn(&str) -> Option<String>,
    ) -> Result<NatsSecurity, NatsSettingsError> {
        let token = match (&self.nats_token_file, variable(TOKEN_VARIABLE)) {
            (Some(path), _) => Some(read_secret(path, "token")?),
            (None, Some(token)) => Some(Secret::new(token)),
            (None, None) => None,
        };
        let password = match (&self.nats_password_file, variable(PASSWORD_VARIABLE)) {
            (Some(path), _) => Some(read_secret(path, "password")?),
            (None, Some(password)) => Some(Secret::new(password)),
            (None, None) => None,
        };
        let mut kinds = Vec::new();
        if self.nats_user.is_some() {
            kinds.push("--nats-user");
        }
        if token.is_some() {
            kinds.push("a token");
        }
        if self.nats_nkey_seed_file.is_some() {
            kinds.push("--nats-nkey-seed-file");
        }
        if self.nats_creds.is_some() {
            kinds.push("--nats-creds");
        }
        if kinds.len() > 1 {
            return Err(NatsSettingsError(format!(
                "give one kind of NATS credentials, not {}",
                kinds.join(" and ")
            )));
        }
        let auth = if let Some(user) = &self.nats_user {
            let password = password.ok_or_else(|| {
                NatsSettingsError(format!(
                    "--nats-user {user} needs a password: give --nats-password-file, or set \
                     {PASSWORD_VARIABLE}"
                ))
            })?;
            NatsAuth::UserPassword {
                user: user.clone(),
                password,
            }
        } else if password.is_some() {
            return Err(NatsSettingsError(
                "a NATS password is given without --nats-user".into(),
            ));
        } else if let Some(token) = token {
            NatsAuth::Token(token)
        } else if let Some(path) = &self.nats_nkey_seed_file {
            NatsAuth::NkeySeed(read_secret(path, "NKey seed")?)
        } else if let Some(path) = &self.nats_creds {
            NatsAuth::CredsFile(path.clone())
        } else {
            NatsAuth::None
        };
        Ok(NatsSecurity {
            auth,
            tls: NatsTls {
                ca_file: self.nats_ca.clone(),
                client_cert: self.nats_cert.clone().zip(self.nats_key.clone()),
                required: self.nats_tls,
            },
            inbox_prefix: self.nats_inbox_prefix.clone(),
        })
    }
}

/// Reads the secret `what` from `path`, without the line end.
fn read_secret(path: &Path, what: &str) -> Result<Secret, NatsSettingsError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        NatsSettingsError(format!(
            "cannot read the NATS {what} from {}: {e}",
            path.display()
        ))
    })?;
    let value = text.trim_end_matches(['\r', '\n']);
    if value.is_empty() {
        return Err(NatsSettingsError(format!(
            "the NATS {what} file {} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn a_password_comes_from_its_file_or_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = NatsArgs {
            nats_user: Some("engine".into()),
            nats_password_file: Some(secret_file(&dir, "pw", "s3cret\n")),
            ..NatsArgs::default()
        };
        let auth = args.security_from(|_| None).expect("valid").auth;
        assert_eq!(
            auth,
            NatsAuth::UserPassword {
                user: "engine".into(),
                password: Secret::new("s3cret")
            }
        );
        let args = NatsArgs {
            nats_user: Some("engine".into()),
            ..NatsArgs::default()
        };
        let from_env = args
            .security_from(|name| (name == PASSWORD_VARIABLE).then(|| "envpw".into()))
            .expect("valid");
        assert_eq!(
            from_env.auth,
            NatsAuth::UserPassword {
                user: "engine".into(),
                password: Secret::new("envpw")
            }
        );
        let missing = args.security_from(|_| None).expect_err("no password");
        assert!(
            missing.to_string().contains("needs a password"),
            "{missing}"
        );
    }

    #[test]
    fn one_kind_of_credentials_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = NatsArgs {
            nats_creds: Some("/x.creds".into()),
            nats_nkey_seed_file: Some(secret_file(&dir, "seed", "SUAAA")),
            ..NatsArgs::default()
        };
        let error = args.security_from(|_| None).expect_err("two kinds");
        assert!(
            error
                .to_string()
                .contains("--nats-nkey-seed-file and --nats-creds"),
            "{error}"
        );
    }

    #[test]
    fn tls_settings_pass_through_and_an_unreadable_secret_is_named() {
        let args = NatsArgs {
            nats_ca: Some("/ca.pem".into()),
            nats_cert: Some("/c.pem".into()),
            nats_key: Some("/k.pem".into()),
            ..NatsArgs::default()
        };
        let tls = args.security_from(|_| None).expect("valid").tls;
        assert_eq!(tls.ca_file, Some("/ca.pem".into()));
        assert_eq!(tls.client_cert, Some(("/c.pem".into(), "/k.pem".into())));
        let args = NatsArgs {
            nats_token_file: Some("/nonexistent/token".into()),
            ..NatsArgs::default()
        };
        let error = args.security_from(|_| None).expect_err("unreadable");
        assert!(error.to_string().contains("/nonexistent/token"), "{error}");
    }
}
