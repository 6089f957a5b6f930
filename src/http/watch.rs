//! Noticing that the peer of a connection went away while we are busy elsewhere (waiting on
//! an upstream, sleeping between tokens) — without consuming any of its bytes.
//!
//! The watch owns a `dup` of the socket so that it can wait for readability while the
//! connection itself is being written; a readiness wait (io_uring PollAdd / epoll) never
//! takes data, so dropping it can lose nothing, unlike a cancelled read.

use monoio::net::TcpStream;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

pub struct DisconnectWatch {
    dup: TcpStream,
}

impl DisconnectWatch {
    pub fn new(stream: &TcpStream) -> io::Result<Self> {
        // SAFETY: `stream` is borrowed for this whole call, so its descriptor stays open
        // while it is borrowed here.
        let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
        // A new descriptor we own, close-on-exec (F_DUPFD_CLOEXEC).
        let dup = std::net::TcpStream::from(fd.try_clone_to_owned()?);
        Ok(DisconnectWatch {
            dup: TcpStream::from_std(dup)?,
        })
    }

    /// Resolves when the peer closed or reset the connection. If the peer sends more data
    /// instead (a pipelined request), it stops watching and stays pending: those bytes
    /// belong to the connection's next read.
    pub async fn closed(&self) {
        loop {
            if self.dup.readable(false).await.is_err() {
                return;
            }
            let mut byte = 0u8;
            // SAFETY: the buffer is one writable byte on the stack; the descriptor is our own
            // dup, open as long as `self`.
            let n = unsafe {
                libc::recv(
                    self.dup.as_raw_fd(),
                    (&mut byte as *mut u8).cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            match n {
                0 => return,
                n if n > 0 => std::future::pending::<()>().await,
                _ => {
                    let err = io::Error::last_os_error();
                    match err.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                        _ => return,
                    }
                }
            }
        }
    }
}
