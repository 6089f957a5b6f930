//! Which of the client's headers reach the backends (RFC 9110 §7.6.1, docs/api.md):
//! end-to-end headers pass unchanged on every leg; hop-by-hop ones — the fixed list and
//! whatever the client's `Connection` names — stop here; the headers the proxy sets itself
//! (Host, Content-Type, Content-Length, X-Request-Id, Authorization, and `traceparent` when
//! it traces the request) are never copied; the configured deny list (`forward_headers.deny`)
//! keeps secrets in; `Accept-Encoding` does not go to the prefill leg, whose body the proxy
//! parses (nor to a decode leg whose stream it rewrites). Filtering happens while the leg's head is written: no allocation of its own.

use crate::config::Role;
use crate::http::head::lower_is;
use crate::trace::RequestTrace;

/// What forwarding makes of a header name, whatever the request. Told apart by length
/// first, as the head parser's `Name::of` does: one comparison per line instead of one per
/// listed name (comparing each line with every listed name cost more than the rest of a leg's
/// head; docs/benchmarks.md, "Header forwarding by length").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Hop-by-hop (RFC 9110 §7.6.1, RFC 9112 §7.1–7.2: Keep-Alive, TE, Trailer, Upgrade,
    /// Connection, Transfer-Encoding, the `Proxy-*` family) or set by the proxy itself on every
    /// leg (Host, Content-Type, Content-Length, X-Request-Id, Authorization; `Expect` is
    /// answered here).
    Never,
    AcceptEncoding,
    Traceparent,
    Tracestate,
    /// End to end: forwarded unless the deny list or the client's `Connection` names it.
    Other,
}

impl Kind {
    fn of(name: &[u8]) -> Kind {
        let is = |lower: &[u8]| lower_is(name, lower);
        if name.len() >= 6 && lower_is(&name[..6], b"proxy-") {
            return Kind::Never;
        }
        let never = match name.len() {
            2 => is(b"te"),
            4 => is(b"host"),
            6 => is(b"expect"),
            7 => is(b"trailer") || is(b"upgrade"),
            10 => {
                if is(b"tracestate") {
                    return Kind::Tracestate;
                }
                is(b"connection") || is(b"keep-alive")
            }
            11 if is(b"traceparent") => return Kind::Traceparent,
            12 => is(b"content-type") || is(b"x-request-id"),
            13 => is(b"authorization"),
            14 => is(b"content-length"),
            15 if is(b"accept-encoding") => return Kind::AcceptEncoding,
            17 => is(b"transfer-encoding"),
            _ => false,
        };
        if never {
            Kind::Never
        } else {
            Kind::Other
        }
    }
}

/// The deny list when the config does not give one (defined with the config key).
pub use crate::config::DEFAULT_DENY_HEADERS as DEFAULT_DENY;

/// What one leg's head takes from the client's headers.
pub struct Rules<'a> {
    /// Lower-case header names never forwarded (`forward_headers.deny`).
    pub deny: &'a [String],
    /// The client's `Connection` value(s): the headers it names are hop-by-hop.
    pub connection: Option<&'a str>,
    /// The proxy reads or rewrites this leg's response (the prefill leg; the decode leg
    /// behind a first token from prefill): it must not come compressed.
    pub identity: bool,
    /// The proxy writes its own `traceparent` (the request is traced).
    pub own_traceparent: bool,
    /// The client's `tracestate` goes with its `traceparent` only; dropped when the proxy
    /// started a new trace.
    pub drop_tracestate: bool,
}

impl Rules<'_> {
    /// Whether the client's header `name` (token bytes, as the head parser took them)
    /// reaches this leg.
    pub fn forwards(&self, name: &[u8]) -> bool {
        match Kind::of(name) {
            Kind::Never => return false,
            Kind::AcceptEncoding if self.identity => return false,
            Kind::Traceparent if self.own_traceparent => return false,
            Kind::Tracestate if self.drop_tracestate => return false,
            _ => {}
        }
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        if self.deny.iter().any(|h| is(h.as_bytes())) {
            return false;
        }
        match self.connection {
            Some(c) => !c.split(',').any(|t| is(t.trim().as_bytes())),
            None => true,
        }
    }
}

/// What a request's legs carry beyond the proxy's own headers: the client's headers, the
/// request's trace (its legs' `traceparent`) and whether the decode stream is rewritten.
pub struct Forwarding<'a> {
    /// The client's headers as `Name: value\r\n` lines (`RequestHead::headers`).
    pub client: &'a [u8],
    pub connection: Option<&'a str>,
    pub trace: Option<&'a RequestTrace>,
    /// The first token comes from prefill: the decode stream is rewritten here.
    pub decode_identity: bool,
}

impl Forwarding<'_> {
    /// Appends this leg's `traceparent` (when traced) and the client's forwarded headers.
    pub fn write(&self, out: &mut Vec<u8>, role: Role, deny: &[String]) {
        let prefill = role == Role::Prefill;
        if let Some(t) = self.trace {
            out.extend_from_slice(b"traceparent: ");
            out.extend_from_slice(&t.traceparent(prefill));
            out.extend_from_slice(b"\r\n");
        }
        let rules = Rules {
            deny,
            connection: self.connection,
            identity: prefill || (role == Role::Decode && self.decode_identity),
            own_traceparent: self.trace.is_some(),
            drop_tracestate: self.trace.is_some_and(|t| !t.continued),
        };
        write(out, self.client, &rules);
    }

    /// Records a retry or a failure on the leg's span when the request is traced.
    pub fn event(
        &self,
        role: Role,
        name: &'static str,
        instance: &str,
        reason: impl FnOnce() -> String,
    ) {
        if let Some(t) = self.trace {
            t.event(role == Role::Prefill, name, instance, reason());
        }
    }
}

/// The client's header `name`, first occurrence (`traceparent`, `tracestate`).
pub fn find<'a>(client: &'a [u8], name: &str) -> Option<&'a str> {
    lines(client).find_map(|(n, line)| {
        n.eq_ignore_ascii_case(name.as_bytes())
            .then(|| std::str::from_utf8(&line[n.len() + 1..]).ok())
            .flatten()
            .map(str::trim)
    })
}

/// `(name, whole line)` of each `Name: value\r\n` line.
fn lines(block: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut rest = block;
    std::iter::from_fn(move || loop {
        if rest.is_empty() {
            return None;
        }
        // Values hold no CR or LF (the parser refuses them): a line ends at its LF.
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        let line = &rest[..end];
        rest = &rest[end..];
        // Names hold no colon (token bytes): the first one ends the name.
        if let Some(c) = memchr::memchr(b':', line) {
            return Some((&line[..c], line));
        }
    })
}

/// Appends the forwarded lines of `client` (the client's headers as `Name: value\r\n`
/// lines, see `RequestHead::headers`) to `out`. Runs of forwarded lines go in one copy.
pub fn write(out: &mut Vec<u8>, client: &[u8], rules: &Rules<'_>) {
    let mut run = 0..0;
    for (name, line) in lines(client) {
        if rules.forwards(name) {
            // Where the line starts in `client` (`lines` hands out subslices of it).
            let at = line.as_ptr() as usize - client.as_ptr() as usize;
            if run.end != at {
                out.extend_from_slice(&client[run]);
                run = at..at;
            }
            run.end = at + line.len();
        }
    }
    out.extend_from_slice(&client[run]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny() -> Vec<String> {
        DEFAULT_DENY.iter().map(|s| s.to_string()).collect()
    }

    fn rules(deny: &[String]) -> Rules<'_> {
        Rules {
            deny,
            connection: None,
            identity: false,
            own_traceparent: false,
            drop_tracestate: false,
        }
    }

    const CLIENT: &[u8] = b"User-Agent: t/1\r\nTraceparent: 00-x\r\ntracestate: a=b\r\nX-Custom: v\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: p\r\nCookie: c\r\nX-API-Key: k\r\nAccept-Encoding: gzip\r\nX-Hop: 1\r\n";

    fn forwarded(r: &Rules<'_>) -> String {
        let mut out = Vec::new();
        write(&mut out, CLIENT, r);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn end_to_end_headers_pass_unchanged() {
        let d = deny();
        let out = forwarded(&rules(&d));
        assert_eq!(
            out,
            "User-Agent: t/1\r\nTraceparent: 00-x\r\ntracestate: a=b\r\nX-Custom: v\r\nAccept-Encoding: gzip\r\nX-Hop: 1\r\n"
        );
    }

    #[test]
    fn headers_named_by_connection_are_hop_by_hop() {
        let d = deny();
        let r = Rules {
            connection: Some("keep-alive, X-Hop ,x-custom"),
            ..rules(&d)
        };
        let out = forwarded(&r);
        assert!(!out.contains("X-Hop") && !out.contains("X-Custom"), "{out}");
        assert!(out.contains("User-Agent"));
    }

    #[test]
    fn prefill_leg_gets_no_accept_encoding() {
        let d = deny();
        let r = Rules {
            identity: true,
            ..rules(&d)
        };
        assert!(!forwarded(&r).contains("Accept-Encoding"));
    }

    #[test]
    fn the_proxys_traceparent_replaces_the_clients() {
        let d = deny();
        let r = Rules {
            own_traceparent: true,
            ..rules(&d)
        };
        let out = forwarded(&r);
        assert!(
            !out.contains("Traceparent") && out.contains("tracestate"),
            "{out}"
        );
        let r = Rules {
            own_traceparent: true,
            drop_tracestate: true,
            ..rules(&d)
        };
        assert!(!forwarded(&r).contains("tracestate"));
    }

    #[test]
    fn finds_a_header_by_name() {
        assert_eq!(find(CLIENT, "traceparent"), Some("00-x"));
        assert_eq!(find(CLIENT, "TraceState"), Some("a=b"));
        assert_eq!(find(CLIENT, "missing"), None);
    }

    #[test]
    fn the_deny_list_is_configurable() {
        let none: Vec<String> = Vec::new();
        let out = forwarded(&rules(&none));
        assert!(
            out.contains("Cookie: c") && out.contains("X-API-Key: k"),
            "{out}"
        );
        let custom = vec!["x-custom".to_string()];
        assert!(!forwarded(&rules(&custom)).contains("X-Custom"));
    }

    #[test]
    fn names_are_told_apart_by_length_then_bytes() {
        let none: Vec<String> = Vec::new();
        let r = rules(&none);
        // Every fixed name, in any case, is dropped; a name of the same length is not.
        for (dropped, kept) in [
            ("TE", "Te2"),
            ("KEEP-ALIVE", "Keep-Alivx"),
            ("Trailer", "Trailor"),
            ("upgrade", "Upgrades"),
            ("Connection", "Connectiom"),
            ("Transfer-Encoding", "Transfer-Encodinx"),
            ("Content-Length", "X-Stainless-OS"),
            ("x-request-id", "x-session-id"),
            ("HOST", "Hust"),
        ] {
            assert!(!r.forwards(dropped.as_bytes()), "{dropped}");
            assert!(r.forwards(kept.as_bytes()), "{kept}");
        }
        let traced = Rules {
            identity: true,
            own_traceparent: true,
            drop_tracestate: true,
            ..rules(&none)
        };
        for (name, plain, with_rules) in [
            ("Accept-Encoding", true, false),
            ("TraceParent", true, false),
            ("TRACESTATE", true, false),
            ("Accept-Language", true, true),
        ] {
            assert_eq!(r.forwards(name.as_bytes()), plain, "{name}");
            assert_eq!(traced.forwards(name.as_bytes()), with_rules, "{name}");
        }
    }

    #[test]
    fn runs_of_forwarded_lines_keep_their_order() {
        let none: Vec<String> = Vec::new();
        let mut out = Vec::new();
        let client = b"A: 1\r\nHost: h\r\nB: 2\r\nC: 3\r\nTE: x\r\nD: 4\r\n";
        write(&mut out, client, &rules(&none));
        assert_eq!(out, b"A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n");
        out.clear();
        write(&mut out, b"Host: h\r\nTE: x\r\n", &rules(&none));
        assert!(out.is_empty());
    }

    #[test]
    fn proxy_set_headers_are_never_copied() {
        let none: Vec<String> = Vec::new();
        let r = rules(&none);
        for h in [
            "Host",
            "content-length",
            "Content-Type",
            "X-Request-Id",
            "Authorization",
            "Expect",
        ] {
            assert!(!r.forwards(h.as_bytes()), "{h}");
        }
        assert!(!r.forwards(b"Proxy-Connection"));
        assert!(r.forwards(b"Proxy"));
    }
}
