//! W3C trace context on the protocol's messages (`docs/protocol.md` section 6): the
//! `traceparent` and `tracestate` headers that put every span of one saga, in the engine and in
//! every worker, into one trace.
//!
//! A saga's trace id is its saga id (the UUID's 16 bytes), and its root span id is the UUID's
//! last 8 bytes, so any process can name a saga's trace without asking anyone: a worker that
//! gets a command without `traceparent` still joins the saga's trace with
//! [`TraceParent::of_saga`].

use std::fmt;

use uuid::Uuid;

/// The header naming the sender's span: `00-{trace id}-{span id}-{flags}` in lowercase hex.
pub const TRACEPARENT: &str = "traceparent";
/// The header with vendors' trace state, passed on unchanged.
pub const TRACESTATE: &str = "tracestate";

/// A message's place in a trace: the span that sent it ([`TraceParent`]) and the vendors'
/// `tracestate`, if any.
pub type TraceContext = (TraceParent, Option<String>);

/// The `sampled` bit of the trace flags.
const SAMPLED: u8 = 0x01;

/// A parsed `traceparent`: which trace a message belongs to and which span sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace: for a saga's messages, the saga id's bytes.
    pub trace_id: [u8; 16],
    /// The span that sent the message (the receiver's parent).
    pub parent_id: [u8; 8],
    /// The trace flags; bit 0 says the trace is sampled (recorded).
    pub flags: u8,
}

impl TraceParent {
    /// The root of the saga's trace: trace id = the saga id, span = the saga's root span
    /// ([`TraceParent::root_span_id`]), sampled.
    pub fn of_saga(saga_id: Uuid) -> Self {
        TraceParent {
            trace_id: *saga_id.as_bytes(),
            parent_id: Self::root_span_id(saga_id),
            flags: SAMPLED,
        }
    }

    /// The span id of a saga's root span: the last 8 bytes of its id. Never zero for a UUID of
    /// the RFC 9562 variant (byte 8 holds the variant bits `10`).
    pub fn root_span_id(saga_id: Uuid) -> [u8; 8] {
        let bytes = saga_id.as_bytes();
        let mut span = [0; 8];
        span.copy_from_slice(&bytes[8..]);
        span
    }

    /// Whether the sender records this trace.
    pub fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// Reads a `traceparent` header value as W3C Trace Context level 1 says: version `00`
    /// exactly, or a later version whose first four fields are read the same way (and may be
    /// followed by more). `None` for anything else, including all-zero ids: the receiver then
    /// starts from the saga's own trace.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let version = value.get(..2)?;
        let head = match version {
            "00" if value.len() == 55 => value,
            "00" | "ff" => return None,
            _ if value.len() == 55 || value.as_bytes().get(55) == Some(&b'-') => value.get(..55)?,
            _ => return None,
        };
        let mut fields = head.split('-');
        let (_version, trace, span, flags) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        let trace_id: [u8; 16] = lower_hex(trace)?.try_into().ok()?;
        let parent_id: [u8; 8] = lower_hex(span)?.try_into().ok()?;
        let flags = *lower_hex(flags)?.first()?;
        let version_ok = lower_hex(version).is_some();
        if !version_ok || trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        for byte in self.trace_id {
            write!(f, "{byte:02x}")?;
        }
        f.write_str("-")?;
        for byte in self.parent_id {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "-{:02x}", self.flags)
    }
}

/// The bytes of `text`, two lowercase hex digits each; `None` for anything else.
fn lower_hex(text: &str) -> Option<Vec<u8>> {
    let digits = text.as_bytes();
    if digits.is_empty() || !digits.len().is_multiple_of(2) {
        return None;
    }
    let value = |digit: u8| match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    };
    digits
        .chunks(2)
        .map(|pair| Some(value(pair[0])? << 4 | value(pair[1])?))
        .collect()
}

/// The trace context a message carries in its headers, if it carries a valid one, with its
/// `tracestate`.
#[cfg(feature = "jetstream")]
pub fn read_trace_headers(headers: Option<&async_nats::HeaderMap>) -> Option<TraceContext> {
    let headers = headers?;
    let parent = TraceParent::parse(headers.get(TRACEPARENT)?.as_str())?;
    let state = headers
        .get(TRACESTATE)
        .map(|value| value.as_str().to_string())
        .filter(|state| !state.is_empty());
    Some((parent, state))
}

/// The `Nats-Msg-Id` of a received message, if it has one.
#[cfg(feature = "jetstream")]
pub fn message_id(headers: Option<&async_nats::HeaderMap>) -> Option<&str> {
    Some(headers?.get(async_nats::header::NATS_MESSAGE_ID)?.as_str())
}

/// Headers carrying `context` (`traceparent`, and `tracestate` when there is one); empty
/// without a context.
#[cfg(feature = "jetstream")]
pub fn trace_headers(context: Option<&TraceContext>) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    if let Some((parent, state)) = context {
        headers.insert(TRACEPARENT, parent.to_string().as_str());
        if let Some(state) = state.as_deref().filter(|state| !state.is_empty()) {
            headers.insert(TRACESTATE, state);
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_w3c_example_reads_and_writes_back_the_same() {
        let parent = TraceParent::parse(EXAMPLE).expect("valid");
        assert!(parent.is_sampled());
        assert_eq!(
            parent.parent_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(parent.to_string(), EXAMPLE);
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in [
            "",
            "00",
            // Upper-case hex, a wrong length, a forbidden version, all-zero ids.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_for_its_known_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        let parent = TraceParent::parse(later).expect("a later version with more fields");
        assert_eq!(parent.to_string(), EXAMPLE);
    }

    #[test]
    fn a_saga_trace_is_its_id_and_its_root_span_the_ids_last_bytes() {
        let saga = Uuid::parse_str("0193a5b2-7c1d-7e4f-9a8b-0123456789ab").expect("uuid");
        assert_eq!(
            TraceParent::of_saga(saga).to_string(),
            "00-0193a5b27c1d7e4f9a8b0123456789ab-9a8b0123456789ab-01"
        );
    }
}
