//! The fuzz targets' smoke run on stable, in every CI run (issue 11,
//! item 7): each target of `syncd::fuzzing` is fed its seed corpus from
//! `fuzz/corpus/TARGET` and a few thousand seeded mutations of it (bit
//! flips, truncations, splices, inserted bytes). The long runs under
//! libFuzzer are `cargo +nightly fuzz run TARGET` (fuzz/README.md).
//!
//! `cargo test --release --test fuzz_corpus -- --ignored` writes the seed
//! corpora again from real messages (run it after a wire change).

use std::fs;
use std::path::{Path, PathBuf};

use prost::Message as _;
use rand::{RngExt as _, SeedableRng as _};
use sync_proto::pb;

const MUTATIONS: usize = 20_000;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.into_iter().map(|p| fs::read(p).unwrap()).collect()
}

fn mutate(rng: &mut rand::rngs::StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut d = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(1..6) {
        let len = d.len();
        match rng.random_range(0..5) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                d[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => d.truncate(rng.random_range(0..len)),
            2 => {
                let i = rng.random_range(0..=len);
                let b: u8 = rng.random();
                d.insert(i, b);
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                d[i] = [0, 0xff, 0x7f, 0x80][rng.random_range(0..4)];
            }
            _ => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let cut = rng.random_range(0..=d.len());
                let from = rng.random_range(0..=other.len());
                d.truncate(cut);
                d.extend_from_slice(&other[from..]);
            }
        }
    }
    d
}

#[test]
fn every_fuzz_target_survives_its_corpus_and_mutations() {
    for (name, target) in syncd::fuzzing::TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name}: empty seed corpus");
        for s in &seeds {
            target(s);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..MUTATIONS {
            target(&mutate(&mut rng, &seeds));
        }
    }
    syncd::fuzzing::cleanup();
}

/// Writes the seed corpora from real messages and files.
#[test]
#[ignore = "writes fuzz/corpus; run after a wire change"]
fn write_seed_corpora() {
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = corpus(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), data).unwrap();
    };

    // Manifest nodes: a small tree (files, a symlink, directories) and a
    // recipe long enough to need index nodes.
    use chunk_store::manifest::{self, ChunkEntry, EntryMeta, MemNodes, Mtime};
    let mut nodes = MemNodes::default();
    let h =
        |i: u32| chunk_store::Hash::from_slice(blake3::hash(&i.to_le_bytes()).as_bytes()).unwrap();
    let file = |i| EntryMeta::File {
        mode: 0o644,
        size: 10 * u64::from(i),
        mtime: Mtime {
            secs: 1_700_000_000,
            nanos: i,
        },
        recipe: h(i),
    };
    manifest::build_from_paths(
        [
            ("index.html".to_string(), file(1)),
            ("css/site.css".into(), file(2)),
            ("img/a/b/logo.png".into(), file(3)),
            (
                "current".into(),
                EntryMeta::Symlink {
                    target: "css".into(),
                },
            ),
        ],
        &mut nodes,
    )
    .unwrap();
    let chunks: Vec<ChunkEntry> = (0..5000)
        .map(|i| ChunkEntry {
            hash: h(i),
            len: 65536,
        })
        .collect();
    manifest::build_recipe(chunks, &mut nodes).unwrap();
    let mut all: Vec<&Vec<u8>> = nodes.nodes.values().collect();
    all.sort();
    for (i, n) in all.into_iter().enumerate() {
        write("manifest_node", &format!("node-{i:02}"), n);
    }

    // Peer messages: a record, relayed, and both steps of gossip.
    let v = pb::DirVersion {
        dir: "www".into(),
        version: 7,
        root: vec![1; 32],
        publisher: "src".into(),
        entries: 3,
        bytes: 100,
        time: 1_700_000_000_000,
        signature: vec![2; 64],
    };
    let record = pb::Holdings {
        from: Some(pb::Member {
            node_id: "r1".into(),
            address: "10.0.0.2:7400".into(),
            labels: [("rack".to_string(), "r12".to_string())].into(),
        }),
        dirs: vec![v.clone()],
        pulling: vec![pb::DirVersion {
            version: 8,
            ..v.clone()
        }],
        protocol: syncd::wire::PROTOCOL,
        incarnation: 1_700_000_000_000,
        seq: 3,
        reports: vec![pb::DirReport {
            dir: "www".into(),
            state: "syncing".into(),
            mode: "replica".into(),
            pending_bytes: 10,
            rate: 1e6,
            last_error: "disk full".into(),
            control: "pause by alice at 2023-11-14T22:13:20Z".into(),
        }],
        certificates: vec![vec![0x30, 0x82, 0x01, 0x00]],
        controls: vec![pb::Control {
            dir: "www".into(),
            action: "pause".into(),
            priority: String::new(),
            operator: "alice".into(),
            time: 1_700_000_000_000,
            signature: vec![3; 64],
        }],
        signature: vec![4; 64],
    };
    let tagged = |kind: u8, m: &dyn Fn(&mut Vec<u8>)| {
        let mut out = vec![kind];
        m(&mut out);
        out
    };
    write(
        "peer_messages",
        "exchange",
        &tagged(0, &|o| record.encode(o).unwrap()),
    );
    write(
        "peer_messages",
        "relayed",
        &tagged(1, &|o| record.encode(o).unwrap()),
    );
    let step1 = pb::GossipRequest {
        protocol: syncd::wire::PROTOCOL,
        from: "r2".into(),
        digest: 0x1234_5678,
        ..Default::default()
    };
    write(
        "peer_messages",
        "gossip-digest",
        &tagged(2, &|o| step1.encode(o).unwrap()),
    );
    let step2 = pb::GossipRequest {
        buckets: vec![1, 5, 63],
        keys: vec![pb::RecordKey {
            node_id: "r1".into(),
            incarnation: 1,
            seq: 2,
        }],
        records: vec![record.clone()],
        ..step1
    };
    write(
        "peer_messages",
        "gossip-records",
        &tagged(2, &|o| step2.encode(o).unwrap()),
    );
    let reply = pb::GossipReply {
        protocol: syncd::wire::PROTOCOL,
        records: vec![record.clone()],
        want: vec!["r3".into()],
        ..Default::default()
    };
    write(
        "peer_messages",
        "gossip-reply",
        &tagged(3, &|o| reply.encode(o).unwrap()),
    );
    // The same under TLS (kinds 4, 5): a record really signed by its
    // owner, its version by its publisher and a control by an operator,
    // with their certificates (of a CA the fuzzed node does not trust, so
    // the checks run to the end and refuse).
    let pki = tempfile::tempdir().unwrap();
    let ca = pki.path().join("ca");
    syncd::tls::pki::init(&ca, "seed CA", 3650).unwrap();
    syncd::tls::pki::issue(&ca, "r1", 3650, pki.path()).unwrap();
    syncd::tls::pki::issue_operator(&ca, "alice", 3650, pki.path()).unwrap();
    let r1 = syncd::tls::Tls::new(
        syncd::tls::TlsFiles {
            ca: syncd::tls::pki::ca_files(&ca).0,
            cert: pki.path().join("r1.pem"),
            key: pki.path().join("r1.key"),
        },
        "r1",
    )
    .unwrap();
    let alice = syncd::tls::control::Operator::load(
        &pki.path().join("alice.pem"),
        &pki.path().join("alice.key"),
    )
    .unwrap();
    let mut signed = record.clone();
    for d in signed.dirs.iter_mut().chain(signed.pulling.iter_mut()) {
        d.publisher = "r1".into();
        r1.signer().sign(d, 1_700_000_000_000);
    }
    signed.controls = vec![alice.sign("www", "pause", "", 1_700_000_000_000)];
    signed.certificates = vec![alice.cert().to_vec()];
    r1.signer().sign_record(&mut signed);
    write(
        "peer_messages",
        "exchange-tls",
        &tagged(4, &|o| signed.encode(o).unwrap()),
    );
    write(
        "peer_messages",
        "relayed-tls",
        &tagged(5, &|o| signed.encode(o).unwrap()),
    );

    // SWIM: what one node sends another to join, and the answers.
    use foca::{Foca, NoCustomBroadcast, PostcardCodec};
    use syncd::fleet::membership::Ident;
    let ident = |n: u8| Ident {
        address: format!("10.0.0.{n}:7400"),
        node_id: format!("n{n}"),
        bump: 1,
    };
    let foca = |n: u8| -> Foca<Ident, PostcardCodec, rand::rngs::StdRng, NoCustomBroadcast> {
        Foca::new(
            ident(n),
            foca::Config::new_lan(std::num::NonZeroU32::new(64).unwrap()),
            rand::rngs::StdRng::seed_from_u64(u64::from(n)),
            PostcardCodec,
        )
    };
    let mut nodes = [foca(1), foca(2), foca(3)];
    let mut rts: Vec<foca::AccumulatingRuntime<Ident>> =
        (0..3).map(|_| foca::AccumulatingRuntime::new()).collect();
    nodes[1].announce(ident(3), &mut rts[1]).unwrap();
    nodes[0].announce(ident(2), &mut rts[0]).unwrap();
    let mut packets = Vec::new();
    for _ in 0..4 {
        let mut out = Vec::new();
        for rt in rts.iter_mut() {
            while let Some((to, data)) = rt.to_send() {
                out.push((to, data));
            }
        }
        for (to, data) in out {
            packets.push(data.to_vec());
            let k = usize::from(to.node_id.as_bytes()[1] - b'1');
            let _ = nodes[k].handle_data(&data, &mut rts[k]);
        }
    }
    assert!(!packets.is_empty());
    for (i, p) in packets.iter().enumerate().take(8) {
        write("swim_packet", &format!("packet-{i}"), p);
    }

    // Configuration: the shipped examples, node file then a directory's.
    let ops = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/examples");
    let node = fs::read(ops.join("syncd.toml")).unwrap();
    for d in ["www.toml", "nginx-conf.toml"] {
        let mut data = node.clone();
        data.push(0);
        data.extend(fs::read(ops.join("dirs.d").join(d)).unwrap());
        write("config", d, &data);
    }
    let mut tls = b"[node]\nid = \"web-01\"\nlisten = \"10.0.0.1:7400\"\nstate_dir = \"/var/lib/syncd\"\n[tls]\nca = \"ca.pem\"\ncert = \"web-01.pem\"\nkey = \"web-01.key\"\n".to_vec();
    tls.push(0);
    tls.extend(b"id = \"www\"\npath = \"/srv/www\"\nmode = \"replica\"\npublishers = [\"web-02\"]\n[limits]\ndownload = \"10MB\"\n");
    write("config", "tls-publishers", &tls);
}
