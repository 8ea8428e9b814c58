//! An in-process network for the peer protocol: nodes "listen" at an
//! address by registering a [`PeerHandler`]; a [`MemTransport`] delivers
//! calls to them directly. Links can be cut and healed, given a delay, and
//! are counted (calls and encoded bytes, both directions), so fleet
//! behaviour can be tested in one process, under paused tokio time, with
//! the interleavings a test chooses (chitchat's channel transport is the
//! model).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use sync_proto::pb;
use tokio_stream::StreamExt as _;
use tonic::Status;

use super::{Caller, ChunkStream, PeerHandler, Transport};
use crate::locks::LockExt as _;

type Link = (String, String);

#[derive(Default)]
struct Net {
    nodes: HashMap<String, Arc<dyn PeerHandler>>,
    cut: HashSet<Link>,
    delay: HashMap<Link, Duration>,
    calls: HashMap<Link, u64>,
    bytes: HashMap<Link, u64>,
}

/// The network: who listens where, and the state of every link.
#[derive(Default)]
pub struct MemNet {
    net: Mutex<Net>,
}

impl std::fmt::Debug for MemNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.net.locked();
        f.debug_struct("MemNet")
            .field("nodes", &n.nodes.keys().collect::<Vec<_>>())
            .field("cut", &n.cut)
            .finish()
    }
}

impl MemNet {
    pub fn new() -> Arc<MemNet> {
        Arc::new(MemNet::default())
    }

    /// `handler` answers calls to `address` from now on.
    pub fn listen(&self, address: &str, handler: Arc<dyn PeerHandler>) {
        self.net.locked().nodes.insert(address.to_string(), handler);
    }

    /// Nothing answers at `address` any more (a crash or a stop).
    pub fn unlisten(&self, address: &str) {
        self.net.locked().nodes.remove(address);
    }

    /// The transport a node at `address` calls its peers with.
    pub fn transport(self: &Arc<Self>, address: &str) -> MemTransport {
        MemTransport {
            me: address.to_string(),
            net: self.clone(),
        }
    }

    fn link(a: &str, b: &str) -> Link {
        (a.to_string(), b.to_string())
    }

    /// Cuts the link between `a` and `b`, both ways.
    pub fn cut(&self, a: &str, b: &str) {
        let mut n = self.net.locked();
        n.cut.insert(Self::link(a, b));
        n.cut.insert(Self::link(b, a));
    }

    /// Restores the link between `a` and `b`, both ways.
    pub fn heal(&self, a: &str, b: &str) {
        let mut n = self.net.locked();
        n.cut.remove(&Self::link(a, b));
        n.cut.remove(&Self::link(b, a));
    }

    /// Every call from `from` to `to` first waits `d`.
    pub fn delay(&self, from: &str, to: &str, d: Duration) {
        self.net.locked().delay.insert(Self::link(from, to), d);
    }

    /// Calls made from `from` to `to`.
    pub fn calls(&self, from: &str, to: &str) -> u64 {
        self.net
            .locked()
            .calls
            .get(&Self::link(from, to))
            .copied()
            .unwrap_or(0)
    }

    /// Encoded bytes of the calls from `from` to `to`: requests and their
    /// answers.
    pub fn bytes(&self, from: &str, to: &str) -> u64 {
        self.net
            .locked()
            .bytes
            .get(&Self::link(from, to))
            .copied()
            .unwrap_or(0)
    }

    /// Encoded bytes of every call on the network.
    pub fn bytes_from_all(&self) -> u64 {
        self.net.locked().bytes.values().sum()
    }

    /// Encoded bytes of every call made by `from`, to anyone.
    pub fn bytes_from(&self, from: &str) -> u64 {
        self.net
            .locked()
            .bytes
            .iter()
            .filter(|((f, _), _)| f == from)
            .map(|(_, b)| *b)
            .sum()
    }

    fn count(&self, from: &str, to: &str, bytes: usize) {
        let mut n = self.net.locked();
        *n.bytes.entry(Self::link(from, to)).or_default() += bytes as u64;
    }

    fn is_cut(&self, from: &str, to: &str) -> bool {
        self.net.locked().cut.contains(&Self::link(from, to))
    }
}

/// One node's view of the [`MemNet`].
#[derive(Debug, Clone)]
pub struct MemTransport {
    me: String,
    net: Arc<MemNet>,
}

impl MemTransport {
    /// The handler at `to`, once the link's delay has passed; the same
    /// error a TCP peer would give when the link is cut or nobody listens.
    async fn route(&self, to: &str, request_bytes: usize) -> Result<Arc<dyn PeerHandler>, Status> {
        let delay = {
            let mut n = self.net.net.locked();
            *n.calls.entry(MemNet::link(&self.me, to)).or_default() += 1;
            n.delay.get(&MemNet::link(&self.me, to)).copied()
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if self.net.is_cut(&self.me, to) {
            return Err(Status::unavailable(format!(
                "link {} -> {to} is cut",
                self.me
            )));
        }
        self.net.count(&self.me, to, request_bytes);
        self.net
            .net
            .locked()
            .nodes
            .get(to)
            .cloned()
            .ok_or_else(|| Status::unavailable(format!("nothing listens at {to}")))
    }

    fn caller(&self) -> Caller {
        Caller {
            ip: self.me.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()),
            peer_id: None,
        }
    }
}

#[tonic::async_trait]
impl Transport for MemTransport {
    async fn exchange(&self, to: &str, h: pb::Holdings) -> Result<pb::Holdings, Status> {
        let handler = self.route(to, h.encoded_len()).await?;
        let r = handler.exchange(self.caller(), h).await?;
        self.net.count(&self.me, to, r.encoded_len());
        Ok(r)
    }

    async fn gossip(&self, to: &str, r: pb::GossipRequest) -> Result<pb::GossipReply, Status> {
        let handler = self.route(to, r.encoded_len()).await?;
        let reply = handler.gossip(self.caller(), r).await?;
        self.net.count(&self.me, to, reply.encoded_len());
        Ok(reply)
    }

    async fn get_nodes(
        &self,
        to: &str,
        r: pb::GetNodesRequest,
    ) -> Result<pb::GetNodesResponse, Status> {
        let handler = self.route(to, r.encoded_len()).await?;
        let resp = handler.get_nodes(self.caller(), r).await?;
        self.net.count(&self.me, to, resp.encoded_len());
        Ok(resp)
    }

    async fn get_chunks(&self, to: &str, r: pb::GetChunksRequest) -> Result<ChunkStream, Status> {
        let handler = self.route(to, r.encoded_len()).await?;
        let stream = handler.get_chunks(self.caller(), r).await?;
        let (net, me, to) = (self.net.clone(), self.me.clone(), to.to_string());
        // Each batch is counted as it is taken, and a link cut mid-stream
        // ends it as a broken connection would.
        Ok(Box::pin(stream.map(move |item| {
            if net.is_cut(&me, &to) {
                return Err(Status::unavailable(format!("link {me} -> {to} is cut")));
            }
            if let Ok(b) = &item {
                net.count(&me, &to, b.encoded_len());
            }
            item
        })))
    }

    async fn haves(&self, to: &str, r: pb::HavesRequest) -> Result<pb::HavesReply, Status> {
        let handler = self.route(to, r.encoded_len()).await?;
        let reply = handler.haves(self.caller(), r).await?;
        if self.net.is_cut(&self.me, to) {
            return Err(Status::unavailable(format!(
                "link {} -> {to} is cut",
                self.me
            )));
        }
        self.net.count(&self.me, to, reply.encoded_len());
        Ok(reply)
    }

    async fn swim(&self, to: &str, p: pb::SwimPacket) -> Result<(), Status> {
        let handler = self.route(to, p.encoded_len()).await?;
        handler.swim(self.caller(), p).await
    }

    fn retain(&self, _keep: &dyn Fn(&str) -> bool) {}

    fn known(&self) -> Vec<String> {
        Vec::new()
    }
}
