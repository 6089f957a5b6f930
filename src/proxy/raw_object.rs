//! A JSON object's top level as (key, raw JSON value) pairs that borrow the text: what the
//! proxy reads of request bodies and prefill answers without deserialising them.
//!
//! Bodies in the usual shape (top-level keys without escapes, nesting under `MAX_DEPTH`) are
//! split by `split` in one pass that checks the JSON grammar as serde_json does. Anything
//! else, invalid JSON included, goes to serde_json, so every error is serde_json's. A unit
//! test holds the two to the same answer over mutated sample bodies (docs/benchmarks.md,
//! "The JSON split, lines every worker writes, long prompts").

mod scan;

use scan::{member_key, skip_value, value, ws};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// The top-level members of a JSON object, in order, values left as raw JSON text (without
/// the whitespace around them).
pub struct RawObject<'a> {
    pub fields: Vec<(Cow<'a, str>, &'a str)>,
}

impl<'a> RawObject<'a> {
    /// serde_json's error when `text` is not one JSON object.
    pub fn parse(text: &'a str) -> Result<Self, serde_json::Error> {
        match split(text) {
            Some(fields) => Ok(RawObject { fields }),
            None => serde_json::from_str::<ViaSerde<'a>>(text).map(|o| o.0),
        }
    }

    /// `parse` for bytes: invalid UTF-8 goes to serde_json, for its error.
    pub fn parse_bytes(body: &'a [u8]) -> Result<Self, serde_json::Error> {
        match std::str::from_utf8(body) {
            Ok(text) => Self::parse(text),
            Err(_) => serde_json::from_slice::<ViaSerde<'a>>(body).map(|o| o.0),
        }
    }

    pub fn get(&self, key: &str) -> Option<&'a str> {
        // Last one wins, like most JSON parsers (and vLLM's pydantic models).
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    /// Writes the object again with the members named in `set` holding the given raw JSON
    /// values: in place where it has them (every occurrence), after its other members where it
    /// has not. Every other member is copied verbatim, in order.
    pub fn write_with(&self, out: &mut Vec<u8>, set: &[(&str, &str)]) {
        debug_assert!(set.len() <= 32);
        out.push(b'{');
        let mut seen = 0u32; // bit i: `set[i]` was written in place
        for (k, v) in &self.fields {
            push_member(out, k, replaced(set, k, &mut seen).unwrap_or(v));
        }
        close_with(out, set, seen);
    }
}

/// The value `set` gives `key`, if any; marks it written in place (bit i of `seen`).
fn replaced<'s>(set: &[(&str, &'s str)], key: &str, seen: &mut u32) -> Option<&'s str> {
    let i = set.iter().position(|(name, _)| *name == key)?;
    *seen |= 1 << i;
    Some(set[i].1)
}

/// The members of `set` not written in place (`seen`), after the others; the closing brace.
fn close_with(out: &mut Vec<u8>, set: &[(&str, &str)], seen: u32) {
    for (i, (k, v)) in set.iter().enumerate() {
        if seen & (1 << i) == 0 {
            push_member(out, &Cow::Borrowed(*k), v);
        }
    }
    if out.last() == Some(&b',') {
        out.pop();
    }
    out.push(b'}');
}

/// `RawObject::parse(text)` and `write_with(out, set)` in one pass, reading the object's top
/// level only: its shape is checked (keys, colons, commas, the closing brace); a member's
/// value is skipped by its quotes and brackets, not checked, and copied as it is. For the
/// events of the first-token relay, whose values go to the client as the engine wrote them,
/// as on every other relay. False, with `out` as it was, when the text is not an object at
/// its top level or a key holds an escape: `parse` then decides.
pub fn rewrite_members(text: &str, set: &[(&str, &str)], out: &mut Vec<u8>) -> bool {
    let len = out.len();
    let done = write_members(text, set, out).is_some();
    if !done {
        out.truncate(len);
    }
    done
}

fn write_members(text: &str, set: &[(&str, &str)], out: &mut Vec<u8>) -> Option<()> {
    debug_assert!(set.len() <= 32);
    let b = text.as_bytes();
    let mut i = ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    out.push(b'{');
    let mut seen = 0u32; // bit k: `set[k]` was written in place
    i = ws(b, i + 1);
    if b.get(i) != Some(&b'}') {
        loop {
            let (end, escaped, start) = member_key(b, i)?;
            if escaped {
                return None;
            }
            let key = text.get(i + 1..end - 1)?;
            let stop = skip_value(b, start)?;
            let v = match replaced(set, key, &mut seen) {
                Some(v) => v,
                None => text.get(start..stop)?,
            };
            push_member(out, &Cow::Borrowed(key), v);
            i = ws(b, stop);
            match *b.get(i)? {
                b',' => i = ws(b, i + 1),
                b'}' => break,
                _ => return None,
            }
        }
    }
    if ws(b, i + 1) != b.len() {
        return None;
    }
    close_with(out, set, seen);
    Some(())
}

/// `"key":value,` — values are copied verbatim; a borrowed key is one read without escapes
/// (or a literal of ours), so it is too; an owned one was decoded and is escaped again.
#[allow(clippy::ptr_arg)] // the variant, not only the text, says how to write the key
pub fn push_member(out: &mut Vec<u8>, k: &Cow<'_, str>, v: &str) {
    match k {
        Cow::Borrowed(k) => {
            out.push(b'"');
            out.extend_from_slice(k.as_bytes());
            out.push(b'"');
        }
        Cow::Owned(k) => {
            let _ = serde_json::to_writer(&mut *out, k);
        }
    }
    out.push(b':');
    out.extend_from_slice(v.as_bytes());
    out.push(b',');
}

/// Deeper values are left to serde_json (its own limit is higher; real bodies nest a few
/// levels), which keeps `split`'s recursion small.
const MAX_DEPTH: u32 = 64;

/// The usual shape's split; None for anything else, invalid JSON included.
fn split(text: &str) -> Option<Vec<(Cow<'_, str>, &str)>> {
    let b = text.as_bytes();
    let mut i = ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    let mut fields = Vec::with_capacity(12);
    i = ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return (ws(b, i + 1) == b.len()).then_some(fields);
    }
    loop {
        let (end, escaped, start) = member_key(b, i)?;
        if escaped {
            return None; // serde_json decodes such a key
        }
        let key = text.get(i + 1..end - 1)?;
        i = value(b, start, MAX_DEPTH)?;
        fields.push((Cow::Borrowed(key), text.get(start..i)?));
        i = ws(b, i);
        match *b.get(i)? {
            b',' => i = ws(b, i + 1),
            b'}' => return (ws(b, i + 1) == b.len()).then_some(fields),
            _ => return None,
        }
    }
}

/// serde_json's reading, for what `split` leaves to it.
struct ViaSerde<'a>(RawObject<'a>);

struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for ViaSerde<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ViaSerde<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(12));
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    let v: &'de RawValue = map.next_value()?;
                    fields.push((k.0, v.get()));
                }
                Ok(ViaSerde(RawObject { fields }))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via_serde(text: &str) -> Result<Vec<(Cow<'_, str>, &str)>, String> {
        serde_json::from_str::<ViaSerde<'_>>(text)
            .map(|o| o.0.fields)
            .map_err(|e| e.to_string())
    }

    /// `rewrite_members` writes what `parse` + `write_with` write for every valid object it
    /// takes, and takes every one in the usual shape; what it takes beyond that is invalid
    /// inside a member's value, which it does not read.
    fn same_rewrite(text: &str) {
        let set = [("id", r#""cmpl-X""#), ("created", "7"), ("zz", "null")];
        let mut fast = b"kept".to_vec();
        let taken = rewrite_members(text, &set, &mut fast);
        match RawObject::parse(text) {
            Ok(obj)
                if obj
                    .fields
                    .iter()
                    .all(|(k, _)| matches!(k, Cow::Borrowed(_))) =>
            {
                let mut want = b"kept".to_vec();
                obj.write_with(&mut want, &set);
                assert!(taken, "a valid object left: {text:?}");
                assert_eq!(fast, want, "{text:?}");
            }
            _ if !taken => assert_eq!(fast, b"kept", "{text:?}"),
            Ok(_) => panic!("an escaped key taken: {text:?}"),
            Err(_) => {
                // Invalid below the top level only: the top level reads as an object's.
                assert!(
                    fast.starts_with(b"kept{") && fast.ends_with(b"}"),
                    "{text:?}"
                );
            }
        }
    }

    #[test]
    fn rewrite_members_reads_the_top_level_only() {
        let set = [("id", r#""X""#)];
        let rewrite = |t: &str| {
            let mut out = Vec::new();
            rewrite_members(t, &set, &mut out).then(|| String::from_utf8(out).unwrap())
        };
        assert_eq!(
            rewrite(r#" { "id" : "a" , "n" : [1, {"b": "]"}] , "t": true } "#).as_deref(),
            Some(r#"{"id":"X","n":[1, {"b": "]"}],"t":true}"#)
        );
        assert_eq!(rewrite("{}").as_deref(), Some(r#"{"id":"X"}"#));
        // What a value holds is not checked, as on the plain relay.
        assert_eq!(
            rewrite(r#"{"c":[1,}}"#).as_deref(),
            Some(r#"{"c":[1,},"id":"X"}"#)
        );
        for bad in [
            "",
            "5",
            "[1]",
            r#""s""#,
            "{",
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{"a":}"#,
            r#"{"a":1}x"#,
            r#"{"a":[1}"#,
            r#"{"a":"x}"#,
            r#"{a:1}"#,
            r#"{"\u0069d":1}"#,
        ] {
            assert_eq!(rewrite(bad), None, "{bad:?}");
        }
    }

    /// `split` answers exactly as serde_json does over sample bodies cut and mutated at random
    /// with the bytes JSON gives meaning to: the same fields when it takes a body, and it
    /// leaves to serde_json only invalid bodies and the shapes it does not read (an escaped
    /// top-level key, deep nesting).
    #[test]
    fn the_split_reads_bodies_as_serde_json_does() {
        let bodies = [
            r#"{"model":"bench-model","prompt":"The quick brown fox jumps over the lazy dog","max_tokens":8}"#,
            r#" {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "h\u00e9 \"q\" \\ \/ \n"}]}], "stream": true, "stream_options": {"include_usage": true}, "temperature": 0.7, "top_p": 1e-3, "n": -0, "stop": null, "logprobs": false, "seed": 12345678901234567890, "x": -1.5E+2 } "#,
            r#"{"prompt":[[1,2,3],[4]],"max_completion_tokens":0,"user":"ü🦀","kv_transfer_params":{"remote_block_ids":[],"remote_host":null},"id":"cmpl-1","choices":[{"text":"a","index":0,"finish_reason":"length"}],"usage":{"prompt_tokens":9,"completion_tokens":1}}"#,
            "{}",
            "{\"a\":{},\"b\":[],\"c\":\"\"}\n",
        ];
        let interesting = b"{}[]\":,\\/ \t\n\r0123456789.eE+-ntfulrsabx\x01\x1f";
        let mut next = crate::test_rng(0x9e37_79b9_7f4a_7c15);
        let (mut taken, mut valid) = (0, 0);
        for base in bodies {
            let mut variants: Vec<String> = vec![base.to_string()];
            variants.extend((0..base.len()).filter_map(|cut| base.get(..cut).map(str::to_string)));
            for _ in 0..4000 {
                let mut m = base.as_bytes().to_vec();
                for _ in 0..1 + next(3) {
                    let at = next(m.len().max(1));
                    let c = interesting[next(interesting.len())];
                    match next(3) {
                        0 if at < m.len() => m[at] = c,
                        1 => m.insert(at.min(m.len()), c),
                        _ if at < m.len() => {
                            m.remove(at);
                        }
                        _ => {}
                    }
                }
                // Mutations inside a multi-byte character are not text: skip them.
                variants.extend(String::from_utf8(m).ok());
            }
            for text in &variants {
                let fast = split(text);
                same_rewrite(text);
                match via_serde(text) {
                    Ok(want) => {
                        valid += 1;
                        let unusual = want.iter().any(|(k, _)| matches!(k, Cow::Owned(_)));
                        match fast {
                            Some(got) => {
                                taken += 1;
                                assert_eq!(got, want, "{text:?}");
                            }
                            None => assert!(unusual, "valid, in the usual shape, left: {text:?}"),
                        }
                    }
                    Err(e) => assert!(fast.is_none(), "{text:?}: serde_json says {e}"),
                }
            }
        }
        // The mutations keep a fair share of valid bodies, and the split takes them.
        assert!(taken > 2000 && taken * 10 > valid * 9, "{taken} of {valid}");
    }

    #[test]
    fn deep_nesting_and_escaped_keys_are_left_to_serde_json() {
        let deep = format!(
            "{{\"a\":{}1{}}}",
            "[".repeat(MAX_DEPTH as usize + 1),
            "]".repeat(MAX_DEPTH as usize + 1)
        );
        assert!(split(&deep).is_none());
        let o = RawObject::parse(&deep).unwrap();
        assert!(o.get("a").unwrap().starts_with("[[["));
        let o = RawObject::parse(r#"{"we\u0069rd":1,"plain":2}"#).unwrap();
        assert_eq!(o.get("weird"), Some("1"));
        assert_eq!(o.get("plain"), Some("2"));
        // Long strings cross the word-at-a-time scan's edges at every offset.
        for n in 0..40 {
            let s = "x".repeat(n);
            for tail in ["\"", "\\n\"", "\u{1}\""] {
                let text = format!("{{\"k\":\"{s}{tail}}}");
                assert_eq!(split(&text).is_some(), tail != "\u{1}\"", "{text:?}");
            }
        }
        assert!(RawObject::parse_bytes(b"{\"k\":\"\xff\"}").is_err());
    }

    /// Values at the grammar's edges, each taken by the split exactly when serde_json takes it.
    #[test]
    fn edge_values_are_taken_exactly_when_serde_json_takes_them() {
        let values = [
            "0",
            "-0",
            "00",
            "01",
            "-01",
            "0.",
            "0.5",
            ".5",
            "1.e3",
            "1e",
            "1e+",
            "1E-0",
            "1e05",
            "-",
            "--1",
            "+1",
            "0x1",
            "1_0",
            "tru",
            "true",
            "truee",
            "nul",
            "null",
            "False",
            r#""\u12""#,
            r#""\u12g4""#,
            r#""\uD800""#,
            r#""\a""#,
            r#""\/""#,
            "\"\t\"",
            "\"\x7f\"",
            "[1,]",
            "[,1]",
            "[1 2]",
            "[]",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{,}",
            "{\"a\" : [ ] }",
        ];
        for v in values {
            let text = format!("{{\"k\":{v}}}");
            let want = via_serde(&text).ok();
            assert_eq!(split(&text), want, "{text:?}");
        }
        for text in [
            "",
            " ",
            "{",
            "}",
            "{}}",
            "{} {}",
            "[]",
            "{\"k\":1}x",
            "{\"k\"::1}",
        ] {
            assert!(
                split(text).is_none() && via_serde(text).is_err(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn write_with_sets_members_in_place_or_after_the_rest() {
        let obj = RawObject::parse(r#"{ "b" : [1, 2], "a":"x", "b":3 }"#).unwrap();
        let mut out = Vec::new();
        obj.write_with(&mut out, &[("b", "null"), ("c", r#""new""#)]);
        assert_eq!(out, br#"{"b":null,"a":"x","b":null,"c":"new"}"#);
        out.clear();
        obj.write_with(&mut out, &[]);
        assert_eq!(out, br#"{"b":[1, 2],"a":"x","b":3}"#);
        out.clear();
        RawObject::parse("{}").unwrap().write_with(&mut out, &[]);
        assert_eq!(out, b"{}");
        out.clear();
        // A key with an escape comes back escaped.
        let obj = RawObject::parse(r#"{"q\"k":1}"#).unwrap();
        obj.write_with(&mut out, &[("z", "2")]);
        assert_eq!(out, br#"{"q\"k":1,"z":2}"#);
    }
}
