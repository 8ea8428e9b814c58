//! Errors of the storage layer. Variants separate our own faults (I/O, a
//! corrupt local index) from what a peer sent us (a remote manifest node that
//! fails validation), so the daemon can blame and count the right party.

use std::io;
use std::path::PathBuf;

use crate::Hash;
use crate::chunker::ChunkerConfigError;

/// Where a manifest node came from: our own index or a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Local,
    Remote,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Local => "local index",
            Origin::Remote => "peer",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },

    #[error("RocksDB {context}: {source}")]
    Db {
        context: String,
        source: rocksdb::Error,
    },

    #[error("synced root {} is unavailable: {reason}", path.display())]
    RootUnavailable { path: PathBuf, reason: String },

    #[error("invalid chunker configuration: {0}")]
    Chunker(#[from] ChunkerConfigError),

    #[error(
        "index at {} was built with chunk sizes {stored}, but this node is configured for {configured}; \
         cut points would differ (move the index away to rebuild it)",
        path.display()
    )]
    ChunkerMismatch {
        path: PathBuf,
        stored: String,
        configured: String,
    },

    #[error("index at {} has format {found:?}, this build reads {expected:?}", path.display())]
    IndexFormat {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },

    #[error("invalid directory id {id:?}: {reason}")]
    InvalidDirId { id: String, reason: &'static str },

    #[error("manifest node {hash} from {origin} is invalid: {reason}")]
    InvalidNode {
        hash: Hash,
        origin: Origin,
        reason: String,
    },

    /// A tree that decodes node by node but is not acceptable as a whole:
    /// names repeated across pages, reserved names, or more work than the
    /// version declared.
    #[error("manifest from {origin} is invalid: {reason}")]
    InvalidTree { origin: Origin, reason: String },

    /// The version's files would not fit on the local disk.
    #[error(
        "the version does not fit: its files need more than {room} bytes (free space plus \
         what is there now, less min_free_space), reached at {path:?} with {needed}"
    )]
    DoesNotFit {
        needed: u64,
        room: u64,
        path: String,
    },

    /// The caller asked the work to stop (shutdown, or the directory was
    /// removed); what was committed stays, the next scan finishes the job.
    #[error("stopped before finishing (shutting down or directory removed)")]
    Stopped,

    /// The node source could not answer (a peer unreachable or failing).
    #[error("{origin} could not serve manifest node {hash}: {reason}")]
    SourceFailed {
        hash: Hash,
        origin: Origin,
        reason: String,
    },

    #[error("manifest node {hash} not found in {origin}")]
    MissingNode { hash: Hash, origin: Origin },

    #[error("corrupt index record {key}: {reason}")]
    CorruptRecord { key: String, reason: String },

    #[error("index of {dir:?} is inconsistent: {problem}")]
    Inconsistent { dir: String, problem: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn db(context: impl Into<String>, source: rocksdb::Error) -> Error {
        Error::Db {
            context: context.into(),
            source,
        }
    }
}
