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

/// A hasher for the request path's small in-process maps (pooled connections by address,
/// per-instance counters by id, admission gates by model name): a multiply and a rotate per
/// word, where the standard SipHash cost ~150 instructions per lookup. Not DoS-resistant —
/// only for keys the configuration decides, never for keys a client sends.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

/// `HashMap<K, V, FastHash>`: see `FastHasher`.
pub type FastHash = std::hash::BuildHasherDefault<FastHasher>;

impl std::hash::Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            self.write_u64(v);
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(last) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    #[inline]
    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }

    #[inline]
    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }

    #[inline]
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    #[inline]
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // hashbrown takes its control bits from the top: fold the low bits up.
        self.0 ^ (self.0 >> 29).rotate_left(32)
    }
}

#[cfg(test)]
mod tests {
    use super::FastHash;
    use std::collections::HashMap;
    use std::hash::BuildHasher;

    #[test]
    fn fast_hash_separates_addresses_and_names() {
        let b = FastHash::default();
        let addrs: Vec<std::net::SocketAddr> = (8000..8064)
            .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
            .collect();
        let hashes: std::collections::HashSet<u64> = addrs.iter().map(|a| b.hash_one(a)).collect();
        assert_eq!(hashes.len(), addrs.len());
        assert_ne!(b.hash_one("model-a"), b.hash_one("model-b"));
        assert_ne!(b.hash_one("ab"), b.hash_one("ab\0"));
        let mut m: HashMap<String, usize, FastHash> = HashMap::default();
        for i in 0..1000 {
            m.insert(format!("m{i}"), i);
        }
        assert!((0..1000).all(|i| m[&format!("m{i}")] == i));
    }
}
