//! Every backward op against central finite differences of its forward, on random inputs of
//! several shapes.
//!
//! The ops compute in f32. Each check reduces an op's output to the scalar
//! `L = sum_i out[i] * r[i]` (with fixed random `r`, accumulated in f64), so the analytic
//! gradient of an input is the op's backward applied to `dout = r`. A central difference with
//! step `h` has truncation error `O(h^2 |f'''|)` and a rounding error of about
//! `eps_f32 * sqrt(n) * |out| / h`; with `h = 1e-2`, inputs of order 1 and a few thousand outputs
//! both stay below 1e-3, so the checks use `|fd - an| <= 3e-3 + 2e-2 * |an|`. A wrong backward
//! (a dropped term, a transposed operand) is off by O(1) and fails by orders of magnitude; the
//! largest error seen is printed.

use kernels::attention::{self, AttnDims, AttnDropout};
use kernels::dropout::{self, DropoutSpec, LogicalDims};
use kernels::{crossentropy, embedding, gather, gelu, layernorm, matmul, residual, tanh};
use philox::normal;

fn randn(n: usize, stream: u32, scale: f32) -> Vec<f32> {
    (0..n as u64).map(|i| normal(1234, stream, i) * scale).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum()
}

/// Compares `analytic` with central differences of `loss` around `x` on up to `samples`
/// coordinates spread over the tensor.
fn check(name: &str, x: &[f32], analytic: &[f32], samples: usize, loss: impl Fn(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient shape");
    let h = 1e-2f32;
    let step = (x.len() / samples).max(1);
    let mut worst = 0.0f64;
    let mut xp = x.to_vec();
    for i in (0..x.len()).step_by(step) {
        xp[i] = x[i] + h;
        let up = loss(&xp);
        xp[i] = x[i] - h;
        let down = loss(&xp);
        xp[i] = x[i];
        let fd = (up - down) / (2.0 * f64::from(h));
        let an = f64::from(analytic[i]);
        let err = (fd - an).abs();
        worst = worst.max(err / (3e-3 + 2e-2 * an.abs()));
        assert!(err <= 3e-3 + 2e-2 * an.abs(), "{name}[{i}]: finite difference {fd} vs analytic {an}");
        assert!(an.is_finite(), "{name}[{i}]: analytic gradient is not finite");
    }
    println!("{name}: worst error {worst:.3} of tolerance over {} coordinates", x.len().div_ceil(step));
}

#[test]
fn matmul_gradients() {
    for &(n, c, oc) in &[(3, 5, 4), (17, 33, 9), (64, 48, 70)] {
        let (inp, w, b, r) = (randn(n * c, 1, 1.0), randn(oc * c, 2, 0.5), randn(oc, 3, 1.0), randn(n * oc, 4, 1.0));
        let fwd = |inp: &[f32], w: &[f32], b: &[f32]| {
            let mut out = vec![0.0; n * oc];
            matmul::matmul_forward(&mut out, inp, w, Some(b), n, c, oc);
            dot(&out, &r)
        };
        let (mut di, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; oc * c], vec![0.0; oc]);
        matmul::matmul_backward(&mut di, &mut dw, Some(&mut db), &r, &inp, &w, n, c, oc);
        check("matmul.dinp", &inp, &di, 60, |x| fwd(x, &w, &b));
        check("matmul.dweight", &w, &dw, 60, |x| fwd(&inp, x, &b));
        check("matmul.dbias", &b, &db, 60, |x| fwd(&inp, &w, x));
    }
}

#[test]
fn layernorm_gradients() {
    for &(n, c) in &[(2, 7), (13, 32), (40, 96)] {
        let (inp, w, b, r) = (randn(n * c, 5, 1.5), randn(c, 6, 1.0), randn(c, 7, 1.0), randn(n * c, 8, 1.0));
        let fwd = |inp: &[f32], w: &[f32], b: &[f32]| {
            let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            layernorm::layernorm_forward(&mut out, &mut mean, &mut rstd, inp, w, b, n, c, 1e-5);
            dot(&out, &r)
        };
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm::layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, n, c, 1e-5);
        let (mut di, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        layernorm::layernorm_backward(&mut di, &mut dw, &mut db, &r, &inp, &w, &mean, &rstd, n, c);
        check("layernorm.dinp", &inp, &di, 80, |x| fwd(x, &w, &b));
        check("layernorm.dweight", &w, &dw, 80, |x| fwd(&inp, x, &b));
        check("layernorm.dbias", &b, &db, 80, |x| fwd(&inp, &w, x));
    }
}

#[test]
fn gelu_tanh_residual_gradients() {
    for &n in &[5, 300, 4099] {
        let (x, y, r) = (randn(n, 9, 2.0), randn(n, 10, 1.0), randn(n, 11, 1.0));
        let gelu_loss = |x: &[f32]| {
            let mut o = vec![0.0; n];
            gelu::gelu_forward(&mut o, x);
            dot(&o, &r)
        };
        let mut dx = vec![0.0; n];
        gelu::gelu_backward(&mut dx, &x, &r);
        check("gelu", &x, &dx, 100, gelu_loss);

        let tanh_loss = |x: &[f32]| {
            let mut o = vec![0.0; n];
            tanh::tanh_forward(&mut o, x);
            dot(&o, &r)
        };
        let mut o = vec![0.0; n];
        tanh::tanh_forward(&mut o, &x);
        let mut dx = vec![0.0; n];
        tanh::tanh_backward(&mut dx, &o, &r);
        check("tanh", &x, &dx, 100, tanh_loss);

        let res_loss = |a: &[f32], b: &[f32]| {
            let mut o = vec![0.0; n];
            residual::residual_forward(&mut o, a, b);
            dot(&o, &r)
        };
        let (mut da, mut db) = (vec![0.0; n], vec![0.0; n]);
        residual::residual_backward(&mut da, &mut db, &r);
        check("residual.da", &x, &da, 50, |a| res_loss(a, &y));
        check("residual.db", &y, &db, 50, |b| res_loss(&x, b));
    }
}

#[test]
fn gelu_is_the_exact_erf_form() {
    // Values of x * Phi(x) computed in high precision.
    for &(x, want) in &[
        (1.0f64, 0.841_344_746_068_543f64),
        (-1.0, -0.158_655_253_931_457),
        (0.5, 0.345_731_363_037_909),
        (-3.0, -0.004_049_694_245_808),
    ] {
        let got = f64::from(gelu::gelu(x as f32));
        assert!((got - want).abs() < 1e-6, "gelu({x}) = {got}, want {want}");
    }
}

#[test]
fn embedding_gradients() {
    let (b, t, c, v, p, tt) = (3, 5, 8, 11, 7, 2);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % v) as u32).collect();
    let types: Vec<u32> = (0..b * t).map(|i| (i % 3 == 0) as u32).collect();
    // The second row packs two documents: positions 0, 1, 2, then 0, 1.
    let pos: Vec<u32> = (0..b * t).map(|i| if i / t == 1 && i % t >= 3 { i % t - 3 } else { i % t } as u32).collect();
    let (wte, wpe, wtt, r) =
        (randn(v * c, 12, 1.0), randn(p * c, 13, 1.0), randn(tt * c, 14, 1.0), randn(b * t * c, 15, 1.0));
    let fwd = |wte: &[f32], wpe: &[f32], wtt: &[f32]| {
        let mut out = vec![0.0; b * t * c];
        embedding::embedding_forward(&mut out, &ids, &types, &pos, wte, wpe, wtt, b, t, c);
        dot(&out, &r)
    };
    let (mut dte, mut dpe, mut dtt) = (vec![0.0; v * c], vec![0.0; p * c], vec![0.0; tt * c]);
    embedding::embedding_backward(&mut dte, &mut dpe, &mut dtt, &r, &ids, &types, &pos, None, b, t, c);
    check("embedding.dwte", &wte, &dte, 88, |x| fwd(x, &wpe, &wtt));
    check("embedding.dwpe", &wpe, &dpe, 56, |x| fwd(&wte, x, &wtt));
    check("embedding.dwtt", &wtt, &dtt, 16, |x| fwd(&wte, &wpe, x));
    // With a padding index, that row gets nothing even though it is used.
    let pad = ids[4];
    let mut dte_pad = vec![0.0; v * c];
    embedding::embedding_backward(&mut dte_pad, &mut dpe, &mut dtt, &r, &ids, &types, &pos, Some(pad), b, t, c);
    let pad = pad as usize;
    assert!(dte_pad[pad * c..(pad + 1) * c].iter().all(|&g| g == 0.0));
    assert!(dte[pad * c..(pad + 1) * c].iter().any(|&g| g != 0.0));
}

#[test]
fn crossentropy_gradients_with_ignored_rows() {
    let (n, v) = (6, 9);
    let logits = randn(n * v, 16, 2.0);
    let targets = [3i64, -100, 0, 8, -100, 5];
    let fwd = |z: &[f32]| {
        let mut losses = vec![0.0; n];
        let count = crossentropy::crossentropy_forward(&mut losses, z, &targets, n, v);
        losses.iter().map(|&l| f64::from(l)).sum::<f64>() / count as f64
    };
    let mut dz = vec![0.0; n * v];
    crossentropy::crossentropy_backward(&mut dz, &logits, &targets, 1.0 / 4.0, n, v);
    check("crossentropy.dlogits", &logits, &dz, n * v, fwd);
    assert!(dz[v..2 * v].iter().all(|&g| g == 0.0), "ignored row got a gradient");
    // The loss of a row is -log softmax at its target.
    let mut losses = vec![0.0; n];
    crossentropy::crossentropy_forward(&mut losses, &logits, &targets, n, v);
    let z = &logits[..v];
    let lse = z.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
    assert!((f64::from(losses[0]) - (lse - f64::from(z[3]))).abs() < 1e-5);
}

/// `segments`: `[B, T]` segment ids, or empty.
fn attention_case(d: AttnDims, valid: &[usize], p_drop: f32, segments: &[u32]) {
    let n = d.b * d.nh * d.t * d.hd;
    let (q, k, v, r) = (randn(n, 17, 1.0), randn(n, 18, 1.0), randn(n, 19, 1.0), randn(n, 20, 1.0));
    let mut mask = vec![0.0f32; d.b * d.t];
    for b in 0..d.b {
        for t in valid[b]..d.t {
            mask[b * d.t + t] = f32::MIN;
        }
    }
    let ids: Vec<u32> = (0..d.b as u32).map(|i| 100 + 3 * i).collect();
    let dr = AttnDropout {
        spec: DropoutSpec { p: p_drop, seed: 5, step: 2, site: 7 },
        example_ids: &ids,
        logical: LogicalDims { t_max: 32, w_max: 32 },
    };
    let pp = d.b * d.nh * d.t * d.t;
    let drop_len = if p_drop > 0.0 { pp } else { 0 };
    let fwd = |q: &[f32], k: &[f32], v: &[f32]| {
        let (mut out, mut probs, mut pd) = (vec![0.0; n], vec![0.0; pp], vec![0.0; drop_len]);
        let m = attention::Mask { add: &mask, segments };
        attention::attention_forward(&mut out, &mut probs, &mut pd, q, k, v, m, d, Some(&dr));
        dot(&out, &r)
    };
    let (mut out, mut probs, mut pd) = (vec![0.0; n], vec![0.0; pp], vec![0.0; drop_len]);
    let m = attention::Mask { add: &mask, segments };
    attention::attention_forward(&mut out, &mut probs, &mut pd, &q, &k, &v, m, d, Some(&dr));
    // Padded keys, and keys of another segment, get exactly zero weight.
    for b in 0..d.b {
        for (r, row) in probs[b * d.nh * d.t * d.t..(b + 1) * d.nh * d.t * d.t].chunks(d.t).enumerate() {
            assert!(row[valid[b]..].iter().all(|&x| x == 0.0));
            if !segments.is_empty() {
                let seg = |j: usize| segments[b * d.t + j];
                assert!((0..d.t).all(|j| seg(j) == seg(r % d.t) || row[j] == 0.0), "a key of another segment");
            }
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }
    let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    attention::attention_backward(&mut dq, &mut dk, &mut dv, &r, &probs, &pd, &q, &k, &v, d, Some(&dr));
    let tag = format!("attention(b{} nh{} t{} hd{} p{p_drop})", d.b, d.nh, d.t, d.hd);
    check(&format!("{tag}.dq"), &q, &dq, 80, |x| fwd(x, &k, &v));
    check(&format!("{tag}.dk"), &k, &dk, 80, |x| fwd(&q, x, &v));
    check(&format!("{tag}.dv"), &v, &dv, 80, |x| fwd(&q, &k, x));
}

#[test]
fn attention_gradients_with_padding_and_dropout() {
    attention_case(AttnDims { b: 1, nh: 1, t: 4, hd: 3 }, &[4], 0.0, &[]);
    attention_case(AttnDims { b: 2, nh: 3, t: 7, hd: 4 }, &[7, 3], 0.0, &[]);
    attention_case(AttnDims { b: 3, nh: 2, t: 16, hd: 8 }, &[16, 9, 1], 0.0, &[]);
    attention_case(AttnDims { b: 2, nh: 3, t: 7, hd: 4 }, &[5, 7], 0.3, &[]);
    attention_case(AttnDims { b: 3, nh: 2, t: 16, hd: 8 }, &[2, 16, 11], 0.1, &[]);
}

#[test]
fn attention_gradients_with_packed_segments() {
    // Row 0: documents of 3 and 4 tokens; row 1: 2, 2, then padding (in the last segment).
    let segs = [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1];
    attention_case(AttnDims { b: 2, nh: 2, t: 7, hd: 4 }, &[7, 4], 0.0, &segs);
    attention_case(AttnDims { b: 2, nh: 2, t: 7, hd: 4 }, &[7, 4], 0.2, &segs);
}

#[test]
fn head_permutes_and_gather_are_adjoint() {
    let d = AttnDims { b: 2, nh: 3, t: 5, hd: 4 };
    let n = d.b * d.nh * d.t * d.hd;
    let (x, r) = (randn(n, 21, 1.0), randn(n, 22, 1.0));
    let split_loss = |x: &[f32]| {
        let mut o = vec![0.0; n];
        attention::split_heads(&mut o, x, d);
        dot(&o, &r)
    };
    let mut dx = vec![0.0; n];
    attention::split_heads_backward(&mut dx, &r, d);
    check("split_heads", &x, &dx, n, split_loss);
    let merge_loss = |x: &[f32]| {
        let mut o = vec![0.0; n];
        attention::merge_heads(&mut o, x, d);
        dot(&o, &r)
    };
    let mut dx = vec![0.0; n];
    attention::merge_heads_backward(&mut dx, &r, d);
    check("merge_heads", &x, &dx, n, merge_loss);
    // merge undoes split.
    let (mut s, mut m) = (vec![0.0; n], vec![0.0; n]);
    attention::split_heads(&mut s, &x, d);
    attention::merge_heads(&mut m, &s, d);
    assert_eq!(m, x);

    let (rows, c) = ([4usize, 0, 4, 2], 6);
    let (inp, r) = (randn(5 * c, 23, 1.0), randn(rows.len() * c, 24, 1.0));
    let gather_loss = |x: &[f32]| {
        let mut o = vec![0.0; rows.len() * c];
        gather::gather_rows_forward(&mut o, x, &rows, c);
        dot(&o, &r)
    };
    let mut dx = vec![0.0; 5 * c];
    gather::gather_rows_backward(&mut dx, &r, &rows, c);
    check("gather_rows", &inp, &dx, 30, gather_loss);
}

#[test]
fn dropout_backward_is_its_own_mask() {
    let (b, t, w) = (3, 6, 10);
    let spec = DropoutSpec { p: 0.25, seed: 77, step: 4, site: 3 };
    let logical = LogicalDims { t_max: 64, w_max: w };
    let ids = [9u32, 2, 40];
    let (x, r) = (randn(b * t * w, 25, 1.0), randn(b * t * w, 26, 1.0));
    let loss = |x: &[f32]| {
        let mut o = x.to_vec();
        dropout::dropout_forward(&mut o, &ids, 1, t, w, logical, &spec);
        dot(&o, &r)
    };
    let mut dx = r.clone();
    dropout::dropout_backward(&mut dx, &ids, 1, t, w, logical, &spec);
    check("dropout", &x, &dx, b * t * w, loss);
}
