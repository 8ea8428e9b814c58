//! What a peer's words must look like before anything uses them: the one
//! place for the id rule (configuration, records, requests), member and
//! record validation, and the bounds of a record. Errors name what was
//! wrong, so refusals can say whose fault it was.

use prost::Message as _;
use sync_proto::pb;

/// The protocol version this node speaks (PROTOCOL.md); a peer of any
/// other version is refused with a clear error.
pub const PROTOCOL: u32 = 2;
/// Longest node or directory id.
pub const MAX_ID_LEN: usize = 128;
/// Topology label keys; labels weight peer choice, so a typo in a key would
/// silently make every peer "elsewhere".
pub const LABEL_KEYS: [&str; 3] = ["region", "zone", "rack"];
/// Largest record (one node's `Holdings`, encoded) kept or relayed:
/// a few hundred directories with their reports.
pub const MAX_RECORD_BYTES: usize = 64 << 10;
/// Most directories one record may list (held, pulling, reports each).
pub const MAX_RECORD_DIRS: usize = 1024;
/// Largest certificate a record may carry (`syncd pki issue` makes them
/// under 600 bytes).
pub const MAX_CERT_BYTES: usize = 2048;
/// Most certificates one record may carry: one per publisher of the
/// versions it lists.
pub const MAX_RECORD_CERTS: usize = 64;
/// Most fleet controls one record may carry (newest per directory and
/// kind; `tls::control`).
pub const MAX_RECORD_CONTROLS: usize = 64;
/// Actions a fleet control may carry.
pub const CONTROL_ACTIONS: [&str; 3] = ["pause", "resume", "priority"];
/// Priorities a fleet control may set.
pub const PRIORITIES: [&str; 3] = ["high", "normal", "low"];
/// Version and control signatures are Ed25519 (`tls::sign`).
pub const SIGNATURE_BYTES: usize = 64;
/// An error text in a report is cut to this many bytes.
pub const MAX_REPORT_ERROR: usize = 256;
/// State names a report may carry.
pub const STATES: [&str; 6] = ["idle", "waiting", "scanning", "syncing", "paused", "error"];
/// Mode names a report may carry.
pub const MODES: [&str; 3] = ["source", "replica", "two-way"];

/// Node and directory ids: `[A-Za-z0-9._-]{1,128}` (they become keys,
/// metric labels and file names).
pub fn is_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Lowercase hex, as roots are shown to operators and hooks.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// At most 128 characters of something a peer sent, for an error message.
pub fn short(t: &str) -> String {
    t.chars().take(128).collect()
}

/// Topology labels a peer may declare: the configuration's keys, values
/// of the id form, so a peer cannot make us keep megabytes of labels.
fn labels_ok(labels: &std::collections::HashMap<String, String>) -> bool {
    labels.len() <= LABEL_KEYS.len()
        && labels
            .iter()
            .all(|(k, v)| LABEL_KEYS.contains(&k.as_str()) && is_id(v))
}

/// A member's identity: id, `host:port` address of at most 256 bytes,
/// labels as above.
pub fn check_member(m: &pb::Member) -> Result<(), String> {
    let addr_ok = m.address.len() <= 256
        && m.address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if is_id(&m.node_id) && addr_ok && labels_ok(&m.labels) {
        Ok(())
    } else {
        Err(format!(
            "malformed member {:?} at {:?} (ids [A-Za-z0-9._-]{{1,128}}, host:port, labels region/zone/rack)",
            short(&m.node_id),
            short(&m.address)
        ))
    }
}

fn check_version(d: &pb::DirVersion) -> Result<(), String> {
    if d.root.len() != 32
        || !is_id(&d.dir)
        || !(d.publisher.is_empty() || is_id(&d.publisher))
        || !(d.signature.is_empty() || d.signature.len() == SIGNATURE_BYTES)
    {
        return Err(format!("malformed holding for {:?}", short(&d.dir)));
    }
    Ok(())
}

/// A fleet control's shape (its signature is checked under TLS).
pub fn check_control(c: &pb::Control) -> Result<(), String> {
    let priority_ok = if c.action == "priority" {
        PRIORITIES.contains(&c.priority.as_str())
    } else {
        c.priority.is_empty()
    };
    if is_id(&c.dir)
        && CONTROL_ACTIONS.contains(&c.action.as_str())
        && priority_ok
        && is_id(&c.operator)
        && c.signature.len() == SIGNATURE_BYTES
    {
        Ok(())
    } else {
        Err(format!(
            "a malformed fleet control ({:?} of {:?})",
            short(&c.action),
            short(&c.dir)
        ))
    }
}

/// A whole record (a node's `Holdings`): its member, every version and
/// report, its size, and its protocol. Returns the sender's id.
pub fn check_record(h: &pb::Holdings) -> Result<&pb::Member, String> {
    let from = h.from.as_ref().ok_or("holdings without sender")?;
    check_member(from)?;
    check_protocol(h.protocol)?;
    if h.dirs.len() > MAX_RECORD_DIRS
        || h.pulling.len() > MAX_RECORD_DIRS
        || h.reports.len() > MAX_RECORD_DIRS
    {
        return Err(format!(
            "record of {} lists more than {MAX_RECORD_DIRS} directories",
            from.node_id
        ));
    }
    let size = h.encoded_len();
    if size > MAX_RECORD_BYTES {
        return Err(format!(
            "record of {} is {size} bytes, more than {MAX_RECORD_BYTES}",
            from.node_id
        ));
    }
    for d in h.dirs.iter().chain(&h.pulling) {
        check_version(d)?;
    }
    if h.certificates.len() > MAX_RECORD_CERTS
        || h.certificates.iter().any(|c| c.len() > MAX_CERT_BYTES)
    {
        return Err(format!(
            "record of {} carries more than {MAX_RECORD_CERTS} certificates or one over {MAX_CERT_BYTES} bytes",
            from.node_id
        ));
    }
    if h.controls.len() > MAX_RECORD_CONTROLS {
        return Err(format!(
            "record of {} carries more than {MAX_RECORD_CONTROLS} fleet controls",
            from.node_id
        ));
    }
    for c in &h.controls {
        check_control(c).map_err(|e| format!("{e} in the record of {}", from.node_id))?;
    }
    for r in &h.reports {
        if !is_id(&r.dir)
            || !STATES.contains(&r.state.as_str())
            || !MODES.contains(&r.mode.as_str())
            || r.last_error.len() > MAX_REPORT_ERROR
            || r.control.len() > MAX_REPORT_ERROR
            || !r.rate.is_finite()
            || r.rate < 0.0
        {
            return Err(format!(
                "malformed report for {:?} in the record of {}",
                short(&r.dir),
                from.node_id
            ));
        }
    }
    Ok(from)
}

/// Only this node's protocol version is spoken.
pub fn check_protocol(v: u32) -> Result<(), String> {
    if v == PROTOCOL {
        Ok(())
    } else {
        Err(format!(
            "peer speaks syncd protocol {}, this node speaks {PROTOCOL}: upgrade the older node",
            if v == 0 {
                "1 (or older)".to_string()
            } else {
                v.to_string()
            }
        ))
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_one_rule() {
        assert!(is_id("web-01.a_b"));
        assert!(!is_id(""));
        assert!(!is_id(&"a".repeat(129)));
        assert!(!is_id("a/b"));
        assert!(!is_id("é"));
    }

    #[test]
    fn records_are_bounded_and_versioned() {
        let member = pb::Member {
            node_id: "n1".into(),
            address: "10.0.0.1:7400".into(),
            labels: Default::default(),
        };
        let mut h = pb::Holdings {
            from: Some(member),
            protocol: PROTOCOL,
            ..Default::default()
        };
        assert!(check_record(&h).is_ok());
        h.protocol = 1;
        assert!(check_record(&h).unwrap_err().contains("protocol 1"));
        h.protocol = PROTOCOL;
        h.reports.push(pb::DirReport {
            dir: "www".into(),
            state: "idle".into(),
            mode: "replica".into(),
            last_error: "x".repeat(MAX_REPORT_ERROR + 1),
            ..Default::default()
        });
        assert!(check_record(&h).unwrap_err().contains("malformed report"));
        h.reports[0].last_error = truncate(&"é".repeat(200), MAX_REPORT_ERROR);
        assert!(h.reports[0].last_error.len() <= MAX_REPORT_ERROR);
        assert!(check_record(&h).is_ok());
        h.dirs = (0..=MAX_RECORD_DIRS)
            .map(|i| pb::DirVersion {
                dir: format!("d{i}"),
                root: vec![0; 32],
                ..Default::default()
            })
            .collect();
        assert!(check_record(&h).unwrap_err().contains("more than"));
    }
}
