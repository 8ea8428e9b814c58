//! Chunks of files this node is still receiving, served before the index
//! knows them.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chunk_store::Hash;
use chunk_store::manifest::ChunkEntry;

use super::ChunkSource;
use crate::locks::LockExt as _;

/// Chunks written to files this node is still receiving (or received since
/// the last index update): the open handle keeps reading the same inode
/// after the rename, so peers and later files can be served from it before
/// the index knows the file. Cleared once the directory is indexed again.
#[derive(Debug, Default)]
pub struct InFlight {
    chunks: Mutex<HashMap<Hash, Written>>,
}

/// Where a chunk was written: the file (by handle), offset and length.
type Written = (Arc<std::fs::File>, u64, u32);

impl InFlight {
    pub(super) fn add(&self, hash: Hash, file: &Arc<std::fs::File>, offset: u64, len: u32) {
        self.chunks
            .locked()
            .entry(hash)
            .or_insert_with(|| (file.clone(), offset, len));
    }

    /// Forgets everything (the index now records these files).
    pub fn clear(&self) {
        self.chunks.locked().clear();
    }

    /// The verified bytes of a chunk written here, if any.
    pub fn read_hash(&self, hash: &Hash) -> io::Result<Option<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        let Some((file, offset, len)) = self.chunks.locked().get(hash).cloned() else {
            return Ok(None);
        };
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)?;
        Ok((Hash::of(&buf) == *hash).then_some(buf))
    }
}

impl ChunkSource for InFlight {
    fn read_chunk(&self, chunk: &ChunkEntry) -> io::Result<Option<Bytes>> {
        Ok(self.read_hash(&chunk.hash)?.map(Bytes::from))
    }

    fn verified(&self) -> bool {
        true // read_hash checks
    }
}
