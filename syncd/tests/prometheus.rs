//! Metrics against the real thing: a 3-node fleet on loopback, every
//! `/metrics` endpoint linted by `promtool check metrics`, a real Prometheus
//! (Debian's `prometheus` package; `scripts/test` installs it) scraping the
//! fleet, and every query of every panel of `grafana/syncd.json` run
//! through Prometheus's HTTP API: a query that returns no data fails.

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};

mod common;
use common::{Daemon, converge, http_get, until};

/// Kills Prometheus when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool(name: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} not found: install Debian's prometheus package (scripts/test does)"
    );
    String::from_utf8_lossy(&found.stdout).trim().to_string()
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every PromQL expression of the dashboard, with Grafana's variables
/// replaced the way "All" and the default interval would.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana/syncd.json");
    let d: serde_json::Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$dir", ".+")
                .replace("$job", ".+");
            out.push((p["title"].as_str().unwrap().to_string(), expr));
        }
    }
    out
}

/// Whether the instant query returns at least one sample that is a number.
fn has_data(prom: &str, expr: &str) -> bool {
    let Some(body) = http_get(prom, &format!("/api/v1/query?query={}", encode(expr))) else {
        return false;
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["status"] == "success"
        && v["data"]["result"].as_array().is_some_and(|r| {
            r.iter().any(|s| {
                s["value"][1]
                    .as_str()
                    .is_some_and(|x| x.parse::<f64>().is_ok_and(|f| !f.is_nan()))
            })
        })
}

#[test]
fn every_dashboard_panel_has_data_from_a_real_fleet() {
    let prometheus = tool("prometheus");
    let promtool = tool("promtool");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c, prom) = ("127.0.0.51", "127.0.0.52", "127.0.0.53", "127.0.0.54:9090");
    let node = |ip: &str, zone: &str, rack: &str| {
        format!(
            "labels = {{ region = \"eu\", zone = \"{zone}\", rack = \"{rack}\" }}\n\
             [metrics]\nlisten = \"{ip}:9740\""
        )
    };
    fs::create_dir_all(tmp.path().join("src/data")).unwrap();
    fs::write(tmp.path().join("src/data/a.bin"), vec![7u8; 300_000]).unwrap();
    let src = Daemon::with(
        tmp.path(),
        "src",
        a,
        "source",
        &[b, c],
        &node(a, "a", "r1"),
        "",
    );
    let hook = "on_synced = [\"true\"]";
    let r1 = Daemon::with(
        tmp.path(),
        "r1",
        b,
        "replica",
        &[a],
        &node(b, "a", "r1"),
        hook,
    );
    let r2 = Daemon::with(
        tmp.path(),
        "r2",
        c,
        "replica",
        &[a],
        &node(c, "b", "r9"),
        hook,
    );
    converge(&src, &[&r1, &r2], "initial");

    // Every endpoint passes promtool's lint.
    for ip in [a, b, c] {
        let body = http_get(&format!("{ip}:9740"), "/metrics").expect("metrics endpoint");
        let mut check = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        check
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics on {ip}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let config = tmp.path().join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: syncd\n    static_configs:\n      \
             - targets: [\"{a}:9740\", \"{b}:9740\", \"{c}:9740\"]\n"
        ),
    )
    .unwrap();
    let _prom = Killed(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(tmp.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    until(60, "Prometheus ready", || http_get(prom, "/-/ready"));
    until(60, "all three targets scraped", || {
        let body = http_get(prom, &format!("/api/v1/query?query={}", encode("up == 1")))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["data"]["result"].as_array()?.len() == 3).then_some(())
    });

    // Keep the fleet busy (new versions: scans, transfers, syncs, hooks)
    // while the panels' queries are asked until each has data.
    let queries = dashboard_queries();
    assert!(queries.len() >= 16, "{} queries", queries.len());
    let mut missing: Vec<(String, String)> = queries.clone();
    let mut round = 0u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !missing.is_empty() && std::time::Instant::now() < deadline {
        round += 1;
        fs::write(
            src.data.join(format!("f{}", round % 4)),
            chunk_store::testdata::pseudo_random(200_000, round),
        )
        .unwrap();
        converge(&src, &[&r1, &r2], "while querying");
        missing.retain(|(_, q)| !has_data(prom, q));
    }
    assert!(
        missing.is_empty(),
        "dashboard queries without data after {round} rounds:\n{}",
        missing
            .iter()
            .map(|(t, q)| format!("  [{t}] {q}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
