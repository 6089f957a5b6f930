//! The `tracing` section (OTLP span export, docs/tracing.md) and `forward_headers` (which
//! client headers stay at the proxy, docs/api.md).

use super::reader::{join, Reader};
use super::schema;
use serde_json::{Map, Value};

/// Where spans are posted: an `http://host:port/path` URL, split once at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint {
    pub url: String,
    /// `host:port`, resolved by the exporter thread at each export.
    pub authority: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// None: tracing is off (the default); the client's trace context still passes through.
    pub otlp_endpoint: Option<OtlpEndpoint>,
    /// Share of requests without a sampled parent that start a trace.
    pub sample_ratio: f64,
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: "xpyd".into(),
        }
    }
}

/// Parses `http://host[:port][/path]`; the path defaults to OTLP's `/v1/traces`.
pub fn parse_endpoint(url: &str) -> Result<OtlpEndpoint, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        if url.starts_with("https://") {
            "https is not supported: point it at a local OpenTelemetry Collector over http (docs/tracing.md)".to_string()
        } else {
            format!("`{url}` is not an http:// URL")
        }
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/v1/traces"),
    };
    if authority.is_empty() || authority.chars().any(|c| c.is_whitespace() || c == '@') {
        return Err(format!("`{url}` has no valid host"));
    }
    let authority = if authority.rsplit_once(':').is_some_and(|(_, p)| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !authority.ends_with(']')
    }) {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok(OtlpEndpoint {
        url: url.to_string(),
        authority,
        path: if path.is_empty() { "/v1/traces" } else { path }.to_string(),
    })
}

pub fn tracing(r: &mut Reader<'_>, top: &Map<String, Value>) -> TracingConfig {
    let p = "tracing";
    let t = r.section(top, p, schema::TRACING);
    let d = TracingConfig::default();
    let otlp_endpoint = r.string(t, p, "otlp_endpoint").and_then(|u| {
        parse_endpoint(&u)
            .map_err(|e| r.problem(&join(p, "otlp_endpoint"), e))
            .ok()
    });
    let sample_ratio = r.f64(t, p, "sample_ratio", d.sample_ratio);
    if !(0.0..=1.0).contains(&sample_ratio) {
        r.problem(
            &join(p, "sample_ratio"),
            format!("must be between 0 and 1, got {sample_ratio}"),
        );
    }
    let service_name = r
        .string(t, p, "service_name")
        .filter(|s| !s.is_empty())
        .unwrap_or(d.service_name);
    TracingConfig {
        otlp_endpoint,
        sample_ratio,
        service_name,
    }
}

/// `forward_headers.deny` when the config does not give one: the proxy's own credentials
/// and the client's cookies.
pub const DEFAULT_DENY_HEADERS: &[&str] = &["authorization", "x-api-key", "cookie"];

/// `forward_headers.deny`: lower-cased header names; absent, the default list.
pub fn deny_list(r: &mut Reader<'_>, top: &Map<String, Value>) -> Vec<String> {
    let p = "forward_headers";
    let t = r.section(top, p, schema::FORWARD_HEADERS);
    let default = || DEFAULT_DENY_HEADERS.iter().map(|s| s.to_string()).collect();
    match t.and_then(|t| t.get("deny")) {
        None | Some(Value::Null) => default(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match v {
                Value::String(s)
                    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b':') =>
                {
                    Some(s.to_ascii_lowercase())
                }
                _ => {
                    r.problem(&format!("{p}.deny[{i}]"), "expected a header name");
                    None
                }
            })
            .collect(),
        Some(other) => {
            r.wrong_type(&join(p, "deny"), "a list of header names", other);
            default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = parse_endpoint("http://collector:4318/v1/traces").unwrap();
        assert_eq!(
            (e.authority.as_str(), e.path.as_str()),
            ("collector:4318", "/v1/traces")
        );
        let e = parse_endpoint("http://127.0.0.1:4318").unwrap();
        assert_eq!(e.path, "/v1/traces");
        assert_eq!(parse_endpoint("http://otel").unwrap().authority, "otel:80");
        assert!(parse_endpoint("https://x:1").unwrap_err().contains("https"));
        assert!(parse_endpoint("collector:4318").is_err());
        assert!(parse_endpoint("http:///v1/traces").is_err());
    }

    #[test]
    fn the_sections_load() {
        let base = "prefill: [\"127.0.0.1:1\"]\ndecode: [\"127.0.0.1:2\"]\n";
        let c = crate::config::Config::from_yaml(base).unwrap();
        assert!(c.tracing.otlp_endpoint.is_none());
        assert_eq!(c.deny_headers, ["authorization", "x-api-key", "cookie"]);
        let c = crate::config::Config::from_yaml(&format!(
            "{base}tracing: {{otlp_endpoint: \"http://127.0.0.1:4318\", sample_ratio: 0.5, service_name: edge}}\nforward_headers: {{deny: [Cookie]}}\n"
        ))
        .unwrap();
        assert_eq!(c.tracing.sample_ratio, 0.5);
        assert_eq!(c.tracing.service_name, "edge");
        assert_eq!(c.deny_headers, ["cookie"]);
        let e = crate::config::Config::from_yaml(&format!(
            "{base}tracing:\n  sample_ratio: 2\n  otlp_endpoint: grpc://x\nforward_headers:\n  deny: [\"a b\"]\n"
        ))
        .unwrap_err();
        assert_eq!(e.problems.len(), 3, "{e}");
    }
}
