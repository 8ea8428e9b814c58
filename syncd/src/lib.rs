//! The syncd daemon library. For now it holds configuration and the `index` entry point; the
//! daemon's pipeline (watcher, gossip, scheduler, transfer, materialize,
//! admin, metrics, config) arrives module by module.
//!
//! # Layout
//!
//! - [`config`]: `syncd.toml` and `dirs.d/*.toml`, parsed and validated
//!   once, errors with file and line (`syncd check-config`).
//! - [`index`]: `syncd index DIR`, one scan of a directory into a local
//!   index, with a human or JSON report.
//! - [`materialize`]: applies a manifest diff to a synced root: atomic
//!   writes, every chunk verified, confined to the root by the kernel.
//! - [`node`]: `syncd run`: holdings, membership learned by exchange, the
//!   per-directory loops (watch, rescan, publish; or pull and apply).
//! - [`peer`]: the gRPC peer service and its client side (a peer as a
//!   manifest-node source and a chunk source).

pub mod config;
pub mod index;
pub mod materialize;
pub mod node;
pub mod peer;
