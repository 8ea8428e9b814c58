//! The digest side of the fleet view: what a gossip round compares. A
//! record's key (node, incarnation, seq) hashes to 64 bits; its bucket
//! is fixed by its node id; a bucket's digest is the XOR of its records'
//! hashes, and the node's digest the XOR of the buckets (PROTOCOL.md,
//! "Gossip"). Only this node's record and those of live members count.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use prost::Message as _;
use sync_proto::pb;

use super::{BUCKETS, FleetView, gossip};
use crate::locks::LockExt as _;

/// The 64-bit digest of a record key, and its bucket.
pub(super) fn key_hash(node: &str, incarnation: u64, seq: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(node.as_bytes());
    h.update(&[0]);
    h.update(&incarnation.to_le_bytes());
    h.update(&seq.to_le_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

pub(super) fn bucket_of(node: &str) -> usize {
    blake3::hash(node.as_bytes()).as_bytes()[0] as usize % BUCKETS
}

pub(super) fn record_hash(r: &pb::Holdings) -> u64 {
    let id = r.from.as_ref().map_or("", |m| m.node_id.as_str());
    key_hash(id, r.incarnation, r.seq)
}

impl FleetView {
    /// The bucket digests of the records in the digest: this node's own
    /// and those of live peers.
    pub fn buckets(&self) -> [u64; BUCKETS] {
        let mut t = self.table.locked();
        let now = self.env.now();
        if let Some((at, b)) = t.digests
            && now.duration_since(at) < Duration::from_secs(1)
        {
            return b;
        }
        let mut b = [0u64; BUCKETS];
        b[bucket_of(&self.id)] ^= t.own.hash;
        for p in t.peers.values() {
            if p.record.is_some() && p.live() {
                b[p.bucket] ^= p.hash;
            }
        }
        t.digests = Some((now, b));
        b
    }

    /// The whole digest: the bucket digests folded together.
    pub fn digest(&self) -> u64 {
        self.buckets().iter().fold(0, |a, b| a ^ b)
    }

    /// Keys of the records in `buckets`.
    pub fn keys_in(&self, buckets: &[u32]) -> Vec<pb::RecordKey> {
        let want: HashSet<usize> = buckets.iter().map(|b| *b as usize).collect();
        let t = self.table.locked();
        let own = &t.own.record;
        let mut out = Vec::new();
        if want.contains(&bucket_of(&self.id)) {
            out.push(pb::RecordKey {
                node_id: self.id.clone(),
                incarnation: own.incarnation,
                seq: own.seq,
            });
        }
        for (id, p) in &t.peers {
            if p.record.is_some() && want.contains(&p.bucket) && p.live() {
                let (incarnation, seq) = p.key();
                out.push(pb::RecordKey {
                    node_id: id.clone(),
                    incarnation,
                    seq,
                });
            }
        }
        out
    }

    /// Step 2 of a round, answered: records newer here than the caller's
    /// `keys` in `buckets` (or missing there), and the ids whose records
    /// are newer at the caller.
    pub fn reconcile(
        &self,
        buckets: &[u32],
        keys: &[pb::RecordKey],
    ) -> (Vec<pb::Holdings>, Vec<String>) {
        // Ordered maps: the records sent, and the ids asked for, come out
        // in one order for one input (the simulation replays exactly).
        let theirs: BTreeMap<&str, (u64, u64)> = keys
            .iter()
            .map(|k| (k.node_id.as_str(), (k.incarnation, k.seq)))
            .collect();
        let mine: BTreeMap<String, (u64, u64)> = self
            .keys_in(buckets)
            .into_iter()
            .map(|k| (k.node_id, (k.incarnation, k.seq)))
            .collect();
        let newer_here: Vec<&str> = mine
            .iter()
            .filter(|(id, k)| theirs.get(id.as_str()).is_none_or(|t| *t < **k))
            .map(|(id, _)| id.as_str())
            .collect();
        let records = self.records(newer_here.iter().copied());
        let want = theirs
            .iter()
            .filter(|(id, k)| mine.get(**id).is_none_or(|m| m < k))
            .map(|(id, _)| id.to_string())
            .take(gossip::MAX_RECORDS_PER_CALL)
            .collect();
        (records, want)
    }

    /// The records of `ids` this node has (its own included), within one
    /// call's bounds.
    pub fn records<'a>(&self, ids: impl Iterator<Item = &'a str>) -> Vec<pb::Holdings> {
        let t = self.table.locked();
        let mut out = Vec::new();
        let mut bytes = 0;
        for id in ids {
            let r = if id == self.id {
                Some(&t.own.record)
            } else {
                t.peers.get(id).and_then(|p| p.record.as_ref())
            };
            if let Some(r) = r {
                bytes += r.encoded_len();
                if out.len() >= gossip::MAX_RECORDS_PER_CALL || bytes > gossip::MAX_CALL_BYTES {
                    break;
                }
                out.push((**r).clone());
            }
        }
        out
    }
}
