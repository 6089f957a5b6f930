//! The only module that touches the YAML library. serde_yaml is unmaintained; swapping it
//! (e.g. for serde_yml or saphyr) means changing this file only. Documents are handed to
//! the rest of the crate as `serde_json::Value` (key order kept), with a `Locator` that
//! knows the line and column of every key and list item of block- and flow-style YAML.

use serde_json::Value;
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct YamlError {
    pub message: String,
    /// 1-based line and column, when the parser knows them.
    pub location: Option<(usize, usize)>,
}

impl std::fmt::Display for YamlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.location {
            Some((l, c)) => write!(f, "{l}:{c}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Parses a YAML document into JSON values, with the locations of its keys and items.
pub fn parse(text: &str) -> Result<(Value, Locator), YamlError> {
    let yaml: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        let location = e.location().map(|l| (l.line(), l.column()));
        let mut message = e.to_string();
        if let Some(i) = message.find(" at line ") {
            message.truncate(i);
        }
        YamlError { message, location }
    })?;
    let value = serde_json::to_value(&yaml).map_err(|e| YamlError {
        message: format!("unsupported YAML (keys must be strings): {e}"),
        location: None,
    })?;
    Ok((value, Locator::scan(text)))
}

/// Path → (line, column), 1-based. Paths look like `models[0].prefill[2]`.
#[derive(Debug, Default)]
pub struct Locator {
    at: HashMap<String, (usize, usize)>,
}

impl Locator {
    pub fn get(&self, path: &str) -> Option<(usize, usize)> {
        // Fall back to the closest located ancestor.
        let mut p = path;
        loop {
            if let Some(l) = self.at.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// A light scanner for the block and flow styles that configs use; anything it cannot
    /// follow just has no location (the parse itself is serde_yaml's).
    fn scan(text: &str) -> Locator {
        let mut at = HashMap::new();
        // (indent, path) of open block containers; list item counters per path.
        let mut stack: Vec<(usize, String)> = Vec::new();
        let mut items: HashMap<String, usize> = HashMap::new();
        for (ln, raw) in text.lines().enumerate() {
            let line_no = ln + 1;
            let line = strip_comment(raw);
            if line.trim().is_empty() {
                continue;
            }
            let mut indent = line.len() - line.trim_start().len();
            let mut rest = line.trim_start();
            while stack.last().is_some_and(|(i, _)| *i > indent) {
                stack.pop();
            }
            let mut parent = stack.last().map(|(_, p)| p.clone()).unwrap_or_default();
            if stack.last().is_some_and(|(i, _)| *i == indent)
                && !rest.starts_with("- ")
                && rest != "-"
            {
                stack.pop();
                parent = stack.last().map(|(_, p)| p.clone()).unwrap_or_default();
            }
            // A list item: `- value` or `- key: value`.
            while let Some(after) =
                rest.strip_prefix("- ")
                    .or(if rest == "-" { Some("") } else { None })
            {
                let list = match stack.last() {
                    Some((i, p)) if *i == indent => p.clone(),
                    _ => parent.clone(),
                };
                let n = items.entry(list.clone()).or_insert(0);
                let path = format!("{list}[{n}]");
                *n += 1;
                at.insert(path.clone(), (line_no, indent + 1));
                if stack.last().is_none_or(|(i, _)| *i != indent) {
                    stack.push((indent, list.clone()));
                }
                let skip = rest.len() - after.len();
                indent += skip + (after.len() - after.trim_start().len());
                rest = after.trim_start();
                // Keys inside the item sit at `indent`: register the item just below it so
                // they count as its children, not its siblings.
                stack.push((indent - 1, path.clone()));
                parent = path;
                if rest.is_empty() {
                    break;
                }
            }
            if rest.is_empty() {
                continue;
            }
            let Some((key, value)) = split_key(rest) else {
                // A scalar list item: located above.
                continue;
            };
            let path = if parent.is_empty() {
                key.to_string()
            } else {
                format!("{parent}.{key}")
            };
            at.insert(path.clone(), (line_no, indent + 1));
            let value_col = indent + rest.len() - value.len() + 1;
            let v = value.trim();
            if v.is_empty() {
                stack.push((indent, path));
            } else if v.starts_with('[') {
                flow_items(
                    &path,
                    v,
                    line_no,
                    value_col + (value.len() - value.trim_start().len()),
                    &mut at,
                );
            }
        }
        Locator { at }
    }
}

fn strip_comment(line: &str) -> &str {
    let mut in_s = false;
    let mut in_d = false;
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !in_d => in_s = !in_s,
            '"' if !in_s => in_d = !in_d,
            '#' if !in_s && !in_d && (i == 0 || line[..i].ends_with([' ', '\t'])) => {
                return &line[..i]
            }
            _ => {}
        }
    }
    line
}

/// `key: value` → (key, value); None for a plain scalar.
fn split_key(s: &str) -> Option<(&str, &str)> {
    let bytes = s.as_bytes();
    let (key_end, start) = if bytes.first() == Some(&b'"') || bytes.first() == Some(&b'\'') {
        let q = bytes[0];
        let close = s[1..].find(q as char)? + 1;
        (close + 1, 1)
    } else {
        (0, 0)
    };
    let colon = if key_end > 0 {
        s[key_end..].find(':').map(|c| c + key_end)?
    } else {
        s.find(": ")
            .or_else(|| s.strip_suffix(':').map(|k| k.len()))?
    };
    if key_end == 0 && s[..colon].contains(['[', '{', '"']) {
        return None;
    }
    let key = if key_end > 0 {
        &s[start..key_end - 1]
    } else {
        s[..colon].trim_end()
    };
    Some((key, &s[colon + 1..]))
}

fn flow_items(
    path: &str,
    v: &str,
    line: usize,
    col: usize,
    at: &mut HashMap<String, (usize, usize)>,
) {
    let mut depth = 0;
    let mut n = 0;
    let mut item_start: Option<usize> = None;
    for (i, c) in v.char_indices() {
        match c {
            '[' | '{' => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    if let Some(s) = item_start.take() {
                        at.insert(format!("{path}[{n}]"), (line, col + s));
                    }
                    break;
                }
            }
            ',' if depth == 1 => {
                if let Some(s) = item_start.take() {
                    at.insert(format!("{path}[{n}]"), (line, col + s));
                    n += 1;
                }
                continue;
            }
            _ => {}
        }
        if depth >= 1 && item_start.is_none() && !c.is_whitespace() {
            item_start = Some(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_keys_and_items() {
        let text = "model: m\nprefill: [\"a:1\", \"b:2\"]\ndecode:\n  - \"c:3\"\n  - \"d:4\"\nmodels:\n  - name: x\n    decode: [\"e:5\"]\nhealth_check:\n  interval_seconds: 3  # comment\n";
        let (_, loc) = parse(text).unwrap();
        assert_eq!(loc.get("model"), Some((1, 1)));
        assert_eq!(loc.get("prefill[1]"), Some((2, 18)));
        assert_eq!(loc.get("decode[1]"), Some((5, 3)));
        assert_eq!(loc.get("models[0].name"), Some((7, 5)));
        assert_eq!(loc.get("models[0].decode[0]"), Some((8, 14)));
        assert_eq!(loc.get("health_check.interval_seconds"), Some((10, 3)));
        assert_eq!(loc.get("health_check.nothing"), Some((9, 1)));
    }
}
