//! The storage half of syncd: everything that turns a directory into chunks,
//! hashes and a Merkle manifest, and remembers it in RocksDB. No network, no
//! async runtime: the daemon drives this crate from blocking threads.
//!
//! # Layout
//!
//! ```text
//!  files on disk ──> indexer ──> chunker ──> store (RocksDB) ──> manifest root
//!                     (walk,      (FastCDC,    (file entries,      (Merkle tree,
//!                      skip        BLAKE3)      chunk locations,    diff against
//!                      unchanged)               manifest nodes)     a peer's)
//! ```
//!
//! - [`chunker`]: FastCDC v2020 cut points and BLAKE3 chunk hashes, streamed
//!   from a reader with bounded memory.
//! - [`manifest`]: the canonical Merkle encoding of a directory tree (paged so
//!   no node grows with the tree) and `diff`, which visits only subtrees
//!   whose hashes differ.
//! - [`store`]: the RocksDB index: column families, atomic batches, and a
//!   consistency check.
//! - [`indexer`]: a (re)scan of one synced root, re-reading only files whose
//!   size, mtime or inode changed, several files in parallel.
//! - [`ignore`]: a directory's ignore patterns.
//!
//! # Example
//!
//! ```no_run
//! use chunk_store::{indexer, store::Store, ChunkerConfig};
//! let store = Store::open("/var/lib/syncd/index".as_ref(), ChunkerConfig::default())?;
//! let report = indexer::scan(&store, "www", "/srv/www".as_ref())?;
//! println!("{} files, root {}", report.files, report.root);
//! # Ok::<(), chunk_store::Error>(())
//! ```

pub mod chunker;
mod error;
mod hash;
pub mod ignore;
pub mod indexer;
pub mod manifest;
pub mod store;
#[doc(hidden)]
pub mod testdata;

pub use chunker::{ChunkRef, ChunkerConfig};
pub use error::{Error, Origin};
pub use hash::Hash;
