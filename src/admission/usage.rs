//! The token counts an engine reports in a response's `usage` object (a non-streamed body,
//! or a stream's last event with `stream_options.include_usage`), found in the bytes as
//! they are relayed — no JSON tree is built for it.

/// `(prompt_tokens, completion_tokens)` of the last `usage` object in `bytes`, if whole.
pub fn scan(bytes: &[u8]) -> Option<(u64, u64)> {
    let at = rfind(bytes, b"\"usage\"")?;
    // The object's fields, nested details included, fit well within this.
    let obj = &bytes[at..bytes.len().min(at + 512)];
    Some((
        number_after(obj, b"\"prompt_tokens\"")?,
        number_after(obj, b"\"completion_tokens\"").unwrap_or(0),
    ))
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

fn number_after(obj: &[u8], key: &[u8]) -> Option<u64> {
    let at = obj.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &obj[at..];
    let colon = rest.iter().position(|&b| !b.is_ascii_whitespace())?;
    if rest[colon] != b':' {
        return None;
    }
    let digits: Vec<u8> = rest[colon + 1..]
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn no_usage_or_a_null_one_is_none() {
        assert_eq!(scan(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n"), None);
        assert_eq!(scan(br#"{"usage":null}"#), None);
    }
}
