//! Gossip at scale, over the simulation (fleet views on the in-memory
//! network, paused clock): for each fleet size, how many rounds and
//! simulated seconds until every node knows a new version (p50/p99 over
//! seeds, with pushes and with rounds alone, as if every push were lost),
//! gossip bytes per node per second while idle (sent plus received), and
//! the fleet view's memory per node. One JSON line per fleet size and mode.
//!
//! With `--swim`, SWIM runs too and its idle bytes are reported apart.
//!
//! `cargo bench --workspace --bench gossip_scale [-- N... [--seeds S] [--swim]]`

use std::time::Duration;

use syncd::fleet::gossip::{Options, ROUND};
use syncd::sim::fleet::FleetSim;

struct Run {
    seconds: f64,
    idle_bytes_per_node_s: f64,
    swim_idle_bytes_per_node_s: f64,
    view_bytes_per_node: f64,
    peers_per_node: f64,
}

fn run(n: usize, seed: u64, push: bool, swim: bool) -> Run {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut sim = FleetSim::converged(n, seed);
        if swim {
            sim.start_swim();
        }
        sim.start(Options { push });
        // Idle: a converged fleet, nothing changing.
        tokio::time::sleep(Duration::from_secs(if swim { 30 } else { 5 })).await;
        let (b0, s0) = (sim.gossip_bytes(), sim.swim_bytes());
        let idle = Duration::from_secs(30);
        tokio::time::sleep(idle).await;
        let per_node_s = |b: u64| b as f64 / n as f64 / idle.as_secs_f64();
        let idle_bytes = per_node_s(sim.gossip_bytes() - b0);
        let swim_idle = per_node_s(sim.swim_bytes() - s0);
        // A new version at node 0.
        let started = tokio::time::Instant::now();
        sim.publish(0, 2);
        while sim.knowing(2) < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "no convergence"
            );
        }
        let seconds = started.elapsed().as_secs_f64();
        let view: usize = sim.views.iter().map(|v| v.view_bytes()).sum();
        let peers: usize = sim.views.iter().map(|v| v.len()).sum();
        Run {
            seconds,
            idle_bytes_per_node_s: idle_bytes,
            swim_idle_bytes_per_node_s: swim_idle,
            view_bytes_per_node: view as f64 / n as f64,
            peers_per_node: peers as f64 / n as f64,
        }
    })
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i]
}

fn main() {
    let mut sizes = Vec::new();
    let mut seeds = 10u64;
    let mut swim = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seeds" => seeds = args.next().and_then(|s| s.parse().ok()).unwrap_or(seeds),
            "--bench" => {}
            // SWIM too (its idle bytes reported apart from gossip's).
            "--swim" => swim = true,
            s => {
                if let Ok(n) = s.parse() {
                    sizes.push(n);
                }
            }
        }
    }
    if sizes.is_empty() {
        sizes = vec![10, 100, 1000];
    }
    for &n in &sizes {
        for push in [true, false] {
            let runs: Vec<Run> = (0..seeds).map(|s| run(n, s, push, swim)).collect();
            let mut secs: Vec<f64> = runs.iter().map(|r| r.seconds).collect();
            let mut idle: Vec<f64> = runs.iter().map(|r| r.idle_bytes_per_node_s).collect();
            let mut swim_idle: Vec<f64> =
                runs.iter().map(|r| r.swim_idle_bytes_per_node_s).collect();
            let round = ROUND.as_secs_f64();
            let (p50, p99) = (quantile(&mut secs, 0.5), quantile(&mut secs, 0.99));
            println!(
                "{{\"n\":{n},\"mode\":\"{}\",\"seeds\":{seeds},\"seconds_p50\":{p50:.3},\"seconds_p99\":{p99:.3},\"rounds_p50\":{:.2},\"rounds_p99\":{:.2},\"idle_bytes_per_node_s_p50\":{:.1},\"idle_bytes_per_node_s_max\":{:.1},\"swim\":{swim},\"swim_idle_bytes_per_node_s_p50\":{:.1},\"view_bytes_per_node\":{:.0},\"peer_entries_per_node\":{:.0},\"peer_entry_bytes\":{}}}",
                if push { "push" } else { "rounds_only" },
                p50 / round,
                p99 / round,
                quantile(&mut idle, 0.5),
                quantile(&mut idle, 1.0),
                quantile(&mut swim_idle, 0.5),
                runs[0].view_bytes_per_node,
                runs[0].peers_per_node,
                std::mem::size_of::<syncd::fleet::PeerState>(),
            );
        }
    }
}
