//! Bandwidth: caps on what this node uploads and downloads (node-wide in
//! `[limits]` of `syncd.toml`, per directory in `[limits]` of its
//! `dirs.d` file), and the priority classes transfers take turns by.
//!
//! - **Caps** are token buckets (`governor`, GCRA) counted in KiB, on
//!   tokio's clock (so paused time in tests and the simulation drives them
//!   too). A download is charged before its call (the batch's planned
//!   bytes: a call never exceeds what was paid for), an upload before each
//!   batch of a served stream. A transfer pays its directory's bucket and
//!   the node's; the burst is one call's worth, so over any stretch of
//!   seconds the rate stays within a few per cent of the cap.
//! - **Priorities** (`priority = "high" | "normal" | "low"`): while a
//!   transfer of a higher class runs on this node, a lower one trickles:
//!   one call at a time, at most [`TRICKLE`] bytes a second (it never
//!   stalls outright, its sources stay warm), and leaves the rest of the
//!   link to the higher one. A node that
//!   serves a higher class holds a lower class's batches back a little
//!   while the higher one is being served. Changes apply to calls not yet
//!   started, so `syncctl priority` and `pause` take effect mid-transfer.
//! - **Pause** holds a directory's transfer where it is: no new calls,
//!   nothing given up; `resume` continues it.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::{Quota, RateLimiter};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

use crate::locks::{LockExt as _, RwLockExt as _};

/// A directory's priority class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Priority, String> {
        match s {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            other => Err(format!(
                "unknown priority {other:?}; expected high, normal or low"
            )),
        }
    }
}

/// What an operator set for a directory, changeable at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Control {
    pub paused: bool,
    pub priority: Priority,
}

/// tokio's clock for governor: paused time in tests moves the buckets.
#[derive(Debug, Clone)]
struct TokioClock(tokio::time::Instant);

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

type Bucket = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    TokioClock,
    governor::middleware::NoOpMiddleware<Duration>,
>;

/// One cell of a bucket.
const CELL: u64 = 1024;
/// The most one charge takes at once: a `GetChunks` call asks at most
/// 1 MiB by default and a served batch is at most 4 MiB; larger charges
/// are split (governor refuses a charge above the burst).
const BURST_BYTES: u64 = 4 << 20;

/// A cap in bytes per second.
pub struct Rate {
    bytes_per_second: u64,
    /// Cells one check may take (the bucket's burst).
    burst: u64,
    bucket: Bucket,
    clock: TokioClock,
}

impl std::fmt::Debug for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rate({} B/s)", self.bytes_per_second)
    }
}

impl Rate {
    /// A cap of `bytes_per_second` (at least 1 KiB/s); its burst is one
    /// call's worth, or a second's worth when that is less. The bucket
    /// starts full.
    pub fn new(bytes_per_second: u64) -> Rate {
        let cells = (bytes_per_second / CELL).clamp(1, u64::from(u32::MAX));
        let burst = (BURST_BYTES / CELL).min(cells).max(1);
        let quota = Quota::per_second(NonZeroU32::new(cells as u32).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst as u32).unwrap_or(NonZeroU32::MIN));
        let clock = TokioClock(tokio::time::Instant::now());
        Rate {
            bytes_per_second,
            burst,
            bucket: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
        }
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    /// Waits until `bytes` may pass; returns how long it waited.
    pub async fn take(&self, bytes: u64) -> Duration {
        let mut cells = bytes.div_ceil(CELL);
        let mut waited = Duration::ZERO;
        while cells > 0 {
            let n = cells.min(self.burst);
            let one = NonZeroU32::new(n as u32).unwrap_or(NonZeroU32::MIN);
            match self.bucket.check_n(one) {
                Ok(Ok(())) => cells -= n,
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    waited += wait;
                    tokio::time::sleep(wait).await;
                }
                // Cannot happen: `n` is at most the burst. Let it pass
                // rather than wait forever.
                Err(_) => cells -= n,
            }
        }
        waited
    }
}

/// Caps in bytes per second; `None` is no cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub upload: Option<u64>,
    pub download: Option<u64>,
}

/// One directory's caps and controls, registered with the node's
/// [`Bandwidth`] for as long as the directory runs.
#[derive(Debug)]
pub struct DirBandwidth {
    pub id: String,
    upload: Option<Rate>,
    download: Option<Rate>,
    control: watch::Sender<Control>,
}

impl DirBandwidth {
    /// A directory's caps and controls, not registered with a node yet
    /// ([`Bandwidth::register`]).
    pub fn new(id: &str, caps: Caps, control: Control) -> DirBandwidth {
        DirBandwidth {
            id: id.to_string(),
            upload: caps.upload.map(Rate::new),
            download: caps.download.map(Rate::new),
            control: watch::Sender::new(control),
        }
    }

    pub fn control(&self) -> Control {
        *self.control.borrow()
    }

    pub fn set_paused(&self, paused: bool) {
        self.control.send_if_modified(|c| {
            let changed = c.paused != paused;
            c.paused = paused;
            changed
        });
    }

    pub fn set_priority(&self, priority: Priority) {
        self.control.send_if_modified(|c| {
            let changed = c.priority != priority;
            c.priority = priority;
            changed
        });
    }

    pub fn caps(&self) -> Caps {
        Caps {
            upload: self.upload.as_ref().map(Rate::bytes_per_second),
            download: self.download.as_ref().map(Rate::bytes_per_second),
        }
    }
}

/// What a transfer giving way to a higher class may still download, in
/// bytes per second (shared by every such transfer of the node).
pub const TRICKLE: u64 = 256 << 10;

/// Seconds a lower class's served batch is held back, at most, while a
/// higher class is being served.
const UPLOAD_YIELD: Duration = Duration::from_millis(500);
/// A class counts as being served for this long after its last batch.
const SERVED_RECENTLY: Duration = Duration::from_secs(1);
/// Waiters look again this often (besides being woken by changes).
const RECHECK: Duration = Duration::from_millis(250);

/// This node's caps, its directories' caps and controls, and the
/// transfers running by class.
#[derive(Debug)]
pub struct Bandwidth {
    upload: Option<Rate>,
    download: Option<Rate>,
    dirs: RwLock<BTreeMap<String, Arc<DirBandwidth>>>,
    /// Transfers in progress: directory, and its controls.
    transfers: Mutex<Vec<(u64, Arc<DirBandwidth>)>>,
    next_transfer: std::sync::atomic::AtomicU64,
    /// When a stream of each class last sent a batch.
    served_at: Mutex<[Option<tokio::time::Instant>; 3]>,
    /// Transfers started or ended.
    changed: Notify,
    /// Time spent waiting for caps since last taken, upload and download
    /// (for metrics).
    waited: Mutex<[Duration; 2]>,
    /// What transfers giving way to a higher class share.
    trickle: Rate,
}

impl Default for Bandwidth {
    fn default() -> Bandwidth {
        Bandwidth::new(Caps::default())
    }
}

impl Bandwidth {
    pub fn new(caps: Caps) -> Bandwidth {
        Bandwidth {
            upload: caps.upload.map(Rate::new),
            download: caps.download.map(Rate::new),
            dirs: RwLock::new(BTreeMap::new()),
            transfers: Mutex::new(Vec::new()),
            next_transfer: 0.into(),
            served_at: Mutex::new([None; 3]),
            changed: Notify::new(),
            waited: Mutex::new([Duration::ZERO; 2]),
            trickle: Rate::new(TRICKLE),
        }
    }

    pub fn caps(&self) -> Caps {
        Caps {
            upload: self.upload.as_ref().map(Rate::bytes_per_second),
            download: self.download.as_ref().map(Rate::bytes_per_second),
        }
    }

    /// Time waited for caps (upload, download) since the last call.
    pub fn take_waited(&self) -> [Duration; 2] {
        std::mem::take(&mut *self.waited.locked())
    }

    /// Registers a directory (replacing one of the same id): served
    /// batches of it pay its upload cap and take its class.
    pub fn register(&self, d: Arc<DirBandwidth>) {
        self.dirs.write_locked().insert(d.id.clone(), d);
    }

    pub fn remove_dir(&self, id: &str) {
        self.dirs.write_locked().remove(id);
    }

    fn dir(&self, id: &str) -> Option<Arc<DirBandwidth>> {
        self.dirs.read_locked().get(id).cloned()
    }

    /// The highest class among running transfers that are not paused.
    fn top_class(&self) -> Option<Priority> {
        self.transfers
            .locked()
            .iter()
            .map(|(_, d)| d.control())
            .filter(|c| !c.paused)
            .map(|c| c.priority)
            .max()
    }

    /// A transfer of `dir` starts: its calls go through the gate.
    pub fn transfer(self: &Arc<Self>, dir: &Arc<DirBandwidth>) -> TransferGate {
        let id = self
            .next_transfer
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.transfers.locked().push((id, dir.clone()));
        self.changed.notify_waiters();
        TransferGate {
            node: self.clone(),
            dir: dir.clone(),
            id,
            trickle: Arc::new(Semaphore::new(1)),
            slot: tokio::sync::Mutex::new(Slot::default()),
        }
    }

    /// Before a served batch of `dir` of `bytes` goes out: a lower class
    /// gives way (briefly) to a higher one being served, then the caps.
    pub async fn upload(&self, dir: &str, bytes: u64) {
        let d = self.dir(dir);
        let class = d
            .as_ref()
            .map_or(Priority::Normal, |d| d.control().priority);
        let higher_served = |now: tokio::time::Instant| {
            self.served_at.locked()[class.index() + 1..]
                .iter()
                .flatten()
                .any(|t| now.saturating_duration_since(*t) < SERVED_RECENTLY)
        };
        if higher_served(tokio::time::Instant::now()) {
            let until = tokio::time::Instant::now() + UPLOAD_YIELD;
            while tokio::time::Instant::now() < until && higher_served(tokio::time::Instant::now())
            {
                tokio::time::sleep(RECHECK.min(until - tokio::time::Instant::now())).await;
            }
        }
        self.served_at.locked()[class.index()] = Some(tokio::time::Instant::now());
        let mut waited = Duration::ZERO;
        if let Some(r) = d.as_ref().and_then(|d| d.upload.as_ref()) {
            waited += r.take(bytes).await;
        }
        if let Some(r) = &self.upload {
            waited += r.take(bytes).await;
        }
        self.waited.locked()[0] += waited;
    }
}

/// The gate one transfer's calls pass: pause, priority, download caps.
/// Dropping it ends the transfer's registration.
#[derive(Debug)]
pub struct TransferGate {
    node: Arc<Bandwidth>,
    dir: Arc<DirBandwidth>,
    id: u64,
    /// While a higher class runs, one call of this transfer at a time.
    trickle: Arc<Semaphore>,
    /// The node's transfer slot it holds, given up while paused.
    slot: tokio::sync::Mutex<Slot>,
}

/// A transfer slot (see [`TransferGate::hold_slot`]).
#[derive(Debug, Default)]
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    slots: Option<Arc<Semaphore>>,
}

impl Drop for TransferGate {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Held for the length of one call that was let through the gate.
#[derive(Debug)]
pub struct Admitted {
    /// Held by a transfer giving way (its one call in flight).
    _permit: Option<OwnedSemaphorePermit>,
    trickle: bool,
}

impl TransferGate {
    /// The transfer has nothing more to download (it may still be writing
    /// or indexing): lower classes need not give way to it any more.
    pub fn finish(&self) {
        self.node
            .transfers
            .locked()
            .retain(|(id, _)| *id != self.id);
        self.node.changed.notify_waiters();
    }

    pub fn paused(&self) -> bool {
        self.dir.control().paused
    }

    /// Hands the gate the node's transfer slot `permit` (of `slots`): it
    /// is given up while the transfer is paused, so paused transfers do
    /// not keep other directories waiting, and taken again on resume.
    pub fn hold_slot(&self, permit: OwnedSemaphorePermit, slots: Arc<Semaphore>) {
        if let Ok(mut s) = self.slot.try_lock() {
            *s = Slot {
                permit: Some(permit),
                slots: Some(slots),
            };
        }
    }

    /// Whether a transfer of a higher class is running (this one trickles).
    pub fn yielding(&self) -> bool {
        let c = self.dir.control();
        self.node.top_class().is_some_and(|top| top > c.priority)
    }

    /// Waits until this transfer may start a call: not paused, and either
    /// no higher class runs or this transfer has no other call in flight.
    pub async fn ready(&self) -> Admitted {
        let mut control = self.dir.control.subscribe();
        loop {
            let changed = self.node.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.paused() {
                if let Ok(mut s) = self.slot.try_lock() {
                    s.permit = None;
                }
            } else {
                let mut s = self.slot.lock().await;
                if s.permit.is_none()
                    && let Some(slots) = s.slots.clone()
                {
                    // Back from a pause: wait for a slot like any transfer.
                    s.permit = slots.acquire_owned().await.ok();
                }
                drop(s);
                if !self.yielding() {
                    return Admitted {
                        _permit: None,
                        trickle: false,
                    };
                }
                if let Ok(p) = self.trickle.clone().try_acquire_owned() {
                    return Admitted {
                        _permit: Some(p),
                        trickle: true,
                    };
                }
            }
            tokio::select! {
                _ = changed => {}
                _ = control.changed() => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// Pays the download caps for a call of `bytes` let through as
    /// `admitted` (a trickling call pays the trickle too).
    pub async fn download(&self, bytes: u64, admitted: &Admitted) {
        let mut waited = Duration::ZERO;
        if admitted.trickle {
            waited += self.node.trickle.take(bytes).await;
        }
        if let Some(r) = &self.dir.download {
            waited += r.take(bytes).await;
        }
        if let Some(r) = &self.node.download {
            waited += r.take(bytes).await;
        }
        self.node.waited.locked()[1] += waited;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 MiB through a 10 MiB/s cap takes 10 s less the first burst,
    /// within a per cent (paused time: exact, not a timed test).
    #[tokio::test(start_paused = true)]
    async fn a_cap_holds_its_rate() {
        let r = Rate::new(10 << 20);
        let start = tokio::time::Instant::now();
        for _ in 0..100 {
            r.take(1 << 20).await;
        }
        let took = start.elapsed().as_secs_f64();
        // The bucket starts full: the first 4 MiB pass at once.
        let expect = (100.0 - 4.0) / 10.0;
        assert!(
            (took - expect).abs() / expect < 0.01,
            "took {took} s, expected {expect} s"
        );
    }

    /// A charge above the burst is split, not refused or lost.
    #[tokio::test(start_paused = true)]
    async fn a_charge_above_the_burst_is_split() {
        let r = Rate::new(1 << 20);
        let start = tokio::time::Instant::now();
        r.take(9 << 20).await;
        let took = start.elapsed().as_secs_f64();
        // Burst of 1 MiB (a second's worth), then 8 MiB at 1 MiB/s.
        assert!((took - 8.0).abs() < 0.1, "took {took} s");
    }

    fn node() -> Arc<Bandwidth> {
        Arc::new(Bandwidth::default())
    }

    fn dir(bw: &Bandwidth, id: &str, priority: Priority) -> Arc<DirBandwidth> {
        let d = Arc::new(DirBandwidth::new(
            id,
            Caps::default(),
            Control {
                paused: false,
                priority,
            },
        ));
        bw.register(d.clone());
        d
    }

    /// A paused transfer starts no call until resumed; a lower class
    /// trickles (one call at a time) while a higher one runs, and gets the
    /// link back when the higher one ends or is paused.
    #[tokio::test(start_paused = true)]
    async fn pause_and_priority_gate_calls() {
        let bw = node();
        let low = dir(&bw, "bulk", Priority::Low);
        let high = dir(&bw, "conf", Priority::High);
        let g_low = bw.transfer(&low);
        // Alone, the low transfer is not held at all.
        let a = g_low.ready().await;
        let b = g_low.ready().await;
        assert!(a._permit.is_none() && b._permit.is_none());
        drop((a, b));
        let g_high = bw.transfer(&high);
        assert!(g_low.yielding() && !g_high.yielding());
        let first = g_low.ready().await;
        assert!(
            first._permit.is_some(),
            "a yielding transfer holds the trickle"
        );
        let second = tokio::time::timeout(Duration::from_secs(5), g_low.ready()).await;
        assert!(
            second.is_err(),
            "a second call waits while the first is out"
        );
        drop(first);
        let again = g_low.ready().await;
        // Pausing the high one gives the link back.
        high.set_paused(true);
        assert!(!g_low.yielding());
        let free = tokio::time::timeout(Duration::from_secs(1), g_low.ready()).await;
        assert!(free.is_ok_and(|a| a._permit.is_none()));
        drop(again);
        high.set_paused(false);
        // A paused transfer waits until it is resumed, however long.
        low.set_paused(true);
        let waiting = tokio::spawn({
            let g = Arc::new(g_low);
            async move {
                let _ = g.ready().await;
            }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiting.is_finished());
        // Raising its priority does not unpause it; resuming does (and as
        // the high one ended, without a trickle).
        low.set_priority(Priority::High);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        drop(g_high);
        low.set_paused(false);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("resumed")
            .expect("no panic");
    }

    /// A served batch of a lower class waits (briefly) while a higher
    /// class is being served, and not at all otherwise.
    #[tokio::test(start_paused = true)]
    async fn uploads_give_way_to_a_higher_class() {
        let bw = node();
        dir(&bw, "bulk", Priority::Low);
        dir(&bw, "conf", Priority::High);
        let t = tokio::time::Instant::now();
        bw.upload("bulk", 1 << 20).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
        bw.upload("conf", 1 << 20).await;
        let t = tokio::time::Instant::now();
        bw.upload("bulk", 1 << 20).await;
        assert_eq!(t.elapsed(), UPLOAD_YIELD);
        // The high class went quiet a second ago: no more waiting.
        tokio::time::sleep(SERVED_RECENTLY).await;
        let t = tokio::time::Instant::now();
        bw.upload("bulk", 1 << 20).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
    }
    /// A paused transfer gives its node transfer slot up (another
    /// directory may transfer meanwhile) and takes one again on resume.
    #[tokio::test(start_paused = true)]
    async fn a_paused_transfer_gives_up_its_slot() {
        let bw = node();
        let d = dir(&bw, "bulk", Priority::Normal);
        let slots = Arc::new(Semaphore::new(1));
        let g = bw.transfer(&d);
        g.hold_slot(slots.clone().acquire_owned().await.unwrap(), slots.clone());
        assert_eq!(slots.available_permits(), 0);
        d.set_paused(true);
        let g = Arc::new(g);
        let waiting = tokio::spawn({
            let g = g.clone();
            async move {
                let _ = g.ready().await;
            }
        });
        let other = tokio::time::timeout(Duration::from_secs(5), slots.clone().acquire_owned())
            .await
            .expect("the paused transfer kept its slot")
            .unwrap();
        // Resumed while the other holds the slot: it waits for it.
        d.set_paused(false);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished());
        drop(other);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("resumed with the slot back")
            .unwrap();
        assert_eq!(slots.available_permits(), 0);
    }
}
