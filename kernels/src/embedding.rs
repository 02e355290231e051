//! BERT's input embeddings: `out[b, t, :] = wte[input_ids[b, t]] + wtt[token_type_ids[b, t]] +
//! wpe[position_ids[b, t]]`, summed in that order as `transformers` does (word and type, then
//! the position). Positions are `0..T` in each row unless the row packs several documents. The
//! sum is then layer-normalised by the caller.
//!
//! Backward scatter-adds `dout` into the three tables. The row `padding_idx` of the word table
//! gets no gradient, like `torch.nn.Embedding(padding_idx = pad_token_id)`.

use rayon::prelude::*;

/// `out: [B*T, C]`, `input_ids`/`token_type_ids`/`position_ids`: `[B*T]`, `wte: [V, C]`,
/// `wpe: [P, C]`, `wtt: [TT, C]`. Ids are checked against the table sizes.
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward(
    out: &mut [f32],
    input_ids: &[u32],
    token_type_ids: &[u32],
    position_ids: &[u32],
    wte: &[f32],
    wpe: &[f32],
    wtt: &[f32],
    b: usize,
    t: usize,
    c: usize,
) {
    assert_eq!(out.len(), b * t * c, "embedding_forward: out must be [B*T, C]");
    assert!(
        input_ids.len() == b * t && token_type_ids.len() == b * t && position_ids.len() == b * t,
        "embedding_forward: ids must be [B*T]"
    );
    assert!(
        position_ids.iter().all(|&p| (p as usize + 1) * c <= wpe.len()),
        "embedding_forward: a position beyond the position table"
    );
    out.par_chunks_mut(c).enumerate().for_each(|(row, o)| {
        let (id, tt, pos) = (input_ids[row] as usize, token_type_ids[row] as usize, position_ids[row] as usize);
        let w = &wte[id * c..(id + 1) * c];
        let y = &wtt[tt * c..(tt + 1) * c];
        let p = &wpe[pos * c..(pos + 1) * c];
        for i in 0..c {
            o[i] = (w[i] + y[i]) + p[i];
        }
    });
}

/// `dwte[input_ids[r]] += dout[r]` (except `padding_idx`), `dwtt[token_type_ids[r]] += dout[r]`,
/// `dwpe[position_ids[r]] += dout[r]`, rows taken in order so the result is deterministic.
#[allow(clippy::too_many_arguments)]
pub fn embedding_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dwtt: &mut [f32],
    dout: &[f32],
    input_ids: &[u32],
    token_type_ids: &[u32],
    position_ids: &[u32],
    padding_idx: Option<u32>,
    b: usize,
    t: usize,
    c: usize,
) {
    assert_eq!(dout.len(), b * t * c, "embedding_backward: dout must be [B*T, C]");
    for (row, g) in dout.chunks(c).enumerate() {
        let id = input_ids[row];
        if Some(id) != padding_idx {
            let id = id as usize;
            for (d, &v) in dwte[id * c..(id + 1) * c].iter_mut().zip(g) {
                *d += v;
            }
        }
        let tt = token_type_ids[row] as usize;
        for (d, &v) in dwtt[tt * c..(tt + 1) * c].iter_mut().zip(g) {
            *d += v;
        }
        let pos = position_ids[row] as usize;
        for (d, &v) in dwpe[pos * c..(pos + 1) * c].iter_mut().zip(g) {
            *d += v;
        }
    }
}
