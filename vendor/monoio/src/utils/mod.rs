//! Common utils

pub(crate) mod box_into_inner;
pub(crate) mod linked_list;
#[allow(dead_code)]
pub(crate) mod slab;
#[allow(dead_code)]
pub(crate) mod thread_id;
pub(crate) mod uring_detect;

mod rand;
pub use rand::thread_rng_n;
pub use uring_detect::detect_uring;

pub use crate::driver::op::is_legacy;

#[cfg(feature = "signal")]
mod ctrlc;
#[cfg(feature = "signal")]
pub use self::ctrlc::{CtrlC, Error as CtrlCError};

#[cfg(feature = "utils")]
mod bind_to_cpu_set;
#[cfg(feature = "utils")]
pub use bind_to_cpu_set::{bind_to_cpu_set, BindError};

/// xpyd patch: whether io_uring receives (`IORING_OP_RECV`, the op behind `TcpStream`'s
/// `read`) carry `IORING_RECVSEND_POLL_FIRST`. Off by default, as in monoio 0.2.4.
static RECV_POLL_FIRST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// xpyd patch: asks every later io_uring receive to arm the socket's poll first rather than
/// try the receive inline (for sockets where a read is usually submitted before data arrives:
/// keep-alive and response reads). Kernel ≥ 5.19; the epoll driver ignores it.
pub fn set_recv_poll_first(on: bool) {
    RECV_POLL_FIRST.store(on, std::sync::atomic::Ordering::Relaxed);
}

#[inline]
pub(crate) fn recv_poll_first() -> bool {
    RECV_POLL_FIRST.load(std::sync::atomic::Ordering::Relaxed)
}
