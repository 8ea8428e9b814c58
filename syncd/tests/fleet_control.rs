//! Fleet-wide control from any node between real daemons (issue 11,
//! item 6): `syncctl pause|resume|priority DIR --fleet`, signed with an
//! operator certificate from `syncd pki issue --operator NAME`, reaches
//! every node carrying the directory — the source included, though it was
//! given to a replica — is shown in `syncctl fleet` and `status`, and
//! outlives a restart. A node's certificate, or another CA's operator,
//! cannot steer the fleet, neither through syncctl nor in a record (there
//! it is passed over).

use std::fs;
use std::path::Path;
use std::sync::Arc;

use sync_proto::pb;
use syncd::tls::{Tls, control::Operator, pki};
use syncd::transport::Transport as _;
use syncd::transport::grpc::GrpcTransport;

mod common;
use common::{Daemon, converge, ctl, ctl_json, syncd, tls_files, tls_lines, until};

/// www's (state, priority, fleet control) in `syncctl status` on `d`, if
/// it answers.
fn state(d: &Daemon) -> Option<(String, String, String)> {
    let (code, out, _) = ctl(d, &["--json", "status"]);
    let s: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| code == 0)?;
    let w = &s["dirs"][0];
    let text = |k: &str| w[k].as_str().unwrap_or_default().to_string();
    Some((text("state"), text("priority"), text("control")))
}

/// `syncd pki issue --operator NAME` through the binary, as an operator would.
fn issue_operator(ca: &Path, out: &Path, name: &str) {
    let o = syncd()
        .args(["pki", "issue", "--operator", name, "--ca-dir"])
        .arg(ca)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains(&format!("issued operator \"{name}\"")),
        "{said}"
    );
}

fn fleet_ctl(d: &Daemon, ops: &Path, who: &str, args: &[&str]) -> (i32, String, String) {
    let (cert, key) = (
        ops.join(format!("{who}.pem")),
        ops.join(format!("{who}.key")),
    );
    let mut all: Vec<&str> = args.to_vec();
    all.extend([
        "--fleet",
        "--operator-cert",
        cert.to_str().unwrap(),
        "--operator-key",
        key.to_str().unwrap(),
    ]);
    ctl(d, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_steers_every_node_from_any_node() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, certs, ops) = (
        tmp.path().join("ca"),
        tmp.path().join("certs"),
        tmp.path().join("ops"),
    );
    pki::init(&ca, "test fleet CA", 30).unwrap();
    for id in ["src", "r1", "r2", "mallory"] {
        pki::issue(&ca, id, 30, &certs).unwrap();
    }
    issue_operator(&ca, &ops, "alice");
    let other = tmp.path().join("other-ca");
    pki::init(&other, "another CA", 30).unwrap();
    let theirs = tmp.path().join("theirs");
    issue_operator(&other, &theirs, "alice");

    let (a, b, c) = ("127.0.0.131", "127.0.0.132", "127.0.0.133");
    let node = |name: &str, ip: &str, mode: &str, peers: &[&str]| {
        Daemon::with(
            tmp.path(),
            name,
            ip,
            mode,
            peers,
            &tls_lines(&tls_files(&ca, &certs, name)),
            "",
        )
    };
    let src = node("src", a, "source", &[b, c]);
    fs::write(src.data.join("index.html"), b"version one").unwrap();
    let r1 = node("r1", b, "replica", &[a, c]);
    let mut r2 = node("r2", c, "replica", &[a, b]);
    converge(&src, &[&r1, &r2], "version one");

    // Refused before anything is published: a node certificate is no
    // operator's (syncctl says so), another CA's operator is refused by
    // the daemon, and --fleet without a key says what to give.
    let (code, _, err) = fleet_ctl(&r1, &certs, "r1", &["pause", "www"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("r1.pem") && err.contains("not an operator certificate"),
        "{err}"
    );
    let (code, _, err) = fleet_ctl(&r1, &theirs, "alice", &["pause", "www"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not valid under the fleet CA"), "{err}");
    let (code, _, err) = ctl(&r1, &["pause", "www", "--fleet"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--operator-cert"), "{err}");
    let (code, _, err) = fleet_ctl(&r1, &ops, "alice", &["pause", "wwx"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no node this one knows of carries"), "{err}");

    // Mallory, a fleet node, slips another CA's "alice" into its record.
    let m = Arc::new(Tls::new(tls_files(&ca, &certs, "mallory"), "mallory").unwrap());
    let mallory = GrpcTransport::with_tls(m.clone());
    let impostor = Operator::load(&theirs.join("alice.pem"), &theirs.join("alice.key")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let unsigned = pb::Holdings {
        from: Some(pb::Member {
            node_id: "mallory".into(),
            address: "127.0.0.134:7400".into(),
            labels: Default::default(),
        }),
        protocol: syncd::wire::PROTOCOL,
        incarnation: 1,
        seq: 1,
        controls: vec![impostor.sign("www", "pause", "", now)],
        certificates: vec![impostor.cert().to_vec()],
        ..Default::default()
    };
    // Unsigned by its owner, it is refused for that already.
    let e = mallory
        .exchange(&format!("{b}:7400"), unsigned.clone())
        .await
        .unwrap_err();
    assert!(
        e.message()
            .contains("the record of mallory: not signed by its owner"),
        "{e}"
    );
    mallory
        .exchange(&format!("{b}:7400"), common::signed_by(&m, unsigned))
        .await
        .expect("mallory's own record is taken, without the control");
    r1.wait_log(
        "ignoring a fleet control no operator of this fleet signed: in the record of mallory: the pause of \"www\" by operator \"alice\"",
        1,
    );
    for d in [&src, &r1, &r2] {
        assert_eq!(
            state(d).unwrap().0,
            "idle",
            "{} was steered by a forgery",
            d.name
        );
    }

    // Alice pauses www from r1, a replica: every node applies it.
    let (code, out, err) = fleet_ctl(&r1, &ops, "alice", &["pause", "www"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("paused on every node carrying: www (signed by operator alice"),
        "{out}"
    );
    for d in [&src, &r1, &r2] {
        let (_, _, control) = until(30, &format!("{} paused", d.name), || {
            state(d).filter(|s| s.0 == "paused")
        });
        assert!(control.starts_with("pause by alice at "), "{control}");
    }
    // The source is paused: it does not scan, so nothing is published.
    fs::write(src.data.join("index.html"), b"version two").unwrap();
    let (code, _, err) = ctl(&src, &["rescan", "www"]);
    assert_eq!(code, 1);
    assert!(err.contains("paused; resume it first"), "{err}");
    // syncctl fleet on r2 shows the control and where it applied.
    let f = until(30, "the fleet view shows the control on every node", || {
        let f = ctl_json(&r2, &["fleet"]);
        let applied = f["nodes"]
            .as_array()?
            .iter()
            .filter(|n| {
                n["dirs"][0]["control"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("pause by alice"))
            })
            .count();
        (applied == 3).then_some(f)
    });
    assert_eq!(f["controls"][0]["dir"], "www");
    assert_eq!(f["controls"][0]["operator"], "alice");
    let (_, text, _) = ctl(&r2, &["fleet"]);
    assert!(
        text.contains("paused (fleet)") && text.contains("www: pause by alice at"),
        "{text}"
    );

    // A restart does not undo it: r2 learns it again from the fleet.
    r2.kill();
    r2.start();
    until(30, "r2 paused again after a restart", || {
        state(&r2).filter(|s| s.0 == "paused")
    });

    // Resumed from r2, the source publishes again and the fleet follows;
    // a priority set fleet-wide is a kind of its own.
    let (code, _, err) = fleet_ctl(&r2, &ops, "alice", &["resume", "www"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = fleet_ctl(&r2, &ops, "alice", &["priority", "high", "www"]);
    assert_eq!(code, 0, "{err}");
    for d in [&src, &r1, &r2] {
        let (_, _, control) = until(30, &format!("{} resumed at high priority", d.name), || {
            state(d).filter(|s| s.0 != "paused" && s.1 == "high")
        });
        assert!(
            control.contains("resume by alice") && control.contains("priority high by alice"),
            "{control}"
        );
    }
    let (code, _, err) = ctl(&src, &["rescan", "www"]);
    assert_eq!(code, 0, "{err}");
    converge(&src, &[&r1, &r2], "version two after the fleet resume");
}
