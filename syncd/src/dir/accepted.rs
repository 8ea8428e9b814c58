//! A replica's directory only goes forward (issue 11): the highest
//! version it accepted — the signed version and its publisher's
//! certificate — is persisted in the index before the pull starts, and
//! survives restarts. A version below it, or the same version with another
//! root, is refused: an old signed version replayed by a peer, or held by
//! a node that was down for a while, cannot take content back. Going back
//! on purpose is a new, higher version with the old content.
//!
//! After a restart the replica also holds that version again at once when
//! its disk still matches it, so it serves and announces it without a
//! pull.

use prost::Message as _;
use sync_proto::pb;

use super::state::DirState;
use crate::error::SyncError;
use crate::local::LocalNode;
use crate::locks::LockExt as _;

/// The floor of one directory, and the last version refused below it
/// (logged once each).
#[derive(Debug, Default)]
pub struct Accepted {
    floor: Option<pb::DirVersion>,
    /// Its signature checked again at start (so this node's record may
    /// carry it).
    verified: bool,
    refused: Option<(u64, Vec<u8>)>,
}

fn key(dir: &str) -> String {
    format!("accepted/{dir}")
}

/// Reads the directory's floor from the index (at start).
pub(super) fn load(node: &LocalNode, dir: &DirState) {
    let value = match node.store.app_value(&key(&dir.id)) {
        Ok(Some(v)) => v,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(dir = %dir.id, error = %e, "cannot read the highest accepted version; starting without it");
            return;
        }
    };
    let Ok(a) = pb::Accepted::decode(value.as_slice()) else {
        tracing::error!(dir = %dir.id, "the highest accepted version in the index does not decode; starting without it");
        return;
    };
    let Some(v) = a.version else { return };
    // Announcing it again needs the certificate that vouches for it.
    let verified = match node.fleet.admit(&v, &a.certificate) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(dir = %dir.id, version = v.version, error = %e, "the highest accepted version no longer verifies; it stays the floor but is not served until pulled again");
            false
        }
    };
    tracing::info!(dir = %dir.id, version = v.version, publisher = %v.publisher, "versions below the highest accepted are refused");
    let mut acc = dir.accepted.locked();
    acc.floor = Some(v);
    acc.verified = verified;
}

/// Whether `v` may be pulled: above the floor, or the floor itself.
pub(super) fn allows(dir: &DirState, v: &pb::DirVersion) -> bool {
    let mut a = dir.accepted.locked();
    let ok = match &a.floor {
        None => true,
        Some(f) => v.version > f.version || (v.version == f.version && v.root == f.root),
    };
    if !ok {
        let this = (v.version, v.root.clone());
        if a.refused.as_ref() != Some(&this) {
            let floor = a.floor.as_ref().map_or(0, |f| f.version);
            tracing::warn!(dir = %dir.id, version = v.version, publisher = %v.publisher, accepted = floor, "refusing a version that would take the directory back (below, or beside, the highest accepted)");
            a.refused = Some(this);
        }
    }
    ok
}

/// Makes `v` the floor, durably, before it is pulled.
pub(super) fn accept(
    node: &LocalNode,
    dir: &DirState,
    v: &pb::DirVersion,
) -> Result<(), SyncError> {
    let mut a = dir.accepted.locked();
    if a.floor.as_ref().is_some_and(|f| f.version >= v.version) {
        return Ok(());
    }
    let value = pb::Accepted {
        version: Some(v.clone()),
        certificate: node.fleet.cert_of(v),
    }
    .encode_to_vec();
    node.store
        .set_app_value(&key(&dir.id), &value)
        .map_err(|e| {
            SyncError::store(
                format!(
                    "persisting version {} of {:?} as accepted",
                    v.version, dir.id
                ),
                None,
                e,
            )
        })?;
    a.floor = Some(v.clone());
    a.verified = true;
    Ok(())
}

/// On a replica holding nothing yet (just started): when its disk is the
/// floor's content, it holds the floor again.
pub(super) fn restore(dir: &DirState, root: &[u8]) {
    let floor = {
        let a = dir.accepted.locked();
        a.floor.clone().filter(|_| a.verified)
    };
    if let Some(f) = floor
        && f.root == root
        && dir.current().is_none()
    {
        tracing::info!(dir = %dir.id, version = f.version, "holds the version it held before the restart");
        dir.update(|s| s.current = Some(f));
    }
}
