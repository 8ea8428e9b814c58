//! The syncd wire contract: `.proto` files and the tonic/prost code generated
//! from them at build time (protox, no system `protoc`).
//!
//! The services (membership gossip, manifest-node fetch, chunk transfer, and
//! the admin service for `syncctl`) are defined with the daemon (issue 3).
//! This crate knows nothing of the daemon; the daemon depends on it.
