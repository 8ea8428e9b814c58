//! The fleet view: every peer this node knows, the record each one last
//! published (its directory versions and what its directories are doing),
//! and this node's own record. It is the one place records enter — from
//! a peer directly (`Exchange`) or relayed by gossip — and they are
//! validated here ([`crate::wire::check_record`], and under mutual TLS
//! every version's signature, [`signed`]). Replicas ask it for the newest version of a
//! directory and who holds it; `syncctl status`, `peers` and `fleet` read
//! it; [`gossip`] keeps it in step with the rest of the fleet.
//!
//! A record is keyed by (incarnation, seq): the owner's start time and a
//! counter it raises with each change, so a larger key always replaces a
//! smaller one wherever the record travels. Liveness is SWIM's call
//! ([`membership`]); records of members SWIM declared down stay out of the
//! digest and out of source choice, and are forgotten after [`DEAD_TTL`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prost::Message as _;
use sync_proto::pb;
use tokio::sync::Notify;

use crate::env::Env;
use crate::error::Refusal;
use crate::locks::LockExt as _;
use crate::metrics::Metrics;
use crate::topology::PeerClass;
use crate::transport::Transport;
use crate::wire;

use digest::{bucket_of, key_hash, record_hash};
pub use peers::{Holder, OwnDir, PeerState, Via};
pub use sources::DEMOTE_FOR;

pub mod controls;
mod digest;
pub mod gossip;
pub mod membership;
mod own;
pub mod peer;
mod peers;
pub mod signed;
mod sources;

pub use membership::{Ident, Liveness, Members, Swim};

/// A peer down this long is forgotten (its entry, record and channel), so
/// departed members do not accumulate.
pub const DEAD_TTL: Duration = Duration::from_secs(600);
/// Most peers this node keeps track of; members beyond are ignored until
/// others are forgotten.
pub const MAX_PEERS: usize = 10_000;
/// Most bytes of records kept in all (each is at most
/// [`wire::MAX_RECORD_BYTES`]); a new peer's record beyond is refused.
pub const MAX_VIEW_BYTES: usize = 128 << 20;
/// Digest buckets: a record's bucket is fixed by its node id.
pub const BUCKETS: usize = 64;
/// A peer SWIM has not reported yet (heard of only through `Exchange`,
/// e.g. just before a partition) counts as dead this long after it was
/// last heard from.
const UNCONFIRMED_FOR: Duration = Duration::from_secs(15);
/// Changes of rate and pending bytes alone enter this node's record at
/// most this often (they change every second during a transfer; versions
/// and states enter at once).
const SOFT_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Own {
    seq: u64,
    dirs: BTreeMap<String, OwnDir>,
    /// Changes of rate and pending bytes not yet in the record.
    soft: BTreeMap<String, OwnDir>,
    soft_at: tokio::time::Instant,
    record: Arc<pb::Holdings>,
    hash: u64,
}

#[derive(Debug)]
struct Table {
    /// By id, in order: what a seeded choice picks from is the same list
    /// in every run.
    peers: BTreeMap<String, PeerState>,
    /// Encoded bytes of every record in `peers`.
    bytes: usize,
    own: Own,
    /// Records to push to a few peers at once, with the peers to skip.
    pushes: Vec<(Arc<pb::Holdings>, Vec<String>)>,
    /// The highest version of each directory any record has shown (a
    /// record raising it is news, forwarded at once); at most
    /// [`MAX_SEEN_DIRS`] directories.
    seen: HashMap<String, u64>,
    /// The bucket digests as last computed, and when: recomputed after any
    /// change, and at least every second (an unconfirmed peer's liveness
    /// lapses with time alone).
    digests: Option<(tokio::time::Instant, [u64; BUCKETS])>,
    /// The nodes that may publish each directory this node carries, as
    /// its `dirs.d` file says (absent or empty: any node of the fleet).
    /// Versions of others stay in the view but are never the newest.
    publishers: HashMap<String, Vec<String>>,
    /// The newest fleet control of each directory and kind.
    controls: controls::Controls,
}

/// Most directories whose highest version is remembered for forwarding.
const MAX_SEEN_DIRS: usize = 1 << 16;

/// The fleet as this node sees it.
pub struct FleetView {
    pub id: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    /// This node's start (ms since the epoch): its records' incarnation
    /// and its SWIM identity's bump.
    pub incarnation: u64,
    bootstrap: Vec<String>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) env: Arc<Env>,
    pub(crate) metrics: Metrics,
    table: Mutex<Table>,
    /// Woken when a record changes (replicas look for newer versions).
    pub learned: Notify,
    /// Woken when there is something to push.
    pushed: Notify,
    pub swim: OnceLock<Swim>,
    /// Under mutual TLS: signing own versions, checking everyone's.
    signatures: OnceLock<signed::Signatures>,
    /// Peers seen polling this node's have-logs (receivers not yet known
    /// from their records).
    receivers: Mutex<sources::Receivers>,
}

impl std::fmt::Debug for FleetView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetView").field("id", &self.id).finish()
    }
}

impl FleetView {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        address: String,
        labels: BTreeMap<String, String>,
        incarnation: u64,
        bootstrap: Vec<String>,
        transport: Arc<dyn Transport>,
        env: Arc<Env>,
        metrics: Metrics,
    ) -> FleetView {
        let now = env.now();
        let mut view = FleetView {
            id,
            address,
            labels,
            incarnation,
            bootstrap,
            transport,
            env,
            metrics,
            table: Mutex::new(Table {
                peers: BTreeMap::new(),
                bytes: 0,
                own: Own {
                    seq: 1,
                    dirs: BTreeMap::new(),
                    soft: BTreeMap::new(),
                    soft_at: now,
                    record: Arc::new(pb::Holdings::default()),
                    hash: 0,
                },
                pushes: Vec::new(),
                seen: HashMap::new(),
                digests: None,
                publishers: HashMap::new(),
                controls: Default::default(),
            }),
            learned: Notify::new(),
            pushed: Notify::new(),
            swim: OnceLock::new(),
            signatures: OnceLock::new(),
            receivers: Mutex::default(),
        };
        let record = {
            let t = view.table.get_mut().expect("new");
            Arc::new(pb::Holdings {
                from: Some(pb::Member {
                    node_id: view.id.clone(),
                    address: view.address.clone(),
                    labels: view.labels.clone().into_iter().collect(),
                }),
                protocol: wire::PROTOCOL,
                incarnation: view.incarnation,
                seq: t.own.seq,
                ..Default::default()
            })
        };
        let own = &mut view.table.get_mut().expect("new").own;
        own.hash = record_hash(&record);
        own.record = record;
        view
    }

    /// This node's record as peers get it.
    pub fn own_record(&self) -> Arc<pb::Holdings> {
        self.table.locked().own.record.clone()
    }

    /// Records what one of this node's directories holds and does. A new
    /// version, state or error enters the record at once and is pushed
    /// to a few peers; rate and pending bytes alone at most every
    /// [`SOFT_EVERY`] (see [`FleetView::tick`]).
    pub fn set_dir(&self, dir: &str, mut d: OwnDir) {
        d.report.dir = dir.to_string();
        d.report.last_error = wire::truncate(&d.report.last_error, wire::MAX_REPORT_ERROR);
        if !d.report.rate.is_finite() || d.report.rate < 0.0 {
            d.report.rate = 0.0;
        }
        let mut t = self.table.locked();
        if let Some(v) = &d.held {
            let s = t.seen.entry(dir.to_string()).or_default();
            *s = (*s).max(v.version);
        }
        let hard = t.own.dirs.get(dir).is_none_or(|old| old.differs_hard(&d));
        if hard {
            t.own.soft.remove(dir);
            t.own.dirs.insert(dir.to_string(), d);
            self.bump_own(&mut t);
            let record = t.own.record.clone();
            t.pushes.push((record, Vec::new()));
            drop(t);
            self.pushed.notify_one();
        } else if t.own.dirs.get(dir) != Some(&d) {
            t.own.soft.insert(dir.to_string(), d);
        }
    }

    /// Whether this node holds version `root` of `dir` in full.
    pub fn own_holds(&self, dir: &str, root: &[u8]) -> bool {
        self.table
            .locked()
            .own
            .dirs
            .get(dir)
            .and_then(|d| d.held.as_ref())
            .is_some_and(|v| v.root == root)
    }

    /// A directory no longer carried leaves the record.
    pub fn remove_dir(&self, dir: &str) {
        let mut t = self.table.locked();
        t.own.soft.remove(dir);
        t.publishers.remove(dir);
        if t.own.dirs.remove(dir).is_some() {
            self.bump_own(&mut t);
        }
    }

    fn bump_own(&self, t: &mut Table) {
        t.own.seq += 1;
        t.own.soft_at = self.env.now();
        t.own.record = self.build_own(&t.own, &t.controls);
        t.own.hash = record_hash(&t.own.record);
        t.digests = None;
    }

    /// Once a second: soft changes enter the record when due.
    pub fn tick(&self) {
        let mut t = self.table.locked();
        if !t.own.soft.is_empty() && t.own.soft_at.elapsed() >= SOFT_EVERY {
            let soft = std::mem::take(&mut t.own.soft);
            t.own.dirs.extend(soft);
            self.bump_own(&mut t);
        }
    }

    /// Takes in a record, validated. Returns whether it changed what this
    /// node knows.
    pub fn learn(&self, h: pb::Holdings, via: Via<'_>) -> Result<bool, Refusal> {
        let peer = || match via {
            Via::Direct => h
                .from
                .as_ref()
                .map_or_else(String::new, |m| wire::short(&m.node_id)),
            Via::Relay(p) => p.to_string(),
        };
        wire::check_protocol(h.protocol).map_err(|reason| Refusal::Protocol {
            peer: peer(),
            reason,
        })?;
        let from = wire::check_record(&h).map_err(|reason| Refusal::Invalid {
            peer: peer(),
            reason,
        })?;
        let id = from.node_id.clone();
        if id == self.id {
            return Ok(false);
        }
        let Some(controls) = self.check_trust(&h, &id, &peer(), via)? else {
            return Ok(false);
        };
        let now = self.env.now();
        let size = h.encoded_len();
        let mut t = self.table.locked();
        if !controls.is_empty() && self.take_controls(&mut t, controls) {
            self.pushed.notify_one();
        }
        let new = !t.peers.contains_key(&id);
        if new && t.peers.len() >= MAX_PEERS {
            return Err(Refusal::Full(format!(
                "peer table full ({MAX_PEERS} peers)"
            )));
        }
        let old_size = t
            .peers
            .get(&id)
            .and_then(|p| p.record.as_ref())
            .map_or(0, |r| r.encoded_len());
        if t.bytes - old_size + size > MAX_VIEW_BYTES {
            return Err(Refusal::Full(format!(
                "fleet view full ({MAX_VIEW_BYTES} bytes of records)"
            )));
        }
        let address = from.address.clone();
        let labels: BTreeMap<String, String> = from.labels.clone().into_iter().collect();
        let p = t
            .peers
            .entry(id.clone())
            .or_insert_with(|| PeerState::new(address.clone(), now));
        let key = (h.incarnation, h.seq);
        // The owner's own word replaces an equal key too.
        let replace = match via {
            Via::Direct => key >= p.key(),
            Via::Relay(_) => key > p.key(),
        };
        if via == Via::Direct {
            p.heard = now;
        }
        if !replace {
            return Ok(false);
        }
        p.address = address.clone();
        p.labels = labels;
        let record = Arc::new(h);
        p.hash = key_hash(&id, record.incarnation, record.seq);
        p.bucket = bucket_of(&id);
        p.record = Some(record.clone());
        t.bytes = t.bytes - old_size + size;
        t.digests = None;
        // A record that brings a newer version than this node knew of
        // travels on at once (rumour-style), so a publish reaches the
        // fleet in a few hops instead of a few rounds.
        let mut brings_news = false;
        for v in &record.dirs {
            let room = t.seen.len() < MAX_SEEN_DIRS;
            match t.seen.get_mut(&v.dir) {
                Some(s) if *s >= v.version => {}
                Some(s) => {
                    *s = v.version;
                    brings_news = true;
                }
                None if room => {
                    t.seen.insert(v.dir.clone(), v.version);
                    brings_news = true;
                }
                None => {}
            }
        }
        if brings_news {
            let skip = match via {
                Via::Relay(p) => vec![p.to_string(), id.clone()],
                Via::Direct => vec![id.clone()],
            };
            t.pushes.push((record, skip));
        }
        drop(t);
        if brings_news {
            self.pushed.notify_one();
        }
        if new
            && via == Via::Direct
            && let Some(swim) = self.swim.get()
        {
            // Let SWIM probe it too, rather than wait for gossip to bring it.
            swim.announce(&address);
        }
        self.learned.notify_waiters();
        Ok(true)
    }

    fn newest_locked<'a>(&self, t: &'a Table, dir: &str) -> Option<&'a pb::DirVersion> {
        let own = t.own.record.dirs.iter().find(|v| v.dir == dir);
        let allowed = t.publishers.get(dir);
        t.peers
            .values()
            .filter(|p| p.trusted())
            .filter_map(|p| p.held(dir))
            .chain(own)
            .filter(|v| allowed.is_none_or(|a| a.contains(&v.publisher)))
            .max_by_key(|v| v.version)
    }

    /// The newest version of `dir` held anywhere this node can see (live
    /// peers and itself).
    pub fn newest(&self, dir: &str) -> Option<pb::DirVersion> {
        let t = self.table.locked();
        self.newest_locked(&t, dir).cloned()
    }

    /// The class of peer `id` as seen from here.
    pub fn class_of(&self, id: &str) -> PeerClass {
        match self.table.locked().peers.get(id) {
            Some(p) => PeerClass::of(&self.labels, &p.labels),
            None => PeerClass::Elsewhere,
        }
    }

    /// Accounts chunk bytes served to, or received from, peer `id`.
    pub fn add_traffic(&self, id: &str, sent: u64, received: u64) {
        if let Some(p) = self.table.locked().peers.get_mut(id) {
            p.bytes_sent += sent;
            p.bytes_received += received;
        }
    }

    /// Counts chunks from peer `id` that failed their checks.
    pub fn add_corrupt(&self, id: &str, chunks: u64) {
        if let Some(p) = self.table.locked().peers.get_mut(id) {
            p.corrupt_chunks += chunks;
        }
    }

    /// Every peer, as it is now (for the operator's views).
    pub fn peers(&self) -> Vec<(String, PeerState)> {
        let t = self.table.locked();
        t.peers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Live peers by id and address, `n` at random, none of `skip`.
    pub fn pick(&self, n: usize, skip: &[String]) -> Vec<(String, String)> {
        let t = self.table.locked();
        let live: Vec<(&String, &PeerState)> = t
            .peers
            .iter()
            .filter(|(id, p)| p.live() && !skip.contains(id))
            .collect();
        self.env
            .sample(live.len(), n)
            .into_iter()
            .map(|i| (live[i].0.clone(), live[i].1.address.clone()))
            .collect()
    }

    /// Bootstrap addresses no live SWIM member has: exchanged with
    /// directly each round, so a node is found before SWIM confirms it.
    pub fn unconfirmed_bootstrap(&self) -> Vec<String> {
        let t = self.table.locked();
        let confirmed: HashSet<&str> = t
            .peers
            .values()
            .filter(|p| p.swim && p.live())
            .map(|p| p.address.as_str())
            .collect();
        self.bootstrap
            .iter()
            .filter(|b| **b != self.address && !confirmed.contains(b.as_str()))
            .cloned()
            .collect()
    }

    /// Records queued for pushing.
    pub(crate) fn take_pushes(&self) -> Vec<(Arc<pb::Holdings>, Vec<String>)> {
        std::mem::take(&mut self.table.locked().pushes)
    }

    pub(crate) async fn push_wanted(&self) {
        self.pushed.notified().await
    }

    /// A gossip round trip to peer `id` took `took`.
    pub fn measured(&self, id: &str, took: Duration) {
        if let Some(p) = self.table.locked().peers.get_mut(id) {
            let ms = took.as_secs_f64() * 1000.0;
            p.rtt_ms = if p.rtt_ms == 0.0 {
                ms
            } else {
                0.8 * p.rtt_ms + 0.2 * ms
            };
        }
    }

    /// Forgets peers down for [`DEAD_TTL`], and channels to addresses no
    /// known peer or bootstrap entry has.
    pub fn forget_dead(&self) {
        let mut t = self.table.locked();
        let before = t.peers.len();
        let mut freed = 0;
        t.peers.retain(|id, p| {
            let keep = !p.expired();
            if !keep {
                freed += p.record.as_ref().map_or(0, |r| r.encoded_len());
                tracing::info!(peer = %id, address = %p.address, "forgetting a peer down for {}", humantime::format_duration(DEAD_TTL));
            }
            keep
        });
        t.bytes -= freed;
        if freed > 0 {
            t.digests = None;
        }
        if t.peers.len() == before
            && self.transport.known().len() <= t.peers.len() + self.bootstrap.len()
        {
            return;
        }
        let keep: HashSet<String> = t
            .peers
            .values()
            .map(|p| p.address.clone())
            .chain(self.bootstrap.iter().cloned())
            .collect();
        drop(t);
        self.transport.retain(&|a| keep.contains(a));
    }

    /// Peers by liveness: (alive, suspect, down).
    pub fn counts(&self) -> (u32, u32, u32) {
        let mut c = (0, 0, 0);
        for p in self.table.locked().peers.values() {
            match p.liveness() {
                Liveness::Alive => c.0 += 1,
                Liveness::Suspect => c.1 += 1,
                Liveness::Down => c.2 += 1,
            }
        }
        c
    }

    /// The highest version of `dir` any record this node has seen shows
    /// (its own included).
    pub fn seen(&self, dir: &str) -> u64 {
        self.table.locked().seen.get(dir).copied().unwrap_or(0)
    }

    /// A SWIM packet from a peer, counted and handed to SWIM.
    pub fn swim_packet(
        &self,
        caller: &crate::transport::Caller,
        data: bytes::Bytes,
    ) -> Result<(), Refusal> {
        // Under TLS: the sender is the caller's certificate, and what it
        // says of others stays within what they said themselves.
        let data = match caller.peer_id {
            Some(_) => self.check_swim(caller, data)?,
            None => data,
        };
        let m = &self.metrics;
        m.gossip_messages
            .with_label_values(&["swim", "received"])
            .inc();
        m.gossip_bytes
            .with_label_values(&["swim", "received"])
            .inc_by(data.len() as u64);
        if let Some(swim) = self.swim.get() {
            swim.packet(data).map_err(|reason| Refusal::Invalid {
                peer: "(a SWIM packet names no sender)".into(),
                reason: reason.into(),
            })?;
        }
        Ok(())
    }

    /// Bytes of records held (the fleet view's memory, less the map).
    pub fn view_bytes(&self) -> usize {
        self.table.locked().bytes
    }

    /// How many peers are tracked.
    pub fn len(&self) -> usize {
        self.table.locked().peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Members for FleetView {
    fn member(&self, id: &Ident, state: Liveness) {
        if id.node_id == self.id {
            return;
        }
        let m = pb::Member {
            node_id: id.node_id.clone(),
            address: id.address.clone(),
            labels: Default::default(),
        };
        if let Err(e) = wire::check_member(&m) {
            tracing::debug!(error = %e, "ignoring a SWIM member with a malformed identity");
            return;
        }
        // An address is the node that proved, with its certificate, to be
        // there: a member squatting on it is not taken.
        if let Some(holder) = self.squatting(&id.node_id, &id.address) {
            tracing::warn!(peer = %id.node_id, address = %id.address, certificate = %holder, "ignoring a SWIM member at an address where another node presented its certificate");
            return;
        }
        let now = self.env.now();
        let mut t = self.table.locked();
        if !t.peers.contains_key(&id.node_id) && t.peers.len() >= MAX_PEERS {
            tracing::warn!(peer = %id.node_id, "peer table full ({MAX_PEERS}); ignoring a new member");
            return;
        }
        let p = t
            .peers
            .entry(id.node_id.clone())
            .or_insert_with(|| PeerState::new(id.address.clone(), now));
        p.address = id.address.clone();
        if state == Liveness::Down && p.down_since.is_none() {
            p.down_since = Some(now);
        } else if state != Liveness::Down {
            p.down_since = None;
        }
        p.state = state;
        p.swim = true;
        t.digests = None;
        drop(t);
        if state != Liveness::Down {
            self.learned.notify_waiters();
        }
    }

    fn sending(&self, bytes: usize) {
        self.metrics
            .gossip_messages
            .with_label_values(&["swim", "sent"])
            .inc();
        self.metrics
            .gossip_bytes
            .with_label_values(&["swim", "sent"])
            .inc_by(bytes as u64);
    }
}

#[cfg(test)]
mod tests;
