//! Epidemic push-pull gossip of records, so every node's view of the
//! fleet converges while idle traffic stays flat as the fleet grows.
//!
//! Each round (every [`ROUND`], jittered) a node picks [`FANOUT`] random
//! live peers and, with each:
//!
//! 1. sends the XOR digest of the records it counts (its own and live
//!    peers'). Equal digests end the round trip: ~40 bytes each way,
//!    whatever the fleet's size;
//! 2. otherwise gets the peer's [`BUCKETS`](super::BUCKETS) bucket
//!    digests, and sends its record keys in the buckets that differ; the
//!    peer answers with the records it has newer and the ids it wants;
//! 3. sends those records.
//!
//! A change of this node's own record is pushed at once to
//! [`PUSH_FANOUT`] peers, and a record that brings a version newer than a
//! node knew of is forwarded the same way by whoever receives it: a
//! publish crosses the fleet in a few network hops, and the rounds repair
//! whatever a lost push missed. Bootstrap addresses that SWIM has not
//! confirmed as members get a direct `Exchange` each round.

use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use sync_proto::pb;
use tonic::Status;

use super::{BUCKETS, FleetView, Via};
use crate::error::Refusal;
use crate::wire;

/// Time between rounds (±10 % jitter).
pub const ROUND: Duration = Duration::from_secs(1);
/// Peers a round exchanges digests with.
pub const FANOUT: usize = 2;
/// Peers a new version is pushed to at once.
pub const PUSH_FANOUT: usize = 3;
/// A gossip call that takes longer is a failure.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Most records, and record bytes, one call carries.
pub const MAX_RECORDS_PER_CALL: usize = 256;
pub const MAX_CALL_BYTES: usize = 4 << 20;
/// Most keys step 2 may list.
pub const MAX_KEYS: usize = super::MAX_PEERS + 1;

fn count(view: &FleetView, kind: &str, direction: &str, bytes: usize) {
    view.metrics
        .gossip_messages
        .with_label_values(&[kind, direction])
        .inc();
    view.metrics
        .gossip_bytes
        .with_label_values(&[kind, direction])
        .inc_by(bytes as u64);
}

/// How a node gossips.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Push new versions at once (off: rounds alone, as when every push
    /// is lost; the scale benchmark measures both).
    pub push: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { push: true }
    }
}

/// Runs rounds and pushes until the task is dropped.
pub async fn run(view: Arc<FleetView>) {
    run_with(view, Options::default()).await
}

pub async fn run_with(view: Arc<FleetView>, opts: Options) {
    let mut next = tokio::time::Instant::now() + ROUND.mul_f64(view.env.uniform(0.0..1.0));
    loop {
        // Biased (a seed replays the same choice); the round comes first,
        // so a steady stream of pushes cannot hold rounds off.
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(next) => {
                next = tokio::time::Instant::now() + ROUND.mul_f64(view.env.uniform(0.9..1.1));
                round(&view).await;
            }
            _ = view.push_wanted() => {
                if opts.push {
                    push(&view).await;
                } else {
                    view.take_pushes();
                }
            }
        }
    }
}

/// One round: digests with [`FANOUT`] live peers, `Exchange` with the
/// unconfirmed bootstrap addresses.
pub async fn round(view: &Arc<FleetView>) {
    let mut calls = tokio::task::JoinSet::new();
    for (id, address) in view.pick(FANOUT, &[]) {
        let view = view.clone();
        calls.spawn(async move {
            if let Err(e) = anti_entropy(&view, &id, &address).await {
                tracing::debug!(peer = %id, address = %address, error = %e, "gossip round failed");
            }
        });
    }
    for address in view.unconfirmed_bootstrap() {
        let view = view.clone();
        calls.spawn(async move {
            if let Err(e) = exchange(&view, &address).await {
                // Liveness is SWIM's call, not one failed exchange's.
                tracing::debug!(address = %address, error = %e, "exchange failed");
            }
        });
    }
    while calls.join_next().await.is_some() {}
}

/// Pushes queued records (own changes, and news to forward).
pub async fn push(view: &Arc<FleetView>) {
    let mut calls = tokio::task::JoinSet::new();
    for (record, skip) in view.take_pushes() {
        for (id, address) in view.pick(PUSH_FANOUT, &skip) {
            let view = view.clone();
            let record = record.clone();
            calls.spawn(async move {
                let req = pb::GossipRequest {
                    protocol: wire::PROTOCOL,
                    from: view.id.clone(),
                    records: vec![(*record).clone()],
                    ..Default::default()
                };
                count(&view, "push", "sent", req.encoded_len());
                let r =
                    tokio::time::timeout(CALL_TIMEOUT, view.transport.gossip(&address, req)).await;
                if !matches!(r, Ok(Ok(_))) {
                    tracing::debug!(peer = %id, "push failed");
                }
            });
        }
    }
    while calls.join_next().await.is_some() {}
}

async fn call(
    view: &FleetView,
    address: &str,
    kind: &str,
    req: pb::GossipRequest,
) -> Result<pb::GossipReply, Status> {
    count(view, kind, "sent", req.encoded_len());
    let reply = tokio::time::timeout(CALL_TIMEOUT, view.transport.gossip(address, req))
        .await
        .map_err(|_| Status::deadline_exceeded("gossip call timed out"))??;
    count(view, kind, "received", reply.encoded_len());
    wire::check_protocol(reply.protocol).map_err(Status::failed_precondition)?;
    Ok(reply)
}

/// Steps 1 to 3 with one peer.
async fn anti_entropy(view: &Arc<FleetView>, id: &str, address: &str) -> Result<(), Status> {
    let started = tokio::time::Instant::now();
    let mine = view.buckets();
    let digest = mine.iter().fold(0, |a, b| a ^ b);
    let req = pb::GossipRequest {
        protocol: wire::PROTOCOL,
        from: view.id.clone(),
        digest,
        ..Default::default()
    };
    let reply = call(view, address, "digest", req).await?;
    view.measured(id, started.elapsed());
    if reply.in_sync {
        return Ok(());
    }
    if reply.buckets.len() != BUCKETS {
        return Err(Status::invalid_argument(format!(
            "peer {id} answered a digest with {} buckets, not {BUCKETS}",
            reply.buckets.len()
        )));
    }
    let differ: Vec<u32> = (0..BUCKETS)
        .filter(|&i| reply.buckets[i] != mine[i])
        .map(|i| i as u32)
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    let req = pb::GossipRequest {
        protocol: wire::PROTOCOL,
        from: view.id.clone(),
        keys: view.keys_in(&differ),
        buckets: differ,
        ..Default::default()
    };
    let reply = call(view, address, "reconcile", req).await?;
    if reply.records.len() > MAX_RECORDS_PER_CALL || reply.want.len() > MAX_RECORDS_PER_CALL {
        return Err(Status::invalid_argument(format!(
            "peer {id} sent more than {MAX_RECORDS_PER_CALL} records or wants"
        )));
    }
    for r in reply.records {
        if let Err(e) = view.learn(r, Via::Relay(id)) {
            tracing::debug!(peer = %id, error = %e, "refused a relayed record");
        }
    }
    if reply.want.is_empty() {
        return Ok(());
    }
    let records = view.records(reply.want.iter().map(String::as_str));
    if records.is_empty() {
        return Ok(());
    }
    let req = pb::GossipRequest {
        protocol: wire::PROTOCOL,
        from: view.id.clone(),
        records,
        ..Default::default()
    };
    call(view, address, "records", req).await?;
    Ok(())
}

/// A direct exchange of own records with `address` (a bootstrap address
/// SWIM has not confirmed).
async fn exchange(view: &Arc<FleetView>, address: &str) -> Result<(), Status> {
    let req = (*view.own_record()).clone();
    count(view, "exchange", "sent", req.encoded_len());
    let started = tokio::time::Instant::now();
    let reply = tokio::time::timeout(CALL_TIMEOUT, view.transport.exchange(address, req))
        .await
        .map_err(|_| Status::deadline_exceeded("exchange timed out"))??;
    count(view, "exchange", "received", reply.encoded_len());
    let from = reply.from.as_ref().map(|m| m.node_id.clone());
    match view.learn(reply, Via::Direct) {
        Ok(_) => {
            if let Some(id) = from {
                view.measured(&id, started.elapsed());
            }
            Ok(())
        }
        Err(e) => {
            tracing::warn!(peer = %address, error = %e, "peer sent an invalid record");
            Err(e.to_status())
        }
    }
}

/// The callee's side of `Gossip`.
pub fn answer(view: &FleetView, req: pb::GossipRequest) -> Result<pb::GossipReply, Refusal> {
    let peer = wire::short(&req.from);
    count(view, kind_of(&req), "received", req.encoded_len());
    wire::check_protocol(req.protocol).map_err(|reason| Refusal::Protocol {
        peer: peer.clone(),
        reason,
    })?;
    if !wire::is_id(&req.from) {
        return Err(Refusal::Invalid {
            peer,
            reason: "gossip from a malformed node id".into(),
        });
    }
    if req.records.len() > MAX_RECORDS_PER_CALL
        || req.keys.len() > MAX_KEYS
        || req.buckets.len() > BUCKETS
        || req.buckets.iter().any(|b| *b as usize >= BUCKETS)
    {
        return Err(Refusal::Invalid {
            peer,
            reason: format!(
                "gossip beyond its bounds ({MAX_RECORDS_PER_CALL} records, {MAX_KEYS} keys, {BUCKETS} buckets)"
            ),
        });
    }
    let mut reply = pb::GossipReply {
        protocol: wire::PROTOCOL,
        ..Default::default()
    };
    if !req.records.is_empty() {
        for r in req.records {
            if let Err(e) = view.learn(r, Via::Relay(&req.from)) {
                tracing::debug!(peer = %req.from, error = %e, "refused a relayed record");
            }
        }
    } else if !req.buckets.is_empty() {
        let (records, want) = view.reconcile(&req.buckets, &req.keys);
        reply.records = records;
        reply.want = want;
    } else {
        let buckets = view.buckets();
        if buckets.iter().fold(0, |a, b| a ^ b) == req.digest {
            reply.in_sync = true;
        } else {
            reply.buckets = buckets.to_vec();
        }
    }
    count(view, kind_of_reply(&reply), "sent", reply.encoded_len());
    Ok(reply)
}

fn kind_of(req: &pb::GossipRequest) -> &'static str {
    if !req.records.is_empty() {
        "records"
    } else if !req.buckets.is_empty() {
        "reconcile"
    } else {
        "digest"
    }
}

fn kind_of_reply(r: &pb::GossipReply) -> &'static str {
    if !r.records.is_empty() || !r.want.is_empty() {
        "reconcile"
    } else {
        "digest"
    }
}
