//! An instance's failures — counted once, in `proxy_instance_errors_total` and against its
//! circuit — and the ways a response body fails after its head arrived, shared by the
//! relays: the idle timeout, an early close, a read error, bad framing.

use super::upstream::{UpstreamConn, UpstreamError};
use super::Worker;
use crate::clock::{after, recent};
use crate::http::ApiError;
use crate::instance::Instance;
use crate::metrics::ErrorType;
use http::StatusCode;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

/// Counts one failure of `inst`: its error counter and its circuit.
pub fn count(w: &Worker, inst: &Instance, t: ErrorType) {
    if w.metrics_enabled {
        w.metric_index.instance(&w.metrics, inst).error(t);
    }
    inst.record_failure(&w.policy().circuit);
}

/// The counter label of a failure to get a response head.
pub fn error_type(e: &UpstreamError) -> ErrorType {
    match e {
        UpstreamError::Connect(_) | UpstreamError::ConnectTimeout => ErrorType::Connect,
        UpstreamError::FirstByteTimeout => ErrorType::Timeout,
        UpstreamError::BadResponse(_) => ErrorType::BadResponse,
        UpstreamError::Io(_) | UpstreamError::Closed => ErrorType::Closed,
    }
}

/// How a response body failed after its head arrived.
#[derive(Debug)]
pub enum BodyFailure {
    /// Nothing arrived for the idle timeout.
    Stalled(Duration),
    /// The backend closed before the body's end.
    Closed,
    Io(io::Error),
    /// The body's framing is invalid (bad chunked encoding).
    Framing,
}

impl std::fmt::Display for BodyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyFailure::Stalled(d) => write!(f, "stalled mid-stream: nothing for {d:?}"),
            BodyFailure::Closed => f.write_str("closed the connection mid-response"),
            BodyFailure::Io(e) => write!(f, "failed mid-response: {e}"),
            BodyFailure::Framing => f.write_str("sent invalid chunked encoding"),
        }
    }
}

impl BodyFailure {
    fn error_type(&self) -> ErrorType {
        match self {
            BodyFailure::Stalled(_) => ErrorType::Timeout,
            BodyFailure::Closed | BodyFailure::Io(_) => ErrorType::Closed,
            BodyFailure::Framing => ErrorType::BadResponse,
        }
    }

    /// What the client is told: 504 for a stall, 502 otherwise.
    fn status(&self) -> (StatusCode, &'static str) {
        match self {
            BodyFailure::Stalled(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout_error"),
            _ => (StatusCode::BAD_GATEWAY, "upstream_error"),
        }
    }

    pub fn api_error(&self, inst: &Instance) -> ApiError {
        let (status, kind) = self.status();
        let message = format!("{} instance {} {self}", inst.role.as_str(), inst.address);
        ApiError::new(status, kind, message)
    }

    /// Counts the failure against `inst` and logs it.
    pub fn record(&self, w: &Worker, inst: &Instance, request_id: &str) {
        count(w, inst, self.error_type());
        crate::warn!(
            "request {request_id}: {} instance {} {self}; ending the response",
            inst.role.as_str(),
            inst.address
        );
    }
}

/// Reads more of a response body, waiting at most `idle` for it. `Ok(0)`: the backend
/// closed (whether that ends the body is the caller's framing to decide). The wait runs on
/// the connection's one timer (`UpstreamConn::deadline`): each read moves its deadline to
/// `idle` after it began, which costs no timer work; a timeout per read registered and
/// removed a timer for every token (~390 instructions; docs/benchmarks.md, "Per relayed
/// token"). A body that came whole with its head waits on none.
pub async fn read_more(conn: &mut UpstreamConn, idle: Duration) -> Result<usize, BodyFailure> {
    // From the loop's reading (`clock::recent`): a token's read needs no clock reading of its
    // own, and the timeout falls due at most a loop turn early.
    conn.deadline.set(after(recent(), idle));
    let UpstreamConn {
        stream,
        buf,
        deadline,
        ..
    } = conn;
    let mut fill = pin!(buf.fill(stream));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = fill.as_mut().poll(cx) {
            return Poll::Ready(r.map_err(BodyFailure::Io));
        }
        deadline
            .poll_passed(cx)
            .map(|()| Err(BodyFailure::Stalled(idle)))
    })
    .await
}

/// Why relaying a response stopped early.
#[derive(Debug)]
pub enum RelayError {
    /// Writing to the client failed: it left.
    ClientGone,
    Upstream(BodyFailure),
}

impl From<BodyFailure> for RelayError {
    fn from(f: BodyFailure) -> Self {
        RelayError::Upstream(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_status_and_counter() {
        let cases = [
            (
                BodyFailure::Stalled(Duration::from_secs(1)),
                504,
                "timeout_error",
                ErrorType::Timeout,
            ),
            (
                BodyFailure::Closed,
                502,
                "upstream_error",
                ErrorType::Closed,
            ),
            (
                BodyFailure::Io(io::ErrorKind::ConnectionReset.into()),
                502,
                "upstream_error",
                ErrorType::Closed,
            ),
            (
                BodyFailure::Framing,
                502,
                "upstream_error",
                ErrorType::BadResponse,
            ),
        ];
        for (f, status, kind, counter) in cases {
            assert_eq!(
                f.status(),
                (StatusCode::from_u16(status).unwrap(), kind),
                "{f}"
            );
            assert_eq!(f.error_type() as usize, counter as usize, "{f}");
        }
    }
}
