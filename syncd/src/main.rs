//! `syncd`: the daemon binary. Glue only: parse arguments, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "syncd",
    version,
    about = "Keeps directories identical across a fleet of servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Index a directory: chunk changed files, update the local index and
    /// print the manifest root. Unchanged files (same size, mtime, inode)
    /// are not read again.
    Index {
        /// The directory to index.
        dir: PathBuf,
        /// Where the index (RocksDB) lives.
        #[arg(long, default_value = "/var/lib/syncd")]
        state: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the daemon: sync every directory in dirs.d with the fleet.
    Run {
        #[arg(long, default_value = syncd::config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate syncd.toml and every dirs.d/*.toml beside it without
    /// starting; exits non-zero naming the file and line of the first error.
    CheckConfig {
        #[arg(long, default_value = syncd::config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// The fleet's certificate authority: create it, issue node
    /// certificates for mutual TLS (`[tls]` in syncd.toml).
    Pki {
        #[command(subcommand)]
        command: Pki,
    },
}

#[derive(Subcommand)]
enum Pki {
    /// Create the fleet CA: ca.pem (give to every node) and ca.key (keep
    /// it off the fleet). Never overwrites.
    Init {
        #[arg(long, default_value = "/etc/syncd/pki")]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "syncd fleet CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate for a node: OUT/NODE_ID.pem and OUT/NODE_ID.key
    /// (0600). The certificate names the node; it serves and dials with it.
    /// With --operator NAME instead: an operator certificate, OUT/NAME.pem
    /// and OUT/NAME.key, that signs fleet controls (`syncctl pause DIR
    /// --fleet`) and can do nothing else.
    Issue {
        #[arg(required_unless_present = "operator", conflicts_with = "operator")]
        node_id: Option<String>,
        /// Issue an operator certificate for this person or tool.
        #[arg(long, value_name = "NAME")]
        operator: Option<String>,
        /// The directory `pki init` wrote.
        #[arg(long, default_value = "/etc/syncd/pki")]
        ca_dir: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(matches!(cli.command, Command::Run { .. }));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("syncd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; under systemd (stderr connected to the journal) to the
/// journal directly, with structured fields (DIR=, PEER=, ...) instead of
/// formatted text. The daemon logs at info by default, tools at warn;
/// RUST_LOG overrides.
fn init_logging(daemon: bool) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        if daemon {
            "syncd=info,chunk_store=info,warn"
        } else {
            "warn"
        }
        .into()
    });
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(j) => registry
            .with(j.with_syslog_identifier("syncd".into()))
            .init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colour only on a terminal: in a log file the escape
                    // codes would break grep.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Index { dir, state, json } => {
            let report = syncd::index::run(&dir, &state)?;
            if json {
                println!("{}", syncd::index::to_json(&report));
            } else {
                print!("{}", syncd::index::to_text(&report));
            }
        }
        Command::Run { config } => {
            let config = syncd::config::Config::load(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let opts = syncd::daemon::RunOptions {
                notify: Some(syncd::sdnotify::Notifier::from_env()),
            };
            rt.block_on(syncd::daemon::run(config, shutdown_signal(), opts))?;
            // Blocking work (a scan, a file being written) gets a bounded
            // grace period; everything it does is atomic anyway.
            rt.shutdown_timeout(std::time::Duration::from_secs(10));
        }
        Command::CheckConfig { config } => {
            let c = syncd::config::Config::load(&config)?;
            println!(
                "{}: node {:?} listening on {}, {} director{}",
                c.file.display(),
                c.node.node.id.get_ref(),
                c.listen,
                c.dirs.len(),
                if c.dirs.len() == 1 { "y" } else { "ies" }
            );
            match &c.node.tls {
                Some(t) => println!(
                    "  tls: certificate {} for {:?}, {:.0} days left",
                    t.cert.display(),
                    c.node.node.id.get_ref(),
                    syncd::tls::check(t, c.node.node.id.get_ref())?
                ),
                None => println!("  tls: off (the peer port is not authenticated)"),
            }
            for (id, (file, d)) in &c.dirs {
                println!(
                    "  {id:<16} {:<8} {}  ({})",
                    format!("{:?}", d.mode.get_ref()).to_lowercase(),
                    d.path.get_ref().display(),
                    file.display()
                );
            }
        }
        Command::Pki {
            command: Pki::Init { dir, name, days },
        } => {
            let (cert, key) = syncd::tls::pki::init(&dir, &name, days)?;
            println!(
                "created the fleet CA: {} (copy to every node), {} (keep it off the fleet)",
                cert.display(),
                key.display()
            );
        }
        Command::Pki {
            command:
                Pki::Issue {
                    node_id,
                    operator,
                    ca_dir,
                    days,
                    out,
                },
        } => match (node_id, operator) {
            (Some(node_id), _) => {
                let (cert, key) = syncd::tls::pki::issue(&ca_dir, &node_id, days, &out)?;
                println!(
                    "issued {node_id:?} for {days} days: {} and {} (for [tls] cert and key on {node_id})",
                    cert.display(),
                    key.display()
                );
            }
            (None, Some(name)) => {
                let (cert, key) = syncd::tls::pki::issue_operator(&ca_dir, &name, days, &out)?;
                println!(
                    "issued operator {name:?} for {days} days: {} and {} (for syncctl --operator-cert and --operator-key)",
                    cert.display(),
                    key.display()
                );
            }
            (None, None) => anyhow::bail!("name a node id or --operator NAME"),
        },
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
