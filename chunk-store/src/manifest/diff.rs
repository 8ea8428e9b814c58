//! The diff of a local tree against a remote one, visiting only subtrees
//! whose hashes differ, within bounds on how much a remote tree may make it
//! do; and `list`, every entry of one tree.

use std::collections::HashSet;

use super::nodes::{MemNodes, NodeSource, load_node};
use super::recipe::recipe_node_ids_counted;
use super::{
    ChunkEntry, DirEntry, EntryMeta, MAX_PATH_LEN, MTIME_SECS, Node, RESERVED_PREFIX, Tree,
};
use crate::Hash;
use crate::error::{Error, Origin};

/// Most nodes one expanded page hints at (what a page of the largest
/// size can list; a bound on the local lookups one page costs).
const PREFETCH_MAX: usize = 16 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    Added,
    Modified,
    Removed,
}

/// One entry that differs. `path` is relative, `/`-separated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub kind: ChangeKind,
    /// The entry as the local side has it (`None` when added).
    pub local: Option<EntryMeta>,
    /// The entry as the remote side has it (`None` when removed).
    pub remote: Option<EntryMeta>,
}

/// What it takes to turn the local tree into the remote one.
#[derive(Clone, Debug, Default)]
pub struct Diff {
    /// Every added, modified and removed entry (all descendants of an added
    /// or removed directory included), sorted by path.
    pub changes: Vec<Change>,
    /// Chunks of added or modified files that the local side has nowhere,
    /// each listed once.
    pub missing_chunks: Vec<ChunkEntry>,
    /// Nodes read from either side: the cost of the diff.
    pub nodes_visited: u64,
}

/// Bounds on the work of one diff, from what the remote version declares
/// (its entry count and total bytes) and the directory's own caps. A tree
/// is a DAG: pages may be referenced many times, so a few distinct nodes
/// can describe millions of paths or a file of 2^60 bytes. The diff stops
/// with [`Error::InvalidTree`] as soon as the remote side exceeds a bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiffLimits {
    /// Remote entries (files, directories, symlinks) taken in as added or
    /// modified.
    pub max_entries: u64,
    /// Declared sizes of added or modified files, and the lengths of the
    /// missing chunks (each at most the sum of the files' sizes).
    pub max_bytes: u64,
    /// Remote nodes read.
    pub max_nodes: u64,
    /// What could be on the local disk once applied (its free space plus
    /// what is there now): a tree whose files need more does not fit,
    /// whatever it declares.
    pub disk_bytes: u64,
}

impl DiffLimits {
    /// No bounds: trusted trees (tests, tools, the local index).
    pub const NONE: DiffLimits = DiffLimits {
        max_entries: u64::MAX,
        max_bytes: u64::MAX,
        max_nodes: u64::MAX,
        disk_bytes: u64::MAX,
    };

    /// The bounds for a version that declares `entries` entries and
    /// `bytes` bytes of files. Nodes: a directory leaf holds at least 8
    /// entries and a recipe leaf 16 chunks (except the last of each
    /// directory or file), each index level at least halves the count,
    /// and a chunk is at least `min_chunk` bytes (except a file's last),
    /// so an honest tree has fewer than `4·entries + 2·bytes/(16·min_chunk)`
    /// nodes; 64 more cover the smallest trees.
    pub fn declared(entries: u64, bytes: u64, min_chunk: u32) -> DiffLimits {
        let per_leaf = 16 * u64::from(min_chunk.max(1));
        DiffLimits {
            max_entries: entries,
            max_bytes: bytes,
            max_nodes: 64u64
                .saturating_add(entries.saturating_mul(4))
                .saturating_add((bytes / per_leaf).saturating_mul(2)),
            disk_bytes: u64::MAX,
        }
    }

    /// These limits, with bytes (and the node budget they allow) capped by
    /// what could fit on the disk: a peer declaring 2^64 bytes gets no
    /// larger a budget than the disk.
    pub fn on_disk(self, disk_bytes: u64, min_chunk: u32) -> DiffLimits {
        let capped =
            DiffLimits::declared(self.max_entries, self.max_bytes.min(disk_bytes), min_chunk);
        DiffLimits {
            max_bytes: self.max_bytes,
            disk_bytes,
            ..capped
        }
    }
}

/// What a diff has spent of its [`DiffLimits`].
#[derive(Debug)]
struct Budget {
    limits: DiffLimits,
    entries: u64,
    bytes: u64,
    chunk_bytes: u64,
    remote_nodes: u64,
}

impl Budget {
    fn over(what: String) -> Error {
        Error::InvalidTree {
            origin: Origin::Remote,
            reason: what,
        }
    }

    fn node(&mut self, origin: Origin) -> Result<(), Error> {
        if origin == Origin::Remote {
            self.remote_nodes += 1;
            if self.remote_nodes > self.limits.max_nodes {
                return Err(Self::over(format!(
                    "its tree has more than {} nodes, more than the version's declared size allows",
                    self.limits.max_nodes
                )));
            }
        }
        Ok(())
    }

    fn entry(&mut self, path: &str, size: u64) -> Result<(), Error> {
        self.entries += 1;
        self.bytes = self.bytes.saturating_add(size);
        if self.entries > self.limits.max_entries {
            return Err(Self::over(format!(
                "it has more than the {} entries the version declares (at {path:?})",
                self.limits.max_entries
            )));
        }
        if self.bytes > self.limits.max_bytes {
            return Err(Self::over(format!(
                "its files hold more than the {} bytes the version declares (at {path:?})",
                self.limits.max_bytes
            )));
        }
        if self.bytes > self.limits.disk_bytes {
            return Err(Error::DoesNotFit {
                needed: self.bytes,
                room: self.limits.disk_bytes,
                path: path.to_string(),
            });
        }
        Ok(())
    }

    fn chunk(&mut self, len: u32) -> Result<(), Error> {
        self.chunk_bytes += u64::from(len);
        if self.chunk_bytes > self.limits.max_bytes {
            return Err(Self::over(format!(
                "its missing chunks exceed the {} bytes the version declares",
                self.limits.max_bytes
            )));
        }
        Ok(())
    }
}

/// Checks an entry a peer's tree holds at `path`: reserved names and
/// modification times no file system keeps.
fn check_remote_entry(
    origin: Origin,
    path: &str,
    name: &str,
    meta: &EntryMeta,
) -> Result<(), Error> {
    let bad = |reason: String| Error::InvalidTree {
        origin,
        reason: format!("{path:?}: {reason}"),
    };
    if name.starts_with(RESERVED_PREFIX) {
        return Err(bad(format!(
            "names starting with {RESERVED_PREFIX:?} are reserved for syncd's temp files"
        )));
    }
    if let EntryMeta::File { mtime, .. } = meta
        && !MTIME_SECS.contains(&mtime.secs)
    {
        return Err(bad(format!(
            "modification time {} s is outside what file systems store",
            mtime.secs
        )));
    }
    Ok(())
}

enum Item {
    /// A node not yet read; `level` is unknown for a tree's root.
    Node {
        hash: Hash,
        level: Option<u8>,
    },
    Entry(DirEntry),
}

impl Item {
    /// Order in which to expand: unknown root first, entries last.
    fn rank(&self) -> i32 {
        match self {
            Item::Node { level: None, .. } => i32::MAX,
            Item::Node { level: Some(l), .. } => i32::from(*l),
            Item::Entry(_) => -1,
        }
    }
}

struct Cursor<'a> {
    src: &'a dyn NodeSource,
    /// Pending items, next on top.
    stack: Vec<Item>,
}

impl Cursor<'_> {
    fn expand(&mut self, visited: &mut u64, budget: &mut Budget) -> Result<(), Error> {
        let Some(Item::Node { hash, level }) = self.stack.pop() else {
            unreachable!("expand called on an entry")
        };
        *visited += 1;
        budget.node(self.src.origin())?;
        match load_node(self.src, &hash, Tree::Dir, level)? {
            Node::DirLeaf(entries) => self
                .stack
                .extend(entries.into_iter().rev().map(Item::Entry)),
            Node::Index {
                level, children, ..
            } => self.stack.extend(children.iter().rev().map(|c| Item::Node {
                hash: c.hash,
                level: Some(level - 1),
            })),
            Node::RecipeLeaf(_) => unreachable!("load_node checked the tree"),
        }
        Ok(())
    }
}

/// The last name in a (trusted, local) directory page: down the rightmost
/// children to a leaf.
fn last_name(
    src: &dyn NodeSource,
    hash: &Hash,
    level: Option<u8>,
) -> Result<Option<String>, Error> {
    let (mut hash, mut level) = (*hash, level);
    loop {
        match load_node(src, &hash, Tree::Dir, level)? {
            Node::DirLeaf(entries) => return Ok(entries.last().map(|e| e.name.clone())),
            Node::Index {
                level: l, children, ..
            } => match children.last() {
                Some(c) => (hash, level) = (c.hash, Some(l - 1)),
                None => return Ok(None),
            },
            Node::RecipeLeaf(_) => unreachable!("load_node checked the tree"),
        }
    }
}

struct Differ<'a> {
    local: &'a dyn NodeSource,
    remote: &'a dyn NodeSource,
    have_chunk: &'a mut dyn FnMut(&Hash) -> Result<bool, Error>,
    with_chunks: bool,
    out: Diff,
    listed: HashSet<Hash>,
    /// Remote recipe nodes already walked: their chunks are listed, so a
    /// page referenced again adds nothing.
    seen_recipe: HashSet<Hash>,
    budget: Budget,
    /// Directories still to compare: (path, local root, remote root).
    jobs: Vec<(String, Option<Hash>, Option<Hash>)>,
}

/// Compares the local tree with a remote one.
///
/// Cost is proportional to what differs: subtrees with equal hashes are
/// skipped without being read, on both the directory trees and the recipes
/// of modified files. Remote nodes are verified (hash, shape, bounds) before
/// use. `have_chunk` tells whether the local side holds a chunk anywhere,
/// so chunks of renamed or copied files are not fetched again.
pub fn diff(
    local: &dyn NodeSource,
    local_root: Option<Hash>,
    remote: &dyn NodeSource,
    remote_root: Option<Hash>,
    have_chunk: &mut dyn FnMut(&Hash) -> Result<bool, Error>,
) -> Result<Diff, Error> {
    diff_limited(
        local,
        local_root,
        remote,
        remote_root,
        have_chunk,
        DiffLimits::NONE,
    )
}

fn budget(limits: DiffLimits) -> Budget {
    Budget {
        limits,
        entries: 0,
        bytes: 0,
        chunk_bytes: 0,
        remote_nodes: 0,
    }
}

/// [`diff`] against an untrusted remote tree, stopping as soon as it does
/// more work than `limits` allow.
pub fn diff_limited(
    local: &dyn NodeSource,
    local_root: Option<Hash>,
    remote: &dyn NodeSource,
    remote_root: Option<Hash>,
    have_chunk: &mut dyn FnMut(&Hash) -> Result<bool, Error>,
    limits: DiffLimits,
) -> Result<Diff, Error> {
    let mut d = Differ {
        local,
        remote,
        have_chunk,
        with_chunks: true,
        out: Diff::default(),
        listed: HashSet::new(),
        seen_recipe: HashSet::new(),
        budget: budget(limits),
        jobs: vec![(String::new(), local_root, remote_root)],
    };
    d.run()?;
    Ok(d.out)
}

/// Every entry of a tree, sorted by path.
pub fn list(src: &dyn NodeSource, root: &Hash) -> Result<Vec<(String, EntryMeta)>, Error> {
    let empty = MemNodes::default();
    let mut never = |_: &Hash| Ok::<bool, Error>(true);
    let mut d = Differ {
        local: &empty,
        remote: src,
        have_chunk: &mut never,
        with_chunks: false,
        out: Diff::default(),
        listed: HashSet::new(),
        seen_recipe: HashSet::new(),
        budget: budget(DiffLimits::NONE),
        jobs: vec![(String::new(), None, Some(*root))],
    };
    d.run()?;
    Ok(d.out
        .changes
        .into_iter()
        .map(|c| (c.path, c.remote.unwrap()))
        .collect())
}

impl Differ<'_> {
    fn run(&mut self) -> Result<(), Error> {
        while let Some((path, l, r)) = self.jobs.pop() {
            if l == r {
                continue;
            }
            self.diff_dir(&path, l, r)?;
        }
        self.out.changes.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(())
    }

    fn diff_dir(&mut self, prefix: &str, l: Option<Hash>, r: Option<Hash>) -> Result<(), Error> {
        let start = |src, root: Option<Hash>| Cursor {
            src,
            stack: root
                .map(|hash| Item::Node { hash, level: None })
                .into_iter()
                .collect(),
        };
        let mut lc = start(self.local, l);
        let mut rc = start(self.remote, r);
        // Names must be strictly increasing across the remote pages too
        // (each page checks its own order): a name repeated in two pages
        // would be applied twice and never match.
        let mut last_remote: Option<String> = None;
        // A page skipped unread on both sides since the last remote entry:
        // its last name is where the order check resumes.
        let mut skipped: Option<(Hash, Option<u8>)> = None;
        loop {
            if let (Some(Item::Node { hash: a, level }), Some(Item::Node { hash: b, .. })) =
                (lc.stack.last(), rc.stack.last())
                && a == b
            {
                // Same hash, same entries: skip both without reading them.
                skipped = Some((*a, *level));
                lc.stack.pop();
                rc.stack.pop();
                continue;
            }
            let lr = lc.stack.last().map_or(-2, Item::rank);
            let rr = rc.stack.last().map_or(-2, Item::rank);
            if lr >= 0 || rr >= 0 {
                // Expand the higher node first; equal levels both at once,
                // so aligned pages get compared by hash before being read.
                if lr >= rr {
                    lc.expand(&mut self.out.nodes_visited, &mut self.budget)?;
                }
                if rr >= lr {
                    // What the page adds is on top of the stack.
                    let below = rc.stack.len().saturating_sub(1);
                    rc.expand(&mut self.out.nodes_visited, &mut self.budget)?;
                    self.prefetch_remote(&rc.stack[below.min(rc.stack.len())..]);
                }
                continue;
            }
            let ord = match (lc.stack.last(), rc.stack.last()) {
                (None, None) => return Ok(()),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(Item::Entry(a)), Some(Item::Entry(b))) => {
                    a.name.as_bytes().cmp(b.name.as_bytes())
                }
                _ => unreachable!("nodes were expanded above"),
            };
            let take = |c: &mut Cursor<'_>| match c.stack.pop() {
                Some(Item::Entry(e)) => e,
                _ => unreachable!(),
            };
            if ord != std::cmp::Ordering::Less
                && let Some(Item::Entry(e)) = rc.stack.last()
            {
                if let Some((hash, level)) = skipped.take() {
                    last_remote = last_name(self.local, &hash, level)?;
                }
                if last_remote
                    .as_ref()
                    .is_some_and(|p| p.as_bytes() >= e.name.as_bytes())
                {
                    return Err(Error::InvalidTree {
                        origin: self.remote.origin(),
                        reason: format!(
                            "{:?}: name repeated or out of order across pages",
                            Self::join(prefix, &e.name)?
                        ),
                    });
                }
                last_remote = Some(e.name.clone());
            }
            match ord {
                std::cmp::Ordering::Less => {
                    let e = take(&mut lc);
                    self.removed(prefix, e)?;
                }
                std::cmp::Ordering::Greater => {
                    let e = take(&mut rc);
                    self.added(prefix, e)?;
                }
                std::cmp::Ordering::Equal => {
                    let (a, b) = (take(&mut lc), take(&mut rc));
                    self.same_name(prefix, a, b)?;
                }
            }
        }
    }

    fn join(prefix: &str, name: &str) -> Result<String, Error> {
        let path = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}/{name}")
        };
        if path.len() > MAX_PATH_LEN {
            // Byte 64 may fall inside a character: cut at a boundary
            // (slicing there panicked, under a lock, taking the node down).
            let mut end = 64;
            while !path.is_char_boundary(end) {
                end -= 1;
            }
            return Err(Error::InvalidTree {
                origin: Origin::Remote,
                reason: format!("path {}… exceeds {MAX_PATH_LEN} bytes", &path[..end]),
            });
        }
        Ok(path)
    }

    fn push(&mut self, path: String, kind: ChangeKind, l: Option<EntryMeta>, r: Option<EntryMeta>) {
        self.out.changes.push(Change {
            path,
            kind,
            local: l,
            remote: r,
        });
    }

    fn removed(&mut self, prefix: &str, e: DirEntry) -> Result<(), Error> {
        let path = Self::join(prefix, &e.name)?;
        if let EntryMeta::Dir { root, .. } = &e.meta {
            self.jobs.push((path.clone(), Some(*root), None));
        }
        self.push(path, ChangeKind::Removed, Some(e.meta), None);
        Ok(())
    }

    /// Accounts and checks a remote entry that will be applied.
    fn take_remote(&mut self, path: &str, e: &DirEntry) -> Result<(), Error> {
        check_remote_entry(self.remote.origin(), path, &e.name, &e.meta)?;
        let size = match e.meta {
            EntryMeta::File { size, .. } => size,
            _ => 0,
        };
        self.budget.entry(path, size)
    }

    fn added(&mut self, prefix: &str, e: DirEntry) -> Result<(), Error> {
        let path = Self::join(prefix, &e.name)?;
        self.take_remote(&path, &e)?;
        match &e.meta {
            EntryMeta::Dir { root, .. } => self.jobs.push((path.clone(), None, Some(*root))),
            EntryMeta::File { recipe, .. } => self.missing_from(recipe, &HashSet::new())?,
            EntryMeta::Symlink { .. } => {}
        }
        self.push(path, ChangeKind::Added, None, Some(e.meta));
        Ok(())
    }

    fn same_name(&mut self, prefix: &str, a: DirEntry, b: DirEntry) -> Result<(), Error> {
        if a.meta == b.meta {
            return Ok(());
        }
        let path = Self::join(prefix, &a.name)?;
        // A type change is accounted by `added` below.
        if std::mem::discriminant(&a.meta) == std::mem::discriminant(&b.meta) {
            self.take_remote(&path, &b)?;
        }
        match (&a.meta, &b.meta) {
            (EntryMeta::Dir { mode: m1, root: r1 }, EntryMeta::Dir { mode: m2, root: r2 }) => {
                if r1 != r2 {
                    self.jobs.push((path.clone(), Some(*r1), Some(*r2)));
                }
                if m1 != m2 {
                    self.push(path, ChangeKind::Modified, Some(a.meta), Some(b.meta));
                }
            }
            (EntryMeta::File { recipe: r1, .. }, EntryMeta::File { recipe: r2, .. }) => {
                if r1 != r2 && self.with_chunks {
                    // Recipe pages the old version already has need not be
                    // read from the peer: their chunks are in the old file.
                    let known =
                        recipe_node_ids_counted(self.local, r1, &mut self.out.nodes_visited)?;
                    self.missing_from(r2, &known)?;
                }
                self.push(path, ChangeKind::Modified, Some(a.meta), Some(b.meta));
            }
            (EntryMeta::Symlink { .. }, EntryMeta::Symlink { .. }) => {
                self.push(path, ChangeKind::Modified, Some(a.meta), Some(b.meta));
            }
            _ => {
                // The type changed: the old entry goes, the new one comes.
                self.removed(prefix, a)?;
                self.added(prefix, b)?;
            }
        }
        Ok(())
    }

    /// Hints the remote source at the nodes a remote page just expanded
    /// (`added`) leads to that this side does not hold: sub-pages, sub-directories'
    /// roots and file recipes the diff will read next (unchanged ones are
    /// held locally and skipped, so the cost stays with what changed).
    fn prefetch_remote(&self, added: &[Item]) {
        let mut hashes = Vec::new();
        for item in added.iter().rev() {
            let h = match item {
                Item::Node { hash, .. } => *hash,
                Item::Entry(DirEntry {
                    meta: EntryMeta::File { recipe: h, .. } | EntryMeta::Dir { root: h, .. },
                    ..
                }) => *h,
                Item::Entry(_) => continue,
            };
            if hashes.len() >= PREFETCH_MAX {
                break;
            }
            if !matches!(self.local.get_node(&h), Ok(Some(_))) {
                hashes.push(h);
            }
        }
        if !hashes.is_empty() {
            self.remote.prefetch(&hashes);
        }
    }

    /// Adds the chunks of a remote recipe that the local side lacks,
    /// skipping recipe subtrees listed in `known`.
    fn missing_from(&mut self, root: &Hash, known: &HashSet<Hash>) -> Result<(), Error> {
        if !self.with_chunks {
            return Ok(());
        }
        let mut stack = vec![(*root, None)];
        while let Some((hash, level)) = stack.pop() {
            if known.contains(&hash) || !self.seen_recipe.insert(hash) {
                continue;
            }
            self.out.nodes_visited += 1;
            self.budget.node(self.remote.origin())?;
            match load_node(self.remote, &hash, Tree::Recipe, level)? {
                Node::RecipeLeaf(chunks) => {
                    for c in chunks {
                        if !self.listed.contains(&c.hash) && !(self.have_chunk)(&c.hash)? {
                            self.budget.chunk(c.len)?;
                            self.listed.insert(c.hash);
                            self.out.missing_chunks.push(c);
                        }
                    }
                }
                Node::Index {
                    level, children, ..
                } => {
                    let fresh: Vec<Hash> = children
                        .iter()
                        .map(|c| c.hash)
                        .filter(|h| !known.contains(h) && !self.seen_recipe.contains(h))
                        .collect();
                    self.remote.prefetch(&fresh);
                    stack.extend(children.iter().rev().map(|c| (c.hash, Some(level - 1))))
                }
                Node::DirLeaf(_) => unreachable!("load_node checked the tree"),
            }
        }
        Ok(())
    }
}
