//! The peer service: what this node answers (records and gossip, manifest
//! nodes, chunk bytes) and the client side that reads a peer's manifest and chunks
//! for the diff and the materializer.
//!
//! Every request from a peer is bounded before anything is allocated: ids
//! per call, hash lengths, names, response sizes (see PROTOCOL.md).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chunk_store::manifest::{ChunkEntry, NodeSource};
use chunk_store::{Error as StoreError, Hash};
use prost::Message as _;
use sync_proto::pb;
use tokio::runtime::Handle;
use tonic::Status;

use crate::error::Refusal;
use crate::fetch::{ChunkPeer, FetchError, FetchResult, Fut, Got, HaveDelta};
use crate::fleet::{FleetView, Via};
use crate::local::LocalNode;
use crate::materialize::LocalChunks;
use crate::metrics::Metrics;
use crate::transport::{Caller, ChunkStream, PeerHandler, Transport};

pub use crate::transport::grpc::MAX_MESSAGE_BYTES;
pub use crate::transport::{MAX_BATCH_BYTES, MAX_CHUNKS_PER_CALL, MAX_NODES_PER_CALL};
mod admission;
mod any_holder;
mod node_scope;
use admission::StreamPermits;
pub use admission::{
    MAX_NODE_CALLS, MAX_NODE_CALLS_PER_PEER, MAX_STREAMS, MAX_STREAMS_PER_PEER, STREAM_STALL,
    Serving,
};
pub use any_holder::AnyHolder;

fn hash_of(b: &[u8]) -> Result<Hash, Refusal> {
    Hash::from_slice(b).ok_or_else(|| Refusal::Invalid {
        peer: "(the caller)".into(),
        reason: format!("hash of {} bytes, expected 32", b.len()),
    })
}

/// A malformed request from the caller at `caller`.
fn invalid(caller: Caller, reason: impl Into<String>) -> Status {
    Refusal::Invalid {
        peer: caller
            .ip
            .map_or_else(|| "(unknown address)".into(), |ip| ip.to_string()),
        reason: reason.into(),
    }
    .into()
}

/// The server half.
#[derive(Debug, Clone)]
pub struct PeerService {
    pub node: Arc<LocalNode>,
    /// Admission of peers' requests (bounded streams and node reads).
    pub serving: Arc<Serving>,
    /// Under TLS, the nodes each directory's readers may ask for.
    scopes: Arc<node_scope::NodeScopes>,
}

impl PeerService {
    pub fn new(node: Arc<LocalNode>) -> PeerService {
        PeerService {
            serving: Arc::new(Serving::new(
                node.serve.streams,
                node.serve.streams_per_peer,
            )),
            node,
            scopes: Default::default(),
        }
    }

    /// Accounts chunks served to `requester`.
    fn record_sent(&self, requester: &str, dir: &str, holder: bool, bytes: u64, chunks: u64) {
        // Only configured ids become metric labels: a peer naming random
        // directories must not grow /metrics.
        if !self.node.carries(dir) {
            return;
        }
        let fleet = &self.node.fleet;
        let class = fleet.class_of(requester);
        fleet.add_traffic(requester, bytes, 0);
        let labels = [dir, class.as_str()];
        let m = &self.node.metrics;
        m.sent_bytes.with_label_values(&labels).inc_by(bytes);
        m.sent_chunks.with_label_values(&labels).inc_by(chunks);
        let role = if holder { "holder" } else { "receiver" };
        m.sent_by_role.with_label_values(&[dir, role]).inc_by(bytes);
    }
}

#[tonic::async_trait]
impl PeerHandler for PeerService {
    async fn exchange(&self, caller: Caller, h: pb::Holdings) -> Result<pb::Holdings, Status> {
        caller.claims("record", h.from.as_ref().map_or("", |m| m.node_id.as_str()))?;
        let m = &self.node.metrics;
        m.gossip_messages
            .with_label_values(&["exchange", "received"])
            .inc();
        m.gossip_bytes
            .with_label_values(&["exchange", "received"])
            .inc_by(h.encoded_len() as u64);
        self.node.fleet.learn(h, Via::Direct)?;
        let own = (*self.node.fleet.own_record()).clone();
        m.gossip_bytes
            .with_label_values(&["exchange", "sent"])
            .inc_by(own.encoded_len() as u64);
        Ok(own)
    }

    async fn gossip(
        &self,
        _caller: Caller,
        r: pb::GossipRequest,
    ) -> Result<pb::GossipReply, Status> {
        Ok(crate::fleet::gossip::answer(&self.node.fleet, r)?)
    }

    async fn haves(&self, caller: Caller, r: pb::HavesRequest) -> Result<pb::HavesReply, Status> {
        if !(r.requester.is_empty() || crate::wire::is_id(&r.requester))
            || !crate::wire::is_id(&r.dir)
        {
            return Err(invalid(
                caller,
                "requester or dir is not an id ([A-Za-z0-9._-]{1,128})",
            ));
        }
        if !r.requester.is_empty() {
            caller.claims("requester", &r.requester)?;
        }
        if !self.node.carries(&r.dir) {
            return Err(Refusal::NotFound(format!(
                "this node does not carry directory {:?}",
                r.dir
            ))
            .into());
        }
        self.node.fleet.may_read(&caller, &r.dir)?;
        let root =
            Hash::from_slice(&r.root).ok_or_else(|| invalid(caller, "root is not 32 bytes"))?;
        let reply = |complete, gone, next, hashes: Vec<Hash>| pb::HavesReply {
            complete,
            gone,
            next,
            hashes: hashes.iter().map(|h| h.as_bytes().to_vec()).collect(),
        };
        let complete = || self.node.fleet.own_holds(&r.dir, &r.root);
        if complete() {
            return Ok(reply(true, false, r.since, Vec::new()));
        }
        let Some(log) = self.node.have_log(&r.dir).filter(|l| l.root == root) else {
            return Ok(reply(false, true, r.since, Vec::new()));
        };
        // Both receive this version: the caller can feed us too.
        if !r.requester.is_empty() {
            self.node.fleet.saw_receiver(&r.requester, &r.dir, &r.root);
        }
        let wait = Duration::from_millis(r.wait_ms.into()).min(crate::haves::MAX_HAVES_WAIT);
        log.wait_beyond(r.since, wait).await;
        let (hashes, next) = log.since(r.since);
        Ok(reply(complete(), false, next, hashes))
    }

    async fn swim(&self, caller: Caller, p: pb::SwimPacket) -> Result<(), Status> {
        Ok(self.node.fleet.swim_packet(&caller, p.data)?)
    }

    async fn get_nodes(
        &self,
        caller: Caller,
        req: pb::GetNodesRequest,
    ) -> Result<pb::GetNodesResponse, Status> {
        let peer_ip = caller.ip;
        if caller.peer_id.is_some() {
            if !crate::wire::is_id(&req.dir) || !self.node.carries(&req.dir) {
                return Err(Refusal::NotFound(format!(
                    "this node does not carry directory {:?}",
                    crate::wire::short(&req.dir)
                ))
                .into());
            }
            self.node.fleet.may_read(&caller, &req.dir)?;
        }
        let ids = req.ids;
        if ids.len() > MAX_NODES_PER_CALL {
            return Err(invalid(
                caller,
                format!("more than {MAX_NODES_PER_CALL} node ids"),
            ));
        }
        let ids: Vec<Hash> = ids.iter().map(|b| hash_of(b)).collect::<Result<_, _>>()?;
        if caller.peer_id.is_some() {
            self.scopes
                .check(&self.node, &caller, &req.dir, &ids)
                .await?;
        }
        let permit = self.serving.admit_nodes(peer_ip).await?;
        let store = self.node.store.clone();
        let nodes = self
            .node
            .env
            .blocking(move || {
                let _permit = permit;
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
            .map_err(|e| Refusal::Internal(e.to_string()))?
            .map_err(Refusal::from)?;
        Ok(pb::GetNodesResponse { nodes })
    }

    async fn get_chunks(
        &self,
        caller: Caller,
        r: pb::GetChunksRequest,
    ) -> Result<ChunkStream, Status> {
        let peer_ip = caller.ip;
        if !(r.requester.is_empty() || crate::wire::is_id(&r.requester))
            || !crate::wire::is_id(&r.dir)
        {
            return Err(invalid(
                caller,
                "requester or dir is not an id ([A-Za-z0-9._-]{1,128})",
            ));
        }
        if !r.requester.is_empty() {
            caller.claims("requester", &r.requester)?;
        }
        if r.hashes.len() > MAX_CHUNKS_PER_CALL {
            return Err(invalid(
                caller,
                format!("more than {MAX_CHUNKS_PER_CALL} chunks"),
            ));
        }
        if !self.node.carries(&r.dir) {
            return Err(Refusal::NotFound(format!(
                "this node does not carry directory {:?}",
                r.dir
            ))
            .into());
        }
        self.node.fleet.may_read(&caller, &r.dir)?;
        // Each chunk once, however often it is named: a 2 KB request must
        // not make us send the same chunk a thousand times.
        let mut seen = std::collections::HashSet::with_capacity(r.hashes.len());
        let mut hashes: Vec<Hash> = Vec::with_capacity(r.hashes.len());
        for b in &r.hashes {
            let h = hash_of(b)?;
            if seen.insert(h) {
                hashes.push(h);
            }
        }
        // Origin protection: a full holder of the version leaves out what
        // it sent another receiver a moment ago, unless asked to insist.
        let holder = self.node.fleet.own_holds(&r.dir, &r.root);
        let declined: Vec<bool> = match Hash::from_slice(&r.root) {
            Some(root) if !r.insist && !r.requester.is_empty() && holder => self
                .node
                .served
                .decline(&r.dir, root, &r.requester, &hashes),
            _ => Vec::new(),
        };
        let declined = Arc::new(declined);
        // The permits live as long as the response stream: a stream whose
        // reader stalled still counts until the connection lets it go.
        let permits = self.serving.admit_stream(peer_ip)?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let node = self.node.clone();
        let service = self.clone();
        let (requester, dir) = (r.requester, r.dir);
        let hashes = Arc::new(hashes);
        tokio::spawn(async move {
            let (mut sent, mut chunks) = (0u64, 0u64);
            let mut next = 0;
            while next < hashes.len() {
                // One batch read on a blocking thread, then handed to the
                // stream with a deadline: a reader that stops reading
                // holds no thread, and is dropped after STREAM_STALL.
                let (n2, h2, d2, dir2) =
                    (node.clone(), hashes.clone(), declined.clone(), dir.clone());
                let read = node
                    .env
                    .blocking(move || read_batch(&n2, &dir2, &h2, &d2, next))
                    .await;
                let Ok((batch, upto, bytes, count)) = read else {
                    break;
                };
                next = upto;
                // Upload caps, and a lower class giving way to a higher;
                // a caller gone meanwhile is not paid for.
                tokio::select! {
                    _ = node.bandwidth.upload(&dir, bytes) => {}
                    _ = tx.closed() => break,
                }
                match tokio::time::timeout(STREAM_STALL, tx.send(Ok(batch))).await {
                    Ok(Ok(())) => {
                        // Counted once handed to the stream, not before (a
                        // batch its caller never took is not traffic).
                        sent += bytes;
                        chunks += count;
                    }
                    Ok(Err(_)) => break, // the caller went away
                    Err(_) => {
                        tracing::debug!(requester = %requester, "closing a GetChunks stream nobody reads");
                        break;
                    }
                }
            }
            service.record_sent(&requester, &dir, holder, sent, chunks);
        });
        Ok(Box::pin(ServedChunks {
            inner: tokio_stream::wrappers::ReceiverStream::new(rx),
            _permits: permits,
        }))
    }
}

/// A `GetChunks` response: the batches, and the admission permits they
/// hold until tonic drops the stream.
#[derive(Debug)]
pub struct ServedChunks {
    inner: tokio_stream::wrappers::ReceiverStream<Result<pb::ChunkBatch, Status>>,
    _permits: StreamPermits,
}

impl tokio_stream::Stream for ServedChunks {
    type Item = Result<pb::ChunkBatch, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// Reads chunks `hashes[from..]` until a batch is half the batch limit;
/// returns the batch, where it stopped, and the bytes and chunks in it.
/// Chunks `declined[i]` are answered as declined, unread.
fn read_batch(
    node: &LocalNode,
    dir: &str,
    hashes: &[Hash],
    declined: &[bool],
    from: usize,
) -> (pb::ChunkBatch, usize, u64, u64) {
    // Only from the requested directory's files (and its transfer): what
    // a peer may read is what the directory it carries holds.
    let roots = node
        .roots()
        .into_iter()
        .filter(|(id, _)| id == dir)
        .collect();
    let local = LocalChunks::for_serving(&node.store, roots);
    let mut batch = pb::ChunkBatch::default();
    let (mut size, mut count) = (0usize, 0u64);
    let mut i = from;
    while i < hashes.len() && size < MAX_BATCH_BYTES / 2 {
        let h = &hashes[i];
        i += 1;
        if declined.get(i - 1).copied().unwrap_or(false) {
            batch.chunks.push(pb::Chunk {
                hash: h.as_bytes().to_vec(),
                data: Bytes::new(),
                declined: true,
            });
            continue;
        }
        // Indexed files first, then files still being received.
        let data = match local.read_hash(h) {
            Ok(Some(d)) => Bytes::from(d),
            _ => node.in_flight_chunk_of(dir, h).unwrap_or_default(),
        };
        size += data.len();
        count += u64::from(!data.is_empty());
        batch.chunks.push(pb::Chunk {
            hash: h.as_bytes().to_vec(),
            data,
            declined: false,
        });
    }
    (batch, i, size as u64, count)
}

/// A peer by address, usable from blocking code (the diff and the
/// materializer are synchronous and run on blocking threads).
#[derive(Debug, Clone)]
pub struct RemotePeer {
    pub id: String,
    address: String,
    transport: Arc<dyn Transport>,
    rt: Handle,
    metrics: Metrics,
    /// Where corrupt chunks are counted against the peer.
    fleet: Arc<FleetView>,
    /// The directory manifest nodes are read for.
    dir: String,
}

impl RemotePeer {
    pub fn new(id: String, address: String, fleet: Arc<FleetView>, rt: Handle) -> RemotePeer {
        RemotePeer {
            id,
            address,
            transport: fleet.transport.clone(),
            rt,
            metrics: fleet.metrics.clone(),
            fleet,
            dir: String::new(),
        }
    }

    /// Reads manifest nodes for directory `dir` (peers under TLS serve
    /// them only to nodes carrying it).
    pub fn reading(mut self, dir: &str) -> RemotePeer {
        self.dir = dir.to_string();
        self
    }

    /// Fetches chunks by hash; returns those the peer had, verified
    /// (on the runtime's threads, off the materializer's).
    pub async fn fetch_chunks(
        transport: Arc<dyn Transport>,
        address: String,
        peer: String,
        req: pb::GetChunksRequest,
        chunks: Vec<ChunkEntry>,
        metrics: Metrics,
        fleet: Arc<FleetView>,
    ) -> Result<Got, Status> {
        use tokio_stream::StreamExt as _;
        // Expected lengths from the recipe: a chunk of another length is
        // corrupt, whatever it hashes to, and is dropped before it is kept
        // (memory was planned for the recipe's lengths).
        let asked: HashMap<Hash, u32> = chunks.into_iter().map(|c| (c.hash, c.len)).collect();
        let mut stream = transport.get_chunks(&address, req).await?;
        let mut out = HashMap::new();
        let mut declined = std::collections::HashSet::new();
        while let Some(batch) = stream.next().await {
            for c in batch?.chunks {
                if c.data.is_empty() {
                    if c.declined
                        && let Ok(h) = hash_of(&c.hash)
                        && asked.contains_key(&h)
                    {
                        declined.insert(h);
                    }
                    continue;
                }
                let h = hash_of(&c.hash)?;
                let Some(&len) = asked.get(&h) else {
                    return Err(Status::invalid_argument(format!(
                        "peer {peer} sent chunk {h} that was not asked for"
                    )));
                };
                if out.contains_key(&h) {
                    continue;
                }
                // Verify before keeping: the length, then the hash. A
                // chunk of the wrong length ends the call: the peer is
                // lying about what it serves, and the rest of its stream
                // is not worth receiving.
                if c.data.len() != len as usize {
                    metrics.corrupt_chunks.with_label_values(&["length"]).inc();
                    fleet.add_corrupt(&peer, 1);
                    tracing::warn!(peer = %peer, chunk = %h, expected = len, got = c.data.len(), "peer sent a chunk of the wrong length; rejected as corrupt");
                    return Err(Status::data_loss(format!(
                        "peer {peer} sent chunk {h} of {} bytes, the recipe says {len}",
                        c.data.len()
                    )));
                } else if Hash::of(&c.data) == h {
                    out.insert(h, c.data);
                } else {
                    metrics.corrupt_chunks.with_label_values(&["hash"]).inc();
                    fleet.add_corrupt(&peer, 1);
                    tracing::warn!(peer = %peer, chunk = %h, "peer sent a chunk that fails BLAKE3 verification");
                }
            }
        }
        Ok(Got {
            chunks: out,
            declined,
        })
    }
}

/// A peer as a chunk source for one directory's transfer.
#[derive(Debug, Clone)]
pub struct PeerChunks {
    pub peer: RemotePeer,
    pub dir: String,
    /// The version's root (for origin protection and have-sets).
    pub root: Vec<u8>,
    /// This node's id, so the peer can account what it serves.
    pub requester: String,
}

impl ChunkPeer for PeerChunks {
    fn name(&self) -> &str {
        &self.peer.id
    }

    fn fetch(&self, chunks: Vec<ChunkEntry>, insist: bool) -> Fut<FetchResult> {
        let (transport, address, id) = (
            self.peer.transport.clone(),
            self.peer.address.clone(),
            self.peer.id.clone(),
        );
        let req = pb::GetChunksRequest {
            dir: self.dir.clone(),
            hashes: chunks.iter().map(|c| c.hash.as_bytes().to_vec()).collect(),
            requester: self.requester.clone(),
            root: self.root.clone(),
            insist,
        };
        let metrics = self.peer.metrics.clone();
        let fleet = self.peer.fleet.clone();
        let histogram = self
            .peer
            .metrics
            .rpc_duration
            .with_label_values(&["get_chunks"]);
        Box::pin(async move {
            let started = std::time::Instant::now();
            let r = RemotePeer::fetch_chunks(transport, address, id, req, chunks, metrics, fleet)
                .await
                .map_err(|s| {
                    let text = format!("{}: {}", s.code(), s.message());
                    if s.code() == tonic::Code::ResourceExhausted {
                        FetchError::Busy(text)
                    } else {
                        FetchError::Failed(text)
                    }
                });
            histogram.observe(started.elapsed().as_secs_f64());
            r
        })
    }

    fn haves(&self, since: u64) -> Fut<Result<HaveDelta, FetchError>> {
        let (transport, address, id) = (
            self.peer.transport.clone(),
            self.peer.address.clone(),
            self.peer.id.clone(),
        );
        let req = pb::HavesRequest {
            dir: self.dir.clone(),
            root: self.root.clone(),
            since,
            wait_ms: crate::haves::MAX_HAVES_WAIT.as_millis() as u32,
            requester: self.requester.clone(),
        };
        Box::pin(async move {
            let r = transport
                .haves(&address, req)
                .await
                .map_err(|s| FetchError::Failed(format!("{}: {}", s.code(), s.message())))?;
            if r.hashes.len() > crate::haves::MAX_HAVES_PER_REPLY {
                return Err(FetchError::Failed(format!(
                    "peer {id} announced {} chunks in one answer, more than {}",
                    r.hashes.len(),
                    crate::haves::MAX_HAVES_PER_REPLY
                )));
            }
            let hashes = r
                .hashes
                .iter()
                .map(|b| Hash::from_slice(b))
                .collect::<Option<Vec<Hash>>>()
                .ok_or_else(|| {
                    FetchError::Failed(format!("peer {id} announced a hash that is not 32 bytes"))
                })?;
            Ok(HaveDelta {
                complete: r.complete,
                gone: r.gone,
                next: r.next,
                hashes,
            })
        })
    }
}

impl RemotePeer {
    /// One `GetNodes` call (timed in `syncd_rpc_duration_seconds`).
    fn get_nodes_call(&self, ids: Vec<Vec<u8>>) -> Result<pb::GetNodesResponse, Status> {
        let started = std::time::Instant::now();
        let (transport, address) = (self.transport.clone(), self.address.clone());
        let req = pb::GetNodesRequest {
            ids,
            dir: self.dir.clone(),
        };
        let resp = crate::env::wait(
            &self.rt,
            async move { transport.get_nodes(&address, req).await },
        );
        self.metrics
            .rpc_duration
            .with_label_values(&["get_nodes"])
            .observe(started.elapsed().as_secs_f64());
        resp
    }

    fn failed(&self, hash: Hash, s: Status) -> StoreError {
        StoreError::SourceFailed {
            hash,
            origin: chunk_store::Origin::Remote,
            reason: format!("peer {}: {s}", self.id),
        }
    }
}

impl NodeSource for RemotePeer {
    fn get_node(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let r = self
            .get_nodes_call(vec![hash.as_bytes().to_vec()])
            .map_err(|s| self.failed(*hash, s))?;
        Ok(r.nodes
            .into_iter()
            .find(|n| n.id == hash.as_bytes())
            .map(|n| n.data.to_vec())
            .filter(|d| !d.is_empty()))
    }

    fn origin(&self) -> chunk_store::Origin {
        chunk_store::Origin::Remote
    }

    /// One `GetNodes` call for up to [`MAX_NODES_PER_CALL`] ids (the peer
    /// may answer fewer: what it left out is asked for when read).
    fn get_many(&self, hashes: &[Hash]) -> Result<Vec<(Hash, Vec<u8>)>, StoreError> {
        let Some(first) = hashes.first() else {
            return Ok(Vec::new());
        };
        let ids = hashes
            .iter()
            .take(MAX_NODES_PER_CALL)
            .map(|h| h.as_bytes().to_vec())
            .collect();
        let r = self
            .get_nodes_call(ids)
            .map_err(|s| self.failed(*first, s))?;
        Ok(r.nodes
            .into_iter()
            .filter(|n| !n.data.is_empty())
            .filter_map(|n| Some((Hash::from_slice(&n.id)?, n.data.to_vec())))
            .collect())
    }
}
