//! The Tandem coordinator: the job (its config and its datasets), rendezvous, data sharding,
//! checkpoints and evaluation for a multi-worker job. The coordinator alone reads the dataset in
//! a distributed job; single-process `worker train` uses the same config and readers from here.
//! Being built (the distributed-training issue); the logic is plain state machines, unit-tested
//! without a network, behind the gRPC service module.

pub mod data;
pub mod eval;
pub mod job;
pub mod rendezvous;
pub mod service;
pub mod shard;
