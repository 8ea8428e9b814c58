//! Where a peer is relative to this node, from the `region`, `zone` and
//! `rack` labels: chunk sources are tried nearest first, and transfer
//! metrics are split by class.

use std::collections::BTreeMap;

/// How near a peer is. Ordered nearest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerClass {
    SameRack,
    SameZone,
    SameRegion,
    Elsewhere,
}

impl PeerClass {
    pub const ALL: [PeerClass; 4] = [
        PeerClass::SameRack,
        PeerClass::SameZone,
        PeerClass::SameRegion,
        PeerClass::Elsewhere,
    ];

    /// The class of a peer with labels `theirs`, seen from `mine`. A level
    /// counts only if every level above it matches too (rack "r1" in two
    /// zones is two racks); a label missing on either side never matches.
    pub fn of(mine: &BTreeMap<String, String>, theirs: &BTreeMap<String, String>) -> PeerClass {
        let same = |k: &str| matches!((mine.get(k), theirs.get(k)), (Some(a), Some(b)) if a == b);
        match (same("region"), same("zone"), same("rack")) {
            (true, true, true) => PeerClass::SameRack,
            (true, true, false) => PeerClass::SameZone,
            (true, false, _) => PeerClass::SameRegion,
            (false, _, _) => PeerClass::Elsewhere,
        }
    }

    /// The label value used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerClass::SameRack => "same_rack",
            PeerClass::SameZone => "same_zone",
            PeerClass::SameRegion => "same_region",
            PeerClass::Elsewhere => "elsewhere",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn classes_need_every_level_above_to_match() {
        let me = labels(&[("region", "eu"), ("zone", "a"), ("rack", "r1")]);
        let cases = [
            (
                labels(&[("region", "eu"), ("zone", "a"), ("rack", "r1")]),
                PeerClass::SameRack,
            ),
            (
                labels(&[("region", "eu"), ("zone", "a"), ("rack", "r2")]),
                PeerClass::SameZone,
            ),
            (
                labels(&[("region", "eu"), ("zone", "b"), ("rack", "r1")]),
                PeerClass::SameRegion,
            ),
            (
                labels(&[("region", "us"), ("zone", "a"), ("rack", "r1")]),
                PeerClass::Elsewhere,
            ),
            (
                labels(&[("zone", "a"), ("rack", "r1")]),
                PeerClass::Elsewhere,
            ),
            (labels(&[]), PeerClass::Elsewhere),
        ];
        for (theirs, want) in cases {
            assert_eq!(PeerClass::of(&me, &theirs), want, "{theirs:?}");
        }
        assert_eq!(
            PeerClass::of(&labels(&[]), &labels(&[])),
            PeerClass::Elsewhere
        );
        assert!(PeerClass::SameRack < PeerClass::Elsewhere);
    }
}
