//! `admission`: the limits a model's requests pass before they are sent (docs/resilience.md,
//! "Admission control"). Written at the top level for every model, and per model in
//! `models:` (each key written there wins over the top level's).

use super::reader::{join, Reader, Section};
use super::schema;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    /// Requests of the model in flight at once, across workers; 0: no limit.
    pub max_concurrent_requests: u64,
    /// Requests that may wait for a slot (across workers); 0: none wait, over the limit is
    /// answered 429 at once.
    pub queue_size: u64,
    /// The longest a request waits in the queue before it is answered 429.
    pub queue_timeout: Duration,
    /// Prompt + max_tokens admitted per second (token bucket); 0: no limit.
    pub tokens_per_second: u64,
    /// The bucket's size in tokens (0: one second's worth).
    pub token_burst: u64,
    /// When every available instance of a role reports more waiting requests than this,
    /// new requests wait in the proxy's queue; 0: off.
    pub engine_waiting_threshold: u64,
    /// With `api_keys`: each key's weight in its share of the limits (unlisted keys: 1).
    pub key_weights: HashMap<String, u64>,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            max_concurrent_requests: 0,
            queue_size: 0,
            queue_timeout: Duration::from_secs(30),
            tokens_per_second: 0,
            token_burst: 0,
            engine_waiting_threshold: 0,
            key_weights: HashMap::new(),
        }
    }
}

impl AdmissionConfig {
    /// Itself when it limits anything; None when requests go straight through.
    pub fn is_on(&self) -> Option<&Self> {
        let off = self.max_concurrent_requests == 0
            && self.tokens_per_second == 0
            && self.engine_waiting_threshold == 0;
        (!off).then_some(self)
    }

    /// The bucket's capacity in tokens.
    pub fn burst(&self) -> u64 {
        if self.token_burst == 0 {
            self.tokens_per_second
        } else {
            self.token_burst
        }
    }
}

/// The top level's `admission` section (every model's defaults).
pub fn top(r: &mut Reader<'_>, top: &Map<String, Value>) -> AdmissionConfig {
    let s = r.section(top, "admission", schema::ADMISSION);
    read(r, s, "admission", &AdmissionConfig::default())
}

/// A model's `admission` section over the top level's.
pub fn model(
    r: &mut Reader<'_>,
    m: &Map<String, Value>,
    path: &str,
    base: &AdmissionConfig,
) -> AdmissionConfig {
    let path = join(path, "admission");
    match m.get("admission").filter(|v| !v.is_null()) {
        None => base.clone(),
        Some(v) => {
            let s = r.mapping(v, &path, schema::ADMISSION);
            read(r, s, &path, base)
        }
    }
}

fn read(r: &mut Reader<'_>, s: Section<'_>, p: &str, base: &AdmissionConfig) -> AdmissionConfig {
    let mut c = AdmissionConfig {
        max_concurrent_requests: r.uint(
            s,
            p,
            "max_concurrent_requests",
            base.max_concurrent_requests,
            0,
        ),
        queue_size: r.uint(s, p, "queue_size", base.queue_size, 0),
        queue_timeout: r.seconds(
            s,
            p,
            "queue_timeout_seconds",
            base.queue_timeout.as_secs_f64(),
        ),
        tokens_per_second: r.uint(s, p, "tokens_per_second", base.tokens_per_second, 0),
        token_burst: r.uint(s, p, "token_burst", base.token_burst, 0),
        engine_waiting_threshold: r.uint(
            s,
            p,
            "engine_waiting_threshold",
            base.engine_waiting_threshold,
            0,
        ),
        key_weights: base.key_weights.clone(),
    };
    match s
        .and_then(|s| s.get("key_weights"))
        .filter(|v| !v.is_null())
    {
        None => {}
        Some(Value::Object(m)) => {
            c.key_weights = HashMap::new();
            for (k, v) in m {
                match v.as_u64() {
                    Some(w) if w >= 1 => {
                        c.key_weights.insert(k.clone(), w);
                    }
                    // The key is a secret: the path names its position, not the key.
                    _ => r.problem(
                        &join(p, "key_weights"),
                        format!("the weight of a key must be a positive integer, got {v}"),
                    ),
                }
            }
        }
        Some(other) => r.wrong_type(&join(p, "key_weights"), "a mapping of key: weight", other),
    }
    if c.engine_waiting_threshold > 0 && c.queue_size == 0 {
        r.problem(
            &join(p, "engine_waiting_threshold"),
            "needs queue_size (requests wait in the proxy's queue while the engines are saturated)",
        );
    }
    if c.queue_size > 0 && c.max_concurrent_requests == 0 && c.engine_waiting_threshold == 0 {
        r.problem(
            &join(p, "queue_size"),
            "has no effect without max_concurrent_requests or engine_waiting_threshold",
        );
    }
    c
}
