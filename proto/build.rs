//! Generates the gRPC code from `proto/tandem.proto` with `protox`, a pure-Rust protobuf
//! compiler, so that a fresh clone builds with nothing but cargo (no `protoc`).

fn main() {
    println!("cargo:rerun-if-changed=proto/tandem.proto");
    let fds = protox::compile(["proto/tandem.proto"], ["proto"]).unwrap_or_else(|e| panic!("{e}"));
    tonic_prost_build::configure().compile_fds(fds).unwrap_or_else(|e| panic!("generating gRPC code: {e}"));
}
