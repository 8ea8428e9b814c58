//! Deterministic test data shared by unit tests, integration tests and
//! benchmarks. Not part of the storage API.

/// `len` pseudo-random bytes from xorshift64*, fixed forever for a seed:
/// the golden cut-point test depends on this exact stream. Beware: the
/// seed's lowest bit is forced on, so seeds 2n and 2n+1 give the same bytes
/// (a test once compared two "different" files that were identical).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}
