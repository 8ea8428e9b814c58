//! The running node: what it holds, whom it knows, and the loops that keep
//! its directories in step with the fleet (`syncd run`).
//!
//! ```text
//!  watcher/rescan ──> scan (source) ──> new version ──> push Exchange to peers
//!  Exchange from peers ──> learn holdings ──> replica loop: diff against the
//!     peer with the newest version ──> materialize ──> rescan ──> advertise
//! ```
//!
//! Membership and liveness come from SWIM ([`crate::membership`], foca over
//! the peer channel), joined through the bootstrap addresses; holdings are
//! exchanged with every live member.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chunk_store::ignore::Ignore;
use chunk_store::indexer;
use chunk_store::manifest;
use chunk_store::store::Store;
use chunk_store::{ChunkerConfig, Hash};
use sync_proto::pb;
use tokio::sync::Notify;
use tonic::Status;

use crate::config::{Config, Mode};
use crate::env::Env;
use crate::fetch::{ChunkPeer, FetchConfig, Fetcher};
use crate::locks::{LockExt as _, RwLockExt as _};
use crate::materialize::{self, InFlight, LocalChunks};
use crate::membership::{Ident, Liveness, Members, Swim};
use crate::metrics::Metrics;
use crate::peer::{PeerChunks, PeerService, RemotePeer};
use crate::topology::PeerClass;
use crate::transport::Transport;
use crate::transport::grpc::{GrpcServer, GrpcTransport};

/// How often holdings are exchanged with every known peer (a change is also
/// pushed at once).
const GOSSIP_INTERVAL: Duration = Duration::from_millis(500);
/// A peer call that takes longer is a failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Replica loops look for newer versions at least this often.
const REPLICA_TICK: Duration = Duration::from_secs(1);
/// Debounce of file system events before a rescan.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Most peers one transfer fetches from at once.
const MAX_SOURCES: usize = 4;
/// How long a directory removed on SIGHUP may take to stop.
const DIR_STOP: Duration = Duration::from_secs(20);
/// The whole shutdown stays under the unit's TimeoutStopSec (30 s).
const SHUTDOWN: Duration = Duration::from_secs(25);
/// Remote manifest nodes kept during one pull (diff and apply), so pages a
/// tree references many times are fetched once.
const NODE_CACHE_BYTES: usize = 64 << 20;

/// What a directory is doing (paused is a flag on top of this).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Scanning,
    Syncing,
    Error,
}

impl Phase {
    /// Every state name reported (with `paused`).
    pub const ALL_NAMES: [&'static str; 5] = ["idle", "scanning", "syncing", "paused", "error"];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Scanning => "scanning",
            Phase::Syncing => "syncing",
            Phase::Error => "error",
        }
    }
}

/// A directory's state as the operator sees it.
#[derive(Debug, Clone)]
pub struct DirStatus {
    pub phase: Phase,
    /// Why, when the phase is `Error`.
    pub reason: String,
    /// The most recent error, kept after recovery.
    pub last_error: String,
}

/// Progress of the transfer in progress (all zero between transfers).
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_total: AtomicU64,
    pub files_total: AtomicU64,
    /// Chunk bytes received for this directory, ever (drives the rate).
    pub received: Arc<AtomicU64>,
    pub received_at_start: AtomicU64,
    pub files_done: AtomicU64,
}

impl Progress {
    pub fn pending_bytes(&self) -> u64 {
        let done =
            self.received.load(Ordering::Relaxed) - self.received_at_start.load(Ordering::Relaxed);
        self.bytes_total
            .load(Ordering::Relaxed)
            .saturating_sub(done)
    }

    pub fn pending_files(&self) -> u64 {
        self.files_total
            .load(Ordering::Relaxed)
            .saturating_sub(self.files_done.load(Ordering::Relaxed))
    }
}

/// One synced directory on this node.
#[derive(Debug)]
pub struct DirState {
    pub id: String,
    pub path: PathBuf,
    pub mode: Mode,
    pub rescan_interval: Duration,
    pub ignore: Ignore,
    pub hook: Vec<String>,
    pub hook_timeout: Duration,
    /// The version this node holds and advertises.
    pub current: Mutex<Option<pb::DirVersion>>,
    /// The version being received, advertised so peers can fetch the
    /// chunks already written.
    pub pulling: Mutex<Option<pb::DirVersion>>,
    pub status: Mutex<DirStatus>,
    pub paused: AtomicBool,
    /// Wakes the directory's loop: rescan now (syncctl rescan, resume,
    /// revert).
    pub poke: Notify,
    pub progress: Progress,
    /// Receive rate, bytes per second, smoothed over a few seconds.
    pub rate: Mutex<(u64, f64)>,
    /// The version whose on_synced hook should run (coalesced).
    pub synced: tokio::sync::watch::Sender<Option<pb::DirVersion>>,
    /// What a version may be: sizes, entries, free space, setid bits.
    pub limits: DirLimits,
    /// Failed attempts and when the next one is due.
    pub retry: Mutex<Retry>,
    /// The last attempt at this directory's work panicked (a bug): the
    /// watchdog stops being fed when every directory is in this state.
    pub panicked: AtomicBool,
    /// Held by this directory's scans and pulls: its own work never
    /// overlaps, other directories' work runs beside it.
    pub work: Mutex<()>,
    /// Set when the directory stops (shutdown, or removed on SIGHUP):
    /// scans stop at the next group of files, pulls at the next file
    /// boundary; `stop` ends its loop and hook runner.
    pub stopping: Arc<AtomicBool>,
    pub stop: tokio_util::sync::CancellationToken,
}

/// A directory's bounds on what it accepts and publishes (dirs.d).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirLimits {
    pub max_file_size: u64,
    pub max_entries: u64,
    pub min_free_space: u64,
    pub allow_setid: bool,
}

/// Backoff after failures: exponential from [`RETRY_MIN`], capped at
/// [`RETRY_MAX`], with ±25 % jitter so a fleet that failed together does
/// not retry together.
#[derive(Debug, Default)]
pub struct Retry {
    /// Failed attempts in a row.
    pub failures: u32,
    /// No new attempt before this.
    pub next_at: Option<tokio::time::Instant>,
    /// When the last attempt started (a new version is tried at once, but
    /// not more often than every [`RETRY_MIN`]).
    pub last_attempt: Option<tokio::time::Instant>,
    /// The version whose pull failed, as (version, root).
    pub failed_version: Option<(u64, Vec<u8>)>,
    /// Peers that took part in failed attempts at that version: others
    /// are tried first next time.
    pub failed_holders: std::collections::HashSet<String>,
}

/// First retry delay after a failure.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest delay between attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

impl Retry {
    fn delay(failures: u32, jitter: f64) -> Duration {
        let base = RETRY_MIN.saturating_mul(1 << failures.saturating_sub(1).min(16));
        let base = base.min(RETRY_MAX);
        base.mul_f64(jitter).min(RETRY_MAX)
    }

    /// Records a failed attempt and schedules the next one (jitter from
    /// `env`).
    pub fn failed(&mut self, env: &Env) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let d = Self::delay(self.failures, env.uniform(0.75..1.25));
        self.next_at = Some(env.now() + d);
        d
    }

    pub fn succeeded(&mut self) {
        *self = Retry::default();
    }

    /// Whether an attempt may start now; `version` is what would be
    /// pulled (a new one is tried without waiting out the backoff).
    pub fn due(&self, now: tokio::time::Instant, version: Option<(u64, &[u8])>) -> bool {
        let Some(next) = self.next_at else {
            return true;
        };
        if now >= next {
            return true;
        }
        // Only after a failed pull: a failed scan or a panic is not
        // about a version, and waits out its delay.
        let new_version = version.is_some_and(|(v, root)| {
            self.failed_version
                .as_ref()
                .is_some_and(|(fv, froot)| *fv != v || froot.as_slice() != root)
        });
        new_version && self.last_attempt.is_none_or(|t| now >= t + RETRY_MIN)
    }

    /// Seconds until the next attempt (0 when none is pending).
    pub fn retry_in(&self) -> f64 {
        self.next_at.map_or(0.0, |t| {
            t.saturating_duration_since(tokio::time::Instant::now())
                .as_secs_f64()
        })
    }
}

impl DirState {
    /// A directory as `dirs.d` describes it, before its first scan.
    pub fn from_config(id: &str, d: &crate::config::DirFile) -> anyhow::Result<DirState> {
        Ok(DirState {
            id: id.to_string(),
            path: d.path.get_ref().clone(),
            mode: *d.mode.get_ref(),
            rescan_interval: d.rescan_interval,
            ignore: Ignore::new(d.ignore.get_ref()).context("ignore patterns")?,
            hook: d.on_synced.get_ref().clone(),
            hook_timeout: d.on_synced_timeout,
            current: Mutex::new(None),
            pulling: Mutex::new(None),
            status: Mutex::new(DirStatus {
                phase: Phase::Scanning,
                reason: String::new(),
                last_error: String::new(),
            }),
            paused: AtomicBool::new(false),
            poke: Notify::new(),
            progress: Progress::default(),
            rate: Mutex::new((0, 0.0)),
            synced: tokio::sync::watch::Sender::new(None),
            limits: DirLimits {
                max_file_size: d.max_file_size.get_ref().0,
                max_entries: *d.max_entries.get_ref(),
                min_free_space: d.min_free_space.get_ref().0,
                allow_setid: d.allow_setid,
            },
            retry: Mutex::new(Retry::default()),
            panicked: AtomicBool::new(false),
            work: Mutex::new(()),
            stopping: Arc::new(AtomicBool::new(false)),
            stop: tokio_util::sync::CancellationToken::new(),
        })
    }

    /// The state name syncctl and metrics show.
    pub fn state_name(&self) -> &'static str {
        if self.paused.load(Ordering::Relaxed) {
            "paused"
        } else {
            self.status.locked().phase.as_str()
        }
    }

    fn set_phase(&self, phase: Phase) {
        let mut s = self.status.locked();
        s.phase = phase;
        if phase != Phase::Error {
            s.reason.clear();
        }
    }

    fn set_error(&self, error: String) {
        let mut s = self.status.locked();
        s.phase = Phase::Error;
        s.reason = error.clone();
        s.last_error = error;
    }

    pub fn current_version(&self) -> Option<pb::DirVersion> {
        self.current.locked().clone()
    }

    /// How this directory is scanned (without the per-call hints).
    fn scan_options(&self) -> indexer::ScanOptions {
        indexer::ScanOptions {
            ignore: self.ignore.clone(),
            max_file_size: Some(self.limits.max_file_size),
            keep_setid: self.limits.allow_setid,
            stop: Some(self.stopping.clone()),
            ..Default::default()
        }
    }

    /// Asks the directory's work to stop: its blocking work at the next
    /// file boundary, its loop and hooks at once.
    pub fn stop_now(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.stop.cancel();
    }
}

#[derive(Debug, Clone)]
pub(crate) struct PeerState {
    pub(crate) address: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) holdings: HashMap<String, pb::DirVersion>,
    pub(crate) pulling: HashMap<String, pb::DirVersion>,
    /// From SWIM, once SWIM has reported the peer (`swim`).
    pub(crate) state: Liveness,
    pub(crate) swim: bool,
    /// Last holdings exchange with it, either direction (on the
    /// environment's clock).
    pub(crate) heard: tokio::time::Instant,
    /// Holdings exchange round trip, smoothed (0: not measured).
    pub(crate) rtt_ms: f64,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    /// When SWIM declared it down (for forgetting it after [`DEAD_TTL`]).
    pub(crate) down_since: Option<tokio::time::Instant>,
}

/// A peer down this long is forgotten (its entry, holdings and channel),
/// so departed members do not accumulate.
pub const DEAD_TTL: Duration = Duration::from_secs(600);
/// Most peers this node keeps track of; members beyond are ignored until
/// others are forgotten.
pub const MAX_PEERS: usize = 10_000;

/// A peer SWIM has not reported yet (heard of only through holdings, e.g.
/// just before a partition) counts as dead this long after it was last
/// heard from.
const UNCONFIRMED_FOR: Duration = Duration::from_secs(15);

impl PeerState {
    /// SWIM's verdict; for a peer SWIM has not reported, alive while its
    /// holdings exchanges keep succeeding.
    pub(crate) fn liveness(&self) -> Liveness {
        if self.swim {
            self.state
        } else if self.heard.elapsed() < UNCONFIRMED_FOR {
            Liveness::Alive
        } else {
            Liveness::Down
        }
    }

    fn new(address: String) -> PeerState {
        PeerState {
            address,
            labels: BTreeMap::new(),
            holdings: HashMap::new(),
            pulling: HashMap::new(),
            state: Liveness::Alive,
            swim: false,
            heard: tokio::time::Instant::now(),
            rtt_ms: 0.0,
            bytes_sent: 0,
            bytes_received: 0,
            down_since: None,
        }
    }

    /// Whether it has been down long enough to be forgotten.
    fn expired(&self) -> bool {
        if self.swim {
            self.state == Liveness::Down && self.down_since.is_some_and(|t| t.elapsed() >= DEAD_TTL)
        } else {
            self.heard.elapsed() >= UNCONFIRMED_FOR + DEAD_TTL
        }
    }
}

/// A peer to fetch a version from.
#[derive(Debug, Clone)]
struct Holder {
    id: String,
    address: String,
    class: PeerClass,
    /// Only part of the version (it is receiving it too).
    partial: bool,
}

#[derive(Debug)]
pub struct Node {
    pub id: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub store: Arc<Store>,
    /// Synced directories by id; SIGHUP adds and removes entries.
    dirs: std::sync::RwLock<BTreeMap<String, Arc<DirState>>>,
    bootstrap: Vec<String>,
    pub(crate) peers: Mutex<HashMap<String, PeerState>>,
    /// How peers are reached (gRPC in the daemon, in memory in tests).
    pub transport: Arc<dyn Transport>,
    /// Time and randomness (seeded in tests).
    pub env: Arc<Env>,
    /// Writers of the index (scans) share it; the garbage collector takes
    /// it alone, so a sweep never sees nodes a scan wrote but has not yet
    /// referenced. Held only around scans, never across network I/O, so
    /// directories scan and pull concurrently and a long pull does not hold
    /// up collection. (One directory's own work is serialized by its
    /// `DirState::work`.)
    pub store_gate: std::sync::RwLock<()>,
    /// A scan changed a root: the collector should look.
    gc_wanted: Notify,
    /// Something changed locally: push holdings now.
    pub(crate) published: Notify,
    /// A peer announced something: replica loops look now.
    learned: Notify,
    /// Chunks of files being received, per transfer (directory id): served
    /// to peers before the index knows them.
    pub in_flight: Mutex<HashMap<String, Arc<InFlight>>>,
    /// Membership and failure detection, started once the node exists.
    pub swim: std::sync::OnceLock<Swim>,
    pub metrics: Metrics,
    pub started: std::time::Instant,
    /// Admission of peers' requests (bounded streams and node reads).
    pub serving: crate::peer::Serving,
}

impl Members for Node {
    fn member(&self, id: &Ident, state: Liveness) {
        if id.node_id == self.id {
            return;
        }
        let m = pb::Member {
            node_id: id.node_id.clone(),
            address: id.address.clone(),
            labels: Default::default(),
        };
        if let Err(e) = check_member(&m) {
            tracing::debug!(error = %e, "ignoring a SWIM member with a malformed identity");
            return;
        }
        let mut peers = self.peers.locked();
        if !peers.contains_key(&id.node_id) && peers.len() >= MAX_PEERS {
            tracing::warn!(peer = %id.node_id, "peer table full ({MAX_PEERS}); ignoring a new member");
            return;
        }
        let p = peers
            .entry(id.node_id.clone())
            .or_insert_with(|| PeerState::new(id.address.clone()));
        p.address = id.address.clone();
        if state == Liveness::Down && p.down_since.is_none() {
            p.down_since = Some(self.env.now());
        } else if state != Liveness::Down {
            p.down_since = None;
        }
        p.state = state;
        p.swim = true;
        drop(peers);
        if state != Liveness::Down {
            self.learned.notify_waiters();
        }
    }

    fn sending(&self) {
        self.metrics
            .gossip_messages
            .with_label_values(&["swim", "sent"])
            .inc();
    }
}

impl Node {
    /// A node with no directories yet; `address` is what peers dial.
    pub fn new(
        id: String,
        address: String,
        labels: BTreeMap<String, String>,
        store: Arc<Store>,
        bootstrap: Vec<String>,
        transport: Arc<dyn Transport>,
        env: Arc<Env>,
    ) -> anyhow::Result<Node> {
        Ok(Node {
            env,
            id,
            address,
            labels,
            store,
            dirs: Default::default(),
            bootstrap,
            peers: Mutex::new(HashMap::new()),
            transport,
            store_gate: std::sync::RwLock::new(()),
            gc_wanted: Notify::new(),
            published: Notify::new(),
            learned: Notify::new(),
            in_flight: Mutex::new(HashMap::new()),
            swim: std::sync::OnceLock::new(),
            metrics: Metrics::new().context("registering metrics")?,
            started: std::time::Instant::now(),
            serving: crate::peer::Serving::default(),
        })
    }

    /// The class of peer `id` as seen from here.
    pub(crate) fn class_of(&self, id: &str) -> PeerClass {
        match self.peers.locked().get(id) {
            Some(p) => PeerClass::of(&self.labels, &p.labels),
            None => PeerClass::Elsewhere,
        }
    }

    /// Accounts chunks served to `requester`.
    pub(crate) fn record_sent(&self, requester: &str, dir: &str, bytes: u64, chunks: u64) {
        // Only configured ids become metric labels: a peer naming random
        // directories must not grow /metrics.
        if self.dir(dir).is_none() {
            return;
        }
        let class = self.class_of(requester);
        if let Some(p) = self.peers.locked().get_mut(requester) {
            p.bytes_sent += bytes;
        }
        let labels = [dir, class.as_str()];
        self.metrics
            .sent_bytes
            .with_label_values(&labels)
            .inc_by(bytes);
        self.metrics
            .sent_chunks
            .with_label_values(&labels)
            .inc_by(chunks);
    }

    /// One directory by id.
    pub fn dir(&self, id: &str) -> Option<Arc<DirState>> {
        self.dirs.read_locked().get(id).cloned()
    }

    /// The directories being synced now.
    pub fn dir_list(&self) -> Vec<Arc<DirState>> {
        self.dirs.read_locked().values().cloned().collect()
    }

    /// Directory roots by id, to resolve chunk locations.
    pub fn roots(&self) -> Vec<(String, PathBuf)> {
        self.dir_list()
            .iter()
            .map(|d| (d.id.clone(), d.path.clone()))
            .collect()
    }

    fn member(&self) -> pb::Member {
        pb::Member {
            node_id: self.id.clone(),
            address: self.address.clone(),
            labels: self.labels.clone().into_iter().collect(),
        }
    }

    /// What this node tells peers.
    /// One scan of a directory under the shared store gate; garbage
    /// collection is left to the collector (see [`gc_loop`]).
    pub(crate) fn scan(
        &self,
        dir: &str,
        path: &std::path::Path,
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

    /// A chunk written by one of this node's transfers, if any has it.
    pub(crate) fn in_flight_chunk(&self, hash: &Hash) -> Option<Vec<u8>> {
        let transfers: Vec<Arc<InFlight>> = self.in_flight.locked().values().cloned().collect();
        transfers
            .iter()
            .find_map(|t| t.read_hash(hash).ok().flatten())
    }

    pub fn holdings(&self) -> pb::Holdings {
        let dirs = self.dir_list();
        pb::Holdings {
            from: Some(self.member()),
            dirs: dirs
                .iter()
                .filter_map(|d| d.current.locked().clone())
                .collect(),
            pulling: dirs
                .iter()
                .filter_map(|d| d.pulling.locked().clone())
                .collect(),
        }
    }

    /// Takes in a peer's holdings (validated).
    pub fn learn(&self, h: pb::Holdings) -> Result<(), Status> {
        let from = h
            .from
            .ok_or_else(|| Status::invalid_argument("holdings without sender"))?;
        check_member(&from)?;
        if from.node_id == self.id {
            return Ok(());
        }
        // Only directories this node carries are kept: the rest is of no
        // use here, and would let a peer make us store 4096 ids per message.
        let carried = self.dirs.read_locked();
        let by_dir = |list: Vec<pb::DirVersion>| {
            let mut out = HashMap::new();
            for d in list {
                if d.root.len() != 32
                    || !is_id(&d.dir)
                    || !(d.publisher.is_empty() || is_id(&d.publisher))
                {
                    return Err(Status::invalid_argument(format!(
                        "malformed holding for {:?}",
                        d.dir.chars().take(128).collect::<String>()
                    )));
                }
                if carried.contains_key(&d.dir) {
                    out.insert(d.dir.clone(), d);
                }
            }
            Ok(out)
        };
        let holdings = by_dir(h.dirs)?;
        let pulling = by_dir(h.pulling)?;
        drop(carried);
        let mut peers = self.peers.locked();
        let new = !peers.contains_key(&from.node_id);
        if new && peers.len() >= MAX_PEERS {
            return Err(Status::resource_exhausted(format!(
                "peer table full ({MAX_PEERS} peers)"
            )));
        }
        let p = peers
            .entry(from.node_id.clone())
            .or_insert_with(|| PeerState::new(from.address.clone()));
        p.heard = self.env.now();
        if new && let Some(swim) = self.swim.get() {
            // Let SWIM probe it too, rather than wait for gossip to bring it.
            swim.announce(&from.address);
        }
        p.address = from.address;
        p.labels = from.labels.into_iter().collect();
        p.holdings = holdings;
        p.pulling = pulling;
        drop(peers);
        self.learned.notify_waiters();
        Ok(())
    }

    /// The newest version of `dir` among live peers, newer than ours, with
    /// the live peers that hold it (then those receiving it), nearest first.
    fn newest_elsewhere(&self, dir: &str) -> Option<(pb::DirVersion, Vec<Holder>)> {
        let ours = self
            .dirs
            .read_locked()
            .get(dir)?
            .current
            .locked()
            .as_ref()
            .map_or(0, |v| v.version);
        let peers = self.peers.locked();
        let best = peers
            .values()
            .filter(|p| p.liveness() != Liveness::Down)
            .filter_map(|p| p.holdings.get(dir))
            .filter(|v| v.version > ours)
            .max_by_key(|v| v.version)?
            .clone();
        let same = |v: Option<&pb::DirVersion>| {
            v.is_some_and(|v| v.version == best.version && v.root == best.root)
        };
        let mut holders: Vec<Holder> = peers
            .iter()
            .filter(|(_, p)| p.liveness() != Liveness::Down)
            .filter_map(|(id, p)| {
                let partial = if same(p.holdings.get(dir)) {
                    false
                } else if same(p.pulling.get(dir)) {
                    true
                } else {
                    return None;
                };
                Some(Holder {
                    id: id.clone(),
                    address: p.address.clone(),
                    class: PeerClass::of(&self.labels, &p.labels),
                    partial,
                })
            })
            .collect();
        // Peers that failed us at this version last, then full holders
        // before partial ones, nearest first, then a random order so a
        // fleet does not pile onto the same peer.
        let failed = {
            let dirs = self.dirs.read_locked();
            dirs.get(dir)
                .map(|d| {
                    let r = d.retry.locked();
                    match &r.failed_version {
                        Some((v, root)) if *v == best.version && *root == best.root => {
                            r.failed_holders.clone()
                        }
                        _ => Default::default(),
                    }
                })
                .unwrap_or_default()
        };
        self.env.shuffle(&mut holders);
        holders.sort_by_key(|h| (failed.contains(&h.id), h.partial, h.class));
        holders.truncate(MAX_SOURCES);
        Some((best, holders))
    }

    /// Forgets peers down for [`DEAD_TTL`], and channels to addresses no
    /// known peer or bootstrap entry has.
    fn forget_dead(&self) {
        let mut peers = self.peers.locked();
        let before = peers.len();
        peers.retain(|id, p| {
            let keep = !p.expired();
            if !keep {
                tracing::info!(peer = %id, address = %p.address, "forgetting a peer down for {}", humantime::format_duration(DEAD_TTL));
            }
            keep
        });
        if peers.len() == before
            && self.transport.known().len() <= peers.len() + self.bootstrap.len()
        {
            return;
        }
        let keep: std::collections::HashSet<String> = peers
            .values()
            .map(|p| p.address.clone())
            .chain(self.bootstrap.iter().cloned())
            .collect();
        drop(peers);
        self.transport.retain(&|a| keep.contains(a));
    }

    /// One exchange with every known peer and bootstrap address.
    async fn gossip_round(self: &Arc<Self>) {
        let mut targets: Vec<String> = self
            .peers
            .locked()
            .values()
            .filter(|p| p.liveness() != Liveness::Down)
            .map(|p| p.address.clone())
            .collect();
        for b in &self.bootstrap {
            if !targets.contains(b) && *b != self.address {
                targets.push(b.clone());
            }
        }
        let mine = self.holdings();
        let mut calls = tokio::task::JoinSet::new();
        for address in targets {
            let node = self.clone();
            let req = mine.clone();
            calls.spawn(async move {
                let started = std::time::Instant::now();
                let result = async {
                    node.metrics
                        .gossip_messages
                        .with_label_values(&["exchange", "sent"])
                        .inc();
                    let resp =
                        tokio::time::timeout(CALL_TIMEOUT, node.transport.exchange(&address, req))
                            .await??;
                    anyhow::Ok(resp)
                }
                .await;
                let took = started.elapsed();
                node.metrics
                    .rpc_duration
                    .with_label_values(&["exchange"])
                    .observe(took.as_secs_f64());
                match result {
                    Ok(h) => {
                        let from = h.from.as_ref().map(|m| m.node_id.clone());
                        if let Err(e) = node.learn(h) {
                            tracing::warn!(peer = %address, error = %e, "peer sent invalid holdings");
                        } else if let Some(id) = from
                            && let Some(p) = node.peers.locked().get_mut(&id)
                        {
                            let ms = took.as_secs_f64() * 1000.0;
                            p.rtt_ms = if p.rtt_ms == 0.0 { ms } else { 0.8 * p.rtt_ms + 0.2 * ms };
                        }
                    }
                    // Liveness is SWIM's call, not one failed exchange's.
                    Err(e) => tracing::debug!(peer = %address, error = %e, "exchange failed"),
                }
            });
        }
        while calls.join_next().await.is_some() {}
    }
}

/// Node and directory ids on the wire: `[A-Za-z0-9._-]{1,128}`, as in the
/// configuration (they become keys, metric labels and file names).
pub(crate) fn is_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Topology labels a peer may declare: the configuration's keys, values
/// of the id form, so a peer cannot make us keep megabytes of labels.
fn labels_ok(labels: &std::collections::HashMap<String, String>) -> bool {
    labels.len() <= crate::config::LABEL_KEYS.len()
        && labels
            .iter()
            .all(|(k, v)| crate::config::LABEL_KEYS.contains(&k.as_str()) && is_id(v))
}

fn check_member(m: &pb::Member) -> Result<(), Status> {
    let addr_ok = m.address.len() <= 256
        && m.address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if is_id(&m.node_id) && addr_ok && labels_ok(&m.labels) {
        Ok(())
    } else {
        let short = |t: &str| t.chars().take(128).collect::<String>();
        Err(Status::invalid_argument(format!(
            "malformed member {:?} at {:?} (ids [A-Za-z0-9._-]{{1,128}}, host:port, labels region/zone/rack)",
            short(&m.node_id),
            short(&m.address)
        )))
    }
}

/// Scans one directory and records the version this node now holds.
/// Sources publish a new version when the root changes; replicas only
/// report local edits.
pub(crate) fn rescan(node: &Node, dir: &DirState) -> anyhow::Result<bool> {
    let _work = dir.work.locked();
    dir.set_phase(Phase::Scanning);
    let opts = indexer::ScanOptions {
        refuse_emptying: dir.mode == Mode::Source,
        ..dir.scan_options()
    };
    let report = match node.scan(&dir.id, &dir.path, opts) {
        Ok(r) => r,
        Err(e) => {
            let e = anyhow::Error::new(e).context(format!(
                "scanning directory {:?} at {}",
                dir.id,
                dir.path.display()
            ));
            dir.set_error(format!("{e:#}"));
            node.metrics
                .errors
                .with_label_values(&[&dir.id, "scan"])
                .inc();
            return Err(e);
        }
    };
    let m = &node.metrics;
    let id = [dir.id.as_str()];
    m.scan_duration
        .with_label_values(&id)
        .observe(report.walk_seconds);
    m.index_duration
        .with_label_values(&id)
        .observe(report.seconds - report.walk_seconds);
    let mut current = dir.current.locked();
    match dir.mode {
        Mode::Source => {
            dir.set_phase(Phase::Idle);
            let changed =
                current.as_ref().map(|v| v.root.as_slice()) != Some(report.root.as_bytes());
            if changed {
                tracing::info!(dir = %dir.id, version = report.version, root = %report.root, files = report.files, "publishing new version");
                let v = pb::DirVersion {
                    dir: dir.id.clone(),
                    version: report.version,
                    root: report.root.as_bytes().to_vec(),
                    publisher: node.id.clone(),
                    entries: report.files + report.dirs + report.symlinks,
                    bytes: report.bytes,
                };
                *current = Some(v.clone());
                dir.synced.send_replace(Some(v));
            }
            Ok(changed)
        }
        Mode::Replica | Mode::TwoWay => {
            if let Some(v) = current.as_ref()
                && v.root != report.root.as_bytes()
            {
                tracing::warn!(dir = %dir.id, path = %dir.path.display(), holds = v.version, "local edits on a replica: its content differs from the version it received");
                dir.set_error(format!(
                    "local edits: the content differs from version {} (syncctl revert {} restores it)",
                    v.version, dir.id
                ));
                node.metrics
                    .errors
                    .with_label_values(&[&dir.id, "local_edits"])
                    .inc();
            } else {
                dir.set_phase(Phase::Idle);
            }
            Ok(false)
        }
    }
}

/// Brings a replica to `version` from the peers that hold it.
fn pull(
    node: &Node,
    dir: &DirState,
    version: &pb::DirVersion,
    holders: &[Holder],
    rt: &tokio::runtime::Handle,
) -> anyhow::Result<()> {
    let _work = dir.work.locked();
    dir.set_phase(Phase::Syncing);
    let started = std::time::Instant::now();
    let mut involved = Vec::new();
    /// Undoes what a pull advertises and registers, also when it panics:
    /// otherwise the node would keep claiming to be receiving the version.
    struct Cleanup<'a>(&'a Node, &'a DirState);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let p = &self.1.progress;
            for a in [&p.bytes_total, &p.files_total, &p.files_done] {
                a.store(0, Ordering::Relaxed);
            }
            *self.1.pulling.locked() = None;
            self.0.in_flight.locked().remove(&self.1.id);
        }
    }
    let cleanup = Cleanup(node, dir);
    let result = pull_locked(node, dir, version, holders, rt, started, &mut involved);
    drop(cleanup);
    match &result {
        Ok(()) => {
            *dir.current.locked() = Some(version.clone());
            dir.set_phase(Phase::Idle);
            node.metrics
                .sync_duration
                .with_label_values(&[&dir.id])
                .observe(started.elapsed().as_secs_f64());
            dir.synced.send_replace(Some(version.clone()));
        }
        Err(e) => {
            dir.set_error(format!("syncing version {}: {e:#}", version.version));
            node.metrics
                .errors
                .with_label_values(&[&dir.id, "sync"])
                .inc();
            let mut r = dir.retry.locked();
            let key = (version.version, version.root.clone());
            if r.failed_version.as_ref() != Some(&key) {
                r.failed_version = Some(key);
                r.failed_holders.clear();
            }
            r.failed_holders.extend(involved);
        }
    }
    result
}

/// Bytes of free space a diff needs on the directory's file system:
/// every added file in full, the growth of modified ones, and room for the
/// largest temp copy of a modified file while its old version still
/// exists (removals only free space at the end).
fn space_needed(diff: &manifest::Diff) -> u64 {
    let size = |m: &Option<manifest::EntryMeta>| match m {
        Some(manifest::EntryMeta::File { size, .. }) => *size,
        _ => 0,
    };
    let (mut total, mut temp) = (0u64, 0u64);
    for c in &diff.changes {
        let (old, new) = (size(&c.local), size(&c.remote));
        match c.kind {
            manifest::ChangeKind::Added => total = total.saturating_add(new),
            manifest::ChangeKind::Modified => {
                total = total.saturating_add(new.saturating_sub(old));
                temp = temp.max(new.min(old));
            }
            manifest::ChangeKind::Removed => {}
        }
    }
    total.saturating_add(temp)
}

/// Free bytes for unprivileged writers on the file system holding `path`.
fn free_space(path: &std::path::Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Checks what a diff would apply against the directory's policy: file
/// sizes and set-id bits. Errors name the path and the peer.
fn check_changes(dir: &DirState, diff: &manifest::Diff, peer: &str) -> anyhow::Result<()> {
    for c in &diff.changes {
        if let Some(manifest::EntryMeta::File { mode, size, .. }) = &c.remote {
            anyhow::ensure!(
                *size <= dir.limits.max_file_size,
                "{:?} from peer {peer} is {size} bytes, more than max_file_size ({} bytes) of {:?}",
                c.path,
                dir.limits.max_file_size,
                dir.id
            );
            anyhow::ensure!(
                dir.limits.allow_setid || mode & indexer::SETID_BITS == 0,
                "{:?} from peer {peer} has mode {mode:o} with set-user-id/set-group-id bits, \
                 which directory {:?} does not allow (allow_setid = true in its dirs.d file)",
                c.path,
                dir.id
            );
        }
    }
    Ok(())
}

fn pull_locked(
    node: &Node,
    dir: &DirState,
    version: &pb::DirVersion,
    holders: &[Holder],
    rt: &tokio::runtime::Handle,
    started: std::time::Instant,
    involved: &mut Vec<String>,
) -> anyhow::Result<()> {
    let remote_root = Hash::from_slice(&version.root).context("root of 32 bytes")?;
    let publisher = &version.publisher;
    anyhow::ensure!(
        version.entries <= dir.limits.max_entries,
        "version {} of {:?} (publisher {publisher}) declares {} entries, more than max_entries ({})",
        version.version,
        dir.id,
        version.entries,
        dir.limits.max_entries
    );
    let local = node
        .scan(&dir.id, &dir.path, dir.scan_options())
        .with_context(|| format!("scanning directory {:?} at {}", dir.id, dir.path.display()))?;
    let peers: Vec<RemotePeer> = holders
        .iter()
        .map(|h| {
            RemotePeer::new(
                h.id.clone(),
                h.address.clone(),
                node.transport.clone(),
                rt.clone(),
                node.metrics.clone(),
            )
        })
        .collect();
    // The manifest comes from a full holder (the nearest).
    let (first, _) = peers
        .iter()
        .zip(holders)
        .find(|(_, h)| !h.partial)
        .context("no peer holds the version")?;
    involved.push(first.id.clone());
    let store = &node.store;
    let min_chunk = store.chunker().min();
    // Pages may repeat (the tree is a DAG): each distinct node is fetched
    // once, and the walk is bounded by what the version declares.
    let remote = manifest::CachedNodes::new(first, NODE_CACHE_BYTES);
    // What the version declares, but never more bytes than could be on
    // this disk once applied (what is here now plus the free space): a
    // peer declaring 2^64 bytes gets no larger a budget than that.
    let free = free_space(&dir.path)
        .with_context(|| format!("free space on the file system of {}", dir.path.display()))?;
    let room = local
        .bytes
        .saturating_add(free.saturating_sub(dir.limits.min_free_space));
    let limits = manifest::DiffLimits::declared(version.entries, version.bytes, min_chunk)
        .on_disk(room, min_chunk);
    let mut probe = store.chunk_probe();
    let diff = manifest::diff_limited(
        &**store,
        Some(local.root),
        &remote,
        Some(remote_root),
        &mut |h| probe.has(h),
        limits,
    )
    .with_context(|| format!("diff of {:?} against peer {}", dir.id, first.id))?;
    drop(probe);
    check_changes(dir, &diff, &first.id)?;
    let needed = space_needed(&diff);
    anyhow::ensure!(
        needed.saturating_add(dir.limits.min_free_space) <= free,
        "version {} of {:?} from peer {} does not fit: it needs {needed} bytes of free space on \
         the file system of {}, which has {free} free and keeps {} (min_free_space)",
        version.version,
        dir.id,
        first.id,
        dir.path.display(),
        dir.limits.min_free_space
    );
    let diffed = started.elapsed();
    let p = &dir.progress;
    p.bytes_total.store(
        diff.missing_chunks.iter().map(|c| u64::from(c.len)).sum(),
        Ordering::Relaxed,
    );
    p.files_total.store(
        diff.changes
            .iter()
            .filter(|c| matches!(c.remote, Some(manifest::EntryMeta::File { .. })))
            .count() as u64,
        Ordering::Relaxed,
    );
    p.files_done.store(0, Ordering::Relaxed);
    p.received_at_start
        .store(p.received.load(Ordering::Relaxed), Ordering::Relaxed);
    *dir.pulling.locked() = Some(version.clone());
    // This transfer's written chunks, served to peers until the index
    // takes over (removed by the pull's cleanup).
    let in_flight = Arc::new(InFlight::default());
    node.in_flight
        .locked()
        .insert(dir.id.clone(), in_flight.clone());
    node.published.notify_one();
    let local_chunks = LocalChunks::new(store, node.roots());
    let sources: Vec<Arc<dyn ChunkPeer>> = peers
        .iter()
        .map(|p| {
            Arc::new(PeerChunks {
                peer: p.clone(),
                dir: dir.id.clone(),
                requester: node.id.clone(),
            }) as Arc<dyn ChunkPeer>
        })
        .collect();
    let fetcher = Fetcher::start(
        rt,
        &diff.missing_chunks,
        sources,
        FetchConfig::default(),
        p.received.clone(),
    );
    let applied = materialize::apply(
        &dir.path,
        &diff,
        &remote,
        &[&local_chunks, &*in_flight, &fetcher],
        &in_flight,
        &p.files_done,
        materialize::ApplyOptions {
            min_chunk,
            allow_setid: dir.limits.allow_setid,
            stop: Some(dir.stopping.clone()),
        },
    );
    involved.extend(fetcher.failed_peers());
    // Account what arrived, whether or not the apply completed.
    for ((id, bytes), chunks) in fetcher
        .received_by_peer()
        .into_iter()
        .zip(fetcher.chunks_by_peer())
    {
        let class = node.class_of(&id);
        if let Some(peer) = node.peers.locked().get_mut(&id) {
            peer.bytes_received += bytes;
        }
        let labels = [dir.id.as_str(), class.as_str()];
        node.metrics
            .received_bytes
            .with_label_values(&labels)
            .inc_by(bytes);
        node.metrics
            .received_chunks
            .with_label_values(&labels)
            .inc_by(chunks);
    }
    let mut report = applied.with_context(|| {
        let from: Vec<&str> = holders.iter().map(|h| h.id.as_str()).collect();
        format!(
            "materializing {:?} version {} from peer{} {}",
            dir.id,
            version.version,
            if from.len() == 1 { "" } else { "s" },
            from.join(", ")
        )
    })?;
    let (m, id) = (&node.metrics, [dir.id.as_str()]);
    m.files_materialized
        .with_label_values(&id)
        .inc_by(report.files_written);
    m.reused_chunks
        .with_label_values(&id)
        .inc_by(report.reused_chunks);
    if report.corrupt_chunks > 0 {
        node.metrics
            .errors
            .with_label_values(&[&dir.id, "corrupt_chunk"])
            .inc_by(report.corrupt_chunks);
    }
    let applied_at = started.elapsed();
    // Files just written are recorded from what was written, not read
    // again; anything touched since is read as usual.
    let opts = indexer::ScanOptions {
        known: std::mem::take(&mut report.known),
        ..dir.scan_options()
    };
    let after = node.scan(&dir.id, &dir.path, opts)?;
    anyhow::ensure!(
        after.root == remote_root,
        "after applying version {} of {:?} the root is {}, expected {}",
        version.version,
        dir.id,
        after.root,
        remote_root
    );
    tracing::info!(
        dir = %dir.id,
        version = version.version,
        files = report.files_written,
        bytes = report.bytes_written,
        removed = report.removed,
        received_bytes = fetcher.received(),
        from = ?fetcher.received_by_peer(),
        nodes_visited = diff.nodes_visited,
        diff_s = diffed.as_secs_f64(),
        apply_s = (applied_at - diffed).as_secs_f64(),
        total_s = started.elapsed().as_secs_f64(),
        "applied version"
    );
    Ok(())
}

/// Handles the daemon's run needs beyond the node: where to tell systemd.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Called with READY/STATUS/WATCHDOG lines (systemd notify); none
    /// outside systemd.
    pub notify: Option<crate::sdnotify::Notifier>,
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
    opts: RunOptions,
) -> anyhow::Result<()> {
    let notify = opts.notify.unwrap_or_default();
    let n = &config.node.node;
    let state_dir = n.state_dir.get_ref().clone();
    notify.status("opening the index");
    let store = Arc::new(
        Store::open(&state_dir.join("index"), ChunkerConfig::default())
            .with_context(|| format!("opening the index in {}", state_dir.display()))?,
    );
    let node = Arc::new(Node::new(
        n.id.get_ref().clone(),
        config.advertise.clone(),
        n.labels.get_ref().clone(),
        store,
        n.peers.get_ref().clone(),
        Arc::new(GrpcTransport::default()),
        Arc::new(Env::from_entropy()),
    )?);

    // The admin socket first, so `syncctl status` answers during the
    // initial scans.
    let admin = crate::admin::bind(&config.node.admin.socket)?;
    let mut tasks = tokio::task::JoinSet::new();
    {
        let node = node.clone();
        tasks.spawn(async move {
            if let Err(e) = crate::admin::serve(admin, node).await {
                tracing::error!(error = format!("{e:#}"), "admin socket failed");
            }
        });
    }
    if let Some(listen) = config.metrics_listen {
        let metrics = node.metrics.clone();
        let n2 = node.clone();
        let refresh = Arc::new(move || crate::admin::refresh_metrics(&n2));
        // Bind now so a taken port is a startup error, not a log line.
        let server = crate::metrics::serve(listen, metrics, refresh);
        tasks.spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = format!("{e:#}"), "metrics endpoint failed");
            }
        });
    }

    // Replicas start from what they hold on disk: their last applied
    // version is unknown after a restart, so they take whatever is newest.
    let mut pending = Vec::new();
    let total = config.dirs.len();
    for (i, (id, (_, d))) in config.dirs.iter().enumerate() {
        notify.status(&format!("scanning {id} ({}/{total})", i + 1));
        pending.push(prepare_dir(&node, id, d).await?);
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the peer service to {}", config.listen))?;
    let me = Ident {
        address: node.address.clone(),
        node_id: node.id.clone(),
        // Larger on every start, so a restarted node replaces its old
        // identity at once.
        bump: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64),
    };
    let swim = Swim::start(
        me,
        node.bootstrap.clone(),
        node.clone(),
        node.transport.clone(),
        node.env.fork(),
    );
    node.swim.set(swim).expect("set once");
    tracing::info!(node = %node.id, listen = %config.listen, dirs = pending.len(), "syncd running");
    let server_stop = tokio_util::sync::CancellationToken::new();
    let server = {
        let stop = server_stop.clone();
        tonic::transport::Server::builder()
            .initial_stream_window_size(crate::transport::grpc::STREAM_WINDOW)
            .initial_connection_window_size(crate::transport::grpc::CONNECTION_WINDOW)
            .add_service(GrpcServer::service(Arc::new(PeerService {
                node: node.clone(),
            })))
            .serve_with_incoming_shutdown(
                // Nagle's algorithm against delayed ACKs cost ~40 ms per small
                // response (a manifest node) before this.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move { stop.cancelled().await },
            )
    };

    {
        let node = node.clone();
        tasks.spawn(async move {
            loop {
                node.gossip_round().await;
                tokio::select! {
                    _ = node.published.notified() => {}
                    _ = tokio::time::sleep(GOSSIP_INTERVAL) => {}
                }
            }
        });
    }
    {
        let (node, notify) = (node.clone(), notify.clone());
        tasks.spawn(async move { stats_loop(node, notify).await });
    }
    {
        let node = node.clone();
        tasks.spawn(async move { gc_loop(node).await });
    }
    let mut running: HashMap<String, Running> = HashMap::new();
    for d in pending {
        running.insert(d.id.clone(), start_dir(&node, d));
    }
    notify.ready(&status_line(&node));
    if let Some(interval) = notify.watchdog_interval() {
        let (node, notify) = (node.clone(), notify.clone());
        tasks.spawn(async move { watchdog_loop(node, notify, interval).await });
    }
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let server = tokio::spawn(server);
    tokio::pin!(shutdown);
    let mut server = server;
    let failed = loop {
        tokio::select! {
            r = &mut server => {
                break Some(match r {
                    Ok(Ok(())) => anyhow::anyhow!("peer service stopped"),
                    Ok(Err(e)) => anyhow::Error::new(e).context("peer service failed"),
                    Err(e) => anyhow::Error::new(e).context("peer service panicked"),
                });
            }
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                notify.stopping();
                break None;
            }
            _ = hangup.recv() => {
                notify.reloading();
                reload(&node, &config, &mut running).await;
                notify.ready(&status_line(&node));
            }
        }
    };
    teardown(&node, running, tasks, server_stop, server).await;
    let _ = std::fs::remove_file(&config.node.admin.socket);
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Ordered shutdown, within [`SHUTDOWN`] (under the unit's 30 s
/// TimeoutStopSec): directories stop at a file boundary (their watchers
/// drop with their loops), the node leaves SWIM so peers stop choosing it
/// at once, background loops end, the peer server drains its calls, and
/// the index is flushed.
async fn teardown(
    node: &Arc<Node>,
    running: HashMap<String, Running>,
    mut tasks: tokio::task::JoinSet<()>,
    server_stop: tokio_util::sync::CancellationToken,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let started = tokio::time::Instant::now();
    let deadline = started + SHUTDOWN;
    // Stop every directory first (all at once), then wait for each.
    for r in running.values() {
        r.dir.stop_now();
    }
    let dirs = running.len();
    for (_, r) in running {
        r.stop(deadline - Duration::from_secs(5)).await;
    }
    tracing::info!(dirs, took = ?started.elapsed(), "directories stopped");
    if let Some(swim) = node.swim.get() {
        let left = tokio::time::timeout(Duration::from_secs(2), swim.leave()).await;
        tracing::info!(announced = left.is_ok(), "left the fleet");
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    server_stop.cancel();
    let mut server = server;
    if tokio::time::timeout_at(deadline - Duration::from_secs(1), &mut server)
        .await
        .is_err()
    {
        tracing::warn!("peer calls still running at shutdown; closing them");
        server.abort();
    }
    let store = node.store.clone();
    match tokio::task::spawn_blocking(move || store.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "flushing the index at shutdown"),
        Err(e) => tracing::error!(error = %e, "flushing the index at shutdown panicked"),
    }
    tracing::info!(took = ?started.elapsed(), "stopped");
}

/// One line for systemd's STATUS=: what the directories are doing.
pub fn status_line(node: &Node) -> String {
    let dirs = node.dir_list();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &dirs {
        *counts.entry(d.state_name()).or_default() += 1;
    }
    let peers = node
        .peers
        .locked()
        .values()
        .filter(|p| p.liveness() != Liveness::Down)
        .count();
    let states: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let mut line = format!(
        "{} directories ({}), {peers} live peers",
        dirs.len(),
        if states.is_empty() {
            "none".to_string()
        } else {
            states.join(", ")
        }
    );
    for d in &dirs {
        match d.state_name() {
            "syncing" => line.push_str(&format!(
                "; {}: syncing, {} files / {} MiB pending",
                d.id,
                d.progress.pending_files(),
                d.progress.pending_bytes() >> 20
            )),
            "scanning" => line.push_str(&format!("; {}: scanning", d.id)),
            "error" => line.push_str(&format!("; {}: error", d.id)),
            _ => {}
        }
    }
    line
}

/// Once a second: receive rates, and systemd STATUS when it changes.
async fn stats_loop(node: Arc<Node>, notify: crate::sdnotify::Notifier) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_status = String::new();
    loop {
        tick.tick().await;
        let status = status_line(&node);
        if status != last_status {
            notify.status(&status);
            last_status = status;
        }
        node.forget_dead();
        for d in node.dir_list() {
            let now = d.progress.received.load(Ordering::Relaxed);
            let mut rate = d.rate.locked();
            let delta = now.saturating_sub(rate.0) as f64;
            rate.1 = 0.5 * rate.1 + 0.5 * delta;
            rate.0 = now;
        }
    }
}

/// Node garbage collection as a background worker: after scans that
/// changed a root (and every 10 minutes), it takes the store gate alone
/// for one sweep, which `Store::collect_garbage` amortises over 64 MiB of
/// node churn. Scans wait for the sweep, never the other way round across
/// a transfer: pulls hold the gate only while scanning.
async fn gc_loop(node: Arc<Node>) {
    loop {
        tokio::select! {
            _ = node.gc_wanted.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
        let n = node.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let _gate = n.store_gate.write_locked();
            n.store.collect_garbage(false)
        })
        .await;
        match swept {
            Ok(Ok(0)) => {}
            Ok(Ok(deleted)) => tracing::debug!(deleted, "garbage collection swept manifest nodes"),
            Ok(Err(e)) => tracing::error!(error = %e, "garbage collection failed; retrying later"),
            Err(e) => tracing::error!(error = %e, "garbage collection panicked; retrying later"),
        }
    }
}

/// Feeds systemd's watchdog only while the node makes progress: the index
/// answers a read within the interval (RocksDB and the blocking pool are
/// alive), and the runtime got here (it is not wedged).
async fn watchdog_loop(node: Arc<Node>, notify: crate::sdnotify::Notifier, interval: Duration) {
    loop {
        tokio::time::sleep(interval / 2).await;
        let store = node.store.clone();
        let probe = tokio::task::spawn_blocking(move || store.roots().is_ok());
        let index_ok = matches!(
            tokio::time::timeout(interval / 2, probe).await,
            Ok(Ok(true))
        );
        if !index_ok {
            tracing::error!("index did not answer in time; not feeding the watchdog");
        } else if !can_progress(&node) {
            tracing::error!(
                "every directory's last attempt panicked; not feeding the watchdog so systemd restarts the node"
            );
        } else {
            notify.watchdog();
        }
    }
}

/// Whether some directory can make progress: false when there are
/// directories and every one's last attempt panicked.
pub fn can_progress(node: &Node) -> bool {
    let dirs = node.dir_list();
    dirs.is_empty() || dirs.iter().any(|d| !d.panicked.load(Ordering::Relaxed))
}

/// Creates a directory's state and scans it once.
async fn prepare_dir(
    node: &Arc<Node>,
    id: &str,
    d: &crate::config::DirFile,
) -> anyhow::Result<Arc<DirState>> {
    let dir = Arc::new(DirState::from_config(id, d)?);
    node.metrics.init_dir(&dir.id);
    // Visible to syncctl while the first scan runs.
    node.dirs.write_locked().insert(dir.id.clone(), dir.clone());
    let (n, d2) = (node.clone(), dir.clone());
    // A directory that cannot be scanned (missing, unmounted) is an error
    // state, not a reason to stop the node: its loop keeps retrying.
    match tokio::task::spawn_blocking(move || rescan(&n, &d2)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(dir = %id, error = format!("{e:#}"), "initial scan failed"),
        Err(e) => panicked(node, &dir, "initial scan", e),
    }
    // The first version a source publishes at start is not a sync.
    dir.synced.send_replace(None);
    Ok(dir)
}

/// A running directory: its state and the task of its loop and hooks.
#[derive(Debug)]
struct Running {
    dir: Arc<DirState>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops the directory and waits (up to `deadline`) for its work to
    /// end at a file boundary; past the deadline the task is aborted (a
    /// temp file it leaves is removed the next time that directory is
    /// written).
    async fn stop(self, deadline: tokio::time::Instant) {
        self.dir.stop_now();
        let id = self.dir.id.clone();
        let mut task = self.task;
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            tracing::warn!(dir = %id, "directory did not stop in time; abandoning its work");
            task.abort();
        }
    }
}

fn start_dir(node: &Arc<Node>, dir: Arc<DirState>) -> Running {
    node.dirs.write_locked().insert(dir.id.clone(), dir.clone());
    let (node, d) = (node.clone(), dir.clone());
    let rt = tokio::runtime::Handle::current();
    let task = tokio::spawn(async move {
        let stop = d.stop.clone();
        tokio::join!(dir_loop(node.clone(), d.clone(), rt), async {
            // A hook running at stop is killed (kill_on_drop).
            tokio::select! {
                _ = crate::hooks::run_hooks(node, d) => {}
                _ = stop.cancelled() => {}
            }
        });
    });
    Running { dir, task }
}

/// SIGHUP: re-reads `dirs.d/` and starts or stops directories. A directory
/// whose settings changed is stopped and started again. Files of a stopped
/// directory are left as they are. An invalid configuration is logged and
/// the running one kept.
async fn reload(node: &Arc<Node>, running_config: &Config, running: &mut HashMap<String, Running>) {
    let new = match Config::load(&running_config.file) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the running configuration");
            return;
        }
    };
    if new.listen != running_config.listen
        || new.node.node.peers.get_ref() != running_config.node.node.peers.get_ref()
    {
        tracing::warn!("changes to [node] take effect on restart only");
    }
    let old_files = &running_config.dirs;
    let same = |a: &DirState, b: &crate::config::DirFile| {
        a.path == *b.path.get_ref()
            && a.mode == *b.mode.get_ref()
            && a.rescan_interval == b.rescan_interval
            && a.hook == *b.on_synced.get_ref()
            && a.hook_timeout == b.on_synced_timeout
            && a.limits == DirState::from_config(&a.id, b).map_or(a.limits, |n| n.limits)
            && old_files
                .get(&a.id)
                .is_none_or(|(_, f)| f.ignore.get_ref() == b.ignore.get_ref())
    };
    for d in node.dir_list() {
        if !new.dirs.get(&d.id).is_some_and(|(_, f)| same(&d, f)) {
            // Its work stops (at a file boundary) before the directory is
            // forgotten: nothing keeps writing into a removed directory.
            if let Some(r) = running.remove(&d.id) {
                r.stop(tokio::time::Instant::now() + DIR_STOP).await;
            }
            node.dirs.write_locked().remove(&d.id);
            node.metrics.forget_dir(&d.id);
            tracing::info!(dir = %d.id, path = %d.path.display(), "stopped syncing directory");
        }
    }
    for (id, (file, d)) in &new.dirs {
        if running.contains_key(id) {
            continue;
        }
        match prepare_dir(node, id, d).await {
            Ok(dir) => {
                tracing::info!(dir = %id, path = %dir.path.display(), "started syncing directory");
                running.insert(id.clone(), start_dir(node, dir));
            }
            Err(e) => {
                tracing::error!(dir = %id, file = %file.display(), error = format!("{e:#}"), "cannot start directory")
            }
        }
    }
}

/// Watches one directory and keeps it current.
async fn dir_loop(node: Arc<Node>, dir: Arc<DirState>, rt: tokio::runtime::Handle) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    // The notify callback must not block (the kernel queue would overflow):
    // it only marks "something changed"; the rescan finds out what.
    let watcher = notify_debouncer_full::new_debouncer(
        DEBOUNCE,
        None,
        move |res: notify_debouncer_full::DebounceEventResult| {
            let relevant = match &res {
                Ok(events) => events
                    .iter()
                    .any(|e| !matches!(e.kind, notify::EventKind::Access(_))),
                Err(_) => true, // errors (e.g. overflow) mean: rescan
            };
            if relevant {
                let _ = tx.try_send(());
            }
        },
    );
    let _watcher = match watcher {
        Ok(mut w) => match w.watch(&dir.path, notify::RecursiveMode::Recursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.id, error = %e, "cannot watch; relying on periodic rescans (raise fs.inotify.max_user_watches?)");
                None
            }
        },
        Err(e) => {
            tracing::warn!(dir = %dir.id, error = %e, "cannot create a watcher; relying on periodic rescans");
            None
        }
    };
    let tick = if dir.mode == Mode::Source {
        dir.rescan_interval
    } else {
        REPLICA_TICK.min(dir.rescan_interval)
    };
    let mut last_full = tokio::time::Instant::now();
    // A failed rescan is redone at the next attempt, whatever wakes it
    // (the initial scan's too).
    let mut must_rescan = dir.status.locked().phase == Phase::Error;
    // Without a watcher the channel is closed: stop polling it (it would be
    // ready at once, forever).
    let mut watching = _watcher.is_some();
    loop {
        // A due time already past means "now": it must not wake the loop
        // again and again (a paused directory would spin).
        let retry_at = dir
            .retry
            .locked()
            .next_at
            .filter(|t| *t > tokio::time::Instant::now());
        let event = tokio::select! {
            e = rx.recv(), if watching => {
                watching = e.is_some();
                e.is_some()
            }
            _ = dir.poke.notified() => {
                // An operator's rescan, resume or revert: try now.
                dir.retry.locked().next_at = None;
                true
            }
            _ = node.learned.notified(), if dir.mode != Mode::Source => false,
            _ = tokio::time::sleep(tick) => false,
            _ = sleep_until(retry_at) => false,
            _ = dir.stop.cancelled() => break,
        };
        if dir.stop.is_cancelled() {
            break;
        }
        if dir.paused.load(Ordering::Relaxed) {
            continue;
        }
        let now = tokio::time::Instant::now();
        let newest = if dir.mode == Mode::Source {
            None
        } else {
            node.newest_elsewhere(&dir.id)
        };
        if !dir.retry.locked().due(
            now,
            newest.as_ref().map(|(v, _)| (v.version, v.root.as_slice())),
        ) {
            continue;
        }
        if event || must_rescan || last_full.elapsed() >= dir.rescan_interval {
            last_full = tokio::time::Instant::now();
            let (n, d) = (node.clone(), dir.clone());
            let done = tokio::task::spawn_blocking(move || rescan(&n, &d)).await;
            must_rescan = !matches!(done, Ok(Ok(_)));
            match done {
                Ok(Ok(changed)) => {
                    if changed {
                        node.published.notify_one();
                    }
                    if dir.mode == Mode::Source {
                        settled(&dir);
                    }
                }
                Ok(Err(e)) => {
                    // Delays count from the end of the attempt: a long
                    // one must not be retried at once.
                    let wait = dir.retry.locked().failed(&node.env);
                    dir.panicked.store(false, Ordering::Relaxed);
                    tracing::error!(dir = %dir.id, error = format!("{e:#}"), retry_in = ?wait, "rescan failed");
                    continue;
                }
                Err(e) => {
                    panicked(&node, &dir, "rescan", e);
                    continue;
                }
            }
        }
        if dir.mode == Mode::Source {
            continue;
        }
        match newest {
            None => settled(&dir),
            Some((version, holders)) => {
                dir.retry.locked().last_attempt = Some(now);
                let (n, d, rt2) = (node.clone(), dir.clone(), rt.clone());
                let v = version.clone();
                match tokio::task::spawn_blocking(move || pull(&n, &d, &v, &holders, &rt2)).await {
                    Ok(Ok(())) => {
                        settled(&dir);
                        node.published.notify_one();
                    }
                    Ok(Err(e)) => {
                        let wait = dir.retry.locked().failed(&node.env);
                        dir.panicked.store(false, Ordering::Relaxed);
                        tracing::warn!(dir = %dir.id, version = version.version, error = format!("{e:#}"), retry_in = ?wait, "sync failed; will retry");
                    }
                    Err(e) => {
                        dir.retry.locked().failed_version =
                            Some((version.version, version.root.clone()));
                        panicked(&node, &dir, "sync", e);
                    }
                }
            }
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing scheduled.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The directory's work succeeded (or there was none to do).
fn settled(dir: &DirState) {
    dir.panicked.store(false, Ordering::Relaxed);
    let mut r = dir.retry.locked();
    if r.failures > 0 || r.next_at.is_some() {
        r.succeeded();
    }
}

/// A panic in a directory's work is a bug: the directory shows `error`
/// with the panic's message, it is counted, the work is retried with
/// backoff, and the other directories go on (no lock stays poisoned; see
/// [`crate::locks`]).
fn panicked(node: &Node, dir: &DirState, what: &str, e: tokio::task::JoinError) {
    let msg = match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into()),
        Err(e) => e.to_string(),
    };
    let wait = dir.retry.locked().failed(&node.env);
    dir.panicked.store(true, Ordering::Relaxed);
    dir.set_error(format!(
        "internal error during {what} (a bug; please report it): {msg}; retrying in {}",
        humantime::format_duration(Duration::from_secs(wait.as_secs().max(1)))
    ));
    node.metrics
        .errors
        .with_label_values(&[&dir.id, "panic"])
        .inc();
    tracing::error!(dir = %dir.id, panic = %msg, retry_in = ?wait, "{what} panicked");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node with one replica directory `www`, and its gRPC transport.
    fn node_with_dir(tmp: &std::path::Path) -> (Arc<Node>, Arc<DirState>, Arc<GrpcTransport>) {
        let grpc = Arc::new(GrpcTransport::default());
        let store = Arc::new(Store::open(&tmp.join("index"), ChunkerConfig::default()).unwrap());
        let node = Arc::new(
            Node::new(
                "n1".into(),
                "127.0.0.1:7400".into(),
                BTreeMap::new(),
                store,
                vec![],
                grpc.clone(),
                Arc::new(Env::seeded(1)),
            )
            .unwrap(),
        );
        let data = tmp.join("data");
        std::fs::create_dir(&data).unwrap();
        let file: crate::config::DirFile = toml::from_str(&format!(
            "id = \"www\"\npath = \"{}\"\nmode = \"replica\"\n",
            data.display()
        ))
        .unwrap();
        let dir = Arc::new(DirState::from_config("www", &file).unwrap());
        node.dirs.write_locked().insert("www".into(), dir.clone());
        (node, dir, grpc)
    }

    /// Issue 8 item 2: a panic in one directory's work, under the node-wide
    /// index lock, marks that directory `error` (status and metrics), backs
    /// off, leaves no lock unusable, and stops the watchdog only when no
    /// directory can make progress.
    #[tokio::test]
    async fn a_panic_marks_the_directory_and_backs_off_without_poisoning() {
        let tmp = tempfile::tempdir().unwrap();
        let (node, dir, _) = node_with_dir(tmp.path());
        let n = node.clone();
        let d = dir.clone();
        let e = tokio::task::spawn_blocking(move || {
            let _g = d.work.locked();
            let _gate = n.store_gate.read_locked();
            let s = "é".repeat(40);
            let _ = &s[..65]; // the kind of bug that used to poison the node
        })
        .await
        .unwrap_err();
        assert!(dir.work.is_poisoned());
        let now = tokio::time::Instant::now();
        panicked(&node, &dir, "sync", e);
        assert_eq!(dir.state_name(), "error");
        let reason = dir.status.locked().reason.clone();
        assert!(
            reason.contains("panic") || reason.contains("byte index"),
            "{reason}"
        );
        assert!(reason.contains("retrying in"), "{reason}");
        {
            let r = dir.retry.locked();
            assert_eq!(r.failures, 1);
            assert!(r.next_at.is_some_and(|t| t > now));
            assert!(!r.due(now, None));
        }
        assert_eq!(
            node.metrics
                .errors
                .with_label_values(&["www", "panic"])
                .get(),
            1
        );
        // The only directory cannot progress: the watchdog is not fed.
        assert!(!can_progress(&node));
        // The poisoned lock is still usable: the next scan runs.
        let (n, d) = (node.clone(), dir.clone());
        tokio::task::spawn_blocking(move || rescan(&n, &d))
            .await
            .unwrap()
            .unwrap();
        settled(&dir);
        assert!(can_progress(&node));
        assert_eq!(dir.retry.locked().failures, 0);
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let env = Env::seeded(1);
        let now = env.now();
        let mut r = Retry::default();
        let mut last = Duration::ZERO;
        for i in 1..=12 {
            let d = r.failed(&env);
            assert!(d <= RETRY_MAX, "{d:?}");
            if i <= 4 {
                // 1, 2, 4, 8 s ± 25 %
                let base = RETRY_MIN * (1 << (i - 1));
                assert!(
                    d >= base.mul_f64(0.75) && d <= base.mul_f64(1.25),
                    "{i}: {d:?}"
                );
                assert!(d > last.mul_f64(0.9) || i == 1);
            }
            last = d;
        }
        assert!(last >= RETRY_MAX.mul_f64(0.75));
        // The failed version is not retried early; a new one is, but not
        // more often than every RETRY_MIN.
        r.failed_version = Some((5, vec![1; 32]));
        r.last_attempt = Some(now);
        assert!(!r.due(now + Duration::from_millis(10), Some((5, &[1; 32]))));
        assert!(!r.due(now + Duration::from_millis(10), Some((6, &[2; 32]))));
        assert!(r.due(now + RETRY_MIN, Some((6, &[2; 32]))));
        assert!(!r.due(now + RETRY_MIN, Some((5, &[1; 32]))));
    }

    /// Issue 8 item 8: members down for DEAD_TTL are forgotten with their
    /// channels; oversized labels and directories we do not carry are not
    /// kept.
    #[tokio::test(start_paused = true)]
    async fn dead_members_are_forgotten_and_peer_keys_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let (node, _dir, grpc) = node_with_dir(tmp.path());
        for (id, addr, down) in [
            ("gone", "10.0.0.9:7400", true),
            ("here", "10.0.0.8:7400", false),
        ] {
            let mut p = PeerState::new(addr.into());
            p.swim = true;
            if down {
                p.state = Liveness::Down;
                p.down_since = Some(node.env.now());
            }
            node.peers.locked().insert(id.into(), p);
            grpc.prime(addr);
        }
        grpc.prime("10.0.0.7:7400"); // an address nobody has
        // Not yet: down for less than the TTL (on the paused clock).
        tokio::time::advance(DEAD_TTL - Duration::from_secs(1)).await;
        node.forget_dead();
        assert!(node.peers.locked().contains_key("gone"));
        tokio::time::advance(Duration::from_secs(2)).await;
        node.forget_dead();
        let peers = node.peers.locked();
        assert!(peers.contains_key("here") && !peers.contains_key("gone"));
        drop(peers);
        assert_eq!(node.transport.known(), ["10.0.0.8:7400"]);

        let holdings =
            |labels: std::collections::HashMap<String, String>, dirs: Vec<&str>| pb::Holdings {
                from: Some(pb::Member {
                    node_id: "evil".into(),
                    address: "10.0.0.6:7400".into(),
                    labels,
                }),
                dirs: dirs
                    .into_iter()
                    .map(|d| pb::DirVersion {
                        dir: d.into(),
                        version: 1,
                        root: vec![0; 32],
                        publisher: "evil".into(),
                        entries: 1,
                        bytes: 1,
                    })
                    .collect(),
                pulling: vec![],
            };
        let big = "x".repeat(1 << 20);
        let err = node
            .learn(holdings([("rack".to_string(), big)].into(), vec!["www"]))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().len() < 1024, "{}", err.message().len());
        assert!(!node.peers.locked().contains_key("evil"));
        let err = node
            .learn(holdings(
                [("colour".to_string(), "red".to_string())].into(),
                vec![],
            ))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        node.learn(holdings(Default::default(), vec!["www", "not-ours", "x1"]))
            .unwrap();
        let held: Vec<String> = node.peers.locked()["evil"]
            .holdings
            .keys()
            .cloned()
            .collect();
        assert_eq!(held, ["www"]);
    }

    /// A peer whose manifest nodes take seconds to come.
    struct SlowPeer;

    #[tonic::async_trait]
    impl crate::transport::PeerHandler for SlowPeer {
        async fn exchange(
            &self,
            _: crate::transport::Caller,
            _: pb::Holdings,
        ) -> Result<pb::Holdings, Status> {
            Err(Status::unimplemented("slow peer"))
        }
        async fn get_nodes(
            &self,
            _: crate::transport::Caller,
            _: pb::GetNodesRequest,
        ) -> Result<pb::GetNodesResponse, Status> {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok(pb::GetNodesResponse::default())
        }
        async fn get_chunks(
            &self,
            _: crate::transport::Caller,
            _: pb::GetChunksRequest,
        ) -> Result<crate::transport::ChunkStream, Status> {
            Err(Status::unimplemented("slow peer"))
        }
        async fn swim(&self, _: crate::transport::Caller, _: pb::SwimPacket) -> Result<(), Status> {
            Ok(())
        }
    }

    /// Issue 9: no lock is held across network I/O. While one directory's
    /// pull waits on a slow peer, another directory scans and garbage
    /// collection sweeps (the node-wide index lock used to block both).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_pull_holds_up_neither_other_directories_nor_collection() {
        let tmp = tempfile::tempdir().unwrap();
        let net = crate::transport::mem::MemNet::new();
        net.listen("10.0.0.9:7400", Arc::new(SlowPeer));
        let store =
            Arc::new(Store::open(&tmp.path().join("index"), ChunkerConfig::default()).unwrap());
        let node = Arc::new(
            Node::new(
                "n1".into(),
                "10.0.0.1:7400".into(),
                BTreeMap::new(),
                store,
                vec![],
                Arc::new(net.transport("10.0.0.1:7400")),
                Arc::new(Env::seeded(2)),
            )
            .unwrap(),
        );
        let mut dirs = Vec::new();
        for id in ["a", "b"] {
            let data = tmp.path().join(id);
            std::fs::create_dir(&data).unwrap();
            std::fs::write(data.join("f"), id).unwrap();
            let file: crate::config::DirFile = toml::from_str(&format!(
                "id = \"{id}\"\npath = \"{}\"\nmode = \"replica\"\n",
                data.display()
            ))
            .unwrap();
            let dir = Arc::new(DirState::from_config(id, &file).unwrap());
            node.dirs.write_locked().insert(id.into(), dir.clone());
            dirs.push(dir);
        }
        let (a, b) = (dirs[0].clone(), dirs[1].clone());
        let version = pb::DirVersion {
            dir: "a".into(),
            version: 1,
            root: vec![7; 32],
            publisher: "slow".into(),
            entries: 1,
            bytes: 1,
        };
        let holders = vec![Holder {
            id: "slow".into(),
            address: "10.0.0.9:7400".into(),
            class: PeerClass::Elsewhere,
            partial: false,
        }];
        let rt = tokio::runtime::Handle::current();
        let (n, d) = (node.clone(), a.clone());
        let pulling = tokio::task::spawn_blocking(move || pull(&n, &d, &version, &holders, &rt));
        // The pull has started (its first manifest node takes 3 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while a.status.locked().phase != Phase::Syncing {
            assert!(
                std::time::Instant::now() < deadline,
                "the pull did not start"
            );
            tokio::task::yield_now().await;
        }
        let started = std::time::Instant::now();
        let (n, d) = (node.clone(), b.clone());
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::task::spawn_blocking(move || rescan(&n, &d)),
        )
        .await
        .expect("the other directory's scan waited for the slow pull")
        .unwrap()
        .unwrap();
        let n = node.clone();
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::task::spawn_blocking(move || {
                let _gate = n.store_gate.write_locked();
                n.store.collect_garbage(true)
            }),
        )
        .await
        .expect("garbage collection waited for the slow pull")
        .unwrap()
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
        // The pull ends on its own (the peer had no node), with the peer
        // named, and gives back what it registered.
        let err = pulling.await.unwrap().unwrap_err();
        assert!(format!("{err:#}").contains("slow"), "{err:#}");
        assert!(a.pulling.locked().is_none());
        assert!(node.in_flight.locked().is_empty());
    }
}
