//! The tokenizer threads and their bounded queue. Workers never wait on it: `submit`
//! either hands the job over at once (`try_send`) or refuses it, when the queue is full or
//! more than `tokenizer.max_queued_kib` of prompt text is already waiting or being
//! tokenized (the threads are behind); the request then keeps the byte estimate, and the
//! refusal is counted.

use super::wake::{self, Notifier, Slot};
use super::{Input, Model};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Jobs the queue holds at most; the byte budget usually refuses first.
const QUEUE_JOBS: usize = 1024;

struct Job {
    model: Arc<Model>,
    input: Input,
    bytes: u64,
    slot: Arc<Slot>,
    notify: Arc<Notifier>,
}

struct Pool {
    tx: crossbeam_channel::Sender<Job>,
}

static POOL: OnceLock<Pool> = OnceLock::new();
/// Prompt bytes handed over and not finished.
static QUEUED_BYTES: AtomicU64 = AtomicU64::new(0);
static MAX_QUEUED_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_MAX_QUEUED_KIB * 1024);
pub const DEFAULT_MAX_QUEUED_KIB: u64 = 4096;
static BUSY: AtomicU64 = AtomicU64::new(0);
static DONE_BYTES: AtomicU64 = AtomicU64::new(0);
static DONE_NANOS: AtomicU64 = AtomicU64::new(0);
/// [completion, chat] × [tokenized, queue_full, failed].
static OUTCOMES: [[AtomicU64; 3]; 2] = [
    [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
    [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
];
const TOKENIZED: usize = 0;
const QUEUE_FULL: usize = 1;
const FAILED: usize = 2;

fn count(chat: bool, outcome: usize) {
    OUTCOMES[chat as usize][outcome].fetch_add(1, Ordering::Relaxed);
}

/// The budget of prompt text waiting for or in tokenization (`tokenizer.max_queued_kib`).
pub fn set_max_queued_kib(kib: u64) {
    MAX_QUEUED_BYTES.store(kib.saturating_mul(1024), Ordering::Relaxed);
}

/// Starts `threads` tokenizer threads (once per process; later calls change nothing).
pub fn start_threads(threads: usize) -> std::io::Result<()> {
    if POOL.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = crossbeam_channel::bounded::<Job>(QUEUE_JOBS);
    for k in 0..threads.max(1) {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("xpyd-tokenize-{k}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    run(job);
                }
            })?;
    }
    let _ = POOL.set(Pool { tx });
    Ok(())
}

fn run(job: Job) {
    BUSY.fetch_add(1, Ordering::Relaxed);
    let chat = job.input.is_chat();
    let start = Instant::now();
    // A tokenizer or template that panics fails this job, not the thread.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        super::run(&job.model, job.input)
    }))
    .unwrap_or_else(|_| Err("the tokenizer panicked".into()));
    DONE_NANOS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    DONE_BYTES.fetch_add(job.bytes, Ordering::Relaxed);
    let ids = match result {
        Ok(ids) => {
            count(chat, TOKENIZED);
            Some(ids)
        }
        Err(e) => {
            count(chat, FAILED);
            crate::debug!("tokenizing a prompt failed ({e}); it keeps the byte estimate");
            None
        }
    };
    QUEUED_BYTES.fetch_sub(job.bytes, Ordering::Relaxed);
    BUSY.fetch_sub(1, Ordering::Relaxed);
    job.slot.fill(ids);
    job.notify.notify();
}

/// Hands `input` to the tokenizer threads, or None (counted) when they are behind.
pub(super) fn submit(model: Arc<Model>, input: Input) -> Option<Arc<Slot>> {
    let chat = input.is_chat();
    let pool = POOL.get()?;
    let notify = wake::notifier()?;
    let bytes = input.len() as u64;
    let max = MAX_QUEUED_BYTES.load(Ordering::Relaxed);
    let before = QUEUED_BYTES.fetch_add(bytes, Ordering::Relaxed);
    if before + bytes > max {
        QUEUED_BYTES.fetch_sub(bytes, Ordering::Relaxed);
        count(chat, QUEUE_FULL);
        return None;
    }
    let slot = Arc::new(Slot::default());
    let job = Job {
        model,
        input,
        bytes,
        slot: slot.clone(),
        notify,
    };
    match pool.tx.try_send(job) {
        Ok(()) => Some(slot),
        Err(_) => {
            QUEUED_BYTES.fetch_sub(bytes, Ordering::Relaxed);
            count(chat, QUEUE_FULL);
            None
        }
    }
}

/// The tokenizer's series in Prometheus text format.
pub fn render_metrics(out: &mut String) {
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let _ = writeln!(out, "# HELP proxy_tokenizer_requests_total Prompts that needed exact tokens, by kind and outcome: tokenized on a tokenizer thread, queue_full (the threads were behind: the byte estimate was used), failed (could not be tokenized exactly: the byte estimate was used).\n# TYPE proxy_tokenizer_requests_total counter");
    for (k, kind) in ["completion", "chat"].iter().enumerate() {
        for (o, outcome) in ["tokenized", "queue_full", "failed"].iter().enumerate() {
            let _ = writeln!(
                out,
                "proxy_tokenizer_requests_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {}",
                g(&OUTCOMES[k][o])
            );
        }
    }
    let _ = writeln!(out, "# HELP proxy_tokenizer_queued_bytes Prompt bytes handed to the tokenizer threads and not finished.\n# TYPE proxy_tokenizer_queued_bytes gauge\nproxy_tokenizer_queued_bytes {}", g(&QUEUED_BYTES));
    let _ = writeln!(out, "# HELP proxy_tokenizer_busy_threads Tokenizer threads tokenizing now.\n# TYPE proxy_tokenizer_busy_threads gauge\nproxy_tokenizer_busy_threads {}", g(&BUSY));
    let _ = writeln!(out, "# HELP proxy_tokenizer_bytes_total Prompt bytes tokenized.\n# TYPE proxy_tokenizer_bytes_total counter\nproxy_tokenizer_bytes_total {}", g(&DONE_BYTES));
    let _ = writeln!(out, "# HELP proxy_tokenizer_kept_bytes_total Of those, bytes whose token ids were kept from earlier prompts sharing the text (a shared prefix), not tokenized again.\n# TYPE proxy_tokenizer_kept_bytes_total counter\nproxy_tokenizer_kept_bytes_total {}", g(&super::pieces::KEPT_BYTES));
    let _ = writeln!(out, "# HELP proxy_tokenizer_seconds_total Time the tokenizer threads spent tokenizing (with chat template rendering).\n# TYPE proxy_tokenizer_seconds_total counter\nproxy_tokenizer_seconds_total {}", g(&DONE_NANOS) as f64 / 1e9);
}
