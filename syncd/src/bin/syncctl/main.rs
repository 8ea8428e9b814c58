//! `syncctl`: asks the local syncd over its admin socket. Glue only: the
//! daemon computes everything; this formats it as tables or JSON.
//!
//! Exit codes: 0 success, 1 error (daemon unreachable, unknown directory,
//! refused action), 2 usage error, 3 `wait` timed out.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use comfy_table::{Table, presets};
use sync_proto::admin as pba;
use sync_proto::admin::admin_client::AdminClient;
use tonic::transport::{Channel, Endpoint, Uri};

mod control;
mod wait;
use control::{Steer, control};
use wait::wait;

const EXIT_ERROR: u8 = 1;
const EXIT_TIMEOUT: u8 = 3;

#[derive(Parser)]
#[command(
    name = "syncctl",
    version,
    about = "Ask the local syncd what it is doing, and steer it",
    after_help = "Exit codes: 0 success, 1 error, 2 usage error, 3 wait timed out.\n\
                  JSON output (--json) follows sync-proto/proto/admin.proto; see ops/README.md."
)]
struct Cli {
    /// The daemon's admin socket ([admin] socket in syncd.toml).
    #[arg(
        long,
        global = true,
        env = "SYNCD_SOCKET",
        default_value = "/run/syncd/syncd.sock"
    )]
    socket: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Node, peers, and every directory's state, versions and progress.
    Status,
    /// Every known peer: address, labels, class, RTT, state, traffic, versions.
    Peers,
    /// The directories this node syncs.
    Dirs,
    /// Every node x directory of the fleet, as gossip brings it to this
    /// node: version, state, lag behind the newest, rate; grouped by
    /// region and zone.
    Fleet {
        /// Only this directory.
        dir: Option<String>,
    },
    /// Stop scanning, publishing and pulling a directory (files untouched);
    /// with --fleet, on every node carrying it.
    Pause(Steer),
    /// Undo pause (with --fleet, on every node carrying it).
    Resume(Steer),
    /// Set directories' priority class (high, normal, low) until the next
    /// restart or a change of `priority` in their file; a transfer in
    /// progress follows from its next call. With --fleet, on every node
    /// carrying them, restarts included, until the next fleet control.
    Priority {
        /// high, normal or low.
        #[arg(value_parser = ["high", "normal", "low"])]
        class: String,
        #[command(flatten)]
        steer: Steer,
    },
    /// Scan a directory now and return when done (a replica then pulls).
    Rescan(Targets),
    /// Undo local edits on a replica: fetch the newest version again.
    Revert(Targets),
    /// Block until this node (or, with --fleet, every live peer carrying
    /// the directory) holds a version. On a source, the default target is
    /// what is on disk now (it is scanned first).
    Wait {
        dir: String,
        /// The version to wait for (default: the newest seen in the fleet
        /// when the wait starts; on a source, the version of what is on
        /// disk now).
        #[arg(long)]
        version: Option<u64>,
        /// Wait for every live peer that carries the directory too.
        #[arg(long)]
        fleet: bool,
        /// Give up after this long (exit code 3).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

#[derive(clap::Args)]
pub(crate) struct Targets {
    /// Directory ids.
    #[arg(required_unless_present = "all")]
    pub(crate) dirs: Vec<String>,
    /// Every directory of this node.
    #[arg(long, conflicts_with = "dirs")]
    pub(crate) all: bool,
}

/// An error with the exit code it maps to.
pub(crate) struct Failure(u8, anyhow::Error);

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure(EXIT_ERROR, e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("syncctl: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("syncctl: {e:#}");
            ExitCode::from(code)
        }
    }
}

async fn connect(socket: &std::path::Path) -> anyhow::Result<AdminClient<Channel>> {
    let path = socket.to_path_buf();
    let channel = Endpoint::try_from("http://localhost")?
        .connect_timeout(Duration::from_secs(5))
        // rescan returns when the scan is done: a large tree takes minutes.
        .timeout(Duration::from_secs(30 * 60))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .with_context(|| {
            format!(
                "cannot reach syncd at {} (is it running? right --socket? \
                 only root and group syncd may use the socket)",
                socket.display()
            )
        })?;
    Ok(AdminClient::new(channel))
}

pub(crate) fn rpc_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "syncctl",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .context("writing the man page")?;
            return Ok(());
        }
        _ => {}
    }
    let mut client = connect(&cli.socket).await?;
    match cli.command {
        Command::Status => {
            let s = status(&mut client).await?;
            if cli.json {
                print_json(&s)?;
            } else {
                print!("{}", status_text(&s));
            }
        }
        Command::Peers => {
            let p = client
                .peers(pba::PeersRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            if cli.json {
                print_json(&p)?;
            } else {
                print!("{}", peers_text(&p));
            }
        }
        Command::Fleet { dir } => {
            let f = client
                .fleet(pba::FleetRequest {
                    dir: dir.unwrap_or_default(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if cli.json {
                print_json(&f)?;
            } else {
                print!("{}", fleet_text(&f));
            }
        }
        Command::Dirs => {
            let s = status(&mut client).await?;
            if cli.json {
                print_json(&s.dirs)?;
            } else {
                let mut t = table(&["DIR", "MODE", "STATE", "VERSION", "PATH"]);
                for d in &s.dirs {
                    t.add_row(vec![
                        d.id.clone(),
                        d.mode.clone(),
                        d.state.clone(),
                        d.local_version.to_string(),
                        d.path.clone(),
                    ]);
                }
                println!("{t}");
            }
        }
        Command::Pause(s) => control(&mut client, "pause", "", s, cli.json).await?,
        Command::Resume(s) => control(&mut client, "resume", "", s, cli.json).await?,
        Command::Priority { class, steer } => {
            control(&mut client, "priority", &class, steer, cli.json).await?
        }
        Command::Rescan(t) => control(&mut client, "rescan", "", t.into(), cli.json).await?,
        Command::Revert(t) => control(&mut client, "revert", "", t.into(), cli.json).await?,
        Command::Wait {
            dir,
            version,
            fleet,
            timeout,
        } => wait(&mut client, &dir, version, fleet, timeout, cli.json).await?,
        Command::Completions { .. } | Command::Man => unreachable!("handled above"),
    }
    Ok(())
}

async fn status(client: &mut AdminClient<Channel>) -> anyhow::Result<pba::StatusReply> {
    Ok(client
        .status(pba::StatusRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner())
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header(header.to_vec());
    t
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn short(root: &str) -> &str {
    &root[..root.len().min(12)]
}

fn status_text(s: &pba::StatusReply) -> String {
    let p = s.peers.unwrap_or_default();
    let cap = |c: u64| {
        if c == 0 {
            "none".to_string()
        } else {
            format!("{}/s", bytes(c))
        }
    };
    let mut out = format!(
        "node {}  syncd {}  up {}  peers: {} alive, {} suspect, {} dead\n",
        s.node_id,
        s.syncd_version,
        duration(s.uptime_seconds),
        p.alive,
        p.suspect,
        p.dead
    );
    out.push_str(&match (s.tls, s.certificate_days) {
        (false, _) => "tls: off (the peer port is not authenticated)\n".to_string(),
        (true, d) if d < 0.0 => format!("tls: CERTIFICATE EXPIRED {:.0} days ago\n", -d),
        (true, d) => format!("tls: certificate expires in {d:.0} days\n"),
    });
    if s.upload_cap + s.download_cap > 0 {
        out.push_str(&format!(
            "caps: upload {}, download {}\n",
            cap(s.upload_cap),
            cap(s.download_cap)
        ));
    }
    out.push('\n');
    let mut t = table(&[
        "DIR",
        "MODE",
        "STATE",
        "LOCAL",
        "FLEET",
        "CONVERGED",
        "PENDING",
        "RATE",
        "ETA",
        "PRIORITY",
    ]);
    for d in &s.dirs {
        t.add_row(vec![
            d.id.clone(),
            d.mode.clone(),
            d.state.clone(),
            format!("v{} {}", d.local_version, short(&d.local_root)),
            format!("v{} {}", d.fleet_version, short(&d.fleet_root)),
            format!("{}/{} peers", d.peers_at_fleet_version, d.peers_carrying),
            if d.pending_files + d.pending_bytes > 0 {
                format!("{} files, {}", d.pending_files, bytes(d.pending_bytes))
            } else {
                "-".into()
            },
            format!("{}/s", bytes(d.rate_bytes_per_second as u64)),
            if d.eta_seconds > 0.0 {
                duration(d.eta_seconds.ceil() as u64)
            } else {
                "-".into()
            },
            d.priority.clone(),
        ]);
    }
    out.push_str(&format!("{t}\n"));
    for d in &s.dirs {
        if !d.control.is_empty() {
            out.push_str(&format!("\n{}: fleet control: {}\n", d.id, d.control));
        }
        if !d.sources.is_empty() {
            // Who gave most first.
            let mut by_bytes: Vec<&pba::TransferSource> = d.sources.iter().collect();
            by_bytes.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.node_id.cmp(&b.node_id)));
            let from: Vec<String> = by_bytes
                .iter()
                .map(|x| {
                    format!(
                        "{}{} {}",
                        x.node_id,
                        if x.full { "" } else { " (receiving)" },
                        bytes(x.bytes)
                    )
                })
                .collect();
            out.push_str(&format!("\n{}: sources: {}\n", d.id, from.join(", ")));
        }
        if d.upload_cap + d.download_cap > 0 {
            out.push_str(&format!(
                "{}: caps: upload {}, download {}\n",
                d.id,
                cap(d.upload_cap),
                cap(d.download_cap)
            ));
        }
    }
    for d in &s.dirs {
        if !d.reason.is_empty() {
            out.push_str(&format!("\n{}: error: {}\n", d.id, d.reason));
        } else if !d.last_error.is_empty() {
            out.push_str(&format!(
                "\n{}: last error{}: {}\n",
                d.id,
                if d.failures > 0 { "" } else { " (recovered)" },
                d.last_error
            ));
        }
        if d.failures > 0 {
            out.push_str(&format!(
                "{}: {} failed attempt{} in a row; next retry in {:.0} s\n",
                d.id,
                d.failures,
                if d.failures == 1 { "" } else { "s" },
                d.retry_in_seconds.ceil()
            ));
        }
    }
    out
}

fn peers_text(p: &pba::PeersReply) -> String {
    let mut t = table(&[
        "PEER", "ADDRESS", "STATE", "CLASS", "RTT", "SENT", "RECEIVED", "LABELS", "HOLDS",
    ]);
    for x in &p.peers {
        let mut labels: Vec<String> = x.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        t.add_row(vec![
            x.node_id.clone(),
            x.address.clone(),
            if x.demoted.is_empty() {
                x.state.clone()
            } else {
                format!("{}, demoted: {}", x.state, x.demoted)
            },
            x.class.clone(),
            if x.rtt_ms > 0.0 {
                format!("{:.1} ms", x.rtt_ms)
            } else {
                "-".into()
            },
            bytes(x.bytes_sent),
            bytes(x.bytes_received),
            labels.join(","),
            x.holds
                .iter()
                .map(|h| format!("{}@v{}", h.dir, h.version))
                .collect::<Vec<_>>()
                .join(" "),
        ]);
    }
    format!("{t}\n")
}

const FLEET_COLUMNS: [&str; 10] = [
    "NODE",
    "STATE",
    "DIR",
    "MODE",
    "VERSION",
    "LAG",
    "DIR STATE",
    "RATE",
    "PENDING",
    "LAST ERROR",
];

fn fleet_table() -> Table {
    table(&FLEET_COLUMNS)
}

fn fleet_text(f: &pba::FleetReply) -> String {
    let mut out = String::new();
    let mut group = None;
    let mut t = fleet_table();
    let label =
        |n: &pba::FleetNode, k: &str| n.labels.get(k).cloned().unwrap_or_else(|| "-".into());
    for n in &f.nodes {
        let g = (label(n, "region"), label(n, "zone"));
        if group.as_ref() != Some(&g) {
            if group.is_some() {
                out.push_str(&format!("{t}\n\n"));
                t = fleet_table();
            }
            out.push_str(&format!("region {} / zone {}\n", g.0, g.1));
            group = Some(g);
        }
        for d in &n.dirs {
            t.add_row(vec![
                n.node_id.clone(),
                n.state.clone(),
                d.dir.clone(),
                d.mode.clone(),
                if d.version == 0 {
                    "-".into()
                } else {
                    d.version.to_string()
                },
                d.lag.to_string(),
                if d.control.is_empty() {
                    d.state.clone()
                } else {
                    format!("{} (fleet)", d.state)
                },
                if d.rate_bytes_per_second > 0.0 {
                    format!("{}/s", bytes(d.rate_bytes_per_second as u64))
                } else {
                    "-".into()
                },
                if d.pending_bytes > 0 {
                    bytes(d.pending_bytes)
                } else {
                    "-".into()
                },
                d.last_error.chars().take(60).collect(),
            ]);
        }
    }
    if group.is_some() {
        out.push_str(&format!("{t}\n"));
    } else {
        out.push_str("no nodes known\n");
    }
    if !f.controls.is_empty() {
        out.push_str("\nfleet controls (\"(fleet)\" above: applied there):\n");
        for c in &f.controls {
            let what = if c.action == "priority" {
                format!("priority {}", c.priority)
            } else {
                c.action.clone()
            };
            out.push_str(&format!(
                "  {}: {what} by {} at {}\n",
                c.dir, c.operator, c.time
            ));
        }
    }
    out
}
