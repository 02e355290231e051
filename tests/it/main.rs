//! Integration tests over the public API of `kernels` and `worker`, against fixtures written by
//! `transformers` (scripts/make_fixtures.py) and the real packaged checkpoint.

mod data;
mod deploy;
mod determinism;
mod distributed;
mod hostile;
mod launch;
mod minilm;
mod observe;
mod parity;
mod pretrain;
mod recovery;
mod support;
mod tls;
