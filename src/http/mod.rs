//! HTTP/1.1 written for this proxy: strict head parsing on httparse, chunked bodies
//! forwarded chunk by chunk, owned-buffer I/O for monoio. See docs/architecture.md for why
//! monoio-http is not used on the data path.

pub mod blocking;
pub mod buf;
pub mod chunked;
pub mod conn;
pub mod error;
pub mod head;
pub mod request;
pub mod watch;
pub mod write;

pub use buf::ReadBuf;
pub use error::ApiError;
pub use head::{Framing, RequestHead, ResponseHead};
pub use request::{lingering_close, read_request, Limits, ReadError, Request};

/// True when a Content-Type names JSON (`application/json`, `application/x+json`, params ok).
pub fn is_json_content_type(ct: Option<&str>) -> bool {
    let Some(ct) = ct else { return false };
    // The value clients send, as they send it: one compare instead of a split and a trim.
    if ct == "application/json" {
        return true;
    }
    let mime = ct.split(';').next().unwrap_or("").trim();
    mime.eq_ignore_ascii_case("application/json")
        || (mime.len() > 5 && mime[mime.len() - 5..].eq_ignore_ascii_case("+json"))
}

#[cfg(test)]
mod tests {
    use super::is_json_content_type;

    #[test]
    fn json_content_types() {
        for ct in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ;charset=utf-8",
            "application/vnd.api+json",
        ] {
            assert!(is_json_content_type(Some(ct)), "{ct}");
        }
        for ct in [
            "text/plain",
            "application/jsonx",
            "+json",
            "application/x-www-form-urlencoded",
        ] {
            assert!(!is_json_content_type(Some(ct)), "{ct}");
        }
        assert!(!is_json_content_type(None));
    }
}
