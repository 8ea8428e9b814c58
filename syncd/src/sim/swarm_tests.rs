//! The swarm in the simulation: one origin and several receivers, every
//! node's upload capped (so where the bytes come from decides how long a
//! transfer takes), a new file of several MiB, and receivers that crash
//! mid-transfer and come back. Checked at the end of every seed:
//!
//! - every node converges to the origin's version and files;
//! - the origin uploads about one copy (at most 1.6, plus half a copy per
//!   crash), not one per receiver: receivers feed each other (the old
//!   fetcher made it send every receiver its own copy);
//! - nothing is written outside a node's roots, no temp file is left.

use std::time::Duration;

use rand::{RngExt as _, SeedableRng as _};

use super::node::{DirSpec, NodeSpec};
use super::tests::{DIR, Fleet};
use crate::bandwidth::Caps;
use crate::transport::mem::MemNet;

/// Every node's upload cap: the origin alone would need one such second
/// per MiB per receiver.
const UPLOAD: u64 = 8 << 20;
/// Simulated time the fleet gets to converge once the last receiver is
/// back.
const CONVERGE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
struct Script {
    nodes: usize,
    size: usize,
    /// (ms after the publish, receiver) crashes, each back `down` ms later.
    crashes: Vec<(u64, usize, u64)>,
}

fn script(seed: u64) -> Script {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5_3a_2f);
    let nodes = rng.random_range(5..=7);
    let size = rng.random_range(16..=24) << 20;
    let crashes = (0..rng.random_range(0..=2))
        .map(|_| {
            (
                rng.random_range(200..4000),
                rng.random_range(1..nodes),
                rng.random_range(500..5000),
            )
        })
        .collect();
    Script {
        nodes,
        size,
        crashes,
    }
}

/// What a seed measured.
#[derive(Debug)]
struct Outcome {
    origin_copies: f64,
    receivers_copies: f64,
    took: Duration,
}

async fn write(f: &Fleet, name: &str, data: &[u8]) -> Result<(), String> {
    let path = f.source_root().join(name);
    std::fs::write(&path, data).map_err(|e| format!("{}: {e}", path.display()))?;
    // A fixed modification time: it is part of the root, so a replay
    // publishes the same version.
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|file| {
            file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let h = f.nodes[0]
        .as_ref()
        .and_then(|n| n.handle(DIR))
        .ok_or("the origin is down")?;
    h.rescan().await.map_err(|e| format!("publishing: {e}"))?;
    Ok(())
}

async fn converge(f: &Fleet, within: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = f.converged();
    while last.is_err() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = f.converged();
    }
    last.map_err(|e| format!("not converged after {within:?}: {e}"))
}

async fn run(seed: u64, tmp: &std::path::Path) -> Result<Outcome, String> {
    let s = script(seed);
    let n = s.nodes;
    let specs: Vec<NodeSpec> = (0..n)
        .map(|i| NodeSpec {
            id: format!("n{i}"),
            address: super::address(i),
            sandbox: tmp.join(format!("n{i}")),
            bootstrap: vec![super::address(0)],
            dirs: vec![DirSpec {
                id: DIR.into(),
                mode: if i == 0 { "source" } else { "replica" }.into(),
            }],
            seed: seed * 100 + i as u64,
            caps: Caps {
                upload: Some(UPLOAD),
                download: None,
            },
        })
        .collect();
    let mut f = Fleet::started(MemNet::new(), specs).await?;
    // A first small version everywhere: every node knows every other.
    write(&f, "hello", b"hello\n").await?;
    converge(&f, CONVERGE).await?;
    // What each node answered (its upload): calls others made to it.
    let served = |f: &Fleet| -> Vec<u64> {
        (0..n)
            .map(|i| {
                let me = super::address(i);
                (0..n)
                    .filter(|&j| j != i)
                    .map(|j| f.net.bytes(&super::address(j), &me))
                    .sum()
            })
            .collect()
    };
    let before = served(&f);
    let data = chunk_store::testdata::pseudo_random(s.size, seed * 2 + 1);
    let start = tokio::time::Instant::now();
    write(&f, "big", &data).await?;
    // Crashes and restarts, in time order.
    let mut events: Vec<(u64, usize, bool)> = Vec::new();
    for &(at, i, down) in &s.crashes {
        events.push((at, i, false));
        events.push((at + down, i, true));
    }
    events.sort();
    for (at, i, up) in events {
        tokio::time::sleep_until(start + Duration::from_millis(at)).await;
        if up {
            if f.nodes[i].is_none() {
                f.start(i).await?;
            }
        } else if let Some(node) = f.nodes[i].take() {
            node.crash().await;
        }
    }
    for i in 0..n {
        if f.nodes[i].is_none() {
            f.start(i).await?;
        }
    }
    converge(&f, CONVERGE).await?;
    let took = start.elapsed();
    let after = served(&f);
    let up: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let size = s.size as f64;
    let out = Outcome {
        origin_copies: up[0] as f64 / size,
        receivers_copies: up[1..].iter().sum::<u64>() as f64 / size,
        took,
    };
    f.check_and_stop().await?;
    Ok(out)
}

fn run_seed(seed: u64) -> Result<Outcome, String> {
    super::tests::paused(|tmp| async move { run(seed, &tmp).await })
}

/// Seeded swarms converge with receivers crashing mid-transfer, and the
/// origin sends far less than a copy per receiver.
#[test]
fn swarms_converge_and_spare_the_origin_when_receivers_crash() {
    let seeds: u64 = std::env::var("SYNCD_SWARM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let mut failures = Vec::new();
    for seed in 0..seeds {
        let s = script(seed);
        match run_seed(seed) {
            Ok(o) => {
                if std::env::var_os("SYNCD_SIM_VERBOSE").is_some() {
                    eprintln!(
                        "seed {seed}: {s:?}: origin {:.2} copies, receivers {:.2}, {:.1} s",
                        o.origin_copies,
                        o.receivers_copies,
                        o.took.as_secs_f64()
                    );
                }
                let receivers = (s.nodes - 1) as f64;
                // Every receiver got a copy: what the origin did not send,
                // receivers did.
                if o.receivers_copies + o.origin_copies < receivers * 0.9 {
                    failures.push(format!(
                        "seed {seed} {s:?}: only {:.2} + {:.2} copies were sent for {receivers} receivers",
                        o.origin_copies, o.receivers_copies
                    ));
                }
                // About one copy from the origin (measured: 1.1 to 1.4
                // without crashes), plus what a crashed receiver fetches
                // again; the old fetcher sent one per receiver (4 to 6).
                let limit = 1.6 + 0.5 * s.crashes.len() as f64;
                if o.origin_copies > limit {
                    failures.push(format!(
                        "seed {seed} {s:?}: the origin uploaded {:.2} copies for {receivers} receivers, more than {limit} ({o:?})",
                        o.origin_copies
                    ));
                }
            }
            Err(e) => failures.push(format!(
                "seed {seed} {s:?}: {e}\nreplay: SYNCD_SWARM_SEEDS={} cargo test --release -p syncd sim::swarm_tests",
                seed + 1
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
