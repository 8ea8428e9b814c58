//! The swarm and bandwidth against real daemons on loopback: receivers
//! feed each other while they receive (the origin sends about one copy),
//! `syncctl status` shows a transfer's sources and ETA, upload and download
//! caps hold, a high-priority directory overtakes a low-priority transfer,
//! and pause holds a transfer where it is. Caps (`[limits]`) stand in for
//! slow links, so where the bytes come from decides how long it takes.

use std::fs;
use std::time::{Duration, Instant};

mod common;
use common::{Daemon, converge, ctl, ctl_json, until};

const MIB: u64 = 1 << 20;

fn dir<'a>(status: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    status["dirs"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == id))
        .unwrap_or_else(|| panic!("no directory {id} in {status}"))
}

/// Chunk bytes `d` served to its peers, by `syncctl peers`.
fn served(d: &Daemon) -> u64 {
    ctl_json(d, &["peers"])["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["bytes_sent"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn receivers_feed_each_other_and_spare_the_origin() {
    let tmp = tempfile::tempdir().unwrap();
    let ips = ["127.0.0.91", "127.0.0.92", "127.0.0.93", "127.0.0.94"];
    // Every node uploads at most 4 MB/s: the origin alone would need 3 x
    // 24 MiB / 4 MB/s = 19 s; a swarm about a third of that.
    let caps = "[limits]\nupload = \"4MB\"";
    let src = Daemon::with(tmp.path(), "src", ips[0], "source", &[], caps, "");
    fs::write(src.data.join("hello"), b"hello").unwrap();
    let rs: Vec<Daemon> = (1..4)
        .map(|i| {
            Daemon::with(
                tmp.path(),
                &format!("r{i}"),
                ips[i],
                "replica",
                &[ips[0]],
                caps,
                "",
            )
        })
        .collect();
    let refs: Vec<&Daemon> = rs.iter().collect();
    converge(&src, &refs, "initial");
    until(30, "every node to see every other alive", || {
        refs.iter()
            .all(|r| ctl_json(r, &["status"])["peers"]["alive"] == 3)
            .then_some(())
    });
    let before: Vec<u64> = std::iter::once(&src)
        .chain(refs.iter().copied())
        .map(served)
        .collect();

    let size = 24 * MIB;
    fs::write(
        src.data.join("big.bin"),
        chunk_store::testdata::pseudo_random(size as usize, 91),
    )
    .unwrap();
    // While it runs, r1's status names its sources (the origin and at
    // least one receiver feeding it) and an ETA.
    let start = Instant::now();
    let seen = until(60, "r1 to show several sources and an ETA", || {
        let s = ctl_json(&rs[0], &["status"]);
        let d = dir(&s, "www");
        let sources = d["sources"].as_array().cloned().unwrap_or_default();
        let receiving = sources.iter().filter(|x| x["full"] != true).count();
        (receiving >= 1 && d["eta_seconds"].as_f64().unwrap_or(0.0) > 0.0).then(|| {
            let text = ctl(&rs[0], &["status"]).1;
            (sources, text)
        })
    });
    assert!(
        seen.1.contains("www: sources:") && seen.1.contains("(receiving)"),
        "syncctl status shows the sources: {}",
        seen.1
    );
    converge(&src, &refs, "the 24 MiB file");
    let took = start.elapsed();
    let after: Vec<u64> = std::iter::once(&src)
        .chain(refs.iter().copied())
        .map(served)
        .collect();
    let up: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let copies = |b: u64| b as f64 / size as f64;
    eprintln!(
        "24 MiB to 3 receivers in {took:?}: origin sent {:.2} copies, receivers {:.2}, {:.2}, {:.2}",
        copies(up[0]),
        copies(up[1]),
        copies(up[2]),
        copies(up[3])
    );
    // The old fetcher had the origin send every receiver its own copy (3).
    assert!(
        copies(up[0]) < 1.7,
        "the origin sent {:.2} copies",
        copies(up[0])
    );
    for (i, u) in up.iter().enumerate().skip(1) {
        assert!(*u > 2 * MIB, "receiver r{i} fed the others only {u} bytes");
    }
    // The origin's cap held: it cannot have sent faster than 4 MB/s (plus
    // its one-call burst).
    let floor = (up[0].saturating_sub(4 * MIB)) as f64 / 4e6;
    assert!(
        took.as_secs_f64() >= floor * 0.9,
        "the origin sent {} bytes in {took:?}: over its 4 MB/s cap",
        up[0]
    );
}

#[test]
fn a_high_priority_directory_overtakes_and_pause_holds_a_transfer() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = ("127.0.0.95", "127.0.0.96");
    let src = Daemon::new(tmp.path(), "src", a, "source", &[b]);
    // The receiver's download cap is the bottleneck: 4 MB/s.
    let r = Daemon::with(
        tmp.path(),
        "r",
        b,
        "replica",
        &[a],
        "[limits]\ndownload = \"4MB\"",
        "",
    );
    // A second directory, high priority, on both (added by SIGHUP once
    // the daemons are up and handle it).
    for d in [&src, &r] {
        until(30, "the daemon to answer", || {
            (ctl(d, &["status"]).0 == 0).then_some(())
        });
    }
    for (d, mode) in [(&src, "source"), (&r, "replica")] {
        let conf = d.base.join("conf");
        fs::create_dir_all(&conf).unwrap();
        fs::write(
            d.base.join("dirs.d/conf.toml"),
            format!(
                "id = \"conf\"\npath = \"{}\"\nmode = \"{mode}\"\npriority = \"high\"\n",
                conf.display()
            ),
        )
        .unwrap();
        d.hup();
    }
    fs::write(src.data.join("hello"), b"hello").unwrap();
    fs::write(src.base.join("conf/app.conf"), b"v1").unwrap();
    until(60, "both directories on the replica", || {
        let (code, out, _) = ctl(&r, &["--json", "status"]);
        if code != 0 {
            return None;
        }
        let s: serde_json::Value = serde_json::from_str(&out).ok()?;
        let ok = s["dirs"].as_array().is_some_and(|d| d.len() == 2)
            && ["www", "conf"].iter().all(|id| {
                let d = dir(&s, id);
                d["local_version"].as_u64() > Some(0) && d["local_version"] == d["fleet_version"]
            });
        ok.then_some(())
    });
    // www drops to low at run time.
    let (code, out, err) = ctl(&r, &["priority", "low", "www"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "priority low: www");
    assert_eq!(dir(&ctl_json(&r, &["status"]), "www")["priority"], "low");
    ctl(&src, &["priority", "low", "www"]);

    // A 48 MiB low-priority transfer (12 s at the cap) starts...
    fs::write(
        src.data.join("bulk.bin"),
        chunk_store::testdata::pseudo_random(48 << 20, 95),
    )
    .unwrap();
    until(30, "the bulk transfer to start", || {
        let d = dir(&ctl_json(&r, &["status"]), "www").clone();
        (d["pending_bytes"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    // ...then an 8 MiB high-priority change takes the link: the low one
    // trickles meanwhile. (Sharing it, each would get half: the change
    // would take 4 s and the bulk transfer gain 8 MiB meanwhile.)
    let pending = |r: &Daemon| {
        dir(&ctl_json(r, &["status"]), "www")["pending_bytes"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = pending(&r);
    fs::write(
        src.base.join("conf/app.conf"),
        chunk_store::testdata::pseudo_random(8 << 20, 96),
    )
    .unwrap();
    let want = fs::read(src.base.join("conf/app.conf")).unwrap();
    until(60, "the high-priority change on the replica", || {
        (fs::read(r.base.join("conf/app.conf")).ok()? == want).then_some(())
    });
    let after = pending(&r);
    eprintln!(
        "the low-priority transfer took {} bytes while the high one ran",
        before.saturating_sub(after)
    );
    assert!(
        after > 0,
        "the low-priority transfer should still be running"
    );
    assert!(
        before.saturating_sub(after) < 5 * MIB,
        "the low-priority transfer took {} bytes while the high one ran",
        before.saturating_sub(after)
    );

    // Pause holds it where it is: over two seconds at most the calls
    // already sent arrive (at most one per source slot, 1 MiB each).
    ctl(&r, &["pause", "www"]);
    let held = dir(&ctl_json(&r, &["status"]), "www")["pending_bytes"]
        .as_u64()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let s = ctl_json(&r, &["status"]);
    let d = dir(&s, "www");
    assert_eq!(d["state"], "paused");
    let now = d["pending_bytes"].as_u64().unwrap();
    assert!(
        now > 0 && held.saturating_sub(now) <= 2 * MIB,
        "a paused transfer went on: {held} -> {now} pending"
    );
    ctl(&r, &["resume", "www"]);
    converge(&src, &[&r], "the bulk file after resume");
}
