//! Day-one defects that need no hostile peer, against real daemons on
//! 127.0.0.x: a huge sparse file in a source root (item 3), hook-run
//! series on a node without hooks (item 14).

use std::fs;

mod common;
use common::{Daemon, converge, ctl, http_get, until};

/// Issue 8 item 3: a sparse file of 2^44 bytes (ext4's limit; 2^50 where
/// the file system allows) made the daemon reserve its chunk list from the
/// declared size at start-up and then read terabytes of holes, so it never
/// became ready. Now it is skipped (over `max_file_size`, 1 TiB by default)
/// and the rest of the directory is published.
#[test]
fn a_huge_sparse_file_does_not_stop_a_source() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = ("127.0.0.71", "127.0.0.72");
    let base = tmp.path().join("src");
    fs::create_dir_all(base.join("data")).unwrap();
    let big = fs::File::create(base.join("data/sparse.img")).unwrap();
    let len = [1u64 << 50, 1 << 44, (1 << 44) - 4096]
        .into_iter()
        .find(|&l| big.set_len(l).is_ok())
        .expect("a sparse file of at least 16 TiB - 4 KiB");
    fs::write(base.join("data/small.txt"), b"small").unwrap();
    let src = Daemon::new(tmp.path(), "src", a, "source", &[b]);
    let status = until(60, "the source publishes a version", || {
        let (code, out, _) = ctl(&src, &["--json", "status"]);
        let s: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| code == 0)?;
        (s["dirs"][0]["local_version"].as_u64() >= Some(1)).then_some(s)
    });
    assert_eq!(status["dirs"][0]["state"], "idle", "{status}");
    src.wait_log("skipping file larger than max_file_size", 1);
    let r = Daemon::new(tmp.path(), "r", b, "replica", &[a]);
    until(60, "the small file reaches the replica", || {
        (fs::read(r.data.join("small.txt")).ok()? == b"small").then_some(())
    });
    assert!(
        !r.data.join("sparse.img").exists(),
        "the {len}-byte file was published"
    );
}

/// Issue 8 item 14: `syncd_hook_runs_total` has its series (at 0) for a
/// directory without a hook, like the other per-directory counters.
#[test]
fn hook_run_series_exist_without_hooks() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = ("127.0.0.73", "127.0.0.74");
    let metrics = format!("[metrics]\nlisten = \"{a}:9740\"");
    let src = Daemon::with(tmp.path(), "src", a, "source", &[b], &metrics, "");
    fs::write(src.data.join("f"), b"x").unwrap();
    let r = Daemon::new(tmp.path(), "r", b, "replica", &[a]);
    converge(&src, &[&r], "one file");
    let body = until(30, "metrics", || http_get(&format!("{a}:9740"), "/metrics"));
    for result in ["ok", "failed", "timeout"] {
        let series = format!("syncd_hook_runs_total{{dir=\"www\",result=\"{result}\"}} 0");
        assert!(body.contains(&series), "no {series} in:\n{body}");
    }
}
