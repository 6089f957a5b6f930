//! vLLM's prefix-cache block hash, reproduced byte for byte (docs/cli.md, "Block hashes").
//!
//! vLLM (default `--prefix-caching-hash-algo sha256`) hashes block k as
//! `sha256(pickle.dumps((parent, tuple(token_ids), None), protocol=5))`, where `parent` is
//! block k-1's 32-byte digest, or for block 0 `NONE_HASH = sha256(pickle.dumps(seed))`, the
//! seed being `$PYTHONHASHSEED` or, when unset, vLLM's fixed default `"vllm-none-hash"`.
//! KV events carry the low 64 bits of each digest (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`,
//! vLLM's default): `int.from_bytes(digest, "big") & (2**64 - 1)`.
//! The pickle is written by hand here: its opcodes for bytes, small tuples of ints, None
//! and short strings are fixed by CPython's C pickler, which the tests check against.

use sha2::{Digest, Sha256};

/// A block's full SHA-256 digest (the key of the simulated cache).
pub type BlockHash = [u8; 32];

/// vLLM's seed for `NONE_HASH` when `PYTHONHASHSEED` is unset.
pub const DEFAULT_SEED: &str = "vllm-none-hash";

/// The hash the first block chains from.
pub fn none_hash(seed: &str) -> BlockHash {
    let s = seed.as_bytes();
    let mut body = Vec::with_capacity(s.len() + 8);
    if s.len() < 256 {
        body.push(0x8c); // SHORT_BINUNICODE
        body.push(s.len() as u8);
    } else {
        body.push(0x8d); // BINUNICODE8
        body.extend_from_slice(&(s.len() as u64).to_le_bytes());
    }
    body.extend_from_slice(s);
    body.push(0x94); // MEMOIZE
    sha256_of_pickle(&body)
}

/// Hash of one full block, chained from its parent's.
pub fn hash_block(parent: &BlockHash, tokens: &[u32]) -> BlockHash {
    let mut body = Vec::with_capacity(40 + tokens.len() * 5);
    body.extend_from_slice(&[0x43, 32]); // SHORT_BINBYTES, len 32
    body.extend_from_slice(parent);
    body.push(0x94); // MEMOIZE
    match tokens.len() {
        0 => body.push(b')'), // EMPTY_TUPLE (not memoized)
        n @ 1..=3 => {
            tokens.iter().for_each(|&t| pickle_int(&mut body, t as u64));
            body.push(0x84 + n as u8); // TUPLE1..TUPLE3
            body.push(0x94);
        }
        _ => {
            body.push(b'('); // MARK
            tokens.iter().for_each(|&t| pickle_int(&mut body, t as u64));
            body.push(b't'); // TUPLE
            body.push(0x94);
        }
    }
    body.push(b'N'); // extra_keys = None
    body.push(0x87); // TUPLE3
    body.push(0x94);
    sha256_of_pickle(&body)
}

/// The hashes of every full block of `tokens`, chained from `none_hash`.
pub fn prompt_block_hashes(none: &BlockHash, tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut parent = *none;
    tokens
        .chunks_exact(block_size.max(1))
        .map(|chunk| {
            parent = hash_block(&parent, chunk);
            parent
        })
        .collect()
}

/// The value published in KV events: the digest's low 64 bits, read big-endian.
pub fn external(h: &BlockHash) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[24..]);
    u64::from_be_bytes(b)
}

fn pickle_int(out: &mut Vec<u8>, v: u64) {
    if v <= 0xff {
        out.extend_from_slice(&[b'K', v as u8]); // BININT1
    } else if v <= 0xffff {
        out.push(b'M'); // BININT2
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if v <= 0x7fff_ffff {
        out.push(b'J'); // BININT (signed 32-bit)
        out.extend_from_slice(&(v as u32).to_le_bytes());
    } else {
        // LONG1: little-endian two's complement, shortest form, with a sign byte if needed.
        let mut bytes = v.to_le_bytes().to_vec();
        while bytes.len() > 1 && bytes[bytes.len() - 1] == 0 && bytes[bytes.len() - 2] < 0x80 {
            bytes.pop();
        }
        if bytes[bytes.len() - 1] >= 0x80 {
            bytes.push(0);
        }
        out.extend_from_slice(&[0x8a, bytes.len() as u8]);
        out.extend_from_slice(&bytes);
    }
}

/// `\x80\x05` (PROTO 5), one FRAME holding `body` and STOP, then SHA-256 of the whole.
fn sha256_of_pickle(body: &[u8]) -> BlockHash {
    let frame_len = body.len() as u64 + 1;
    let mut h = Sha256::new();
    h.update([0x80, 0x05, 0x95]);
    h.update(frame_len.to_le_bytes());
    h.update(body);
    h.update([b'.']);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pickle(body: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80, 0x05, 0x95];
        v.extend_from_slice(&(body.len() as u64 + 1).to_le_bytes());
        v.extend_from_slice(body);
        v.push(b'.');
        v
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    // Bytes produced by CPython 3.11's pickle.dumps(..., protocol=5) for the same values.
    #[test]
    fn pickle_matches_cpython() {
        let mut body = vec![0x8c, 14];
        body.extend_from_slice(b"vllm-none-hash");
        body.push(0x94);
        assert_eq!(
            hex(&pickle(&body)),
            "80059512000000000000008c0e766c6c6d2d6e6f6e652d68617368942e"
        );
        let mut b = Vec::new();
        for v in [1u64, 2, 300, 70000, 1 << 31] {
            pickle_int(&mut b, v);
        }
        assert_eq!(hex(&b), "4b014b024d2c014a701101008a050000008000");
    }

    #[test]
    fn chain_and_external() {
        let none = none_hash(DEFAULT_SEED);
        let toks: Vec<u32> = (0..40).collect();
        let hs = prompt_block_hashes(&none, &toks, 16);
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[0], hash_block(&none, &toks[..16]));
        assert_eq!(hs[1], hash_block(&hs[0], &toks[16..32]));
        assert_eq!(external(&hs[0]) as u8, hs[0][31]);
    }
}
