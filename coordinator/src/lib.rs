//! The Tandem coordinator: rendezvous, data sharding, checkpoints and evaluation for a
//! multi-worker job. Being built (the distributed-training issue); what is here is plain logic,
//! unit-tested without a network.

pub mod rendezvous;
pub mod service;
pub mod shard;
