//! Residual connections: `out = a + b`; backward sends `dout` to both inputs.

use multiversion::multiversion;
use rayon::prelude::*;

const CHUNK: usize = 4096;

/// `out[i] = a[i] + b[i]`.
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    assert!(out.len() == a.len() && a.len() == b.len(), "residual_forward: shapes differ");
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| sum_run(o, a, b));
}

#[multiversion(targets = "simd")]
fn sum_run(out: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

/// `da[i] += dout[i]`, `db[i] += dout[i]`.
pub fn residual_backward(da: &mut [f32], db: &mut [f32], dout: &[f32]) {
    add_inplace(da, dout);
    add_inplace(db, dout);
}

/// `acc[i] += x[i]`.
pub fn add_inplace(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len(), "add_inplace: shapes differ");
    acc.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(a, x)| add_run(a, x));
}

/// `acc[i] += x[i]` on one run, compiled for each SIMD level.
#[multiversion(targets = "simd")]
fn add_run(acc: &mut [f32], x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}
