//! Admission control (docs/resilience.md, "Admission control"): before a request is sent,
//! it passes its model's limits — a token bucket (prompt + max_tokens per second), a
//! concurrency limit with a bounded FIFO queue and a queue timeout, the engines' own queues
//! (engine-aware shedding), and with `api_keys` each key's share of all of these. Past a
//! limit the answer is 429 with `Retry-After`, at once or when the queue time is up.
//!
//! Shared across workers (`gate.rs`): the per-model and per-key slot counters, queue depths
//! and buckets, all atomics. Per worker (`Local`): the wait queues, plain `RefCell`s — a
//! request waits on its own worker and is woken by that worker only, so nothing waits on
//! another thread and no lock is taken. Waiters hold tickets in arrival order across
//! workers; each worker publishes its oldest waiter's ticket and grants a free slot to its
//! own waiter only if none older waits elsewhere, and looks for free slots every `TICK`.
//! The queue is thus FIFO across workers, a cross-worker handoff costing up to one tick
//! (docs/resilience.md, "Admission control").

mod bucket;
mod engine_room;
pub mod gate;
mod report;
pub mod usage;

pub use engine_room::{engine_room, saturated};
pub use gate::{Gates, ModelGate, Reason};
pub use report::{render, status_json};

use crate::config::{AdmissionConfig, Policy};
use crate::hash::FastHash;
use crate::http::ApiError;
use crate::shared::{LocalSnapshot, Shared};
use crate::topology::ModelRoute;
use gate::{Counters, KeyGate};
use http::StatusCode;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often a worker with waiters looks for slots freed on other workers (and for the
/// engines' queues to drain).
const TICK: Duration = Duration::from_millis(2);

/// Why a request was not admitted, answered as 429.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub reason: Reason,
    pub retry_after_secs: u64,
    pub message: String,
}

impl Rejection {
    pub fn api_error(&self) -> ApiError {
        let kind = if self.reason == Reason::TokenRate {
            "tokens"
        } else {
            "requests"
        };
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, kind, self.message.clone())
            .with_code("rate_limit_exceeded")
            .with_retry_after(self.retry_after_secs)
    }
}

/// What admission needs to know about a request.
pub struct Ask<'a> {
    pub model: &'a str,
    pub route: &'a ModelRoute,
    /// The client's `Authorization` header (its key picks the key's share).
    pub authorization: Option<&'a str>,
    /// prompt + max_tokens, for the token bucket.
    pub tokens: u64,
}

/// One worker's wait queues, by model.
pub struct Local {
    shared: Arc<Shared>,
    /// The worker's view of `shared.policy` (`Worker::policy`).
    policy: Rc<LocalSnapshot<Policy>>,
    /// The worker's index (its slot in each gate's `heads`).
    id: usize,
    queues: RefCell<HashMap<String, Rc<Queue>, FastHash>>,
    ticking: Cell<bool>,
}

struct Queue {
    model: String,
    gate: Arc<ModelGate>,
    waiters: RefCell<VecDeque<Rc<Waiter>>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    /// A slot was taken for it; the request has not picked it up yet.
    Granted,
    /// The request holds the slot (its `Permit` releases it).
    Taken,
}

struct Waiter {
    /// Its place in the model's arrival order, across workers.
    ticket: u64,
    key: Option<Arc<KeyGate>>,
    state: Cell<State>,
    waker: Cell<Option<Waker>>,
    since: Instant,
}

/// A slot of the model (and of the key): released, and handed to the worker's next
/// waiter, when the request ends however it ends.
pub struct Permit {
    local: Rc<Local>,
    q: Rc<Queue>,
    key: Option<Arc<KeyGate>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        release(&self.q, &self.key);
        self.local.pump(&self.q);
    }
}

fn release(q: &Queue, key: &Option<Arc<KeyGate>>) {
    q.gate.c.release();
    if let Some(k) = key {
        k.c.release();
    }
}

/// `limit` split by weight: a key's share (at least 1), 0 for no limit.
fn share(limit: u64, weight: u64, total: u64) -> u64 {
    if limit == 0 {
        0
    } else {
        (limit * weight / total.max(1)).max(1)
    }
}

/// A key's weight and the sum of all keys' weights.
fn weights(policy: &Policy, cfg: &AdmissionConfig, key: &str) -> (u64, u64) {
    let w = |k: &str| cfg.key_weights.get(k).copied().unwrap_or(1);
    (w(key), policy.api_keys.iter().map(|k| w(k)).sum())
}

fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

fn retry_after(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Local {
    pub fn new(shared: Arc<Shared>, policy: Rc<LocalSnapshot<Policy>>, id: usize) -> Rc<Self> {
        Rc::new(Local {
            shared,
            policy,
            id,
            queues: RefCell::new(HashMap::default()),
            ticking: Cell::new(false),
        })
    }

    fn queue(&self, model: &str) -> Rc<Queue> {
        if let Some(q) = self.queues.borrow().get(model) {
            return q.clone();
        }
        let q = Rc::new(Queue {
            model: model.to_string(),
            gate: self.shared.admission.get(model),
            waiters: RefCell::new(VecDeque::new()),
        });
        self.queues
            .borrow_mut()
            .insert(model.to_string(), q.clone());
        q
    }

    /// Admits the request now, after a wait in the queue, or not (429). `None`: the model
    /// has no admission limits. Dropping the future while it waits (the client left)
    /// removes the request from the queue.
    pub async fn admit(self: &Rc<Self>, ask: Ask<'_>) -> Result<Option<Permit>, Rejection> {
        let policy = self.policy.get();
        let Some(cfg) = policy.admission(ask.model) else {
            return Ok(None);
        };
        let q = self.queue(ask.model);
        let gate = &q.gate;
        let key = ask
            .authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim)
            .and_then(|k| policy.api_keys.iter().position(|x| x == k))
            .map(|i| {
                let k = &policy.api_keys[i];
                (gate.key(k, i), weights(&policy, cfg, k))
            });
        let reject = |reason: Reason, retry: u64, message: String| {
            gate.c.reject(reason);
            if let Some((k, _)) = &key {
                k.c.reject(reason);
            }
            Err(Rejection {
                reason,
                retry_after_secs: retry.max(1),
                message,
            })
        };

        // Tokens: the model's bucket, then the key's share of it.
        let now = now_ns();
        let burst = cfg.burst();
        if let Err(wait) = gate
            .c
            .bucket
            .take(now, ask.tokens, cfg.tokens_per_second, burst)
        {
            return reject(
                Reason::TokenRate,
                retry_after(wait),
                format!(
                    "model `{}` is over its token rate ({} tokens/s, prompt + max_tokens); retry later",
                    ask.model, cfg.tokens_per_second
                ),
            );
        }
        if let Some((k, (w, total))) = &key {
            let rate = share(cfg.tokens_per_second, *w, *total);
            if let Err(wait) =
                k.c.bucket
                    .take(now, ask.tokens, rate, share(burst, *w, *total))
            {
                // Refused: the model's tokens it took are not spent.
                gate.c
                    .bucket
                    .give_back(ask.tokens, cfg.tokens_per_second, burst);
                return reject(
                    Reason::TokenRate,
                    retry_after(wait),
                    format!("this API key is over its share of model `{}`'s token rate ({rate} tokens/s); retry later", ask.model),
                );
            }
        }

        // Refused past this point, the request spends no tokens: it loads no engine.
        let spent = Spent {
            tokens: ask.tokens,
            rate: cfg.tokens_per_second,
            burst,
            key: key.as_ref().map(|(k, (w, t))| {
                (
                    k.clone(),
                    share(cfg.tokens_per_second, *w, *t),
                    share(burst, *w, *t),
                )
            }),
        };
        let refuse = |reason: Reason, retry: u64, message: String| {
            spent.give_back(gate);
            reject(reason, retry, message)
        };

        // A slot at once, unless others are waiting or the engines are saturated.
        let limit = cfg.max_concurrent_requests;
        let key_limit = key.as_ref().map(|(_, (w, t))| share(limit, *w, *t));
        if q.waiters.borrow().is_empty()
            && gate.c.queued() == 0
            && !saturated(ask.route, cfg.engine_waiting_threshold)
            && take(&gate.c, limit, key.as_ref().map(|(k, _)| &k.c), key_limit)
        {
            return Ok(Some(Permit {
                local: self.clone(),
                q: q.clone(),
                key: key.map(|(k, _)| k),
            }));
        }

        // Wait in the queue, if there is room (the key's share of it too).
        let full = |c: &Counters, cap: u64| {
            c.queued
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < cap).then_some(n + 1)
                })
                .is_err()
        };
        if cfg.queue_size == 0 {
            return refuse(
                Reason::Concurrency,
                1,
                format!(
                    "model `{}` has {limit} requests in flight (admission.max_concurrent_requests); retry later",
                    ask.model
                ),
            );
        }
        if full(&gate.c, cfg.queue_size) {
            return refuse(
                Reason::QueueFull,
                1,
                format!(
                    "model `{}` is at its limit and its queue is full ({} waiting); retry later",
                    ask.model, cfg.queue_size
                ),
            );
        }
        if let Some((k, (w, t))) = &key {
            let cap = share(cfg.queue_size, *w, *t);
            if full(&k.c, cap) {
                gate.c.queued.fetch_sub(1, Ordering::Relaxed);
                return refuse(
                    Reason::QueueFull,
                    1,
                    format!("this API key has its share of model `{}`'s queue waiting ({cap}); retry later", ask.model),
                );
            }
        }
        let timeout = cfg.queue_timeout;
        drop(policy);
        let waiter = Rc::new(Waiter {
            ticket: gate.tickets.fetch_add(1, Ordering::Relaxed),
            key: key.as_ref().map(|(k, _)| k.clone()),
            state: Cell::new(State::Waiting),
            waker: Cell::new(None),
            since: Instant::now(),
        });
        q.waiters.borrow_mut().push_back(waiter.clone());
        let ticket = Ticket {
            local: self.clone(),
            q: q.clone(),
            w: waiter.clone(),
        };
        self.pump(&q);
        self.ensure_ticking();
        let _ = monoio::time::timeout(timeout, Granted(&waiter)).await;
        if waiter.state.get() == State::Granted {
            waiter.state.set(State::Taken);
            drop(ticket);
            return Ok(Some(Permit {
                local: self.clone(),
                q,
                key: waiter.key.clone(),
            }));
        }
        drop(ticket); // leaves the queue
        spent.give_back(&q.gate);
        gate.c.reject(Reason::QueueTimeout);
        if let Some(k) = &waiter.key {
            k.c.reject(Reason::QueueTimeout);
        }
        Err(Rejection {
            reason: Reason::QueueTimeout,
            retry_after_secs: 1,
            message: format!(
                "model `{}` had no free slot within {:.3} s (admission.queue_timeout_seconds); retry later",
                ask.model,
                timeout.as_secs_f64()
            ),
        })
    }

    /// Counts the token usage an engine reported for a request of `model` (and of the
    /// client's API key), whether or not the model has admission limits.
    pub fn usage(&self, model: &str, authorization: Option<&str>, tokens: (u64, u64)) {
        // The worker's own handle on the gate: no shared reference count touched.
        let gate = &self.queue(model).gate;
        gate.c.usage(self.id, tokens.0, tokens.1);
        let policy = self.policy.get();
        if let Some(i) = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim)
            .and_then(|k| policy.api_keys.iter().position(|x| x == k))
        {
            gate.key(&policy.api_keys[i], i)
                .c
                .usage(self.id, tokens.0, tokens.1);
        }
    }

    /// Hands free slots to this worker's waiters for `q`'s model, oldest first (a waiter
    /// whose key is at its share is passed over, not blocking the ones behind it).
    fn pump(&self, q: &Queue) {
        let head = self.grant(q);
        let slot = &q.gate.heads[self.id % q.gate.heads.len()];
        // Written only when it changes: a request ending with nobody waiting writes nothing.
        if slot.load(Ordering::Relaxed) != head {
            slot.store(head, Ordering::Relaxed);
        }
    }

    /// Grants what `pump` can; returns the ticket of the oldest waiter left that could take
    /// a slot (`u64::MAX`: none), for the other workers to defer to.
    fn grant(&self, q: &Queue) -> u64 {
        let front = || q.waiters.borrow().front().map_or(u64::MAX, |w| w.ticket);
        if q.waiters.borrow().is_empty() {
            return u64::MAX;
        }
        let policy = self.policy.get();
        let cfg = policy.admission(&q.model);
        // Engine-aware shedding: no more than the engines' estimated room, so a queue that
        // built up while they were saturated does not all join their queues at once.
        let mut room = u64::MAX;
        if let Some(cfg) = cfg {
            if cfg.engine_waiting_threshold > 0 {
                let topo = self.shared.topology.load();
                let route = topo.route_index(Some(&q.model)).map(|i| &topo.models[i]);
                match route.and_then(|r| engine_room(r, cfg.engine_waiting_threshold)) {
                    Some(0) => return front(),
                    Some(n) => room = n,
                    None => {}
                }
            }
        }
        // The oldest waiter on any other worker: it goes before ours that are younger.
        let elsewhere = q
            .gate
            .heads
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.id % q.gate.heads.len())
            .map(|(_, h)| h.load(Ordering::Relaxed))
            .min()
            .unwrap_or(u64::MAX);
        let mut head = u64::MAX;
        let mut waiters = q.waiters.borrow_mut();
        let mut i = 0;
        while i < waiters.len() {
            let w = &waiters[i];
            let granted = match cfg {
                // Limits lifted by a reload: everyone waiting goes.
                None => {
                    q.gate.c.try_take(0);
                    if let Some(k) = &w.key {
                        k.c.try_take(0);
                    }
                    true
                }
                Some(cfg) => {
                    let limit = cfg.max_concurrent_requests;
                    let key_limit = w.key.as_ref().map(|k| {
                        let (wt, total) = weights(&policy, cfg, &k.key);
                        share(limit, wt, total)
                    });
                    let key_full = match (&w.key, key_limit) {
                        (Some(k), Some(l)) => l > 0 && k.c.in_flight() >= l,
                        _ => false,
                    };
                    if key_full {
                        false // this key is at its share; the next waiter may go
                    } else if room == 0 {
                        head = w.ticket;
                        break; // the engines' room is used up until they report again
                    } else if w.ticket > elsewhere {
                        head = w.ticket;
                        break; // an older request waits on another worker: its turn
                    } else if take(&q.gate.c, limit, w.key.as_ref().map(|k| &k.c), key_limit) {
                        true
                    } else {
                        head = w.ticket;
                        break; // the model is full: nobody behind gets in either
                    }
                }
            };
            if !granted {
                i += 1;
                continue;
            }
            let Some(w) = waiters.remove(i) else { break };
            room = room.saturating_sub(1);
            q.gate.c.queued.fetch_sub(1, Ordering::Relaxed);
            if let Some(k) = &w.key {
                k.c.queued.fetch_sub(1, Ordering::Relaxed);
            }
            q.gate.observe_queue_time(w.since.elapsed());
            w.state.set(State::Granted);
            if let Some(waker) = w.waker.take() {
                waker.wake();
            }
        }
        head
    }

    /// While any queue of this worker has waiters, look for free slots every `TICK`.
    fn ensure_ticking(self: &Rc<Self>) {
        if self.ticking.replace(true) {
            return;
        }
        let me = self.clone();
        monoio::spawn(async move {
            loop {
                monoio::time::sleep(TICK).await;
                let busy: Vec<Rc<Queue>> = me
                    .queues
                    .borrow()
                    .values()
                    .filter(|q| !q.waiters.borrow().is_empty())
                    .cloned()
                    .collect();
                if busy.is_empty() {
                    me.ticking.set(false);
                    return;
                }
                for q in busy {
                    me.pump(&q);
                }
            }
        });
    }
}

/// The tokens a request took from the model's bucket and its key's, given back when it is
/// refused after all.
struct Spent {
    tokens: u64,
    rate: u64,
    burst: u64,
    /// The key, its rate and burst.
    key: Option<(Arc<KeyGate>, u64, u64)>,
}

impl Spent {
    fn give_back(&self, gate: &ModelGate) {
        gate.c.bucket.give_back(self.tokens, self.rate, self.burst);
        if let Some((k, rate, burst)) = &self.key {
            k.c.bucket.give_back(self.tokens, *rate, *burst);
        }
    }
}

/// Takes the key's slot then the model's, or neither.
fn take(model: &Counters, limit: u64, key: Option<&Counters>, key_limit: Option<u64>) -> bool {
    if let Some(k) = key {
        if !k.try_take(key_limit.unwrap_or(0)) {
            return false;
        }
    }
    if model.try_take(limit) {
        return true;
    }
    if let Some(k) = key {
        k.release();
    }
    false
}

/// A place in the queue: leaving it (timeout, the client gone) takes the request out, or
/// gives back the slot it was granted meanwhile.
struct Ticket {
    local: Rc<Local>,
    q: Rc<Queue>,
    w: Rc<Waiter>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        match self.w.state.get() {
            State::Waiting => {
                let mut waiters = self.q.waiters.borrow_mut();
                if let Some(i) = waiters.iter().position(|x| Rc::ptr_eq(x, &self.w)) {
                    waiters.remove(i);
                    self.q.gate.c.queued.fetch_sub(1, Ordering::Relaxed);
                    if let Some(k) = &self.w.key {
                        k.c.queued.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                drop(waiters);
                // Republishes this worker's oldest waiter (it may have been this one).
                self.local.pump(&self.q);
            }
            State::Granted => {
                self.w.state.set(State::Taken);
                release(&self.q, &self.w.key);
                self.local.pump(&self.q);
            }
            State::Taken => {}
        }
    }
}

/// Resolves once the waiter was granted a slot.
struct Granted<'a>(&'a Waiter);

impl Future for Granted<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.state.get() != State::Waiting {
            return Poll::Ready(());
        }
        self.0.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

#[cfg(test)]
mod tests;
