//! Finished spans and their OTLP encoding: an `ExportTraceServiceRequest`
//! (opentelemetry-proto, `collector/trace/v1`) written by hand. The proxy emits a handful
//! of message types with a few fields each, so a small protobuf writer keeps the
//! dependency tree as it is (no codegen, no runtime); the test suite decodes the output with
//! the official `opentelemetry-proto` package.

use super::context::{SpanId, TraceId};

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

pub type Attributes = Vec<(&'static str, Value)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server = 2,
    Client = 3,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub time_unix_nano: u64,
    pub name: &'static str,
    pub attributes: Attributes,
}

/// One finished span, as a worker hands it to the exporter.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub trace_state: Option<String>,
    pub name: &'static str,
    pub kind: Kind,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Attributes,
    pub events: Vec<Event>,
    /// `Some(message)`: the span ended in error.
    pub error: Option<String>,
}

// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;

/// Appends protobuf fields to a buffer; a nested message is written in place, then its
/// length is inserted before it (a short move of bytes already in cache, no allocation).
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    fn tag(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.tag(field, LEN);
        self.varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    fn uint(&mut self, field: u32, v: u64) {
        self.tag(field, VARINT);
        self.varint(v);
    }

    fn fixed64(&mut self, field: u32, v: u64) {
        self.tag(field, FIXED64);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn message(&mut self, field: u32, f: impl FnOnce(&mut Writer)) {
        self.tag(field, LEN);
        let start = self.buf.len();
        f(self);
        let mut len = (self.buf.len() - start) as u64;
        let mut prefix = [0u8; 10];
        let mut n = 0;
        while len >= 0x80 {
            prefix[n] = (len as u8) | 0x80;
            len >>= 7;
            n += 1;
        }
        prefix[n] = len as u8;
        self.buf.splice(start..start, prefix[..=n].iter().copied());
    }
}

fn key_value(w: &mut Writer, field: u32, key: &str, v: &Value) {
    w.message(field, |kv| {
        kv.string(1, key);
        // AnyValue
        kv.message(2, |any| match v {
            Value::Str(s) => any.string(1, s),
            Value::Bool(b) => any.uint(2, u64::from(*b)),
            Value::Int(i) => any.uint(3, *i as u64),
        });
    });
}

fn span(w: &mut Writer, s: &Span) {
    w.bytes(1, &s.trace_id);
    w.bytes(2, &s.span_id);
    if let Some(ts) = &s.trace_state {
        w.string(3, ts);
    }
    if let Some(p) = &s.parent_span_id {
        w.bytes(4, p);
    }
    w.string(5, s.name);
    w.uint(6, s.kind as u64);
    w.fixed64(7, s.start_unix_nano);
    w.fixed64(8, s.end_unix_nano);
    for (k, v) in &s.attributes {
        key_value(w, 9, k, v);
    }
    for e in &s.events {
        w.message(11, |ev| {
            ev.fixed64(1, e.time_unix_nano);
            ev.string(2, e.name);
            for (k, v) in &e.attributes {
                key_value(ev, 3, k, v);
            }
        });
    }
    // Status: OK is left unset (the spec reserves it for explicit overrides).
    if let Some(msg) = &s.error {
        w.message(15, |st| {
            st.string(2, msg);
            st.uint(3, 2);
        });
    }
}

/// One `ExportTraceServiceRequest` carrying `spans` for the resource `service_name`.
pub fn encode_request(service_name: &str, spans: &[Span]) -> Vec<u8> {
    let mut w = Writer::default();
    w.message(1, |rs| {
        rs.message(1, |res| {
            key_value(res, 1, "service.name", &Value::Str(service_name.into()));
            key_value(
                res,
                1,
                "service.version",
                &Value::Str(crate::VERSION.into()),
            );
        });
        rs.message(2, |ss| {
            ss.message(1, |scope| {
                scope.string(1, "xpyd");
                scope.string(2, crate::VERSION);
            });
            for s in spans {
                ss.message(2, |sp| span(sp, s));
            }
        });
    });
    w.buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_the_protobuf_encoding() {
        let mut w = Writer::default();
        w.varint(1);
        w.varint(300);
        w.varint(u64::MAX);
        assert_eq!(&w.buf[..3], &[0x01, 0xac, 0x02]);
        assert_eq!(w.buf.len(), 3 + 10);
    }

    #[test]
    fn negative_ints_are_ten_byte_varints() {
        let mut w = Writer::default();
        key_value(&mut w, 1, "k", &Value::Int(-1));
        // tag, len, [tag 1, len 1, 'k', tag 2, len 11, [tag 3, 10 bytes]]
        assert_eq!(w.buf.len(), 2 + 3 + 2 + 11);
    }

    #[test]
    fn a_span_encodes_its_ids_and_times() {
        let s = Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: Some([3; 8]),
            trace_state: None,
            name: "x",
            kind: Kind::Server,
            start_unix_nano: 5,
            end_unix_nano: 6,
            attributes: vec![("a", Value::Bool(true))],
            events: Vec::new(),
            error: None,
        };
        let out = encode_request("svc", &[s]);
        let has = |needle: &[u8]| out.windows(needle.len()).any(|w| w == needle);
        assert!(has(&[0x0a, 16, 1, 1, 1, 1]), "trace id field");
        assert!(has(&[0x12, 8, 2, 2]), "span id field");
        assert!(has(&[0x22, 8, 3, 3]), "parent span id field");
        assert!(has(&[0x39, 5, 0, 0, 0, 0, 0, 0, 0]), "start time, fixed64");
        assert!(has(b"svc"));
    }
}
