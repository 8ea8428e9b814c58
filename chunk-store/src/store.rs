//! The RocksDB index: metadata about the synced files, never their content.
//!
//! # Column families
//!
//! | family  | key                                   | value                                      |
//! |---------|---------------------------------------|--------------------------------------------|
//! | `files` | dir id, NUL, relative path            | u8 version, u64 inode, dev, chunks, entry |
//! | `chunks`| chunk hash (32), dir id, NUL, path     | u64 offset, u32 length, u8 state           |
//! | `nodes` | node hash (32)                        | canonical node encoding                    |
//! | `meta`  | `format`, `chunker`, `root/<dir id>`, `gc-pending` | see below                     |
//!
//! The files on disk are the data: `chunks` says where each chunk's bytes
//! can be read (one location per distinct chunk per file; `state` marks
//! files still being received, which peers may already serve from).
//! Paths and dir ids never contain NUL, so the separator is unambiguous, and
//! a prefix scan on a hash finds every location of a chunk.
//!
//! Every change that spans families (a file record, its recipe nodes, its
//! chunk locations) goes into one [`Batch`], which RocksDB commits as one
//! WAL record: after a crash either all of it is there or none.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DB, DBCompressionType, Direction, IteratorMode,
    Options, WriteBatch, WriteOptions,
};

use crate::error::{Error, Origin};
use crate::manifest::{self, EntryMeta, NodeSink, NodeSource};
use crate::{ChunkerConfig, Hash};

mod check;
mod gc;

pub use check::CheckReport;

const CF_FILES: &str = "files";
const CF_CHUNKS: &str = "chunks";
const CF_NODES: &str = "nodes";
const CF_META: &str = "meta";

const FORMAT: &str = "syncd-index-1";
const RECORD_VERSION: u8 = 1;
const MAX_DIR_ID: usize = 128;

/// A file, directory or symlink as last seen on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    pub meta: EntryMeta,
    /// With `dev`, tells a file replaced by another (rename over it) from
    /// the same file, where size and mtime alone might match.
    pub inode: u64,
    pub dev: u64,
    /// Number of chunks (0 for directories and symlinks), kept so a rescan
    /// can report totals without reading recipes.
    pub chunks: u64,
}

/// The published state of a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootRecord {
    pub root: Hash,
    /// Goes up by one each time the root changes.
    pub version: u64,
    pub files: u64,
    pub bytes: u64,
    pub chunks: u64,
}

/// Where a chunk's bytes can be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    pub dir: String,
    pub path: String,
    pub offset: u64,
    pub len: u32,
    /// The file is still being received: the chunk is verified and written
    /// but the file is not complete yet.
    pub partial: bool,
}

/// The index of one node.
#[derive(Debug)]
pub struct Store {
    db: DB,
    path: PathBuf,
    chunker: ChunkerConfig,
}

/// Checks a directory id before it becomes part of a key.
pub fn validate_dir_id(id: &str) -> Result<(), Error> {
    let bad = |reason| {
        Err(Error::InvalidDirId {
            id: id.to_string(),
            reason,
        })
    };
    if id.is_empty() {
        return bad("empty");
    }
    if id.len() > MAX_DIR_ID {
        return bad("longer than 128 bytes");
    }
    if id.contains('\0') {
        return bad("contains NUL");
    }
    Ok(())
}

fn file_key(dir: &str, path: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(dir.len() + 1 + path.len());
    k.extend_from_slice(dir.as_bytes());
    k.push(0);
    k.extend_from_slice(path.as_bytes());
    k
}

fn location_key(hash: &Hash, dir: &str, path: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(32 + dir.len() + 1 + path.len());
    k.extend_from_slice(hash.as_bytes());
    k.extend_from_slice(&file_key(dir, path));
    k
}

fn root_key(dir: &str) -> Vec<u8> {
    format!("root/{dir}").into_bytes()
}

fn chunker_value(c: &ChunkerConfig) -> String {
    format!("fastcdc-v2020 {}/{}/{}", c.min(), c.avg(), c.max())
}

impl FileRecord {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        v.push(RECORD_VERSION);
        v.extend_from_slice(&self.inode.to_le_bytes());
        v.extend_from_slice(&self.dev.to_le_bytes());
        v.extend_from_slice(&self.chunks.to_le_bytes());
        manifest::encode_meta(&self.meta, &mut v);
        v
    }

    fn decode(key: &[u8], v: &[u8]) -> Result<FileRecord, Error> {
        let corrupt = |reason: String| Error::CorruptRecord {
            key: String::from_utf8_lossy(key).replace('\0', "/"),
            reason,
        };
        if v.len() < 25 || v[0] != RECORD_VERSION {
            return Err(corrupt("bad header".into()));
        }
        Ok(FileRecord {
            inode: u64::from_le_bytes(v[1..9].try_into().unwrap()),
            dev: u64::from_le_bytes(v[9..17].try_into().unwrap()),
            chunks: u64::from_le_bytes(v[17..25].try_into().unwrap()),
            meta: manifest::decode_meta_exact(&v[25..]).map_err(corrupt)?,
        })
    }
}

impl RootRecord {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(self.root.as_bytes());
        for n in [self.version, self.files, self.bytes, self.chunks] {
            v.extend_from_slice(&n.to_le_bytes());
        }
        v
    }

    fn decode(v: &[u8]) -> Option<RootRecord> {
        if v.len() != 64 {
            return None;
        }
        let n = |i: usize| u64::from_le_bytes(v[32 + 8 * i..40 + 8 * i].try_into().unwrap());
        Some(RootRecord {
            root: Hash::from_slice(&v[..32])?,
            version: n(0),
            files: n(1),
            bytes: n(2),
            chunks: n(3),
        })
    }
}

impl Store {
    /// Opens (or creates) the index at `path`. Refuses an index made by
    /// another format or with other chunk sizes: mixing cut points would
    /// silently defeat dedup across the fleet.
    pub fn open(path: &Path, chunker: ChunkerConfig) -> Result<Store, Error> {
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Writers are few (one scan at a time); background work may use both cores.
        opts.increase_parallelism(2);
        let cf = |name: &str, compression, bloom: bool| {
            let mut o = Options::default();
            o.set_compression_type(compression);
            if bloom {
                // Point lookups ("do we have this node/chunk?") mostly miss
                // on first scans; a bloom filter answers those from memory.
                let mut b = BlockBasedOptions::default();
                b.set_bloom_filter(10.0, false);
                o.set_block_based_table_factory(&b);
            }
            ColumnFamilyDescriptor::new(name, o)
        };
        let cfs = vec![
            cf(CF_FILES, DBCompressionType::Lz4, false),
            // Hashes do not compress.
            cf(CF_CHUNKS, DBCompressionType::None, true),
            cf(CF_NODES, DBCompressionType::None, true),
            cf(CF_META, DBCompressionType::None, false),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs)
            .map_err(|e| Error::db(format!("open {}", path.display()), e))?;
        let store = Store {
            db,
            path: path.to_path_buf(),
            chunker,
        };
        store.check_identity()?;
        Ok(store)
    }

    fn check_identity(&self) -> Result<(), Error> {
        let meta = self.cf(CF_META);
        let want = chunker_value(&self.chunker);
        let get = |k: &str| {
            self.db
                .get_cf(meta, k)
                .map_err(|e| Error::db("read meta", e))
                .map(|v| v.map(|v| String::from_utf8_lossy(&v).into_owned()))
        };
        match (get("format")?, get("chunker")?) {
            (None, None) => {
                let mut wb = WriteBatch::default();
                wb.put_cf(meta, "format", FORMAT);
                wb.put_cf(meta, "chunker", &want);
                self.write(wb, true)
            }
            (Some(f), _) if f != FORMAT => Err(Error::IndexFormat {
                path: self.path.clone(),
                found: f,
                expected: FORMAT,
            }),
            (_, Some(c)) if c != want => Err(Error::ChunkerMismatch {
                path: self.path.clone(),
                stored: c,
                configured: want,
            }),
            _ => Ok(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn chunker(&self) -> ChunkerConfig {
        self.chunker
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// Writes memtables and the WAL to disk (at shutdown: the next start
    /// then replays nothing).
    pub fn flush(&self) -> Result<(), Error> {
        self.db
            .flush_wal(true)
            .map_err(|e| Error::db("flush the WAL", e))?;
        for cf in [CF_FILES, CF_CHUNKS, CF_NODES, CF_META] {
            self.db
                .flush_cf(self.cf(cf))
                .map_err(|e| Error::db(format!("flush {cf}"), e))?;
        }
        Ok(())
    }

    fn write(&self, wb: WriteBatch, sync: bool) -> Result<(), Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db
            .write_opt(wb, &wo)
            .map_err(|e| Error::db(format!("write batch to {}", self.path.display()), e))
    }

    /// A new empty batch against this store.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            wb: WriteBatch::default(),
            node_bytes: 0,
        }
    }

    /// Commits a batch atomically. `sync` makes it durable against power
    /// loss (fsync of the WAL); without it a process crash still keeps it.
    pub fn commit(&self, batch: Batch<'_>, sync: bool) -> Result<(), Error> {
        let Batch { wb, node_bytes, .. } = batch;
        if node_bytes > 0 {
            let pending = self.gc_pending()? + node_bytes;
            let mut wb = wb;
            wb.put_cf(self.cf(CF_META), "gc-pending", pending.to_le_bytes());
            return self.write(wb, sync);
        }
        self.write(wb, sync)
    }

    fn gc_pending(&self) -> Result<u64, Error> {
        Ok(self
            .db
            .get_cf(self.cf(CF_META), "gc-pending")
            .map_err(|e| Error::db("read meta", e))?
            .and_then(|v| v.try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0))
    }

    /// A value the store's user keeps under `name` (e.g. the daemon's
    /// highest accepted version of a directory), apart from the index's
    /// own keys.
    pub fn app_value(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        self.db
            .get_cf(self.cf(CF_META), format!("app/{name}"))
            .map_err(|e| Error::db(format!("read {name}"), e))
    }

    /// Sets [`Store::app_value`], durably (the WAL is synced before it
    /// returns).
    pub fn set_app_value(&self, name: &str, value: &[u8]) -> Result<(), Error> {
        let mut wb = WriteBatch::default();
        wb.put_cf(self.cf(CF_META), format!("app/{name}"), value);
        self.write(wb, true)
    }

    /// Every record of one synced directory, by relative path.
    pub fn file_records(&self, dir: &str) -> Result<HashMap<String, FileRecord>, Error> {
        let prefix = file_key(dir, "");
        let mut out = HashMap::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_FILES),
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| Error::db("scan files", e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let path = String::from_utf8(k[prefix.len()..].to_vec()).map_err(|_| {
                Error::CorruptRecord {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: "path is not UTF-8".into(),
                }
            })?;
            out.insert(path, FileRecord::decode(&k, &v)?);
        }
        Ok(out)
    }

    pub fn file_record(&self, dir: &str, path: &str) -> Result<Option<FileRecord>, Error> {
        let k = file_key(dir, path);
        self.db
            .get_cf(self.cf(CF_FILES), &k)
            .map_err(|e| Error::db("read file record", e))?
            .map(|v| FileRecord::decode(&k, &v))
            .transpose()
    }

    /// The last published root of a directory.
    pub fn root(&self, dir: &str) -> Result<Option<RootRecord>, Error> {
        let k = root_key(dir);
        match self
            .db
            .get_cf(self.cf(CF_META), &k)
            .map_err(|e| Error::db("read root", e))?
        {
            None => Ok(None),
            Some(v) => RootRecord::decode(&v)
                .map(Some)
                .ok_or(Error::CorruptRecord {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: format!("{} bytes, expected 64", v.len()),
                }),
        }
    }

    /// Every published root, by directory id.
    pub fn roots(&self) -> Result<Vec<(String, RootRecord)>, Error> {
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_META),
            IteratorMode::From(b"root/", Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| Error::db("scan roots", e))?;
            let Some(dir) = k.strip_prefix(b"root/") else {
                break;
            };
            let rec = RootRecord::decode(&v).ok_or_else(|| Error::CorruptRecord {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: "bad root record".into(),
            })?;
            out.push((String::from_utf8_lossy(dir).into_owned(), rec));
        }
        Ok(out)
    }

    /// Every place the bytes of `hash` can be read from.
    pub fn chunk_locations(&self, hash: &Hash) -> Result<Vec<ChunkLocation>, Error> {
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_CHUNKS),
            IteratorMode::From(hash.as_bytes(), Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| Error::db("scan chunk locations", e))?;
            if !k.starts_with(hash.as_bytes()) {
                break;
            }
            out.push(decode_location(&k, &v)?.1);
        }
        Ok(out)
    }

    /// Whether any local file holds this chunk.
    pub fn has_chunk(&self, hash: &Hash) -> Result<bool, Error> {
        self.chunk_probe().has(hash)
    }

    /// A reusable "do we hold this chunk?" probe for many lookups in a row
    /// (a diff asks once per chunk of every new file): creating a RocksDB
    /// iterator costs tens of microseconds, a seek on an open one far less.
    pub fn chunk_probe(&self) -> ChunkProbe<'_> {
        ChunkProbe {
            iter: self.db.raw_iterator_cf(self.cf(CF_CHUNKS)),
        }
    }

    pub fn has_node(&self, hash: &Hash) -> Result<bool, Error> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_NODES), hash.as_bytes())
            .map_err(|e| Error::db("read node", e))?
            .is_some())
    }
}

/// See [`Store::chunk_probe`]. Sees the index as of its creation.
pub struct ChunkProbe<'a> {
    iter: rocksdb::DBRawIteratorWithThreadMode<'a, DB>,
}

impl std::fmt::Debug for ChunkProbe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkProbe")
    }
}

impl ChunkProbe<'_> {
    pub fn has(&mut self, hash: &Hash) -> Result<bool, Error> {
        self.iter.seek(hash.as_bytes());
        self.iter.status().map_err(|e| Error::db("seek chunk", e))?;
        Ok(self
            .iter
            .key()
            .is_some_and(|k| k.starts_with(hash.as_bytes())))
    }
}

fn decode_location(k: &[u8], v: &[u8]) -> Result<(Hash, ChunkLocation), Error> {
    let corrupt = |reason: &str| Error::CorruptRecord {
        key: format!("chunk location {}", String::from_utf8_lossy(k)),
        reason: reason.to_string(),
    };
    if k.len() < 33 || v.len() != 13 {
        return Err(corrupt("bad length"));
    }
    let hash = Hash::from_slice(&k[..32]).unwrap();
    let rest = &k[32..];
    let sep = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| corrupt("no separator"))?;
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| corrupt("not UTF-8"));
    Ok((
        hash,
        ChunkLocation {
            dir: text(&rest[..sep])?,
            path: text(&rest[sep + 1..])?,
            offset: u64::from_le_bytes(v[..8].try_into().unwrap()),
            len: u32::from_le_bytes(v[8..12].try_into().unwrap()),
            partial: v[12] == 1,
        },
    ))
}

impl NodeSource for Store {
    fn get_node(&self, hash: &Hash) -> Result<Option<Vec<u8>>, Error> {
        self.db
            .get_cf(self.cf(CF_NODES), hash.as_bytes())
            .map_err(|e| Error::db("read node", e))
    }
    fn origin(&self) -> Origin {
        Origin::Local
    }
}

/// Changes to commit together. Build with [`Store::batch`], apply with
/// [`Store::commit`].
pub struct Batch<'a> {
    store: &'a Store,
    wb: WriteBatch,
    node_bytes: u64,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("ops", &self.wb.len())
            .finish()
    }
}

impl Batch<'_> {
    pub fn put_file(&mut self, dir: &str, path: &str, rec: &FileRecord) {
        self.wb
            .put_cf(self.store.cf(CF_FILES), file_key(dir, path), rec.encode());
    }

    pub fn delete_file(&mut self, dir: &str, path: &str) {
        self.wb
            .delete_cf(self.store.cf(CF_FILES), file_key(dir, path));
    }

    /// Records that `path` holds the bytes of `hash` at `offset`.
    pub fn put_location(
        &mut self,
        hash: &Hash,
        dir: &str,
        path: &str,
        offset: u64,
        len: u32,
        partial: bool,
    ) {
        let mut v = Vec::with_capacity(13);
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.push(u8::from(partial));
        self.wb
            .put_cf(self.store.cf(CF_CHUNKS), location_key(hash, dir, path), v);
    }

    pub fn delete_location(&mut self, hash: &Hash, dir: &str, path: &str) {
        self.wb
            .delete_cf(self.store.cf(CF_CHUNKS), location_key(hash, dir, path));
    }

    pub fn put_root(&mut self, dir: &str, rec: &RootRecord) {
        self.wb
            .put_cf(self.store.cf(CF_META), root_key(dir), rec.encode());
    }

    /// Number of operations queued.
    pub fn len(&self) -> usize {
        self.wb.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wb.is_empty()
    }

    /// Approximate bytes queued, to bound batch size.
    pub fn size_in_bytes(&self) -> usize {
        self.wb.size_in_bytes()
    }
}

impl NodeSink for Batch<'_> {
    /// Nodes are content-addressed: an existing one is not written again.
    fn put_node(&mut self, hash: Hash, encoded: Vec<u8>) -> Result<(), Error> {
        if !self.store.has_node(&hash)? {
            self.node_bytes += encoded.len() as u64;
            self.wb
                .put_cf(self.store.cf(CF_NODES), hash.as_bytes(), encoded);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
