//! The Tandem gRPC API (rendezvous, data streams, checkpoints, heartbeats), generated with tonic
//! and prost. Empty until the coordinator issue defines it.
