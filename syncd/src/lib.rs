//! The syncd daemon library: configuration, the `index` entry point, the
//! components of a running node, and the operator's surface (admin socket
//! for `syncctl`, metrics, systemd, hooks).
//!
//! # Layout
//!
//! Arrows point one way: a module uses only those listed after it.
//!
//! - [`daemon`]: `syncd run`: wiring, SIGHUP reload, the stats, garbage
//!   collection and watchdog loops, ordered teardown.
//! - [`admin`]: the admin gRPC service on the Unix socket (`syncctl`),
//!   through directory handles and the fleet view only.
//! - [`dir`]: one actor per synced directory behind a handle; each mode's
//!   policy in its own file (`source`, `replica`).
//! - [`peer`]: the peer service (answering records, gossip, manifest nodes
//!   and chunks) and its client side (a peer as a manifest-node source and
//!   a chunk source).
//! - [`fetch`]: missing chunks fetched from several peers at once, in
//!   windows, nearest first, bounded read-ahead, retries elsewhere.
//! - [`hooks`]: `on_synced` commands after a version is in place.
//! - [`local`]: this node's shared services: store and its gate, transfers
//!   in flight, carried roots, scan and transfer slots.
//! - [`fleet`]: the fleet view (every peer's record, validated on entry;
//!   one `newest(dir)`), epidemic gossip, and SWIM membership.
//! - [`materialize`]: applies a manifest diff to a synced root: atomic
//!   writes, every chunk verified, confined to the root by the kernel.
//! - [`transport`]: the peer protocol as a seam: a `Transport` (asking
//!   peers) and a `PeerHandler` (answering them), over gRPC or an
//!   in-process network whose links can be cut, delayed and counted.
//! - [`error`]: errors that say whose fault it is; the one mapping of
//!   refusals to gRPC codes.
//! - [`wire`]: the protocol version, the id rule and record validation.
//! - [`env`]: time (tokio's, pausable) and randomness (seeded in tests).
//! - [`sim`]: whole fleets in one process over the in-memory transport,
//!   on a paused clock (the scripted simulation and the scale benchmark).
//! - [`config`]: `syncd.toml` and `dirs.d`, parsed and validated once.
//! - [`bandwidth`]: upload and download caps (token buckets), priority
//!   classes and pause, as gates a transfer's calls and served batches
//!   pass.
//! - [`metrics`], [`topology`], [`sdnotify`], [`locks`], [`index`]: leaves.

pub mod admin;
pub mod bandwidth;
pub mod config;
pub mod daemon;
pub mod dir;
pub mod env;
pub mod error;
pub mod fetch;
pub mod fleet;
pub mod fuzzing;
pub mod haves;
pub mod hooks;
pub mod index;
pub mod local;
pub mod locks;
pub mod materialize;
pub mod metrics;
pub mod peer;
pub mod sdnotify;
pub mod sim;
pub mod tls;
pub mod topology;
pub mod transport;
pub mod wire;
