//! Directory actors: one per synced directory, owning its state, its
//! watcher, its scans and transfers and its hook runner. Everything else
//! talks to it through a [`DirHandle`] (`poke`, `pause`, `resume`,
//! `revert`, `rescan`, a status `watch`); each mode's policy is its own
//! file ([`source`], [`replica`]; two-way will be one more).
//!
//! ```text
//!  inotify ─┐                         ┌─ source: scan ─> publish (fleet view)
//!  tick ────┼─> actor loop ─ waiting ─┤
//!  handle ──┤   (backoff, pause)      └─ replica: scan ─> newer in fleet view?
//!  fleet ───┘                              ─> transfer slot ─> pull ─> apply
//! ```
//!
//! The actor runs blocking work (scans, pulls) on the blocking pool and
//! keeps answering its handle meanwhile. It waits for a node-wide scan or
//! transfer slot first (state `waiting`), so a node with many
//! directories does not scan them all at once.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::config::Mode;
use crate::error::SyncError;
use crate::local::LocalNode;
use crate::locks::RwLockExt as _;

mod accepted;
mod fleet_control;
pub mod replica;
pub mod source;
pub mod state;

pub use state::{DirLimits, DirState, DirStatus, Phase, Progress, Retry};

/// Replica actors look for newer versions at least this often.
const REPLICA_TICK: Duration = Duration::from_secs(1);
/// Debounce of file system events before a rescan.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// What a handle asks of its actor.
#[derive(Debug)]
enum Command {
    /// Try now (a rescan on a source, a look for newer versions on a
    /// replica), whatever the backoff says.
    Poke,
    Pause,
    Resume,
    /// Forget the version held and pull the newest again.
    Revert,
    /// Scan now and answer whether the version changed.
    Rescan(oneshot::Sender<Result<bool, String>>),
}

/// Talks to one directory's actor.
#[derive(Debug, Clone)]
pub struct DirHandle {
    pub state: Arc<DirState>,
    tx: mpsc::Sender<Command>,
}

impl DirHandle {
    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// The status as it is now.
    pub fn status(&self) -> DirStatus {
        self.state.status()
    }

    /// A receiver of every status change.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<DirStatus> {
        self.state.watch()
    }

    fn send(&self, c: Command) {
        // A full queue already holds a command that wakes the actor.
        let _ = self.tx.try_send(c);
    }

    pub fn poke(&self) {
        self.send(Command::Poke);
    }

    /// Pauses the directory, its transfer in progress included (it holds
    /// where it is: no new calls, nothing given up).
    pub fn pause(&self) {
        self.state.update(|s| s.paused = true);
        self.state.bandwidth.set_paused(true);
        self.send(Command::Pause);
    }

    pub fn resume(&self) {
        self.state.update(|s| s.paused = false);
        self.state.bandwidth.set_paused(false);
        self.send(Command::Resume);
    }

    /// Changes the directory's priority class, for its transfer in
    /// progress too (from its next call on).
    pub fn set_priority(&self, p: crate::bandwidth::Priority) {
        if self.state.bandwidth.control().priority != p {
            tracing::info!(dir = %self.state.id, priority = p.as_str(), "priority changed");
        }
        self.state.bandwidth.set_priority(p);
    }

    /// Undoes local edits on a replica.
    pub fn revert(&self) -> Result<(), String> {
        if self.state.mode != Mode::Replica {
            return Err(format!(
                "directory {:?} is a {}; revert undoes local edits on replicas",
                self.state.id,
                if self.state.mode == Mode::Source {
                    "source"
                } else {
                    "two-way directory"
                }
            ));
        }
        self.send(Command::Revert);
        Ok(())
    }

    /// Scans now; when it returns, what is on disk is the version this
    /// node holds (on a source, the version it publishes).
    pub async fn rescan(&self) -> Result<bool, String> {
        if self.state.status().paused {
            return Err(format!(
                "directory {:?} is paused; resume it first",
                self.state.id
            ));
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Rescan(tx))
            .await
            .map_err(|_| format!("directory {:?} is stopping", self.state.id))?;
        rx.await
            .map_err(|_| format!("directory {:?} stopped before scanning", self.state.id))?
    }
}

/// The directories this node runs, by id (the daemon adds and removes
/// them; admin reads them).
pub type Registry = RwLock<BTreeMap<String, DirHandle>>;

/// Every handle in a registry.
pub fn handles(r: &Registry) -> Vec<DirHandle> {
    r.read_locked().values().cloned().collect()
}

/// A running directory: its handle and the task of its actor and hooks.
#[derive(Debug)]
pub struct Running {
    pub handle: DirHandle,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops the directory and waits (up to `deadline`) for its work to
    /// end at a file boundary; past the deadline the task is aborted (a
    /// temp file it leaves is removed the next time that directory is
    /// written).
    pub async fn stop(self, deadline: tokio::time::Instant) {
        self.handle.state.stop_now();
        let id = self.handle.state.id.clone();
        let mut task = self.task;
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            tracing::warn!(dir = %id, "directory did not stop in time; abandoning its work");
            task.abort();
        }
    }
}

/// A directory about to run: its handle works (commands queue) while
/// its first scan runs, before its actor starts.
#[derive(Debug)]
pub struct Prepared {
    pub handle: DirHandle,
    rx: mpsc::Receiver<Command>,
}

/// A new directory: carried, announced, with a handle.
pub fn create(node: &Arc<LocalNode>, dir: DirState) -> Prepared {
    let dir = Arc::new(dir);
    node.metrics.init_dir(&dir.id);
    node.bandwidth.register(dir.bandwidth.clone());
    node.carry(&dir.id, &dir.path);
    node.fleet.set_publishers(&dir.id, dir.publishers.clone());
    if dir.mode != Mode::Source {
        accepted::load(node, &dir);
    }
    dir.announce();
    let (tx, rx) = mpsc::channel(16);
    Prepared {
        handle: DirHandle { state: dir, tx },
        rx,
    }
}

/// Scans a new directory once, so it starts with what it holds.
pub async fn prepare(node: &Arc<LocalNode>, p: &Prepared) {
    let dir = p.handle.state.clone();
    let (n, d) = (node.clone(), dir.clone());
    // A directory that cannot be scanned (missing, unmounted) is an error
    // state, not a reason to stop the node: its actor keeps retrying.
    match node.env.blocking(move || scan(&n, &d)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::error!(dir = %dir.id, error = %e, fault = e.fault().as_str(), "initial scan failed")
        }
        Err(e) => {
            let mut retry = Retry::default();
            panicked(node, &dir, &mut retry, "initial scan", e);
        }
    }
    // The first version a source publishes at start is not a sync.
    dir.synced.send_replace(None);
}

/// Starts the actor (and hook runner) of a prepared directory.
pub fn start(node: &Arc<LocalNode>, p: Prepared) -> Running {
    let Prepared { handle, rx } = p;
    let dir = handle.state.clone();
    let failed_initially = dir.status().phase == Phase::Error;
    let actor = Actor {
        node: node.clone(),
        dir: dir.clone(),
        rx,
        retry: Retry::default(),
        rt: tokio::runtime::Handle::current(),
        must_rescan: failed_initially,
    };
    let metrics = node.metrics.clone();
    let task = tokio::spawn(async move {
        let stop = dir.stop.clone();
        let hooks = crate::hooks::Hook {
            dir: dir.id.clone(),
            path: dir.path.clone(),
            command: dir.hook.clone(),
            timeout: dir.hook_timeout,
        };
        let versions = dir.synced.subscribe();
        tokio::join!(actor.run(), async {
            // A hook running at stop is killed (kill_on_drop).
            tokio::select! {
                biased;
                _ = stop.cancelled() => {}
                _ = crate::hooks::run_hooks(metrics, hooks, versions) => {}
            }
        });
    });
    Running { handle, task }
}

/// One scan of a directory with its mode's meaning; returns whether a
/// source published.
pub fn scan(node: &LocalNode, dir: &DirState) -> Result<bool, SyncError> {
    dir.set_phase(Phase::Scanning);
    let opts = chunk_store::indexer::ScanOptions {
        refuse_emptying: dir.mode == Mode::Source && source::REFUSE_EMPTYING,
        ..dir.scan_options()
    };
    let report = match node.scan(&dir.id, &dir.path, opts) {
        Ok(r) => r,
        Err(e) => {
            let e = SyncError::store(
                format!("scanning directory {:?} at {}", dir.id, dir.path.display()),
                None,
                e,
            );
            dir.set_error(e.to_string());
            node.metrics
                .errors
                .with_label_values(&[&dir.id, "scan"])
                .inc();
            return Err(e);
        }
    };
    let m = &node.metrics;
    let id = [dir.id.as_str()];
    m.scan_duration
        .with_label_values(&id)
        .observe(report.walk_seconds);
    m.index_duration
        .with_label_values(&id)
        .observe(report.seconds - report.walk_seconds);
    Ok(match dir.mode {
        Mode::Source => source::scanned(node, dir, &report),
        Mode::Replica | Mode::TwoWay => {
            replica::scanned(node, dir, &report);
            false
        }
    })
}

struct Actor {
    node: Arc<LocalNode>,
    dir: Arc<DirState>,
    rx: mpsc::Receiver<Command>,
    retry: Retry,
    rt: tokio::runtime::Handle,
    /// A failed scan is redone at the next attempt, whatever wakes it.
    must_rescan: bool,
}

/// What woke the actor.
enum Wake {
    /// Something on disk changed, or the operator asked: scan.
    Scan,
    /// Look for work (newer versions, a due retry, the periodic rescan).
    Look,
    Rescan(oneshot::Sender<Result<bool, String>>),
    Stop,
}

impl Actor {
    async fn run(mut self) {
        let (tx, mut events) = mpsc::channel::<()>(1);
        let watcher = if self.dir.watch {
            watch(&self.dir, tx)
        } else {
            None
        };
        // Without a watcher the channel is closed: stop polling it (it
        // would be ready at once, forever).
        let mut watching = watcher.is_some();
        let tick = if self.dir.mode == Mode::Source {
            self.dir.rescan_interval
        } else {
            REPLICA_TICK.min(self.dir.rescan_interval)
        };
        let mut last_full = tokio::time::Instant::now();
        let fleet = self.node.fleet.clone();
        loop {
            // A due time already past means "now": it must not wake the
            // loop again and again (a paused directory would spin).
            let retry_at = self
                .retry
                .next_at
                .filter(|t| *t > tokio::time::Instant::now());
            // Biased, in this order (tokio otherwise picks among ready
            // branches at random, which a seed cannot replay): none of
            // these stays ready, so none starves the rest.
            let wake = tokio::select! {
                biased;
                _ = self.dir.stop.cancelled() => Wake::Stop,
                c = self.rx.recv() => match c {
                    None => Wake::Stop,
                    Some(c) => self.command(c),
                },
                e = events.recv(), if watching => {
                    watching = e.is_some();
                    if e.is_some() { Wake::Scan } else { Wake::Look }
                }
                _ = fleet.learned.notified(), if self.dir.mode != Mode::Source => Wake::Look,
                _ = sleep_until(retry_at) => Wake::Look,
                _ = tokio::time::sleep(tick) => Wake::Look,
            };
            if self.dir.stop.is_cancelled() {
                break;
            }
            let mut scan_now = false;
            match wake {
                Wake::Stop => break,
                Wake::Scan => scan_now = true,
                Wake::Look => {}
                Wake::Rescan(reply) => {
                    // The operator's scan runs now, backoff or not; a
                    // replica then looks for a newer version at once.
                    last_full = tokio::time::Instant::now();
                    let r = self.rescan().await;
                    let _ = reply.send(r.map_err(|e| e.to_string()));
                    self.retry.next_at = None;
                }
            }
            if self.dir.status().paused {
                continue;
            }
            let now = tokio::time::Instant::now();
            let newer = if self.dir.mode == Mode::Source {
                None
            } else {
                replica::newer(&self.node, &self.dir, &self.retry)
            };
            if !self.retry.due(
                now,
                newer.as_ref().map(|(v, _)| (v.version, v.root.as_slice())),
            ) {
                continue;
            }
            if scan_now || self.must_rescan || last_full.elapsed() >= self.dir.rescan_interval {
                last_full = tokio::time::Instant::now();
                if self.rescan().await.is_err() {
                    continue;
                }
            }
            if self.dir.mode == Mode::Source {
                continue;
            }
            match newer {
                None => self.settled(),
                Some((version, holders)) => self.pull(version, holders).await,
            }
        }
        drop(watcher);
    }

    /// Handles a command; returns what to do next.
    fn command(&mut self, c: Command) -> Wake {
        match c {
            Command::Poke | Command::Resume => {
                // An operator's rescan, resume or revert: try now.
                self.retry.next_at = None;
                if matches!(c, Command::Resume) {
                    tracing::info!(dir = %self.dir.id, "resumed by syncctl");
                }
                Wake::Scan
            }
            Command::Pause => {
                tracing::info!(dir = %self.dir.id, "paused by syncctl");
                Wake::Look
            }
            Command::Revert => {
                // Forget the version held: the actor pulls the newest
                // version again, and the diff against what is on disk
                // restores every edited, added or deleted file.
                tracing::info!(dir = %self.dir.id, "revert requested by syncctl");
                self.dir.update(|s| s.current = None);
                self.retry.next_at = None;
                Wake::Look
            }
            Command::Rescan(reply) => Wake::Rescan(reply),
        }
    }

    /// Waits for a slot of `slots`, showing `waiting` meanwhile.
    async fn slot(
        &self,
        slots: &Arc<tokio::sync::Semaphore>,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(p) = slots.clone().try_acquire_owned() {
            return Some(p);
        }
        let before = self.dir.status().phase;
        self.dir.set_phase(Phase::Waiting);
        let p = tokio::select! {
            biased;
            _ = self.dir.stop.cancelled() => None,
            p = slots.clone().acquire_owned() => p.ok(),
        };
        if p.is_some() && before != Phase::Error {
            self.dir.set_phase(before);
        }
        p
    }

    /// A full scan, with backoff on failure.
    async fn rescan(&mut self) -> Result<bool, SyncError> {
        let Some(permit) = self.slot(&self.node.scan_slots).await else {
            return Err(SyncError::Local("stopping".into()));
        };
        let (n, d) = (self.node.clone(), self.dir.clone());
        let done = self
            .node
            .env
            .blocking(move || {
                let _permit = permit;
                scan(&n, &d)
            })
            .await;
        match done {
            Ok(Ok(changed)) => {
                self.must_rescan = false;
                if self.dir.mode == Mode::Source {
                    self.settled();
                }
                Ok(changed)
            }
            Ok(Err(e)) => {
                self.must_rescan = true;
                // Delays count from the end of the attempt: a long one
                // must not be retried at once.
                let wait = self.failed();
                tracing::error!(dir = %self.dir.id, error = %e, fault = e.fault().as_str(), retry_in = ?wait, "rescan failed");
                Err(e)
            }
            Err(e) => {
                self.must_rescan = true;
                let msg = panicked(&self.node, &self.dir, &mut self.retry, "rescan", e);
                Err(SyncError::Local(msg))
            }
        }
    }

    async fn pull(
        &mut self,
        version: sync_proto::pb::DirVersion,
        holders: Vec<crate::fleet::Holder>,
    ) {
        let Some(permit) = self.slot(&self.node.transfer_slots).await else {
            return;
        };
        self.retry.last_attempt = Some(tokio::time::Instant::now());
        let (n, d, rt) = (self.node.clone(), self.dir.clone(), self.rt.clone());
        let v = version.clone();
        let done = self
            .node
            .env
            .blocking(move || {
                let mut involved = HashSet::new();
                let r = replica::pull(&n, &d, &v, &holders, &rt, permit, &mut involved);
                (r, involved)
            })
            .await;
        match done {
            Ok((Ok(()), _)) => self.settled(),
            Ok((Err(e), involved)) => {
                let key = (version.version, version.root.clone());
                if self.retry.failed_version.as_ref() != Some(&key) {
                    self.retry.failed_version = Some(key);
                    self.retry.failed_holders.clear();
                }
                self.retry.failed_holders.extend(involved);
                let wait = self.failed();
                tracing::warn!(dir = %self.dir.id, version = version.version, error = %e, fault = e.fault().as_str(), retry_in = ?wait, "sync failed; will retry");
            }
            Err(e) => {
                self.retry.failed_version = Some((version.version, version.root.clone()));
                panicked(&self.node, &self.dir, &mut self.retry, "sync", e);
            }
        }
    }

    fn failed(&mut self) -> Duration {
        let wait = self.retry.failed(&self.node.env);
        let (failures, at) = (self.retry.failures, self.retry.next_at);
        self.dir.update(|s| {
            s.panicked = false;
            s.failures = failures;
            s.retry_at = at;
        });
        wait
    }

    fn settled(&mut self) {
        settled(&self.dir, &mut self.retry);
    }
}

/// The directory's work succeeded (or there was none to do).
pub fn settled(dir: &DirState, retry: &mut Retry) {
    if retry.failures > 0 || retry.next_at.is_some() {
        retry.succeeded();
    }
    let s = dir.status();
    if s.panicked || s.failures > 0 || s.retry_at.is_some() {
        dir.update(|s| {
            s.panicked = false;
            s.failures = 0;
            s.retry_at = None;
        });
    }
}

/// The directory's watcher, feeding `tx`; none when it cannot watch
/// (periodic rescans still run).
fn watch(
    dir: &DirState,
    tx: mpsc::Sender<()>,
) -> Option<
    notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
> {
    // The notify callback must not block (the kernel queue would
    // overflow): it only marks "something changed"; the rescan finds out
    // what.
    let watcher = notify_debouncer_full::new_debouncer(
        DEBOUNCE,
        None,
        move |res: notify_debouncer_full::DebounceEventResult| {
            let relevant = match &res {
                Ok(events) => events
                    .iter()
                    .any(|e| !matches!(e.kind, notify::EventKind::Access(_))),
                Err(_) => true, // errors (e.g. overflow) mean: rescan
            };
            if relevant {
                let _ = tx.try_send(());
            }
        },
    );
    match watcher {
        Ok(mut w) => match w.watch(&dir.path, notify::RecursiveMode::Recursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.id, error = %e, "cannot watch; relying on periodic rescans (raise fs.inotify.max_user_watches?)");
                None
            }
        },
        Err(e) => {
            tracing::warn!(dir = %dir.id, error = %e, "cannot create a watcher; relying on periodic rescans");
            None
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing scheduled.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A panic in a directory's work is a bug: the directory shows `error`
/// with the panic's message, it is counted, the work is retried with
/// backoff, and the other directories go on (no lock stays poisoned; see
/// [`crate::locks`]). Returns the message.
pub fn panicked(
    node: &LocalNode,
    dir: &DirState,
    retry: &mut Retry,
    what: &str,
    e: crate::env::Panic,
) -> String {
    let msg = e.0;
    let wait = retry.failed(&node.env);
    let (failures, at) = (retry.failures, retry.next_at);
    let reason = format!(
        "internal error during {what} (a bug; please report it): {msg}; retrying in {}",
        humantime::format_duration(Duration::from_secs(wait.as_secs().max(1)))
    );
    dir.update(|s| {
        s.panicked = true;
        s.failures = failures;
        s.retry_at = at;
        s.phase = Phase::Error;
        s.reason = reason.clone();
        s.last_error = reason.clone();
    });
    node.metrics
        .errors
        .with_label_values(&[&dir.id, "panic"])
        .inc();
    tracing::error!(dir = %dir.id, panic = %msg, retry_in = ?wait, "{what} panicked");
    msg
}

/// Whether some directory can make progress: false when there are
/// directories and every one's last attempt panicked.
pub fn can_progress(dirs: &[DirHandle]) -> bool {
    dirs.is_empty() || dirs.iter().any(|d| !d.status().panicked)
}

#[cfg(test)]
mod tests;
