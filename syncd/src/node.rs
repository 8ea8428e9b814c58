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
use tonic::transport::{Channel, Endpoint};

use crate::config::{Config, Mode};
use crate::fetch::{ChunkPeer, FetchConfig, Fetcher};
use crate::materialize::{self, InFlight, LocalChunks};
use crate::membership::{Ident, Liveness, Members, Swim};
use crate::metrics::Metrics;
use crate::peer::{MAX_MESSAGE_BYTES, PeerChunks, PeerService, RemotePeer};
use crate::topology::PeerClass;
use rand::seq::SliceRandom as _;

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
}

impl DirState {
    /// The state name syncctl and metrics show.
    pub fn state_name(&self) -> &'static str {
        if self.paused.load(Ordering::Relaxed) {
            "paused"
        } else {
            self.status.lock().unwrap().phase.as_str()
        }
    }

    fn set_phase(&self, phase: Phase) {
        let mut s = self.status.lock().unwrap();
        s.phase = phase;
        if phase != Phase::Error {
            s.reason.clear();
        }
    }

    fn set_error(&self, error: String) {
        let mut s = self.status.lock().unwrap();
        s.phase = Phase::Error;
        s.reason = error.clone();
        s.last_error = error;
    }

    pub fn current_version(&self) -> Option<pb::DirVersion> {
        self.current.lock().unwrap().clone()
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
    /// Last holdings exchange with it, either direction.
    pub(crate) heard: std::time::Instant,
    /// Holdings exchange round trip, smoothed (0: not measured).
    pub(crate) rtt_ms: f64,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
}

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
            heard: std::time::Instant::now(),
            rtt_ms: 0.0,
            bytes_sent: 0,
            bytes_received: 0,
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
    channels: Mutex<HashMap<String, Channel>>,
    /// Scans, syncs and garbage collection never overlap: a sweep must not
    /// see nodes another scan wrote but has not yet referenced.
    pub index_lock: Mutex<()>,
    /// Something changed locally: push holdings now.
    pub(crate) published: Notify,
    /// A peer announced something: replica loops look now.
    learned: Notify,
    /// Chunks of files being received (served to peers before indexing).
    pub in_flight: InFlight,
    /// Membership and failure detection, started once the node exists.
    pub swim: std::sync::OnceLock<Swim>,
    pub metrics: Metrics,
    pub started: std::time::Instant,
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
        let mut peers = self.peers.lock().unwrap();
        let p = peers
            .entry(id.node_id.clone())
            .or_insert_with(|| PeerState::new(id.address.clone()));
        p.address = id.address.clone();
        p.state = state;
        p.swim = true;
        drop(peers);
        if state != Liveness::Down {
            self.learned.notify_waiters();
        }
    }

    fn channel(&self, address: &str) -> Option<Channel> {
        self.metrics
            .gossip_messages
            .with_label_values(&["swim", "sent"])
            .inc();
        Node::channel(self, address).ok()
    }
}

impl Node {
    /// The class of peer `id` as seen from here.
    pub(crate) fn class_of(&self, id: &str) -> PeerClass {
        match self.peers.lock().unwrap().get(id) {
            Some(p) => PeerClass::of(&self.labels, &p.labels),
            None => PeerClass::Elsewhere,
        }
    }

    /// Accounts chunks served to `requester`.
    pub(crate) fn record_sent(&self, requester: &str, dir: &str, bytes: u64, chunks: u64) {
        let class = self.class_of(requester);
        if let Some(p) = self.peers.lock().unwrap().get_mut(requester) {
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
        self.dirs.read().unwrap().get(id).cloned()
    }

    /// The directories being synced now.
    pub fn dir_list(&self) -> Vec<Arc<DirState>> {
        self.dirs.read().unwrap().values().cloned().collect()
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
    pub fn holdings(&self) -> pb::Holdings {
        let dirs = self.dir_list();
        pb::Holdings {
            from: Some(self.member()),
            dirs: dirs
                .iter()
                .filter_map(|d| d.current.lock().unwrap().clone())
                .collect(),
            pulling: dirs
                .iter()
                .filter_map(|d| d.pulling.lock().unwrap().clone())
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
        let by_dir = |list: Vec<pb::DirVersion>| {
            let mut out = HashMap::new();
            for d in list {
                if d.root.len() != 32
                    || d.dir.is_empty()
                    || d.dir.len() > 128
                    || d.publisher.len() > 128
                {
                    return Err(Status::invalid_argument(format!(
                        "malformed holding for {:?}",
                        d.dir
                    )));
                }
                out.insert(d.dir.clone(), d);
            }
            Ok(out)
        };
        let holdings = by_dir(h.dirs)?;
        let pulling = by_dir(h.pulling)?;
        let mut peers = self.peers.lock().unwrap();
        let new = !peers.contains_key(&from.node_id);
        let p = peers
            .entry(from.node_id.clone())
            .or_insert_with(|| PeerState::new(from.address.clone()));
        p.heard = std::time::Instant::now();
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

    fn channel(&self, address: &str) -> anyhow::Result<Channel> {
        let mut channels = self.channels.lock().unwrap();
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let c = Endpoint::from_shared(format!("http://{address}"))
            .with_context(|| format!("peer address {address:?}"))?
            .connect_timeout(CALL_TIMEOUT)
            .timeout(Duration::from_secs(60))
            // Windows sized so one stream can fill a fast link.
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .connect_lazy();
        channels.insert(address.to_string(), c.clone());
        Ok(c)
    }

    /// The newest version of `dir` among live peers, newer than ours, with
    /// the live peers that hold it (then those receiving it), nearest first.
    fn newest_elsewhere(&self, dir: &str) -> Option<(pb::DirVersion, Vec<Holder>)> {
        let ours = self
            .dirs
            .read()
            .unwrap()
            .get(dir)?
            .current
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |v| v.version);
        let peers = self.peers.lock().unwrap();
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
        // Full holders before partial ones, nearest first, then a random
        // order so a fleet does not pile onto the same peer.
        holders.shuffle(&mut rand::rng());
        holders.sort_by_key(|h| (h.partial, h.class));
        holders.truncate(MAX_SOURCES);
        Some((best, holders))
    }

    /// One exchange with every known peer and bootstrap address.
    async fn gossip_round(self: &Arc<Self>) {
        let mut targets: Vec<String> = self
            .peers
            .lock()
            .unwrap()
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
                    let mut client = pb::peer_client::PeerClient::new(node.channel(&address)?)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES);
                    node.metrics
                        .gossip_messages
                        .with_label_values(&["exchange", "sent"])
                        .inc();
                    let resp = tokio::time::timeout(CALL_TIMEOUT, client.exchange(req)).await??;
                    anyhow::Ok(resp.into_inner())
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
                            && let Some(p) = node.peers.lock().unwrap().get_mut(&id)
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

fn check_member(m: &pb::Member) -> Result<(), Status> {
    let id_ok = !m.node_id.is_empty()
        && m.node_id.len() <= 128
        && m.node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let addr_ok = m.address.len() <= 256
        && m.address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if id_ok && addr_ok && m.labels.len() <= 8 {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "malformed member {:?} at {:?}",
            m.node_id, m.address
        )))
    }
}

/// Scans one directory and records the version this node now holds.
/// Sources publish a new version when the root changes; replicas only
/// report local edits.
pub(crate) fn rescan(node: &Node, dir: &DirState) -> anyhow::Result<bool> {
    let _guard = node.index_lock.lock().unwrap();
    dir.set_phase(Phase::Scanning);
    let opts = indexer::ScanOptions {
        refuse_emptying: dir.mode == Mode::Source,
        ignore: dir.ignore.clone(),
        ..Default::default()
    };
    let report = match indexer::scan_with(&node.store, &dir.id, &dir.path, opts) {
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
    let mut current = dir.current.lock().unwrap();
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
    let _guard = node.index_lock.lock().unwrap();
    dir.set_phase(Phase::Syncing);
    let started = std::time::Instant::now();
    let result = pull_locked(node, dir, version, holders, rt, started);
    let p = &dir.progress;
    for a in [&p.bytes_total, &p.files_total, &p.files_done] {
        a.store(0, Ordering::Relaxed);
    }
    *dir.pulling.lock().unwrap() = None;
    node.in_flight.clear();
    match &result {
        Ok(()) => {
            *dir.current.lock().unwrap() = Some(version.clone());
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
        }
    }
    result
}

fn pull_locked(
    node: &Node,
    dir: &DirState,
    version: &pb::DirVersion,
    holders: &[Holder],
    rt: &tokio::runtime::Handle,
    started: std::time::Instant,
) -> anyhow::Result<()> {
    let remote_root = Hash::from_slice(&version.root).context("root of 32 bytes")?;
    let opts = indexer::ScanOptions {
        ignore: dir.ignore.clone(),
        ..Default::default()
    };
    let local = indexer::scan_with(&node.store, &dir.id, &dir.path, opts)
        .with_context(|| format!("scanning directory {:?} at {}", dir.id, dir.path.display()))?;
    let peers: Vec<RemotePeer> = holders
        .iter()
        .map(|h| {
            Ok(RemotePeer::new(
                h.id.clone(),
                node.channel(&h.address)?,
                rt.clone(),
                node.metrics.clone(),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    // The manifest comes from a full holder (the nearest).
    let (first, _) = peers
        .iter()
        .zip(holders)
        .find(|(_, h)| !h.partial)
        .context("no peer holds the version")?;
    let store = &node.store;
    let mut probe = store.chunk_probe();
    let diff = manifest::diff(
        &**store,
        Some(local.root),
        first,
        Some(remote_root),
        &mut |h| probe.has(h),
    )
    .with_context(|| format!("diff of {:?} against peer {}", dir.id, first.id))?;
    drop(probe);
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
    *dir.pulling.lock().unwrap() = Some(version.clone());
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
        first,
        &[&local_chunks, &node.in_flight, &fetcher],
        &node.in_flight,
        &p.files_done,
    );
    // Account what arrived, whether or not the apply completed.
    for ((id, bytes), chunks) in fetcher
        .received_by_peer()
        .into_iter()
        .zip(fetcher.chunks_by_peer())
    {
        let class = node.class_of(&id);
        if let Some(peer) = node.peers.lock().unwrap().get_mut(&id) {
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
    let mut report = applied
        .with_context(|| format!("materializing {:?} version {}", dir.id, version.version))?;
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
        ignore: dir.ignore.clone(),
        ..Default::default()
    };
    let after = indexer::scan_with(store, &dir.id, &dir.path, opts)?;
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
    let node = Arc::new(Node {
        id: n.id.get_ref().clone(),
        address: config.listen.to_string(),
        labels: n.labels.get_ref().clone(),
        store,
        dirs: Default::default(),
        bootstrap: n.peers.get_ref().clone(),
        peers: Mutex::new(HashMap::new()),
        channels: Mutex::new(HashMap::new()),
        index_lock: Mutex::new(()),
        published: Notify::new(),
        learned: Notify::new(),
        in_flight: InFlight::default(),
        swim: std::sync::OnceLock::new(),
        metrics: Metrics::new().context("registering metrics")?,
        started: std::time::Instant::now(),
    });

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
    let swim = Swim::start(me, node.bootstrap.clone(), node.clone());
    node.swim.set(swim).expect("set once");
    tracing::info!(node = %node.id, listen = %config.listen, dirs = pending.len(), "syncd running");
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .add_service(
            pb::peer_server::PeerServer::new(PeerService { node: node.clone() })
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming(
            // Nagle's algorithm against delayed ACKs cost ~40 ms per small
            // response (a manifest node) before this.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        );

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
    let mut running: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
    for d in pending {
        running.insert(d.id.clone(), start_dir(&node, d, &mut tasks));
    }
    notify.ready(&status_line(&node));
    if let Some(interval) = notify.watchdog_interval() {
        let (node, notify) = (node.clone(), notify.clone());
        tasks.spawn(async move { watchdog_loop(node, notify, interval).await });
    }
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    tokio::pin!(server);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = &mut server => {
                r.context("peer service failed")?;
                break;
            }
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                notify.stopping();
                break;
            }
            _ = hangup.recv() => {
                notify.reloading();
                reload(&node, &config, &mut running, &mut tasks).await;
                notify.ready(&status_line(&node));
            }
        }
    }
    tasks.abort_all();
    let _ = std::fs::remove_file(&config.node.admin.socket);
    Ok(())
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
        .lock()
        .unwrap()
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
        for d in node.dir_list() {
            let now = d.progress.received.load(Ordering::Relaxed);
            let mut rate = d.rate.lock().unwrap();
            let delta = now.saturating_sub(rate.0) as f64;
            rate.1 = 0.5 * rate.1 + 0.5 * delta;
            rate.0 = now;
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
        match tokio::time::timeout(interval / 2, probe).await {
            Ok(Ok(true)) => notify.watchdog(),
            _ => tracing::error!("index did not answer in time; not feeding the watchdog"),
        }
    }
}

/// Creates a directory's state and scans it once.
async fn prepare_dir(
    node: &Arc<Node>,
    id: &str,
    d: &crate::config::DirFile,
) -> anyhow::Result<Arc<DirState>> {
    let dir = Arc::new(DirState {
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
    });
    node.metrics.init_dir(&dir.id, !dir.hook.is_empty());
    // Visible to syncctl while the first scan runs.
    node.dirs
        .write()
        .unwrap()
        .insert(dir.id.clone(), dir.clone());
    let (n, d2) = (node.clone(), dir.clone());
    // A directory that cannot be scanned (missing, unmounted) is an error
    // state, not a reason to stop the node: its loop keeps retrying.
    if let Err(e) = tokio::task::spawn_blocking(move || rescan(&n, &d2)).await? {
        tracing::error!(dir = %id, error = format!("{e:#}"), "initial scan failed");
    }
    // The first version a source publishes at start is not a sync.
    dir.synced.send_replace(None);
    Ok(dir)
}

fn start_dir(
    node: &Arc<Node>,
    dir: Arc<DirState>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> tokio::task::AbortHandle {
    node.dirs
        .write()
        .unwrap()
        .insert(dir.id.clone(), dir.clone());
    let node = node.clone();
    let rt = tokio::runtime::Handle::current();
    tasks.spawn(async move {
        // Aborting the task drops both: the loop and its hook runner.
        tokio::join!(
            dir_loop(node.clone(), dir.clone(), rt),
            crate::hooks::run_hooks(node, dir)
        );
    })
}

/// SIGHUP: re-reads `dirs.d/` and starts or stops directories. A directory
/// whose settings changed is stopped and started again. Files of a stopped
/// directory are left as they are. An invalid configuration is logged and
/// the running one kept.
async fn reload(
    node: &Arc<Node>,
    running_config: &Config,
    running: &mut HashMap<String, tokio::task::AbortHandle>,
    tasks: &mut tokio::task::JoinSet<()>,
) {
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
            && old_files
                .get(&a.id)
                .is_none_or(|(_, f)| f.ignore.get_ref() == b.ignore.get_ref())
    };
    for d in node.dir_list() {
        if !new.dirs.get(&d.id).is_some_and(|(_, f)| same(&d, f)) {
            if let Some(task) = running.remove(&d.id) {
                task.abort();
            }
            node.dirs.write().unwrap().remove(&d.id);
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
                running.insert(id.clone(), start_dir(node, dir, tasks));
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
    loop {
        let event = tokio::select! {
            e = rx.recv() => e.is_some(),
            _ = dir.poke.notified() => true,
            _ = node.learned.notified(), if dir.mode != Mode::Source => false,
            _ = tokio::time::sleep(tick) => false,
        };
        if dir.paused.load(Ordering::Relaxed) {
            continue;
        }
        if event || last_full.elapsed() >= dir.rescan_interval {
            last_full = tokio::time::Instant::now();
            let (n, d) = (node.clone(), dir.clone());
            match tokio::task::spawn_blocking(move || rescan(&n, &d)).await {
                Ok(Ok(true)) => node.published.notify_one(),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::error!(dir = %dir.id, error = format!("{e:#}"), "rescan failed")
                }
                Err(e) => tracing::error!(dir = %dir.id, error = %e, "rescan panicked"),
            }
        }
        if dir.mode == Mode::Source {
            continue;
        }
        if let Some((version, holders)) = node.newest_elsewhere(&dir.id) {
            let (n, d, rt2) = (node.clone(), dir.clone(), rt.clone());
            let v = version.clone();
            match tokio::task::spawn_blocking(move || pull(&n, &d, &v, &holders, &rt2)).await {
                Ok(Ok(())) => node.published.notify_one(),
                Ok(Err(e)) => {
                    tracing::warn!(dir = %dir.id, version = version.version, error = format!("{e:#}"), "sync failed; will retry")
                }
                Err(e) => tracing::error!(dir = %dir.id, error = %e, "sync panicked"),
            }
        }
    }
}
