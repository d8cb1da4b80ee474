//! How a database URL given on a command line becomes the URL the driver opens. The engine and
//! the worker's idempotency table read it the same way.

use url::{Host, Url};

/// Completes a database URL:
///
/// - `sqlite:PATH`, `sqlite://PATH` or a bare path: a SQLite file, created when missing
///   (`mode=rwc`), unless the URL names a mode.
/// - `postgres://` on a loopback host without an `sslmode`: `sslmode=disable`. TLS to the same
///   machine protects nothing, and with it the driver (sqlx 0.9.0, which does not set
///   `TCP_NODELAY`) splits every statement over 16 KiB into TLS records that wait for the
///   server's delayed ACK: a batch commit took 50 ms instead of 10. Name an `sslmode` to choose
///   otherwise.
/// - anything else: unchanged.
///
/// ```
/// use sagaflow_protocol::database_url;
///
/// assert_eq!(database_url("demo.db"), "sqlite://demo.db?mode=rwc");
/// assert_eq!(
///     database_url("postgres://u@127.0.0.1:5432/db"),
///     "postgres://u@127.0.0.1:5432/db?sslmode=disable"
/// );
/// assert_eq!(database_url("postgres://u@db.internal/db"), "postgres://u@db.internal/db");
/// ```
pub fn database_url(url: &str) -> String {
    let sqlite_path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .or_else(|| (!url.contains("://")).then_some(url));
    if let Some(path) = sqlite_path {
        return if path.contains("mode=") {
            format!("sqlite://{path}")
        } else {
            format!("sqlite://{path}{}mode=rwc", separator(path))
        };
    }
    let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
    match postgres {
        true if !url.contains("sslmode=") && is_loopback(host_of(url)) => {
            format!("{url}{}sslmode=disable", separator(url))
        }
        _ => url.to_string(),
    }
}

/// The file of a SQLite URL (`sqlite://F`, `sqlite:F` or a bare path), without its options;
/// `None` for another database or an in-memory one.
///
/// ```
/// use sagaflow_protocol::sqlite_file;
///
/// assert_eq!(sqlite_file("sqlite://a/b.db?mode=rwc"), Some("a/b.db"));
/// assert_eq!(sqlite_file("b.db"), Some("b.db"));
/// assert_eq!(sqlite_file("sqlite::memory:"), None);
/// assert_eq!(sqlite_file("postgres://u@h/db"), None);
/// ```
pub fn sqlite_file(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .or_else(|| (!url.contains("://")).then_some(url))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then_some(path)
}

fn separator(url: &str) -> char {
    if url.contains('?') { '&' } else { '?' }
}

/// The host a `postgres://` URL names, as `url` parses it (brackets of an IPv6 address removed).
fn host_of(url: &str) -> Option<String> {
    let parsed = Url::parse(url).ok()?;
    match parsed.host()? {
        Host::Domain(name) => Some(name.to_string()),
        Host::Ipv4(ip) => Some(ip.to_string()),
        Host::Ipv6(ip) => Some(ip.to_string()),
    }
}

fn is_loopback(host: Option<String>) -> bool {
    host.is_some_and(|host| {
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

/// Query parameters that carry a secret in a database URL (libpq and sqlx names).
const SECRET_PARAMETERS: [&str; 3] = ["password", "sslpassword", "pass"];

/// A database URL as it may be shown in logs and errors: the password in the user part and in
/// any `password`-like query parameter replaced by `***`. A URL without one is returned as is.
///
/// ```
/// use sagaflow_protocol::redact_database_url;
///
/// assert_eq!(redact_database_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
/// assert_eq!(
///     redact_database_url("postgres://u@h/db?password=secret&sslmode=require"),
///     "postgres://u@h/db?password=***&sslmode=require"
/// );
/// assert_eq!(redact_database_url("sqlite://demo.db?mode=rwc"), "sqlite://demo.db?mode=rwc");
/// ```
pub fn redact_database_url(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url) else {
        // Not a URL (a bare SQLite path): nothing in it is a credential the parser could find,
        // but never print what looks like one.
        return match url.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => url.to_string(),
        };
    };
    let mut changed = false;
    if parsed.password().is_some() {
        // Infallible for a URL that has a password: it has a host to carry credentials.
        let _ = parsed.set_password(Some("***"));
        changed = true;
    }
    let secret = |key: &str| {
        SECRET_PARAMETERS
            .iter()
            .any(|name| key.eq_ignore_ascii_case(name))
    };
    if parsed.query_pairs().any(|(key, _)| secret(&key)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if secret(&key) {
                    "***".to_string()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
        changed = true;
    }
    if changed {
        // `***` as written, not percent-encoded: it reads as a mask, not as a value.
        parsed.as_str().replace("%2A%2A%2A", "***")
    } else {
        url.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::{database_url, redact_database_url};

    #[test]
    fn credentials_never_show_in_any_form() {
        for (url, shown) in [
            ("postgres://u:secret@h/db", "postgres://u:***@h/db"),
            (
                "postgres://u:p%40ss@10.0.0.7:5432/db",
                "postgres://u:***@10.0.0.7:5432/db",
            ),
            (
                "postgresql://u@h/db?password=secret",
                "postgresql://u@h/db?password=***",
            ),
            (
                "postgres://h/db?user=u&PASSWORD=secret&sslmode=disable",
                "postgres://h/db?user=u&PASSWORD=***&sslmode=disable",
            ),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("sqlite:///tmp/x.db?mode=rwc", "sqlite:///tmp/x.db?mode=rwc"),
            ("demo.db", "demo.db"),
        ] {
            assert_eq!(redact_database_url(url), shown, "{url}");
            assert!(!redact_database_url(url).contains("secret"), "{url}");
        }
    }

    #[test]
    fn sqlite_files_are_created_unless_a_mode_is_named() {
        assert_eq!(database_url("demo.db"), "sqlite://demo.db?mode=rwc");
        assert_eq!(database_url("sqlite:x.db"), "sqlite://x.db?mode=rwc");
        assert_eq!(
            database_url("sqlite:///tmp/x.db"),
            "sqlite:///tmp/x.db?mode=rwc"
        );
        assert_eq!(
            database_url("sqlite://x.db?mode=ro"),
            "sqlite://x.db?mode=ro"
        );
        assert_eq!(
            database_url("sqlite://x.db?cache=shared"),
            "sqlite://x.db?cache=shared&mode=rwc"
        );
    }

    #[test]
    fn loopback_postgres_goes_without_tls_unless_told() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/test",
            "postgresql://u:p@localhost/db",
            "postgres://u@[::1]:5432/db",
            "postgres://127.0.0.1/db",
        ] {
            assert_eq!(database_url(url), format!("{url}?sslmode=disable"));
        }
        assert_eq!(
            database_url("postgres://u@127.0.0.1/db?application_name=x"),
            "postgres://u@127.0.0.1/db?application_name=x&sslmode=disable"
        );
        for unchanged in [
            "postgres://u@127.0.0.1/db?sslmode=require",
            "postgres://u@db.example/db",
            "postgres://u:p%40ss@10.0.0.7:5432/db",
            "mysql://u@127.0.0.1/db",
        ] {
            assert_eq!(database_url(unchanged), unchanged);
        }
    }
}
