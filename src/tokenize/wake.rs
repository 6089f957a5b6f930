//! How a tokenizer thread wakes the worker task waiting for its answer, without the worker
//! ever blocking: each worker has a mailbox, a Unix socket pair whose reading end is
//! registered with the worker's own event loop (io_uring or epoll alike) and read by one
//! small task. A tokenizer thread puts the token ids in the request's `Slot`, then writes
//! one byte to the worker's socket; the worker's reader task wakes the waiting tasks, which
//! find their slots filled. The worker runtime itself is unchanged (monoio's `sync`
//! feature, the alternative, adds a cross-thread waker queue every worker drains on each
//! loop turn): see docs/architecture.md, "Tokenizer threads".

use monoio::io::AsyncReadRent;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::ptr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// One request's answer, written once by a tokenizer thread and taken once by the worker.
#[derive(Default)]
pub struct Slot {
    done: AtomicBool,
    ids: AtomicPtr<Vec<u32>>,
}

impl Slot {
    /// Tokenizer thread: the answer (None: could not tokenize exactly).
    pub fn fill(&self, ids: Option<Vec<u32>>) {
        if let Some(ids) = ids {
            self.ids
                .store(Box::into_raw(Box::new(ids)), Ordering::Release);
        }
        self.done.store(true, Ordering::Release);
    }

    /// Worker: Some(answer) once filled.
    fn take(&self) -> Option<Option<Vec<u32>>> {
        if !self.done.load(Ordering::Acquire) {
            return None;
        }
        let p = self.ids.swap(ptr::null_mut(), Ordering::Acquire);
        // SAFETY: a non-null pointer came from Box::into_raw in `fill`, and the swap hands
        // it to exactly one owner.
        Some((!p.is_null()).then(|| *unsafe { Box::from_raw(p) }))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let p = *self.ids.get_mut();
        if !p.is_null() {
            // SAFETY: as in `take`; nobody else holds the slot any more.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

/// The writing end of a worker's mailbox, held by the jobs that worker handed over.
pub struct Notifier(UnixStream);

impl Notifier {
    /// Tokenizer thread: wake the worker. Non-blocking: when the socket buffer is full the
    /// worker has unread bytes already and will wake anyway.
    pub fn notify(&self) {
        let _ = (&self.0).write(&[1]);
    }
}

struct Mailbox {
    notifier: Arc<Notifier>,
    waiters: RefCell<Vec<Waker>>,
    dead: Cell<bool>,
}

thread_local! {
    static MAILBOX: RefCell<Option<Rc<Mailbox>>> = const { RefCell::new(None) };
}

/// This worker's mailbox, made (and its reader task started) on first use. It belongs to
/// the runtime that made it: a worker thread runs one runtime for its whole life.
fn mailbox() -> Option<Rc<Mailbox>> {
    if let Some(m) = MAILBOX.with(|m| m.borrow().clone()) {
        return Some(m);
    }
    let (tx, rx) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            crate::warn!("tokenizer mailbox: {e}; prompts keep the byte estimate");
            return None;
        }
    };
    let rx = tx
        .set_nonblocking(true)
        .and_then(|_| rx.set_nonblocking(true))
        .and_then(|_| monoio::net::UnixStream::from_std(rx));
    let rx = match rx {
        Ok(rx) => rx,
        Err(e) => {
            crate::warn!("tokenizer mailbox: {e}; prompts keep the byte estimate");
            return None;
        }
    };
    let m = Rc::new(Mailbox {
        notifier: Arc::new(Notifier(tx)),
        waiters: RefCell::new(Vec::new()),
        dead: Cell::new(false),
    });
    MAILBOX.with(|slot| *slot.borrow_mut() = Some(m.clone()));
    monoio::spawn(read_loop(rx, m.clone()));
    Some(m)
}

/// Wakes every waiting task whenever bytes arrive; each checks its own slot.
async fn read_loop(mut rx: monoio::net::UnixStream, m: Rc<Mailbox>) {
    let mut buf = vec![0u8; 256];
    loop {
        let (r, b) = rx.read(buf).await;
        buf = b;
        let failed = match r {
            Ok(0) => Some("closed".to_string()),
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = &failed {
            crate::warn!("tokenizer mailbox: {why}; a new one is made for the next prompt");
            m.dead.set(true);
            MAILBOX.with(|slot| *slot.borrow_mut() = None);
        }
        let waiters = std::mem::take(&mut *m.waiters.borrow_mut());
        for w in waiters {
            w.wake();
        }
        if failed.is_some() {
            return;
        }
    }
}

/// The writing end for a job submitted from this worker.
pub fn notifier() -> Option<Arc<Notifier>> {
    mailbox().map(|m| m.notifier.clone())
}

/// Waits for a slot's answer; the worker serves its other tasks meanwhile.
pub struct Wait {
    slot: Arc<Slot>,
    mailbox: Option<Rc<Mailbox>>,
}

impl Wait {
    pub fn new(slot: Arc<Slot>) -> Self {
        Wait {
            slot,
            mailbox: MAILBOX.with(|m| m.borrow().clone()),
        }
    }
}

impl Future for Wait {
    type Output = Option<Vec<u32>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(ids) = self.slot.take() {
            return Poll::Ready(ids);
        }
        match &self.mailbox {
            Some(m) if !m.dead.get() => {
                m.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
            // No way to be woken: keep the estimate.
            _ => Poll::Ready(None),
        }
    }
}
