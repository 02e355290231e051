//! Philox4x32-10, the counter-based random number generator of Salmon et al., "Parallel random
//! numbers: as easy as 1, 2, 3" (SC'11), as used by cuRAND and PyTorch's CUDA generator.
//!
//! A counter-based generator has no state to carry: the output is a pure function of a 128-bit
//! counter and a 64-bit key. Dropout uses that to make every mask a function of
//! (seed, step, example, element) alone, so any worker on any backend draws the same bits.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

/// Ten rounds of Philox4x32 on `counter` under `key`. Matches the Random123 known-answer tests.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Maps 32 random bits to a float uniform in `[0, 1)` with 24 bits of precision (exact in f32).
#[inline]
pub fn u32_to_unit_f32(x: u32) -> f32 {
    (x >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Splits a 64-bit seed into the two key words.
#[inline]
pub fn key_from_seed(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// A standard normal sample from a Box-Muller transform over one Philox draw: a pure function of
/// (seed, stream, index). Used for weight initialisation.
pub fn normal(seed: u64, stream: u32, index: u64) -> f32 {
    let r = philox4x32_10([(index >> 1) as u32, (index >> 33) as u32, stream, 0x4e4f_524d], key_from_seed(seed));
    // u1 in (0, 1] so that ln(u1) is finite.
    let u1 = (f64::from(r[0] >> 8) + 1.0) / 16_777_216.0;
    let u2 = f64::from(r[1] >> 8) / 16_777_216.0;
    let radius = (-2.0 * u1.ln()).sqrt();
    let angle = 2.0 * std::f64::consts::PI * u2;
    let z = if index & 1 == 0 { radius * angle.cos() } else { radius * angle.sin() };
    z as f32
}

/// A permutation of `0..n` that is a pure function of (seed, stream): a Fisher-Yates shuffle
/// whose swap at position `i` draws from Philox counter `(i, stream, "SHUF", 0)`. Training uses
/// `stream = epoch`, so every process derives the same epoch order from the job's seed.
pub fn permutation(n: usize, seed: u64, stream: u32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let key = key_from_seed(seed);
    for i in (1..n).rev() {
        let r = philox4x32_10([i as u32, stream, 0x5348_5546, 0], key);
        let x = (u64::from(r[0]) << 32) | u64::from(r[1]);
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors from Random123's kat_vectors for philox4x32_10.
    #[test]
    fn known_answers() {
        assert_eq!(philox4x32_10([0, 0, 0, 0], [0, 0]), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]);
        assert_eq!(
            philox4x32_10([0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344], [0xa409_3822, 0x299f_31d0]),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn permutation_is_a_seeded_permutation() {
        let a = permutation(1000, 1, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, permutation(1000, 1, 0));
        assert_ne!(a, permutation(1000, 1, 1));
        assert_ne!(a, permutation(1000, 2, 0));
        assert!(permutation(0, 1, 0).is_empty());
    }

    #[test]
    fn normal_has_unit_moments() {
        let n = 200_000u64;
        let (mut s, mut s2) = (0.0f64, 0.0f64);
        for i in 0..n {
            let z = f64::from(normal(7, 3, i));
            s += z;
            s2 += z * z;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }
}
