//! Building trees: entries cut into pages at content-defined boundaries,
//! index levels over the pages, for directories and for recipes.

use std::collections::BTreeMap;

use super::codec::encoded_dir_entry_len;
use super::nodes::NodeSink;
use super::{Child, ChunkEntry, DirEntry, EntryMeta, Node, Tree};
use crate::Hash;
use crate::error::Error;

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
