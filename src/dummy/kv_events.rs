//! The KV-cache events a simulated node emits, as plain data. Encoding them (msgpack, as
//! vLLM's msgspec structs) and sending them (ZeroMQ) is the `xpyd-dummy` binary's job, so the
//! proxy binary, which runs this simulator in `xpyd demo`, links neither (docs/architecture.md).

/// vLLM's `MEDIUM_GPU`.
pub const MEDIUM_GPU: &str = "GPU";

/// One event, field for field vLLM's `BlockStored` / `BlockRemoved` / `AllBlocksCleared`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    BlockStored {
        /// External (64-bit) block hashes, in chain order.
        block_hashes: Vec<u64>,
        /// The hash of the block before the first stored one; None when it is the first.
        parent_block_hash: Option<u64>,
        /// The token ids of all stored blocks, concatenated.
        token_ids: Vec<u32>,
        block_size: usize,
    },
    BlockRemoved {
        block_hashes: Vec<u64>,
    },
    AllBlocksCleared,
}

/// Where a node's events go: one call is one `KVEventBatch`. Called with the scheduler's
/// lock held (that is what orders batches), so it must not block.
pub trait KvEventSink: Send + Sync {
    fn publish(&self, events: Vec<KvEvent>);
}
