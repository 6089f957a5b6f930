//! A stable hash shared by the scheduling policies (hash rings, prefix blocks) and the
//! KV-event index: below both, so that neither imports the other for it.

/// A fast, well-mixed 64-bit hash: eight bytes per multiply, then a murmur finaliser;
/// stable across runs so that hash rings and prefix hashes are reproducible.
#[inline]
pub fn hash64(seed: u64, data: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(K) ^ data.len() as u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        h = (h ^ v).wrapping_mul(K).rotate_left(31);
    }
    for &b in words.remainder() {
        h = (h ^ b as u64).wrapping_mul(K).rotate_left(31);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}
