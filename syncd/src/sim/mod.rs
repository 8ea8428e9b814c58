//! Whole fleets in one process, over the in-memory transport, with a
//! seeded RNG per node and tokio's paused clock (run these on a
//! current-thread runtime with time paused; blocking work holds the clock
//! still while it runs).
//!
//! - [`fleet`]: fleet views only (records, gossip, optionally SWIM), a
//!   thousand of them at once: what the scale benchmark measures.
//! - [`node`]: whole nodes (index, directory actors, peer service,
//!   gossip, SWIM), crashed and restarted at will: what the scripted
//!   simulation tests drive.

pub mod fleet;
pub mod node;

#[cfg(test)]
mod swarm_tests;
#[cfg(test)]
mod tests;

/// The in-memory address of node `i` (`10.x.y.z:7400`).
pub fn address(i: usize) -> String {
    format!(
        "10.{}.{}.{}:7400",
        1 + i / 62500,
        (i / 250) % 250,
        i % 250 + 1
    )
}
