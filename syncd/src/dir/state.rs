//! A directory's state: its settings from `dirs.d`, what it holds and
//! does (a status `watch` the actor writes and everyone else reads), the
//! progress of its transfer, and its retry backoff.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chunk_store::ignore::Ignore;
use chunk_store::indexer;
use sync_proto::pb;

use crate::bandwidth::{Control, DirBandwidth};
use crate::config::{DirFile, Mode};
use crate::env::Env;
use crate::fleet::{FleetView, OwnDir};
use crate::locks::LockExt as _;

/// What a directory is doing (paused is a flag on top of this).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Idle,
    /// For a scan or transfer slot (see [`crate::local::SCAN_SLOTS`]).
    Waiting,
    Scanning,
    Syncing,
    Error,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Waiting => "waiting",
            Phase::Scanning => "scanning",
            Phase::Syncing => "syncing",
            Phase::Error => "error",
        }
    }
}

/// A directory's state as the operator sees it (the actor's status
/// `watch`).
#[derive(Debug, Clone)]
pub struct DirStatus {
    pub phase: Phase,
    pub paused: bool,
    /// Why, when the phase is `Error`.
    pub reason: String,
    /// The most recent error, kept after recovery.
    pub last_error: String,
    /// The version this node holds and advertises.
    pub current: Option<pb::DirVersion>,
    /// The version being received, advertised so peers can fetch the
    /// chunks already written.
    pub pulling: Option<pb::DirVersion>,
    /// Failed attempts in a row, and when the next one is due.
    pub failures: u32,
    pub retry_at: Option<tokio::time::Instant>,
    /// The last attempt panicked (a bug): the watchdog stops being fed
    /// when every directory is in this state.
    pub panicked: bool,
    /// The fleet controls applied to it, at most one per kind
    /// (`DirHandle::apply_controls`).
    pub controls: Vec<pb::Control>,
}

impl DirStatus {
    /// The state name syncctl, metrics and the fleet view show.
    pub fn state_name(&self) -> &'static str {
        if self.paused {
            "paused"
        } else {
            self.phase.as_str()
        }
    }

    /// Seconds until the next attempt (0 when none is pending).
    pub fn retry_in(&self) -> f64 {
        self.retry_at.map_or(0.0, |t| {
            t.saturating_duration_since(tokio::time::Instant::now())
                .as_secs_f64()
        })
    }
}

/// Progress of the transfer in progress (all zero between transfers).
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_total: AtomicU64,
    pub files_total: AtomicU64,
    /// Chunk bytes received for this directory, ever (drives the rate).
    pub received: Arc<AtomicU64>,
    pub received_at_start: AtomicU64,
    pub files_done: AtomicU64,
    /// Receive rate, bytes per second (f64 bits), smoothed over seconds.
    rate: AtomicU64,
    rate_seen: AtomicU64,
    /// The transfer's peers and what each gave so far (refreshed every
    /// second while it runs).
    pub sources: Arc<std::sync::Mutex<Vec<Source>>>,
}

/// A peer of the transfer in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub id: String,
    /// Holds the whole version (else it is a receiver feeding us).
    pub full: bool,
    /// Verified chunk bytes received from it in this transfer.
    pub bytes: u64,
}

impl Progress {
    pub fn pending_bytes(&self) -> u64 {
        let done = self
            .received
            .load(Ordering::Relaxed)
            .saturating_sub(self.received_at_start.load(Ordering::Relaxed));
        self.bytes_total
            .load(Ordering::Relaxed)
            .saturating_sub(done)
    }

    pub fn pending_files(&self) -> u64 {
        self.files_total
            .load(Ordering::Relaxed)
            .saturating_sub(self.files_done.load(Ordering::Relaxed))
    }

    /// Once a second: folds the bytes received since into the rate.
    pub fn tick_rate(&self) {
        let now = self.received.load(Ordering::Relaxed);
        let before = self.rate_seen.swap(now, Ordering::Relaxed);
        let delta = now.saturating_sub(before) as f64;
        let rate = 0.5 * self.rate() + 0.5 * delta;
        self.rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    pub fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    /// Seconds until the transfer in progress is done at the current
    /// rate (0 when none runs or nothing arrived yet).
    pub fn eta_seconds(&self) -> f64 {
        let (pending, rate) = (self.pending_bytes(), self.rate());
        if pending == 0 || rate < 1.0 {
            0.0
        } else {
            pending as f64 / rate
        }
    }

    /// Between transfers.
    pub fn clear(&self) {
        for a in [&self.bytes_total, &self.files_total, &self.files_done] {
            a.store(0, Ordering::Relaxed);
        }
        self.sources.locked().clear();
    }
}

/// A directory's bounds on what it accepts and publishes (dirs.d).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirLimits {
    pub max_file_size: u64,
    pub max_entries: u64,
    pub min_free_space: u64,
    pub allow_setid: bool,
}

/// One synced directory on this node: settings, and the state its actor
/// owns (written only by the actor; read by anyone through the watch).
#[derive(Debug)]
pub struct DirState {
    pub id: String,
    pub path: PathBuf,
    pub mode: Mode,
    pub rescan_interval: Duration,
    pub ignore: Ignore,
    pub hook: Vec<String>,
    pub hook_timeout: Duration,
    /// Whether file events trigger scans (always in the daemon; the
    /// simulation turns it off: events arrive at real, not simulated,
    /// times, and its scripts rescan explicitly).
    pub watch: bool,
    /// What a version may be: sizes, entries, free space, setid bits.
    pub limits: DirLimits,
    /// Bandwidth caps, priority and pause, as transfers see them.
    pub bandwidth: Arc<DirBandwidth>,
    status: tokio::sync::watch::Sender<DirStatus>,
    pub progress: Progress,
    /// The version whose on_synced hook should run (coalesced).
    pub synced: tokio::sync::watch::Sender<Option<pb::DirVersion>>,
    /// Set when the directory stops (shutdown, or removed on SIGHUP):
    /// scans stop at the next group of files, pulls at the next file
    /// boundary; `stop` ends its actor and hook runner.
    pub stopping: Arc<AtomicBool>,
    pub stop: tokio_util::sync::CancellationToken,
    /// Where this directory's state is announced.
    fleet: Arc<FleetView>,
    /// Who may publish it (`publishers`; empty: any fleet node).
    pub publishers: Vec<String>,
    /// The highest version accepted (replicas never go below it).
    pub(crate) accepted: std::sync::Mutex<super::accepted::Accepted>,
}

impl DirState {
    /// A directory as `dirs.d` describes it, before its first scan.
    pub fn from_config(id: &str, d: &DirFile, fleet: Arc<FleetView>) -> Result<DirState, String> {
        Ok(DirState {
            id: id.to_string(),
            path: d.path.get_ref().clone(),
            mode: *d.mode.get_ref(),
            rescan_interval: d.rescan_interval,
            ignore: Ignore::new(d.ignore.get_ref()).map_err(|e| format!("ignore patterns: {e}"))?,
            hook: d.on_synced.get_ref().clone(),
            hook_timeout: d.on_synced_timeout,
            watch: true,
            limits: limits_of(d),
            bandwidth: Arc::new(DirBandwidth::new(
                id,
                d.limits.caps(),
                Control {
                    paused: false,
                    priority: d.priority,
                },
            )),
            status: tokio::sync::watch::Sender::new(DirStatus {
                phase: Phase::Scanning,
                paused: false,
                reason: String::new(),
                last_error: String::new(),
                current: None,
                pulling: None,
                failures: 0,
                retry_at: None,
                panicked: false,
                controls: Vec::new(),
            }),
            progress: Progress::default(),
            synced: tokio::sync::watch::Sender::new(None),
            stopping: Arc::new(AtomicBool::new(false)),
            stop: tokio_util::sync::CancellationToken::new(),
            fleet,
            publishers: d.publishers.get_ref().clone(),
            accepted: Default::default(),
        })
    }

    /// The status as it is now.
    pub fn status(&self) -> DirStatus {
        self.status.borrow().clone()
    }

    /// A receiver of every status change.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<DirStatus> {
        self.status.subscribe()
    }

    pub fn current(&self) -> Option<pb::DirVersion> {
        self.status.borrow().current.clone()
    }

    /// Changes the status (the actor's, and the blocking work it runs)
    /// and announces it to the fleet.
    pub(crate) fn update(&self, f: impl FnOnce(&mut DirStatus)) {
        self.status.send_modify(f);
        self.announce();
    }

    /// This directory as this node's record shows it.
    pub fn own(&self) -> OwnDir {
        let s = self.status.borrow();
        OwnDir {
            held: s.current.clone(),
            pulling: s.pulling.clone(),
            report: pb::DirReport {
                dir: self.id.clone(),
                state: s.state_name().into(),
                mode: mode_name(self.mode).into(),
                pending_bytes: self.progress.pending_bytes(),
                rate: self.progress.rate(),
                last_error: s.last_error.clone(),
                control: super::fleet_control::describe(&s.controls),
            },
        }
    }

    /// Puts the current state into this node's record.
    pub fn announce(&self) {
        self.fleet.set_dir(&self.id, self.own());
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.update(|s| {
            s.phase = phase;
            if phase != Phase::Error {
                s.reason.clear();
            }
        });
    }

    pub(crate) fn set_error(&self, error: String) {
        self.update(|s| {
            s.phase = Phase::Error;
            s.reason = error.clone();
            s.last_error = error;
        });
    }

    /// How this directory is scanned (without the per-call hints).
    pub(crate) fn scan_options(&self) -> indexer::ScanOptions {
        indexer::ScanOptions {
            ignore: self.ignore.clone(),
            max_file_size: Some(self.limits.max_file_size),
            keep_setid: self.limits.allow_setid,
            stop: Some(self.stopping.clone()),
            ..Default::default()
        }
    }

    /// Asks the directory's work to stop: its blocking work at the next
    /// file boundary, its actor and hooks at once.
    pub fn stop_now(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.stop.cancel();
    }
}

/// The limits a `dirs.d` file sets.
pub fn limits_of(d: &DirFile) -> DirLimits {
    DirLimits {
        max_file_size: d.max_file_size.get_ref().0,
        max_entries: *d.max_entries.get_ref(),
        min_free_space: d.min_free_space.get_ref().0,
        allow_setid: d.allow_setid,
    }
}

pub fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Source => "source",
        Mode::Replica => "replica",
        Mode::TwoWay => "two-way",
    }
}

/// Backoff after failures: exponential from [`RETRY_MIN`], capped at
/// [`RETRY_MAX`], with ±25 % jitter so a fleet that failed together does
/// not retry together.
#[derive(Debug, Default)]
pub struct Retry {
    /// Failed attempts in a row.
    pub failures: u32,
    /// No new attempt before this.
    pub next_at: Option<tokio::time::Instant>,
    /// When the last attempt started (a new version is tried at once, but
    /// not more often than every [`RETRY_MIN`]).
    pub last_attempt: Option<tokio::time::Instant>,
    /// The version whose pull failed, as (version, root).
    pub failed_version: Option<(u64, Vec<u8>)>,
    /// Peers that took part in failed attempts at that version: others
    /// are tried first next time.
    pub failed_holders: std::collections::HashSet<String>,
}

/// First retry delay after a failure.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest delay between attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

impl Retry {
    fn delay(failures: u32, jitter: f64) -> Duration {
        let base = RETRY_MIN.saturating_mul(1 << failures.saturating_sub(1).min(16));
        let base = base.min(RETRY_MAX);
        base.mul_f64(jitter).min(RETRY_MAX)
    }

    /// Records a failed attempt and schedules the next one (jitter from
    /// `env`).
    pub fn failed(&mut self, env: &Env) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let d = Self::delay(self.failures, env.uniform(0.75..1.25));
        self.next_at = Some(env.now() + d);
        d
    }

    pub fn succeeded(&mut self) {
        *self = Retry::default();
    }

    /// Whether an attempt may start now; `version` is what would be
    /// pulled (a new one is tried without waiting out the backoff).
    pub fn due(&self, now: tokio::time::Instant, version: Option<(u64, &[u8])>) -> bool {
        let Some(next) = self.next_at else {
            return true;
        };
        if now >= next {
            return true;
        }
        // Only after a failed pull: a failed scan or a panic is not
        // about a version, and waits out its delay.
        let new_version = version.is_some_and(|(v, root)| {
            self.failed_version
                .as_ref()
                .is_some_and(|(fv, froot)| *fv != v || froot.as_slice() != root)
        });
        new_version && self.last_attempt.is_none_or(|t| now >= t + RETRY_MIN)
    }

    /// Peers that failed us at `v` (tried last).
    pub fn failed_at(&self, v: &pb::DirVersion) -> std::collections::HashSet<String> {
        match &self.failed_version {
            Some((fv, root)) if *fv == v.version && *root == v.root => self.failed_holders.clone(),
            _ => Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let env = Env::seeded(1);
        let now = env.now();
        let mut r = Retry::default();
        let mut last = Duration::ZERO;
        for i in 1..=12 {
            let d = r.failed(&env);
            assert!(d <= RETRY_MAX, "{d:?}");
            if i <= 4 {
                // 1, 2, 4, 8 s ± 25 %
                let base = RETRY_MIN * (1 << (i - 1));
                assert!(
                    d >= base.mul_f64(0.75) && d <= base.mul_f64(1.25),
                    "{i}: {d:?}"
                );
                assert!(d > last.mul_f64(0.9) || i == 1);
            }
            last = d;
        }
        assert!(last >= RETRY_MAX.mul_f64(0.75));
        // The failed version is not retried early; a new one is, but not
        // more often than every RETRY_MIN.
        r.failed_version = Some((5, vec![1; 32]));
        r.last_attempt = Some(now);
        assert!(!r.due(now + Duration::from_millis(10), Some((5, &[1; 32]))));
        assert!(!r.due(now + Duration::from_millis(10), Some((6, &[2; 32]))));
        assert!(r.due(now + RETRY_MIN, Some((6, &[2; 32]))));
        assert!(!r.due(now + RETRY_MIN, Some((5, &[1; 32]))));
    }
}
