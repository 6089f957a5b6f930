//! `xpyd fix-config`: finds common mistakes in the text of a config file and proposes
//! fixes — misspelled keys and scheduler names, stray whitespace, addresses without a port
//! (line by line, `find_fixes`), and legacy lists mixed with the newer formats (moved into
//! them, `merge_formats`). Certain fixes are applied with `--write`; ambiguous ones only
//! when `--interactive` gets an answer. Works on the text, so comments and layout survive.

use super::formats::legacy_part;
use super::schema::all_keys;
use super::suggest::did_you_mean;
use super::SchedulerKind;

/// Replace the lines `line .. line + before.len()` by `after`.
#[derive(Debug, Clone)]
pub struct Fix {
    /// 1-based first line.
    pub line: usize,
    pub before: Vec<String>,
    /// None: needs a decision (ambiguous).
    pub after: Option<Vec<String>>,
    /// For an ambiguous fix: the lines with only its certain parts applied (a misspelled
    /// key, whitespace), which `--write` applies without an answer; None when there are none.
    pub certain: Option<Vec<String>>,
    pub reason: String,
    /// For an ambiguous fix: what `--interactive` can ask to settle it.
    pub question: Option<Question>,
}

/// The answer that settles an ambiguous fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Question {
    /// The port for addresses written without one (`with_port`).
    Port,
    /// The model that legacy lists without `model:` serve (`merge_formats`).
    ModelName,
}

impl Fix {
    fn one_line(line: usize, before: &str, after: Option<String>, reason: String) -> Fix {
        Fix {
            line,
            before: vec![before.to_string()],
            after: after.map(|a| vec![a]),
            reason,
            question: None,
            certain: None,
        }
    }
}

/// The keys whose value is a scheduler name.
fn is_scheduler_key(k: &str) -> bool {
    matches!(
        k,
        "scheduling"
            | "scheduler"
            | "prefill_scheduling"
            | "decode_scheduling"
            | "prefill_scheduler"
            | "decode_scheduler"
    )
}

fn scheduler_fix(v: &str) -> Option<&'static str> {
    let norm = v
        .trim()
        .trim_matches(['"', '\''])
        .to_ascii_lowercase()
        .replace(['-', ' '], "_");
    let names = SchedulerKind::names();
    if let Some(n) = names.iter().find(|n| **n == norm) {
        return Some(n);
    }
    did_you_mean(&norm, &names)
}

/// Keys whose values (or list items) are addresses.
const ADDRESS_KEYS: &[&str] = &["prefill", "decode", "dual", "nodes", "address"];

pub fn find_fixes(text: &str) -> Vec<Fix> {
    let keys = all_keys();
    let mut fixes = Vec::new();
    let mut address_block: Option<usize> = None; // indent of the key owning an address list
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
                fixes.push(Fix::one_line(line_no, raw, Some(line), reasons.join("; ")));
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
            if is_scheduler_key(k_now) && !value.is_empty() {
                let v = value.split('#').next().unwrap_or("").trim();
                let bare = v.trim_matches(['"', '\'']);
                if !SchedulerKind::names().contains(&bare) {
                    if let Some(good) = scheduler_fix(v) {
                        line = line.replacen(v, good, 1);
                        reasons.push(format!("unknown scheduler `{bare}` → `{good}`"));
                    }
                }
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
            // The certain fixes on the line survive the ambiguous one.
            let certain = (line != raw).then(|| vec![line.clone()]);
            reasons.push(why);
            let mut f = Fix::one_line(line_no, raw, None, reasons.join("; "));
            f.question = Some(Question::Port);
            f.certain = certain;
            fixes.push(f);
        } else if !reasons.is_empty() && line != raw {
            fixes.push(Fix::one_line(line_no, raw, Some(line), reasons.join("; ")));
        }
    }
    fixes
}

/// Applies the fixes that have a replacement (their line ranges must not overlap); returns
/// the new text.
pub fn apply(text: &str, fixes: &[Fix]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut ready: Vec<&Fix> = fixes.iter().filter(|f| f.after.is_some()).collect();
    // Bottom up, so that a fix that changes the line count leaves the others' lines alone.
    ready.sort_by_key(|f| std::cmp::Reverse(f.line));
    for f in ready {
        let start = (f.line - 1).min(lines.len());
        let end = (start + f.before.len()).min(lines.len());
        lines.splice(start..end, f.after.iter().flatten().cloned());
    }
    let mut out = lines.join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// `line` with `:port` added to every quoted address that has none.
pub fn with_port(line: &str, port: u16) -> String {
    let mut out = String::new();
    let mut parts = line.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    // After the first piece, every other one (i = 0, 2, ...) is inside quotes.
    for (i, p) in parts.enumerate() {
        out.push('"');
        if i % 2 == 0 && !p.contains(':') && !p.is_empty() {
            out.push_str(&format!("{p}:{port}"));
        } else {
            out.push_str(p);
        }
    }
    out
}

/// A line diff for display: unchanged lines with two spaces, removed with `- `, added with
/// `+ ` (longest common subsequence; config files are small).
pub fn diff_lines(before: &[String], after: &[String]) -> Vec<String> {
    let (n, m) = (before.len(), after.len());
    // lcs[i][j]: common length of before[i..] and after[j..].
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if before[i] == after[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < n || j < m {
        if i < n && j < m && before[i] == after[j] {
            out.push(format!("  {}", before[i]));
            (i, j) = (i + 1, j + 1);
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("- {}", before[i]));
            i += 1;
        } else {
            out.push(format!("+ {}", after[j]));
            j += 1;
        }
    }
    out
}

/// A top-level key and the lines it owns (0-based, inclusive, trailing blanks and comments
/// left to whatever follows).
struct Block<'a> {
    key: &'a str,
    start: usize,
    end: usize,
}

fn top_level_blocks<'a>(lines: &[&'a str]) -> Vec<Block<'a>> {
    let mut blocks: Vec<Block<'a>> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let content = !l.trim().is_empty() && !l.trim_start().starts_with('#');
        if !content {
            continue;
        }
        let top = !l.starts_with([' ', '\t']) && !l.starts_with('-');
        match l.split_once(':') {
            Some((k, _)) if top => blocks.push(Block {
                key: k.trim(),
                start: i,
                end: i,
            }),
            _ => {
                if let Some(b) = blocks.last_mut() {
                    b.end = i;
                }
            }
        }
    }
    blocks
}

const LEGACY_KEYS: &[&str] = &["model", "prefill", "decode", "dual"];

/// Legacy `model`/`prefill`/`decode`/`dual` keys next to `instances:` or `models:` (which the
/// loader refuses): one fix that moves the legacy instances into the newer format — a new
/// `models` entry with the lists as written, or one `instances` entry per address with
/// topology forms expanded. Run it on the text after the line fixes. `model` names the
/// legacy instances' model when the file has no `model:` (an answer to `--interactive`).
pub fn merge_formats(text: &str, model: Option<&str>) -> Option<Fix> {
    let lines: Vec<&str> = text.lines().collect();
    let blocks = top_level_blocks(&lines);
    let legacy: Vec<&Block> = blocks
        .iter()
        .filter(|b| LEGACY_KEYS.contains(&b.key))
        .collect();
    let new = blocks
        .iter()
        .find(|b| b.key == "instances" || b.key == "models")?;
    let (first_legacy, last_legacy) = (legacy.first()?, legacy.last()?);
    let first = first_legacy.start.min(new.start);
    let last = last_legacy.end.max(new.end);
    let before: Vec<String> = lines[first..=last].iter().map(|l| l.to_string()).collect();
    let names: Vec<&str> = legacy.iter().map(|b| b.key).collect();
    let reason = format!(
        "legacy `{}` mixed with `{}` (line {}): one format per file",
        names.join("`/`"),
        new.key,
        new.start + 1
    );
    let ambiguous_asking = |why: &str, question: Option<Question>| {
        Some(Fix {
            line: first + 1,
            before: before.clone(),
            after: None,
            reason: format!("{reason}; {why}"),
            question,
            certain: None,
        })
    };
    let ambiguous = |why: &str| ambiguous_asking(why, None);
    let Some(part) = legacy_part(text) else {
        return ambiguous("the legacy lists do not load yet: fix them, then run fix-config again");
    };
    let lists: Vec<&&Block> = legacy.iter().filter(|b| b.key != "model").collect();
    let entries: Vec<String> = if lists.is_empty() {
        Vec::new() // a lone `model:` line: the newer formats name models per entry
    } else {
        let Some(model) = part.model.as_deref().or(model) else {
            return ambiguous_asking(
                "the legacy lists name no `model`: add one, then run fix-config again",
                Some(Question::ModelName),
            );
        };
        // The new entries take the indentation of the list they join (2 when it is empty).
        let item = lines[new.start + 1..=new.end]
            .iter()
            .find(|l| l.trim_start().starts_with('-'));
        let inline = lines[new.start]
            .split_once(':')
            .is_some_and(|(_, v)| !v.split('#').next().unwrap_or("").trim().is_empty());
        if inline {
            return ambiguous(&format!(
                "`{}` is written inline: move the instances by hand",
                new.key
            ));
        }
        let pad = " ".repeat(item.map_or(2, |l| l.len() - l.trim_start().len()));
        let quote = |s: &str| serde_json::Value::from(s).to_string();
        if new.key == "models" {
            if part.listed_models.iter().any(|m| m == model) {
                return ambiguous(&format!(
                    "model `{model}` is already under `models`: merge its lists by hand"
                ));
            }
            let mut v = vec![format!("{pad}- name: {}", quote(model))];
            for b in &lists {
                for l in &lines[b.start..=b.end] {
                    v.push(if l.trim().is_empty() {
                        String::new()
                    } else {
                        format!("{pad}  {l}")
                    });
                }
            }
            v
        } else {
            part.instances
                .iter()
                .map(|i| {
                    format!(
                        "{pad}- {{address: {}, role: {}, model: {}}}",
                        quote(&i.address),
                        i.role.as_str(),
                        quote(model)
                    )
                })
                .collect()
        }
    };
    let in_legacy = |i: usize| legacy.iter().any(|b| (b.start..=b.end).contains(&i));
    let mut after = Vec::new();
    for (i, line) in lines.iter().enumerate().take(last + 1).skip(first) {
        if !in_legacy(i) {
            after.push(line.to_string());
        }
        if i == new.end {
            after.extend(entries.iter().cloned());
        }
    }
    Some(Fix {
        line: first + 1,
        before,
        after: Some(after),
        reason: format!("{reason}: moved into `{}`", new.key),
        question: None,
        certain: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ambiguous_address_keeps_the_certain_fixes_of_its_line() {
        let text = "model: m\nprefill: [\"127.0.0.1:8100\"]\ndecodes: [ \"127.0.0.1 :8200\", \"127.0.0.1\"]\n";
        let fixes = find_fixes(text);
        assert_eq!(fixes.len(), 1, "{fixes:?}");
        let f = &fixes[0];
        assert_eq!(f.line, 3);
        assert!(f.after.is_none());
        assert_eq!(f.question, Some(Question::Port));
        assert!(
            f.reason.contains("misspelled key `decodes`"),
            "{}",
            f.reason
        );
        assert!(f.reason.contains("has no port"), "{}", f.reason);
        assert_eq!(
            f.certain.as_deref(),
            Some(&["decode: [ \"127.0.0.1:8200\", \"127.0.0.1\"]".to_string()][..])
        );
    }

    #[test]
    fn fixes_typos_and_whitespace() {
        let text = "model: m\nprefil: [\"127.0.0.1:8100\"]\ndecodes:\n  - \"127.0.0.1 :8200\"   \nschedulling: round-robin\n";
        let fixes = find_fixes(text);
        let fixed = apply(text, &fixes);
        assert_eq!(fixed, "model: m\nprefill: [\"127.0.0.1:8100\"]\ndecode:\n  - \"127.0.0.1:8200\"\nscheduling: round_robin\n");
        assert!(crate::config::Config::from_yaml(&fixed).is_ok());
    }

    /// The line fixes, then the format merge, as `xpyd fix-config --write` does.
    fn fix_all(text: &str) -> String {
        let once = apply(text, &find_fixes(text));
        match merge_formats(&once, None) {
            Some(m) => apply(&once, &[m]),
            None => once,
        }
    }

    #[test]
    fn legacy_lists_move_into_models() {
        let text = "# mixed\nmodel: legacy-m\nprefil:\n  - \"127.0.0.1:8100\"  # p\ndecode: [\"127.0.0.1:8200\"]\nscheduling: roundrobin\nmodels:\n  - name: other\n    dual: [\"127.0.0.1:8300\"]\n\nlog_level: info\n";
        let fixed = fix_all(text);
        assert_eq!(
            fixed,
            "# mixed\nscheduling: roundrobin\nmodels:\n  - name: other\n    dual: [\"127.0.0.1:8300\"]\n  - name: \"legacy-m\"\n    prefill:\n      - \"127.0.0.1:8100\"  # p\n    decode: [\"127.0.0.1:8200\"]\n\nlog_level: info\n"
        );
        let cfg = crate::config::Config::from_yaml(&fixed).expect("the merged file loads");
        assert_eq!(cfg.models.len(), 2);
        assert_eq!(cfg.models[1].instances.len(), 2);
    }

    #[test]
    fn legacy_topology_expands_into_instances() {
        let text = "instances:\n- {address: \"127.0.0.1:9000\", role: dual, model: b}\nmodel: a\nprefill:\n  nodes: [\"127.0.0.1:8100\"]\n  tp_size: 4\n  dp_size: 2\n  world_size_per_node: 8\ndecode: [\"127.0.0.1:8200\"]\n";
        let m = merge_formats(text, None).expect("a merge");
        assert!(m.after.is_some(), "{}", m.reason);
        let fixed = apply(text, &[m]);
        assert_eq!(
            fixed,
            "instances:\n- {address: \"127.0.0.1:9000\", role: dual, model: b}\n- {address: \"127.0.0.1:8100\", role: prefill, model: \"a\"}\n- {address: \"127.0.0.1:8101\", role: prefill, model: \"a\"}\n- {address: \"127.0.0.1:8200\", role: decode, model: \"a\"}\n"
        );
        let cfg = crate::config::Config::from_yaml(&fixed).expect("the merged file loads");
        assert_eq!(cfg.models.len(), 2);
    }

    #[test]
    fn merge_is_ambiguous_without_a_model_or_on_a_name_clash() {
        let no_name = "decode: [\"127.0.0.1:8200\"]\nprefill: [\"127.0.0.1:8100\"]\ninstances:\n  - {address: \"127.0.0.1:9000\", role: dual, model: b}\n";
        let m = merge_formats(no_name, None).expect("flagged");
        assert_eq!(m.question, Some(Question::ModelName));
        assert!(
            m.after.is_none() && m.reason.contains("no `model`"),
            "{}",
            m.reason
        );
        let clash = "model: b\ndual: [\"127.0.0.1:8200\"]\nmodels:\n  - name: b\n    dual: [\"127.0.0.1:9000\"]\n";
        let m = merge_formats(clash, None).expect("flagged");
        assert!(
            m.after.is_none() && m.reason.contains("already"),
            "{}",
            m.reason
        );
        assert!(merge_formats("model: m\ndual: [\"127.0.0.1:1\"]\n", None).is_none());
        // The name an --interactive answer gives.
        let named = merge_formats(no_name, Some("m")).expect("a merge");
        let fixed = apply(no_name, &[named]);
        assert!(fixed.contains("role: prefill, model: \"m\"}"), "{fixed}");
    }

    #[test]
    fn diff_shows_moves_as_removed_and_added_lines() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            diff_lines(&v(&["a", "b", "c"]), &v(&["a", "c", "b2"])),
            v(&["  a", "- b", "  c", "+ b2"])
        );
    }

    #[test]
    fn missing_port_is_ambiguous() {
        let fixes = find_fixes("model: m\ndual: [\"10.0.0.1\"]\n");
        assert_eq!(fixes.len(), 1);
        assert!(fixes[0].after.is_none());
        assert!(fixes[0].reason.contains("no port"));
        assert_eq!(fixes[0].question, Some(Question::Port));
        assert_eq!(
            with_port(&fixes[0].before[0], 8300),
            "dual: [\"10.0.0.1:8300\"]"
        );
    }
}
