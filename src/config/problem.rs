//! A config problem as a typed value — where it is (field path, line:column) and what is
//! wrong (its kind) — rendered to text in one place, `Display`.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Field path, e.g. `models[0].prefill[1]`; empty for the document itself.
    pub path: String,
    /// 1-based line and column of the field in the file, when known.
    pub location: Option<(usize, usize)>,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// The file could not be read (`path` is empty; the message names the file).
    Unreadable(String),
    /// The text is not YAML.
    InvalidYaml(String),
    /// A key the mapping does not have, with the closest known one.
    UnknownKey {
        key: String,
        suggestion: Option<String>,
    },
    /// A value of the wrong type: `expected` says what was wanted.
    WrongType {
        expected: String,
        found: &'static str,
    },
    /// A key that selects a feature xpyd does not have, and what to use instead.
    Unsupported { feature: String, instead: String },
    /// A key accepted under an older spelling (a warning, not an error).
    Renamed { old: String, new: String },
    /// A value the field does not accept; the text says why.
    Invalid(String),
    /// Accepted, with something to know (a warning): the text says what.
    Note(String),
}

impl Problem {
    pub fn new(path: &str, kind: Kind) -> Problem {
        Problem {
            path: path.to_string(),
            location: None,
            kind,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Kind::Unreadable(msg) = &self.kind {
            return f.write_str(msg);
        }
        let path = if self.path.is_empty() {
            "<document>"
        } else {
            &self.path
        };
        f.write_str(path)?;
        if let Some((l, c)) = self.location {
            write!(f, " (line {l}, column {c})")?;
        }
        f.write_str(": ")?;
        match &self.kind {
            Kind::Unreadable(m) | Kind::Invalid(m) | Kind::Note(m) => f.write_str(m),
            Kind::InvalidYaml(m) => write!(f, "invalid YAML: {m}"),
            Kind::UnknownKey { key, suggestion } => {
                write!(f, "unknown key `{key}`")?;
                match suggestion {
                    Some(s) => write!(f, "; did you mean `{s}`?"),
                    None => Ok(()),
                }
            }
            Kind::WrongType { expected, found } => write!(f, "expected {expected}, found {found}"),
            Kind::Unsupported { feature, instead } => {
                write!(f, "{feature} is not supported by xpyd; {instead}")
            }
            Kind::Renamed { old, new } => {
                write!(f, "`{old}` is read as `{new}`; write `{new}` instead")
            }
        }
    }
}

/// Every problem of a config file at once.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl ConfigError {
    pub fn one(kind: Kind) -> ConfigError {
        ConfigError {
            problems: vec![Problem::new("", kind)],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(path: &str, location: Option<(usize, usize)>, kind: Kind) -> String {
        Problem {
            path: path.into(),
            location,
            kind,
        }
        .to_string()
    }

    #[test]
    fn renders_path_location_and_kind() {
        assert_eq!(
            at(
                "prefil",
                Some((2, 1)),
                Kind::UnknownKey {
                    key: "prefil".into(),
                    suggestion: Some("prefill".into())
                }
            ),
            "prefil (line 2, column 1): unknown key `prefil`; did you mean `prefill`?"
        );
        assert_eq!(
            at(
                "port",
                None,
                Kind::WrongType {
                    expected: "an integer".into(),
                    found: "a string"
                }
            ),
            "port: expected an integer, found a string"
        );
        assert_eq!(
            at("", Some((3, 4)), Kind::InvalidYaml("bad".into())),
            "<document> (line 3, column 4): invalid YAML: bad"
        );
        assert_eq!(
            at("", None, Kind::Unreadable("cannot read x: gone".into())),
            "cannot read x: gone"
        );
    }
}
