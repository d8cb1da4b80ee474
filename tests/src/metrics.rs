//! Reading a process's `/metrics` as Prometheus would, and the series `docs/metrics.md`
//! promises.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// A loopback address with a free port, for a child's `--metrics-addr`.
pub fn free_metrics_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener.local_addr().expect("the bound address")
}

/// One scrape: the text and what a Prometheus text-format parser made of it.
pub struct Scrape {
    /// The body as served.
    pub text: String,
    /// The parsed samples (histograms folded into one sample per label set).
    pub parsed: prometheus_parse::Scrape,
}

impl Scrape {
    /// The sum of every sample of `name` whose labels include `labels` (counters, gauges and
    /// untyped samples; a histogram's `_count` and `_sum` are their own names).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.parsed
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    /// Each metric family (`# TYPE` line) with its type and the label names its samples carry
    /// (`le` of histogram buckets left out): what a rename or a new label changes.
    pub fn families(&self) -> BTreeMap<String, (String, BTreeSet<String>)> {
        let mut families: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
        for line in self.text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    families.insert(name.to_string(), (kind.to_string(), BTreeSet::new()));
                }
            }
        }
        for line in self.text.lines().filter(|l| !l.starts_with('#')) {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let sample = &line[..name_end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    sample
                        .strip_suffix(suffix)
                        .filter(|base| families.get(*base).is_some_and(|(k, _)| k == "histogram"))
                })
                .unwrap_or(sample);
            let Some((_, labels)) = families.get_mut(family) else {
                continue;
            };
            if let Some(body) = line[name_end..]
                .strip_prefix('{')
                .and_then(|rest| rest.split_once('}'))
                .map(|(body, _)| body)
            {
                for pair in body.split("\",") {
                    if let Some((key, _)) = pair.split_once('=')
                        && key != "le"
                    {
                        labels.insert(key.trim().to_string());
                    }
                }
            }
        }
        families
    }

    /// How many sample lines the text has and how many the parser read: equal when the whole
    /// text is in the format (the parser skips what it cannot read).
    pub fn lines_and_parsed(&self) -> (usize, usize) {
        let lines = self
            .text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter(|l| !l.contains("_bucket{") && !l.contains("_bucket "))
            .count();
        let parsed = self
            .parsed
            .samples
            .iter()
            .filter(|s| !matches!(s.value, prometheus_parse::Value::Histogram(_)))
            .count();
        (lines, parsed)
    }
}

/// GETs `http://{addr}/metrics` and parses it; panics with the reason when it cannot.
pub fn scrape(addr: SocketAddr) -> Scrape {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to the metrics endpoint {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read the response");
    let response = String::from_utf8(response).expect("the response is UTF-8");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response with a body");
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "GET /metrics on {addr} answered {head}"
    );
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        unchunk(body)
    } else {
        body.to_string()
    };
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("the body parses as the Prometheus text format");
    Scrape { text: body, parsed }
}

/// The body of a chunked HTTP/1.1 response.
fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The series `docs/metrics.md` documents, with the processes its table says serve them
/// (`serve`, `demo`, `worker`): every table row whose first cell is a `sagaflow_` name.
pub fn documented_series() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"),
    )
    .expect("read docs/metrics.md");
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `name` | type | labels | processes | meaning |
        if cells.len() < 6 {
            continue;
        }
        let Some(name) = cells[1]
            .strip_prefix('`')
            .and_then(|c| c.strip_suffix('`'))
            .filter(|n| n.starts_with("sagaflow_"))
        else {
            continue;
        };
        series
            .entry(name.to_string())
            .or_default()
            .extend(cells[4].split(',').map(|p| p.trim().to_string()));
    }
    series
}
