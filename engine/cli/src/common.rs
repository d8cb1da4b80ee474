//! What the operator and audit commands share: where the database is, the output form, and
//! how times and durations are read.

use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use anyhow::bail;
use sagaflow_engine::machine::SagaStatus;
use sagaflow_engine::ops::time::{parse_duration, parse_instant};
use sagaflow_engine::ops::{Disclosure, ListFilter, TimeRange, Versioned};
use sagaflow_engine::store::Store;
use sagaflow_sdk::Timestamp;
use sagaflow_sdk::keys::SecretKeyArgs;
use serde::Serialize;
use strum::VariantNames;

/// The database a command reads.
#[derive(Debug, clap::Args)]
pub struct DatabaseArgs {
    /// The engine's database: sqlite://FILE or postgres://USER@HOST:PORT/DB.
    #[arg(
        long,
        env = "SAGAFLOW_DATABASE_URL",
        default_value = "sqlite://sagaflow-demo.db"
    )]
    pub database_url: String,
}

impl DatabaseArgs {
    /// Opens the database. A SQLite file that does not exist is refused rather than created:
    /// an empty new file would answer every query with nothing, hiding a mistyped path.
    pub async fn open(&self) -> anyhow::Result<Store> {
        if let Some(path) = sagaflow_protocol::sqlite_file(&self.database_url)
            && !Path::new(path).exists()
        {
            bail!(
                "there is no database at `{path}`; pass --database-url (or set \
                 SAGAFLOW_DATABASE_URL) with the engine's database: sqlite://FILE or \
                 postgres://USER@HOST:PORT/DB"
            );
        }
        Ok(Store::connect(&self.database_url).await?)
    }
}

/// Whether secret fields are shown, and with which keys.
#[derive(Debug, clap::Args)]
pub struct RevealArgs {
    /// Show secret fields in clear, opened with the keys of --secret-keys (or
    /// SAGAFLOW_SECRET_KEYS); without it they show as «secret».
    #[arg(long)]
    pub reveal: bool,
    #[command(flatten)]
    pub keys: SecretKeyArgs,
}

impl RevealArgs {
    /// How the views show secret fields.
    pub fn disclosure(&self) -> anyhow::Result<Disclosure> {
        if !self.reveal {
            return Ok(Disclosure::Redacted);
        }
        match self.keys.keys()? {
            Some(keys) => Ok(Disclosure::Revealed(keys)),
            None => bail!(
                "--reveal needs the keys that sealed the secret fields: give --secret-keys FILE \
                 (or set SAGAFLOW_SECRET_KEYS_FILE or SAGAFLOW_SECRET_KEYS)"
            ),
        }
    }
}

/// Which sagas: the filters of `sagaflow list`, shared with the bulk actions.
#[derive(Debug, clap::Args)]
#[group(id = "filters", multiple = true)]
pub struct SagaFilterArgs {
    /// Only sagas in this status (repeat it, or separate with commas, for several).
    #[arg(long, value_delimiter = ',', value_parser = named::<SagaStatus>())]
    pub status: Vec<SagaStatus>,
    /// Only sagas of this definition name.
    #[arg(long)]
    pub name: Option<String>,
    /// Only sagas pinned to this definition version.
    #[arg(long)]
    pub version: Option<u32>,
    /// Only sagas working on, or stuck at, this step (by name).
    #[arg(long)]
    pub step: Option<String>,
    /// Only sagas created at or after this time (RFC3339, a UTC date, or a duration ago: 2h).
    #[arg(long, value_parser = instant)]
    pub created_since: Option<Timestamp>,
    /// Only sagas created before this time.
    #[arg(long, value_parser = instant)]
    pub created_before: Option<Timestamp>,
    /// Only sagas last changed at or after this time.
    #[arg(long, value_parser = instant)]
    pub updated_since: Option<Timestamp>,
    /// Only sagas last changed before this time.
    #[arg(long, value_parser = instant)]
    pub updated_before: Option<Timestamp>,
    /// Only sagas whose last error contains this text (ignoring case).
    #[arg(long)]
    pub error: Option<String>,
    /// Only the saga started with this start key.
    #[arg(long)]
    pub start_key: Option<String>,
}

impl SagaFilterArgs {
    /// The library's filter.
    pub fn into_filter(self) -> ListFilter {
        ListFilter {
            statuses: self.status,
            name: self.name,
            version: self.version,
            current_step: self.step,
            created: TimeRange {
                from: self.created_since,
                until: self.created_before,
            },
            updated: TimeRange {
                from: self.updated_since,
                until: self.updated_before,
            },
            error_contains: self.error,
            start_key: self.start_key,
        }
    }
}

/// For clap: one of the names of an enum that crosses layers (a status, a record kind, a
/// direction), parsed into the enum. Like `clap::ValueEnum`, `--help` and shell completions
/// list the names and a wrong one is refused with them; the names come from the enum itself
/// (strum), so the CLI cannot drift from what the database and the JSON say.
pub fn named<T>() -> impl clap::builder::TypedValueParser<Value = T>
where
    T: VariantNames + FromStr<Err = strum::ParseError> + Clone + Send + Sync + 'static,
{
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(T::VARIANTS).try_map(|name| name.parse::<T>())
}

/// Table or JSON.
#[derive(Debug, clap::Args)]
pub struct OutputArgs {
    /// Print JSON (one document) for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Prints `value` as pretty JSON on stdout, after the format's version (`docs/cli-json.md`).
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    print_text(serde_json::to_string_pretty(&Versioned::new(value))?)
}

/// Prints `text` and a newline on stdout. Unlike `println!`, a closed stdout (the reader of a
/// pipe went away) is an error to return, not a panic: `main` then exits quietly.
pub fn print_text(text: impl std::fmt::Display) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

/// Whether `error` comes from writing to a pipe whose reader has gone away (`| head`).
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// For clap: an instant as RFC3339, a UTC date, or a duration meaning that long ago.
pub fn instant(text: &str) -> Result<Timestamp, String> {
    parse_instant(text, Timestamp::now()).map_err(|e| e.to_string())
}

/// For clap: a duration such as 15m, 2h, 7d.
pub fn duration(text: &str) -> Result<std::time::Duration, String> {
    parse_duration(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `--kind` (and `--status`, `--direction`) accept: every name the enum has, and
    /// nothing else, refused with the list.
    #[test]
    fn every_record_kind_is_listed_and_parses() {
        use clap::builder::TypedValueParser;
        use sagaflow_engine::machine::RecordKind;

        let command = clap::Command::new("audit");
        let parse = |text: &str| named::<RecordKind>().parse_ref(&command, None, text.as_ref());
        for kind in RecordKind::VARIANTS {
            assert_eq!(parse(kind).map(RecordKind::as_str).ok(), Some(*kind));
        }
        for expected in [
            "saga_started",
            "attempt_succeeded",
            "operator_action",
            "saga_compensated",
        ] {
            assert!(RecordKind::VARIANTS.contains(&expected), "{expected}");
        }
        let error = parse("compensated").expect_err("not a kind").to_string();
        assert!(error.contains("invalid value 'compensated'"), "{error}");
        assert!(
            error.contains("attempt_succeeded"),
            "the kinds are listed: {error}"
        );
    }
}
