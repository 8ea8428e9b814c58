//! Fetching the chunks a replica lacks from several peers at once.
//!
//! The diff's missing list is cut into windows (at most 4 MiB or 1024
//! chunks). One worker per peer connection takes the next window, asks its
//! peer for it and leaves the verified chunks for the materializer, which
//! consumes them in the same order. Peers are given in order of preference
//! (nearest first, partial holders last); a faster peer simply takes more
//! windows. A window a peer could not serve in full (an error, chunks it
//! lacks, a chunk that fails BLAKE3) goes back on a retry queue for a peer
//! that has not tried it; a window every peer failed is reported as
//! unavailable, never waited on forever.
//!
//! Memory is bounded: workers only start windows that begin within
//! `ahead_bytes` of what the materializer is consuming, so at most about
//! `ahead_bytes` plus one window per worker is held.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chunk_store::Hash;
use chunk_store::manifest::ChunkEntry;

use crate::locks::LockExt as _;
use crate::materialize::ChunkSource;

/// What a peer returned: the chunks it had, already verified.
pub type FetchResult = Result<HashMap<Hash, Bytes>, FetchError>;

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

/// A busy peer is asked again after a pause, this many times in a row at
/// most (≈ 20 s) before it counts as failing.
const MAX_BUSY: u32 = 40;
const BUSY_PAUSE: Duration = Duration::from_millis(500);

/// A peer chunks can be fetched from.
pub trait ChunkPeer: Send + Sync + 'static {
    /// For logs and per-peer counts.
    fn name(&self) -> &str;
    /// Fetches `chunks`; only chunks that match their hash and the length
    /// the recipe gives may be returned (a peer's bytes are never trusted
    /// to be the size we planned memory for).
    fn fetch(&self, chunks: Vec<ChunkEntry>) -> Pin<Box<dyn Future<Output = FetchResult> + Send>>;
}

/// Tuning of a [`Fetcher`].
#[derive(Clone, Copy, Debug)]
pub struct FetchConfig {
    pub window_bytes: u64,
    pub window_chunks: usize,
    /// How far ahead of the materializer windows may be fetched.
    pub ahead_bytes: u64,
    /// Windows in flight per peer.
    pub per_peer: usize,
    /// A peer whose calls fail this many times in a row is dropped.
    pub max_errors: u32,
    /// With nothing arriving for this long, a read gives up.
    pub stall: Duration,
}

impl Default for FetchConfig {
    fn default() -> FetchConfig {
        FetchConfig {
            window_bytes: 4 << 20,
            window_chunks: crate::transport::MAX_CHUNKS_PER_CALL,
            ahead_bytes: 64 << 20,
            per_peer: 2,
            max_errors: 3,
            stall: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Waiting,
    Fetching,
    Done,
    Failed,
}

#[derive(Debug)]
struct Window {
    hashes: Vec<ChunkEntry>,
    /// Which of `hashes` have arrived (they may be consumed since).
    got: Vec<bool>,
    /// Byte offset of its first chunk in the missing list.
    start: u64,
    status: Status,
    /// Peers (by index) that have tried it.
    tried: Vec<bool>,
}

#[derive(Debug)]
struct State {
    windows: Vec<Window>,
    /// Next window never handed out.
    next: usize,
    retry: VecDeque<usize>,
    ready: HashMap<Hash, Bytes>,
    window_of: HashMap<Hash, usize>,
    /// Start of the window the materializer is reading from.
    consumed: u64,
    dead: Vec<bool>,
    /// Failed calls per peer, over the whole transfer.
    errors: Vec<u32>,
    workers: usize,
}

impl State {
    fn unfinished(&self, w: usize) -> bool {
        matches!(self.windows[w].status, Status::Waiting | Status::Fetching)
    }

    /// The next window `peer` should fetch, `Err(())` if it has nothing left
    /// to do at all, `Ok(None)` to wait.
    fn take(&mut self, peer: usize, cfg: &FetchConfig) -> Result<Option<usize>, ()> {
        if let Some(pos) = self
            .retry
            .iter()
            .position(|&w| !self.windows[w].tried[peer])
        {
            return Ok(self.retry.remove(pos));
        }
        // Nearest first: the k-th live peer in rank starts a new window only
        // while more than k are left unstarted, so a small transfer comes
        // from the nearest peer and the others help only when there is
        // work enough for them too.
        let better_alive = (0..peer).filter(|&q| !self.dead[q]).count();
        if self.next < self.windows.len()
            && self.windows.len() - self.next > better_alive
            && self.windows[self.next].start <= self.consumed + cfg.ahead_bytes
        {
            self.next += 1;
            return Ok(Some(self.next - 1));
        }
        let more = self.next < self.windows.len()
            || (0..self.windows.len()).any(|w| self.unfinished(w) && !self.windows[w].tried[peer]);
        if more { Ok(None) } else { Err(()) }
    }

    /// After `peer` tried window `w`: done, back for another peer, or failed.
    fn settle(&mut self, w: usize) {
        let win = &self.windows[w];
        if win.got.iter().all(|g| *g) {
            self.windows[w].status = Status::Done;
        } else if win
            .tried
            .iter()
            .zip(&self.dead)
            .any(|(tried, dead)| !tried && !dead)
        {
            self.windows[w].status = Status::Waiting;
            self.retry.push_back(w);
        } else {
            self.windows[w].status = Status::Failed;
        }
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The materializer waits on this for chunks.
    arrived: Condvar,
    /// Workers wait on this for room ahead or for retries.
    room: tokio::sync::Notify,
    received: Arc<AtomicU64>,
    per_peer: Vec<AtomicU64>,
    chunks_per_peer: Vec<AtomicU64>,
}

/// Parallel multi-peer chunk fetching for one apply; a [`ChunkSource`].
/// Dropping it stops its workers.
#[derive(Debug)]
pub struct Fetcher {
    shared: Arc<Shared>,
    names: Vec<String>,
    tasks: Vec<tokio::task::AbortHandle>,
    cfg: FetchConfig,
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Fetcher {
    /// Starts fetching `order` (the diff's missing chunks, in the order the
    /// materializer will read them) from `peers`, most preferred first.
    /// Verified bytes are added to `received` as they arrive.
    pub fn start(
        rt: &tokio::runtime::Handle,
        order: &[ChunkEntry],
        peers: Vec<Arc<dyn ChunkPeer>>,
        cfg: FetchConfig,
        received: Arc<AtomicU64>,
    ) -> Fetcher {
        let mut windows: Vec<Window> = Vec::new();
        let mut window_of = HashMap::with_capacity(order.len());
        let mut offset = 0u64;
        let mut bytes = 0u64;
        for c in order {
            let full = windows.last().is_none_or(|w| {
                w.hashes.len() >= cfg.window_chunks || bytes + u64::from(c.len) > cfg.window_bytes
            });
            if full {
                windows.push(Window {
                    hashes: Vec::new(),
                    got: Vec::new(),
                    start: offset,
                    status: Status::Waiting,
                    tried: vec![false; peers.len()],
                });
                bytes = 0;
            }
            window_of.insert(c.hash, windows.len() - 1);
            let w = windows.last_mut().expect("pushed above");
            w.hashes.push(*c);
            w.got.push(false);
            bytes += u64::from(c.len);
            offset += u64::from(c.len);
        }
        let per_peer = cfg.per_peer.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                windows,
                next: 0,
                retry: VecDeque::new(),
                ready: HashMap::new(),
                window_of,
                consumed: 0,
                dead: vec![false; peers.len()],
                errors: vec![0; peers.len()],
                workers: peers.len() * per_peer,
            }),
            arrived: Condvar::new(),
            room: tokio::sync::Notify::new(),
            received,
            per_peer: peers.iter().map(|_| AtomicU64::new(0)).collect(),
            chunks_per_peer: peers.iter().map(|_| AtomicU64::new(0)).collect(),
        });
        let names = peers.iter().map(|p| p.name().to_string()).collect();
        let mut tasks = Vec::new();
        // Interleave so the preferred peers start first.
        for _ in 0..per_peer {
            for (i, p) in peers.iter().enumerate() {
                let (shared, peer) = (shared.clone(), p.clone());
                tasks.push(rt.spawn(worker(shared, i, peer, cfg)).abort_handle());
            }
        }
        Fetcher {
            shared,
            names,
            tasks,
            cfg,
        }
    }

    /// Verified bytes received so far by this fetcher.
    pub fn received(&self) -> u64 {
        self.shared
            .per_peer
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    /// Verified chunks received per peer, in the order given to `start`.
    pub fn chunks_by_peer(&self) -> Vec<u64> {
        self.shared
            .chunks_per_peer
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Peers that failed calls during this transfer (dropped or not).
    pub fn failed_peers(&self) -> Vec<String> {
        let st = self.lock();
        self.names
            .iter()
            .zip(&st.errors)
            .filter(|(_, e)| **e > 0)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Verified bytes received per peer, in the order given to `start`.
    pub fn received_by_peer(&self) -> Vec<(String, u64)> {
        self.names
            .iter()
            .zip(&self.shared.per_peer)
            .map(|(n, b)| (n.clone(), b.load(Ordering::Relaxed)))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.locked()
    }
}

async fn worker(shared: Arc<Shared>, peer: usize, source: Arc<dyn ChunkPeer>, cfg: FetchConfig) {
    let mut errors = 0;
    let mut busy = 0;
    loop {
        let w = loop {
            let room = shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut st = shared.state.locked();
                if st.dead[peer] {
                    break None;
                }
                match st.take(peer, &cfg) {
                    Ok(Some(w)) => {
                        st.windows[w].status = Status::Fetching;
                        st.windows[w].tried[peer] = true;
                        break Some(w);
                    }
                    Ok(None) => {}
                    Err(()) => break None,
                }
            }
            room.await;
        };
        let Some(w) = w else { break };
        let want: Vec<ChunkEntry> = {
            let st = shared.state.locked();
            let win = &st.windows[w];
            win.hashes
                .iter()
                .zip(&win.got)
                .filter(|(_, got)| !**got)
                .map(|(c, _)| *c)
                .collect()
        };
        let result = source.fetch(want.clone()).await;
        if let Err(FetchError::Busy(e)) = &result
            && busy < MAX_BUSY
        {
            // Not this peer's fault: hand the window back untried and ask
            // again after a pause (another worker may take it meanwhile).
            busy += 1;
            tracing::debug!(peer = source.name(), error = %e, "peer busy; asking again shortly");
            {
                let mut st = shared.state.locked();
                st.windows[w].tried[peer] = false;
                st.windows[w].status = Status::Waiting;
                st.retry.push_front(w);
            }
            shared.room.notify_waiters();
            tokio::time::sleep(BUSY_PAUSE.mul_f64(rand::random_range(0.5..1.5))).await;
            continue;
        }
        let mut st = shared.state.locked();
        match result {
            Ok(got) => {
                errors = 0;
                busy = 0;
                let (mut n, mut count) = (0, 0);
                let st = &mut *st;
                let win = &mut st.windows[w];
                for (c, arrived) in win.hashes.iter().zip(win.got.iter_mut()) {
                    if !*arrived
                        && let Some(b) = got.get(&c.hash)
                        && b.len() == c.len as usize
                    {
                        *arrived = true;
                        n += b.len() as u64;
                        count += 1;
                        st.ready.insert(c.hash, b.clone());
                    }
                }
                shared.received.fetch_add(n, Ordering::Relaxed);
                shared.per_peer[peer].fetch_add(n, Ordering::Relaxed);
                shared.chunks_per_peer[peer].fetch_add(count, Ordering::Relaxed);
                if n == 0 && !want.is_empty() {
                    tracing::debug!(
                        peer = source.name(),
                        window = w,
                        "peer had none of a window"
                    );
                }
            }
            Err(e) => {
                errors += 1;
                st.errors[peer] += 1;
                tracing::warn!(peer = source.name(), error = %e, "chunk fetch failed; another peer will be asked");
                if errors >= cfg.max_errors {
                    tracing::warn!(
                        peer = source.name(),
                        "dropping peer from this transfer after {errors} failed calls"
                    );
                    st.dead[peer] = true;
                }
            }
        }
        st.settle(w);
        // A dead peer can no longer take windows queued for it.
        if st.dead[peer] {
            let stuck: Vec<usize> = st.retry.iter().copied().collect();
            st.retry.clear();
            for i in stuck {
                st.settle(i);
            }
        }
        drop(st);
        shared.arrived.notify_all();
        shared.room.notify_waiters();
    }
    let mut st = shared.state.locked();
    st.workers -= 1;
    if st.workers == 0 {
        // Nobody left: whatever is unfinished will not arrive.
        for w in &mut st.windows {
            if matches!(w.status, Status::Waiting | Status::Fetching) {
                w.status = Status::Failed;
            }
        }
    }
    drop(st);
    shared.arrived.notify_all();
    shared.room.notify_waiters();
}

impl ChunkSource for Fetcher {
    fn read_chunk(&self, chunk: &ChunkEntry) -> std::io::Result<Option<Bytes>> {
        let mut st = self.lock();
        let w = match st.window_of.get(&chunk.hash) {
            Some(&w) => w,
            None if st.workers == 0 => return Ok(None),
            None => {
                // Not in the diff's list (a local copy turned out stale):
                // fetch it on its own, first.
                let start = st.consumed;
                let n = self.names.len();
                st.windows.push(Window {
                    hashes: vec![*chunk],
                    got: vec![false],
                    start,
                    status: Status::Waiting,
                    tried: vec![false; n],
                });
                let w = st.windows.len() - 1;
                st.window_of.insert(chunk.hash, w);
                st.retry.push_front(w);
                w
            }
        };
        let start = st.windows[w].start;
        if start > st.consumed {
            st.consumed = start;
        }
        self.shared.room.notify_waiters();
        loop {
            if let Some(b) = st.ready.remove(&chunk.hash) {
                return Ok(Some(b));
            }
            // Failed, or Done and this chunk consumed already (a chunk used
            // twice is read back from the file it was written to).
            if matches!(st.windows[w].status, Status::Failed | Status::Done) {
                return Ok(None);
            }
            let (guard, timeout) = self
                .shared
                .arrived
                .wait_timeout(st, self.cfg.stall)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            st = guard;
            if timeout.timed_out() && !st.ready.contains_key(&chunk.hash) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no progress fetching chunk {} for {:?}",
                        chunk.hash, self.cfg.stall
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
