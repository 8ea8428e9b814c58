//! One suite for both transports: what holds over gRPC holds in the
//! simulation, and the other way round.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio_stream::StreamExt as _;

use super::mem::MemNet;
use super::*;
use crate::locks::LockExt as _;

/// A peer with fixed answers that records what it was sent.
#[derive(Default)]
struct Fixed {
    swims: Mutex<Vec<Bytes>>,
    callers: Mutex<Vec<Caller>>,
}

fn member(id: &str) -> pb::Member {
    pb::Member {
        node_id: id.into(),
        address: format!("{id}:7400"),
        labels: Default::default(),
    }
}

#[tonic::async_trait]
impl PeerHandler for Fixed {
    async fn exchange(&self, caller: Caller, h: pb::Holdings) -> Result<pb::Holdings, Status> {
        self.callers.locked().push(caller);
        let from = h
            .from
            .ok_or_else(|| Status::invalid_argument("holdings without sender"))?;
        Ok(pb::Holdings {
            from: Some(member("server")),
            dirs: vec![pb::DirVersion {
                dir: format!("seen-{}", from.node_id),
                version: 7,
                root: vec![1; 32],
                publisher: "server".into(),
                entries: 1,
                bytes: 2,
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    async fn gossip(&self, _: Caller, r: pb::GossipRequest) -> Result<pb::GossipReply, Status> {
        // Echoes the digest back as the one bucket, and the caller's keys
        // as wants.
        Ok(pb::GossipReply {
            protocol: r.protocol,
            buckets: vec![r.digest],
            want: r.keys.into_iter().map(|k| k.node_id).collect(),
            ..Default::default()
        })
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
                .map(|id| {
                    let data = Bytes::from(id.iter().rev().copied().collect::<Vec<u8>>());
                    pb::NodeBlob { id, data }
                })
                .collect(),
        })
    }

    async fn get_chunks(&self, _: Caller, r: pb::GetChunksRequest) -> Result<ChunkStream, Status> {
        if r.dir != "www" {
            return Err(Status::not_found(format!("no directory {:?}", r.dir)));
        }
        // One batch per hash, in order.
        let batches: Vec<Result<pb::ChunkBatch, Status>> = r
            .hashes
            .into_iter()
            .map(|h| {
                Ok(pb::ChunkBatch {
                    chunks: vec![pb::Chunk {
                        data: Bytes::from(vec![h[0]; 1000]),
                        hash: h,
                        declined: false,
                    }],
                })
            })
            .collect();
        Ok(Box::pin(tokio_stream::iter(batches)))
    }

    async fn swim(&self, _: Caller, p: pb::SwimPacket) -> Result<(), Status> {
        if p.data.len() > 32 << 10 {
            return Err(Status::invalid_argument("SWIM packet larger than 32 KiB"));
        }
        self.swims.locked().push(p.data);
        Ok(())
    }
}

/// What every transport must do against the `Fixed` peer at `to`.
async fn suite(t: &dyn Transport, to: &str, unreachable: &str, peer: &Fixed) {
    let h = pb::Holdings {
        from: Some(member("client")),
        ..Default::default()
    };
    let back = t.exchange(to, h).await.unwrap();
    assert_eq!(back.from.unwrap().node_id, "server");
    assert_eq!(back.dirs[0].dir, "seen-client");
    assert_eq!(back.dirs[0].entries, 1);
    // The handler's error reaches the caller with its code and message.
    let e = t.exchange(to, pb::Holdings::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("without sender"), "{e}");

    let g = t
        .gossip(
            to,
            pb::GossipRequest {
                protocol: 9,
                digest: 0xfeed,
                keys: vec![pb::RecordKey {
                    node_id: "n1".into(),
                    incarnation: 1,
                    seq: 2,
                }],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (g.protocol, g.buckets, g.want),
        (9, vec![0xfeed], vec!["n1".to_string()])
    );

    let ids = vec![vec![1, 2, 3], vec![4, 5]];
    let r = t
        .get_nodes(
            to,
            pb::GetNodesRequest {
                ids: ids.clone(),
                dir: String::new(),
            },
        )
        .await
        .unwrap();
    assert_eq!(r.nodes.len(), 2);
    assert_eq!(r.nodes[0].id, ids[0]);
    assert_eq!(&r.nodes[0].data[..], &[3, 2, 1]);

    let req = pb::GetChunksRequest {
        dir: "www".into(),
        hashes: (0..5u8).map(|i| vec![i; 32]).collect(),
        requester: "client".into(),
        ..Default::default()
    };
    let mut s = t.get_chunks(to, req).await.unwrap();
    let mut got = Vec::new();
    while let Some(b) = s.next().await {
        got.push(b.unwrap().chunks[0].data[0]);
    }
    assert_eq!(got, [0, 1, 2, 3, 4]);
    let e = match t
        .get_chunks(
            to,
            pb::GetChunksRequest {
                dir: "other".into(),
                ..Default::default()
            },
        )
        .await
    {
        Ok(mut s) => s.next().await.unwrap().unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(e.code(), tonic::Code::NotFound);

    t.swim(
        to,
        pb::SwimPacket {
            data: Bytes::from_static(b"ping"),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        peer.swims.locked().last().unwrap(),
        &Bytes::from_static(b"ping")
    );
    let e = t
        .swim(
            to,
            pb::SwimPacket {
                data: Bytes::from(vec![0; 33 << 10]),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Nobody there: UNAVAILABLE, as a refused TCP connection is.
    let e = t
        .exchange(unreachable, pb::Holdings::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");

    // The caller's address reaches the handler.
    assert!(peer.callers.locked().iter().all(|c| c.ip.is_some()));
}

#[tokio::test]
async fn the_in_memory_transport_passes_the_suite() {
    let net = MemNet::new();
    let peer = Arc::new(Fixed::default());
    net.listen("10.0.0.1:7400", peer.clone());
    let t = net.transport("10.0.0.2:7400");
    suite(&t, "10.0.0.1:7400", "10.0.0.9:7400", &peer).await;
}

#[tokio::test]
async fn the_grpc_transport_passes_the_suite() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let peer = Arc::new(Fixed::default());
    let server = tonic::transport::Server::builder()
        .add_service(grpc::GrpcServer::service(peer.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    let task = tokio::spawn(server);
    // A port nothing listens on: bound and dropped.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unreachable = closed.local_addr().unwrap().to_string();
    drop(closed);
    let t = grpc::GrpcTransport::default();
    suite(&t, &addr, &unreachable, &peer).await;
    assert!(t.known().contains(&addr));
    t.retain(&|a| a != addr);
    assert!(!t.known().contains(&addr));
    task.abort();
}

/// Links of the in-memory network: cut, healed, delayed, counted.
#[tokio::test(start_paused = true)]
async fn in_memory_links_can_be_cut_delayed_and_counted() {
    let net = MemNet::new();
    let peer = Arc::new(Fixed::default());
    let (a, b) = ("10.0.0.1:7400", "10.0.0.2:7400");
    net.listen(a, peer.clone());
    let t = net.transport(b);
    let h = || pb::Holdings {
        from: Some(member("client")),
        ..Default::default()
    };
    t.exchange(a, h()).await.unwrap();
    assert_eq!(net.calls(b, a), 1);
    let one = net.bytes(b, a);
    assert!(one > 0);

    net.cut(a, b);
    let e = t.exchange(a, h()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("cut"), "{e}");
    assert_eq!(net.bytes(b, a), one, "nothing crosses a cut link");
    net.heal(a, b);

    net.delay(b, a, Duration::from_millis(250));
    let started = tokio::time::Instant::now();
    t.exchange(a, h()).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(250));
    assert_eq!(net.bytes(b, a), 2 * one);
    assert_eq!(net.bytes_from(b), 2 * one);

    // A link cut while a chunk stream is being read ends it.
    let req = pb::GetChunksRequest {
        dir: "www".into(),
        hashes: (0..3u8).map(|i| vec![i; 32]).collect(),
        requester: String::new(),
        ..Default::default()
    };
    let mut s = t.get_chunks(a, req).await.unwrap();
    assert!(s.next().await.unwrap().is_ok());
    net.cut(a, b);
    assert_eq!(
        s.next().await.unwrap().unwrap_err().code(),
        tonic::Code::Unavailable
    );
    net.unlisten(a);
    net.heal(a, b);
    let e = t.exchange(a, h()).await.unwrap_err();
    assert!(e.message().contains("nothing listens"), "{e}");
}

/// Issue 11, item 3 (no reflector): under TLS an address that presents no
/// fleet certificate is dialled once, not on every call, for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_without_a_fleet_certificate_is_not_dialled_again() {
    use crate::tls::{Tls, TlsFiles, pki};
    let t = tempfile::tempdir().unwrap();
    let (ca, certs) = (t.path().join("ca"), t.path().join("certs"));
    pki::init(&ca, "test CA", 5).unwrap();
    pki::issue(&ca, "me", 5, &certs).unwrap();
    let tls = Tls::new(
        TlsFiles {
            ca: pki::ca_files(&ca).0,
            cert: certs.join("me.pem"),
            key: certs.join("me.key"),
        },
        "me",
    )
    .unwrap();
    let transport = grpc::GrpcTransport::with_tls(Arc::new(tls));
    // Not syncd: accepts, reads, closes (as a victim of reflection would).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            });
        }
    });
    let packet = || pb::SwimPacket {
        data: Bytes::from_static(b"x"),
    };
    assert!(transport.swim(&to, packet()).await.is_err());
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(transport.failing(), 1);
    for _ in 0..20 {
        let e = transport.swim(&to, packet()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "dialled again"
    );
}
