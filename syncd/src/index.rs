//! `syncd index DIR [--state DIR] [--json]`: scan one directory into the
//! local index and report its manifest root.

use std::path::{Path, PathBuf};

use chunk_store::indexer::{self, ScanReport};
use chunk_store::store::Store;
use chunk_store::{ChunkerConfig, Error};

/// Errors of the index command, each naming what it was about.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot resolve {}: {source}", path.display())]
    Resolve {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state directory {} is inside the indexed directory {}; its own files would be indexed",
        state.display(),
        dir.display()
    )]
    StateInsideDir { state: PathBuf, dir: PathBuf },
    #[error(transparent)]
    Store(#[from] Error),
}

/// Indexes `dir` into the index under `state` and returns the report.
///
/// The directory id is the canonical path, so indexing the same directory
/// twice through different spellings updates one entry.
pub fn run(dir: &Path, state: &Path) -> Result<ScanReport, IndexError> {
    let canonical = dir.canonicalize().map_err(|source| IndexError::Resolve {
        path: dir.to_path_buf(),
        source,
    })?;
    std::fs::create_dir_all(state).map_err(|source| IndexError::Resolve {
        path: state.to_path_buf(),
        source,
    })?;
    let state_canonical = state.canonicalize().map_err(|source| IndexError::Resolve {
        path: state.to_path_buf(),
        source,
    })?;
    if state_canonical.starts_with(&canonical) {
        return Err(IndexError::StateInsideDir {
            state: state_canonical,
            dir: canonical,
        });
    }
    let store = Store::open(&state_canonical.join("index"), ChunkerConfig::default())?;
    let id = canonical.to_string_lossy().into_owned();
    Ok(indexer::scan(&store, &id, &canonical)?)
}

/// The `--json` object. Keys are a stable interface for scripts.
pub fn to_json(r: &ScanReport) -> serde_json::Value {
    serde_json::json!({
        "root": r.root.to_hex(),
        "version": r.version,
        "files": r.files,
        "dirs": r.dirs,
        "symlinks": r.symlinks,
        "bytes": r.bytes,
        "chunks": r.chunks,
        "files_read": r.files_read,
        "bytes_read": r.bytes_read,
        "removed": r.removed,
        "skipped": r.skipped,
        "seconds": r.seconds,
    })
}

/// The human report.
pub fn to_text(r: &ScanReport) -> String {
    format!(
        "root     {}\nversion  {}{}\nfiles    {} ({} dirs, {} symlinks)\nbytes    {}\nchunks   {}\nread     {} files, {} bytes\nremoved  {}\nskipped  {}\nelapsed  {:.3} s\n",
        r.root,
        r.version,
        if r.changed { " (changed)" } else { "" },
        r.files,
        r.dirs,
        r.symlinks,
        r.bytes,
        r.chunks,
        r.files_read,
        r.bytes_read,
        r.removed,
        r.skipped,
        r.seconds
    )
}
