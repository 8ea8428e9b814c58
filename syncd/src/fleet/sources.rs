//! Where a transfer's sources come from: the peers holding or receiving
//! a version, nearest first (topology tier, then measured round trip).
//!
//! Receivers are also learnt first-hand: a peer polling this node's
//! have-log for a version is receiving that version, whether or not its
//! record saying so has arrived by gossip yet.
//!
//! Measured without this (2,000 files at N = 4): a receiver that started
//! its transfer a moment before the others learnt of them a gossip round
//! later, about a second, and fetched only from the origin meanwhile while
//! they fetched from it; it finished 0.5–0.7 s after them.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use sync_proto::pb;

use super::{FleetView, Holder, PeerState};
use crate::locks::LockExt as _;
use crate::topology::PeerClass;

/// How long a peer that withheld or corrupted a version it listed is
/// passed over ([`FleetView::demote`]).
pub const DEMOTE_FOR: Duration = Duration::from_secs(600);

impl FleetView {
    /// Demotes holder `id` for not serving the manifest of `v` — if its
    /// record still lists `v` as held: one that moved on to a newer
    /// version (and collected the old one's nodes) did not lie.
    pub fn demote_holder(&self, id: &str, v: &pb::DirVersion, why: &str) {
        let still = self.table.locked().peers.get(id).is_some_and(|p| {
            p.held(&v.dir)
                .is_some_and(|h| h.version == v.version && h.root == v.root)
        });
        if still {
            self.demote(id, "manifest", why);
        } else {
            tracing::debug!(peer = %id, "not demoting a holder that moved on: {why}");
        }
    }

    /// Ignores peer `id`'s claims of versions for [`DEMOTE_FOR`]: it listed
    /// a version and withheld or corrupted it. It stays a member (SWIM,
    /// gossip); it is no source and no evidence of a newer version
    /// meanwhile.
    pub fn demote(&self, id: &str, kind: &str, why: &str) {
        let until = self.env.now() + DEMOTE_FOR;
        if let Some(p) = self.table.locked().peers.get_mut(id) {
            tracing::warn!(peer = %id, ignored_for = %humantime::format_duration(DEMOTE_FOR), "demoting a peer: its claims of versions are ignored for a while: {why}");
            p.demoted = Some((until, why.to_string()));
            self.metrics.peer_demotions.with_label_values(&[kind]).inc();
        }
    }

    /// Live peers holding `v` (then those receiving it), nearest first —
    /// by topology tier, then by measured gossip round trip in bands of a
    /// factor of two (unmeasured peers last in their tier) — and
    /// otherwise in random order, so a fleet does not pile onto one peer.
    /// Labels and round trips order the sources; none is left out.
    pub fn holders(&self, v: &pb::DirVersion) -> Vec<Holder> {
        let same = |x: Option<&pb::DirVersion>| {
            x.is_some_and(|x| x.version == v.version && x.root == v.root)
        };
        let t = self.table.locked();
        let holder = |id: &String, p: &PeerState, partial| {
            let h = Holder {
                id: id.clone(),
                address: p.address.clone(),
                class: PeerClass::of(&self.labels, &p.labels),
                partial,
            };
            (h, rtt_band(p.rtt_ms))
        };
        let mut out: Vec<(Holder, u8)> = t
            .peers
            .iter()
            .filter(|(_, p)| p.trusted())
            .filter_map(|(id, p)| {
                let partial = if same(p.held(&v.dir)) {
                    false
                } else if same(p.pulling(&v.dir)) {
                    true
                } else {
                    return None;
                };
                Some(holder(id, p, partial))
            })
            .collect();
        // Receivers seen first-hand whose records have not come yet.
        for id in self.receivers.locked().of(&v.dir, &v.root) {
            if out.iter().any(|(h, _)| &h.id == id) {
                continue;
            }
            if let Some(p) = t.peers.get(id).filter(|p| p.live()) {
                out.push(holder(id, p, true));
            }
        }
        drop(t);
        // From the peers' (stable) order, so the seeded shuffle is
        // reproducible.
        self.env.shuffle(&mut out);
        out.sort_by_key(|(h, band)| (h.partial, h.class, *band));
        out.into_iter().map(|(h, _)| h).collect()
    }

    /// Notes that `peer` polled this node's have-log for `dir` at `root`:
    /// it receives that version, and transfers of it may use it at once
    /// ([`FleetView::holders`]) rather than after its record arrives.
    /// Only live members count; everything it sends is verified anyway.
    pub fn saw_receiver(&self, peer: &str, dir: &str, root: &[u8]) {
        if peer == self.id
            || !self
                .table
                .locked()
                .peers
                .get(peer)
                .is_some_and(|p| p.live())
        {
            return;
        }
        if self.receivers.locked().saw(peer, dir, root) {
            self.learned.notify_waiters();
        }
    }
}

/// A measured round trip's band: under 1 ms is 0, then one band per
/// doubling (1–2 ms is 1, 2–4 ms 2, …); unmeasured sorts last. Bands keep
/// jitter between similar peers from reordering them.
fn rtt_band(ms: f64) -> u8 {
    if ms <= 0.0 {
        u8::MAX
    } else if ms < 1.0 {
        0
    } else {
        (ms.log2().floor() as u8).saturating_add(1).min(u8::MAX - 1)
    }
}

/// Versions remembered; the oldest is forgotten first.
const MAX_VERSIONS: usize = 64;
/// Receivers remembered per version (a transfer takes at most 16 sources).
const MAX_PER_VERSION: usize = 32;

/// (directory, root) → peers seen polling for it, in arrival order.
#[derive(Debug, Default)]
pub(super) struct Receivers {
    by_version: HashMap<(String, Vec<u8>), Vec<String>>,
    order: VecDeque<(String, Vec<u8>)>,
}

impl Receivers {
    /// Notes `peer` receiving `dir` at `root`; whether it is news.
    pub(super) fn saw(&mut self, peer: &str, dir: &str, root: &[u8]) -> bool {
        let key = (dir.to_string(), root.to_vec());
        let peers = match self.by_version.get_mut(&key) {
            Some(p) => p,
            None => {
                if self.order.len() >= MAX_VERSIONS
                    && let Some(old) = self.order.pop_front()
                {
                    self.by_version.remove(&old);
                }
                self.order.push_back(key.clone());
                self.by_version.entry(key).or_default()
            }
        };
        if peers.len() >= MAX_PER_VERSION || peers.iter().any(|p| p == peer) {
            return false;
        }
        peers.push(peer.to_string());
        true
    }

    /// The peers seen receiving `dir` at `root`.
    pub(super) fn of(&self, dir: &str, root: &[u8]) -> &[String] {
        self.by_version
            .get(&(dir.to_string(), root.to_vec()))
            .map_or(&[], |v| v.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receivers_are_remembered_per_version_within_bounds() {
        let mut r = Receivers::default();
        assert!(r.saw("a", "www", b"r1"));
        assert!(!r.saw("a", "www", b"r1"), "not news twice");
        assert!(r.saw("b", "www", b"r1"));
        assert_eq!(r.of("www", b"r1"), ["a", "b"]);
        assert!(r.of("www", b"r2").is_empty());
        for i in 0..100 {
            r.saw(&format!("p{i}"), "big", b"r");
        }
        assert_eq!(r.of("big", b"r").len(), MAX_PER_VERSION);
        for i in 0..MAX_VERSIONS {
            r.saw("a", "d", format!("{i}").as_bytes());
        }
        assert!(
            r.of("www", b"r1").is_empty(),
            "the oldest version forgotten"
        );
        assert_eq!(r.by_version.len(), MAX_VERSIONS);
    }
}
