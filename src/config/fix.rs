//! `xpyd fix-config`: finds common mistakes in the text of a config file and proposes
//! line-level fixes — misspelled keys and scheduler names, stray whitespace, addresses
//! without a port, legacy lists mixed with the newer formats. Certain fixes are applied with
//! `--write`; ambiguous ones are only applied when `--interactive` gets an answer.

use super::load::{all_keys, did_you_mean};
use super::SCHEDULER_NAMES;

#[derive(Debug, Clone)]
pub struct Fix {
    /// 1-based line.
    pub line: usize,
    pub before: String,
    /// None: needs a decision (ambiguous).
    pub after: Option<String>,
    pub reason: String,
}

fn scheduler_fix(v: &str) -> Option<&'static str> {
    let norm = v
        .trim()
        .trim_matches(['"', '\''])
        .to_ascii_lowercase()
        .replace(['-', ' '], "_");
    if let Some(n) = SCHEDULER_NAMES.iter().find(|n| **n == norm) {
        return Some(n);
    }
    did_you_mean(&norm, SCHEDULER_NAMES)
}

/// Keys whose values (or list items) are addresses.
const ADDRESS_KEYS: &[&str] = &["prefill", "decode", "dual", "nodes", "address"];

pub fn find_fixes(text: &str) -> Vec<Fix> {
    let keys = all_keys();
    let mut fixes = Vec::new();
    let mut address_block: Option<usize> = None; // indent of the key owning an address list
    let mut has_legacy = None;
    let mut has_new = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let mut line = raw.to_string();
        let mut reasons = Vec::new();
        // Stray whitespace: tabs in indentation, trailing blanks.
        let indent_len = line.len() - line.trim_start().len();
        if line[..indent_len].contains('\t') {
            let fixed_indent = line[..indent_len].replace('\t', "  ");
            line = format!("{fixed_indent}{}", line.trim_start());
            reasons.push("tab in indentation (YAML needs spaces)".to_string());
        }
        if line.ends_with([' ', '\t']) {
            line = line.trim_end().to_string();
            reasons.push("trailing whitespace".to_string());
        }
        let indent = line.len() - line.trim_start().len();
        let body = line.trim_start().to_string();
        if body.starts_with('#') || body.is_empty() {
            if !reasons.is_empty() {
                fixes.push(Fix {
                    line: line_no,
                    before: raw.to_string(),
                    after: Some(line),
                    reason: reasons.join("; "),
                });
            }
            continue;
        }
        if address_block.is_some_and(|ind| indent <= ind && !body.starts_with("- ")) {
            address_block = None;
        }
        let item = body.strip_prefix("- ").unwrap_or(&body);
        let key = item
            .split_once(':')
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        let mut ambiguous = None;
        if let Some(k) = key {
            let value = item.split_once(':').map(|(_, v)| v.trim()).unwrap_or("");
            if !keys.contains(&k) {
                if let Some(good) = did_you_mean(k, &keys) {
                    line = line.replacen(k, good, 1);
                    reasons.push(format!("misspelled key `{k}` → `{good}`"));
                }
            }
            let k_now = key
                .map(|k| {
                    did_you_mean(k, &keys)
                        .filter(|_| !keys.contains(&k))
                        .unwrap_or(k)
                })
                .unwrap_or(k);
            if (k_now == "scheduling" || k_now == "scheduler") && !value.is_empty() {
                let v = value.split('#').next().unwrap_or("").trim();
                let bare = v.trim_matches(['"', '\'']);
                if !SCHEDULER_NAMES.contains(&bare) {
                    if let Some(good) = scheduler_fix(v) {
                        line = line.replacen(v, good, 1);
                        reasons.push(format!("unknown scheduler `{bare}` → `{good}`"));
                    }
                }
            }
            if ["prefill", "decode", "dual", "model"].contains(&k_now) && indent == 0 {
                has_legacy.get_or_insert(line_no);
            }
            if ["instances", "models"].contains(&k_now) && indent == 0 {
                has_new.get_or_insert(line_no);
            }
            if ADDRESS_KEYS.contains(&k_now) {
                address_block = Some(indent);
            }
        }
        // Addresses: quoted strings in an address list, or a flow list on the key's line.
        let in_addresses =
            address_block.is_some() || key.is_some_and(|k| ADDRESS_KEYS.contains(&k));
        if in_addresses {
            let mut out = String::new();
            let mut rest = line.as_str();
            while let Some(q) = rest.find('"') {
                let Some(end) = rest[q + 1..].find('"') else {
                    break;
                };
                let addr = &rest[q + 1..q + 1 + end];
                let cleaned: String = addr.chars().filter(|c| !c.is_whitespace()).collect();
                out.push_str(&rest[..q + 1]);
                if cleaned != addr {
                    reasons.push(format!("whitespace inside address `{addr}`"));
                }
                if !cleaned.contains(':') && !cleaned.is_empty() {
                    ambiguous = Some(format!("address `{cleaned}` has no port"));
                }
                out.push_str(&cleaned);
                out.push('"');
                rest = &rest[q + 2 + end..];
            }
            out.push_str(rest);
            line = out;
        }
        if let Some(why) = ambiguous {
            fixes.push(Fix {
                line: line_no,
                before: raw.to_string(),
                after: None,
                reason: why,
            });
        } else if !reasons.is_empty() && line != raw {
            fixes.push(Fix {
                line: line_no,
                before: raw.to_string(),
                after: Some(line),
                reason: reasons.join("; "),
            });
        }
    }
    if let (Some(l), Some(n)) = (has_legacy, has_new) {
        fixes.push(Fix {
            line: l,
            before: text.lines().nth(l - 1).unwrap_or("").to_string(),
            after: None,
            reason: format!("legacy `prefill`/`decode`/`dual`/`model` keys mixed with the format started on line {n}: keep one format (move these instances into it)"),
        });
    }
    fixes
}

/// Applies the fixes that have a replacement; returns the new text.
pub fn apply(text: &str, fixes: &[Fix]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for f in fixes {
        if let Some(a) = &f.after {
            if let Some(l) = lines.get_mut(f.line - 1) {
                *l = a.clone();
            }
        }
    }
    let mut out = lines.join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixes_typos_and_whitespace() {
        let text = "model: m\nprefil: [\"127.0.0.1:8100\"]\ndecodes:\n  - \"127.0.0.1 :8200\"   \nschedulling: round-robin\n";
        let fixes = find_fixes(text);
        let fixed = apply(text, &fixes);
        assert_eq!(fixed, "model: m\nprefill: [\"127.0.0.1:8100\"]\ndecode:\n  - \"127.0.0.1:8200\"\nscheduling: round_robin\n");
        assert!(crate::config::Config::from_yaml(&fixed).is_ok());
    }

    #[test]
    fn missing_port_is_ambiguous() {
        let fixes = find_fixes("model: m\ndual: [\"10.0.0.1\"]\n");
        assert_eq!(fixes.len(), 1);
        assert!(fixes[0].after.is_none());
        assert!(fixes[0].reason.contains("no port"));
    }
}
