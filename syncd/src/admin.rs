//! The admin service on the local Unix socket (`[admin] socket`), used by
//! `syncctl`: status, peers, and control (pause, resume, rescan, revert).
//!
//! Access is the socket's file mode: 0660, so only root and the socket's
//! group may connect. Under the shipped systemd unit the daemon runs as
//! user and group `syncd`, which owns the socket; when run as root, the
//! socket is handed to group `syncd` if that group exists.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use sync_proto::admin as pba;
use tokio::net::UnixListener;
use tonic::{Request, Response, Status};

use crate::config::Mode;
use crate::locks::LockExt as _;
use crate::membership::Liveness;
use crate::node::{DirState, Node, Phase};
use crate::topology::PeerClass;

/// The group allowed to use the socket besides root.
pub const ADMIN_GROUP: &str = "syncd";

/// Lowercase hex, as roots are shown to operators and hooks.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Binds the admin socket: creates its directory, refuses to steal the
/// socket of a running daemon, removes a stale one, and restricts access.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).with_context(|| {
            format!("creating the admin socket's directory {}", parent.display())
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "admin socket {} is in use: is another syncd running with this configuration?",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale admin socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "admin socket path {} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("checking the admin socket {}", path.display()));
        }
    }
    // Bound inside a private (0700) directory beside it, given its mode and
    // group there, then renamed into place: the socket never exists at its
    // path with the umask's mode, and chmod/chown act on a name nobody else
    // can swap for a symlink. (Binding at the path and then chmod-ing left
    // a window with the default mode, and chmod followed symlinks.)
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("admin socket path {} has no file name", path.display()))?;
    let private = parent.join(format!(
        ".{}.{}.new",
        name.to_string_lossy(),
        std::process::id()
    ));
    // A leftover of a crash at this step (remove_dir_all does not follow
    // symlinks).
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("creating {}", private.display()))?;
    let result = (|| {
        let tmp = private.join("sock");
        let listener = UnixListener::bind(&tmp)
            .with_context(|| format!("binding the admin socket {}", path.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("restricting the admin socket {}", path.display()))?;
        if let Some(gid) = group_id(ADMIN_GROUP)
            && let Err(e) = std::os::unix::fs::lchown(&tmp, None, Some(gid))
        {
            tracing::debug!(error = %e, "admin socket left with its default group");
        }
        std::fs::rename(&tmp, path)
            .with_context(|| format!("moving the admin socket into place at {}", path.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir(&private);
    result
}

/// The id of group `name` from /etc/group, if it exists.
fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Serves the admin service on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, node: Arc<Node>) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(pba::admin_server::AdminServer::new(AdminService { node }))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
        .context("admin service")
}

#[derive(Debug)]
struct AdminService {
    node: Arc<Node>,
}

/// Fleet view of one directory.
struct Fleet {
    version: u64,
    root: Vec<u8>,
    at_version: u32,
    carrying: u32,
    peers: Vec<pba::PeerVersion>,
}

fn fleet_of(node: &Node, dir: &DirState) -> Fleet {
    let ours = dir.current_version();
    let mut best = ours
        .as_ref()
        .map(|v| (v.version, v.root.clone()))
        .unwrap_or_default();
    let peers = node.peers.locked();
    let live = || peers.iter().filter(|(_, p)| p.liveness() != Liveness::Down);
    for (_, p) in live() {
        if let Some(v) = p.holdings.get(&dir.id)
            && v.version > best.0
        {
            best = (v.version, v.root.clone());
        }
    }
    let mut f = Fleet {
        version: best.0,
        root: best.1,
        at_version: 0,
        carrying: 0,
        peers: Vec::new(),
    };
    let mut list: Vec<pba::PeerVersion> = Vec::new();
    for (id, p) in live() {
        let held = p.holdings.get(&dir.id);
        if held.is_none() && !p.pulling.contains_key(&dir.id) {
            continue;
        }
        f.carrying += 1;
        let version = held.map_or(0, |v| v.version);
        if held.is_some_and(|v| v.version == f.version && v.root == f.root) {
            f.at_version += 1;
        }
        list.push(pba::PeerVersion {
            node_id: id.clone(),
            version,
            state: p.liveness().as_str().into(),
        });
    }
    list.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    f.peers = list;
    f
}

fn dir_status(node: &Node, dir: &DirState) -> pba::DirStatus {
    let (retry_in_seconds, failures) = {
        let r = dir.retry.locked();
        (r.retry_in(), r.failures)
    };
    let current = dir.current_version();
    let fleet = fleet_of(node, dir);
    let status = dir.status.locked().clone();
    pba::DirStatus {
        id: dir.id.clone(),
        path: dir.path.display().to_string(),
        mode: match dir.mode {
            Mode::Source => "source",
            Mode::Replica => "replica",
            Mode::TwoWay => "two-way",
        }
        .into(),
        state: dir.state_name().into(),
        reason: if status.phase == Phase::Error {
            status.reason
        } else {
            String::new()
        },
        local_version: current.as_ref().map_or(0, |v| v.version),
        local_root: current.as_ref().map(|v| hex(&v.root)).unwrap_or_default(),
        fleet_version: fleet.version,
        fleet_root: hex(&fleet.root),
        peers_at_fleet_version: fleet.at_version,
        peers_carrying: fleet.carrying,
        pending_bytes: dir.progress.pending_bytes(),
        pending_files: dir.progress.pending_files(),
        rate_bytes_per_second: dir.rate.locked().1,
        last_error: status.last_error,
        peers: fleet.peers,
        retry_in_seconds,
        failures,
    }
}

fn peer_counts(node: &Node) -> pba::PeerCounts {
    let mut c = pba::PeerCounts::default();
    for p in node.peers.locked().values() {
        match p.liveness() {
            Liveness::Alive => c.alive += 1,
            Liveness::Suspect => c.suspect += 1,
            Liveness::Down => c.dead += 1,
        }
    }
    c
}

/// Brings the state gauges up to date (before each scrape).
pub fn refresh_metrics(node: &Node) {
    let m = &node.metrics;
    let c = peer_counts(node);
    for (state, n) in [("alive", c.alive), ("suspect", c.suspect), ("dead", c.dead)] {
        m.peers.with_label_values(&[state]).set(i64::from(n));
    }
    for d in node.dir_list() {
        let s = dir_status(node, &d);
        let id = [d.id.as_str()];
        let set = |g: &prometheus::IntGaugeVec, v: u64| {
            g.with_label_values(&id)
                .set(i64::try_from(v).unwrap_or(i64::MAX))
        };
        set(&m.local_version, s.local_version);
        set(&m.fleet_version, s.fleet_version);
        set(
            &m.peers_at_fleet_version,
            u64::from(s.peers_at_fleet_version),
        );
        set(&m.peers_carrying, u64::from(s.peers_carrying));
        set(&m.pending_bytes, s.pending_bytes);
        set(&m.pending_files, s.pending_files);
        set(&m.consecutive_failures, u64::from(s.failures));
        m.transfer_rate
            .with_label_values(&id)
            .set(s.rate_bytes_per_second);
        for name in Phase::ALL_NAMES {
            m.dir_state
                .with_label_values(&[d.id.as_str(), name])
                .set(i64::from(name == s.state));
        }
    }
}

#[tonic::async_trait]
impl pba::admin_server::Admin for AdminService {
    async fn status(
        &self,
        _: Request<pba::StatusRequest>,
    ) -> Result<Response<pba::StatusReply>, Status> {
        let node = &self.node;
        Ok(Response::new(pba::StatusReply {
            node_id: node.id.clone(),
            syncd_version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: node.started.elapsed().as_secs(),
            peers: Some(peer_counts(node)),
            dirs: node
                .dir_list()
                .iter()
                .map(|d| dir_status(node, d))
                .collect(),
        }))
    }

    async fn peers(
        &self,
        _: Request<pba::PeersRequest>,
    ) -> Result<Response<pba::PeersReply>, Status> {
        let node = &self.node;
        let peers = node.peers.locked();
        let mut out: Vec<pba::PeerInfo> = peers
            .iter()
            .map(|(id, p)| {
                let mut holds: Vec<pba::HeldVersion> = p
                    .holdings
                    .values()
                    .map(|v| pba::HeldVersion {
                        dir: v.dir.clone(),
                        version: v.version,
                        root: hex(&v.root),
                    })
                    .collect();
                holds.sort_by(|a, b| a.dir.cmp(&b.dir));
                pba::PeerInfo {
                    node_id: id.clone(),
                    address: p.address.clone(),
                    labels: p.labels.clone().into_iter().collect(),
                    class: PeerClass::of(&node.labels, &p.labels).as_str().into(),
                    state: p.liveness().as_str().into(),
                    rtt_ms: p.rtt_ms,
                    bytes_sent: p.bytes_sent,
                    bytes_received: p.bytes_received,
                    holds,
                }
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(Response::new(pba::PeersReply { peers: out }))
    }

    async fn control(
        &self,
        req: Request<pba::ControlRequest>,
    ) -> Result<Response<pba::ControlReply>, Status> {
        let r = req.into_inner();
        let node = &self.node;
        let dirs: Vec<Arc<DirState>> = if r.all {
            node.dir_list()
        } else {
            if r.dirs.is_empty() {
                return Err(Status::invalid_argument("name a directory or use --all"));
            }
            let known: BTreeMap<String, Arc<DirState>> = node
                .dir_list()
                .into_iter()
                .map(|d| (d.id.clone(), d))
                .collect();
            r.dirs
                .iter()
                .map(|id| {
                    known.get(id).cloned().ok_or_else(|| {
                        Status::not_found(format!(
                            "unknown directory {id:?}; this node syncs: {}",
                            known.keys().cloned().collect::<Vec<_>>().join(", ")
                        ))
                    })
                })
                .collect::<Result<_, _>>()?
        };
        for d in &dirs {
            match r.action.as_str() {
                "pause" => {
                    d.paused.store(true, Ordering::Relaxed);
                    tracing::info!(dir = %d.id, "paused by syncctl");
                }
                "resume" => {
                    d.paused.store(false, Ordering::Relaxed);
                    d.poke.notify_one();
                    tracing::info!(dir = %d.id, "resumed by syncctl");
                }
                "rescan" => {
                    if d.paused.load(Ordering::Relaxed) {
                        return Err(Status::failed_precondition(format!(
                            "directory {:?} is paused; resume it first",
                            d.id
                        )));
                    }
                    // Synchronous: when the call returns, what is on disk
                    // now is the version this node holds (on a source, the
                    // version it publishes), so `syncctl wait` can follow.
                    let (n, dir) = (node.clone(), d.clone());
                    let changed =
                        tokio::task::spawn_blocking(move || crate::node::rescan(&n, &dir))
                            .await
                            .map_err(|e| Status::internal(e.to_string()))?
                            .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
                    if changed {
                        node.published.notify_one();
                    }
                    // A replica also looks for a newer version now.
                    d.poke.notify_one();
                }
                "revert" => {
                    if d.mode != Mode::Replica {
                        return Err(Status::failed_precondition(format!(
                            "directory {:?} is a {}; revert undoes local edits on replicas",
                            d.id,
                            if d.mode == Mode::Source {
                                "source"
                            } else {
                                "two-way directory"
                            }
                        )));
                    }
                    // Forget the version held: the loop pulls the newest
                    // version again, and the diff against what is on disk
                    // restores every edited, added or deleted file.
                    *d.current.locked() = None;
                    d.poke.notify_one();
                    tracing::info!(dir = %d.id, "revert requested by syncctl");
                }
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown action {other:?}; expected pause, resume, rescan or revert"
                    )));
                }
            }
        }
        Ok(Response::new(pba::ControlReply {
            affected: dirs.iter().map(|d| d.id.clone()).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket appears at its path only by a rename, already 0660: an
    /// inotify watcher on the directory never sees it created there (the
    /// old code bound at the path, then chmod-ed it).
    #[tokio::test]
    async fn the_socket_appears_with_its_mode() {
        use notify::Watcher as _;
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("syncd.sock");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut w = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            let _ = tx.send(e);
        })
        .unwrap();
        w.watch(t.path(), notify::RecursiveMode::NonRecursive)
            .unwrap();
        let _listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // The private directory is gone.
        let names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("syncd.sock")]);
        // A rename into the directory is seen before the watcher stops.
        let mut saw_rename = false;
        while let Ok(Ok(e)) = rx.recv_timeout(std::time::Duration::from_secs(2)) {
            if e.paths.iter().any(|p| p == &path) {
                assert!(
                    !matches!(e.kind, notify::EventKind::Create(_)),
                    "the socket was created at its path: {e:?}"
                );
                if matches!(
                    e.kind,
                    notify::EventKind::Modify(notify::event::ModifyKind::Name(_))
                ) {
                    saw_rename = true;
                    break;
                }
            }
        }
        assert!(saw_rename, "no rename of the socket into place was seen");
    }
}
