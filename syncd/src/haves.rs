//! What this node can give other receivers of a version while it receives
//! that version itself, and what it has already uploaded as a full holder.
//!
//! - [`HaveLog`]: one per transfer in progress. Every chunk the transfer
//!   receives is appended (its index in the log is what `Haves` deltas
//!   count), and its bytes are kept for serving until `MEM_BYTES` of newer
//!   chunks push them out (by then the materializer has written them, and
//!   they are served from the file like any other in-flight chunk).
//! - [`Served`]: origin protection. A full holder remembers which chunks
//!   of a version it sent to which receiver in the last [`SERVED_TTL`];
//!   another receiver asking for one of them (without insisting) is told
//!   it was declined, so it takes that chunk from the receiver that got
//!   it and the holder uploads about one copy of new content.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use chunk_store::Hash;

use crate::locks::LockExt as _;

/// Most hashes in one `Haves` answer (PROTOCOL.md).
pub const MAX_HAVES_PER_REPLY: usize = 8192;
/// Longest a `Haves` long poll is held.
pub const MAX_HAVES_WAIT: Duration = Duration::from_secs(2);
/// Received chunk bytes a transfer keeps in memory for serving.
const MEM_BYTES: usize = 64 << 20;
/// How long a chunk sent to one receiver is declined to others.
/// The default spread window (see [`Served`]).
pub const SERVED_TTL: Duration = Duration::from_secs(3);
/// Chunks remembered as served, per directory (≈ 64 B each).
const MAX_SERVED: usize = 1 << 18;

/// The chunks one transfer has received, in arrival order.
#[derive(Debug)]
pub struct HaveLog {
    pub root: Hash,
    inner: Mutex<Inner>,
    /// The log's length, for long polls.
    len: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    order: Vec<Hash>,
    mem: HashMap<Hash, Bytes>,
    fifo: VecDeque<Hash>,
    mem_bytes: usize,
}

impl HaveLog {
    pub fn new(root: Hash) -> HaveLog {
        HaveLog {
            root,
            inner: Mutex::new(Inner::default()),
            len: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Chunks this transfer just received (verified).
    pub fn add(&self, chunks: &[(Hash, Bytes)]) {
        let mut g = self.inner.locked();
        let inner = &mut *g;
        for (h, b) in chunks {
            if inner.mem.insert(*h, b.clone()).is_some() {
                continue;
            }
            inner.order.push(*h);
            inner.fifo.push_back(*h);
            inner.mem_bytes += b.len();
            while inner.mem_bytes > MEM_BYTES
                && let Some(old) = inner.fifo.pop_front()
            {
                if let Some(b) = inner.mem.remove(&old) {
                    inner.mem_bytes -= b.len();
                }
            }
        }
        let n = inner.order.len() as u64;
        drop(g);
        self.len.send_replace(n);
    }

    /// A received chunk's bytes, while they are still kept.
    pub fn chunk(&self, h: &Hash) -> Option<Bytes> {
        self.inner.locked().mem.get(h).cloned()
    }

    /// Chunks received since position `since` (at most
    /// [`MAX_HAVES_PER_REPLY`]), and the position to go on from.
    pub fn since(&self, since: u64) -> (Vec<Hash>, u64) {
        let g = self.inner.locked();
        let from = (since as usize).min(g.order.len());
        let to = g.order.len().min(from + MAX_HAVES_PER_REPLY);
        (g.order[from..to].to_vec(), to as u64)
    }

    /// Waits until the log is longer than `since`, or `timeout`.
    pub async fn wait_beyond(&self, since: u64, timeout: Duration) {
        let mut rx = self.len.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|n| *n > since)).await;
    }
}

/// Chunks a full holder sent recently, per directory and version.
#[derive(Debug)]
pub struct Served {
    dirs: Mutex<HashMap<String, ServedDir>>,
    /// How long a chunk sent to one receiver is left out for others
    /// (`[serve] spread_window`; zero: never).
    ttl: Duration,
}

impl Default for Served {
    fn default() -> Self {
        Served::new(SERVED_TTL)
    }
}

#[derive(Debug)]
struct ServedDir {
    root: Hash,
    sent: HashMap<Hash, (String, tokio::time::Instant)>,
}

impl Served {
    pub fn new(ttl: Duration) -> Served {
        Served {
            dirs: Mutex::default(),
            ttl,
        }
    }

    /// Of `hashes` (of version `root` of `dir`), those to leave out for
    /// `requester` because another receiver got them in the last
    /// spread window; the others count as sent to `requester` now.
    pub fn decline(&self, dir: &str, root: Hash, requester: &str, hashes: &[Hash]) -> Vec<bool> {
        if self.ttl.is_zero() {
            return vec![false; hashes.len()];
        }
        let ttl = self.ttl;
        let now = tokio::time::Instant::now();
        let mut dirs = self.dirs.locked();
        let d = dirs.entry(dir.to_string()).or_insert_with(|| ServedDir {
            root,
            sent: HashMap::new(),
        });
        if d.root != root {
            d.root = root;
            d.sent.clear();
        }
        if d.sent.len() + hashes.len() > MAX_SERVED {
            d.sent.retain(|_, (_, at)| now.duration_since(*at) < ttl);
            if d.sent.len() + hashes.len() > MAX_SERVED {
                d.sent.clear();
            }
        }
        hashes
            .iter()
            .map(|h| match d.sent.get(h) {
                Some((to, at)) if to != requester && now.duration_since(*at) < ttl => true,
                _ => {
                    d.sent.insert(*h, (requester.to_string(), now));
                    false
                }
            })
            .collect()
    }

    /// Forgets a directory (no longer carried).
    pub fn forget(&self, dir: &str) {
        self.dirs.locked().remove(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> Hash {
        Hash::of(&[i])
    }

    #[tokio::test(start_paused = true)]
    async fn a_log_gives_deltas_and_wakes_a_long_poll() {
        let log = std::sync::Arc::new(HaveLog::new(h(0)));
        assert_eq!(log.since(0), (vec![], 0));
        let l2 = log.clone();
        let poll = tokio::spawn(async move {
            l2.wait_beyond(0, MAX_HAVES_WAIT).await;
            l2.since(0)
        });
        tokio::task::yield_now().await;
        log.add(&[
            (h(1), Bytes::from_static(b"a")),
            (h(2), Bytes::from_static(b"b")),
        ]);
        assert_eq!(poll.await.unwrap(), (vec![h(1), h(2)], 2));
        // The same chunk twice is one entry.
        log.add(&[
            (h(2), Bytes::from_static(b"b")),
            (h(3), Bytes::from_static(b"c")),
        ]);
        assert_eq!(log.since(2), (vec![h(3)], 3));
        assert_eq!(log.chunk(&h(3)).as_deref(), Some(&b"c"[..]));
        // Nothing new: the poll returns after its timeout, empty.
        let started = tokio::time::Instant::now();
        log.wait_beyond(3, Duration::from_secs(1)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(log.since(3), (vec![], 3));
    }

    #[test]
    fn kept_bytes_are_bounded() {
        let log = HaveLog::new(h(0));
        let big = Bytes::from(vec![0u8; 1 << 20]);
        for i in 0..100u32 {
            log.add(&[(Hash::of(&i.to_le_bytes()), big.clone())]);
        }
        let kept = (0..100u32)
            .filter(|i| log.chunk(&Hash::of(&i.to_le_bytes())).is_some())
            .count();
        assert_eq!(kept, 64, "64 MiB of the newest chunks stay");
        assert!(log.chunk(&Hash::of(&99u32.to_le_bytes())).is_some());
        assert_eq!(log.since(0).0.len(), 100, "the have-set keeps them all");
    }

    #[tokio::test(start_paused = true)]
    async fn a_chunk_sent_to_one_receiver_is_declined_to_another_for_a_while() {
        let s = Served::default();
        let (a, b) = (h(1), h(2));
        assert_eq!(s.decline("www", h(0), "r1", &[a]), vec![false]);
        assert_eq!(s.decline("www", h(0), "r2", &[a, b]), vec![true, false]);
        // The same receiver asking again is served (it lost it).
        assert_eq!(s.decline("www", h(0), "r1", &[a]), vec![false]);
        tokio::time::advance(SERVED_TTL).await;
        assert_eq!(s.decline("www", h(0), "r2", &[a]), vec![false]);
        // A new version starts afresh.
        assert_eq!(s.decline("www", h(9), "r3", &[a]), vec![false]);
    }

    /// `[serve] spread_window` sets the window; zero turns it off.
    #[tokio::test(start_paused = true)]
    async fn the_spread_window_is_configurable() {
        let a = h(1);
        let short = Served::new(Duration::from_millis(500));
        assert_eq!(short.decline("www", h(0), "r1", &[a]), vec![false]);
        tokio::time::advance(Duration::from_millis(499)).await;
        assert_eq!(short.decline("www", h(0), "r2", &[a]), vec![true]);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(short.decline("www", h(0), "r2", &[a]), vec![false]);
        let off = Served::new(Duration::ZERO);
        assert_eq!(off.decline("www", h(0), "r1", &[a]), vec![false]);
        assert_eq!(off.decline("www", h(0), "r2", &[a]), vec![false]);
    }
}
