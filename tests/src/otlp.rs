//! An OpenTelemetry collector for the tests: receives OTLP/HTTP trace exports (protobuf or
//! JSON) on a loopback port and keeps the spans, or only counts them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::{AnyValue as Any, KeyValue};
use prost::Message;
use tokio::net::TcpListener;

/// OTLP's span kinds, as numbered on the wire.
pub mod kind {
    /// Work inside one process.
    pub const INTERNAL: i32 = 1;
    /// Sending a message.
    pub const PRODUCER: i32 = 4;
    /// Handling a received message.
    pub const CONSUMER: i32 = 5;
}

/// One span as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// The exporting process's `service.name`.
    pub service: String,
    /// Lowercase hex, 32 digits.
    pub trace_id: String,
    /// Lowercase hex, 16 digits.
    pub span_id: String,
    /// Lowercase hex, 16 digits; empty for a root span.
    pub parent_span_id: String,
    /// The span's name.
    pub name: String,
    /// One of [`kind`].
    pub kind: i32,
    /// Attributes, every value as text.
    pub attributes: BTreeMap<String, String>,
    /// 0 unset, 1 ok, 2 error.
    pub status_code: i32,
}

impl ReceivedSpan {
    /// The value of attribute `key`, if it has one.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// What the receiver keeps of what it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Every span, to be inspected.
    Spans,
    /// Only how many requests and bytes came, nothing decoded: a benchmark's receiver must
    /// not take the CPU the processes it measures need.
    Counts,
}

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    span_count: AtomicU64,
    requests: AtomicU64,
    bytes: AtomicU64,
    refused: AtomicU64,
}

/// A running receiver; it stops when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    received: Arc<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OtlpReceiver {
    /// Starts a receiver keeping every span on a free loopback port.
    pub async fn start() -> OtlpReceiver {
        Self::bind(
            "127.0.0.1:0".parse().expect("a literal address"),
            Keep::Spans,
        )
        .await
        .expect("bind a loopback port for the OTLP receiver")
    }

    /// Starts a receiver on `addr`.
    pub async fn bind(addr: SocketAddr, keep: Keep) -> std::io::Result<OtlpReceiver> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Received::default());
        let state = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, hyper::Error>(receive(request, &state, keep).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(OtlpReceiver {
            addr,
            received,
            task,
        })
    }

    /// What `OTEL_EXPORTER_OTLP_ENDPOINT` takes to export here.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The spans received so far (none when only counting).
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received
            .spans
            .lock()
            .map(|spans| spans.clone())
            .unwrap_or_default()
    }

    /// How many spans came (none counted when only counting requests).
    pub fn span_count(&self) -> u64 {
        self.received.span_count.load(Ordering::Relaxed)
    }

    /// How many export requests came.
    pub fn requests(&self) -> u64 {
        self.received.requests.load(Ordering::Relaxed)
    }

    /// How many bytes of exports came.
    pub fn bytes(&self) -> u64 {
        self.received.bytes.load(Ordering::Relaxed)
    }

    /// How many requests could not be read as a trace export.
    pub fn refused(&self) -> u64 {
        self.received.refused.load(Ordering::Relaxed)
    }
}

async fn receive(
    request: Request<Incoming>,
    state: &Received,
    keep: Keep,
) -> Response<Full<Bytes>> {
    let json = request
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    let path_ok = request.uri().path() == "/v1/traces";
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return answer(StatusCode::BAD_REQUEST, json),
    };
    state.requests.fetch_add(1, Ordering::Relaxed);
    state.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    if keep == Keep::Counts {
        return answer(StatusCode::OK, json);
    }
    let export = if json {
        serde_json::from_slice::<ExportTraceServiceRequest>(&body).map_err(|e| e.to_string())
    } else {
        ExportTraceServiceRequest::decode(body).map_err(|e| e.to_string())
    };
    let Ok(export) = export.map_err(|e| eprintln!("OTLP receiver: unreadable export: {e}")) else {
        state.refused.fetch_add(1, Ordering::Relaxed);
        return answer(StatusCode::BAD_REQUEST, json);
    };
    if !path_ok {
        state.refused.fetch_add(1, Ordering::Relaxed);
        return answer(StatusCode::NOT_FOUND, json);
    }
    let mut spans = Vec::new();
    for resource in export.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(kv.value.as_ref()))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push(ReceivedSpan {
                    service: service.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    attributes: attributes(&span.attributes),
                    status_code: span.status.map_or(0, |s| s.code),
                });
            }
        }
    }
    state
        .span_count
        .fetch_add(spans.len() as u64, Ordering::Relaxed);
    if let Ok(mut kept) = state.spans.lock() {
        kept.extend(spans);
    }
    answer(StatusCode::OK, json)
}

/// An empty `ExportTraceServiceResponse` (full success) in the request's encoding.
fn answer(status: StatusCode, json: bool) -> Response<Full<Bytes>> {
    let (content_type, body) = if json {
        ("application/json", Bytes::from_static(b"{}"))
    } else {
        ("application/x-protobuf", Bytes::new())
    };
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(body))
        .expect("a response of constant parts")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn text(value: Option<&Any>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}
