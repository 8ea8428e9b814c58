//! Materialize: turn a manifest diff into files on disk, atomically and
//! confined to the synced root.
//!
//! For every file, one durability recipe: write a temp file in the same
//! directory, verify every chunk's BLAKE3 before writing it, set mode and
//! mtime, fsync, rename over the target, fsync the directory. Readers see
//! the old file or the new one, never a mix; a crash leaves at most a temp
//! file (named `.syncd-tmp.*`, removed by the next run in that directory).
//! Small files go through the same steps in batches (`batch.rs`): their
//! temps are fsynced together, then renamed, then each directory fsynced
//! once, so a tree of many small files does not cost a journal commit per
//! file.
//!
//! **Confinement is the kernel's job, not string checks.** The root is
//! opened once as a directory handle (cap-std); each parent directory on a
//! path is opened from its parent with `O_NOFOLLOW` semantics
//! (`open_dir_nofollow`), and every create, rename and delete then names a
//! single component inside that handle. A symlink anywhere on the path, or
//! a `..`, cannot lead a write outside the root: the open fails and the
//! path is reported. Names are also re-validated here, as defence in depth.
//!
//! Order: directories first (parents before children), then files and
//! symlinks, then directory modes, and deletions last, once the new content
//! is in place (children before parents). A type change (file ↔ directory)
//! removes the old entry just before creating the new one.

use crate::locks::LockExt as _;
use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cap_fs_ext::DirExt;
use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions};
use chunk_store::Hash;
use chunk_store::indexer::{self, KnownFile};
use chunk_store::manifest::{self, ChangeKind, ChunkEntry, Diff, EntryMeta, Mtime, NodeSource};
use chunk_store::store::Store;

mod batch;
mod flush;
mod in_flight;
use batch::{Batch, SMALL_FILE, Staged};
use flush::{FLUSH_EVERY, Flusher};
pub use in_flight::InFlight;

/// Temp files are named with the prefix the indexer never publishes and
/// the diff refuses from peers.
const TMP_PREFIX: &str = manifest::RESERVED_PREFIX;

/// How [`apply`] treats what a peer describes.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// The chunker's minimum chunk length: every chunk of a recipe but the
    /// last is at least this long (bounds a recipe's length by its size).
    pub min_chunk: u32,
    /// Apply set-user-id / set-group-id bits (otherwise they are stripped,
    /// whatever the version says).
    pub allow_setid: bool,
    /// Set to stop at the next file boundary ([`MaterializeError::Stopped`]):
    /// every file is then the old one or the new one, never half written.
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            min_chunk: chunk_store::ChunkerConfig::default().min(),
            allow_setid: false,
            stop: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("refusing path {path:?}: {reason}")]
    PathRejected { path: String, reason: String },
    #[error("refusing to write {path:?}: a parent is a symlink or not a directory ({source})")]
    ThroughSymlink { path: String, source: io::Error },
    #[error("chunk {hash} of {path:?} is not available from any source")]
    ChunkUnavailable { hash: Hash, path: String },
    #[error("stopped at a file boundary (shutting down or directory removed)")]
    Stopped,
    #[error(transparent)]
    Store(#[from] chunk_store::Error),
}

type Result<T> = std::result::Result<T, MaterializeError>;

/// Where chunk bytes come from. Implementations need not verify: the
/// materializer hashes every chunk before writing it and tries the next
/// source on a mismatch.
pub trait ChunkSource {
    /// The bytes of `chunk`, or `None` if this source does not have it.
    fn read_chunk(&self, chunk: &ChunkEntry) -> io::Result<Option<Bytes>>;

    /// Whether this source hands out only chunks it has verified against
    /// their hash already (the materializer then does not hash them again).
    fn verified(&self) -> bool {
        false
    }

    /// Whether chunks come from this node's own files (counted as reused)
    /// rather than the network.
    fn is_local(&self) -> bool {
        true
    }
}

/// Chunks already on this node, read from the files the index says hold
/// them. Files are opened beneath each root's directory handle without
/// following symlinks, and only while they are as the index recorded them
/// (same inode, device, size and mtime): a file replaced since — by a
/// symlink to a secret beside the root, a hard link, new content — is
/// never read for a location recorded for the old one.
#[derive(Debug)]
pub struct LocalChunks<'a> {
    store: &'a Store,
    /// Synced roots by directory id, with a handle on each opened lazily.
    roots: Vec<(String, PathBuf)>,
    handles: Mutex<HashMap<String, Option<Arc<Dir>>>>,
    /// Open files, so a run of chunks from one file costs one open. A file
    /// replaced since it was opened keeps its old content on this handle,
    /// which is exactly what its recorded locations describe.
    open: Mutex<HashMap<(String, String), OpenFile>>,
    /// Check each chunk read against its hash (skipped when serving peers,
    /// who verify everything they receive anyway).
    verify: bool,
}

/// A file opened for its chunk locations, or `None` if it is no longer the
/// one indexed (remembered, so it is not opened again).
type OpenFile = Option<Arc<std::fs::File>>;

/// Open files kept per [`LocalChunks`].
const OPEN_FILES: usize = 64;

impl<'a> LocalChunks<'a> {
    pub fn new(store: &'a Store, roots: Vec<(String, PathBuf)>) -> LocalChunks<'a> {
        LocalChunks {
            store,
            roots,
            handles: Default::default(),
            open: Default::default(),
            verify: true,
        }
    }

    /// For serving peers: reads without hashing. The file is checked to be
    /// the one indexed (see the type's docs), so what is read is what the
    /// index says; the peer verifies every chunk anyway.
    pub fn for_serving(store: &'a Store, roots: Vec<(String, PathBuf)>) -> LocalChunks<'a> {
        LocalChunks {
            verify: false,
            ..LocalChunks::new(store, roots)
        }
    }

    fn root(&self, dir: &str) -> Option<Arc<Dir>> {
        let mut handles = self.handles.locked();
        if let Some(h) = handles.get(dir) {
            return h.clone();
        }
        let (_, path) = self.roots.iter().find(|(id, _)| id == dir)?;
        let h = Dir::open_ambient_dir(path, ambient_authority())
            .ok()
            .map(Arc::new);
        handles.insert(dir.to_string(), h.clone());
        h
    }

    /// The file at `path` in directory `dir`, if it is still the regular
    /// file the index recorded there.
    fn file(&self, dir: &str, path: &str) -> Option<Arc<std::fs::File>> {
        let key = (dir.to_string(), path.to_string());
        if let Some(f) = self.open.locked().get(&key) {
            return f.clone();
        }
        let f = self.open_current(dir, path).map(Arc::new);
        let mut open = self.open.locked();
        if open.len() >= OPEN_FILES {
            open.clear();
        }
        open.insert(key, f.clone());
        f
    }

    fn open_current(&self, dir: &str, path: &str) -> Option<std::fs::File> {
        let root = self.root(dir)?;
        let f = indexer::open_beneath(&root, path).ok()?;
        let m = f.metadata().ok()?;
        let rec = self.store.file_record(dir, path).ok()??;
        let current = m.is_file()
            && rec.inode == m.ino()
            && rec.dev == m.dev()
            && matches!(rec.meta, EntryMeta::File { size, mtime, .. }
                if size == m.len() && mtime == indexer::mtime_of(&m));
        current.then_some(f)
    }

    /// The bytes of the chunk with this hash (verified unless built with
    /// [`LocalChunks::for_serving`]), its length taken from the index
    /// (peers ask by hash alone).
    pub fn read_hash(&self, hash: &Hash) -> io::Result<Option<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        let locations = self.store.chunk_locations(hash).map_err(io::Error::other)?;
        for loc in locations {
            let Some(file) = self.file(&loc.dir, &loc.path) else {
                continue;
            };
            let mut buf = vec![0u8; loc.len as usize];
            if file.read_exact_at(&mut buf, loc.offset).is_ok()
                && (!self.verify || Hash::of(&buf) == *hash)
            {
                return Ok(Some(buf));
            }
        }
        Ok(None)
    }
}

impl ChunkSource for LocalChunks<'_> {
    fn read_chunk(&self, chunk: &ChunkEntry) -> io::Result<Option<Bytes>> {
        Ok(self
            .read_hash(&chunk.hash)?
            .filter(|b| b.len() == chunk.len as usize)
            .map(Bytes::from))
    }

    fn verified(&self) -> bool {
        self.verify
    }
}

/// What [`apply`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub files_written: u64,
    pub bytes_written: u64,
    pub dirs_created: u64,
    pub symlinks_created: u64,
    pub removed: u64,
    /// Chunks that failed BLAKE3 verification (from any source).
    pub corrupt_chunks: u64,
    /// Chunks of new files taken from this node's own files.
    pub reused_chunks: u64,
    /// The files written, with their chunks, for the index to record
    /// without reading them again (see [`indexer::ScanOptions::known`]).
    pub known: HashMap<String, KnownFile>,
    known_chunks: usize,
}

/// Beyond this many chunks in one apply, files are indexed by reading them
/// (bounds the memory of the hints: 36 bytes a chunk, 36 MiB in all).
const MAX_KNOWN_CHUNKS: usize = 1 << 20;

/// Applies `diff` (local → remote) under `root`. `remote` supplies the
/// recipes of new files; `sources` are asked for each chunk in order; every
/// chunk written is registered in `in_flight`; `files_done` counts files
/// in place (progress for the operator).
pub fn apply(
    root: &Path,
    diff: &Diff,
    remote: &dyn NodeSource,
    sources: &[&dyn ChunkSource],
    in_flight: &InFlight,
    files_done: &std::sync::atomic::AtomicU64,
    opts: ApplyOptions,
) -> Result<Report> {
    let io_err = |source| MaterializeError::Io {
        path: root.to_path_buf(),
        source,
    };
    let top = Dir::open_ambient_dir(root, ambient_authority()).map_err(io_err)?;
    let mut report = Report::default();
    // Small files are committed in batches; whatever stops the writing —
    // an error, a stop — the files already complete are still put in place.
    let mut batch = Batch::default();
    let written = write_all(
        &top,
        diff,
        remote,
        sources,
        in_flight,
        files_done,
        &opts,
        &mut batch,
        &mut report,
    );
    let committed = batch.commit(&mut report, files_done);
    written.and(committed)?;

    // Deletions last, deepest first. A type change lists the old entry as
    // removed and the new one as added at the same path; the old entry and
    // everything under it went when the new one was created.
    let replaced: HashSet<&str> = diff
        .changes
        .iter()
        .filter(|c| c.kind == ChangeKind::Added)
        .map(|c| c.path.as_str())
        .collect();
    for c in diff.changes.iter().rev() {
        if c.kind != ChangeKind::Removed {
            continue;
        }
        let mut p = c.path.as_str();
        let under_replaced = loop {
            if replaced.contains(p) {
                break true;
            }
            match p.rsplit_once('/') {
                Some((up, _)) => p = up,
                None => break false,
            }
        };
        if under_replaced {
            continue;
        }
        let (parent, name) = match open_parent(&top, &c.path) {
            Ok(p) => p,
            // The parent was removed or replaced already: nothing to do.
            Err(MaterializeError::ThroughSymlink { source, .. })
                if source.kind() == io::ErrorKind::NotFound =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        let res = match c.local {
            Some(EntryMeta::Dir { .. }) => parent.remove_dir(name),
            _ => parent.remove_file(name),
        };
        match res {
            Ok(()) => report.removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(path_io(&c.path, e)),
        }
        sync_dir(&parent, &c.path)?;
    }
    Ok(report)
}

/// Directories, then files and symlinks (changes are sorted by path, so
/// parents come before children).
#[allow(clippy::too_many_arguments)]
fn write_all(
    top: &Dir,
    diff: &Diff,
    remote: &dyn NodeSource,
    sources: &[&dyn ChunkSource],
    in_flight: &InFlight,
    files_done: &std::sync::atomic::AtomicU64,
    opts: &ApplyOptions,
    batch: &mut Batch,
    report: &mut Report,
) -> Result<()> {
    let mut cleaned: HashSet<String> = HashSet::new();
    let stopped = || {
        opts.stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    };
    for c in &diff.changes {
        if stopped() {
            return Err(MaterializeError::Stopped);
        }
        if c.kind == ChangeKind::Removed {
            continue;
        }
        let remote_meta = c
            .remote
            .as_ref()
            .expect("added or modified has a remote side");
        let (parent, name) = open_parent(top, &c.path)?;
        if !cleaned.contains(parent_of(&c.path)) {
            remove_stale_temps(&parent);
            cleaned.insert(parent_of(&c.path).to_string());
        }
        match remote_meta {
            EntryMeta::Dir { mode, .. } => {
                if c.kind == ChangeKind::Added {
                    clear_other_type(&parent, name, &c.path, true)?;
                    match parent.create_dir(name) {
                        Ok(()) => report.dirs_created += 1,
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(path_io(&c.path, e)),
                    }
                }
                let sub = parent.open_dir_nofollow(name).map_err(|source| {
                    MaterializeError::ThroughSymlink {
                        path: c.path.clone(),
                        source,
                    }
                })?;
                // Directory handles are O_PATH; fchmod needs a real fd.
                sub.open(".")
                    .and_then(|d| {
                        d.into_std()
                            .set_permissions(std::fs::Permissions::from_mode(*mode))
                    })
                    .map_err(|e| path_io(&c.path, e))?;
            }
            EntryMeta::File {
                mode,
                size,
                mtime,
                recipe,
            } => {
                let chunks = manifest::read_recipe_checked(remote, recipe, *size, opts.min_chunk);
                clear_other_type(&parent, name, &c.path, false)?;
                let mode = if opts.allow_setid {
                    *mode
                } else {
                    *mode & !indexer::SETID_BITS
                };
                let staged = stage_file(
                    parent, name, &c.path, chunks, *size, mode, *mtime, sources, in_flight, report,
                    &stopped,
                )?;
                if *size < SMALL_FILE {
                    batch.push(staged, report, files_done)?;
                } else {
                    staged.commit(report, files_done)?;
                }
            }
            EntryMeta::Symlink { target } => {
                clear_other_type(&parent, name, &c.path, false)?;
                let tmp = temp_name(name);
                parent
                    .symlink_contents(target, &tmp)
                    .map_err(|e| path_io(&c.path, e))?;
                parent
                    .rename(&tmp, &parent, name)
                    .map_err(|e| path_io(&c.path, e))?;
                sync_dir(&parent, &c.path)?;
                report.symlinks_created += 1;
            }
        }
    }
    Ok(())
}

fn path_io(path: &str, source: io::Error) -> MaterializeError {
    MaterializeError::Io {
        path: PathBuf::from(path),
        source,
    }
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

/// Opens the directory holding `path`, one component at a time without
/// following symlinks, and returns it with the final name.
fn open_parent<'p>(top: &Dir, path: &'p str) -> Result<(Dir, &'p str)> {
    let reject = |reason: String| MaterializeError::PathRejected {
        path: path.to_string(),
        reason,
    };
    if path.is_empty() || path.starts_with('/') || path.len() > manifest::MAX_PATH_LEN {
        return Err(reject("empty, absolute or too long".into()));
    }
    let mut parts: Vec<&str> = path.split('/').collect();
    let name = parts.pop().expect("split yields at least one part");
    for part in parts.iter().chain([&name]) {
        manifest::validate_name(part).map_err(reject)?;
    }
    let mut dir = top.try_clone().map_err(|e| path_io(path, e))?;
    for part in parts {
        dir = dir
            .open_dir_nofollow(part)
            .map_err(|source| MaterializeError::ThroughSymlink {
                path: path.to_string(),
                source,
            })?;
    }
    Ok((dir, name))
}

/// Removes what stands at `name` if it is of the other kind (a directory
/// where a file goes, or anything but a directory where one goes).
fn clear_other_type(parent: &Dir, name: &str, path: &str, want_dir: bool) -> Result<()> {
    let meta = match parent.symlink_metadata(name) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(path_io(path, e)),
    };
    let is_dir = meta.is_dir();
    if is_dir && !want_dir {
        // remove_dir_all works beneath the handle and does not follow
        // symlinks inside the tree it removes.
        parent.remove_dir_all(name).map_err(|e| path_io(path, e))?;
    } else if !is_dir && want_dir {
        parent.remove_file(name).map_err(|e| path_io(path, e))?;
    }
    Ok(())
}

fn temp_name(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    // Keep within NAME_MAX whatever the target's length.
    let short: String = name.chars().take(64).collect();
    format!("{TMP_PREFIX}{}.{n}.{short}", std::process::id())
}

/// Temp files left by a crash in this directory.
fn remove_stale_temps(dir: &Dir) {
    let Ok(entries) = dir.entries() else { return };
    for e in entries.flatten() {
        if let Ok(name) = e.file_name().into_string()
            && name.starts_with(TMP_PREFIX)
        {
            let _ = dir.remove_file(&name);
        }
    }
}

fn sync_dir(dir: &Dir, path: &str) -> Result<()> {
    // cap-std directory handles are O_PATH, which fsync refuses (EBADF);
    // open the directory itself read-only to sync it.
    dir.open(".")
        .and_then(|d| d.into_std().sync_all())
        .map_err(|e| path_io(parent_of(path), e))
}

fn system_time(m: Mtime) -> SystemTime {
    let nanos = Duration::new(0, m.nanos);
    if m.secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(m.secs as u64) + nanos
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(m.secs.unsigned_abs()) + nanos
    }
}

/// Writes a file's content to a temp beside it, verifying every chunk, and
/// sets its mode and mtime; [`Staged`] then makes it durable and visible.
#[allow(clippy::too_many_arguments)]
fn stage_file(
    parent: Dir,
    name: &str,
    path: &str,
    chunks: manifest::RecipeReader<'_>,
    size: u64,
    mode: u32,
    mtime: Mtime,
    sources: &[&dyn ChunkSource],
    in_flight: &InFlight,
    report: &mut Report,
    stopped: &dyn Fn() -> bool,
) -> Result<Staged> {
    let tmp = temp_name(name);
    let file = parent
        .open_with(
            &tmp,
            OpenOptions::new().read(true).write(true).create_new(true),
        )
        .map_err(|e| path_io(path, e))?;
    // From here the temp is removed unless renamed into place, on an
    // error or a panic alike.
    let mut staged = Staged {
        parent,
        tmp: Some(tmp),
        name: name.to_string(),
        path: path.to_string(),
        file: Arc::new(file.into_std()),
        size,
        known: None,
    };
    let file = staged.file.clone();
    // Unbuffered: a chunk is on the file (page cache) once written, so
    // peers can be served from it while the rest is still arriving. The
    // recipe is streamed (its reader checks it covers exactly `size`); the
    // chunk list is kept only for the index's hint, within
    // MAX_KNOWN_CHUNKS.
    let mut offset = 0;
    let mut known: Option<Vec<ChunkEntry>> = Some(Vec::new());
    let mut flusher: Option<Flusher> = None;
    for c in chunks {
        // A stop abandons the file (its temp is removed): the old version
        // stays in place, whole.
        if stopped() {
            return Err(MaterializeError::Stopped);
        }
        let c = c?;
        let bytes = fetch_verified(&c, path, sources, report)?;
        (&*file).write_all(&bytes).map_err(|e| path_io(path, e))?;
        in_flight.add(c.hash, &file, offset, c.len);
        let before = offset;
        offset += u64::from(c.len);
        if before / FLUSH_EVERY != offset / FLUSH_EVERY {
            flusher.get_or_insert_with(|| Flusher::start(&file)).kick();
        }
        if let Some(k) = &mut known {
            if report.known_chunks + k.len() < MAX_KNOWN_CHUNKS {
                k.push(c);
            } else {
                known = None;
            }
        }
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| path_io(path, e))?;
    file.set_times(std::fs::FileTimes::new().set_modified(system_time(mtime)))
        .map_err(|e| path_io(path, e))?;
    // A flusher's error is this file's (Linux reports it once).
    if let Some(f) = flusher.take() {
        f.finish().map_err(|e| path_io(path, e))?;
    }
    let m = file.metadata().map_err(|e| path_io(path, e))?;
    // A file system that clamps the time (ext4 stops at 2446) would leave
    // a file that never matches the version: say so now.
    if indexer::mtime_of(&m) != mtime {
        return Err(MaterializeError::PathRejected {
            path: path.to_string(),
            reason: format!(
                "the file system stored modification time {}.{:09} instead of {}.{:09}",
                m.mtime(),
                m.mtime_nsec(),
                mtime.secs,
                mtime.nanos
            ),
        });
    }
    if let Some(chunks) = known {
        // Counted now: the budget bounds what staged files hold too.
        report.known_chunks += chunks.len();
        staged.known = Some(KnownFile {
            size,
            mtime: indexer::mtime_of(&m),
            inode: m.ino(),
            dev: m.dev(),
            chunks,
        });
    }
    Ok(staged)
}

fn fetch_verified(
    c: &ChunkEntry,
    path: &str,
    sources: &[&dyn ChunkSource],
    report: &mut Report,
) -> Result<Bytes> {
    for s in sources {
        match s.read_chunk(c) {
            Ok(Some(bytes))
                if bytes.len() == c.len as usize
                    && (s.verified() || Hash::of(&bytes) == c.hash) =>
            {
                return Ok(bytes);
            }
            Ok(Some(_)) => {
                report.corrupt_chunks += 1;
                tracing::warn!(chunk = %c.hash, path, "chunk failed BLAKE3 verification; trying the next source");
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(chunk = %c.hash, path, error = %e, "chunk source failed"),
        }
    }
    Err(MaterializeError::ChunkUnavailable {
        hash: c.hash,
        path: path.to_string(),
    })
}

#[cfg(test)]
mod tests;
