//! This node's shared services: its index store and the gate the garbage
//! collector takes, the transfers in flight (whose written chunks peers
//! may already fetch), the roots it carries, the scan and transfer slots
//! directories wait for, metrics, time and randomness, the transport, and
//! the fleet view. Every component below the daemon gets an
//! `Arc<LocalNode>`; nothing here knows about directory actors, admin or
//! the daemon's loops.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use chunk_store::Hash;
use chunk_store::indexer;
use chunk_store::store::Store;
use tokio::sync::{Notify, Semaphore};

use crate::bandwidth::{Bandwidth, Caps};
use crate::env::Env;
use crate::fleet::FleetView;
use crate::haves::{HaveLog, Served};
use crate::locks::{LockExt as _, RwLockExt as _};
use crate::materialize::InFlight;
use crate::metrics::Metrics;
use crate::transport::Transport;

/// Directory scans run at once; others wait (state `waiting`).
pub const SCAN_SLOTS: usize = 2;
/// Transfers run at once; others wait (state `waiting`).
pub const TRANSFER_SLOTS: usize = 4;

#[derive(Debug)]
pub struct LocalNode {
    pub id: String,
    pub store: Arc<Store>,
    /// Writers of the index (scans) share it; the garbage collector takes
    /// it alone, between scans.
    pub store_gate: RwLock<()>,
    /// Woken after a scan changed a root: the collector has work.
    pub gc_wanted: Notify,
    /// Chunks written by transfers in progress, per directory.
    in_flight: Mutex<HashMap<String, Arc<InFlight>>>,
    /// What transfers in progress received, per directory (for `Haves`).
    haves: Mutex<HashMap<String, Arc<HaveLog>>>,
    /// Chunks this node sent as a full holder (origin protection).
    pub served: Served,
    /// `[serve]` limits (the peer service admits streams by them).
    pub serve: crate::config::ServeSection,
    /// Carried directories by id: what peers may ask chunks of.
    roots: RwLock<BTreeMap<String, PathBuf>>,
    pub scan_slots: Arc<Semaphore>,
    pub transfer_slots: Arc<Semaphore>,
    /// Upload and download caps, directories' classes and pauses.
    pub bandwidth: Arc<Bandwidth>,
    pub metrics: Metrics,
    /// Time and randomness (seeded in tests).
    pub env: Arc<Env>,
    /// How peers are reached (gRPC in the daemon, in memory in tests).
    pub transport: Arc<dyn Transport>,
    pub fleet: Arc<FleetView>,
    pub started: std::time::Instant,
}

impl LocalNode {
    pub fn new(store: Arc<Store>, fleet: Arc<FleetView>) -> LocalNode {
        LocalNode {
            id: fleet.id.clone(),
            store,
            store_gate: RwLock::new(()),
            gc_wanted: Notify::new(),
            in_flight: Mutex::new(HashMap::new()),
            haves: Mutex::new(HashMap::new()),
            served: Served::default(),
            serve: Default::default(),
            roots: RwLock::new(BTreeMap::new()),
            scan_slots: Arc::new(Semaphore::new(SCAN_SLOTS)),
            transfer_slots: Arc::new(Semaphore::new(TRANSFER_SLOTS)),
            bandwidth: Arc::new(Bandwidth::default()),
            metrics: fleet.metrics.clone(),
            env: fleet.env.clone(),
            transport: fleet.transport.clone(),
            fleet,
            started: std::time::Instant::now(),
        }
    }

    /// This node with bandwidth caps (`[limits]` in `syncd.toml`).
    pub fn with_caps(mut self, caps: Caps) -> LocalNode {
        self.bandwidth = Arc::new(Bandwidth::new(caps));
        self
    }

    /// Serving limits and origin protection from `[serve]`.
    pub fn with_serve(mut self, serve: crate::config::ServeSection) -> LocalNode {
        self.served = Served::new(serve.spread_window);
        self.serve = serve;
        self
    }

    /// One scan of a directory under the shared store gate; garbage
    /// collection is left to the collector (`daemon::gc_loop`).
    pub fn scan(
        &self,
        dir: &str,
        path: &Path,
        opts: indexer::ScanOptions,
    ) -> Result<indexer::ScanReport, chunk_store::Error> {
        let report = {
            let _gate = self.store_gate.read_locked();
            indexer::scan_with(
                &self.store,
                dir,
                path,
                indexer::ScanOptions {
                    defer_gc: true,
                    ..opts
                },
            )?
        };
        if report.changed {
            self.gc_wanted.notify_one();
        }
        Ok(report)
    }

    /// One sweep of the collector, alone at the gate.
    pub fn collect_garbage(&self) -> Result<u64, chunk_store::Error> {
        let _gate = self.store_gate.write_locked();
        self.store.collect_garbage(false)
    }

    /// Registers a transfer's written chunks (until [`LocalNode::end_transfer`]).
    pub fn begin_transfer(&self, dir: &str, t: Arc<InFlight>) {
        self.in_flight.locked().insert(dir.to_string(), t);
    }

    pub fn end_transfer(&self, dir: &str) {
        self.in_flight.locked().remove(dir);
        self.haves.locked().remove(dir);
    }

    /// Starts recording what a transfer of version `root` of `dir`
    /// receives, for other receivers (until [`LocalNode::end_transfer`]).
    pub fn begin_haves(&self, dir: &str, root: Hash) -> Arc<HaveLog> {
        let log = Arc::new(HaveLog::new(root));
        self.haves.locked().insert(dir.to_string(), log.clone());
        log
    }

    /// The have-log of the transfer of `dir` in progress, if any.
    pub fn have_log(&self, dir: &str) -> Option<Arc<HaveLog>> {
        self.haves.locked().get(dir).cloned()
    }

    /// Transfers in progress.
    pub fn transfers(&self) -> usize {
        self.in_flight.locked().len()
    }

    /// A chunk written by one of this node's transfers, if any has it.
    /// (From memory without a copy: serving receivers is most of what a
    /// receiver's CPU does.)
    pub fn in_flight_chunk(&self, hash: &Hash) -> Option<bytes::Bytes> {
        let logs: Vec<Arc<HaveLog>> = self.haves.locked().values().cloned().collect();
        if let Some(b) = logs.iter().find_map(|l| l.chunk(hash)) {
            return Some(b);
        }
        let transfers: Vec<Arc<InFlight>> = self.in_flight.locked().values().cloned().collect();
        transfers
            .iter()
            .find_map(|t| t.read_hash(hash).ok().flatten())
            .map(bytes::Bytes::from)
    }

    /// Like [`LocalNode::in_flight_chunk`], from directory `dir`'s
    /// transfer only (what is served for `dir`).
    pub fn in_flight_chunk_of(&self, dir: &str, hash: &Hash) -> Option<bytes::Bytes> {
        let log = self.haves.locked().get(dir).cloned();
        if let Some(b) = log.and_then(|l| l.chunk(hash)) {
            return Some(b);
        }
        let t = self.in_flight.locked().get(dir).cloned()?;
        t.read_hash(hash).ok().flatten().map(bytes::Bytes::from)
    }

    /// A directory is carried (peers may fetch its chunks) from now on.
    pub fn carry(&self, id: &str, path: &Path) {
        self.roots
            .write_locked()
            .insert(id.to_string(), path.to_path_buf());
    }

    /// A directory is no longer carried.
    pub fn drop_dir(&self, id: &str) {
        self.roots.write_locked().remove(id);
        self.bandwidth.remove_dir(id);
        self.fleet.remove_dir(id);
    }

    pub fn carries(&self, id: &str) -> bool {
        self.roots.read_locked().contains_key(id)
    }

    /// Directory roots by id, to resolve chunk locations.
    pub fn roots(&self) -> Vec<(String, PathBuf)> {
        self.roots
            .read_locked()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
