//! The canonical node encoding (format 1, see the `manifest` docs): encode
//! and paranoid decode of nodes, the entry metadata encoding the index
//! shares, and the checks on names and modes.

use super::{
    Child, ChunkEntry, DirEntry, EntryMeta, FORMAT_VERSION, HEADER_LEN, KIND_DIR_INDEX,
    KIND_DIR_LEAF, KIND_RECIPE_INDEX, KIND_RECIPE_LEAF, MAX_CHUNK_LEN, MAX_LEVEL, MAX_NAME_LEN,
    MAX_NODE_BYTES, MAX_NODE_ENTRIES, MAX_SYMLINK_TARGET, Mtime, Node, TYPE_DIR, TYPE_FILE,
    TYPE_SYMLINK, Tree,
};
use crate::Hash;

impl Node {
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

pub(super) fn encoded_dir_entry_len(e: &DirEntry) -> usize {
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
