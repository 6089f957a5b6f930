//! Errors answered to HTTP clients, always in the OpenAI shape
//! `{"error": {"message", "type", "param", "code"}}`.

use http::StatusCode;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// Close the connection after answering (framing could not be trusted).
    pub close: bool,
    /// `Retry-After` in seconds (a 503 without one says 1).
    pub retry_after: Option<u64>,
}

// The constructors are `#[cold]`: a request that fails is rare, and the code that builds its
// message (formatting included) then lies outside the hot paths' instruction-cache lines
// (docs/benchmarks.md, "The code and data a request touches").
impl ApiError {
    #[cold]
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            close: false,
            retry_after: None,
        }
    }

    #[cold]
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    #[cold]
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message).with_code("not_found")
    }

    #[cold]
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            message,
        )
    }

    #[cold]
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "upstream_error", message)
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    pub fn body(&self) -> Vec<u8> {
        let code = match self.code {
            Some(c) => Value::from(c),
            None => Value::from(self.status.as_u16()),
        };
        let v = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": code,
            }
        });
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}
