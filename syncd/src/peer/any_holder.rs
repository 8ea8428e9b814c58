//! A version's manifest from any of its full holders (issue 11): a peer
//! that lists a genuine signed version and then answers `GetNodes` with
//! nothing — or with bytes that are not the node — no longer blocks the
//! pull. Nodes are content-addressed, so whichever holder answers, the
//! answer is checked against its id; a holder that fails is passed over
//! for the rest of this pull and reported, and the next one is asked.

use std::cell::{Cell, RefCell};

use chunk_store::manifest::NodeSource;
use chunk_store::{Error as StoreError, Hash};

use super::RemotePeer;

/// Full holders of one version, nearest first, as one node source.
#[derive(Debug)]
pub struct AnyHolder<'a> {
    peers: Vec<&'a RemotePeer>,
    /// The holder asked first: the last one that answered.
    current: Cell<usize>,
    /// Holders passed over, with why and whether they lied (no node of
    /// the version, or other bytes) rather than failed to answer.
    failed: RefCell<Vec<(String, String, bool)>>,
}

impl<'a> AnyHolder<'a> {
    pub fn new(peers: Vec<&'a RemotePeer>) -> AnyHolder<'a> {
        AnyHolder {
            peers,
            current: Cell::new(0),
            failed: RefCell::default(),
        }
    }

    /// The holders passed over in this pull, and why.
    pub fn failed(&self) -> Vec<(String, String)> {
        self.failed
            .borrow()
            .iter()
            .map(|(id, why, _)| (id.clone(), why.clone()))
            .collect()
    }

    /// Those of them that answered with something other than the node (a
    /// lie, not an outage).
    pub fn lied(&self) -> Vec<(String, String)> {
        self.failed
            .borrow()
            .iter()
            .filter(|(_, _, lied)| *lied)
            .map(|(id, why, _)| (id.clone(), why.clone()))
            .collect()
    }

    /// The holder answering now (for messages).
    pub fn current(&self) -> &str {
        self.peers
            .get(self.current.get())
            .map_or("(none)", |p| p.id.as_str())
    }

    fn usable(&self, i: usize) -> bool {
        let id = &self.peers[i].id;
        !self.failed.borrow().iter().any(|(f, _, _)| f == id)
    }

    fn fail(&self, i: usize, why: String, lied: bool) {
        let id = self.peers[i].id.clone();
        tracing::warn!(peer = %id, "passing over a holder for this version's manifest: {why}");
        self.failed.borrow_mut().push((id, why, lied));
    }
}

impl NodeSource for AnyHolder<'_> {
    fn get_node(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let n = self.peers.len();
        let mut last_error = None;
        for k in 0..n {
            let i = (self.current.get() + k) % n;
            if !self.usable(i) {
                continue;
            }
            match self.peers[i].get_node(hash) {
                Ok(Some(data)) if Hash::of(&data) == *hash => {
                    self.current.set(i);
                    return Ok(Some(data));
                }
                Ok(Some(_)) => self.fail(i, format!("sent node {hash} with other content"), true),
                Ok(None) => self.fail(
                    i,
                    format!("claims the version but does not have its node {hash}"),
                    true,
                ),
                Err(e) => {
                    self.fail(i, e.to_string(), false);
                    last_error = Some(e);
                }
            }
        }
        match last_error {
            // Every holder failed, the last one with an error: that error.
            Some(e) if self.failed.borrow().len() >= n => Err(e),
            _ => Ok(None),
        }
    }

    fn origin(&self) -> chunk_store::Origin {
        chunk_store::Origin::Remote
    }

    /// From the holder answering now; what it leaves out, or sends wrong,
    /// is asked for on its own (from whichever holder has it).
    fn get_many(&self, hashes: &[Hash]) -> Result<Vec<(Hash, Vec<u8>)>, StoreError> {
        let i = self.current.get();
        if self.peers.is_empty() || !self.usable(i) {
            return Ok(Vec::new());
        }
        match self.peers[i].get_many(hashes) {
            Ok(nodes) => {
                let (good, bad): (Vec<_>, Vec<_>) =
                    nodes.into_iter().partition(|(h, d)| Hash::of(d) == *h);
                if let Some((h, _)) = bad.first() {
                    self.fail(i, format!("sent node {h} with other content"), true);
                }
                Ok(good)
            }
            Err(_) => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Arc;

    use sync_proto::pb;
    use tonic::Status;

    use super::*;
    use crate::env::Env;
    use crate::fleet::FleetView;
    use crate::metrics::Metrics;
    use crate::transport::mem::MemNet;
    use crate::transport::{Caller, ChunkStream, PeerHandler};

    /// A holder answering `GetNodes` from a map (an honest one has every
    /// node of its version; a liar has none, or other bytes).
    struct Nodes(HashMap<Vec<u8>, Vec<u8>>);

    #[tonic::async_trait]
    impl PeerHandler for Nodes {
        async fn exchange(&self, _: Caller, _: pb::Holdings) -> Result<pb::Holdings, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn gossip(&self, _: Caller, _: pb::GossipRequest) -> Result<pb::GossipReply, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn get_nodes(
            &self,
            _: Caller,
            r: pb::GetNodesRequest,
        ) -> Result<pb::GetNodesResponse, Status> {
            Ok(pb::GetNodesResponse {
                nodes: r
                    .ids
                    .into_iter()
                    .map(|id| pb::NodeBlob {
                        data: self.0.get(&id).cloned().unwrap_or_default().into(),
                        id,
                    })
                    .collect(),
            })
        }
        async fn get_chunks(
            &self,
            _: Caller,
            _: pb::GetChunksRequest,
        ) -> Result<ChunkStream, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn swim(&self, _: Caller, _: pb::SwimPacket) -> Result<(), Status> {
            Ok(())
        }
    }

    /// Withholding and corrupting holders are passed over, nearest first
    /// or not, and named; the honest one serves every node.
    #[test]
    fn a_manifest_comes_from_any_holder_and_liars_are_named() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let net = MemNet::new();
        let node = |i: u8| vec![1, 0, 0, 0, 0, 0, 0, i];
        let ids: Vec<Hash> = (0..3).map(|i| Hash::of(&node(i))).collect();
        let honest: HashMap<Vec<u8>, Vec<u8>> = (0..3)
            .map(|i| (ids[usize::from(i)].as_bytes().to_vec(), node(i)))
            .collect();
        let wrong: HashMap<Vec<u8>, Vec<u8>> = honest
            .keys()
            .map(|k| (k.clone(), b"other bytes".to_vec()))
            .collect();
        net.listen("withholds:7400", Arc::new(Nodes(HashMap::new())));
        net.listen("corrupts:7400", Arc::new(Nodes(wrong)));
        net.listen("honest:7400", Arc::new(Nodes(honest)));
        let fleet = Arc::new(FleetView::new(
            "me".into(),
            "me:7400".into(),
            BTreeMap::new(),
            1,
            vec![],
            Arc::new(net.transport("me:7400")),
            Arc::new(Env::seeded(1)),
            Metrics::new().unwrap(),
        ));
        let peer = |id: &str| {
            RemotePeer::new(
                id.into(),
                format!("{id}:7400"),
                fleet.clone(),
                rt.handle().clone(),
            )
        };
        let peers = [peer("withholds"), peer("corrupts"), peer("honest")];
        let any = AnyHolder::new(peers.iter().collect());
        for id in &ids {
            let got = any.get_node(id).unwrap().expect("the honest holder has it");
            assert_eq!(Hash::of(&got), *id);
        }
        assert_eq!(any.current(), "honest");
        let failed = any.failed();
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(failed[0].0 == "withholds" && failed[0].1.contains("does not have its node"));
        assert!(failed[1].0 == "corrupts" && failed[1].1.contains("with other content"));
        // With only liars, the node is missing, not an error of ours.
        let liars = AnyHolder::new(peers[..2].iter().collect());
        assert_eq!(liars.get_node(&ids[0]).unwrap(), None);
        assert_eq!(liars.failed().len(), 2);
        assert_eq!(liars.lied().len(), 2);
    }
}
