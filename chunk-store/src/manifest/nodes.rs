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
    /// Several nodes at once, where that saves round trips (a peer answers
    /// many ids per call): those returned, by id, unverified. Best effort:
    /// a node left out is asked for on its own when it is read. By default
    /// nothing is fetched ahead.
    fn get_many(&self, _hashes: &[Hash]) -> Result<Vec<(Hash, Vec<u8>)>, Error> {
        Ok(Vec::new())
    }
    /// A hint that these nodes will be read soon.
    fn prefetch(&self, _hashes: &[Hash]) {}
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

    /// Fetches the uncached ones of `hashes` in batches and keeps those
    /// that match their hash, while they fit the cache (a prefetch never
    /// evicts). A diff of a directory of 2,000 new small files made 2,000
    /// round trips for their recipes before; now about 8.
    fn prefetch(&self, hashes: &[Hash]) {
        let want: Vec<Hash> = {
            let c = self.cache.borrow();
            let mut seen = std::collections::HashSet::new();
            hashes
                .iter()
                .filter(|h| !c.0.contains_key(*h) && seen.insert(**h))
                .copied()
                .collect()
        };
        for batch in want.chunks(PREFETCH_BATCH) {
            let Ok(got) = self.inner.get_many(batch) else {
                return;
            };
            let mut c = self.cache.borrow_mut();
            for (h, b) in got {
                if !batch.contains(&h) || Hash::of(&b) != h {
                    continue;
                }
                if c.1 + b.len() > self.cap {
                    return;
                }
                c.1 += b.len();
                c.0.insert(h, b);
            }
        }
    }
}

/// Nodes asked for in one prefetch call (a peer answers up to 256 ids).
const PREFETCH_BATCH: usize = 256;

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
