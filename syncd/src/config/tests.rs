use super::*;
use crate::bandwidth::Caps;

struct Files(tempfile::TempDir);

impl Files {
    fn new(node: &str) -> Files {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("syncd.toml"), node).unwrap();
        std::fs::create_dir(t.path().join(DIRS_D)).unwrap();
        Files(t)
    }
    fn dir(self, name: &str, text: &str) -> Files {
        std::fs::write(self.0.path().join(DIRS_D).join(name), text).unwrap();
        self
    }
    fn load(&self) -> Result<Config, ConfigError> {
        Config::load(&self.0.path().join("syncd.toml"))
    }
    fn err(&self) -> String {
        self.load().unwrap_err().to_string()
    }
}

const NODE: &str = r#"
[node]
id = "web-01"
listen = "0.0.0.0:7400"
advertise = "10.0.0.1:7400"
state_dir = "/var/lib/syncd"
peers = ["10.0.0.2:7400", "seed.example:7400"]
labels = { region = "eu-west", zone = "a", rack = "r12" }
[admin]
socket = "/run/syncd/syncd.sock"
[metrics]
listen = "127.0.0.1:9740"
"#;

const WWW: &str = r#"
id = "www"
path = "/srv/www"
mode = "source"
ignore = ["*.tmp", ".cache/"]
"#;

#[test]
fn the_documented_example_loads() {
    let f = Files::new(NODE).dir("www.toml", WWW).dir(
        "conf.toml",
        "id = \"conf\"\npath = \"/etc/app\"\nmode = \"replica\"\nrescan_interval = \"15m\"\n",
    );
    let c = f.load().unwrap();
    assert_eq!(c.listen, "0.0.0.0:7400".parse().unwrap());
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9740".parse().unwrap()));
    assert_eq!(c.dirs.len(), 2);
    let (_, www) = &c.dirs["www"];
    assert_eq!(*www.mode.get_ref(), Mode::Source);
    assert_eq!(www.rescan_interval, Duration::from_secs(3600));
    assert_eq!(c.dirs["conf"].1.rescan_interval, Duration::from_secs(900));
}

#[test]
fn unknown_keys_are_errors_with_file_and_line() {
    let f = Files::new(NODE).dir("www.toml", &format!("{WWW}rescan_intervall = \"1h\"\n"));
    let e = f.err();
    assert!(e.contains("www.toml"), "{e}");
    assert!(e.contains("line 6"), "{e}");
    assert!(e.contains("rescan_intervall"), "{e}");
    let f = Files::new(&NODE.replace("[admin]", "[admin]\nsokcet = \"x\""));
    let e = f.err();
    assert!(
        e.contains("syncd.toml") && e.contains("sokcet") && e.contains("line 10"),
        "{e}"
    );
}

#[test]
fn semantic_errors_name_the_line() {
    let cases: [(&str, &str, &str); 8] = [
        (
            "ignore = [\"*.tmp\", \".cache/\"]",
            "ignore = [\"ok\", \"[broken\"]",
            ":5: ignore pattern \"[broken\"",
        ),
        (
            "mode = \"source\"",
            "mode = \"source\"\non_synced = [\"\", \"x\"]",
            ":5: on_synced must name a program",
        ),
        (
            "path = \"/srv/www\"",
            "path = \"srv/www\"",
            ":3: path \"srv/www\" must be absolute",
        ),
        (
            "id = \"www\"",
            "id = \"w w\"",
            ":2: directory id \"w w\" may only contain",
        ),
        (
            "mode = \"source\"",
            "mode = \"two-way\"",
            ":4: mode \"two-way\" is not supported",
        ),
        (
            "mode = \"source\"",
            "mode = \"sauce\"",
            "unknown variant `sauce`",
        ),
        (
            "path = \"/srv/www\"",
            "path = \"/var/lib/syncd/x\"",
            "overlaps state_dir",
        ),
        (
            "path = \"/srv/www\"",
            "path = \"/srv/../etc\"",
            "contains '..'",
        ),
    ];
    for (from, to, want) in cases {
        let f = Files::new(NODE).dir("www.toml", &WWW.replace(from, to));
        let e = f.err();
        assert!(
            e.contains("www.toml") && e.contains(want),
            "{e} should contain {want}"
        );
    }
    for (from, to, want) in [
        (
            "listen = \"0.0.0.0:7400\"",
            "listen = \"0.0.0.0\"",
            ":4: listen \"0.0.0.0\" is not an address:port",
        ),
        (
            "rack = \"r12\"",
            "rakc = \"r12\"",
            ":8: unknown label \"rakc\"",
        ),
        (
            "\"10.0.0.2:7400\"",
            "\"10.0.0.2\"",
            ":7: peer \"10.0.0.2\" is not host:port",
        ),
        (
            "id = \"web-01\"",
            "id = \"web/01\"",
            ":3: node id \"web/01\"",
        ),
    ] {
        let f = Files::new(&NODE.replace(from, to));
        let e = f.err();
        assert!(
            e.contains("syncd.toml") && e.contains(want),
            "{e} should contain {want}"
        );
    }
}

#[test]
fn duplicate_ids_and_overlapping_paths_are_rejected() {
    let f = Files::new(NODE)
        .dir("a.toml", WWW)
        .dir("b.toml", &WWW.replace("/srv/www", "/srv/other"));
    let e = f.err();
    assert!(
        e.contains("b.toml:2: directory id \"www\" is already defined in") && e.contains("a.toml"),
        "{e}"
    );
    let f = Files::new(NODE).dir("a.toml", WWW).dir(
        "b.toml",
        &WWW.replace("\"www\"", "\"sub\"")
            .replace("/srv/www", "/srv/www/sub"),
    );
    let e = f.err();
    assert!(
        e.contains("b.toml:3: path \"/srv/www/sub\" overlaps \"/srv/www\""),
        "{e}"
    );
}

#[test]
fn missing_files_are_named() {
    let t = tempfile::tempdir().unwrap();
    let e = Config::load(&t.path().join("syncd.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("syncd.toml: cannot read"), "{e}");
    // No dirs.d at all is fine: a node with no directories yet.
    let f = Files::new(NODE);
    std::fs::remove_dir(f.0.path().join(DIRS_D)).unwrap();
    assert!(f.load().unwrap().dirs.is_empty());
}

/// Issue 8 item 1: the shipped example's wildcard listen address is not
/// something peers can dial.
#[test]
fn a_wildcard_listen_address_needs_advertise() {
    let f = Files::new(&NODE.replace("advertise = \"10.0.0.1:7400\"\n", ""));
    let e = f.err();
    assert!(
        e.contains("syncd.toml:4:") && e.contains("wildcard") && e.contains("advertise = "),
        "{e}"
    );
    let f = Files::new(&NODE.replace("10.0.0.1:7400", "0.0.0.0:7400"));
    assert!(
        f.err().contains("advertise \"0.0.0.0:7400\" must be"),
        "{}",
        f.err()
    );
    let f = Files::new(NODE);
    assert_eq!(f.load().unwrap().advertise, "10.0.0.1:7400");
    // A specific listen address is advertised as is.
    let f = Files::new(
        &NODE
            .replace("advertise = \"10.0.0.1:7400\"\n", "")
            .replace("0.0.0.0:7400", "10.0.0.9:7400"),
    );
    assert_eq!(f.load().unwrap().advertise, "10.0.0.9:7400");
}

/// Issue 8 item 12: rescans have a floor, sizes have units.
#[test]
fn rescan_interval_has_a_minimum_and_sizes_have_units() {
    let f = Files::new(NODE).dir("www.toml", &format!("{WWW}rescan_interval = \"0s\"\n"));
    let e = f.err();
    assert!(
        e.contains("www.toml:6: rescan_interval 0s is below the minimum of 10s"),
        "{e}"
    );
    let f = Files::new(NODE).dir(
        "www.toml",
        &format!("{WWW}max_file_size = \"64GiB\"\nmin_free_space = \"1.5GiB\"\n"),
    );
    let c = f.load().unwrap();
    let (_, d) = &c.dirs["www"];
    assert_eq!(d.max_file_size.get_ref().0, 64 << 30);
    assert_eq!(d.min_free_space.get_ref().0, 3 << 29);
    let f = Files::new(NODE).dir(
        "www.toml",
        &format!("{WWW}max_file_size = \"12 parsecs\"\n"),
    );
    assert!(f.err().contains("unknown unit"), "{}", f.err());
}

/// Issue 8 item 12: overlaps are found on canonical paths.
#[test]
fn overlaps_through_symlinks_are_rejected() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let real = t.path().join("real");
    std::fs::create_dir_all(state.join("index")).unwrap();
    std::fs::create_dir_all(&real).unwrap();
    std::os::unix::fs::symlink(state.join("index"), t.path().join("into-state")).unwrap();
    std::os::unix::fs::symlink(&real, t.path().join("alias")).unwrap();
    let node = NODE.replace("/var/lib/syncd", &state.display().to_string());
    let dir = |id: &str, path: &std::path::Path| {
        format!(
            "id = \"{id}\"\npath = \"{}\"\nmode = \"replica\"\n",
            path.display()
        )
    };
    let f = Files::new(&node).dir("a.toml", &dir("a", &t.path().join("into-state")));
    assert!(f.err().contains("overlaps state_dir"), "{}", f.err());
    let f = Files::new(&node)
        .dir("a.toml", &dir("a", &real))
        .dir("b.toml", &dir("b", &t.path().join("alias")));
    let e = f.err();
    assert!(e.contains("b.toml:2:") && e.contains("overlaps"), "{e}");
    // A path that does not exist yet is compared through its parent.
    let f = Files::new(&node)
        .dir("a.toml", &dir("a", &t.path().join("alias/sub/new")))
        .dir("b.toml", &dir("b", &real));
    assert!(f.err().contains("overlaps"), "{}", f.err());
}

/// Bandwidth caps per node and per directory, and priorities: parsed with
/// units, absent means no cap and normal priority, and a zero cap or an
/// unknown class is an error naming the file and line.
#[test]
fn limits_and_priorities() {
    let node = format!("{NODE}[limits]\nupload = \"25MB\"\ndownload = \"100MiB\"\n");
    let f = Files::new(&node)
        .dir(
            "bulk.toml",
            "id = \"bulk\"\npath = \"/srv/bulk\"\nmode = \"replica\"\npriority = \"low\"\n\n[limits]\ndownload = \"10MB\"\n",
        )
        .dir("www.toml", WWW);
    let c = f.load().unwrap();
    assert_eq!(
        c.node.limits.caps(),
        Caps {
            upload: Some(25_000_000),
            download: Some(100 << 20)
        }
    );
    let bulk = &c.dirs["bulk"].1;
    assert_eq!(bulk.priority, Priority::Low);
    assert_eq!(bulk.limits.caps().download, Some(10_000_000));
    assert_eq!(bulk.limits.caps().upload, None);
    let www = &c.dirs["www"].1;
    assert_eq!(www.priority, Priority::Normal);
    assert_eq!(www.limits.caps(), Caps::default());

    let zero = format!("{NODE}[limits]\nupload = \"0\"\n");
    let e = Files::new(&zero).err();
    assert!(
        e.contains("syncd.toml:14: limits upload must be at least 256KiB"),
        "{e}"
    );
    let e = Files::new(NODE)
        .dir(
            "a.toml",
            "id = \"a\"\npath = \"/srv/a\"\nmode = \"replica\"\npriority = \"urgent\"\n",
        )
        .err();
    assert!(e.contains("a.toml") && e.contains("urgent"), "{e}");
}

/// `[serve]`: defaults when absent, values when given, and out-of-range
/// values refused with the file and line.
#[test]
fn serving_limits_and_origin_protection() {
    let c = Files::new(NODE).load().unwrap();
    assert_eq!(c.node.serve, ServeSection::default());
    assert_eq!(c.node.serve.streams, 32);
    assert_eq!(c.node.serve.spread_window, Duration::from_secs(3));
    let node =
        format!("{NODE}[serve]\nstreams = 64\nstreams_per_peer = 2\nspread_window = \"500ms\"\n");
    let c = Files::new(&node).load().unwrap();
    assert_eq!(
        c.node.serve,
        ServeSection {
            streams: 64,
            streams_per_peer: 2,
            spread_window: Duration::from_millis(500),
        }
    );
    let off = format!("{NODE}[serve]\nspread_window = \"0s\"\n");
    assert!(
        Files::new(&off)
            .load()
            .unwrap()
            .node
            .serve
            .spread_window
            .is_zero()
    );
    for (text, want) in [
        (
            "streams = 0\n",
            "syncd.toml:14: serve streams must be 1 to 1024",
        ),
        (
            "streams = 4\nstreams_per_peer = 8\n",
            "syncd.toml:15: serve streams_per_peer must be 1 to streams (4)",
        ),
        (
            "spread_window = \"2m\"\n",
            "syncd.toml:14: serve spread_window must be at most 60s",
        ),
    ] {
        let e = Files::new(&format!("{NODE}[serve]\n{text}")).err();
        assert!(e.contains(want), "{e}");
    }
}

/// `[tls]`: paths relative to syncd.toml; the files are checked at load
/// (the certificate must name this node), errors name syncd.toml's line
/// and the certificate file.
#[test]
fn tls_files_are_checked_at_load() {
    let node = format!(
        "{NODE}[tls]\nca = \"pki/ca.pem\"\ncert = \"certs/web-01.pem\"\nkey = \"certs/web-01.key\"\n"
    );
    let f = Files::new(&node);
    let base = f.0.path();
    let e = f.err();
    assert!(
        e.contains("syncd.toml:15: [tls]") && e.contains("ca.pem: cannot read"),
        "{e}"
    );
    crate::tls::pki::init(&base.join("pki"), "test CA", 30).unwrap();
    crate::tls::pki::issue(&base.join("pki"), "web-01", 30, &base.join("certs")).unwrap();
    crate::tls::pki::issue(&base.join("pki"), "web-02", 30, &base.join("certs")).unwrap();
    let c = f.load().unwrap();
    assert_eq!(c.node.tls.unwrap().cert, base.join("certs/web-01.pem"));
    let other = node.replace("certs/web-01.", "certs/web-02.");
    std::fs::write(base.join("syncd.toml"), other).unwrap();
    let e = f.err();
    assert!(
        e.contains("web-02.pem: the certificate is for node \"web-02\", this node is \"web-01\""),
        "{e}"
    );
}

/// `publishers`: node ids, only with `[tls]` (versions are signed with the
/// node's key), and a source must be among its own publishers.
#[test]
fn publishers_need_tls_and_include_a_source() {
    let www = format!("{WWW}publishers = [\"web-01\", \"web-02\"]\n");
    let e = Files::new(NODE).dir("www.toml", &www).err();
    assert!(
        e.contains("www.toml:6: publishers needs [tls] in syncd.toml"),
        "{e}"
    );
    let node = format!(
        "{NODE}[tls]\nca = \"pki/ca.pem\"\ncert = \"certs/web-01.pem\"\nkey = \"certs/web-01.key\"\n"
    );
    let f = Files::new(&node).dir("www.toml", &www);
    let base = f.0.path();
    crate::tls::pki::init(&base.join("pki"), "test CA", 30).unwrap();
    crate::tls::pki::issue(&base.join("pki"), "web-01", 30, &base.join("certs")).unwrap();
    let c = f.load().unwrap();
    assert_eq!(
        c.dirs["www"].1.publishers.get_ref(),
        &vec!["web-01".to_string(), "web-02".to_string()]
    );
    let f = f.dir("www.toml", &format!("{WWW}publishers = [\"web-02\"]\n"));
    let e = f.err();
    assert!(
        e.contains("this node (\"web-01\") is a source of \"www\" but not among its publishers"),
        "{e}"
    );
    let f = f.dir("www.toml", &format!("{WWW}publishers = [\"web 02\"]\n"));
    assert!(f.err().contains("publisher"), "{}", f.err());
}
