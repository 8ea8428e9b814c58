//! Signed versions in the fleet view (issue 11): under mutual TLS every
//! version a record lists — held or being received — must carry its
//! publisher's signature, checked against the fleet CA with a
//! certificate the record carries ([`crate::tls::sign`]). A record with
//! an unsigned or wrongly signed version is refused whole: its sender (or
//! whoever relayed it) is lying, and a version that no publisher signed
//! never enters the view, is never relayed and is never pulled.
//!
//! Which publishers a directory accepts is this node's own policy
//! (`publishers` in its `dirs.d` file): a valid signature by another
//! fleet node is kept in the view, but [`FleetView::newest`] passes over
//! it (see `Table::publishers`).
//!
//! Checks are remembered by the hash of what was signed and the
//! signature, so a version relayed in a thousand records is verified once;
//! the memory also tells which certificate vouches for a version, so this
//! node's own record can carry it on.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use sync_proto::pb;

use super::FleetView;
use super::controls::Signed;
use crate::locks::LockExt as _;
use crate::tls::{Tls, control, sign};

/// The sender's own identity bounds what it says of itself in the same
/// packet.
fn src_bump_if(id: &super::Ident, src: &super::Ident) -> u64 {
    if id.node_id == src.node_id {
        src.bump
    } else {
        0
    }
}

/// Most checked signatures remembered; beyond, all but this node's own
/// are forgotten (and checked again when next seen).
const MAX_VERIFIED: usize = 1 << 14;

type Key = [u8; 32];

/// The wall clock, ms since the epoch: what signatures are stamped with
/// and checked against.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn control_key(c: &pb::Control) -> Key {
    let mut h = blake3::Hasher::new();
    h.update(&control::payload(c));
    h.update(&c.signature);
    *h.finalize().as_bytes()
}

fn key(v: &pb::DirVersion) -> Key {
    let mut h = blake3::Hasher::new();
    h.update(&sign::payload(v));
    h.update(&v.signature);
    *h.finalize().as_bytes()
}

/// Signing this node's versions and checking everyone's.
#[derive(Debug)]
pub struct Signatures {
    tls: Arc<Tls>,
    /// Checked versions → the certificate that verified each.
    verified: Mutex<HashMap<Key, Arc<Vec<u8>>>>,
    /// This node's own versions: kept when `verified` is cleared.
    pinned: Mutex<HashSet<Key>>,
}

impl Signatures {
    pub fn new(tls: Arc<Tls>) -> Signatures {
        Signatures {
            tls,
            verified: Mutex::default(),
            pinned: Mutex::default(),
        }
    }

    pub fn tls(&self) -> &Arc<Tls> {
        &self.tls
    }

    /// Signs a version this node publishes, stamped with the wall clock.
    pub fn sign(&self, v: &mut pb::DirVersion) {
        let signer = self.tls.signer();
        let now = wall_ms();
        signer.sign(v, now);
        self.remember(key(v), signer.cert());
    }

    fn remember(&self, k: Key, cert: Arc<Vec<u8>>) {
        let mut m = self.verified.locked();
        if m.len() >= MAX_VERIFIED {
            let pinned = self.pinned.locked();
            m.retain(|k, _| pinned.contains(k));
        }
        m.insert(k, cert);
    }

    /// A check done before, if the certificate that passed it is offered
    /// again: what travels must carry its own proof, so every node can
    /// check it, not only those that saw it before.
    fn remembered(&self, k: &Key, certs: &[Vec<u8>]) -> Option<Arc<Vec<u8>>> {
        let c = self.verified.locked().get(k).cloned()?;
        certs.iter().any(|o| o == c.as_ref()).then_some(c)
    }

    /// Checks one version with the certificates offered (DER); returns the
    /// one that vouches for it.
    pub fn check(&self, v: &pb::DirVersion, certs: &[Vec<u8>]) -> Result<Arc<Vec<u8>>, String> {
        let ids: Vec<Option<String>> = certs
            .iter()
            .map(|c| crate::tls::node_id_of(&c.as_slice().into()))
            .collect();
        self.check_with(v, certs, &ids)
    }

    fn check_with(
        &self,
        v: &pb::DirVersion,
        certs: &[Vec<u8>],
        ids: &[Option<String>],
    ) -> Result<Arc<Vec<u8>>, String> {
        if v.signature.is_empty() {
            return Err("unsigned".into());
        }
        let k = key(v);
        if let Some(c) = self.remembered(&k, certs) {
            return Ok(c);
        }
        let offered = certs
            .iter()
            .zip(ids)
            .filter(|(_, id)| id.as_deref() == Some(v.publisher.as_str()))
            .map(|(c, _)| c);
        self.first_verifying(k, offered, "publisher", |c| self.tls.verify_version(v, c))
    }

    /// The first of `offered` (the signer's certificates by name) that
    /// `verify` accepts, remembered under `k`; else why the last failed.
    fn first_verifying<'a>(
        &self,
        k: Key,
        offered: impl Iterator<Item = &'a Vec<u8>>,
        signer: &str,
        verify: impl Fn(&[u8]) -> Result<(), String>,
    ) -> Result<Arc<Vec<u8>>, String> {
        let mut why = format!("no certificate of its {signer} came with it");
        for c in offered {
            match verify(c) {
                Ok(()) => {
                    let c = Arc::new(c.clone());
                    self.remember(k, c.clone());
                    return Ok(c);
                }
                Err(e) => why = e,
            }
        }
        Err(why)
    }

    /// Checks every version a record lists, held or being received.
    pub fn check_record(&self, h: &pb::Holdings) -> Result<(), String> {
        let ids: Vec<Option<String>> = h
            .certificates
            .iter()
            .map(|c| crate::tls::node_id_of(&c.as_slice().into()))
            .collect();
        for v in h.dirs.iter().chain(&h.pulling) {
            self.check_with(v, &h.certificates, &ids).map_err(|e| {
                format!(
                    "version {} of {:?} published by {:?}: {e}",
                    v.version,
                    crate::wire::short(&v.dir),
                    crate::wire::short(&v.publisher)
                )
            })?;
        }
        Ok(())
    }

    /// Checks a fleet control with the certificates offered (DER);
    /// returns the operator's that vouches for it.
    pub fn check_control(
        &self,
        c: &pb::Control,
        certs: &[Vec<u8>],
    ) -> Result<Arc<Vec<u8>>, String> {
        let now = wall_ms();
        let ahead = c.time.saturating_sub(now);
        if ahead > super::controls::MAX_AHEAD.as_millis() as u64 {
            return Err(format!(
                "signed {} s ahead of this node's clock",
                ahead / 1000
            ));
        }
        let k = control_key(c);
        if let Some(cert) = self.remembered(&k, certs) {
            return Ok(cert);
        }
        let offered = certs
            .iter()
            .filter(|cert| control::operator_of(cert).as_deref() == Some(c.operator.as_str()));
        self.first_verifying(k, offered, "operator", |cert| {
            self.tls.verify_control(c, cert)
        })
    }

    /// Checks that a record is signed by its owner, with the owner's
    /// certificate the record carries.
    fn check_owner(&self, h: &pb::Holdings, owner: &str) -> Result<(), String> {
        let mine = h
            .certificates
            .iter()
            .filter(|c| crate::tls::node_id_of(&c.as_slice().into()).as_deref() == Some(owner));
        let mut why = "no certificate of its owner came with it".to_string();
        for c in mine {
            match self.tls.verify_record(h, c) {
                Ok(()) => return Ok(()),
                Err(e) => why = e,
            }
        }
        if h.signature.is_empty() {
            why = "not signed by its owner".into();
        }
        Err(why)
    }

    /// The fleet controls of a record that verify here, and why the others
    /// do not. Those are passed over, not the record: the owner signed it
    /// whole, and a control this node cannot check (its clock behind the
    /// operator's, a CA rotated since) must not cost the fleet view every
    /// record that carries it on.
    fn check_controls(&self, h: &pb::Holdings) -> (Vec<Signed>, Vec<String>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for c in &h.controls {
            match self.check_control(c, &h.certificates) {
                Ok(cert) => ok.push(Signed {
                    control: c.clone(),
                    cert,
                }),
                Err(e) => bad.push(format!(
                    "the {} of {:?} by operator {:?}: {e}",
                    c.action,
                    crate::wire::short(&c.dir),
                    crate::wire::short(&c.operator)
                )),
            }
        }
        (ok, bad)
    }

    /// The certificate that vouched for `v` when it was checked.
    fn cert(&self, v: &pb::DirVersion) -> Option<Arc<Vec<u8>>> {
        self.verified.locked().get(&key(v)).cloned()
    }

    /// The certificates vouching for `versions` (this node's own), each
    /// once; they are kept from now on.
    pub fn certs_of<'a>(&self, versions: impl Iterator<Item = &'a pb::DirVersion>) -> Vec<Vec<u8>> {
        let keys: Vec<Key> = versions.map(key).collect();
        let m = self.verified.locked();
        let mut out: Vec<Vec<u8>> = Vec::new();
        for k in &keys {
            if let Some(c) = m.get(k)
                && !out.iter().any(|o| o == c.as_ref())
            {
                out.push(c.as_ref().clone());
            }
        }
        drop(m);
        *self.pinned.locked() = keys.into_iter().collect();
        out
    }
}

impl FleetView {
    /// From now on every version is signed and checked ([`signed`]).
    pub fn set_tls(&self, tls: Arc<crate::tls::Tls>) {
        let _ = self.signatures.set(Signatures::new(tls));
        // This node's record is signed from now on.
        let mut t = self.table.locked();
        self.bump_own(&mut t);
    }

    /// Signs this node's record again with the certificate now in use
    /// (after a reload: records are checked against the owner's
    /// certificate as of now) and pushes it.
    pub fn resign(&self) {
        let mut t = self.table.locked();
        self.bump_own(&mut t);
        let record = t.own.record.clone();
        t.pushes.push((record, Vec::new()));
        drop(t);
        self.pushed.notify_one();
    }

    /// This node's TLS, when it runs it.
    pub fn tls(&self) -> Option<&Arc<crate::tls::Tls>> {
        self.signatures.get().map(|s| s.tls())
    }

    /// Signs a version this node publishes (without TLS: leaves it be).
    pub fn sign(&self, v: &mut pb::DirVersion) {
        if let Some(s) = self.signatures.get() {
            s.sign(v);
        }
    }

    /// Checks a version this node kept (persisted) with the certificate
    /// kept with it.
    pub fn admit(&self, v: &pb::DirVersion, cert: &[u8]) -> Result<(), String> {
        match self.signatures.get() {
            Some(s) => s.check(v, &[cert.to_vec()]).map(|_| ()),
            None => Ok(()),
        }
    }

    /// The certificate vouching for a version this node took in.
    pub fn cert_of(&self, v: &pb::DirVersion) -> Vec<u8> {
        self.signatures
            .get()
            .and_then(|s| s.cert(v))
            .map(|c| c.as_ref().clone())
            .unwrap_or_default()
    }

    /// Which nodes may publish `dir` here (empty: any node of the fleet).
    pub fn set_publishers(&self, dir: &str, publishers: Vec<String>) {
        let mut t = self.table.locked();
        if publishers.is_empty() {
            t.publishers.remove(dir);
        } else {
            t.publishers.insert(dir.to_string(), publishers);
        }
    }

    /// Read authorization (issue 11): under TLS a peer reads a
    /// directory's nodes, chunks and have-logs only if its record says it
    /// carries the directory. Without TLS anyone may.
    pub fn may_read(
        &self,
        caller: &crate::transport::Caller,
        dir: &str,
    ) -> Result<(), crate::error::Refusal> {
        let Some(id) = caller.peer_id.as_deref() else {
            return Ok(());
        };
        let carries = self.table.locked().peers.get(id).is_some_and(|p| {
            p.record.as_ref().is_some_and(|r| {
                r.reports.iter().any(|x| x.dir == dir)
                    || r.dirs.iter().chain(&r.pulling).any(|v| v.dir == dir)
            })
        });
        if carries {
            return Ok(());
        }
        let reason = format!(
            "it does not carry directory {:?} (no record of it lists it)",
            crate::wire::short(dir)
        );
        tracing::warn!(peer = %caller.who(), "refused a read: {reason}");
        Err(crate::error::Refusal::Denied {
            peer: caller.who(),
            reason,
        })
    }

    /// A SWIM packet under TLS: its sender must be the caller's
    /// certificate, at no address another live node holds, and no update
    /// in it may
    /// - put a node at an address another live node holds (foca matches
    ///   members by address, the larger identity winning), nor
    /// - give a node a later identity (bump) than it announced itself: in
    ///   its signed record (its start) or in packets it sent; a node this
    ///   one knows nothing of, no later than the clock allows.
    ///
    /// Otherwise one peer could declare another down under an identity the
    /// real node never outbids (issue 11: "the source looks dead for
    /// good"). Such updates are taken out of the packet (the rest goes to
    /// SWIM); what a node says of itself raises its bound, so a node that
    /// rejoined or restarted is believed once its own packets or its new
    /// record arrive.
    pub(super) fn check_swim(
        &self,
        caller: &crate::transport::Caller,
        data: bytes::Bytes,
    ) -> Result<bytes::Bytes, crate::error::Refusal> {
        use bytes::{Buf as _, BufMut as _};
        use foca::Codec as _;
        let invalid = |reason: String| crate::error::Refusal::Invalid {
            peer: caller.who(),
            reason,
        };
        let mut buf = &data[..];
        let header = foca::PostcardCodec
            .decode_header(&mut buf)
            .map_err(|_| invalid("a SWIM packet that does not decode".into()))?;
        let src: &super::Ident = &header.src;
        caller.claims("SWIM packet's sender", &src.node_id)?;
        let mut updates = Vec::new();
        if buf.remaining() >= 2 && header.message != foca::Message::Broadcast {
            for _ in 0..buf.get_u16() {
                match foca::PostcardCodec.decode_member(&mut buf) {
                    Ok(m) => updates.push(m),
                    Err(_) => return Ok(data), // foca refuses it itself
                }
            }
        }
        let now_ms = wall_ms();
        let latest = now_ms + super::controls::MAX_AHEAD.as_millis() as u64;
        let mut t = self.table.locked();
        // Who holds the addresses the packet names: live peers by their
        // signed records and where this node met their certificates, and
        // this node itself (one pass over the peers, no index of them all).
        let named: HashSet<&str> = updates
            .iter()
            .map(|m: &foca::Member<super::Ident>| m.id().address.as_str())
            .chain([src.address.as_str()])
            .collect();
        let mut holders: HashMap<&str, &str> = t
            .peers
            .iter()
            .filter(|(_, p)| p.live() && named.contains(p.address.as_str()))
            .map(|(id, p)| (p.address.as_str(), id.as_str()))
            .collect();
        holders.insert(self.address.as_str(), self.id.as_str());
        let squatter = |id: &super::Ident| {
            holders
                .get(id.address.as_str())
                .filter(|holder| **holder != id.node_id)
                .map(|h| h.to_string())
                .or_else(|| self.squatting(&id.node_id, &id.address))
        };
        if let Some(holder) = squatter(src) {
            let reason = format!(
                "its SWIM identity is at {}, the address of node {holder}",
                crate::wire::short(&src.address)
            );
            tracing::warn!(peer = %caller.who(), "refused a SWIM packet: {reason}");
            return Err(invalid(reason));
        }
        // Why each update is not believed (None: it is).
        let verdicts: Vec<Option<String>> = updates
            .iter()
            .map(|m| {
                let id: &super::Ident = m.id();
                if id.node_id == self.id {
                    return None; // this node refutes what is said of it
                }
                if let Some(holder) = squatter(id) {
                    return Some(format!(
                        "node {} at {}, the address of node {holder}",
                        crate::wire::short(&id.node_id),
                        crate::wire::short(&id.address)
                    ));
                }
                let own = match t.peers.get(&id.node_id) {
                    Some(p) => p
                        .record
                        .as_ref()
                        .map_or(0, |r| r.incarnation)
                        .max(p.swim_bump),
                    None => 0,
                };
                let bound = if own == 0 {
                    latest
                } else {
                    own.max(src_bump_if(id, src))
                };
                (id.bump > bound).then(|| {
                    format!(
                        "node {} at identity {}, beyond the {bound} it announced itself",
                        crate::wire::short(&id.node_id),
                        id.bump
                    )
                })
            })
            .collect();
        if let Some(p) = t.peers.get_mut(&src.node_id) {
            p.swim_bump = p.swim_bump.max(src.bump);
        }
        drop(t);
        let why: Vec<&str> = verdicts.iter().flatten().map(String::as_str).collect();
        if why.is_empty() {
            return Ok(data);
        }
        tracing::warn!(peer = %caller.who(), "ignoring SWIM updates: {}", why.join("; "));
        let keep: Vec<_> = updates
            .into_iter()
            .zip(&verdicts)
            .filter(|(_, v)| v.is_none())
            .map(|(m, _)| m)
            .collect();
        let mut out = Vec::with_capacity(data.len());
        foca::PostcardCodec
            .encode_header(&header, &mut out)
            .map_err(|_| invalid("a SWIM header that does not encode".into()))?;
        out.put_u16(keep.len() as u16);
        for m in &keep {
            foca::PostcardCodec
                .encode_member(m, &mut out)
                .map_err(|_| invalid("a SWIM member that does not encode".into()))?;
        }
        out.extend_from_slice(buf);
        Ok(out.into())
    }

    /// The node that presented its certificate at `address` when this
    /// node dialled it, if that is not `id`.
    pub(super) fn squatting(&self, id: &str, address: &str) -> Option<String> {
        self.transport
            .identity(address)
            .filter(|holder| holder != id)
    }

    /// What a record must pass under TLS before anything of it is used:
    /// it is signed by its owner, its address is not another node's and
    /// every version it lists is signed by its publisher. Returns the
    /// controls signed by an operator (others are passed over; without TLS
    /// there are none to take), or `None` for a relayed record no newer
    /// than the one held, which would change nothing (so copies cost no
    /// checks).
    pub(super) fn check_trust(
        &self,
        h: &pb::Holdings,
        id: &str,
        peer: &str,
        via: super::Via<'_>,
    ) -> Result<Option<Vec<Signed>>, crate::error::Refusal> {
        let Some(s) = self.signatures.get() else {
            return Ok(Some(Vec::new()));
        };
        if matches!(via, super::Via::Relay(_))
            && self
                .table
                .locked()
                .peers
                .get(id)
                .is_some_and(|p| p.key() >= (h.incarnation, h.seq))
        {
            return Ok(None);
        }
        if let Err(reason) = s.check_owner(h, id) {
            let reason = format!("the record of {id}: {reason}");
            tracing::warn!(peer = %peer, "refused a record its owner did not sign: {reason}");
            return Err(crate::error::Refusal::Invalid {
                peer: peer.to_string(),
                reason,
            });
        }
        let address = h.from.as_ref().map_or("", |m| m.address.as_str());
        if let Some(holder) = self.squatting(id, address) {
            let reason = format!(
                "the record of {id} gives address {}, where node {holder} presented its certificate",
                crate::wire::short(address)
            );
            tracing::warn!(peer = %peer, "refused a record claiming another node's address: {reason}");
            return Err(crate::error::Refusal::Denied {
                peer: peer.to_string(),
                reason,
            });
        }
        if let Err(reason) = s.check_record(h) {
            let reason = format!("in the record of {id}: {reason}");
            tracing::warn!(peer = %peer, "refused a record with a version no publisher signed: {reason}");
            return Err(crate::error::Refusal::Invalid {
                peer: peer.to_string(),
                reason,
            });
        }
        let (controls, bad) = s.check_controls(h);
        for reason in bad {
            tracing::warn!(peer = %peer, "ignoring a fleet control no operator of this fleet signed: in the record of {id}: {reason}");
        }
        Ok(Some(controls))
    }
}
