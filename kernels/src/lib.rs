//! The fixed op set that BERT training needs, forward and backward, over plain `f32` slices with
//! explicit shapes. This crate knows nothing of BERT's layout, of files, or of the network.
//!
//! One op family per file, forward and backward side by side (the llm.c layout). Each CPU file is
//! `src/<op>.rs`; the CUDA twin of an op sits beside it as `src/<op>.cu` with the
//! same function names and the same argument order.
//!
//! Conventions shared by every op:
//! - Shapes are given explicitly as `usize` arguments, outermost first, and are asserted.
//! - Tensors are row-major and contiguous: `[B, T, C]` means `index = (b * T + t) * C + c`.
//! - Backward functions **accumulate** (`+=`) into every gradient they produce, like llm.c: a
//!   tensor used twice (a residual, a tied weight) simply receives two contributions. The caller
//!   zeroes gradient buffers before a backward pass.
//! - Reductions that cross threads use a fixed chunking and a fixed order of the partial sums, so
//!   every result is bit-identical from run to run, whatever the number of threads.

pub mod adamw;
pub mod attention;
pub mod bf16;
pub mod crossentropy;
pub mod cuda;
pub mod device;
pub mod dropout;
pub mod embedding;
pub mod gather;
pub mod gelu;
pub mod gpu;
pub mod gradnorm;
pub mod lanes;
pub mod layernorm;
pub mod matmul;

pub mod residual;
pub mod seqs;
pub mod tanh;
pub mod tolerance;
