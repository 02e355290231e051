//! Tanh, the activation of BERT's pooler (`pooled = tanh(W h_cls + b)`).
//! `d tanh(x) / dx = 1 - tanh(x)^2`, computed from the saved output.

/// `out[i] = tanh(inp[i])`.
pub fn tanh_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len(), "tanh_forward: shapes differ");
    for (o, &x) in out.iter_mut().zip(inp) {
        *o = x.tanh();
    }
}

/// `dinp[i] = (1 - out[i]^2) * dout[i]`, where `out` is the forward output.
pub fn tanh_backward(dinp: &mut [f32], out: &[f32], dout: &[f32]) {
    assert!(dinp.len() == out.len() && out.len() == dout.len(), "tanh_backward: shapes differ");
    for ((d, &y), &g) in dinp.iter_mut().zip(out).zip(dout) {
        *d = (1.0 - y * y) * g;
    }
}
