//! Reading an engine's Prometheus `/metrics` text: vLLM's queue gauges and KV-cache usage
//! (`EngineSample`), the counters its speed is learned from (`Totals`) and its KV block
//! size. One pass per scrape for the first two (`parse_metrics`); the scraper's, never a
//! worker's (docs/scheduling.md, "Engine load").

/// The numbers of one scrape.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct EngineSample {
    pub running: u64,
    pub waiting: u64,
    /// KV-cache usage as a fraction (vLLM's `kv_cache_usage_perc` is 0..1 despite its name).
    pub kv_usage: Option<f64>,
}

/// Parses vLLM's metrics text: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
/// `vllm:kv_cache_usage_perc` (or the older `vllm:gpu_cache_usage_perc`). Several series of
/// one name (engines, data-parallel ranks) add up; usage takes the highest. None when the
/// text has neither queue gauge (not a vLLM engine, or one too old).
pub fn parse(text: &str) -> Option<EngineSample> {
    parse_metrics(text).0
}

/// Cumulative counters of an engine's `/metrics` from which its speed is learned (sums of
/// every series of a name). vLLM V1 names; where `request_prefill_time_seconds` or
/// `request_inference_time_seconds` is missing, TTFT − queue time and e2e − queue time
/// stand in for them.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Totals {
    pub prompt_tokens: f64,
    pub prefix_hits: f64,
    /// Seconds from a request's scheduling to its first token, summed.
    pub prefill_s: f64,
    /// Seconds from a request's scheduling to its last token (its time in the batch).
    pub run_s: f64,
    pub run_n: f64,
}

/// Parses the counters `Totals` needs; None when the engine reports no timing.
pub fn parse_totals(text: &str) -> Option<Totals> {
    parse_metrics(text).1
}

/// Both `parse` and `parse_totals`, in one pass over the text (what a scrape uses).
pub fn parse_metrics(text: &str) -> (Option<EngineSample>, Option<Totals>) {
    #[derive(Default)]
    struct Raw {
        running: Option<f64>,
        waiting: Option<f64>,
        usage: Option<f64>,
        prompt: f64,
        hits: f64,
        prefill: Option<f64>,
        inference: Option<(f64, f64)>,
        ttft: f64,
        queue: f64,
        e2e: Option<(f64, f64)>,
    }
    let mut r = Raw::default();
    let add = |slot: &mut Option<(f64, f64)>, sum: bool, v: f64| {
        let e = slot.get_or_insert((0.0, 0.0));
        if sum {
            e.0 += v
        } else {
            e.1 += v
        }
    };
    for (name, v) in samples(text) {
        match name {
            "vllm:num_requests_running" => *r.running.get_or_insert(0.0) += v,
            "vllm:num_requests_waiting" => *r.waiting.get_or_insert(0.0) += v,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                r.usage = Some(r.usage.map_or(v, |u| u.max(v)))
            }
            "vllm:prompt_tokens_total" => r.prompt += v,
            "vllm:prefix_cache_hits_total" => r.hits += v,
            "vllm:request_prefill_time_seconds_sum" => *r.prefill.get_or_insert(0.0) += v,
            "vllm:request_inference_time_seconds_sum" => add(&mut r.inference, true, v),
            "vllm:request_inference_time_seconds_count" => add(&mut r.inference, false, v),
            "vllm:time_to_first_token_seconds_sum" => r.ttft += v,
            "vllm:request_queue_time_seconds_sum" => r.queue += v,
            "vllm:e2e_request_latency_seconds_sum" => add(&mut r.e2e, true, v),
            "vllm:e2e_request_latency_seconds_count" => add(&mut r.e2e, false, v),
            _ => {}
        }
    }
    let sample = (r.running.is_some() || r.waiting.is_some()).then(|| EngineSample {
        running: r.running.unwrap_or(0.0) as u64,
        waiting: r.waiting.unwrap_or(0.0) as u64,
        kv_usage: r.usage.map(|u| u.min(1.0)),
    });
    let run = match (r.inference, r.e2e) {
        (Some(i), _) => Some(i),
        (None, Some((s, n))) => Some(((s - r.queue).max(0.0), n)),
        (None, None) => None,
    };
    let totals = run.map(|(run_s, run_n)| Totals {
        prompt_tokens: r.prompt,
        prefix_hits: r.hits,
        prefill_s: r.prefill.unwrap_or((r.ttft - r.queue).max(0.0)),
        run_s,
        run_n,
    });
    (sample, totals)
}

/// Every `vllm:` sample of a Prometheus text as (name, value); labels skipped, comments and
/// unparsable or negative values dropped.
fn samples(text: &str) -> impl Iterator<Item = (&str, f64)> {
    text.lines().filter_map(|line| {
        if !line.starts_with("vllm:") {
            return None;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        // The value follows the labels (which may contain spaces inside quotes).
        let rest = match line[name_end..].strip_prefix('{') {
            Some(labels) => &labels[labels.rfind('}')? + 1..],
            None => &line[name_end..],
        };
        let v = rest
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)?;
        Some((name, v))
    })
}

/// The KV block size in tokens an engine reports in `vllm:cache_config_info{block_size=..}`
/// (vLLM and xpyd-dummy): kv_aware keys prompts by it before the first `BlockStored` says.
pub fn block_size(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))?;
    let at = line.find("block_size=\"")? + "block_size=\"".len();
    let end = line[at..].find('"')?;
    line[at..at + end].parse().ok().filter(|&b| b > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.5
vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0
"#;

    #[test]
    fn parses_vllm_gauges() {
        let s = parse(VLLM).unwrap();
        assert_eq!(s.running, 3);
        assert_eq!(s.waiting, 8);
        assert_eq!(s.kv_usage, Some(0.5));
    }

    #[test]
    fn older_gpu_cache_name_and_no_labels() {
        let s = parse("vllm:num_requests_running 2\nvllm:gpu_cache_usage_perc 0.9\n").unwrap();
        assert_eq!((s.running, s.waiting, s.kv_usage), (2, 0, Some(0.9)));
    }

    #[test]
    fn not_an_engine() {
        assert_eq!(parse("proxy_requests_total 5\n"), None);
        assert_eq!(parse(""), None);
        // Garbage values are skipped, never a panic.
        assert_eq!(
            parse("vllm:num_requests_waiting{a=\"b c\"} NaN\nvllm:num_requests_waiting{\n"),
            None
        );
        let s = parse("vllm:num_requests_waiting{a=\"b c\"} 4\n").unwrap();
        assert_eq!(s.waiting, 4);
    }

    #[test]
    fn block_size_comes_from_the_cache_config_info() {
        let text = "vllm:num_requests_running 0\nvllm:cache_config_info{block_size=\"16\",enable_prefix_caching=\"True\",num_gpu_blocks=\"640\"} 1.0\n";
        assert_eq!(block_size(text), Some(16));
        assert_eq!(
            block_size("vllm:cache_config_info{num_gpu_blocks=\"640\"} 1.0"),
            None
        );
        assert_eq!(
            block_size("vllm:cache_config_info{block_size=\"x\"} 1.0"),
            None
        );
        assert_eq!(block_size(""), None);
    }
}
