//! This node's own record: what it holds and receives, what its
//! directories are doing, the fleet controls it carries on, the
//! certificates that vouch for all of it and, under mutual TLS, its own
//! signature over the whole (issue 11: no relay can change a record).

use std::sync::Arc;

use sync_proto::pb;

use super::{FleetView, Own, controls};
use crate::wire;

impl FleetView {
    pub(super) fn own_member(&self) -> pb::Member {
        pb::Member {
            node_id: self.id.clone(),
            address: self.address.clone(),
            labels: self.labels.clone().into_iter().collect(),
        }
    }

    pub(super) fn build_own(&self, own: &Own, controls: &controls::Controls) -> Arc<pb::Holdings> {
        let versions = || {
            own.dirs
                .values()
                .flat_map(|d| d.held.iter().chain(d.pulling.iter()))
        };
        let mut certificates = match self.signatures.get() {
            Some(s) => s.certs_of(versions()),
            None => Vec::new(),
        };
        // This node's own certificate goes first (`Signer::sign_record`).
        let room = wire::MAX_RECORD_CERTS - usize::from(self.signatures.get().is_some());
        // A control goes only with its operator's certificate.
        let mut carried = Vec::new();
        for c in controls.for_record(&own.dirs) {
            let has = certificates.iter().any(|o| o == c.cert.as_ref());
            if !has && certificates.len() < room {
                certificates.push(c.cert.as_ref().clone());
            }
            if has || certificates.last().is_some_and(|o| o == c.cert.as_ref()) {
                carried.push(c.control.clone());
            }
        }
        let mut h = pb::Holdings {
            controls: carried,
            certificates,
            from: Some(self.own_member()),
            dirs: own.dirs.values().filter_map(|d| d.held.clone()).collect(),
            pulling: own
                .dirs
                .values()
                .filter_map(|d| d.pulling.clone())
                .collect(),
            protocol: wire::PROTOCOL,
            incarnation: self.incarnation,
            seq: own.seq,
            reports: own.dirs.values().map(|d| d.report.clone()).collect(),
            signature: Vec::new(),
        };
        if let Some(s) = self.signatures.get() {
            s.tls().signer().sign_record(&mut h);
        }
        Arc::new(h)
    }
}
