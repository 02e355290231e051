//! One Tandem training process: BERT over flat parameter and gradient buffers on the kernels
//! crate, Hugging Face checkpoint and tokenizer interop, the collectives, the engine seam over the
//! CPU and the GPU, and the training loop. What the job is (config, data, shards, counts) comes
//! from the `job` crate, which the coordinator shares.

pub mod bert_config;
pub mod checkpoint;
pub mod collective;
pub mod cuda_ops;
pub mod distributed;
pub mod engine;
pub mod gpu_check;
pub mod launch;
pub mod layout;
pub mod local;
pub mod model;
pub mod nccl;
pub mod ops;
pub mod optim;
pub mod preprocess;
pub mod tokenize;
pub mod train;
pub mod transport;
pub mod watchdog;

use std::path::PathBuf;

/// Sets up the kernels' thread pool (rayon's global pool): `threads` threads (0: as many as
/// `RAYON_NUM_THREADS` says, else one per core), the calling thread one of them. The training
/// thread then runs its share of each kernel itself, where outside the pool it would hand every
/// kernel to the pool and sleep until woken: two context switches per kernel, 2-4% of a step.
/// Call it from the thread that runs the kernels, before it runs any; a later call keeps the
/// first pool. With one thread the pool is the calling thread alone, so work that another thread
/// sent into it would wait for that thread: only the training thread calls the kernels.
pub fn kernel_threads(threads: usize) {
    if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(threads).use_current_thread().build_global() {
        tracing::debug!(error = %e, "the kernel thread pool was set up already");
    }
}

/// Errors about models, checkpoints and batches; each names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0}: invalid BERT config: {1}")]
    Config(PathBuf, String),
    #[error("{0}: not a readable safetensors file: {1}")]
    Safetensors(PathBuf, String),
    #[error("{file}: tensor `{name}` {msg}")]
    Tensor { file: PathBuf, name: String, msg: String },
    #[error("{0}: tokenizer: {1}")]
    Tokenizer(PathBuf, String),
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("GPU: {0}")]
    Device(String),
}
