use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sync_proto::pb;

use super::*;
use crate::transport::grpc::GrpcTransport;
use crate::transport::mem::MemNet;

fn view(id: &str, address: &str, transport: Arc<dyn Transport>, seed: u64) -> Arc<FleetView> {
    Arc::new(FleetView::new(
        id.into(),
        address.into(),
        BTreeMap::new(),
        1,
        vec![],
        transport,
        Arc::new(Env::seeded(seed)),
        Metrics::new().unwrap(),
    ))
}

fn record(
    id: &str,
    seq: u64,
    labels: std::collections::HashMap<String, String>,
    dirs: Vec<&str>,
) -> pb::Holdings {
    pb::Holdings {
        from: Some(pb::Member {
            node_id: id.into(),
            address: "10.0.0.6:7400".into(),
            labels,
        }),
        dirs: dirs
            .into_iter()
            .map(|d| pb::DirVersion {
                dir: d.into(),
                version: seq,
                root: vec![seq as u8; 32],
                publisher: id.into(),
                entries: 1,
                bytes: 1,
                ..Default::default()
            })
            .collect(),
        protocol: wire::PROTOCOL,
        incarnation: 1,
        seq,
        ..Default::default()
    }
}

/// Issue 8 item 8: members down for DEAD_TTL are forgotten with their
/// channels; oversized labels and records are refused whole.
#[tokio::test(start_paused = true)]
async fn dead_members_are_forgotten_and_peer_keys_bounded() {
    let grpc = Arc::new(GrpcTransport::default());
    let v = view("n1", "127.0.0.1:7400", grpc.clone(), 1);
    for (id, addr, state) in [
        ("gone", "10.0.0.9:7400", Liveness::Down),
        ("here", "10.0.0.8:7400", Liveness::Alive),
    ] {
        v.member(
            &Ident {
                address: addr.into(),
                node_id: id.into(),
                bump: 1,
            },
            state,
        );
        grpc.prime(addr);
    }
    grpc.prime("10.0.0.7:7400"); // an address nobody has
    // Not yet: down for less than the TTL (on the paused clock).
    tokio::time::advance(DEAD_TTL - Duration::from_secs(1)).await;
    v.forget_dead();
    assert!(v.peers().iter().any(|(id, _)| id == "gone"));
    tokio::time::advance(Duration::from_secs(2)).await;
    v.forget_dead();
    let ids: Vec<String> = v.peers().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["here"]);
    assert_eq!(v.transport.known(), ["10.0.0.8:7400"]);

    let big = "x".repeat(1 << 20);
    let err = v
        .learn(
            record("evil", 1, [("rack".to_string(), big)].into(), vec!["www"]),
            Via::Direct,
        )
        .unwrap_err();
    let status = err.to_status();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().len() < 1024, "{}", status.message().len());
    assert!(!v.peers().iter().any(|(id, _)| id == "evil"));
    let err = v
        .learn(
            record(
                "evil",
                1,
                [("colour".to_string(), "red".to_string())].into(),
                vec![],
            ),
            Via::Direct,
        )
        .unwrap_err();
    assert_eq!(err.to_status().code(), tonic::Code::InvalidArgument);
    let many: Vec<String> = (0..=wire::MAX_RECORD_DIRS)
        .map(|i| format!("d{i}"))
        .collect();
    let err = v
        .learn(
            record(
                "evil",
                1,
                Default::default(),
                many.iter().map(String::as_str).collect(),
            ),
            Via::Direct,
        )
        .unwrap_err();
    assert!(err.to_string().contains("more than"), "{err}");
    assert!(
        v.learn(
            record("evil", 1, Default::default(), vec!["www"]),
            Via::Direct
        )
        .unwrap()
    );
    assert_eq!(
        v.view_bytes(),
        v.peers()
            .iter()
            .filter_map(|(_, p)| p.record.as_ref())
            .map(|r| prost::Message::encoded_len(&**r))
            .sum::<usize>()
    );
}

/// Keys order records: a relayed record replaces only a smaller key, the
/// owner's own word an equal one too; a record bringing a newer version
/// is queued to travel on, one that does not is not.
#[tokio::test(start_paused = true)]
async fn larger_keys_win_and_news_travels_on() {
    let v = view(
        "n1",
        "10.0.0.1:7400",
        Arc::new(MemNet::new().transport("10.0.0.1:7400")),
        2,
    );
    assert!(
        v.learn(
            record("a", 2, Default::default(), vec!["www"]),
            Via::Relay("b")
        )
        .unwrap()
    );
    let pushes = v.take_pushes();
    assert_eq!(pushes.len(), 1);
    assert_eq!(
        pushes[0].1,
        ["b", "a"],
        "neither the relay nor the owner is pushed to"
    );
    assert!(
        !v.learn(
            record("a", 1, Default::default(), vec!["www"]),
            Via::Relay("b")
        )
        .unwrap()
    );
    assert!(
        !v.learn(
            record("a", 2, Default::default(), vec!["www"]),
            Via::Relay("c")
        )
        .unwrap()
    );
    assert!(
        v.learn(record("a", 2, Default::default(), vec!["www"]), Via::Direct)
            .unwrap()
    );
    assert_eq!(v.newest("www").unwrap().version, 2);
    // The same version again is no news.
    assert!(v.take_pushes().is_empty());
    // A protocol-1 record is refused with a clear reason.
    let mut old = record("z", 1, Default::default(), vec![]);
    old.protocol = 0;
    let e = v.learn(old, Via::Direct).unwrap_err();
    assert!(e.to_string().contains("protocol 1"), "{e}");
}

/// Own changes: a new version enters the record at once and is pushed;
/// rate alone waits for the soft interval.
#[tokio::test(start_paused = true)]
async fn own_record_changes_hard_at_once_and_soft_later() {
    let v = view(
        "n1",
        "10.0.0.1:7400",
        Arc::new(MemNet::new().transport("10.0.0.1:7400")),
        3,
    );
    let seq = v.own_record().seq;
    let mut d = OwnDir {
        held: Some(
            record("n1", 1, Default::default(), vec!["www"])
                .dirs
                .remove(0),
        ),
        pulling: None,
        report: pb::DirReport {
            state: "idle".into(),
            mode: "source".into(),
            ..Default::default()
        },
    };
    v.set_dir("www", d.clone());
    assert_eq!(v.own_record().seq, seq + 1);
    assert_eq!(v.take_pushes().len(), 1);
    d.report.rate = 1e6;
    v.set_dir("www", d.clone());
    v.tick();
    assert_eq!(v.own_record().seq, seq + 1, "a rate change waits");
    tokio::time::advance(SOFT_EVERY).await;
    v.tick();
    assert_eq!(v.own_record().seq, seq + 2);
    assert_eq!(v.own_record().reports[0].rate, 1e6);
    assert!(v.take_pushes().is_empty(), "soft changes are not pushed");
}

async fn rounds(views: &[Arc<FleetView>]) {
    let mut set = tokio::task::JoinSet::new();
    for v in views {
        let v = v.clone();
        set.spawn(async move { gossip::round(&v).await });
    }
    while set.join_next().await.is_some() {}
}

/// Anti-entropy alone (pushes dropped) brings every record everywhere,
/// then digests agree and a round costs the same few bytes per node.
#[tokio::test(start_paused = true)]
async fn digests_converge_without_pushes_and_idle_rounds_stay_small() {
    let net = MemNet::new();
    let views = crate::sim::fleet::members(&net, 40, 4);
    for v in &views {
        v.set_dir(
            "www",
            OwnDir {
                report: pb::DirReport {
                    state: "idle".into(),
                    mode: "replica".into(),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        v.take_pushes();
    }
    let mut n = 0;
    while views.iter().any(|v| v.digest() != views[0].digest()) {
        rounds(&views).await;
        n += 1;
        assert!(n < 30, "no convergence in 30 rounds");
    }
    for v in &views {
        assert_eq!(
            v.peers().iter().filter(|(_, p)| p.record.is_some()).count(),
            39
        );
    }
    let before = net.bytes_from_all();
    rounds(&views).await;
    let idle = (net.bytes_from_all() - before) as f64 / views.len() as f64;
    assert!(idle < 300.0, "an idle round cost {idle} bytes per node");
}

/// A peer of another protocol version is refused with a clear error, at
/// both steps of a round and for pushed records.
#[tokio::test(start_paused = true)]
async fn a_peer_of_another_protocol_is_refused_clearly() {
    let net = MemNet::new();
    let views = crate::sim::fleet::members(&net, 2, 5);
    let t = net.transport("10.9.9.9:7400");
    let old = pb::GossipRequest {
        protocol: 1,
        from: "old".into(),
        digest: 7,
        ..Default::default()
    };
    let e = t.gossip(&views[0].address, old).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("protocol 1") && e.message().contains("this node speaks 2"),
        "{e}"
    );
    let mut rec = record("old", 1, Default::default(), vec!["www"]);
    rec.protocol = 1;
    let e = t.exchange(&views[0].address, rec).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("protocol 1"), "{e}");
    assert!(!views[0].peers().iter().any(|(id, _)| id == "old"));
}

/// A live member seen polling for a version is a receiver of it before its
/// record says so; a stranger, or a poll for another version, is not.
#[tokio::test(start_paused = true)]
async fn a_peer_polling_for_a_version_is_taken_as_its_receiver() {
    let v = view(
        "n1",
        "10.0.0.1:7400",
        Arc::new(MemNet::new().transport("10.0.0.1:7400")),
        3,
    );
    v.member(
        &Ident {
            address: "10.0.0.2:7400".into(),
            node_id: "n2".into(),
            bump: 1,
        },
        Liveness::Alive,
    );
    let version = pb::DirVersion {
        dir: "www".into(),
        version: 7,
        root: vec![7; 32],
        ..Default::default()
    };
    assert!(v.holders(&version).is_empty());
    v.saw_receiver("stranger", "www", &[7; 32]);
    v.saw_receiver("n2", "www", &[8; 32]);
    assert!(v.holders(&version).is_empty());
    let learned = v.learned.notified();
    tokio::pin!(learned);
    learned.as_mut().enable();
    v.saw_receiver("n2", "www", &[7; 32]);
    let holders = v.holders(&version);
    assert_eq!(holders.len(), 1);
    assert_eq!(
        (holders[0].id.as_str(), holders[0].address.as_str()),
        ("n2", "10.0.0.2:7400")
    );
    assert!(holders[0].partial);
    // Transfers waiting for sources are woken.
    tokio::time::timeout(Duration::from_millis(1), learned)
        .await
        .expect("saw_receiver wakes discovery");
}

/// Sources are ordered by topology tier, then by measured round trip
/// (unmeasured last), whatever the seed: a weight on the order, never a
/// filter.
#[tokio::test(start_paused = true)]
async fn holders_are_ordered_by_tier_then_measured_round_trip() {
    let rack = |r: &str| -> std::collections::HashMap<String, String> {
        [("region", "eu"), ("zone", "a"), ("rack", r)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    for seed in 0..16 {
        let v = Arc::new(FleetView::new(
            "n1".into(),
            "10.0.0.1:7400".into(),
            rack("r1").into_iter().collect(),
            1,
            vec![],
            Arc::new(MemNet::new().transport("10.0.0.1:7400")),
            Arc::new(Env::seeded(seed)),
            Metrics::new().unwrap(),
        ));
        for (id, r) in [
            ("near-slow", "r1"),
            ("far-fast", "r9"),
            ("far-slow", "r9"),
            ("far-new", "r9"),
        ] {
            assert!(
                v.learn(record(id, 1, rack(r), vec!["www"]), Via::Direct)
                    .unwrap()
            );
        }
        v.measured("near-slow", Duration::from_millis(20));
        v.measured("far-fast", Duration::from_micros(400));
        v.measured("far-slow", Duration::from_millis(9));
        let version = pb::DirVersion {
            dir: "www".into(),
            version: 1,
            root: vec![1; 32],
            ..Default::default()
        };
        let order: Vec<String> = v.holders(&version).into_iter().map(|h| h.id).collect();
        assert_eq!(
            order,
            ["near-slow", "far-fast", "far-slow", "far-new"],
            "seed {seed}"
        );
    }
}

/// Under TLS (issue 11): a record whose versions are signed by their
/// publishers is taken in, relayed or not; one with an unsigned version is
/// refused whole; the directory's publishers decide what is newest; this
/// node's own record carries the certificates of what it holds.
#[tokio::test(start_paused = true)]
async fn records_need_signed_versions_and_publishers_pick_the_newest() {
    use crate::tls::{Tls, TlsFiles, pki};
    let t = tempfile::tempdir().unwrap();
    let (ca, certs) = (t.path().join("ca"), t.path().join("certs"));
    pki::init(&ca, "test CA", 5).unwrap();
    let tls = |id: &str| {
        pki::issue(&ca, id, 5, &certs).unwrap();
        Arc::new(
            Tls::new(
                TlsFiles {
                    ca: pki::ca_files(&ca).0,
                    cert: certs.join(format!("{id}.pem")),
                    key: certs.join(format!("{id}.key")),
                },
                id,
            )
            .unwrap(),
        )
    };
    let (me, src, other) = (tls("n1"), tls("src"), tls("other"));
    let v = view(
        "n1",
        "10.0.0.1:7400",
        Arc::new(MemNet::new().transport("10.0.0.1:7400")),
        1,
    );
    v.set_tls(me.clone());
    let signed = |by: &Tls, version: u64| {
        let mut d = record("x", version, Default::default(), vec!["www"]).dirs[0].clone();
        d.publisher = if version == 9 { "other" } else { "src" }.into();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        by.signer().sign(&mut d, now);
        d
    };
    let (r1, r2, r3) = (tls("r1"), tls("r2"), tls("r3"));
    let owned = |by: &Tls, mut h: pb::Holdings| {
        by.signer().sign_record(&mut h);
        h
    };
    let v2 = signed(&src, 2);
    let mut r = record("r1", 1, Default::default(), vec![]);
    r.dirs = vec![v2.clone()];
    // Not signed by its owner: refused, relayed or not.
    let e = v
        .learn(r.clone(), Via::Relay("r7"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the record of r1: not signed by its owner"),
        "{e}"
    );
    // Signed by another node: refused.
    let mut forged = owned(&r2, r.clone());
    forged.certificates[0] = r1.signer().cert().to_vec();
    let e = v.learn(forged, Via::Relay("r7")).unwrap_err().to_string();
    assert!(e.contains("does not match its content"), "{e}");
    // Without the publisher's certificate: refused.
    let e = v
        .learn(owned(&r1, r.clone()), Via::Relay("r7"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no certificate of its publisher"), "{e}");
    r.certificates = vec![src.signer().cert().to_vec()];
    let r = owned(&r1, r);
    assert!(v.learn(r.clone(), Via::Relay("r7")).unwrap());
    // A relay that changes anything of it is found out.
    let mut changed = r.clone();
    changed.seq += 1;
    changed.reports.push(pb::DirReport {
        dir: "etc".into(),
        state: "idle".into(),
        mode: "replica".into(),
        ..Default::default()
    });
    let e = v.learn(changed, Via::Relay("r7")).unwrap_err().to_string();
    assert!(e.contains("does not match its content"), "{e}");
    // An unsigned version in an otherwise good record: all refused.
    let mut bad = record("r2", 1, Default::default(), vec!["www"]);
    bad.dirs.push(v2.clone());
    bad.dirs[0].dir = "etc".into();
    bad.certificates = vec![src.signer().cert().to_vec()];
    let e = v
        .learn(owned(&r2, bad), Via::Direct)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("version 1 of \"etc\" published by \"r2\": unsigned"),
        "{e}"
    );
    assert!(!v.peers().iter().any(|(id, _)| id == "r2"));
    // A validly signed higher version by a node not among www's publishers.
    let mut r3_record = record("r3", 1, Default::default(), vec![]);
    r3_record.dirs = vec![signed(&other, 9)];
    r3_record.certificates = vec![other.signer().cert().to_vec()];
    assert!(v.learn(owned(&r3, r3_record), Via::Direct).unwrap());
    assert_eq!(v.newest("www").unwrap().version, 9);
    v.set_publishers("www", vec!["src".into()]);
    assert_eq!(v.newest("www").unwrap().version, 2);
    // Holding v2, this node vouches for it with src's certificate, after
    // its own, and signs its record.
    v.set_dir(
        "www",
        OwnDir {
            held: Some(v2),
            ..Default::default()
        },
    );
    let own = v.own_record();
    assert_eq!(
        own.certificates,
        vec![me.signer().cert().to_vec(), src.signer().cert().to_vec()]
    );
    me.verify_record(&own, &own.certificates[0]).unwrap();
    // A reload re-signs it at once (records are checked against the
    // owner's certificate as of now).
    v.resign();
    let again = v.own_record();
    assert!(again.seq > own.seq);
    me.verify_record(&again, &again.certificates[0]).unwrap();
}

/// Issue 11, item 5: a peer that withheld or corrupted a version it
/// listed is, for DEMOTE_FOR, neither the newest version nor a source;
/// the operator sees why; then it counts again.
#[tokio::test(start_paused = true)]
async fn a_demoted_peer_is_no_source_for_a_while() {
    let v = view(
        "n1",
        "10.0.0.1:7400",
        Arc::new(MemNet::new().transport("10.0.0.1:7400")),
        1,
    );
    let learn_both = || {
        v.learn(
            record("liar", 5, Default::default(), vec!["www"]),
            Via::Direct,
        )
        .unwrap();
        v.learn(
            record("good", 3, Default::default(), vec!["www"]),
            Via::Direct,
        )
        .unwrap();
    };
    learn_both();
    let five = v.newest("www").unwrap();
    assert_eq!(five.version, 5);
    assert_eq!(v.holders(&five).len(), 1);
    v.demote("liar", "manifest", "withheld version 5 of \"www\"");
    assert_eq!(v.newest("www").unwrap().version, 3);
    assert!(v.holders(&five).is_empty());
    let liar = v
        .peers()
        .into_iter()
        .find(|(id, _)| id == "liar")
        .unwrap()
        .1;
    assert_eq!(liar.demoted_for(), Some("withheld version 5 of \"www\""));
    assert_eq!(
        v.metrics
            .peer_demotions
            .with_label_values(&["manifest"])
            .get(),
        1
    );
    tokio::time::advance(DEMOTE_FOR + Duration::from_secs(1)).await;
    learn_both();
    assert_eq!(v.newest("www").unwrap().version, 5);
}

/// Issue 11, item 3: a SWIM update about another node cannot give it an
/// identity beyond what the node announced itself (signed record, own
/// packets), nor put a node at another's address; such updates are taken
/// out of the packet, the rest is kept, and the node's own packets raise
/// its bound.
#[tokio::test(start_paused = true)]
async fn swim_updates_cannot_outbid_what_a_node_announced_itself() {
    use foca::Codec as _;
    let v = view(
        "n1",
        "10.0.0.1:7400",
        Arc::new(MemNet::new().transport("10.0.0.1:7400")),
        1,
    );
    let mut src = record("src", 1, Default::default(), vec![]);
    src.incarnation = 1_000;
    src.from.as_mut().unwrap().address = "10.0.0.2:7400".into();
    assert!(v.learn(src, Via::Direct).unwrap());
    let at = |id: &str, address: &str, bump| Ident {
        address: address.into(),
        node_id: id.into(),
        bump,
    };
    let ident = |id: &str, bump| {
        let address = match id {
            "n1" => "10.0.0.1:7400",
            "src" => "10.0.0.2:7400",
            "r2" => "10.0.0.22:7400",
            _ => "10.0.0.9:7400",
        };
        at(id, address, bump)
    };
    let packet = |from: Ident, about: Vec<(Ident, foca::State)>| -> bytes::Bytes {
        let mut out = Vec::new();
        foca::PostcardCodec
            .encode_header(
                &foca::Header {
                    src: from,
                    src_incarnation: 0,
                    dst: ident("n1", 1),
                    message: foca::Message::Ping(1),
                },
                &mut out,
            )
            .unwrap();
        out.extend_from_slice(&(about.len() as u16).to_be_bytes());
        for (id, state) in about {
            foca::PostcardCodec
                .encode_member(&foca::Member::new(id, 0, state), &mut out)
                .unwrap();
        }
        out.into()
    };
    let caller = |id: &str| crate::transport::Caller {
        ip: None,
        peer_id: Some(id.into()),
    };
    let kept = |b: bytes::Bytes| -> Vec<(String, u64)> {
        use bytes::Buf as _;
        let mut buf = &b[..];
        let _: foca::Header<Ident> = foca::PostcardCodec.decode_header(&mut buf).unwrap();
        (0..buf.get_u16())
            .map(|_| {
                let m: foca::Member<Ident> = foca::PostcardCodec.decode_member(&mut buf).unwrap();
                (m.id().node_id.clone(), m.id().bump)
            })
            .collect()
    };
    let mallory = || ident("mallory", 5);
    let check = |p| v.check_swim(&caller("mallory"), p).map(kept);
    // src declared down at an identity it can never outbid: taken out,
    // the rest kept.
    let out = check(packet(
        mallory(),
        vec![
            (ident("src", u64::MAX / 2), foca::State::Down),
            (ident("r2", 7), foca::State::Alive),
        ],
    ))
    .unwrap();
    assert_eq!(out, vec![("r2".to_string(), 7)]);
    // Its announced identity may be suspected (SWIM's way); not a later one.
    let p = packet(mallory(), vec![(ident("src", 1_000), foca::State::Suspect)]);
    assert_eq!(v.check_swim(&caller("mallory"), p.clone()).unwrap(), p);
    let p = packet(mallory(), vec![(ident("src", 1_001), foca::State::Down)]);
    assert!(check(p).unwrap().is_empty());
    // Nor another node at src's address (foca would take it for src),
    // nor a node never heard of with an identity past the clock.
    let p = packet(
        mallory(),
        vec![
            (at("ghost", "10.0.0.2:7400", 7), foca::State::Down),
            (ident("ghost", u64::MAX / 2), foca::State::Alive),
            (ident("other", 7), foca::State::Alive),
        ],
    );
    assert_eq!(check(p).unwrap(), vec![("other".to_string(), 7)]);
    // The sender itself at src's address: the packet is refused.
    let e = v
        .check_swim(
            &caller("mallory"),
            packet(at("mallory", "10.0.0.2:7400", 5), vec![]),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("the address of node src"), "{e}");
    // src itself announces 5,000 (it rejoined): now 5,000 is believed.
    v.check_swim(&caller("src"), packet(ident("src", 5_000), vec![]))
        .unwrap();
    let p = packet(mallory(), vec![(ident("src", 5_000), foca::State::Down)]);
    assert_eq!(check(p).unwrap().len(), 1);
    // Nobody speaks as src but src.
    let e = v
        .check_swim(&caller("mallory"), packet(ident("src", 9_000), vec![]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("claims \"src\""), "{e}");
}
