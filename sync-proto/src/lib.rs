//! The syncd wire contract: `proto/syncd.proto` (node to node) and
//! `proto/admin.proto` (syncctl to the local daemon), and the tonic/prost
//! code generated from them at build time (protox, no system `protoc`).
//! Semantics and limits: `PROTOCOL.md` at the repository root.

#[allow(clippy::all, missing_debug_implementations)]
pub mod pb {
    tonic::include_proto!("syncd.v1");
}

/// The local admin service (Unix socket, syncctl).
#[allow(clippy::all, missing_debug_implementations)]
pub mod admin {
    tonic::include_proto!("syncd.admin.v1");
}
