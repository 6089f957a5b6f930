//! Header fields: a line's name and value (`Field`), which names this layer acts on
//! (`Name`), and the framing headers it checks hard (`FramingHeaders`), for both parsers.

use super::{value_str, HeadError};

/// A header line: its name (token bytes) and its value (blanks around it left out).
#[derive(Clone, Copy)]
pub(super) struct Field<'b> {
    pub(super) name: &'b [u8],
    pub(super) value: &'b [u8],
}

impl<'b> From<&httparse::Header<'b>> for Field<'b> {
    fn from(h: &httparse::Header<'b>) -> Self {
        Field {
            name: h.name.as_bytes(),
            value: h.value,
        }
    }
}

/// The header names this layer acts on, told apart by length first: one comparison per
/// header instead of one per name (a case-insensitive compare per candidate cost more than
/// httparse's parse of the line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Name {
    ContentLength,
    TransferEncoding,
    Connection,
    Host,
    ContentType,
    ContentEncoding,
    XRequestId,
    XSessionId,
    XApiKey,
    Authorization,
    Expect,
    Other,
}

impl Name {
    pub(super) fn of(n: &[u8]) -> Name {
        let (is, known) = match n.len() {
            4 => (lower_is(n, b"host"), Name::Host),
            6 => (lower_is(n, b"expect"), Name::Expect),
            9 => (lower_is(n, b"x-api-key"), Name::XApiKey),
            10 => (lower_is(n, b"connection"), Name::Connection),
            12 => {
                return if lower_is(n, b"content-type") {
                    Name::ContentType
                } else if lower_is(n, b"x-request-id") {
                    Name::XRequestId
                } else if lower_is(n, b"x-session-id") {
                    Name::XSessionId
                } else {
                    Name::Other
                }
            }
            13 => (lower_is(n, b"authorization"), Name::Authorization),
            14 => (lower_is(n, b"content-length"), Name::ContentLength),
            16 => (lower_is(n, b"content-encoding"), Name::ContentEncoding),
            17 => (lower_is(n, b"transfer-encoding"), Name::TransferEncoding),
            _ => (false, Name::Other),
        };
        if is {
            known
        } else {
            Name::Other
        }
    }
}

/// `name` equals `lower` (lowercase letters and `-`, same length) ignoring ASCII case.
/// Setting bit 5 lowercases a letter; among the token bytes httparse lets through a header
/// name, only the letter itself, its capital, and `-` itself map onto a letter or `-` so.
/// Compared a word at a time (the last word overlapping the one before): a byte loop cost
/// more than the rest of the header's handling.
#[inline]
pub(crate) fn lower_is(name: &[u8], lower: &[u8]) -> bool {
    let n = name.len();
    if n != lower.len() {
        return false;
    }
    if n >= 8 {
        let word = |s: &[u8], at: usize| {
            let b: [u8; 8] = s.get(at..at + 8)?.try_into().ok()?;
            Some(u64::from_le_bytes(b) | 0x2020_2020_2020_2020)
        };
        let mut at = 0;
        while at + 8 < n {
            if word(name, at) != word(lower, at) {
                return false;
            }
            at += 8;
        }
        return word(name, n - 8).is_some() && word(name, n - 8) == word(lower, n - 8);
    }
    if n >= 4 {
        let word = |s: &[u8], at: usize| {
            let b: [u8; 4] = s.get(at..at + 4)?.try_into().ok()?;
            Some(u32::from_le_bytes(b) | 0x2020_2020)
        };
        return word(name, 0).is_some()
            && word(name, 0) == word(lower, 0)
            && word(name, n - 4) == word(lower, n - 4);
    }
    name.iter().zip(lower).all(|(&a, &b)| a | 0x20 == b)
}

/// Accumulates the framing-relevant headers common to requests and responses.
#[derive(Default)]
pub(super) struct FramingHeaders {
    pub(super) content_length: Option<u64>,
    pub(super) chunked: bool,
    pub(super) other_te: bool,
    conn_close: bool,
    conn_keep_alive: bool,
}

impl FramingHeaders {
    /// Notes `name: value` when it is a framing header (true), else leaves it (false). Inlined
    /// into both parsers' loops: most lines are not framing headers, and a call per line cost
    /// more than the test.
    #[inline]
    pub(super) fn observe(&mut self, name: Name, value: &[u8]) -> Result<bool, HeadError> {
        match name {
            Name::ContentLength => self.content_length(value)?,
            Name::TransferEncoding => self.transfer_encoding(value)?,
            Name::Connection => self.connection(value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    #[inline]
    fn content_length(&mut self, value: &[u8]) -> Result<(), HeadError> {
        // Digits only (no sign, no blank inside), read as bytes: every head has one. Short
        // ones unchecked; longer ones are checked step by step.
        let v = value.trim_ascii();
        let invalid = HeadError::Malformed("invalid Content-Length");
        if v.is_empty() {
            return Err(invalid);
        }
        let n = if v.len() <= MAX_UNCHECKED_DIGITS {
            short_decimal(v).ok_or(invalid)?
        } else {
            v.iter()
                .try_fold(0u64, |n, &b| {
                    b.is_ascii_digit()
                        .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
                        .flatten()
                })
                .ok_or(invalid)?
        };
        if self.content_length.is_some_and(|old| old != n) {
            return Err(HeadError::Malformed("conflicting Content-Length headers"));
        }
        self.content_length = Some(n);
        Ok(())
    }

    fn transfer_encoding(&mut self, value: &[u8]) -> Result<(), HeadError> {
        if value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            // The usual value alone: what the loop below does for it.
            if self.chunked {
                return Err(HeadError::Malformed(
                    "chunked is not the final transfer coding",
                ));
            }
            self.chunked = true;
            return Ok(());
        }
        let v = value_str(value, "invalid Transfer-Encoding")?;
        for coding in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if self.chunked {
                // chunked must be the final coding, once.
                return Err(HeadError::Malformed(
                    "chunked is not the final transfer coding",
                ));
            }
            if coding.eq_ignore_ascii_case("chunked") {
                self.chunked = true;
            } else {
                self.other_te = true;
            }
        }
        Ok(())
    }

    fn connection(&mut self, value: &[u8]) -> Result<(), HeadError> {
        // The usual values alone, without splitting. `lower_is` is exact on a value too: its
        // one other match, CR for `-`, cannot occur (both parsers end a value at CR).
        let v = value.trim_ascii();
        if lower_is(v, b"keep-alive") {
            self.conn_keep_alive = true;
            return Ok(());
        }
        if lower_is(v, b"close") {
            self.conn_close = true;
            return Ok(());
        }
        let v = value_str(value, "invalid Connection")?;
        for tok in v.split(',').map(str::trim) {
            if tok.eq_ignore_ascii_case("close") {
                self.conn_close = true;
            } else if tok.eq_ignore_ascii_case("keep-alive") {
                self.conn_keep_alive = true;
            }
        }
        Ok(())
    }

    pub(super) fn keep_alive(&self, minor_version: u8) -> bool {
        if minor_version == 0 {
            self.conn_keep_alive && !self.conn_close
        } else {
            !self.conn_close
        }
    }
}

/// Decimal digits that cannot overflow a u64, however many of them are 9s.
pub(super) const MAX_UNCHECKED_DIGITS: usize = 19;

/// The value of `v`, digits only and at most `MAX_UNCHECKED_DIGITS` of them (not checked
/// here): a `Content-Length` as both the parser and the memo read it.
#[inline]
pub(super) fn short_decimal(v: &[u8]) -> Option<u64> {
    let mut n = 0u64;
    for &b in v {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n = n * 10 + u64::from(d);
    }
    Some(n)
}

/// Keeps the tokens of a `Connection` value other than close and keep-alive.
pub(super) fn note_connection(named: &mut Option<String>, value: &[u8]) {
    let t = value.trim_ascii();
    if t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close") {
        return;
    }
    let Ok(v) = std::str::from_utf8(value) else {
        return;
    };
    for tok in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if tok.eq_ignore_ascii_case("close") || tok.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        let s = named.get_or_insert_with(String::new);
        if !s.is_empty() {
            s.push(',');
        }
        s.push_str(tok);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_are_told_apart_ignoring_case_only() {
        for (n, want) in [
            ("Content-Length", Name::ContentLength),
            ("CONTENT-LENGTH", Name::ContentLength),
            ("transfer-Encoding", Name::TransferEncoding),
            ("Connection", Name::Connection),
            ("HOST", Name::Host),
            ("Content-Type", Name::ContentType),
            ("content-encoding", Name::ContentEncoding),
            ("X-Request-Id", Name::XRequestId),
            ("X-Session-ID", Name::XSessionId),
            ("X-API-Key", Name::XApiKey),
            ("Authorization", Name::Authorization),
            ("Expect", Name::Expect),
            ("Content_Length", Name::Other),
            ("Content-Lengtj", Name::Other),
            ("Hosts", Name::Other),
            ("X-Request_Id", Name::Other),
            ("x-session-ie", Name::Other),
            ("Content-Typ", Name::Other),
        ] {
            assert_eq!(Name::of(n.as_bytes()), want, "{n}");
        }
        // Every token byte at every position of every name's length.
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        for lower in [
            &b"host"[..],
            b"expect",
            b"x-api-key",
            b"content-length",
            b"transfer-encoding",
        ] {
            for at in 0..lower.len() {
                for a in (0u8..=255).filter(|&a| token(a)) {
                    let mut n = lower.to_vec();
                    n[at] = a;
                    assert_eq!(lower_is(&n, lower), n.eq_ignore_ascii_case(lower), "{n:?}");
                }
            }
        }
        // Every token byte httparse allows in a name against every byte of the names.
        for a in (0u8..=255).filter(|&a| token(a)) {
            for b in b"abcdefghijklmnopqrstuvwxyz-".iter().copied() {
                assert_eq!(
                    lower_is(&[a], &[b]),
                    a.eq_ignore_ascii_case(&b),
                    "{a} vs {b}"
                );
            }
        }
    }
}
