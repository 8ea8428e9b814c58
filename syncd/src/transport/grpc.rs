//! The peer protocol over gRPC (tonic, HTTP/2 over TCP): a [`Transport`]
//! with one lazily connected channel per peer address, and the server
//! adapter that hands each call to a [`PeerHandler`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sync_proto::pb;
use sync_proto::pb::peer_client::PeerClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::{Caller, ChunkStream, PeerHandler, Transport};
use crate::locks::LockExt as _;

/// Largest message either side decodes (PROTOCOL.md, "Limits").
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// Connecting to a peer takes at most this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// No single call takes longer.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2 windows sized so one stream can fill a fast link.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 8 << 20;

/// Channels to peers, by address; over mutual TLS when built with
/// [`GrpcTransport::with_tls`].
#[derive(Debug, Default)]
pub struct GrpcTransport {
    channels: Mutex<HashMap<String, Channel>>,
    tls: Option<Arc<crate::tls::Tls>>,
    /// Under TLS: the node id each dialled address's certificate names.
    ids: super::tls::PeerIds,
    /// Under TLS: addresses not dialled again for a while.
    failing: Arc<super::tls::Failing>,
}

impl GrpcTransport {
    /// Every connection mutually authenticated under the fleet CA.
    pub fn with_tls(tls: Arc<crate::tls::Tls>) -> GrpcTransport {
        GrpcTransport {
            tls: Some(tls),
            ..GrpcTransport::default()
        }
    }

    /// The node id the certificate of the peer at `to` named, if this node
    /// dialled it over TLS.
    pub fn peer_id(&self, to: &str) -> Option<String> {
        self.ids.locked().get(to).cloned()
    }

    /// Addresses not dialled now because their last attempt failed.
    pub fn failing(&self) -> usize {
        self.failing.count()
    }

    /// Creates the (lazy) channel to `to` now, as a first call would.
    #[cfg(test)]
    pub(crate) fn prime(&self, to: &str) {
        self.client(to).unwrap();
    }

    fn client(&self, to: &str) -> Result<PeerClient<Channel>, Status> {
        let channel = {
            let mut channels = self.channels.locked();
            match channels.get(to) {
                Some(c) => c.clone(),
                None => {
                    let e = Endpoint::from_shared(format!("http://{to}"))
                        .map_err(|e| Status::invalid_argument(format!("peer address {to:?}: {e}")))?
                        .connect_timeout(CONNECT_TIMEOUT)
                        .timeout(CALL_TIMEOUT)
                        .initial_stream_window_size(STREAM_WINDOW)
                        .initial_connection_window_size(CONNECTION_WINDOW);
                    let c = match &self.tls {
                        Some(tls) => e.connect_with_connector_lazy(super::tls::Dialer {
                            tls: tls.clone(),
                            ids: self.ids.clone(),
                            failing: self.failing.clone(),
                            connect_timeout: CONNECT_TIMEOUT,
                        }),
                        None => e.connect_lazy(),
                    };
                    channels.insert(to.to_string(), c.clone());
                    c
                }
            }
        };
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

#[tonic::async_trait]
impl Transport for GrpcTransport {
    async fn exchange(&self, to: &str, h: pb::Holdings) -> Result<pb::Holdings, Status> {
        let reply = self.client(to)?.exchange(h).await?.into_inner();
        // Under TLS the reply's record is the peer's own: it must be the
        // node its certificate names.
        if self.tls.is_some() {
            let claimed = reply.from.as_ref().map_or("", |m| m.node_id.as_str());
            match self.peer_id(to) {
                Some(id) if id == claimed => {}
                id => {
                    let id = id.unwrap_or_else(|| "(none)".into());
                    tracing::warn!(peer = %to, certificate = %id, claimed, "refused a peer's record: its certificate names another node");
                    return Err(Status::permission_denied(format!(
                        "peer {to}: its certificate names node {id:?} but its record claims {claimed:?}"
                    )));
                }
            }
        }
        Ok(reply)
    }

    async fn gossip(&self, to: &str, r: pb::GossipRequest) -> Result<pb::GossipReply, Status> {
        Ok(self.client(to)?.gossip(r).await?.into_inner())
    }

    async fn get_nodes(
        &self,
        to: &str,
        r: pb::GetNodesRequest,
    ) -> Result<pb::GetNodesResponse, Status> {
        Ok(self.client(to)?.get_nodes(r).await?.into_inner())
    }

    async fn get_chunks(&self, to: &str, r: pb::GetChunksRequest) -> Result<ChunkStream, Status> {
        let stream = self.client(to)?.get_chunks(r).await?.into_inner();
        Ok(Box::pin(stream))
    }

    async fn haves(&self, to: &str, r: pb::HavesRequest) -> Result<pb::HavesReply, Status> {
        Ok(self.client(to)?.haves(r).await?.into_inner())
    }

    async fn swim(&self, to: &str, p: pb::SwimPacket) -> Result<(), Status> {
        self.client(to)?.swim(p).await?;
        Ok(())
    }

    fn retain(&self, keep: &dyn Fn(&str) -> bool) {
        self.channels.locked().retain(|a, _| keep(a));
    }

    fn identity(&self, to: &str) -> Option<String> {
        self.peer_id(to)
    }

    fn known(&self) -> Vec<String> {
        self.channels.locked().keys().cloned().collect()
    }
}

/// The tonic service: each call goes to `handler` with the caller's
/// address.
pub struct GrpcServer {
    handler: Arc<dyn PeerHandler>,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrpcServer")
    }
}

impl GrpcServer {
    /// The `Peer` service for tonic's router, with the protocol's message
    /// limits.
    pub fn service(handler: Arc<dyn PeerHandler>) -> pb::peer_server::PeerServer<GrpcServer> {
        pb::peer_server::PeerServer::new(GrpcServer { handler })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn caller<T>(req: &Request<T>) -> Caller {
    Caller {
        ip: req.remote_addr().map(|a| a.ip()),
        peer_id: req
            .peer_certs()
            .and_then(|c| c.first().and_then(crate::tls::node_id_of)),
    }
}

#[tonic::async_trait]
impl pb::peer_server::Peer for GrpcServer {
    async fn exchange(&self, req: Request<pb::Holdings>) -> Result<Response<pb::Holdings>, Status> {
        let c = caller(&req);
        Ok(Response::new(
            self.handler.exchange(c, req.into_inner()).await?,
        ))
    }

    async fn gossip(
        &self,
        req: Request<pb::GossipRequest>,
    ) -> Result<Response<pb::GossipReply>, Status> {
        let c = caller(&req);
        Ok(Response::new(
            self.handler.gossip(c, req.into_inner()).await?,
        ))
    }

    async fn haves(
        &self,
        req: Request<pb::HavesRequest>,
    ) -> Result<Response<pb::HavesReply>, Status> {
        let c = caller(&req);
        Ok(Response::new(
            self.handler.haves(c, req.into_inner()).await?,
        ))
    }

    async fn swim(&self, req: Request<pb::SwimPacket>) -> Result<Response<pb::SwimAck>, Status> {
        let c = caller(&req);
        self.handler.swim(c, req.into_inner()).await?;
        Ok(Response::new(pb::SwimAck {}))
    }

    async fn get_nodes(
        &self,
        req: Request<pb::GetNodesRequest>,
    ) -> Result<Response<pb::GetNodesResponse>, Status> {
        let c = caller(&req);
        Ok(Response::new(
            self.handler.get_nodes(c, req.into_inner()).await?,
        ))
    }

    type GetChunksStream = ChunkStream;

    async fn get_chunks(
        &self,
        req: Request<pb::GetChunksRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let c = caller(&req);
        Ok(Response::new(
            self.handler.get_chunks(c, req.into_inner()).await?,
        ))
    }
}
