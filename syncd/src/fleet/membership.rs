//! Membership and failure detection: SWIM, by the `foca` crate, carried over
//! the peer gRPC channel (`Peer.Swim`, one packet per call, fire and forget).
//!
//! One task owns the `Foca` instance and takes its inputs from a channel:
//! packets from peers, its own timers, and announces (to bootstrap
//! addresses and to peers heard of through holdings). After each input it
//! drains foca's runtime: packets go out as spawned gRPC calls, timers as
//! spawned sleeps that feed back into the channel, membership changes go to
//! the node.
//!
//! Identities are (address, node id, bump). The address is foca's `Addr`:
//! a node announces to a bootstrap address without knowing who is there,
//! and a restarted node (a new, larger bump at the same address) replaces
//! its old identity instead of waiting out its "down" period.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use foca::{Foca, NoCustomBroadcast, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use sync_proto::pb;
use tokio::sync::mpsc;

use crate::transport::Transport;

/// Largest SWIM packet sent or accepted.
pub const MAX_PACKET: usize = 32 << 10;
/// Inputs queued for the SWIM task; beyond this, packets are dropped (as a
/// datagram would be) rather than buffered without bound.
const QUEUE: usize = 1024;
/// With no live member, bootstrap addresses are announced to this often.
const REANNOUNCE: Duration = Duration::from_secs(1);
/// A SWIM packet send that takes longer is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// A member's identity on the SWIM layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ident {
    pub address: String,
    pub node_id: String,
    /// Grows on every start (milliseconds since the epoch) and on rejoin.
    pub bump: u64,
}

impl foca::Identity for Ident {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(Ident {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> String {
        self.address.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// What SWIM thinks of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Liveness {
    Alive,
    /// Failed a probe; treated as alive until declared down.
    Suspect,
    Down,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspect => "suspect",
            Liveness::Down => "dead",
        }
    }
}

/// What the SWIM layer reports to the node.
pub trait Members: Send + Sync + 'static {
    /// A member's liveness changed (or it was first seen).
    fn member(&self, id: &Ident, state: Liveness);
    /// A SWIM packet of `bytes` is about to be sent (for accounting).
    fn sending(&self, _bytes: usize) {}
}

enum Input {
    Packet(Bytes),
    Timer(Timer<Ident>),
    Announce(String),
    /// Leave the fleet: tell members, then stop (answers when sent).
    Leave(tokio::sync::oneshot::Sender<()>),
}

/// Handle to the SWIM task.
#[derive(Debug, Clone)]
pub struct Swim {
    tx: mpsc::Sender<Input>,
    task: tokio::task::AbortHandle,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Input::Packet(_) => "Packet",
            Input::Timer(_) => "Timer",
            Input::Announce(_) => "Announce",
            Input::Leave(_) => "Leave",
        })
    }
}

/// Timings for a fleet on a LAN, over TCP: probe every second, a probe
/// answered within 500 ms, suspicion becomes "down" after a few periods.
fn config(expected_members: usize) -> foca::Config {
    // Suspicion timings as for 64 members at least (as before the
    // announce period scaled).
    let size = std::num::NonZeroU32::new(expected_members.clamp(64, 1 << 20) as u32)
        .expect("clamped to at least 64");
    let mut c = foca::Config::new_lan(size);
    c.max_packet_size = NonZeroUsize::new(MAX_PACKET).expect("non-zero");
    // Announce (a full membership exchange, accepted whatever identity the
    // receiver knows us by) more often than the LAN profile's 30 s / 65 s,
    // so views that diverged across a partition or a rejoin converge in
    // seconds — in a small fleet. Each answer carries the member list (up
    // to 32 KiB), so the period grows with the fleet: every 5 s up to 16
    // members, then in proportion, at most every 2 minutes; idle SWIM
    // traffic per node then stays flat as the fleet grows.
    let scale = (expected_members / 16).max(1) as u32;
    let every = |base: u64| {
        Duration::from_secs(base)
            .saturating_mul(scale)
            .min(ANNOUNCE_MAX)
    };
    let one = NonZeroUsize::new(1).expect("non-zero");
    c.periodic_announce = Some(foca::PeriodicParams {
        frequency: every(5),
        num_members: one,
    });
    c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: every(10),
        num_members: NonZeroUsize::new(2).expect("non-zero"),
    });
    c
}

/// Longest period between periodic announces, however large the fleet.
const ANNOUNCE_MAX: Duration = Duration::from_secs(120);

/// The fleet size a configuration is made for: the member count rounded
/// up to a power of two, so the configuration changes only when the fleet
/// doubles or halves.
fn size_class(members: usize) -> usize {
    members.max(16).next_power_of_two()
}

impl Swim {
    /// Starts the SWIM task for `me`, announcing to `bootstrap` until some
    /// member answers.
    pub fn start(
        me: Ident,
        bootstrap: Vec<String>,
        members: Arc<dyn Members>,
        transport: Arc<dyn Transport>,
        rng: StdRng,
    ) -> Swim {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(me, bootstrap, members, transport, rng, tx.clone(), rx));
        Swim {
            tx,
            task: task.abort_handle(),
        }
    }

    /// Ends the SWIM task without a goodbye (a crash, in the simulation).
    pub fn abort(&self) {
        self.task.abort();
    }

    /// A packet from a peer (dropped when the queue is full).
    pub fn packet(&self, data: Bytes) -> Result<(), &'static str> {
        if data.len() > MAX_PACKET {
            return Err("SWIM packet larger than 32 KiB");
        }
        let _ = self.tx.try_send(Input::Packet(data));
        Ok(())
    }

    /// Leaves the fleet: members learn at once that this node is going
    /// (instead of suspecting it for seconds), then the SWIM task ends.
    /// Resolves once the goodbye packets were sent (or failed).
    pub async fn leave(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Input::Leave(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Announces this node to `address` (a peer heard of some other way).
    pub fn announce(&self, address: &str) {
        let _ = self.tx.try_send(Input::Announce(address.to_string()));
    }
}

/// Sends one packet, fire and forget (a lost packet is SWIM's to handle).
async fn send(transport: Arc<dyn Transport>, to: String, data: Bytes) {
    let call = transport.swim(&to, pb::SwimPacket { data });
    if let Ok(Err(e)) = tokio::time::timeout(SEND_TIMEOUT, call).await {
        tracing::trace!(to = %to, error = %e, "SWIM packet not delivered");
    }
}

fn liveness(s: foca::State) -> Liveness {
    match s {
        foca::State::Alive => Liveness::Alive,
        foca::State::Suspect => Liveness::Suspect,
        foca::State::Down => Liveness::Down,
    }
}

async fn run(
    me: Ident,
    bootstrap: Vec<String>,
    members: Arc<dyn Members>,
    transport: Arc<dyn Transport>,
    rng: StdRng,
    tx: mpsc::Sender<Input>,
    mut rx: mpsc::Receiver<Input>,
) {
    let mut configured = size_class(0);
    let mut foca: Foca<Ident, PostcardCodec, StdRng, NoCustomBroadcast> =
        Foca::new(me.clone(), config(configured), rng, PostcardCodec);
    let mut rt = foca::AccumulatingRuntime::new();
    // Suspect is not a foca notification: compare snapshots instead.
    let mut known: BTreeMap<String, (Ident, Liveness)> = BTreeMap::new();
    let mut announce = tokio::time::interval(REANNOUNCE);
    announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Biased (a seed replays the same choice); the tick first, so a
        // busy inbox cannot hold re-announcing off.
        let input = tokio::select! {
            biased;
            _ = announce.tick() => {
                if foca.num_members() == 0 {
                    for a in &bootstrap {
                        if *a != me.address {
                            let _ = tx.try_send(Input::Announce(a.clone()));
                        }
                    }
                }
                continue;
            }
            i = rx.recv() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let result = match input {
            Input::Leave(done) => {
                if let Err(e) = foca.leave_cluster(&mut rt) {
                    tracing::debug!(error = %e, "leaving the fleet");
                }
                let mut sends = tokio::task::JoinSet::new();
                while let Some((to, data)) = rt.to_send() {
                    sends.spawn(send(transport.clone(), to.address, data));
                }
                while sends.join_next().await.is_some() {}
                let _ = done.send(());
                return;
            }
            Input::Packet(data) => foca.handle_data(&data, &mut rt),
            Input::Timer(t) => foca.handle_timer(t, &mut rt),
            Input::Announce(address) => foca.announce(
                Ident {
                    address,
                    node_id: String::new(),
                    bump: 0,
                },
                &mut rt,
            ),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "SWIM input rejected");
        }
        let class = size_class(foca.num_members() + 1);
        if class != configured {
            match foca.set_config(config(class)) {
                Ok(()) => configured = class,
                Err(e) => tracing::debug!(error = %e, "SWIM configuration unchanged"),
            }
        }
        while let Some((to, data)) = rt.to_send() {
            members.sending(data.len());
            tokio::spawn(send(transport.clone(), to.address, data));
        }
        while let Some((after, timer)) = rt.to_schedule() {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = tx.send(Input::Timer(timer)).await;
            });
        }
        while let Some(n) = rt.to_notify() {
            match n {
                OwnedNotification::Defunct => {
                    tracing::warn!("this node was declared down by the fleet; rejoining")
                }
                OwnedNotification::Rejoin(id) => {
                    tracing::info!(bump = id.bump, "rejoined the fleet under a new identity");
                    // Peers know us by the old identity and drop what is
                    // addressed to it: tell every known address the new
                    // one now instead of at the next periodic announce.
                    for address in known.keys().chain(bootstrap.iter()) {
                        if *address != me.address {
                            let _ = tx.try_send(Input::Announce(address.clone()));
                        }
                    }
                }
                OwnedNotification::Idle => tracing::warn!("no live peer left"),
                _ => {}
            }
        }
        // Report state changes, including suspicion, which foca does not
        // notify: compare with the last report after every input (a walk
        // of the member list; a node handles a few packets a second).
        // Several identities may share an address for a while (a restart
        // or rejoin: old one down, new one alive): the largest bump is
        // the node as it is now.
        let mut current: BTreeMap<&str, (&Ident, Liveness)> = BTreeMap::new();
        for m in foca.iter_membership_state() {
            let id = m.id();
            if id.node_id.is_empty() {
                continue;
            }
            let newer = current
                .get(id.address.as_str())
                .is_none_or(|(seen, _)| id.bump > seen.bump);
            if newer {
                current.insert(&id.address, (id, liveness(m.state())));
            }
        }
        for (address, (id, state)) in current {
            let previous = known.insert(address.to_string(), (id.clone(), state));
            if previous.as_ref() != Some(&(id.clone(), state)) {
                tracing::info!(peer = %id.node_id, address = %id.address, state = state.as_str(), "peer state changed");
                members.member(id, state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity as _;

    #[test]
    fn a_restarted_node_wins_over_its_old_identity() {
        let old = Ident {
            address: "10.0.0.1:7400".into(),
            node_id: "web-01".into(),
            bump: 100,
        };
        let new = Ident {
            bump: 200,
            ..old.clone()
        };
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
        assert_eq!(old.addr(), new.addr());
        assert_eq!(old.renew().unwrap().bump, 101);
    }
}
