//! BERT over one flat parameter buffer and one flat gradient buffer: the op sequence of its
//! forward and backward, written once over [`Ops`] (the CPU's kernels, or the GPU's launchers).
//!
//! The forward pass follows `transformers`' `BertModel` op for op (post-LN encoder):
//!
//! ```text
//! x0      = dropout(LayerNorm(wte[ids] + wtt[types] + wpe[positions]))            [B*T, C]
//! layer l:  q,k,v = x Wq^T + bq, ...                                              [B*T, C]
//!           ctx   = attention(q, k, v, padding and segment mask)  (dropout on probabilities)
//!           ln1   = LayerNorm(dropout(ctx Wao^T + bao) + x)
//!           ln2   = LayerNorm(dropout(gelu(ln1 Wi^T + bi) Wo^T + bo) + ln1)       -> next x
//! classification: logits = dropout(tanh(x[CLS] Wp^T + bp)) Wc^T + bc              [B, L]
//! masked LM:      logits = LayerNorm(gelu(x[r] Wt^T + bt)) wte^T + b_dec          [R, V]
//! loss = mean cross-entropy over the counted targets (ignore_index -100)
//! ```
//!
//! Each dropout site ([`DropoutSite`]: the embeddings, three per layer, the classifier) keys its
//! own masks. Activations are kept from forward for backward in [`Acts`]; buffers keep their
//! size between steps. [`Bert`] is the model on the CPU, `cuda_ops::GpuBert` on a GPU.

use crate::bert_config::BertConfig;
use crate::layout::{Head, Layout};
use crate::ops::{AttnDropout, Cpu, DropRows, Heads, Inputs, Ops, Param};
use crate::ModelError;
use job::config::Precision;
use kernels::attention::AttnDims;
use kernels::crossentropy;
use kernels::dropout::{DropoutSpec, LogicalDims};
use kernels::seqs::SeqsBuf;
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
    /// `[B*T]` each token's position; empty for `0..T` in every row.
    pub position_ids: Vec<u32>,
    /// `[B*T]` each token's document within its row (rows that pack several): a token attends
    /// only within its own. Empty for one document per row.
    pub segment_ids: Vec<u32>,
    /// Each example's index in its dataset: the dropout masks are keyed by it.
    pub example_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// What keys the dropout masks of a training step; `None` in [`Model::forward`] means evaluation.
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
/// every result with dropout on).
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
pub struct LayerActs<B> {
    qh: B,
    kh: B,
    vh: B,
    probs: B,
    probs_drop: B,
    ctx: B,
    res1: B,
    ln1: B,
    ln1_mean: B,
    ln1_rstd: B,
    /// The intermediate dense layer's output until GELU reads it, then GELU's derivative there.
    inter: B,
    act: B,
    res2: B,
    ln2: B,
    ln2_mean: B,
    ln2_rstd: B,
}

/// Activations saved by forward, plus scratch.
#[derive(Default)]
pub struct Acts<B> {
    shape: (usize, usize),
    dropout: Option<DropoutCtx>,
    emb_sum: B,
    emb_mean: B,
    emb_rstd: B,
    x0: B,
    layers: Vec<LayerActs<B>>,
    tmp: B,
    tmp2: B,
    head_in: B,
    /// The masked-LM transform's dense output, then GELU's derivative there.
    head_pre: B,
    head_act: B,
    head_out: B,
    head_mean: B,
    head_rstd: B,
    /// Classification `[B, L]` or masked-LM `[R, V]` logits of the last forward.
    pub logits: B,
    losses: B,
}

/// Gradient scratch for backward.
#[derive(Default)]
struct GradScratch<B> {
    dy: B,
    dx: B,
    d_res: B,
    d_tmp: B,
    d_act: B,
    d_inter: B,
    d_ctx: B,
    d_ctxh: B,
    dqh: B,
    dkh: B,
    dvh: B,
    d_logits: B,
    d_head_a: B,
    d_head_b: B,
    d_head_c: B,
}

/// BERT on one device: its parameters and gradients (flat buffers in the [`Layout`]), the
/// activations of the last forward, and the device's ops.
pub struct Model<O: Ops> {
    pub cfg: BertConfig,
    pub layout: Layout,
    pub params: O::Buf,
    pub grads: O::Buf,
    pub acts: Acts<O::Buf>,
    scratch: GradScratch<O::Buf>,
    /// The last forward's batch, where the ops read it.
    inputs: Option<O::Inputs>,
    pub ops: O,
    /// The dense layers' arithmetic.
    pub precision: Precision,
}

/// BERT on the CPU.
pub type Bert = Model<Cpu>;

/// Backward's hook: `(range, grads)` once the gradients in `range` of the flat buffer are final.
pub type SegmentReady<'a, O> = dyn FnMut(Range<usize>, &<O as Ops>::Buf) -> anyhow::Result<()> + 'a;

fn device(e: anyhow::Error) -> ModelError {
    ModelError::Device(format!("{e:#}"))
}

impl Bert {
    /// A model with all parameters zero; see `checkpoint` for loading and initialisation.
    pub fn zeros(cfg: BertConfig, head: Head) -> Self {
        let layout = Layout::new(&cfg, head);
        let params = vec![0.0; layout.total];
        Model::with_params(Cpu, cfg, layout, params).expect("the CPU's ops do not fail")
    }

    /// The final hidden states `[B*T, C]` of the last forward, zero at padding.
    pub fn last_hidden(&self) -> Vec<f32> {
        let h = match self.acts.layers.last() {
            Some(l) => &l.ln2,
            None => &self.acts.x0,
        };
        let Some(x) = self.inputs.as_ref().filter(|x| !x.padded_at.is_empty()) else {
            return h.clone();
        };
        let c = self.cfg.hidden_size;
        let mut out = vec![0.0; x.b * x.t * c];
        for (row, &at) in x.padded_at.iter().enumerate() {
            out[at * c..(at + 1) * c].copy_from_slice(&h[row * c..(row + 1) * c]);
        }
        out
    }

    /// The per-target losses of the last forward (0 for ignored targets).
    pub fn losses(&self) -> &[f32] {
        &self.acts.losses
    }

    /// The pooled `[CLS]` outputs `[B, C]` of the last forward (classification head only).
    pub fn pooled(&self) -> &[f32] {
        &self.acts.head_act
    }
}

impl<O: Ops> Model<O> {
    /// The model over `params` (already on the device, in `layout`), gradients zero.
    pub fn with_params(ops: O, cfg: BertConfig, layout: Layout, params: O::Buf) -> anyhow::Result<Self> {
        let mut grads = O::Buf::default();
        ops.zeroed(&mut grads, layout.total)?;
        Ok(Model {
            cfg,
            layout,
            params,
            grads,
            acts: Acts::default(),
            scratch: GradScratch::default(),
            inputs: None,
            ops,
            precision: Precision::Fp32,
        })
    }

    pub fn zero_grads(&mut self) -> anyhow::Result<()> {
        self.ops.zero(&mut self.grads)
    }

    /// The logits `[rows, classes]` and per-row losses of the last forward, on the host.
    pub fn outputs(&self) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        Ok((self.ops.to_host(&self.acts.logits)?.into_owned(), self.ops.to_host(&self.acts.losses)?.into_owned()))
    }

    /// Each row's predicted class and loss in the last forward (`[rows]` each): what
    /// evaluation counts.
    pub fn predictions(&self) -> anyhow::Result<(Vec<u32>, Vec<f32>)> {
        let rows = self.inputs.as_ref().map_or(0, |x| O::host_inputs(x).rows.len());
        let classes = match self.layout.head {
            Head::Classification { num_labels } => num_labels,
            Head::MaskedLm => self.cfg.vocab_size,
        };
        let predicted = if rows == 0 { Vec::new() } else { self.ops.argmax_rows(&self.acts.logits, rows, classes)? };
        Ok((predicted, self.ops.to_host(&self.acts.losses)?.into_owned()))
    }

    /// The batch as the ops read it: tokens, positions, segments, the padding mask, and the
    /// head's rows and targets.
    fn inputs_of(&self, batch: &Batch) -> Inputs {
        let (b, t) = (batch.b, batch.t);
        let (rows, targets) = match self.layout.head {
            Head::Classification { .. } => ((0..b).map(|i| i * t).collect(), batch.labels.clone()),
            Head::MaskedLm => {
                let rows: Vec<usize> = (0..b * t).filter(|&i| batch.labels[i] != crossentropy::IGNORE_INDEX).collect();
                let targets = rows.iter().map(|&i| batch.labels[i]).collect();
                (rows, targets)
            }
        };
        let position_ids = match batch.position_ids.is_empty() {
            true => (0..b * t).map(|i| (i % t) as u32).collect(),
            false => batch.position_ids.clone(),
        };
        Inputs {
            b,
            t,
            input_ids: batch.input_ids.clone(),
            token_type_ids: batch.token_type_ids.clone(),
            position_ids,
            segment_ids: batch.segment_ids.clone(),
            mask_add: batch.attention_mask.iter().map(|&m| if m != 0 { 0.0 } else { f32::MIN }).collect(),
            example_ids: batch.example_ids.clone(),
            seqs: SeqsBuf::regular(t, &batch.example_ids),
            padded_at: Vec::new(),
            rows,
            targets,
        }
    }

    /// Forward pass and loss. `dropout = None` evaluates (no dropout). Saves what backward needs.
    pub fn forward(&mut self, batch: &Batch, dropout: Option<DropoutCtx>) -> Result<ForwardOut, ModelError> {
        validate_batch(&self.cfg, &self.layout, batch)?;
        let inputs = self.ops.inputs(self.inputs_of(batch)).map_err(device)?;
        self.inputs = Some(inputs);
        self.acts.shape = (batch.b, batch.t);
        self.acts.dropout = dropout;
        self.forward_ops().map_err(device)
    }

    fn forward_ops(&mut self) -> anyhow::Result<ForwardOut> {
        let Model { cfg, layout, params, acts, inputs, ops, precision, .. } = self;
        let x = inputs.as_ref().expect("inputs of this forward");
        let pass = Pass::new(ops, params, x, cfg, layout, *precision, acts.dropout);
        pass.embeddings_forward(acts)?;
        acts.layers.resize_with(cfg.num_hidden_layers, LayerActs::default);
        let n = pass.bt() * cfg.hidden_size;
        ops.shape(&mut acts.tmp, n)?;
        ops.shape(&mut acts.tmp2, n)?;
        for l in 0..cfg.num_hidden_layers {
            pass.layer_forward(acts, l)?;
        }
        pass.head_forward(acts)
    }

    /// Backward of the last [`Model::forward`] for the loss `sum(per-target losses) *
    /// loss_scale` (`loss_scale = 1 / count` gives the mean). Accumulates into `self.grads`.
    pub fn backward(&mut self, batch: &Batch, loss_scale: f32) -> Result<(), ModelError> {
        self.backward_with(batch, loss_scale, &mut |_, _| Ok(()))
    }

    /// `backward`, calling `ready(range, grads)` each time the gradients of a segment of the flat
    /// buffer are final (`Layout::backward_segments`, in that order: head, last layer .. first,
    /// embeddings), with the work that produced them issued: the hook that lets the all-reduce of
    /// the layers already done run while backward continues with the rest.
    pub fn backward_with(
        &mut self,
        batch: &Batch,
        loss_scale: f32,
        ready: &mut SegmentReady<'_, O>,
    ) -> Result<(), ModelError> {
        assert_eq!(self.acts.shape, (batch.b, batch.t), "backward: batch differs from the last forward");
        self.backward_ops(loss_scale, ready).map_err(device)
    }

    fn backward_ops(&mut self, loss_scale: f32, ready: &mut SegmentReady<'_, O>) -> anyhow::Result<()> {
        let Model { cfg, layout, params, grads, acts, scratch: s, inputs, ops, precision, .. } = self;
        let x = inputs.as_ref().expect("backward follows a forward");
        let pass = Pass::new(ops, params, x, cfg, layout, *precision, acts.dropout);
        let nl = cfg.num_hidden_layers;
        let mut segments = layout.backward_segments(nl).into_iter();
        pass.head_backward(acts, s, grads, loss_scale)?;
        ready(segments.next().expect("a head segment"), grads)?;

        // Every op writes the input gradient it produces whole: the scratch needs no zeroing.
        let (n, ni) = (pass.bt() * cfg.hidden_size, pass.bt() * cfg.intermediate_size);
        for buf in
            [&mut s.dx, &mut s.d_res, &mut s.d_tmp, &mut s.d_ctx, &mut s.d_ctxh, &mut s.dqh, &mut s.dkh, &mut s.dvh]
        {
            ops.shape(buf, n)?;
        }
        ops.shape(&mut s.d_act, ni)?;
        ops.shape(&mut s.d_inter, ni)?;
        for l in (0..nl).rev() {
            pass.layer_backward(acts, s, grads, l)?;
            std::mem::swap(&mut s.dy, &mut s.dx);
            ready(segments.next().expect("a segment per layer"), grads)?;
        }
        pass.embeddings_backward(acts, s, grads)?;
        ready(segments.next().expect("an embeddings segment"), grads)
    }
}

/// One forward or backward pass: the ops, the parameters, the batch, and what the pass's
/// shapes and dropout masks derive from.
struct Pass<'a, O: Ops> {
    o: &'a O,
    p: &'a O::Buf,
    x: &'a O::Inputs,
    cfg: &'a BertConfig,
    lay: &'a Layout,
    precision: Precision,
    dropout: Option<DropoutCtx>,
}

impl<'a, O: Ops> Pass<'a, O> {
    fn new(
        o: &'a O,
        p: &'a O::Buf,
        x: &'a O::Inputs,
        cfg: &'a BertConfig,
        lay: &'a Layout,
        precision: Precision,
        dropout: Option<DropoutCtx>,
    ) -> Self {
        Pass { o, p, x, cfg, lay, precision, dropout }
    }

    fn host(&self) -> &Inputs {
        O::host_inputs(self.x)
    }

    /// Token rows (the batch's real tokens where the ops unpad).
    fn bt(&self) -> usize {
        self.host().tokens()
    }

    fn dims(&self) -> AttnDims {
        let (cfg, h) = (self.cfg, self.host());
        AttnDims { b: h.b, nh: cfg.num_attention_heads, t: h.t, hd: cfg.head_dim() }
    }

    fn r(&self, name: &str) -> Param {
        self.lay.range(name)
    }

    /// The mask of the hidden-state dropout at `site`, if the pass has one there.
    fn drop_spec(&self, site: DropoutSite) -> Option<DropoutSpec> {
        let p = match site {
            DropoutSite::Classifier { .. } => self.cfg.classifier_dropout_prob(),
            _ => self.cfg.hidden_dropout_prob,
        };
        DropoutCtx::spec(self.dropout, site, p)
    }

    /// Hidden-state dropout at `site` (forward, or its `backward`) on `buf: [rows, C]`, if the
    /// pass has one there.
    fn drop(&self, buf: &mut O::Buf, site: DropoutSite, rows: DropRows, backward: bool) -> anyhow::Result<()> {
        let Some(spec) = self.drop_spec(site) else { return Ok(()) };
        let c = self.cfg.hidden_size;
        let logical = LogicalDims { t_max: self.cfg.max_position_embeddings, w_max: c };
        self.o.dropout(buf, self.x, rows, c, logical, &spec, backward)
    }

    fn attn_drop(&self, l: usize) -> Option<AttnDropout> {
        let t_max = self.cfg.max_position_embeddings;
        DropoutCtx::spec(self.dropout, DropoutSite::AttentionProbs(l), self.cfg.attention_probs_dropout_prob)
            .map(|spec| AttnDropout { spec, logical: LogicalDims { t_max, w_max: t_max } })
    }

    #[allow(clippy::too_many_arguments)]
    fn dense(
        &self,
        out: &mut O::Buf,
        inp: &O::Buf,
        w: Param,
        bias: Param,
        n: usize,
        c: usize,
        oc: usize,
    ) -> anyhow::Result<()> {
        self.o.dense_forward(out, inp, self.p, w, Some(bias), n, c, oc, self.precision)
    }

    /// A dense layer's backward: `dinp` written, or with `accumulate` added to (the input's
    /// other consumer, a residual, has written its share).
    #[allow(clippy::too_many_arguments)]
    fn dense_back(
        &self,
        dinp: &mut O::Buf,
        g: &mut O::Buf,
        dout: &O::Buf,
        inp: &O::Buf,
        w: Param,
        bias: Option<Param>,
        (n, c, oc): (usize, usize, usize),
        accumulate: bool,
    ) -> anyhow::Result<()> {
        self.o.dense_backward(dinp, g, dout, inp, self.p, w, bias, n, c, oc, self.precision, accumulate)
    }

    /// The gradient that reaches a hidden-state dropout's input at `site` from `grad` (of its
    /// output): `grad` itself where the pass has no dropout there, else the masked copy in `tmp`.
    fn drop_back<'b>(&self, grad: &'b O::Buf, tmp: &'b mut O::Buf, site: DropoutSite) -> anyhow::Result<&'b O::Buf> {
        if self.drop_spec(site).is_none() {
            return Ok(grad);
        }
        self.o.copy(tmp, grad)?;
        self.drop(tmp, site, DropRows::Tokens, true)?;
        Ok(tmp)
    }

    /// The word, position and token-type tables.
    fn embedding_tables(&self) -> [Param; 3] {
        ["word_embeddings", "position_embeddings", "token_type_embeddings"]
            .map(|t| self.r(&format!("embeddings.{t}.weight")))
    }

    fn embeddings_forward(&self, a: &mut Acts<O::Buf>) -> anyhow::Result<()> {
        let (o, bt, c) = (self.o, self.bt(), self.cfg.hidden_size);
        o.shape(&mut a.emb_sum, bt * c)?;
        o.shape(&mut a.emb_mean, bt)?;
        o.shape(&mut a.emb_rstd, bt)?;
        o.shape(&mut a.x0, bt * c)?;
        o.embedding_forward(&mut a.emb_sum, self.x, self.p, self.embedding_tables(), c)?;
        let (w, b) = (self.r("embeddings.LayerNorm.weight"), self.r("embeddings.LayerNorm.bias"));
        let eps = self.cfg.layer_norm_eps as f32;
        o.layernorm_forward(&mut a.x0, &mut a.emb_mean, &mut a.emb_rstd, &a.emb_sum, self.p, w, b, bt, c, eps)?;
        self.drop(&mut a.x0, DropoutSite::Embeddings, DropRows::Tokens, false)
    }

    fn layer_forward(&self, a: &mut Acts<O::Buf>, l: usize) -> anyhow::Result<()> {
        let (o, p, cfg) = (self.o, self.p, self.cfg);
        let (bt, c, inter) = (self.bt(), cfg.hidden_size, cfg.intermediate_size);
        let (eps, dims, lp) = (cfg.layer_norm_eps as f32, self.dims(), self.lay.layer(l));
        let (prev, rest) = a.layers.split_at_mut(l);
        let la = &mut rest[0];
        let x = if l == 0 { &a.x0 } else { &prev[l - 1].ln2 };
        for (dst, w, bias) in
            [(&mut la.qh, &lp.q_w, &lp.q_b), (&mut la.kh, &lp.k_w, &lp.k_b), (&mut la.vh, &lp.v_w, &lp.v_b)]
        {
            self.dense(&mut a.tmp, x, w.clone(), bias.clone(), bt, c, c)?;
            o.shape(dst, bt * c)?;
            o.heads(Heads::Split, dst, &a.tmp, self.x, dims)?;
        }
        let probs_n = self.host().probs_len(dims.nh);
        let drop = self.attn_drop(l);
        o.shape(&mut la.probs, probs_n)?;
        o.shape(&mut la.probs_drop, if drop.is_some() { probs_n } else { 0 })?;
        let qkv = [&la.qh, &la.kh, &la.vh];
        o.attention_forward(&mut a.tmp2, &mut la.probs, &mut la.probs_drop, qkv, self.x, dims, drop)?;
        o.shape(&mut la.ctx, bt * c)?;
        o.heads(Heads::Merge, &mut la.ctx, &a.tmp2, self.x, dims)?;
        self.dense(&mut a.tmp, &la.ctx, lp.ao_w.clone(), lp.ao_b.clone(), bt, c, c)?;
        self.drop(&mut a.tmp, DropoutSite::AttentionOutput(l), DropRows::Tokens, false)?;
        o.shape(&mut la.res1, bt * c)?;
        o.residual_forward(&mut la.res1, &a.tmp, x)?;
        o.shape(&mut la.ln1, bt * c)?;
        o.shape(&mut la.ln1_mean, bt)?;
        o.shape(&mut la.ln1_rstd, bt)?;
        let (w, b) = (lp.ln1_w.clone(), lp.ln1_b.clone());
        o.layernorm_forward(&mut la.ln1, &mut la.ln1_mean, &mut la.ln1_rstd, &la.res1, p, w, b, bt, c, eps)?;
        o.shape(&mut la.inter, bt * inter)?;
        o.shape(&mut la.act, bt * inter)?;
        self.dense(&mut la.inter, &la.ln1, lp.i_w.clone(), lp.i_b.clone(), bt, c, inter)?;
        o.gelu_forward(&mut la.act, &mut la.inter)?; // `inter` now holds gelu'(inter)
        self.dense(&mut a.tmp, &la.act, lp.o_w.clone(), lp.o_b.clone(), bt, inter, c)?;
        self.drop(&mut a.tmp, DropoutSite::FeedForwardOutput(l), DropRows::Tokens, false)?;
        o.shape(&mut la.res2, bt * c)?;
        o.residual_forward(&mut la.res2, &a.tmp, &la.ln1)?;
        o.shape(&mut la.ln2, bt * c)?;
        o.shape(&mut la.ln2_mean, bt)?;
        o.shape(&mut la.ln2_rstd, bt)?;
        let (w, b) = (lp.ln2_w.clone(), lp.ln2_b.clone());
        o.layernorm_forward(&mut la.ln2, &mut la.ln2_mean, &mut la.ln2_rstd, &la.res2, p, w, b, bt, c, eps)
    }

    fn classes(&self) -> usize {
        match self.lay.head {
            Head::Classification { num_labels } => num_labels,
            Head::MaskedLm => self.cfg.vocab_size,
        }
    }

    fn head_forward(&self, a: &mut Acts<O::Buf>) -> anyhow::Result<ForwardOut> {
        let (o, c, nl) = (self.o, self.cfg.hidden_size, self.cfg.num_hidden_layers);
        let (rows_n, classes) = (self.host().rows.len(), self.classes());
        for buf in [&mut a.head_in, &mut a.head_pre, &mut a.head_act, &mut a.head_out] {
            o.shape(buf, rows_n * c)?;
        }
        o.shape(&mut a.logits, rows_n * classes)?;
        o.shape(&mut a.losses, rows_n)?;
        if rows_n > 0 {
            let h = match a.layers.last() {
                Some(last) => &last.ln2,
                None => &a.x0,
            };
            o.gather_rows_forward(&mut a.head_in, h, self.x, c)?;
            match self.lay.head {
                Head::Classification { num_labels } => {
                    let (w, b) = (self.r("pooler.dense.weight"), self.r("pooler.dense.bias"));
                    self.dense(&mut a.head_pre, &a.head_in, w, b, rows_n, c, c)?;
                    o.tanh_forward(&mut a.head_act, &a.head_pre)?;
                    o.copy(&mut a.head_out, &a.head_act)?;
                    self.drop(&mut a.head_out, DropoutSite::Classifier { layers: nl }, DropRows::Head, false)?;
                    let (w, b) = (self.r("classifier.weight"), self.r("classifier.bias"));
                    self.dense(&mut a.logits, &a.head_out, w, b, rows_n, c, num_labels)?;
                }
                Head::MaskedLm => {
                    o.shape(&mut a.head_mean, rows_n)?;
                    o.shape(&mut a.head_rstd, rows_n)?;
                    let w = self.r("cls.predictions.transform.dense.weight");
                    let b = self.r("cls.predictions.transform.dense.bias");
                    self.dense(&mut a.head_pre, &a.head_in, w, b, rows_n, c, c)?;
                    o.gelu_forward(&mut a.head_act, &mut a.head_pre)?;
                    let w = self.r("cls.predictions.transform.LayerNorm.weight");
                    let b = self.r("cls.predictions.transform.LayerNorm.bias");
                    let eps = self.cfg.layer_norm_eps as f32;
                    let (mean, rstd) = (&mut a.head_mean, &mut a.head_rstd);
                    o.layernorm_forward(&mut a.head_out, mean, rstd, &a.head_act, self.p, w, b, rows_n, c, eps)?;
                    let (w, b) = (self.r("embeddings.word_embeddings.weight"), self.r("cls.predictions.bias"));
                    self.dense(&mut a.logits, &a.head_out, w, b, rows_n, c, classes)?;
                }
            }
            o.crossentropy_forward(&mut a.losses, &a.logits, self.x, rows_n, classes)?;
        }
        let loss_sum = o.to_host(&a.losses)?.iter().map(|&l| f64::from(l)).sum();
        Ok(ForwardOut { loss_sum, count: self.host().counted() })
    }

    fn head_backward(
        &self,
        a: &Acts<O::Buf>,
        s: &mut GradScratch<O::Buf>,
        g: &mut O::Buf,
        loss_scale: f32,
    ) -> anyhow::Result<()> {
        let (o, c, nl) = (self.o, self.cfg.hidden_size, self.cfg.num_hidden_layers);
        let (rows_n, classes) = (self.host().rows.len(), self.classes());
        if rows_n == 0 {
            return o.zeroed(&mut s.dy, self.bt() * c);
        }
        o.shape(&mut s.dy, self.bt() * c)?;
        o.shape(&mut s.d_logits, rows_n * classes)?;
        o.crossentropy_backward(&mut s.d_logits, &a.logits, self.x, loss_scale, rows_n, classes)?;
        for buf in [&mut s.d_head_a, &mut s.d_head_b, &mut s.d_head_c] {
            o.shape(buf, rows_n * c)?;
        }
        match self.lay.head {
            Head::Classification { num_labels } => {
                let (w, b) = (self.r("classifier.weight"), self.r("classifier.bias"));
                let shape = (rows_n, c, num_labels);
                self.dense_back(&mut s.d_head_a, g, &s.d_logits, &a.head_out, w, Some(b), shape, false)?;
                self.drop(&mut s.d_head_a, DropoutSite::Classifier { layers: nl }, DropRows::Head, true)?;
                o.tanh_backward(&mut s.d_head_b, &a.head_act, &s.d_head_a)?;
                let (w, b) = (self.r("pooler.dense.weight"), self.r("pooler.dense.bias"));
                self.dense_back(&mut s.d_head_c, g, &s.d_head_b, &a.head_in, w, Some(b), (rows_n, c, c), false)?;
            }
            Head::MaskedLm => {
                let (w, b) = (self.r("embeddings.word_embeddings.weight"), self.r("cls.predictions.bias"));
                let shape = (rows_n, c, classes);
                self.dense_back(&mut s.d_head_a, g, &s.d_logits, &a.head_out, w, Some(b), shape, false)?;
                let ln = [
                    self.r("cls.predictions.transform.LayerNorm.weight"),
                    self.r("cls.predictions.transform.LayerNorm.bias"),
                ];
                let (mean, rstd) = (&a.head_mean, &a.head_rstd);
                o.layernorm_backward(&mut s.d_head_b, g, &s.d_head_a, &a.head_act, self.p, ln, mean, rstd, rows_n, c)?;
                o.gelu_backward(&mut s.d_head_a, &a.head_pre, &s.d_head_b)?;
                let w = self.r("cls.predictions.transform.dense.weight");
                let b = self.r("cls.predictions.transform.dense.bias");
                self.dense_back(&mut s.d_head_c, g, &s.d_head_a, &a.head_in, w, Some(b), (rows_n, c, c), false)?;
            }
        }
        o.gather_rows_backward(&mut s.dy, &s.d_head_c, self.x, c)
    }

    /// Layer `l`'s backward: `s.dy` holds the gradient of its output, `s.dx` receives its input's.
    fn layer_backward(
        &self,
        a: &Acts<O::Buf>,
        s: &mut GradScratch<O::Buf>,
        g: &mut O::Buf,
        l: usize,
    ) -> anyhow::Result<()> {
        let (o, p, cfg) = (self.o, self.p, self.cfg);
        let (bt, c, inter) = (self.bt(), cfg.hidden_size, cfg.intermediate_size);
        let (dims, lp, la) = (self.dims(), self.lay.layer(l), &a.layers[l]);
        let x = if l == 0 { &a.x0 } else { &a.layers[l - 1].ln2 };

        let ln = [lp.ln2_w.clone(), lp.ln2_b.clone()];
        o.layernorm_backward(&mut s.d_res, g, &s.dy, &la.res2, p, ln, &la.ln2_mean, &la.ln2_rstd, bt, c)?;
        let d_ff = self.drop_back(&s.d_res, &mut s.d_tmp, DropoutSite::FeedForwardOutput(l))?;
        let (o_w, o_b) = (lp.o_w.clone(), Some(lp.o_b.clone()));
        self.dense_back(&mut s.d_act, g, d_ff, &la.act, o_w, o_b, (bt, inter, c), false)?;
        o.gelu_backward(&mut s.d_inter, &la.inter, &s.d_act)?;
        // `d_res` becomes ln1's gradient: its residual share plus the intermediate layer's.
        let (i_w, i_b) = (lp.i_w.clone(), Some(lp.i_b.clone()));
        self.dense_back(&mut s.d_res, g, &s.d_inter, &la.ln1, i_w, i_b, (bt, c, inter), true)?;

        let ln = [lp.ln1_w.clone(), lp.ln1_b.clone()];
        o.layernorm_backward(&mut s.dx, g, &s.d_res, &la.res1, p, ln, &la.ln1_mean, &la.ln1_rstd, bt, c)?;
        let d_ao = self.drop_back(&s.dx, &mut s.d_tmp, DropoutSite::AttentionOutput(l))?;
        let (ao_w, ao_b) = (lp.ao_w.clone(), Some(lp.ao_b.clone()));
        self.dense_back(&mut s.d_ctx, g, d_ao, &la.ctx, ao_w, ao_b, (bt, c, c), false)?;
        o.heads(Heads::Split, &mut s.d_ctxh, &s.d_ctx, self.x, dims)?; // merge's backward
        let (dqkv, qkv) = ([&mut s.dqh, &mut s.dkh, &mut s.dvh], [&la.qh, &la.kh, &la.vh]);
        o.attention_backward(dqkv, &s.d_ctxh, &la.probs, &la.probs_drop, qkv, self.x, dims, self.attn_drop(l))?;
        // The key bias gets no gradient, exactly: it adds `q_i . b_k` to every score of row i,
        // which the softmax cancels, so its gradient `sum_i (sum_j dS_ij) q_i` is identically
        // zero (each row of the softmax backward sums to zero, dropout and padding included).
        // Computed, it is rounding noise (~1e-11) that Adam's normalisation turns into
        // steps of up to `lr` that depend on the order of float sums, and so on the world
        // size. Leaving it at zero is the exact gradient and keeps the key bias where it was.
        // `dx`, the layer input's gradient, holds the residual's share: q, k and v add theirs.
        for (dh, w, bias) in
            [(&s.dqh, &lp.q_w, Some(&lp.q_b)), (&s.dkh, &lp.k_w, None), (&s.dvh, &lp.v_w, Some(&lp.v_b))]
        {
            o.heads(Heads::Merge, &mut s.d_tmp, dh, self.x, dims)?; // split's backward
            self.dense_back(&mut s.dx, g, &s.d_tmp, x, w.clone(), bias.cloned(), (bt, c, c), true)?;
        }
        Ok(())
    }

    /// `s.dy` holds the gradient of `x0`.
    fn embeddings_backward(&self, a: &Acts<O::Buf>, s: &mut GradScratch<O::Buf>, g: &mut O::Buf) -> anyhow::Result<()> {
        let (o, bt, c) = (self.o, self.bt(), self.cfg.hidden_size);
        self.drop(&mut s.dy, DropoutSite::Embeddings, DropRows::Tokens, true)?;
        let ln = [self.r("embeddings.LayerNorm.weight"), self.r("embeddings.LayerNorm.bias")];
        o.layernorm_backward(&mut s.d_res, g, &s.dy, &a.emb_sum, self.p, ln, &a.emb_mean, &a.emb_rstd, bt, c)?;
        o.embedding_backward(g, self.embedding_tables(), &s.d_res, self.x, self.cfg.pad_token_id, c)
    }
}

/// Checks a batch against the model's shapes and vocabulary.
fn validate_batch(cfg: &BertConfig, layout: &Layout, batch: &Batch) -> Result<(), ModelError> {
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
    if !batch.position_ids.is_empty() && batch.position_ids.len() != b * t {
        return bad(format!("position_ids must hold B*T = {} (or none)", b * t));
    }
    if let Some(&p) = batch.position_ids.iter().find(|&&p| p as usize >= cfg.max_position_embeddings) {
        return bad(format!("position {p} outside max_position_embeddings {}", cfg.max_position_embeddings));
    }
    if !batch.segment_ids.is_empty() && batch.segment_ids.len() != b * t {
        return bad(format!("segment_ids must hold B*T = {} (or none)", b * t));
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
