//! Mutual TLS between real daemons (issue 11, item 1): nodes with
//! certificates from the fleet CA sync; a client without a certificate, or
//! with one from another CA, is refused at the handshake; a client with a
//! valid certificate cannot claim another node's id, in a record or as a
//! SWIM sender, nor another node's address; an expired certificate is refused at the handshake and at
//! start; `syncctl status` shows the days left.

use std::fs;
use std::sync::Arc;

use sync_proto::pb;
use syncd::tls::{Tls, pki};
use syncd::transport::Transport as _;
use syncd::transport::grpc::GrpcTransport;

mod common;
use common::{Daemon, converge, tls_files as files, tls_lines, until};

/// A record as `id` would send it from `address`.
fn record(id: &str, address: &str) -> pb::Holdings {
    pb::Holdings {
        from: Some(pb::Member {
            node_id: id.into(),
            address: address.into(),
            labels: Default::default(),
        }),
        protocol: syncd::wire::PROTOCOL,
        incarnation: 1,
        seq: 1,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_fleet_certificates_get_in_and_ids_are_the_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, other_ca) = (tmp.path().join("ca"), tmp.path().join("other-ca"));
    let (certs, foreign) = (tmp.path().join("certs"), tmp.path().join("foreign"));
    pki::init(&ca, "test fleet CA", 30).unwrap();
    pki::init(&other_ca, "another CA", 30).unwrap();
    for id in ["src", "r1", "mallory"] {
        pki::issue(&ca, id, 30, &certs).unwrap();
    }
    pki::issue(&other_ca, "r9", 30, &foreign).unwrap();

    let (a, b) = ("127.0.0.101", "127.0.0.102");
    let src = Daemon::with(
        tmp.path(),
        "src",
        a,
        "source",
        &[b],
        &tls_lines(&files(&ca, &certs, "src")),
        "",
    );
    fs::write(src.data.join("index.html"), b"over TLS").unwrap();
    let r1 = Daemon::with(
        tmp.path(),
        "r1",
        b,
        "replica",
        &[a],
        &tls_lines(&files(&ca, &certs, "r1")),
        "",
    );
    converge(&src, &[&r1], "over mutual TLS");
    let to = format!("{a}:7400");

    // No certificate: refused at the handshake, and the node says so.
    let plain = GrpcTransport::default();
    let e = plain.exchange(&to, record("r9", "127.0.0.109:7400")).await;
    assert!(e.is_err(), "a plaintext client was answered");
    // Another CA's certificate: refused too.
    let other = Tls::new(files(&other_ca, &foreign, "r9"), "r9").unwrap();
    let stranger = GrpcTransport::with_tls(Arc::new(other));
    let e = stranger
        .exchange(&to, record("r9", "127.0.0.109:7400"))
        .await;
    assert!(e.is_err(), "a client of another CA was answered");
    until(10, "src to log the refused handshakes", || {
        let log = fs::read_to_string(&src.log).unwrap_or_default();
        (log.matches("refused a peer at the TLS handshake").count() >= 2).then_some(())
    });
    // A fleet certificate that has expired: refused too, and no longer
    // loads for a node of its own.
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    pki::issue_until(&ca, "late", expires, &certs).unwrap();
    let late = GrpcTransport::with_tls(Arc::new(
        Tls::new(files(&ca, &certs, "late"), "late").unwrap(),
    ));
    until(10, "the certificate to expire", || {
        (time::OffsetDateTime::now_utc() > expires + time::Duration::seconds(1)).then_some(())
    });
    let e = late.exchange(&to, record("late", "127.0.0.109:7400")).await;
    assert!(
        e.is_err(),
        "a client with an expired certificate was answered"
    );
    until(10, "src to log the expired certificate", || {
        let log = fs::read_to_string(&src.log).unwrap_or_default();
        (log.matches("refused a peer at the TLS handshake").count() >= 3 && log.contains("xpired"))
            .then_some(())
    });
    let e = Tls::new(files(&ca, &certs, "late"), "late")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("late.pem: not valid under the CA") && e.contains("xpired"),
        "{e}"
    );
    // The operator sees the days left.
    let (code, out, _) = common::ctl(&src, &["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("tls: certificate expires in 30 days"), "{out}");
    let json = common::ctl_json(&src, &["status"]);
    assert!(json["tls"].as_bool().unwrap(), "{json}");

    // A fleet certificate gets in, under its own name only.
    let m = Arc::new(Tls::new(files(&ca, &certs, "mallory"), "mallory").unwrap());
    let mallory = GrpcTransport::with_tls(m.clone());
    let e = mallory
        .exchange(&to, record("src", "127.0.0.103:7400"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message()
            .contains("certificate names node \"mallory\" but its record claims \"src\""),
        "{e}"
    );
    let reply = mallory
        .exchange(
            &to,
            common::signed_by(&m, record("mallory", "127.0.0.103:7400")),
        )
        .await
        .expect("its own name is accepted");
    assert_eq!(reply.from.as_ref().unwrap().node_id, "src");
    assert_eq!(reply.signature.len(), 64, "src signs its record");
    assert_eq!(mallory.peer_id(&to).as_deref(), Some("src"));
    // Nor can it speak on SWIM as another node.
    let ident = |id: &str, ip: &str| syncd::fleet::membership::Ident {
        address: format!("{ip}:7400"),
        node_id: id.into(),
        bump: 1,
    };
    let swim_as = |id: &str| {
        use foca::Codec as _;
        let header = foca::Header {
            src: ident(id, "127.0.0.103"),
            src_incarnation: 0,
            dst: ident("src", a),
            message: foca::Message::Ping(1),
        };
        let mut buf = Vec::new();
        foca::PostcardCodec
            .encode_header(&header, &mut buf)
            .unwrap();
        pb::SwimPacket { data: buf.into() }
    };
    let e = mallory.swim(&to, swim_as("src")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains("SWIM packet's sender claims \"src\""),
        "{e}"
    );
    mallory
        .swim(&to, swim_as("mallory"))
        .await
        .expect("a packet under its own name is taken");
    // Nor declare r1 dead under an identity r1 could never outbid (before,
    // src then saw r1 dead for good): that update is taken out.
    {
        use foca::Codec as _;
        let mut buf = Vec::new();
        foca::PostcardCodec
            .encode_header(
                &foca::Header {
                    src: ident("mallory", "127.0.0.103"),
                    src_incarnation: 0,
                    dst: syncd::fleet::membership::Ident {
                        address: to.clone(),
                        node_id: "src".into(),
                        bump: reply.incarnation,
                    },
                    message: foca::Message::Ping(2),
                },
                &mut buf,
            )
            .unwrap();
        buf.extend_from_slice(&1u16.to_be_bytes());
        let forged = syncd::fleet::membership::Ident {
            bump: u64::MAX / 2,
            ..ident("r1", b)
        };
        foca::PostcardCodec
            .encode_member(&foca::Member::new(forged, 0, foca::State::Down), &mut buf)
            .unwrap();
        mallory
            .swim(&to, pb::SwimPacket { data: buf.into() })
            .await
            .expect("the rest of the packet is taken");
        src.wait_log("ignoring SWIM updates: node r1 at identity", 1);
        assert_eq!(common::peer_state(&src, "r1"), "alive");
    }
    // It carries no directory, so it reads none: not the manifest, not
    // chunks, not have-logs (r1, which carries www, got them above).
    let root = reply.dirs[0].root.clone();
    let e = mallory
        .get_nodes(
            &to,
            pb::GetNodesRequest {
                ids: vec![root.clone()],
                dir: "www".into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains("does not carry directory \"www\""),
        "{e}"
    );
    let e = mallory
        .get_nodes(
            &to,
            pb::GetNodesRequest {
                ids: vec![root.clone()],
                dir: String::new(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = mallory
        .get_chunks(
            &to,
            pb::GetChunksRequest {
                dir: "www".into(),
                hashes: vec![root.clone()],
                requester: "mallory".into(),
                ..Default::default()
            },
        )
        .await
        .err()
        .expect("chunks refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = mallory
        .haves(
            &to,
            pb::HavesRequest {
                dir: "www".into(),
                root,
                requester: "mallory".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // Nor give itself another node's address: r1 dialled src there and
    // saw src's certificate.
    let e = mallory
        .exchange(
            &format!("{b}:7400"),
            common::signed_by(&m, record("mallory", &to)),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains(&format!(
            "gives address {to}, where node src presented its certificate"
        )),
        "{e}"
    );
    let log = fs::read_to_string(&src.log).unwrap();
    assert!(
        log.contains("refused a peer") && log.contains("mallory at 127.0.0.1"),
        "the refusal names the peer: {log}"
    );

    // Nor relay src's record changed: here, src no longer carrying www
    // (r1 would then refuse it reads). The owner's signature gives it away.
    let mut tampered = reply.clone();
    tampered.seq += 1000;
    tampered.reports.clear();
    tampered.dirs.clear();
    mallory
        .gossip(
            &format!("{b}:7400"),
            pb::GossipRequest {
                protocol: syncd::wire::PROTOCOL,
                from: "mallory".into(),
                records: vec![tampered],
                ..Default::default()
            },
        )
        .await
        .expect("a push is answered; its bad records are dropped");
    r1.wait_log(
        "refused a record its owner did not sign: the record of src: a record signature that does not match its content",
        1,
    );
    let fleet = common::ctl_json(&r1, &["fleet", "www"]);
    let carriers: Vec<&str> = fleet["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node_id"].as_str())
        .collect();
    assert!(
        carriers.contains(&"src"),
        "r1 still sees src carry www: {fleet}"
    );

    // Declaring www, mallory reads www's manifest — but not another
    // directory's under www's name: src also carries "secret", whose root
    // is in its record for all to see, and nodes are shared by content.
    let secret = src.base.join("secret");
    fs::create_dir_all(&secret).unwrap();
    fs::write(secret.join("key.pem"), b"not for mallory").unwrap();
    fs::write(
        src.base.join("dirs.d/secret.toml"),
        format!(
            "id = \"secret\"\npath = \"{}\"\nmode = \"source\"\n",
            secret.display()
        ),
    )
    .unwrap();
    src.hup();
    let mut seq = 10;
    let (www_root, secret_root) = common::until(30, "src publishes secret", || {
        seq += 1;
        let mut h = record("mallory", "127.0.0.103:7400");
        h.seq = seq;
        h.reports = vec![pb::DirReport {
            dir: "www".into(),
            state: "idle".into(),
            mode: "replica".into(),
            ..Default::default()
        }];
        let reply = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(mallory.exchange(&to, common::signed_by(&m, h)))
        })
        .ok()?;
        let root = |d: &str| {
            reply
                .dirs
                .iter()
                .find(|v| v.dir == d)
                .map(|v| v.root.clone())
        };
        Some((root("www")?, root("secret")?))
    });
    let nodes = |dir: &str, id: &[u8]| {
        mallory.get_nodes(
            &to,
            pb::GetNodesRequest {
                ids: vec![id.to_vec()],
                dir: dir.into(),
            },
        )
    };
    let got = nodes("www", &www_root).await.expect("www's own root");
    assert!(!got.nodes[0].data.is_empty());
    let e = nodes("www", &secret_root).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message()
            .contains("is not part of the version of directory \"www\" held here"),
        "{e}"
    );
    let e = nodes("secret", &secret_root).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains("does not carry directory \"secret\""),
        "{e}"
    );
}
