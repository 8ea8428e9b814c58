//! A source directory's policy: what is on its disk is the truth. A scan
//! whose root differs from the version it publishes is the next version,
//! announced to the fleet at once (the version number is the index's,
//! one more per new root). It never pulls.

use chunk_store::indexer::ScanReport;
use sync_proto::pb;

use super::state::{DirState, Phase};
use crate::local::LocalNode;

/// Sources refuse a scan that would empty a published directory (an
/// unmounted disk must not publish "no files" to the fleet).
pub(super) const REFUSE_EMPTYING: bool = true;

/// What a finished scan means on a source: a new version when the root
/// changed. Returns whether it published.
pub(super) fn scanned(node: &LocalNode, dir: &DirState, report: &ScanReport) -> bool {
    let current = dir.current();
    let changed = current.as_ref().map(|v| v.root.as_slice()) != Some(report.root.as_bytes());
    if !changed {
        dir.set_phase(Phase::Idle);
        return false;
    }
    tracing::info!(dir = %dir.id, version = report.version, root = %report.root, files = report.files, "publishing new version");
    let mut v = pb::DirVersion {
        dir: dir.id.clone(),
        version: report.version,
        root: report.root.as_bytes().to_vec(),
        publisher: node.id.clone(),
        entries: report.files + report.dirs + report.symlinks,
        bytes: report.bytes,
        ..Default::default()
    };
    // Under mutual TLS, with this node's key: replicas check it end to end.
    node.fleet.sign(&mut v);
    dir.update(|s| {
        s.phase = Phase::Idle;
        s.reason.clear();
        s.current = Some(v.clone());
    });
    dir.synced.send_replace(Some(v));
    true
}
