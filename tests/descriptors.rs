//! Every descriptor the proxy creates is close-on-exec: listeners, client connections,
//! upstream connections, the event loop's own.

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::time::Duration;

/// A process's descriptors (beyond stdin/stdout/stderr): number, target, close-on-exec.
fn descriptors(pid: &str) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let fd = entry.file_name().to_string_lossy().into_owned();
        if ["0", "1", "2"].contains(&fd.as_str()) {
            continue;
        }
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue; // closed meanwhile
        };
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or_else(|| panic!("no flags in fdinfo of {fd}: {info}"));
        out.push((
            fd,
            target.to_string_lossy().into_owned(),
            flags & libc::O_CLOEXEC as u32 != 0,
        ));
    }
    out
}

#[test]
fn every_descriptor_of_the_proxy_is_close_on_exec() {
    // A slow stream keeps a client connection (its own read is the disconnect watch) and an
    // upstream connection open while the descriptors are read.
    let d = dummy("dual", &["--decode-delay-per-token", "0.05"]);
    let proxy = proxy_with(&dual_yaml(&[&d]), true);
    let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let body =
        json!({"model": MODEL, "prompt": "x", "max_tokens": 200, "stream": true}).to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data:") {
        let n = s.read(&mut buf).expect("the stream's first event");
        assert!(n > 0, "the proxy closed before the first event");
        seen.extend_from_slice(&buf[..n]);
    }
    let fds = descriptors(&proxy.child.id().to_string());
    // Descriptors this test process passed on (no close-on-exec here: the test runner's
    // jobserver pipe and the like) are inherited, not the proxy's.
    let inherited: Vec<_> = descriptors("self")
        .into_iter()
        .filter(|(_, _, cloexec)| !cloexec)
        .map(|(fd, target, _)| (fd, target))
        .collect();
    let sockets = fds
        .iter()
        .filter(|(_, t, _)| t.starts_with("socket:"))
        .count();
    // 2 listeners, the client connection, the upstream connection.
    assert!(sockets >= 4, "expected the stream's sockets: {fds:?}");
    let leaky: Vec<_> = fds
        .iter()
        .filter(|(fd, target, cloexec)| {
            !cloexec && !inherited.contains(&(fd.clone(), target.clone()))
        })
        .collect();
    assert!(
        leaky.is_empty(),
        "descriptors without close-on-exec: {leaky:?}"
    );
}
