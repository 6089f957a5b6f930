//! Engine-aware shedding's estimate (docs/resilience.md, "Admission control"): how many
//! requests wait in each engine now, from its last scraped sample and what was sent since,
//! and how many more the engines that would take a model's next request accept.

use crate::engine_load::Fresh;
use crate::topology::{ModelRoute, RoleSet};

/// The requests waiting in an engine now, as far as this proxy can tell: what the last
/// sample had running and waiting, plus the requests this proxy (and, as their load reports
/// say, its peer replicas) sent it since, minus those that ended (the sample records both
/// counts as they were), beyond the engine's batch (`batch`: the most seen running with a
/// queue). Until the engine was once seen with a queue, a sample without one says nothing
/// about free batch slots: `None`.
pub(super) fn waiting_now(f: &Fresh, in_flight: u64, batch: u64) -> Option<u64> {
    if f.sample.waiting == 0 && batch == 0 {
        return None;
    }
    let slots = batch.max(f.sample.running);
    let now = f.sample.running + f.sample.waiting + in_flight + f.peers_now;
    Some(now.saturating_sub(f.local_at_scrape + f.peers_at_scrape + slots))
}

/// How many more requests the role's available instances take before every one of them is
/// over `threshold` waiting; `None`: no bound (an instance without a fresh sample, or
/// whose sample shows no queue — an unknown load never holds requests back).
fn role_room(set: &RoleSet, threshold: u64) -> Option<u64> {
    let mut room = None;
    for i in set.instances.iter().filter(|i| i.is_available()) {
        let waiting = waiting_now(&i.engine.last()?, i.in_flight(), i.engine.batch_seen())?;
        *room.get_or_insert(0) += (threshold + 1).saturating_sub(waiting);
    }
    room
}

/// How many more requests the engines that would take the model's next ones accept before
/// all of them are over `threshold` waiting: for a P/D model the smaller of its two roles',
/// else its dual instances'. `None`: no bound (or shedding off, `threshold` 0).
pub fn engine_room(route: &ModelRoute, threshold: u64) -> Option<u64> {
    if threshold == 0 {
        return None;
    }
    if route.prefill.any_available() && route.decode.any_available() {
        match (
            role_room(&route.prefill, threshold),
            role_room(&route.decode, threshold),
        ) {
            (Some(p), Some(d)) => Some(p.min(d)),
            (p, d) => p.or(d),
        }
    } else {
        role_room(&route.dual, threshold)
    }
}

/// Every engine that would take the model's next request is over `threshold` waiting.
pub fn saturated(route: &ModelRoute, threshold: u64) -> bool {
    engine_room(route, threshold) == Some(0)
}
