use std::collections::HashSet;
use std::fs::{self, FileTimes};
use std::time::{Duration, SystemTime};

use super::*;
use crate::chunker::chunk_bytes;
use crate::manifest::{ChangeKind, ChunkEntry, diff, list, read_recipe};
use crate::{ChunkerConfig, Hash};

fn random(len: usize, seed: u64) -> Vec<u8> {
    crate::testdata::pseudo_random(len, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    store: Store,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    let store = Store::open(&tmp.path().join("state"), ChunkerConfig::default()).unwrap();
    Fixture {
        _tmp: tmp,
        root,
        store,
    }
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, data).unwrap();
}

fn set_mtime(path: &Path, secs: u64) {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_times(FileTimes::new().set_modified(t))
        .unwrap();
}

fn sample_tree(root: &Path) {
    write(root, "a.txt", b"hello");
    write(root, "empty", b"");
    write(root, "sub/big.bin", &random(1 << 20, 1));
    write(root, "sub/deeper/c.txt", b"c");
    fs::create_dir_all(root.join("emptydir")).unwrap();
    std::os::unix::fs::symlink("../a.txt", root.join("sub/link")).unwrap();
}

#[test]
fn rescan_of_unchanged_tree_reads_nothing() {
    let f = fixture();
    sample_tree(&f.root);
    let first = scan(&f.store, "d", &f.root).unwrap();
    assert_eq!((first.files, first.dirs, first.symlinks), (4, 3, 1));
    assert_eq!(first.files_read, 4);
    assert_eq!(first.bytes, 5 + (1 << 20) + 1);
    assert_eq!(first.version, 1);
    assert!(first.changed);
    let second = scan(&f.store, "d", &f.root).unwrap();
    assert_eq!(second.files_read, 0);
    assert_eq!(second.bytes_read, 0);
    assert_eq!(second.root, first.root);
    assert_eq!(second.version, 1);
    assert!(!second.changed);
    assert_eq!((second.chunks, second.bytes), (first.chunks, first.bytes));
    f.store.check("d").unwrap();
}

#[test]
fn unchanged_metadata_means_the_file_is_not_opened() {
    let f = fixture();
    let p = f.root.join("x");
    fs::write(&p, b"aaaa").unwrap();
    set_mtime(&p, 1_000_000);
    let first = scan(&f.store, "d", &f.root).unwrap();
    // Same size, same inode, mtime restored: content differs, but by design
    // the scan trusts the metadata and does not read the file.
    fs::write(&p, b"bbbb").unwrap();
    set_mtime(&p, 1_000_000);
    let second = scan(&f.store, "d", &f.root).unwrap();
    assert_eq!(second.root, first.root);
    assert_eq!(second.files_read, 0);
    // A new mtime is noticed.
    set_mtime(&p, 1_000_001);
    let third = scan(&f.store, "d", &f.root).unwrap();
    assert_ne!(third.root, first.root);
    assert_eq!(third.files_read, 1);
    assert_eq!(third.version, 2);
    f.store.check("d").unwrap();
}

#[test]
fn same_content_under_two_paths_gives_the_same_root() {
    let f = fixture();
    let a = f.root.join("copy-a");
    let b = f.root.join("elsewhere/copy-b");
    for r in [&a, &b] {
        fs::create_dir_all(r).unwrap();
        sample_tree(r);
        for rel in ["a.txt", "empty", "sub/big.bin", "sub/deeper/c.txt"] {
            set_mtime(&r.join(rel), 1_700_000_000);
        }
    }
    let ra = scan(&f.store, "a", &a).unwrap();
    let rb = scan(&f.store, "b", &b).unwrap();
    assert_eq!(ra.root, rb.root);
    // One changed byte (same size, mtime kept) is found once the file is
    // re-read, and changes the root.
    let mut data = fs::read(b.join("sub/big.bin")).unwrap();
    data[12345] ^= 1;
    fs::write(b.join("sub/big.bin"), &data).unwrap();
    let rb2 = scan(&f.store, "b", &b).unwrap();
    assert_ne!(rb2.root, ra.root);
    assert_eq!(rb2.files_read, 1);
    f.store.check("a").unwrap();
    f.store.check("b").unwrap();
}

#[test]
fn removals_renames_and_type_changes_keep_the_index_exact() {
    let f = fixture();
    sample_tree(&f.root);
    let before = scan(&f.store, "d", &f.root).unwrap();
    fs::rename(f.root.join("sub/big.bin"), f.root.join("moved.bin")).unwrap();
    fs::remove_dir_all(f.root.join("sub/deeper")).unwrap();
    fs::remove_file(f.root.join("a.txt")).unwrap();
    fs::create_dir(f.root.join("a.txt")).unwrap();
    let after = scan(&f.store, "d", &f.root).unwrap();
    assert_eq!(after.version, before.version + 1);
    f.store.check("d").unwrap();
    let entries: Vec<String> = list(&f.store, &after.root)
        .unwrap()
        .into_iter()
        .map(|(p, m)| format!("{p}:{}", m.kind_name()))
        .collect();
    assert_eq!(
        entries,
        [
            "a.txt:dir",
            "empty:file",
            "emptydir:dir",
            "moved.bin:file",
            "sub:dir",
            "sub/link:symlink"
        ]
    );
    let recs = f.store.file_records("d").unwrap();
    assert!(!recs.contains_key("sub/deeper/c.txt"));
    assert!(!recs.contains_key("sub/big.bin"));
    // The moved file's chunks are now found at the new path only.
    let EntryMeta::File { recipe, .. } = &recs["moved.bin"].meta else {
        panic!()
    };
    for c in read_recipe(&f.store, recipe).unwrap() {
        let locs = f.store.chunk_locations(&c.hash).unwrap();
        assert!(locs.iter().all(|l| l.path == "moved.bin"), "{locs:?}");
    }
}

#[test]
fn symlinks_are_recorded_not_followed() {
    let f = fixture();
    let outside = f._tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"do not index").unwrap();
    std::os::unix::fs::symlink(&outside, f.root.join("escape")).unwrap();
    let r = scan(&f.store, "d", &f.root).unwrap();
    assert_eq!((r.files, r.symlinks), (0, 1));
    let entries = list(&f.store, &r.root).unwrap();
    assert_eq!(
        entries,
        vec![(
            "escape".to_string(),
            EntryMeta::Symlink {
                target: outside.to_str().unwrap().to_string()
            }
        )]
    );
}

#[test]
fn a_missing_root_is_an_error_and_keeps_the_published_root() {
    let f = fixture();
    sample_tree(&f.root);
    let first = scan(&f.store, "d", &f.root).unwrap();
    fs::remove_dir_all(&f.root).unwrap();
    let err = scan(&f.store, "d", &f.root).unwrap_err();
    assert!(matches!(err, Error::RootUnavailable { .. }), "{err}");
    assert!(err.to_string().contains(f.root.to_str().unwrap()), "{err}");
    assert_eq!(f.store.root("d").unwrap().unwrap().root, first.root);
}

#[test]
fn interesting_file_sizes_round_trip_through_the_index() {
    let f = fixture();
    let cfg = ChunkerConfig::default();
    let (min, avg, max) = (cfg.min() as usize, cfg.avg() as usize, cfg.max() as usize);
    let sizes = [
        0,
        1,
        min - 1,
        min,
        avg,
        max - 1,
        max,
        max + 1,
        4 * max,
        4 * max + 3,
    ];
    for (i, len) in sizes.iter().enumerate() {
        write(&f.root, &format!("f{i:02}-{len}"), &random(*len, i as u64));
    }
    let r = scan(&f.store, "d", &f.root).unwrap();
    assert_eq!(r.files, sizes.len() as u64);
    let recs = f.store.file_records("d").unwrap();
    for (i, len) in sizes.iter().enumerate() {
        let data = random(*len, i as u64);
        let rec = &recs[&format!("f{i:02}-{len}")];
        let EntryMeta::File { recipe, size, .. } = &rec.meta else {
            panic!()
        };
        assert_eq!(*size, *len as u64);
        let got: Vec<(Hash, u32)> = read_recipe(&f.store, recipe)
            .unwrap()
            .iter()
            .map(|c| (c.hash, c.len))
            .collect();
        let want: Vec<(Hash, u32)> = chunk_bytes(&cfg, &data)
            .iter()
            .map(|c| (c.hash, c.len))
            .collect();
        assert_eq!(got, want, "size {len}");
        assert_eq!(rec.chunks, want.len() as u64);
        // Each chunk's recorded location holds exactly its bytes.
        for c in chunk_bytes(&cfg, &data) {
            let loc = f
                .store
                .chunk_locations(&c.hash)
                .unwrap()
                .into_iter()
                .find(|l| l.path == format!("f{i:02}-{len}"))
                .unwrap();
            let bytes = &data[loc.offset as usize..loc.offset as usize + loc.len as usize];
            assert_eq!(Hash::of(bytes), c.hash);
        }
    }
    f.store.check("d").unwrap();
}

#[test]
fn one_byte_insert_into_64_mib_keeps_95_percent_of_chunks() {
    let f = fixture();
    let mut data = random(64 << 20, 7);
    write(&f.root, "big", &data);
    let before = scan(&f.store, "d", &f.root).unwrap();
    let old: Vec<Hash> = {
        let rec = f.store.file_record("d", "big").unwrap().unwrap();
        let EntryMeta::File { recipe, .. } = rec.meta else {
            panic!()
        };
        read_recipe(&f.store, &recipe)
            .unwrap()
            .iter()
            .map(|c| c.hash)
            .collect()
    };
    data.insert(32 << 20, 0x5a);
    write(&f.root, "big", &data);
    let after = scan(&f.store, "d", &f.root).unwrap();
    assert_ne!(before.root, after.root);
    let rec = f.store.file_record("d", "big").unwrap().unwrap();
    let EntryMeta::File { recipe, .. } = rec.meta else {
        panic!()
    };
    let new: Vec<Hash> = read_recipe(&f.store, &recipe)
        .unwrap()
        .iter()
        .map(|c| c.hash)
        .collect();
    let old_set: HashSet<Hash> = old.iter().copied().collect();
    let kept = new.iter().filter(|h| old_set.contains(h)).count();
    assert!(
        kept * 100 >= new.len() * 95,
        "only {kept} of {} chunks unchanged",
        new.len()
    );
    assert!(new.len() - kept <= 3, "{} chunks changed", new.len() - kept);
    f.store.check("d").unwrap();
}

/// Two nodes' real indexes: the replica diffs against the source and finds
/// exactly the changed files, and needs no chunk it already has anywhere
/// (a renamed file costs nothing).
#[test]
fn diff_between_two_real_indexes() {
    let src = fixture();
    let dst = fixture();
    for root in [&src.root, &dst.root] {
        sample_tree(root);
        for rel in ["a.txt", "empty", "sub/big.bin", "sub/deeper/c.txt"] {
            set_mtime(&root.join(rel), 1_700_000_000);
        }
    }
    let d0 = scan(&dst.store, "www", &dst.root).unwrap();
    assert_eq!(scan(&src.store, "www", &src.root).unwrap().root, d0.root);
    // Source: rename the big file, add a new one, edit one.
    fs::rename(src.root.join("sub/big.bin"), src.root.join("renamed.bin")).unwrap();
    write(&src.root, "new.bin", &random(300_000, 99));
    write(&src.root, "sub/deeper/c.txt", b"changed");
    let s1 = scan(&src.store, "www", &src.root).unwrap();
    let mut have = |h: &Hash| dst.store.has_chunk(h);
    let d = diff(
        &dst.store,
        Some(d0.root),
        &src.store,
        Some(s1.root),
        &mut have,
    )
    .unwrap();
    let got: Vec<(String, ChangeKind)> =
        d.changes.iter().map(|c| (c.path.clone(), c.kind)).collect();
    assert_eq!(
        got,
        vec![
            ("new.bin".to_string(), ChangeKind::Added),
            ("renamed.bin".to_string(), ChangeKind::Added),
            ("sub/big.bin".to_string(), ChangeKind::Removed),
            ("sub/deeper/c.txt".to_string(), ChangeKind::Modified),
        ]
    );
    let missing: u64 = d.missing_chunks.iter().map(|c| u64::from(c.len)).sum();
    assert_eq!(missing, 300_000 + 7, "only the new bytes are missing");
}

#[test]
fn an_emptied_root_is_refused_when_asked() {
    let f = fixture();
    sample_tree(&f.root);
    let first = scan(&f.store, "d", &f.root).unwrap();
    for e in fs::read_dir(&f.root).unwrap() {
        let p = e.unwrap().path();
        if p.symlink_metadata().unwrap().is_dir() {
            fs::remove_dir_all(p).unwrap();
        } else {
            fs::remove_file(p).unwrap();
        }
    }
    let opts = ScanOptions {
        refuse_emptying: true,
        ..Default::default()
    };
    let err = scan_with(&f.store, "d", &f.root, opts).unwrap_err();
    assert!(err.to_string().contains("refusing to publish"), "{err}");
    // Nothing changed in the index.
    assert_eq!(f.store.root("d").unwrap().unwrap().root, first.root);
    assert_eq!(f.store.file_records("d").unwrap().len(), 8);
    f.store.check("d").unwrap();
    // Without the option (a replica applying a real deletion) it goes through.
    let r = scan(&f.store, "d", &f.root).unwrap();
    assert_eq!((r.files, r.version), (0, 2));
}

/// The root a scan of the same tree into an empty index gives.
fn fresh_root(f: &Fixture) -> Hash {
    let state = tempfile::tempdir().unwrap();
    let store = Store::open(state.path(), ChunkerConfig::default()).unwrap();
    scan(&store, "d", &f.root).unwrap().root
}

fn scan_known(f: &Fixture, known: HashMap<String, KnownFile>) -> ScanReport {
    let opts = ScanOptions {
        known,
        ..Default::default()
    };
    scan_with(&f.store, "d", &f.root, opts).unwrap()
}

fn hint_for(path: &Path, data: &[u8]) -> KnownFile {
    let m = fs::metadata(path).unwrap();
    KnownFile {
        size: m.len(),
        mtime: mtime_of(&m),
        inode: m.ino(),
        dev: m.dev(),
        chunks: chunk_bytes(&ChunkerConfig::default(), data)
            .into_iter()
            .map(|c| ChunkEntry {
                hash: c.hash,
                len: c.len,
            })
            .collect(),
    }
}

#[test]
fn a_matching_hint_records_the_file_without_reading_it() {
    let f = fixture();
    sample_tree(&f.root);
    scan(&f.store, "d", &f.root).unwrap();
    let data = random(3 << 20, 9);
    write(&f.root, "sub/new.bin", &data);
    let known = HashMap::from([(
        "sub/new.bin".to_string(),
        hint_for(&f.root.join("sub/new.bin"), &data),
    )]);
    let r = scan_known(&f, known);
    assert_eq!((r.files_read, r.bytes_read), (0, 0), "the hint was used");
    f.store.check("d").unwrap();
    // The same root and chunk locations a reading scan gives.
    assert_eq!(fresh_root(&f), r.root);
    let first = chunk_bytes(&ChunkerConfig::default(), &data)[1];
    let loc = &f.store.chunk_locations(&first.hash).unwrap()[0];
    assert_eq!(
        (loc.path.as_str(), loc.offset),
        ("sub/new.bin", first.offset)
    );
}

#[test]
fn a_stale_hint_is_ignored_and_the_file_read() {
    let f = fixture();
    sample_tree(&f.root);
    let data = random(1 << 20, 10);
    write(&f.root, "x.bin", &data);
    let hint = hint_for(&f.root.join("x.bin"), &data);
    // Changed after the hint was taken (a local edit racing the sync).
    let mut edited = data.clone();
    edited[100] ^= 1;
    write(&f.root, "x.bin", &edited);
    set_mtime(&f.root.join("x.bin"), 1_000_000);
    let known = HashMap::from([("x.bin".to_string(), hint)]);
    let r = scan_known(&f, known);
    assert_eq!(r.files_read, 5, "x.bin and the sample files were read");
    assert_eq!(fresh_root(&f), r.root);
}

#[test]
fn ignored_paths_are_not_published_nor_entered() {
    let f = fixture();
    sample_tree(&f.root);
    let plain = scan(&f.store, "d", &f.root).unwrap();
    write(&f.root, "x.tmp", b"scratch");
    write(&f.root, "sub/y.tmp", b"scratch");
    write(&f.root, ".cache/blob", &random(100_000, 4));
    let opts = ScanOptions {
        ignore: Ignore::new(&["*.tmp", ".cache/"]).unwrap(),
        ..Default::default()
    };
    let r = scan_with(&f.store, "d", &f.root, opts).unwrap();
    assert_eq!(r.root, plain.root, "ignored entries change nothing");
    assert_eq!(r.files_read, 0, "nothing under .cache/ was read");
    f.store.check("d").unwrap();
}

/// Issue 8 item 10: a FIFO never blocks the scan, and a file that is a
/// symlink when opened is never read through (decided from fstat of the
/// opened fd, not from the walk's lstat).
#[test]
fn special_files_and_swapped_files_are_never_read() {
    let f = fixture();
    write(&f.root, "a.txt", b"hello");
    let fifo = f.root.join("pipe");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mkfifo");
    // Finishes (a blocking open of the FIFO would hang here for good).
    let r = scan(&f.store, "www", &f.root).unwrap();
    assert_eq!(r.files, 1);
    assert_eq!(r.skipped, 1);

    // open_beneath refuses a symlink at the last component, and the
    // FIFO opens without blocking and is seen for what it is.
    let secret = f._tmp.path().join("secret");
    fs::write(&secret, b"outside the root").unwrap();
    std::os::unix::fs::symlink(&secret, f.root.join("swapped")).unwrap();
    let top = Dir::open_ambient_dir(&f.root, ambient_authority()).unwrap();
    let e = open_beneath(&top, "swapped").unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(rustix::io::Errno::LOOP.raw_os_error()),
        "{e}"
    );
    let p = open_beneath(&top, "pipe").unwrap();
    assert!(!p.metadata().unwrap().is_file());
    // chunk_file on a path that became a symlink since the walk: skipped.
    let cfg = ChunkerConfig::default();
    assert!(matches!(
        chunk_file(
            &cfg,
            &top,
            "swapped",
            &f.root.join("swapped"),
            &ScanOptions::default()
        )
        .unwrap(),
        Read::NotRegular
    ));
    assert!(matches!(
        chunk_file(&cfg, &top, "pipe", &fifo, &ScanOptions::default()).unwrap(),
        Read::NotRegular
    ));
}

/// Issue 8 item 3: a huge sparse file is neither chunked nor sized into an
/// allocation; it is skipped under `max_file_size`, and a scan with no
/// limit does not allocate from its length either (only from what it reads).
#[test]
fn files_over_max_file_size_are_skipped() {
    let f = fixture();
    write(&f.root, "small.txt", b"small");
    let big = fs::File::create(f.root.join("sparse.img")).unwrap();
    // As large as this file system allows (ext4: 16 TiB; tmpfs: more).
    let len = [1u64 << 50, 1 << 44, (1 << 44) - 4096, 1 << 40]
        .into_iter()
        .find(|&l| big.set_len(l).is_ok())
        .expect("a large sparse file");
    let opts = ScanOptions {
        max_file_size: Some(1 << 30),
        ..Default::default()
    };
    let r = scan_with(&f.store, "www", &f.root, opts).unwrap();
    assert_eq!((r.files, r.skipped), (1, 1), "{len}-byte file not skipped");
    assert_eq!(r.bytes_read, 5);
}

#[test]
fn temp_names_are_never_published() {
    let f = fixture();
    write(&f.root, "a.txt", b"a");
    write(&f.root, ".syncd-tmp.1.2.a.txt", b"half-written");
    let r = scan(&f.store, "www", &f.root).unwrap();
    assert_eq!(r.files, 1);
    let names: Vec<String> = list(&f.store, &r.root)
        .unwrap()
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(names, ["a.txt"]);
}
