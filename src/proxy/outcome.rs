//! How a request ended, and answering it with an error while nothing was sent yet.

use crate::http::conn::ClientWriter;
use crate::http::write::error_response;
use crate::http::ApiError;
use http::StatusCode;
use monoio::io::AsyncWriteRentExt;

/// How a request ended: the status it is recorded with and whether the client's connection
/// can serve another request. The status is the one the client got, except 499 (the client
/// left first) and a stream that failed after its head went out, recorded with its error's
/// status (502, 504) although the head said 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: u16,
    pub keep_alive: bool,
}

impl Outcome {
    pub fn new(status: u16, keep_alive: bool) -> Self {
        Outcome { status, keep_alive }
    }

    pub fn close(status: u16) -> Self {
        Outcome {
            status,
            keep_alive: false,
        }
    }

    /// The client left before the answer was complete.
    pub fn client_gone() -> Self {
        Outcome::close(499)
    }
}

/// Ends a request with an error response (nothing was sent to the client yet).
pub async fn answer_error(
    client: &mut ClientWriter,
    err: &ApiError,
    request_id: Option<&str>,
    keep_alive: bool,
) -> Outcome {
    let mut extra: Vec<(&str, &str)> = Vec::new();
    if let Some(id) = request_id {
        extra.push(("X-Request-Id", id));
    }
    let retry_after = err.retry_after.map(|s| s.to_string());
    if let Some(s) = retry_after.as_deref() {
        extra.push(("Retry-After", s));
    } else if err.status == StatusCode::SERVICE_UNAVAILABLE {
        extra.push(("Retry-After", "1"));
    }
    let keep = keep_alive && !err.close;
    let (res, _) = client.write_all(error_response(err, &extra, keep)).await;
    Outcome::new(err.status.as_u16(), res.is_ok() && keep)
}
