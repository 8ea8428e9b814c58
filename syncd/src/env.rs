//! The node's environment: time and randomness, behind one seam so tests
//! and the simulation can fix them.
//!
//! - **Time** is `tokio::time`: a paused runtime (`start_paused`) moves it
//!   only when the test says so, and every decision that depends on it —
//!   liveness of unconfirmed peers, forgetting dead ones, retry backoff —
//!   reads it from here, never from `std::time::Instant` (which the
//!   simulation cannot pause). Durations that are only measured (metrics,
//!   logs) may use the wall clock.
//! - **Randomness** comes from one generator per node: seeded from the OS
//!   in the daemon, from a given seed in tests, so a failing seed can be
//!   replayed. SWIM gets its own generator forked from it.
//! - **Blocking work** (scans, pulls, store reads) runs through
//!   [`Env::blocking`]: on tokio's blocking pool in the daemon, in
//!   lockstep with the runtime in the simulation ([`Env::simulated`]), so
//!   a seed replays the same interleaving. Blocking code that waits for
//!   async work calls [`wait`] rather than `Handle::block_on`.

mod lockstep;

pub use lockstep::wait;

use std::ops::Range;
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{RngExt as _, SeedableRng as _};

use crate::locks::LockExt as _;

#[derive(Debug)]
pub struct Env {
    rng: Mutex<StdRng>,
    /// Blocking work runs in lockstep with a current-thread runtime.
    lockstep: bool,
}

/// Blocking work that panicked (a bug), with the panic's message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Panic(pub String);

impl Panic {
    fn from_payload(p: Box<dyn std::any::Any + Send>) -> Panic {
        Panic(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into()),
        )
    }
}

impl From<tokio::task::JoinError> for Panic {
    fn from(e: tokio::task::JoinError) -> Panic {
        match e.try_into_panic() {
            Ok(p) => Panic::from_payload(p),
            Err(e) => Panic(e.to_string()),
        }
    }
}

impl Env {
    /// Randomness from the operating system (the daemon).
    pub fn from_entropy() -> Env {
        Env {
            rng: Mutex::new(rand::make_rng()),
            lockstep: false,
        }
    }

    /// Randomness from `seed` (tests, the simulation).
    pub fn seeded(seed: u64) -> Env {
        Env {
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            lockstep: false,
        }
    }

    /// Randomness from `seed`, and blocking work in lockstep with the
    /// runtime (the simulation: run it on a current-thread runtime).
    pub fn simulated(seed: u64) -> Env {
        Env {
            lockstep: true,
            ..Env::seeded(seed)
        }
    }

    /// Runs blocking `f` off the async tasks and returns its result, or
    /// its panic.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T, Panic>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        if self.lockstep {
            lockstep::run(f).await
        } else {
            Ok(tokio::task::spawn_blocking(f).await?)
        }
    }

    /// Now, on the clock a paused runtime controls.
    pub fn now(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
    }

    /// A number drawn uniformly from `range` (jitter factors).
    pub fn uniform(&self, range: Range<f64>) -> f64 {
        self.rng.locked().random_range(range)
    }

    /// A random 64-bit seed (for a component's own generator).
    pub fn seed(&self) -> u64 {
        self.rng.locked().random()
    }

    /// `n` distinct indices below `len`, in random order (all of them
    /// when `n >= len`), without touching the items themselves.
    pub fn sample(&self, len: usize, n: usize) -> Vec<usize> {
        rand::seq::index::sample(&mut *self.rng.locked(), len, n.min(len)).into_vec()
    }

    /// Shuffles `items` in place.
    pub fn shuffle<T>(&self, items: &mut [T]) {
        items.shuffle(&mut *self.rng.locked());
    }

    /// A generator of its own for a component (SWIM), drawn from this one
    /// so a seed fixes it too.
    pub fn fork(&self) -> StdRng {
        let seed: u64 = self.rng.locked().random();
        StdRng::seed_from_u64(seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_fixes_every_draw() {
        let draw = |env: &Env| {
            let mut v: Vec<u32> = (0..20).collect();
            env.shuffle(&mut v);
            let mut forked = env.fork();
            (v, env.uniform(0.0..1.0), forked.random::<u64>())
        };
        assert_eq!(draw(&Env::seeded(7)), draw(&Env::seeded(7)));
        assert_ne!(draw(&Env::seeded(7)), draw(&Env::seeded(8)));
    }
}
