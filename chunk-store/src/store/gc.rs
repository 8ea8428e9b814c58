//! Sweeping manifest nodes that no published root and no file record
//! reaches, once enough were written since the last sweep.

use std::collections::HashSet;

use rocksdb::{IteratorMode, WriteBatch};

use super::{CF_META, CF_NODES, Store};
use crate::Hash;
use crate::error::Error;
use crate::manifest::{self, EntryMeta};

/// Once this many bytes of manifest nodes were written since the last
/// collection, the next scan sweeps unreachable nodes. A sweep reads every
/// node key, so it is amortised over at least this much churn.
const GC_THRESHOLD_BYTES: u64 = 64 << 20;

impl Store {
    /// Deletes manifest nodes reachable from no published root and no file
    /// record, if enough were written since the last sweep (or `force`).
    /// Returns how many were deleted.
    pub fn collect_garbage(&self, force: bool) -> Result<u64, Error> {
        if !force && self.gc_pending()? < GC_THRESHOLD_BYTES {
            return Ok(0);
        }
        let mut live: HashSet<Hash> = HashSet::new();
        let mut recipes: HashSet<Hash> = HashSet::new();
        for (dir, rec) in self.roots()? {
            self.mark_dir_tree(&rec.root, &mut live, &mut recipes)?;
            for r in self.file_records(&dir)?.values() {
                if let EntryMeta::File { recipe, .. } = &r.meta {
                    recipes.insert(*recipe);
                }
            }
        }
        for r in &recipes {
            live.extend(manifest::recipe_node_ids(self, r)?);
        }
        let mut wb = WriteBatch::default();
        let mut deleted = 0;
        for item in self.db.iterator_cf(self.cf(CF_NODES), IteratorMode::Start) {
            let (k, _) = item.map_err(|e| Error::db("scan nodes", e))?;
            if !Hash::from_slice(&k).is_some_and(|h| live.contains(&h)) {
                wb.delete_cf(self.cf(CF_NODES), &k);
                deleted += 1;
            }
        }
        wb.put_cf(self.cf(CF_META), "gc-pending", 0u64.to_le_bytes());
        self.write(wb, false)?;
        tracing::debug!(deleted, live = live.len(), "swept manifest nodes");
        Ok(deleted)
    }

    /// Every manifest node of the version whose root is `root`: its
    /// directory tree and every file's recipe tree. A peer reading a
    /// directory's manifest may ask for these and no others (a node of
    /// another directory is not the way into it).
    pub fn version_nodes(&self, root: &Hash) -> Result<HashSet<Hash>, Error> {
        let mut live = HashSet::new();
        let mut recipes = HashSet::new();
        self.mark_dir_tree(root, &mut live, &mut recipes)?;
        for r in &recipes {
            live.extend(manifest::recipe_node_ids(self, r)?);
        }
        Ok(live)
    }

    /// Marks every directory node under `root` and collects file recipes.
    fn mark_dir_tree(
        &self,
        root: &Hash,
        live: &mut HashSet<Hash>,
        recipes: &mut HashSet<Hash>,
    ) -> Result<(), Error> {
        use manifest::{Node, Tree, load_node};
        let mut stack = vec![(*root, None)];
        while let Some((hash, level)) = stack.pop() {
            if !live.insert(hash) {
                continue;
            }
            match load_node(self, &hash, Tree::Dir, level)? {
                Node::DirLeaf(entries) => {
                    for e in entries {
                        match e.meta {
                            EntryMeta::File { recipe, .. } => {
                                recipes.insert(recipe);
                            }
                            EntryMeta::Dir { root, .. } => stack.push((root, None)),
                            EntryMeta::Symlink { .. } => {}
                        }
                    }
                }
                Node::Index {
                    level, children, ..
                } => stack.extend(children.iter().map(|c| (c.hash, Some(level - 1)))),
                Node::RecipeLeaf(_) => unreachable!("load_node checked the tree"),
            }
        }
        Ok(())
    }
}
