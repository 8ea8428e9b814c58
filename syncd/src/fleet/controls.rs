//! Fleet controls in the fleet view (issue 11): `syncctl pause DIR
//! --fleet` on any node signs a control with an operator's key
//! ([`crate::tls::control`]); the node checks it and puts it in its own
//! record, and gossip carries it everywhere like any record change.
//! Every node keeps the newest control of each directory and kind
//! (pause/resume, priority), re-publishes it in its own record — so it
//! outlives the node it was given to — and applies it to the directory if
//! it carries it (`DirHandle::apply_controls`).
//!
//! Newest is by signing time, then operator and signature, so every node
//! picks the same one. A control signed more than [`MAX_AHEAD`] past this
//! node's clock is refused: it would override every later one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sync_proto::pb;

use super::{FleetView, OwnDir, Table};
use crate::locks::LockExt as _;
use crate::wire;

/// How far past this node's clock a control may be signed.
pub const MAX_AHEAD: Duration = Duration::from_secs(600);
/// Most controls remembered; beyond, the oldest of directories this node
/// does not carry are forgotten first.
const MAX_CONTROLS: usize = 4096;

/// The two things a control sets, each followed on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Run,
    Priority,
}

impl Kind {
    pub fn of(c: &pb::Control) -> Kind {
        if c.action == "priority" {
            Kind::Priority
        } else {
            Kind::Run
        }
    }
}

/// Which of two controls of a directory and kind wins.
pub fn order(c: &pb::Control) -> (u64, &str, &[u8]) {
    (c.time, c.operator.as_str(), c.signature.as_slice())
}

/// When `c` was signed, as operators read it (RFC 3339, UTC, seconds).
pub fn signed_at(c: &pb::Control) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(c.time);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// A checked control and the operator certificate that vouches for it.
#[derive(Debug, Clone)]
pub struct Signed {
    pub control: pb::Control,
    pub cert: Arc<Vec<u8>>,
}

#[derive(Debug)]
pub(super) struct Controls {
    newest: BTreeMap<(String, Kind), Signed>,
    /// Counts changes, for the task that applies them.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for Controls {
    fn default() -> Controls {
        Controls {
            newest: BTreeMap::new(),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Controls {
    /// Keeps `s` if it is the newest of its directory and kind; returns
    /// whether it was news.
    fn offer(&mut self, s: Signed, carried: &BTreeMap<String, OwnDir>) -> bool {
        let key = (s.control.dir.clone(), Kind::of(&s.control));
        match self.newest.get(&key) {
            Some(old) if order(&old.control) >= order(&s.control) => return false,
            _ => {}
        }
        self.newest.insert(key.clone(), s);
        let mut kept = true;
        while self.newest.len() > MAX_CONTROLS {
            let oldest = self
                .newest
                .iter()
                .min_by_key(|((dir, _), s)| (carried.contains_key(dir), s.control.time))
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    kept &= k != key;
                    self.newest.remove(&k);
                }
                None => break,
            };
        }
        // Evicted at once: no news (or every record carrying it would
        // bump this node's record again).
        kept
    }

    /// What this node's record carries: the controls of the directories
    /// it carries first, then the newest others, at most
    /// [`wire::MAX_RECORD_CONTROLS`].
    pub(super) fn for_record(&self, carried: &BTreeMap<String, OwnDir>) -> Vec<&Signed> {
        let mut all: Vec<&Signed> = self.newest.values().collect();
        all.sort_by_key(|s| {
            (
                !carried.contains_key(&s.control.dir),
                std::cmp::Reverse(s.control.time),
            )
        });
        all.truncate(wire::MAX_RECORD_CONTROLS);
        all
    }
}

impl FleetView {
    /// Takes in checked controls (from a record, or given here); when one
    /// is news, this node's record carries it on at once.
    pub(super) fn take_controls(&self, t: &mut Table, controls: Vec<Signed>) -> bool {
        let mut news = false;
        for s in controls {
            news |= t.controls.offer(s, &t.own.dirs);
        }
        if news {
            self.bump_own(t);
            let record = t.own.record.clone();
            t.pushes.push((record, Vec::new()));
            t.controls.changed.send_modify(|n| *n += 1);
        }
        news
    }

    /// A control an operator signed and gave this node (`syncctl
    /// --fleet`), with the operator's certificate: checked, kept and
    /// published. Needs mutual TLS.
    pub fn publish_control(&self, c: pb::Control, cert: Vec<u8>) -> Result<(), String> {
        wire::check_control(&c)?;
        let Some(s) = self.signatures.get() else {
            return Err("fleet controls need mutual TLS ([tls] in syncd.toml): without it no node could check who signed them".into());
        };
        let cert = s.check_control(&c, std::slice::from_ref(&cert))?;
        let mut t = self.table.locked();
        let carried = t.own.dirs.contains_key(&c.dir)
            || t.peers.values().any(|p| {
                p.record
                    .as_ref()
                    .is_some_and(|r| r.reports.iter().any(|x| x.dir == c.dir))
            });
        if !carried {
            return Err(format!(
                "no node this one knows of carries directory {:?}",
                wire::short(&c.dir)
            ));
        }
        let newer = t
            .controls
            .newest
            .get(&(c.dir.clone(), Kind::of(&c)))
            .filter(|old| order(&old.control) >= order(&c))
            .map(|old| old.control.operator.clone());
        if let Some(by) = newer {
            return Err(format!(
                "a newer control of {:?} by {by:?} is in force; check the clocks",
                c.dir
            ));
        }
        self.take_controls(&mut t, vec![Signed { control: c, cert }]);
        drop(t);
        self.pushed.notify_one();
        self.learned.notify_waiters();
        Ok(())
    }

    /// The newest controls of `dir` (at most one per kind).
    pub fn controls_of(&self, dir: &str) -> Vec<pb::Control> {
        let t = self.table.locked();
        [Kind::Run, Kind::Priority]
            .into_iter()
            .filter_map(|k| t.controls.newest.get(&(dir.to_string(), k)))
            .map(|s| s.control.clone())
            .collect()
    }

    /// Every control in force, by directory.
    pub fn controls(&self) -> Vec<pb::Control> {
        let t = self.table.locked();
        t.controls
            .newest
            .values()
            .map(|s| s.control.clone())
            .collect()
    }

    /// Changes whenever a newer control arrives.
    pub fn watch_controls(&self) -> tokio::sync::watch::Receiver<u64> {
        self.table.locked().controls.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use sync_proto::pb;

    use super::super::{FleetView, Via};
    use crate::tls::{Tls, TlsFiles, control::Operator, pki};
    use crate::transport::mem::MemNet;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    /// `id`'s record, signed with `id`'s node key from `certs_dir`.
    fn record(id: &str, seq: u64, controls: Vec<pb::Control>, certs: Vec<Vec<u8>>) -> pb::Holdings {
        let mut h = unsigned(id, seq, controls, certs);
        let dir = CERTS.get().unwrap();
        let tls = Tls::new(
            TlsFiles {
                ca: pki::ca_files(&dir.join("..").join("ca")).0,
                cert: dir.join(format!("{id}.pem")),
                key: dir.join(format!("{id}.key")),
            },
            id,
        )
        .unwrap();
        tls.signer().sign_record(&mut h);
        h
    }

    static CERTS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

    fn unsigned(
        id: &str,
        seq: u64,
        controls: Vec<pb::Control>,
        certs: Vec<Vec<u8>>,
    ) -> pb::Holdings {
        pb::Holdings {
            from: Some(pb::Member {
                node_id: id.into(),
                address: "10.0.0.6:7400".into(),
                labels: Default::default(),
            }),
            reports: vec![pb::DirReport {
                dir: "www".into(),
                state: "idle".into(),
                mode: "replica".into(),
                ..Default::default()
            }],
            protocol: crate::wire::PROTOCOL,
            incarnation: 1,
            seq,
            controls,
            certificates: certs,
            ..Default::default()
        }
    }

    /// Issue 11, item 6: a control signed by an operator travels in
    /// records, relayed or direct, and this node's record carries it on
    /// with the operator's certificate; the newest of each kind wins; a
    /// control no operator of the fleet signed, or one signed far ahead of
    /// the clock, is passed over (its record, signed by its owner, is
    /// taken).
    #[tokio::test(start_paused = true)]
    async fn controls_travel_in_records_and_the_newest_of_each_kind_wins() {
        let t = tempfile::tempdir().unwrap();
        let (ca, certs) = (t.path().join("ca"), t.path().join("certs"));
        pki::init(&ca, "test CA", 5).unwrap();
        pki::issue(&ca, "n1", 5, &certs).unwrap();
        pki::issue(&ca, "r1", 5, &certs).unwrap();
        pki::issue(&ca, "r2", 5, &certs).unwrap();
        CERTS.set(certs.clone()).unwrap();
        pki::issue_operator(&ca, "alice", 5, &certs).unwrap();
        pki::issue_operator(&ca, "bob", 5, &certs).unwrap();
        let op = |n: &str| {
            Operator::load(
                &certs.join(format!("{n}.pem")),
                &certs.join(format!("{n}.key")),
            )
            .unwrap()
        };
        let (alice, bob) = (op("alice"), op("bob"));
        let tls = Tls::new(
            TlsFiles {
                ca: pki::ca_files(&ca).0,
                cert: certs.join("n1.pem"),
                key: certs.join("n1.key"),
            },
            "n1",
        )
        .unwrap();
        let v = Arc::new(FleetView::new(
            "n1".into(),
            "10.0.0.1:7400".into(),
            BTreeMap::new(),
            1,
            vec![],
            Arc::new(MemNet::new().transport("10.0.0.1:7400")),
            Arc::new(crate::env::Env::seeded(1)),
            crate::metrics::Metrics::new().unwrap(),
        ));
        let mut changes = v.watch_controls();
        let pause = alice.sign("www", "pause", "", now());
        // Without TLS nobody can check it.
        let e = v
            .publish_control(pause.clone(), alice.cert().to_vec())
            .unwrap_err();
        assert!(e.contains("need mutual TLS"), "{e}");
        v.set_tls(Arc::new(tls));
        // No node known carries www: a typo, most likely.
        let e = v
            .publish_control(pause.clone(), alice.cert().to_vec())
            .unwrap_err();
        assert!(e.contains("no node this one knows of carries"), "{e}");

        let a = alice.cert().to_vec();
        let r = record("r1", 1, vec![pause.clone()], vec![a.clone()]);
        assert!(v.learn(r, Via::Relay("r7")).unwrap());
        assert_eq!(v.controls_of("www"), vec![pause.clone()]);
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        let own = v.own_record();
        assert_eq!(own.controls, vec![pause.clone()]);
        assert!(own.certificates.contains(&a));

        // Refused whole: not signed by its owner.
        let e = v
            .learn(
                unsigned("r2", 1, vec![pause.clone()], vec![a.clone()]),
                Via::Direct,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the record of r2: not signed by its owner"),
            "{e}"
        );
        // Passed over, the record taken: a control with no operator
        // certificate, a node's instead, a tampered one, one signed an
        // hour ahead of this node's clock.
        let node_cert = std::fs::read(certs.join("r1.pem")).unwrap();
        let node_der = rustls::pki_types::pem::PemObject::from_pem_slice(&node_cert)
            .map(|c: rustls::pki_types::CertificateDer<'_>| c.to_vec())
            .unwrap();
        let fresh = alice.sign("etc", "pause", "", now());
        let mut tampered = fresh.clone();
        tampered.time += 1;
        let ahead = alice.sign("etc", "pause", "", now() + 3_600_000);
        for (seq, (controls, certs)) in [
            (vec![fresh.clone()], vec![]),
            (vec![fresh], vec![node_der]),
            (vec![tampered], vec![a.clone()]),
            (vec![ahead], vec![a.clone()]),
        ]
        .into_iter()
        .enumerate()
        {
            let r = record("r2", seq as u64 + 1, controls, certs);
            assert!(v.learn(r, Via::Direct).unwrap());
            assert!(v.controls_of("etc").is_empty());
        }

        // Newer: bob's resume here, then alice's priority (its own kind).
        let resume = bob.sign("www", "resume", "", pause.time + 1);
        v.publish_control(resume.clone(), bob.cert().to_vec())
            .unwrap();
        let high = alice.sign("www", "priority", "high", pause.time + 2);
        let r = record("r1", 2, vec![high.clone()], vec![a.clone()]);
        assert!(v.learn(r, Via::Direct).unwrap());
        assert_eq!(v.controls_of("www"), vec![resume.clone(), high.clone()]);
        assert_eq!(v.own_record().controls.len(), 2);
        // The old pause again changes nothing, relayed or given here.
        let r = record("r1", 3, vec![pause.clone()], vec![a.clone()]);
        assert!(v.learn(r, Via::Direct).unwrap());
        assert_eq!(v.controls_of("www"), vec![resume, high]);
        let e = v.publish_control(pause, a).unwrap_err();
        assert!(e.contains("a newer control of \"www\" by \"bob\""), "{e}");
    }
}
