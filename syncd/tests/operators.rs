//! The operator's surface against real daemons: `syncctl` over the real
//! admin socket (status, peers, dirs, pause/resume, rescan, revert, wait and
//! its exit codes, fleet), SWIM noticing a killed node, post-sync hooks with their
//! timeout, completions and the man page.

use std::fs;
use std::os::unix::fs::PermissionsExt;

mod common;
use common::{Daemon, converge, ctl, ctl_json, http_get, until};

fn dir0(status: &serde_json::Value) -> &serde_json::Value {
    &status["dirs"][0]
}

#[test]
fn syncctl_reports_and_steers_a_real_fleet() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = ("127.0.0.41", "127.0.0.42", "127.0.0.43");
    let rack = "labels = { region = \"eu\", zone = \"a\", rack = \"r1\" }";
    let src = Daemon::with(tmp.path(), "src", a, "source", &[b, c], rack, "");
    fs::write(src.data.join("index.html"), b"v1").unwrap();
    let r1 = Daemon::with(tmp.path(), "r1", b, "replica", &[a], rack, "");
    let mut r2 = Daemon::new(tmp.path(), "r2", c, "replica", &[a]);
    converge(&src, &[&r1, &r2], "initial");

    // Only root and the socket's group may connect.
    let mode = fs::metadata(&r1.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");

    // status: converged, every peer alive and at the fleet version.
    let s = until(30, "r1 sees both peers at the fleet version", || {
        let s = ctl_json(&r1, &["status"]);
        let d = dir0(&s);
        (s["peers"]["alive"] == 2
            && d["local_version"] == d["fleet_version"]
            && d["peers_at_fleet_version"] == 2)
            .then_some(s)
    });
    assert_eq!(s["node_id"], "r1");
    let d = dir0(&s);
    assert_eq!(
        (d["id"].as_str(), d["mode"].as_str(), d["state"].as_str()),
        (Some("www"), Some("replica"), Some("idle"))
    );
    assert_eq!(d["local_root"], d["fleet_root"]);
    assert_eq!(d["peers_carrying"], 2);
    let (code, table, _) = ctl(&r1, &["status"]);
    assert_eq!(code, 0);
    assert!(table.contains("node r1") && table.contains("www") && table.contains("replica"));

    // peers: the source is in the same rack and holds www; our bytes came
    // from it or from r2 (which may have had them a moment before us: the
    // source then leaves them out for us, origin protection).
    let p = ctl_json(&r1, &["peers"]);
    let peers = p["peers"].as_array().unwrap();
    let from_src = peers.iter().find(|x| x["node_id"] == "src").unwrap();
    assert_eq!(from_src["class"], "same_rack");
    assert_eq!(from_src["state"], "alive");
    assert_eq!(from_src["address"], format!("{a}:7400"));
    let received: u64 = peers
        .iter()
        .map(|x| x["bytes_received"].as_u64().unwrap())
        .sum();
    assert!(received >= 2, "index.html's 2 bytes received: {received}");
    assert_eq!(from_src["holds"][0]["dir"], "www");
    let r2_seen = peers.iter().find(|x| x["node_id"] == "r2").unwrap();
    assert_eq!(r2_seen["class"], "elsewhere");
    let (code, table, _) = ctl(&r1, &["peers"]);
    assert_eq!(code, 0);
    assert!(table.contains("same_rack"), "{table}");
    let dirs = ctl_json(&src, &["dirs"]);
    assert_eq!(dirs[0]["mode"], "source");

    // wait: success, timeout (exit 3), unknown directory (exit 1).
    let (code, _, err) = ctl(&src, &["wait", "www", "--fleet", "--timeout", "30s"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = ctl(&r1, &["wait", "www", "--version", "999", "--timeout", "1s"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("timed out"), "{err}");
    let (code, _, err) = ctl(&r1, &["wait", "nope", "--timeout", "1s"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown directory \"nope\""), "{err}");
    let (code, _, err) = ctl(&r1, &["pause", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("this node syncs: www"), "{err}");

    // pause: r1 learns of a new version but does not apply it; resume does.
    let (code, out, _) = ctl(&r1, &["pause", "www"]);
    assert_eq!((code, out.trim()), (0, "paused: www"));
    fs::write(src.data.join("index.html"), b"v2").unwrap();
    let new_version = until(30, "source publishes v2", || {
        let s = ctl_json(&src, &["status"]);
        (dir0(&s)["local_version"].as_u64().unwrap() > d["local_version"].as_u64().unwrap())
            .then(|| dir0(&s)["local_version"].as_u64().unwrap())
    });
    let version = new_version.to_string();
    let (code, _, err) = ctl(
        &r2,
        &["wait", "www", "--version", &version, "--timeout", "30s"],
    );
    assert_eq!(code, 0, "{err}");
    let s = until(30, "paused r1 learns of the new version", || {
        let s = ctl_json(&r1, &["status"]);
        (dir0(&s)["fleet_version"] == new_version).then_some(s)
    });
    assert_eq!(dir0(&s)["state"], "paused");
    assert!(dir0(&s)["local_version"].as_u64().unwrap() < new_version);
    assert_eq!(fs::read(r1.data.join("index.html")).unwrap(), b"v1");
    let (code, _, err) = ctl(&r1, &["rescan", "www"]);
    assert_eq!(code, 1, "rescan of a paused directory is refused");
    assert!(err.contains("paused"), "{err}");
    assert_eq!(ctl(&r1, &["resume", "--all"]).0, 0);
    let (code, _, err) = ctl(&r1, &["wait", "www", "--timeout", "30s"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(fs::read(r1.data.join("index.html")).unwrap(), b"v2");

    // revert: a local edit on a replica is an error state until reverted.
    fs::write(r1.data.join("index.html"), b"hand edit").unwrap();
    fs::write(r1.data.join("stray.txt"), b"not in the fleet").unwrap();
    let s = until(30, "r1 reports its local edits", || {
        let s = ctl_json(&r1, &["status"]);
        (dir0(&s)["state"] == "error").then_some(s)
    });
    assert!(
        dir0(&s)["reason"].as_str().unwrap().contains("local edits"),
        "{s}"
    );
    let (code, _, err) = ctl(&src, &["revert", "www"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("revert undoes local edits on replicas"),
        "{err}"
    );
    assert_eq!(ctl(&r1, &["revert", "www"]).0, 0);
    converge(&src, &[&r1], "after revert");
    let s = until(30, "r1 idle again", || {
        let s = ctl_json(&r1, &["status"]);
        (dir0(&s)["state"] == "idle").then_some(s)
    });
    assert!(
        dir0(&s)["last_error"]
            .as_str()
            .unwrap()
            .contains("local edits")
    );

    // A deploy script: change the source, then wait on it for the fleet.
    // The wait scans first, so the change just made is what it waits for.
    fs::write(src.data.join("deploy.txt"), b"release 42").unwrap();
    let (code, _, err) = ctl(&src, &["wait", "www", "--fleet", "--timeout", "30s"]);
    assert_eq!(code, 0, "{err}");
    for r in [&r1, &r2] {
        assert_eq!(fs::read(r.data.join("deploy.txt")).unwrap(), b"release 42");
    }

    // SWIM: a killed node is suspected, then declared dead.
    r2.kill();
    until(60, "r1 declares r2 dead", || {
        let p = ctl_json(&r1, &["peers"]);
        p["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["node_id"] == "r2" && x["state"] == "dead")
            .then_some(())
    });
    let s = ctl_json(&r1, &["status"]);
    assert_eq!(
        (s["peers"]["alive"].as_u64(), s["peers"]["dead"].as_u64()),
        (Some(1), Some(1))
    );
    // A dead peer no longer counts as carrying the directory.
    assert_eq!(dir0(&s)["peers_carrying"], 1);
}

#[test]
fn syncctl_without_a_daemon_says_where_it_looked() {
    let out = common::syncctl()
        .args(["--socket", "/nonexistent/syncd.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach syncd at /nonexistent/syncd.sock"),
        "{err}"
    );
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    let out = common::syncctl()
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    for cmd in ["status", "peers", "wait", "revert"] {
        assert!(script.contains(cmd), "completion lacks {cmd}");
    }
    let out = common::syncctl().arg("man").output().unwrap();
    assert!(out.status.success());
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(
        man.starts_with(".ie") || man.contains(".TH syncctl"),
        "{man}"
    );
    assert!(man.contains("wait"));
}

fn metric(body: &str, name_and_labels: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn hooks_run_after_each_version_and_never_block_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = ("127.0.0.44", "127.0.0.45", "127.0.0.46");
    let hook_log = tmp.path().join("hook.log");
    // Content in place before the source starts: its first version has it.
    fs::create_dir_all(tmp.path().join("src/data")).unwrap();
    fs::write(tmp.path().join("src/data/f"), b"one").unwrap();
    let src = Daemon::new(tmp.path(), "src", a, "source", &[b, c]);
    let hooked = Daemon::with(
        tmp.path(),
        "hooked",
        b,
        "replica",
        &[a],
        "",
        &format!(
            "on_synced = [\"sh\", \"-c\", \"echo $SYNCD_DIR $SYNCD_VERSION $(cat $SYNCD_PATH/f) >> {}\"]",
            hook_log.display()
        ),
    );
    let slow = Daemon::with(
        tmp.path(),
        "slow",
        c,
        "replica",
        &[a],
        &format!("[metrics]\nlisten = \"{c}:9740\""),
        "on_synced = [\"sleep\", \"30\"]\non_synced_timeout = \"300ms\"",
    );
    converge(&src, &[&hooked, &slow], "initial");
    // The hook saw the version in place: its content, and the version the
    // node reports.
    let line = until(30, "hook ran", || {
        fs::read_to_string(&hook_log)
            .ok()
            .filter(|s| s.lines().count() == 1)
    });
    let held = dir0(&ctl_json(&hooked, &["status"]))["local_version"].clone();
    assert_eq!(line.trim(), format!("www {held} one"));
    // A second version: a second run, with the new content.
    fs::write(src.data.join("f"), b"two").unwrap();
    converge(&src, &[&hooked], "second version");
    let text = until(30, "hook ran again", || {
        fs::read_to_string(&hook_log)
            .ok()
            .filter(|s| s.lines().count() == 2)
    });
    assert!(text.lines().nth(1).unwrap().ends_with(" two"), "{text}");
    // The slow hook was killed at its timeout, counted, and sync went on:
    // the second version reached that node while its first hook "ran".
    converge(&src, &[&slow], "slow hook node");
    let addr = format!("{c}:9740");
    until(30, "slow hook counted as timed out twice", || {
        let body = http_get(&addr, "/metrics")?;
        (metric(
            &body,
            "syncd_hook_runs_total{dir=\"www\",result=\"timeout\"}",
        ) >= 2.0)
            .then_some(())
    });
    let body = http_get(&addr, "/metrics").unwrap();
    assert!(metric(&body, "syncd_errors_total{dir=\"www\",kind=\"hook\"}") >= 2.0);
}

/// `syncctl fleet` on any node shows every node × directory from gossip:
/// a replica that knows only the source lists the other replica too, with
/// its version, lag and state, grouped by zone; `--json` and one
/// directory alone.
#[test]
fn syncctl_fleet_shows_every_node_from_any_node() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = ("127.0.0.81", "127.0.0.82", "127.0.0.83");
    let zone = |z: &str| format!("labels = {{ region = \"eu\", zone = \"{z}\" }}");
    let src = Daemon::with(tmp.path(), "src", a, "source", &[], &zone("z1"), "");
    fs::write(src.data.join("index.html"), b"fleet view").unwrap();
    let r1 = Daemon::with(tmp.path(), "r1", b, "replica", &[a], &zone("z1"), "");
    let r2 = Daemon::with(tmp.path(), "r2", c, "replica", &[a], &zone("z2"), "");
    converge(&src, &[&r1, &r2], "initial sync");
    let version = dir0(&ctl_json(&src, &["status"]))["local_version"]
        .as_u64()
        .unwrap();
    // Records travel by gossip: r2 sees r1's, though neither names the
    // other, and every node at the source's version with lag 0.
    let fleet = until(
        30,
        "r2's fleet view showing all three at the version",
        || {
            let f = ctl_json(&r2, &["fleet"]);
            let nodes = f["nodes"].as_array()?.clone();
            let at: Vec<String> = nodes
                .iter()
                .filter(|n| {
                    n["dirs"].as_array().is_some_and(|d| {
                        d.iter().any(|d| {
                            d["dir"] == "www"
                                && d["version"].as_u64() == Some(version)
                                && d["lag"].as_u64() == Some(0)
                        })
                    })
                })
                .map(|n| n["node_id"].as_str().unwrap_or("").to_string())
                .collect();
            (at.len() == 3).then_some(f)
        },
    );
    assert_eq!(fleet["node_id"], "r2");
    let ids: Vec<&str> = fleet["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap())
        .collect();
    // Sorted by region, zone, id: z1 (r1, src), then z2 (r2).
    assert_eq!(ids, ["r1", "src", "r2"]);
    let me = &fleet["nodes"][2];
    assert_eq!(me["state"], "self");
    assert_eq!(fleet["nodes"][1]["state"], "alive");
    assert_eq!(fleet["nodes"][1]["dirs"][0]["mode"], "source");
    assert_eq!(me["dirs"][0]["state"], "idle");
    // The text groups by region and zone.
    let (code, out, err) = ctl(&r2, &["fleet", "www"]);
    assert_eq!(code, 0, "{err}");
    let z1 = out.find("region eu / zone z1").expect(&out);
    let z2 = out.find("region eu / zone z2").expect(&out);
    assert!(
        z1 < z2 && out[z1..z2].contains("src") && out[z2..].contains("r2"),
        "{out}"
    );
    // An unknown directory lists nobody.
    let none = ctl_json(&r2, &["fleet", "nosuch"]);
    assert_eq!(none["nodes"].as_array().map(Vec::len), Some(0));
}
