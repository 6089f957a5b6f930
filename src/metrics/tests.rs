use super::histogram::HistAcc;
use super::render::esc;
use super::*;
use crate::config::{CircuitConfig, Role};

fn instance(addr: &str, role: Role) -> Instance {
    Instance::new(addr.into(), addr.parse().unwrap(), role, Arc::from("m"))
}

fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find(|l| l.starts_with(prefix))
}

#[test]
fn series_and_statuses_index_their_arrays() {
    for (k, s) in Series::ALL.iter().enumerate() {
        assert_eq!(*s as usize, k, "ALL is in declaration order");
    }
    assert_eq!(STATUSES[status_index(404)], 404);
    assert_eq!(
        STATUSES[status_index(418)],
        0,
        "unlisted statuses are `other`"
    );
}

#[test]
fn a_histogram_is_cumulative_and_its_count_is_its_last_bucket() {
    let h = Histogram::default();
    h.observe(Duration::from_micros(500));
    h.observe(Duration::from_millis(3));
    h.observe(Duration::from_secs(1000));
    let mut acc = HistAcc::default();
    h.add_to(&mut acc);
    let mut out = String::new();
    acc.render(&mut out, "x", "");
    assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
    assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
    assert!(out.contains("x_bucket{le=\"600\"} 2\n"), "{out}");
    assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
    assert!(out.contains("x_count 3\n"), "{out}");
    assert!(out.contains("x_sum 1000.0035\n"), "{out}");
}

#[test]
fn render_sums_workers_and_shows_each_instance() {
    let workers: Vec<Arc<WorkerMetrics>> = (0..2).map(|_| Arc::default()).collect();
    let p = instance("127.0.0.1:1", Role::Prefill);
    let d = instance("127.0.0.1:2", Role::Decode);
    for w in &workers {
        w.request(Series::Completions, 200, Duration::from_millis(2));
        w.retry();
        let idx = LocalIndex::default();
        idx.instance(w, &d).error(ErrorType::Timeout);
        idx.instance(w, &d).request();
        idx.pair(w, Some(&idx.instance(w, &p)), &idx.instance(w, &d))
            .ttft
            .observe(Duration::from_millis(1));
    }
    workers[1].request(Series::Other, 418, Duration::from_millis(1));
    let cfg = CircuitConfig {
        enabled: true,
        failure_threshold: 1,
        success_threshold: 1,
        timeout: Duration::from_secs(60),
        window: Duration::from_secs(60),
    };
    d.record_failure(&cfg);
    let text = render(&Scrape {
        workers: &workers,
        active_requests: 3,
        instances: vec![&p, &d],
        discovery: &[],
    });
    let has = |l: &str| assert!(text.lines().any(|x| x == l), "no `{l}` in\n{text}");
    has("proxy_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2");
    has("proxy_requests_total{endpoint=\"other\",status=\"other\"} 1");
    has("proxy_active_requests 3");
    has("proxy_retries_total 2");
    has("proxy_circuit_state{instance=\"127.0.0.1:1\"} 0");
    has("proxy_circuit_state{instance=\"127.0.0.1:2\"} 1");
    has("proxy_circuit_opened_total{instance=\"127.0.0.1:2\"} 1");
    has("proxy_prefill_active{instance=\"127.0.0.1:1\",model=\"m\"} 0");
    has("proxy_decode_active{instance=\"127.0.0.1:2\",model=\"m\"} 0");
    has("proxy_instance_requests_total{instance=\"127.0.0.1:2\",role=\"decode\"} 2");
    has("proxy_instance_errors_total{instance=\"127.0.0.1:2\",error_type=\"timeout\",model=\"m\"} 2");
    has("proxy_ttft_seconds_count{model=\"m\",prefill_instance=\"127.0.0.1:1\",decode_instance=\"127.0.0.1:2\"} 2");
    assert!(line(&text, "proxy_requests_total{endpoint=\"/health\"").is_none());
    // Every series has its HELP and TYPE.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            text.contains(&format!("# TYPE {base} ")) || text.contains(&format!("# TYPE {name} ")),
            "{l}"
        );
    }
}

#[test]
fn label_values_are_escaped() {
    assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
}
