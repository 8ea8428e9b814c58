//! The syncd wire contract: `proto/syncd.proto` and the tonic/prost code
//! generated from it at build time (protox, no system `protoc`).
//! Semantics and limits: `PROTOCOL.md` at the repository root.

#[allow(clippy::all, missing_debug_implementations)]
pub mod pb {
    tonic::include_proto!("syncd.v1");
}
