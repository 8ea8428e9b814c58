//! The syncd wire contract: `proto/syncd.proto` (node to node) and
//! `proto/admin.proto` (syncctl to the local daemon), and the tonic/prost
//! code generated from them at build time (protox, no system `protoc`).
//! Semantics and limits: `PROTOCOL.md` at the repository root.

/// The generated code, nested as the proto packages are (`syncd.v1`,
/// `syncd.admin.v1`), so admin messages can name node messages.
#[allow(clippy::all, missing_debug_implementations)]
mod syncd {
    pub mod v1 {
        tonic::include_proto!("syncd.v1");
    }
    pub mod admin {
        pub mod v1 {
            tonic::include_proto!("syncd.admin.v1");
        }
    }
}

/// The node-to-node service and its messages.
pub use syncd::v1 as pb;

/// The local admin service (Unix socket, syncctl).
pub use syncd::admin::v1 as admin;
