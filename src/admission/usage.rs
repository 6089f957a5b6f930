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
    /// While searching: how many bytes of the key the previous read ended with (a read
    /// ending in `"usa` leaves 4), so that a key cut by a read is still found.
    partial: usize,
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

    /// The body's last bytes, `feed` having had the ones before them. With nothing carried
    /// over from those, the tail is searched from its end: an engine writes `usage` last, so
    /// a body that came whole in one read is read only from its usage object on, not from its
    /// start (docs/benchmarks.md, "The usage object read from the end"). The answer is
    /// `feed`'s but for a `"usage"` key inside another usage object's value, which no engine
    /// writes: here the inner one counts.
    pub fn feed_last(&mut self, bytes: &[u8]) {
        if self.in_value || self.partial > 0 {
            return self.feed(bytes);
        }
        let mut end = bytes.len();
        while let Some(at) = rfind_key(&bytes[..end]) {
            let v = &bytes[at + KEY.len()..];
            if let End::At(_, Some(counts)) = object(&v[..v.len().min(MAX_OBJECT)]) {
                self.found = Some(counts);
                return;
            }
            end = at;
        }
    }

    /// The next bytes of the body.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.in_value {
                bytes = self.capture(bytes);
                continue;
            }
            if self.partial > 0 {
                // The key begun at the end of the previous read, continued here? The carried
                // bytes hold no other start of it: the key's only quote before its last
                // byte is its first.
                let want = &KEY[self.partial..];
                let m = bytes.len().min(want.len());
                if bytes[..m] == want[..m] {
                    if m < want.len() {
                        self.partial += m;
                        return;
                    }
                    self.start_value();
                    bytes = &bytes[m..];
                    continue;
                }
                self.partial = 0;
            }
            match key_finder().find(bytes) {
                Some(at) => {
                    self.start_value();
                    bytes = &bytes[at + KEY.len()..];
                }
                None => {
                    self.partial = key_start_at_end(bytes);
                    return;
                }
            }
        }
    }

    fn start_value(&mut self) {
        self.partial = 0;
        self.value.clear();
        self.in_value = true;
    }

    /// Reads the value after the key; once it is whole (or cannot be a usage object), goes
    /// back to searching. Returns the bytes not consumed. A value that ends in this read is
    /// read where it is; only one split across reads is copied.
    fn capture<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        if self.value.is_empty() {
            match object(&bytes[..bytes.len().min(MAX_OBJECT)]) {
                End::At(end, counts) => {
                    if counts.is_some() {
                        self.found = counts;
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
        let rest = match object(value) {
            End::At(end, counts) => {
                if counts.is_some() {
                    self.found = counts;
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

/// Where the last key in `bytes` starts. Found by its `g`, the byte the key has once and
/// what follows a usage object lacks: the search from the end stops at the key's first.
fn rfind_key(bytes: &[u8]) -> Option<usize> {
    const G: usize = 4;
    debug_assert_eq!(KEY[G], b'g');
    let mut end = bytes.len();
    while let Some(g) = memchr::memrchr(b'g', &bytes[..end]) {
        // An earlier `g` is further left still: no key starts before 0.
        let start = g.checked_sub(G)?;
        if bytes.get(start..start + KEY.len()) == Some(KEY) {
            return Some(start);
        }
        end = g;
    }
    None
}

/// How many bytes at the end of `bytes` begin the key (0 to `KEY.len() - 1`). Such a tail
/// starts with a quote, and only the last quote can start one: the key has no other quote
/// before its last byte.
fn key_start_at_end(bytes: &[u8]) -> usize {
    let tail = &bytes[bytes.len().saturating_sub(KEY.len() - 1)..];
    // Six bytes at most: a plain loop, where `memrchr`'s set-up cost more than the search.
    match tail.iter().rposition(|&b| b == b'"') {
        Some(q) if KEY.starts_with(&tail[q..]) => tail.len() - q,
        _ => 0,
    }
}

enum End {
    /// The object needs more bytes.
    More,
    /// The object ends before this offset; its `(prompt_tokens, completion_tokens)` when it
    /// has a number for `prompt_tokens`.
    At(usize, Option<(u64, u64)>),
    /// What follows the key is not `: {…}`.
    Not,
}

/// Bytes that matter outside a string (quote, braces) and inside one (quote, backslash):
/// one table lookup per byte skips the rest.
const OUTSIDE: u8 = 1;
const INSIDE: u8 = 2;
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    t[b'"' as usize] = OUTSIDE | INSIDE;
    t[b'{' as usize] = OUTSIDE;
    t[b'}' as usize] = OUTSIDE;
    t[b'\\' as usize] = INSIDE;
    t
};

fn skip_blanks(v: &[u8], mut i: usize) -> usize {
    while i < v.len() && v[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Reads the `: { … }` after the key in `v` in one pass (strings skipped, braces counted),
/// taking the object's own `prompt_tokens` and `completion_tokens` numbers on the way.
fn object(v: &[u8]) -> End {
    let mut i = skip_blanks(v, 0);
    match v.get(i) {
        None => return End::More,
        Some(b':') => i += 1,
        Some(_) => return End::Not,
    }
    i = skip_blanks(v, i);
    match v.get(i) {
        None => return End::More,
        Some(b'{') => i += 1,
        Some(_) => return End::Not,
    }
    let (mut depth, mut prompt, mut completion) = (1u32, None, None);
    loop {
        while i < v.len() && CLASS[v[i] as usize] & OUTSIDE == 0 {
            i += 1;
        }
        let Some(&b) = v.get(i) else {
            return End::More;
        };
        i += 1;
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    let counts = prompt.map(|p| (p, completion.unwrap_or(0)));
                    return End::At(i, counts);
                }
            }
            _ => {
                // A string. The object's own names (no escapes in them) are recognised
                // without a scan for the closing quote.
                if depth == 1 {
                    let rest = &v[i..];
                    let (slot, len) = if rest.starts_with(b"prompt_tokens\"") {
                        (Some(&mut prompt), 14)
                    } else if rest.starts_with(b"completion_tokens\"") {
                        (Some(&mut completion), 18)
                    } else if rest.starts_with(b"total_tokens\"") {
                        (None, 13)
                    } else {
                        (None, 0)
                    };
                    if len > 0 {
                        i += len;
                        if let Some(slot) = slot.filter(|s| s.is_none()) {
                            *slot = number_at(v, i);
                        }
                        continue;
                    }
                }
                let from = i;
                loop {
                    while i < v.len() && CLASS[v[i] as usize] & INSIDE == 0 {
                        i += 1;
                    }
                    match v.get(i) {
                        None => return End::More,
                        Some(b'\\') => i += 2,
                        Some(_) => break,
                    }
                }
                let name = &v[from..i];
                i += 1;
                if depth == 1 {
                    let slot = match name {
                        b"prompt_tokens" => &mut prompt,
                        b"completion_tokens" => &mut completion,
                        _ => continue,
                    };
                    if slot.is_none() {
                        *slot = number_at(v, i);
                    }
                }
            }
        }
    }
}

/// The number after a member name ending at `i` (`: 12`); None when what follows is not
/// one (or does not fit a u64).
fn number_at(v: &[u8], i: usize) -> Option<u64> {
    let i = skip_blanks(v, i);
    if v.get(i) != Some(&b':') {
        return None;
    }
    let i = skip_blanks(v, i + 1);
    let digits = v[i..].iter().take_while(|b| b.is_ascii_digit());
    let mut n: Option<u64> = None;
    for &d in digits {
        n = Some(
            n.unwrap_or(0)
                .checked_mul(10)?
                .checked_add(u64::from(d - b'0'))?,
        );
    }
    n
}

/// The key's searcher, built once (building one per search cost more than the search).
fn key_finder() -> &'static memchr::memmem::Finder<'static> {
    static F: std::sync::OnceLock<memchr::memmem::Finder<'static>> = std::sync::OnceLock::new();
    F.get_or_init(|| memchr::memmem::Finder::new(KEY))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counts in `bytes` read whole, forwards; checked against `feed_last`'s reading.
    fn scan(bytes: &[u8]) -> Option<(u64, u64)> {
        let mut s = Scanner::default();
        s.feed(bytes);
        let mut last = Scanner::default();
        last.feed_last(bytes);
        assert_eq!(last.found(), s.found(), "read from the end");
        s.found()
    }

    /// Every way of cutting `bytes` into two reads, and one byte per read, give `want`, the
    /// last read by `feed` and by `feed_last` alike.
    fn split_everywhere(bytes: &[u8], want: Option<(u64, u64)>) {
        for cut in 0..=bytes.len() {
            for last_from_end in [false, true] {
                let mut s = Scanner::default();
                s.feed(&bytes[..cut]);
                if last_from_end {
                    s.feed_last(&bytes[cut..]);
                } else {
                    s.feed(&bytes[cut..]);
                }
                assert_eq!(
                    s.found(),
                    want,
                    "cut at {cut}, last read from the end: {last_from_end}"
                );
            }
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
    fn the_key_is_found_from_the_end_past_other_gs() {
        assert_eq!(rfind_key(b"\"usage\""), Some(0));
        assert_eq!(rfind_key(b"usage\""), None);
        assert_eq!(rfind_key(b"gggg\"usage\":{\"logprobs\":\"g\"}"), Some(4));
        assert_eq!(rfind_key(b"\"usage\":1,\"usage\":2"), Some(10));
        assert_eq!(rfind_key(b"\"usag\"g"), None);
        // The last of several usage objects, with `g`s after it and a later key whose value
        // is not an object.
        let body = br#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"usage":{"prompt_tokens":2,"completion_tokens":3},"tag":"gg","usage":null}"#;
        split_everywhere(body, Some((2, 3)));
    }

    #[test]
    fn a_read_ending_in_part_of_the_key_carries_only_that_part() {
        assert_eq!(key_start_at_end(b"abc\"usa"), 4);
        assert_eq!(key_start_at_end(b"\"usage"), 6);
        assert_eq!(key_start_at_end(b"x\"usage\""), 1);
        assert_eq!(key_start_at_end(b"\"u\""), 1);
        assert_eq!(key_start_at_end(b"null}]}\n\n"), 0);
        // A key begun in one read and not continued; the real one in the next read.
        let mut s = Scanner::default();
        s.feed(b"{\"us");
        s.feed(b"er\":\"u\",\"usage\":{\"prompt_tokens\":3}}");
        assert_eq!(s.found(), Some((3, 0)));
        // Reads of one byte that continue the key across several reads.
        split_everywhere(
            b"\"us\"usage\":{\"completion_tokens\":2,\"prompt_tokens\":1}",
            Some((1, 2)),
        );
    }

    #[test]
    fn counts_are_the_object_s_own_members() {
        assert_eq!(
            scan(br#"{"usage":{"prompt_tokens":99999999999999999999999,"completion_tokens":1}}"#),
            None
        );
        assert_eq!(
            scan(br#"{"usage": {"a": "}", "prompt_tokens" : 5, "b": {"completion_tokens": 7}, "completion_tokens": 6}}"#),
            Some((5, 6))
        );
        assert_eq!(scan(br#"{"usage":{"prompt_tokens":null}}"#), None);
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
