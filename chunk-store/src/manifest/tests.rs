use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn chunk(i: u8) -> ChunkEntry {
    ChunkEntry {
        hash: Hash::of(&[i]),
        len: 1000 + u32::from(i),
    }
}

/// A file as the generators see it: metadata plus its chunks.
#[derive(Clone, Debug, PartialEq)]
enum Spec {
    File {
        mode: u32,
        secs: i64,
        chunks: Vec<u8>,
    },
    Dir {
        mode: u32,
    },
    Symlink(String),
}

fn materialize(specs: &BTreeMap<String, Spec>, nodes: &mut MemNodes) -> Hash {
    let entries: Vec<(String, EntryMeta)> = specs
        .iter()
        .map(|(p, s)| {
            let meta = match s {
                Spec::File { mode, secs, chunks } => {
                    let chunks: Vec<ChunkEntry> = chunks.iter().map(|&i| chunk(i)).collect();
                    EntryMeta::File {
                        mode: *mode,
                        size: chunks.iter().map(|c| u64::from(c.len)).sum(),
                        mtime: Mtime {
                            secs: *secs,
                            nanos: 0,
                        },
                        recipe: build_recipe(chunks, nodes).unwrap(),
                    }
                }
                Spec::Dir { mode } => EntryMeta::Dir {
                    mode: *mode,
                    root: Hash([0; 32]),
                },
                Spec::Symlink(t) => EntryMeta::Symlink { target: t.clone() },
            };
            (p.clone(), meta)
        })
        .collect();
    build_from_paths(entries, nodes).unwrap()
}

/// The flat view the naive oracle compares: every path including implied
/// parent directories, directory roots erased.
fn flatten(specs: &BTreeMap<String, Spec>) -> BTreeMap<String, Spec> {
    let mut out = specs.clone();
    for p in specs.keys() {
        let mut acc = String::new();
        let parts: Vec<&str> = p.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            out.entry(acc.clone()).or_insert(Spec::Dir { mode: 0o755 });
        }
    }
    out
}

fn kind_of(s: &Spec) -> u8 {
    match s {
        Spec::File { .. } => 0,
        Spec::Dir { .. } => 1,
        Spec::Symlink(_) => 2,
    }
}

fn naive(
    local: &BTreeMap<String, Spec>,
    remote: &BTreeMap<String, Spec>,
) -> BTreeSet<(String, ChangeKind)> {
    let (l, r) = (flatten(local), flatten(remote));
    let mut out = BTreeSet::new();
    for (p, s) in &l {
        match r.get(p) {
            None => {
                out.insert((p.clone(), ChangeKind::Removed));
            }
            Some(t) if kind_of(s) != kind_of(t) => {
                out.insert((p.clone(), ChangeKind::Removed));
                out.insert((p.clone(), ChangeKind::Added));
            }
            Some(t) if s != t => {
                out.insert((p.clone(), ChangeKind::Modified));
            }
            Some(_) => {}
        }
    }
    for p in r.keys() {
        if !l.contains_key(p) {
            out.insert((p.clone(), ChangeKind::Added));
        }
    }
    out
}

fn all_chunks(specs: &BTreeMap<String, Spec>) -> BTreeSet<u8> {
    specs
        .values()
        .filter_map(|s| match s {
            Spec::File { chunks, .. } => Some(chunks.iter().copied()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn run_diff(
    local: &BTreeMap<String, Spec>,
    remote: &BTreeMap<String, Spec>,
) -> (Diff, MemNodes, MemNodes) {
    let mut ln = MemNodes::default();
    let mut rn = MemNodes {
        origin: Some(Origin::Remote),
        ..Default::default()
    };
    let lroot = materialize(local, &mut ln);
    let rroot = materialize(remote, &mut rn);
    let have: BTreeSet<Hash> = all_chunks(local)
        .into_iter()
        .map(|i| chunk(i).hash)
        .collect();
    let d = diff(&ln, Some(lroot), &rn, Some(rroot), &mut |h| {
        Ok(have.contains(h))
    })
    .unwrap();
    (d, ln, rn)
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    prop_oneof![
        6 => (prop_oneof![Just(0o644u32), Just(0o755)], 0i64..3, prop::collection::vec(0u8..40, 0..4))
            .prop_map(|(mode, secs, chunks)| Spec::File { mode, secs, chunks }),
        1 => prop_oneof![Just(0o755u32), Just(0o700)].prop_map(|mode| Spec::Dir { mode }),
        1 => "[a-c]{1,3}".prop_map(Spec::Symlink),
    ]
}

/// Paths: directories named `d*`, leaves named `f*` so generated trees
/// never use one name as both a file and a parent. A few directories get
/// hundreds of entries so paging and index levels are exercised.
fn tree_strategy() -> impl Strategy<Value = BTreeMap<String, Spec>> {
    let path = (
        prop_oneof![Just(""), Just("d1/"), Just("d1/d2/"), Just("d3/")],
        0u32..700,
    )
        .prop_map(|(dir, n)| format!("{dir}f{n}"));
    prop::collection::btree_map(path, spec_strategy(), 0..500)
}

#[derive(Clone, Debug)]
enum Edit {
    Put(String, Spec),
    Remove(usize),
    RemoveDir(&'static str),
    Touch(usize, i64),
}

fn edits_strategy() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        3 => ((prop_oneof![Just(""), Just("d1/"), Just("d1/d2/"), Just("d3/"), Just("d4/")], 0u32..700), spec_strategy())
            .prop_map(|((d, n), s)| Edit::Put(format!("{d}f{n}"), s)),
        3 => any::<usize>().prop_map(Edit::Remove),
        1 => prop_oneof![Just("d1"), Just("d1/d2"), Just("d3")].prop_map(Edit::RemoveDir),
        2 => (any::<usize>(), 3i64..6).prop_map(|(i, s)| Edit::Touch(i, s)),
    ];
    prop::collection::vec(edit, 0..12)
}

fn apply(tree: &BTreeMap<String, Spec>, edits: &[Edit]) -> BTreeMap<String, Spec> {
    let mut t = tree.clone();
    for e in edits {
        match e {
            Edit::Put(p, s) => {
                t.insert(p.clone(), s.clone());
            }
            Edit::Remove(i) if !t.is_empty() => {
                let k = t.keys().nth(i % t.len()).unwrap().clone();
                t.remove(&k);
            }
            Edit::Remove(_) => {}
            Edit::RemoveDir(d) => t.retain(|k, _| !k.starts_with(&format!("{d}/"))),
            Edit::Touch(i, secs) if !t.is_empty() => {
                let k = t.keys().nth(i % t.len()).unwrap().clone();
                if let Some(Spec::File { secs: s, .. }) = t.get_mut(&k) {
                    *s = *secs;
                }
            }
            Edit::Touch(..) => {}
        }
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The diff of two trees is exactly the set difference of their
    /// entries, and its missing chunks are exactly the remote chunks the
    /// local side lacks.
    #[test]
    fn diff_is_exact(base in tree_strategy(), edits in edits_strategy()) {
        let remote = apply(&base, &edits);
        let (d, ..) = run_diff(&base, &remote);
        let got: BTreeSet<(String, ChangeKind)> =
            d.changes.iter().map(|c| (c.path.clone(), c.kind)).collect();
        prop_assert_eq!(got.len(), d.changes.len(), "a change reported twice");
        prop_assert_eq!(&got, &naive(&base, &remote));

        let local_chunks = all_chunks(&base);
        let want: BTreeSet<Hash> = all_chunks(&remote)
            .difference(&local_chunks)
            .map(|&i| chunk(i).hash)
            .collect();
        let missing: BTreeSet<Hash> = d.missing_chunks.iter().map(|c| c.hash).collect();
        prop_assert_eq!(missing.len(), d.missing_chunks.len(), "a chunk listed twice");
        prop_assert_eq!(missing, want);

        // And back: the reverse diff swaps added and removed.
        let (back, ..) = run_diff(&remote, &base);
        let flipped: BTreeSet<(String, ChangeKind)> = back.changes.iter().map(|c| {
            let k = match c.kind {
                ChangeKind::Added => ChangeKind::Removed,
                ChangeKind::Removed => ChangeKind::Added,
                ChangeKind::Modified => ChangeKind::Modified,
            };
            (c.path.clone(), k)
        }).collect();
        prop_assert_eq!(flipped, got);
    }

    /// Equal content gives an equal root whatever order it was built in,
    /// and the diff of a tree with itself reads nothing.
    #[test]
    fn root_depends_only_on_content(tree in tree_strategy()) {
        let mut a = MemNodes::default();
        let ra = materialize(&tree, &mut a);
        let mut b = MemNodes::default();
        let rb = build_from_paths(
            list(&a, &ra).unwrap().into_iter().rev(),
            &mut b,
        ).unwrap();
        prop_assert_eq!(ra, rb);
        let d = diff(&a, Some(ra), &b, Some(rb), &mut |_| Ok(false)).unwrap();
        prop_assert_eq!(d.nodes_visited, 0);
        prop_assert!(d.changes.is_empty());
    }

    /// Every node the builder makes decodes to itself and re-encodes to the
    /// same bytes (one encoding per node).
    #[test]
    fn nodes_round_trip(tree in tree_strategy()) {
        let mut n = MemNodes::default();
        materialize(&tree, &mut n);
        for (h, bytes) in &n.nodes {
            prop_assert_eq!(Hash::of(bytes), *h);
            let node = Node::decode(bytes).unwrap();
            prop_assert!(bytes.len() <= 256 << 10);
            prop_assert_eq!(&node.encode(), bytes);
        }
    }

    /// Arbitrary bytes never panic the decoder, and whatever it accepts is
    /// canonical.
    #[test]
    fn decoder_is_total_and_canonical(bytes in prop::collection::vec(any::<u8>(), 0..400), kind in 1u8..5) {
        let mut b = bytes;
        if b.len() >= 3 { b[0] = FORMAT_VERSION; b[1] = kind; }
        if let Ok(node) = Node::decode(&b) {
            prop_assert_eq!(node.encode(), b);
        }
    }
}

fn file(i: u32) -> EntryMeta {
    EntryMeta::File {
        mode: 0o644,
        size: 1000,
        mtime: Mtime {
            secs: i64::from(i),
            nanos: 0,
        },
        recipe: build_recipe(vec![], &mut MemNodes::default()).unwrap(),
    }
}

#[test]
fn large_directory_is_paged_and_diff_reads_little() {
    let n = 50_000u32;
    let names = |skip: Option<u32>| {
        (0..n)
            .filter(move |i| Some(*i) != skip)
            .map(|i| (format!("big/file-{i:06}"), file(i)))
    };
    let mut a = MemNodes::default();
    let ra = build_from_paths(names(None), &mut a).unwrap();
    let mut b = MemNodes::default();
    let rb = build_from_paths(names(Some(25_000)), &mut b).unwrap();
    assert!(a.nodes.len() > 100, "50 k entries must be split into pages");
    assert!(a.nodes.values().all(|v| v.len() <= 256 << 10));
    let d = diff(&a, Some(ra), &b, Some(rb), &mut |_| Ok(true)).unwrap();
    assert_eq!(d.changes.len(), 1);
    assert_eq!(d.changes[0].path, "big/file-025000");
    assert_eq!(d.changes[0].kind, ChangeKind::Removed);
    assert!(d.nodes_visited <= 16, "visited {}", d.nodes_visited);
}

#[test]
fn modified_large_file_reads_only_changed_recipe_pages() {
    // ~100 k chunks, like a 6 GiB file.
    let old: Vec<ChunkEntry> = (0..100_000u32)
        .map(|i| ChunkEntry {
            hash: Hash::of(&i.to_le_bytes()),
            len: 65536,
        })
        .collect();
    let mut new = old.clone();
    new[50_000] = ChunkEntry {
        hash: Hash::of(b"edited"),
        len: 70000,
    };
    let mut ln = MemNodes::default();
    let mut rn = MemNodes::default();
    let mk = |chunks: Vec<ChunkEntry>, sink: &mut MemNodes| {
        let size = chunks.iter().map(|c| u64::from(c.len)).sum();
        let recipe = build_recipe(chunks, sink).unwrap();
        build_from_paths(
            [(
                "f".to_string(),
                EntryMeta::File {
                    mode: 0o644,
                    size,
                    mtime: Mtime::default(),
                    recipe,
                },
            )],
            sink,
        )
        .unwrap()
    };
    let lr = mk(old.clone(), &mut ln);
    let rr = mk(new, &mut rn);
    let have: HashSet<Hash> = old.iter().map(|c| c.hash).collect();
    let d = diff(&ln, Some(lr), &rn, Some(rr), &mut |h| Ok(have.contains(h))).unwrap();
    assert_eq!(
        d.missing_chunks,
        vec![ChunkEntry {
            hash: Hash::of(b"edited"),
            len: 70000
        }]
    );
    // Local index nodes to learn the old page ids, plus the changed remote
    // path: root, index, leaf — not the ~200 leaves.
    assert!(d.nodes_visited < 16, "visited {}", d.nodes_visited);
    assert_eq!(
        read_recipe(
            &rn,
            &match &d.changes[0].remote {
                Some(EntryMeta::File { recipe, .. }) => *recipe,
                _ => panic!(),
            }
        )
        .unwrap()
        .len(),
        100_000
    );
}

/// The benchmark target: two manifests of 1 M entries in one directory
/// that differ in one file.
#[test]
fn one_million_entries_diff_visits_at_most_64_nodes() {
    let n = 1_000_000u32;
    let build = |changed: bool| {
        let mut nodes = MemNodes::default();
        let entries = (0..n).map(|i| {
            let meta = if changed && i == 777_777 {
                file(u32::MAX)
            } else {
                file(i)
            };
            (format!("flat/{i:07}"), meta)
        });
        let root = build_from_paths(entries, &mut nodes).unwrap();
        (nodes, root)
    };
    let (a, ra) = build(false);
    let (b, rb) = build(true);
    assert!(a.nodes.values().all(|v| v.len() <= 256 << 10));
    let d = diff(&a, Some(ra), &b, Some(rb), &mut |_| Ok(true)).unwrap();
    assert_eq!(d.changes.len(), 1);
    assert_eq!(d.changes[0].path, "flat/0777777");
    assert!(d.nodes_visited <= 64, "visited {}", d.nodes_visited);
}

/// A 100 GiB file's recipe (1.6 M chunks of 64 KiB) is paged: no node
/// near the limit, a few levels deep.
#[test]
fn recipe_of_100_gib_is_paged() {
    let chunks: Vec<ChunkEntry> = (0..1_600_000u32)
        .map(|i| ChunkEntry {
            hash: Hash::of(&i.to_le_bytes()),
            len: 64 << 10,
        })
        .collect();
    let mut nodes = MemNodes::default();
    let root = build_recipe(chunks.clone(), &mut nodes).unwrap();
    let biggest = nodes.nodes.values().map(Vec::len).max().unwrap();
    assert!(biggest <= 256 << 10, "node of {biggest} bytes");
    assert!(nodes.nodes.len() > 1000);
    let level = Node::decode(&nodes.nodes[&root]).unwrap().level();
    assert!((1..=3).contains(&level), "root at level {level}");
    assert_eq!(read_recipe(&nodes, &root).unwrap(), chunks);
}

fn remote_nodes(pairs: &[Vec<u8>]) -> MemNodes {
    MemNodes {
        nodes: pairs.iter().map(|b| (Hash::of(b), b.clone())).collect(),
        origin: Some(Origin::Remote),
    }
}

fn raw_leaf(name: &str) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION, KIND_DIR_LEAF, 0];
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(TYPE_SYMLINK);
    out.extend_from_slice(&1u16.to_le_bytes());
    out.push(b'x');
    out
}

#[test]
fn hostile_nodes_are_rejected_with_the_peer_blamed() {
    let empty = MemNodes::default();
    let mut no = |_: &Hash| Ok(false);
    for (bytes, want) in [
        (raw_leaf(".."), "not allowed"),
        (raw_leaf("a/b"), "contains '/'"),
        (raw_leaf(""), "empty name"),
        (
            {
                let mut b = raw_leaf("ok");
                b[3..7].copy_from_slice(&100_000u32.to_le_bytes());
                b
            },
            "entry limit",
        ),
        (
            {
                let mut b = raw_leaf("ok");
                b.push(0);
                b
            },
            "trailing",
        ),
        (
            {
                let mut b = raw_leaf("ok");
                b[2] = 3;
                b
            },
            "leaf node at level",
        ),
        (vec![9, 1, 0, 0, 0, 0, 0], "unknown node format"),
    ] {
        let src = remote_nodes(std::slice::from_ref(&bytes));
        let err = diff(&empty, None, &src, Some(Hash::of(&bytes)), &mut no).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                Error::InvalidNode {
                    origin: Origin::Remote,
                    ..
                }
            ) && msg.contains(want),
            "{msg} should mention {want}"
        );
    }
    // A node that does not hash to its id.
    let mut forged = remote_nodes(&[raw_leaf("a")]);
    let id = Hash::of(&raw_leaf("b"));
    forged.nodes.insert(id, raw_leaf("a"));
    let err = diff(&empty, None, &forged, Some(id), &mut no).unwrap_err();
    assert!(err.to_string().contains("does not match its hash"), "{err}");
    // A missing node.
    let err = diff(&empty, None, &remote_nodes(&[]), Some(id), &mut no).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MissingNode {
                origin: Origin::Remote,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn unsorted_entries_are_rejected() {
    let a = raw_leaf("b");
    let b = raw_leaf("a");
    let mut bytes = vec![FORMAT_VERSION, KIND_DIR_LEAF, 0];
    bytes.extend_from_slice(&2u32.to_le_bytes());
    bytes.extend_from_slice(&a[7..]);
    bytes.extend_from_slice(&b[7..]);
    assert!(
        Node::decode(&bytes)
            .unwrap_err()
            .contains("not strictly sorted")
    );
}
