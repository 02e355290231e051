//! The bf16 product against an f64 reference of the same bf16-rounded operands, on shapes that
//! leave partial tiles, odd inner sizes and every stride layout the dense layers use.
//!
//! With the operands rounded identically, the only difference left is f32 accumulation in
//! pairs against f64: for `k` terms of size `|a||b|` about `k * 2^-24 * sum |a_i b_i|`, so the
//! check is `|got - ref| <= 1e-6 * (sum_i |a_i b_i| + 1)` per element. A wrong pairing, a lost
//! tail or a transposed pack is off by O(1). Run only where the CPU has AVX512_BF16 (each test
//! prints that it was skipped elsewhere).

use kernels::bf16::{gemm_bf16, supported, to_bf16_bits};
use kernels::matmul::Mat;
use philox::normal;

fn skip(name: &str) -> bool {
    if supported() {
        return false;
    }
    println!("{name}: skipped: this CPU has no AVX512_BF16");
    true
}

fn randn(n: usize, stream: u32) -> Vec<f32> {
    (0..n as u64).map(|i| normal(99, stream, i)).collect()
}

fn bf(x: f32) -> f64 {
    f64::from(half::bf16::from_bits(to_bf16_bits(x)).to_f32())
}

#[test]
fn rounding_is_to_nearest_even_like_half() {
    // Every exponent and the bits around the rounding point, plus the specials.
    let mut checked = 0;
    for hi in (0u32..=0xffff).step_by(7) {
        for lo in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x4000, 0xc000] {
            let x = f32::from_bits(hi << 16 | lo);
            let want = half::bf16::from_f32(x).to_bits();
            let got = to_bf16_bits(x);
            if x.is_nan() {
                assert!(half::bf16::from_bits(got).is_nan(), "{x:?} ({:#x}) lost its NaN", x.to_bits());
            } else {
                assert_eq!(got, want, "{x:e} ({:#x})", x.to_bits());
            }
            checked += 1;
        }
    }
    assert!(checked > 70_000);
}

/// `m x n x k` with `lhs` and `rhs` in the given layouts (`true`: the inner index is the
/// contiguous one), checked against the reference, and the single-threaded result against the
/// threaded one bit for bit.
fn check(m: usize, n: usize, k: usize, lhs_inner: bool, rhs_inner: bool, scale: f32, accumulate: bool) {
    let a = randn(m * k, 1);
    let b = randn(k * n, 2);
    let at = |i: usize, p: usize| if lhs_inner { a[i * k + p] } else { a[p * m + i] };
    let bt = |p: usize, j: usize| if rhs_inner { b[j * k + p] } else { b[p * n + j] };
    let lhs = if lhs_inner { Mat { data: &a, rs: k, cs: 1 } } else { Mat { data: &a, rs: 1, cs: m } };
    let rhs = if rhs_inner { Mat { data: &b, rs: 1, cs: k } } else { Mat { data: &b, rs: n, cs: 1 } };
    let init = randn(m * n, 3);
    let mut got = init.clone();
    gemm_bf16(&mut got, m, n, k, lhs, rhs, scale, accumulate, None, true);
    let mut single = init.clone();
    gemm_bf16(&mut single, m, n, k, lhs, rhs, scale, accumulate, None, false);
    assert!(got.iter().zip(&single).all(|(x, y)| x.to_bits() == y.to_bits()), "threads changed the bits");
    let mut worst = 0.0f64;
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut mag) = (0.0f64, 0.0f64);
            for p in 0..k {
                let t = bf(at(i, p)) * bf(bt(p, j));
                s += t;
                mag += t.abs();
            }
            let want = f64::from(scale) * s + if accumulate { f64::from(init[i * n + j]) } else { 0.0 };
            let err = (f64::from(got[i * n + j]) - want).abs() / (1e-6 * (f64::from(scale.abs()) * mag + 1.0));
            worst = worst.max(err);
        }
    }
    println!("{m}x{n}x{k} lhs_inner={lhs_inner} rhs_inner={rhs_inner}: worst {worst:.3} of the tolerance");
    assert!(worst <= 1.0, "{m}x{n}x{k}: {worst} x the tolerance");
}

#[test]
fn products_match_the_reference_in_every_layout() {
    if skip("products_match_the_reference_in_every_layout") {
        return;
    }
    for (m, n, k) in [(1, 1, 1), (7, 5, 3), (8, 48, 2), (9, 49, 17), (37, 100, 385), (60, 1600, 1030)] {
        for (li, ri) in [(true, true), (true, false), (false, false), (false, true)] {
            check(m, n, k, li, ri, 1.0, false);
        }
    }
    check(33, 70, 45, true, true, 0.5, true);
    check(300, 20, 9, false, false, -2.0, true);
}

#[test]
fn empty_inner_dimension_zeroes_or_keeps() {
    if skip("empty_inner_dimension_zeroes_or_keeps") {
        return;
    }
    let mut dst = vec![1.0f32; 6];
    let e: [f32; 0] = [];
    gemm_bf16(&mut dst, 2, 3, 0, Mat { data: &e, rs: 0, cs: 1 }, Mat { data: &e, rs: 3, cs: 1 }, 1.0, true, None, true);
    assert_eq!(dst, vec![1.0; 6]);
    gemm_bf16(
        &mut dst,
        2,
        3,
        0,
        Mat { data: &e, rs: 0, cs: 1 },
        Mat { data: &e, rs: 3, cs: 1 },
        1.0,
        false,
        None,
        true,
    );
    assert_eq!(dst, vec![0.0; 6]);
}

#[test]
fn a_bias_added_at_the_store_has_the_bits_of_accumulating_onto_bias_rows() {
    if skip("a_bias_added_at_the_store_has_the_bits_of_accumulating_onto_bias_rows") {
        return;
    }
    // Partial tiles, several inner blocks (k > 512), several column blocks (n > 1536), k = 0.
    for (m, n, k) in [(1, 1, 1), (9, 49, 17), (37, 100, 1100), (20, 1700, 40), (3, 5, 0)] {
        let (a, b, bias) = (randn(m * k, 4), randn(k * n, 5), randn(n, 6));
        let lhs = Mat { data: &a, rs: k, cs: 1 };
        let rhs = Mat { data: &b, rs: 1, cs: k };
        let mut want: Vec<f32> = (0..m).flat_map(|_| bias.iter().copied()).collect();
        gemm_bf16(&mut want, m, n, k, lhs, rhs, 1.0, true, None, true);
        for threaded in [true, false] {
            let mut got = vec![f32::NAN; m * n];
            gemm_bf16(&mut got, m, n, k, lhs, rhs, 1.0, false, Some(&bias), threaded);
            assert!(
                got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{m}x{n}x{k} threaded={threaded}: the bias changed the bits"
            );
        }
    }
}
