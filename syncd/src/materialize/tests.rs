use std::cell::Cell;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};

use chunk_store::ChunkerConfig;
use chunk_store::indexer::scan;
use chunk_store::testdata::pseudo_random;

use super::*;

struct Side {
    root: PathBuf,
    store: Store,
}

fn side(tmp: &Path, name: &str) -> Side {
    let root = tmp.join(name);
    fs::create_dir_all(&root).unwrap();
    let store = Store::open(&tmp.join(format!("{name}-state")), ChunkerConfig::default()).unwrap();
    Side { root, store }
}

/// A side's own files as a chunk source.
fn chunks_of(s: &Side) -> LocalChunks<'_> {
    LocalChunks::new(&s.store, vec![("www".into(), s.root.clone())])
}

/// Scans both sides and diffs the destination against the source.
fn scan_and_diff(src: &Side, dst: &Side, before_diff: impl FnOnce()) -> Diff {
    let s = scan(&src.store, "www", &src.root).unwrap();
    let d = scan(&dst.store, "www", &dst.root).unwrap();
    before_diff();
    manifest::diff(
        &dst.store,
        Some(d.root),
        &src.store,
        Some(s.root),
        &mut |h| dst.store.has_chunk(h),
    )
    .unwrap()
}

/// Applies `diff` to `dst` with `src`'s manifest and the given sources.
fn apply_to(dst: &Side, diff: &Diff, src: &Side, sources: &[&dyn ChunkSource]) -> Result<Report> {
    apply_from(dst, diff, &src.store, sources, ApplyOptions::default())
}

/// Applies `diff` to `dst` with manifest nodes from `remote`.
fn apply_from(
    dst: &Side,
    diff: &Diff,
    remote: &dyn NodeSource,
    sources: &[&dyn ChunkSource],
    opts: ApplyOptions,
) -> Result<Report> {
    apply(
        &dst.root,
        diff,
        remote,
        sources,
        &InFlight::default(),
        &Default::default(),
        opts,
    )
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

/// Counts what a source served, to prove local reuse.
struct Counting<'a> {
    inner: &'a dyn ChunkSource,
    bytes: Cell<u64>,
}

impl ChunkSource for Counting<'_> {
    fn read_chunk(&self, c: &ChunkEntry) -> io::Result<Option<Bytes>> {
        let r = self.inner.read_chunk(c)?;
        if let Some(b) = &r {
            self.bytes.set(self.bytes.get() + b.len() as u64);
        }
        Ok(r)
    }
}

fn sync(src: &Side, dst: &Side) -> (Report, u64, u64) {
    let diff = scan_and_diff(src, dst, || {});
    let (local, remote) = (chunks_of(dst), chunks_of(src));
    let local = Counting {
        inner: &local,
        bytes: Cell::new(0),
    };
    let remote = Counting {
        inner: &remote,
        bytes: Cell::new(0),
    };
    let report = apply_to(dst, &diff, src, &[&local, &remote]).unwrap();
    let after = scan(&dst.store, "www", &dst.root).unwrap();
    let want = scan(&src.store, "www", &src.root).unwrap();
    assert_eq!(
        after.root, want.root,
        "replica root differs from source root after apply"
    );
    (report, local.bytes.get(), remote.bytes.get())
}

fn assert_same_tree(a: &Path, b: &Path) {
    let list = |root: &Path| {
        let mut v = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let m = e.path().symlink_metadata().unwrap();
                let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
                if m.is_dir() {
                    stack.push(e.path());
                    v.push((rel, m.mode(), None, None));
                } else if m.file_type().is_symlink() {
                    v.push((rel, 0, Some(fs::read_link(e.path()).unwrap()), None));
                } else {
                    v.push((
                        rel,
                        m.mode(),
                        None,
                        Some((fs::read(e.path()).unwrap(), m.mtime(), m.mtime_nsec())),
                    ));
                }
            }
        }
        v.sort();
        v
    };
    assert!(list(a) == list(b), "trees differ");
}

#[test]
fn replica_converges_to_source_reusing_local_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let src = side(tmp.path(), "src");
    let dst = side(tmp.path(), "dst");
    let big = pseudo_random(3 << 20, 5);
    for s in [&src, &dst] {
        write(&s.root, "keep.txt", b"same on both");
        write(&s.root, "big.bin", &big);
    }
    // Source: new files of interesting sizes, nesting, a symlink, an empty
    // dir, a mode change, and a big file renamed.
    for (i, len) in [0usize, 1, 16383, 65536, 262145].iter().enumerate() {
        write(
            &src.root,
            &format!("a/b/f{i}"),
            &pseudo_random(*len, i as u64 + 10),
        );
    }
    fs::rename(src.root.join("big.bin"), src.root.join("a/moved.bin")).unwrap();
    symlink("../keep.txt", src.root.join("a/link")).unwrap();
    fs::create_dir_all(src.root.join("empty/dir")).unwrap();
    fs::set_permissions(src.root.join("keep.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    // Replica: things the source does not have, and a type change.
    write(&dst.root, "old/stale.txt", b"to be removed");
    write(
        &dst.root,
        "a/b/f1/nested",
        b"a dir where the source has a file",
    );
    write(&src.root, "empty-file-then-dir", b"");
    fs::create_dir_all(dst.root.join("empty-file-then-dir/x")).unwrap();

    let (report, local, remote) = sync(&src, &dst);
    assert_same_tree(&src.root, &dst.root);
    assert!(report.files_written >= 6, "{report:?}");
    assert!(report.removed >= 2, "{report:?}");
    // The moved 3 MiB file came from the replica's own old copy.
    assert!(local >= big.len() as u64, "local {local}");
    assert!(remote < 600_000, "remote served {remote} bytes");
    // No temp files left behind.
    let leftovers = fs::read_dir(dst.root.join("a"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
        .count();
    assert_eq!(leftovers, 0);

    // A second round with a 1-byte insert in the middle of a large file
    // fetches only the chunks around it.
    let mut data = fs::read(src.root.join("a/moved.bin")).unwrap();
    data.insert(data.len() / 2, 7);
    fs::write(src.root.join("a/moved.bin"), &data).unwrap();
    let (_, _, remote) = sync(&src, &dst);
    assert!(remote <= 512 << 10, "1-byte insert cost {remote} bytes");
    assert_same_tree(&src.root, &dst.root);
}

#[test]
fn writes_never_go_through_a_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let src = side(tmp.path(), "src");
    let dst = side(tmp.path(), "dst");
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    write(&src.root, "sub/x", b"payload");
    fs::create_dir(dst.root.join("sub")).unwrap();
    // Between the scan and the write, `sub` becomes a symlink out of the root.
    let diff = scan_and_diff(&src, &dst, || {
        fs::remove_dir(dst.root.join("sub")).unwrap();
        symlink(&outside, dst.root.join("sub")).unwrap();
    });
    let remote = chunks_of(&src);
    let err = apply_to(&dst, &diff, &src, &[&remote]).unwrap_err();
    assert!(
        matches!(err, MaterializeError::ThroughSymlink { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("sub/x"), "{err}");
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote outside the root"
    );
}

struct Fixed(Vec<u8>);
impl ChunkSource for Fixed {
    fn read_chunk(&self, c: &ChunkEntry) -> io::Result<Option<Bytes>> {
        Ok(Some(
            self.0
                .iter()
                .copied()
                .cycle()
                .take(c.len as usize)
                .collect(),
        ))
    }
}

#[test]
fn corrupt_chunks_are_never_written() {
    let tmp = tempfile::tempdir().unwrap();
    let src = side(tmp.path(), "src");
    let dst = side(tmp.path(), "dst");
    write(&src.root, "f", &pseudo_random(200_000, 3));
    write(&dst.root, "f", b"old content");
    let diff = scan_and_diff(&src, &dst, || {});
    let liar = Fixed(b"garbage".to_vec());
    // Only a lying source: the old file stays, no temp file remains.
    let err = apply_to(&dst, &diff, &src, &[&liar]).unwrap_err();
    assert!(
        matches!(err, MaterializeError::ChunkUnavailable { .. }),
        "{err}"
    );
    assert_eq!(fs::read(dst.root.join("f")).unwrap(), b"old content");
    assert_eq!(fs::read_dir(&dst.root).unwrap().count(), 1);
    // A lying source first, an honest one second: correct bytes, lies counted.
    let honest = chunks_of(&src);
    let report = apply_to(&dst, &diff, &src, &[&liar, &honest]).unwrap();
    assert!(report.corrupt_chunks >= 1);
    assert_eq!(
        fs::read(dst.root.join("f")).unwrap(),
        fs::read(src.root.join("f")).unwrap()
    );
}

#[test]
fn bad_paths_are_rejected_before_any_io() {
    let tmp = tempfile::tempdir().unwrap();
    let top = Dir::open_ambient_dir(tmp.path(), ambient_authority()).unwrap();
    for p in ["../x", "/etc/passwd", "a//b", "a/../../x", "", "a/./b"] {
        let err = open_parent(&top, p).err().unwrap();
        assert!(
            matches!(err, MaterializeError::PathRejected { .. }),
            "{p}: {err}"
        );
    }
}

/// Records, for every chunk it serves after the first, whether the chunk
/// before it could already be read back from the file being written.
struct Watching<'a> {
    inner: LocalChunks<'a>,
    in_flight: &'a InFlight,
    previous: Cell<Option<Hash>>,
    served_early: Cell<u32>,
}

impl ChunkSource for Watching<'_> {
    fn read_chunk(&self, c: &ChunkEntry) -> io::Result<Option<Bytes>> {
        if let Some(p) = self.previous.get()
            && self.in_flight.read_hash(&p)?.is_some()
        {
            self.served_early.set(self.served_early.get() + 1);
        }
        self.previous.set(Some(c.hash));
        self.inner.read_chunk(c)
    }
}

#[test]
fn chunks_of_a_file_still_being_written_can_be_served() {
    let tmp = tempfile::tempdir().unwrap();
    let src = side(tmp.path(), "src");
    let dst = side(tmp.path(), "dst");
    let data = pseudo_random(4 << 20, 21);
    write(&src.root, "big", &data);
    let diff = scan_and_diff(&src, &dst, || {});
    let n = diff.missing_chunks.len() as u32;
    assert!(n > 20, "{n} chunks");
    let in_flight = InFlight::default();
    let watching = Watching {
        inner: chunks_of(&src),
        in_flight: &in_flight,
        previous: Cell::new(None),
        served_early: Cell::new(0),
    };
    let report = apply(
        &dst.root,
        &diff,
        &src.store,
        &[&watching],
        &in_flight,
        &Default::default(),
        ApplyOptions::default(),
    )
    .unwrap();
    // Each chunk was readable as soon as it was written, before the file
    // was complete or renamed into place.
    assert_eq!(watching.served_early.get(), n - 1);
    // After the rename, from the same handle, until the index takes over.
    let last = diff.missing_chunks.last().unwrap();
    assert_eq!(
        in_flight.read_hash(&last.hash).unwrap().unwrap().len(),
        last.len as usize
    );
    // The report carries what the index needs to skip reading the file.
    let known = &report.known["big"];
    assert_eq!(known.size, data.len() as u64);
    assert_eq!(known.chunks.len() as u32, n);
    in_flight.clear();
    assert!(in_flight.read_hash(&last.hash).unwrap().is_none());
}

#[test]
fn the_index_records_written_files_from_the_report_without_reading_them() {
    let tmp = tempfile::tempdir().unwrap();
    let src = side(tmp.path(), "src");
    let dst = side(tmp.path(), "dst");
    write(&src.root, "a/big", &pseudo_random(3 << 20, 22));
    write(&src.root, "small", b"hello");
    let diff = scan_and_diff(&src, &dst, || {});
    let remote = chunks_of(&src);
    let report = apply_to(&dst, &diff, &src, &[&remote]).unwrap();
    let opts = indexer::ScanOptions {
        known: report.known,
        ..Default::default()
    };
    let r = indexer::scan_with(&dst.store, "www", &dst.root, opts).unwrap();
    assert_eq!(r.files_read, 0);
    assert_eq!(r.root, scan(&src.store, "www", &src.root).unwrap().root);
    dst.store.check("www").unwrap();
}

/// A file replaced since it was indexed — by a symlink to a secret beside
/// the root, or by other content — is never read for the old location:
/// serving opens beneath the root without following symlinks and only
/// files that are as the index recorded them.
#[test]
fn serving_reads_only_current_files_beneath_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let src = side(tmp.path(), "src");
    let old = pseudo_random(4000, 31);
    write(&src.root, "f.bin", &old);
    write(&src.root, "g.bin", &pseudo_random(4000, 32));
    scan(&src.store, "www", &src.root).unwrap();
    let secret = tmp.path().join("secret");
    fs::write(&secret, pseudo_random(4000, 33)).unwrap();
    let serving = || LocalChunks::for_serving(&src.store, vec![("www".into(), src.root.clone())]);
    let h = Hash::of(&old);
    assert_eq!(serving().read_hash(&h).unwrap().as_deref(), Some(&old[..]));

    fs::remove_file(src.root.join("f.bin")).unwrap();
    symlink("../secret", src.root.join("f.bin")).unwrap();
    assert_eq!(
        serving().read_hash(&h).unwrap(),
        None,
        "read through a symlink"
    );

    // Same inode, new bytes of the same length: not as indexed either.
    let g = pseudo_random(4000, 32);
    let hg = Hash::of(&g);
    let mut changed = g.clone();
    changed[0] ^= 1;
    std::thread::sleep(std::time::Duration::from_millis(20)); // a distinct mtime
    fs::write(src.root.join("g.bin"), &changed).unwrap();
    assert_eq!(
        serving().read_hash(&hg).unwrap(),
        None,
        "read a changed file"
    );
}

#[test]
fn setid_bits_are_stripped_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let src = side(tmp.path(), "src");
    let dst = side(tmp.path(), "dst");
    write(&src.root, "prog", b"#!/bin/sh\n");
    fs::set_permissions(src.root.join("prog"), fs::Permissions::from_mode(0o6755)).unwrap();
    let opts = indexer::ScanOptions {
        keep_setid: true,
        ..Default::default()
    };
    let s = indexer::scan_with(&src.store, "www", &src.root, opts).unwrap();
    let d = scan(&dst.store, "www", &dst.root).unwrap();
    let diff = manifest::diff(
        &dst.store,
        Some(d.root),
        &src.store,
        Some(s.root),
        &mut |_| Ok(false),
    )
    .unwrap();
    let remote = chunks_of(&src);
    for (allow, want) in [(false, 0o755), (true, 0o6755)] {
        let _ = fs::remove_file(dst.root.join("prog"));
        let opts = ApplyOptions {
            allow_setid: allow,
            ..Default::default()
        };
        apply_from(&dst, &diff, &src.store, &[&remote], opts).unwrap();
        let mode = fs::metadata(dst.root.join("prog")).unwrap().mode() & 0o7777;
        assert_eq!(mode, want, "allow_setid = {allow}");
    }
    // The indexer does not publish them either, unless told to.
    let plain = scan(&src.store, "www2", &src.root).unwrap();
    let list = manifest::list(&src.store, &plain.root).unwrap();
    assert!(
        matches!(list[0].1, EntryMeta::File { mode: 0o755, .. }),
        "{list:?}"
    );
}

/// One remote file entry with `chunks` as its recipe, as a peer could
/// describe it, and the diff that adds it.
fn remote_file(size: u64, mtime: Mtime, chunks: Vec<ChunkEntry>) -> (manifest::MemNodes, Diff) {
    let mut nodes = manifest::MemNodes {
        origin: Some(chunk_store::Origin::Remote),
        ..Default::default()
    };
    let recipe = manifest::build_recipe(chunks, &mut nodes).unwrap();
    let meta = EntryMeta::File {
        mode: 0o644,
        size,
        mtime,
        recipe,
    };
    let root = manifest::build_dir(
        vec![manifest::DirEntry {
            name: "f".into(),
            meta,
        }],
        &mut nodes,
    )
    .unwrap();
    let empty = manifest::MemNodes::default();
    let diff = manifest::diff(&empty, None, &nodes, Some(root), &mut |_| Ok(false)).unwrap();
    (nodes, diff)
}

#[test]
fn a_recipe_longer_than_its_file_is_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = side(tmp.path(), "dst");
    // 48 one-byte chunks for a 48-byte file: no chunker cuts that.
    let chunks: Vec<ChunkEntry> = (0..48u8)
        .map(|i| ChunkEntry {
            hash: Hash::of(&[i]),
            len: 1,
        })
        .collect();
    let (nodes, diff) = remote_file(
        48,
        Mtime {
            secs: 1_700_000_000,
            nanos: 0,
        },
        chunks,
    );
    let fixed = Fixed(vec![0]);
    let err = apply_from(&dst, &diff, &nodes, &[&fixed], ApplyOptions::default()).unwrap_err();
    assert!(err.to_string().contains("before the end"), "{err}");
    assert_eq!(fs::read_dir(&dst.root).unwrap().count(), 0);
}

#[test]
fn a_clamped_mtime_is_an_error_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = side(tmp.path(), "dst");
    // Year 2514: ext4 stores at most 2446. On a file system that keeps it
    // there is nothing to test.
    let far = Mtime {
        secs: (1 << 34) - 1,
        nanos: 0,
    };
    let probe = tmp.path().join("probe");
    fs::write(&probe, b"x").unwrap();
    let f = fs::File::options().write(true).open(&probe).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(system_time(far)))
        .unwrap();
    if indexer::mtime_of(&f.metadata().unwrap()) == far {
        eprintln!("this file system keeps year-2514 mtimes; skipping");
        return;
    }
    let data = b"hello".to_vec();
    let chunk = ChunkEntry {
        hash: Hash::of(&data),
        len: 5,
    };
    let (nodes, diff) = remote_file(5, far, vec![chunk]);
    let fixed = Fixed(data);
    let err = apply_from(&dst, &diff, &nodes, &[&fixed], ApplyOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("\"f\"") && err.to_string().contains("modification time"),
        "{err}"
    );
    assert_eq!(
        fs::read_dir(&dst.root).unwrap().count(),
        0,
        "a file or temp was left"
    );
}

/// Serves the first `left` chunks asked for, then nothing.
struct RunsOut<'a> {
    inner: &'a dyn ChunkSource,
    left: Cell<u32>,
}

impl ChunkSource for RunsOut<'_> {
    fn read_chunk(&self, c: &ChunkEntry) -> io::Result<Option<Bytes>> {
        if self.left.get() == 0 {
            return Ok(None);
        }
        self.left.set(self.left.get() - 1);
        self.inner.read_chunk(c)
    }
}

/// Every file under `root`, relative, and whether any temp is left.
fn files_under(root: &Path) -> (Vec<String>, bool) {
    let (mut files, mut temps) = (Vec::new(), false);
    for d in fs::read_dir(root).unwrap() {
        let d = d.unwrap().path();
        for f in fs::read_dir(&d).unwrap() {
            let name = f.unwrap().file_name().into_string().unwrap();
            temps |= name.starts_with(TMP_PREFIX);
            let dir = d.file_name().unwrap().to_str().unwrap();
            files.push(format!("{dir}/{name}"));
        }
    }
    (files, temps)
}

#[test]
fn small_files_are_committed_in_batches_and_an_error_keeps_the_complete_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let src = side(tmp.path(), "src");
    let dst = side(tmp.path(), "dst");
    // One chunk each (smaller than the minimum chunk), spread over three
    // directories: two full batches' worth and some.
    for i in 0..700u64 {
        write(
            &src.root,
            &format!("d{}/f{i:04}", i % 3),
            &pseudo_random(3000, 1001 + 2 * i),
        );
    }
    let diff = scan_and_diff(&src, &dst, || {});
    let remote = chunks_of(&src);
    let runs_out = RunsOut {
        inner: &remote,
        left: Cell::new(500),
    };
    let done = std::sync::atomic::AtomicU64::new(0);
    let err = apply(
        &dst.root,
        &diff,
        &src.store,
        &[&runs_out],
        &InFlight::default(),
        &done,
        ApplyOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, MaterializeError::ChunkUnavailable { .. }),
        "{err}"
    );
    // The 500 files written before the source ran out are in place (one
    // batch committed when full, the rest when the error stopped the
    // writing), whole; no temp is left; progress counted each once.
    let (files, temps) = files_under(&dst.root);
    assert_eq!(files.len(), 500);
    assert!(!temps, "a temp file was left behind");
    assert_eq!(done.load(std::sync::atomic::Ordering::Relaxed), 500);
    for f in &files {
        assert_eq!(
            fs::read(dst.root.join(f)).unwrap(),
            fs::read(src.root.join(f)).unwrap(),
            "{f}"
        );
    }
    // The next pull brings the other 200, recorded for the index.
    let (report, _, from_src) = sync(&src, &dst);
    assert_eq!(report.files_written, 200);
    assert_eq!(report.known.len(), 200);
    assert_eq!(from_src, 200 * 3000);
    assert_same_tree(&src.root, &dst.root);
}
