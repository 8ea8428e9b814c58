use std::collections::{BTreeMap, BTreeSet, HashSet};

use proptest::prelude::*;

use super::*;
use crate::error::{Error, Origin};

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

/// A remote tree built by hand: nodes the builder would never make.
struct Hostile(MemNodes);

impl Hostile {
    fn new() -> Hostile {
        Hostile(MemNodes {
            origin: Some(Origin::Remote),
            ..Default::default()
        })
    }
    fn put(&mut self, n: Node) -> Hash {
        let b = n.encode();
        let h = Hash::of(&b);
        self.0.nodes.insert(h, b);
        h
    }
    fn file(&mut self, size: u64) -> EntryMeta {
        let recipe = self.put(Node::RecipeLeaf(vec![ChunkEntry {
            hash: Hash::of(b"x"),
            len: size as u32,
        }]));
        EntryMeta::File {
            mode: 0o644,
            size,
            mtime: Mtime {
                secs: 1_700_000_000,
                nanos: 0,
            },
            recipe,
        }
    }
    fn dir_leaf(&mut self, entries: Vec<(String, EntryMeta)>) -> Hash {
        self.put(Node::DirLeaf(
            entries
                .into_iter()
                .map(|(name, meta)| DirEntry { name, meta })
                .collect(),
        ))
    }
}

fn diff_remote(remote: &Hostile, root: Hash, limits: DiffLimits) -> Result<Diff, Error> {
    let empty = MemNodes::default();
    diff_limited(
        &empty,
        None,
        &remote.0,
        Some(root),
        &mut |_| Ok(false),
        limits,
    )
}

/// Issue 8 item 2: 17 nested 255-byte names, the first with `é` straddling
/// byte 64. The path-too-long error sliced `&path[..64]` and panicked.
#[test]
fn an_overlong_path_with_a_multibyte_character_at_byte_64_is_an_error() {
    let mut first = "a".repeat(63);
    first.push('é');
    first.push_str(&"a".repeat(255 - first.len()));
    assert_eq!(first.len(), 255);
    assert!(!first.is_char_boundary(64));
    let mut t = Hostile::new();
    let file = t.file(1);
    let mut child = t.dir_leaf(vec![("f".into(), file)]);
    for depth in (0..17).rev() {
        let name = if depth == 0 {
            first.clone()
        } else {
            format!("{depth:02}{}", "b".repeat(253))
        };
        child = t.dir_leaf(vec![(
            name,
            EntryMeta::Dir {
                mode: 0o755,
                root: child,
            },
        )]);
    }
    let err = diff_remote(&t, child, DiffLimits::NONE).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidTree {
                origin: Origin::Remote,
                ..
            }
        ) && err.to_string().contains("exceeds 4096 bytes"),
        "{err}"
    );
}

/// Issue 8 item 4: pages referenced many times. Three distinct nodes make
/// a million paths; the version declared 3 entries, so the diff stops
/// after the fourth, having read a handful of nodes.
#[test]
fn a_dag_of_shared_pages_is_bounded_by_the_declared_size() {
    let mut t = Hostile::new();
    let file = t.file(1);
    let l0 = t.dir_leaf(vec![("f".into(), file)]);
    let l1 = t.dir_leaf(
        (0..1000)
            .map(|i| {
                (
                    format!("d{i:04}"),
                    EntryMeta::Dir {
                        mode: 0o755,
                        root: l0,
                    },
                )
            })
            .collect(),
    );
    let root = t.dir_leaf(
        (0..1000)
            .map(|i| {
                (
                    format!("d{i:04}"),
                    EntryMeta::Dir {
                        mode: 0o755,
                        root: l1,
                    },
                )
            })
            .collect(),
    );
    let err = diff_remote(&t, root, DiffLimits::declared(3, 3, 16 << 10)).unwrap_err();
    assert!(err.to_string().contains("more than the 3 entries"), "{err}");
    // Declared honestly (2,001,001 entries) the walk is bounded by the
    // node budget instead of running over every path.
    let counting = CachedNodes::new(&t.0, 1 << 20);
    let empty = MemNodes::default();
    let limits = DiffLimits {
        max_nodes: 200,
        ..DiffLimits::NONE
    };
    let err = diff_limited(
        &empty,
        None,
        &counting,
        Some(root),
        &mut |_| Ok(false),
        limits,
    )
    .unwrap_err();
    assert!(err.to_string().contains("more than 200 nodes"), "{err}");
    // Each distinct node was fetched once, however often it is referenced.
    assert_eq!(counting.fetched(), 4);
}

/// Issue 8 item 4: a 2^60-byte file whose recipe reuses one page at every
/// level: the diff reads each distinct node once.
#[test]
fn a_recipe_reusing_one_page_is_walked_once() {
    let mut t = Hostile::new();
    let leaf = t.put(Node::RecipeLeaf(
        (0..16u8)
            .map(|i| ChunkEntry {
                hash: Hash::of(&[i]),
                len: 256 << 10,
            })
            .collect(),
    ));
    let (mut child, mut below) = (leaf, 16u64 * (256 << 10));
    let mut level = 0;
    while below < 1 << 60 {
        level += 1;
        // 4096 children a level (the last level fewer: exactly 2^60).
        let fan = 4096.min((1u64 << 60) / below);
        child = t.put(Node::Index {
            tree: Tree::Recipe,
            level,
            children: vec![Child { hash: child, below }; fan as usize],
        });
        below *= fan;
    }
    assert_eq!(below, 1 << 60);
    let meta = EntryMeta::File {
        mode: 0o644,
        size: below,
        mtime: Mtime::default(),
        recipe: child,
    };
    let root = t.dir_leaf(vec![("huge".into(), meta)]);
    let d = diff_remote(&t, root, DiffLimits::declared(1, below, 16 << 10)).unwrap();
    assert_eq!(d.missing_chunks.len(), 16);
    assert!(
        d.nodes_visited <= 2 + u64::from(level),
        "{}",
        d.nodes_visited
    );
    // A recipe that cannot be the file's: refused when read for writing.
    let err = read_recipe_checked(&t.0, &child, 1 << 30, 16 << 10)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_err();
    assert!(err.to_string().contains("covers more than"), "{err}");
    // A DAG of empty pages (which never adds bytes) is refused at once.
    let empty = t.put(Node::RecipeLeaf(vec![]));
    let mut top = empty;
    for level in 1..=40 {
        top = t.put(Node::Index {
            tree: Tree::Recipe,
            level,
            children: vec![
                Child {
                    hash: top,
                    below: 0
                };
                4096
            ],
        });
    }
    let err = read_recipe_checked(&t.0, &top, 1 << 20, 16 << 10)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_err();
    assert!(err.to_string().contains("empty page"), "{err}");
    // An honest recipe streams back whole.
    let chunks: Vec<ChunkEntry> = (0..3000u32)
        .map(|i| ChunkEntry {
            hash: Hash::of(&i.to_le_bytes()),
            len: 20_000,
        })
        .collect();
    let mut nodes = MemNodes::default();
    let r = build_recipe(chunks.clone(), &mut nodes).unwrap();
    let back: Vec<ChunkEntry> = read_recipe_checked(&nodes, &r, 3000 * 20_000, 16 << 10)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(back, chunks);
}

/// Issue 8 item 11: a name in two pages, a reserved temp name, and an mtime
/// no file system keeps are each refused with the path named.
#[test]
fn names_repeated_across_pages_reserved_names_and_absurd_mtimes_are_refused() {
    let mut t = Hostile::new();
    let f = t.file(1);
    let p1 = t.dir_leaf(vec![
        ("a.txt".into(), f.clone()),
        ("dup.txt".into(), f.clone()),
    ]);
    let p2 = t.dir_leaf(vec![
        ("dup.txt".into(), f.clone()),
        ("z.txt".into(), f.clone()),
    ]);
    let root = t.put(Node::Index {
        tree: Tree::Dir,
        level: 1,
        children: vec![Child { hash: p1, below: 2 }, Child { hash: p2, below: 2 }],
    });
    let err = diff_remote(&t, root, DiffLimits::NONE).unwrap_err();
    assert!(
        err.to_string().contains("\"dup.txt\": name repeated"),
        "{err}"
    );

    // The same repetition when the local side has the first page: that
    // page is skipped unread on both sides, and the repetition is still
    // caught (the order check resumes from the skipped page's last name).
    let mut local = Hostile::new();
    local.0.origin = Some(Origin::Local);
    let lp1 = local.dir_leaf(vec![
        ("a.txt".into(), f.clone()),
        ("dup.txt".into(), f.clone()),
    ]);
    assert_eq!(lp1, p1);
    let lp3 = local.dir_leaf(vec![("zz.txt".into(), f.clone())]);
    let lroot = local.put(Node::Index {
        tree: Tree::Dir,
        level: 1,
        children: vec![
            Child {
                hash: lp1,
                below: 2,
            },
            Child {
                hash: lp3,
                below: 1,
            },
        ],
    });
    let err = diff_limited(
        &local.0,
        Some(lroot),
        &t.0,
        Some(root),
        &mut |_| Ok(false),
        DiffLimits::NONE,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("\"dup.txt\": name repeated"),
        "{err}"
    );

    let mut t = Hostile::new();
    let f = t.file(1);
    let root = t.dir_leaf(vec![(".syncd-tmp.1.2.x".into(), f)]);
    let err = diff_remote(&t, root, DiffLimits::NONE).unwrap_err();
    assert!(
        err.to_string()
            .contains("\".syncd-tmp.1.2.x\": names starting"),
        "{err}"
    );

    let mut t = Hostile::new();
    let EntryMeta::File {
        mode, size, recipe, ..
    } = t.file(1)
    else {
        unreachable!()
    };
    let meta = EntryMeta::File {
        mode,
        size,
        recipe,
        mtime: Mtime {
            secs: i64::MAX,
            nanos: 0,
        },
    };
    let root = t.dir_leaf(vec![("late".into(), meta)]);
    let err = diff_remote(&t, root, DiffLimits::NONE).unwrap_err();
    assert!(
        err.to_string().contains("\"late\": modification time"),
        "{err}"
    );
}

/// A source that answers many ids per call, and counts single and batched
/// calls (a peer: every call a round trip).
struct Batching {
    nodes: MemNodes,
    singles: std::cell::Cell<u64>,
    batches: std::cell::Cell<u64>,
}

impl NodeSource for Batching {
    fn get_node(&self, hash: &Hash) -> Result<Option<Vec<u8>>, Error> {
        self.singles.set(self.singles.get() + 1);
        self.nodes.get_node(hash)
    }
    fn origin(&self) -> Origin {
        Origin::Remote
    }
    fn get_many(&self, hashes: &[Hash]) -> Result<Vec<(Hash, Vec<u8>)>, Error> {
        self.batches.set(self.batches.get() + 1);
        Ok(hashes
            .iter()
            .filter_map(|h| Some((*h, self.nodes.nodes.get(h)?.clone())))
            .collect())
    }
}

/// A directory of 2,000 new small files: the diff reads their recipes in
/// a few batched calls instead of one round trip each (a replica took
/// 1.3 s for the diff alone over a real network), and the result is the
/// same as without batching; a page held locally is not asked for.
#[test]
fn a_diff_of_many_new_files_reads_their_recipes_in_batches() {
    let mut t = Hostile::new();
    let files: Vec<(String, EntryMeta)> = (0..2000)
        .map(|i| {
            let recipe = t.put(Node::RecipeLeaf(vec![ChunkEntry {
                hash: Hash::of(&(i as u64).to_le_bytes()),
                len: 32 << 10,
            }]));
            (
                format!("f{i:05}"),
                EntryMeta::File {
                    mode: 0o644,
                    size: 32 << 10,
                    mtime: Mtime {
                        secs: 1_700_000_000,
                        nanos: 0,
                    },
                    recipe,
                },
            )
        })
        .collect();
    let root = t.dir_leaf(files);
    let src = Batching {
        nodes: t.0.clone(),
        singles: Default::default(),
        batches: Default::default(),
    };
    let cached = CachedNodes::new(&src, 64 << 20);
    let empty = MemNodes::default();
    let batched = diff_limited(
        &empty,
        None,
        &cached,
        Some(root),
        &mut |_| Ok(false),
        DiffLimits::NONE,
    )
    .unwrap();
    assert_eq!(batched.changes.len(), 2000);
    assert_eq!(batched.missing_chunks.len(), 2000);
    assert!(
        src.singles.get() <= 2 && src.batches.get() <= 10,
        "{} single and {} batched calls",
        src.singles.get(),
        src.batches.get()
    );
    // The same diff without batching.
    let plain = diff_limited(
        &empty,
        None,
        &t.0,
        Some(root),
        &mut |_| Ok(false),
        DiffLimits::NONE,
    )
    .unwrap();
    assert_eq!(
        format!("{:?}", plain.changes),
        format!("{:?}", batched.changes)
    );
    assert_eq!(plain.missing_chunks, batched.missing_chunks);
}
