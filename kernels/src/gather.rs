//! Row gathers: `out[i, :] = inp[rows[i], :]`. The pooler reads the `[CLS]` row of every example
//! (`rows = [0, T, 2T, ...]`); the masked-LM head reads only the rows that carry a label.
//! Backward scatters: `dinp[r, :] = sum of dout[i, :] over rows[i] = r`, in order of `i` (0 for
//! rows that no `i` reads).

/// `out: [R, C]`, `inp: [N, C]`, `rows: [R]` with every row `< N`.
pub fn gather_rows_forward(out: &mut [f32], inp: &[f32], rows: &[usize], c: usize) {
    assert_eq!(out.len(), rows.len() * c, "gather_rows_forward: out must be [R, C]");
    for (o, &r) in out.chunks_mut(c).zip(rows) {
        o.copy_from_slice(&inp[r * c..(r + 1) * c]);
    }
}

/// `dinp` zeroed, then `dinp[rows[i], :] += dout[i, :]`.
pub fn gather_rows_backward(dinp: &mut [f32], dout: &[f32], rows: &[usize], c: usize) {
    assert_eq!(dout.len(), rows.len() * c, "gather_rows_backward: dout must be [R, C]");
    dinp.fill(0.0);
    for (g, &r) in dout.chunks(c).zip(rows) {
        for (d, &v) in dinp[r * c..(r + 1) * c].iter_mut().zip(g) {
            *d += v;
        }
    }
}
