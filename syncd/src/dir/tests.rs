use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chunk_store::ChunkerConfig;
use chunk_store::store::Store;
use sync_proto::pb;
use tonic::Status;

use super::*;
use crate::env::Env;
use crate::fleet::{FleetView, Holder};
use crate::metrics::Metrics;
use crate::topology::PeerClass;
use crate::transport::Transport;

fn local_node(tmp: &std::path::Path, transport: Arc<dyn Transport>, seed: u64) -> Arc<LocalNode> {
    let store = Arc::new(Store::open(&tmp.join("index"), ChunkerConfig::default()).unwrap());
    let fleet = Arc::new(FleetView::new(
        "n1".into(),
        "10.0.0.1:7400".into(),
        BTreeMap::new(),
        1,
        vec![],
        transport,
        Arc::new(Env::seeded(seed)),
        Metrics::new().unwrap(),
    ));
    Arc::new(LocalNode::new(store, fleet))
}

/// A directory `id` of `mode` with one file, created (not started).
fn dir_of(node: &Arc<LocalNode>, tmp: &std::path::Path, id: &str, mode: &str) -> Prepared {
    let data = tmp.join(id);
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("f"), id).unwrap();
    let file: crate::config::DirFile = toml::from_str(&format!(
        "id = \"{id}\"\npath = \"{}\"\nmode = \"{mode}\"\n",
        data.display()
    ))
    .unwrap();
    create(
        node,
        DirState::from_config(id, &file, node.fleet.clone()).unwrap(),
    )
}

/// Issue 8 item 2: a panic in one directory's work, holding the store gate,
/// marks that directory `error` (status and metrics), backs off, leaves no
/// lock unusable, and stops the watchdog only when no directory can make
/// progress.
#[tokio::test]
async fn a_panic_marks_the_directory_and_backs_off_without_poisoning() {
    let tmp = tempfile::tempdir().unwrap();
    let node = local_node(
        tmp.path(),
        Arc::new(crate::transport::grpc::GrpcTransport::default()),
        1,
    );
    let p = dir_of(&node, tmp.path(), "www", "replica");
    let dir = p.handle.state.clone();
    let n = node.clone();
    let e = tokio::task::spawn_blocking(move || {
        let _gate = n.store_gate.write_locked();
        let s = "é".repeat(40);
        let _ = &s[..65]; // the kind of bug that used to poison the node
    })
    .await
    .unwrap_err();
    assert!(node.store_gate.is_poisoned());
    let now = tokio::time::Instant::now();
    let mut retry = Retry::default();
    panicked(&node, &dir, &mut retry, "sync", e.into());
    let s = dir.status();
    assert_eq!(s.state_name(), "error");
    assert!(
        s.reason.contains("panic") || s.reason.contains("byte index"),
        "{}",
        s.reason
    );
    assert!(s.reason.contains("retrying in"), "{}", s.reason);
    assert_eq!((retry.failures, s.failures), (1, 1));
    assert!(retry.next_at.is_some_and(|t| t > now));
    assert!(!retry.due(now, None));
    assert_eq!(
        node.metrics
            .errors
            .with_label_values(&["www", "panic"])
            .get(),
        1
    );
    // The fleet sees the error too.
    let own = node.fleet.own_record();
    assert_eq!(own.reports[0].state, "error");
    // The only directory cannot progress: the watchdog is not fed.
    assert!(!can_progress(std::slice::from_ref(&p.handle)));
    // The poisoned gate is still usable: the next scan runs.
    let (n, d) = (node.clone(), dir.clone());
    tokio::task::spawn_blocking(move || scan(&n, &d))
        .await
        .unwrap()
        .unwrap();
    settled(&dir, &mut retry);
    assert!(can_progress(&[p.handle]));
    assert_eq!(retry.failures, 0);
}

/// A peer whose manifest nodes take seconds to come.
struct SlowPeer;

#[tonic::async_trait]
impl crate::transport::PeerHandler for SlowPeer {
    async fn exchange(
        &self,
        _: crate::transport::Caller,
        _: pb::Holdings,
    ) -> Result<pb::Holdings, Status> {
        Err(Status::unimplemented("slow peer"))
    }
    async fn gossip(
        &self,
        _: crate::transport::Caller,
        _: pb::GossipRequest,
    ) -> Result<pb::GossipReply, Status> {
        Err(Status::unimplemented("slow peer"))
    }
    async fn get_nodes(
        &self,
        _: crate::transport::Caller,
        _: pb::GetNodesRequest,
    ) -> Result<pb::GetNodesResponse, Status> {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(pb::GetNodesResponse::default())
    }
    async fn get_chunks(
        &self,
        _: crate::transport::Caller,
        _: pb::GetChunksRequest,
    ) -> Result<crate::transport::ChunkStream, Status> {
        Err(Status::unimplemented("slow peer"))
    }
    async fn swim(&self, _: crate::transport::Caller, _: pb::SwimPacket) -> Result<(), Status> {
        Ok(())
    }
}

/// Issue 9: no lock is held across network I/O. While one directory's
/// pull waits on a slow peer, another directory scans and garbage
/// collection sweeps (the node-wide index lock used to block both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pull_holds_up_neither_other_directories_nor_collection() {
    let tmp = tempfile::tempdir().unwrap();
    let net = crate::transport::mem::MemNet::new();
    net.listen("10.0.0.9:7400", Arc::new(SlowPeer));
    let node = local_node(tmp.path(), Arc::new(net.transport("10.0.0.1:7400")), 2);
    let a = dir_of(&node, tmp.path(), "a", "replica").handle.state;
    let b = dir_of(&node, tmp.path(), "b", "replica").handle.state;
    let version = pb::DirVersion {
        dir: "a".into(),
        version: 1,
        root: vec![7; 32],
        publisher: "slow".into(),
        entries: 1,
        bytes: 1,
        ..Default::default()
    };
    let holders = vec![Holder {
        id: "slow".into(),
        address: "10.0.0.9:7400".into(),
        class: PeerClass::Elsewhere,
        partial: false,
    }];
    let rt = tokio::runtime::Handle::current();
    let (n, d) = (node.clone(), a.clone());
    let slot = node.transfer_slots.clone().acquire_owned().await.unwrap();
    let pulling = tokio::task::spawn_blocking(move || {
        let mut involved = std::collections::HashSet::new();
        replica::pull(&n, &d, &version, &holders, &rt, slot, &mut involved)
    });
    // The pull has started (its first manifest node takes 3 s).
    let mut watch = a.watch();
    tokio::time::timeout(
        Duration::from_secs(2),
        watch.wait_for(|s| s.phase == Phase::Syncing),
    )
    .await
    .expect("the pull did not start")
    .unwrap();
    drop(watch);
    let started = std::time::Instant::now();
    let (n, d) = (node.clone(), b.clone());
    tokio::time::timeout(
        Duration::from_secs(2),
        tokio::task::spawn_blocking(move || scan(&n, &d)),
    )
    .await
    .expect("the other directory's scan waited for the slow pull")
    .unwrap()
    .unwrap();
    let n = node.clone();
    tokio::time::timeout(
        Duration::from_secs(2),
        tokio::task::spawn_blocking(move || n.collect_garbage()),
    )
    .await
    .expect("garbage collection waited for the slow pull")
    .unwrap()
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    // The pull ends on its own (the peer had no node), blaming the peer
    // by name, and gives back what it registered.
    let err = pulling.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("slow"), "{err}");
    assert_eq!(err.fault(), crate::error::Fault::Peer("slow".into()));
    assert!(a.status().pulling.is_none());
    assert_eq!(node.transfers(), 0);
}

/// The handle drives the actor: a rescan waits for a scan slot (state
/// `waiting`, seen through the status watch), pause and resume show at
/// once, and revert is refused on a source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_drive_the_actor_and_busy_slots_make_it_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let node = local_node(
        tmp.path(),
        Arc::new(crate::transport::grpc::GrpcTransport::default()),
        3,
    );
    let p = dir_of(&node, tmp.path(), "www", "source");
    prepare(&node, &p).await;
    let first = p.handle.status().current.expect("the first scan published");
    let h = p.handle.clone();
    let running = start(&node, p);
    // Every scan slot taken: the next rescan waits.
    let slots = node
        .scan_slots
        .clone()
        .acquire_many_owned(crate::local::SCAN_SLOTS as u32)
        .await
        .unwrap();
    std::fs::write(h.state.path.join("g"), "new").unwrap();
    let mut watch = h.watch();
    let h2 = h.clone();
    let rescan = tokio::spawn(async move { h2.rescan().await });
    tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|s| s.phase == Phase::Waiting),
    )
    .await
    .expect("the rescan did not wait for a slot")
    .unwrap();
    // The record follows the status (right after it, on the actor's thread).
    let mut shown = false;
    for _ in 0..1000 {
        if node.fleet.own_record().reports[0].state == "waiting" {
            shown = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(shown, "the fleet record never showed waiting");
    drop(slots);
    // (The watcher may have asked for the same scan first: either way,
    // when the rescan answers, the new file is the new version.)
    rescan.await.unwrap().unwrap();
    let now = h.status();
    assert_eq!(now.current.as_ref().unwrap().version, first.version + 1);
    assert_eq!(now.phase, Phase::Idle);
    h.pause();
    assert_eq!(h.status().state_name(), "paused");
    assert!(h.rescan().await.unwrap_err().contains("paused"));
    h.resume();
    assert_eq!(h.status().state_name(), "idle");
    assert!(h.revert().unwrap_err().contains("source"));
    running
        .stop(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}
