//! The scripted simulation: small fleets of whole nodes (one source, a
//! few replicas of one directory) driven through seeded scripts of
//! writes, publishes, cut and healed links, crashes and restarts, on a
//! paused clock, with invariants checked at the end:
//!
//! - every live node converges to the newest version, with the source's
//!   files, within a bounded simulated time after the last fault heals;
//! - nothing is written outside a node's roots and index, and no temp
//!   file is left in a root;
//! - no node's version of the directory ever goes backwards.
//!
//! A failing seed is printed with its script; `SYNCD_SIM_SEED=N cargo
//! test --release -p syncd sim::tests::one_seed` replays it (set
//! `SYNCD_SIM_SEEDS` to run more seeds).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{RngExt as _, SeedableRng as _};

use super::node::{DirSpec, NodeSpec, SimNode};
use crate::locks::LockExt as _;
use crate::transport::mem::MemNet;

pub(super) const DIR: &str = "www";
/// Simulated time every node gets to converge once faults are healed.
const CONVERGE: Duration = Duration::from_secs(180);

#[derive(Debug, Clone)]
enum Op {
    /// The source writes file `f{n}` with `len` bytes from `fill`.
    Write {
        n: u8,
        len: u32,
        fill: u8,
    },
    Remove {
        n: u8,
    },
    /// `syncctl rescan` on the source.
    Publish,
    Cut(usize, usize),
    Heal(usize, usize),
    Crash(usize),
    Restart(usize),
    Advance(u64),
}

fn script(seed: u64) -> (usize, Vec<Op>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let nodes = rng.random_range(2..=4);
    let mut ops = vec![
        Op::Write {
            n: 0,
            len: 1000,
            fill: 1,
        },
        Op::Publish,
    ];
    for _ in 0..rng.random_range(6..16) {
        let a = rng.random_range(0..nodes);
        let b = (a + rng.random_range(1..nodes)) % nodes;
        ops.push(match rng.random_range(0..10) {
            0..=2 => Op::Write {
                n: rng.random_range(0..6),
                len: rng.random_range(0..300_000),
                fill: rng.random(),
            },
            // f0 stays: a source refuses to publish an empty root.
            3 => Op::Remove {
                n: rng.random_range(1..6),
            },
            4 => Op::Publish,
            5 => Op::Cut(a, b),
            6 => Op::Heal(a, b),
            7 => Op::Crash(a),
            8 => Op::Restart(a),
            _ => Op::Advance(rng.random_range(1..20)),
        });
    }
    (nodes, ops)
}

/// Content of a root: relative path to bytes.
pub(super) fn files(root: &Path) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))? {
        let e = e.map_err(|e| e.to_string())?;
        let name = e.file_name().to_string_lossy().into_owned();
        let data = std::fs::read(e.path()).map_err(|e| e.to_string())?;
        out.insert(name, data);
    }
    Ok(out)
}

pub(super) struct Fleet {
    pub(super) net: Arc<MemNet>,
    pub(super) specs: Vec<NodeSpec>,
    pub(super) nodes: Vec<Option<SimNode>>,
    incarnations: Vec<u64>,
    /// Every version each node was seen holding, in order.
    seen: Arc<Mutex<Vec<Vec<u64>>>>,
}

impl Fleet {
    /// A fleet of `specs` on `net`, every node started.
    pub(super) async fn started(net: Arc<MemNet>, specs: Vec<NodeSpec>) -> Result<Fleet, String> {
        let n = specs.len();
        let mut f = Fleet {
            net,
            nodes: (0..n).map(|_| None).collect(),
            incarnations: vec![0; n],
            seen: Arc::new(Mutex::new(vec![Vec::new(); n])),
            specs,
        };
        for i in 0..n {
            f.start(i).await?;
        }
        Ok(f)
    }

    pub(super) async fn start(&mut self, i: usize) -> Result<(), String> {
        self.incarnations[i] += 1;
        let n = SimNode::start(&self.net, self.specs[i].clone(), self.incarnations[i]).await?;
        let mut watch = n.handle(DIR).expect("carried").watch();
        let seen = self.seen.clone();
        tokio::spawn(async move {
            loop {
                if let Some(v) = watch.borrow_and_update().current.as_ref() {
                    let mut s = seen.locked();
                    if s[i].last() != Some(&v.version) {
                        s[i].push(v.version);
                    }
                }
                if watch.changed().await.is_err() {
                    break;
                }
            }
        });
        self.nodes[i] = Some(n);
        Ok(())
    }

    pub(super) fn source_root(&self) -> std::path::PathBuf {
        self.specs[0].root(DIR)
    }

    /// The invariants every run ends with: no node's version went
    /// backwards, nothing was written outside a node's sandbox roots and
    /// index, no temp file was left; then the nodes stop.
    pub(super) async fn check_and_stop(self) -> Result<(), String> {
        for (i, s) in self.seen.locked().iter().enumerate() {
            if s.windows(2).any(|w| w[1] < w[0]) {
                return Err(format!("node {i}'s version went backwards: {s:?}"));
            }
        }
        for s in &self.specs {
            confined(&s.sandbox)?;
        }
        for n in self.nodes.into_iter().flatten() {
            n.stop().await;
        }
        Ok(())
    }

    /// Whether every node holds the source's version with its files.
    pub(super) fn converged(&self) -> Result<(), String> {
        let source = self.nodes[0].as_ref().ok_or("the source is down")?;
        let want = source
            .handle(DIR)
            .and_then(|h| h.status().current)
            .ok_or("the source holds no version")?;
        let content = files(&self.source_root())?;
        for (i, n) in self.nodes.iter().enumerate().skip(1) {
            let n = n.as_ref().ok_or_else(|| format!("node {i} is down"))?;
            let have = n.handle(DIR).and_then(|h| h.status().current);
            if have.as_ref().map(|v| (v.version, &v.root)) != Some((want.version, &want.root)) {
                return Err(format!(
                    "node {i} holds {:?}, the source {}",
                    have.map(|v| v.version),
                    want.version
                ));
            }
            let got = files(&n.spec.root(DIR))?;
            if got != content {
                return Err(format!(
                    "node {i}'s files differ: {:?} against {:?}",
                    got.keys().collect::<Vec<_>>(),
                    content.keys().collect::<Vec<_>>()
                ));
            }
        }
        Ok(())
    }
}

/// What each node's sandbox may hold at its top level.
fn confined(sandbox: &Path) -> Result<(), String> {
    for e in std::fs::read_dir(sandbox).map_err(|e| e.to_string())? {
        let name = e.map_err(|e| e.to_string())?.file_name();
        if name != "index" && name != "data" {
            return Err(format!("{} holds {name:?}", sandbox.display()));
        }
    }
    for e in std::fs::read_dir(sandbox.join("data")).map_err(|e| e.to_string())? {
        let name = e.map_err(|e| e.to_string())?.file_name();
        if name != DIR {
            return Err(format!("data dir holds {name:?}"));
        }
    }
    for name in files(&sandbox.join("data").join(DIR))?.keys() {
        if name.starts_with(chunk_store::manifest::RESERVED_PREFIX) {
            return Err(format!("temp file {name} left in the root"));
        }
    }
    Ok(())
}

/// What a run did, to compare two runs of one seed: when it converged
/// (simulated), every version each node held, and the bytes and calls
/// that crossed the network.
type Trace = String;

async fn run(seed: u64, tmp: &Path) -> Result<Trace, String> {
    let (n, ops) = script(seed);
    let started = tokio::time::Instant::now();
    let net = MemNet::new();
    let specs: Vec<NodeSpec> = (0..n)
        .map(|i| NodeSpec {
            id: format!("n{i}"),
            address: super::address(i),
            sandbox: tmp.join(format!("n{i}")),
            bootstrap: vec![super::address(0), super::address(1)],
            dirs: vec![DirSpec {
                id: DIR.into(),
                mode: if i == 0 { "source" } else { "replica" }.into(),
            }],
            seed: seed * 100 + i as u64,
            caps: Default::default(),
        })
        .collect();
    for s in &specs {
        std::fs::create_dir_all(s.root(DIR)).map_err(|e| e.to_string())?;
    }
    let mut f = Fleet::started(net, specs).await?;
    let mut cuts = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { n, len, fill } => {
                let data: Vec<u8> = (0..len)
                    .map(|i| fill.wrapping_add((i / 4096) as u8))
                    .collect();
                let path = f.source_root().join(format!("f{n}"));
                std::fs::write(&path, data).map_err(|e| e.to_string())?;
                // A modification time from the script, not the wall clock:
                // it is part of the root, so a replay publishes the same.
                std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .and_then(|file| {
                        file.set_modified(
                            std::time::UNIX_EPOCH
                                + Duration::from_secs(1_700_000_000 + step as u64),
                        )
                    })
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            Op::Remove { n } => {
                let _ = std::fs::remove_file(f.source_root().join(format!("f{n}")));
            }
            Op::Publish => {
                if let Some(h) = f.nodes[0].as_ref().and_then(|s| s.handle(DIR)) {
                    h.rescan().await.map_err(|e| format!("publishing: {e}"))?;
                }
            }
            Op::Cut(a, b) => {
                f.net.cut(&super::address(a), &super::address(b));
                cuts.push((a, b));
            }
            Op::Heal(a, b) => f.net.heal(&super::address(a), &super::address(b)),
            Op::Crash(i) => {
                if let Some(node) = f.nodes[i].take() {
                    node.crash().await;
                }
            }
            Op::Restart(i) => {
                if f.nodes[i].is_none() {
                    f.start(i).await?;
                }
            }
            Op::Advance(s) => tokio::time::sleep(Duration::from_secs(s)).await,
        }
    }
    // Heal everything, bring every node back, publish what is on disk.
    for (a, b) in cuts {
        f.net.heal(&super::address(a), &super::address(b));
    }
    for i in 0..n {
        if f.nodes[i].is_none() {
            f.start(i).await?;
        }
    }
    if let Some(h) = f.nodes[0].as_ref().and_then(|s| s.handle(DIR)) {
        h.rescan().await.map_err(|e| format!("publishing: {e}"))?;
    }
    let deadline = tokio::time::Instant::now() + CONVERGE;
    let mut last = f.converged();
    while last.is_err() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        last = f.converged();
    }
    last.map_err(|e| format!("not converged after {CONVERGE:?}: {e}"))?;
    let calls: Vec<u64> = (0..n)
        .flat_map(|a| (0..n).map(move |b| (a, b)))
        .map(|(a, b)| f.net.calls(&super::address(a), &super::address(b)))
        .collect();
    let trace = format!(
        "seed {seed}: {n} nodes, converged at {:?} simulated; versions seen {:?}; {} bytes in calls {calls:?}; source files {:?}",
        tokio::time::Instant::now() - started,
        f.seen.locked(),
        f.net.bytes_from_all(),
        files(&f.source_root())?
            .iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect::<Vec<_>>()
    );
    if std::env::var_os("SYNCD_SIM_VERBOSE").is_some() {
        eprintln!("{trace}");
    }
    f.check_and_stop().await?;
    Ok(trace)
}

/// Runs `seed` on a current-thread runtime with the clock paused. With
/// `SYNCD_SIM_LOG` set (a filter such as `debug`), the nodes' logs go to
/// stderr without timestamps, so two runs can be compared line by line.
fn run_seed(seed: u64) -> Result<Trace, String> {
    let _logs = std::env::var("SYNCD_SIM_LOG").ok().map(|filter| {
        tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .without_time()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .finish(),
        )
    });
    paused(|tmp| async move { run(seed, &tmp).await })
}

/// Runs `run` in a fresh temporary directory on a current-thread runtime
/// with the clock paused (what makes a seed replayable).
pub(super) fn paused<T, F>(run: impl FnOnce(std::path::PathBuf) -> F) -> Result<T, String>
where
    F: std::future::Future<Output = Result<T, String>>,
{
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    let r = rt.block_on(run(tmp.path().to_path_buf()));
    rt.shutdown_timeout(Duration::from_secs(10));
    r
}

fn report(seed: u64, e: String) -> String {
    format!(
        "seed {seed} failed: {e}\nscript: {:?}\nreplay: SYNCD_SIM_SEED={seed} cargo test --release --workspace sim::tests::one_seed",
        script(seed)
    )
}

/// Many seeds, two at a time (the machine has two cores).
#[test]
fn seeded_fleets_converge_within_their_roots_and_never_go_back() {
    let seeds: u64 = std::env::var("SYNCD_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (next, failures) = (next.clone(), failures.clone());
            std::thread::spawn(move || {
                loop {
                    let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if seed >= seeds {
                        break;
                    }
                    if let Err(e) = run_seed(seed) {
                        failures.locked().push(report(seed, e));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let failures = failures.locked();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Replays one seed (`SYNCD_SIM_SEED`, default 0).
#[test]
fn one_seed() {
    let seed = std::env::var("SYNCD_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if let Err(e) = run_seed(seed) {
        panic!("{}", report(seed, e));
    }
}

/// A seed replays exactly: the same interleaving, so the same versions
/// held, the same convergence time and the same bytes on the network.
/// (Blocking work runs in lockstep with the runtime, and file events do
/// not drive scans in the simulation; without that, about one seed in
/// sixteen took another path on a second run.)
#[test]
fn a_seed_replays_the_same_run() {
    for seed in 0..24 {
        let first = run_seed(seed).map_err(|e| report(seed, e)).unwrap();
        let second = run_seed(seed).map_err(|e| report(seed, e)).unwrap();
        assert_eq!(first, second, "seed {seed} ran differently the second time");
    }
}

/// The same seed gives the same script (what makes a seed replayable).
#[test]
fn scripts_are_a_function_of_the_seed() {
    assert_eq!(format!("{:?}", script(7)), format!("{:?}", script(7)));
    assert_ne!(format!("{:?}", script(7)), format!("{:?}", script(8)));
}
