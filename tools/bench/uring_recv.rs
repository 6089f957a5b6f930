//! What multishot receive would save beneath monoio, measured on raw io_uring (the io-uring
//! crate monoio uses, no runtime): one thread with a ring (`COOP_TASKRUN` + `SINGLE_ISSUER`,
//! as the proxy's workers) answers C loopback connections; a client thread writes a 200-byte
//! message on each, then reads each 200-byte answer, in a loop (C messages in flight). The
//! ring thread's CPU time (CLOCK_THREAD_CPUTIME_ID) per message, in one of three modes:
//!
//! - `single`: one receive per message into the connection's buffer, submitted again after
//!   each completion (what monoio 0.2.4 does);
//! - `singlepf`: the same with `IORING_RECVSEND_POLL_FIRST` (what vendor/monoio does);
//! - `multi`: one multishot receive per connection with a provided-buffer ring (1024 × 4 KiB);
//!   each completion's bytes are copied into the connection's own buffer (as into xpyd's
//!   `ReadBuf`) and the buffer is handed back to the ring; re-armed only when the kernel ends
//!   it.
//!
//! Each message is answered with a send in all three. docs/benchmarks.md, "Beneath monoio".
//!
//!   cargo run --release --example uring-recv -- MODE CONNECTIONS MESSAGES
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};

const MSG: usize = 200;
const BUFS: u16 = 1024;
const BUF_SIZE: usize = 4096;
const SEND_TAG: u64 = 1 << 63;

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `IORING_RECVSEND_POLL_FIRST` in the SQE's `ioprio` (byte offset 2), as vendor/monoio does.
fn poll_first(e: &mut squeue::Entry) {
    // SAFETY: `Entry` is `#[repr(C)]` around the 64-byte `io_uring_sqe`.
    unsafe { ((e as *mut squeue::Entry as *mut u8).add(2) as *mut u16).write_unaligned(1) };
}

fn push(ring: &mut IoUring, e: &squeue::Entry) {
    // SAFETY: every buffer an entry points at lives until the process exits.
    while unsafe { ring.submission().push(e) }.is_err() {
        ring.submit().expect("submit");
    }
}

/// The provided-buffer ring: BUFS entries in page-aligned memory, buffers in `pool`.
struct BufRing {
    entries: *mut types::BufRingEntry,
    pool: Vec<u8>,
    tail: u16,
}

impl BufRing {
    fn new(ring: &IoUring) -> BufRing {
        // SAFETY: an anonymous private mapping, page-aligned as the kernel requires.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BUFS as usize * std::mem::size_of::<types::BufRingEntry>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED, "mmap");
        let mut r = BufRing {
            entries: mem as *mut types::BufRingEntry,
            pool: vec![0u8; BUFS as usize * BUF_SIZE],
            tail: 0,
        };
        for bid in 0..BUFS {
            r.give_back(bid);
        }
        // SAFETY: `entries` stays mapped for the process's life.
        unsafe { ring.submitter().register_buf_ring(mem as u64, BUFS, 0) }
            .expect("register_buf_ring");
        r
    }

    fn buf(&self, bid: u16, len: usize) -> &[u8] {
        &self.pool[bid as usize * BUF_SIZE..bid as usize * BUF_SIZE + len]
    }

    fn give_back(&mut self, bid: u16) {
        let addr = self.pool.as_mut_ptr() as u64 + bid as u64 * BUF_SIZE as u64;
        // SAFETY: the slot index is masked into the ring; the tail field overlays entry 0's
        // `resv` and is published with a release store, as the kernel reads it.
        unsafe {
            let e = &mut *self.entries.add((self.tail & (BUFS - 1)) as usize);
            e.set_addr(addr);
            e.set_len(BUF_SIZE as u32);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 || !["single", "singlepf", "multi"].contains(&args[1].as_str()) {
        eprintln!("usage: uring-recv single|singlepf|multi CONNECTIONS MESSAGES");
        std::process::exit(2);
    }
    let mode = args[1].as_str();
    let conns: usize = args[2].parse().expect("CONNECTIONS");
    let total: u64 = args[3].parse().expect("MESSAGES");
    let multi = mode == "multi";

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        let mut socks: Vec<TcpStream> = (0..conns)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        for s in &socks {
            s.set_nodelay(true).expect("nodelay");
        }
        let req = [b'q'; MSG];
        let mut answer = [0u8; MSG];
        loop {
            for s in socks.iter_mut() {
                if s.write_all(&req).is_err() {
                    return;
                }
            }
            for s in socks.iter_mut() {
                if s.read_exact(&mut answer).is_err() {
                    return;
                }
            }
        }
    });
    let server: Vec<TcpStream> = (0..conns)
        .map(|_| listener.accept().expect("accept").0)
        .collect();
    for s in &server {
        s.set_nodelay(true).expect("nodelay");
    }

    let mut ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(4096)
        .expect("ring");
    let reply = [b'r'; MSG];
    let mut bufs: Vec<Vec<u8>> = (0..conns).map(|_| vec![0u8; 8192]).collect();
    let mut read_bufs: Vec<Vec<u8>> = (0..conns).map(|_| Vec::with_capacity(8192)).collect();
    let mut provided = multi.then(|| BufRing::new(&ring));

    let arm = |ring: &mut IoUring, i: usize, bufs: &mut [Vec<u8>]| {
        let fd = types::Fd(server[i].as_raw_fd());
        let e = if multi {
            opcode::RecvMulti::new(fd, 0).build().user_data(i as u64)
        } else {
            let b = &mut bufs[i];
            let mut e = opcode::Recv::new(fd, b.as_mut_ptr(), b.len() as u32)
                .build()
                .user_data(i as u64);
            if mode == "singlepf" {
                poll_first(&mut e);
            }
            e
        };
        push(ring, &e);
    };
    for i in 0..conns {
        arm(&mut ring, i, &mut bufs);
    }

    let warm = total / 10;
    let (mut got, mut cqes, mut rearms) = (0u64, 0u64, 0u64);
    let mut pending = vec![0usize; conns];
    let mut start = None;
    let mut done = Vec::new();
    while got < total + warm {
        ring.submit_and_wait(1).expect("submit_and_wait");
        done.clear();
        done.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &done {
            cqes += 1;
            if ud & SEND_TAG != 0 {
                continue;
            }
            let i = ud as usize;
            if multi && res == -libc::ENOBUFS {
                rearms += 1;
                arm(&mut ring, i, &mut bufs);
                continue;
            }
            assert!(res > 0, "receive on connection {i}: {res}");
            let n = res as usize;
            if let Some(p) = provided.as_mut() {
                let bid = cqueue::buffer_select(flags).expect("a provided buffer");
                read_bufs[i].extend_from_slice(p.buf(bid, n));
                p.give_back(bid);
                if !cqueue::more(flags) {
                    rearms += 1;
                    arm(&mut ring, i, &mut bufs);
                }
            }
            pending[i] += n;
            while pending[i] >= MSG {
                pending[i] -= MSG;
                got += 1;
                if got == warm {
                    start = Some((thread_cpu_ns(), std::time::Instant::now(), cqes));
                }
                let e =
                    opcode::Send::new(types::Fd(server[i].as_raw_fd()), reply.as_ptr(), MSG as u32)
                        .build()
                        .user_data(SEND_TAG | i as u64);
                push(&mut ring, &e);
            }
            if multi {
                read_bufs[i].clear();
            } else {
                arm(&mut ring, i, &mut bufs);
            }
        }
    }
    let (cpu0, t0, cqes0) = start.expect("warmed up");
    let cpu = thread_cpu_ns() - cpu0;
    println!(
        "{mode} connections={conns} messages={total} cpu_ns_per_message={:.0} \
         messages_per_s={:.0} completions_per_message={:.2} rearms={rearms}",
        cpu as f64 / total as f64,
        total as f64 / t0.elapsed().as_secs_f64(),
        (cqes - cqes0) as f64 / total as f64
    );
    // The client thread ends on the closed sockets; exit without waiting for it.
    std::process::exit(0);
}
