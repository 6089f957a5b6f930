//! Writing the dummy's answers: a raw response, a JSON body, an OpenAI-shaped error.

use crate::http::write::{error_response, full_response, JSON};
use crate::http::ApiError;
use http::StatusCode;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use serde_json::Value;

pub(super) async fn send(stream: &mut TcpStream, out: Vec<u8>) -> Result<(), ()> {
    stream.write_all(out).await.0.map(|_| ()).map_err(|_| ())
}

pub(super) async fn send_json(
    stream: &mut TcpStream,
    status: StatusCode,
    v: &Value,
    keep: bool,
) -> Result<(), ()> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    send(stream, full_response(status, &[JSON], &body, keep)).await
}

pub(super) async fn send_error(stream: &mut TcpStream, e: ApiError, keep: bool) -> Result<(), ()> {
    send(stream, error_response(&e, &[], keep)).await
}
