//! The GPU at run time: a context and stream on one device, the kernel modules compiled by NVRTC
//! for its architecture once per process and cached, and the kernel parity check that
//! `worker gpu-check` prints: every CUDA kernel against its CPU twin on random inputs.
//!
//! Checked on a machine without a GPU only as far as it compiles; scripts/gpu-check.sh runs it
//! where there is one.
#![allow(unsafe_code)] // kernel launches: each argument list matches its kernel's signature

use crate::cuda::{self, compile, full_source, CudaError, SOURCES};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig};
use philox;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Compile(#[from] CudaError),
    #[error("CUDA: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("no kernel family {0} in kernels::cuda::SOURCES")]
    NoFamily(String),
    #[error("no cuBLAS library found (libcublas.so.12): install the CUDA toolkit or NVIDIA's nvidia-cublas-cu12 wheel and put its lib folder on LD_LIBRARY_PATH")]
    NoCublas,
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// `sm_XY` of the device.
    pub arch: String,
    pub name: String,
    include_dirs: Vec<String>,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    /// The cuBLAS handle on `stream`, made on first use.
    blas: std::sync::OnceLock<cudarc::cublas::CudaBlas>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({}, {})", self.name, self.arch)
    }
}

/// Threads per block of the elementwise kernels, and the most blocks a grid-stride launch uses.
const THREADS: u32 = 256;
const MAX_BLOCKS: u32 = 1 << 16;

/// A launch for a grid-stride kernel over `n` elements.
pub fn elementwise(n: usize) -> LaunchConfig {
    let blocks = (n.div_ceil(THREADS as usize) as u32).clamp(1, MAX_BLOCKS);
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// A launch with one warp per row, 4 rows per block.
pub fn warp_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.div_ceil(4).max(1) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }
}

impl Gpu {
    /// Opens GPU `ordinal`; `include_dirs` hold `cuda_bf16.h` for NVRTC (`TANDEM_CUDA_INCLUDE`,
    /// or the CUDA toolkit's include folder).
    pub fn open(ordinal: usize, include_dirs: Vec<String>) -> Result<Self, GpuError> {
        if let Some(why) = cuda::cuda_unavailable(ordinal) {
            return Err(GpuError::Unavailable(why));
        }
        if !cuda::nvrtc_available() {
            return Err(CudaError::NoNvrtc.into());
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let name = ctx.name()?;
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            name,
            include_dirs,
            modules: Mutex::new(HashMap::new()),
            blas: std::sync::OnceLock::new(),
        })
    }

    /// cuBLAS on this GPU's stream (checked for before loading: cudarc panics without it).
    pub fn blas(&self) -> Result<&cudarc::cublas::CudaBlas, GpuError> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        // SAFETY: only tries to dlopen the library by its candidate names.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(GpuError::NoCublas);
        }
        let b = cudarc::cublas::CudaBlas::new(self.stream.clone())?;
        Ok(self.blas.get_or_init(|| b))
    }

    /// The kernel `kernel` of the op family `family`, compiling the family on first use.
    pub fn function(&self, family: &str, kernel: &str) -> Result<CudaFunction, GpuError> {
        let mut modules = self.modules.lock().expect("module cache lock");
        let module = match modules.get(family) {
            Some(m) => Arc::clone(m),
            None => {
                let (_, headers, src) =
                    SOURCES.iter().find(|(f, _, _)| *f == family).ok_or_else(|| GpuError::NoFamily(family.into()))?;
                let compiled = compile(family, &full_source(headers, src), &self.arch, &self.include_dirs)?;
                let m = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin))?;
                modules.insert(family.to_string(), Arc::clone(&m));
                m
            }
        };
        Ok(module.load_function(kernel)?)
    }

    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, GpuError> {
        Ok(self.stream.clone_htod(host)?)
    }

    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        dev: &CudaSlice<T>,
    ) -> Result<Vec<T>, GpuError> {
        Ok(self.stream.clone_dtoh(dev)?)
    }
}

/// One line of the kernel parity table.
#[derive(Clone, Debug)]
pub struct ParityRow {
    pub kernel: &'static str,
    pub elements: usize,
    /// max |gpu - cpu| / (|cpu| + rms(cpu)): a relative error floored at the tensor's scale.
    pub rel_error: f64,
    pub tolerance: f64,
    pub nan: bool,
}

impl ParityRow {
    pub fn passed(&self) -> bool {
        !self.nan && self.rel_error <= self.tolerance
    }
}

fn compare(kernel: &'static str, gpu: &[f32], cpu: &[f32], tolerance: f64) -> ParityRow {
    assert_eq!(gpu.len(), cpu.len(), "{kernel}: lengths differ");
    let nan = gpu.iter().chain(cpu).any(|x| !x.is_finite());
    ParityRow { kernel, elements: cpu.len(), rel_error: crate::tolerance::rel_error(gpu, cpu), tolerance, nan }
}

fn randn(n: usize, stream: u32, scale: f32) -> Vec<f32> {
    (0..n).map(|i| philox::normal(7, stream, i as u64) * scale).collect()
}

/// Runs every CUDA kernel on random inputs (BERT-base-like shapes) and compares it with its CPU
/// twin: fp32 tolerance 1e-5 relative; a NaN never passes.
pub fn kernel_parity(gpu: &Gpu) -> Result<Vec<ParityRow>, GpuError> {
    use crate::device;
    use crate::{adamw, crossentropy, dropout, embedding, gelu, gradnorm, layernorm, residual, tanh};
    const TOL: f64 = 1e-5;
    let s = &gpu.stream;
    let mut rows = Vec::new();
    let (n_rows, c) = (8 * 128, 768);
    let n = n_rows * c;

    // Elementwise: gelu, tanh, residual, add_inplace, through the launchers the model uses.
    let x = randn(n, 1, 2.0);
    let g = randn(n, 2, 1.0);
    let dx = gpu.upload(&x)?;
    let dg = gpu.upload(&g)?;
    {
        let (mut out, mut deriv) = (s.alloc_zeros::<f32>(n)?, gpu.upload(&x)?);
        device::gelu_forward(gpu, &mut out.as_view_mut(), &mut deriv.as_view_mut())?;
        let (mut want, mut want_deriv) = (vec![0.0; n], x.clone());
        gelu::gelu_forward(&mut want, &mut want_deriv);
        rows.push(compare("gelu_forward_f32", &gpu.download(&out)?, &want, TOL));
        rows.push(compare("gelu_forward_f32 (derivative)", &gpu.download(&deriv)?, &want_deriv, TOL));

        let init = randn(n, 3, 0.5);
        let mut din = gpu.upload(&init)?;
        device::gelu_backward(gpu, &mut din.as_view_mut(), &deriv.as_view(), &dg.as_view())?;
        let mut want = init.clone();
        gelu::gelu_backward(&mut want, &want_deriv, &g);
        rows.push(compare("gelu_backward_f32", &gpu.download(&din)?, &want, TOL));

        device::tanh_forward(gpu, &mut out.as_view_mut(), &dx.as_view())?;
        let mut want_t = vec![0.0; n];
        tanh::tanh_forward(&mut want_t, &x);
        rows.push(compare("tanh_forward_f32", &gpu.download(&out)?, &want_t, TOL));

        let dy = gpu.upload(&want_t)?;
        let mut din = gpu.upload(&init)?;
        device::tanh_backward(gpu, &mut din.as_view_mut(), &dy.as_view(), &dg.as_view())?;
        let mut want = init.clone();
        tanh::tanh_backward(&mut want, &want_t, &g);
        rows.push(compare("tanh_backward_f32", &gpu.download(&din)?, &want, TOL));

        device::residual_forward(gpu, &mut out.as_view_mut(), &dx.as_view(), &dg.as_view())?;
        let mut want = vec![0.0; n];
        residual::residual_forward(&mut want, &x, &g);
        rows.push(compare("residual_forward_f32", &gpu.download(&out)?, &want, TOL));

        let mut acc = gpu.upload(&init)?;
        device::add_inplace(gpu, &mut acc.as_view_mut(), &dg.as_view())?;
        let mut want = init.clone();
        residual::add_inplace(&mut want, &g);
        rows.push(compare("add_inplace_f32", &gpu.download(&acc)?, &want, TOL));
    }

    // Layer norm forward and backward (input and parameter gradients).
    {
        let w = randn(c, 4, 0.2).iter().map(|v| 1.0 + v).collect::<Vec<f32>>();
        let b = randn(c, 5, 0.1);
        let (dw_, db_) = (gpu.upload(&w)?, gpu.upload(&b)?);
        let mut out = s.alloc_zeros::<f32>(n)?;
        let mut mean = s.alloc_zeros::<f32>(n_rows)?;
        let mut rstd = s.alloc_zeros::<f32>(n_rows)?;
        let eps = 1e-12f32;
        device::layernorm_forward(
            gpu,
            &mut out.as_view_mut(),
            &mut mean.as_view_mut(),
            &mut rstd.as_view_mut(),
            &dx.as_view(),
            &dw_.as_view(),
            &db_.as_view(),
            n_rows,
            c,
            eps,
        )?;
        let (mut want, mut wm, mut wr) = (vec![0.0; n], vec![0.0; n_rows], vec![0.0; n_rows]);
        layernorm::layernorm_forward(&mut want, &mut wm, &mut wr, &x, &w, &b, n_rows, c, eps);
        rows.push(compare("layernorm_forward_f32", &gpu.download(&out)?, &want, TOL));

        let init = randn(n, 6, 0.5);
        let mut din = gpu.upload(&init)?;
        let (dw_init, db_init) = (randn(c, 7, 0.1), randn(c, 8, 0.1));
        let (mut ddw, mut ddb) = (gpu.upload(&dw_init)?, gpu.upload(&db_init)?);
        device::layernorm_backward(
            gpu,
            &mut din.as_view_mut(),
            &mut ddw.as_view_mut(),
            &mut ddb.as_view_mut(),
            &dg.as_view(),
            &dx.as_view(),
            &dw_.as_view(),
            &mean.as_view(),
            &rstd.as_view(),
            n_rows,
            c,
        )?;
        let (mut want_dx, mut want_dw, mut want_db) = (init.clone(), dw_init.clone(), db_init.clone());
        layernorm::layernorm_backward(&mut want_dx, &mut want_dw, &mut want_db, &g, &x, &w, &wm, &wr, n_rows, c);
        rows.push(compare("layernorm_backward_f32", &gpu.download(&din)?, &want_dx, TOL));
        rows.push(compare("layernorm_param (dweight)", &gpu.download(&ddw)?, &want_dw, TOL));
        rows.push(compare("layernorm_param (dbias)", &gpu.download(&ddb)?, &want_db, TOL));
    }

    // AdamW, one step with weight decay.
    {
        let hp = adamw::AdamWParams { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let t = 3u64;
        let (p0, m0) = (randn(n, 9, 0.05), randn(n, 10, 1e-3));
        let v0: Vec<f32> = randn(n, 11, 1e-3).iter().map(|v| v * v).collect();
        let (mut dp, mut dm, mut dv) = (gpu.upload(&p0)?, gpu.upload(&m0)?, gpu.upload(&v0)?);
        device::adamw_update(
            gpu,
            &mut dp.as_view_mut(),
            &dg.as_view(),
            &mut dm.as_view_mut(),
            &mut dv.as_view_mut(),
            &hp,
            t,
        )?;
        let (mut wp, mut wm, mut wv) = (p0.clone(), m0.clone(), v0.clone());
        adamw::adamw_update(&mut wp, &g, &mut wm, &mut wv, &hp, t);
        rows.push(compare("adamw_update_f32 (params)", &gpu.download(&dp)?, &wp, TOL));
        rows.push(compare("adamw_update_f32 (exp_avg_sq)", &gpu.download(&dv)?, &wv, TOL));
    }

    // Dropout on hidden states [B, 1, T, C]: the same mask as the CPU, bit for bit.
    {
        let (b, t) = (8usize, 128usize);
        let ids: Vec<u32> = (0..b as u32).map(|i| 1000 + 7 * i).collect();
        let spec = dropout::DropoutSpec { p: 0.1, seed: 0x1234_5678_9abc, step: 17, site: 4 };
        let logical = dropout::LogicalDims { t_max: 512, w_max: c };
        let mut dxx = gpu.upload(&x)?;
        let dids = gpu.upload(&ids)?;
        device::dropout_apply(gpu, false, &mut dxx.as_view_mut(), &dids.as_view(), 1, t, c, logical, &spec)?;
        let mut want = x.clone();
        dropout::dropout_forward(&mut want, crate::seqs::SeqsBuf::regular(t, &ids).view(), c, logical, &spec);
        let got = gpu.download(&dxx)?;
        let mismatched = got.iter().zip(&want).filter(|(a, b)| (**a == 0.0) != (**b == 0.0)).count();
        let mut row = compare("dropout_forward_f32", &got, &want, TOL);
        if mismatched > 0 {
            row.rel_error = f64::INFINITY; // a different mask is a failure whatever the values
        }
        rows.push(row);
    }

    // Embedding forward, and its backward as ordered scatter-adds (the padding row skipped).
    {
        let (b, t, v, p, tt) = (8usize, 128usize, 30522usize, 512usize, 2usize);
        let ids: Vec<u32> = (0..b * t)
            .map(|i| philox::philox4x32_10([i as u32, 0, 0, 0], [1, 2])[0] % 50 + (i % 3 == 0) as u32)
            .collect();
        let types: Vec<u32> = (0..b * t).map(|i| ((i % t) >= t / 2) as u32).collect();
        // Every other row packs two documents, the second restarting at position 0.
        let pos: Vec<u32> =
            (0..b * t).map(|i| (i % t - if (i / t) % 2 == 1 && i % t >= 40 { 40 } else { 0 }) as u32).collect();
        let (wte, wpe, wtt) = (randn(v * c, 12, 0.02), randn(p * c, 13, 0.02), randn(tt * c, 14, 0.02));
        let mut out = s.alloc_zeros::<f32>(b * t * c)?;
        let (di, dt, de, dpp, dtt) =
            (gpu.upload(&ids)?, gpu.upload(&types)?, gpu.upload(&wte)?, gpu.upload(&wpe)?, gpu.upload(&wtt)?);
        let dpos = gpu.upload(&pos)?;
        device::embedding_forward(
            gpu,
            &mut out.as_view_mut(),
            &di.as_view(),
            &dt.as_view(),
            &dpos.as_view(),
            &de.as_view(),
            &dpp.as_view(),
            &dtt.as_view(),
            b,
            t,
            c,
        )?;
        let mut want = vec![0.0; b * t * c];
        embedding::embedding_forward(&mut want, &ids, &types, &pos, &wte, &wpe, &wtt, b, t, c);
        rows.push(compare("embedding_forward_f32", &gpu.download(&out)?, &want, TOL));

        // Backward into the word table only (the other two tables take the same kernel).
        let dout = randn(b * t * c, 18, 0.1);
        let ddout = gpu.upload(&dout)?;
        let pad = Some(0u32);
        let groups = device::RowGroups::new(ids.iter().map(|&id| (Some(id) != pad).then_some(id as usize)));
        let init = randn(v * c, 19, 0.01);
        let mut dte = gpu.upload(&init)?;
        device::scatter_add_rows(gpu, &mut dte.as_view_mut(), &ddout.as_view(), &groups, c)?;
        let (mut want_te, mut want_pe, mut want_tt) = (init.clone(), vec![0.0; p * c], vec![0.0; tt * c]);
        embedding::embedding_backward(
            &mut want_te,
            &mut want_pe,
            &mut want_tt,
            &dout,
            &ids,
            &types,
            &pos,
            pad,
            b,
            t,
            c,
        );
        rows.push(compare("scatter_add_rows_f32 (word embeddings)", &gpu.download(&dte)?, &want_te, TOL));
    }

    // Cross-entropy over a masked-LM-sized vocabulary, with ignored rows.
    {
        let (rows_n, v) = (64usize, 30522usize);
        let logits = randn(rows_n * v, 15, 3.0);
        let targets: Vec<i64> =
            (0..rows_n).map(|i| if i % 5 == 0 { crossentropy::IGNORE_INDEX } else { (i * 977 % v) as i64 }).collect();
        let (dl, dt) = (gpu.upload(&logits)?, gpu.upload(&targets)?);
        let mut losses = s.alloc_zeros::<f32>(rows_n)?;
        device::crossentropy_forward(gpu, &mut losses.as_view_mut(), &dl.as_view(), &dt.as_view(), rows_n, v)?;
        let mut want = vec![0.0; rows_n];
        crossentropy::crossentropy_forward(&mut want, &logits, &targets, rows_n, v);
        rows.push(compare("crossentropy_forward_f32", &gpu.download(&losses)?, &want, TOL));

        let init = randn(rows_n * v, 16, 1e-4);
        let mut dlog = gpu.upload(&init)?;
        let scale = 1.0f32 / 51.0;
        device::crossentropy_backward(gpu, &mut dlog.as_view_mut(), &dl.as_view(), &dt.as_view(), scale, rows_n, v)?;
        let mut want = init.clone();
        crossentropy::crossentropy_backward(&mut want, &logits, &targets, scale, rows_n, v);
        rows.push(compare("crossentropy_backward_f32", &gpu.download(&dlog)?, &want, TOL));
    }

    // Global gradient norm (f64 partials in a fixed order).
    {
        let big = randn(3_000_001, 17, 1e-2);
        let dbig = gpu.upload(&big)?;
        let got = device::global_norm(gpu, &dbig.as_view())?;
        rows.push(compare("sumsq_partials_f64 (global norm)", &[got], &[gradnorm::global_norm(&big)], TOL));
    }

    // Dense layer forward and backward: cuBLAS GEMMs around the bias kernels (device.rs).
    {
        use crate::{device, matmul};
        let (nr, ci, oc) = (n_rows, c, 4 * c);
        let (inp, w, bias) = (randn(nr * ci, 20, 1.0), randn(oc * ci, 21, 0.02), randn(oc, 22, 0.1));
        let dout = randn(nr * oc, 23, 0.1);
        let (d_inp, d_w, d_b, d_dout) = (gpu.upload(&inp)?, gpu.upload(&w)?, gpu.upload(&bias)?, gpu.upload(&dout)?);
        let mut d_out = s.alloc_zeros::<f32>(nr * oc)?;
        device::matmul_forward(
            gpu,
            &mut d_out.as_view_mut(),
            &d_inp.as_view(),
            &d_w.as_view(),
            Some(&d_b.as_view()),
            nr,
            ci,
            oc,
        )?;
        let mut want = vec![0.0; nr * oc];
        matmul::matmul_forward(matmul::Operands::F32, &mut want, &inp, &w, Some(&bias), nr, ci, oc);
        rows.push(compare("matmul_forward (cuBLAS + bias_rows)", &gpu.download(&d_out)?, &want, TOL));

        let (gi, gw, gb) = (randn(nr * ci, 24, 0.01), randn(oc * ci, 25, 0.01), randn(oc, 26, 0.01));
        let (mut d_gi, mut d_gw, mut d_gb) = (gpu.upload(&gi)?, gpu.upload(&gw)?, gpu.upload(&gb)?);
        device::matmul_backward(
            gpu,
            &mut d_gi.as_view_mut(),
            &mut d_gw.as_view_mut(),
            Some(&mut d_gb.as_view_mut()),
            &d_dout.as_view(),
            &d_inp.as_view(),
            &d_w.as_view(),
            nr,
            ci,
            oc,
            true,
        )?;
        let (mut wi, mut ww, mut wb) = (gi.clone(), gw.clone(), gb.clone());
        matmul::matmul_backward(
            matmul::Operands::F32,
            &mut wi,
            &mut ww,
            Some(&mut wb),
            &dout,
            &inp,
            &w,
            nr,
            ci,
            oc,
            true,
        );
        rows.push(compare("matmul_backward (dinp)", &gpu.download(&d_gi)?, &wi, TOL));
        rows.push(compare("matmul_backward (dweight)", &gpu.download(&d_gw)?, &ww, TOL));
        rows.push(compare("matmul_backward (dbias)", &gpu.download(&d_gb)?, &wb, TOL));
    }

    // The same dense layer with bf16 GEMM inputs (train.precision = "bf16"): tolerance 1e-2.
    {
        use crate::{device, matmul};
        const TOL16: f64 = 1e-2;
        let (nr, ci, oc) = (n_rows, c, 4 * c);
        let (inp, w, bias) = (randn(nr * ci, 40, 1.0), randn(oc * ci, 41, 0.02), randn(oc, 42, 0.1));
        let dout = randn(nr * oc, 43, 0.1);
        let (d_inp, d_w, d_b, d_dout) = (gpu.upload(&inp)?, gpu.upload(&w)?, gpu.upload(&bias)?, gpu.upload(&dout)?);
        let mut w16 = s.alloc_zeros::<device::Bf16>(oc * ci)?;
        device::cast_to_bf16(gpu, &mut w16.as_view_mut(), &d_w.as_view())?;
        let mut d_out = s.alloc_zeros::<f32>(nr * oc)?;
        device::matmul_forward_bf16(
            gpu,
            &mut d_out.as_view_mut(),
            &d_inp.as_view(),
            &w16.as_view(),
            Some(&d_b.as_view()),
            nr,
            ci,
            oc,
        )?;
        let mut want = vec![0.0; nr * oc];
        matmul::matmul_forward(matmul::Operands::F32, &mut want, &inp, &w, Some(&bias), nr, ci, oc);
        rows.push(compare("matmul_forward_bf16", &gpu.download(&d_out)?, &want, TOL16));
        let (gi, gw, gb) = (randn(nr * ci, 44, 0.01), randn(oc * ci, 45, 0.01), randn(oc, 46, 0.01));
        let (mut d_gi, mut d_gw, mut d_gb) = (gpu.upload(&gi)?, gpu.upload(&gw)?, gpu.upload(&gb)?);
        device::matmul_backward_bf16(
            gpu,
            &mut d_gi.as_view_mut(),
            &mut d_gw.as_view_mut(),
            Some(&mut d_gb.as_view_mut()),
            &d_dout.as_view(),
            &d_inp.as_view(),
            &w16.as_view(),
            nr,
            ci,
            oc,
            false,
        )?;
        let (mut wi, mut ww, mut wb) = (gi.clone(), gw.clone(), gb.clone());
        matmul::matmul_backward(
            matmul::Operands::F32,
            &mut wi,
            &mut ww,
            Some(&mut wb),
            &dout,
            &inp,
            &w,
            nr,
            ci,
            oc,
            false,
        );
        rows.push(compare("matmul_backward_bf16 (dinp)", &gpu.download(&d_gi)?, &wi, TOL16));
        rows.push(compare("matmul_backward_bf16 (dweight)", &gpu.download(&d_gw)?, &ww, TOL16));
        rows.push(compare("matmul_backward_bf16 (dbias)", &gpu.download(&d_gb)?, &wb, TOL));
    }

    // Attention forward and backward with padding, packed segments and dropout on the probabilities.
    {
        use crate::attention::{self, AttnDims, AttnDropout, HeadDims};
        use crate::device::{self, DeviceAttnDropout};
        let d = AttnDims { b: 4, nh: 12, t: 128, hd: 64 };
        let (bh, tt, th) = (d.b * d.nh, d.t * d.t, d.t * d.hd);
        let (q, k, v, dout) =
            (randn(bh * th, 30, 1.0), randn(bh * th, 31, 1.0), randn(bh * th, 32, 1.0), randn(bh * th, 33, 0.1));
        // Example b has 128 - 16 b real tokens; padded keys get the additive mask.
        let mask: Vec<f32> =
            (0..d.b * d.t).map(|i| if i % d.t < d.t - 16 * (i / d.t) { 0.0 } else { f32::MIN }).collect();
        // Odd examples pack two documents: tokens from 60 on are a second segment.
        let segs: Vec<u32> = (0..d.b * d.t).map(|i| u32::from((i / d.t) % 2 == 1 && i % d.t >= 60)).collect();
        let ids: Vec<u32> = (0..d.b as u32).map(|i| 5000 + 3 * i).collect();
        let spec = dropout::DropoutSpec { p: 0.1, seed: 0xfeed_beef_1234, step: 9, site: 7 };
        let logical = dropout::LogicalDims { t_max: 512, w_max: 512 };
        let (dq_, dk_, dv_, dm, dids) =
            (gpu.upload(&q)?, gpu.upload(&k)?, gpu.upload(&v)?, gpu.upload(&mask)?, gpu.upload(&ids)?);
        let ids_view = dids.as_view();
        let (dsegs, mask_view) = (gpu.upload(&segs)?, dm.as_view());
        let segs_view = dsegs.as_view();
        let dmask = device::DeviceMask { add: &mask_view, segments: Some(&segs_view) };
        let ddrop = DeviceAttnDropout { spec, example_ids: &ids_view, logical };
        let (mut d_out, mut d_p, mut d_pd) =
            (s.alloc_zeros::<f32>(bh * th)?, s.alloc_zeros::<f32>(bh * tt)?, s.alloc_zeros::<f32>(bh * tt)?);
        device::attention_forward(
            gpu,
            &mut d_out.as_view_mut(),
            &mut d_p.as_view_mut(),
            &mut d_pd.as_view_mut(),
            &dq_.as_view(),
            &dk_.as_view(),
            &dv_.as_view(),
            dmask,
            d,
            Some(&ddrop),
        )?;
        let cdrop = AttnDropout { spec, logical };
        let (hdims, seqs) = (HeadDims { nh: d.nh, hd: d.hd }, crate::seqs::SeqsBuf::regular(d.t, &ids));
        let (mut out, mut p, mut pd) = (vec![0.0; bh * th], vec![0.0; bh * tt], vec![0.0; bh * tt]);
        let cmask = attention::Mask { add: &mask, segments: &segs };
        attention::attention_forward(&mut out, &mut p, &mut pd, &q, &k, &v, cmask, hdims, seqs.view(), Some(&cdrop));
        rows.push(compare("attention_forward (probs)", &gpu.download(&d_p)?, &p, TOL));
        rows.push(compare("attention_forward (out, dropout)", &gpu.download(&d_out)?, &out, TOL));

        let (g0, g1, g2) = (randn(bh * th, 34, 0.01), randn(bh * th, 35, 0.01), randn(bh * th, 36, 0.01));
        let (mut dgq, mut dgk, mut dgv) = (gpu.upload(&g0)?, gpu.upload(&g1)?, gpu.upload(&g2)?);
        let mut scratch = s.alloc_zeros::<f32>(bh * tt)?;
        let d_dout = gpu.upload(&dout)?;
        device::attention_backward(
            gpu,
            &mut dgq.as_view_mut(),
            &mut dgk.as_view_mut(),
            &mut dgv.as_view_mut(),
            &mut scratch.as_view_mut(),
            &d_dout.as_view(),
            &d_p.as_view(),
            &d_pd.as_view(),
            &dq_.as_view(),
            &dk_.as_view(),
            &dv_.as_view(),
            d,
            Some(&ddrop),
        )?;
        let (mut wq, mut wk, mut wv) = (g0.clone(), g1.clone(), g2.clone());
        let (w, sv) = (&mut wq, seqs.view());
        attention::attention_backward(w, &mut wk, &mut wv, &dout, &p, &pd, &q, &k, &v, hdims, sv, Some(&cdrop));
        rows.push(compare("attention_backward (dq)", &gpu.download(&dgq)?, &wq, TOL));
        rows.push(compare("attention_backward (dk)", &gpu.download(&dgk)?, &wk, TOL));
        rows.push(compare("attention_backward (dv)", &gpu.download(&dgv)?, &wv, TOL));
    }

    s.synchronize()?;
    Ok(rows)
}
