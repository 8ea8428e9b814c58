//! Where nodes come from and go to: the source and sink traits, nodes in
//! memory, a bounded cache in front of a source, and `load_node`, which
//! verifies what a source returns.

use std::collections::HashMap;

use super::{Node, Tree};
use crate::Hash;
use crate::error::{Error, Origin};

/// Where nodes are read from: the local index, or a peer over the network.
/// The diff verifies every node it gets against its id, so a source may be
/// untrusted.
pub trait NodeSource {
    /// The encoded node with this id, or `None` if the source lacks it.
    fn get_node(&self, hash: &Hash) -> Result<Option<Vec<u8>>, Error>;
    /// Whom to blame for an invalid node.
    fn origin(&self) -> Origin;
}

impl std::fmt::Debug for dyn NodeSource + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeSource({})", self.origin())
    }
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
