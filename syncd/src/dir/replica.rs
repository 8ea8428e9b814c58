//! A replica directory's policy: the fleet's newest version is the truth.
//! It pulls a newer version from the peers that hold it (diff against the
//! nearest full holder, chunks from several holders at once, applied
//! atomically file by file), and reports local edits instead of
//! publishing them (`syncctl revert` restores the version).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use chunk_store::indexer::{self, ScanReport};
use chunk_store::{Hash, manifest};
use sync_proto::pb;

use super::state::{DirState, Phase, Retry, Source};
use crate::error::SyncError;
use crate::fetch::{Announce, ChunkPeer, FetchConfig, Fetcher, Hold};
use crate::fleet::Holder;
use crate::local::LocalNode;
use crate::locks::LockExt as _;
use crate::materialize::{self, InFlight, LocalChunks};
use crate::peer::{AnyHolder, PeerChunks, RemotePeer};

/// Most peers one transfer fetches from at once (full holders and other
/// receivers of the version).
pub const MAX_SOURCES: usize = 16;
/// How often a transfer looks for peers that started receiving the same
/// version since (they become sources as soon as they have chunks).
const DISCOVER_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// News of peers is looked at no more often than this.
const DISCOVER_GAP: std::time::Duration = std::time::Duration::from_millis(50);
/// Remote manifest nodes kept during one pull (diff and apply), so pages a
/// tree references many times are fetched once.
const NODE_CACHE_BYTES: usize = 64 << 20;

/// What a finished scan means on a replica: content that differs from
/// the version it holds is a local edit, reported, never published.
pub(super) fn scanned(node: &LocalNode, dir: &DirState, report: &ScanReport) {
    match dir.current() {
        Some(v) if v.root != report.root.as_bytes() => {
            tracing::warn!(dir = %dir.id, path = %dir.path.display(), holds = v.version, "local edits on a replica: its content differs from the version it received");
            dir.set_error(format!(
                "local edits: the content differs from version {} (syncctl revert {} restores it)",
                v.version, dir.id
            ));
            node.metrics
                .errors
                .with_label_values(&[&dir.id, "local_edits"])
                .inc();
        }
        None => {
            super::accepted::restore(dir, report.root.as_bytes());
            dir.set_phase(Phase::Idle);
        }
        _ => dir.set_phase(Phase::Idle),
    }
}

/// A version newer than what this replica holds, with the peers to get
/// it from: those that failed at it last, then full holders before
/// partial ones, nearest first.
pub(super) fn newer(
    node: &LocalNode,
    dir: &DirState,
    retry: &Retry,
) -> Option<(pb::DirVersion, Vec<Holder>)> {
    let ours = dir.current().map_or(0, |v| v.version);
    let best = node
        .fleet
        .newest(&dir.id)
        .filter(|v| v.version > ours && super::accepted::allows(dir, v))?;
    let mut holders = node.fleet.holders(&best);
    let failed = retry.failed_at(&best);
    holders.sort_by_key(|h| failed.contains(&h.id));
    holders.truncate(MAX_SOURCES);
    Some((best, holders))
}

/// Brings a replica to `version` from the peers that hold it. `involved`
/// collects the peers that took part, for the retry's ordering.
pub(super) fn pull(
    node: &LocalNode,
    dir: &DirState,
    version: &pb::DirVersion,
    holders: &[Holder],
    rt: &tokio::runtime::Handle,
    slot: tokio::sync::OwnedSemaphorePermit,
    involved: &mut HashSet<String>,
) -> Result<(), SyncError> {
    dir.set_phase(Phase::Syncing);
    let started = std::time::Instant::now();
    /// Undoes what a pull advertises and registers, also when it panics:
    /// otherwise the node would keep claiming to be receiving the version.
    struct Cleanup<'a>(&'a LocalNode, &'a DirState);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            self.1.progress.clear();
            self.1.update(|s| s.pulling = None);
            self.0.end_transfer(&self.1.id);
        }
    }
    let cleanup = Cleanup(node, dir);
    let mut list = Vec::new();
    let result = transfer(node, dir, version, holders, rt, slot, started, &mut list);
    if result.is_ok() {
        // Held before the transfer's have-log goes: a receiver following
        // it then sees "complete", never "gone".
        dir.update(|s| {
            s.current = Some(version.clone());
            s.phase = Phase::Idle;
            s.reason.clear();
        });
    }
    drop(cleanup);
    involved.extend(list);
    match &result {
        Ok(()) => {
            node.metrics
                .sync_duration
                .with_label_values(&[&dir.id])
                .observe(started.elapsed().as_secs_f64());
            dir.synced.send_replace(Some(version.clone()));
        }
        Err(e) => {
            dir.set_error(format!("syncing version {}: {e}", version.version));
            node.metrics
                .errors
                .with_label_values(&[&dir.id, "sync"])
                .inc();
        }
    }
    result
}

/// Bytes of free space a diff needs on the directory's file system:
/// every added file in full, the growth of modified ones, and room for the
/// largest temp copy of a modified file while its old version still
/// exists (removals only free space at the end).
fn space_needed(diff: &manifest::Diff) -> u64 {
    let size = |m: &Option<manifest::EntryMeta>| match m {
        Some(manifest::EntryMeta::File { size, .. }) => *size,
        _ => 0,
    };
    let (mut total, mut temp) = (0u64, 0u64);
    for c in &diff.changes {
        let (old, new) = (size(&c.local), size(&c.remote));
        match c.kind {
            manifest::ChangeKind::Added => total = total.saturating_add(new),
            manifest::ChangeKind::Modified => {
                total = total.saturating_add(new.saturating_sub(old));
                temp = temp.max(new.min(old));
            }
            manifest::ChangeKind::Removed => {}
        }
    }
    total.saturating_add(temp)
}

/// Free bytes for unprivileged writers on the file system holding `path`.
fn free_space(path: &std::path::Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Checks what a diff would apply against the directory's policy: file
/// sizes and set-id bits. Errors name the path and the peer.
fn check_changes(dir: &DirState, diff: &manifest::Diff, peer: &str) -> Result<(), SyncError> {
    for c in &diff.changes {
        if let Some(manifest::EntryMeta::File { mode, size, .. }) = &c.remote {
            if *size > dir.limits.max_file_size {
                return Err(SyncError::Policy(format!(
                    "{:?} from peer {peer} is {size} bytes, more than max_file_size ({} bytes) of {:?}",
                    c.path, dir.limits.max_file_size, dir.id
                )));
            }
            if !dir.limits.allow_setid && mode & indexer::SETID_BITS != 0 {
                return Err(SyncError::Policy(format!(
                    "{:?} from peer {peer} has mode {mode:o} with set-user-id/set-group-id bits, \
                     which directory {:?} does not allow (allow_setid = true in its dirs.d file)",
                    c.path, dir.id
                )));
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn transfer(
    node: &LocalNode,
    dir: &DirState,
    version: &pb::DirVersion,
    holders: &[Holder],
    rt: &tokio::runtime::Handle,
    slot: tokio::sync::OwnedSemaphorePermit,
    started: std::time::Instant,
    involved: &mut Vec<String>,
) -> Result<(), SyncError> {
    let publisher = &version.publisher;
    let remote_root = Hash::from_slice(&version.root).ok_or_else(|| {
        SyncError::peer(
            publisher,
            format!("version {} of {:?}", version.version, dir.id),
            "root is not 32 bytes",
        )
    })?;
    if version.entries > dir.limits.max_entries {
        return Err(SyncError::Policy(format!(
            "version {} of {:?} (publisher {publisher}) declares {} entries, more than max_entries ({})",
            version.version, dir.id, version.entries, dir.limits.max_entries
        )));
    }
    // From here on nothing below this version is taken, across restarts.
    super::accepted::accept(node, dir, version)?;
    let scanning = || format!("scanning directory {:?} at {}", dir.id, dir.path.display());
    let local = node
        .scan(&dir.id, &dir.path, dir.scan_options())
        .map_err(|e| SyncError::store(scanning(), None, e))?;
    let peers: Vec<RemotePeer> = holders
        .iter()
        .map(|h| {
            RemotePeer::new(
                h.id.clone(),
                h.address.clone(),
                node.fleet.clone(),
                rt.clone(),
            )
            .reading(&dir.id)
        })
        .collect();
    // The manifest comes from the full holders, nearest first: any of
    // them will do (nodes are checked against their ids), so one that
    // withholds or corrupts it is passed over.
    let full: Vec<&RemotePeer> = peers
        .iter()
        .zip(holders)
        .filter(|(_, h)| !h.partial)
        .map(|(p, _)| p)
        .collect();
    if full.is_empty() {
        return Err(SyncError::Local(format!(
            "no live peer holds version {} of {:?}",
            version.version, dir.id
        )));
    }
    let any = AnyHolder::new(full);
    let store = &node.store;
    let min_chunk = store.chunker().min();
    // Pages may repeat (the tree is a DAG): each distinct node is fetched
    // once, and the walk is bounded by what the version declares.
    let remote = manifest::CachedNodes::new(&any, NODE_CACHE_BYTES);
    // What the version declares, but never more bytes than could be on
    // this disk once applied (what is here now plus the free space): a
    // peer declaring 2^64 bytes gets no larger a budget than that.
    let free = free_space(&dir.path)
        .map_err(|e| SyncError::fs(&dir.path, "free space on its file system", e))?;
    let room = local
        .bytes
        .saturating_add(free.saturating_sub(dir.limits.min_free_space));
    let limits = manifest::DiffLimits::declared(version.entries, version.bytes, min_chunk)
        .on_disk(room, min_chunk);
    let mut probe = store.chunk_probe();
    let diff = manifest::diff_limited(
        &**store,
        Some(local.root),
        &remote,
        Some(remote_root),
        &mut |h| probe.has(h),
        limits,
    );
    // Who served the manifest, and who was passed over (tried last on a
    // retry).
    involved.push(any.current().to_string());
    involved.extend(any.failed().into_iter().map(|(id, _)| id));
    for (id, why) in any.lied() {
        node.fleet.demote_holder(
            &id,
            version,
            &format!("version {} of {:?}: {why}", version.version, dir.id),
        );
    }
    let diff = diff.map_err(|e| {
        let passed: Vec<String> = any
            .failed()
            .into_iter()
            .map(|(id, why)| format!("{id}: {why}"))
            .collect();
        let context = if passed.is_empty() {
            format!("diff of {:?} against peer {}", dir.id, any.current())
        } else {
            format!(
                "diff of {:?} (holders passed over: {})",
                dir.id,
                passed.join("; ")
            )
        };
        SyncError::store(context, Some(any.current()), e)
    })?;
    drop(probe);
    let first = any.current().to_string();
    check_changes(dir, &diff, &first)?;
    let needed = space_needed(&diff);
    if needed.saturating_add(dir.limits.min_free_space) > free {
        return Err(SyncError::Policy(format!(
            "version {} of {:?} from peer {} does not fit: it needs {needed} bytes of free space on \
             the file system of {}, which has {free} free and keeps {} (min_free_space)",
            version.version,
            dir.id,
            first,
            dir.path.display(),
            dir.limits.min_free_space
        )));
    }
    let diffed = started.elapsed();
    let p = &dir.progress;
    p.bytes_total.store(
        diff.missing_chunks.iter().map(|c| u64::from(c.len)).sum(),
        Ordering::Relaxed,
    );
    p.files_total.store(
        diff.changes
            .iter()
            .filter(|c| matches!(c.remote, Some(manifest::EntryMeta::File { .. })))
            .count() as u64,
        Ordering::Relaxed,
    );
    p.files_done.store(0, Ordering::Relaxed);
    p.received_at_start
        .store(p.received.load(Ordering::Relaxed), Ordering::Relaxed);
    // This transfer's written chunks, served to peers until the index
    // takes over (removed by the pull's cleanup).
    let in_flight = Arc::new(InFlight::default());
    node.begin_transfer(&dir.id, in_flight.clone());
    // Advertised (and pushed) once peers can fetch what is written.
    dir.update(|s| s.pulling = Some(version.clone()));
    let local_chunks = LocalChunks::new(store, node.roots());
    // What arrives is announced to other receivers and served to them
    // from memory at once.
    let log = node.begin_haves(&dir.id, remote_root);
    let announce: Announce = Arc::new(move |chunks| log.add(chunks));
    let cfg = FetchConfig {
        seed: node.env.seed(),
        ..FetchConfig::default()
    };
    let gate = Arc::new(node.bandwidth.transfer(&dir.bandwidth));
    gate.hold_slot(slot, node.transfer_slots.clone());
    let fetcher = Arc::new(Fetcher::new(
        rt,
        &diff.missing_chunks,
        cfg,
        p.received.clone(),
        Some(announce),
        Some(Hold {
            gate: gate.clone(),
            stopping: dir.stopping.clone(),
        }),
    ));
    let source = |p: &RemotePeer| -> Arc<dyn ChunkPeer> {
        Arc::new(PeerChunks {
            peer: p.clone(),
            dir: dir.id.clone(),
            root: version.root.clone(),
            requester: node.id.clone(),
        })
    };
    for (p, h) in peers.iter().zip(holders) {
        fetcher.add_peer_at(source(p), !h.partial, h.class as u8);
    }
    let (k, r) = rack_share(&node.id, holders);
    fetcher.set_rack_share(k, r);
    let discovery = Discovery(rt.spawn(discover(
        Arc::downgrade(&fetcher),
        p.sources.clone(),
        node.fleet.clone(),
        node.id.clone(),
        dir.id.clone(),
        version.clone(),
        rt.clone(),
    )));
    let applied = materialize::apply(
        &dir.path,
        &diff,
        &remote,
        &[&local_chunks, &*in_flight, &*fetcher],
        &in_flight,
        &p.files_done,
        materialize::ApplyOptions {
            min_chunk,
            allow_setid: dir.limits.allow_setid,
            stop: Some(dir.stopping.clone()),
        },
    );
    drop(discovery);
    // Downloads are over (the rescan below can take a while): lower
    // priorities need not give way any more.
    gate.finish();
    involved.extend(fetcher.failed_peers());
    // Account what arrived, whether or not the apply completed.
    for ((id, bytes), chunks) in fetcher
        .received_by_peer()
        .into_iter()
        .zip(fetcher.chunks_by_peer())
    {
        let class = node.fleet.class_of(&id);
        node.fleet.add_traffic(&id, 0, bytes);
        let labels = [dir.id.as_str(), class.as_str()];
        node.metrics
            .received_bytes
            .with_label_values(&labels)
            .inc_by(bytes);
        node.metrics
            .received_chunks
            .with_label_values(&labels)
            .inc_by(chunks);
    }
    let mut report = applied.map_err(|source| {
        let from: Vec<&str> = holders.iter().map(|h| h.id.as_str()).collect();
        SyncError::Apply {
            context: format!(
                "materializing {:?} version {} from peer{} {}",
                dir.id,
                version.version,
                if from.len() == 1 { "" } else { "s" },
                from.join(", ")
            ),
            source,
        }
    })?;
    let (m, id) = (&node.metrics, [dir.id.as_str()]);
    m.files_materialized
        .with_label_values(&id)
        .inc_by(report.files_written);
    m.reused_chunks
        .with_label_values(&id)
        .inc_by(report.reused_chunks);
    if report.corrupt_chunks > 0 {
        node.metrics
            .errors
            .with_label_values(&[&dir.id, "corrupt_chunk"])
            .inc_by(report.corrupt_chunks);
    }
    let applied_at = started.elapsed();
    // Files just written are recorded from what was written, not read
    // again; anything touched since is read as usual.
    let opts = indexer::ScanOptions {
        known: std::mem::take(&mut report.known),
        ..dir.scan_options()
    };
    let after = node
        .scan(&dir.id, &dir.path, opts)
        .map_err(|e| SyncError::store(scanning(), None, e))?;
    if after.root != remote_root {
        return Err(SyncError::Local(format!(
            "after applying version {} of {:?} the root is {}, expected {}",
            version.version, dir.id, after.root, remote_root
        )));
    }
    tracing::info!(
        dir = %dir.id,
        version = version.version,
        files = report.files_written,
        bytes = report.bytes_written,
        removed = report.removed,
        received_bytes = fetcher.received(),
        from = ?fetcher.received_by_peer(),
        nodes_visited = diff.nodes_visited,
        stalled_s = fetcher.stalled().as_secs_f64(),
        fetched_s = fetcher.done_at().map_or(0.0, |t| (t - started).as_secs_f64()),
        diff_s = diffed.as_secs_f64(),
        apply_s = (applied_at - diffed).as_secs_f64(),
        total_s = started.elapsed().as_secs_f64(),
        "applied version"
    );
    Ok(())
}

/// This node's place among the receivers of a version in its rack (by
/// id, itself included), and how many there are.
fn rack_share(me: &str, holders: &[Holder]) -> (u64, u64) {
    let mut mates: Vec<&str> = holders
        .iter()
        .filter(|h| h.partial && h.class == crate::topology::PeerClass::SameRack)
        .map(|h| h.id.as_str())
        .chain(std::iter::once(me))
        .collect();
    mates.sort_unstable();
    mates.dedup();
    let k = mates.iter().position(|m| *m == me).unwrap_or(0);
    (k as u64, mates.len() as u64)
}

/// Stops a transfer's discovery when the transfer ends, however it ends.
struct Discovery(tokio::task::JoinHandle<()>);

impl Drop for Discovery {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Adds the peers that start receiving (or come to hold) `version` while
/// the transfer runs, up to [`MAX_SOURCES`].
async fn discover(
    fetcher: std::sync::Weak<Fetcher>,
    sources: Arc<std::sync::Mutex<Vec<Source>>>,
    fleet: Arc<crate::fleet::FleetView>,
    me: String,
    dir: String,
    version: pb::DirVersion,
    rt: tokio::runtime::Handle,
) {
    loop {
        if let Some(f) = fetcher.upgrade() {
            // For `syncctl status`: who feeds this transfer, how much.
            *sources.locked() = f
                .sources()
                .into_iter()
                .map(|(id, full, bytes)| Source { id, full, bytes })
                .collect();
        }
        // Woken by news (a peer starts receiving the version, or comes to
        // hold it), so receivers start feeding each other within a round
        // trip rather than a second; bursts of news coalesce.
        let learned = fleet.learned.notified();
        tokio::pin!(learned);
        learned.as_mut().enable();
        tokio::select! {
            _ = learned => tokio::time::sleep(DISCOVER_GAP).await,
            _ = tokio::time::sleep(DISCOVER_EVERY) => {}
        }
        let Some(f) = fetcher.upgrade() else { return };
        let holders = fleet.holders(&version);
        let (k, r) = rack_share(&me, &holders);
        f.set_rack_share(k, r);
        let known: HashSet<String> = f.peer_names().into_iter().collect();
        let room = MAX_SOURCES.saturating_sub(known.len());
        for h in holders
            .into_iter()
            .filter(|h| h.id != me && !known.contains(&h.id))
            .take(room)
        {
            tracing::debug!(dir = %dir, peer = %h.id, partial = h.partial, "a peer joins this transfer");
            let peer = RemotePeer::new(h.id.clone(), h.address.clone(), fleet.clone(), rt.clone());
            f.add_peer_at(
                Arc::new(PeerChunks {
                    peer,
                    dir: dir.clone(),
                    root: version.root.clone(),
                    requester: me.clone(),
                }),
                !h.partial,
                h.class as u8,
            );
        }
    }
}
