//! A local OpenTelemetry receiver for benchmarks and debugging: takes OTLP/HTTP trace exports
//! (protobuf or JSON) on a loopback address and counts the requests and bytes (decoding
//! nothing, so that it takes little CPU from what is measured), or decodes and prints every
//! span (`--print`).
//!
//! ```text
//! cargo run --release -p sagaflow-tests --bin otlp-sink -- 127.0.0.1:4318 [--print]
//! ```
//!
//! Point the processes at it with `OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318`. It
//! prints the count each second it changes, and once more when stopped (Ctrl-C or SIGTERM).

use std::net::SocketAddr;
use std::time::Duration;

use sagaflow_tests::otlp::{Keep, OtlpReceiver};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .ok_or("usage: otlp-sink ADDR [--print]")?
        .parse()?;
    let print = args.next().as_deref() == Some("--print");
    let keep = if print { Keep::Spans } else { Keep::Counts };
    let receiver = OtlpReceiver::bind(addr, keep).await?;
    eprintln!("otlp-sink: receiving on {}", receiver.endpoint());
    let mut stop = std::pin::pin!(stopped());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut shown, mut printed) = (u64::MAX, 0);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
        }
        if print {
            let spans = receiver.spans();
            for span in &spans[printed..] {
                println!(
                    "{} {} trace={} span={} parent={} {:?}",
                    span.service,
                    span.name,
                    span.trace_id,
                    span.span_id,
                    span.parent_span_id,
                    span.attributes
                );
            }
            printed = spans.len();
        }
        if receiver.requests() != shown {
            shown = receiver.requests();
            eprintln!(
                "otlp-sink: {shown} requests, {} bytes, {} spans decoded",
                receiver.bytes(),
                receiver.span_count()
            );
        }
    }
    println!(
        "otlp-sink: {} requests, {} bytes, {} spans decoded, {} refused",
        receiver.requests(),
        receiver.bytes(),
        receiver.span_count(),
        receiver.refused()
    );
    Ok(())
}

async fn stopped() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
