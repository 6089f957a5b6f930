//! The Dockerfile and .dockerignore agree (no Docker engine is needed to check it): every
//! path the build copies from the context is let through by .dockerignore, which sends
//! nothing else (target/ alone is gigabytes); the entrypoint passes no `--port`, which would
//! silently override the config file's `port:`; the HEALTHCHECK probes the port the image's
//! config file names.

use std::path::PathBuf;

fn read(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in read("Dockerfile").lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(line);
                out.push(std::mem::take(&mut pending));
            }
        }
    }
    out
}

#[test]
fn the_build_context_is_what_the_build_copies() {
    let ignore = read(".dockerignore");
    let allowed: Vec<String> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|p| p.trim_end_matches('/').to_string())
        .collect();
    assert!(
        ignore.lines().any(|l| l.trim() == "*"),
        ".dockerignore must exclude everything it does not name"
    );
    let mut copied = Vec::new();
    for ins in instructions() {
        let Some(args) = ins.strip_prefix("COPY ") else {
            continue;
        };
        if args.contains("--from=") {
            continue;
        }
        let words: Vec<&str> = args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        copied.extend(
            words[..words.len() - 1]
                .iter()
                .map(|w| w.trim_end_matches('/').to_string()),
        );
    }
    assert!(!copied.is_empty(), "no COPY from the build context found");
    for src in &copied {
        assert!(
            allowed.contains(src),
            "the Dockerfile copies `{src}`, which .dockerignore keeps out of the context"
        );
    }
    for a in &allowed {
        assert!(
            copied.contains(a) || a.contains('*'),
            ".dockerignore lets `{a}` through, which the build does not copy"
        );
    }
}

#[test]
fn the_port_comes_from_the_config_file() {
    let all = instructions();
    let entrypoint = all
        .iter()
        .find(|i| i.starts_with("ENTRYPOINT"))
        .expect("an ENTRYPOINT");
    assert!(
        !entrypoint.contains("--port"),
        "`--port` in the ENTRYPOINT overrides the mounted file's port: {entrypoint}"
    );
    let build = all
        .iter()
        .find(|i| i.starts_with("RUN cargo build"))
        .expect("the build step");
    assert!(
        build.contains("port: 8868"),
        "the image's config names port 8868: {build}"
    );
    let health = all
        .iter()
        .find(|i| i.starts_with("HEALTHCHECK"))
        .expect("a HEALTHCHECK");
    assert!(health.contains("127.0.0.1:8868/ping"), "{health}");
    assert!(all.iter().any(|i| i == "EXPOSE 8868"));
}
