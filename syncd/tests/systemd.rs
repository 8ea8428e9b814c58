//! systemd integration against the real thing: `systemd-analyze verify` on
//! `ops/syncd.service`, and READY/STATUS/WATCHDOG/RELOADING/STOPPING read
//! from a real `NOTIFY_SOCKET` (a Unix datagram socket, as systemd uses).

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{Daemon, ctl_json};

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let unit =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/syncd.service"))
            .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    assert!(unit.contains("ProtectSystem=strict") && unit.contains("NoNewPrivileges=yes"));
    // Point ExecStart at the binary under test: verify checks it exists.
    let unit = unit.replace("/usr/local/bin/syncd", env!("CARGO_BIN_EXE_syncd"));
    let path = tmp.path().join("syncd.service");
    fs::write(&path, unit).unwrap();
    // Documentation=man:syncctl(1) is checked too: give man the page the
    // install script would install.
    let man1 = tmp.path().join("man/man1");
    fs::create_dir_all(&man1).unwrap();
    let page = common::syncctl().arg("man").output().unwrap();
    fs::write(man1.join("syncctl.1"), page.stdout).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("MANPATH", tmp.path().join("man"))
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/test installs it)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads notify datagrams until one satisfies `pred`; returns all read.
fn read_until(
    sock: &UnixDatagram,
    secs: u64,
    what: &str,
    mut pred: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {what} within {secs} s; got {seen:?}");
        sock.set_read_timeout(Some(left)).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = pred(&msg);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
}

#[test]
fn readiness_status_watchdog_and_reload_reach_a_real_notify_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let notify_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify_path).unwrap();
    // Enough content that the first scan is visible as a STATUS line.
    fs::create_dir_all(tmp.path().join("n/data")).unwrap();
    for i in 0..20 {
        fs::write(
            tmp.path().join(format!("n/data/f{i}")),
            chunk_store::testdata::pseudo_random(500_000, i + 1),
        )
        .unwrap();
    }
    let mut d = Daemon::with_env(
        tmp.path(),
        "n",
        "127.0.0.61",
        "source",
        &[],
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let before_ready = read_until(&sock, 60, "READY=1", |m| m.contains("READY=1"));
    assert!(
        before_ready
            .iter()
            .any(|m| m.contains("STATUS=scanning www (1/1)")),
        "{before_ready:?}"
    );
    let ready = before_ready.last().unwrap();
    assert!(ready.contains("STATUS=1 directories (1 idle)"), "{ready}");
    // READY means the admin socket answers and the first scan is done.
    let s = ctl_json(&d, &["status"]);
    assert_eq!(s["dirs"][0]["state"], "idle");
    assert!(s["dirs"][0]["local_version"].as_u64().unwrap() >= 1);
    // The watchdog is fed (at half of WATCHDOG_USEC), repeatedly.
    let mut pings = 0;
    read_until(&sock, 10, "three WATCHDOG=1", |m| {
        pings += usize::from(m.contains("WATCHDOG=1"));
        pings >= 3
    });
    // SIGHUP: RELOADING=1 with a monotonic timestamp, then READY=1 again.
    d.hup();
    let reload = read_until(&sock, 30, "RELOADING=1", |m| m.contains("RELOADING=1"));
    assert!(
        reload.last().unwrap().contains("MONOTONIC_USEC="),
        "{reload:?}"
    );
    read_until(&sock, 30, "READY=1 after reload", |m| m.contains("READY=1"));
    // SIGTERM: STOPPING=1, and a clean exit.
    let pid = d.child.as_ref().unwrap().id();
    assert!(
        Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status()
            .unwrap()
            .success()
    );
    read_until(&sock, 30, "STOPPING=1", |m| m.contains("STOPPING=1"));
    let status = d.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn the_install_script_stages_binaries_unit_docs_and_valid_example_config() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let ops = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops");
    // The example directories, as an operator would copy them first.
    let dirs_d = root.join("etc/syncd/dirs.d");
    fs::create_dir_all(&dirs_d).unwrap();
    for f in ["www.toml", "nginx-conf.toml"] {
        fs::copy(ops.join("examples/dirs.d").join(f), dirs_d.join(f)).unwrap();
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_syncd"));
    let target = bin.parent().unwrap().parent().unwrap();
    let out = Command::new("sh")
        .arg(ops.join("install.sh"))
        .arg("--root")
        .arg(&root)
        .env("CARGO_TARGET_DIR", target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "usr/local/bin/syncd",
        "usr/local/bin/syncctl",
        "etc/systemd/system/syncd.service",
        "usr/local/share/man/man1/syncctl.1",
        "usr/share/bash-completion/completions/syncctl",
        "usr/local/share/doc/syncd/README.md",
    ] {
        assert!(root.join(f).is_file(), "{f} not installed");
    }
    let paths =
        fs::read_to_string(root.join("etc/systemd/system/syncd.service.d/paths.conf")).unwrap();
    assert!(
        paths.contains("ReadWritePaths=/srv/nginx-conf\n")
            && paths.contains("ReadWritePaths=/srv/www\n"),
        "{paths}"
    );
    // The example configuration it installed is valid as shipped.
    let out = Command::new(root.join("usr/local/bin/syncd"))
        .args(["check-config", "--config"])
        .arg(root.join("etc/syncd/syncd.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("2 directories"), "{text}");
}
