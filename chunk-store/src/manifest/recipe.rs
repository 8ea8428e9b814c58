//! Reading recipes back: streamed and checked against the file's declared
//! size (a peer's), whole (the local index's), or just their node ids.

use std::collections::HashSet;

use super::nodes::{NodeSource, load_node};
use super::{ChunkEntry, MAX_LEVEL, Node, Tree};
use crate::Hash;
use crate::error::Error;

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
pub(super) fn recipe_node_ids_counted(
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
