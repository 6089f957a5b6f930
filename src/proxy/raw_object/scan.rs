//! JSON text read byte by byte: where a value, a string or an object member ends. `value`
//! checks serde_json's grammar on the way (`RawObject`'s split of request bodies);
//! `skip_value` only follows quotes and brackets (the first-token relay's events, whose
//! values are passed on unread).

/// Bytes a skipped container stops at: quotes and brackets.
static STOPS: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'{' as usize] = true;
    t[b'[' as usize] = true;
    t[b'}' as usize] = true;
    t[b']' as usize] = true;
    t
};

/// The end of the value at `b[i]`, not checked: a string to its closing quote, a container
/// to the bracket that closes it (strings inside skipped whole), anything else to the next
/// delimiter.
pub(super) fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string(b, i + 1).map(|(end, _)| end),
        b'{' | b'[' => {
            let mut depth = 0u32;
            let mut j = i;
            loop {
                while !STOPS[*b.get(j)? as usize] {
                    j += 1;
                }
                match b[j] {
                    b'"' => {
                        j = string(b, j + 1)?.0;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    _ => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                }
                j += 1;
            }
        }
        _ => {
            let rest = &b[i..];
            let n = rest
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\n' | b'\t' | b'\r'))
                .unwrap_or(rest.len());
            (n > 0).then_some(i + n)
        }
    }
}

/// An object member's key at `b[i]` and the colon after it: the key's end (past its closing
/// quote), whether it holds an escape, and where the value starts.
pub(super) fn member_key(b: &[u8], i: usize) -> Option<(usize, bool, usize)> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let (end, escaped) = string(b, i + 1)?;
    let colon = ws(b, end);
    if b.get(colon) != Some(&b':') {
        return None;
    }
    Some((end, escaped, ws(b, colon + 1)))
}

pub(super) fn ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\t' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// The end of the value starting at `b[i]`.
pub(super) fn value(b: &[u8], i: usize, depth: u32) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string(b, i + 1).map(|(end, _)| end),
        b'{' => container(b, i + 1, depth, b'}'),
        b'[' => container(b, i + 1, depth, b']'),
        b't' => literal(b, i, b"true"),
        b'f' => literal(b, i, b"false"),
        b'n' => literal(b, i, b"null"),
        b'-' => number(b, i + 1),
        _ => number(b, i),
    }
}

/// An object's or array's members from just past its opening bracket; the end past `close`.
fn container(b: &[u8], mut i: usize, depth: u32, close: u8) -> Option<usize> {
    let depth = depth.checked_sub(1)?;
    i = ws(b, i);
    if b.get(i) == Some(&close) {
        return Some(i + 1);
    }
    loop {
        if close == b'}' {
            i = member_key(b, i)?.2;
        }
        i = ws(b, value(b, i, depth)?);
        match *b.get(i)? {
            b',' => i = ws(b, i + 1),
            c if c == close => return Some(i + 1),
            _ => return None,
        }
    }
}

fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    b.get(i..i + word.len())
        .filter(|w| *w == word)
        .map(|_| i + word.len())
}

/// serde_json's number grammar: no leading zeros, digits after `.` and after an exponent.
fn number(b: &[u8], mut i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'0' if !matches!(b.get(i + 1), Some(b'0'..=b'9')) => i += 1,
        b'1'..=b'9' => i = digits(b, i + 1),
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        i = at_least_one_digit(b, i + 1)?;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        i = at_least_one_digit(b, i)?;
    }
    Some(i)
}

fn digits(b: &[u8], mut i: usize) -> usize {
    while let Some(b'0'..=b'9') = b.get(i) {
        i += 1;
    }
    i
}

fn at_least_one_digit(b: &[u8], i: usize) -> Option<usize> {
    let end = digits(b, i);
    (end > i).then_some(end)
}

/// A string's end (past its closing quote) from just past its opening one, and whether it
/// holds an escape.
pub(super) fn string(b: &[u8], mut i: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    loop {
        let rest = b.get(i..)?;
        let at = match stop_in_words(rest) {
            Ok(at) => at,
            // A long string (a prompt): SIMD finds the quote or backslash (`memchr2`), then
            // the bytes before it are checked for control characters by their minimum, a loop
            // without an exit that the compiler vectorises.
            Err(plain) => {
                let more = rest.get(plain..)?;
                let k = memchr::memchr2(b'"', b'\\', more)?;
                if more[..k].iter().fold(0xff, |low, &c| low.min(c)) < 0x20 {
                    return None;
                }
                plain + k
            }
        };
        i += at;
        match *rest.get(at)? {
            b'"' => return Some((i + 1, escaped)),
            b'\\' => {
                escaped = true;
                i = escape(b, i + 1)?;
            }
            _ => return None, // a control character
        }
    }
}

/// Within `rest`'s first 16 bytes (keys and short values end there), eight at a time: Ok(the
/// index of the first that stops a string's scan: `"`, `\` or a control character), or
/// Err(how many were looked at, all plain).
fn stop_in_words(rest: &[u8]) -> Result<usize, usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let mut at = 0;
    while at < 16 {
        let Some(word) = rest.get(at..).and_then(|r| r.first_chunk::<8>()) else {
            let tail = rest.get(at..).unwrap_or_default();
            return match tail
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
            {
                Some(k) => Ok(at + k),
                None => Err(rest.len()),
            };
        };
        let w = u64::from_le_bytes(*word);
        let (quote, backslash) = (w ^ (ONES * b'"' as u64), w ^ (ONES * b'\\' as u64));
        // A byte's high bit is set where it is 0 (or below 0x20); the lowest such byte is
        // always a true one, which is the one needed.
        let stop = ((quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (w.wrapping_sub(ONES * 0x20) & !w))
            & HIGHS;
        if stop != 0 {
            return Ok(at + (stop.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    Err(at)
}

/// After a backslash: the escapes serde_json accepts (any four hex digits after `u`: a raw
/// value is not decoded).
fn escape(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(i + 1),
        b'u' => b
            .get(i + 1..i + 5)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .map(|_| i + 5),
        _ => None,
    }
}
