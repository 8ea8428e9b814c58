//! One file of a scan: its status, the caller's hint of its content, and
//! reading it beneath the root handle into chunks, a recipe and a record.

use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use cap_fs_ext::{FollowSymlinks, OpenOptionsFollowExt};
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};

use super::{SETID_BITS, ScanOptions};
use crate::ChunkRef;
use crate::chunker::chunk_reader;
use crate::error::Error;
use crate::manifest::{self, ChunkEntry, EntryMeta, MemNodes, Mtime};
use crate::store::FileRecord;

/// A file that keeps changing while we read it is given up on for this
/// scan after this many attempts (the watcher will bring it back).
const READ_ATTEMPTS: u32 = 3;

/// A file read, or taken from the caller's hint: its record, chunks and
/// recipe nodes, ready to commit.
pub(super) struct Chunked {
    pub(super) record: FileRecord,
    pub(super) chunks: Vec<ChunkRef>,
    pub(super) nodes: MemNodes,
}

pub fn mtime_of(m: &Metadata) -> Mtime {
    Mtime {
        secs: m.mtime(),
        nanos: m.mtime_nsec() as u32,
    }
}

/// What a scan needs of a file's status, from `lstat` of a directory entry
/// or `fstat` of an opened file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub len: u64,
    pub mtime: Mtime,
    pub ino: u64,
    pub dev: u64,
    /// Permission bits (0o7777).
    pub mode: u32,
}

impl Stat {
    pub fn of(m: &Metadata) -> Stat {
        Stat {
            len: m.len(),
            mtime: mtime_of(m),
            ino: m.ino(),
            dev: m.dev(),
            mode: m.mode() & 0o7777,
        }
    }

    pub(super) fn of_cap(m: &cap_std::fs::Metadata) -> Stat {
        use cap_std::fs::MetadataExt as _;
        Stat {
            len: m.len(),
            mtime: Mtime {
                secs: m.mtime(),
                nanos: m.mtime_nsec() as u32,
            },
            ino: m.ino(),
            dev: m.dev(),
            mode: m.mode() & 0o7777,
        }
    }
}

/// A file the caller wrote and whose content it knows chunk by chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownFile {
    pub size: u64,
    pub mtime: Mtime,
    pub inode: u64,
    pub dev: u64,
    /// The chunks in file order; their lengths sum to `size`.
    pub chunks: Vec<ChunkEntry>,
}

impl KnownFile {
    /// The hint as it applies to a file with status `m`, if it still does.
    pub(super) fn matching(&self, m: &Stat, mode: u32) -> Option<Chunked> {
        let total: u64 = self.chunks.iter().map(|c| u64::from(c.len)).sum();
        if total != self.size
            || m.len != self.size
            || m.mtime != self.mtime
            || m.ino != self.inode
            || m.dev != self.dev
        {
            return None;
        }
        let mut nodes = MemNodes::default();
        let recipe = manifest::build_recipe(self.chunks.clone(), &mut nodes).ok()?;
        let mut offset = 0;
        let chunks = self
            .chunks
            .iter()
            .map(|c| {
                let r = ChunkRef {
                    offset,
                    len: c.len,
                    hash: c.hash,
                };
                offset += u64::from(c.len);
                r
            })
            .collect();
        Some(Chunked {
            record: FileRecord {
                meta: EntryMeta::File {
                    mode,
                    size: self.size,
                    mtime: self.mtime,
                    recipe,
                },
                inode: self.inode,
                dev: self.dev,
                chunks: self.chunks.len() as u64,
            },
            chunks,
            nodes,
        })
    }
}

pub(super) enum Read {
    Done(Chunked),
    /// Taken from the caller's hint, not read.
    Known(Chunked),
    Vanished,
    /// Not a regular file once opened (decided by `fstat` of the fd).
    NotRegular,
    /// Modified while read, every attempt.
    Unstable,
}

/// Opens `rel` beneath `top` for reading: the last component is never
/// followed if it is a symlink (`O_NOFOLLOW`), and a FIFO or device swapped
/// in since the walk does not block the open (`O_NONBLOCK`; `O_NOCTTY` so
/// a terminal never becomes ours). The caller decides from `fstat` of the
/// returned file, not from the earlier `lstat`.
pub fn open_beneath(top: &Dir, rel: &str) -> io::Result<fs::File> {
    let flags = rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY;
    let f = top.open_with(
        rel,
        OpenOptions::new()
            .read(true)
            .follow(FollowSymlinks::No)
            .custom_flags(flags.bits() as i32),
    )?;
    Ok(f.into_std())
}

/// Chunks one file, opened beneath the root handle.
pub(super) fn chunk_file(
    cfg: &crate::ChunkerConfig,
    top: &Dir,
    rel: &str,
    path: &Path,
    opts: &ScanOptions,
) -> Result<Read, Error> {
    use rustix::io::Errno;
    let keep_setid = opts.keep_setid;
    for _ in 0..READ_ATTEMPTS {
        let file = match open_beneath(top, rel) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Read::Vanished),
            // O_NOFOLLOW on a symlink; a socket or a device without a
            // driver swapped in since the walk.
            Err(e)
                if [Errno::LOOP, Errno::NXIO, Errno::NODEV, Errno::OPNOTSUPP]
                    .iter()
                    .any(|x| e.raw_os_error() == Some(x.raw_os_error())) =>
            {
                return Ok(Read::NotRegular);
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let before = file.metadata().map_err(|e| Error::io(path, e))?;
        if !before.is_file() {
            return Ok(Read::NotRegular);
        }
        if opts.max_file_size.is_some_and(|max| before.len() > max) {
            // Grew past the limit since the walk.
            return Ok(Read::NotRegular);
        }
        // Grown as chunks are cut, never sized from the file's length: a
        // sparse file may declare petabytes.
        let mut chunks = Vec::new();
        let len =
            chunk_reader(cfg, &file, |c, _| chunks.push(c)).map_err(|e| Error::io(path, e))?;
        let after = file.metadata().map_err(|e| Error::io(path, e))?;
        if len != after.len()
            || mtime_of(&before) != mtime_of(&after)
            || before.len() != after.len()
        {
            continue; // written to while we read it
        }
        let mut nodes = MemNodes::default();
        let recipe = manifest::build_recipe(
            chunks
                .iter()
                .map(|c| ChunkEntry {
                    hash: c.hash,
                    len: c.len,
                })
                .collect(),
            &mut nodes,
        )?;
        let mode = after.mode() & 0o7777;
        return Ok(Read::Done(Chunked {
            record: FileRecord {
                meta: EntryMeta::File {
                    mode: if keep_setid { mode } else { mode & !SETID_BITS },
                    size: len,
                    mtime: mtime_of(&after),
                    recipe,
                },
                inode: after.ino(),
                dev: after.dev(),
                chunks: chunks.len() as u64,
            },
            chunks,
            nodes,
        }));
    }
    Ok(Read::Unstable)
}
