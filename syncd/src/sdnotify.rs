//! systemd readiness, status and watchdog (`Type=notify`, `WatchdogSec=`),
//! through the `sd-notify` crate. Outside systemd (no `NOTIFY_SOCKET`)
//! every call is a no-op.
//!
//! What syncd sends: `STATUS=` lines while opening the index and scanning
//! each directory; `READY=1` once every directory has had its first scan
//! and the admin socket is listening; `STATUS=` with the directories'
//! states whenever they change; `WATCHDOG=1` at half the watchdog interval,
//! only while the index answers reads; `RELOADING=1` then `READY=1` around
//! a SIGHUP reload; `STOPPING=1` on shutdown.

use std::time::Duration;

use sd_notify::NotifyState;

/// A handle to the service manager, or to nothing.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
    /// `WATCHDOG_PID`).
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if self.enabled
            && let Err(e) = sd_notify::notify(states)
        {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }

    pub fn status(&self, line: &str) {
        self.send(&[NotifyState::Status(line)]);
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// The watchdog timeout systemd expects pings within, if enabled.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled)
    }
}
