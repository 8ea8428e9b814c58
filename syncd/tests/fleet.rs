//! Several real `syncd run` processes on 127.0.0.x keep a directory
//! identical: create, 1-byte insert, rename, delete (files and trees),
//! symlinks and empty directories; a replica restarted while the source
//! changes; a fresh node that knows only a replica; a replica killed in the
//! middle of writing a large file.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::{Daemon, converge, snapshot};

fn random(len: usize, seed: u64) -> Vec<u8> {
    chunk_store::testdata::pseudo_random(len, seed)
}

fn root_of(dir: &Path, state: &Path) -> String {
    common::index_json(dir, state)["root"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn three_node_fleet_stays_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c, d) = ("127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14");
    let src = Daemon::new(tmp.path(), "src", a, "source", &[b, c]);
    fs::write(src.data.join("hello.txt"), b"hello fleet").unwrap();
    fs::create_dir_all(src.data.join("site/css")).unwrap();
    fs::write(src.data.join("site/index.html"), random(100_000, 1)).unwrap();
    fs::write(src.data.join("site/css/app.css"), b"body{}").unwrap();
    fs::write(src.data.join("big.bin"), random(8 << 20, 2)).unwrap();
    let mut r1 = Daemon::new(tmp.path(), "r1", b, "replica", &[a]);
    let r2 = Daemon::new(tmp.path(), "r2", c, "replica", &[a]);
    converge(&src, &[&r1, &r2], "initial sync");

    // Edits of every kind on the source.
    let mut big = fs::read(src.data.join("big.bin")).unwrap();
    big.insert(big.len() / 2, 0xAB);
    fs::write(src.data.join("big.bin"), &big).unwrap();
    fs::rename(src.data.join("hello.txt"), src.data.join("site/hello.txt")).unwrap();
    fs::remove_dir_all(src.data.join("site/css")).unwrap();
    fs::create_dir_all(src.data.join("empty/nested")).unwrap();
    symlink("site/index.html", src.data.join("index-link")).unwrap();
    fs::write(src.data.join("new.txt"), b"new").unwrap();
    fs::set_permissions(
        src.data.join("new.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    converge(&src, &[&r1, &r2], "edits");

    // A replica down while the source changes catches up on restart.
    r1.kill();
    fs::write(src.data.join("while-down.txt"), random(300_000, 3)).unwrap();
    fs::remove_file(src.data.join("new.txt")).unwrap();
    converge(&src, &[&r2], "edit while r1 is down");
    r1.start();
    converge(&src, &[&r1, &r2], "restart");

    // A fresh node that only knows r1 learns the fleet and catches up.
    let r3 = Daemon::new(tmp.path(), "r3", d, "replica", &[b]);
    converge(&src, &[&r1, &r2, &r3], "join");

    // Same content, same root, on every node.
    let want = root_of(&src.data, &tmp.path().join("check-src"));
    for (i, r) in [&r1, &r2, &r3].iter().enumerate() {
        assert_eq!(
            root_of(&r.data, &tmp.path().join(format!("check-{i}"))),
            want
        );
    }
}

#[test]
fn run_with_a_broken_config_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("syncd.toml");
    fs::write(&cfg, "[node]\nid = \"x\"\nlisten = \"nowhere\"\n").unwrap();
    let out = common::syncd()
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("syncd.toml:3") && err.contains("not an address:port"),
        "{err}"
    );
}

/// A replica killed while a large file is being written (its temp file is
/// on disk) restarts, finishes the sync and leaves no temp file behind.
#[test]
fn replica_killed_mid_transfer_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = ("127.0.0.15", "127.0.0.16");
    let src = Daemon::new(tmp.path(), "src", a, "source", &[b]);
    let mut r1 = Daemon::new(tmp.path(), "r1", b, "replica", &[a]);
    fs::write(src.data.join("small.txt"), b"first").unwrap();
    converge(&src, &[&r1], "before the big file");

    let staged = tmp.path().join("staged.bin");
    fs::write(&staged, random(400 << 20, 9)).unwrap();
    fs::rename(&staged, src.data.join("big.bin")).unwrap();
    let temp_exists = |dir: &Path| {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".syncd-tmp."))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !temp_exists(&r1.data) {
        assert!(
            Instant::now() < deadline,
            "the replica never started writing"
        );
        std::thread::yield_now();
    }
    r1.kill(); // SIGKILL mid-write
    assert!(
        !r1.data.join("big.bin").exists(),
        "a partial file became visible under its real name"
    );
    r1.start();
    converge(&src, &[&r1], "after the restart");
    assert!(!temp_exists(&r1.data), "a temp file was left behind");
}

/// SIGHUP applies dirs.d changes without a restart: a removed file stops a
/// directory, an added one starts it, an invalid one is refused and logged.
#[test]
fn sighup_adds_and_removes_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = ("127.0.0.17", "127.0.0.18");
    let src = Daemon::new(tmp.path(), "src", a, "source", &[b]);
    let r1 = Daemon::new(tmp.path(), "r1", b, "replica", &[a]);
    fs::write(src.data.join("one.txt"), b"1").unwrap();
    converge(&src, &[&r1], "before reload");

    let www = tmp.path().join("r1/dirs.d/www.toml");
    let saved = fs::read_to_string(&www).unwrap();
    fs::remove_file(&www).unwrap();
    r1.hup();
    r1.wait_log("stopped syncing directory", 1);

    fs::write(
        tmp.path().join("r1/dirs.d/bad.toml"),
        "id = \"x\"\nmode = \"replica\"\n",
    )
    .unwrap();
    r1.hup();
    r1.wait_log("reload failed", 1);
    fs::remove_file(tmp.path().join("r1/dirs.d/bad.toml")).unwrap();

    fs::write(src.data.join("two.txt"), b"2").unwrap();
    fs::write(&www, saved).unwrap();
    r1.hup();
    r1.wait_log("started syncing directory", 1);
    converge(&src, &[&r1], "after reload");
}

/// A source whose root suddenly looks empty (an unmounted file system)
/// refuses to publish the deletion; the replicas keep their files.
#[test]
fn an_emptied_source_does_not_wipe_the_fleet() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = ("127.0.0.19", "127.0.0.20");
    let src = Daemon::new(tmp.path(), "src", a, "source", &[b]);
    let r1 = Daemon::new(tmp.path(), "r1", b, "replica", &[a]);
    fs::create_dir(src.data.join("site")).unwrap();
    fs::write(src.data.join("site/index.html"), b"content").unwrap();
    converge(&src, &[&r1], "before");
    let before = snapshot(&r1.data);
    fs::remove_dir_all(src.data.join("site")).unwrap();
    src.wait_log("refusing to publish their deletion", 1);
    assert_eq!(snapshot(&r1.data), before, "the replica lost its files");
    // New content is published again, deletions included.
    fs::write(src.data.join("new.html"), b"new").unwrap();
    converge(&src, &[&r1], "after");
}

/// Issue 9: SIGTERM stops a node in order, well inside systemd's 30 s: the
/// transfer stops at a file boundary (no partial file, no temp file), the
/// node leaves SWIM so its peers see it gone at once (not after the ~8 s of
/// suspicion a crash takes), the index is flushed, and it exits 0. On
/// restart it finishes the job.
#[test]
fn sigterm_mid_transfer_stops_cleanly_and_leaves_the_fleet() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = ("127.0.0.41", "127.0.0.42");
    let src = Daemon::new(tmp.path(), "src", a, "source", &[b]);
    let mut r = Daemon::new(tmp.path(), "r", b, "replica", &[a]);
    fs::write(src.data.join("small.txt"), b"first").unwrap();
    converge(&src, &[&r], "a first file");
    let peer_state = common::peer_state;
    common::until(30, "the source sees the replica alive", || {
        (peer_state(&src, "r") == "alive").then_some(())
    });

    // Many files, so a stop lands between two of them (seeds 2 apart:
    // pseudo_random ignores the lowest bit).
    // Each written beside and renamed in: a scan must not catch a file
    // half-written, or the replica would rightly hold a version where it
    // is (timestamps are coarser than a 2 MiB write, so the file can look
    // unchanged afterwards but for its size).
    for i in 0..32 {
        let name = format!("f{i:02}.bin");
        let staged = src.base.join(&name);
        fs::write(&staged, random(2 << 20, 100 + 2 * i)).unwrap();
        fs::rename(&staged, src.data.join(&name)).unwrap();
    }
    common::until(60, "the replica is receiving", || {
        let (code, out, _) = common::ctl(&r, &["--json", "status"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| code == 0)?;
        (v["dirs"][0]["state"] == "syncing").then_some(())
    });
    let (status, took) = r.terminate(30);
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(25), "took {took:?}");
    let log = fs::read_to_string(&r.log).unwrap();
    for step in ["directories stopped", "left the fleet", "stopped"] {
        assert!(log.contains(step), "no {step:?} in the log:\n{log}");
    }
    // Every file is whole or absent; no temp file is left.
    let want: std::collections::HashMap<_, _> = snapshot(&src.data).into_iter().collect();
    for (path, desc) in snapshot(&r.data) {
        let name = path.to_string_lossy().to_string();
        assert!(!name.contains(".syncd-tmp."), "temp file left: {name}");
        assert_eq!(
            want.get(&path),
            Some(&desc),
            "{name} differs from the source's"
        );
    }
    // Its peer saw it leave without waiting out a suspicion.
    let seen = Instant::now();
    common::until(5, "the source sees the replica gone", || {
        (peer_state(&src, "r") == "dead").then_some(())
    });
    assert!(seen.elapsed() < Duration::from_secs(5));

    r.start();
    converge(&src, &[&r], "after the restart");
}
