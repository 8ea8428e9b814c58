//! What the fleet view keeps per peer, what it announces per own
//! directory, and the holders it hands replicas.

use std::collections::BTreeMap;
use std::sync::Arc;

use sync_proto::pb;

use super::{DEAD_TTL, Liveness, UNCONFIRMED_FOR};
use crate::topology::PeerClass;

/// What this node knows of one peer.
#[derive(Debug, Clone)]
pub struct PeerState {
    pub address: String,
    pub labels: BTreeMap<String, String>,
    /// Its latest record (absent until one arrives).
    pub record: Option<Arc<pb::Holdings>>,
    /// The record key's digest and the peer's bucket.
    pub(super) hash: u64,
    pub(super) bucket: usize,
    /// From SWIM, once SWIM has reported the peer (`swim`).
    pub state: Liveness,
    pub swim: bool,
    /// Last direct exchange with it (on the environment's clock).
    pub heard: tokio::time::Instant,
    /// Gossip round trip, smoothed (0: not measured).
    pub rtt_ms: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Chunks it sent that failed their length or hash check.
    pub corrupt_chunks: u64,
    /// When SWIM declared it down (for forgetting it after [`DEAD_TTL`]).
    pub down_since: Option<tokio::time::Instant>,
    /// Until when its claims are ignored, and why: it listed a version
    /// and withheld or corrupted it ([`super::FleetView::demote`]).
    pub demoted: Option<(tokio::time::Instant, String)>,
    /// The highest SWIM identity bump it announced itself (in packets it
    /// sent, under TLS), which bounds what others may say of it.
    pub swim_bump: u64,
}

impl PeerState {
    pub(super) fn new(address: String, now: tokio::time::Instant) -> PeerState {
        PeerState {
            address,
            labels: BTreeMap::new(),
            record: None,
            hash: 0,
            bucket: 0,
            state: Liveness::Alive,
            swim: false,
            heard: now,
            rtt_ms: 0.0,
            bytes_sent: 0,
            bytes_received: 0,
            corrupt_chunks: 0,
            down_since: None,
            demoted: None,
            swim_bump: 0,
        }
    }

    /// SWIM's verdict; for a peer SWIM has not reported, alive while its
    /// direct exchanges keep succeeding.
    pub fn liveness(&self) -> Liveness {
        if self.swim {
            self.state
        } else if self.heard.elapsed() < UNCONFIRMED_FOR {
            Liveness::Alive
        } else {
            Liveness::Down
        }
    }

    pub fn live(&self) -> bool {
        self.liveness() != Liveness::Down
    }

    /// Why its claims are ignored now (`None`: they are not).
    pub fn demoted_for(&self) -> Option<&str> {
        self.demoted
            .as_ref()
            .filter(|(until, _)| tokio::time::Instant::now() < *until)
            .map(|(_, why)| why.as_str())
    }

    /// Live, and its claims of versions believed.
    pub fn trusted(&self) -> bool {
        self.live() && self.demoted_for().is_none()
    }

    /// Whether it has been down long enough to be forgotten.
    pub(super) fn expired(&self) -> bool {
        if self.swim {
            self.state == Liveness::Down && self.down_since.is_some_and(|t| t.elapsed() >= DEAD_TTL)
        } else {
            self.heard.elapsed() >= UNCONFIRMED_FOR + DEAD_TTL
        }
    }

    /// The version of `dir` it holds completely.
    pub fn held(&self, dir: &str) -> Option<&pb::DirVersion> {
        self.record.as_ref()?.dirs.iter().find(|v| v.dir == dir)
    }

    /// The version of `dir` it is receiving.
    pub fn pulling(&self, dir: &str) -> Option<&pb::DirVersion> {
        self.record.as_ref()?.pulling.iter().find(|v| v.dir == dir)
    }

    pub(super) fn key(&self) -> (u64, u64) {
        self.record
            .as_ref()
            .map_or((0, 0), |r| (r.incarnation, r.seq))
    }
}

/// One of this node's directories as its record shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnDir {
    pub held: Option<pb::DirVersion>,
    pub pulling: Option<pb::DirVersion>,
    pub report: pb::DirReport,
}

impl OwnDir {
    /// Whether `other` differs in more than rate and pending bytes.
    pub(super) fn differs_hard(&self, other: &OwnDir) -> bool {
        let strip = |d: &OwnDir| {
            let mut d = d.clone();
            d.report.rate = 0.0;
            d.report.pending_bytes = 0;
            d
        };
        strip(self) != strip(other)
    }
}

/// A peer to fetch a version from.
#[derive(Debug, Clone)]
pub struct Holder {
    pub id: String,
    pub address: String,
    pub class: PeerClass,
    /// Only part of the version (it is receiving it too).
    pub partial: bool,
}

/// How a record arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via<'a> {
    /// From its owner, in an `Exchange`.
    Direct,
    /// Relayed by gossip from the named peer.
    Relay(&'a str),
}
