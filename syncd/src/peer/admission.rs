//! Admission for serving peers: how many `GetChunks` streams and
//! `GetNodes` calls are answered at once, in total and per address.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Refusal;
use crate::locks::LockExt as _;

/// `GetChunks` streams served at once, in total and per peer address, by
/// default (`[serve] streams`, `streams_per_peer`). Each holds at most one
/// batch being read and one queued (≤ 2 × 4 MiB), so serving takes at most
/// ~256 MiB and 32 blocking reads however many requests arrive; more are
/// refused with `RESOURCE_EXHAUSTED` and the caller asks another peer.
pub const MAX_STREAMS: usize = 32;
pub const MAX_STREAMS_PER_PEER: usize = 8;
/// A stream whose reader takes no batch for this long is closed.
pub const STREAM_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// `GetNodes` calls answered at once (each one short blocking read).
pub const MAX_NODE_CALLS: usize = 16;

/// Admission for serving: bounded streams and node reads, so requests from
/// peers never take the threads and memory local work needs.
#[derive(Debug)]
pub struct Serving {
    /// The stream limits, for refusals.
    max: (usize, usize),
    streams: Arc<tokio::sync::Semaphore>,
    per_peer: PerPeer,
    nodes: Arc<tokio::sync::Semaphore>,
    nodes_per_peer: PerPeer,
}

/// One semaphore per caller address, created on first use; idle ones are
/// forgotten when the map grows large.
#[derive(Debug)]
struct PerPeer {
    permits: usize,
    map: std::sync::Mutex<HashMap<std::net::IpAddr, Arc<tokio::sync::Semaphore>>>,
}

impl PerPeer {
    fn new(permits: usize) -> PerPeer {
        PerPeer {
            permits,
            map: Default::default(),
        }
    }

    fn of(&self, ip: std::net::IpAddr) -> Arc<tokio::sync::Semaphore> {
        let mut map = self.map.locked();
        if map.len() >= 4096 {
            map.retain(|_, s| s.available_permits() < self.permits);
        }
        map.entry(ip)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.permits)))
            .clone()
    }
}

/// `GetNodes` calls of one caller address answered at once.
pub const MAX_NODE_CALLS_PER_PEER: usize = 4;

impl Default for Serving {
    fn default() -> Self {
        Serving::new(MAX_STREAMS, MAX_STREAMS_PER_PEER)
    }
}

/// Permits held for the life of one served stream.
pub(super) type StreamPermits = (
    tokio::sync::OwnedSemaphorePermit,
    Option<tokio::sync::OwnedSemaphorePermit>,
);

impl Serving {
    /// At most `streams` chunk streams at once, `per_peer` of them to one
    /// address.
    pub fn new(streams: usize, per_peer: usize) -> Serving {
        Serving {
            max: (streams, per_peer),
            streams: Arc::new(tokio::sync::Semaphore::new(streams)),
            per_peer: PerPeer::new(per_peer),
            nodes: Arc::new(tokio::sync::Semaphore::new(MAX_NODE_CALLS)),
            nodes_per_peer: PerPeer::new(MAX_NODE_CALLS_PER_PEER),
        }
    }

    pub(super) fn admit_stream(
        &self,
        peer: Option<std::net::IpAddr>,
    ) -> Result<StreamPermits, Refusal> {
        let busy =
            |what: &str| Refusal::Busy(format!("serving {what}; ask another peer or retry later"));
        let per = match peer {
            Some(ip) => Some(
                self.per_peer
                    .of(ip)
                    .try_acquire_owned()
                    .map_err(|_| busy(&format!("{} streams to {ip} already", self.max.1)))?,
            ),
            None => None,
        };
        let total = self
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy(&format!("{} streams already", self.max.0)))?;
        Ok((total, per))
    }

    /// Waits (up to 10 s) for a turn to answer a `GetNodes` call: a peer
    /// gets at most [`MAX_NODE_CALLS_PER_PEER`] of the [`MAX_NODE_CALLS`].
    pub(super) async fn admit_nodes(
        &self,
        peer: Option<std::net::IpAddr>,
    ) -> Result<NodePermits, Refusal> {
        let wait = std::time::Duration::from_secs(10);
        let busy = || Refusal::Busy("busy serving manifest nodes; retry later".into());
        let stopping = |_| Refusal::Stopping("shutting down".into());
        let per = match peer {
            Some(ip) => Some(
                tokio::time::timeout(wait, self.nodes_per_peer.of(ip).acquire_owned())
                    .await
                    .map_err(|_| busy())?
                    .map_err(stopping)?,
            ),
            None => None,
        };
        let total = tokio::time::timeout(wait, self.nodes.clone().acquire_owned())
            .await
            .map_err(|_| busy())?
            .map_err(stopping)?;
        Ok((total, per))
    }
}

pub(super) type NodePermits = StreamPermits;

#[cfg(test)]
mod tests {
    use super::*;

    /// `[serve] streams` and `streams_per_peer` bound what is admitted;
    /// a refusal says which limit, and a permit given back frees a turn.
    #[test]
    fn stream_limits_are_the_configured_ones() {
        let s = Serving::new(3, 2);
        let a: std::net::IpAddr = [10, 0, 0, 1].into();
        let b: std::net::IpAddr = [10, 0, 0, 2].into();
        let first = s.admit_stream(Some(a)).unwrap();
        let _second = s.admit_stream(Some(a)).unwrap();
        let e = s.admit_stream(Some(a)).unwrap_err().to_string();
        assert!(e.contains("2 streams to 10.0.0.1 already"), "{e}");
        let _third = s.admit_stream(Some(b)).unwrap();
        let e = s.admit_stream(Some(b)).unwrap_err().to_string();
        assert!(e.contains("3 streams already"), "{e}");
        drop(first);
        let _again = s.admit_stream(Some(b)).unwrap();
    }
}
