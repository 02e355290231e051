//! [`Ops`] on one GPU: `kernels::device`'s launchers (our NVRTC kernels and cuBLAS) over device
//! buffers, so that model.rs's one op sequence runs there too ([`GpuBert`]). Parameters,
//! gradients and AdamW's moments ([`GpuAdamW`]) are each one flat device buffer in the CPU
//! layout, so a checkpoint moves between the CPU and the GPU as one copy.
//!
//! fp32, or with `train.precision = "bf16"` the dense layers' GEMMs in bf16 against a bf16 twin
//! of the parameters (f32 master weights, gradients and AdamW). The dropout masks are the CPU's
//! bit for bit (same Philox counters), so a GPU step and a CPU step differ only by the order of
//! the GEMMs' sums.
//!
//! Compiled everywhere; it runs only where there is a GPU (scripts/gpu-check.sh: `worker
//! gpu-check` compares each launcher with its CPU op, then training losses with the CPU's).

use crate::bert_config::BertConfig;
use crate::layout::Layout;
use crate::model::Model;
use crate::ops::{self, AttnDropout, Heads, Inputs, Ops, Param};
use crate::optim::AdamW;
use anyhow::Context;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr};
use job::config::Precision;
use kernels::attention::AttnDims;
use kernels::device::{self, Bf16, DeviceAttnDropout, DeviceMask, RowGroups};
use kernels::dropout::{DropoutSpec, LogicalDims};
use kernels::gpu::Gpu;
use std::borrow::Cow;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

/// An `f32` device buffer that keeps its allocation when it is reshaped to a size that fits.
#[derive(Default)]
pub struct DevBuf {
    mem: Option<CudaSlice<f32>>,
    len: usize,
}

impl DevBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mem(&self) -> &CudaSlice<f32> {
        self.mem.as_ref().expect("a device buffer used before it was shaped")
    }

    fn mem_mut(&mut self) -> &mut CudaSlice<f32> {
        self.mem.as_mut().expect("a device buffer used before it was shaped")
    }

    pub fn view(&self) -> CudaView<'_, f32> {
        self.mem().slice(0..self.len)
    }

    pub fn view_mut(&mut self) -> CudaViewMut<'_, f32> {
        let n = self.len;
        self.mem_mut().slice_mut(0..n)
    }

    pub fn slice(&self, r: Range<usize>) -> CudaView<'_, f32> {
        assert!(r.end <= self.len, "DevBuf::slice: {r:?} beyond {}", self.len);
        self.mem().slice(r)
    }

    pub fn slice_mut(&mut self, r: Range<usize>) -> CudaViewMut<'_, f32> {
        assert!(r.end <= self.len, "DevBuf::slice_mut: {r:?} beyond {}", self.len);
        self.mem_mut().slice_mut(r)
    }

    /// Runs `f` with mutable views of two disjoint ranges (a weight's and its bias's gradients).
    fn with_two<R>(
        &mut self,
        a: Range<usize>,
        b: Range<usize>,
        f: impl FnOnce(&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>) -> R,
    ) -> R {
        assert!(a.end <= b.start || b.end <= a.start, "with_two: ranges overlap");
        assert!(a.end.max(b.end) <= self.len, "with_two: beyond the buffer");
        let buf = self.mem_mut();
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
}

/// A batch on the device, with the host copy that the row groups of the scatter-adds (and
/// the loss count) come from.
pub struct DevInputs {
    host: Inputs,
    ids: CudaSlice<u32>,
    types: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    segments: Option<CudaSlice<u32>>,
    mask: CudaSlice<f32>,
    example_ids: CudaSlice<u32>,
    rows: CudaSlice<i64>,
    targets: CudaSlice<i64>,
    /// The head's rows grouped by the token row they came from (the gather's backward).
    row_groups: RowGroups,
}

/// The GPU's ops: its stream, the bf16 twin of the parameters (`train.precision = "bf16"`),
/// and attention backward's `[B, NH, T, T]` scratch.
pub struct Cuda {
    pub gpu: Arc<Gpu>,
    params16: Option<CudaSlice<Bf16>>,
    scratch: RefCell<DevBuf>,
}

impl Cuda {
    pub fn new(gpu: Arc<Gpu>) -> Self {
        Cuda { gpu, params16: None, scratch: RefCell::new(DevBuf::default()) }
    }

    /// `host` on the device (one zero where it is empty: a device buffer is never empty).
    fn up<T: DeviceRepr + Default + Clone>(&self, host: &[T]) -> anyhow::Result<CudaSlice<T>> {
        Ok(match host.is_empty() {
            true => self.gpu.upload(&[T::default()])?,
            false => self.gpu.upload(host)?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn dense_grads(
        &self,
        dinp: &mut DevBuf,
        dw: &mut CudaViewMut<'_, f32>,
        db: Option<&mut CudaViewMut<'_, f32>>,
        dout: &DevBuf,
        inp: &DevBuf,
        p: &DevBuf,
        weight: Param,
        (n, c, oc): (usize, usize, usize),
        precision: Precision,
        accumulate: bool,
    ) -> anyhow::Result<()> {
        let (g, dinp, dout, inp) = (&*self.gpu, &mut dinp.view_mut(), &dout.view(), &inp.view());
        match precision {
            Precision::Fp32 => {
                device::matmul_backward(g, dinp, dw, db, dout, inp, &p.slice(weight), n, c, oc, accumulate)?
            }
            Precision::Bf16 => {
                let w16 = self.params16.as_ref().context("bf16 dense layers without the bf16 parameters")?;
                device::matmul_backward_bf16(g, dinp, dw, db, dout, inp, &w16.slice(weight), n, c, oc, accumulate)?
            }
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
impl Ops for Cuda {
    type Buf = DevBuf;
    type Inputs = DevInputs;

    fn upload(&self, host: &[f32]) -> anyhow::Result<DevBuf> {
        Ok(DevBuf { mem: Some(self.up(host)?), len: host.len() })
    }

    fn to_host<'a>(&self, buf: &'a DevBuf) -> anyhow::Result<Cow<'a, [f32]>> {
        if buf.is_empty() {
            return Ok(Cow::Owned(Vec::new()));
        }
        Ok(Cow::Owned(self.gpu.stream.clone_dtoh(&buf.view())?))
    }

    fn shape(&self, buf: &mut DevBuf, n: usize) -> anyhow::Result<()> {
        if buf.mem.as_ref().is_none_or(|m| m.len() < n) {
            buf.mem = Some(self.gpu.stream.alloc_zeros::<f32>(n.max(1))?);
        }
        buf.len = n;
        Ok(())
    }

    fn zeroed(&self, buf: &mut DevBuf, n: usize) -> anyhow::Result<()> {
        self.shape(buf, n)?;
        self.zero(buf)
    }

    fn zero(&self, buf: &mut DevBuf) -> anyhow::Result<()> {
        if !buf.is_empty() {
            self.gpu.stream.memset_zeros(&mut buf.view_mut())?;
        }
        Ok(())
    }

    fn copy(&self, dst: &mut DevBuf, src: &DevBuf) -> anyhow::Result<()> {
        assert_eq!(dst.len, src.len, "copy: lengths differ");
        if !src.is_empty() {
            self.gpu.stream.memcpy_dtod(&src.view(), &mut dst.view_mut())?;
        }
        Ok(())
    }

    /// The GPU runs padded batches: `B` sequences of `T`, padding masked in attention.
    fn inputs(&self, x: Inputs) -> anyhow::Result<DevInputs> {
        anyhow::ensure!(
            x.tokens() == x.b * x.t && x.seqs == kernels::seqs::SeqsBuf::regular(x.t, &x.example_ids),
            "the GPU's ops take a padded batch ({} tokens in {} sequences for {}x{})",
            x.tokens(),
            x.example_ids.len(),
            x.b,
            x.t
        );
        let rows: Vec<i64> = x.rows.iter().map(|&r| r as i64).collect();
        Ok(DevInputs {
            ids: self.up(&x.input_ids)?,
            types: self.up(&x.token_type_ids)?,
            positions: self.up(&x.position_ids)?,
            segments: if x.segment_ids.is_empty() { None } else { Some(self.up(&x.segment_ids)?) },
            mask: self.up(&x.mask_add)?,
            example_ids: self.up(&x.example_ids)?,
            rows: self.up(&rows)?,
            targets: self.up(&x.targets)?,
            row_groups: RowGroups::new(x.rows.iter().map(|&r| Some(r))),
            host: x,
        })
    }

    fn host_inputs(x: &DevInputs) -> &Inputs {
        &x.host
    }

    fn embedding_forward(
        &self,
        out: &mut DevBuf,
        x: &DevInputs,
        p: &DevBuf,
        [wte, wpe, wtt]: [Param; 3],
        c: usize,
    ) -> anyhow::Result<()> {
        let (b, t, n) = (x.host.b, x.host.t, x.host.b * x.host.t);
        let (ids, types, pos) = (x.ids.slice(0..n), x.types.slice(0..n), x.positions.slice(0..n));
        let (te, pe, tt) = (p.slice(wte), p.slice(wpe), p.slice(wtt));
        device::embedding_forward(&self.gpu, &mut out.view_mut(), &ids, &types, &pos, &te, &pe, &tt, b, t, c)?;
        Ok(())
    }

    fn embedding_backward(
        &self,
        g: &mut DevBuf,
        [wte, wpe, wtt]: [Param; 3],
        dout: &DevBuf,
        x: &DevInputs,
        pad: Option<u32>,
        c: usize,
    ) -> anyhow::Result<()> {
        // Each table's rows gathered by destination, in row order: the CPU's sums, in its order.
        let h = &x.host;
        let word = RowGroups::new(h.input_ids.iter().map(|&id| (Some(id) != pad).then_some(id as usize)));
        let pos = RowGroups::new(h.position_ids.iter().map(|&p| Some(p as usize)));
        let types = RowGroups::new(h.token_type_ids.iter().map(|&tt| Some(tt as usize)));
        for (table, groups) in [(wte, &word), (wpe, &pos), (wtt, &types)] {
            device::scatter_add_rows(&self.gpu, &mut g.slice_mut(table), &dout.view(), groups, c)?;
        }
        Ok(())
    }

    fn layernorm_forward(
        &self,
        out: &mut DevBuf,
        mean: &mut DevBuf,
        rstd: &mut DevBuf,
        inp: &DevBuf,
        p: &DevBuf,
        weight: Param,
        bias: Param,
        n: usize,
        c: usize,
        eps: f32,
    ) -> anyhow::Result<()> {
        let (out, mean, rstd) = (&mut out.view_mut(), &mut mean.view_mut(), &mut rstd.view_mut());
        device::layernorm_forward(
            &self.gpu,
            out,
            mean,
            rstd,
            &inp.view(),
            &p.slice(weight),
            &p.slice(bias),
            n,
            c,
            eps,
        )?;
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dinp: &mut DevBuf,
        g: &mut DevBuf,
        dout: &DevBuf,
        inp: &DevBuf,
        p: &DevBuf,
        [weight, bias]: [Param; 2],
        mean: &DevBuf,
        rstd: &DevBuf,
        n: usize,
        c: usize,
    ) -> anyhow::Result<()> {
        let w = p.slice(weight.clone());
        g.with_two(weight, bias, |dw, db| {
            let (dinp, dout, inp) = (&mut dinp.view_mut(), &dout.view(), &inp.view());
            device::layernorm_backward(&self.gpu, dinp, dw, db, dout, inp, &w, &mean.view(), &rstd.view(), n, c)
        })?;
        Ok(())
    }

    fn dense_forward(
        &self,
        out: &mut DevBuf,
        inp: &DevBuf,
        p: &DevBuf,
        weight: Param,
        bias: Option<Param>,
        n: usize,
        c: usize,
        oc: usize,
        precision: Precision,
    ) -> anyhow::Result<()> {
        let (g, out, inp) = (&*self.gpu, &mut out.view_mut(), &inp.view());
        let b = bias.map(|r| p.slice(r));
        match precision {
            Precision::Fp32 => device::matmul_forward(g, out, inp, &p.slice(weight), b.as_ref(), n, c, oc)?,
            Precision::Bf16 => {
                let w16 = self.params16.as_ref().context("bf16 dense layers without the bf16 parameters")?;
                device::matmul_forward_bf16(g, out, inp, &w16.slice(weight), b.as_ref(), n, c, oc)?
            }
        }
        Ok(())
    }

    fn dense_backward(
        &self,
        dinp: &mut DevBuf,
        g: &mut DevBuf,
        dout: &DevBuf,
        inp: &DevBuf,
        p: &DevBuf,
        weight: Param,
        bias: Option<Param>,
        n: usize,
        c: usize,
        oc: usize,
        precision: Precision,
        accumulate: bool,
    ) -> anyhow::Result<()> {
        let shape = (n, c, oc);
        match bias {
            Some(b) => g.with_two(weight.clone(), b, |dw, db| {
                self.dense_grads(dinp, dw, Some(db), dout, inp, p, weight, shape, precision, accumulate)
            }),
            None => {
                let mut dw = g.slice_mut(weight.clone());
                self.dense_grads(dinp, &mut dw, None, dout, inp, p, weight, shape, precision, accumulate)
            }
        }
    }

    fn heads(&self, op: Heads, dst: &mut DevBuf, src: &DevBuf, _x: &DevInputs, d: AttnDims) -> anyhow::Result<()> {
        let kernel = match op {
            Heads::Split => "split_heads_f32",
            Heads::Merge => "merge_heads_f32",
        };
        device::heads(&self.gpu, kernel, &mut dst.view_mut(), &src.view(), d)?;
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut DevBuf,
        probs: &mut DevBuf,
        probs_drop: &mut DevBuf,
        [q, k, v]: [&DevBuf; 3],
        x: &DevInputs,
        d: AttnDims,
        dropout: Option<AttnDropout>,
    ) -> anyhow::Result<()> {
        let (exv, add) = (x.example_ids.slice(0..d.b), x.mask.slice(0..d.b * d.t));
        let segs = x.segments.as_ref().map(|s| s.slice(0..d.b * d.t));
        let mask = DeviceMask { add: &add, segments: segs.as_ref() };
        let drop = dropout.map(|dr| DeviceAttnDropout { spec: dr.spec, example_ids: &exv, logical: dr.logical });
        let (out, probs, probs_drop) = (&mut out.view_mut(), &mut probs.view_mut(), &mut probs_drop.view_mut());
        let (q, k, v) = (&q.view(), &k.view(), &v.view());
        device::attention_forward(&self.gpu, out, probs, probs_drop, q, k, v, mask, d, drop.as_ref())?;
        Ok(())
    }

    fn attention_backward(
        &self,
        [dq, dk, dv]: [&mut DevBuf; 3],
        dout: &DevBuf,
        probs: &DevBuf,
        probs_drop: &DevBuf,
        [q, k, v]: [&DevBuf; 3],
        x: &DevInputs,
        d: AttnDims,
        dropout: Option<AttnDropout>,
    ) -> anyhow::Result<()> {
        let mut scratch = self.scratch.borrow_mut();
        self.shape(&mut scratch, d.b * d.nh * d.t * d.t)?;
        let exv = x.example_ids.slice(0..d.b);
        let drop = dropout.map(|dr| DeviceAttnDropout { spec: dr.spec, example_ids: &exv, logical: dr.logical });
        let (dq, dk, dv) = (&mut dq.view_mut(), &mut dk.view_mut(), &mut dv.view_mut());
        let (dout, probs, probs_drop) = (&dout.view(), &probs.view(), &probs_drop.view());
        let (q, k, v, s) = (&q.view(), &k.view(), &v.view(), &mut scratch.view_mut());
        device::attention_backward(&self.gpu, dq, dk, dv, s, dout, probs, probs_drop, q, k, v, d, drop.as_ref())?;
        Ok(())
    }

    fn dropout(
        &self,
        buf: &mut DevBuf,
        x: &DevInputs,
        rows: ops::DropRows,
        w: usize,
        logical: LogicalDims,
        spec: &DropoutSpec,
        backward: bool,
    ) -> anyhow::Result<()> {
        let t = if rows == ops::DropRows::Tokens { x.host.t } else { 1 };
        let exv = x.example_ids.slice(0..x.host.b);
        device::dropout_apply(&self.gpu, backward, &mut buf.view_mut(), &exv, 1, t, w, logical, spec)?;
        Ok(())
    }

    fn residual_forward(&self, out: &mut DevBuf, a: &DevBuf, b: &DevBuf) -> anyhow::Result<()> {
        Ok(device::residual_forward(&self.gpu, &mut out.view_mut(), &a.view(), &b.view())?)
    }

    fn gelu_forward(&self, out: &mut DevBuf, x: &mut DevBuf) -> anyhow::Result<()> {
        Ok(device::gelu_forward(&self.gpu, &mut out.view_mut(), &mut x.view_mut())?)
    }

    fn gelu_backward(&self, dinp: &mut DevBuf, deriv: &DevBuf, dout: &DevBuf) -> anyhow::Result<()> {
        Ok(device::gelu_backward(&self.gpu, &mut dinp.view_mut(), &deriv.view(), &dout.view())?)
    }

    fn tanh_forward(&self, out: &mut DevBuf, inp: &DevBuf) -> anyhow::Result<()> {
        Ok(device::tanh_forward(&self.gpu, &mut out.view_mut(), &inp.view())?)
    }

    fn tanh_backward(&self, dinp: &mut DevBuf, out: &DevBuf, dout: &DevBuf) -> anyhow::Result<()> {
        Ok(device::tanh_backward(&self.gpu, &mut dinp.view_mut(), &out.view(), &dout.view())?)
    }

    fn gather_rows_forward(&self, out: &mut DevBuf, inp: &DevBuf, x: &DevInputs, c: usize) -> anyhow::Result<()> {
        let rows = x.rows.slice(0..x.host.rows.len());
        Ok(device::gather_rows_forward(&self.gpu, &mut out.view_mut(), &inp.view(), &rows, c)?)
    }

    fn gather_rows_backward(&self, dinp: &mut DevBuf, dout: &DevBuf, x: &DevInputs, c: usize) -> anyhow::Result<()> {
        self.zero(dinp)?;
        Ok(device::scatter_add_rows(&self.gpu, &mut dinp.view_mut(), &dout.view(), &x.row_groups, c)?)
    }

    fn crossentropy_forward(
        &self,
        losses: &mut DevBuf,
        logits: &DevBuf,
        x: &DevInputs,
        n: usize,
        v: usize,
    ) -> anyhow::Result<()> {
        let targets = x.targets.slice(0..n);
        Ok(device::crossentropy_forward(&self.gpu, &mut losses.view_mut(), &logits.view(), &targets, n, v)?)
    }

    fn crossentropy_backward(
        &self,
        dlogits: &mut DevBuf,
        logits: &DevBuf,
        x: &DevInputs,
        scale: f32,
        n: usize,
        v: usize,
    ) -> anyhow::Result<()> {
        let (targets, dl) = (x.targets.slice(0..n), &mut dlogits.view_mut());
        Ok(device::crossentropy_backward(&self.gpu, dl, &logits.view(), &targets, scale, n, v)?)
    }

    fn argmax_rows(&self, logits: &DevBuf, n: usize, v: usize) -> anyhow::Result<Vec<u32>> {
        // On the host, after one copy of the logits: the same first-of-equals rule as the CPU.
        Ok(ops::argmax_rows(&self.to_host(logits)?, n, v))
    }
}

/// BERT on one GPU.
pub type GpuBert = Model<Cuda>;

impl GpuBert {
    /// The model with these parameters (the layout's flat buffer) uploaded to `gpu`.
    pub fn new(gpu: Arc<Gpu>, cfg: BertConfig, layout: Layout, params: &[f32]) -> anyhow::Result<Self> {
        assert_eq!(params.len(), layout.total, "GpuBert::new: params must follow the layout");
        let ops = Cuda::new(gpu);
        let params = ops.upload(params)?;
        Model::with_params(ops, cfg, layout, params)
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.ops.gpu
    }

    /// Chooses the dense layers' arithmetic (f32 by default).
    pub fn set_precision(&mut self, precision: Precision) -> anyhow::Result<()> {
        self.precision = precision;
        self.ops.params16 = match precision {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(self.ops.gpu.stream.alloc_zeros::<Bf16>(self.layout.total)?),
        };
        self.refresh_bf16()
    }

    /// Re-rounds the bf16 twin of the parameters (after they changed).
    pub fn refresh_bf16(&mut self) -> anyhow::Result<()> {
        if let Some(p16) = self.ops.params16.as_mut() {
            device::cast_to_bf16(&self.ops.gpu, &mut p16.as_view_mut(), &self.params.view())?;
        }
        Ok(())
    }

    /// Replaces the parameters (the layout's flat buffer).
    pub fn upload_params(&mut self, params: &[f32]) -> anyhow::Result<()> {
        assert_eq!(params.len(), self.layout.total, "upload_params: params must follow the layout");
        self.ops.gpu.stream.memcpy_htod(params, &mut self.params.view_mut())?;
        self.refresh_bf16()
    }

    /// The parameters, back on the host (for checkpoints).
    pub fn download_params(&self) -> anyhow::Result<Vec<f32>> {
        Ok(self.ops.to_host(&self.params)?.into_owned())
    }

    pub fn download_grads(&self) -> anyhow::Result<Vec<f32>> {
        Ok(self.ops.to_host(&self.grads)?.into_owned())
    }

    /// The global norm of the gradients, then clipping to `max_norm` (as `gradnorm`):
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f32) -> anyhow::Result<f32> {
        let norm = device::global_norm(&self.ops.gpu, &self.grads.view())?;
        let coef = max_norm / (norm + 1e-6);
        if max_norm > 0.0 && coef < 1.0 {
            device::scale(&self.ops.gpu, &mut self.grads.view_mut(), coef)?;
        }
        Ok(norm)
    }
}

/// AdamW's moments on the device, stepped tensor by tensor as `optim::AdamW` does (weight
/// decay only where the layout says).
pub type GpuAdamW = AdamW<CudaSlice<f32>>;

impl GpuAdamW {
    /// The device copy of a host optimizer (a resumed job's restored state).
    pub fn from_host(gpu: &Gpu, opt: &AdamW) -> anyhow::Result<Self> {
        Ok(opt.with_moments(gpu.upload(&opt.m)?, gpu.upload(&opt.v)?))
    }

    /// Copies the moments and step count back into `opt` (for a checkpoint).
    pub fn download_into(&self, gpu: &Gpu, opt: &mut AdamW) -> anyhow::Result<()> {
        opt.m = gpu.download(&self.m)?;
        opt.v = gpu.download(&self.v)?;
        opt.t = self.t;
        Ok(())
    }

    /// Zero moments for `n` parameters on `gpu`.
    pub fn zeros(gpu: &Gpu, n: usize, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> anyhow::Result<Self> {
        let (m, v) = (gpu.stream.alloc_zeros::<f32>(n)?, gpu.stream.alloc_zeros::<f32>(n)?);
        Ok(AdamW::new(0, beta1, beta2, eps, weight_decay).with_moments(m, v))
    }

    /// One step at learning rate `lr` over every tensor of the model.
    pub fn step(&mut self, model: &mut GpuBert, lr: f64) -> anyhow::Result<()> {
        self.t += 1;
        for e in &model.layout.entries {
            let r = e.range();
            let hp = self.tensor_params(lr, e.decay);
            device::adamw_update(
                &model.ops.gpu,
                &mut model.params.slice_mut(r.clone()),
                &model.grads.slice(r.clone()),
                &mut self.m.slice_mut(r.clone()),
                &mut self.v.slice_mut(r),
                &hp,
                self.t,
            )?;
        }
        model.refresh_bf16()
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
