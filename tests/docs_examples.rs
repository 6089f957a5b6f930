//! The command blocks of README.md and docs/ run as written, so that a doc example whose
//! behaviour changes fails here.
//!
//! A block is marked by an HTML comment on the line before its fence:
//!
//! - `<!-- doc-test: NAME -->` before a shell block: its commands. A block whose lines start
//!   with `$ ` is a console transcript: those lines are the commands, the others what they
//!   print. `<!-- doc-test: NAME fails -->`: some command exits non-zero, as the text says.
//! - `<!-- doc-test: NAME file=PATH -->`: the block is the content of PATH, written into the
//!   example's working directory before the commands run.
//! - `<!-- doc-test: NAME output -->`: what the commands print. Every line must appear in the
//!   output, in order; `...` in a line stands for anything.
//!
//! Blocks with the same NAME form one example, run by `bash` in a fresh directory with the
//! binaries of this build (`./target/release/xpyd`, `xpyd`, `xpyd-dummy` are rewritten), files
//! under `/tmp/` moved into that directory, and — when the example starts processes in the
//! background (`&`) — every port the docs use replaced by a free one. After each background
//! command the example waits (bounded) until what it started answers `GET /health`; a
//! command that fails stops nothing but is reported; `curl`'s output is followed by a line
//! break, as a terminal's prompt would be. Processes still running at the end are killed
//! with their process group. Needs `bash` and `curl`.

mod common;

use common::free_ports;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every example in the docs, each with its test below: a new marker needs a test, and a
/// test whose blocks are gone fails.
const EXAMPLES: &[&str] = &[
    "admin",
    "bench",
    "dummy-nodes",
    "errors",
    "fix-config-ambiguous",
    "fix-config-mixed",
    "init-validate",
    "quickstart",
    "readiness",
    "reload",
    "validation-errors",
];

/// The ports the docs use for the proxy and the nodes.
const DOC_PORTS: &[u16] = &[8000, 8100, 8200, 8201, 8300, 8868];

#[derive(Debug, Clone)]
enum Kind {
    Commands { fails: bool },
    File(String),
    Output,
}

#[derive(Debug, Clone)]
struct Block {
    origin: String,
    kind: Kind,
    text: String,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn doc_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// Every marked block of every doc, by example name, in document order.
fn examples() -> BTreeMap<String, Vec<Block>> {
    let mut out: BTreeMap<String, Vec<Block>> = BTreeMap::new();
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).expect("read doc");
        let rel = file
            .strip_prefix(root())
            .unwrap_or(&file)
            .display()
            .to_string();
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let Some(marker) = lines[i]
                .trim()
                .strip_prefix("<!-- doc-test:")
                .and_then(|m| m.strip_suffix("-->"))
            else {
                i += 1;
                continue;
            };
            let origin = format!("{rel}:{}", i + 1);
            let mut words = marker.split_whitespace();
            let name = words
                .next()
                .unwrap_or_else(|| panic!("{origin}: marker without a name"));
            let mut kind = Kind::Commands { fails: false };
            for w in words {
                kind = match w {
                    "fails" => Kind::Commands { fails: true },
                    "output" => Kind::Output,
                    _ => match w.strip_prefix("file=") {
                        Some(path) => Kind::File(path.to_string()),
                        None => panic!("{origin}: unknown marker word `{w}`"),
                    },
                };
            }
            let fence = lines.get(i + 1).copied().unwrap_or("");
            let indent = fence.len() - fence.trim_start().len();
            assert!(
                fence.trim_start().starts_with("```"),
                "{origin}: the marker must be followed by a fenced block"
            );
            let mut body = Vec::new();
            let mut j = i + 2;
            while j < lines.len() && lines[j].trim() != "```" {
                body.push(lines[j].get(indent..).unwrap_or(lines[j].trim_start()));
                j += 1;
            }
            assert!(j < lines.len(), "{origin}: unclosed block");
            out.entry(name.to_string()).or_default().push(Block {
                origin,
                kind,
                text: body.join("\n") + "\n",
            });
            i = j + 1;
        }
    }
    out
}

/// `text` with every whole number `from` (not part of a longer number) replaced by `to`.
fn replace_number(text: &str, from: u16, to: u16) -> String {
    let from = from.to_string();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&from) {
        let before = rest[..at].chars().next_back();
        let after = rest[at + from.len()..].chars().next();
        out.push_str(&rest[..at]);
        let digit = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit());
        if digit(before) || digit(after) {
            out.push_str(&from);
        } else {
            out.push_str(&to.to_string());
        }
        rest = &rest[at + from.len()..];
    }
    out.push_str(rest);
    out
}

struct Rewrite {
    workdir: PathBuf,
    ports: Vec<(u16, u16)>,
    venv: Option<PathBuf>,
    /// The `--num-prompts` of the example as written: the test sends `TEST_PROMPTS`.
    prompts: Option<String>,
}

/// Prompts a benchmark example sends in the test (the docs' counts take minutes).
const TEST_PROMPTS: &str = "4";

impl Rewrite {
    fn text(&self, text: &str) -> String {
        // One pass over the text as written: the replacements (the venv, the work directory,
        // this build's binaries) may themselves live under /tmp and must not be rewritten again.
        let mut t = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find("/tmp/") {
            t.push_str(&rest[..at]);
            let from = &rest[at..];
            rest = match &self.venv {
                Some(v) if from.starts_with("/tmp/xb/") => {
                    t.push_str(&format!("{}/", v.display()));
                    &from["/tmp/xb/".len()..]
                }
                _ => {
                    t.push_str(&format!("{}/", self.workdir.display()));
                    &from["/tmp/".len()..]
                }
            };
        }
        t.push_str(rest);
        for (from, to) in &self.ports {
            t = replace_number(&t, *from, *to);
        }
        t
    }

    /// Expected output: also the benchmark's completed count, which follows the prompts.
    fn output(&self, text: &str) -> String {
        let t = self.text(text);
        match &self.prompts {
            Some(n) => t
                .lines()
                .map(|l| match l.trim_end().strip_suffix(n.as_str()) {
                    Some(head) if l.trim_start().starts_with("Completed:") => {
                        format!("{head}{TEST_PROMPTS}")
                    }
                    _ => l.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n"),
            None => t,
        }
    }

    /// One logical command line (continuations joined) as the test runs it.
    fn command(&self, line: &str) -> Option<String> {
        let line = line.trim();
        // The test runs the binaries this build made, and its own Python environment.
        if line.starts_with("cargo ") || line.contains("pip install") {
            return None;
        }
        let xpyd = env!("CARGO_BIN_EXE_xpyd");
        let dummy = env!("CARGO_BIN_EXE_xpyd-dummy");
        // Paths and ports first, on the line as written: the binaries may live under /tmp.
        let mut l = self
            .text(line)
            .replace("./target/release/xpyd-dummy", dummy)
            .replace("./target/release/xpyd", xpyd);
        if let Some(rest) = l.strip_prefix("xpyd-dummy ") {
            l = format!("{dummy} {rest}");
        } else if let Some(rest) = l.strip_prefix("xpyd ") {
            l = format!("{xpyd} {rest}");
        }
        if let Some(at) = l.find("--num-prompts ") {
            let n_start = at + "--num-prompts ".len();
            let n_end = l[n_start..]
                .find(|c: char| !c.is_ascii_digit())
                .map_or(l.len(), |e| n_start + e);
            l.replace_range(n_start..n_end, TEST_PROMPTS);
        }
        if l.ends_with('&') {
            // Wait until what was started answers, as a reader would before the next line.
            let mapped: Vec<String> = self
                .ports
                .iter()
                .map(|(_, to)| to.to_string())
                .filter(|p| l.split(|c: char| !c.is_ascii_digit()).any(|w| w == p))
                .collect();
            if !mapped.is_empty() {
                l.push_str(&format!("\n__ready {}", mapped.join(" ")));
            } else if let Some(cfg) = l
                .split_whitespace()
                .skip_while(|w| *w != "-c")
                .nth(1)
                .map(str::to_string)
            {
                l.push_str(&format!("\n__ready_cfg {cfg}"));
            }
        }
        Some(l)
    }
}

const PRELUDE: &str = r#"exec 2>&1
trap 'echo "doc-test: exit status $? from: $BASH_COMMAND"' ERR
__ready() {
  for p in "$@"; do
    n=0
    until command curl -fs -o /dev/null "http://127.0.0.1:$p/health"; do
      n=$((n + 1))
      if [ "$n" -gt 600 ]; then echo "doc-test: nothing ready on port $p after 30 s"; return 1; fi
      sleep 0.05
    done
  done
}
# A terminal's prompt starts on a new line after a body without one: so does the next output.
curl() { command curl "$@"; local status=$?; echo; return $status; }
__ready_cfg() { __ready "$(sed -n 's/^port: *\([0-9][0-9]*\).*/\1/p' "$1")"; }
"#;

/// Joins continuation lines; heredoc bodies stay as they are.
fn logical_lines(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut pending = String::new();
    let mut heredoc: Option<String> = None;
    for line in text.lines() {
        if let Some(end) = &heredoc {
            out.push(line.to_string());
            if line.trim() == end {
                heredoc = None;
            }
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            continue;
        }
        pending.push_str(line);
        if let Some(at) = pending.find("<<") {
            let word = pending[at + 2..].trim().trim_matches(['\'', '"', '-']);
            heredoc = Some(word.split_whitespace().next().unwrap_or("").to_string());
        }
        out.push(std::mem::take(&mut pending));
    }
    out
}

/// Kills the example's process group (background processes included) when dropped.
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: signalling the process group this test started.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

fn run_example(name: &str) {
    let all = examples();
    let blocks = all
        .get(name)
        .unwrap_or_else(|| panic!("no block marked `doc-test: {name}` in README.md or docs/"));
    let workdir = std::env::temp_dir().join(format!("xpyd-docs-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&workdir);
    std::fs::create_dir_all(&workdir).expect("workdir");
    let live = blocks.iter().any(|b| {
        matches!(b.kind, Kind::Commands { .. })
            && logical_lines(&b.text)
                .iter()
                .any(|l| l.trim().ends_with('&'))
    });
    let uses_venv = blocks.iter().any(|b| b.text.contains("/tmp/xb/"));
    let rw = Rewrite {
        ports: if live {
            DOC_PORTS
                .iter()
                .copied()
                .zip(free_ports(DOC_PORTS.len()))
                .collect()
        } else {
            Vec::new()
        },
        venv: uses_venv.then(|| common::python_venv(&[("xpyd_bench", "xpyd-bench==0.3.0")])),
        workdir: workdir.clone(),
        prompts: blocks.iter().find_map(|b| {
            let at = b.text.find("--num-prompts ")? + "--num-prompts ".len();
            let n: String = b.text[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            Some(n)
        }),
    };
    let mut script = String::from(PRELUDE);
    let mut expected: Vec<String> = Vec::new();
    let mut may_fail = false;
    let origins: Vec<&str> = blocks.iter().map(|b| b.origin.as_str()).collect();
    for b in blocks {
        match &b.kind {
            Kind::File(path) => {
                std::fs::write(workdir.join(path), rw.text(&b.text)).expect("write file")
            }
            Kind::Output => expected.extend(rw.output(&b.text).lines().map(str::to_string)),
            Kind::Commands { fails } => {
                may_fail |= fails;
                let console = b.text.lines().any(|l| l.starts_with("$ "));
                for line in logical_lines(&b.text) {
                    let cmd = if console {
                        match line.strip_prefix("$ ") {
                            Some(c) => c.to_string(),
                            None => {
                                expected.push(rw.text(&line));
                                continue;
                            }
                        }
                    } else {
                        line
                    };
                    if let Some(c) = rw.command(&cmd) {
                        script.push_str(&c);
                        script.push('\n');
                    }
                }
            }
        }
    }
    let log_path = workdir.join("output.txt");
    let log = std::fs::File::create(&log_path).expect("output file");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&workdir)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("bash");
    let group = Group(child.id() as i32);
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().expect("wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "example `{name}` ({}) ran over 180 s",
            origins.join(", ")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(group);
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let context = format!(
        "example `{name}` ({})\n--- script ---\n{script}\n--- output ---\n{output}",
        origins.join(", ")
    );
    if !may_fail {
        assert!(
            !output.contains("doc-test: exit status"),
            "a command failed\n{context}"
        );
    }
    assert!(
        !output.contains("doc-test: nothing ready"),
        "a background process never answered\n{context}"
    );
    expect_lines(&expected, &output, &context);
    let _ = std::fs::remove_dir_all(&workdir);
}

/// Every non-empty expected line matches an output line, in order; `...` matches anything.
fn expect_lines(expected: &[String], output: &str, context: &str) {
    let lines: Vec<&str> = output.lines().collect();
    let mut at = 0;
    for want in expected.iter().map(|w| w.trim()).filter(|w| !w.is_empty()) {
        let parts: Vec<&str> = want.split("...").collect();
        let matches = |line: &str| {
            let mut rest = line;
            parts.iter().all(|p| match rest.find(p) {
                Some(i) => {
                    rest = &rest[i + p.len()..];
                    true
                }
                None => false,
            })
        };
        match lines[at..].iter().position(|l| matches(l)) {
            Some(i) => at += i + 1,
            None => panic!("expected a line matching `{want}` (in order)\n{context}"),
        }
    }
}

#[test]
fn every_marked_example_has_a_test() {
    let found: Vec<String> = examples().into_keys().collect();
    assert_eq!(
        found, EXAMPLES,
        "the doc-test markers and EXAMPLES (one test each) differ"
    );
}

#[test]
fn rewriting_keeps_other_numbers() {
    assert_eq!(
        replace_number("a:8000 b:18000 c:80001", 8000, 1),
        "a:1 b:18000 c:80001"
    );
}

#[test]
fn readme_quick_start() {
    run_example("quickstart");
}

#[test]
fn readme_bench_command() {
    run_example("bench");
}

#[test]
fn deployment_readiness_per_model() {
    run_example("readiness");
}

#[test]
fn resilience_admin_api() {
    run_example("admin");
}

#[test]
fn config_reload() {
    run_example("reload");
}

#[test]
fn api_error_answers() {
    run_example("errors");
}

#[test]
fn cli_dummy_nodes() {
    run_example("dummy-nodes");
}

#[test]
fn cli_init_and_validate() {
    run_example("init-validate");
}

#[test]
fn config_validation_errors() {
    run_example("validation-errors");
}

#[test]
fn config_fix_config_keeps_the_certain_fixes_of_an_ambiguous_line() {
    run_example("fix-config-ambiguous");
}

#[test]
fn config_fix_config_moves_legacy_lists() {
    run_example("fix-config-mixed");
}
