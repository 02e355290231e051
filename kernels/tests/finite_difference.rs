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

use kernels::attention::{self, AttnDropout, HeadDims};
use kernels::dropout::{self, DropoutSpec, LogicalDims};
use kernels::seqs::SeqsBuf;
use kernels::{crossentropy, embedding, gather, gelu, layernorm, matmul, residual, tanh};
use philox::normal;

fn randn(n: usize, stream: u32, scale: f32) -> Vec<f32> {
    (0..n as u64).map(|i| normal(1234, stream, i) * scale).collect()
}

/// The buffer an op's input gradient goes to: NaN, so that a backward that adds to it instead
/// of writing it whole fails its check.
fn unwritten(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum()
}

/// Compares `analytic` with central differences of `loss` around `x` on up to `samples`
/// coordinates spread over the tensor.
fn check(name: &str, x: &[f32], analytic: &[f32], samples: usize, loss: impl Fn(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient shape");
    assert!(analytic.iter().all(|g| g.is_finite()), "{name}: a gradient entry is not finite (or was never written)");
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
            matmul::matmul_forward(matmul::Operands::F32, &mut out, inp, w, Some(b), n, c, oc);
            dot(&out, &r)
        };
        let (mut di, mut dw, mut db) = (unwritten(n * c), vec![0.0; oc * c], vec![0.0; oc]);
        matmul::matmul_backward(matmul::Operands::F32, &mut di, &mut dw, Some(&mut db), &r, &inp, &w, n, c, oc, false);
        check("matmul.dinp", &inp, &di, 60, |x| fwd(x, &w, &b));
        // With `accumulate`, the same gradient added to what is there (a residual's share).
        let base = randn(n * c, 5, 1.0);
        let (mut acc, mut dw2) = (base.clone(), vec![0.0; oc * c]);
        matmul::matmul_backward(matmul::Operands::F32, &mut acc, &mut dw2, None, &r, &inp, &w, n, c, oc, true);
        let sum: Vec<f32> = base.iter().zip(&di).map(|(a, g)| a + g).collect();
        assert_eq!(acc, sum, "matmul.dinp with accumulate");
        assert_eq!(dw2, dw, "matmul.dweight without a bias");
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
        let (mut di, mut dw, mut db) = (unwritten(n * c), vec![0.0; c], vec![0.0; c]);
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
            gelu::gelu_forward(&mut o, &mut x.to_vec());
            dot(&o, &r)
        };
        let (mut o, mut deriv) = (vec![0.0; n], x.clone());
        gelu::gelu_forward(&mut o, &mut deriv);
        let mut dx = unwritten(n);
        gelu::gelu_backward(&mut dx, &deriv, &r);
        check("gelu", &x, &dx, 100, gelu_loss);

        let tanh_loss = |x: &[f32]| {
            let mut o = vec![0.0; n];
            tanh::tanh_forward(&mut o, x);
            dot(&o, &r)
        };
        let mut o = vec![0.0; n];
        tanh::tanh_forward(&mut o, &x);
        let mut dx = unwritten(n);
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
    let mut dz = unwritten(n * v);
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

/// Attention's gradients by finite differences over `seqs` (a padded batch when `mask` marks
/// padding), `segments`: `[N]` segment ids, or empty.
fn attention_case(d: HeadDims, seqs: &SeqsBuf, mask: &[f32], p_drop: f32, segments: &[u32]) {
    let sv = seqs.view();
    let n = sv.tokens() * d.nh * d.hd;
    let (q, k, v, r) = (randn(n, 17, 1.0), randn(n, 18, 1.0), randn(n, 19, 1.0), randn(n, 20, 1.0));
    let dr = AttnDropout {
        spec: DropoutSpec { p: p_drop, seed: 5, step: 2, site: 7 },
        logical: LogicalDims { t_max: 32, w_max: 32 },
    };
    let pp = sv.probs_len(d.nh);
    let drop_len = if p_drop > 0.0 { pp } else { 0 };
    let fwd = |q: &[f32], k: &[f32], v: &[f32]| {
        let (mut out, mut probs, mut pd) = (vec![0.0; n], vec![0.0; pp], vec![0.0; drop_len]);
        let m = attention::Mask { add: mask, segments };
        attention::attention_forward(&mut out, &mut probs, &mut pd, q, k, v, m, d, sv, Some(&dr));
        dot(&out, &r)
    };
    let (mut out, mut probs, mut pd) = (vec![0.0; n], vec![0.0; pp], vec![0.0; drop_len]);
    let m = attention::Mask { add: mask, segments };
    attention::attention_forward(&mut out, &mut probs, &mut pd, &q, &k, &v, m, d, sv, Some(&dr));
    // Padded keys, and keys of another segment, get exactly zero weight.
    let mut at = 0;
    for s in 0..sv.count() {
        let (t, start) = (sv.len(s), sv.cu[s]);
        for (r, row) in probs[at..at + d.nh * t * t].chunks(t).enumerate() {
            let i = r % t;
            for j in 0..t {
                let padded = mask.get(start + j).is_some_and(|&x| x != 0.0);
                let other = !segments.is_empty() && segments[start + j] != segments[start + i];
                assert!(!(padded || other) || row[j] == 0.0, "a padded key or a key of another segment");
            }
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        at += d.nh * t * t;
    }
    let (mut dq, mut dk, mut dv) = (unwritten(n), unwritten(n), unwritten(n));
    attention::attention_backward(&mut dq, &mut dk, &mut dv, &r, &probs, &pd, &q, &k, &v, d, sv, Some(&dr));
    let tag = format!("attention(seqs {:?} nh{} hd{} p{p_drop})", seqs.cu, d.nh, d.hd);
    check(&format!("{tag}.dq"), &q, &dq, 80, |x| fwd(x, &k, &v));
    check(&format!("{tag}.dk"), &k, &dk, 80, |x| fwd(&q, x, &v));
    check(&format!("{tag}.dv"), &v, &dv, 80, |x| fwd(&q, &k, x));
}

/// A padded batch of `valid.len()` rows of `t` and its additive mask.
fn padded(t: usize, valid: &[usize]) -> (SeqsBuf, Vec<f32>) {
    let ids: Vec<u32> = (0..valid.len() as u32).map(|i| 100 + 3 * i).collect();
    let mask = (0..valid.len() * t).map(|i| if i % t < valid[i / t] { 0.0 } else { f32::MIN }).collect();
    (SeqsBuf::regular(t, &ids), mask)
}

/// Sequences of these lengths, unpadded.
fn ragged(lens: &[usize]) -> SeqsBuf {
    let mut cu = vec![0];
    for &l in lens {
        cu.push(cu.last().unwrap() + l);
    }
    SeqsBuf { cu, cols: vec![0; lens.len()], example_ids: (0..lens.len() as u32).map(|i| 100 + 3 * i).collect() }
}

#[test]
fn attention_gradients_with_padding_and_dropout() {
    let hd = |nh, hd| HeadDims { nh, hd };
    for (d, t, valid, p) in [
        (hd(1, 3), 4, vec![4], 0.0),
        (hd(3, 4), 7, vec![7, 3], 0.0),
        (hd(2, 8), 16, vec![16, 9, 1], 0.0),
        (hd(3, 4), 7, vec![5, 7], 0.3),
        (hd(2, 8), 16, vec![2, 16, 11], 0.1),
    ] {
        let (seqs, mask) = padded(t, &valid);
        attention_case(d, &seqs, &mask, p, &[]);
        // The same examples unpadded: each sequence as long as its example.
        attention_case(d, &ragged(&valid), &[], p, &[]);
    }
}

#[test]
fn attention_gradients_with_packed_segments() {
    // Row 0: documents of 3 and 4 tokens; row 1: 2, 2, then padding (in the last segment).
    let segs = [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1];
    let (seqs, mask) = padded(7, &[7, 4]);
    attention_case(HeadDims { nh: 2, hd: 4 }, &seqs, &mask, 0.0, &segs);
    attention_case(HeadDims { nh: 2, hd: 4 }, &seqs, &mask, 0.2, &segs);
}

#[test]
fn unpadded_attention_is_the_real_rows_of_padded_attention() {
    // The same examples padded (with the mask) and unpadded, dropout on: every real query's
    // output and every real key's gradient agree. The output gradient is zero at padded rows, as
    // in the model (a padded row feeds only padded rows, which no loss reads).
    let (d, t, valid) = (HeadDims { nh: 3, hd: 8 }, 12, [12usize, 5, 1, 9]);
    let (pad, mask) = padded(t, &valid);
    let rag = ragged(&valid);
    let dr = AttnDropout {
        spec: DropoutSpec { p: 0.2, seed: 3, step: 8, site: 1 },
        logical: LogicalDims { t_max: 32, w_max: 32 },
    };
    let c = d.nh * d.hd;
    // [N, C] rows, the padded batch's real rows being the unpadded batch's.
    let np = pad.view().tokens() * c;
    let real: Vec<usize> = (0..valid.len() * t).filter(|&i| i % t < valid[i / t]).collect();
    let mut gp = randn(np, 43, 1.0);
    for i in (0..valid.len() * t).filter(|i| !real.contains(i)) {
        gp[i * c..(i + 1) * c].fill(0.0);
    }
    let xp = [randn(np, 40, 1.0), randn(np, 41, 1.0), randn(np, 42, 1.0), gp];
    let unpad = |x: &[f32]| -> Vec<f32> { real.iter().flat_map(|&i| x[i * c..(i + 1) * c].to_vec()).collect() };
    let run = |seqs: &SeqsBuf, rows: [Vec<f32>; 4], mask: &[f32]| {
        let sv = seqs.view();
        let n = sv.tokens() * c;
        let heads = |x: &[f32]| {
            let mut o = vec![0.0; n];
            attention::split_heads(&mut o, x, d, sv);
            o
        };
        let (q, k, v) = (heads(&rows[0]), heads(&rows[1]), heads(&rows[2]));
        let pp = sv.probs_len(d.nh);
        let (mut out, mut probs, mut pd) = (vec![0.0; n], vec![0.0; pp], vec![0.0; pp]);
        let m = attention::Mask { add: mask, segments: &[] };
        attention::attention_forward(&mut out, &mut probs, &mut pd, &q, &k, &v, m, d, sv, Some(&dr));
        let (mut dq, mut dk, mut dv) = (unwritten(n), unwritten(n), unwritten(n));
        let dout = heads(&rows[3]);
        attention::attention_backward(&mut dq, &mut dk, &mut dv, &dout, &probs, &pd, &q, &k, &v, d, sv, Some(&dr));
        [out, dq, dk, dv].map(|h| {
            let mut o = vec![0.0; n];
            attention::merge_heads(&mut o, &h, d, sv);
            o
        })
    };
    let padded_out = run(&pad, xp.clone(), &mask);
    let unpadded_out = run(&rag, xp.map(|x| unpad(&x)), &[]);
    for (name, (p, u)) in ["out", "dq", "dk", "dv"].iter().zip(padded_out.iter().zip(&unpadded_out)) {
        let p = unpad(p);
        let err = p.iter().zip(u).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-5, "{name}: padded and unpadded differ by {err}");
    }
}

#[test]
fn head_permutes_and_gather_are_adjoint() {
    let d = HeadDims { nh: 3, hd: 4 };
    for seqs in [SeqsBuf::regular(5, &[0, 1]), ragged(&[3, 1, 6, 0, 2])] {
        let sv = seqs.view();
        let n = sv.tokens() * d.nh * d.hd;
        let (x, r) = (randn(n, 21, 1.0), randn(n, 22, 1.0));
        let split_loss = |x: &[f32]| {
            let mut o = vec![0.0; n];
            attention::split_heads(&mut o, x, d, sv);
            dot(&o, &r)
        };
        let mut dx = unwritten(n);
        attention::merge_heads(&mut dx, &r, d, sv);
        check("split_heads", &x, &dx, n, split_loss);
        let merge_loss = |x: &[f32]| {
            let mut o = vec![0.0; n];
            attention::merge_heads(&mut o, x, d, sv);
            dot(&o, &r)
        };
        let mut dx = unwritten(n);
        attention::split_heads(&mut dx, &r, d, sv);
        check("merge_heads", &x, &dx, n, merge_loss);
        // merge undoes split.
        let (mut s, mut m) = (vec![0.0; n], vec![0.0; n]);
        attention::split_heads(&mut s, &x, d, sv);
        attention::merge_heads(&mut m, &s, d, sv);
        assert_eq!(m, x);
    }

    let (rows, c) = ([4usize, 0, 4, 2], 6);
    let (inp, r) = (randn(5 * c, 23, 1.0), randn(rows.len() * c, 24, 1.0));
    let gather_loss = |x: &[f32]| {
        let mut o = vec![0.0; rows.len() * c];
        gather::gather_rows_forward(&mut o, x, &rows, c);
        dot(&o, &r)
    };
    let mut dx = unwritten(5 * c);
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
        dropout::dropout_forward(&mut o, SeqsBuf::regular(t, &ids).view(), w, logical, &spec);
        dot(&o, &r)
    };
    let mut dx = r.clone();
    dropout::dropout_backward(&mut dx, SeqsBuf::regular(t, &ids).view(), w, logical, &spec);
    check("dropout", &x, &dx, b * t * w, loss);
}
