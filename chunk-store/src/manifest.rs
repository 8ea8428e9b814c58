//! Merkle manifests: one root hash for a directory version, and a diff that
//! only visits subtrees whose hashes differ.
//!
//! # Tree shape
//!
//! A directory is a tree of nodes; a file's content is a tree of nodes too
//! (its *recipe*: the list of chunks). Both are **paged**: entries are cut
//! into leaf pages at content-defined boundaries (an entry ends a page when
//! a hash of its key has its low bits zero, with a minimum and maximum page
//! size), and the pages are indexed by index nodes cut the same way, level
//! by level, until one node remains: the root. So:
//!
//! - no node grows with the tree: 1 M entries in one directory are ~8 k leaf
//!   pages under two index levels; a 100 GiB file is ~3 k recipe leaves;
//! - the shape depends only on the content, not on the history of edits
//!   (boundaries are a function of the entries), so the same content always
//!   gives the same root, and an insert only changes the pages around it;
//! - a sub-directory's entry carries the root of the sub-directory's tree,
//!   so trees nest exactly like the file system.
//!
//! # Node encoding (format 1)
//!
//! Fixed-width little-endian fields, no varints, so there is exactly one
//! encoding of each node and `encode(decode(bytes)) == bytes`. A node's id
//! is the BLAKE3 hash of its encoding.
//!
//! ```text
//! u8 format (=1) | u8 kind | u8 level | u32 count | count × entry
//! kind 1 dir leaf     entry: u16 name_len, name, u8 type, type-specific:
//!                       file    u32 mode, u64 size, i64 mtime_s, u32 mtime_ns, [32] recipe root
//!                       dir     u32 mode, [32] dir root
//!                       symlink u16 target_len, target
//! kind 2 dir index    entry: [32] child, u64 entries below
//! kind 3 recipe leaf  entry: [32] chunk hash, u32 chunk length
//! kind 4 recipe index entry: [32] child, u64 bytes below
//! ```
//!
//! Decoding is paranoid: a peer sends these. Size, count, level, names
//! (no `/`, `.`, `..`, NUL), sort order, modes and lengths are checked before
//! anything is trusted, and a node must hash to the id it was asked for.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::Hash;
use crate::error::{Error, Origin};

/// Version byte at the start of every node.
pub const FORMAT_VERSION: u8 = 1;
/// No node, local or remote, may be larger. The builder cuts pages well
/// below it (see [`DIR_PAGE`]), so only a hostile peer reaches it.
pub const MAX_NODE_BYTES: usize = 1 << 20;
/// Linux NAME_MAX.
pub const MAX_NAME_LEN: usize = 255;
/// Linux PATH_MAX; also bounds how deep a peer's tree may nest.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest symlink target we carry (PATH_MAX − 1).
pub const MAX_SYMLINK_TARGET: usize = 4095;
/// FastCDC's largest possible chunk; a recipe entry above it is forged.
pub const MAX_CHUNK_LEN: u32 = fastcdc::v2020::MAXIMUM_MAX as u32;
/// Names starting with this are the materializer's temp files: never
/// published by the indexer, refused in a peer's tree (a published one
/// would be deleted as a stale temp and restored on every apply).
pub const RESERVED_PREFIX: &str = ".syncd-tmp.";
/// Modification times accepted from a peer: 1901-12-13 (i32::MIN) to
/// 2514 (2^34 s). Outside that, Linux file systems clamp or refuse the
/// value, the replica's root can never match, and nothing real has one.
pub const MTIME_SECS: std::ops::Range<i64> = (i32::MIN as i64)..(1 << 34);
/// Hard cap on entries per node for the decoder (the builder stays below).
const MAX_NODE_ENTRIES: usize = 8192;
/// Index levels. Each index level at least halves the node count (min two
/// children per cut), so 2^40 entries would be needed to reach it.
const MAX_LEVEL: u8 = 40;
const HEADER_LEN: usize = 7;

const KIND_DIR_LEAF: u8 = 1;
const KIND_DIR_INDEX: u8 = 2;
const KIND_RECIPE_LEAF: u8 = 3;
const KIND_RECIPE_INDEX: u8 = 4;

const TYPE_FILE: u8 = 1;
const TYPE_DIR: u8 = 2;
const TYPE_SYMLINK: u8 = 3;

/// How a level of the tree is cut into pages.
#[derive(Clone, Copy, Debug)]
struct PageCut {
    /// An entry whose cut key has these bits zero ends a page: 1/(mask+1) of
    /// entries, so pages average about mask+1 entries.
    mask: u64,
    /// No content-defined cut before this many entries. At least 2, which
    /// guarantees every index level halves the node count (termination).
    min: usize,
    /// Forced cut at this many entries.
    max: usize,
    /// Forced cut before an entry that would push the page over this size.
    max_bytes: usize,
}

/// Directory leaves: ~128 entries (~10 KiB for typical names), so one
/// changed file rewrites ~10 KiB per level.
const DIR_PAGE: PageCut = PageCut {
    mask: 127,
    min: 8,
    max: 1024,
    max_bytes: 256 << 10,
};
/// Recipe leaves: ~512 chunks × 36 B ≈ 18 KiB, i.e. ~32 MiB of file per leaf.
const RECIPE_PAGE: PageCut = PageCut {
    mask: 511,
    min: 16,
    max: 4096,
    max_bytes: 256 << 10,
};
/// Index nodes of both trees: ~128 children × 40 B ≈ 5 KiB.
const INDEX_PAGE: PageCut = PageCut {
    mask: 127,
    min: 2,
    max: 1024,
    max_bytes: 256 << 10,
};

/// Modification time, as stored and restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mtime {
    pub secs: i64,
    pub nanos: u32,
}

/// What a directory entry is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EntryMeta {
    /// A regular file; `recipe` is the root of its chunk-list tree.
    File {
        mode: u32,
        size: u64,
        mtime: Mtime,
        recipe: Hash,
    },
    /// A directory; `root` is the root of its own tree. Directory mtimes are
    /// not part of the manifest: they change whenever a child does, on every
    /// node differently, and would make equal trees hash differently.
    Dir { mode: u32, root: Hash },
    /// A symbolic link; created as a link on replicas, never followed.
    Symlink { target: String },
}

impl EntryMeta {
    pub fn kind_name(&self) -> &'static str {
        match self {
            EntryMeta::File { .. } => "file",
            EntryMeta::Dir { .. } => "dir",
            EntryMeta::Symlink { .. } => "symlink",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DirEntry {
    pub name: String,
    pub meta: EntryMeta,
}

/// One chunk of a recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkEntry {
    pub hash: Hash,
    pub len: u32,
}

/// A child pointer of an index node, with the size of what lies below it
/// (entries for directory trees, bytes for recipes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Child {
    pub hash: Hash,
    pub below: u64,
}

/// Which kind of tree a node belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tree {
    Dir,
    Recipe,
}

/// A decoded node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    DirLeaf(Vec<DirEntry>),
    RecipeLeaf(Vec<ChunkEntry>),
    Index {
        tree: Tree,
        level: u8,
        children: Vec<Child>,
    },
}

impl Node {
    pub fn tree(&self) -> Tree {
        match self {
            Node::DirLeaf(_) => Tree::Dir,
            Node::RecipeLeaf(_) => Tree::Recipe,
            Node::Index { tree, .. } => *tree,
        }
    }

    pub fn level(&self) -> u8 {
        match self {
            Node::Index { level, .. } => *level,
            _ => 0,
        }
    }

    /// Canonical encoding (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let (kind, count) = match self {
            Node::DirLeaf(e) => (KIND_DIR_LEAF, e.len()),
            Node::RecipeLeaf(c) => (KIND_RECIPE_LEAF, c.len()),
            Node::Index {
                tree: Tree::Dir,
                children,
                ..
            } => (KIND_DIR_INDEX, children.len()),
            Node::Index {
                tree: Tree::Recipe,
                children,
                ..
            } => (KIND_RECIPE_INDEX, children.len()),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + count * 48);
        out.push(FORMAT_VERSION);
        out.push(kind);
        out.push(self.level());
        out.extend_from_slice(&(count as u32).to_le_bytes());
        match self {
            Node::DirLeaf(entries) => entries.iter().for_each(|e| encode_dir_entry(e, &mut out)),
            Node::RecipeLeaf(chunks) => {
                for c in chunks {
                    out.extend_from_slice(c.hash.as_bytes());
                    out.extend_from_slice(&c.len.to_le_bytes());
                }
            }
            Node::Index { children, .. } => {
                for c in children {
                    out.extend_from_slice(c.hash.as_bytes());
                    out.extend_from_slice(&c.below.to_le_bytes());
                }
            }
        }
        out
    }

    /// Decodes and validates. `Err` carries a human reason; callers wrap it
    /// with the node id and its origin.
    pub fn decode(bytes: &[u8]) -> Result<Node, String> {
        if bytes.len() > MAX_NODE_BYTES {
            return Err(format!(
                "{} bytes exceeds the {MAX_NODE_BYTES}-byte node limit",
                bytes.len()
            ));
        }
        let mut r = Reader { buf: bytes, pos: 0 };
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(format!("unknown node format {version}"));
        }
        let kind = r.u8()?;
        let level = r.u8()?;
        let count = r.u32()? as usize;
        if count > MAX_NODE_ENTRIES {
            return Err(format!(
                "{count} entries exceeds the {MAX_NODE_ENTRIES}-entry limit"
            ));
        }
        let is_index = matches!(kind, KIND_DIR_INDEX | KIND_RECIPE_INDEX);
        if is_index && !(1..=MAX_LEVEL).contains(&level) {
            return Err(format!("index node at level {level}"));
        }
        if !is_index && level != 0 {
            return Err(format!("leaf node at level {level}"));
        }
        if is_index && count == 0 {
            return Err("index node without children".into());
        }
        let node = match kind {
            KIND_DIR_LEAF => {
                let mut entries: Vec<DirEntry> = Vec::with_capacity(count.min(1024));
                for _ in 0..count {
                    let e = decode_dir_entry(&mut r)?;
                    if let Some(prev) = entries.last()
                        && prev.name.as_bytes() >= e.name.as_bytes()
                    {
                        return Err(format!(
                            "entries not strictly sorted: {:?} then {:?}",
                            prev.name, e.name
                        ));
                    }
                    entries.push(e);
                }
                Node::DirLeaf(entries)
            }
            KIND_RECIPE_LEAF => {
                let mut chunks = Vec::with_capacity(count);
                for _ in 0..count {
                    let hash = r.hash()?;
                    let len = r.u32()?;
                    if len == 0 || len > MAX_CHUNK_LEN {
                        return Err(format!("chunk length {len} outside 1..={MAX_CHUNK_LEN}"));
                    }
                    chunks.push(ChunkEntry { hash, len });
                }
                Node::RecipeLeaf(chunks)
            }
            KIND_DIR_INDEX | KIND_RECIPE_INDEX => {
                let mut children = Vec::with_capacity(count);
                for _ in 0..count {
                    let hash = r.hash()?;
                    let below = r.u64()?;
                    children.push(Child { hash, below });
                }
                let tree = if kind == KIND_DIR_INDEX {
                    Tree::Dir
                } else {
                    Tree::Recipe
                };
                Node::Index {
                    tree,
                    level,
                    children,
                }
            }
            other => return Err(format!("unknown node kind {other}")),
        };
        if r.pos != bytes.len() {
            return Err(format!("{} trailing bytes", bytes.len() - r.pos));
        }
        Ok(node)
    }
}

/// Checks one path component as a peer or the file system gave it.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name of {} bytes exceeds {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("name {name:?} is not allowed"));
    }
    if name.bytes().any(|b| b == b'/' || b == 0) {
        return Err(format!("name {name:?} contains '/' or NUL"));
    }
    Ok(())
}

fn validate_mode(mode: u32) -> Result<(), String> {
    if mode & !0o7777 != 0 {
        return Err(format!("mode {mode:o} has bits outside 0o7777"));
    }
    Ok(())
}

fn encode_dir_entry(e: &DirEntry, out: &mut Vec<u8>) {
    out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
    out.extend_from_slice(e.name.as_bytes());
    encode_meta(&e.meta, out);
}

/// The entry encoding without its name; the index stores it as the value of
/// a file record, so both places share one format.
pub(crate) fn encode_meta(meta: &EntryMeta, out: &mut Vec<u8>) {
    match meta {
        EntryMeta::File {
            mode,
            size,
            mtime,
            recipe,
        } => {
            out.push(TYPE_FILE);
            out.extend_from_slice(&mode.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&mtime.secs.to_le_bytes());
            out.extend_from_slice(&mtime.nanos.to_le_bytes());
            out.extend_from_slice(recipe.as_bytes());
        }
        EntryMeta::Dir { mode, root } => {
            out.push(TYPE_DIR);
            out.extend_from_slice(&mode.to_le_bytes());
            out.extend_from_slice(root.as_bytes());
        }
        EntryMeta::Symlink { target } => {
            out.push(TYPE_SYMLINK);
            out.extend_from_slice(&(target.len() as u16).to_le_bytes());
            out.extend_from_slice(target.as_bytes());
        }
    }
}

/// Inverse of [`encode_meta`] over a whole buffer.
pub(crate) fn decode_meta_exact(bytes: &[u8]) -> Result<EntryMeta, String> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let meta = decode_meta(&mut r, "")?;
    if r.pos != bytes.len() {
        return Err(format!("{} trailing bytes", bytes.len() - r.pos));
    }
    Ok(meta)
}

fn encoded_dir_entry_len(e: &DirEntry) -> usize {
    2 + e.name.len()
        + 1
        + match &e.meta {
            EntryMeta::File { .. } => 4 + 8 + 8 + 4 + 32,
            EntryMeta::Dir { .. } => 4 + 32,
            EntryMeta::Symlink { target } => 2 + target.len(),
        }
}

fn decode_dir_entry(r: &mut Reader<'_>) -> Result<DirEntry, String> {
    let name_len = r.u16()? as usize;
    let name = r.string(name_len)?;
    validate_name(&name)?;
    let meta = decode_meta(r, &name)?;
    Ok(DirEntry { name, meta })
}

fn decode_meta(r: &mut Reader<'_>, name: &str) -> Result<EntryMeta, String> {
    Ok(match r.u8()? {
        TYPE_FILE => {
            let mode = r.u32()?;
            validate_mode(mode)?;
            let size = r.u64()?;
            let secs = r.i64()?;
            let nanos = r.u32()?;
            if nanos >= 1_000_000_000 {
                return Err(format!("{name:?}: mtime nanoseconds {nanos} out of range"));
            }
            let recipe = r.hash()?;
            EntryMeta::File {
                mode,
                size,
                mtime: Mtime { secs, nanos },
                recipe,
            }
        }
        TYPE_DIR => {
            let mode = r.u32()?;
            validate_mode(mode)?;
            EntryMeta::Dir {
                mode,
                root: r.hash()?,
            }
        }
        TYPE_SYMLINK => {
            let len = r.u16()? as usize;
            if len == 0 || len > MAX_SYMLINK_TARGET {
                return Err(format!("{name:?}: symlink target length {len}"));
            }
            let target = r.string(len)?;
            if target.contains('\0') {
                return Err(format!("{name:?}: symlink target contains NUL"));
            }
            EntryMeta::Symlink { target }
        }
        other => return Err(format!("{name:?}: unknown entry type {other}")),
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("truncated at byte {}", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn hash(&mut self) -> Result<Hash, String> {
        Ok(Hash(self.take(32)?.try_into().unwrap()))
    }
    fn string(&mut self, n: usize) -> Result<String, String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "name is not UTF-8".to_string())
    }
}

// ---------------------------------------------------------------------------
// Sources and sinks of nodes.

/// Where nodes are read from: the local index, or a peer over the network.
/// The diff verifies every node it gets against its id, so a source may be
/// untrusted.
pub trait NodeSource {
    /// The encoded node with this id, or `None` if the source lacks it.
    fn get_node(&self, hash: &Hash) -> Result<Option<Vec<u8>>, Error>;
    /// Whom to blame for an invalid node.
    fn origin(&self) -> Origin;
}

/// Where the builder puts new nodes.
pub trait NodeSink {
    fn put_node(&mut self, hash: Hash, encoded: Vec<u8>) -> Result<(), Error>;
}

/// Nodes in memory: the test double for both sides of a diff, and a staging
/// area for nodes before they are written in one batch.
#[derive(Debug, Default, Clone)]
pub struct MemNodes {
    pub nodes: HashMap<Hash, Vec<u8>>,
    pub origin: Option<Origin>,
}

impl NodeSource for MemNodes {
    fn get_node(&self, hash: &Hash) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.nodes.get(hash).cloned())
    }
    fn origin(&self) -> Origin {
        self.origin.unwrap_or(Origin::Local)
    }
}

impl NodeSink for MemNodes {
    fn put_node(&mut self, hash: Hash, encoded: Vec<u8>) -> Result<(), Error> {
        self.nodes.insert(hash, encoded);
        Ok(())
    }
}

/// A node source that remembers what it fetched, so a tree whose pages
/// repeat (it is a DAG: identical sub-directories or recipe pages) costs one
/// fetch per distinct node, not one per reference. Bounded: past `cap`
/// bytes it starts over (nodes are verified by hash on every load, so a
/// cached copy is as good as a fresh one).
#[derive(Debug)]
pub struct CachedNodes<'a, S: NodeSource + ?Sized> {
    inner: &'a S,
    cache: std::cell::RefCell<(HashMap<Hash, Vec<u8>>, usize)>,
    cap: usize,
    fetched: std::cell::Cell<u64>,
}

impl<'a, S: NodeSource + ?Sized> CachedNodes<'a, S> {
    pub fn new(inner: &'a S, cap: usize) -> Self {
        CachedNodes {
            inner,
            cache: Default::default(),
            cap,
            fetched: Default::default(),
        }
    }

    /// Nodes fetched from the inner source.
    pub fn fetched(&self) -> u64 {
        self.fetched.get()
    }
}

impl<S: NodeSource + ?Sized> NodeSource for CachedNodes<'_, S> {
    fn get_node(&self, hash: &Hash) -> Result<Option<Vec<u8>>, Error> {
        if let Some(b) = self.cache.borrow().0.get(hash) {
            return Ok(Some(b.clone()));
        }
        self.fetched.set(self.fetched.get() + 1);
        let got = self.inner.get_node(hash)?;
        if let Some(b) = &got {
            let mut c = self.cache.borrow_mut();
            if c.1 + b.len() > self.cap {
                c.0.clear();
                c.1 = 0;
            }
            c.1 += b.len();
            c.0.insert(*hash, b.clone());
        }
        Ok(got)
    }

    fn origin(&self) -> Origin {
        self.inner.origin()
    }
}

/// Fetches, verifies and decodes one node; `level` is checked when the
/// parent told us what it must be.
pub fn load_node(
    src: &dyn NodeSource,
    hash: &Hash,
    tree: Tree,
    level: Option<u8>,
) -> Result<Node, Error> {
    let origin = src.origin();
    let bytes = src.get_node(hash)?.ok_or(Error::MissingNode {
        hash: *hash,
        origin,
    })?;
    let invalid = |reason: String| Error::InvalidNode {
        hash: *hash,
        origin,
        reason,
    };
    if Hash::of(&bytes) != *hash {
        return Err(invalid("content does not match its hash".into()));
    }
    let node = Node::decode(&bytes).map_err(invalid)?;
    if node.tree() != tree {
        return Err(invalid(format!(
            "expected a {tree:?} node, got {:?}",
            node.tree()
        )));
    }
    if let Some(level) = level
        && node.level() != level
    {
        return Err(invalid(format!(
            "expected level {level}, got level {}",
            node.level()
        )));
    }
    Ok(node)
}

// ---------------------------------------------------------------------------
// Building.

fn cut_pages<T>(
    items: Vec<T>,
    cut: PageCut,
    key: impl Fn(&T) -> u64,
    size: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let mut pages = Vec::new();
    let mut page = Vec::new();
    let mut bytes = 0;
    for item in items {
        let s = size(&item);
        if !page.is_empty() && bytes + s > cut.max_bytes {
            pages.push(std::mem::take(&mut page));
            bytes = 0;
        }
        let boundary = key(&item) & cut.mask == 0;
        page.push(item);
        bytes += s;
        if page.len() >= cut.max || (page.len() >= cut.min && boundary) {
            pages.push(std::mem::take(&mut page));
            bytes = 0;
        }
    }
    if !page.is_empty() || pages.is_empty() {
        pages.push(page);
    }
    pages
}

fn emit(node: Node, sink: &mut dyn NodeSink) -> Result<Hash, Error> {
    let bytes = node.encode();
    let hash = Hash::of(&bytes);
    sink.put_node(hash, bytes)?;
    Ok(hash)
}

/// Builds index levels over `children` until a single root remains.
fn build_index(
    tree: Tree,
    mut children: Vec<Child>,
    sink: &mut dyn NodeSink,
) -> Result<Hash, Error> {
    let mut level = 0u8;
    while children.len() > 1 {
        level += 1;
        let pages = cut_pages(children, INDEX_PAGE, |c| c.hash.low_u64(), |_| 40);
        children = pages
            .into_iter()
            .map(|page| {
                let below = page.iter().map(|c| c.below).sum();
                let hash = emit(
                    Node::Index {
                        tree,
                        level,
                        children: page,
                    },
                    sink,
                )?;
                Ok(Child { hash, below })
            })
            .collect::<Result<_, Error>>()?;
    }
    Ok(children[0].hash)
}

/// Builds the tree of one directory from its entries (sorted by name,
/// names unique) and returns its root. Sub-directory entries must already
/// carry their own roots.
pub fn build_dir(entries: Vec<DirEntry>, sink: &mut dyn NodeSink) -> Result<Hash, Error> {
    debug_assert!(entries.windows(2).all(|w| w[0].name < w[1].name));
    // The cut key is a hash of the name only, so a file's content changing
    // never moves page boundaries.
    let pages = cut_pages(
        entries,
        DIR_PAGE,
        |e| Hash::of(e.name.as_bytes()).low_u64(),
        encoded_dir_entry_len,
    );
    let children = pages
        .into_iter()
        .map(|page| {
            let below = page.len() as u64;
            Ok(Child {
                hash: emit(Node::DirLeaf(page), sink)?,
                below,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    build_index(Tree::Dir, children, sink)
}

/// Builds a file's recipe tree from its chunks in order and returns its root.
pub fn build_recipe(chunks: Vec<ChunkEntry>, sink: &mut dyn NodeSink) -> Result<Hash, Error> {
    let pages = cut_pages(chunks, RECIPE_PAGE, |c| c.hash.low_u64(), |_| 36);
    let children = pages
        .into_iter()
        .map(|page| {
            let below = page.iter().map(|c| u64::from(c.len)).sum();
            Ok(Child {
                hash: emit(Node::RecipeLeaf(page), sink)?,
                below,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    build_index(Tree::Recipe, children, sink)
}

/// Builds a whole tree from `(relative path, meta)` pairs, creating missing
/// parent directories with mode 0755. `Dir` roots in the input are ignored
/// (they are computed). Used by tests, benchmarks and tools; the indexer
/// builds directory by directory as it walks.
pub fn build_from_paths(
    entries: impl IntoIterator<Item = (String, EntryMeta)>,
    sink: &mut dyn NodeSink,
) -> Result<Hash, Error> {
    #[derive(Default)]
    struct DirBuild {
        mode: u32,
        children: BTreeMap<String, Slot>,
    }
    enum Slot {
        Leaf(EntryMeta),
        Dir(DirBuild),
    }
    fn finish(d: DirBuild, sink: &mut dyn NodeSink) -> Result<Hash, Error> {
        let mut entries = Vec::with_capacity(d.children.len());
        for (name, slot) in d.children {
            let meta = match slot {
                Slot::Leaf(m) => m,
                Slot::Dir(sub) => {
                    let mode = sub.mode;
                    EntryMeta::Dir {
                        mode,
                        root: finish(sub, sink)?,
                    }
                }
            };
            entries.push(DirEntry { name, meta });
        }
        build_dir(entries, sink)
    }
    let mut top = DirBuild::default();
    for (path, meta) in entries {
        let mut dir = &mut top;
        let mut parts = path.split('/').peekable();
        while let Some(name) = parts.next() {
            let last = parts.peek().is_none();
            if last && !matches!(meta, EntryMeta::Dir { .. }) {
                dir.children.insert(name.to_string(), Slot::Leaf(meta));
                break;
            }
            let slot = dir.children.entry(name.to_string()).or_insert_with(|| {
                Slot::Dir(DirBuild {
                    mode: 0o755,
                    children: BTreeMap::new(),
                })
            });
            if matches!(slot, Slot::Leaf(_)) {
                *slot = Slot::Dir(DirBuild {
                    mode: 0o755,
                    children: BTreeMap::new(),
                });
            }
            let Slot::Dir(d) = slot else { unreachable!() };
            if last && let EntryMeta::Dir { mode, .. } = meta {
                d.mode = mode;
                break;
            }
            dir = d;
        }
    }
    finish(top, sink)
}

/// Streams the recipe of a file a peer described as `size` bytes, chunk by
/// chunk, checking as it goes that it is one a chunker could have cut:
/// chunks cover exactly `size` bytes, every chunk but the last is at least
/// `min_chunk` long, no page is empty (but an empty file's), and the tree
/// has no more nodes than that many chunks need. So a recipe reusing one
/// page a million times fails after `size` bytes, one of empty pages fails
/// at once, and nothing is held but the path to the current page.
pub fn read_recipe_checked<'a>(
    src: &'a dyn NodeSource,
    root: &Hash,
    size: u64,
    min_chunk: u32,
) -> RecipeReader<'a> {
    let max_chunks = size / u64::from(min_chunk.max(1)) + 1;
    RecipeReader {
        src,
        root: *root,
        size,
        min_chunk,
        stack: vec![(*root, None)],
        leaf: Vec::new().into_iter(),
        total: 0,
        prev_len: None,
        nodes: 0,
        // Every page holds a chunk, and an index node at least one child:
        // an honest tree has fewer index nodes than leaves, plus its depth.
        max_nodes: max_chunks
            .saturating_mul(2)
            .saturating_add(u64::from(MAX_LEVEL) + 1),
        done: false,
    }
}

/// See [`read_recipe_checked`]. Yields chunks in file order; an `Err` ends
/// the stream.
#[derive(Debug)]
pub struct RecipeReader<'a> {
    src: &'a dyn NodeSource,
    root: Hash,
    size: u64,
    min_chunk: u32,
    stack: Vec<(Hash, Option<u8>)>,
    leaf: std::vec::IntoIter<ChunkEntry>,
    total: u64,
    prev_len: Option<u32>,
    nodes: u64,
    max_nodes: u64,
    done: bool,
}

impl std::fmt::Debug for dyn NodeSource + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeSource({})", self.origin())
    }
}

impl RecipeReader<'_> {
    fn invalid(&self, reason: String) -> Error {
        Error::InvalidTree {
            origin: self.src.origin(),
            reason: format!("recipe {}: {reason}", self.root),
        }
    }

    fn step(&mut self) -> Result<Option<ChunkEntry>, Error> {
        loop {
            if let Some(c) = self.leaf.next() {
                if let Some(prev) = self.prev_len
                    && prev < self.min_chunk
                {
                    return Err(self.invalid(format!(
                        "a chunk of {prev} bytes before the end (minimum {})",
                        self.min_chunk
                    )));
                }
                self.total += u64::from(c.len);
                if self.total > self.size {
                    return Err(
                        self.invalid(format!("covers more than the file's {} bytes", self.size))
                    );
                }
                self.prev_len = Some(c.len);
                return Ok(Some(c));
            }
            let Some((hash, level)) = self.stack.pop() else {
                if self.total != self.size {
                    return Err(self.invalid(format!(
                        "covers {} bytes but the file has {}",
                        self.total, self.size
                    )));
                }
                return Ok(None);
            };
            self.nodes += 1;
            if self.nodes > self.max_nodes {
                return Err(self.invalid(format!(
                    "more than {} pages for a file of {} bytes",
                    self.max_nodes, self.size
                )));
            }
            match load_node(self.src, &hash, Tree::Recipe, level)? {
                Node::RecipeLeaf(chunks) => {
                    if chunks.is_empty() && !(hash == self.root && self.size == 0) {
                        return Err(self.invalid("an empty page".into()));
                    }
                    self.leaf = chunks.into_iter();
                }
                Node::Index {
                    level, children, ..
                } => self
                    .stack
                    .extend(children.iter().rev().map(|c| (c.hash, Some(level - 1)))),
                Node::DirLeaf(_) => unreachable!("load_node checked the tree"),
            }
        }
    }
}

impl Iterator for RecipeReader<'_> {
    type Item = Result<ChunkEntry, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.step();
        if !matches!(r, Ok(Some(_))) {
            self.done = true;
        }
        r.transpose()
    }
}

/// Reads a whole recipe, in order (trusted sources: the local index).
pub fn read_recipe(src: &dyn NodeSource, root: &Hash) -> Result<Vec<ChunkEntry>, Error> {
    let mut out = Vec::new();
    let mut stack = vec![(*root, None)];
    while let Some((hash, level)) = stack.pop() {
        match load_node(src, &hash, Tree::Recipe, level)? {
            Node::RecipeLeaf(chunks) => out.extend(chunks),
            Node::Index {
                level, children, ..
            } => stack.extend(children.iter().rev().map(|c| (c.hash, Some(level - 1)))),
            Node::DirLeaf(_) => unreachable!("load_node checked the tree"),
        }
    }
    Ok(out)
}

/// Ids of every node of a recipe tree, found by reading only its index
/// nodes (their children lists name the leaves).
pub fn recipe_node_ids(src: &dyn NodeSource, root: &Hash) -> Result<HashSet<Hash>, Error> {
    recipe_node_ids_counted(src, root, &mut 0)
}

/// [`recipe_node_ids`], adding the number of nodes read to `visited`.
fn recipe_node_ids_counted(
    src: &dyn NodeSource,
    root: &Hash,
    visited: &mut u64,
) -> Result<HashSet<Hash>, Error> {
    let mut ids = HashSet::from([*root]);
    let mut stack = vec![(*root, None)];
    while let Some((hash, level)) = stack.pop() {
        *visited += 1;
        if let Node::Index {
            level, children, ..
        } = load_node(src, &hash, Tree::Recipe, level)?
        {
            for c in children {
                ids.insert(c.hash);
                if level > 1 {
                    stack.push((c.hash, Some(level - 1)));
                }
            }
        }
    }
    Ok(ids)
}

// ---------------------------------------------------------------------------
// Diff.

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
                    rc.expand(&mut self.out.nodes_visited, &mut self.budget)?;
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
                } => stack.extend(children.iter().rev().map(|c| (c.hash, Some(level - 1)))),
                Node::DirLeaf(_) => unreachable!("load_node checked the tree"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
