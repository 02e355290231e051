//! Reductions along a row in a fixed order of 16 lanes, so that they vectorize without
//! fast-math and give the same bits on every CPU.
//!
//! A plain `iter().sum()` over `f32` is one chain of dependent adds: the compiler may not
//! reorder it, so it runs one element per add latency. Here element `i` goes to lane
//! `i % 16`, and the lanes are combined by a fixed halving tree at the end. The order is in
//! the source, not chosen by the compiler, so an AVX-512 build (one register), an AVX2 build
//! (two) and a scalar build all round the same way. Callers compile them for each SIMD level
//! through `#[multiversion]` (they are `inline(always)`).

/// Lanes per accumulator: one AVX-512 register of f32, two AVX2 ones.
pub const LANES: usize = 16;

/// The lanes' total, by a fixed halving tree.
#[inline(always)]
pub fn fold(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// `sum_i f(a[i])`.
#[inline(always)]
pub fn sum_map(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = a.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        acc[l] += f(x);
    }
    fold(acc)
}

/// `sum_i a[i]`.
#[inline(always)]
pub fn sum(a: &[f32]) -> f32 {
    sum_map(a, |x| x)
}

/// `sum_i a[i] * b[i]`.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    let mut acc = [0.0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (&x, &y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += x * y;
    }
    fold(acc)
}

/// `max_i a[i]` (`-inf` when empty); `max` is exact, so only speed depends on the order.
#[inline(always)]
pub fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = a.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        acc[l] = acc[l].max(x);
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_sums_are_the_fixed_order_and_close_to_f64() {
        for n in [0, 1, 15, 16, 17, 100, 384, 1000] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 11 % 89) as f32 - 44.0) * 0.021).collect();
            // The same order written out: lane i % 16, then the halving tree.
            let mut lanes = [0.0f32; LANES];
            for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
                lanes[i % LANES] += x * y;
            }
            for w in [8, 4, 2, 1] {
                for l in 0..w {
                    lanes[l] += lanes[l + w];
                }
            }
            assert_eq!(dot(&a, &b).to_bits(), lanes[0].to_bits(), "n = {n}");
            let exact: f64 = a.iter().map(|&x| f64::from(x)).sum();
            assert!((f64::from(sum(&a)) - exact).abs() < 1e-4, "n = {n}");
            let m = a.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(max(&a), m, "n = {n}");
        }
    }
}
