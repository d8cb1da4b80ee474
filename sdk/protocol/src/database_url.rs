//! How a database URL given on a command line becomes the URL the driver opens. The engine and
//! the worker's idempotency table read it the same way.

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
    let postgres = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"));
    match postgres {
        Some(rest) if !url.contains("sslmode=") && is_loopback(host_of(rest)) => {
            format!("{url}{}sslmode=disable", separator(url))
        }
        _ => url.to_string(),
    }
}

fn separator(url: &str) -> char {
    if url.contains('?') { '&' } else { '?' }
}

/// The host of `user:password@host:port/db?params` (the part after the scheme).
fn host_of(rest: &str) -> &str {
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(bracketed) = host_port.strip_prefix('[') {
        return bracketed.split(']').next().unwrap_or_default();
    }
    host_port.split(':').next().unwrap_or_default()
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::database_url;

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
