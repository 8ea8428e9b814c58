//! Whole nodes in one process: each with its own index (RocksDB in its
//! sandbox), directory actors, peer service, gossip and SWIM, reached over
//! a [`MemNet`]. A node can be crashed (no goodbye, work abandoned at the
//! next file boundary) and restarted from what its sandbox holds.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chunk_store::ChunkerConfig;
use chunk_store::store::Store;

use crate::config::DirFile;
use crate::dir::{self, DirHandle, DirState, Registry, Running};
use crate::env::Env;
use crate::fleet::{FleetView, Ident, Swim};
use crate::local::LocalNode;
use crate::locks::RwLockExt as _;
use crate::metrics::Metrics;
use crate::peer::PeerService;
use crate::transport::mem::MemNet;

/// One directory of a simulated node.
#[derive(Debug, Clone)]
pub struct DirSpec {
    pub id: String,
    /// `source` or `replica`.
    pub mode: String,
}

/// How to (re)start a node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: String,
    pub address: String,
    /// Everything the node writes lives beneath this.
    pub sandbox: PathBuf,
    pub bootstrap: Vec<String>,
    pub dirs: Vec<DirSpec>,
    pub seed: u64,
    /// Bandwidth caps (`[limits]`), on the simulated clock.
    pub caps: crate::bandwidth::Caps,
}

impl NodeSpec {
    /// Where directory `id`'s root is.
    pub fn root(&self, id: &str) -> PathBuf {
        self.sandbox.join("data").join(id)
    }
}

#[derive(Debug)]
pub struct SimNode {
    pub spec: NodeSpec,
    pub node: Arc<LocalNode>,
    pub dirs: Arc<Registry>,
    running: HashMap<String, Running>,
    tasks: tokio::task::JoinSet<()>,
    net: Arc<MemNet>,
}

impl SimNode {
    /// Starts node `spec` on `net`; `incarnation` must grow with each
    /// restart (a real node uses its start time).
    pub async fn start(
        net: &Arc<MemNet>,
        spec: NodeSpec,
        incarnation: u64,
    ) -> Result<SimNode, String> {
        let store = open_store(&spec.sandbox.join("index")).await?;
        let env = Arc::new(Env::simulated(spec.seed.wrapping_add(incarnation << 32)));
        let fleet = Arc::new(FleetView::new(
            spec.id.clone(),
            spec.address.clone(),
            BTreeMap::new(),
            incarnation,
            spec.bootstrap.clone(),
            Arc::new(net.transport(&spec.address)),
            env,
            Metrics::new().map_err(|e| e.to_string())?,
        ));
        let node = Arc::new(LocalNode::new(store, fleet.clone()).with_caps(spec.caps));
        let dirs = Arc::new(Registry::default());
        let mut pending = Vec::new();
        for d in &spec.dirs {
            let root = spec.root(&d.id);
            std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
            let file: DirFile = toml::from_str(&format!(
                "id = \"{}\"\npath = \"{}\"\nmode = \"{}\"\nmin_free_space = \"0\"\n",
                d.id,
                root.display(),
                d.mode
            ))
            .map_err(|e| e.to_string())?;
            let mut state = DirState::from_config(&d.id, &file, fleet.clone())?;
            // File events come at real times, not simulated ones: the
            // script rescans instead.
            state.watch = false;
            let p = dir::create(&node, state);
            dirs.write_locked().insert(d.id.clone(), p.handle.clone());
            dir::prepare(&node, &p).await;
            pending.push(p);
        }
        net.listen(&spec.address, Arc::new(PeerService::new(node.clone())));
        let swim = Swim::start(
            Ident {
                address: spec.address.clone(),
                node_id: spec.id.clone(),
                bump: incarnation,
            },
            spec.bootstrap.clone(),
            fleet.clone(),
            fleet.transport.clone(),
            fleet.env.fork(),
        );
        fleet.swim.set(swim).expect("set once");
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(crate::fleet::gossip::run(fleet.clone()));
        {
            let (node, dirs) = (node.clone(), dirs.clone());
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    node.fleet.forget_dead();
                    for h in dir::handles(&dirs) {
                        h.state.progress.tick_rate();
                        h.state.announce();
                    }
                    node.fleet.tick();
                }
            });
        }
        let mut running = HashMap::new();
        for p in pending {
            let r = dir::start(&node, p);
            running.insert(r.handle.id().to_string(), r);
        }
        Ok(SimNode {
            spec,
            node,
            dirs,
            running,
            tasks,
            net: net.clone(),
        })
    }

    pub fn handle(&self, dir: &str) -> Option<DirHandle> {
        self.dirs.read_locked().get(dir).cloned()
    }

    /// Stops the node without a goodbye: unreachable at once, its work
    /// abandoned at the next file boundary. Returns its spec for a
    /// restart once its index is closed.
    pub async fn crash(mut self) -> NodeSpec {
        self.net.unlisten(&self.spec.address);
        if let Some(s) = self.node.fleet.swim.get() {
            s.abort();
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        for r in self.running.values() {
            r.handle.state.stop_now();
        }
        for (_, r) in self.running.drain() {
            r.stop(tokio::time::Instant::now()).await;
        }
        let spec = self.spec.clone();
        self.close().await;
        spec
    }

    /// Stops the node in order (directories, SWIM goodbye, gossip).
    pub async fn stop(mut self) -> NodeSpec {
        for (_, r) in self.running.drain() {
            r.stop(tokio::time::Instant::now() + Duration::from_secs(20))
                .await;
        }
        if let Some(s) = self.node.fleet.swim.get() {
            let _ = tokio::time::timeout(Duration::from_secs(2), s.leave()).await;
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.net.unlisten(&self.spec.address);
        let spec = self.spec.clone();
        self.close().await;
        spec
    }

    /// Waits until nothing holds the index any more (blocking work of
    /// abandoned directories ends at its next file boundary).
    async fn close(self) {
        let store = self.node.store.clone();
        drop(self);
        let mut store = store;
        loop {
            match Arc::try_unwrap(store) {
                Ok(s) => {
                    drop(s);
                    return;
                }
                Err(s) => {
                    store = s;
                    // Blocking work holds the paused clock still, so this
                    // sleep ends only once it has made progress.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// Opens an index, waiting out the lock of a previous incarnation whose
/// last references are still being dropped.
async fn open_store(path: &Path) -> Result<Arc<Store>, String> {
    let mut tries = 0;
    loop {
        match Store::open(path, ChunkerConfig::default()) {
            Ok(s) => return Ok(Arc::new(s)),
            Err(e) if tries < 100 => {
                tries += 1;
                tracing::debug!(error = %e, "index still locked; waiting");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(format!("opening {}: {e}", path.display())),
        }
    }
}
