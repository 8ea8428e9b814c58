//! Signed versions and per-directory publishers between real daemons
//! (issue 11, item 2). A node with a valid fleet certificate but not
//! listed as a publisher cannot move a replica — not with an unsigned
//! version, a version signed in another's name, a tampered one, nor a
//! version 2^64−1 under its own signature (which froze the fleet before:
//! the real source's next version was "older") — and a replica never
//! goes back to a version below the highest it accepted, across restarts.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sync_proto::pb;
use syncd::tls::{Tls, pki};
use syncd::transport::Transport as _;
use syncd::transport::grpc::GrpcTransport;

mod common;
use common::{Daemon, converge, snapshot, tls_files as files};

fn tls_lines(ca: &Path, certs: &Path, id: &str) -> String {
    common::tls_lines(&files(ca, certs, id))
}

/// Mallory's record, listing `dirs` with `certificates`, signed by her.
fn record(
    m: &Tls,
    seq: u64,
    dirs: Vec<pb::DirVersion>,
    certificates: Vec<Vec<u8>>,
) -> pb::Holdings {
    common::signed_by(
        m,
        pb::Holdings {
            from: Some(pb::Member {
                node_id: "mallory".into(),
                address: "127.0.0.114:7400".into(),
                labels: Default::default(),
            }),
            protocol: syncd::wire::PROTOCOL,
            incarnation: 1,
            seq,
            dirs,
            certificates,
            ..Default::default()
        },
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_listed_publishers_move_a_replica_and_never_backwards() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, certs) = (tmp.path().join("ca"), tmp.path().join("certs"));
    pki::init(&ca, "test fleet CA", 30).unwrap();
    for id in ["src", "r1", "r2", "mallory"] {
        pki::issue(&ca, id, 30, &certs).unwrap();
    }
    let (a, b, c) = ("127.0.0.111", "127.0.0.112", "127.0.0.113");
    let listed = "publishers = [\"src\"]";
    let mut src = Daemon::with(
        tmp.path(),
        "src",
        a,
        "source",
        &[b, c],
        &tls_lines(&ca, &certs, "src"),
        listed,
    );
    fs::write(src.data.join("index.html"), b"version one").unwrap();
    let mut r1 = Daemon::with(
        tmp.path(),
        "r1",
        b,
        "replica",
        &[a, c],
        &tls_lines(&ca, &certs, "r1"),
        listed,
    );
    let mut r2 = Daemon::with(
        tmp.path(),
        "r2",
        c,
        "replica",
        &[a, b],
        &tls_lines(&ca, &certs, "r2"),
        listed,
    );
    converge(&src, &[&r1, &r2], "version one");
    let v1_content = snapshot(&src.data);

    // Mallory holds a valid fleet certificate; it is not a publisher.
    let m = Arc::new(Tls::new(files(&ca, &certs, "mallory"), "mallory").unwrap());
    let mallory = Arc::new(GrpcTransport::with_tls(m.clone()));
    let to_r1 = format!("{b}:7400");
    let reply = mallory
        .exchange(&format!("{a}:7400"), record(&m, 1, vec![], vec![]))
        .await
        .unwrap();
    let genuine = reply.dirs[0].clone();
    assert_eq!(genuine.publisher, "src");
    assert_eq!(genuine.signature.len(), 64, "src signs what it publishes");
    let src_cert = reply.certificates.clone();
    let refused = |e: tonic::Status, what: &str| {
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e}");
        assert!(e.message().contains(what), "{what}: {e}");
    };

    // Unsigned.
    let unsigned = pb::DirVersion {
        version: 1000,
        time: 0,
        signature: vec![],
        ..genuine.clone()
    };
    let e = mallory
        .exchange(&to_r1, record(&m, 2, vec![unsigned], vec![]))
        .await
        .unwrap_err();
    refused(e, "version 1000 of \"www\" published by \"src\": unsigned");
    // Signed by mallory in src's name, with either certificate.
    let mut forged = pb::DirVersion {
        version: 1001,
        ..genuine.clone()
    };
    m.signer().sign(&mut forged, now_ms());
    let e = mallory
        .exchange(
            &to_r1,
            record(
                &m,
                3,
                vec![forged.clone()],
                vec![m.signer().cert().to_vec()],
            ),
        )
        .await
        .unwrap_err();
    refused(e, "no certificate of its publisher came with it");
    let e = mallory
        .exchange(&to_r1, record(&m, 4, vec![forged], src_cert.clone()))
        .await
        .unwrap_err();
    refused(e, "a signature that does not match its content");
    // src's own signature over other content.
    let tampered = pb::DirVersion {
        root: vec![7; 32],
        ..genuine.clone()
    };
    let e = mallory
        .exchange(&to_r1, record(&m, 5, vec![tampered], src_cert.clone()))
        .await
        .unwrap_err();
    refused(e, "a signature that does not match its content");
    r1.wait_log("refused a record with a version no publisher signed", 4);

    // Version 2^64−1 under mallory's own, valid signature: it enters the
    // view, but www takes versions from src only. Kept alive while src
    // publishes, r1 follows src.
    let mut max = pb::DirVersion {
        version: u64::MAX,
        root: vec![9; 32],
        publisher: "mallory".into(),
        ..genuine.clone()
    };
    m.signer().sign(&mut max, now_ms());
    let mallory_cert = vec![m.signer().cert().to_vec()];
    mallory
        .exchange(
            &to_r1,
            record(&m, 6, vec![max.clone()], mallory_cert.clone()),
        )
        .await
        .expect("a version validly signed by a fleet node enters the view");
    let keep = {
        let (mallory, to, max, m) = (mallory.clone(), to_r1.clone(), max.clone(), m.clone());
        tokio::spawn(async move {
            for seq in 7.. {
                let _ = mallory
                    .exchange(
                        &to,
                        record(&m, seq, vec![max.clone()], mallory_cert.clone()),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    // r2 is down while version two goes out.
    r2.terminate(20);
    fs::write(src.data.join("index.html"), b"version two").unwrap();
    converge(&src, &[&r1], "version two despite mallory's version 2^64-1");
    keep.abort();
    let log = fs::read_to_string(&r1.log).unwrap();
    assert!(
        !log.contains(&u64::MAX.to_string()),
        "r1 never tried mallory's version: {log}"
    );

    // Rollback: r1 restarts with an edited file while src is down; r2
    // comes back holding version one, genuinely signed by src. r1 refuses
    // it (its accepted floor is version two, persisted) and keeps its
    // files; once src is back, both are at version two.
    src.terminate(20);
    r1.terminate(20);
    fs::write(r1.data.join("index.html"), b"edited while down").unwrap();
    r1.start();
    r2.start();
    r1.wait_log("refusing a version that would take the directory back", 1);
    assert_ne!(
        snapshot(&r1.data),
        v1_content,
        "r1 went back to version one"
    );
    assert_eq!(
        fs::read(r1.data.join("index.html")).unwrap(),
        b"edited while down"
    );
    r2.wait_log("holds the version it held before the restart", 1);
    src.start();
    converge(&src, &[&r1, &r2], "version two after the restarts");
    let log = fs::read_to_string(&r1.log).unwrap();
    assert!(
        log.contains("versions below the highest accepted are refused"),
        "{log}"
    );
}
