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

use crate::Hash;

mod build;
mod codec;
mod diff;
mod nodes;
mod recipe;

pub use build::{build_dir, build_from_paths, build_recipe};
pub use codec::validate_name;
pub(crate) use codec::{decode_meta_exact, encode_meta};
pub use diff::{Change, ChangeKind, Diff, DiffLimits, diff, diff_limited, list};
pub use nodes::{CachedNodes, MemNodes, NodeSink, NodeSource, load_node};
pub use recipe::{RecipeReader, read_recipe, read_recipe_checked, recipe_node_ids};

/// Version byte at the start of every node.
pub const FORMAT_VERSION: u8 = 1;
/// No node, local or remote, may be larger. The builder cuts pages well
/// below it (see [`DIR_PAGE`](build::DIR_PAGE)), so only a hostile peer
/// reaches it.
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
}

#[cfg(test)]
mod tests;
