//! `syncd run`: wires the components together and takes them apart in
//! order.
//!
//! ```text
//!  daemon ─┬─ admin socket (syncctl) ── dir handles, fleet view
//!          ├─ /metrics
//!          ├─ peer server (gRPC) ── PeerService ── fleet view, local node
//!          ├─ SWIM (fleet::membership) ── fleet view
//!          ├─ gossip (fleet::gossip) ── fleet view, transport
//!          ├─ directory actors (dir) ── local node, fleet view
//!          └─ stats, garbage collector, watchdog
//! ```
//!
//! Shutdown runs from one place ([`teardown`]), within the unit's stop
//! timeout: directories stop at a file boundary (their watchers drop with
//! their actors), the node leaves SWIM, background loops end, the peer
//! server drains its calls, and the index is flushed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chunk_store::ChunkerConfig;
use chunk_store::store::Store;

use crate::config::Config;
use crate::dir::{self, DirHandle, DirState, Registry, Running};
use crate::env::Env;
use crate::fleet::{FleetView, Ident, Swim};
use crate::local::LocalNode;
use crate::locks::RwLockExt as _;
use crate::metrics::Metrics;
use crate::peer::PeerService;
use crate::transport::grpc::{GrpcServer, GrpcTransport};

/// How long a directory removed on SIGHUP may take to stop.
const DIR_STOP: Duration = Duration::from_secs(20);
/// The whole shutdown stays under the unit's TimeoutStopSec (30 s).
const SHUTDOWN: Duration = Duration::from_secs(25);

/// Handles the daemon's run needs beyond the node: where to tell systemd.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Called with READY/STATUS/WATCHDOG lines (systemd notify); none
    /// outside systemd.
    pub notify: Option<crate::sdnotify::Notifier>,
}

/// Everything a running daemon shares with its admin socket.
#[derive(Debug)]
pub struct Daemon {
    pub node: Arc<LocalNode>,
    pub dirs: Arc<Registry>,
}

impl Daemon {
    pub fn handles(&self) -> Vec<DirHandle> {
        dir::handles(&self.dirs)
    }
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
    opts: RunOptions,
) -> anyhow::Result<()> {
    let notify = opts.notify.unwrap_or_default();
    let n = &config.node.node;
    let state_dir = n.state_dir.get_ref().clone();
    notify.status("opening the index");
    let store = Arc::new(
        Store::open(&state_dir.join("index"), ChunkerConfig::default())
            .with_context(|| format!("opening the index in {}", state_dir.display()))?,
    );
    // Larger on every start, so a restarted node's record and SWIM
    // identity replace its old ones at once.
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64);
    let tls = match &config.node.tls {
        Some(files) => Some(Arc::new(
            crate::tls::Tls::new(files.clone(), n.id.get_ref())
                .context("loading the [tls] certificates")?,
        )),
        None => {
            tracing::warn!(
                "no [tls] in the configuration: the peer port is not authenticated; run it on a trusted network only"
            );
            None
        }
    };
    let metrics = Metrics::new().context("registering metrics")?;
    if let Some(t) = &tls {
        metrics
            .registry
            .register(Box::new(metrics.tls_expiry_days.clone()))
            .context("registering the TLS metric")?;
        metrics.tls_expiry_days.set(t.days_left());
    }
    let transport = match &tls {
        Some(t) => GrpcTransport::with_tls(t.clone()),
        None => GrpcTransport::default(),
    };
    let fleet = Arc::new(FleetView::new(
        n.id.get_ref().clone(),
        config.advertise.clone(),
        n.labels.get_ref().clone(),
        incarnation,
        n.peers.get_ref().clone(),
        Arc::new(transport),
        Arc::new(Env::from_entropy()),
        metrics,
    ));
    if let Some(t) = &tls {
        // Every version is signed with this node's key and checked end to
        // end (issue 11).
        fleet.set_tls(t.clone());
    }
    let node = Arc::new(
        LocalNode::new(store, fleet.clone())
            .with_caps(config.node.limits.caps())
            .with_serve(config.node.serve),
    );
    let daemon = Arc::new(Daemon {
        node: node.clone(),
        dirs: Arc::new(Registry::default()),
    });

    // The admin socket first, so `syncctl status` answers during the
    // initial scans.
    let admin = crate::admin::bind(&config.node.admin.socket)?;
    let mut tasks = tokio::task::JoinSet::new();
    {
        let daemon = daemon.clone();
        tasks.spawn(async move {
            if let Err(e) =
                crate::admin::serve(admin, daemon.node.clone(), daemon.dirs.clone()).await
            {
                tracing::error!(error = format!("{e:#}"), "admin socket failed");
            }
        });
    }
    if let Some(listen) = config.metrics_listen {
        let metrics = node.metrics.clone();
        let d2 = daemon.clone();
        let refresh = Arc::new(move || crate::admin::refresh_metrics(&d2.node, &d2.dirs));
        // Bind now so a taken port is a startup error, not a log line.
        let server = crate::metrics::serve(listen, metrics, refresh);
        tasks.spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = format!("{e:#}"), "metrics endpoint failed");
            }
        });
    }

    // Replicas start from what they hold on disk: their last applied
    // version is unknown after a restart, so they take whatever is newest.
    let mut pending = Vec::new();
    let total = config.dirs.len();
    for (i, (id, (_, d))) in config.dirs.iter().enumerate() {
        notify.status(&format!("scanning {id} ({}/{total})", i + 1));
        let state = DirState::from_config(id, d, fleet.clone())
            .map_err(|e| anyhow::anyhow!("directory {id:?}: {e}"))?;
        let p = dir::create(&node, state);
        // Visible to syncctl while the first scan runs.
        daemon
            .dirs
            .write_locked()
            .insert(id.clone(), p.handle.clone());
        dir::prepare(&node, &p).await;
        pending.push(p);
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the peer service to {}", config.listen))?;
    let me = Ident {
        address: fleet.address.clone(),
        node_id: fleet.id.clone(),
        bump: incarnation,
    };
    let swim = Swim::start(
        me,
        n.peers.get_ref().clone(),
        fleet.clone(),
        fleet.transport.clone(),
        fleet.env.fork(),
    );
    fleet.swim.set(swim).expect("set once");
    tracing::info!(node = %fleet.id, listen = %config.listen, dirs = pending.len(), "syncd running");
    let server_stop = tokio_util::sync::CancellationToken::new();
    let server = {
        let stop = server_stop.clone();
        let router = tonic::transport::Server::builder()
            .initial_stream_window_size(crate::transport::grpc::STREAM_WINDOW)
            .initial_connection_window_size(crate::transport::grpc::CONNECTION_WINDOW)
            .add_service(GrpcServer::service(Arc::new(PeerService::new(
                node.clone(),
            ))));
        let stopped = async move { stop.cancelled().await };
        let served: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
        > = match &tls {
            Some(t) => Box::pin(router.serve_with_incoming_shutdown(
                crate::transport::tls::incoming(listener, t.clone(), server_stop.clone()),
                stopped,
            )),
            None => Box::pin(router.serve_with_incoming_shutdown(
                // Nagle's algorithm against delayed ACKs cost ~40 ms per small
                // response (a manifest node) before this.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                stopped,
            )),
        };
        served
    };

    tasks.spawn(crate::fleet::gossip::run(fleet.clone()));
    {
        let (daemon, notify) = (daemon.clone(), notify.clone());
        tasks.spawn(async move { stats_loop(daemon, notify).await });
    }
    tasks.spawn(gc_loop(node.clone()));
    if tls.is_some() {
        tasks.spawn(controls_loop(daemon.clone()));
    }
    if let Some(t) = tls.clone() {
        // Days to expiry tick down without a reload.
        let gauge = node.metrics.tls_expiry_days.clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                every.tick().await;
                gauge.set(t.days_left());
            }
        });
    }
    let mut running: HashMap<String, Running> = HashMap::new();
    for p in pending {
        let r = dir::start(&node, p);
        running.insert(r.handle.id().to_string(), r);
    }
    notify.ready(&status_line(&daemon));
    if let Some(interval) = notify.watchdog_interval() {
        let (daemon, notify) = (daemon.clone(), notify.clone());
        tasks.spawn(async move { watchdog_loop(daemon, notify, interval).await });
    }
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let server = tokio::spawn(server);
    tokio::pin!(shutdown);
    let mut server = server;
    let failed = loop {
        tokio::select! {
            r = &mut server => {
                break Some(match r {
                    Ok(Ok(())) => anyhow::anyhow!("peer service stopped"),
                    Ok(Err(e)) => anyhow::Error::new(e).context("peer service failed"),
                    Err(e) => anyhow::Error::new(e).context("peer service panicked"),
                });
            }
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                notify.stopping();
                break None;
            }
            _ = hangup.recv() => {
                notify.reloading();
                if let Some(t) = &tls {
                    match t.reload() {
                        Ok(()) => {
                            node.fleet.resign();
                            node.metrics.tls_expiry_days.set(t.days_left());
                            tracing::info!(days_left = t.days_left().floor(), "reloaded the TLS certificates");
                        }
                        Err(e) => tracing::error!(error = %e, "reloading the TLS certificates failed; keeping the ones in use"),
                    }
                }
                reload(&daemon, &config, &mut running).await;
                notify.ready(&status_line(&daemon));
            }
        }
    };
    teardown(&daemon, running, tasks, server_stop, server).await;
    let _ = std::fs::remove_file(&config.node.admin.socket);
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Ordered shutdown, within [`SHUTDOWN`] (under the unit's 30 s
/// TimeoutStopSec): directories stop at a file boundary (their watchers
/// drop with their actors), the node leaves SWIM so peers stop choosing it
/// at once, background loops end, the peer server drains its calls, and
/// the index is flushed.
async fn teardown(
    daemon: &Daemon,
    running: HashMap<String, Running>,
    mut tasks: tokio::task::JoinSet<()>,
    server_stop: tokio_util::sync::CancellationToken,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let started = tokio::time::Instant::now();
    let deadline = started + SHUTDOWN;
    // Stop every directory first (all at once), then wait for each.
    for r in running.values() {
        r.handle.state.stop_now();
    }
    let dirs = running.len();
    for (_, r) in running {
        r.stop(deadline - Duration::from_secs(5)).await;
    }
    tracing::info!(dirs, took = ?started.elapsed(), "directories stopped");
    if let Some(swim) = daemon.node.fleet.swim.get() {
        let left = tokio::time::timeout(Duration::from_secs(2), swim.leave()).await;
        tracing::info!(announced = left.is_ok(), "left the fleet");
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    server_stop.cancel();
    let mut server = server;
    if tokio::time::timeout_at(deadline - Duration::from_secs(1), &mut server)
        .await
        .is_err()
    {
        tracing::warn!("peer calls still running at shutdown; closing them");
        server.abort();
    }
    let store = daemon.node.store.clone();
    match tokio::task::spawn_blocking(move || store.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "flushing the index at shutdown"),
        Err(e) => tracing::error!(error = %e, "flushing the index at shutdown panicked"),
    }
    tracing::info!(took = ?started.elapsed(), "stopped");
}

/// One line for systemd's STATUS=: what the directories are doing.
pub fn status_line(daemon: &Daemon) -> String {
    let dirs: Vec<(String, dir::DirStatus, Arc<DirState>)> = daemon
        .handles()
        .into_iter()
        .map(|h| (h.id().to_string(), h.status(), h.state.clone()))
        .collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, s, _) in &dirs {
        *counts.entry(s.state_name()).or_default() += 1;
    }
    let (alive, suspect, _) = daemon.node.fleet.counts();
    let peers = alive + suspect;
    let states: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let mut line = format!(
        "{} directories ({}), {peers} live peers",
        dirs.len(),
        if states.is_empty() {
            "none".to_string()
        } else {
            states.join(", ")
        }
    );
    for (id, s, d) in &dirs {
        match s.state_name() {
            "syncing" => line.push_str(&format!(
                "; {id}: syncing, {} files / {} MiB pending",
                d.progress.pending_files(),
                d.progress.pending_bytes() >> 20
            )),
            "scanning" => line.push_str(&format!("; {id}: scanning")),
            "waiting" => line.push_str(&format!("; {id}: waiting")),
            "error" => line.push_str(&format!("; {id}: error")),
            _ => {}
        }
    }
    line
}

/// Once a second: receive rates into the fleet view, forgetting dead
/// peers, and systemd STATUS when it changes.
async fn stats_loop(daemon: Arc<Daemon>, notify: crate::sdnotify::Notifier) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_status = String::new();
    loop {
        tick.tick().await;
        let status = status_line(&daemon);
        if status != last_status {
            notify.status(&status);
            last_status = status;
        }
        let fleet = &daemon.node.fleet;
        fleet.forget_dead();
        for h in daemon.handles() {
            h.state.progress.tick_rate();
            h.state.announce();
        }
        fleet.tick();
    }
}

/// Fleet controls (issue 11) reach the directories they name as soon as
/// they arrive, and a directory added on SIGHUP within a second.
async fn controls_loop(daemon: Arc<Daemon>) {
    let fleet = daemon.node.fleet.clone();
    let mut changed = fleet.watch_controls();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        for h in daemon.handles() {
            h.apply_controls(&fleet.controls_of(h.id()));
        }
        tokio::select! {
            r = changed.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = tick.tick() => {}
        }
    }
}

/// Node garbage collection as a background worker: after scans that
/// changed a root (and every 10 minutes), it takes the store gate alone
/// for one sweep, which `Store::collect_garbage` amortises over 64 MiB of
/// node churn. Scans wait for the sweep, never the other way round across
/// a transfer: pulls hold the gate only while scanning.
async fn gc_loop(node: Arc<LocalNode>) {
    loop {
        tokio::select! {
            _ = node.gc_wanted.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
        let n = node.clone();
        let swept = node.env.blocking(move || n.collect_garbage()).await;
        match swept {
            Ok(Ok(0)) => {}
            Ok(Ok(deleted)) => tracing::debug!(deleted, "garbage collection swept manifest nodes"),
            Ok(Err(e)) => tracing::error!(error = %e, "garbage collection failed; retrying later"),
            Err(e) => tracing::error!(error = %e, "garbage collection panicked; retrying later"),
        }
    }
}

/// Feeds systemd's watchdog only while the node makes progress: the index
/// answers a read within the interval (RocksDB and the blocking pool are
/// alive), and the runtime got here (it is not wedged).
async fn watchdog_loop(daemon: Arc<Daemon>, notify: crate::sdnotify::Notifier, interval: Duration) {
    loop {
        tokio::time::sleep(interval / 2).await;
        let store = daemon.node.store.clone();
        let probe = tokio::task::spawn_blocking(move || store.roots().is_ok());
        let index_ok = matches!(
            tokio::time::timeout(interval / 2, probe).await,
            Ok(Ok(true))
        );
        if !index_ok {
            tracing::error!("index did not answer in time; not feeding the watchdog");
        } else if !dir::can_progress(&daemon.handles()) {
            tracing::error!(
                "every directory's last attempt panicked; not feeding the watchdog so systemd restarts the node"
            );
        } else {
            notify.watchdog();
        }
    }
}

/// SIGHUP: re-reads `dirs.d/` and starts or stops directories. A directory
/// whose settings changed is stopped and started again. Files of a stopped
/// directory are left as they are. An invalid configuration is logged and
/// the running one kept.
async fn reload(daemon: &Daemon, running_config: &Config, running: &mut HashMap<String, Running>) {
    let new = match Config::load(&running_config.file) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the running configuration");
            return;
        }
    };
    if new.listen != running_config.listen
        || new.node.node.peers.get_ref() != running_config.node.node.peers.get_ref()
        || new.node.limits != running_config.node.limits
    {
        tracing::warn!(
            "changes to listen, peers or [limits] in syncd.toml take effect on restart only"
        );
    }
    let node = &daemon.node;
    let old_files = &running_config.dirs;
    let same = |a: &DirState, b: &crate::config::DirFile| {
        a.path == *b.path.get_ref()
            && a.mode == *b.mode.get_ref()
            && a.rescan_interval == b.rescan_interval
            && a.hook == *b.on_synced.get_ref()
            && a.hook_timeout == b.on_synced_timeout
            && a.limits == dir::state::limits_of(b)
            && a.bandwidth.caps() == b.limits.caps()
            && old_files
                .get(&a.id)
                .is_none_or(|(_, f)| f.ignore.get_ref() == b.ignore.get_ref())
    };
    for h in daemon.handles() {
        let d = &h.state;
        if !new.dirs.get(&d.id).is_some_and(|(_, f)| same(d, f)) {
            // Its work stops (at a file boundary) before the directory is
            // forgotten: nothing keeps writing into a removed directory.
            if let Some(r) = running.remove(&d.id) {
                r.stop(tokio::time::Instant::now() + DIR_STOP).await;
            }
            daemon.dirs.write_locked().remove(&d.id);
            node.drop_dir(&d.id);
            node.metrics.forget_dir(&d.id);
            tracing::info!(dir = %d.id, path = %d.path.display(), "stopped syncing directory");
        }
    }
    for (id, (file, d)) in &new.dirs {
        if let Some(r) = running.get(id) {
            // A priority changed in the file applies at once, mid-transfer
            // too (one set by `syncctl priority` stays until then).
            if old_files
                .get(id)
                .is_none_or(|(_, f)| f.priority != d.priority)
            {
                r.handle.set_priority(d.priority);
            }
            continue;
        }
        match DirState::from_config(id, d, node.fleet.clone()) {
            Ok(state) => {
                let p = dir::create(node, state);
                daemon
                    .dirs
                    .write_locked()
                    .insert(id.clone(), p.handle.clone());
                dir::prepare(node, &p).await;
                tracing::info!(dir = %id, path = %p.handle.state.path.display(), "started syncing directory");
                let r = dir::start(node, p);
                running.insert(id.clone(), r);
            }
            Err(e) => {
                tracing::error!(dir = %id, file = %file.display(), error = %e, "cannot start directory")
            }
        }
    }
}
