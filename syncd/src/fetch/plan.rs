//! The swarm scheduler's state for one transfer, without I/O: which chunks
//! are wanted, which peer has which, what is asked of whom, and what to
//! ask next of a peer that has room.
//!
//! - **Who has what.** A peer is either a full holder (it can be asked for
//!   anything) or *tracked*: a receiver of the same version whose have-set
//!   arrives as deltas (`announce`); it is asked only for what it said it
//!   holds.
//! - **Front stripe, then rarest first.** Among the chunks a peer can
//!   give, inside the read-ahead window, those in the window's front
//!   quarter go first; within it, those the fewest tracked peers hold;
//!   ties are broken at random (seeded), so receivers fetch different
//!   chunks and have something to trade. From a full holder, a receiver
//!   takes its rack share (see below) of a stripe before the rest.
//! - **Origin protection.** A full holder is asked only for chunks no
//!   tracked peer holds. When it leaves one out (it served that chunk to
//!   another receiver a moment ago and expects it to spread), the chunk
//!   waits for a receiver to announce it, and is asked of a full holder
//!   again, insisting, only after `insist_after`.
//! - **Endgame.** When little is left to arrive, a chunk already asked of
//!   one peer may be asked of a second, and the first answer wins.
//! - **Nearest first for small transfers.** The k-th ranked live full
//!   holder starts new work only while more than k batches are open.
//! - **Re-planning.** A failed call re-opens its chunks; a peer failing
//!   `max_errors` calls in a row, or leaving, is dropped and what only it
//!   could give is asked of others.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chunk_store::Hash;
use chunk_store::manifest::ChunkEntry;
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use tokio::time::Instant;

pub type PeerId = usize;

/// The read-ahead window is taken in this many stripes, front first: the
/// swarm fills the part the materializer reaches next before the rest, so
/// the window keeps moving and the origin always has new chunks to send.
/// (Rarest first over the whole window had the origin send the window's
/// 64 MiB in random order; its front then completed last, the window
/// stood still, and the origin idled for a second at 25 MB/s.)
const STRIPES: u64 = 4;
/// Topology tiers: the same rack, zone, region, elsewhere.
const TIERS: usize = 4;

/// Which of `r` rack-mates fetches a chunk from farther away.
fn share_of(h: &Hash, r: u64) -> u64 {
    let b = h.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) % r
}

/// Tuning of a transfer's plan.
#[derive(Clone, Copy, Debug)]
pub struct PlanConfig {
    /// Most bytes and chunks asked of a peer in one call.
    pub batch_bytes: u64,
    pub batch_chunks: usize,
    /// How far ahead of the materializer chunks may be fetched.
    pub ahead_bytes: u64,
    /// Calls in flight per peer.
    pub per_peer: usize,
    /// A peer whose calls fail this many times in a row is dropped.
    pub max_errors: u32,
    /// With at most this many bytes left to arrive, a chunk asked of one
    /// peer at least `endgame_after` ago may be asked of a second.
    pub endgame_bytes: u64,
    pub endgame_after: Duration,
    /// A chunk a full holder left out is asked of a full holder again,
    /// insisting, after this.
    pub insist_after: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// Asked of these peers (two at most, in the endgame), first at the
    /// instant given.
    Asked(Vec<PeerId>, Instant),
    Ready,
    Consumed,
}

#[derive(Debug)]
struct Want {
    entry: ChunkEntry,
    /// Byte offset in the materializer's order.
    start: u64,
    state: State,
    /// Tracked peers that announced it, by tier (nearest first).
    by_tier: [u32; TIERS],
    /// Peers that were asked and did not have it.
    tried: Vec<PeerId>,
    /// When a full holder last left it out.
    declined: Option<Instant>,
}

impl Want {
    /// Tracked peers that announced it.
    fn holders(&self) -> u32 {
        self.by_tier.iter().sum()
    }

    /// The tier of the nearest tracked peer that announced it.
    fn nearest(&self) -> Option<u8> {
        self.by_tier.iter().position(|&n| n > 0).map(|t| t as u8)
    }

    /// `peer` no longer has an outstanding ask for this chunk; with nobody
    /// left asking, the chunk is open again.
    fn unask(&mut self, peer: PeerId) {
        if let State::Asked(by, _) = &mut self.state {
            by.retain(|&q| q != peer);
            if by.is_empty() {
                self.state = State::Open;
            }
        }
    }
}

#[derive(Debug)]
enum Have {
    All,
    /// Indices of the chunks announced (once it holds the whole version
    /// it becomes `All`).
    Tracked(HashSet<usize>),
}

#[derive(Debug)]
struct Peer {
    have: Have,
    /// How far it is: 0 the same rack, then zone, region, elsewhere.
    tier: u8,
    asked: usize,
    dead: bool,
    errors: u32,
}

/// What to ask one peer for.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch {
    pub chunks: Vec<ChunkEntry>,
    /// Ask a full holder not to leave chunks out (they waited long enough
    /// for a receiver to have them).
    pub insist: bool,
}

/// What `take` says to a peer's worker.
#[derive(Debug, PartialEq, Eq)]
pub enum Take {
    Fetch(Batch),
    /// Nothing for it now; wait for a change.
    Wait,
    /// The peer is dropped from this transfer.
    Done,
}

/// The plan of one transfer.
#[derive(Debug)]
pub struct Plan {
    cfg: PlanConfig,
    wants: Vec<Want>,
    index: HashMap<Hash, usize>,
    peers: Vec<Peer>,
    /// Offset the materializer reads at.
    consumed: u64,
    /// Wants before this are all consumed.
    first: usize,
    /// Bytes not yet arrived.
    remaining: u64,
    /// The chunk the materializer waits for now: a full holder that left
    /// it out is asked for it again, insisting, after a quarter of
    /// `insist_after`.
    waiting: Option<usize>,
    /// This node's share of what its rack fetches from farther away: `(k,
    /// r)`, the k-th of r receivers of the version in the rack (see
    /// [`Plan::set_rack_share`]).
    share: Option<(u64, u64)>,
    rng: StdRng,
}

impl Plan {
    /// A plan for `order` (the chunks the materializer will read, in its
    /// order), with no peers yet.
    pub fn new(order: &[ChunkEntry], cfg: PlanConfig, seed: u64) -> Plan {
        let mut plan = Plan {
            cfg,
            wants: Vec::with_capacity(order.len()),
            index: HashMap::with_capacity(order.len()),
            peers: Vec::new(),
            consumed: 0,
            first: 0,
            remaining: 0,
            waiting: None,
            share: None,
            rng: StdRng::seed_from_u64(seed),
        };
        let mut offset = 0;
        for c in order {
            if plan.index.contains_key(&c.hash) {
                continue;
            }
            plan.push(*c, offset);
            offset += u64::from(c.len);
        }
        plan
    }

    fn push(&mut self, entry: ChunkEntry, start: u64) -> usize {
        let i = self.wants.len();
        self.index.insert(entry.hash, i);
        self.remaining += u64::from(entry.len);
        self.wants.push(Want {
            entry,
            start,
            state: State::Open,
            by_tier: [0; TIERS],
            tried: Vec::new(),
            declined: None,
        });
        i
    }

    /// This node is the `k`-th of `r` receivers of the version in its rack
    /// (by id, as every one of them counts): from peers farther away it
    /// fetches only chunks whose hash falls to it, and the rest from its
    /// rack once one of them has it — so a chunk crosses into the rack
    /// about once. The chunk the materializer waits for and the endgame are
    /// exempt: a rack-mate that died or sees the rack differently delays a
    /// chunk, never stalls it.
    pub fn set_rack_share(&mut self, k: u64, r: u64) {
        self.share = (r > 1 && k < r).then_some((k, r));
    }

    /// A peer that holds the whole version (`full`) or announces what it
    /// holds, in the same rack. Peers are ranked in the order they are
    /// added.
    pub fn add_peer(&mut self, full: bool) -> PeerId {
        self.add_peer_at(full, 0)
    }

    /// A peer at `tier` (0 the same rack, 1 zone, 2 region, 3 elsewhere;
    /// larger values count as 3).
    pub fn add_peer_at(&mut self, full: bool, tier: u8) -> PeerId {
        self.peers.push(Peer {
            have: if full {
                Have::All
            } else {
                Have::Tracked(HashSet::new())
            },
            tier: tier.min(TIERS as u8 - 1),
            asked: 0,
            dead: false,
            errors: 0,
        });
        self.peers.len() - 1
    }

    /// A tracked peer announced chunks; hashes not in this transfer are
    /// ignored (a peer cannot make us keep anything we did not plan).
    /// Returns whether any was new.
    pub fn announce(&mut self, peer: PeerId, hashes: &[Hash]) -> bool {
        // A dropped peer's have-set no longer counts (its follower may
        // still be reading it): it is never asked, so it must spare nobody.
        if self.peers[peer].dead {
            return false;
        }
        let tier = usize::from(self.peers[peer].tier);
        let Have::Tracked(set) = &mut self.peers[peer].have else {
            return false;
        };
        let mut new = false;
        for h in hashes {
            if let Some(&i) = self.index.get(h)
                && set.insert(i)
            {
                self.wants[i].by_tier[tier] += 1;
                new = true;
            }
        }
        new
    }

    /// A tracked peer now holds the whole version.
    pub fn complete(&mut self, peer: PeerId) {
        if self.peers[peer].dead {
            return;
        }
        let tier = usize::from(self.peers[peer].tier);
        if let Have::Tracked(set) = std::mem::replace(&mut self.peers[peer].have, Have::All) {
            for i in set {
                self.wants[i].by_tier[tier] -= 1;
            }
        }
    }

    /// Drops a peer from this transfer (it left, or stopped answering).
    pub fn drop_peer(&mut self, peer: PeerId) {
        let p = &mut self.peers[peer];
        if p.dead {
            return;
        }
        p.dead = true;
        let tier = usize::from(p.tier);
        if let Have::Tracked(set) = std::mem::replace(&mut p.have, Have::Tracked(HashSet::new())) {
            for i in set {
                self.wants[i].by_tier[tier] -= 1;
            }
        }
        for w in &mut self.wants[self.first..] {
            w.unask(peer);
        }
    }

    pub fn is_dead(&self, peer: PeerId) -> bool {
        self.peers[peer].dead
    }

    fn has(&self, peer: PeerId, i: usize) -> bool {
        match &self.peers[peer].have {
            Have::All => true,
            Have::Tracked(set) => set.contains(&i),
        }
    }

    /// What `peer` should be asked for next.
    pub fn take(&mut self, peer: PeerId, now: Instant) -> Take {
        let cfg = self.cfg;
        let p = &self.peers[peer];
        if p.dead {
            return Take::Done;
        }
        if p.asked >= cfg.per_peer.max(1) {
            return Take::Wait;
        }
        let full = matches!(p.have, Have::All);
        let tier = p.tier;
        let window_end = self.consumed.saturating_add(cfg.ahead_bytes);
        let endgame = self.remaining <= cfg.endgame_bytes;
        // (rank key, index): open before asked, the window's front stripe
        // first, this node's share first, rarest first, random ties.
        let mut candidates: Vec<(u32, u64, u32, u32, u64, usize)> = Vec::new();
        let stripe_bytes = (cfg.ahead_bytes / STRIPES).max(1);
        let stripe = |start: u64| start.saturating_sub(self.consumed) / stripe_bytes;
        // Nearest first: a lower-ranked peer starts new work only while
        // there is more open than the better-ranked live peers take.
        // Among full holders only (a receiver is asked for what it has
        // whatever its rank), for chunks a better-ranked one may still give,
        // and second asks in the endgame are not new work.
        let better: Vec<PeerId> = (0..peer)
            .filter(|&q| !self.peers[q].dead && matches!(self.peers[q].have, Have::All))
            .collect();
        let need_open = better.len() as u64 * cfg.batch_bytes;
        let mut open_bytes = 0u64;
        // What a batch can surely take so far, and the stripe being looked
        // at: once a stripe is passed with a batch's worth in hand, later
        // stripes cannot come first (this scan ran for every idle worker
        // at every arrival; it was the daemon's busiest function).
        let (mut usable_bytes, mut usable_chunks, mut at_stripe) = (0u64, 0usize, 0u64);
        for i in self.first..self.wants.len() {
            let w = &self.wants[i];
            if w.start > window_end {
                // Wants are in the materializer's order.
                break;
            }
            let here = stripe(w.start);
            if here != at_stripe {
                at_stripe = here;
                let enough = usable_bytes >= cfg.batch_bytes || usable_chunks >= cfg.batch_chunks;
                if enough && (!full || open_bytes > need_open) {
                    break;
                }
            }
            if matches!(w.state, State::Ready | State::Consumed) {
                continue;
            }
            if w.state == State::Open {
                open_bytes += u64::from(w.entry.len);
            }
            if w.tried.contains(&peer) || !self.has(peer, i) {
                continue;
            }
            match &w.state {
                State::Open => {
                    // The chunk the materializer waits for is asked again
                    // sooner, not at once: the receiver the full holder
                    // sent it to announces it within a round trip or two.
                    let insisting = w.declined.is_some_and(|t| {
                        let after = if self.waiting == Some(i) {
                            cfg.insist_after / 4
                        } else {
                            cfg.insist_after
                        };
                        now.duration_since(t) >= after
                    });
                    if full && w.declined.is_some() && !insisting {
                        continue;
                    }
                    // A full holder is spared what a receiver as near can
                    // give, in the endgame too (every receiver's last chunks
                    // would otherwise be asked of the origin: a fifth of a
                    // copy more at N = 8; a slow receiver's call is doubled
                    // there instead). A receiver is spared what a nearer
                    // receiver announced: a chunk crosses a rack boundary
                    // about once, then spreads inside the rack. The nearest
                    // receivers that announced a chunk are never spared it
                    // (a receiver that lacked it, or was dropped, no longer
                    // counts), so every announced chunk has someone to ask.
                    let spared = w
                        .nearest()
                        .is_some_and(|t| if full { t <= tier } else { t < tier });
                    let others = self
                        .share
                        .is_some_and(|(k, r)| share_of(&w.entry.hash, r) != k);
                    // Another rack-mate's share, fetched across by it.
                    let theirs = tier > 0 && !endgame && self.waiting != Some(i) && others;
                    let spared = spared || theirs;
                    if !spared {
                        usable_bytes += u64::from(w.entry.len);
                        usable_chunks += 1;
                    }
                    // From a near full holder, this node's share first:
                    // rack-mates then seldom ask the origin for the same
                    // chunk at once (it would leave the second ask out).
                    let later = u32::from(full && others);
                    candidates.push((
                        u32::from(spared),
                        here,
                        later,
                        w.holders(),
                        self.rng.random(),
                        i,
                    ));
                }
                State::Asked(by, since)
                    if endgame
                        && by.len() < 2
                        && !by.contains(&peer)
                        && now.duration_since(*since) >= cfg.endgame_after =>
                {
                    candidates.push((2, here, 0, w.holders(), self.rng.random(), i));
                }
                _ => {}
            }
        }
        if candidates.is_empty() {
            // Work may come yet: a receiver announces more, the
            // materializer moves the window or asks for a chunk outside
            // the plan.
            return Take::Wait;
        }
        let may_start = !full || open_bytes > need_open;
        candidates.sort_unstable();
        let mut batch = Batch {
            chunks: Vec::new(),
            insist: false,
        };
        let mut bytes = 0u64;
        for &(class, _, _, _, _, i) in &candidates {
            let reserved = || better.iter().any(|q| !self.wants[i].tried.contains(q));
            if class == 1 || (class == 0 && !may_start && reserved()) {
                // A receiver has it and will serve it; or a nearer peer
                // will take it.
                continue;
            }
            let len = u64::from(self.wants[i].entry.len);
            if !batch.chunks.is_empty()
                && (bytes + len > cfg.batch_bytes || batch.chunks.len() >= cfg.batch_chunks)
            {
                break;
            }
            let w = &mut self.wants[i];
            batch.insist |= full && w.declined.is_some();
            match &mut w.state {
                State::Asked(by, _) => by.push(peer),
                s => *s = State::Asked(vec![peer], now),
            }
            bytes += len;
            batch.chunks.push(w.entry);
        }
        if batch.chunks.is_empty() {
            return Take::Wait;
        }
        self.peers[peer].asked += 1;
        Take::Fetch(batch)
    }

    /// `peer` answered a batch: `got` says, per chunk of the batch, whether
    /// it arrived (verified), `declined` whether the peer left it out to
    /// protect its upload. Returns the chunks that are new (the caller
    /// keeps their bytes); a chunk a second peer also delivered is not.
    pub fn answered(
        &mut self,
        peer: PeerId,
        batch: &Batch,
        got: &dyn Fn(&Hash) -> bool,
        declined: &dyn Fn(&Hash) -> bool,
        now: Instant,
    ) -> Vec<Hash> {
        let full = matches!(self.peers[peer].have, Have::All);
        let p = &mut self.peers[peer];
        p.asked = p.asked.saturating_sub(1);
        p.errors = 0;
        let mut new = Vec::new();
        for c in &batch.chunks {
            let Some(&i) = self.index.get(&c.hash) else {
                continue;
            };
            let w = &mut self.wants[i];
            if got(&c.hash) {
                if matches!(w.state, State::Open | State::Asked(..)) {
                    w.state = State::Ready;
                    self.remaining -= u64::from(w.entry.len);
                    new.push(c.hash);
                }
                continue;
            }
            w.unask(peer);
            if full && declined(&c.hash) {
                // Left out to protect its upload: wait for a receiver.
                w.declined = Some(now);
            } else {
                w.tried.push(peer);
                let tier = usize::from(self.peers[peer].tier);
                if let Have::Tracked(set) = &mut self.peers[peer].have
                    && set.remove(&i)
                {
                    w.by_tier[tier] -= 1;
                }
            }
        }
        new
    }

    /// `peer`'s call for `batch` failed; returns whether the peer is
    /// dropped for it.
    pub fn failed(&mut self, peer: PeerId, batch: &Batch) -> bool {
        let p = &mut self.peers[peer];
        p.asked = p.asked.saturating_sub(1);
        p.errors += 1;
        let drop = p.errors >= self.cfg.max_errors;
        for c in &batch.chunks {
            if let Some(&i) = self.index.get(&c.hash) {
                self.wants[i].unask(peer);
            }
        }
        if drop {
            self.drop_peer(peer);
        }
        drop
    }

    /// A busy peer's call: hand the batch back untried.
    pub fn busy(&mut self, peer: PeerId, batch: &Batch) {
        let p = &mut self.peers[peer];
        p.asked = p.asked.saturating_sub(1);
        for c in &batch.chunks {
            if let Some(&i) = self.index.get(&c.hash) {
                self.wants[i].unask(peer);
            }
        }
    }

    /// The materializer reads `hash` now: the window moves to it. A chunk
    /// outside the plan (a local copy turned out stale) is added, first in
    /// line. Returns its index.
    pub fn reading(&mut self, entry: &ChunkEntry) -> usize {
        let i = match self.index.get(&entry.hash) {
            Some(&i) => i,
            None => {
                let start = self.consumed;
                self.push(*entry, start)
            }
        };
        self.consumed = self.consumed.max(self.wants[i].start);
        self.waiting = Some(i);
        i
    }

    /// The materializer took chunk `i`.
    pub fn consumed(&mut self, i: usize) {
        self.wants[i].state = State::Consumed;
        if self.waiting == Some(i) {
            self.waiting = None;
        }
        while self.first < self.wants.len() && self.wants[self.first].state == State::Consumed {
            self.first += 1;
        }
    }

    pub fn is_ready(&self, i: usize) -> bool {
        self.wants[i].state == State::Ready
    }

    pub fn is_consumed(&self, i: usize) -> bool {
        self.wants[i].state == State::Consumed
    }

    /// Whether chunk `i` can no longer arrive: every live full holder was
    /// asked and lacked it, and no live receiver announced it (a receiver
    /// gets its chunks from the same full holders, so it will not get this
    /// one either).
    pub fn unavailable(&self, i: usize) -> bool {
        let w = &self.wants[i];
        if matches!(w.state, State::Ready | State::Consumed | State::Asked(..)) {
            return false;
        }
        self.peers.iter().enumerate().all(|(q, p)| {
            p.dead
                || w.tried.contains(&q)
                || matches!(&p.have, Have::Tracked(set) if !set.contains(&i))
        })
    }

    /// Bytes not yet arrived.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Live peers, and how many of them are full holders.
    pub fn live_peers(&self) -> (usize, usize) {
        let live = self.peers.iter().filter(|p| !p.dead);
        let full = live.clone().filter(|p| matches!(p.have, Have::All)).count();
        (live.count(), full)
    }
}

#[cfg(test)]
mod tests;
