//! The op set that BERT's forward and backward are written in, once ([`Ops`]), over one device's
//! buffers: [`Cpu`] runs the `kernels` crate's Rust ops over `Vec<f32>`, [`Cuda`](crate::cuda_ops::Cuda)
//! runs `kernels::device`'s launchers over device buffers. model.rs is the one op sequence; the
//! CPU parity tests against `transformers` check its order of operations for both, and a GPU
//! run has only each op's parity left to check (`worker gpu-check`).
//!
//! Conventions (those of `kernels`): shapes are explicit, outermost first; an op's output is
//! written whole, and so is the gradient a `*_backward` produces for its input (`dinp`), except
//! where a dense layer's `accumulate` adds it to the gradient of another consumer of the same
//! input (a residual); parameter gradients always accumulate (`g +=`, micro-steps add up). Parameters are
//! ranges of the flat parameter buffer `p`, their gradients the same ranges of the flat gradient
//! buffer `g` (the [`Layout`](crate::layout::Layout)'s).

use job::config::Precision;
pub use kernels::attention::AttnDropout;
use kernels::attention::{self, AttnDims, HeadDims};
use kernels::dropout::{self, DropoutSpec, LogicalDims};
use kernels::seqs::SeqsBuf;
use kernels::{crossentropy, embedding, gather, gelu, layernorm, matmul, residual, tanh};
use std::borrow::Cow;
use std::ops::Range;

/// A tensor of the flat parameter (and gradient) buffer.
pub type Param = Range<usize>;

/// What a batch gives the ops besides activations, on the host: the tokens, where each sits,
/// which tokens each attends to, and the head's targets. The model builds them padded (`B`
/// sequences of `T` tokens, as the batch comes); an implementation may keep only the real tokens
/// ([`Inputs::unpadded`], the CPU's), so that every op runs on `N` token rows.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// The batch's padded shape.
    pub b: usize,
    pub t: usize,
    /// `[N]` each.
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    /// Each token's position (its index in the row unless the batch packs several documents
    /// into one row).
    pub position_ids: Vec<u32>,
    /// `[N]`: each token's document within its sequence: a query attends only to keys of its
    /// own segment (and never to padding). Empty: one segment per sequence.
    pub segment_ids: Vec<u32>,
    /// `[N]`: 0 for a real token, `f32::MIN` for padding, added to every score of that key.
    /// Empty: nothing is padded.
    pub mask_add: Vec<f32>,
    /// `[B]`: each batch row's dataset index, which keys its dropout masks (the head's too).
    pub example_ids: Vec<u32>,
    /// Which tokens form each sequence, and each sequence's dataset index (its row's) and column
    /// in its batch row.
    pub seqs: SeqsBuf,
    /// `[N]`: each token row's index in the padded `[B*T]` batch. Empty: the rows are the padded
    /// batch's.
    pub padded_at: Vec<usize>,
    /// The token rows that the head reads (`[CLS]`, or the masked tokens), and each one's
    /// target class.
    pub rows: Vec<usize>,
    pub targets: Vec<i64>,
}

impl Inputs {
    /// How many targets count in the loss (not `ignore_index`).
    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t != crossentropy::IGNORE_INDEX).count()
    }

    /// Token rows.
    pub fn tokens(&self) -> usize {
        self.input_ids.len()
    }

    /// Elements of one layer's attention probabilities.
    pub fn probs_len(&self, nh: usize) -> usize {
        self.seqs.view().probs_len(nh)
    }

    /// The same batch with only its real tokens: each row's real tokens (each packed document's,
    /// where the row has segments) become a sequence of their own, so that dense layers skip the
    /// padding and attention runs per sequence (varlen). Dropout masks stay those of the padded
    /// batch: a sequence keeps its row's example id and its column in the row. Each row's real
    /// tokens must come first (right padding).
    pub fn unpadded(self) -> anyhow::Result<Inputs> {
        let (b, t) = (self.b, self.t);
        if self.mask_add.is_empty() && self.segment_ids.is_empty() {
            return Ok(self);
        }
        let real = |i: usize| self.mask_add.get(i).is_none_or(|&m| m == 0.0);
        let mut keep = Vec::with_capacity(b * t);
        let mut new_index = vec![usize::MAX; b * t];
        let mut seqs = SeqsBuf::default();
        for row in 0..b {
            let ex = self.example_ids[row];
            for j in 0..t {
                let i = row * t + j;
                if !real(i) {
                    continue;
                }
                anyhow::ensure!(
                    j == 0 || real(i - 1),
                    "batch row {row}: a real token after padding (pad on the right)"
                );
                let seg = self.segment_ids.get(i);
                if j == 0 || seg != self.segment_ids.get(i - 1) {
                    seqs.cu.push(keep.len());
                    seqs.cols.push(j);
                    seqs.example_ids.push(ex);
                }
                new_index[i] = keep.len();
                keep.push(i);
            }
        }
        seqs.cu.push(keep.len());
        let rows = self
            .rows
            .iter()
            .map(|&r| match new_index[r] {
                usize::MAX => anyhow::bail!("the head reads token {r}, which is padding"),
                n => Ok(n),
            })
            .collect::<anyhow::Result<_>>()?;
        let pick = |v: &[u32]| keep.iter().map(|&i| v[i]).collect::<Vec<u32>>();
        Ok(Inputs {
            b,
            t,
            input_ids: pick(&self.input_ids),
            token_type_ids: pick(&self.token_type_ids),
            position_ids: pick(&self.position_ids),
            segment_ids: Vec::new(),
            mask_add: Vec::new(),
            example_ids: self.example_ids,
            seqs,
            padded_at: keep,
            rows,
            targets: self.targets,
        })
    }
}

/// The rows a hidden-state dropout runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropRows {
    /// The token rows (`[N, C]`), by sequence.
    Tokens,
    /// The head's rows, one per sequence (the pooled `[CLS]` of a classifier).
    Head,
}

/// The permutes between `[B, T, NH*HD]` and `[B, NH, T, HD]`, each the other's backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heads {
    Split,
    Merge,
}

/// The ops of BERT's training step on one device. Every op may fail (a GPU launch can); the CPU's
/// never do.
#[allow(clippy::too_many_arguments)]
pub trait Ops {
    /// An `f32` tensor.
    type Buf: Default;
    /// A batch's [`Inputs`] where the ops read them.
    type Inputs;

    // Buffers.
    /// A buffer holding `host`.
    fn upload(&self, host: &[f32]) -> anyhow::Result<Self::Buf>;
    /// The buffer's contents on the host (borrowed where they already are).
    fn to_host<'a>(&self, buf: &'a Self::Buf) -> anyhow::Result<Cow<'a, [f32]>>;
    /// Makes `buf` `n` long, for an op's output (which the op writes whole).
    fn shape(&self, buf: &mut Self::Buf, n: usize) -> anyhow::Result<()>;
    /// Makes `buf` `n` zeros, for a gradient that backward accumulates into.
    fn zeroed(&self, buf: &mut Self::Buf, n: usize) -> anyhow::Result<()>;
    fn zero(&self, buf: &mut Self::Buf) -> anyhow::Result<()>;
    /// `dst = src` (same length).
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf) -> anyhow::Result<()>;
    fn inputs(&self, x: Inputs) -> anyhow::Result<Self::Inputs>;
    fn host_inputs(x: &Self::Inputs) -> &Inputs;

    // Embeddings: `out = wte[ids] + wpe[positions] + wtt[types]`.
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        x: &Self::Inputs,
        p: &Self::Buf,
        tables: [Param; 3],
        c: usize,
    ) -> anyhow::Result<()>;
    /// The tables' gradients (none for the `pad` token's row, as `padding_idx`).
    fn embedding_backward(
        &self,
        g: &mut Self::Buf,
        tables: [Param; 3],
        dout: &Self::Buf,
        x: &Self::Inputs,
        pad: Option<u32>,
        c: usize,
    ) -> anyhow::Result<()>;

    // Layer norm over rows of `c`, keeping each row's mean and reciprocal deviation.
    fn layernorm_forward(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        inp: &Self::Buf,
        p: &Self::Buf,
        weight: Param,
        bias: Param,
        n: usize,
        c: usize,
        eps: f32,
    ) -> anyhow::Result<()>;
    fn layernorm_backward(
        &self,
        dinp: &mut Self::Buf,
        g: &mut Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        p: &Self::Buf,
        weight_bias: [Param; 2],
        mean: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        c: usize,
    ) -> anyhow::Result<()>;

    /// A dense layer `out[N, OC] = inp[N, C] W[OC, C]^T + b`, its GEMM in `precision`.
    fn dense_forward(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        p: &Self::Buf,
        weight: Param,
        bias: Option<Param>,
        n: usize,
        c: usize,
        oc: usize,
        precision: Precision,
    ) -> anyhow::Result<()>;
    /// `dinp = dout W` (`+=` with `accumulate`), `dW += dout^T inp`, `db += sum dout` (no bias
    /// gradient without `bias`).
    fn dense_backward(
        &self,
        dinp: &mut Self::Buf,
        g: &mut Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        p: &Self::Buf,
        weight: Param,
        bias: Option<Param>,
        n: usize,
        c: usize,
        oc: usize,
        precision: Precision,
        accumulate: bool,
    ) -> anyhow::Result<()>;

    /// Between the `[N, C]` token rows and the head-major layout of `x`'s sequences.
    fn heads(
        &self,
        op: Heads,
        dst: &mut Self::Buf,
        src: &Self::Buf,
        x: &Self::Inputs,
        d: AttnDims,
    ) -> anyhow::Result<()>;
    /// Scaled dot-product attention over `x`'s sequences, head-major, each query seeing the keys
    /// of its own sequence and segment that are not padding; `probs_drop` holds the dropped-out
    /// probabilities when there is `dropout` (else it is empty). `d` is the padded batch's shape.
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        probs: &mut Self::Buf,
        probs_drop: &mut Self::Buf,
        qkv: [&Self::Buf; 3],
        x: &Self::Inputs,
        d: AttnDims,
        dropout: Option<AttnDropout>,
    ) -> anyhow::Result<()>;
    fn attention_backward(
        &self,
        dqkv: [&mut Self::Buf; 3],
        dout: &Self::Buf,
        probs: &Self::Buf,
        probs_drop: &Self::Buf,
        qkv: [&Self::Buf; 3],
        x: &Self::Inputs,
        d: AttnDims,
        dropout: Option<AttnDropout>,
    ) -> anyhow::Result<()>;

    /// Dropout (or its backward) in place on `buf: [rows, W]`, keyed by the examples' ids.
    fn dropout(
        &self,
        buf: &mut Self::Buf,
        x: &Self::Inputs,
        rows: DropRows,
        w: usize,
        logical: LogicalDims,
        spec: &DropoutSpec,
        backward: bool,
    ) -> anyhow::Result<()>;

    fn residual_forward(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf) -> anyhow::Result<()>;
    /// `out = gelu(x)`; `x` becomes `gelu'(x)`, all that [`Ops::gelu_backward`] needs of it.
    fn gelu_forward(&self, out: &mut Self::Buf, x: &mut Self::Buf) -> anyhow::Result<()>;
    /// `dinp = deriv * dout`, with `deriv` what [`Ops::gelu_forward`] left.
    fn gelu_backward(&self, dinp: &mut Self::Buf, deriv: &Self::Buf, dout: &Self::Buf) -> anyhow::Result<()>;
    fn tanh_forward(&self, out: &mut Self::Buf, inp: &Self::Buf) -> anyhow::Result<()>;
    fn tanh_backward(&self, dinp: &mut Self::Buf, out: &Self::Buf, dout: &Self::Buf) -> anyhow::Result<()>;

    /// `out[k] = inp[rows[k]]`, rows of `c`.
    fn gather_rows_forward(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        x: &Self::Inputs,
        c: usize,
    ) -> anyhow::Result<()>;
    fn gather_rows_backward(
        &self,
        dinp: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Inputs,
        c: usize,
    ) -> anyhow::Result<()>;

    /// Per-row cross-entropy of `logits: [N, V]` against the targets (0 for ignored rows).
    fn crossentropy_forward(
        &self,
        losses: &mut Self::Buf,
        logits: &Self::Buf,
        x: &Self::Inputs,
        n: usize,
        v: usize,
    ) -> anyhow::Result<()>;
    fn crossentropy_backward(
        &self,
        dlogits: &mut Self::Buf,
        logits: &Self::Buf,
        x: &Self::Inputs,
        scale: f32,
        n: usize,
        v: usize,
    ) -> anyhow::Result<()>;
    /// Each row's most likely class (the first of equals), of `logits: [N, V]`: what evaluation
    /// counts, without bringing `[N, V]` to the host where it is elsewhere.
    fn argmax_rows(&self, logits: &Self::Buf, n: usize, v: usize) -> anyhow::Result<Vec<u32>>;
}

/// The CPU: the `kernels` crate's ops over `Vec<f32>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// Mutable views of disjoint ranges of one buffer (gradients of several tensors at once).
pub(crate) fn disjoint_mut<const N: usize>(buf: &mut [f32], ranges: [Range<usize>; N]) -> [&mut [f32]; N] {
    let mut order: Vec<usize> = (0..N).collect();
    order.sort_by_key(|&i| ranges[i].start);
    let mut out: Vec<Option<&mut [f32]>> = (0..N).map(|_| None).collect();
    let mut rest = buf;
    let mut base = 0;
    for &i in &order {
        let r = &ranges[i];
        assert!(r.start >= base, "disjoint_mut: overlapping ranges");
        let (_, tail) = rest.split_at_mut(r.start - base);
        let (mid, tail) = tail.split_at_mut(r.len());
        out[i] = Some(mid);
        rest = tail;
        base = r.end;
    }
    let views: Vec<&mut [f32]> = out.into_iter().map(|o| o.expect("every range assigned")).collect();
    match views.try_into() {
        Ok(arr) => arr,
        Err(_) => unreachable!("exactly N views"),
    }
}

/// A weight's gradient and its bias's, if any.
fn weight_and_bias<'a>(g: &'a mut [f32], w: &Param, bias: &Option<Param>) -> (&'a mut [f32], Option<&'a mut [f32]>) {
    match bias {
        Some(b) => {
            let [dw, db] = disjoint_mut(g, [w.clone(), b.clone()]);
            (dw, Some(db))
        }
        None => (&mut g[w.clone()], None),
    }
}

/// The CPU's products for `precision`: bf16 needs AVX512_BF16 (checked when the engine opens).
fn operands(precision: Precision) -> anyhow::Result<matmul::Operands> {
    match precision {
        Precision::Fp32 => Ok(matmul::Operands::F32),
        Precision::Bf16 => {
            anyhow::ensure!(kernels::bf16::supported(), NO_CPU_BF16);
            Ok(matmul::Operands::Bf16)
        }
    }
}

/// Why the CPU cannot run `train.precision = "bf16"` here.
pub const NO_CPU_BF16: &str =
    "train.precision = \"bf16\" on the CPU needs AVX512_BF16, which this CPU lacks: use \"fp32\" (or a GPU)";

impl Ops for Cpu {
    type Buf = Vec<f32>;
    type Inputs = Inputs;

    fn upload(&self, host: &[f32]) -> anyhow::Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn to_host<'a>(&self, buf: &'a Vec<f32>) -> anyhow::Result<Cow<'a, [f32]>> {
        Ok(Cow::Borrowed(buf))
    }

    fn shape(&self, buf: &mut Vec<f32>, n: usize) -> anyhow::Result<()> {
        buf.resize(n, 0.0);
        Ok(())
    }

    fn zeroed(&self, buf: &mut Vec<f32>, n: usize) -> anyhow::Result<()> {
        buf.clear();
        buf.resize(n, 0.0);
        Ok(())
    }

    fn zero(&self, buf: &mut Vec<f32>) -> anyhow::Result<()> {
        buf.iter_mut().for_each(|e| *e = 0.0);
        Ok(())
    }

    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> anyhow::Result<()> {
        dst.copy_from_slice(src);
        Ok(())
    }

    fn inputs(&self, x: Inputs) -> anyhow::Result<Inputs> {
        x.unpadded()
    }

    fn host_inputs(x: &Inputs) -> &Inputs {
        x
    }

    fn embedding_forward(
        &self,
        out: &mut Vec<f32>,
        x: &Inputs,
        p: &Vec<f32>,
        [wte, wpe, wtt]: [Param; 3],
        c: usize,
    ) -> anyhow::Result<()> {
        let (ids, types, pos) = (&x.input_ids, &x.token_type_ids, &x.position_ids);
        embedding::embedding_forward(out, ids, types, pos, &p[wte], &p[wpe], &p[wtt], 1, x.tokens(), c);
        Ok(())
    }

    fn embedding_backward(
        &self,
        g: &mut Vec<f32>,
        tables: [Param; 3],
        dout: &Vec<f32>,
        x: &Inputs,
        pad: Option<u32>,
        c: usize,
    ) -> anyhow::Result<()> {
        let [dte, dpe, dtt] = disjoint_mut(g, tables);
        let (ids, types, pos) = (&x.input_ids, &x.token_type_ids, &x.position_ids);
        embedding::embedding_backward(dte, dpe, dtt, dout, ids, types, pos, pad, 1, x.tokens(), c);
        Ok(())
    }

    fn layernorm_forward(
        &self,
        out: &mut Vec<f32>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        inp: &Vec<f32>,
        p: &Vec<f32>,
        weight: Param,
        bias: Param,
        n: usize,
        c: usize,
        eps: f32,
    ) -> anyhow::Result<()> {
        layernorm::layernorm_forward(out, mean, rstd, inp, &p[weight], &p[bias], n, c, eps);
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dinp: &mut Vec<f32>,
        g: &mut Vec<f32>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        p: &Vec<f32>,
        [weight, bias]: [Param; 2],
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> anyhow::Result<()> {
        let [dw, db] = disjoint_mut(g, [weight.clone(), bias]);
        layernorm::layernorm_backward(dinp, dw, db, dout, inp, &p[weight], mean, rstd, n, c);
        Ok(())
    }

    fn dense_forward(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        p: &Vec<f32>,
        weight: Param,
        bias: Option<Param>,
        n: usize,
        c: usize,
        oc: usize,
        precision: Precision,
    ) -> anyhow::Result<()> {
        matmul::matmul_forward(operands(precision)?, out, inp, &p[weight], bias.map(|b| &p[b]), n, c, oc);
        Ok(())
    }

    fn dense_backward(
        &self,
        dinp: &mut Vec<f32>,
        g: &mut Vec<f32>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        p: &Vec<f32>,
        weight: Param,
        bias: Option<Param>,
        n: usize,
        c: usize,
        oc: usize,
        precision: Precision,
        accumulate: bool,
    ) -> anyhow::Result<()> {
        let (dw, db) = weight_and_bias(g, &weight, &bias);
        matmul::matmul_backward(operands(precision)?, dinp, dw, db, dout, inp, &p[weight], n, c, oc, accumulate);
        Ok(())
    }

    fn heads(&self, op: Heads, dst: &mut Vec<f32>, src: &Vec<f32>, x: &Inputs, d: AttnDims) -> anyhow::Result<()> {
        let (hd, seqs) = (HeadDims { nh: d.nh, hd: d.hd }, x.seqs.view());
        match op {
            Heads::Split => attention::split_heads(dst, src, hd, seqs),
            Heads::Merge => attention::merge_heads(dst, src, hd, seqs),
        }
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut Vec<f32>,
        probs: &mut Vec<f32>,
        probs_drop: &mut Vec<f32>,
        [q, k, v]: [&Vec<f32>; 3],
        x: &Inputs,
        d: AttnDims,
        dropout: Option<AttnDropout>,
    ) -> anyhow::Result<()> {
        let mask = attention::Mask { add: &x.mask_add, segments: &x.segment_ids };
        let hd = HeadDims { nh: d.nh, hd: d.hd };
        attention::attention_forward(out, probs, probs_drop, q, k, v, mask, hd, x.seqs.view(), dropout.as_ref());
        Ok(())
    }

    fn attention_backward(
        &self,
        [dq, dk, dv]: [&mut Vec<f32>; 3],
        dout: &Vec<f32>,
        probs: &Vec<f32>,
        probs_drop: &Vec<f32>,
        [q, k, v]: [&Vec<f32>; 3],
        x: &Inputs,
        d: AttnDims,
        dropout: Option<AttnDropout>,
    ) -> anyhow::Result<()> {
        let hd = HeadDims { nh: d.nh, hd: d.hd };
        attention::attention_backward(
            dq,
            dk,
            dv,
            dout,
            probs,
            probs_drop,
            q,
            k,
            v,
            hd,
            x.seqs.view(),
            dropout.as_ref(),
        );
        Ok(())
    }

    fn dropout(
        &self,
        buf: &mut Vec<f32>,
        x: &Inputs,
        rows: DropRows,
        w: usize,
        logical: LogicalDims,
        spec: &DropoutSpec,
        backward: bool,
    ) -> anyhow::Result<()> {
        let head;
        let seqs = match rows {
            DropRows::Tokens => x.seqs.view(),
            DropRows::Head => {
                head = SeqsBuf::regular(1, &x.example_ids);
                head.view()
            }
        };
        match backward {
            false => dropout::dropout_forward(buf, seqs, w, logical, spec),
            true => dropout::dropout_backward(buf, seqs, w, logical, spec),
        }
        Ok(())
    }

    fn residual_forward(&self, out: &mut Vec<f32>, a: &Vec<f32>, b: &Vec<f32>) -> anyhow::Result<()> {
        residual::residual_forward(out, a, b);
        Ok(())
    }

    fn gelu_forward(&self, out: &mut Vec<f32>, x: &mut Vec<f32>) -> anyhow::Result<()> {
        gelu::gelu_forward(out, x);
        Ok(())
    }

    fn gelu_backward(&self, dinp: &mut Vec<f32>, deriv: &Vec<f32>, dout: &Vec<f32>) -> anyhow::Result<()> {
        gelu::gelu_backward(dinp, deriv, dout);
        Ok(())
    }

    fn tanh_forward(&self, out: &mut Vec<f32>, inp: &Vec<f32>) -> anyhow::Result<()> {
        tanh::tanh_forward(out, inp);
        Ok(())
    }

    fn tanh_backward(&self, dinp: &mut Vec<f32>, out: &Vec<f32>, dout: &Vec<f32>) -> anyhow::Result<()> {
        tanh::tanh_backward(dinp, out, dout);
        Ok(())
    }

    fn gather_rows_forward(&self, out: &mut Vec<f32>, inp: &Vec<f32>, x: &Inputs, c: usize) -> anyhow::Result<()> {
        gather::gather_rows_forward(out, inp, &x.rows, c);
        Ok(())
    }

    fn gather_rows_backward(&self, dinp: &mut Vec<f32>, dout: &Vec<f32>, x: &Inputs, c: usize) -> anyhow::Result<()> {
        gather::gather_rows_backward(dinp, dout, &x.rows, c);
        Ok(())
    }

    fn crossentropy_forward(
        &self,
        losses: &mut Vec<f32>,
        logits: &Vec<f32>,
        x: &Inputs,
        n: usize,
        v: usize,
    ) -> anyhow::Result<()> {
        crossentropy::crossentropy_forward(losses, logits, &x.targets, n, v);
        Ok(())
    }

    fn crossentropy_backward(
        &self,
        dlogits: &mut Vec<f32>,
        logits: &Vec<f32>,
        x: &Inputs,
        scale: f32,
        n: usize,
        v: usize,
    ) -> anyhow::Result<()> {
        crossentropy::crossentropy_backward(dlogits, logits, &x.targets, scale, n, v);
        Ok(())
    }

    fn argmax_rows(&self, logits: &Vec<f32>, n: usize, v: usize) -> anyhow::Result<Vec<u32>> {
        Ok(argmax_rows(logits, n, v))
    }
}

/// Each row's first largest entry, of `logits: [N, V]` on the host.
pub fn argmax_rows(logits: &[f32], n: usize, v: usize) -> Vec<u32> {
    assert_eq!(logits.len(), n * v, "argmax_rows: logits must be [N, V]");
    logits.chunks(v.max(1)).take(n).map(|row| argmax(row) as u32).collect()
}

/// The index of the first largest entry of `row`.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}
