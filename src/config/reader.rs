//! Field reading: a `Reader` walks the JSON view of the YAML, takes each field with its type
//! and default, and collects *every* problem (with its path and line:column) instead of
//! stopping at the first.

use super::problem::{Kind, Problem};
use super::suggest::did_you_mean;
use super::yaml::Locator;
use serde_json::{Map, Value};
use std::time::Duration;

/// A mapping that may be absent (a section not written): fields read from it take their
/// defaults.
pub type Section<'v> = Option<&'v Map<String, Value>>;

pub struct Reader<'a> {
    loc: &'a Locator,
    pub problems: Vec<Problem>,
    /// Accepted, but worth saying (an older spelling, a setting with no effect).
    pub warnings: Vec<Problem>,
    /// `dns://` entries read since the caller last took them (for the model being read),
    /// then every one taken, with its path (`discovery.rs`).
    pub discovered: Vec<(super::DnsName, String)>,
    pub all_discovered: Vec<(super::DnsName, String)>,
}

/// `path.key`, or `key` at the top.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// What a value is, for "expected X, found Y".
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

impl<'a> Reader<'a> {
    pub fn new(loc: &'a Locator) -> Reader<'a> {
        Reader {
            loc,
            problems: Vec::new(),
            warnings: Vec::new(),
            discovered: Vec::new(),
            all_discovered: Vec::new(),
        }
    }

    fn locate(&self, path: &str, kind: Kind) -> Problem {
        Problem {
            path: path.to_string(),
            location: self.loc.get(path),
            kind,
        }
    }

    pub fn report(&mut self, path: &str, kind: Kind) {
        let p = self.locate(path, kind);
        self.problems.push(p);
    }

    /// A value the field does not accept; `msg` says why.
    pub fn problem(&mut self, path: &str, msg: impl std::fmt::Display) {
        self.report(path, Kind::Invalid(msg.to_string()));
    }

    /// Accepted, but worth saying (printed by `--validate-config`, logged at start).
    pub fn warn(&mut self, path: &str, kind: Kind) {
        let p = self.locate(path, kind);
        self.warnings.push(p);
    }

    pub fn wrong_type(&mut self, path: &str, expected: impl Into<String>, found: &Value) {
        self.report(
            path,
            Kind::WrongType {
                expected: expected.into(),
                found: type_name(found),
            },
        );
    }

    /// A mapping whose keys must be among `known`.
    pub fn mapping<'v>(
        &mut self,
        v: &'v Value,
        path: &str,
        known: &[&str],
    ) -> Option<&'v Map<String, Value>> {
        let Value::Object(m) = v else {
            self.wrong_type(path, "a mapping", v);
            return None;
        };
        for k in m.keys() {
            if !known.contains(&k.as_str()) {
                let kind = Kind::UnknownKey {
                    key: k.clone(),
                    suggestion: did_you_mean(k, known).map(str::to_string),
                };
                self.report(&join(path, k), kind);
            }
        }
        Some(m)
    }

    /// The top-level mapping `name`, its keys among `known`; None when absent or null.
    pub fn section<'v>(
        &mut self,
        top: &'v Map<String, Value>,
        name: &str,
        known: &[&str],
    ) -> Section<'v> {
        let v = top.get(name)?;
        if v.is_null() {
            return None;
        }
        self.mapping(v, name, known)
    }

    /// The value at `key`: None when absent or null; `convert` decides the type, and a
    /// value it rejects is reported as "expected {expected}" (and also gives None).
    pub fn field<T>(
        &mut self,
        m: Section<'_>,
        path: &str,
        key: &str,
        expected: &str,
        convert: impl Fn(&Value) -> Option<T>,
    ) -> Option<T> {
        let v = m.and_then(|m| m.get(key)).filter(|v| !v.is_null())?;
        let out = convert(v);
        if out.is_none() {
            self.wrong_type(&join(path, key), expected, v);
        }
        out
    }

    pub fn f64(&mut self, m: Section<'_>, path: &str, key: &str, default: f64) -> f64 {
        self.field(m, path, key, "a number", Value::as_f64)
            .unwrap_or(default)
    }

    /// A positive number of seconds.
    pub fn seconds(&mut self, m: Section<'_>, path: &str, key: &str, default: f64) -> Duration {
        let v = self.f64(m, path, key, default);
        if !(v.is_finite() && v > 0.0) {
            self.problem(
                &join(path, key),
                format!("must be a positive number of seconds, got {v}"),
            );
            return Duration::from_secs_f64(default);
        }
        Duration::from_secs_f64(v)
    }

    /// A number of seconds that may be zero (None when absent).
    pub fn seconds_or_zero(&mut self, m: Section<'_>, path: &str, key: &str) -> Option<Duration> {
        let v = self.field(m, path, key, "a number", Value::as_f64)?;
        if !(v.is_finite() && v >= 0.0) {
            self.problem(
                &join(path, key),
                format!("must be zero or a positive number of seconds, got {v}"),
            );
            return None;
        }
        Some(Duration::from_secs_f64(v))
    }

    /// An integer of at least `min`.
    pub fn uint(&mut self, m: Section<'_>, path: &str, key: &str, default: u64, min: u64) -> u64 {
        match self.field(m, path, key, "an integer", Value::as_i64) {
            None => default,
            Some(x) if x >= min as i64 => x as u64,
            Some(x) => {
                self.problem(&join(path, key), format!("must be at least {min}, got {x}"));
                default
            }
        }
    }

    pub fn boolean(&mut self, m: Section<'_>, path: &str, key: &str, default: bool) -> bool {
        self.field(m, path, key, "true or false", Value::as_bool)
            .unwrap_or(default)
    }

    /// A string (numbers are taken as their text, e.g. a model named 7).
    pub fn string(&mut self, m: Section<'_>, path: &str, key: &str) -> Option<String> {
        self.field(m, path, key, "a string", |v| match v {
            Value::String(s) => Some(s.trim().to_string()),
            Value::Number(_) => Some(v.to_string()),
            _ => None,
        })
    }

    /// A value parsed by `FromStr` (its error is the message), or the default.
    pub fn parsed<T: std::str::FromStr>(
        &mut self,
        m: Section<'_>,
        path: &str,
        key: &str,
        default: T,
    ) -> T
    where
        T::Err: std::fmt::Display,
    {
        match self.string(m, path, key) {
            None => default,
            Some(s) => s.parse().unwrap_or_else(|e: T::Err| {
                self.problem(&join(path, key), e);
                default
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read<T>(
        doc: Value,
        f: impl FnOnce(&mut Reader, &Map<String, Value>) -> T,
    ) -> (T, Vec<String>) {
        let loc = Locator::default();
        let mut r = Reader::new(&loc);
        let m = doc.as_object().unwrap().clone();
        let out = f(&mut r, &m);
        (out, r.problems.iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn defaults_when_absent_or_null() {
        let (v, p) = read(json!({"a": null}), |r, m| {
            (
                r.uint(Some(m), "s", "a", 7, 1),
                r.seconds(Some(m), "s", "b", 1.5),
                r.boolean(None, "s", "c", true),
                r.string(Some(m), "s", "a"),
            )
        });
        assert_eq!(v, (7, Duration::from_millis(1500), true, None));
        assert!(p.is_empty());
    }

    #[test]
    fn each_bad_value_is_one_problem() {
        let (_, p) = read(
            json!({"n": "x", "m": 0, "t": -1, "b": 1, "unknown": 1}),
            |r, m| {
                r.mapping(&Value::Object(m.clone()), "s", &["n", "m", "t", "b"]);
                r.uint(Some(m), "s", "n", 1, 1);
                r.uint(Some(m), "s", "m", 1, 1);
                r.seconds(Some(m), "s", "t", 1.0);
                r.boolean(Some(m), "s", "b", false);
            },
        );
        assert_eq!(
            p,
            [
                "s.unknown: unknown key `unknown`",
                "s.n: expected an integer, found a string",
                "s.m: must be at least 1, got 0",
                "s.t: must be a positive number of seconds, got -1",
                "s.b: expected true or false, found a number",
            ]
        );
    }

    #[test]
    fn numbers_read_as_strings() {
        let (v, p) = read(json!({"name": 7}), |r, m| r.string(Some(m), "", "name"));
        assert_eq!(v.as_deref(), Some("7"));
        assert!(p.is_empty());
    }
}
