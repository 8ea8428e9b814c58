//! One (re)scan of a synced root: walk, chunk what changed, publish a root.
//!
//! 1. **Walk** the tree without following symlinks. A file whose size,
//!    mtime, inode and device match its record is not opened: its recipe is
//!    reused. That is what makes a rescan of 100 k unchanged files cheap.
//! 2. **Chunk** the other files, several at once (rayon, one file per core),
//!    each streamed through the chunker. Each group of files is committed
//!    in one batch: records, recipe nodes and chunk locations together.
//! 3. **Build** the directory nodes bottom-up and publish the new root (and
//!    a version one higher) in a final, fsynced batch, with the removal of
//!    records for paths that disappeared.
//!
//! A crash between steps leaves records ahead of the published root, never
//! the reverse; the next scan finds those files unchanged and finishes the
//! job. Files modified while being read are read again.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cap_fs_ext::DirExt;
use cap_std::ambient_authority;
use cap_std::fs::Dir;
use rayon::prelude::*;

use crate::Hash;
use crate::error::Error;
use crate::ignore::Ignore;
use crate::manifest::{self, DirEntry, EntryMeta, MAX_PATH_LEN, NodeSink};
use crate::store::{self, Batch, FileRecord, RootRecord, Store};

mod file;

use file::{Chunked, Read, chunk_file};
pub use file::{KnownFile, Stat, mtime_of, open_beneath};

/// Files chunked between two commits: bounds the memory held by results
/// (chunk lists, recipe nodes) and the work a crash can lose.
const GROUP_FILES: usize = 256;
const GROUP_BYTES: u64 = 1 << 30;

/// What a scan found and did.
#[derive(Clone, Debug, PartialEq)]
pub struct ScanReport {
    pub root: Hash,
    pub version: u64,
    /// Whether the root changed.
    pub changed: bool,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub chunks: u64,
    /// Files opened and chunked (0 on a rescan of unchanged content).
    pub files_read: u64,
    pub bytes_read: u64,
    /// Records of paths that no longer exist.
    pub removed: u64,
    /// Entries left out: special files, non-UTF-8 names, files that kept
    /// changing while read.
    pub skipped: u64,
    /// Total duration, and the part spent walking the tree (the rest is
    /// reading, chunking and recording).
    pub seconds: f64,
    pub walk_seconds: f64,
}

enum Item {
    File {
        name: String,
        /// Index into the pending list, or the reused entry.
        state: FileState,
    },
    Dir {
        name: String,
        index: usize,
    },
    Symlink {
        name: String,
        target: String,
    },
}

enum FileState {
    Reused(FileRecord),
    Pending(usize),
}

struct WalkedDir {
    rel: String,
    mode: u32,
    items: Vec<Item>,
}

struct Pending {
    rel: String,
    /// For messages only: files are opened beneath the root handle.
    abs: PathBuf,
    size: u64,
    /// Recorded from a caller's hint instead of being read.
    known: Option<Chunked>,
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

/// Set-user-id and set-group-id bits: never published for regular files
/// unless the directory allows them (see [`ScanOptions::keep_setid`]).
pub const SETID_BITS: u32 = 0o6000;

/// Options of [`scan_with`].
#[derive(Clone, Debug, Default)]
pub struct ScanOptions {
    /// Refuse to publish an empty tree over a non-empty one: on a node that
    /// publishes, an empty root is far more often an unmounted file system
    /// or a wrong path than a real deletion of everything, and publishing
    /// it would delete the content on every replica.
    pub refuse_emptying: bool,
    /// Files whose chunks the caller already knows, by path: a file it has
    /// just written from verified chunks. A file whose size, mtime, inode
    /// and device still match is recorded from its hint instead of being
    /// read again; any mismatch (it changed since) reads it as usual.
    pub known: HashMap<String, KnownFile>,
    /// Paths neither published nor entered.
    pub ignore: Ignore,
    /// Files larger than this are left out (logged and counted as
    /// skipped): chunking a 2^50-byte sparse file would take weeks and its
    /// chunk list would not fit in memory. `None`: no limit.
    pub max_file_size: Option<u64>,
    /// Publish set-user-id / set-group-id bits of regular files. Off by
    /// default: a replica would otherwise create setuid programs because a
    /// peer said so.
    pub keep_setid: bool,
    /// Leave node garbage collection to the caller, who must then make
    /// sure no sweep runs while a scan is between writing nodes and
    /// referencing them (the daemon's collector takes the store gate
    /// alone). By default a scan that changed the root sweeps itself.
    pub defer_gc: bool,
    /// Set by the caller to stop the scan at the next group of files
    /// ([`Error::Stopped`]): committed records stay, no root is published.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// Scans `root` as synced directory `dir` and publishes its manifest root.
pub fn scan(store: &Store, dir: &str, root: &Path) -> Result<ScanReport, Error> {
    scan_with(store, dir, root, ScanOptions::default())
}

/// [`scan`] with options.
pub fn scan_with(
    store: &Store,
    dir: &str,
    root: &Path,
    opts: ScanOptions,
) -> Result<ScanReport, Error> {
    let started = Instant::now();
    store::validate_dir_id(dir)?;
    match fs::metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::RootUnavailable {
                path: root.to_path_buf(),
                reason: "not a directory".into(),
            });
        }
        Err(e) => {
            return Err(Error::RootUnavailable {
                path: root.to_path_buf(),
                reason: e.to_string(),
            });
        }
    }
    let mut old = store.file_records(dir)?;
    let mut report = ScanReport {
        root: Hash([0; 32]),
        version: 0,
        changed: false,
        files: 0,
        dirs: 0,
        symlinks: 0,
        bytes: 0,
        chunks: 0,
        files_read: 0,
        bytes_read: 0,
        removed: 0,
        skipped: 0,
        seconds: 0.0,
        walk_seconds: 0.0,
    };

    // 1. Walk, beneath one handle on the root: every directory is opened
    //    from it without following a symlink at its own name, so a
    //    directory swapped for a symlink mid-scan cannot lead the walk (or
    //    a file open) outside the root.
    let top =
        Dir::open_ambient_dir(root, ambient_authority()).map_err(|e| Error::RootUnavailable {
            path: root.to_path_buf(),
            reason: e.to_string(),
        })?;
    let file_mode = |mode: u32| {
        if opts.keep_setid {
            mode
        } else {
            mode & !SETID_BITS
        }
    };
    let mut dirs: Vec<WalkedDir> = Vec::new();
    let mut pending: Vec<Pending> = Vec::new();
    let mut seen: HashSet<String> = HashSet::with_capacity(old.len());
    let root_mode = fs::metadata(root).map_err(|e| Error::io(root, e))?.mode() & 0o7777;
    let mut todo = vec![(String::new(), root_mode)];
    while let Some((rel, mode)) = todo.pop() {
        let mut items = Vec::new();
        let abs = root.join(&rel);
        let opened = if rel.is_empty() {
            top.try_clone()
        } else {
            top.open_dir_nofollow(&rel)
        };
        let listing = opened.and_then(|d| d.entries());
        let rd = match listing {
            Ok(rd) => rd,
            // A sub-directory removed (or replaced by something else) since
            // its parent was listed: empty for this scan; the watcher
            // brings the change.
            Err(e)
                if !rel.is_empty()
                    && (e.kind() == io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
                        || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error())) =>
            {
                dirs.push(WalkedDir { rel, mode, items });
                continue;
            }
            Err(e) => return Err(Error::io(&abs, e)),
        };
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(&abs, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                tracing::warn!(path = %abs.join(entry.file_name()).display(), "skipping entry whose name is not UTF-8");
                report.skipped += 1;
                continue;
            };
            let child_rel = join(&rel, &name);
            if name.starts_with(manifest::RESERVED_PREFIX) {
                // The materializer's temp files: never content.
                continue;
            }
            if !opts.ignore.is_empty()
                && opts
                    .ignore
                    .is_ignored(&child_rel, entry.file_type().is_ok_and(|t| t.is_dir()))
            {
                continue;
            }
            let child_abs = abs.join(&name);
            if child_rel.len() > MAX_PATH_LEN {
                tracing::warn!(path = %child_abs.display(), "skipping path longer than {MAX_PATH_LEN} bytes");
                report.skipped += 1;
                continue;
            }
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&child_abs, e)),
            };
            let ft = meta.file_type();
            let stat = Stat::of_cap(&meta);
            if ft.is_dir() {
                seen.insert(child_rel.clone());
                // Index assigned when popped; remember it by position.
                items.push(Item::Dir {
                    name,
                    index: usize::MAX,
                });
                todo.push((child_rel, stat.mode));
            } else if ft.is_file() {
                if let Some(max) = opts.max_file_size
                    && stat.len > max
                {
                    tracing::warn!(path = %child_abs.display(), size = stat.len, max, "skipping file larger than max_file_size");
                    report.skipped += 1;
                    continue;
                }
                if !manifest::MTIME_SECS.contains(&stat.mtime.secs) {
                    // Replicas refuse such times (file systems clamp
                    // them): publishing one would block the whole version.
                    tracing::warn!(path = %child_abs.display(), mtime = stat.mtime.secs, "skipping file whose modification time is outside 1901..2514");
                    report.skipped += 1;
                    continue;
                }
                seen.insert(child_rel.clone());
                let state = match old.get(&child_rel) {
                    Some(rec) if unchanged(rec, &stat) => {
                        let mut rec = rec.clone();
                        if let EntryMeta::File { mode, .. } = &mut rec.meta {
                            *mode = file_mode(stat.mode);
                        }
                        FileState::Reused(rec)
                    }
                    _ => {
                        let known = opts
                            .known
                            .get(&child_rel)
                            .and_then(|k| k.matching(&stat, file_mode(stat.mode)));
                        pending.push(Pending {
                            rel: child_rel,
                            abs: child_abs,
                            size: stat.len,
                            known,
                        });
                        FileState::Pending(pending.len() - 1)
                    }
                };
                items.push(Item::File { name, state });
            } else if ft.is_symlink() {
                let target = match top.read_link_contents(&child_rel) {
                    Ok(t) => t,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(&child_abs, e)),
                };
                match target.into_os_string().into_string() {
                    Ok(target)
                        if !target.is_empty() && target.len() <= manifest::MAX_SYMLINK_TARGET =>
                    {
                        seen.insert(child_rel);
                        items.push(Item::Symlink { name, target });
                    }
                    _ => {
                        tracing::warn!(path = %child_abs.display(), "skipping symlink whose target is not UTF-8 or too long");
                        report.skipped += 1;
                    }
                }
            } else {
                tracing::debug!(path = %child_abs.display(), "skipping special file");
                report.skipped += 1;
            }
        }
        dirs.push(WalkedDir { rel, mode, items });
    }
    // Sub-directories were pushed on `todo` in item order and popped LIFO;
    // resolve each Dir item to the index of its WalkedDir by path.
    let index_of: HashMap<String, usize> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| (d.rel.clone(), i))
        .collect();
    for d in &mut dirs {
        let rel = d.rel.clone();
        for item in &mut d.items {
            if let Item::Dir { name, index } = item {
                *index = index_of[&join(&rel, name)];
            }
        }
    }

    report.walk_seconds = started.elapsed().as_secs_f64();

    // 2. Chunk what changed, a group at a time, files of a group in parallel.
    let mut results: Vec<Option<FileRecord>> = vec![None; pending.len()];
    let cfg = store.chunker();
    let mut start = 0;
    let stopped = || {
        opts.stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    };
    while start < pending.len() {
        if stopped() {
            return Err(Error::Stopped);
        }
        let mut end = start;
        let mut group_bytes = 0u64;
        while end < pending.len() && end - start < GROUP_FILES && group_bytes < GROUP_BYTES {
            group_bytes += pending[end].size;
            end += 1;
        }
        let chunked: Vec<Result<Read, Error>> = pending[start..end]
            .par_iter_mut()
            .map(|p| match p.known.take() {
                Some(c) => Ok(Read::Known(c)),
                None => chunk_file(&cfg, &top, &p.rel, &p.abs, &opts),
            })
            .collect();
        let mut batch = store.batch();
        for (i, res) in (start..end).zip(chunked) {
            let p = &pending[i];
            let (c, was_read) = match res? {
                Read::Done(c) => (c, true),
                Read::Known(c) => (c, false),
                Read::Vanished => {
                    seen.remove(&p.rel);
                    continue;
                }
                Read::NotRegular => {
                    // Swapped for a symlink, FIFO or device since the walk
                    // listed it: never read through it.
                    tracing::warn!(path = %p.abs.display(), "skipping: no longer a regular file when opened");
                    report.skipped += 1;
                    seen.remove(&p.rel);
                    continue;
                }
                Read::Unstable => {
                    // Publishing without it would delete it on every
                    // replica: keep the last good version if there is one.
                    tracing::warn!(path = %p.abs.display(), "file kept changing while read; keeping its previous version for this scan");
                    report.skipped += 1;
                    match old.get(&p.rel) {
                        Some(
                            rec @ FileRecord {
                                meta: EntryMeta::File { .. },
                                ..
                            },
                        ) => results[i] = Some(rec.clone()),
                        _ => {
                            seen.remove(&p.rel);
                        }
                    }
                    continue;
                }
            };
            if was_read {
                report.files_read += 1;
                if let EntryMeta::File { size, .. } = c.record.meta {
                    report.bytes_read += size;
                }
            }
            let old_rec = old.remove(&p.rel);
            delete_locations(store, &mut batch, dir, &p.rel, old_rec.as_ref())?;
            for (h, bytes) in c.nodes.nodes {
                batch.put_node(h, bytes)?;
            }
            let mut first: HashMap<Hash, ()> = HashMap::with_capacity(c.chunks.len());
            for ch in &c.chunks {
                if first.insert(ch.hash, ()).is_none() {
                    batch.put_location(&ch.hash, dir, &p.rel, ch.offset, ch.len, false);
                }
            }
            batch.put_file(dir, &p.rel, &c.record);
            results[i] = Some(c.record);
        }
        store.commit(batch, false)?;
        start = end;
    }

    // 3. Directory nodes bottom-up; records of dirs, symlinks, mode changes;
    //    removals; the root.
    let mut batch = store.batch();
    let mut roots: Vec<Option<Hash>> = vec![None; dirs.len()];
    for i in (0..dirs.len()).rev() {
        let d = &dirs[i];
        let mut entries = Vec::with_capacity(d.items.len());
        for item in &d.items {
            // Records of files read in step 2 are already written.
            let mut written = false;
            let (name, rec) = match item {
                Item::File { name, state } => {
                    let rec = match state {
                        FileState::Reused(rec) => rec.clone(),
                        FileState::Pending(p) => match &results[*p] {
                            Some(rec) => {
                                written = true;
                                rec.clone()
                            }
                            None => continue,
                        },
                    };
                    report.files += 1;
                    report.chunks += rec.chunks;
                    if let EntryMeta::File { size, .. } = rec.meta {
                        report.bytes += size;
                    }
                    (name, rec)
                }
                Item::Dir { name, index } => {
                    report.dirs += 1;
                    let root = roots[*index].expect("children are built before parents");
                    let rec = FileRecord {
                        meta: EntryMeta::Dir {
                            mode: dirs[*index].mode,
                            root,
                        },
                        inode: 0,
                        dev: 0,
                        chunks: 0,
                    };
                    (name, rec)
                }
                Item::Symlink { name, target } => {
                    report.symlinks += 1;
                    let rec = FileRecord {
                        meta: EntryMeta::Symlink {
                            target: target.clone(),
                        },
                        inode: 0,
                        dev: 0,
                        chunks: 0,
                    };
                    (name, rec)
                }
            };
            let rel = join(&d.rel, name);
            let previous = if written { None } else { old.remove(&rel) };
            if !written && previous.as_ref() != Some(&rec) {
                if let Some(prev) = &previous
                    && !matches!(rec.meta, EntryMeta::File { .. })
                {
                    // A file became a directory or a symlink.
                    delete_locations(store, &mut batch, dir, &rel, Some(prev))?;
                }
                batch.put_file(dir, &rel, &rec);
            }
            entries.push(DirEntry {
                name: name.clone(),
                meta: rec.meta,
            });
        }
        entries.sort_unstable_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        roots[i] = Some(manifest::build_dir(entries, &mut batch)?);
    }
    // Whatever is left in `old` no longer exists on disk.
    for (rel, rec) in &old {
        if seen.contains(rel) {
            continue;
        }
        delete_locations(store, &mut batch, dir, rel, Some(rec))?;
        batch.delete_file(dir, rel);
        report.removed += 1;
    }
    report.root = roots[0].expect("the root directory is walked first");
    let previous = store.root(dir)?;
    if let Some(p) = previous
        && opts.refuse_emptying
        && p.files > 0
        && report.files + report.dirs + report.symlinks == 0
    {
        // Nothing of the final batch (removals, the root) is committed.
        return Err(Error::RootUnavailable {
            path: root.to_path_buf(),
            reason: format!(
                "it is empty, but version {} had {} files; refusing to publish their deletion \
                 (unmounted file system?)",
                p.version, p.files
            ),
        });
    }
    report.version = previous.map_or(0, |p| p.version);
    if previous.map(|p| p.root) != Some(report.root) {
        report.changed = true;
        report.version += 1;
    }
    let record = RootRecord {
        root: report.root,
        version: report.version,
        files: report.files,
        bytes: report.bytes,
        chunks: report.chunks,
    };
    if previous != Some(record) {
        batch.put_root(dir, &record);
    }
    if !batch.is_empty() {
        // The root is what peers will be told about: make it durable.
        store.commit(batch, true)?;
    }
    if report.changed && !opts.defer_gc {
        store.collect_garbage(false)?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn unchanged(rec: &FileRecord, m: &Stat) -> bool {
    match &rec.meta {
        EntryMeta::File { size, mtime, .. } => {
            *size == m.len && *mtime == m.mtime && rec.inode == m.ino && rec.dev == m.dev
        }
        _ => false,
    }
}

/// Removes the chunk locations a previous version of `rel` recorded.
fn delete_locations(
    store: &Store,
    batch: &mut Batch<'_>,
    dir: &str,
    rel: &str,
    previous: Option<&FileRecord>,
) -> Result<(), Error> {
    if let Some(FileRecord {
        meta: EntryMeta::File { recipe, .. },
        ..
    }) = previous
    {
        for c in manifest::read_recipe(store, recipe)? {
            batch.delete_location(&c.hash, dir, rel);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
