//! The secret-key setting every Sagaflow binary takes: flatten [`SecretKeyArgs`] into a clap
//! command and pass [`SecretKeyArgs::keys`] to the worker, the engine or the client.
//!
//! ```
//! use clap::Parser;
//! use sagaflow_sdk::keys::SecretKeyArgs;
//!
//! #[derive(Parser)]
//! struct Args {
//!     #[command(flatten)]
//!     keys: SecretKeyArgs,
//! }
//!
//! let args = Args::parse_from(["my-worker", "--secret-keys", "/etc/sagaflow/keys"]);
//! assert!(args.keys.keys().is_err(), "no such file here");
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use crate::protocol::{ProtocolError, SecretKeys};

/// Environment variable holding the keys themselves (the key file's text; entries may be
/// separated by commas), when no key file is given.
pub const KEYS_VARIABLE: &str = "SAGAFLOW_SECRET_KEYS";

/// Where the keys of secret fields come from.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecretKeyArgs {
    /// File of keys for secret fields: one `ID:BASE64` per line (`sagaflow keygen` makes one),
    /// the sealing key first, older keys after it to open what they sealed. Without it, the
    /// keys come from SAGAFLOW_SECRET_KEYS, if set.
    #[arg(long, env = "SAGAFLOW_SECRET_KEYS_FILE", value_name = "PATH")]
    pub secret_keys: Option<PathBuf>,
}

impl SecretKeyArgs {
    /// The keys the flag or the environment gives, or `None` when neither does.
    pub fn keys(&self) -> Result<Option<Arc<SecretKeys>>, ProtocolError> {
        if let Some(path) = &self.secret_keys {
            return SecretKeys::from_file(path).map(|keys| Some(Arc::new(keys)));
        }
        match std::env::var(KEYS_VARIABLE) {
            Ok(text) => SecretKeys::parse(&text, KEYS_VARIABLE).map(|keys| Some(Arc::new(keys))),
            Err(_) => Ok(None),
        }
    }
}
