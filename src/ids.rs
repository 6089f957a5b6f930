//! Request and completion ids from a per-thread xorshift generator: no lock, no syscall.

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    let local = 0u8;
    // Mix in a stack address so threads started in the same nanosecond still differ.
    let addr = &local as *const u8 as u64;
    splitmix(t ^ addr.rotate_left(32) ^ u64::from(std::process::id()))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A fast, non-cryptographic random u64.
pub fn next_u64() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.set(x);
        splitmix(x)
    })
}

/// A random (version 4 layout) UUID in its 36-character text form, kept inline: a request
/// id costs no allocation and no formatting machinery.
#[derive(Clone, Copy)]
pub struct Uuid([u8; 36]);

impl Uuid {
    pub fn new_v4() -> Self {
        let hi = next_u64();
        let lo = next_u64();
        let hi = (hi & 0xFFFF_FFFF_FFFF_0FFF) | 0x0000_0000_0000_4000;
        let lo = (lo & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
        // 8-4-4-4-12 hex digits: hi's 16, then lo's, most significant first.
        let (h, l) = (hex16(hi), hex16(lo));
        let mut out = [b'-'; 36];
        out[..8].copy_from_slice(&h[..8]);
        out[9..13].copy_from_slice(&h[8..12]);
        out[14..18].copy_from_slice(&h[12..]);
        out[19..23].copy_from_slice(&l[..4]);
        out[24..].copy_from_slice(&l[4..]);
        Uuid(out)
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: `new_v4` writes only ASCII hex digits and dashes: valid UTF-8 (checking
        // it cost more than making the id).
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

/// `x` as 16 lowercase hex digits, most significant first, eight digits at a time in a
/// word (a table lookup per digit cost more than the rest of making an id).
fn hex16(x: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&hex8((x >> 32) as u32).to_be_bytes());
    out[8..].copy_from_slice(&hex8(x as u32).to_be_bytes());
    out
}

/// The 8 hex digits of `x` as the bytes of a word, the most significant digit highest.
fn hex8(x: u32) -> u64 {
    let x = u64::from(x);
    // One nibble per byte: halves, then bytes, then nibbles spread apart.
    let v = ((x & 0xFFFF_0000) << 16) | (x & 0xFFFF);
    let v = ((v & 0x0000_FF00_0000_FF00) << 8) | (v & 0x0000_00FF_0000_00FF);
    let v = ((v & 0x00F0_00F0_00F0_00F0) << 4) | (v & 0x000F_000F_000F_000F);
    // 0x01 in each byte holding 10..=15, which go to `a`..`f`.
    let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    v + 0x3030_3030_3030_3030 + letters * u64::from(b'a' - b'0' - 10)
}

/// A random (version 4 layout) UUID string.
pub fn uuid_v4() -> String {
    Uuid::new_v4().as_str().to_owned()
}

/// 32 hex characters, the shape vLLM uses after `cmpl-` / `chatcmpl-`.
pub fn hex_id() -> String {
    format!("{:016x}{:016x}", next_u64(), next_u64())
}

pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{hex16, next_u64};

    #[test]
    fn hex_digits_are_the_formatter_s() {
        let mut x = 0x0123_4567_89ab_cdefu64;
        for _ in 0..10_000 {
            assert_eq!(std::str::from_utf8(&hex16(x)).unwrap(), format!("{x:016x}"));
            x = next_u64();
        }
        for x in [0, u64::MAX, 0xa0a0_a0a0_9f9f_9f9f] {
            assert_eq!(std::str::from_utf8(&hex16(x)).unwrap(), format!("{x:016x}"));
        }
    }

    #[test]
    fn uuid_shape_and_uniqueness() {
        let a = super::uuid_v4();
        let b = super::uuid_v4();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, b);
        // The layout: 8-4-4-4-12 lower-case hex digits, version 4, variant 10xx.
        for _ in 0..100 {
            let u = super::uuid_v4();
            let groups: Vec<&str> = u.split('-').collect();
            assert_eq!(
                groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(u
                .bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
        }
    }
}
