//! The CUDA twins of the CPU kernels: their sources, compiled at run time by NVRTC.
//!
//! Each op family's CUDA C sits beside its CPU twin (`src/<op>.cu` beside `src/<op>.rs`), with
//! the same function names (suffixed by the element type, `layernorm_forward_f32`) and the same
//! argument order, shapes last. [`SOURCES`] lists them with the headers each needs; the CUDA
//! backend compiles each once per process for the device's architecture and caches the module.
//!
//! Nothing here needs a GPU or a CUDA toolkit to build: cudarc loads `libnvrtc` and `libcuda` at
//! run time. [`nvrtc_available`] and [`driver_available`] say whether they can be loaded, so
//! callers can refuse cleanly instead of letting cudarc panic. The test suite compiles every
//! source to an sm_90 cubin with NVRTC from NVIDIA's PyPI wheel (scripts/fetch-cuda-tools.sh)
//! and checks the register / spill report (kernels/tests/nvrtc.rs).
#![allow(unsafe_code)] // the NVRTC and driver C APIs; each call is commented

use cudarc::nvrtc::sys;
use std::ffi::{c_char, CString};

/// Shared device code, prepended to the sources that list it.
pub const PHILOX_CUH: &str = include_str!("philox.cuh");

/// Every CUDA source: (op family, headers it needs, source).
pub const SOURCES: &[(&str, &[&str], &str)] = &[
    ("layernorm", &[], include_str!("layernorm.cu")),
    ("gelu", &[], include_str!("gelu.cu")),
    ("residual", &[], include_str!("residual.cu")),
    ("adamw", &[], include_str!("adamw.cu")),
    ("dropout", &[PHILOX_CUH], include_str!("dropout.cu")),
    ("tanh", &[], include_str!("tanh.cu")),
    ("gather", &[], include_str!("gather.cu")),
    ("embedding", &[], include_str!("embedding.cu")),
    ("crossentropy", &[], include_str!("crossentropy.cu")),
    ("gradnorm", &[], include_str!("gradnorm.cu")),
    ("cast", &[], include_str!("cast.cu")),
    ("attention", &[], include_str!("attention.cu")),
    ("matmul", &[], include_str!("matmul.cu")),
];

/// Kernels on the hot path of a training step: the compile check fails if any of them spills
/// registers to local memory.
pub const HOT_KERNELS: &[&str] = &[
    "layernorm_forward_f32",
    "layernorm_backward_f32",
    "layernorm_param_partials_f32",
    "layernorm_param_reduce_f32",
    "gelu_forward_f32",
    "gelu_backward_f32",
    "residual_forward_f32",
    "add_inplace_f32",
    "adamw_update_f32",
    "dropout_forward_f32",
    "dropout_backward_f32",
    "embedding_forward_f32",
    "scatter_add_rows_f32",
    "crossentropy_forward_f32",
    "crossentropy_backward_f32",
    "sumsq_partials_f64",
    "scale_f32",
    "cast_f32_to_bf16",
    "cast_bf16_to_f32",
    "add_bf16_to_f32",
    "split_heads_f32",
    "merge_heads_f32",
    "softmax_forward_f32",
    "softmax_backward_f32",
    "bias_rows_f32",
    "column_sum_accumulate_f32",
];

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no NVRTC library found (libnvrtc.so.12): install NVIDIA's nvidia-cuda-nvrtc-cu12 wheel or the CUDA toolkit and put its lib folder on LD_LIBRARY_PATH (scripts/fetch-cuda-tools.sh does this for the tests)")]
    NoNvrtc,
    #[error("NVRTC failed on {name}: {step}: {log}")]
    Compile { name: String, step: String, log: String },
}

/// Whether `libnvrtc` can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { sys::is_culib_present() }
}

/// Whether the CUDA driver library (`libcuda.so.1`, installed with the NVIDIA driver) can be
/// loaded. Without it cudarc would panic on the first driver call.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Why `--device cuda` cannot run here, or `None` when GPU `ordinal` is there: checks the
/// driver library before any driver call (cudarc panics without it), then the device count.
pub fn cuda_unavailable(ordinal: usize) -> Option<String> {
    if !driver_available() {
        return Some(
            "no CUDA driver found (libcuda.so.1 cannot be loaded): --device cuda needs an NVIDIA GPU with its \
             driver installed; on this machine use --device cpu"
                .into(),
        );
    }
    match cudarc::driver::CudaContext::device_count() {
        Err(e) => Some(format!("the CUDA driver is installed but does not initialise ({e}): is a GPU visible?")),
        Ok(n) if n <= 0 => Some("the CUDA driver reports no GPU (check CUDA_VISIBLE_DEVICES)".into()),
        Ok(n) if ordinal >= n as usize => {
            Some(format!("--gpu {ordinal} does not exist: the CUDA driver sees {n} GPU(s), 0..{}", n - 1))
        }
        Ok(_) => None,
    }
}

/// A compiled module: the cubin for one architecture, and NVRTC's log (with
/// `--ptxas-options=-v`: registers, shared memory and spills per kernel).
#[derive(Debug)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

/// The full source of an op family: its headers, then its own code.
pub fn full_source(headers: &[&str], src: &str) -> String {
    let mut s = String::new();
    for h in headers {
        s.push_str(h);
        s.push('\n');
    }
    s.push_str(src);
    s
}

/// Compiles `src` to a cubin for `arch` (e.g. `sm_90`). `include_dirs`: where `cuda_fp16.h` and
/// `cuda_bf16.h` are (NVRTC does not bundle them). Fast math is off: the kernels must agree with
/// their CPU twins to ~1e-6, and the elementwise ones are memory-bound anyway.
pub fn compile(name: &str, src: &str, arch: &str, include_dirs: &[String]) -> Result<Compiled, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc);
    }
    let fail = |step: &str, log: String| CudaError::Compile { name: name.to_string(), step: step.to_string(), log };
    let c_src = CString::new(src).map_err(|_| fail("source", "contains a NUL byte".into()))?;
    let c_name = CString::new(format!("{name}.cu")).expect("no NUL in a name");
    let prog =
        cudarc::nvrtc::result::create_program(&c_src, Some(&c_name)).map_err(|e| fail("create", e.to_string()))?;
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
        "--fmad=false".to_string(),
    ];
    opts.extend(include_dirs.iter().map(|d| format!("--include-path={d}")));
    // SAFETY: `prog` was just created and is destroyed once below; `c_src`/`c_name` outlive it.
    let compiled = unsafe { cudarc::nvrtc::result::compile_program(prog, &opts) };
    // SAFETY: as above.
    let log = unsafe { cudarc::nvrtc::result::get_program_log(prog) }
        .map(|l| {
            let bytes: Vec<u8> = l.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    let result = compiled.map_err(|e| fail("compile", format!("{e}\n{log}"))).and_then(|()| {
        let mut size = 0usize;
        // SAFETY: `prog` compiled successfully; NVRTC writes the cubin size, then `size` bytes.
        unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result().map_err(|e| fail("cubin size", e.to_string()))?;
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` holds exactly the `size` bytes NVRTC reported.
        unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) }
            .result()
            .map_err(|e| fail("cubin", e.to_string()))?;
        Ok(Compiled { cubin, log: log.clone() })
    });
    // SAFETY: `prog` is destroyed exactly once.
    let _ = unsafe { cudarc::nvrtc::result::destroy_program(prog) };
    result
}

/// What ptxas reported for one kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelReport {
    pub kernel: String,
    pub registers: u32,
    pub shared_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
}

/// Parses the `--ptxas-options=-v` part of an NVRTC log: one report per kernel.
pub fn parse_ptxas_report(log: &str) -> Vec<KernelReport> {
    let num_before = |line: &str, unit: &str| -> u32 {
        line.find(unit).and_then(|i| line[..i].split_whitespace().last()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let mut out: Vec<KernelReport> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            out.push(KernelReport {
                kernel: rest.trim().to_string(),
                registers: 0,
                shared_bytes: 0,
                spill_stores: 0,
                spill_loads: 0,
                stack_bytes: 0,
            });
        } else if let Some(r) = out.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack_bytes = num_before(line, "bytes stack frame");
                r.spill_stores = num_before(line, "bytes spill stores");
                r.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = num_before(line, "registers");
                r.shared_bytes = num_before(line, "bytes smem");
            }
        }
    }
    out
}
