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
pub mod layout;
pub mod local;
pub mod model;
pub mod nccl;
pub mod ops;
pub mod optim;
pub mod tokenize;
pub mod train;
pub mod transport;
pub mod watchdog;

use std::path::PathBuf;

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
