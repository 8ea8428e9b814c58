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

use std::process::Stdio;
use std::sync::Arc;

use crate::node::{DirState, Node};

/// Most bytes of a hook's output kept for the log.
const OUTPUT_TAIL: usize = 2048;

fn tail(b: &[u8]) -> String {
    let start = b.len().saturating_sub(OUTPUT_TAIL);
    String::from_utf8_lossy(&b[start..]).trim().to_string()
}

/// Runs `dir`'s hook for every new version it is told about, until the
/// directory stops.
pub async fn run_hooks(node: Arc<Node>, dir: Arc<DirState>) {
    if dir.hook.is_empty() {
        return;
    }
    let mut rx = dir.synced.subscribe();
    rx.mark_unchanged();
    while rx.changed().await.is_ok() {
        let Some(version) = rx.borrow_and_update().clone() else {
            continue;
        };
        let root = crate::admin::hex(&version.root);
        let started = std::time::Instant::now();
        let child = tokio::process::Command::new(&dir.hook[0])
            .args(&dir.hook[1..])
            .env("SYNCD_DIR", &dir.id)
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
                tracing::error!(dir = %dir.id, command = ?dir.hook, error = %e, "on_synced hook could not be started");
                "failed"
            }
            Ok(child) => {
                match tokio::time::timeout(dir.hook_timeout, child.wait_with_output()).await {
                    Err(_) => {
                        // Dropping the future killed the child.
                        tracing::error!(dir = %dir.id, version = version.version, command = ?dir.hook, timeout = ?dir.hook_timeout, "on_synced hook timed out and was killed");
                        "timeout"
                    }
                    Ok(Err(e)) => {
                        tracing::error!(dir = %dir.id, command = ?dir.hook, error = %e, "on_synced hook failed to run");
                        "failed"
                    }
                    Ok(Ok(out)) if out.status.success() => {
                        tracing::info!(dir = %dir.id, version = version.version, command = ?dir.hook, seconds = started.elapsed().as_secs_f64(), "on_synced hook succeeded");
                        "ok"
                    }
                    Ok(Ok(out)) => {
                        tracing::error!(dir = %dir.id, version = version.version, command = ?dir.hook, status = %out.status, stderr = %tail(&out.stderr), stdout = %tail(&out.stdout), "on_synced hook failed");
                        "failed"
                    }
                }
            }
        };
        node.metrics
            .hook_runs
            .with_label_values(&[&dir.id, result])
            .inc();
        node.metrics
            .hook_duration
            .with_label_values(&[&dir.id])
            .observe(started.elapsed().as_secs_f64());
        if result != "ok" {
            node.metrics
                .errors
                .with_label_values(&[&dir.id, "hook"])
                .inc();
        }
    }
}
