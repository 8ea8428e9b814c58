//! Post-sync hooks: a directory's `on_synced` command runs after a new
//! version is fully in place on this node (applied on a replica, published
//! on a source). It never blocks sync: it runs on its own task, one run at
//! a time per directory; versions that arrive while it runs are coalesced
//! into one more run for the newest. It gets a timeout (killed after
//! `on_synced_timeout`), its outcome is logged with the tail of its output
//! and counted in `syncd_hook_runs_total`.
//!
//! The command is run directly (no shell) with stdin from /dev/null and
//! these variables: `SYNCD_DIR`, `SYNCD_PATH`, `SYNCD_VERSION`,
//! `SYNCD_ROOT` (hex). systemd's notify variables are removed.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use sync_proto::pb;

use crate::metrics::Metrics;

/// One directory's hook.
#[derive(Debug, Clone)]
pub struct Hook {
    pub dir: String,
    pub path: PathBuf,
    /// Program and arguments; empty: no hook.
    pub command: Vec<String>,
    pub timeout: Duration,
}

/// Most bytes of a hook's output kept for the log.
const OUTPUT_TAIL: usize = 2048;

fn tail(b: &[u8]) -> String {
    let start = b.len().saturating_sub(OUTPUT_TAIL);
    String::from_utf8_lossy(&b[start..]).trim().to_string()
}

/// Runs the hook for every new version `rx` is told about, until the
/// directory stops.
pub async fn run_hooks(
    metrics: Metrics,
    dir: Hook,
    mut rx: tokio::sync::watch::Receiver<Option<pb::DirVersion>>,
) {
    if dir.command.is_empty() {
        return;
    }
    rx.mark_unchanged();
    while rx.changed().await.is_ok() {
        let Some(version) = rx.borrow_and_update().clone() else {
            continue;
        };
        let root = crate::wire::hex(&version.root);
        let started = std::time::Instant::now();
        let child = tokio::process::Command::new(&dir.command[0])
            .args(&dir.command[1..])
            .env("SYNCD_DIR", &dir.dir)
            .env("SYNCD_PATH", &dir.path)
            .env("SYNCD_VERSION", version.version.to_string())
            .env("SYNCD_ROOT", &root)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let result = match child {
            Err(e) => {
                tracing::error!(dir = %dir.dir, command = ?dir.command, error = %e, "on_synced hook could not be started");
                "failed"
            }
            Ok(child) => {
                match tokio::time::timeout(dir.timeout, child.wait_with_output()).await {
                    Err(_) => {
                        // Dropping the future killed the child.
                        tracing::error!(dir = %dir.dir, version = version.version, command = ?dir.command, timeout = ?dir.timeout, "on_synced hook timed out and was killed");
                        "timeout"
                    }
                    Ok(Err(e)) => {
                        tracing::error!(dir = %dir.dir, command = ?dir.command, error = %e, "on_synced hook failed to run");
                        "failed"
                    }
                    Ok(Ok(out)) if out.status.success() => {
                        tracing::info!(dir = %dir.dir, version = version.version, command = ?dir.command, seconds = started.elapsed().as_secs_f64(), "on_synced hook succeeded");
                        "ok"
                    }
                    Ok(Ok(out)) => {
                        tracing::error!(dir = %dir.dir, version = version.version, command = ?dir.command, status = %out.status, stderr = %tail(&out.stderr), stdout = %tail(&out.stdout), "on_synced hook failed");
                        "failed"
                    }
                }
            }
        };
        metrics
            .hook_runs
            .with_label_values(&[&dir.dir, result])
            .inc();
        metrics
            .hook_duration
            .with_label_values(&[&dir.dir])
            .observe(started.elapsed().as_secs_f64());
        if result != "ok" {
            metrics.errors.with_label_values(&[&dir.dir, "hook"]).inc();
        }
    }
}
