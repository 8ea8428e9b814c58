//! The syncd daemon library. For now it holds the `index` entry point; the
//! daemon's pipeline (watcher, gossip, scheduler, transfer, materialize,
//! admin, metrics, config) arrives module by module.
//!
//! # Layout
//!
//! - [`index`]: `syncd index DIR`, one scan of a directory into a local
//!   index, with a human or JSON report.

pub mod index;
