//! What one request carries through its legs and relays: the worker, the client and how it
//! is answered, what the backends are sent, and when things happened.

use super::failure::RelayError;
use super::forward_headers::Forwarding;
use super::outcome::{self, Outcome};
use super::timeline::Timeline;
use super::Worker;
use crate::config::Policy;
use crate::http::conn::ClientWriter;
use crate::http::ApiError;
use monoio::io::AsyncWriteRentExt;
use std::borrow::Cow;
use std::sync::Arc;

pub struct RequestCtx<'a> {
    pub w: &'a Worker,
    pub request_id: &'a str,
    /// The client's connection, written only by this request.
    pub client: &'a mut ClientWriter,
    /// The client's connection may serve another request after this one.
    pub keep_alive: bool,
    /// The client speaks HTTP/1.0: no chunked bodies, a close ends the body.
    pub http10: bool,
    /// The path the backends are sent (the client's).
    pub path: &'a str,
    /// `Authorization` for the backends.
    pub authorization: Option<Cow<'a, str>>,
    /// The client's headers and the trace context the legs carry.
    pub forward: Forwarding<'a>,
    pub tl: Timeline,
    /// The policy as the request found it, for all its legs and relays: one load per
    /// request instead of one per use (a reload applies to the next request).
    pub policy: Arc<Policy>,
}

impl RequestCtx<'_> {
    /// Answers with `err`; nothing was sent to the client yet.
    pub async fn answer_error(&mut self, err: &ApiError) -> Outcome {
        outcome::answer_error(self.client, err, Some(self.request_id), self.keep_alive).await
    }

    /// Writes `out` whole to the client and hands the buffer back (cleared).
    pub async fn write(&mut self, out: Vec<u8>) -> Result<Vec<u8>, RelayError> {
        let (res, mut buf) = self.client.write_all(out).await;
        buf.clear();
        res.map(|_| buf).map_err(|_| RelayError::ClientGone)
    }
}
