//! A peer that answers only the fleet's calls (records, gossip, SWIM):
//! what the scale simulation runs a thousand of, without stores or
//! directories. The daemon's `PeerService` answers the same calls the
//! same way, through the same functions.

use std::sync::Arc;

use sync_proto::pb;
use tonic::Status;

use super::{FleetView, Via};
use crate::transport::{Caller, ChunkStream, PeerHandler};

#[derive(Debug, Clone)]
pub struct FleetPeer(pub Arc<FleetView>);

#[tonic::async_trait]
impl PeerHandler for FleetPeer {
    async fn exchange(&self, caller: Caller, h: pb::Holdings) -> Result<pb::Holdings, Status> {
        caller.claims("record", h.from.as_ref().map_or("", |m| m.node_id.as_str()))?;
        self.0.learn(h, Via::Direct)?;
        Ok((*self.0.own_record()).clone())
    }

    async fn gossip(&self, _: Caller, r: pb::GossipRequest) -> Result<pb::GossipReply, Status> {
        Ok(super::gossip::answer(&self.0, r)?)
    }

    async fn get_nodes(
        &self,
        _: Caller,
        _: pb::GetNodesRequest,
    ) -> Result<pb::GetNodesResponse, Status> {
        Err(Status::unimplemented(
            "a fleet-only peer serves no manifests",
        ))
    }

    async fn get_chunks(&self, _: Caller, _: pb::GetChunksRequest) -> Result<ChunkStream, Status> {
        Err(Status::unimplemented("a fleet-only peer serves no chunks"))
    }

    async fn swim(&self, caller: Caller, p: pb::SwimPacket) -> Result<(), Status> {
        Ok(self.0.swim_packet(&caller, p.data)?)
    }
}
