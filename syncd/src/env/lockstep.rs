//! Blocking work in lockstep with a current-thread runtime, so the
//! simulation replays the same interleaving for the same seed.
//!
//! On the blocking pool, a scan or a pull runs beside the runtime thread,
//! and where it stands when an async task looks is a matter of real
//! timing. Here it runs on a thread of its own that holds a baton: while
//! it computes, the runtime thread waits (the work takes no virtual time);
//! when it must wait for the async side ([`wait`]), it hands the future to
//! the runtime as a task and gives the baton back; the task takes the
//! baton again once the future is done. Exactly one side runs at any
//! moment, and every hand-over happens at a point the schedule fixes.
//!
//! While the work waits, nothing blocking is running, so a paused clock
//! advances as usual and timers inside transfers fire.

use std::cell::RefCell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex};

use tokio::runtime::Handle;

use super::Panic;
use crate::locks::LockExt as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    Work,
    Runtime,
}

#[derive(Debug)]
struct Baton {
    turn: Mutex<Turn>,
    changed: Condvar,
}

impl Baton {
    /// Gives the turn to `to` and waits until it comes back to `back`.
    fn hand_over(&self, to: Turn, back: Turn) {
        self.give(to);
        self.wait_for(back);
    }

    /// Waits until the turn is `t`'s.
    fn wait_for(&self, t: Turn) {
        let mut turn = self.turn.locked();
        while *turn != t {
            turn = self
                .changed
                .wait(turn)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn give(&self, to: Turn) {
        *self.turn.locked() = to;
        self.changed.notify_all();
    }
}

thread_local! {
    /// The baton of the lockstep work running on this thread, if any.
    static BATON: RefCell<Option<Arc<Baton>>> = const { RefCell::new(None) };
}

/// Runs `f` in lockstep with the current (current-thread) runtime.
pub(super) async fn run<T, F>(f: F) -> Result<T, Panic>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let baton = Arc::new(Baton {
        turn: Mutex::new(Turn::Work),
        changed: Condvar::new(),
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let rt = Handle::current();
    let b = baton.clone();
    // The caller's subscriber (the simulation sets one per run).
    let logs = tracing::dispatcher::get_default(|d| d.clone());
    let started = std::thread::Builder::new()
        .name("sim-blocking".into())
        .spawn(move || {
            let _rt = rt.enter();
            BATON.with(|slot| *slot.borrow_mut() = Some(b.clone()));
            let r = tracing::dispatcher::with_default(&logs, || {
                std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(Panic::from_payload)
            });
            let _ = tx.send(r);
            b.give(Turn::Runtime);
        });
    if let Err(e) = started {
        return Err(Panic(format!(
            "cannot start a thread for blocking work: {e}"
        )));
    }
    // The work has the turn from its start (it may even be done by now):
    // it runs up to its first wait or its end.
    baton.wait_for(Turn::Runtime);
    rx.await
        .unwrap_or_else(|_| Err(Panic("blocking work ended without a result".into())))
}

/// From blocking code: waits for `fut` on `rt` and returns its output. In
/// lockstep work the future runs as a runtime task while this thread gives
/// up its turn; anywhere else this is `rt.block_on(fut)`.
pub fn wait<F>(rt: &Handle, fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let Some(baton) = BATON.with(|slot| slot.borrow().clone()) else {
        return rt.block_on(fut);
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let mut resume = Resume {
        baton: baton.clone(),
        tx: Some(tx),
    };
    rt.spawn(async move {
        let out = fut.await;
        if let Some(tx) = resume.tx.take() {
            let _ = tx.send(out);
        }
        drop(resume); // the work's turn, until it waits again or ends
    });
    baton.hand_over(Turn::Runtime, Turn::Work);
    match rx.recv() {
        Ok(out) => out,
        // The task was dropped before the future was done (the runtime
        // shut down, or the future panicked): unwind the work quietly;
        // `run` reports it.
        Err(_) => std::panic::resume_unwind(Box::new(
            "the task a blocking wait ran on was dropped or panicked",
        )),
    }
}

/// Gives the work its turn back when the waiting task ends, done or
/// dropped, and takes the turn again once the work yields. The sender is
/// dropped first, so a work whose task was dropped sees it at once.
struct Resume<T> {
    baton: Arc<Baton>,
    tx: Option<std::sync::mpsc::SyncSender<T>>,
}

impl<T> Drop for Resume<T> {
    fn drop(&mut self) {
        drop(self.tx.take());
        self.baton.hand_over(Turn::Work, Turn::Runtime);
    }
}
