//! The peer service: what this node answers (holdings, manifest nodes,
//! chunk bytes) and the client side that reads a peer's manifest and chunks
//! for the diff and the materializer.
//!
//! Every request from a peer is bounded before anything is allocated: ids
//! per call, hash lengths, names, response sizes (see PROTOCOL.md).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use chunk_store::manifest::NodeSource;
use chunk_store::{Error as StoreError, Hash};
use sync_proto::pb;
use sync_proto::pb::peer_client::PeerClient;
use tokio::runtime::Handle;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::fetch::{ChunkPeer, FetchResult};
use crate::materialize::LocalChunks;
use crate::metrics::Metrics;
use crate::node::Node;

/// Most node ids or chunk hashes one request may name.
pub const MAX_NODES_PER_CALL: usize = 256;
pub const MAX_CHUNKS_PER_CALL: usize = 1024;
/// A chunk batch on the wire stays under this (plus framing); chunks are
/// at most 256 KiB with the default chunker.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Largest message either side decodes.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// Most directories one Holdings message may list (held, and pulling).
pub const MAX_HOLDINGS: usize = 4096;

fn hash_of(b: &[u8]) -> Result<Hash, Status> {
    Hash::from_slice(b)
        .ok_or_else(|| Status::invalid_argument(format!("hash of {} bytes, expected 32", b.len())))
}

/// Maps storage errors to gRPC codes: a peer's fault is invalid input, ours
/// is internal.
pub fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::InvalidDirId { .. } => Status::invalid_argument(e.to_string()),
        StoreError::MissingNode { .. } => Status::not_found(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// The server half.
#[derive(Debug, Clone)]
pub struct PeerService {
    pub node: Arc<Node>,
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn exchange(&self, req: Request<pb::Holdings>) -> Result<Response<pb::Holdings>, Status> {
        let h = req.into_inner();
        if h.dirs.len() > MAX_HOLDINGS || h.pulling.len() > MAX_HOLDINGS {
            return Err(Status::invalid_argument("too many directories"));
        }
        self.node
            .metrics
            .gossip_messages
            .with_label_values(&["exchange", "received"])
            .inc();
        self.node.learn(h)?;
        Ok(Response::new(self.node.holdings()))
    }

    async fn swim(&self, req: Request<pb::SwimPacket>) -> Result<Response<pb::SwimAck>, Status> {
        let data = req.into_inner().data;
        self.node
            .metrics
            .gossip_messages
            .with_label_values(&["swim", "received"])
            .inc();
        if let Some(swim) = self.node.swim.get() {
            swim.packet(data).map_err(Status::invalid_argument)?;
        }
        Ok(Response::new(pb::SwimAck {}))
    }

    async fn get_nodes(
        &self,
        req: Request<pb::GetNodesRequest>,
    ) -> Result<Response<pb::GetNodesResponse>, Status> {
        let ids = req.into_inner().ids;
        if ids.len() > MAX_NODES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "more than {MAX_NODES_PER_CALL} node ids"
            )));
        }
        let ids: Vec<Hash> = ids.iter().map(|b| hash_of(b)).collect::<Result<_, _>>()?;
        let store = self.node.store.clone();
        let nodes = tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(ids.len());
            let mut total = 0;
            for id in ids {
                let data = if total < MAX_MESSAGE_BYTES / 2 {
                    store.get_node(&id)?.unwrap_or_default()
                } else {
                    Vec::new() // over budget: the caller asks again
                };
                total += data.len();
                out.push(pb::NodeBlob {
                    id: id.as_bytes().to_vec(),
                    data: Bytes::from(data),
                });
            }
            Ok::<_, StoreError>(out)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status_of)?;
        Ok(Response::new(pb::GetNodesResponse { nodes }))
    }

    type GetChunksStream = tokio_stream::wrappers::ReceiverStream<Result<pb::ChunkBatch, Status>>;

    async fn get_chunks(
        &self,
        req: Request<pb::GetChunksRequest>,
    ) -> Result<Response<Self::GetChunksStream>, Status> {
        let r = req.into_inner();
        if r.requester.len() > 128 || r.dir.len() > 128 {
            return Err(Status::invalid_argument(
                "requester or dir longer than 128 bytes",
            ));
        }
        if r.hashes.len() > MAX_CHUNKS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "more than {MAX_CHUNKS_PER_CALL} chunks"
            )));
        }
        let hashes: Vec<Hash> = r
            .hashes
            .iter()
            .map(|b| hash_of(b))
            .collect::<Result<_, _>>()?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let node = self.node.clone();
        let (requester, dir) = (r.requester, r.dir);
        tokio::task::spawn_blocking(move || {
            let local = LocalChunks::for_serving(&node.store, node.roots());
            let mut batch = pb::ChunkBatch::default();
            let mut size = 0;
            let (mut sent, mut chunks) = (0u64, 0u64);
            for h in hashes {
                // Indexed files first, then files still being received.
                let data = match local.read_hash(&h) {
                    Ok(Some(d)) => d,
                    _ => node
                        .in_flight
                        .read_hash(&h)
                        .ok()
                        .flatten()
                        .unwrap_or_default(),
                };
                size += data.len();
                sent += data.len() as u64;
                chunks += u64::from(!data.is_empty());
                batch.chunks.push(pb::Chunk {
                    hash: h.as_bytes().to_vec(),
                    data: Bytes::from(data),
                });
                if size >= MAX_BATCH_BYTES / 2 {
                    if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                        break;
                    }
                    size = 0;
                }
            }
            if !batch.chunks.is_empty() {
                let _ = tx.blocking_send(Ok(batch));
            }
            node.record_sent(&requester, &dir, sent, chunks);
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

/// A connected peer, usable from blocking code (the diff and the
/// materializer are synchronous and run on blocking threads).
#[derive(Debug, Clone)]
pub struct RemotePeer {
    pub id: String,
    client: PeerClient<Channel>,
    rt: Handle,
    metrics: Metrics,
}

impl RemotePeer {
    pub fn new(id: String, channel: Channel, rt: Handle, metrics: Metrics) -> RemotePeer {
        let client = PeerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        RemotePeer {
            id,
            client,
            rt,
            metrics,
        }
    }

    /// Fetches chunks by hash; returns those the peer had, verified
    /// (on the runtime's threads, off the materializer's).
    pub async fn fetch_chunks(
        mut client: PeerClient<Channel>,
        peer: String,
        req: pb::GetChunksRequest,
        hashes: Vec<Hash>,
    ) -> Result<HashMap<Hash, Bytes>, Status> {
        let asked: std::collections::HashSet<Hash> = hashes.into_iter().collect();
        let mut stream = client.get_chunks(req).await?.into_inner();
        let mut out = HashMap::new();
        while let Some(batch) = stream.message().await? {
            for c in batch.chunks {
                if c.data.is_empty() {
                    continue;
                }
                let h = hash_of(&c.hash)?;
                if !asked.contains(&h) {
                    return Err(Status::invalid_argument(format!(
                        "peer {peer} sent chunk {h} that was not asked for"
                    )));
                }
                // Verify before keeping: the hash is the proof.
                if Hash::of(&c.data) == h {
                    out.insert(h, c.data);
                } else {
                    tracing::warn!(peer = %peer, chunk = %h, "peer sent a chunk that fails BLAKE3 verification");
                }
            }
        }
        Ok(out)
    }
}

/// A peer as a chunk source for one directory's transfer.
#[derive(Debug, Clone)]
pub struct PeerChunks {
    pub peer: RemotePeer,
    pub dir: String,
    /// This node's id, so the peer can account what it serves.
    pub requester: String,
}

impl ChunkPeer for PeerChunks {
    fn name(&self) -> &str {
        &self.peer.id
    }

    fn fetch(&self, hashes: Vec<Hash>) -> Pin<Box<dyn Future<Output = FetchResult> + Send>> {
        let (client, id) = (self.peer.client.clone(), self.peer.id.clone());
        let req = pb::GetChunksRequest {
            dir: self.dir.clone(),
            hashes: hashes.iter().map(|h| h.as_bytes().to_vec()).collect(),
            requester: self.requester.clone(),
        };
        let histogram = self
            .peer
            .metrics
            .rpc_duration
            .with_label_values(&["get_chunks"]);
        Box::pin(async move {
            let started = std::time::Instant::now();
            let r = RemotePeer::fetch_chunks(client, id, req, hashes)
                .await
                .map_err(|s| format!("{}: {}", s.code(), s.message()));
            histogram.observe(started.elapsed().as_secs_f64());
            r
        })
    }
}

impl NodeSource for RemotePeer {
    fn get_node(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let mut client = self.client.clone();
        let req = pb::GetNodesRequest {
            ids: vec![hash.as_bytes().to_vec()],
        };
        let started = std::time::Instant::now();
        let resp = self.rt.block_on(async move { client.get_nodes(req).await });
        self.metrics
            .rpc_duration
            .with_label_values(&["get_nodes"])
            .observe(started.elapsed().as_secs_f64());
        match resp {
            Ok(r) => Ok(r
                .into_inner()
                .nodes
                .into_iter()
                .find(|n| n.id == hash.as_bytes())
                .map(|n| n.data.to_vec())
                .filter(|d| !d.is_empty())),
            Err(s) => Err(StoreError::Io {
                path: format!("peer {}", self.id).into(),
                source: std::io::Error::other(format!("fetching manifest node {hash}: {s}")),
            }),
        }
    }

    fn origin(&self) -> chunk_store::Origin {
        chunk_store::Origin::Remote
    }
}
