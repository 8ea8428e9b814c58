use super::*;

fn fleet(dir: &Path) -> PathBuf {
    let ca = dir.join("ca");
    pki::init(&ca, "test fleet CA", 30).unwrap();
    ca
}

fn files(ca: &Path, certs: &Path, id: &str) -> TlsFiles {
    TlsFiles {
        ca: pki::ca_files(ca).0,
        cert: certs.join(format!("{id}.pem")),
        key: certs.join(format!("{id}.key")),
    }
}

/// `pki init` and `pki issue` make a CA and node certificates that load,
/// name their node and expire when asked; nothing is overwritten.
#[test]
fn issued_certificates_load_for_their_node_only() {
    let t = tempfile::tempdir().unwrap();
    let ca = fleet(t.path());
    let certs = t.path().join("certs");
    pki::issue(&ca, "web-01", 10, &certs).unwrap();
    let f = files(&ca, &certs, "web-01");
    let days = check(&f, "web-01").unwrap();
    assert!((9.9..=10.1).contains(&days), "{days}");
    let mode = std::fs::metadata(&f.key).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let cert = CertificateDer::from_pem_file(&f.cert).unwrap();
    assert_eq!(node_id_of(&cert).as_deref(), Some("web-01"));

    let e = check(&f, "web-02").unwrap_err().to_string();
    assert!(
        e.contains("web-01.pem") && e.contains("for node \"web-01\", this node is \"web-02\""),
        "{e}"
    );
    let e = pki::issue(&ca, "web-01", 10, &certs)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    let e = pki::init(&ca, "again", 10).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    let e = pki::issue(&ca, "no/slash", 10, &certs)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a node id"), "{e}");
}

/// A certificate from another CA, or a key that is not the certificate's,
/// is refused naming the file.
#[test]
fn foreign_certificates_and_mismatched_keys_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let ca = fleet(t.path());
    let other = t.path().join("other");
    pki::init(&other, "another CA", 30).unwrap();
    let mine = t.path().join("mine");
    let theirs = t.path().join("theirs");
    pki::issue(&ca, "a", 10, &mine).unwrap();
    pki::issue(&ca, "b", 10, &mine).unwrap();
    pki::issue(&other, "a", 10, &theirs).unwrap();
    let foreign = TlsFiles {
        ca: pki::ca_files(&ca).0,
        ..files(&other, &theirs, "a")
    };
    let e = check(&foreign, "a").unwrap_err().to_string();
    assert!(
        e.contains("theirs/a.pem") && e.contains("not valid under the CA"),
        "{e}"
    );
    let swapped = TlsFiles {
        key: mine.join("b.key"),
        ..files(&ca, &mine, "a")
    };
    let e = check(&swapped, "a").unwrap_err().to_string();
    assert!(e.contains("b.key") && e.contains("does not match"), "{e}");
    let e = check(
        &TlsFiles {
            ca: t.path().join("missing.pem"),
            ..files(&ca, &mine, "a")
        },
        "a",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("missing.pem: cannot read"), "{e}");
}

/// A version verifies with its publisher's certificate only, and only as
/// signed: every field is covered, and the certificate must chain to the
/// CA and have been valid when the version was published.
#[test]
fn versions_verify_only_as_their_publisher_signed_them() {
    let t = tempfile::tempdir().unwrap();
    let ca = fleet(t.path());
    let other = t.path().join("other");
    pki::init(&other, "another CA", 30).unwrap();
    let (mine, theirs) = (t.path().join("mine"), t.path().join("theirs"));
    pki::issue(&ca, "src", 10, &mine).unwrap();
    pki::issue(&ca, "b", 10, &mine).unwrap();
    pki::issue(&other, "src", 10, &theirs).unwrap();
    let src = Tls::new(files(&ca, &mine, "src"), "src").unwrap();
    let b = Tls::new(files(&ca, &mine, "b"), "b").unwrap();
    let impostor = Tls::new(files(&other, &theirs, "src"), "src").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut v = sync_proto::pb::DirVersion {
        dir: "www".into(),
        version: 7,
        root: vec![1; 32],
        publisher: "src".into(),
        entries: 3,
        bytes: 100,
        ..Default::default()
    };
    src.signer().sign(&mut v, now);
    let cert = src.signer().cert();
    // Anyone of the fleet verifies it, with the publisher's certificate.
    b.verify_version(&v, &cert).unwrap();
    let e = b.verify_version(&v, &b.signer().cert()).unwrap_err();
    assert!(
        e.contains("certificate of \"b\", not of its publisher"),
        "{e}"
    );
    // Every field is signed.
    let changes: [fn(&mut sync_proto::pb::DirVersion); 7] = [
        |v| v.dir = "etc".into(),
        |v| v.version += 1,
        |v| v.root[0] ^= 1,
        |v| v.entries += 1,
        |v| v.bytes += 1,
        |v| v.time += 1,
        |v| v.signature[5] ^= 1,
    ];
    for change in changes {
        let mut w = v.clone();
        change(&mut w);
        let e = b.verify_version(&w, &cert).unwrap_err();
        assert!(e.contains("does not match its content"), "{e}");
    }
    let e = b
        .verify_version(
            &sync_proto::pb::DirVersion {
                signature: vec![],
                ..v.clone()
            },
            &cert,
        )
        .unwrap_err();
    assert_eq!(e, "unsigned");
    // A certificate of another CA, even naming the publisher, is no proof.
    let mut w = v.clone();
    impostor.signer().sign(&mut w, now);
    let e = b.verify_version(&w, &impostor.signer().cert()).unwrap_err();
    assert!(e.contains("not valid under the fleet CA"), "{e}");
    // Nor one that was not valid when the version says it was signed.
    let mut old = v.clone();
    src.signer().sign(&mut old, 1_000);
    let e = b.verify_version(&old, &cert).unwrap_err();
    assert!(e.contains("when the version was signed"), "{e}");
}

/// Issue 11, item 6: an operator certificate signs fleet controls and
/// nothing else; a node certificate cannot sign one; every field is
/// signed; another CA's operator is refused.
#[test]
fn controls_verify_only_with_an_operator_certificate_of_the_fleet() {
    let t = tempfile::tempdir().unwrap();
    let ca = fleet(t.path());
    let other = t.path().join("other");
    pki::init(&other, "another CA", 30).unwrap();
    let (ops, nodes, theirs) = (
        t.path().join("ops"),
        t.path().join("nodes"),
        t.path().join("theirs"),
    );
    pki::issue_operator(&ca, "alice", 10, &ops).unwrap();
    pki::issue(&ca, "web-01", 10, &nodes).unwrap();
    pki::issue_operator(&other, "alice", 10, &theirs).unwrap();
    let node = Tls::new(files(&ca, &nodes, "web-01"), "web-01").unwrap();
    let alice = control::Operator::load(&ops.join("alice.pem"), &ops.join("alice.key")).unwrap();
    assert_eq!(alice.name(), "alice");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let c = alice.sign("www", "priority", "high", now);
    node.verify_control(&c, alice.cert()).unwrap();
    let changes: [fn(&mut sync_proto::pb::Control); 6] = [
        |c| c.dir = "etc".into(),
        |c| c.action = "pause".into(),
        |c| c.priority = "low".into(),
        |c| c.operator = "bob".into(),
        |c| c.time += 1,
        |c| c.signature[9] ^= 1,
    ];
    for change in changes {
        let mut bad = c.clone();
        change(&mut bad);
        assert!(node.verify_control(&bad, alice.cert()).is_err(), "{bad:?}");
    }
    // Before the certificate was valid: refused.
    let early = alice.sign("www", "pause", "", now - 86_400_000);
    let e = node.verify_control(&early, alice.cert()).unwrap_err();
    assert!(e.contains("not valid under the fleet CA"), "{e}");
    // Another CA's "alice".
    let impostor =
        control::Operator::load(&theirs.join("alice.pem"), &theirs.join("alice.key")).unwrap();
    let forged = impostor.sign("www", "pause", "", now);
    let e = node.verify_control(&forged, impostor.cert()).unwrap_err();
    assert!(e.contains("not valid under the fleet CA"), "{e}");
    // A node's certificate and key are no operator's.
    let e = control::Operator::load(&nodes.join("web-01.pem"), &nodes.join("web-01.key"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("web-01.pem") && e.contains("not an operator certificate"),
        "{e}"
    );
    let node_cert = node.signer().cert();
    let e = node.verify_control(&c, &node_cert).unwrap_err();
    assert!(e.contains("not an operator's"), "{e}");
    // An operator's certificate is no node's: it cannot join the fleet.
    let e = check(&files(&ca, &ops, "alice"), "alice")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not valid under the CA"), "{e}");
    // Nor does it publish: a version signed with it is refused.
    let mut v = sync_proto::pb::DirVersion {
        dir: "www".into(),
        version: 1,
        root: vec![1; 32],
        publisher: "alice".into(),
        time: now,
        ..Default::default()
    };
    v.signature = vec![0; 64];
    assert!(node.verify_version(&v, alice.cert()).is_err());
    // Key and certificate must match.
    pki::issue_operator(&ca, "bob", 10, &ops).unwrap();
    let e = control::Operator::load(&ops.join("alice.pem"), &ops.join("bob.key"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bob.key") && e.contains("does not match"), "{e}");
}
