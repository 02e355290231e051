//! BERT over one flat parameter buffer and one flat gradient buffer, on the CPU kernels.
//!
//! The forward pass follows `transformers`' `BertModel` op for op (post-LN encoder):
//!
//! ```text
//! x0      = dropout(LayerNorm(wte[ids] + wtt[types] + wpe[pos]))                 [B*T, C]
//! layer l:  q,k,v = x Wq^T + bq, ...                                              [B*T, C]
//!           ctx   = attention(q, k, v, padding mask)    (dropout on probabilities)
//!           ln1   = LayerNorm(dropout(ctx Wao^T + bao) + x)
//!           ln2   = LayerNorm(dropout(gelu(ln1 Wi^T + bi) Wo^T + bo) + ln1)       -> next x
//! classification: logits = dropout(tanh(x[CLS] Wp^T + bp)) Wc^T + bc              [B, L]
//! masked LM:      logits = LayerNorm(gelu(x[r] Wt^T + bt)) wte^T + b_dec          [R, V]
//! loss = mean cross-entropy over the counted targets (ignore_index -100)
//! ```
//!
//! Each dropout site ([`DropoutSite`]: the embeddings, three per layer, the classifier) keys its
//! own masks.
//! Activations are kept from forward for backward in [`Acts`]; buffers are reused across steps.

use crate::bert_config::BertConfig;
use crate::layout::{Head, Layout};
use crate::ModelError;
use kernels::attention::{self, AttnDims, AttnDropout};
use kernels::dropout::{self, DropoutSpec, LogicalDims};
use kernels::{crossentropy, embedding, gather, gelu, layernorm, matmul, residual, tanh};
use std::ops::Range;

/// One padded batch. `t` is the padded length; `labels` has one entry per example for
/// classification and one per token (`-100` where unlabeled) for masked LM.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub b: usize,
    pub t: usize,
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    /// 1 for a real token, 0 for padding.
    pub attention_mask: Vec<u8>,
    /// Each example's index in its dataset: the dropout masks are keyed by it.
    pub example_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// What keys the dropout masks of a training step; `None` in [`Bert::forward`] means evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutCtx {
    pub seed: u64,
    pub step: u32,
}

impl DropoutCtx {
    /// The mask of `site` at rate `p` in this step; none when evaluating (`ctx = None`) or when
    /// `p` is 0.
    pub fn spec(ctx: Option<DropoutCtx>, site: DropoutSite, p: f32) -> Option<DropoutSpec> {
        ctx.filter(|_| p > 0.0).map(|d| DropoutSpec { p, seed: d.seed, step: d.step, site: site.id() })
    }
}

/// Where in the model a dropout mask is drawn. The numbering is part of the masks (and so of
/// every result with dropout on): the CPU and the GPU models both take it from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropoutSite {
    /// After the embeddings' layer norm.
    Embeddings,
    /// On layer `l`'s attention probabilities.
    AttentionProbs(usize),
    /// On layer `l`'s attention output projection, before the residual.
    AttentionOutput(usize),
    /// On layer `l`'s feed-forward output, before the residual.
    FeedForwardOutput(usize),
    /// On the pooled `[CLS]` before the classifier, in a model of `layers` layers.
    Classifier { layers: usize },
}

impl DropoutSite {
    /// 0, then `1 + 3l`, `2 + 3l`, `3 + 3l` for layer `l`, then `1 + 3L`.
    pub fn id(self) -> u32 {
        match self {
            DropoutSite::Embeddings => 0,
            DropoutSite::AttentionProbs(l) => 1 + 3 * l as u32,
            DropoutSite::AttentionOutput(l) => 2 + 3 * l as u32,
            DropoutSite::FeedForwardOutput(l) => 3 + 3 * l as u32,
            DropoutSite::Classifier { layers } => 1 + 3 * layers as u32,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ForwardOut {
    /// Sum of the per-target losses and how many targets counted: the mean is `sum / count`.
    pub loss_sum: f64,
    pub count: usize,
}

#[derive(Default)]
struct LayerActs {
    qh: Vec<f32>,
    kh: Vec<f32>,
    vh: Vec<f32>,
    probs: Vec<f32>,
    probs_drop: Vec<f32>,
    ctx: Vec<f32>,
    res1: Vec<f32>,
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    inter: Vec<f32>,
    act: Vec<f32>,
    res2: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
}

/// Activations saved by forward, plus scratch. Buffers keep their capacity between steps.
#[derive(Default)]
pub struct Acts {
    shape: (usize, usize),
    dropout: Option<DropoutCtx>,
    mask_add: Vec<f32>,
    emb_sum: Vec<f32>,
    emb_mean: Vec<f32>,
    emb_rstd: Vec<f32>,
    x0: Vec<f32>,
    layers: Vec<LayerActs>,
    tmp: Vec<f32>,
    tmp2: Vec<f32>,
    // heads
    rows: Vec<usize>,
    targets: Vec<i64>,
    head_in: Vec<f32>,
    head_pre: Vec<f32>,
    head_act: Vec<f32>,
    head_out: Vec<f32>,
    head_mean: Vec<f32>,
    head_rstd: Vec<f32>,
    /// Classification `[B, L]` or masked-LM `[R, V]` logits of the last forward.
    pub logits: Vec<f32>,
    losses: Vec<f32>,
}

/// Resizes to `n` zeros: for accumulators, which backward adds into.
fn sized(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// Resizes to `n` without clearing: for forward outputs, which their op overwrites entirely.
fn shaped(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
}

/// Mutable views of disjoint ranges of one buffer (gradients of several tensors at once).
fn disjoint_mut<const N: usize>(buf: &mut [f32], ranges: [Range<usize>; N]) -> [&mut [f32]; N] {
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

/// Gradient scratch for backward, reused across steps.
#[derive(Default)]
struct GradScratch {
    dy: Vec<f32>,
    dx: Vec<f32>,
    d_res: Vec<f32>,
    d_ln1: Vec<f32>,
    d_tmp: Vec<f32>,
    d_act: Vec<f32>,
    d_inter: Vec<f32>,
    d_ctx: Vec<f32>,
    d_ctxh: Vec<f32>,
    dqh: Vec<f32>,
    dkh: Vec<f32>,
    dvh: Vec<f32>,
    d_logits: Vec<f32>,
    d_head_a: Vec<f32>,
    d_head_b: Vec<f32>,
    d_head_c: Vec<f32>,
}

pub struct Bert {
    pub cfg: BertConfig,
    pub layout: Layout,
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
    pub acts: Acts,
    scratch: GradScratch,
}

impl Bert {
    /// A model with all parameters zero; see `checkpoint` for loading and initialisation.
    pub fn zeros(cfg: BertConfig, head: Head) -> Self {
        let layout = Layout::new(&cfg, head);
        let params = vec![0.0; layout.total];
        let grads = vec![0.0; layout.total];
        Bert { cfg, layout, params, grads, acts: Acts::default(), scratch: GradScratch::default() }
    }

    pub fn zero_grads(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = 0.0);
    }

    fn hidden_logical(&self) -> LogicalDims {
        LogicalDims { t_max: self.cfg.max_position_embeddings, w_max: self.cfg.hidden_size }
    }

    fn validate(&self, batch: &Batch) -> Result<(), ModelError> {
        validate_batch(&self.cfg, &self.layout, batch)
    }

    /// Forward pass and loss. `dropout = None` evaluates (no dropout). Saves what backward needs.
    pub fn forward(&mut self, batch: &Batch, dropout: Option<DropoutCtx>) -> Result<ForwardOut, ModelError> {
        self.validate(batch)?;
        let cfg = &self.cfg;
        let (b, t, c, nh) = (batch.b, batch.t, cfg.hidden_size, cfg.num_attention_heads);
        let (bt, inter_size, nl) = (b * t, cfg.intermediate_size, cfg.num_hidden_layers);
        let eps = cfg.layer_norm_eps as f32;
        let hid = self.hidden_logical();
        let attn_logical = LogicalDims { t_max: cfg.max_position_embeddings, w_max: cfg.max_position_embeddings };
        let dims = AttnDims { b, nh, t, hd: cfg.head_dim() };
        let p = &self.params;
        let lay = &self.layout;
        let a = &mut self.acts;
        a.shape = (b, t);
        a.dropout = dropout;

        shaped(&mut a.mask_add, bt);
        for (m, &am) in a.mask_add.iter_mut().zip(&batch.attention_mask) {
            *m = if am != 0 { 0.0 } else { f32::MIN };
        }

        // Embeddings.
        shaped(&mut a.emb_sum, bt * c);
        shaped(&mut a.emb_mean, bt);
        shaped(&mut a.emb_rstd, bt);
        shaped(&mut a.x0, bt * c);
        embedding::embedding_forward(
            &mut a.emb_sum,
            &batch.input_ids,
            &batch.token_type_ids,
            &p[lay.range("embeddings.word_embeddings.weight")],
            &p[lay.range("embeddings.position_embeddings.weight")],
            &p[lay.range("embeddings.token_type_embeddings.weight")],
            b,
            t,
            c,
        );
        layernorm::layernorm_forward(
            &mut a.x0,
            &mut a.emb_mean,
            &mut a.emb_rstd,
            &a.emb_sum,
            &p[lay.range("embeddings.LayerNorm.weight")],
            &p[lay.range("embeddings.LayerNorm.bias")],
            bt,
            c,
            eps,
        );
        let hp = cfg.hidden_dropout_prob;
        let ap = cfg.attention_probs_dropout_prob;
        let spec = |site: DropoutSite, prob: f32| DropoutCtx::spec(dropout, site, prob);
        if let Some(s) = spec(DropoutSite::Embeddings, hp) {
            dropout::dropout_forward(&mut a.x0, &batch.example_ids, 1, t, c, hid, &s);
        }

        // Encoder.
        a.layers.resize_with(nl, LayerActs::default);
        shaped(&mut a.tmp, bt * c);
        shaped(&mut a.tmp2, bt * c);
        for l in 0..nl {
            let lp = lay.layer(l);
            let (prev, rest) = a.layers.split_at_mut(l);
            let la = &mut rest[0];
            let x: &[f32] = if l == 0 { &a.x0 } else { &prev[l - 1].ln2 };
            for (dst, w, bias) in
                [(&mut la.qh, &lp.q_w, &lp.q_b), (&mut la.kh, &lp.k_w, &lp.k_b), (&mut la.vh, &lp.v_w, &lp.v_b)]
            {
                matmul::matmul_forward(&mut a.tmp, x, &p[w.clone()], Some(&p[bias.clone()]), bt, c, c);
                shaped(dst, bt * c);
                attention::split_heads(dst, &a.tmp, dims);
            }
            shaped(&mut la.probs, b * nh * t * t);
            let attn_spec = spec(DropoutSite::AttentionProbs(l), ap);
            shaped(&mut la.probs_drop, if attn_spec.is_some() { b * nh * t * t } else { 0 });
            let attn_drop =
                attn_spec.map(|s| AttnDropout { spec: s, example_ids: &batch.example_ids, logical: attn_logical });
            attention::attention_forward(
                &mut a.tmp2,
                &mut la.probs,
                &mut la.probs_drop,
                &la.qh,
                &la.kh,
                &la.vh,
                &a.mask_add,
                dims,
                attn_drop.as_ref(),
            );
            shaped(&mut la.ctx, bt * c);
            attention::merge_heads(&mut la.ctx, &a.tmp2, dims);
            matmul::matmul_forward(&mut a.tmp, &la.ctx, &p[lp.ao_w.clone()], Some(&p[lp.ao_b.clone()]), bt, c, c);
            if let Some(s) = spec(DropoutSite::AttentionOutput(l), hp) {
                dropout::dropout_forward(&mut a.tmp, &batch.example_ids, 1, t, c, hid, &s);
            }
            shaped(&mut la.res1, bt * c);
            residual::residual_forward(&mut la.res1, &a.tmp, x);
            shaped(&mut la.ln1, bt * c);
            shaped(&mut la.ln1_mean, bt);
            shaped(&mut la.ln1_rstd, bt);
            layernorm::layernorm_forward(
                &mut la.ln1,
                &mut la.ln1_mean,
                &mut la.ln1_rstd,
                &la.res1,
                &p[lp.ln1_w.clone()],
                &p[lp.ln1_b.clone()],
                bt,
                c,
                eps,
            );
            shaped(&mut la.inter, bt * inter_size);
            shaped(&mut la.act, bt * inter_size);
            matmul::matmul_forward(
                &mut la.inter,
                &la.ln1,
                &p[lp.i_w.clone()],
                Some(&p[lp.i_b.clone()]),
                bt,
                c,
                inter_size,
            );
            gelu::gelu_forward(&mut la.act, &la.inter);
            matmul::matmul_forward(
                &mut a.tmp,
                &la.act,
                &p[lp.o_w.clone()],
                Some(&p[lp.o_b.clone()]),
                bt,
                inter_size,
                c,
            );
            if let Some(s) = spec(DropoutSite::FeedForwardOutput(l), hp) {
                dropout::dropout_forward(&mut a.tmp, &batch.example_ids, 1, t, c, hid, &s);
            }
            shaped(&mut la.res2, bt * c);
            residual::residual_forward(&mut la.res2, &a.tmp, &la.ln1);
            shaped(&mut la.ln2, bt * c);
            shaped(&mut la.ln2_mean, bt);
            shaped(&mut la.ln2_rstd, bt);
            layernorm::layernorm_forward(
                &mut la.ln2,
                &mut la.ln2_mean,
                &mut la.ln2_rstd,
                &la.res2,
                &p[lp.ln2_w.clone()],
                &p[lp.ln2_b.clone()],
                bt,
                c,
                eps,
            );
        }
        let h: &[f32] = if nl == 0 { &a.x0 } else { &a.layers[nl - 1].ln2 };

        // Head.
        let (rows_n, classes) = match lay.head {
            Head::Classification { num_labels } => {
                a.rows = (0..b).map(|i| i * t).collect();
                a.targets = batch.labels.clone();
                (b, num_labels)
            }
            Head::MaskedLm => {
                a.rows = (0..bt).filter(|&i| batch.labels[i] != crossentropy::IGNORE_INDEX).collect();
                a.targets = a.rows.iter().map(|&i| batch.labels[i]).collect();
                (a.rows.len(), cfg.vocab_size)
            }
        };
        shaped(&mut a.head_in, rows_n * c);
        shaped(&mut a.head_pre, rows_n * c);
        shaped(&mut a.head_act, rows_n * c);
        shaped(&mut a.head_out, rows_n * c);
        shaped(&mut a.logits, rows_n * classes);
        shaped(&mut a.losses, rows_n);
        gather::gather_rows_forward(&mut a.head_in, h, &a.rows, c);
        match lay.head {
            Head::Classification { num_labels } => {
                matmul::matmul_forward(
                    &mut a.head_pre,
                    &a.head_in,
                    &p[lay.range("pooler.dense.weight")],
                    Some(&p[lay.range("pooler.dense.bias")]),
                    b,
                    c,
                    c,
                );
                tanh::tanh_forward(&mut a.head_act, &a.head_pre);
                a.head_out.copy_from_slice(&a.head_act);
                if let Some(s) = spec(DropoutSite::Classifier { layers: nl }, cfg.classifier_dropout_prob()) {
                    dropout::dropout_forward(&mut a.head_out, &batch.example_ids, 1, 1, c, hid, &s);
                }
                matmul::matmul_forward(
                    &mut a.logits,
                    &a.head_out,
                    &p[lay.range("classifier.weight")],
                    Some(&p[lay.range("classifier.bias")]),
                    b,
                    c,
                    num_labels,
                );
            }
            Head::MaskedLm => {
                shaped(&mut a.head_mean, rows_n);
                shaped(&mut a.head_rstd, rows_n);
                matmul::matmul_forward(
                    &mut a.head_pre,
                    &a.head_in,
                    &p[lay.range("cls.predictions.transform.dense.weight")],
                    Some(&p[lay.range("cls.predictions.transform.dense.bias")]),
                    rows_n,
                    c,
                    c,
                );
                gelu::gelu_forward(&mut a.head_act, &a.head_pre);
                layernorm::layernorm_forward(
                    &mut a.head_out,
                    &mut a.head_mean,
                    &mut a.head_rstd,
                    &a.head_act,
                    &p[lay.range("cls.predictions.transform.LayerNorm.weight")],
                    &p[lay.range("cls.predictions.transform.LayerNorm.bias")],
                    rows_n,
                    c,
                    eps,
                );
                matmul::matmul_forward(
                    &mut a.logits,
                    &a.head_out,
                    &p[lay.range("embeddings.word_embeddings.weight")],
                    Some(&p[lay.range("cls.predictions.bias")]),
                    rows_n,
                    c,
                    cfg.vocab_size,
                );
            }
        }
        let count = crossentropy::crossentropy_forward(&mut a.losses, &a.logits, &a.targets, rows_n, classes);
        let loss_sum = a.losses.iter().map(|&l| f64::from(l)).sum();
        Ok(ForwardOut { loss_sum, count })
    }

    /// The final hidden states `[B*T, C]` of the last forward.
    pub fn last_hidden(&self) -> &[f32] {
        match self.acts.layers.last() {
            Some(l) => &l.ln2,
            None => &self.acts.x0,
        }
    }

    /// The per-target losses of the last forward (0 for ignored targets).
    pub fn losses(&self) -> &[f32] {
        &self.acts.losses
    }

    /// The pooled `[CLS]` outputs `[B, C]` of the last forward (classification head only).
    pub fn pooled(&self) -> &[f32] {
        &self.acts.head_act
    }

    /// Backward of the last [`Bert::forward`] for the loss `sum(per-target losses) * loss_scale`
    /// (`loss_scale = 1 / count` gives the mean). Accumulates into `self.grads`.
    pub fn backward(&mut self, batch: &Batch, loss_scale: f32) {
        self.backward_with(batch, loss_scale, &mut |_, _| {});
    }

    /// `backward`, calling `ready(range, grads)` each time the gradients of a segment of the flat
    /// buffer are final (`Layout::backward_segments`, in that order): the hook that lets the
    /// all-reduce of the layers already done run while backward continues with the rest.
    pub fn backward_with(&mut self, batch: &Batch, loss_scale: f32, ready: &mut dyn FnMut(Range<usize>, &[f32])) {
        let segments = self.layout.backward_segments(self.cfg.num_hidden_layers);
        let mut segments = segments.into_iter();
        let cfg = &self.cfg;
        let (b, t) = self.acts.shape;
        assert_eq!((b, t), (batch.b, batch.t), "backward: batch differs from the last forward");
        let (c, nh, nl, inter_size) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.intermediate_size);
        let bt = b * t;
        let hid = self.hidden_logical();
        let attn_logical = LogicalDims { t_max: cfg.max_position_embeddings, w_max: cfg.max_position_embeddings };
        let dims = AttnDims { b, nh, t, hd: cfg.head_dim() };
        let (hp, ap) = (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob);
        let dropout = self.acts.dropout;
        let spec = |site: DropoutSite, prob: f32| DropoutCtx::spec(dropout, site, prob);
        let p = &self.params;
        let g = &mut self.grads;
        let lay = &self.layout;
        let a = &self.acts;
        let s = &mut self.scratch;
        let rows_n = a.rows.len();

        // Head.
        let classes = a.logits.len() / rows_n.max(1);
        sized(&mut s.d_logits, rows_n * classes);
        crossentropy::crossentropy_backward(&mut s.d_logits, &a.logits, &a.targets, loss_scale, rows_n, classes);
        sized(&mut s.d_head_a, rows_n * c);
        sized(&mut s.d_head_b, rows_n * c);
        sized(&mut s.d_head_c, rows_n * c);
        match lay.head {
            Head::Classification { num_labels } => {
                let [dw, db] = disjoint_mut(g, [lay.range("classifier.weight"), lay.range("classifier.bias")]);
                matmul::matmul_backward(
                    &mut s.d_head_a,
                    dw,
                    Some(db),
                    &s.d_logits,
                    &a.head_out,
                    &p[lay.range("classifier.weight")],
                    b,
                    c,
                    num_labels,
                );
                if let Some(sp) = spec(DropoutSite::Classifier { layers: nl }, cfg.classifier_dropout_prob()) {
                    dropout::dropout_backward(&mut s.d_head_a, &batch.example_ids, 1, 1, c, hid, &sp);
                }
                tanh::tanh_backward(&mut s.d_head_b, &a.head_act, &s.d_head_a);
                let [dw, db] = disjoint_mut(g, [lay.range("pooler.dense.weight"), lay.range("pooler.dense.bias")]);
                matmul::matmul_backward(
                    &mut s.d_head_c,
                    dw,
                    Some(db),
                    &s.d_head_b,
                    &a.head_in,
                    &p[lay.range("pooler.dense.weight")],
                    b,
                    c,
                    c,
                );
            }
            Head::MaskedLm => {
                let v = cfg.vocab_size;
                let [dw, db] = disjoint_mut(
                    g,
                    [lay.range("embeddings.word_embeddings.weight"), lay.range("cls.predictions.bias")],
                );
                matmul::matmul_backward(
                    &mut s.d_head_a,
                    dw,
                    Some(db),
                    &s.d_logits,
                    &a.head_out,
                    &p[lay.range("embeddings.word_embeddings.weight")],
                    rows_n,
                    c,
                    v,
                );
                let [dw, db] = disjoint_mut(
                    g,
                    [
                        lay.range("cls.predictions.transform.LayerNorm.weight"),
                        lay.range("cls.predictions.transform.LayerNorm.bias"),
                    ],
                );
                layernorm::layernorm_backward(
                    &mut s.d_head_b,
                    dw,
                    db,
                    &s.d_head_a,
                    &a.head_act,
                    &p[lay.range("cls.predictions.transform.LayerNorm.weight")],
                    &a.head_mean,
                    &a.head_rstd,
                    rows_n,
                    c,
                );
                s.d_head_a.iter_mut().for_each(|x| *x = 0.0);
                gelu::gelu_backward(&mut s.d_head_a, &a.head_pre, &s.d_head_b);
                let [dw, db] = disjoint_mut(
                    g,
                    [
                        lay.range("cls.predictions.transform.dense.weight"),
                        lay.range("cls.predictions.transform.dense.bias"),
                    ],
                );
                matmul::matmul_backward(
                    &mut s.d_head_c,
                    dw,
                    Some(db),
                    &s.d_head_a,
                    &a.head_in,
                    &p[lay.range("cls.predictions.transform.dense.weight")],
                    rows_n,
                    c,
                    c,
                );
            }
        }
        sized(&mut s.dy, bt * c);
        gather::gather_rows_backward(&mut s.dy, &s.d_head_c, &a.rows, c);
        let head = segments.next().expect("a head segment");
        ready(head.clone(), &g[head]);

        // Encoder, last layer first. `dy` is the gradient of the layer's output.
        for buf in [&mut s.dx, &mut s.d_res, &mut s.d_ln1, &mut s.d_tmp, &mut s.d_ctx, &mut s.d_ctxh] {
            sized(buf, bt * c);
        }
        for buf in [&mut s.dqh, &mut s.dkh, &mut s.dvh] {
            sized(buf, bt * c);
        }
        sized(&mut s.d_act, bt * inter_size);
        sized(&mut s.d_inter, bt * inter_size);
        for l in (0..nl).rev() {
            let lp = lay.layer(l);
            let la = &a.layers[l];
            let x: &[f32] = if l == 0 { &a.x0 } else { &a.layers[l - 1].ln2 };
            let zero = |v: &mut Vec<f32>| v.iter_mut().for_each(|e| *e = 0.0);

            zero(&mut s.d_res);
            let [dw, db] = disjoint_mut(g, [lp.ln2_w.clone(), lp.ln2_b.clone()]);
            layernorm::layernorm_backward(
                &mut s.d_res,
                dw,
                db,
                &s.dy,
                &la.res2,
                &p[lp.ln2_w.clone()],
                &la.ln2_mean,
                &la.ln2_rstd,
                bt,
                c,
            );
            s.d_ln1.copy_from_slice(&s.d_res);
            s.d_tmp.copy_from_slice(&s.d_res);
            if let Some(sp) = spec(DropoutSite::FeedForwardOutput(l), hp) {
                dropout::dropout_backward(&mut s.d_tmp, &batch.example_ids, 1, t, c, hid, &sp);
            }
            zero(&mut s.d_act);
            let [dw, db] = disjoint_mut(g, [lp.o_w.clone(), lp.o_b.clone()]);
            matmul::matmul_backward(
                &mut s.d_act,
                dw,
                Some(db),
                &s.d_tmp,
                &la.act,
                &p[lp.o_w.clone()],
                bt,
                inter_size,
                c,
            );
            zero(&mut s.d_inter);
            gelu::gelu_backward(&mut s.d_inter, &la.inter, &s.d_act);
            let [dw, db] = disjoint_mut(g, [lp.i_w.clone(), lp.i_b.clone()]);
            matmul::matmul_backward(
                &mut s.d_ln1,
                dw,
                Some(db),
                &s.d_inter,
                &la.ln1,
                &p[lp.i_w.clone()],
                bt,
                c,
                inter_size,
            );

            zero(&mut s.d_res);
            let [dw, db] = disjoint_mut(g, [lp.ln1_w.clone(), lp.ln1_b.clone()]);
            layernorm::layernorm_backward(
                &mut s.d_res,
                dw,
                db,
                &s.d_ln1,
                &la.res1,
                &p[lp.ln1_w.clone()],
                &la.ln1_mean,
                &la.ln1_rstd,
                bt,
                c,
            );
            s.dx.copy_from_slice(&s.d_res);
            s.d_tmp.copy_from_slice(&s.d_res);
            if let Some(sp) = spec(DropoutSite::AttentionOutput(l), hp) {
                dropout::dropout_backward(&mut s.d_tmp, &batch.example_ids, 1, t, c, hid, &sp);
            }
            zero(&mut s.d_ctx);
            let [dw, db] = disjoint_mut(g, [lp.ao_w.clone(), lp.ao_b.clone()]);
            matmul::matmul_backward(&mut s.d_ctx, dw, Some(db), &s.d_tmp, &la.ctx, &p[lp.ao_w.clone()], bt, c, c);
            zero(&mut s.d_ctxh);
            attention::merge_heads_backward(&mut s.d_ctxh, &s.d_ctx, dims);
            zero(&mut s.dqh);
            zero(&mut s.dkh);
            zero(&mut s.dvh);
            let attn_drop = spec(DropoutSite::AttentionProbs(l), ap).map(|sp| AttnDropout {
                spec: sp,
                example_ids: &batch.example_ids,
                logical: attn_logical,
            });
            attention::attention_backward(
                &mut s.dqh,
                &mut s.dkh,
                &mut s.dvh,
                &s.d_ctxh,
                &la.probs,
                &la.probs_drop,
                &la.qh,
                &la.kh,
                &la.vh,
                &a.mask_add,
                dims,
                attn_drop.as_ref(),
            );
            // The key bias gets no gradient, exactly: it adds `q_i . b_k` to every score of row i,
            // which the softmax cancels, so its gradient `sum_i (sum_j dS_ij) q_i` is identically
            // zero (each row of the softmax backward sums to zero, dropout and padding included).
            // Computed, it is rounding noise (~1e-11) that Adam's normalisation turns into
            // steps of up to `lr` that depend on the order of float sums, and so on the world
            // size. Leaving it at zero is the exact gradient and keeps the key bias where it was.
            for (dh, w, bias) in
                [(&s.dqh, &lp.q_w, Some(&lp.q_b)), (&s.dkh, &lp.k_w, None), (&s.dvh, &lp.v_w, Some(&lp.v_b))]
            {
                zero(&mut s.d_tmp);
                attention::split_heads_backward(&mut s.d_tmp, dh, dims);
                let (dw, db) = match bias {
                    Some(bias) => {
                        let [dw, db] = disjoint_mut(g, [w.clone(), bias.clone()]);
                        (dw, Some(db))
                    }
                    None => (&mut g[w.clone()], None),
                };
                matmul::matmul_backward(&mut s.dx, dw, db, &s.d_tmp, x, &p[w.clone()], bt, c, c);
            }
            std::mem::swap(&mut s.dy, &mut s.dx);
            let done = segments.next().expect("a segment per layer");
            ready(done.clone(), &g[done]);
        }

        // Embeddings: `dy` now holds the gradient of x0.
        if let Some(sp) = spec(DropoutSite::Embeddings, hp) {
            dropout::dropout_backward(&mut s.dy, &batch.example_ids, 1, t, c, hid, &sp);
        }
        s.d_res.iter_mut().for_each(|e| *e = 0.0);
        let [dw, db] =
            disjoint_mut(g, [lay.range("embeddings.LayerNorm.weight"), lay.range("embeddings.LayerNorm.bias")]);
        layernorm::layernorm_backward(
            &mut s.d_res,
            dw,
            db,
            &s.dy,
            &a.emb_sum,
            &p[lay.range("embeddings.LayerNorm.weight")],
            &a.emb_mean,
            &a.emb_rstd,
            bt,
            c,
        );
        let [dte, dpe, dtt] = disjoint_mut(
            g,
            [
                lay.range("embeddings.word_embeddings.weight"),
                lay.range("embeddings.position_embeddings.weight"),
                lay.range("embeddings.token_type_embeddings.weight"),
            ],
        );
        embedding::embedding_backward(
            dte,
            dpe,
            dtt,
            &s.d_res,
            &batch.input_ids,
            &batch.token_type_ids,
            cfg.pad_token_id,
            b,
            t,
            c,
        );
        let emb = segments.next().expect("an embeddings segment");
        ready(emb.clone(), &g[emb]);
    }
}

/// Checks a batch against the model's shapes and vocabulary (CPU and GPU models alike).
pub(crate) fn validate_batch(cfg: &BertConfig, layout: &Layout, batch: &Batch) -> Result<(), ModelError> {
    let (b, t) = (batch.b, batch.t);
    let bad = |what: String| Err(ModelError::Batch(what));
    if b == 0 || t == 0 {
        return bad("empty batch".into());
    }
    if t > cfg.max_position_embeddings {
        return bad(format!("sequence length {t} exceeds max_position_embeddings {}", cfg.max_position_embeddings));
    }
    if batch.input_ids.len() != b * t || batch.token_type_ids.len() != b * t || batch.attention_mask.len() != b * t {
        return bad(format!("input_ids/token_type_ids/attention_mask must hold B*T = {}", b * t));
    }
    if batch.example_ids.len() != b {
        return bad(format!("example_ids must hold B = {b}"));
    }
    if let Some(&id) = batch.input_ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        return bad(format!("token id {id} outside the vocabulary of {}", cfg.vocab_size));
    }
    if let Some(&tt) = batch.token_type_ids.iter().find(|&&x| x as usize >= cfg.type_vocab_size) {
        return bad(format!("token type {tt} outside type_vocab_size {}", cfg.type_vocab_size));
    }
    let (want, classes) = match layout.head {
        Head::Classification { num_labels } => (b, num_labels),
        Head::MaskedLm => (b * t, cfg.vocab_size),
    };
    if batch.labels.len() != want {
        return bad(format!("labels must hold {want} entries, got {}", batch.labels.len()));
    }
    if let Some(&l) =
        batch.labels.iter().find(|&&l| l != crossentropy::IGNORE_INDEX && !(0..classes as i64).contains(&l))
    {
        return bad(format!("label {l} outside 0..{classes}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::DropoutSite::*;

    #[test]
    fn dropout_sites_keep_their_numbers_and_never_share_one() {
        // The numbers key the masks: changing one changes every result with dropout on.
        let layers = 6;
        let mut ids = vec![Embeddings.id()];
        for l in 0..layers {
            ids.extend([AttentionProbs(l).id(), AttentionOutput(l).id(), FeedForwardOutput(l).id()]);
        }
        ids.push(Classifier { layers }.id());
        assert_eq!(ids, (0..=19).collect::<Vec<u32>>());
    }
}
