//! Fleet views only: `n` nodes that gossip records over a [`MemNet`],
//! membership given as SWIM would report it (or SWIM itself), so a
//! thousand nodes run in one process.

use std::collections::BTreeMap;
use std::sync::Arc;

use sync_proto::pb;

use crate::env::Env;
use crate::fleet::gossip::{self, Options};
use crate::fleet::peer::FleetPeer;
use crate::fleet::{FleetView, Ident, Liveness, Members as _, OwnDir, Via};
use crate::metrics::Metrics;
use crate::transport::mem::MemNet;

/// The directory every simulated node carries.
pub const DIR: &str = "www";

#[derive(Debug)]
pub struct FleetSim {
    pub net: Arc<MemNet>,
    pub views: Vec<Arc<FleetView>>,
    tasks: tokio::task::JoinSet<()>,
}

/// `n` fleet views listening on `net` (node `i` is `n{i}` at
/// [`super::address`]`(i)`, its randomness seeded from `seed` and `i`),
/// each knowing every other as a live member, as SWIM would tell it;
/// nothing held, gossip not running.
pub fn members(net: &Arc<MemNet>, n: usize, seed: u64) -> Vec<Arc<FleetView>> {
    let views: Vec<Arc<FleetView>> = (0..n)
        .map(|i| {
            let address = super::address(i);
            let v = Arc::new(FleetView::new(
                format!("n{i}"),
                address.clone(),
                BTreeMap::new(),
                1,
                vec![],
                Arc::new(net.transport(&address)),
                Arc::new(Env::seeded(
                    seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
                )),
                Metrics::new().expect("metrics"),
            ));
            net.listen(&address, Arc::new(FleetPeer(v.clone())));
            v
        })
        .collect();
    for a in &views {
        for b in &views {
            if a.id != b.id {
                a.member(
                    &Ident {
                        address: b.address.clone(),
                        node_id: b.id.clone(),
                        bump: 1,
                    },
                    Liveness::Alive,
                );
            }
        }
    }
    views
}

impl FleetSim {
    /// `n` views that all know each other as live members, each holding
    /// version `1` of [`DIR`] and every other's record (a converged,
    /// idle fleet). Gossip is not running yet ([`FleetSim::start`]).
    pub fn converged(n: usize, seed: u64) -> FleetSim {
        let net = MemNet::new();
        let views = members(&net, n, seed);
        for v in &views {
            v.set_dir(DIR, own(version(1, 0), "idle"));
            v.take_pushes();
        }
        let records: Vec<pb::Holdings> = views.iter().map(|v| (*v.own_record()).clone()).collect();
        for a in &views {
            for (b, r) in views.iter().zip(&records) {
                if a.id != b.id {
                    a.learn(r.clone(), Via::Relay(&b.id))
                        .expect("a valid record");
                }
            }
            a.take_pushes();
        }
        FleetSim {
            net,
            views,
            tasks: tokio::task::JoinSet::new(),
        }
    }

    /// Starts SWIM on every node (membership then also comes from it;
    /// node 0 is everyone's bootstrap address).
    pub fn start_swim(&mut self) {
        let bootstrap = vec![self.views[0].address.clone()];
        for v in &self.views {
            let swim = crate::fleet::Swim::start(
                Ident {
                    address: v.address.clone(),
                    node_id: v.id.clone(),
                    bump: 1,
                },
                bootstrap.clone(),
                v.clone(),
                v.transport.clone(),
                v.env.fork(),
            );
            let _ = v.swim.set(swim);
        }
    }

    /// SWIM bytes every node sent and received, in all.
    pub fn swim_bytes(&self) -> u64 {
        self.views
            .iter()
            .map(|v| {
                let m = &v.metrics.gossip_bytes;
                m.with_label_values(&["swim", "sent"]).get()
                    + m.with_label_values(&["swim", "received"]).get()
            })
            .sum()
    }

    /// Starts every node's gossip.
    pub fn start(&mut self, opts: Options) {
        for v in &self.views {
            self.tasks.spawn(gossip::run_with(v.clone(), opts));
        }
    }

    /// Node `i` publishes version `v` of [`DIR`].
    pub fn publish(&self, i: usize, v: u64) {
        self.views[i].set_dir(DIR, own(version(v, i), "idle"));
    }

    /// Whether node `i` knows of version `v` (or newer) of [`DIR`].
    pub fn knows(&self, i: usize, v: u64) -> bool {
        self.views[i].seen(DIR) >= v
    }

    /// How many nodes know of version `v` (or newer) of [`DIR`].
    pub fn knowing(&self, v: u64) -> usize {
        self.views
            .iter()
            .filter(|x| x.newest(DIR).is_some_and(|n| n.version >= v))
            .count()
    }

    /// Whether every node's digest is the same.
    pub fn agreed(&self) -> bool {
        let d = self.views[0].digest();
        self.views.iter().all(|v| v.digest() == d)
    }

    /// Gossip bytes (encoded) every node sent and received, in all.
    pub fn gossip_bytes(&self) -> u64 {
        self.views
            .iter()
            .map(|v| {
                let m = &v.metrics.gossip_bytes;
                ["digest", "reconcile", "records", "push", "exchange"]
                    .iter()
                    .flat_map(|k| ["sent", "received"].map(|d| m.with_label_values(&[k, d]).get()))
                    .sum::<u64>()
            })
            .sum()
    }
}

fn version(v: u64, publisher: usize) -> pb::DirVersion {
    pb::DirVersion {
        dir: DIR.into(),
        version: v,
        root: blake3::hash(&v.to_le_bytes()).as_bytes().to_vec(),
        publisher: format!("n{publisher}"),
        entries: 1,
        bytes: 1,
        ..Default::default()
    }
}

fn own(held: pb::DirVersion, state: &str) -> OwnDir {
    OwnDir {
        held: Some(held),
        pulling: None,
        report: pb::DirReport {
            dir: DIR.into(),
            state: state.into(),
            mode: "replica".into(),
            ..Default::default()
        },
    }
}
