use super::*;

fn open(dir: &Path) -> Store {
    Store::open(dir, ChunkerConfig::default()).unwrap()
}

#[test]
fn refuses_other_chunk_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    drop(open(tmp.path()));
    let other = ChunkerConfig::new(8 << 10, 32 << 10, 128 << 10).unwrap();
    let err = Store::open(tmp.path(), other).unwrap_err();
    assert!(matches!(err, Error::ChunkerMismatch { .. }), "{err}");
    assert!(err.to_string().contains("16384/65536/262144"), "{err}");
}

#[test]
fn locations_round_trip_across_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hash::of(b"chunk");
    {
        let s = open(tmp.path());
        let mut b = s.batch();
        b.put_location(&h, "www", "a/b.bin", 65536, 1000, false);
        b.put_location(&h, "www", ".sync-tmp/c.part", 0, 1000, true);
        b.put_location(&Hash::of(b"other"), "www", "x", 0, 5, false);
        s.commit(b, true).unwrap();
    }
    let s = open(tmp.path());
    let mut locs = s.chunk_locations(&h).unwrap();
    locs.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(
        locs,
        vec![
            ChunkLocation {
                dir: "www".into(),
                path: ".sync-tmp/c.part".into(),
                offset: 0,
                len: 1000,
                partial: true
            },
            ChunkLocation {
                dir: "www".into(),
                path: "a/b.bin".into(),
                offset: 65536,
                len: 1000,
                partial: false
            },
        ]
    );
    assert!(s.has_chunk(&h).unwrap());
    assert!(!s.has_chunk(&Hash::of(b"absent")).unwrap());
    let mut probe = s.chunk_probe();
    assert!(probe.has(&h).unwrap());
    assert!(!probe.has(&Hash::of(b"absent")).unwrap());
    assert!(probe.has(&Hash::of(b"other")).unwrap());
    drop(probe);
    let mut b = s.batch();
    b.delete_location(&h, "www", "a/b.bin");
    s.commit(b, false).unwrap();
    assert_eq!(s.chunk_locations(&h).unwrap().len(), 1);
}

#[test]
fn dir_ids_are_validated() {
    assert!(validate_dir_id("www").is_ok());
    assert!(validate_dir_id("").is_err());
    assert!(validate_dir_id("a\0b").is_err());
    assert!(validate_dir_id(&"x".repeat(129)).is_err());
}
