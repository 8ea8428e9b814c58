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

use anyhow::Context as _;
use sync_proto::admin as pba;
use tokio::net::UnixListener;
use tonic::{Request, Response, Status};

use sync_proto::pb;

use crate::dir::{DirHandle, Phase, Registry};
use crate::fleet::PeerState;
use crate::local::LocalNode;
use crate::locks::LockExt as _;
use crate::topology::PeerClass;
pub use crate::wire::hex;

/// The group allowed to use the socket besides root.
pub const ADMIN_GROUP: &str = "syncd";

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
pub async fn serve(
    listener: UnixListener,
    node: Arc<LocalNode>,
    dirs: Arc<Registry>,
) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(pba::admin_server::AdminServer::new(AdminService {
            node,
            dirs,
        }))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
        .context("admin service")
}

#[derive(Debug)]
struct AdminService {
    node: Arc<LocalNode>,
    dirs: Arc<Registry>,
}

/// Fleet view of one directory.
struct Fleet {
    version: u64,
    root: Vec<u8>,
    at_version: u32,
    carrying: u32,
    peers: Vec<pba::PeerVersion>,
}

fn fleet_of(peers: &[(String, PeerState)], dir: &str, newest: Option<pb::DirVersion>) -> Fleet {
    let (version, root) = newest.map(|v| (v.version, v.root)).unwrap_or_default();
    let mut f = Fleet {
        version,
        root,
        at_version: 0,
        carrying: 0,
        peers: Vec::new(),
    };
    for (id, p) in peers.iter().filter(|(_, p)| p.live()) {
        let held = p.held(dir);
        if held.is_none() && p.pulling(dir).is_none() {
            continue;
        }
        f.carrying += 1;
        if held.is_some_and(|v| v.version == f.version && v.root == f.root) {
            f.at_version += 1;
        }
        f.peers.push(pba::PeerVersion {
            node_id: id.clone(),
            version: held.map_or(0, |v| v.version),
            state: p.liveness().as_str().into(),
        });
    }
    f
}

fn dir_status(node: &LocalNode, peers: &[(String, PeerState)], d: &DirHandle) -> pba::DirStatus {
    let dir = &d.state;
    let status = d.status();
    let current = status.current.clone();
    let fleet = fleet_of(peers, &dir.id, node.fleet.newest(&dir.id));
    pba::DirStatus {
        id: dir.id.clone(),
        path: dir.path.display().to_string(),
        mode: crate::dir::state::mode_name(dir.mode).into(),
        state: status.state_name().into(),
        reason: if status.phase == Phase::Error {
            status.reason.clone()
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
        rate_bytes_per_second: dir.progress.rate(),
        last_error: status.last_error.clone(),
        peers: fleet.peers,
        retry_in_seconds: status.retry_in(),
        failures: status.failures,
        priority: dir.bandwidth.control().priority.as_str().into(),
        upload_cap: dir.bandwidth.caps().upload.unwrap_or(0),
        download_cap: dir.bandwidth.caps().download.unwrap_or(0),
        sources: dir
            .progress
            .sources
            .locked()
            .iter()
            .map(|s| pba::TransferSource {
                node_id: s.id.clone(),
                full: s.full,
                bytes: s.bytes,
            })
            .collect(),
        eta_seconds: dir.progress.eta_seconds(),
        control: dir.own().report.control,
    }
}

fn peer_counts(node: &LocalNode) -> pba::PeerCounts {
    let (alive, suspect, dead) = node.fleet.counts();
    pba::PeerCounts {
        alive,
        suspect,
        dead,
    }
}

/// Brings the state gauges up to date (before each scrape).
pub fn refresh_metrics(node: &LocalNode, dirs: &Registry) {
    let m = &node.metrics;
    let caps = node.bandwidth.caps();
    let waited = node.bandwidth.take_waited();
    for (i, (direction, cap)) in [("upload", caps.upload), ("download", caps.download)]
        .into_iter()
        .enumerate()
    {
        m.bandwidth_cap
            .with_label_values(&[direction])
            .set(i64::try_from(cap.unwrap_or(0)).unwrap_or(i64::MAX));
        m.bandwidth_wait
            .with_label_values(&[direction])
            .inc_by(waited[i].as_secs_f64());
    }
    let c = peer_counts(node);
    for (state, n) in [("alive", c.alive), ("suspect", c.suspect), ("dead", c.dead)] {
        m.peers.with_label_values(&[state]).set(i64::from(n));
    }
    let peers = node.fleet.peers();
    for d in crate::dir::handles(dirs) {
        let s = dir_status(node, &peers, &d);
        let id = [d.id()];
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
        let full = s.sources.iter().filter(|x| x.full).count();
        for (kind, n) in [("full", full), ("receiving", s.sources.len() - full)] {
            m.transfer_sources
                .with_label_values(&[d.id(), kind])
                .set(n as i64);
        }
        for name in crate::wire::STATES {
            m.dir_state
                .with_label_values(&[d.id(), name])
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
        let peers = node.fleet.peers();
        Ok(Response::new(pba::StatusReply {
            node_id: node.id.clone(),
            syncd_version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: node.started.elapsed().as_secs(),
            peers: Some(peer_counts(node)),
            dirs: crate::dir::handles(&self.dirs)
                .iter()
                .map(|d| dir_status(node, &peers, d))
                .collect(),
            upload_cap: node.bandwidth.caps().upload.unwrap_or(0),
            download_cap: node.bandwidth.caps().download.unwrap_or(0),
            tls: node.fleet.tls().is_some(),
            certificate_days: node.fleet.tls().map_or(0.0, |t| t.days_left()),
        }))
    }

    async fn peers(
        &self,
        _: Request<pba::PeersRequest>,
    ) -> Result<Response<pba::PeersReply>, Status> {
        let node = &self.node;
        let out: Vec<pba::PeerInfo> = node
            .fleet
            .peers()
            .into_iter()
            .map(|(id, p)| {
                let mut holds: Vec<pba::HeldVersion> = p
                    .record
                    .iter()
                    .flat_map(|r| r.dirs.iter())
                    .map(|v| pba::HeldVersion {
                        dir: v.dir.clone(),
                        version: v.version,
                        root: hex(&v.root),
                    })
                    .collect();
                holds.sort_by(|a, b| a.dir.cmp(&b.dir));
                pba::PeerInfo {
                    node_id: id,
                    address: p.address.clone(),
                    labels: p.labels.clone().into_iter().collect(),
                    class: PeerClass::of(&node.fleet.labels, &p.labels).as_str().into(),
                    state: p.liveness().as_str().into(),
                    rtt_ms: p.rtt_ms,
                    bytes_sent: p.bytes_sent,
                    bytes_received: p.bytes_received,
                    holds,
                    corrupt_chunks: p.corrupt_chunks,
                    demoted: p.demoted_for().unwrap_or_default().into(),
                }
            })
            .collect();
        Ok(Response::new(pba::PeersReply { peers: out }))
    }

    async fn fleet(
        &self,
        req: Request<pba::FleetRequest>,
    ) -> Result<Response<pba::FleetReply>, Status> {
        let want = req.into_inner().dir;
        if !want.is_empty() && !crate::wire::is_id(&want) {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a directory id",
                crate::wire::short(&want)
            )));
        }
        let view = &self.node.fleet;
        let mut rows: Vec<(String, String, Arc<pb::Holdings>)> =
            vec![(view.id.clone(), "self".into(), view.own_record())];
        for (id, p) in view.peers() {
            if let Some(r) = &p.record {
                rows.push((id, p.liveness().as_str().into(), r.clone()));
            }
        }
        let mut newest: BTreeMap<String, u64> = BTreeMap::new();
        for (_, _, r) in &rows {
            for v in &r.dirs {
                let n = newest.entry(v.dir.clone()).or_default();
                *n = (*n).max(v.version);
            }
        }
        let mut nodes: Vec<pba::FleetNode> = rows
            .into_iter()
            .filter_map(|(id, state, r)| {
                let member = r.from.clone().unwrap_or_default();
                let dirs: Vec<pba::FleetDir> = r
                    .reports
                    .iter()
                    .filter(|rep| want.is_empty() || rep.dir == want)
                    .map(|rep| {
                        let find = |l: &[pb::DirVersion]| {
                            l.iter().find(|v| v.dir == rep.dir).map_or(0, |v| v.version)
                        };
                        let version = find(&r.dirs);
                        let fleet_version = newest.get(&rep.dir).copied().unwrap_or(0);
                        pba::FleetDir {
                            dir: rep.dir.clone(),
                            mode: rep.mode.clone(),
                            state: rep.state.clone(),
                            version,
                            fleet_version,
                            lag: fleet_version.saturating_sub(version),
                            rate_bytes_per_second: rep.rate,
                            pending_bytes: rep.pending_bytes,
                            last_error: rep.last_error.clone(),
                            pulling: find(&r.pulling),
                            control: rep.control.clone(),
                        }
                    })
                    .collect();
                (want.is_empty() || !dirs.is_empty()).then_some(pba::FleetNode {
                    node_id: id,
                    address: member.address,
                    labels: member.labels,
                    state,
                    dirs,
                })
            })
            .collect();
        let label = |n: &pba::FleetNode, k: &str| n.labels.get(k).cloned().unwrap_or_default();
        nodes.sort_by(|a, b| {
            (label(a, "region"), label(a, "zone"), &a.node_id).cmp(&(
                label(b, "region"),
                label(b, "zone"),
                &b.node_id,
            ))
        });
        let controls = view
            .controls()
            .into_iter()
            .filter(|c| want.is_empty() || c.dir == want)
            .map(|c| pba::FleetControl {
                time: crate::fleet::controls::signed_at(&c),
                dir: c.dir,
                action: c.action,
                priority: c.priority,
                operator: c.operator,
            })
            .collect();
        Ok(Response::new(pba::FleetReply {
            node_id: view.id.clone(),
            nodes,
            controls,
        }))
    }

    async fn control(
        &self,
        req: Request<pba::ControlRequest>,
    ) -> Result<Response<pba::ControlReply>, Status> {
        let r = req.into_inner();
        if !r.controls.is_empty() {
            return self.fleet_control(r).await;
        }
        let all = crate::dir::handles(&self.dirs);
        let dirs: Vec<DirHandle> = if r.all {
            all
        } else {
            if r.dirs.is_empty() {
                return Err(Status::invalid_argument("name a directory or use --all"));
            }
            let known: BTreeMap<String, DirHandle> =
                all.into_iter().map(|d| (d.id().to_string(), d)).collect();
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
                "pause" => d.pause(),
                "resume" => d.resume(),
                "rescan" => {
                    // Synchronous: when the call returns, what is on disk
                    // now is the version this node holds (on a source, the
                    // version it publishes), so `syncctl wait` can follow.
                    d.rescan().await.map_err(Status::failed_precondition)?;
                }
                "revert" => d.revert().map_err(Status::failed_precondition)?,
                "priority" => d.set_priority(r.priority.parse().map_err(Status::invalid_argument)?),
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown action {other:?}; expected pause, resume, rescan, revert or priority"
                    )));
                }
            }
        }
        Ok(Response::new(pba::ControlReply {
            affected: dirs.iter().map(|d| d.id().to_string()).collect(),
        }))
    }
}

impl AdminService {
    /// `syncctl pause|resume|priority DIR --fleet`: controls signed by an
    /// operator, checked and published to the fleet; applied here at once
    /// if this node carries the directory.
    async fn fleet_control(
        &self,
        r: pba::ControlRequest,
    ) -> Result<Response<pba::ControlReply>, Status> {
        let fleet = &self.node.fleet;
        let mut affected = Vec::new();
        for c in r.controls {
            let dir = c.dir.clone();
            fleet
                .publish_control(c, r.operator_certificate.clone())
                .map_err(|e| {
                    tracing::warn!(dir = %crate::wire::short(&dir), "refused a fleet control from syncctl: {e}");
                    Status::failed_precondition(format!("fleet control of {dir:?}: {e}"))
                })?;
            if let Some(h) = crate::dir::handles(&self.dirs)
                .into_iter()
                .find(|h| h.id() == dir)
            {
                h.apply_controls(&fleet.controls_of(&dir));
            }
            affected.push(dir);
        }
        Ok(Response::new(pba::ControlReply { affected }))
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
