//! Fetching the chunks a replica lacks from a swarm of peers: full holders
//! of the version and other receivers of it, which feed each other.
//!
//! [`plan`] decides what to ask of whom (rarest first, origin protection,
//! endgame, nearest first for small transfers); this file runs it: one
//! worker per call slot of each peer asks its peer for the batch the plan
//! gives it, and leaves the verified chunks for the materializer, which
//! consumes them in its order. A receiver peer's have-set is followed with
//! long polls (`ChunkPeer::haves`), so what it receives becomes available
//! from it within a round trip. Peers can join mid-transfer
//! ([`Fetcher::add_peer`]): a receiver that started later serves what it
//! has as soon as it has it.
//!
//! Memory is bounded: only chunks that begin within `ahead_bytes` of what
//! the materializer is consuming are asked for, so at most about
//! `ahead_bytes` plus one batch per call slot is held; have-sets keep
//! indices of this transfer's own chunk list, never what a peer names.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chunk_store::Hash;
use chunk_store::manifest::ChunkEntry;
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};

use crate::bandwidth::TransferGate;
use crate::locks::LockExt as _;
use crate::materialize::ChunkSource;

pub mod plan;
use plan::{Batch, Plan, PlanConfig, Take};

/// What a peer returned: the chunks it had, already verified, and those
/// it left out to protect its upload (origin protection).
#[derive(Debug, Default)]
pub struct Got {
    pub chunks: HashMap<Hash, Bytes>,
    pub declined: HashSet<Hash>,
}

impl From<HashMap<Hash, Bytes>> for Got {
    fn from(chunks: HashMap<Hash, Bytes>) -> Got {
        Got {
            chunks,
            declined: HashSet::new(),
        }
    }
}

pub type FetchResult = Result<Got, FetchError>;

/// Why a fetch call returned nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The peer is serving as much as it will (`RESOURCE_EXHAUSTED`): ask
    /// again shortly, it is not a fault.
    #[error("busy: {0}")]
    Busy(String),
    #[error("{0}")]
    Failed(String),
}

/// What a receiver peer holds of the version, since the caller's last ask.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HaveDelta {
    /// It holds the whole version now.
    pub complete: bool,
    /// It neither holds nor receives the version any more.
    pub gone: bool,
    /// Where to go on from next time.
    pub next: u64,
    pub hashes: Vec<Hash>,
}

/// A boxed future, as the peer traits return them.
pub type Fut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A busy peer is asked again after a pause, this many times in a row at
/// most (≈ 20 s) before it counts as failing.
const MAX_BUSY: u32 = 40;
const BUSY_PAUSE: Duration = Duration::from_millis(500);
/// A worker with nothing to do looks again this often (besides being
/// woken by every change).
const RECHECK: Duration = Duration::from_millis(250);
/// The materializer waits for a chunk in slices of this (counting the
/// slices without progress towards `stall`), so it sees a pause, a resume
/// or a stop within one.
const SLICE: Duration = Duration::from_secs(1);
/// A receiver's have-set that fails this many polls in a row is dropped.
const MAX_HAVE_ERRORS: u32 = 3;

/// A peer chunks can be fetched from.
pub trait ChunkPeer: Send + Sync + 'static {
    /// For logs and per-peer counts.
    fn name(&self) -> &str;
    /// Fetches `chunks`; only chunks that match their hash and the length
    /// the recipe gives may be returned (a peer's bytes are never trusted
    /// to be the size we planned memory for). `insist`: a full holder
    /// must not leave chunks out to protect its upload.
    fn fetch(&self, chunks: Vec<ChunkEntry>, insist: bool) -> Fut<FetchResult>;
    /// What the peer, a receiver of the same version, got since `since`
    /// (a long poll). Only asked of peers added as receivers.
    fn haves(&self, _since: u64) -> Fut<Result<HaveDelta, FetchError>> {
        Box::pin(async {
            Ok(HaveDelta {
                complete: true,
                ..HaveDelta::default()
            })
        })
    }
}

/// Tuning of a [`Fetcher`].
#[derive(Clone, Copy, Debug)]
pub struct FetchConfig {
    /// Most bytes and chunks asked of a peer in one call.
    pub window_bytes: u64,
    pub window_chunks: usize,
    /// How far ahead of the materializer chunks may be fetched.
    pub ahead_bytes: u64,
    /// Calls in flight per peer.
    pub per_peer: usize,
    /// A peer whose calls fail this many times in a row is dropped.
    pub max_errors: u32,
    /// With nothing arriving for this long, a read gives up.
    pub stall: Duration,
    /// The endgame (see [`plan`]).
    pub endgame_bytes: u64,
    pub endgame_after: Duration,
    /// A chunk a full holder left out is asked again, insisting, after this.
    pub insist_after: Duration,
    /// Seeds the plan's tie-breaking (receivers pick different chunks).
    pub seed: u64,
}

impl Default for FetchConfig {
    fn default() -> FetchConfig {
        FetchConfig {
            window_bytes: 1 << 20,
            window_chunks: crate::transport::MAX_CHUNKS_PER_CALL,
            ahead_bytes: 64 << 20,
            per_peer: 2,
            max_errors: 3,
            stall: Duration::from_secs(60),
            endgame_bytes: 8 << 20,
            endgame_after: Duration::from_secs(1),
            insist_after: Duration::from_millis(1500),
            seed: 0,
        }
    }
}

impl FetchConfig {
    fn plan(&self) -> PlanConfig {
        PlanConfig {
            batch_bytes: self.window_bytes,
            batch_chunks: self.window_chunks,
            ahead_bytes: self.ahead_bytes,
            per_peer: self.per_peer,
            max_errors: self.max_errors,
            endgame_bytes: self.endgame_bytes,
            endgame_after: self.endgame_after,
            insist_after: self.insist_after,
        }
    }
}

/// What may hold a transfer's calls: its bandwidth gate (pause, priority,
/// download caps) and its directory's stop flag (a paused transfer that
/// is told to stop gives up the file it was writing).
#[derive(Debug, Clone)]
pub struct Hold {
    pub gate: Arc<TransferGate>,
    pub stopping: Arc<AtomicBool>,
}

/// Told of every chunk this transfer receives, with its bytes (so this
/// node can announce and serve it to other receivers at once).
pub type Announce = Arc<dyn Fn(&[(Hash, Bytes)]) + Send + Sync>;

#[derive(Debug, Default)]
struct PeerCounts {
    name: String,
    full: bool,
    bytes: u64,
    chunks: u64,
    errors: u32,
}

#[derive(Debug)]
struct State {
    plan: Plan,
    ready: HashMap<Hash, Bytes>,
    peers: Vec<PeerCounts>,
    /// How long the materializer waited for chunks, in all.
    stalled: Duration,
    /// When the last chunk arrived.
    done_at: Option<std::time::Instant>,
}

struct Shared {
    state: Mutex<State>,
    /// Counts changes; the materializer waits on it for chunks.
    arrived: tokio::sync::watch::Sender<u64>,
    /// Workers wait on this for work.
    room: tokio::sync::Notify,
    received: Arc<AtomicU64>,
    announce: Option<Announce>,
    hold: Option<Hold>,
    cfg: FetchConfig,
}

impl Shared {
    fn changed(&self) {
        self.arrived.send_modify(|n| *n = n.wrapping_add(1));
        self.room.notify_waiters();
    }
}

/// Swarm chunk fetching for one apply; a [`ChunkSource`]. Dropping it
/// stops its workers.
pub struct Fetcher {
    shared: Arc<Shared>,
    rt: tokio::runtime::Handle,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("peers", &self.lock().peers.len())
            .finish()
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        for t in self.tasks.locked().iter() {
            t.abort();
        }
    }
}

impl Fetcher {
    /// Starts fetching `order` (the diff's missing chunks, in the order the
    /// materializer will read them) from `peers`, full holders, most
    /// preferred first. Verified bytes are added to `received` as they
    /// arrive.
    pub fn start(
        rt: &tokio::runtime::Handle,
        order: &[ChunkEntry],
        peers: Vec<Arc<dyn ChunkPeer>>,
        cfg: FetchConfig,
        received: Arc<AtomicU64>,
    ) -> Fetcher {
        let f = Fetcher::new(rt, order, cfg, received, None, None);
        for p in peers {
            f.add_peer(p, true);
        }
        f
    }

    /// A fetcher with no peers yet (see [`Fetcher::add_peer`]), whose
    /// calls pass `hold`'s gate when given.
    pub fn new(
        rt: &tokio::runtime::Handle,
        order: &[ChunkEntry],
        cfg: FetchConfig,
        received: Arc<AtomicU64>,
        announce: Option<Announce>,
        hold: Option<Hold>,
    ) -> Fetcher {
        Fetcher {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    plan: Plan::new(order, cfg.plan(), cfg.seed),
                    ready: HashMap::new(),
                    peers: Vec::new(),
                    stalled: Duration::ZERO,
                    done_at: None,
                }),
                arrived: tokio::sync::watch::Sender::new(0),
                room: tokio::sync::Notify::new(),
                received,
                announce,
                hold,
                cfg,
            }),
            rt: rt.clone(),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Adds a peer in the same rack: a full holder of the version
    /// (`full`), or a receiver of it whose have-set is followed. Peers rank
    /// in the order added.
    pub fn add_peer(&self, peer: Arc<dyn ChunkPeer>, full: bool) {
        self.add_peer_at(peer, full, 0);
    }

    /// Adds a peer at topology `tier` (0 the same rack, 1 zone, 2 region,
    /// 3 elsewhere): what a nearer peer can give is not asked of it.
    pub fn add_peer_at(&self, peer: Arc<dyn ChunkPeer>, full: bool, tier: u8) {
        let id = {
            let mut st = self.lock();
            st.peers.push(PeerCounts {
                name: peer.name().to_string(),
                full,
                ..PeerCounts::default()
            });
            st.plan.add_peer_at(full, tier)
        };
        let mut tasks = self.tasks.locked();
        if !full {
            let (shared, p) = (self.shared.clone(), peer.clone());
            tasks.push(self.rt.spawn(follow(shared, id, p)).abort_handle());
        }
        for slot in 0..self.shared.cfg.per_peer.max(1) {
            let (shared, p) = (self.shared.clone(), peer.clone());
            let seed = self.shared.cfg.seed ^ ((id as u64) << 32) ^ slot as u64;
            tasks.push(self.rt.spawn(worker(shared, id, p, seed)).abort_handle());
        }
        self.shared.changed();
    }

    /// This node's share of what its rack fetches from farther away (see
    /// [`plan::Plan::set_rack_share`]).
    pub fn set_rack_share(&self, k: u64, r: u64) {
        self.lock().plan.set_rack_share(k, r);
        self.shared.changed();
    }

    /// Names of the peers added so far, in order.
    pub fn peer_names(&self) -> Vec<String> {
        self.lock().peers.iter().map(|p| p.name.clone()).collect()
    }

    /// Verified bytes received so far by this fetcher.
    pub fn received(&self) -> u64 {
        self.lock().peers.iter().map(|p| p.bytes).sum()
    }

    /// Verified chunks received per peer, in the order added.
    pub fn chunks_by_peer(&self) -> Vec<u64> {
        self.lock().peers.iter().map(|p| p.chunks).collect()
    }

    /// Peers that failed calls during this transfer (dropped or not).
    pub fn failed_peers(&self) -> Vec<String> {
        self.lock()
            .peers
            .iter()
            .filter(|p| p.errors > 0)
            .map(|p| p.name.clone())
            .collect()
    }

    /// The peers in order added: name, whether a full holder (at the
    /// time it was added), verified bytes received from it.
    pub fn sources(&self) -> Vec<(String, bool, u64)> {
        self.lock()
            .peers
            .iter()
            .map(|p| (p.name.clone(), p.full, p.bytes))
            .collect()
    }

    /// Verified bytes received per peer, in the order added.
    pub fn received_by_peer(&self) -> Vec<(String, u64)> {
        self.lock()
            .peers
            .iter()
            .map(|p| (p.name.clone(), p.bytes))
            .collect()
    }

    /// How long the materializer waited for chunks to arrive, in all (the
    /// transfer's time not spent writing).
    pub fn stalled(&self) -> Duration {
        self.lock().stalled
    }

    /// When the last chunk arrived, if all have.
    pub fn done_at(&self) -> Option<std::time::Instant> {
        self.lock().done_at
    }

    /// Bytes still to arrive, and the live peers (all, full holders).
    pub fn progress(&self) -> (u64, usize, usize) {
        let st = self.lock();
        let (live, full) = st.plan.live_peers();
        (st.plan.remaining(), live, full)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.locked()
    }
}

/// One call slot of one peer: asks it for what the plan gives it.
async fn worker(shared: Arc<Shared>, peer: usize, source: Arc<dyn ChunkPeer>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut busy = 0;
    loop {
        let batch = loop {
            let room = shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            // Paused, or giving way to a higher class: nothing is taken
            // from the plan meanwhile, so other peers' workers can take it.
            let admitted = match &shared.hold {
                Some(h) => Some(h.gate.ready().await),
                None => None,
            };
            match shared
                .state
                .locked()
                .plan
                .take(peer, tokio::time::Instant::now())
            {
                Take::Fetch(b) => break Some((b, admitted)),
                Take::Done => break None,
                Take::Wait => {}
            }
            drop(admitted);
            // Also time makes work: a declined chunk becomes due for an
            // insisting ask, a slow call for a second one in the endgame.
            let _ = tokio::time::timeout(RECHECK, room).await;
        };
        let Some((batch, admitted)) = batch else {
            break;
        };
        if let (Some(h), Some(a)) = (&shared.hold, &admitted) {
            let bytes = batch.chunks.iter().map(|c| u64::from(c.len)).sum();
            h.gate.download(bytes, a).await;
        }
        let asked_at = std::time::Instant::now();
        let result = source.fetch(batch.chunks.clone(), batch.insist).await;
        if let Ok(got) = &result {
            tracing::trace!(
                peer = source.name(),
                asked = batch.chunks.len(),
                got = got.chunks.len(),
                declined = got.declined.len(),
                insist = batch.insist,
                took_ms = asked_at.elapsed().as_millis() as u64,
                "call answered"
            );
        }
        match result {
            Err(FetchError::Busy(e)) if busy < MAX_BUSY => {
                // Not this peer's fault: hand the batch back untried and
                // ask again after a pause (others may take it meanwhile).
                busy += 1;
                tracing::debug!(peer = source.name(), error = %e, "peer busy; asking again shortly");
                shared.state.locked().plan.busy(peer, &batch);
                shared.changed();
                // A trickling transfer's one call slot is free meanwhile.
                drop(admitted);
                tokio::time::sleep(BUSY_PAUSE.mul_f64(rng.random_range(0.5..1.5))).await;
                continue;
            }
            Ok(got) => {
                busy = 0;
                arrived(&shared, peer, source.name(), &batch, got);
            }
            Err(e) => {
                let mut st = shared.state.locked();
                st.peers[peer].errors += 1;
                tracing::warn!(peer = source.name(), error = %e, "chunk fetch failed; another peer will be asked");
                if st.plan.failed(peer, &batch) {
                    tracing::warn!(
                        peer = source.name(),
                        "dropping peer from this transfer after {} failed calls",
                        shared.cfg.max_errors
                    );
                }
            }
        }
        shared.changed();
    }
    shared.changed();
}

/// Keeps the verified chunks of an answer the plan counts as new.
fn arrived(shared: &Shared, peer: usize, name: &str, batch: &Batch, got: Got) {
    let Got {
        chunks: got,
        declined,
    } = got;
    let lengths: HashMap<Hash, u32> = batch.chunks.iter().map(|c| (c.hash, c.len)).collect();
    let ok = |h: &Hash| {
        got.get(h)
            .zip(lengths.get(h))
            .is_some_and(|(b, len)| b.len() == *len as usize)
    };
    let mut st = shared.state.locked();
    let new = st.plan.answered(
        peer,
        batch,
        &ok,
        &|h| declined.contains(h),
        tokio::time::Instant::now(),
    );
    if new.is_empty() && !batch.chunks.is_empty() {
        tracing::debug!(
            peer = name,
            asked = batch.chunks.len(),
            "peer had none of a batch"
        );
    }
    let mut fresh = Vec::with_capacity(new.len());
    let mut n = 0u64;
    for h in new {
        let b = got[&h].clone();
        n += b.len() as u64;
        st.ready.insert(h, b.clone());
        fresh.push((h, b));
    }
    if st.plan.remaining() == 0 && st.done_at.is_none() {
        st.done_at = Some(std::time::Instant::now());
    }
    let counts = &mut st.peers[peer];
    counts.bytes += n;
    counts.chunks += fresh.len() as u64;
    drop(st);
    shared.received.fetch_add(n, Ordering::Relaxed);
    if let Some(announce) = &shared.announce
        && !fresh.is_empty()
    {
        announce(&fresh);
    }
}

/// Follows a receiver peer's have-set until it completes or leaves.
async fn follow(shared: Arc<Shared>, peer: usize, source: Arc<dyn ChunkPeer>) {
    let (mut since, mut errors) = (0, 0);
    loop {
        match source.haves(since).await {
            Ok(d) => {
                errors = 0;
                let mut st = shared.state.locked();
                if st.plan.is_dead(peer) {
                    // Dropped (its calls failed): its have-set is moot.
                    return;
                }
                let new = st.plan.announce(peer, &d.hashes);
                if d.complete {
                    st.plan.complete(peer);
                } else if d.gone {
                    tracing::debug!(peer = source.name(), "peer no longer receives this version");
                    st.plan.drop_peer(peer);
                }
                drop(st);
                if new || d.complete || d.gone {
                    shared.changed();
                }
                if d.complete || d.gone {
                    return;
                }
                since = d.next;
            }
            Err(e) => {
                errors += 1;
                if errors >= MAX_HAVE_ERRORS {
                    tracing::warn!(peer = source.name(), error = %e, "dropping a receiver peer whose have-set cannot be read");
                    shared.state.locked().plan.drop_peer(peer);
                    shared.changed();
                    return;
                }
                tokio::time::sleep(BUSY_PAUSE).await;
            }
        }
    }
}

impl ChunkSource for Fetcher {
    fn read_chunk(&self, chunk: &ChunkEntry) -> std::io::Result<Option<Bytes>> {
        let mut st = self.lock();
        let i = st.plan.reading(chunk);
        self.shared.room.notify_waiters();
        let mut since: Option<std::time::Instant> = None;
        let mut idle = Duration::ZERO;
        loop {
            if let Some(b) = st.ready.remove(&chunk.hash) {
                st.plan.consumed(i);
                if let Some(t) = since {
                    st.stalled += t.elapsed();
                }
                self.shared.room.notify_waiters();
                return Ok(Some(b));
            }
            // Consumed already (a chunk used twice is read back from the
            // file it was written to), or no peer can give it.
            if st.plan.is_consumed(i) || st.plan.unavailable(i) {
                return Ok(None);
            }
            since.get_or_insert_with(std::time::Instant::now);
            // Subscribed under the lock: a change after the check wakes it.
            let mut arrived = self.shared.arrived.subscribe();
            drop(st);
            let hold = self.shared.hold.as_ref();
            let paused = || hold.is_some_and(|h| h.gate.paused());
            let was_paused = paused();
            if was_paused && hold.is_some_and(|h| h.stopping.load(Ordering::Relaxed)) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "the directory is stopping while its transfer is paused",
                ));
            }
            // In slices: pause, resume and stop are seen within one.
            let slice = SLICE.min(self.shared.cfg.stall);
            let progressed = crate::env::wait(&self.rt, async move {
                tokio::time::timeout(slice, arrived.changed()).await.is_ok()
            });
            st = self.lock();
            if progressed || was_paused || paused() {
                // A paused transfer is not stalled; its stall clock starts
                // again when it resumes.
                idle = Duration::ZERO;
                continue;
            }
            idle += slice;
            if idle >= self.shared.cfg.stall && !st.ready.contains_key(&chunk.hash) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no progress fetching chunk {} for {:?}",
                        chunk.hash, self.shared.cfg.stall
                    ),
                ));
            }
        }
    }

    fn verified(&self) -> bool {
        true
    }

    fn is_local(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests;
