//! The Tandem gRPC API, generated from `proto/tandem.proto` at build time (see `build.rs`).
//! Only the coordinator's service module and the worker's client module use these types.

pub mod auth;
pub mod tls;

/// Bumped on every incompatible change of the protocol; a worker of another version is refused.
pub const PROTOCOL_VERSION: u32 = 6;

pub mod v1 {
    tonic::include_proto!("tandem.v1");
}
