//! Prometheus metrics (`[metrics] listen`, `GET /metrics`). Every metric is
//! documented in `grafana/METRICS.md`; names carry the `syncd_` prefix and
//! Prometheus unit suffixes. Gauges that mirror node state (versions,
//! pending work, peers) are refreshed from the node at each scrape.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use prometheus::{
    CounterVec, Encoder as _, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Buckets for durations from 1 ms to ~17 min.
fn duration_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 4.0, 11).expect("valid buckets")
}

/// All of syncd's metrics, in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub received_bytes: IntCounterVec,
    pub received_chunks: IntCounterVec,
    pub sent_bytes: IntCounterVec,
    pub sent_chunks: IntCounterVec,
    pub reused_chunks: IntCounterVec,
    pub files_materialized: IntCounterVec,
    pub errors: IntCounterVec,
    pub scan_duration: HistogramVec,
    pub index_duration: HistogramVec,
    pub sync_duration: HistogramVec,
    pub pending_bytes: IntGaugeVec,
    pub pending_files: IntGaugeVec,
    pub local_version: IntGaugeVec,
    pub fleet_version: IntGaugeVec,
    pub peers_at_fleet_version: IntGaugeVec,
    pub peers_carrying: IntGaugeVec,
    pub dir_state: IntGaugeVec,
    pub transfer_rate: GaugeVec,
    pub peers: IntGaugeVec,
    pub gossip_messages: IntCounterVec,
    pub gossip_bytes: IntCounterVec,
    pub rpc_duration: HistogramVec,
    pub hook_runs: IntCounterVec,
    pub hook_duration: HistogramVec,
    pub corrupt_chunks: IntCounterVec,
    pub peer_demotions: IntCounterVec,
    pub consecutive_failures: IntGaugeVec,
    pub sent_by_role: IntCounterVec,
    pub transfer_sources: IntGaugeVec,
    pub bandwidth_cap: IntGaugeVec,
    pub bandwidth_wait: CounterVec,
    /// Days until this node's TLS certificate expires (absent without TLS).
    pub tls_expiry_days: prometheus::Gauge,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(duration_buckets()),
                labels,
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let dc = &["dir", "peer_class"];
        let m = Metrics {
            received_bytes: counter(
                "syncd_received_bytes_total",
                "Chunk bytes received from peers (verified).",
                dc,
            )?,
            received_chunks: counter(
                "syncd_received_chunks_total",
                "Chunks received from peers (verified).",
                dc,
            )?,
            sent_bytes: counter("syncd_sent_bytes_total", "Chunk bytes served to peers.", dc)?,
            sent_chunks: counter("syncd_sent_chunks_total", "Chunks served to peers.", dc)?,
            reused_chunks: counter(
                "syncd_reused_chunks_total",
                "Chunks of new files taken from local files instead of the network.",
                &["dir"],
            )?,
            files_materialized: counter(
                "syncd_files_materialized_total",
                "Files written (atomically replaced) by applying versions.",
                &["dir"],
            )?,
            errors: counter(
                "syncd_errors_total",
                "Errors by kind: scan, sync, corrupt_chunk, local_edits, hook, panic.",
                &["dir", "kind"],
            )?,
            scan_duration: histogram(
                "syncd_scan_duration_seconds",
                "Time to walk a directory tree in a scan.",
                &["dir"],
            )?,
            index_duration: histogram(
                "syncd_index_duration_seconds",
                "Time to read, chunk and record changed files and the manifest in a scan.",
                &["dir"],
            )?,
            sync_duration: histogram(
                "syncd_sync_duration_seconds",
                "Time to apply a version: diff, fetch, materialize, index.",
                &["dir"],
            )?,
            pending_bytes: gauge(
                "syncd_pending_bytes",
                "Bytes still to receive for the version being applied.",
                &["dir"],
            )?,
            pending_files: gauge(
                "syncd_pending_files",
                "Files still to write for the version being applied.",
                &["dir"],
            )?,
            local_version: gauge(
                "syncd_local_version",
                "Version of the directory this node holds completely (0: none).",
                &["dir"],
            )?,
            fleet_version: gauge(
                "syncd_fleet_version",
                "Newest version of the directory seen in the fleet, this node included.",
                &["dir"],
            )?,
            peers_at_fleet_version: gauge(
                "syncd_peers_at_fleet_version",
                "Live peers holding the newest version.",
                &["dir"],
            )?,
            peers_carrying: gauge(
                "syncd_peers_carrying",
                "Live peers carrying the directory.",
                &["dir"],
            )?,
            dir_state: gauge(
                "syncd_dir_state",
                "1 for the directory's current state (idle, scanning, syncing, paused, error).",
                &["dir", "state"],
            )?,
            transfer_rate: {
                let g = GaugeVec::new(
                    Opts::new(
                        "syncd_transfer_rate_bytes_per_second",
                        "Receive rate over the last seconds.",
                    ),
                    &["dir"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            peers: gauge("syncd_peers", "Peers by SWIM state.", &["state"])?,
            gossip_messages: counter(
                "syncd_gossip_messages_total",
                "Membership (swim) and fleet-state (gossip, exchange) messages.",
                &["kind", "direction"],
            )?,
            gossip_bytes: counter(
                "syncd_gossip_bytes_total",
                "Bytes of gossip messages (encoded), by kind (digest, reconcile, records, push, exchange) and direction.",
                &["kind", "direction"],
            )?,
            rpc_duration: histogram(
                "syncd_rpc_duration_seconds",
                "Duration of peer calls made by this node, by method.",
                &["rpc"],
            )?,
            hook_runs: counter(
                "syncd_hook_runs_total",
                "on_synced hook runs by result: ok, failed, timeout.",
                &["dir", "result"],
            )?,
            hook_duration: histogram(
                "syncd_hook_duration_seconds",
                "Duration of on_synced hook runs.",
                &["dir"],
            )?,
            corrupt_chunks: counter(
                "syncd_corrupt_chunks_total",
                "Chunks peers sent that were rejected: wrong length or failing BLAKE3.",
                &["reason"],
            )?,
            peer_demotions: counter(
                "syncd_peer_demotions_total",
                "Peers whose claims of versions were ignored for a while: they listed a version and withheld or corrupted its manifest.",
                &["reason"],
            )?,
            consecutive_failures: gauge(
                "syncd_dir_consecutive_failures",
                "Failed attempts in a row at the directory's work (0 after a success); retries back off.",
                &["dir"],
            )?,
            sent_by_role: counter(
                "syncd_sent_bytes_by_role_total",
                "Chunk bytes served to peers, by whether this node held the version whole (holder: an origin or a finished receiver) or was still receiving it (receiver).",
                &["dir", "role"],
            )?,
            transfer_sources: gauge(
                "syncd_transfer_sources",
                "Peers of the transfer in progress, by kind: full holders and receivers feeding this node.",
                &["dir", "kind"],
            )?,
            bandwidth_cap: gauge(
                "syncd_bandwidth_cap_bytes_per_second",
                "The node's bandwidth cap ([limits] in syncd.toml) by direction; 0: none.",
                &["direction"],
            )?,
            bandwidth_wait: {
                let c = CounterVec::new(
                    Opts::new(
                        "syncd_bandwidth_wait_seconds_total",
                        "Time transfers and served streams waited for bandwidth caps (node and directory), by direction.",
                    ),
                    &["direction"],
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            tls_expiry_days: prometheus::Gauge::new(
                "syncd_tls_certificate_expiry_days",
                "Days until this node's TLS certificate ([tls] cert) expires; negative once expired. Only with [tls].",
            )?,
            registry: registry.clone(),
        };
        for d in ["upload", "download"] {
            m.bandwidth_cap.with_label_values(&[d]);
            m.bandwidth_wait.with_label_values(&[d]);
        }
        for reason in ["length", "hash"] {
            m.corrupt_chunks.with_label_values(&[reason]);
        }
        m.peer_demotions.with_label_values(&["manifest"]);
        let build = gauge(
            "syncd_build_info",
            "Always 1; the version of syncd as a label.",
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(m)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// Error kinds counted in `syncd_errors_total`.
    pub const ERROR_KINDS: [&'static str; 6] = [
        "scan",
        "sync",
        "corrupt_chunk",
        "local_edits",
        "hook",
        "panic",
    ];

    /// Creates a directory's counters at zero, so dashboards and alerts see
    /// a series (and a rate of 0) before the first event rather than none
    /// (hook runs too, hook or not: a fleet without hooks shows 0, not "no
    /// data").
    pub fn init_dir(&self, dir: &str) {
        for class in crate::topology::PeerClass::ALL {
            let l = [dir, class.as_str()];
            for c in [
                &self.received_bytes,
                &self.received_chunks,
                &self.sent_bytes,
                &self.sent_chunks,
            ] {
                c.with_label_values(&l);
            }
        }
        self.reused_chunks.with_label_values(&[dir]);
        self.files_materialized.with_label_values(&[dir]);
        for kind in Metrics::ERROR_KINDS {
            self.errors.with_label_values(&[dir, kind]);
        }
        for result in ["ok", "failed", "timeout"] {
            self.hook_runs.with_label_values(&[dir, result]);
        }
        self.consecutive_failures.with_label_values(&[dir]);
        for role in ["holder", "receiver"] {
            self.sent_by_role.with_label_values(&[dir, role]);
        }
        for kind in ["full", "receiving"] {
            self.transfer_sources.with_label_values(&[dir, kind]);
        }
    }

    /// Forgets the per-directory series of a directory no longer synced.
    pub fn forget_dir(&self, dir: &str) {
        for v in [
            &self.pending_bytes,
            &self.pending_files,
            &self.local_version,
            &self.fleet_version,
            &self.peers_at_fleet_version,
            &self.peers_carrying,
            &self.consecutive_failures,
        ] {
            let _ = v.remove_label_values(&[dir]);
        }
        let _ = self.transfer_rate.remove_label_values(&[dir]);
        for role in ["holder", "receiver"] {
            let _ = self.sent_by_role.remove_label_values(&[dir, role]);
        }
        for kind in ["full", "receiving"] {
            let _ = self.transfer_sources.remove_label_values(&[dir, kind]);
        }
        for s in crate::wire::STATES {
            let _ = self.dir_state.remove_label_values(&[dir, s]);
        }
    }
}

/// Serves `/metrics` on `listen` until the task is dropped; `refresh` runs
/// before each scrape to bring the state gauges up to date.
pub async fn serve(
    listen: SocketAddr,
    metrics: Metrics,
    refresh: Arc<dyn Fn() + Send + Sync>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the metrics endpoint to {listen}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, refresh) = (metrics.clone(), refresh.clone());
            async move {
                refresh();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .await
        .context("metrics endpoint failed")
}
