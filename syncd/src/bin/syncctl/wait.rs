//! `syncctl wait`: polls status until a directory (or the fleet) holds a
//! version.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use sync_proto::admin as pba;
use sync_proto::admin::admin_client::AdminClient;
use tonic::transport::Channel;

use super::{EXIT_TIMEOUT, Failure, bytes, print_json, rpc_error, status};

/// What a wait is waiting for, computed from one status.
struct Goal {
    done: bool,
    line: String,
    /// Nodes at the target version, of how many must be.
    at: u64,
    of: u64,
}

fn goal(d: &pba::DirStatus, target: u64, fleet: bool) -> Goal {
    let behind: Vec<&str> = d
        .peers
        .iter()
        .filter(|p| p.version < target)
        .map(|p| p.node_id.as_str())
        .collect();
    let here = d.local_version >= target;
    let done = here && (!fleet || behind.is_empty());
    let (at, of) = if fleet {
        (
            u64::from(here) + (d.peers.len() - behind.len()) as u64,
            1 + d.peers.len() as u64,
        )
    } else {
        (u64::from(here), 1)
    };
    let mut line = format!(
        "{}: v{} here (want v{target}), {}",
        d.id, d.local_version, d.state
    );
    if d.pending_files + d.pending_bytes > 0 {
        line.push_str(&format!(
            ", {} files / {} pending",
            d.pending_files,
            bytes(d.pending_bytes)
        ));
    }
    if fleet {
        line.push_str(&format!(
            ", {}/{} peers at v{target}+",
            d.peers.len() - behind.len(),
            d.peers.len()
        ));
    }
    if !d.reason.is_empty() {
        line.push_str(&format!(" [{}]", d.reason));
    }
    Goal { done, line, at, of }
}

pub(super) async fn wait(
    client: &mut AdminClient<Channel>,
    dir: &str,
    version: Option<u64>,
    fleet: bool,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    let find = |s: pba::StatusReply| {
        let known: Vec<String> = s.dirs.iter().map(|d| d.id.clone()).collect();
        s.dirs.into_iter().find(|d| d.id == dir).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown directory {dir:?}; this node syncs: {}",
                known.join(", ")
            )
        })
    };
    let mut first = find(status(client).await?)?;
    if version.is_none() && first.mode == "source" {
        // On the source, "the newest" means what is on disk now: scan it
        // (synchronously) so a change made just before is the target.
        client
            .control(pba::ControlRequest {
                action: "rescan".into(),
                dirs: vec![dir.to_string()],
                all: false,
                priority: String::new(),
                ..Default::default()
            })
            .await
            .map_err(rpc_error)?;
        first = find(status(client).await?)?;
    }
    let target = version.unwrap_or(first.fleet_version.max(1));
    // On a terminal: a bar of nodes at the version, with the details.
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} nodes  {msg}",
            )
            .expect("valid template"),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let mut last_line = String::new();
    loop {
        let d = find(status(client).await?)?;
        let g = goal(&d, target, fleet);
        if let Some(b) = &bar {
            b.set_length(g.of);
            b.set_position(g.at);
        }
        if g.line != last_line {
            match &bar {
                Some(b) => b.set_message(g.line.clone()),
                None if !json => eprintln!("{}", g.line),
                None => {}
            }
            last_line = g.line.clone();
        }
        if g.done {
            if let Some(b) = bar {
                b.finish_with_message(g.line);
            }
            if json {
                print_json(&d)?;
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            if let Some(b) = bar {
                b.abandon();
            }
            return Err(Failure(
                EXIT_TIMEOUT,
                anyhow::anyhow!("timed out after {timeout:?}: {}", g.line),
            ));
        }
        // Polling the local daemon is the interface: status is cheap.
        tokio::time::sleep(Duration::from_millis(200).min(deadline - Instant::now())).await;
    }
}
