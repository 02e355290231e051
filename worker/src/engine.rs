//! The engine seam: BERT and its optimizer on one device, with the gradient all-reduce that
//! device sums with (the TCP ring on the CPU, NCCL on a GPU). The training loop, the optimizer
//! step and evaluation are written once against [`Engine`]; [`open`] is the one place that
//! picks the device.
//!
//! Both engines keep the CPU `Bert` and `AdamW` as the host state (configuration, layout, and
//! what checkpoints and checksums read): the CPU engine computes on them, the GPU engine
//! refreshes them from the device when asked ([`Engine::host`]).

use crate::collective::{Collective, Overlapped};
use crate::cuda_ops::{GpuAdamW, GpuBert};
use crate::model::{Batch, Bert, DropoutCtx, ForwardOut};
use crate::nccl::NcclRing;
use crate::optim::AdamW;
use anyhow::Context;
use job::config::Precision;
use kernels::gradnorm;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where `worker` computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// The GPU of this ordinal (`--gpu`).
    Cuda(usize),
}

/// How this rank sums gradients with the others of its world.
pub enum Peers {
    /// A world of one.
    Alone,
    /// The CPU ring on its own thread, fed gradient segments during backward.
    Ring(Overlapped),
    /// A GPU world's NCCL communicator, and the flag a restart sets to cancel a wait.
    Nccl(NcclRing, Arc<AtomicBool>),
}

/// Time spent summing gradients in one step.
#[derive(Clone, Copy, Debug, Default)]
pub struct SumTimes {
    /// In gradient all-reduces (on the all-reduce thread or stream, mostly hidden behind
    /// backward).
    pub busy: Duration,
    /// The part the step waited for once backward was done.
    pub waited: Duration,
}

/// A model and its optimizer on one device.
pub trait Engine {
    /// The host state, for reading configuration and layout (not refreshed from the device).
    fn model(&self) -> &Bert;
    fn zero_grads(&mut self) -> anyhow::Result<()>;
    /// Forward pass and loss; `dropout = None` evaluates.
    fn forward(&mut self, batch: &Batch, dropout: Option<DropoutCtx>) -> anyhow::Result<ForwardOut>;
    /// Backward of the last forward for `sum(losses) * loss_scale`, accumulating gradients. With
    /// `sum`, each segment of the gradient buffer starts its all-reduce as soon as backward has
    /// finished it (only on the last micro-batch of a step).
    fn backward(&mut self, batch: &Batch, loss_scale: f32, sum: bool) -> anyhow::Result<()>;
    /// Waits for the gradient sums started by `backward` (none alone).
    fn finish_sums(&mut self) -> anyhow::Result<SumTimes>;
    /// Sums a few host values over the world, in place (nothing alone).
    fn sum_values(&mut self, values: &mut [f32]) -> anyhow::Result<()>;
    /// Whether other ranks take part.
    fn has_peers(&self) -> bool;
    /// The global gradient norm, then clipping to `max_norm` (none when it is 0): the norm
    /// before clipping.
    fn clip_grad_norm(&mut self, max_norm: f32) -> anyhow::Result<f32>;
    /// One AdamW step at `lr`.
    fn optimizer_step(&mut self, lr: f64) -> anyhow::Result<()>;
    /// Each row's predicted class and loss in the last forward: what evaluation counts.
    fn predictions(&mut self) -> anyhow::Result<(Vec<u32>, Vec<f32>)>;
    /// The parameters, copied to the host where they live elsewhere.
    fn host_params(&mut self) -> anyhow::Result<&Bert>;
    /// The parameters and the whole optimizer state (a checkpoint's), copied to the host where
    /// they live elsewhere. With ZeRO-1 the moments are spread over the ranks: every rank must
    /// call it at the same point, rank 0 gathers them and the others get `None`.
    fn host(&mut self) -> anyhow::Result<Option<(&Bert, &AdamW)>>;
    /// Changes the parameters through `f` (the fault tests' silent desync).
    fn edit_params(&mut self, f: &mut dyn FnMut(&mut [f32])) -> anyhow::Result<()>;
}

impl Device {
    /// Opens the device: for CUDA, the GPU with NVRTC's headers from `TANDEM_CUDA_INCLUDE`
    /// (else the CUDA toolkit's). Once per process; every generation's engine runs on it.
    pub fn open(self) -> anyhow::Result<Compute> {
        match self {
            Device::Cpu => Ok(Compute::Cpu),
            Device::Cuda(ordinal) => {
                let include = std::env::var("TANDEM_CUDA_INCLUDE").unwrap_or_else(|_| "/usr/local/cuda/include".into());
                let gpu = Arc::new(kernels::gpu::Gpu::open(ordinal, vec![include])?);
                tracing::info!(gpu = ordinal, name = gpu.name, arch = gpu.arch, "computing on the GPU");
                Ok(Compute::Gpu(gpu))
            }
        }
    }
}

/// An opened device.
pub enum Compute {
    Cpu,
    Gpu(Arc<kernels::gpu::Gpu>),
}

/// The engine on `compute`, starting from `model` and `opt` (a checkpoint's, or fresh): the one
/// place that picks the CPU or the GPU implementation.
pub fn open(compute: &Compute, model: Bert, opt: AdamW, how: Options, peers: Peers) -> anyhow::Result<Box<dyn Engine>> {
    let Options { precision, zero } = how;
    match (compute, peers) {
        (Compute::Cpu, Peers::Nccl(..)) => anyhow::bail!("a CPU engine sums with the ring, not NCCL"),
        (Compute::Cpu, peers) => {
            anyhow::ensure!(precision == Precision::Fp32 || kernels::bf16::supported(), crate::ops::NO_CPU_BF16);
            let mut model = model;
            model.precision = precision;
            let (ring, zero, opt) = match peers {
                Peers::Ring(r) if zero => {
                    let shards = crate::collective::chunk_ranges(model.params.len(), r.world_size());
                    let own = shards[r.rank()].clone();
                    tracing::info!(
                        rank = r.rank(),
                        from = own.start,
                        to = own.end,
                        "ZeRO-1: this rank steps its shard of the optimizer"
                    );
                    let opt = opt.shard(own);
                    (Some(r), Some(Zero { shards, gathered: false, whole: None }), opt)
                }
                Peers::Ring(r) => (Some(r), None, opt),
                _ => (None, None, opt),
            };
            let touched = Touched(vec![false; model.cfg.vocab_size]);
            Ok(Box::new(CpuEngine { model, touched, opt, ring, zero }))
        }
        (Compute::Gpu(_), Peers::Ring(_)) => anyhow::bail!("a GPU engine sums with NCCL, not the ring"),
        (Compute::Gpu(_), Peers::Nccl(..)) if zero => {
            anyhow::bail!("train.zero = 1 is built for the CPU ring only: on GPUs set train.zero = 0")
        }
        (Compute::Gpu(gpu), peers) => {
            let mut dev = GpuBert::new(Arc::clone(gpu), model.cfg.clone(), model.layout.clone(), &model.params)?;
            dev.set_precision(precision)?;
            let dev_opt = GpuAdamW::from_host(gpu, &opt)?;
            let nccl = match peers {
                Peers::Nccl(n, cancel) => Some((n, cancel)),
                _ => None,
            };
            let (host, host_opt, buckets, first) = (model, opt, Vec::new(), None);
            Ok(Box::new(GpuEngine { dev, dev_opt, host, host_opt, nccl, buckets, first }))
        }
    }
}

/// How an engine computes and keeps its optimizer state.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub precision: Precision,
    /// ZeRO-1 (`train.zero = 1`): each rank keeps and steps only its shard of AdamW's state.
    pub zero: bool,
}

impl Options {
    pub fn of(t: &job::config::TrainSection) -> Self {
        Options { precision: t.precision, zero: t.zero == 1 }
    }
}

struct CpuEngine {
    model: Bert,
    /// The vocabulary rows this step's micro-batches have used so far.
    touched: Touched,
    /// The whole optimizer, or with ZeRO-1 this rank's shard of it.
    opt: AdamW,
    ring: Option<Overlapped>,
    zero: Option<Zero>,
}

/// ZeRO-1 on the CPU ring: rank r owns `shards[r]` of the flat buffers (nearly equal ranges).
/// Backward reduce-scatters each gradient segment so that every rank gets the sum of the part
/// it owns (the word embeddings, whose gradient is mostly zero rows, are still all-reduced as
/// sparse rows); the global norm adds the shards' sums of squares; each rank runs AdamW on its
/// shard only; an all-gather then gives every rank the whole new parameters. The moments live
/// only in their shard, so a checkpoint gathers them on rank 0 (the checkpoint format, the
/// uploading rank and resuming on another world size stay as they are).
struct Zero {
    shards: Vec<std::ops::Range<usize>>,
    /// The moments have been gathered since the last step: every rank knows it, so that a second
    /// checkpoint before the next step gathers nothing, on every rank alike.
    gathered: bool,
    /// Rank 0's whole optimizer while gathered. Its own shard's moments are moved into it (and
    /// moved back out at the next step), so that rank 0 holds one copy of the optimizer state at
    /// a checkpoint, not one and a half.
    whole: Option<AdamW>,
}

impl Zero {
    /// Makes `opt` the shard `own` again after a gather (rank 0: out of the whole moments, in
    /// place, without a second copy).
    fn restore(&mut self, opt: &mut AdamW, own: std::ops::Range<usize>) {
        self.gathered = false;
        if let Some(whole) = self.whole.take() {
            let shard = |mut v: Vec<f32>| {
                v.copy_within(own.clone(), 0);
                v.truncate(own.len());
                v.shrink_to_fit();
                v
            };
            (opt.m, opt.v) = (shard(whole.m), shard(whole.v));
        }
    }
}

/// Floats per piece of the moments' gather for a checkpoint (so that ranks other than 0 hold
/// no whole copy).
const GATHER_PIECE: usize = 1 << 21;

/// Which word-embedding rows a step's backward can have made non-zero: the rows of its tokens,
/// as the embedding lookup is the gradient's only source, except under a masked-LM head, whose
/// decoder shares the word embeddings and fills every row.
struct Touched(Vec<bool>);

impl Touched {
    fn clear(&mut self) {
        self.0.fill(false);
    }

    fn add(&mut self, batch: &Batch) {
        for &id in &batch.input_ids {
            if let Some(t) = self.0.get_mut(id as usize) {
                *t = true;
            }
        }
    }

    /// The rows so far and `batch`'s (the last micro-batch's), ascending.
    fn rows(&mut self, batch: &Batch, head: &crate::layout::Head) -> Vec<u32> {
        self.add(batch);
        let every = matches!(head, crate::layout::Head::MaskedLm);
        (0..self.0.len() as u32).filter(|&r| every || self.0[r as usize]).collect()
    }
}

impl CpuEngine {
    /// This rank's shard, with ZeRO-1.
    fn own(&self) -> Option<std::ops::Range<usize>> {
        let (z, ring) = (self.zero.as_ref()?, self.ring.as_ref()?);
        Some(z.shards[ring.rank()].clone())
    }
}

impl Engine for CpuEngine {
    fn model(&self) -> &Bert {
        &self.model
    }

    fn zero_grads(&mut self) -> anyhow::Result<()> {
        self.touched.clear();
        self.model.zero_grads()
    }

    fn forward(&mut self, batch: &Batch, dropout: Option<DropoutCtx>) -> anyhow::Result<ForwardOut> {
        Ok(self.model.forward(batch, dropout)?)
    }

    fn backward(&mut self, batch: &Batch, loss_scale: f32, sum: bool) -> anyhow::Result<()> {
        let Some(ring) = self.ring.as_mut().filter(|_| sum) else {
            self.touched.add(batch);
            return Ok(self.model.backward(batch, loss_scale)?);
        };
        // The word embeddings lead the buffer and are the last segment backward reports; their
        // gradient is zero outside the batch's tokens (unless a tied decoder fills it), so they
        // are summed as sparse rows.
        let words = self.model.layout.range("embeddings.word_embeddings.weight");
        let width = self.model.cfg.hidden_size;
        let rows = self.touched.rows(batch, &self.model.layout.head);
        let shards = self.zero.as_ref().map(|z| &z.shards[..]);
        let dense = |ring: &mut Overlapped, range: std::ops::Range<usize>, g: &[f32]| match shards {
            Some(shards) => ring.start_scatter(range, g, shards),
            None => ring.start(range, g),
        };
        self.model.backward_with(batch, loss_scale, &mut |range, grads| {
            let g = &grads[range.clone()];
            if range.start == words.start && range.end >= words.end {
                let (w, rest) = g.split_at(words.len());
                let packed = rows.iter().flat_map(|&r| &w[r as usize * width..(r as usize + 1) * width]).copied();
                ring.start_rows(words.clone(), rows.clone(), packed, width);
                if !rest.is_empty() {
                    dense(ring, words.end..range.end, rest);
                }
            } else {
                dense(ring, range, g);
            }
            Ok(())
        })?;
        Ok(())
    }

    fn finish_sums(&mut self) -> anyhow::Result<SumTimes> {
        let Some(ring) = self.ring.as_mut() else { return Ok(SumTimes::default()) };
        let t0 = Instant::now();
        ring.finish(&mut self.model.grads).context("all-reducing gradients")?;
        Ok(SumTimes { waited: t0.elapsed(), busy: ring.take_busy() })
    }

    fn sum_values(&mut self, values: &mut [f32]) -> anyhow::Result<()> {
        if let Some(ring) = self.ring.as_mut() {
            ring.all_reduce_sum(values).context("all-reducing the loss")?;
        }
        Ok(())
    }

    fn has_peers(&self) -> bool {
        self.ring.is_some()
    }

    fn clip_grad_norm(&mut self, max_norm: f32) -> anyhow::Result<f32> {
        let Some(own) = self.own() else {
            let norm = gradnorm::global_norm(&self.model.grads);
            if max_norm > 0.0 {
                gradnorm::clip_grad_norm(&mut self.model.grads, norm, max_norm);
            }
            return Ok(norm);
        };
        // Every rank's f64 sum of squares, gathered bit for bit (as two f32 words each) and
        // added in rank order: every rank computes the same norm.
        let ring = self.ring.as_mut().expect("ZeRO-1 has a ring");
        let (rank, world) = (ring.rank(), ring.world_size());
        let mut words = vec![0.0f32; 2 * world];
        let bits = gradnorm::sum_of_squares(&self.model.grads[own.clone()]).to_bits();
        words[2 * rank] = f32::from_bits(bits as u32);
        words[2 * rank + 1] = f32::from_bits((bits >> 32) as u32);
        let parts: Vec<_> = (0..world).map(|r| 2 * r..2 * r + 2).collect();
        ring.all_gather(&mut words, &parts).context("gathering the gradient norm")?;
        let total: f64 = words
            .chunks(2)
            .map(|w| f64::from_bits(u64::from(w[0].to_bits()) | (u64::from(w[1].to_bits()) << 32)))
            .sum();
        let norm = total.sqrt() as f32;
        if max_norm > 0.0 {
            gradnorm::clip_grad_norm(&mut self.model.grads[own], norm, max_norm);
        }
        Ok(norm)
    }

    fn optimizer_step(&mut self, lr: f64) -> anyhow::Result<()> {
        let m = &mut self.model;
        let (Some(z), Some(ring)) = (self.zero.as_mut(), self.ring.as_mut()) else {
            self.opt.step(&m.layout, &mut m.params, &m.grads, lr);
            return Ok(());
        };
        let own = z.shards[ring.rank()].clone();
        z.restore(&mut self.opt, own.clone());
        self.opt.step_shard(&m.layout, &mut m.params, &m.grads, lr, own);
        ring.all_gather(&mut m.params, &z.shards).context("all-gathering the parameters")?;
        Ok(())
    }

    fn predictions(&mut self) -> anyhow::Result<(Vec<u32>, Vec<f32>)> {
        self.model.predictions()
    }

    fn host_params(&mut self) -> anyhow::Result<&Bert> {
        Ok(&self.model)
    }

    fn host(&mut self) -> anyhow::Result<Option<(&Bert, &AdamW)>> {
        // A checkpoint's buffers take the place of the gradient buckets' spares.
        if let Some(ring) = self.ring.as_mut() {
            ring.release();
        }
        let (Some(z), Some(ring)) = (self.zero.as_mut(), self.ring.as_mut()) else {
            return Ok(Some((&self.model, &self.opt)));
        };
        if z.gathered {
            return Ok(z.whole.as_ref().map(|opt| (&self.model, opt)));
        }
        // Each moment in pieces: a piece holds this rank's part of it, the all-gather fills in
        // the others', and rank 0 keeps it in the whole moments, which its own part has moved
        // into first.
        let (rank, len) = (ring.rank(), self.model.params.len());
        let own = z.shards[rank].clone();
        let spread = |mine: &mut Vec<f32>| {
            let mut whole = vec![0.0; len];
            whole[own.clone()].copy_from_slice(mine);
            *mine = Vec::new();
            whole
        };
        z.whole = (rank == 0).then(|| {
            let (m, v) = (spread(&mut self.opt.m), spread(&mut self.opt.v));
            self.opt.with_moments(m, v)
        });
        for which in 0..2 {
            let mut start = 0;
            while start < len {
                let range = start..(start + GATHER_PIECE).min(len);
                let mut piece = vec![0.0; range.len()];
                let (a, b) = (own.start.max(range.start), own.end.min(range.end));
                if a < b {
                    let mine = match (&z.whole, which) {
                        (Some(w), 0) => &w.m[own.clone()],
                        (Some(w), _) => &w.v[own.clone()],
                        (None, 0) => &self.opt.m[..],
                        (None, _) => &self.opt.v[..],
                    };
                    piece[a - range.start..b - range.start].copy_from_slice(&mine[a - own.start..b - own.start]);
                }
                let parts = crate::collective::within(&range, &z.shards);
                ring.all_gather(&mut piece, &parts).context("gathering the optimizer state")?;
                if let Some(w) = z.whole.as_mut() {
                    let dst = if which == 0 { &mut w.m } else { &mut w.v };
                    dst[range.clone()].copy_from_slice(&piece);
                }
                start = range.end;
            }
        }
        z.gathered = true;
        Ok(z.whole.as_ref().map(|opt| (&self.model, opt)))
    }

    fn edit_params(&mut self, f: &mut dyn FnMut(&mut [f32])) -> anyhow::Result<()> {
        f(&mut self.model.params);
        Ok(())
    }
}

type Bucket = (std::ops::Range<usize>, cudarc::driver::CudaSlice<f32>);

struct GpuEngine {
    dev: GpuBert,
    dev_opt: GpuAdamW,
    /// The host twins, refreshed by `host`.
    host: Bert,
    host_opt: AdamW,
    nccl: Option<(NcclRing, Arc<AtomicBool>)>,
    /// The gradient segments being summed (each in a bucket of its own, so that the all-reduce
    /// never waits on, nor holds up, the rest of backward), and an event before the first.
    buckets: Vec<Bucket>,
    first: Option<cudarc::driver::CudaEvent>,
}

impl Engine for GpuEngine {
    fn model(&self) -> &Bert {
        &self.host
    }

    fn zero_grads(&mut self) -> anyhow::Result<()> {
        self.dev.zero_grads()
    }

    fn forward(&mut self, batch: &Batch, dropout: Option<DropoutCtx>) -> anyhow::Result<ForwardOut> {
        Ok(self.dev.forward(batch, dropout)?)
    }

    fn backward(&mut self, batch: &Batch, loss_scale: f32, sum: bool) -> anyhow::Result<()> {
        let Some((ring, _)) = self.nccl.as_ref().filter(|_| sum) else {
            return Ok(self.dev.backward(batch, loss_scale)?);
        };
        let gpu = Arc::clone(self.dev.gpu());
        let (buckets, first) = (&mut self.buckets, &mut self.first);
        Ok(self.dev.backward_with(batch, loss_scale, &mut |range, grads| {
            let mut bucket = gpu.stream.alloc_zeros::<f32>(range.len())?;
            gpu.stream.memcpy_dtod(&grads.slice(range.clone()), &mut bucket)?;
            if first.is_none() {
                *first = Some(ring.mark()?);
            }
            ring.all_reduce_async(&mut bucket)?;
            buckets.push((range, bucket));
            Ok(())
        })?)
    }

    fn finish_sums(&mut self) -> anyhow::Result<SumTimes> {
        let Some((ring, cancel)) = self.nccl.as_ref() else { return Ok(SumTimes::default()) };
        let buckets = std::mem::take(&mut self.buckets);
        let waited = ring
            .wait(&format!("NCCL all-reduce of {} gradient buckets", buckets.len()), Some(cancel))
            .context("all-reducing gradients")?;
        // From the first bucket's start to the last one's end on the communicator's stream.
        let mut busy = Duration::ZERO;
        if let Some(first) = self.first.take() {
            let end = ring.mark()?;
            end.synchronize()?;
            busy = Duration::from_secs_f64(f64::from(first.elapsed_ms(&end)?.max(0.0)) / 1e3);
        }
        for (range, bucket) in &buckets {
            self.dev.ops.gpu.stream.memcpy_dtod(bucket, &mut self.dev.grads.slice_mut(range.clone()))?;
        }
        Ok(SumTimes { busy, waited })
    }

    fn sum_values(&mut self, values: &mut [f32]) -> anyhow::Result<()> {
        if let Some((ring, cancel)) = self.nccl.as_ref() {
            let mut sums = self.dev.gpu().upload(values)?;
            ring.all_reduce_sum(&mut sums.as_view_mut(), Some(cancel)).context("all-reducing the loss")?;
            values.copy_from_slice(&self.dev.gpu().download(&sums)?);
        }
        Ok(())
    }

    fn has_peers(&self) -> bool {
        self.nccl.is_some()
    }

    fn clip_grad_norm(&mut self, max_norm: f32) -> anyhow::Result<f32> {
        self.dev.clip_grad_norm(max_norm)
    }

    fn optimizer_step(&mut self, lr: f64) -> anyhow::Result<()> {
        self.dev_opt.step(&mut self.dev, lr)
    }

    fn predictions(&mut self) -> anyhow::Result<(Vec<u32>, Vec<f32>)> {
        self.dev.predictions()
    }

    fn host_params(&mut self) -> anyhow::Result<&Bert> {
        self.host.params = self.dev.download_params()?;
        Ok(&self.host)
    }

    fn host(&mut self) -> anyhow::Result<Option<(&Bert, &AdamW)>> {
        self.host.params = self.dev.download_params()?;
        self.dev_opt.download_into(self.dev.gpu(), &mut self.host_opt)?;
        Ok(Some((&self.host, &self.host_opt)))
    }

    fn edit_params(&mut self, f: &mut dyn FnMut(&mut [f32])) -> anyhow::Result<()> {
        let mut p = self.dev.download_params()?;
        f(&mut p);
        self.dev.upload_params(&p)
    }
}
