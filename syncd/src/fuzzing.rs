//! Entry points for the fuzzers in `fuzz/` (issue 11): each takes
//! arbitrary bytes as a hostile peer or a broken file would present them
//! and drives the code that takes them in. None may panic, hang or
//! allocate from a declared length; what they accept must be what the
//! rest of the node relies on. `cargo fuzz` runs them under libFuzzer;
//! `tests/fuzz_corpus.rs` runs them over the seed corpora in
//! `fuzz/corpus/` and a few thousand mutations of them on every CI run.

use std::sync::{Arc, OnceLock};

use prost::Message as _;
use sync_proto::pb;

use crate::env::Env;
use crate::fleet::{FleetView, Via};
use crate::metrics::Metrics;
use crate::transport::mem::MemNet;

/// A fuzz target: takes any bytes, panics only on a bug.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, as `fuzz/fuzz_targets/` and the corpus
/// directories name them.
pub const TARGETS: [(&str, Target); 4] = [
    ("manifest_node", manifest_node),
    ("peer_messages", peer_messages),
    ("swim_packet", swim_packet),
    ("config", config),
];

/// A manifest node from a peer (`GetNodes`): it decodes, or is refused;
/// what decodes encodes back to the same bytes (one encoding per node, so
/// its hash is its identity).
pub fn manifest_node(data: &[u8]) {
    if let Ok(node) = chunk_store::manifest::Node::decode(data) {
        assert_eq!(
            node.encode(),
            data,
            "a node decoded from bytes it does not encode to"
        );
    }
}

/// One fleet view for the whole run, as a node's would be: records
/// accumulate in it up to its bounds.
fn view() -> &'static FleetView {
    static VIEW: OnceLock<FleetView> = OnceLock::new();
    VIEW.get_or_init(new_view)
}

fn new_view() -> FleetView {
    FleetView::new(
        "fuzz".into(),
        "10.0.0.1:7400".into(),
        Default::default(),
        1,
        vec![],
        Arc::new(MemNet::new().transport("10.0.0.1:7400")),
        Arc::new(Env::seeded(1)),
        Metrics::new().expect("metrics"),
    )
}

/// A second view under mutual TLS, with a fleet CA made once in the
/// scratch directory: records reach the owner, version and control
/// signature checks and the certificate parsers with whatever a peer sent.
fn tls_view() -> &'static FleetView {
    static VIEW: OnceLock<FleetView> = OnceLock::new();
    VIEW.get_or_init(|| {
        let v = new_view();
        let dir = config_dir().join("pki");
        let ca = dir.join("ca");
        crate::tls::pki::init(&ca, "fuzz CA", 3650).expect("a fuzz CA");
        let (cert, key) =
            crate::tls::pki::issue(&ca, "fuzz", 3650, &dir).expect("a node certificate");
        let files = crate::tls::TlsFiles {
            ca: crate::tls::pki::ca_files(&ca).0,
            cert,
            key,
        };
        v.set_tls(Arc::new(crate::tls::Tls::new(files, "fuzz").expect("TLS")));
        v
    })
}

/// Records and gossip from a peer: the first byte chooses the message
/// (`Holdings` by `Exchange` or relayed, `GossipRequest`, `GossipReply`
/// records; with bit 2 set, into a node under mutual TLS), the rest is
/// its protobuf encoding.
pub fn peer_messages(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let v = if kind & 4 == 0 { view() } else { tls_view() };
    match kind % 4 {
        0 | 1 => {
            if let Ok(h) = pb::Holdings::decode(body) {
                let via = if kind % 4 == 0 {
                    Via::Direct
                } else {
                    Via::Relay("relay")
                };
                if v.learn(h, via).is_ok() {
                    // What was taken in must hold the bounds others rely on.
                    for (_, p) in v.peers() {
                        if let Some(r) = &p.record {
                            crate::wire::check_record(r).expect("a kept record is valid");
                        }
                    }
                }
            }
        }
        2 => {
            if let Ok(r) = pb::GossipRequest::decode(body) {
                let _ = crate::fleet::gossip::answer(v, r);
            }
        }
        _ => {
            if let Ok(r) = pb::GossipReply::decode(body) {
                for h in r.records {
                    let _ = v.learn(h, Via::Relay("relay"));
                }
            }
        }
    }
    let _ = v.newest("www");
}

/// A SWIM packet from a peer: the sender check done under TLS (the foca
/// header decoded first), then foca itself, then the members it reports
/// as this node's fleet view takes them.
pub fn swim_packet(data: &[u8]) {
    use crate::fleet::membership::Ident;
    use foca::{Foca, NoCustomBroadcast, PostcardCodec};
    use rand::SeedableRng as _;
    let caller = crate::transport::Caller {
        ip: None,
        peer_id: Some("peer".into()),
    };
    let v = view();
    let _ = v.swim_packet(&caller, bytes::Bytes::copy_from_slice(data));
    let me = Ident {
        address: "10.0.0.1:7400".into(),
        node_id: "fuzz".into(),
        bump: 1,
    };
    let mut foca: Foca<Ident, PostcardCodec, rand::rngs::StdRng, NoCustomBroadcast> = Foca::new(
        me,
        foca::Config::new_lan(std::num::NonZeroU32::new(64).expect("non-zero")),
        rand::rngs::StdRng::seed_from_u64(1),
        PostcardCodec,
    );
    let mut rt = foca::AccumulatingRuntime::new();
    if data.len() <= crate::fleet::membership::MAX_PACKET {
        let _ = foca.handle_data(data, &mut rt);
    }
    let members: Vec<Ident> = foca
        .iter_membership_state()
        .map(|m| m.id().clone())
        .collect();
    for id in &members {
        crate::fleet::Members::member(v, id, crate::fleet::Liveness::Alive);
    }
}

/// Where [`config`] writes its two files (one directory per process).
fn config_dir() -> &'static std::path::PathBuf {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        std::env::temp_dir().join(format!("syncd-fuzz-config-{}", std::process::id()))
    })
}

/// Removes what [`config`] wrote (a test calls it when done).
pub fn cleanup() {
    let _ = std::fs::remove_dir_all(config_dir());
}

/// `syncd.toml` and one `dirs.d` file: the bytes up to the first NUL are
/// the node's file, the rest the directory's; both are loaded as
/// `syncd check-config` would.
pub fn config(data: &[u8]) {
    let base = config_dir();
    let (node, dirs) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let d = base.join(crate::config::DIRS_D);
    let _ = std::fs::create_dir_all(&d);
    if std::fs::write(base.join("syncd.toml"), node).is_err()
        || std::fs::write(d.join("x.toml"), dirs).is_err()
    {
        return;
    }
    if let Ok(c) = crate::config::Config::load(&base.join("syncd.toml")) {
        // What loads is what the daemon relies on.
        assert!(crate::wire::is_id(c.node.node.id.get_ref()));
        for (id, (_, d)) in &c.dirs {
            assert!(crate::wire::is_id(id) && d.path.get_ref().is_absolute());
        }
    }
}
