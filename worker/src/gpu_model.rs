//! BERT on one GPU: the CPU model's forward and backward (model.rs), op for op and in the same
//! order, over device buffers, through the launchers of `kernels::device` (which `worker
//! gpu-check` verifies against the CPU one by one). Parameters, gradients and AdamW's moments
//! are each one flat device buffer in the CPU layout, so a checkpoint moves between the two
//! models as one copy.
//!
//! Activations are allocated per forward from the stream's pool (`alloc_zeros`) and kept for
//! backward. fp32, or with `train.precision = "bf16"` the dense layers' GEMMs in bf16 (f32
//! master weights, gradients and AdamW). The dropout masks are the CPU's bit
//! for bit (same Philox counters), so a GPU run and a CPU run of the same step differ only by
//! the order of the GEMMs' sums.
//!
//! Compiled everywhere; it runs only where there is a GPU (scripts/gpu-check.sh: `worker
//! gpu-check --train` compares its losses with the CPU model's over training steps).

use crate::bert_config::BertConfig;
use crate::layout::{Head, Layout};
use crate::model::{validate_batch, Batch, DropoutCtx, DropoutSite, ForwardOut};
use crate::ModelError;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use job::config::Precision;
use kernels::adamw::AdamWParams;
use kernels::attention::AttnDims;
use kernels::crossentropy::IGNORE_INDEX;
use kernels::device::{self, Bf16, DeviceAttnDropout, RowGroups};
use kernels::dropout::LogicalDims;
use kernels::gpu::{Gpu, GpuError};
use std::ops::Range;
use std::sync::Arc;

type Buf = CudaSlice<f32>;

/// The dense layers of one pass: f32 GEMMs, or bf16 ones against the bf16 twin of the
/// parameters (`train.precision = "bf16"`).
struct Dense<'a> {
    g: &'a Gpu,
    p: &'a Buf,
    p16: Option<&'a CudaSlice<Bf16>>,
}

impl Dense<'_> {
    #[allow(clippy::too_many_arguments)]
    fn fwd(
        &self,
        out: &mut CudaViewMut<'_, f32>,
        inp: &CudaView<'_, f32>,
        w: Range<usize>,
        bias: Option<Range<usize>>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<(), GpuError> {
        let b = bias.map(|r| self.p.slice(r));
        match self.p16 {
            Some(p16) => device::matmul_forward_bf16(self.g, out, inp, &p16.slice(w), b.as_ref(), n, c, oc),
            None => device::matmul_forward(self.g, out, inp, &self.p.slice(w), b.as_ref(), n, c, oc),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn bwd(
        &self,
        dinp: &mut CudaViewMut<'_, f32>,
        dw: &mut CudaViewMut<'_, f32>,
        db: Option<&mut CudaViewMut<'_, f32>>,
        dout: &CudaView<'_, f32>,
        inp: &CudaView<'_, f32>,
        w: Range<usize>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<(), GpuError> {
        match self.p16 {
            Some(p16) => device::matmul_backward_bf16(self.g, dinp, dw, db, dout, inp, &p16.slice(w), n, c, oc),
            None => device::matmul_backward(self.g, dinp, dw, db, dout, inp, &self.p.slice(w), n, c, oc),
        }
    }
}

struct LayerActs {
    qh: Buf,
    kh: Buf,
    vh: Buf,
    probs: Buf,
    probs_drop: Buf,
    ctx: Buf,
    res1: Buf,
    ln1: Buf,
    ln1_mean: Buf,
    ln1_rstd: Buf,
    inter: Buf,
    act: Buf,
    res2: Buf,
    ln2: Buf,
    ln2_mean: Buf,
    ln2_rstd: Buf,
}

/// What a forward keeps for backward.
struct Acts {
    b: usize,
    t: usize,
    dropout: Option<DropoutCtx>,
    input_ids: Vec<u32>,
    token_type_ids: Vec<u32>,
    example_ids: CudaSlice<u32>,
    emb_sum: Buf,
    emb_mean: Buf,
    emb_rstd: Buf,
    x0: Buf,
    layers: Vec<LayerActs>,
    rows: Vec<usize>,
    targets: CudaSlice<i64>,
    head_in: Buf,
    head_pre: Buf,
    head_act: Buf,
    head_out: Buf,
    head_mean: Buf,
    head_rstd: Buf,
    logits: Buf,
    classes: usize,
}

/// BERT's parameters, gradients and activations on one GPU.
pub struct GpuBert {
    pub gpu: Arc<Gpu>,
    pub cfg: BertConfig,
    pub layout: Layout,
    pub params: Buf,
    pub grads: Buf,
    /// With `Precision::Bf16`: the parameters rounded to bf16, refreshed after every update.
    params16: Option<CudaSlice<Bf16>>,
    acts: Option<Acts>,
    /// The per-row losses of the last forward (host copy).
    last_losses: Vec<f32>,
}

/// Runs `f` with mutable views of two disjoint ranges of `buf` (a weight's and its bias's
/// gradients, say).
fn with_two<R>(
    buf: &mut Buf,
    a: Range<usize>,
    b: Range<usize>,
    f: impl FnOnce(&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>) -> R,
) -> R {
    assert!(a.end <= b.start || b.end <= a.start, "with_two: ranges overlap");
    if a.start < b.start {
        let (mut lo, mut hi) = buf.split_at_mut(b.start);
        let mut va = lo.slice_mut(a.clone());
        let mut vb = hi.slice_mut(0..b.len());
        f(&mut va, &mut vb)
    } else {
        let (mut lo, mut hi) = buf.split_at_mut(a.start);
        let mut vb = lo.slice_mut(b.clone());
        let mut va = hi.slice_mut(0..a.len());
        f(&mut va, &mut vb)
    }
}

impl GpuBert {
    /// The model with these parameters (the CPU layout's flat buffer) uploaded to `gpu`.
    pub fn new(gpu: Arc<Gpu>, cfg: BertConfig, layout: Layout, params: &[f32]) -> Result<Self, GpuError> {
        assert_eq!(params.len(), layout.total, "GpuBert::new: params must follow the layout");
        let d_params = gpu.upload(params)?;
        let grads = gpu.stream.alloc_zeros::<f32>(layout.total)?;
        Ok(GpuBert { gpu, cfg, layout, params: d_params, grads, params16: None, acts: None, last_losses: Vec::new() })
    }

    /// Chooses the dense layers' arithmetic (f32 by default).
    pub fn set_precision(&mut self, precision: Precision) -> Result<(), GpuError> {
        self.params16 = match precision {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(self.gpu.stream.alloc_zeros::<Bf16>(self.layout.total)?),
        };
        self.refresh_bf16()
    }

    /// Re-rounds the bf16 twin of the parameters (after they changed).
    pub fn refresh_bf16(&mut self) -> Result<(), GpuError> {
        if let Some(p16) = self.params16.as_mut() {
            device::cast_to_bf16(&self.gpu, &mut p16.as_view_mut(), &self.params.as_view())?;
        }
        Ok(())
    }

    pub fn zero_grads(&mut self) -> Result<(), GpuError> {
        self.gpu.stream.memset_zeros(&mut self.grads)?;
        Ok(())
    }

    /// Replaces the parameters (the layout's flat buffer).
    pub fn upload_params(&mut self, params: &[f32]) -> Result<(), GpuError> {
        assert_eq!(params.len(), self.layout.total, "upload_params: params must follow the layout");
        self.gpu.stream.memcpy_htod(params, &mut self.params)?;
        self.refresh_bf16()
    }

    /// The parameters, back on the host (for checkpoints).
    pub fn download_params(&self) -> Result<Vec<f32>, GpuError> {
        self.gpu.download(&self.params)
    }

    pub fn download_grads(&self) -> Result<Vec<f32>, GpuError> {
        self.gpu.download(&self.grads)
    }

    /// The logits `[rows, classes]` of the last forward.
    pub fn logits(&self) -> Result<Vec<f32>, GpuError> {
        let a = self.acts.as_ref().expect("logits follow a forward");
        let mut l = self.gpu.download(&a.logits)?;
        l.truncate(a.rows.len() * a.classes);
        Ok(l)
    }

    /// The per-row losses of the last forward.
    pub fn losses(&self) -> &[f32] {
        &self.last_losses
    }

    fn z(&self, n: usize) -> Result<Buf, GpuError> {
        Ok(self.gpu.stream.alloc_zeros::<f32>(n.max(1))?)
    }

    /// Forward pass and loss, as `Bert::forward`. `dropout = None` evaluates.
    pub fn forward(&mut self, batch: &Batch, dropout: Option<DropoutCtx>) -> Result<ForwardOut, ModelError> {
        validate_batch(&self.cfg, &self.layout, batch)?;
        self.forward_device(batch, dropout).map_err(|e| ModelError::Device(e.to_string()))
    }

    fn forward_device(&mut self, batch: &Batch, dropout: Option<DropoutCtx>) -> Result<ForwardOut, GpuError> {
        let gpu = Arc::clone(&self.gpu);
        let g = &*gpu;
        let cfg = &self.cfg;
        let (b, t, c, nh) = (batch.b, batch.t, cfg.hidden_size, cfg.num_attention_heads);
        let (bt, inter_size, nl) = (b * t, cfg.intermediate_size, cfg.num_hidden_layers);
        let eps = cfg.layer_norm_eps as f32;
        let hid = LogicalDims { t_max: cfg.max_position_embeddings, w_max: c };
        let attn_logical = LogicalDims { t_max: cfg.max_position_embeddings, w_max: cfg.max_position_embeddings };
        let dims = AttnDims { b, nh, t, hd: cfg.head_dim() };
        let (hp, ap) = (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob);
        let spec = |site: DropoutSite, prob: f32| DropoutCtx::spec(dropout, site, prob);
        let lay = &self.layout;
        let p = &self.params;
        let pv = |r: Range<usize>| p.slice(r);
        let dense = Dense { g, p, p16: self.params16.as_ref() };

        let mask_host: Vec<f32> = batch.attention_mask.iter().map(|&m| if m != 0 { 0.0 } else { f32::MIN }).collect();
        let mask_add = g.upload(&mask_host)?;
        let ids = g.upload(&batch.input_ids)?;
        let types = g.upload(&batch.token_type_ids)?;
        let example_ids = g.upload(&batch.example_ids)?;
        let exv = example_ids.as_view();

        // Embeddings.
        let mut emb_sum = self.z(bt * c)?;
        device::embedding_forward(
            g,
            &mut emb_sum.as_view_mut(),
            &ids.as_view(),
            &types.as_view(),
            &pv(lay.range("embeddings.word_embeddings.weight")),
            &pv(lay.range("embeddings.position_embeddings.weight")),
            &pv(lay.range("embeddings.token_type_embeddings.weight")),
            b,
            t,
            c,
        )?;
        let (mut x0, mut emb_mean, mut emb_rstd) = (self.z(bt * c)?, self.z(bt)?, self.z(bt)?);
        device::layernorm_forward(
            g,
            &mut x0.as_view_mut(),
            &mut emb_mean.as_view_mut(),
            &mut emb_rstd.as_view_mut(),
            &emb_sum.as_view(),
            &pv(lay.range("embeddings.LayerNorm.weight")),
            &pv(lay.range("embeddings.LayerNorm.bias")),
            bt,
            c,
            eps,
        )?;
        if let Some(s) = spec(DropoutSite::Embeddings, hp) {
            device::dropout_apply(g, false, &mut x0.as_view_mut(), &exv, 1, t, c, hid, &s)?;
        }

        // Encoder.
        let mut layers: Vec<LayerActs> = Vec::with_capacity(nl);
        let (mut tmp, mut tmp2) = (self.z(bt * c)?, self.z(bt * c)?);
        for l in 0..nl {
            let lp = lay.layer(l);
            let x: &Buf = if l == 0 { &x0 } else { &layers[l - 1].ln2 };
            let mut qkv = Vec::with_capacity(3);
            for (w, bias) in [(&lp.q_w, &lp.q_b), (&lp.k_w, &lp.k_b), (&lp.v_w, &lp.v_b)] {
                dense.fwd(&mut tmp.as_view_mut(), &x.as_view(), w.clone(), Some(bias.clone()), bt, c, c)?;
                let mut dst = self.z(bt * c)?;
                device::heads(g, "split_heads_f32", &mut dst.as_view_mut(), &tmp.as_view(), dims)?;
                qkv.push(dst);
            }
            let vh = qkv.pop().expect("v");
            let kh = qkv.pop().expect("k");
            let qh = qkv.pop().expect("q");
            let attn_spec = spec(DropoutSite::AttentionProbs(l), ap);
            let mut probs = self.z(b * nh * t * t)?;
            let mut probs_drop = self.z(if attn_spec.is_some() { b * nh * t * t } else { 1 })?;
            let attn_drop = attn_spec.map(|s| DeviceAttnDropout { spec: s, example_ids: &exv, logical: attn_logical });
            device::attention_forward(
                g,
                &mut tmp2.as_view_mut(),
                &mut probs.as_view_mut(),
                &mut probs_drop.as_view_mut(),
                &qh.as_view(),
                &kh.as_view(),
                &vh.as_view(),
                &mask_add.as_view(),
                dims,
                attn_drop.as_ref(),
            )?;
            let mut ctx = self.z(bt * c)?;
            device::heads(g, "merge_heads_f32", &mut ctx.as_view_mut(), &tmp2.as_view(), dims)?;
            dense.fwd(&mut tmp.as_view_mut(), &ctx.as_view(), lp.ao_w.clone(), Some(lp.ao_b.clone()), bt, c, c)?;
            if let Some(s) = spec(DropoutSite::AttentionOutput(l), hp) {
                device::dropout_apply(g, false, &mut tmp.as_view_mut(), &exv, 1, t, c, hid, &s)?;
            }
            let mut res1 = self.z(bt * c)?;
            device::residual_forward(g, &mut res1.as_view_mut(), &tmp.as_view(), &x.as_view())?;
            let (mut ln1, mut ln1_mean, mut ln1_rstd) = (self.z(bt * c)?, self.z(bt)?, self.z(bt)?);
            device::layernorm_forward(
                g,
                &mut ln1.as_view_mut(),
                &mut ln1_mean.as_view_mut(),
                &mut ln1_rstd.as_view_mut(),
                &res1.as_view(),
                &pv(lp.ln1_w.clone()),
                &pv(lp.ln1_b.clone()),
                bt,
                c,
                eps,
            )?;
            let (mut inter, mut act) = (self.z(bt * inter_size)?, self.z(bt * inter_size)?);
            dense.fwd(
                &mut inter.as_view_mut(),
                &ln1.as_view(),
                lp.i_w.clone(),
                Some(lp.i_b.clone()),
                bt,
                c,
                inter_size,
            )?;
            device::gelu_forward(g, &mut act.as_view_mut(), &inter.as_view())?;
            dense.fwd(
                &mut tmp.as_view_mut(),
                &act.as_view(),
                lp.o_w.clone(),
                Some(lp.o_b.clone()),
                bt,
                inter_size,
                c,
            )?;
            if let Some(s) = spec(DropoutSite::FeedForwardOutput(l), hp) {
                device::dropout_apply(g, false, &mut tmp.as_view_mut(), &exv, 1, t, c, hid, &s)?;
            }
            let mut res2 = self.z(bt * c)?;
            device::residual_forward(g, &mut res2.as_view_mut(), &tmp.as_view(), &ln1.as_view())?;
            let (mut ln2, mut ln2_mean, mut ln2_rstd) = (self.z(bt * c)?, self.z(bt)?, self.z(bt)?);
            device::layernorm_forward(
                g,
                &mut ln2.as_view_mut(),
                &mut ln2_mean.as_view_mut(),
                &mut ln2_rstd.as_view_mut(),
                &res2.as_view(),
                &pv(lp.ln2_w.clone()),
                &pv(lp.ln2_b.clone()),
                bt,
                c,
                eps,
            )?;
            layers.push(LayerActs {
                qh,
                kh,
                vh,
                probs,
                probs_drop,
                ctx,
                res1,
                ln1,
                ln1_mean,
                ln1_rstd,
                inter,
                act,
                res2,
                ln2,
                ln2_mean,
                ln2_rstd,
            });
        }
        let h: &Buf = if nl == 0 { &x0 } else { &layers[nl - 1].ln2 };

        // Head.
        let (rows, targets_host, classes): (Vec<usize>, Vec<i64>, usize) = match lay.head {
            Head::Classification { num_labels } => ((0..b).map(|i| i * t).collect(), batch.labels.clone(), num_labels),
            Head::MaskedLm => {
                let rows: Vec<usize> = (0..bt).filter(|&i| batch.labels[i] != IGNORE_INDEX).collect();
                let targets = rows.iter().map(|&i| batch.labels[i]).collect();
                (rows, targets, cfg.vocab_size)
            }
        };
        let rows_n = rows.len();
        let rows_dev = g.upload(&rows.iter().map(|&r| r as i64).collect::<Vec<i64>>())?;
        let targets = g.upload(&targets_host)?;
        let mut head_in = self.z(rows_n * c)?;
        let (mut head_pre, mut head_act, mut head_out) =
            (self.z(rows_n * c)?, self.z(rows_n * c)?, self.z(rows_n * c)?);
        let (mut head_mean, mut head_rstd) = (self.z(rows_n)?, self.z(rows_n)?);
        let mut logits = self.z(rows_n * classes)?;
        if rows_n > 0 {
            device::gather_rows_forward(g, &mut head_in.as_view_mut(), &h.as_view(), &rows_dev.as_view(), c)?;
            match lay.head {
                Head::Classification { num_labels } => {
                    dense.fwd(
                        &mut head_pre.as_view_mut(),
                        &head_in.as_view(),
                        lay.range("pooler.dense.weight"),
                        Some(lay.range("pooler.dense.bias")),
                        b,
                        c,
                        c,
                    )?;
                    device::tanh_forward(g, &mut head_act.as_view_mut(), &head_pre.as_view())?;
                    g.stream.memcpy_dtod(&head_act, &mut head_out)?;
                    if let Some(s) = spec(DropoutSite::Classifier { layers: nl }, cfg.classifier_dropout_prob()) {
                        device::dropout_apply(g, false, &mut head_out.as_view_mut(), &exv, 1, 1, c, hid, &s)?;
                    }
                    dense.fwd(
                        &mut logits.as_view_mut(),
                        &head_out.as_view(),
                        lay.range("classifier.weight"),
                        Some(lay.range("classifier.bias")),
                        b,
                        c,
                        num_labels,
                    )?;
                }
                Head::MaskedLm => {
                    dense.fwd(
                        &mut head_pre.as_view_mut(),
                        &head_in.as_view(),
                        lay.range("cls.predictions.transform.dense.weight"),
                        Some(lay.range("cls.predictions.transform.dense.bias")),
                        rows_n,
                        c,
                        c,
                    )?;
                    device::gelu_forward(g, &mut head_act.as_view_mut(), &head_pre.as_view())?;
                    device::layernorm_forward(
                        g,
                        &mut head_out.as_view_mut(),
                        &mut head_mean.as_view_mut(),
                        &mut head_rstd.as_view_mut(),
                        &head_act.as_view(),
                        &pv(lay.range("cls.predictions.transform.LayerNorm.weight")),
                        &pv(lay.range("cls.predictions.transform.LayerNorm.bias")),
                        rows_n,
                        c,
                        eps,
                    )?;
                    dense.fwd(
                        &mut logits.as_view_mut(),
                        &head_out.as_view(),
                        lay.range("embeddings.word_embeddings.weight"),
                        Some(lay.range("cls.predictions.bias")),
                        rows_n,
                        c,
                        cfg.vocab_size,
                    )?;
                }
            }
        }
        let mut losses = self.z(rows_n)?;
        if rows_n > 0 {
            device::crossentropy_forward(
                g,
                &mut losses.as_view_mut(),
                &logits.as_view(),
                &targets.as_view(),
                rows_n,
                classes,
            )?;
        }
        let losses = g.download(&losses)?;
        let count = targets_host.iter().filter(|&&t| t != IGNORE_INDEX).count();
        let loss_sum = losses[..rows_n].iter().map(|&l| f64::from(l)).sum();
        self.last_losses = losses[..rows_n].to_vec();
        self.acts = Some(Acts {
            b,
            t,
            dropout,
            input_ids: batch.input_ids.clone(),
            token_type_ids: batch.token_type_ids.clone(),
            example_ids,
            emb_sum,
            emb_mean,
            emb_rstd,
            x0,
            layers,
            rows,
            targets,
            head_in,
            head_pre,
            head_act,
            head_out,
            head_mean,
            head_rstd,
            logits,
            classes,
        });
        Ok(ForwardOut { loss_sum, count })
    }

    /// Backward of the last forward, accumulating into `grads` (as `Bert::backward`).
    pub fn backward(&mut self, batch: &Batch, loss_scale: f32) -> Result<(), ModelError> {
        self.backward_with(batch, loss_scale, &mut |_, _| Ok(())).map_err(|e| ModelError::Device(format!("{e:#}")))
    }

    /// `backward`, calling `ready(range, grads)` each time the gradients of a segment of the
    /// flat buffer are final (`Layout::backward_segments`: head, last layer .. first,
    /// embeddings), with the work that produced them queued on the GPU's stream: the hook that
    /// starts each segment's all-reduce while backward goes on.
    pub fn backward_with(
        &mut self,
        batch: &Batch,
        loss_scale: f32,
        ready: &mut dyn FnMut(Range<usize>, &Buf) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.backward_device(batch, loss_scale, ready)
    }

    fn backward_device(
        &mut self,
        batch: &Batch,
        loss_scale: f32,
        ready: &mut dyn FnMut(Range<usize>, &Buf) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let gpu = Arc::clone(&self.gpu);
        let g = &*gpu;
        let a = self.acts.take().expect("backward follows a forward");
        assert_eq!((a.b, a.t), (batch.b, batch.t), "backward: batch differs from the last forward");
        let cfg = &self.cfg;
        let lay = &self.layout;
        let (b, t) = (a.b, a.t);
        let (c, nh, nl, inter_size) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.intermediate_size);
        let bt = b * t;
        let hid = LogicalDims { t_max: cfg.max_position_embeddings, w_max: c };
        let attn_logical = LogicalDims { t_max: cfg.max_position_embeddings, w_max: cfg.max_position_embeddings };
        let dims = AttnDims { b, nh, t, hd: cfg.head_dim() };
        let (hp, ap) = (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob);
        let dropout = a.dropout;
        let spec = |site: DropoutSite, prob: f32| DropoutCtx::spec(dropout, site, prob);
        let exv = a.example_ids.as_view();
        let rows_n = a.rows.len();
        let classes = a.classes;
        let s = &g.stream;

        // Head.
        let mut dy = self.z(bt * c)?;
        if rows_n > 0 {
            let mut d_logits = self.z(rows_n * classes)?;
            device::crossentropy_backward(
                g,
                &mut d_logits.as_view_mut(),
                &a.logits.as_view(),
                &a.targets.as_view(),
                loss_scale,
                rows_n,
                classes,
            )?;
            let (mut d_a, mut d_b, mut d_c) = (self.z(rows_n * c)?, self.z(rows_n * c)?, self.z(rows_n * c)?);
            let p = &self.params;
            let dense = Dense { g, p, p16: self.params16.as_ref() };
            let grads = &mut self.grads;
            match lay.head {
                Head::Classification { num_labels } => {
                    with_two(grads, lay.range("classifier.weight"), lay.range("classifier.bias"), |dw, db| {
                        dense.bwd(
                            &mut d_a.as_view_mut(),
                            dw,
                            Some(db),
                            &d_logits.as_view(),
                            &a.head_out.as_view(),
                            lay.range("classifier.weight"),
                            b,
                            c,
                            num_labels,
                        )
                    })?;
                    if let Some(sp) = spec(DropoutSite::Classifier { layers: nl }, cfg.classifier_dropout_prob()) {
                        device::dropout_apply(g, true, &mut d_a.as_view_mut(), &exv, 1, 1, c, hid, &sp)?;
                    }
                    device::tanh_backward(g, &mut d_b.as_view_mut(), &a.head_act.as_view(), &d_a.as_view())?;
                    with_two(grads, lay.range("pooler.dense.weight"), lay.range("pooler.dense.bias"), |dw, db| {
                        dense.bwd(
                            &mut d_c.as_view_mut(),
                            dw,
                            Some(db),
                            &d_b.as_view(),
                            &a.head_in.as_view(),
                            lay.range("pooler.dense.weight"),
                            b,
                            c,
                            c,
                        )
                    })?;
                }
                Head::MaskedLm => {
                    let v = cfg.vocab_size;
                    with_two(
                        grads,
                        lay.range("embeddings.word_embeddings.weight"),
                        lay.range("cls.predictions.bias"),
                        |dw, db| {
                            dense.bwd(
                                &mut d_a.as_view_mut(),
                                dw,
                                Some(db),
                                &d_logits.as_view(),
                                &a.head_out.as_view(),
                                lay.range("embeddings.word_embeddings.weight"),
                                rows_n,
                                c,
                                v,
                            )
                        },
                    )?;
                    with_two(
                        grads,
                        lay.range("cls.predictions.transform.LayerNorm.weight"),
                        lay.range("cls.predictions.transform.LayerNorm.bias"),
                        |dw, db| {
                            device::layernorm_backward(
                                g,
                                &mut d_b.as_view_mut(),
                                dw,
                                db,
                                &d_a.as_view(),
                                &a.head_act.as_view(),
                                &p.slice(lay.range("cls.predictions.transform.LayerNorm.weight")),
                                &a.head_mean.as_view(),
                                &a.head_rstd.as_view(),
                                rows_n,
                                c,
                            )
                        },
                    )?;
                    s.memset_zeros(&mut d_a)?;
                    device::gelu_backward(g, &mut d_a.as_view_mut(), &a.head_pre.as_view(), &d_b.as_view())?;
                    with_two(
                        grads,
                        lay.range("cls.predictions.transform.dense.weight"),
                        lay.range("cls.predictions.transform.dense.bias"),
                        |dw, db| {
                            dense.bwd(
                                &mut d_c.as_view_mut(),
                                dw,
                                Some(db),
                                &d_a.as_view(),
                                &a.head_in.as_view(),
                                lay.range("cls.predictions.transform.dense.weight"),
                                rows_n,
                                c,
                                c,
                            )
                        },
                    )?;
                }
            }
            // gather_rows_backward: row k of d_c goes to row rows[k] of dy.
            let groups = RowGroups::new(a.rows.iter().map(|&r| Some(r)));
            device::scatter_add_rows(g, &mut dy.as_view_mut(), &d_c.as_view(), &groups, c)?;
        }
        let mut segments = lay.backward_segments(nl).into_iter();
        ready(segments.next().expect("a head segment"), &self.grads)?;

        // Encoder, last layer first. `dy` is the gradient of the layer's output.
        let (mut dx, mut d_res, mut d_ln1, mut d_tmp, mut d_ctx, mut d_ctxh) =
            (self.z(bt * c)?, self.z(bt * c)?, self.z(bt * c)?, self.z(bt * c)?, self.z(bt * c)?, self.z(bt * c)?);
        let (mut dqh, mut dkh, mut dvh) = (self.z(bt * c)?, self.z(bt * c)?, self.z(bt * c)?);
        let (mut d_act, mut d_inter) = (self.z(bt * inter_size)?, self.z(bt * inter_size)?);
        let mut scratch = self.z(b * nh * t * t)?;
        let p = &self.params;
        let dense = Dense { g, p, p16: self.params16.as_ref() };
        let grads = &mut self.grads;
        for l in (0..nl).rev() {
            let lp = lay.layer(l);
            let la = &a.layers[l];
            let x: &Buf = if l == 0 { &a.x0 } else { &a.layers[l - 1].ln2 };

            s.memset_zeros(&mut d_res)?;
            with_two(grads, lp.ln2_w.clone(), lp.ln2_b.clone(), |dw, db| {
                device::layernorm_backward(
                    g,
                    &mut d_res.as_view_mut(),
                    dw,
                    db,
                    &dy.as_view(),
                    &la.res2.as_view(),
                    &p.slice(lp.ln2_w.clone()),
                    &la.ln2_mean.as_view(),
                    &la.ln2_rstd.as_view(),
                    bt,
                    c,
                )
            })?;
            s.memcpy_dtod(&d_res, &mut d_ln1)?;
            s.memcpy_dtod(&d_res, &mut d_tmp)?;
            if let Some(sp) = spec(DropoutSite::FeedForwardOutput(l), hp) {
                device::dropout_apply(g, true, &mut d_tmp.as_view_mut(), &exv, 1, t, c, hid, &sp)?;
            }
            s.memset_zeros(&mut d_act)?;
            with_two(grads, lp.o_w.clone(), lp.o_b.clone(), |dw, db| {
                dense.bwd(
                    &mut d_act.as_view_mut(),
                    dw,
                    Some(db),
                    &d_tmp.as_view(),
                    &la.act.as_view(),
                    lp.o_w.clone(),
                    bt,
                    inter_size,
                    c,
                )
            })?;
            s.memset_zeros(&mut d_inter)?;
            device::gelu_backward(g, &mut d_inter.as_view_mut(), &la.inter.as_view(), &d_act.as_view())?;
            with_two(grads, lp.i_w.clone(), lp.i_b.clone(), |dw, db| {
                dense.bwd(
                    &mut d_ln1.as_view_mut(),
                    dw,
                    Some(db),
                    &d_inter.as_view(),
                    &la.ln1.as_view(),
                    lp.i_w.clone(),
                    bt,
                    c,
                    inter_size,
                )
            })?;

            s.memset_zeros(&mut d_res)?;
            with_two(grads, lp.ln1_w.clone(), lp.ln1_b.clone(), |dw, db| {
                device::layernorm_backward(
                    g,
                    &mut d_res.as_view_mut(),
                    dw,
                    db,
                    &d_ln1.as_view(),
                    &la.res1.as_view(),
                    &p.slice(lp.ln1_w.clone()),
                    &la.ln1_mean.as_view(),
                    &la.ln1_rstd.as_view(),
                    bt,
                    c,
                )
            })?;
            s.memcpy_dtod(&d_res, &mut dx)?;
            s.memcpy_dtod(&d_res, &mut d_tmp)?;
            if let Some(sp) = spec(DropoutSite::AttentionOutput(l), hp) {
                device::dropout_apply(g, true, &mut d_tmp.as_view_mut(), &exv, 1, t, c, hid, &sp)?;
            }
            s.memset_zeros(&mut d_ctx)?;
            with_two(grads, lp.ao_w.clone(), lp.ao_b.clone(), |dw, db| {
                dense.bwd(
                    &mut d_ctx.as_view_mut(),
                    dw,
                    Some(db),
                    &d_tmp.as_view(),
                    &la.ctx.as_view(),
                    lp.ao_w.clone(),
                    bt,
                    c,
                    c,
                )
            })?;
            s.memset_zeros(&mut d_ctxh)?;
            device::heads(g, "merge_heads_backward_f32", &mut d_ctxh.as_view_mut(), &d_ctx.as_view(), dims)?;
            s.memset_zeros(&mut dqh)?;
            s.memset_zeros(&mut dkh)?;
            s.memset_zeros(&mut dvh)?;
            let attn_drop = spec(DropoutSite::AttentionProbs(l), ap).map(|sp| DeviceAttnDropout {
                spec: sp,
                example_ids: &exv,
                logical: attn_logical,
            });
            device::attention_backward(
                g,
                &mut dqh.as_view_mut(),
                &mut dkh.as_view_mut(),
                &mut dvh.as_view_mut(),
                &mut scratch.as_view_mut(),
                &d_ctxh.as_view(),
                &la.probs.as_view(),
                &la.probs_drop.as_view(),
                &la.qh.as_view(),
                &la.kh.as_view(),
                &la.vh.as_view(),
                dims,
                attn_drop.as_ref(),
            )?;
            // The key bias keeps its exact gradient, zero (see model.rs).
            for (dh, w, bias) in [(&dqh, &lp.q_w, Some(&lp.q_b)), (&dkh, &lp.k_w, None), (&dvh, &lp.v_w, Some(&lp.v_b))]
            {
                s.memset_zeros(&mut d_tmp)?;
                device::heads(g, "split_heads_backward_f32", &mut d_tmp.as_view_mut(), &dh.as_view(), dims)?;
                match bias {
                    Some(bias) => with_two(grads, w.clone(), bias.clone(), |dw, db| {
                        dense.bwd(
                            &mut dx.as_view_mut(),
                            dw,
                            Some(db),
                            &d_tmp.as_view(),
                            &x.as_view(),
                            w.clone(),
                            bt,
                            c,
                            c,
                        )
                    })?,
                    None => dense.bwd(
                        &mut dx.as_view_mut(),
                        &mut grads.slice_mut(w.clone()),
                        None,
                        &d_tmp.as_view(),
                        &x.as_view(),
                        w.clone(),
                        bt,
                        c,
                        c,
                    )?,
                }
            }
            std::mem::swap(&mut dy, &mut dx);
            ready(segments.next().expect("a segment per layer"), &*grads)?;
        }

        // Embeddings: `dy` now holds the gradient of x0.
        if let Some(sp) = spec(DropoutSite::Embeddings, hp) {
            device::dropout_apply(g, true, &mut dy.as_view_mut(), &exv, 1, t, c, hid, &sp)?;
        }
        s.memset_zeros(&mut d_res)?;
        with_two(grads, lay.range("embeddings.LayerNorm.weight"), lay.range("embeddings.LayerNorm.bias"), |dw, db| {
            device::layernorm_backward(
                g,
                &mut d_res.as_view_mut(),
                dw,
                db,
                &dy.as_view(),
                &a.emb_sum.as_view(),
                &p.slice(lay.range("embeddings.LayerNorm.weight")),
                &a.emb_mean.as_view(),
                &a.emb_rstd.as_view(),
                bt,
                c,
            )
        })?;
        // embedding_backward: each table's rows gathered by destination, in row order.
        let pad = cfg.pad_token_id;
        let word = RowGroups::new(a.input_ids.iter().map(|&id| (Some(id) != pad).then_some(id as usize)));
        let types = RowGroups::new(a.token_type_ids.iter().map(|&tt| Some(tt as usize)));
        let pos = RowGroups::new((0..bt).map(|r| Some(r % t)));
        for (name, groups) in [
            ("embeddings.word_embeddings.weight", &word),
            ("embeddings.position_embeddings.weight", &pos),
            ("embeddings.token_type_embeddings.weight", &types),
        ] {
            device::scatter_add_rows(g, &mut grads.slice_mut(lay.range(name)), &d_res.as_view(), groups, c)?;
        }
        ready(segments.next().expect("an embeddings segment"), &*grads)?;
        Ok(())
    }

    /// The global norm of the gradients, then clipping to `max_norm` (as `gradnorm`):
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f32) -> Result<f32, GpuError> {
        let norm = device::global_norm(&self.gpu, &self.grads.as_view())?;
        let coef = max_norm / (norm + 1e-6);
        if max_norm > 0.0 && coef < 1.0 {
            device::scale(&self.gpu, &mut self.grads.as_view_mut(), coef)?;
        }
        Ok(norm)
    }
}

/// AdamW's moments on the device, stepped tensor by tensor as `optim::AdamW` does (weight
/// decay only where the layout says).
pub struct GpuAdamW {
    pub m: Buf,
    pub v: Buf,
    pub t: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl GpuAdamW {
    /// The device copy of a host optimizer (a resumed job's restored state).
    pub fn from_host(gpu: &Gpu, opt: &crate::optim::AdamW) -> Result<Self, GpuError> {
        Ok(GpuAdamW {
            m: gpu.upload(&opt.m)?,
            v: gpu.upload(&opt.v)?,
            t: opt.t,
            beta1: opt.beta1,
            beta2: opt.beta2,
            eps: opt.eps,
            weight_decay: opt.weight_decay,
        })
    }

    /// Copies the moments and step count back into `opt` (for a checkpoint).
    pub fn download_into(&self, gpu: &Gpu, opt: &mut crate::optim::AdamW) -> Result<(), GpuError> {
        opt.m = gpu.download(&self.m)?;
        opt.v = gpu.download(&self.v)?;
        opt.t = self.t;
        Ok(())
    }

    pub fn new(gpu: &Gpu, n: usize, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<Self, GpuError> {
        Ok(GpuAdamW {
            m: gpu.stream.alloc_zeros::<f32>(n)?,
            v: gpu.stream.alloc_zeros::<f32>(n)?,
            t: 0,
            beta1,
            beta2,
            eps,
            weight_decay,
        })
    }

    /// One step at learning rate `lr` over every tensor of the model.
    pub fn step(&mut self, model: &mut GpuBert, lr: f64) -> Result<(), GpuError> {
        self.t += 1;
        for e in &model.layout.entries {
            let r = e.range();
            let hp = AdamWParams {
                lr,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: if e.decay { self.weight_decay } else { 0.0 },
            };
            device::adamw_update(
                &model.gpu,
                &mut model.params.slice_mut(r.clone()),
                &model.grads.slice(r.clone()),
                &mut self.m.slice_mut(r.clone()),
                &mut self.v.slice_mut(r),
                &hp,
                self.t,
            )?;
        }
        model.refresh_bf16()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_backward_groups_send_each_head_row_to_its_token() {
        // Classification rows are the [CLS] tokens: source row k goes to token row k * t.
        let t = 5;
        let g = RowGroups::new((0..3).map(|k| Some(k * t)));
        assert_eq!(g.keys, vec![0, 5, 10]);
        assert_eq!(g.rows, vec![0, 1, 2]);
    }
}
