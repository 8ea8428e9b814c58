//! The peer protocol as a seam: what a node asks of its peers
//! ([`Transport`]) and what it answers ([`PeerHandler`]), independent of
//! how the bytes travel.
//!
//! Two implementations: [`grpc`] (tonic over TCP, the real thing) and
//! [`mem`] (an in-process network whose links can be cut, delayed and
//! counted), so whole fleets can be run in one process under a chosen
//! interleaving. One test suite (`tests.rs`) runs against both, so what the
//! simulation shows holds for the daemon.
//!
//! ```text
//!  node ── Transport::exchange/gossip/get_nodes/get_chunks/haves/swim ──> (grpc | mem)
//!                                                              │
//!  peer <── PeerHandler::exchange/gossip/get_nodes/get_chunks/haves/swim <──┘
//! ```
//!
//! Errors are `tonic::Status` on both sides: the codes are the protocol's
//! (PROTOCOL.md), and the in-memory network produces the same ones (an
//! unreachable address or a cut link is `UNAVAILABLE`).

use std::net::IpAddr;
use std::pin::Pin;

use sync_proto::pb;
use tokio_stream::Stream;
use tonic::Status;

pub mod grpc;
pub mod mem;
pub mod tls;

/// Most node ids or chunk hashes one request may name (PROTOCOL.md).
pub const MAX_NODES_PER_CALL: usize = 256;
pub const MAX_CHUNKS_PER_CALL: usize = 1024;
/// A chunk batch on the wire stays under this (plus framing); chunks are
/// at most 256 KiB with the default chunker.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// The batches of one `GetChunks` answer.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ChunkBatch, Status>> + Send>>;

/// Who is calling, as far as the transport knows: the caller's address
/// (per-address admission limits key on it) and, under mutual TLS, the
/// node id its verified certificate names. Node ids inside the messages
/// are claims, held against `peer_id` by the handlers ([`Caller::claims`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub ip: Option<IpAddr>,
    pub peer_id: Option<String>,
}

impl Caller {
    /// The caller's address for logs and refusals.
    pub fn who(&self) -> String {
        let ip = self
            .ip
            .map_or_else(|| "(unknown address)".into(), |ip| ip.to_string());
        match &self.peer_id {
            Some(id) => format!("{id} at {ip}"),
            None => ip,
        }
    }

    /// Refuses (and logs) a message whose `what` names node `claimed`
    /// when the caller's certificate names another node. Without TLS
    /// there is nothing to hold a claim against.
    pub fn claims(&self, what: &str, claimed: &str) -> Result<(), crate::error::Refusal> {
        match &self.peer_id {
            Some(id) if id != claimed => {
                let reason =
                    format!("its certificate names node {id:?} but its {what} claims {claimed:?}");
                tracing::warn!(peer = %self.who(), "refused a peer: {reason}");
                Err(crate::error::Refusal::Denied {
                    peer: self.who(),
                    reason,
                })
            }
            _ => Ok(()),
        }
    }
}

/// What this node answers to peers.
#[tonic::async_trait]
pub trait PeerHandler: Send + Sync + 'static {
    async fn exchange(&self, caller: Caller, h: pb::Holdings) -> Result<pb::Holdings, Status>;
    async fn gossip(&self, caller: Caller, r: pb::GossipRequest)
    -> Result<pb::GossipReply, Status>;
    async fn get_nodes(
        &self,
        caller: Caller,
        r: pb::GetNodesRequest,
    ) -> Result<pb::GetNodesResponse, Status>;
    async fn get_chunks(
        &self,
        caller: Caller,
        r: pb::GetChunksRequest,
    ) -> Result<ChunkStream, Status>;
    /// A peer that serves no chunks has no have-sets either.
    async fn haves(&self, _caller: Caller, _r: pb::HavesRequest) -> Result<pb::HavesReply, Status> {
        Err(Status::unimplemented("this peer serves no chunks"))
    }
    async fn swim(&self, caller: Caller, p: pb::SwimPacket) -> Result<(), Status>;
}

/// What this node asks of the peer at `to` (`host:port`).
#[tonic::async_trait]
pub trait Transport: Send + Sync + std::fmt::Debug + 'static {
    async fn exchange(&self, to: &str, h: pb::Holdings) -> Result<pb::Holdings, Status>;
    async fn gossip(&self, to: &str, r: pb::GossipRequest) -> Result<pb::GossipReply, Status>;
    async fn get_nodes(
        &self,
        to: &str,
        r: pb::GetNodesRequest,
    ) -> Result<pb::GetNodesResponse, Status>;
    async fn get_chunks(&self, to: &str, r: pb::GetChunksRequest) -> Result<ChunkStream, Status>;
    async fn haves(&self, to: &str, r: pb::HavesRequest) -> Result<pb::HavesReply, Status>;
    async fn swim(&self, to: &str, p: pb::SwimPacket) -> Result<(), Status>;
    /// Drops what is kept for addresses `keep` rejects (cached
    /// connections), so departed peers do not accumulate.
    fn retain(&self, keep: &dyn Fn(&str) -> bool);
    /// Addresses something is kept for.
    fn known(&self) -> Vec<String>;
    /// The node whose certificate the peer at `to` presented when this
    /// node dialled it (under TLS; `None` otherwise or not yet dialled):
    /// an address is bound to the node that proved it is there.
    fn identity(&self, _to: &str) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests;
