//! The health thread: probes every instance's `/health` off the data path and publishes the
//! result into the shared state, which workers read with relaxed atomic loads. On an
//! instance's first answer it also reads `max_model_len` and `root` from its `/v1/models`.

use crate::config::HealthConfig;
use crate::http::blocking;
use crate::topology::{Health, Instance, Shared};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub fn spawn(
    shared: Arc<Shared>,
    cfg: HealthConfig,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("xpyd-health".into())
        .spawn(move || loop {
            let topo = shared.topology.load_full();
            let instances: Vec<Arc<Instance>> = topo.instances().cloned().collect();
            // Probe in parallel so that one slow instance does not delay the others.
            std::thread::scope(|s| {
                for inst in &instances {
                    s.spawn(|| probe(inst, cfg.timeout));
                }
            });
            let all_answered = instances.iter().all(|i| i.answered.load(Ordering::Relaxed));
            if all_answered && !shared.ready.swap(true, Ordering::AcqRel) {
                crate::info!("every configured instance answered; serving requests");
            }
            let wait = if shared.is_ready() {
                cfg.interval
            } else {
                cfg.startup_probe_interval
            };
            std::thread::sleep(wait);
        })
}

fn probe(inst: &Instance, timeout: Duration) {
    let addr = inst.address.as_str();
    let ok = match blocking::request(addr, "GET", "/health", None, timeout, |_| {}) {
        Ok(r) if r.status == 200 => true,
        Ok(r) => {
            crate::debug!("health probe of {addr}: status {}", r.status);
            false
        }
        Err(e) => {
            crate::debug!("health probe of {addr}: {e}");
            false
        }
    };
    inst.last_check
        .store(crate::ids::unix_seconds(), Ordering::Relaxed);
    let before = inst.health();
    inst.set_health(if ok {
        Health::Healthy
    } else {
        Health::Unhealthy
    });
    if ok != (before == Health::Healthy) && before != Health::Unknown {
        if ok {
            crate::warn!("instance {addr} ({}) is healthy again", inst.role.as_str());
        } else {
            crate::warn!("instance {addr} ({}) is unhealthy", inst.role.as_str());
        }
    }
    if ok && inst.max_model_len.load(Ordering::Relaxed) == 0 {
        read_model_info(inst, timeout);
    }
}

fn read_model_info(inst: &Instance, timeout: Duration) {
    let Ok(r) = blocking::request(&inst.address, "GET", "/v1/models", None, timeout, |_| {}) else {
        return;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) else {
        return;
    };
    let Some(entry) = v["data"].as_array().and_then(|d| d.first()) else {
        return;
    };
    if let Some(n) = entry["max_model_len"].as_u64() {
        inst.max_model_len.store(n, Ordering::Relaxed);
    }
    if let Some(root) = entry["root"].as_str().or(entry["id"].as_str()) {
        let _ = inst.root.set(root.to_string());
    }
}
