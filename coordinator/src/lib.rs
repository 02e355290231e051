//! The Tandem coordinator: rendezvous, the data streams, evaluation gathers, checkpoints and
//! failure handling of a multi-worker job (the state machine in `state`), the gRPC service around them, and what the job shows
//! the outside (status page, metrics, TensorBoard, the loss plot). What a job *is* (config, data,
//! shards, counts) lives in the `job` crate, which the worker shares.

pub mod gather;
pub mod http;
pub mod limits;
pub mod load;
pub mod plot;
pub mod rendezvous;
pub mod service;
pub mod state;
pub mod telemetry;
pub mod tensorboard;
