//! The consistency check of one directory's index: records, recipes,
//! chunk locations and the published tree agree.

use std::collections::HashMap;

use rocksdb::IteratorMode;

use super::{CF_CHUNKS, Store, decode_location};
use crate::Hash;
use crate::error::Error;
use crate::manifest::{self, EntryMeta};

/// What [`Store::check`] looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    pub records: u64,
    pub locations: u64,
    pub root: Option<Hash>,
}

impl Store {
    /// Verifies the invariants of one directory's index and returns a
    /// summary; the first violation is an [`Error::Inconsistent`]:
    ///
    /// - each file record's recipe is complete and adds up to its size;
    /// - each distinct chunk of a file has exactly its first location
    ///   recorded, and every recorded location points at a file record whose
    ///   recipe has that chunk there;
    /// - the published root's whole tree (directory nodes and recipes) is
    ///   present.
    pub fn check(&self, dir: &str) -> Result<CheckReport, Error> {
        let bad = |problem: String| Error::Inconsistent {
            dir: dir.to_string(),
            problem,
        };
        let records = self.file_records(dir)?;
        let mut expected: HashMap<(Hash, String), (u64, u32)> = HashMap::new();
        for (path, rec) in &records {
            if let EntryMeta::File { size, recipe, .. } = &rec.meta {
                let chunks = manifest::read_recipe(self, recipe)
                    .map_err(|e| bad(format!("{path}: recipe unreadable: {e}")))?;
                let mut offset = 0u64;
                for c in chunks {
                    expected
                        .entry((c.hash, path.clone()))
                        .or_insert((offset, c.len));
                    offset += u64::from(c.len);
                }
                if offset != *size {
                    return Err(bad(format!(
                        "{path}: recipe covers {offset} bytes, record says {size}"
                    )));
                }
            }
        }
        let mut locations = 0u64;
        for item in self.db.iterator_cf(self.cf(CF_CHUNKS), IteratorMode::Start) {
            let (k, v) = item.map_err(|e| Error::db("scan chunk locations", e))?;
            let (hash, loc) = decode_location(&k, &v)?;
            if loc.dir != dir {
                continue;
            }
            locations += 1;
            match expected.remove(&(hash, loc.path.clone())) {
                Some((offset, len)) if offset == loc.offset && len == loc.len => {}
                Some(want) if loc.partial => {
                    return Err(bad(format!(
                        "{}: partial location of {hash} over a complete file ({want:?})",
                        loc.path
                    )));
                }
                Some(want) => {
                    return Err(bad(format!(
                        "{}: chunk {hash} recorded at {}+{}, recipe has it at {}+{}",
                        loc.path, loc.offset, loc.len, want.0, want.1
                    )));
                }
                None if loc.partial => {}
                None => {
                    return Err(bad(format!(
                        "stale location: chunk {hash} in {} which no record holds",
                        loc.path
                    )));
                }
            }
        }
        if let Some(((hash, path), _)) = expected.into_iter().next() {
            return Err(bad(format!("{path}: chunk {hash} has no location")));
        }
        let root = self.root(dir)?;
        if let Some(r) = &root {
            let entries = manifest::list(self, &r.root)
                .map_err(|e| bad(format!("published root {}: {e}", r.root)))?;
            for (path, meta) in entries {
                if let EntryMeta::File { recipe, .. } = meta {
                    manifest::read_recipe(self, &recipe)
                        .map_err(|e| bad(format!("published {path}: {e}")))?;
                }
            }
        }
        Ok(CheckReport {
            records: records.len() as u64,
            locations,
            root: root.map(|r| r.root),
        })
    }
}
