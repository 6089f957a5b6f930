//! The token counts an engine reports in a response's `usage` object (a non-streamed body,
//! or a stream's last event with `stream_options.include_usage`), found in the body bytes
//! as they are relayed — no JSON tree is built, and nothing is buffered but a few bytes:
//! the object may arrive split across any number of upstream reads.

/// The key looked for.
const KEY: &[u8] = b"\"usage\"";
/// A usage object's fields, nested details included, fit well within this; a longer value
/// is not a usage object this scanner counts.
const MAX_OBJECT: usize = 1024;

/// Fed the decoded body bytes read after read; remembers the last whole `usage` object's
/// `(prompt_tokens, completion_tokens)`.
#[derive(Default)]
pub struct Scanner {
    /// While searching: the last bytes of the previous read, which may start the key.
    carry: [u8; KEY.len() - 1],
    carry_len: usize,
    /// After the key: the value's bytes so far (allocated once the key was first seen).
    value: Vec<u8>,
    in_value: bool,
    found: Option<(u64, u64)>,
}

impl Scanner {
    /// The last whole `usage` object seen so far.
    pub fn found(&self) -> Option<(u64, u64)> {
        self.found
    }

    /// The next bytes of the body.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.in_value {
                bytes = self.capture(bytes);
                continue;
            }
            // The key starting in the carried bytes and ending in these.
            let mut joined = [0u8; 2 * (KEY.len() - 1)];
            let n = self.carry_len;
            let m = bytes.len().min(KEY.len() - 1);
            joined[..n].copy_from_slice(&self.carry[..n]);
            joined[n..n + m].copy_from_slice(&bytes[..m]);
            if let Some(at) = find(&joined[..n + m], KEY).filter(|&at| at < n) {
                self.carry_len = 0;
                self.value.clear();
                self.in_value = true;
                bytes = &bytes[at + KEY.len() - n..];
                continue;
            }
            if let Some(at) = find(bytes, KEY) {
                self.carry_len = 0;
                self.value.clear();
                self.in_value = true;
                bytes = &bytes[at + KEY.len()..];
                continue;
            }
            // Keep what could start the key in the next read.
            let keep = (n + bytes.len()).min(KEY.len() - 1);
            let mut tail = [0u8; KEY.len() - 1];
            if bytes.len() >= keep {
                tail[..keep].copy_from_slice(&bytes[bytes.len() - keep..]);
            } else {
                let old = keep - bytes.len();
                tail[..old].copy_from_slice(&self.carry[n - old..n]);
                tail[old..keep].copy_from_slice(bytes);
            }
            self.carry = tail;
            self.carry_len = keep;
            return;
        }
    }

    /// Reads the value after the key; once it is whole (or cannot be a usage object), goes
    /// back to searching. Returns the bytes not consumed. A value that ends in this read is
    /// read where it is; only one split across reads is copied.
    fn capture<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        if self.value.is_empty() {
            match object_end(&bytes[..bytes.len().min(MAX_OBJECT)]) {
                End::At(end) => {
                    if let Some(u) = counts(&bytes[..end]) {
                        self.found = Some(u);
                    }
                    self.in_value = false;
                    return &bytes[end..];
                }
                End::Not => {
                    self.in_value = false;
                    return bytes;
                }
                // Longer than a usage object: search on after it.
                End::More if bytes.len() >= MAX_OBJECT => {
                    self.in_value = false;
                    return &bytes[MAX_OBJECT..];
                }
                End::More => {}
            }
        }
        let value = &mut self.value;
        let before = value.len();
        let take = bytes.len().min(MAX_OBJECT - before);
        value.extend_from_slice(&bytes[..take]);
        let rest = match object_end(value) {
            End::At(end) => {
                if let Some(u) = counts(&value[..end]) {
                    self.found = Some(u);
                }
                self.in_value = false;
                &bytes[end - before..]
            }
            End::More if value.len() < MAX_OBJECT => &bytes[take..],
            // Too long for a usage object: search on after what was taken.
            End::More => {
                self.in_value = false;
                &bytes[take..]
            }
            // Not an object (`null`, or `"usage"` was a value): search on after the key
            // (only blanks and the colon were taken before these bytes).
            End::Not => {
                self.in_value = false;
                bytes
            }
        };
        if !self.in_value {
            value.clear();
        }
        rest
    }
}

enum End {
    /// The object needs more bytes.
    More,
    /// The object ends before this offset.
    At(usize),
    /// What follows the key is not `: {…}`.
    Not,
}

/// Where the `: { … }` after the key ends in `v` (strings skipped, braces counted).
fn object_end(v: &[u8]) -> End {
    let mut i = 0;
    let ws = |v: &[u8], mut i: usize| {
        while i < v.len() && v[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    i = ws(v, i);
    match v.get(i) {
        None => return End::More,
        Some(b':') => i += 1,
        Some(_) => return End::Not,
    }
    i = ws(v, i);
    match v.get(i) {
        None => return End::More,
        Some(b'{') => {}
        Some(_) => return End::Not,
    }
    let (mut depth, mut in_str, mut esc) = (0u32, false, false);
    while i < v.len() {
        let b = v[i];
        i += 1;
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return End::At(i);
                }
            }
            _ => {}
        }
    }
    End::More
}

/// The key's searcher, built once (building one per search cost more than the search).
fn key_finder() -> &'static memchr::memmem::Finder<'static> {
    static F: std::sync::OnceLock<memchr::memmem::Finder<'static>> = std::sync::OnceLock::new();
    F.get_or_init(|| memchr::memmem::Finder::new(KEY))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    // SIMD search: a byte-by-byte window compare cost ~10 instructions per body byte.
    if needle == KEY {
        return key_finder().find(hay);
    }
    // The usage object's own keys, in at most MAX_OBJECT bytes: the first byte, then a compare.
    let (&first, rest) = needle.split_first()?;
    let mut at = 0;
    while let Some(i) = memchr::memchr(first, &hay[at..]) {
        let i = at + i;
        if hay[i + 1..].starts_with(rest) {
            return Some(i);
        }
        at = i + 1;
    }
    None
}

/// `(prompt_tokens, completion_tokens)` of a whole usage object.
fn counts(obj: &[u8]) -> Option<(u64, u64)> {
    Some((
        number_after(obj, b"\"prompt_tokens\"")?,
        number_after(obj, b"\"completion_tokens\"").unwrap_or(0),
    ))
}

fn number_after(obj: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(obj, key)? + key.len();
    let rest = &obj[at..];
    let colon = rest.iter().position(|&b| !b.is_ascii_whitespace())?;
    if rest[colon] != b':' {
        return None;
    }
    let mut digits = rest[colon + 1..]
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take_while(|b| b.is_ascii_digit())
        .peekable();
    digits.peek()?;
    digits.try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(bytes: &[u8]) -> Option<(u64, u64)> {
        let mut s = Scanner::default();
        s.feed(bytes);
        s.found()
    }

    /// Every way of cutting `bytes` into two reads, and one byte per read, give `want`.
    fn split_everywhere(bytes: &[u8], want: Option<(u64, u64)>) {
        for cut in 0..=bytes.len() {
            let mut s = Scanner::default();
            s.feed(&bytes[..cut]);
            s.feed(&bytes[cut..]);
            assert_eq!(s.found(), want, "cut at {cut}");
        }
        let mut s = Scanner::default();
        for b in bytes {
            s.feed(std::slice::from_ref(b));
        }
        assert_eq!(s.found(), want, "byte by byte");
    }

    #[test]
    fn finds_usage_in_a_body_and_in_a_stream_event() {
        let body = br#"{"id":"x","choices":[{"text":"hi"}],"usage":{"prompt_tokens":12,"total_tokens":15,"completion_tokens":3}}"#;
        assert_eq!(scan(body), Some((12, 3)));
        let nested = br#"{"usage":{"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens":9}}"#;
        assert_eq!(scan(nested), Some((5, 9)));
        let event = b"data: {\"choices\":[],\"usage\": {\"prompt_tokens\": 7, \"completion_tokens\": 40}}\n\ndata: [DONE]\n\n";
        assert_eq!(scan(event), Some((7, 40)));
    }

    #[test]
    fn a_usage_object_split_across_reads_is_found_wherever_it_is_cut() {
        split_everywhere(
            br#"{"id":"x","choices":[{"text":"hi"}],"usage":{"prompt_tokens":12,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens":3},"kv_transfer_params":null}"#,
            Some((12, 3)),
        );
        split_everywhere(
            b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\": {\"prompt_tokens\": 7, \"completion_tokens\": 40}}\n\ndata: [DONE]\n\n",
            Some((7, 40)),
        );
    }

    #[test]
    fn the_last_usage_wins_and_text_mentioning_usage_is_not_one() {
        // vLLM's continuous usage stats: every event carries the running counts.
        let stream = b"data: {\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1}}\n\ndata: {\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n\n";
        split_everywhere(stream, Some((4, 2)));
        // Generated text: the quotes are escaped, so the key never matches.
        let text = br#"{"choices":[{"text":"the \"usage\":{\"prompt_tokens\":1} field"}],"usage":{"prompt_tokens":9,"completion_tokens":5}}"#;
        split_everywhere(text, Some((9, 5)));
    }

    #[test]
    fn no_usage_a_null_one_or_an_endless_one_is_none() {
        split_everywhere(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n", None);
        split_everywhere(br#"{"usage":null}"#, None);
        split_everywhere(br#"{"usage":"usage"}"#, None);
        let mut long = br#"{"usage":{"prompt_tokens":1,"x":""#.to_vec();
        long.extend(std::iter::repeat_n(b'a', 2 * MAX_OBJECT));
        long.extend_from_slice(br#""}}"#);
        assert_eq!(scan(&long), None);
        // And the scanner still finds a later one.
        let mut s = Scanner::default();
        s.feed(&long);
        s.feed(br#"{"usage":{"prompt_tokens":2,"completion_tokens":3}}"#);
        assert_eq!(s.found(), Some((2, 3)));
    }
}
