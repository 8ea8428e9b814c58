//! The syncd daemon library: configuration, the `index` entry point, the
//! peer service, materialize, the node that wires them (`syncd run`), and
//! the operator's surface (admin socket for `syncctl`, metrics, systemd,
//! hooks).
//!
//! # Layout
//!
//! - [`config`]: `syncd.toml` and `dirs.d/*.toml`, parsed and validated
//!   once, errors with file and line (`syncd check-config`).
//! - [`env`]: time (tokio's, pausable) and randomness (seeded in tests):
//!   the seam the simulation fixes.
//! - [`index`]: `syncd index DIR`, one scan of a directory into a local
//!   index, with a human or JSON report.
//! - [`locks`]: mutexes a panic cannot poison (a bug in one directory's
//!   work must not stop the others).
//! - [`materialize`]: applies a manifest diff to a synced root: atomic
//!   writes, every chunk verified, confined to the root by the kernel.
//! - [`membership`]: SWIM (foca) over the peer channel: who is alive.
//! - [`node`]: `syncd run`: holdings exchanged with live members, the
//!   per-directory loops (watch, rescan, publish; or pull and apply).
//! - [`peer`]: the gRPC peer service and its client side (a peer as a
//!   manifest-node source and a chunk source).
//! - [`fetch`]: missing chunks fetched from several peers at once, in
//!   windows, nearest first, bounded read-ahead, retries elsewhere.
//! - [`topology`]: peer classes (same rack / zone / region / elsewhere).
//! - [`transport`]: the peer protocol as a seam: a `Transport` (asking
//!   peers) and a `PeerHandler` (answering them), over gRPC or an
//!   in-process network whose links can be cut, delayed and counted.
//! - [`admin`]: the admin gRPC service on the Unix socket (`syncctl`).
//! - [`metrics`]: Prometheus metrics and the `/metrics` endpoint.
//! - [`hooks`]: `on_synced` commands after a version is in place.
//! - [`sdnotify`]: systemd readiness, status and watchdog.

pub mod admin;
pub mod config;
pub mod env;
pub mod fetch;
pub mod hooks;
pub mod index;
pub mod locks;
pub mod materialize;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod sdnotify;
pub mod topology;
pub mod transport;
