//! Indexing and diff benchmarks (divan). Run: `cargo bench -p chunk-store`.
//!
//! - `pipeline_in_memory_1gib` vs `chunk_file_1gib` vs `index_file_1gib`:
//!   FastCDC+BLAKE3 over a buffer, the same streamed from a file in page
//!   cache, and a full scan into a fresh RocksDB index, side by side.
//! - `rescan_100k_unchanged`: a scan of 100 k files none of which changed.
//! - `diff_1m_entries_one_changed`: two 1 M-entry manifests differing in
//!   one file, all in one directory (prints the nodes visited).

use std::fs;
use std::path::PathBuf;
use std::sync::LazyLock;

use chunk_store::chunker::{chunk_bytes, chunk_reader};
use chunk_store::manifest::{self, EntryMeta, MemNodes, Mtime};
use chunk_store::store::Store;
use chunk_store::testdata::pseudo_random;
use chunk_store::{ChunkerConfig, Hash, indexer};
use divan::Bencher;
use divan::counter::BytesCount;

const GIB: usize = 1 << 30;

fn main() {
    divan::main();
}

static SCRATCH: LazyLock<tempfile::TempDir> = LazyLock::new(|| tempfile::tempdir().unwrap());

static BUFFER: LazyLock<Vec<u8>> = LazyLock::new(|| pseudo_random(GIB, 1));

/// A directory holding one 1 GiB file, read once so it sits in page cache.
static BIG_DIR: LazyLock<PathBuf> = LazyLock::new(|| {
    let dir = SCRATCH.path().join("big");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("file.bin"), &*BUFFER).unwrap();
    let _ = fs::read(dir.join("file.bin")).unwrap();
    dir
});

#[divan::bench(sample_count = 5, sample_size = 1)]
fn pipeline_in_memory_1gib(b: Bencher) {
    let data = &*BUFFER;
    let cfg = ChunkerConfig::default();
    b.counter(BytesCount::new(GIB))
        .bench(|| chunk_bytes(&cfg, divan::black_box(data)).len());
}

#[divan::bench(sample_count = 5, sample_size = 1)]
fn chunk_file_1gib(b: Bencher) {
    let path = BIG_DIR.join("file.bin");
    let cfg = ChunkerConfig::default();
    b.counter(BytesCount::new(GIB)).bench(|| {
        let mut n = 0;
        chunk_reader(&cfg, fs::File::open(&path).unwrap(), |_, _| n += 1).unwrap();
        n
    });
}

#[divan::bench(sample_count = 5, sample_size = 1)]
fn index_file_1gib(b: Bencher) {
    let dir = &*BIG_DIR;
    b.counter(BytesCount::new(GIB))
        .with_inputs(|| {
            let state = tempfile::tempdir_in(SCRATCH.path()).unwrap();
            let store = Store::open(state.path(), ChunkerConfig::default()).unwrap();
            (state, store)
        })
        .bench_local_values(|(state, store)| {
            let r = indexer::scan(&store, "big", dir).unwrap();
            assert_eq!(r.bytes_read, GIB as u64);
            (state, store)
        });
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn rescan_100k_unchanged(b: Bencher) {
    let root = SCRATCH.path().join("many");
    for i in 0..100_000u32 {
        let p = root.join(format!("d{:03}/f{i:06}", i % 317));
        if i < 317 {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
        }
        fs::write(p, i.to_le_bytes()).unwrap();
    }
    let state = tempfile::tempdir_in(SCRATCH.path()).unwrap();
    let store = Store::open(state.path(), ChunkerConfig::default()).unwrap();
    assert_eq!(indexer::scan(&store, "many", &root).unwrap().files, 100_000);
    b.bench_local(|| {
        let r = indexer::scan(&store, "many", &root).unwrap();
        assert_eq!(r.files_read, 0);
        r
    });
}

#[divan::bench(sample_count = 20, sample_size = 1)]
fn diff_1m_entries_one_changed(b: Bencher) {
    let empty = manifest::build_recipe(vec![], &mut MemNodes::default()).unwrap();
    let file = |i: u32| EntryMeta::File {
        mode: 0o644,
        size: u64::from(i),
        mtime: Mtime::default(),
        recipe: empty,
    };
    let build = |changed: Option<u32>| {
        let mut nodes = MemNodes::default();
        let root = manifest::build_from_paths(
            (0..1_000_000u32).map(|i| {
                let meta = if Some(i) == changed {
                    file(u32::MAX)
                } else {
                    file(i)
                };
                (format!("flat/{i:07}"), meta)
            }),
            &mut nodes,
        )
        .unwrap();
        (nodes, root)
    };
    let (a, ra) = build(None);
    let (c, rc) = build(Some(500_001));
    let mut visited = 0;
    b.bench_local(|| {
        let d = manifest::diff(&a, Some(ra), &c, Some(rc), &mut |_: &Hash| Ok(true)).unwrap();
        visited = d.nodes_visited;
        d
    });
    println!(
        "diff_1m_entries_one_changed: nodes_visited = {visited}, nodes per tree = {}",
        a.nodes.len()
    );
}
