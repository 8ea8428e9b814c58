//! Helpers shared by the real-process tests.

#![allow(dead_code)] // each test binary uses part of this

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `syncd` binary under test.
pub fn syncd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_syncd"))
}

/// The `syncctl` binary under test.
pub fn syncctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_syncctl"))
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `secs`.
pub fn until<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `syncd index --json` and returns its report.
pub fn index_json(dir: &Path, state: &Path) -> serde_json::Value {
    let out = syncd()
        .args(["index", "--json", "--state"])
        .arg(state)
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub struct Daemon {
    pub name: String,
    pub base: PathBuf,
    pub data: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    /// Extra environment for the process.
    pub env: Vec<(String, String)>,
    /// Network namespace to run in (`ip netns exec`), if any.
    pub netns: Option<String>,
}

impl Daemon {
    /// A node with one directory `www` in `mode`, started.
    pub fn new(tmp: &Path, name: &str, ip: &str, mode: &str, peers: &[&str]) -> Daemon {
        Daemon::with(tmp, name, ip, mode, peers, "", "")
    }

    /// Like [`Daemon::new`], with extra environment variables.
    pub fn with_env(
        tmp: &Path,
        name: &str,
        ip: &str,
        mode: &str,
        peers: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        Daemon::build(tmp, name, ip, mode, peers, "", "", env).started()
    }

    /// Like [`Daemon::new`], run inside network namespace `netns`, as the
    /// shipped example configures a host: listening on the wildcard
    /// address, advertising its own.
    pub fn in_netns(
        tmp: &Path,
        name: &str,
        netns: &str,
        ip: &str,
        mode: &str,
        peers: &[&str],
    ) -> Daemon {
        let mut d = Daemon::build(tmp, name, ip, mode, peers, "", "", &[]);
        let text = fs::read_to_string(&d.config).unwrap().replace(
            &format!("listen = \"{ip}:7400\""),
            &format!("listen = \"0.0.0.0:7400\"\nadvertise = \"{ip}:7400\""),
        );
        fs::write(&d.config, text).unwrap();
        d.netns = Some(netns.to_string());
        d.started()
    }

    /// Like [`Daemon::new`], with lines added to syncd.toml's `[node]`
    /// table (they may open further tables) and to www.toml.
    pub fn with(
        tmp: &Path,
        name: &str,
        ip: &str,
        mode: &str,
        peers: &[&str],
        node_extra: &str,
        dir_extra: &str,
    ) -> Daemon {
        Daemon::build(tmp, name, ip, mode, peers, node_extra, dir_extra, &[]).started()
    }

    fn started(mut self) -> Daemon {
        self.start();
        self
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        tmp: &Path,
        name: &str,
        ip: &str,
        mode: &str,
        peers: &[&str],
        node_extra: &str,
        dir_extra: &str,
        env: &[(&str, &str)],
    ) -> Daemon {
        let base = tmp.join(name);
        let data = base.join("data");
        fs::create_dir_all(&data).unwrap();
        fs::create_dir_all(base.join("dirs.d")).unwrap();
        let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}:7400\"")).collect();
        let config = base.join("syncd.toml");
        fs::write(
            &config,
            format!(
                "[node]\nid = \"{name}\"\nlisten = \"{ip}:7400\"\nstate_dir = \"{}\"\npeers = [{}]\n{node_extra}\n[admin]\nsocket = \"{}\"\n",
                base.join("state").display(),
                peers.join(", "),
                base.join("syncd.sock").display()
            ),
        )
        .unwrap();
        fs::write(
            base.join("dirs.d/www.toml"),
            format!(
                "id = \"www\"\npath = \"{}\"\nmode = \"{mode}\"\n{dir_extra}\n",
                data.display()
            ),
        )
        .unwrap();
        Daemon {
            name: name.into(),
            socket: base.join("syncd.sock"),
            log: base.join("log"),
            base,
            data,
            config,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: None,
        }
    }

    pub fn start(&mut self) {
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_syncd")]);
                c
            }
            None => syncd(),
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "syncd=info,chunk_store=info,warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGHUP: reload dirs.d.
    pub fn hup(&self) {
        let pid = self.child.as_ref().unwrap().id();
        // The shell's built-in kill: no procps needed on the test machine.
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("kill -HUP {pid}")])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP {pid}");
    }

    /// Waits until the daemon's log has `n` lines containing `what`.
    pub fn wait_log(&self, what: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(what)
            .count()
            < n
        {
            assert!(
                Instant::now() < deadline,
                "{}: no {what:?} in the log",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, as systemd stops the unit; waits up to `secs` for the exit
    /// and returns its status and how long it took.
    pub fn terminate(&mut self, secs: u64) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().expect("running");
        let started = Instant::now();
        let ok = Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", child.id())])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {}", child.id());
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(secs) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within {secs} s of SIGTERM\n{}",
                    self.name,
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Everything a replica must reproduce: paths, types, bytes, modes,
/// mtimes, symlink targets.
pub fn snapshot(root: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
            let desc = if m.is_dir() {
                stack.push(e.path());
                format!("dir {:o}", m.mode() & 0o7777)
            } else if m.file_type().is_symlink() {
                format!("link {:?}", fs::read_link(e.path()).ok())
            } else {
                let h = fs::read(e.path())
                    .map(|b| blake3::hash(&b).to_hex().to_string())
                    .unwrap_or_default();
                format!(
                    "file {:o} {} {}.{} {h}",
                    m.mode() & 0o7777,
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec()
                )
            };
            out.push((rel, desc));
        }
    }
    out.sort();
    out
}

pub fn converge(src: &Daemon, replicas: &[&Daemon], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let want = snapshot(&src.data);
        if replicas.iter().all(|r| snapshot(&r.data) == want) {
            return;
        }
        if Instant::now() > deadline {
            for r in replicas {
                eprintln!(
                    "--- {} log:\n{}",
                    r.name,
                    fs::read_to_string(&r.log).unwrap_or_default()
                );
            }
            eprintln!(
                "--- {} log:\n{}",
                src.name,
                fs::read_to_string(&src.log).unwrap_or_default()
            );
            panic!("{what}: replicas did not converge within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs syncctl against `d`'s socket; returns (exit code, stdout, stderr).
pub fn ctl(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let out = syncctl()
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `syncctl --json ARGS` parsed; panics with stderr on failure.
pub fn ctl_json(d: &Daemon, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = ctl(d, &all);
    assert_eq!(code, 0, "syncctl {args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// One HTTP GET on loopback (no client library, no curl needed).
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// How `d` sees `peer` in `syncctl peers` (alive, suspect, dead), or ""
/// when it does not know it or does not answer.
pub fn peer_state(d: &Daemon, peer: &str) -> String {
    let (code, out, _) = ctl(d, &["--json", "peers"]);
    let Some(v) = serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .filter(|_| code == 0)
    else {
        return String::new();
    };
    v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["node_id"] == peer)
        .and_then(|p| p["state"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The `[tls]` files `syncd pki issue` wrote for node `id` under `certs`,
/// with the CA in `ca_dir`.
pub fn tls_files(ca_dir: &Path, certs: &Path, id: &str) -> syncd::tls::TlsFiles {
    syncd::tls::TlsFiles {
        ca: syncd::tls::pki::ca_files(ca_dir).0,
        cert: certs.join(format!("{id}.pem")),
        key: certs.join(format!("{id}.key")),
    }
}

/// `[tls]` for syncd.toml naming `f`.
pub fn tls_lines(f: &syncd::tls::TlsFiles) -> String {
    format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        f.ca.display(),
        f.cert.display(),
        f.key.display()
    )
}

/// `h` signed by its owner, as a node signs its own record under TLS.
pub fn signed_by(
    tls: &syncd::tls::Tls,
    mut h: sync_proto::pb::Holdings,
) -> sync_proto::pb::Holdings {
    tls.signer().sign_record(&mut h);
    h
}
