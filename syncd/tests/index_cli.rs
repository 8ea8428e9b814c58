//! `syncd index` as a real process: output contract, incremental rescans,
//! and crash safety under `kill -9`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use chunk_store::ChunkerConfig;
use chunk_store::store::Store;

mod common;
use common::{index_json, syncd};

/// Enough files for ~80 commits per full scan (256 files per batch).
const FILES: usize = 20_000;

fn make_tree(root: &Path, files: usize, size: usize) {
    for i in 0..files {
        let p = root.join(format!("d{}/f{i:05}", i % 37));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut data = vec![0u8; size];
        for (j, b) in data.iter_mut().enumerate() {
            *b = (i.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8;
        }
        fs::write(p, data).unwrap();
    }
}

#[test]
fn json_report_and_second_run_reads_no_data() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    make_tree(&dir, 50, 10_000);
    let state = tmp.path().join("state");
    let first = index_json(&dir, &state);
    for key in ["root", "files", "bytes", "chunks", "seconds"] {
        assert!(first.get(key).is_some(), "missing {key} in {first}");
    }
    assert_eq!(first["files"], 50);
    assert_eq!(first["bytes"], 500_000);
    assert_eq!(first["root"].as_str().unwrap().len(), 64);
    let second = index_json(&dir, &state);
    assert_eq!(second["root"], first["root"]);
    assert_eq!(second["bytes_read"], 0);
    assert_eq!(second["files_read"], 0);

    // The human form names the same root.
    let out = syncd()
        .args(["index", "--state"])
        .arg(&state)
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(first["root"].as_str().unwrap()), "{text}");
}

fn fail(args: &[&str], dir: &Path) -> Output {
    let out = syncd().args(args).arg(dir).output().unwrap();
    assert!(!out.status.success());
    out
}

#[test]
fn errors_name_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let state = tmp.path().join("state");
    let out = fail(&["index", "--state", state.to_str().unwrap()], &missing);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope"), "{err}");

    let inside = tmp.path().join("data/.state");
    fs::create_dir_all(&inside).unwrap();
    let out = fail(
        &["index", "--state", inside.to_str().unwrap()],
        &tmp.path().join("data"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inside the indexed directory"), "{err}");
}

fn wal_bytes(index: &Path) -> u64 {
    fs::read_dir(index)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log") && e.file_name() != "LOG")
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum()
}

/// Kill -9 while the index is being written, several times at different
/// points; each time the reopened index must pass its consistency check,
/// and finishing the scan must give the same root as a clean index.
#[test]
fn index_survives_kill_9_mid_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    make_tree(&dir, FILES, 1000);
    let id = dir.canonicalize().unwrap().to_string_lossy().into_owned();
    let clean = index_json(&dir, &tmp.path().join("clean"))["root"].clone();

    let state: PathBuf = tmp.path().join("state");
    let index = state.join("index");
    let mut killed_mid_write = 0;
    for threshold in [50_000u64, 500_000, 1_500_000, 3_000_000] {
        // Touch every file so each round has ~80 batches to write.
        for i in 0..FILES {
            let p = dir.join(format!("d{}/f{i:05}", i % 37));
            let mut data = fs::read(&p).unwrap();
            data[0] = data[0].wrapping_add(1);
            fs::write(&p, data).unwrap();
        }
        let base = wal_bytes(&index);
        let mut child = syncd()
            .args(["index", "--json", "--state"])
            .arg(&state)
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if wal_bytes(&index) >= base + threshold {
                if child.try_wait().unwrap().is_none() {
                    child.kill().unwrap(); // SIGKILL
                    killed_mid_write += 1;
                }
                break;
            }
            assert!(Instant::now() < deadline, "index neither wrote nor exited");
            std::thread::yield_now();
        }
        child.wait().unwrap();
        let store = Store::open(&index, ChunkerConfig::default()).unwrap();
        let report = store.check(&id).unwrap();
        assert!(report.records > 0 || threshold == 50_000);
    }
    assert!(
        killed_mid_write >= 2,
        "only {killed_mid_write} kills landed mid-write"
    );
    let finished = index_json(&dir, &state);
    let fresh = index_json(&dir, &tmp.path().join("fresh"));
    assert_eq!(finished["root"], fresh["root"]);
    assert_ne!(finished["root"], clean);
    Store::open(&index, ChunkerConfig::default())
        .unwrap()
        .check(&id)
        .unwrap();
}

#[test]
fn check_config_reports_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("syncd.toml");
    fs::write(
        &node,
        "[node]\nid = \"n1\"\nlisten = \"127.0.0.1:7400\"\nstate_dir = \"/var/lib/syncd\"\n",
    )
    .unwrap();
    fs::create_dir(tmp.path().join("dirs.d")).unwrap();
    let www = tmp.path().join("dirs.d/www.toml");
    fs::write(
        &www,
        "id = \"www\"\npath = \"/srv/www\"\nmode = \"replica\"\n",
    )
    .unwrap();
    let check = || {
        syncd()
            .args(["check-config", "--config"])
            .arg(&node)
            .output()
            .unwrap()
    };
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("www") && text.contains("replica") && text.contains("/srv/www"),
        "{text}"
    );

    fs::write(
        &www,
        "id = \"www\"\npath = \"/srv/www\"\nmode = \"replica\"\npaht = \"x\"\n",
    )
    .unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("www.toml") && err.contains("line 4") && err.contains("paht"),
        "{err}"
    );
}
