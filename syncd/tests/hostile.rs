//! A hostile peer against real daemons: the "day-one defects" issue, one
//! test per item, each driving real `syncd run` processes.
//!
//! The fake peer ("evil") is a tonic server in the test process that
//! speaks the real protocol (`sync_proto::pb`) from a state the test edits
//! while it runs: the versions it announces, the manifest nodes and chunk
//! bytes it serves (which may be anything: nodes the builder would never
//! make, chunks that lie about their length), and counters of the calls it
//! receives. A replica is started with the fake as its only bootstrap peer;
//! it learns the fake's record through its own `Exchange` calls, one per
//! gossip round (the fake is a bootstrap address SWIM never confirms).
//! Where the attack is on the serving side, the test is the client.
//!
//! | test                 | issue item                                   |
//! |----------------------|----------------------------------------------|
//! | `panic_manifest`     | 2: a peer's path panicked the diff, under a lock |
//! | `chunk_length_lie`   | 3: allocation by a peer's declared length   |
//! | `shared_subtrees`    | 4: shared subtrees (a DAG walked as a tree) |
//! | `disk_fill`          | 5: a version that cannot fit on the disk    |
//! | `retry_backoff`      | 6: retry storms                             |
//! | `serving_limits`     | 7: the serving side (duplicates, stalled streams) |
//! | `peer_supplied_keys` | 8: peer-supplied keys (labels, metric labels) |
//! | `reads_outside_root` | 9: reads outside the root through a symlink |
//! | `modes_and_names`    | 11: modes and names (setuid, duplicates, reserved names, mtimes) |
//! | `withholding`        | trust issue, item 5: a holder that lists the real version and serves nothing |
//!
//! Every replica test also checks, at the end, that the daemon is still up
//! and answers `syncctl`, wrote nothing beside its root (canary trees next
//! to the data directory and next to the node's directory), logged no
//! panic, kept its peak memory and thread count bounded, that the error it
//! reported names the peer (`evil`), and that it applies the next valid
//! version afterwards.
//!
//! Each test uses its own loopback addresses (127.0.5x.1 for the fake, or
//! the source, and 127.0.5x.2 for the replica), so they run in parallel.
//! `disk_fill` mounts a tmpfs and needs root (CI runs as root); it skips
//! with a message otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chunk_store::manifest::{
    self, Child, ChunkEntry, DirEntry, EntryMeta, MemNodes, Mtime, Node, Tree,
};
use chunk_store::testdata::pseudo_random;
use chunk_store::{ChunkerConfig, Hash};
use sync_proto::pb;
use sync_proto::pb::peer_client::PeerClient;
use tonic::codec::Streaming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

mod common;
use common::{Daemon, ctl, ctl_json, http_get, snapshot};

/// The directory every daemon of these tests carries.
const DIR: &str = "www";
/// The fake peer's node id: every error it causes must name it.
const EVIL: &str = "evil";
/// Modification time of the files of valid versions (whole seconds: the
/// replica sets exactly this and its rescan must give the same root).
const MTIME: i64 = 1_700_000_000;
/// Most hashes one `GetChunks` call may name (PROTOCOL.md).
const MAX_HASHES_PER_CALL: usize = 1024;

// ---------------------------------------------------------------------------
// The fake peer.

/// What the fake peer announces and serves; the test edits it while the
/// server runs.
#[derive(Default)]
struct FakeState {
    /// Announced in every `Exchange` answer.
    holdings: Vec<pb::DirVersion>,
    /// The labels of its `Member`.
    labels: HashMap<String, String>,
    /// Manifest nodes by id (absent: answered with empty data).
    nodes: HashMap<[u8; 32], Bytes>,
    /// Chunk bytes by hash (absent: answered with empty data). Need not
    /// match the hash, or the length a recipe gives.
    chunks: HashMap<[u8; 32], Bytes>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<FakeState>,
    exchanges: AtomicU64,
    get_nodes: AtomicU64,
    get_chunks: AtomicU64,
    /// When each `GetChunks` call arrived (retry patterns).
    get_chunks_at: Mutex<Vec<Instant>>,
}

#[derive(Clone)]
struct FakeService {
    address: String,
    shared: Arc<Shared>,
}

fn key(b: &[u8]) -> Option<[u8; 32]> {
    b.try_into().ok()
}

#[tonic::async_trait]
impl pb::peer_server::Peer for FakeService {
    async fn exchange(
        &self,
        _req: Request<pb::Holdings>,
    ) -> Result<Response<pb::Holdings>, Status> {
        // Every answer a new record (seq), as a node's record changes.
        let seq = self.shared.exchanges.fetch_add(1, Ordering::SeqCst) + 1;
        let (labels, dirs) = {
            let st = self.shared.state.lock().unwrap();
            (st.labels.clone(), st.holdings.clone())
        };
        Ok(Response::new(pb::Holdings {
            from: Some(pb::Member {
                node_id: EVIL.into(),
                address: self.address.clone(),
                labels,
            }),
            dirs,
            protocol: 2,
            incarnation: 1,
            seq,
            ..Default::default()
        }))
    }

    async fn gossip(
        &self,
        _req: Request<pb::GossipRequest>,
    ) -> Result<Response<pb::GossipReply>, Status> {
        // Takes no part in gossip: it is known only through Exchange.
        Err(Status::unimplemented("the fake peer does not gossip"))
    }

    async fn get_nodes(
        &self,
        req: Request<pb::GetNodesRequest>,
    ) -> Result<Response<pb::GetNodesResponse>, Status> {
        self.shared.get_nodes.fetch_add(1, Ordering::SeqCst);
        let ids = req.into_inner().ids;
        let nodes = {
            let st = self.shared.state.lock().unwrap();
            ids.into_iter()
                .map(|id| {
                    let data = key(&id)
                        .and_then(|k| st.nodes.get(&k).cloned())
                        .unwrap_or_default();
                    pb::NodeBlob { id, data }
                })
                .collect()
        };
        Ok(Response::new(pb::GetNodesResponse { nodes }))
    }

    type GetChunksStream = tokio_stream::Iter<std::vec::IntoIter<Result<pb::ChunkBatch, Status>>>;

    async fn get_chunks(
        &self,
        req: Request<pb::GetChunksRequest>,
    ) -> Result<Response<Self::GetChunksStream>, Status> {
        self.shared.get_chunks.fetch_add(1, Ordering::SeqCst);
        self.shared
            .get_chunks_at
            .lock()
            .unwrap()
            .push(Instant::now());
        let hashes = req.into_inner().hashes;
        // One chunk per batch: a 4 MiB lie still fits the replica's 8 MiB
        // message limit, so it is the replica's checks that must stop it.
        let batches: Vec<Result<pb::ChunkBatch, Status>> = {
            let st = self.shared.state.lock().unwrap();
            hashes
                .into_iter()
                .map(|hash| {
                    let data = key(&hash)
                        .and_then(|k| st.chunks.get(&k).cloned())
                        .unwrap_or_default();
                    Ok(pb::ChunkBatch {
                        chunks: vec![pb::Chunk {
                            hash,
                            data,
                            declined: false,
                        }],
                    })
                })
                .collect()
        };
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn haves(
        &self,
        _req: Request<pb::HavesRequest>,
    ) -> Result<Response<pb::HavesReply>, Status> {
        Err(Status::unimplemented(
            "the fake peer announces no have-sets",
        ))
    }

    async fn swim(&self, _req: Request<pb::SwimPacket>) -> Result<Response<pb::SwimAck>, Status> {
        // Never takes part in SWIM: the replica knows it only through
        // Exchange, which keeps it alive while exchanges succeed.
        Ok(Response::new(pb::SwimAck {}))
    }
}

/// The fake peer: a tonic server on `{ip}:7400` with its own runtime.
struct FakePeer {
    rt: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
    address: String,
}

impl FakePeer {
    fn start(ip: &str) -> FakePeer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime for the fake peer");
        let address = format!("{ip}:7400");
        let shared = Arc::new(Shared::default());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(address.as_str()))
            .unwrap_or_else(|e| panic!("fake peer: binding {address}: {e}"));
        let service = FakeService {
            address: address.clone(),
            shared: shared.clone(),
        };
        rt.spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(
                    pb::peer_server::PeerServer::new(service)
                        .max_decoding_message_size(64 << 20)
                        .max_encoding_message_size(64 << 20),
                )
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
            if let Err(e) = served {
                eprintln!("fake peer stopped: {e}");
            }
        });
        FakePeer {
            rt: Some(rt),
            shared,
            address,
        }
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the fake peer is running")
    }

    /// Serves `v`'s nodes and chunks (in addition to what it served
    /// before) and announces it, alone, as version `version` of `www`.
    fn publish(&self, version: u64, v: &Version) {
        let mut st = self.shared.state.lock().unwrap();
        st.nodes
            .extend(v.nodes.iter().map(|(k, b)| (*k, b.clone())));
        st.chunks
            .extend(v.chunks.iter().map(|(k, b)| (*k, b.clone())));
        st.holdings = vec![pb::DirVersion {
            dir: DIR.into(),
            version,
            root: v.root.as_bytes().to_vec(),
            publisher: EVIL.into(),
            entries: v.entries,
            bytes: v.bytes,
            ..Default::default()
        }];
    }

    /// Lists `v` (another node's genuine version) as held, serving
    /// nothing of it.
    fn claim(&self, v: pb::DirVersion) {
        self.shared.state.lock().unwrap().holdings = vec![v];
    }

    fn set_labels(&self, labels: HashMap<String, String>) {
        self.shared.state.lock().unwrap().labels = labels;
    }

    fn exchanges(&self) -> u64 {
        self.shared.exchanges.load(Ordering::SeqCst)
    }

    fn get_nodes(&self) -> u64 {
        self.shared.get_nodes.load(Ordering::SeqCst)
    }

    fn get_chunks(&self) -> u64 {
        self.shared.get_chunks.load(Ordering::SeqCst)
    }

    /// Arrival times of the `GetChunks` calls since `t`, in order.
    fn get_chunks_since(&self, t: Instant) -> Vec<Instant> {
        let mut v: Vec<Instant> = self
            .shared
            .get_chunks_at
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|&x| x >= t)
            .collect();
        v.sort();
        v
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

// The test as a client of a real daemon's peer port.

async fn connect(addr: &str) -> Result<PeerClient<Channel>, String> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(PeerClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20))
}

/// One `GetChunks` call read to its end.
async fn read_chunks(
    client: &mut PeerClient<Channel>,
    dir: &str,
    hashes: Vec<Vec<u8>>,
) -> Result<Vec<pb::Chunk>, Status> {
    let req = pb::GetChunksRequest {
        dir: dir.to_string(),
        hashes,
        requester: EVIL.to_string(),
        ..Default::default()
    };
    let mut stream = client.get_chunks(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await? {
        out.extend(batch.chunks);
    }
    Ok(out)
}

/// [`read_chunks`] on a fresh connection.
async fn fetch_once(addr: &str, dir: &str, hashes: Vec<Vec<u8>>) -> Result<Vec<pb::Chunk>, String> {
    let mut client = connect(addr).await?;
    read_chunks(&mut client, dir, hashes)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// One manifest node by id, on a fresh connection.
async fn get_node(addr: &str, id: Hash) -> Result<Bytes, String> {
    let mut client = connect(addr).await?;
    let resp = client
        .get_nodes(pb::GetNodesRequest {
            ids: vec![id.as_bytes().to_vec()],
            dir: DIR.into(),
        })
        .await
        .map_err(|s| s.to_string())?;
    resp.into_inner()
        .nodes
        .into_iter()
        .find(|n| n.id == id.as_bytes())
        .map(|n| n.data)
        .ok_or_else(|| "no blob for the id asked".to_string())
}

// ---------------------------------------------------------------------------
// Crafting versions.

/// A version as the fake serves it, and what a replica must hold once it
/// applied it (`expect`, empty for hostile versions).
struct Version {
    root: Hash,
    nodes: HashMap<[u8; 32], Bytes>,
    chunks: HashMap<[u8; 32], Bytes>,
    /// Declared in the `DirVersion`: files, directories and symlinks.
    entries: u64,
    /// Declared in the `DirVersion`: the sum of file sizes.
    bytes: u64,
    /// Path → description, as [`tree`] gives it.
    expect: BTreeMap<String, String>,
}

/// Nodes and chunks being put together by hand, so a test can build what
/// the builder never would.
#[derive(Default)]
struct Craft {
    nodes: HashMap<[u8; 32], Bytes>,
    chunks: HashMap<[u8; 32], Bytes>,
}

impl Craft {
    /// Adds a node; returns its id (the hash of its encoding).
    fn put(&mut self, node: &Node) -> Hash {
        let encoded = node.encode();
        let hash = Hash::of(&encoded);
        self.nodes.insert(hash.0, Bytes::from(encoded));
        hash
    }

    fn absorb(&mut self, sink: MemNodes) {
        for (h, b) in sink.nodes {
            self.nodes.insert(h.0, Bytes::from(b));
        }
    }

    /// The recipe of a one-chunk file (under the chunker's 16 KiB minimum,
    /// so exactly what the indexer makes); the chunk is served if `serve`.
    fn file(&mut self, data: &[u8], serve: bool) -> Hash {
        assert!(
            !data.is_empty() && data.len() < 16 << 10,
            "one-chunk files only ({} bytes)",
            data.len()
        );
        let hash = Hash::of(data);
        let mut sink = MemNodes::default();
        let recipe = manifest::build_recipe(
            vec![ChunkEntry {
                hash,
                len: data.len() as u32,
            }],
            &mut sink,
        )
        .expect("build_recipe");
        self.absorb(sink);
        if serve {
            self.chunks.insert(hash.0, Bytes::copy_from_slice(data));
        }
        recipe
    }

    /// A directory entry for a one-chunk file.
    fn entry(&mut self, name: &str, data: &[u8], mode: u32, secs: i64, serve: bool) -> DirEntry {
        let recipe = self.file(data, serve);
        file_entry(name, mode, data.len() as u64, secs, recipe)
    }

    fn finish(self, root: Hash, entries: u64, bytes: u64) -> Version {
        Version {
            root,
            nodes: self.nodes,
            chunks: self.chunks,
            entries,
            bytes,
            expect: BTreeMap::new(),
        }
    }
}

fn file_entry(name: &str, mode: u32, size: u64, secs: i64, recipe: Hash) -> DirEntry {
    DirEntry {
        name: name.to_string(),
        meta: EntryMeta::File {
            mode,
            size,
            mtime: Mtime { secs, nanos: 0 },
            recipe,
        },
    }
}

fn dir_entry(name: &str, root: Hash) -> DirEntry {
    DirEntry {
        name: name.to_string(),
        meta: EntryMeta::Dir { mode: 0o755, root },
    }
}

fn link_entry(name: &str, target: &str) -> DirEntry {
    DirEntry {
        name: name.to_string(),
        meta: EntryMeta::Symlink {
            target: target.to_string(),
        },
    }
}

enum Slot {
    File { data: Vec<u8>, mode: u32, secs: i64 },
    Link(String),
    Dir(BTreeMap<String, Slot>),
}

fn insert_slot(dir: &mut BTreeMap<String, Slot>, path: &str, slot: Slot) {
    match path.split_once('/') {
        None => {
            let old = dir.insert(path.to_string(), slot);
            assert!(old.is_none(), "{path} given twice");
        }
        Some((first, rest)) => match dir
            .entry(first.to_string())
            .or_insert_with(|| Slot::Dir(BTreeMap::new()))
        {
            Slot::Dir(sub) => insert_slot(sub, rest, slot),
            _ => panic!("{first} is both a file and a directory"),
        },
    }
}

struct Acc {
    craft: Craft,
    expect: BTreeMap<String, String>,
    entries: u64,
    bytes: u64,
}

/// Builds one directory bottom-up with the real builder (entries sorted by
/// name bytes: a BTreeMap of Strings is), sub-directories first.
fn build_dir_tree(dir: BTreeMap<String, Slot>, prefix: &str, acc: &mut Acc) -> Hash {
    let mut list = Vec::with_capacity(dir.len());
    for (name, slot) in dir {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let meta = match slot {
            Slot::File { data, mode, secs } => {
                let recipe = acc.craft.file(&data, true);
                acc.bytes += data.len() as u64;
                acc.expect.insert(
                    path,
                    format!("file {mode:o} {secs} {}", Hash::of(&data).to_hex()),
                );
                EntryMeta::File {
                    mode,
                    size: data.len() as u64,
                    mtime: Mtime { secs, nanos: 0 },
                    recipe,
                }
            }
            Slot::Link(target) => {
                acc.expect.insert(path, format!("link {target}"));
                EntryMeta::Symlink { target }
            }
            Slot::Dir(sub) => {
                acc.expect.insert(path.clone(), "dir 755".to_string());
                let root = build_dir_tree(sub, &path, acc);
                EntryMeta::Dir { mode: 0o755, root }
            }
        };
        acc.entries += 1;
        list.push(DirEntry { name, meta });
    }
    let mut sink = MemNodes::default();
    let root = manifest::build_dir(list, &mut sink).expect("build_dir");
    acc.craft.absorb(sink);
    root
}

/// A version of one-chunk files `(path, bytes, mode, mtime secs)` and
/// symlinks `(path, target)`, built as the indexer would build it, with
/// its totals declared truthfully (every entry below the root, every
/// file's size). Directories get mode 0755.
fn build_version(files: Vec<(&str, Vec<u8>, u32, i64)>, links: &[(&str, &str)]) -> Version {
    let mut top = BTreeMap::new();
    for (path, data, mode, secs) in files {
        insert_slot(&mut top, path, Slot::File { data, mode, secs });
    }
    for (path, target) in links {
        insert_slot(&mut top, path, Slot::Link(target.to_string()));
    }
    let mut acc = Acc {
        craft: Craft::default(),
        expect: BTreeMap::new(),
        entries: 0,
        bytes: 0,
    };
    let root = build_dir_tree(top, "", &mut acc);
    let Acc {
        craft,
        expect,
        entries,
        bytes,
    } = acc;
    let mut v = craft.finish(root, entries, bytes);
    v.expect = expect;
    v
}

/// A small valid site: two files (one in a sub-directory) and a symlink,
/// with content unique to `tag`.
fn site(tag: &str) -> Version {
    build_version(
        vec![
            (
                "index.html",
                format!("<h1>{tag}</h1>\n").into_bytes(),
                0o644,
                MTIME,
            ),
            (
                "assets/app.js",
                format!("console.log({tag:?});\n").into_bytes(),
                0o644,
                MTIME + 1,
            ),
        ],
        &[("latest", "index.html")],
    )
}

// ---------------------------------------------------------------------------
// Looking at a daemon from outside.

/// Every entry under `root`: relative path, full path, metadata (not
/// following symlinks).
fn walk(root: &Path) -> Vec<(String, PathBuf, fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let child_rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let path = e.path();
            let Ok(m) = fs::symlink_metadata(&path) else {
                continue;
            };
            if m.is_dir() {
                stack.push((path.clone(), child_rel.clone()));
            }
            out.push((child_rel, path, m));
        }
    }
    out
}

/// What is under `root`, described like [`Version::expect`]: files by
/// mode, mtime and content hash, directories by mode, symlinks by target.
fn tree(root: &Path) -> BTreeMap<String, String> {
    walk(root)
        .into_iter()
        .map(|(rel, path, m)| {
            let desc = if m.file_type().is_symlink() {
                let target = fs::read_link(&path)
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("link {target}")
            } else if m.is_dir() {
                format!("dir {:o}", m.mode() & 0o7777)
            } else {
                let data = fs::read(&path).unwrap_or_default();
                format!(
                    "file {:o} {} {}",
                    m.mode() & 0o7777,
                    m.mtime(),
                    Hash::of(&data).to_hex()
                )
            };
            (rel, desc)
        })
        .collect()
}

/// The size of the largest regular file under `root`.
fn largest_file(root: &Path) -> u64 {
    walk(root)
        .iter()
        .filter(|(_, _, m)| m.is_file())
        .map(|(_, _, m)| m.len())
        .max()
        .unwrap_or(0)
}

/// Temp files of the materializer left under `root`.
/// Waits (up to 10 s) for a moment with no temp file under `root`: a
/// failed write removes its temp file, but a retry may be writing one when
/// we look. Returns what was left if that moment never comes.
fn temp_files_settle(root: &Path) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = temp_files(root);
        if t.is_empty() || Instant::now() > deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn temp_files(root: &Path) -> Vec<String> {
    walk(root)
        .into_iter()
        .filter(|(rel, _, _)| {
            rel.rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with(".syncd-tmp."))
        })
        .map(|(rel, _, _)| rel)
        .collect()
}

/// Files and directories under `root` with set-user-id or set-group-id.
fn special_bits(root: &Path) -> Vec<String> {
    walk(root)
        .into_iter()
        .filter(|(_, _, m)| !m.file_type().is_symlink() && m.mode() & 0o6000 != 0)
        .map(|(rel, _, m)| format!("{rel} ({:o})", m.mode() & 0o7777))
        .collect()
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the daemon's process is still running (without reaping it:
/// usable with a shared reference; a zombie counts as exited).
fn running(d: &Daemon) -> bool {
    let Some(c) = d.child.as_ref() else {
        return false;
    };
    match fs::read_to_string(format!("/proc/{}/stat", c.id())) {
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| {
            !matches!(rest.trim_start().chars().next(), Some('Z' | 'X') | None)
        }),
        Err(_) => false,
    }
}

/// The process has not exited and `syncctl status` answers.
fn alive(d: &mut Daemon) {
    let exited = d
        .child
        .as_mut()
        .expect("the daemon was started")
        .try_wait()
        .expect("try_wait");
    assert!(
        exited.is_none(),
        "{} exited: {exited:?}\n{}",
        d.name,
        log_tail(d)
    );
    let (code, _, err) = ctl(d, &["status"]);
    assert_eq!(
        code,
        0,
        "syncctl status on {}: {err}\n{}",
        d.name,
        log_tail(d)
    );
}

/// The last lines of a daemon's log, for failure messages.
fn log_tail(d: &Daemon) -> String {
    let bytes = fs::read(&d.log).unwrap_or_default();
    let log = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = log.lines().collect();
    let tail = &lines[lines.len().saturating_sub(60)..];
    let mut out = format!("--- last {} lines of {}'s log:\n", tail.len(), d.name);
    for l in tail {
        out.extend(l.chars().take(2000));
        out.push('\n');
    }
    out
}

/// `syncctl --json status`'s first directory, if the daemon answers.
fn dir_status(d: &Daemon) -> Option<serde_json::Value> {
    let (code, out, _) = ctl(d, &["--json", "status"]);
    if code != 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    Some(v["dirs"][0].clone())
}

/// Polls `f` every 50 ms for up to `secs`; fails at once if the daemon
/// exits, and with its status and log on timeout.
fn wait_for<T>(d: &Daemon, secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(running(d), "{what}: {} exited\n{}", d.name, log_tail(d));
        if Instant::now() >= deadline {
            panic!(
                "{what}: not within {secs} s\nstatus: {}\n{}",
                dir_status(d).map(|s| s.to_string()).unwrap_or_default(),
                log_tail(d)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Keeps watching for `dur` (a measurement window, not a wait for an
/// event): the daemon must stay up throughout.
fn observe(d: &Daemon, dur: Duration) {
    let end = Instant::now() + dur;
    while Instant::now() < end {
        assert!(running(d), "{} exited\n{}", d.name, log_tail(d));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Peak resident memory and thread count of a daemon.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    hwm_kib: u64,
    threads: u64,
}

fn usage(d: &Daemon) -> Usage {
    let pid = d.child.as_ref().expect("the daemon was started").id();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Usage {
        hwm_kib: field("VmHWM:"),
        threads: field("Threads:"),
    }
}

/// Where a daemon's report stood before an attack: an error recorded
/// after this is the attack's.
struct Mark {
    last_error: String,
    log_len: usize,
    at: Instant,
}

fn mark(d: &Daemon) -> Mark {
    Mark {
        last_error: dir_status(d)
            .and_then(|s| s["last_error"].as_str().map(String::from))
            .unwrap_or_default(),
        log_len: fs::metadata(&d.log).map_or(0, |m| m.len() as usize),
        at: Instant::now(),
    }
}

/// Whether a warning or error logged since `mark` names one of `who`.
fn log_names(d: &Daemon, mark: &Mark, who: &[&str]) -> bool {
    let bytes = fs::read(&d.log).unwrap_or_default();
    let since = String::from_utf8_lossy(&bytes[mark.log_len.min(bytes.len())..]).into_owned();
    since.lines().any(|l| {
        (l.contains(" WARN ") || l.contains(" ERROR ")) && who.iter().any(|w| l.contains(w))
    })
}

/// The error a directory status reports since `mark`, if it is one that
/// names the peer (in `reason`/`last_error`, or failing that in a warning
/// of the log) and contains every needle (`a|b` accepts either) in
/// `reason`/`last_error`. `Err` describes what is reported instead.
fn error_since(
    d: &Daemon,
    s: &serde_json::Value,
    mark: &Mark,
    needles: &[&str],
) -> Result<String, String> {
    let state = s["state"].as_str().unwrap_or_default();
    let reason = s["reason"].as_str().unwrap_or_default();
    let last = s["last_error"].as_str().unwrap_or_default();
    let seen = format!("state {state:?}, reason {reason:?}, last_error {last:?}");
    let fresh =
        (state == "error" && !reason.is_empty()) || (!last.is_empty() && last != mark.last_error);
    if !fresh {
        return Err(seen);
    }
    let text = format!("{reason}\n{last}");
    let named = text.contains(EVIL) || log_names(d, mark, &[EVIL]);
    let missing: Vec<&str> = needles
        .iter()
        .copied()
        .filter(|n| !n.split('|').any(|alt| text.contains(alt)))
        .collect();
    if named && missing.is_empty() {
        Ok(text)
    } else {
        Err(format!(
            "{seen}; names {EVIL:?}: {named}; lacks {missing:?}"
        ))
    }
}

/// Waits up to `secs` for the error an attack causes (see
/// [`error_since`]); `guard` is checked at every poll and fails the test
/// at once with its message (a bound broken while waiting).
fn wait_error(
    d: &Daemon,
    mark: &Mark,
    secs: u64,
    needles: &[&str],
    mut guard: impl FnMut() -> Option<String>,
) -> String {
    let deadline = mark.at + Duration::from_secs(secs);
    let mut last = String::from("no status");
    loop {
        assert!(
            running(d),
            "{} exited during the attack\n{}",
            d.name,
            log_tail(d)
        );
        if let Some(why) = guard() {
            panic!("{why}\nlast status: {last}\n{}", log_tail(d));
        }
        if let Some(s) = dir_status(d) {
            match error_since(d, &s, mark, needles) {
                Ok(text) => return text,
                Err(seen) => last = seen,
            }
        }
        if Instant::now() >= deadline {
            panic!(
                "no error naming {EVIL:?} and {needles:?} within {secs} s\nlast status: {last}\n{}",
                log_tail(d)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the replica holds exactly `v` as version `n`, idle.
fn wait_applied(d: &Daemon, n: u64, v: &Version, what: &str) {
    wait_for(d, 60, what, || {
        let s = dir_status(d)?;
        (s["state"] == "idle"
            && s["local_version"].as_u64() == Some(n)
            && tree(&d.data) == v.expect)
            .then_some(())
    });
}

/// Files the daemon itself keeps in its node directory.
const DAEMON_MADE: [&str; 6] = ["state", "syncd.sock", "log", "data", "dirs.d", "syncd.toml"];

/// Trees beside the data directory and beside the node's directory that
/// must never change, and directory listings that must not grow.
struct Canary {
    trees: Vec<(PathBuf, Vec<(PathBuf, String)>)>,
    /// (directory, names allowed in it).
    listings: Vec<(PathBuf, BTreeSet<String>)>,
}

impl Canary {
    fn plant(d: &Daemon) -> Canary {
        let tmp = d.base.parent().expect("the node directory has a parent");
        let inside = d.base.join("canary");
        let outside = tmp.join("outside");
        for dir in [&inside, &outside] {
            fs::create_dir_all(dir.join("nested")).unwrap();
            fs::write(dir.join("secret.txt"), b"canary: must never change\n").unwrap();
            fs::write(dir.join("nested/keys.txt"), b"nor this\n").unwrap();
        }
        let mut base_names = names_in(&d.base);
        base_names.extend(DAEMON_MADE.map(String::from));
        Canary {
            trees: vec![
                (inside.clone(), snapshot(&inside)),
                (outside.clone(), snapshot(&outside)),
            ],
            listings: vec![
                (d.base.clone(), base_names),
                (tmp.to_path_buf(), names_in(tmp)),
            ],
        }
    }

    /// A name the test itself adds beside the data directory.
    fn allow(&mut self, name: &str) {
        self.listings[0].1.insert(name.to_string());
    }

    fn check(&self) {
        for (dir, snap) in &self.trees {
            assert_eq!(&snapshot(dir), snap, "{} changed", dir.display());
        }
        for (dir, allowed) in &self.listings {
            let extra: Vec<String> = names_in(dir)
                .into_iter()
                .filter(|n| !allowed.contains(n))
                .collect();
            assert!(
                extra.is_empty(),
                "new entries beside the data directory in {}: {extra:?}",
                dir.display()
            );
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A tmpfs mounted for the life of the value.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        let opts = format!("size={size},mode=755");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts.as_str(), "tmpfs"])
            .arg(path)
            .output()
            .expect("mount(8)");
        assert!(
            out.status.success(),
            "mount -t tmpfs on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// A replica whose only peer is the fake, holding a first valid version,
/// with canaries planted and its memory and threads measured.
struct Rig {
    // Dropped in this order: the daemon is killed before its tmpfs is
    // unmounted, and both before the temp directory goes.
    r: Daemon,
    _tmpfs: Option<Tmpfs>,
    fake: FakePeer,
    canary: Canary,
    base: Usage,
    /// The last version number announced.
    version: u64,
    _tmp: tempfile::TempDir,
}

impl Rig {
    /// `net`: the fake is 127.0.`net`.1, the replica 127.0.`net`.2.
    /// `tmpfs`: the data directory is a 16 MiB tmpfs (root only).
    /// `dir_extra`: lines added to the replica's www.toml.
    fn start(net: u8, first: &Version, tmpfs: bool, dir_extra: &str) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let fake_ip = format!("127.0.{net}.1");
        let replica_ip = format!("127.0.{net}.2");
        let mount = tmpfs.then(|| {
            let data = tmp.path().join("r").join("data");
            fs::create_dir_all(&data).unwrap();
            Tmpfs::mount(&data, "16m")
        });
        let fake = FakePeer::start(&fake_ip);
        fake.publish(1, first);
        let r = Daemon::with(
            tmp.path(),
            "r",
            &replica_ip,
            "replica",
            &[fake_ip.as_str()],
            "",
            dir_extra,
        );
        wait_applied(
            &r,
            1,
            first,
            "the replica applies the fake's first, valid version",
        );
        let canary = Canary::plant(&r);
        let base = usage(&r);
        Rig {
            r,
            _tmpfs: mount,
            fake,
            canary,
            base,
            version: 1,
            _tmp: tmp,
        }
    }

    /// Announces `v` as the next version.
    fn publish(&mut self, v: &Version) -> u64 {
        self.version += 1;
        self.fake.publish(self.version, v);
        self.version
    }

    /// Marks where the replica's report stands, then announces `v`.
    fn attack(&mut self, v: &Version) -> Mark {
        let m = mark(&self.r);
        self.publish(v);
        m
    }

    /// Announces the valid `v` and waits until the replica holds exactly it.
    fn recover(&mut self, v: &Version, what: &str) {
        let n = self.publish(v);
        wait_applied(&self.r, n, v, what);
    }

    fn growth_mib(&self) -> u64 {
        usage(&self.r).hwm_kib.saturating_sub(self.base.hwm_kib) / 1024
    }

    fn assert_unchanged(&self, v: &Version, what: &str) {
        assert_eq!(
            tree(&self.r.data),
            v.expect,
            "{what}: the replica's data changed although the version was refused"
        );
    }

    /// The checks every replica test ends with.
    fn finish(mut self, max_growth_mib: u64) {
        alive(&mut self.r);
        self.canary.check();
        let grew = self.growth_mib();
        assert!(
            grew < max_growth_mib,
            "peak RSS grew {grew} MiB over the test (bound {max_growth_mib} MiB)"
        );
        // Threads: the runtime's workers plus a blocking pool that only
        // grows with work in progress; 40 more than at the start means
        // something spawns per request or per retry.
        let threads = usage(&self.r).threads;
        assert!(
            threads <= self.base.threads + 40,
            "{threads} threads, {} at the start",
            self.base.threads
        );
        let setid = special_bits(&self.r.data);
        assert!(setid.is_empty(), "set-id bits under the root: {setid:?}");
        let bytes = fs::read(&self.r.log).unwrap_or_default();
        let log = String::from_utf8_lossy(&bytes);
        assert!(
            !log.contains("panicked"),
            "the replica panicked\n{}",
            log_tail(&self.r)
        );
    }
}

// ---------------------------------------------------------------------------
// The tests.

/// Item 2: a tree whose 17th nested directory makes a path over 4096
/// bytes, with a 2-byte character straddling byte 64 of the path. The old
/// diff panicked slicing `&path[..64]` while holding the index lock, which
/// poisoned it for every later scan. Now: an error naming the peer and the
/// path (its first bytes), the replica answers and rescans, and applies the
/// next version.
#[test]
fn panic_manifest() {
    let v1 = site("v1");
    let mut rig = Rig::start(51, &v1, false, "");

    let first = format!("{}é{}", "a".repeat(63), "a".repeat(190));
    assert_eq!(first.len(), 255);
    assert!(!first.is_char_boundary(64), "é must straddle byte 64");
    let names: Vec<String> = std::iter::once(first)
        .chain((1..17).map(|_| "b".repeat(255)))
        .collect();
    let deepest = names.iter().map(|n| n.len() + 1).sum::<usize>() - 1;
    assert!(deepest > manifest::MAX_PATH_LEN, "{deepest}");
    let mut craft = Craft::default();
    let file = craft.entry("deep.txt", b"deep\n", 0o644, MTIME, true);
    let mut root = craft.put(&Node::DirLeaf(vec![file]));
    for name in names.iter().rev() {
        root = craft.put(&Node::DirLeaf(vec![dir_entry(name, root)]));
    }
    let deep = craft.finish(root, 17 + 1, 5);

    let m = rig.attack(&deep);
    wait_error(&rig.r, &m, 45, &["aaaaaaaaaaaaaaaa"], || None);
    alive(&mut rig.r);
    rig.assert_unchanged(&v1, "a path over 4096 bytes");
    // No lock is left poisoned: a rescan (which takes the index lock the
    // diff held) completes.
    let t = Instant::now();
    let (code, _, err) = ctl(&rig.r, &["rescan", DIR]);
    assert_eq!(
        code,
        0,
        "syncctl rescan after the attack: {err}\n{}",
        log_tail(&rig.r)
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "rescan took {:?}",
        t.elapsed()
    );

    rig.recover(
        &site("after the deep tree"),
        "the next valid version after the deep tree",
    );
    rig.finish(150);
}

/// Item 3: a recipe whose chunks declare lengths far below what the peer
/// then sends (4 MiB blobs that do hash to the listed hashes). The old
/// replica planned memory by the declared lengths (48 bytes: one fetch
/// window) and kept every verified blob: +202 MiB. Now chunks of the wrong
/// length are refused as they arrive, memory stays bounded, nothing is
/// written from them, and the error names the peer. Two shapes: 48 chunks
/// of "1 byte" (a recipe no chunker makes), and 48 chunks of "16 KiB" (the
/// chunker's minimum, so only the length check on arrival stops it).
#[test]
fn chunk_length_lie() {
    const BLOB: usize = 4 << 20;
    let v1 = site("v1");
    let mut rig = Rig::start(52, &v1, false, "");
    // 48 distinct 4 MiB blobs sharing one buffer.
    let pool = Bytes::from(pseudo_random(BLOB + 48, 52));
    let blobs: Vec<Bytes> = (0..48).map(|i| pool.slice(i..i + BLOB)).collect();

    let mut current = v1;
    for (stage, declared) in [("1-byte", 1u32), ("16 KiB", 16 << 10)] {
        let mut craft = Craft::default();
        let mut chunks = Vec::new();
        for blob in &blobs {
            let hash = Hash::of(blob);
            craft.chunks.insert(hash.0, blob.clone());
            chunks.push(ChunkEntry {
                hash,
                len: declared,
            });
        }
        let size = 48 * u64::from(declared);
        let mut sink = MemNodes::default();
        let recipe = manifest::build_recipe(chunks, &mut sink).expect("build_recipe");
        craft.absorb(sink);
        let root = craft.put(&Node::DirLeaf(vec![file_entry(
            "lie.bin", 0o644, size, MTIME, recipe,
        )]));
        let lie = craft.finish(root, 1, size);

        let served_before = rig.fake.get_chunks();
        let m = rig.attack(&lie);
        let mut largest = 0u64;
        wait_error(&rig.r, &m, 45, &[], || {
            largest = largest.max(largest_file(&rig.r.data));
            let grew = rig.growth_mib();
            if grew >= 100 {
                Some(format!(
                    "{stage} lie: peak RSS grew {grew} MiB (bound 100 MiB)"
                ))
            } else if largest >= 1 << 20 {
                Some(format!(
                    "{stage} lie: a {largest}-byte file appeared under the root"
                ))
            } else {
                None
            }
        });
        // Let retries happen too: memory must stay bounded across them.
        observe(&rig.r, Duration::from_secs(3));
        largest = largest.max(largest_file(&rig.r.data));
        // 100 MiB: one 4 MiB message is decoded at a time (8 MiB limit),
        // plus allocator slack; keeping the blobs took 202 MiB.
        let grew = rig.growth_mib();
        assert!(grew < 100, "{stage} lie: peak RSS grew {grew} MiB");
        assert!(
            largest < 1 << 20,
            "{stage} lie: a {largest}-byte file was written"
        );
        assert!(!rig.r.data.join("lie.bin").exists());
        let temps = temp_files_settle(&rig.r.data);
        assert!(temps.is_empty(), "{stage} lie: temp files left: {temps:?}");
        rig.assert_unchanged(&current, "a recipe lying about chunk lengths");
        // Counted against the peer that sent them (issue 9).
        let peers = ctl_json(&rig.r, &["peers"]);
        let corrupt = peers["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["node_id"] == EVIL)
            .and_then(|p| p["corrupt_chunks"].as_u64())
            .unwrap_or(0);
        assert!(
            corrupt > 0,
            "{stage} lie: no corrupt chunk counted against {EVIL}: {peers}"
        );
        eprintln!(
            "chunk_length_lie ({stage}): the fake answered {} GetChunks calls",
            rig.fake.get_chunks() - served_before
        );
        current = site(&format!("after the {stage} lie"));
        rig.recover(&current, "the next valid version after a length lie");
    }
    rig.finish(100);
}

/// Item 4: trees are DAGs. (a) 1 M directories from 3 distinct nodes (a
/// root of 1000 entries all pointing at one page of 1000 entries, all
/// pointing at one leaf), declared as 3 entries; (b) a file of 2^60 bytes
/// whose recipe repeats one index node at every level, in a version
/// declaring 4 MiB. The old replica walked them as trees (a GetNodes call
/// per reference, millions of paths in memory). Now the walk is bounded by
/// the declared totals: few GetNodes calls, bounded memory, an error naming
/// the peer quickly.
#[test]
fn shared_subtrees() {
    let v1 = site("v1");
    let mut rig = Rig::start(53, &v1, false, "");

    // (a) 1000 × 1000 directories from three pages.
    let mut craft = Craft::default();
    let file = craft.entry("f.txt", b"leaf\n", 0o644, MTIME, true);
    let l0 = craft.put(&Node::DirLeaf(vec![file]));
    let l1 = craft.put(&Node::DirLeaf(
        (0..1000)
            .map(|i| dir_entry(&format!("d{i:04}"), l0))
            .collect(),
    ));
    let root = craft.put(&Node::DirLeaf(
        (0..1000)
            .map(|i| dir_entry(&format!("e{i:04}"), l1))
            .collect(),
    ));
    let dag = craft.finish(root, 3, 5);
    let n0 = rig.fake.get_nodes();
    let m = rig.attack(&dag);
    wait_error(&rig.r, &m, 45, &[], || {
        let calls = rig.fake.get_nodes() - n0;
        let grew = rig.growth_mib();
        if calls >= 100 {
            Some(format!(
                "the replica walked the shared directories: {calls} GetNodes calls"
            ))
        } else if grew >= 150 {
            Some(format!(
                "peak RSS grew {grew} MiB walking the shared directories"
            ))
        } else {
            None
        }
    });
    observe(&rig.r, Duration::from_secs(3)); // retries count too
    // < 100 calls: the three pages (and retries with backoff) need a
    // handful; the old walk made one per reference, over a million.
    let calls = rig.fake.get_nodes() - n0;
    assert!(calls < 100, "{calls} GetNodes calls for a 3-node tree");
    // < 150 MiB: a bounded diff stops after the declared 3 entries; the
    // old one held the changes of 2 M paths.
    let grew = rig.growth_mib();
    assert!(grew < 150, "peak RSS grew {grew} MiB");
    rig.assert_unchanged(&v1, "the shared-directory DAG");
    let after_dag = site("after the dag");
    rig.recover(&after_dag, "the next valid version after the directory DAG");

    // (b) A 2^60-byte file from five recipe nodes.
    let mut craft = Craft::default();
    let leaf = craft.put(&Node::RecipeLeaf(
        (0..16)
            .map(|i| ChunkEntry {
                hash: Hash::of(format!("huge chunk {i}").as_bytes()),
                len: 256 << 10,
            })
            .collect(),
    ));
    let mut child = Child {
        hash: leaf,
        below: 16 * (256 << 10),
    };
    for (level, fanout) in [(1u8, 4096usize), (2, 4096), (3, 4096), (4, 4)] {
        let hash = craft.put(&Node::Index {
            tree: Tree::Recipe,
            level,
            children: vec![child; fanout],
        });
        child = Child {
            hash,
            below: child.below * fanout as u64,
        };
    }
    assert_eq!(child.below, 1u64 << 60);
    let root = craft.put(&Node::DirLeaf(vec![file_entry(
        "huge.bin",
        0o644,
        1 << 60,
        MTIME,
        child.hash,
    )]));
    let huge = craft.finish(root, 1, 4 << 20);
    let n0 = rig.fake.get_nodes();
    let m = rig.attack(&huge);
    wait_error(&rig.r, &m, 30, &[], || {
        let calls = rig.fake.get_nodes() - n0;
        (calls >= 100)
            .then(|| format!("the replica walked the shared recipe: {calls} GetNodes calls"))
    });
    assert!(m.at.elapsed() < Duration::from_secs(30));
    observe(&rig.r, Duration::from_secs(3));
    let calls = rig.fake.get_nodes() - n0;
    assert!(calls < 100, "{calls} GetNodes calls for a 6-node tree");
    rig.assert_unchanged(&after_dag, "the 2^60-byte recipe");
    rig.recover(
        &site("after the huge file"),
        "the next valid version after the huge recipe",
    );
    rig.finish(150);
}

/// Item 5: a version that cannot fit. The data directory is a 16 MiB
/// tmpfs (mounted before the daemon starts); the peer publishes a 256 MiB
/// file made of one 64 KiB chunk repeated (so only 64 KiB are missing: a
/// check on the transfer size alone would let it through). Now the replica
/// refuses it up front, saying why (space), leaves no temp file and the
/// data as it was, and then applies a small version. `min_free_space` is
/// lowered to 1 MiB so the tmpfs can hold anything at all.
#[test]
fn disk_fill() {
    if !is_root() {
        eprintln!("disk_fill: skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let v1 = site("v1");
    let mut rig = Rig::start(54, &v1, true, "min_free_space = \"1MiB\"");

    let chunk = Bytes::from(pseudo_random(64 << 10, 54));
    let hash = Hash::of(&chunk);
    let mut craft = Craft::default();
    craft.chunks.insert(hash.0, chunk);
    let mut sink = MemNodes::default();
    let recipe = manifest::build_recipe(
        vec![
            ChunkEntry {
                hash,
                len: 64 << 10
            };
            4096
        ],
        &mut sink,
    )
    .expect("build_recipe");
    craft.absorb(sink);
    let size = 4096 * (64u64 << 10);
    let root = craft.put(&Node::DirLeaf(vec![file_entry(
        "big.bin", 0o644, size, MTIME, recipe,
    )]));
    let big = craft.finish(root, 1, size);

    let m = rig.attack(&big);
    let mut largest = 0u64;
    wait_error(&rig.r, &m, 45, &["space|does not fit|free"], || {
        largest = largest.max(largest_file(&rig.r.data));
        (largest >= 1 << 20)
            .then(|| format!("a {largest}-byte file was written to the 16 MiB disk"))
    });
    observe(&rig.r, Duration::from_secs(2));
    largest = largest.max(largest_file(&rig.r.data));
    assert!(largest < 1 << 20, "a {largest}-byte file was written");
    let temps = temp_files_settle(&rig.r.data);
    assert!(temps.is_empty(), "temp files left: {temps:?}");
    rig.assert_unchanged(&v1, "a version larger than the disk");

    rig.recover(
        &site("after the disk fill"),
        "a small version after the disk fill",
    );
    rig.finish(150);
}

/// Item 6: a version whose chunks the peer never serves. The old replica
/// retried at once, every time the peer's holdings arrived: 46 pulls in
/// 30 s. Now failures back off exponentially from 1 s, the status shows
/// when the next attempt is due (`retry_in_seconds`, and the table says
/// "retry"), and the error names the peer and the file.
#[test]
fn retry_backoff() {
    let v1 = site("v1");
    let mut rig = Rig::start(55, &v1, false, "");
    let mut unserved = build_version(
        vec![("missing.bin", pseudo_random(4000, 55), 0o644, MTIME)],
        &[],
    );
    unserved.chunks.clear(); // announced, never served

    let m = rig.attack(&unserved);
    let window = Duration::from_secs(30);
    let (mut error, mut retry_seen, mut table_seen) = (None, false, false);
    let mut last = String::new();
    // A measurement window: the rate of attempts is what is tested.
    while m.at.elapsed() < window {
        assert!(running(&rig.r), "the replica exited\n{}", log_tail(&rig.r));
        if let Some(s) = dir_status(&rig.r) {
            if error.is_none() {
                match error_since(&rig.r, &s, &m, &["missing.bin"]) {
                    Ok(text) => error = Some(text),
                    Err(seen) => last = seen,
                }
            }
            if s["retry_in_seconds"].as_f64().unwrap_or(0.0) > 0.0 {
                retry_seen = true;
                if !table_seen {
                    let (code, table, _) = ctl(&rig.r, &["status"]);
                    table_seen = code == 0 && table.to_lowercase().contains("retry");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let calls = rig.fake.get_chunks_since(m.at);
    let attempts = bursts(&calls, Duration::from_millis(500));
    eprintln!(
        "retry_backoff: {} GetChunks calls in {} attempts over 30 s ({} in all)",
        calls.len(),
        attempts,
        rig.fake.get_chunks()
    );
    assert!(
        error.is_some(),
        "no error naming {EVIL:?} and missing.bin; last status: {last}\n{}",
        log_tail(&rig.r)
    );
    assert!(retry_seen, "status never reported retry_in_seconds > 0");
    assert!(table_seen, "`syncctl status` never mentioned the retry");
    // Backoff from 1 s doubling (±25 %): attempts near 0, 1, 3, 7, 15 and
    // 31 s, so at most ~6 in 30 s; 10 leaves room for jitter. An attempt
    // is a burst of calls (a failed one may make a few); the old code made
    // 46 attempts, a fixed 1 s retry would make 30.
    assert!(
        (2..=10).contains(&attempts),
        "{attempts} pull attempts in 30 s"
    );
    assert!(calls.len() <= 30, "{} GetChunks calls in 30 s", calls.len());

    rig.recover(
        &site("after the retries"),
        "a served version after the retries",
    );
    rig.finish(150);
}

/// Groups of calls separated by more than `gap`.
fn bursts(times: &[Instant], gap: Duration) -> usize {
    let mut n = 0;
    let mut last: Option<Instant> = None;
    for &t in times {
        if last.is_none_or(|l| t.duration_since(l) > gap) {
            n += 1;
        }
        last = Some(t);
    }
    n
}

/// Streams opened against a source, by outcome of the call itself.
struct Opened {
    _clients: Vec<PeerClient<Channel>>,
    streams: Vec<Streaming<pb::ChunkBatch>>,
    exhausted: usize,
    other: Vec<String>,
    timed_out: usize,
}

/// Opens `conns × per_conn` GetChunks streams for `hashes` and never reads
/// them.
async fn open_streams(addr: &str, hashes: &[Vec<u8>], conns: usize, per_conn: usize) -> Opened {
    let mut clients = Vec::new();
    for _ in 0..conns {
        clients.push(connect(addr).await.expect("connecting to the source"));
    }
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..conns * per_conn {
        let mut client = clients[i % conns].clone();
        let req = pb::GetChunksRequest {
            dir: DIR.into(),
            hashes: hashes.to_vec(),
            requester: EVIL.into(),
            ..Default::default()
        };
        calls.spawn(async move {
            tokio::time::timeout(Duration::from_secs(10), client.get_chunks(req)).await
        });
    }
    let mut o = Opened {
        _clients: clients,
        streams: Vec::new(),
        exhausted: 0,
        other: Vec::new(),
        timed_out: 0,
    };
    while let Some(joined) = calls.join_next().await {
        match joined.expect("a call task") {
            Ok(Ok(resp)) => o.streams.push(resp.into_inner()),
            Ok(Err(s)) if s.code() == Code::ResourceExhausted => o.exhausted += 1,
            Ok(Err(s)) => o.other.push(format!("{:?}: {}", s.code(), s.message())),
            Err(_) => o.timed_out += 1,
        }
    }
    o
}

/// Reads the first message of each stream: (refused with
/// RESOURCE_EXHAUSTED, served a batch, anything else).
async fn first_messages(streams: Vec<Streaming<pb::ChunkBatch>>) -> (usize, usize, usize) {
    let mut set = tokio::task::JoinSet::new();
    for mut s in streams {
        set.spawn(async move {
            match tokio::time::timeout(Duration::from_secs(5), s.message()).await {
                Ok(Err(st)) if st.code() == Code::ResourceExhausted => 0u8,
                Ok(Ok(Some(_))) => 1,
                _ => 2,
            }
        });
    }
    let (mut exhausted, mut served, mut other) = (0, 0, 0);
    while let Some(r) = set.join_next().await {
        match r.unwrap_or(2) {
            0 => exhausted += 1,
            1 => served += 1,
            _ => other += 1,
        }
    }
    (exhausted, served, other)
}

/// Item 7, the serving side, with the test as a hostile client of a real
/// source: (i) one chunk asked 1024 times in one call is sent once (the
/// old source sent 1024 copies); (ii) 512 streams each asking for 64 MiB
/// and never read (the old source filled 5.2 GB and its blocking pool):
/// the source keeps serving its own work (a rescan within 10 s, a manifest
/// node within 5 s), its memory and threads stay bounded, and streams
/// beyond its limit are refused with RESOURCE_EXHAUSTED.
#[test]
fn serving_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.56.1";
    let addr = format!("{ip}:7400");
    let data = tmp.path().join("s").join("data");
    fs::create_dir_all(&data).unwrap();
    let small = pseudo_random(4000, 0x5610);
    fs::write(data.join("a.bin"), &small).unwrap();
    let hashes: Vec<Vec<u8>> = {
        let big = pseudo_random(64 << 20, 0x5620);
        fs::write(data.join("big.bin"), &big).unwrap();
        let mut seen = HashSet::new();
        let mut list: Vec<Vec<u8>> =
            chunk_store::chunker::chunk_bytes(&ChunkerConfig::default(), &big)
                .into_iter()
                .filter(|c| seen.insert(c.hash))
                .map(|c| c.hash.as_bytes().to_vec())
                .collect();
        list.truncate(MAX_HASHES_PER_CALL);
        list
    };
    assert!(hashes.len() > 500, "{} chunks in 64 MiB", hashes.len());
    let mut s = Daemon::new(tmp.path(), "s", ip, "source", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = Hash::of(&small);
    // The peer port opens after the initial scan: big.bin is indexed too.
    wait_for(&s, 60, "the source serves a.bin", || {
        let chunks = rt
            .block_on(fetch_once(&addr, DIR, vec![a.as_bytes().to_vec()]))
            .ok()?;
        chunks.iter().any(|c| c.data[..] == small[..]).then_some(())
    });

    // (i) 1024 copies of one hash: its bytes at most once.
    let copies = rt.block_on(fetch_once(&addr, DIR, vec![a.as_bytes().to_vec(); 1024]));
    let served: usize = copies
        .as_ref()
        .map_or(0, |c| c.iter().map(|c| c.data.len()).sum());
    assert!(
        served <= small.len(),
        "{served} bytes sent for one 4000-byte chunk named 1024 times ({:?})",
        copies.as_ref().err()
    );

    // (ii) 512 streams never read, over 16 connections.
    let base = usage(&s);
    let opened = rt.block_on(open_streams(&addr, &hashes, 16, 32));
    eprintln!(
        "serving_limits: {} streams open, {} refused (RESOURCE_EXHAUSTED), {} other errors {:?}, {} unanswered in 10 s",
        opened.streams.len(),
        opened.exhausted,
        opened.other.len(),
        opened.other.first(),
        opened.timed_out
    );
    // While they are open, the source does its own work.
    let t = Instant::now();
    let (code, _, err) = ctl(&s, &["rescan", DIR]);
    let took = t.elapsed();
    assert_eq!(
        code,
        0,
        "syncctl rescan with 512 streams open: {err}\n{}",
        log_tail(&s)
    );
    assert!(
        took < Duration::from_secs(10),
        "rescan took {took:?} with 512 streams open"
    );
    let root_hex = ctl_json(&s, &["status"])["dirs"][0]["local_root"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let root = Hash::from_hex(&root_hex).expect("local_root is hex");
    let t = Instant::now();
    let node = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), get_node(&addr, root)).await
    });
    let took = t.elapsed();
    match node {
        Ok(Ok(bytes)) => assert_eq!(Hash::of(&bytes), root, "GetNodes answered another node"),
        Ok(Err(e)) => panic!("GetNodes for the root with 512 streams open: {e}"),
        Err(_) => panic!("GetNodes for the root did not answer within 5 s ({took:?})"),
    }
    // Memory and threads over a few seconds (a measurement window: the
    // old source filled its buffers within it).
    let mut threads = base.threads;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        assert!(running(&s), "the source exited\n{}", log_tail(&s));
        threads = threads.max(usage(&s).threads);
        std::thread::sleep(Duration::from_millis(100));
    }
    // 300 MiB: 32 streams × 2 batches of ≤ 4 MiB each, plus slack; the
    // old source buffered every stream (5.2 GB).
    let grew = usage(&s).hwm_kib.saturating_sub(base.hwm_kib) / 1024;
    assert!(
        grew < 300,
        "peak RSS grew {grew} MiB with 512 unread streams"
    );
    // 100 threads: a bounded number of blocking reads at a time (32
    // streams, 16 node reads); the old source used one blocking thread
    // per stream, up to tokio's cap of 512.
    assert!(
        threads <= base.threads + 100,
        "{threads} threads with 512 unread streams, {} before",
        base.threads
    );
    let exhausted_calls = opened.exhausted;
    let Opened { streams, .. } = opened;
    let (exhausted_first, served_first, other_first) = rt.block_on(first_messages(streams));
    eprintln!(
        "serving_limits: first messages: {exhausted_first} RESOURCE_EXHAUSTED, {served_first} batches, {other_first} other"
    );
    assert!(
        exhausted_calls + exhausted_first > 0,
        "no stream beyond the limit was refused with RESOURCE_EXHAUSTED"
    );

    // With the streams gone, the source serves as before.
    wait_for(
        &s,
        30,
        "the source serves again once the streams are gone",
        || {
            let chunks = rt
                .block_on(fetch_once(&addr, DIR, vec![a.as_bytes().to_vec()]))
                .ok()?;
            chunks.iter().any(|c| c.data[..] == small[..]).then_some(())
        },
    );
    alive(&mut s);
    let bytes = fs::read(&s.log).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&bytes).contains("panicked"),
        "the source panicked\n{}",
        log_tail(&s)
    );
}

/// Item 8, keys a peer chooses. (i) Labels: the fake declares 7 labels of
/// 1 MiB each; the replica refuses them (the peer never shows with them in
/// `syncctl peers`, memory stays flat), logs naming the peer, and takes
/// the peer's next version once its labels are sane. (ii) Metric labels:
/// 2000 GetChunks calls naming random directory ids (and requesters) add
/// none of them to `/metrics`, which stays the size it was.
#[test]
fn peer_supplied_keys() {
    let v1 = site("v1");
    let mut rig = Rig::start(57, &v1, false, "");

    // (i) 7 MiB of labels.
    let m = mark(&rig.r);
    let ex0 = rig.fake.exchanges();
    rig.fake.set_labels(
        (0..7)
            .map(|i| (format!("k{i}"), "v".repeat(1 << 20)))
            .collect(),
    );
    rig.publish(&site("v2 under huge labels"));
    wait_for(
        &rig.r,
        30,
        "ten exchanges answered with 7 MiB of labels",
        || (rig.fake.exchanges() >= ex0 + 10).then_some(()),
    );
    let peers = ctl_json(&rig.r, &["peers"]);
    for p in peers["peers"].as_array().into_iter().flatten() {
        if p["node_id"] == EVIL {
            let size: usize = p["labels"].as_object().map_or(0, |l| {
                l.iter()
                    .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
                    .sum()
            });
            assert!(
                size < 4096,
                "the replica kept {size} bytes of the peer's labels"
            );
        }
    }
    // 50 MiB: each 7 MiB answer is decoded and dropped; keeping labels (or
    // copies of them per exchange) would grow without bound.
    let grew = rig.growth_mib();
    assert!(grew < 50, "peak RSS grew {grew} MiB from the peer's labels");
    // The peer is named by id or, its identity being refused, by address.
    let fake_address = rig.fake.address.clone();
    wait_for(
        &rig.r,
        10,
        "a warning naming the peer whose labels were refused",
        || log_names(&rig.r, &m, &[EVIL, fake_address.as_str()]).then_some(()),
    );
    // Sane labels again: the replica takes the peer's next version.
    rig.fake
        .set_labels(HashMap::from([("zone".to_string(), "a".to_string())]));
    rig.recover(
        &site("v3 with sane labels"),
        "the next version once the labels are sane",
    );

    // (ii) Metric labels from requests, against a daemon with /metrics.
    let mtmp = tempfile::tempdir().unwrap();
    let mip = "127.0.57.3";
    let metrics_addr = format!("{mip}:9740");
    let peer_addr = format!("{mip}:7400");
    let mut md = Daemon::with(
        mtmp.path(),
        "m",
        mip,
        "source",
        &[],
        &format!("[metrics]\nlisten = \"{metrics_addr}\""),
        "",
    );
    let rt = rig.fake.rt();
    wait_for(&md, 30, "the peer port of the metrics daemon", || {
        rt.block_on(connect(&peer_addr)).ok().map(|_| ())
    });
    let before = wait_for(&md, 30, "the metrics endpoint", || {
        http_get(&metrics_addr, "/metrics")
    });
    let dirs: Vec<String> = (0..2000).map(|i| format!("xq{i:05}")).collect();
    let requesters: Vec<String> = (0..2000).map(|i| format!("evil{i:05}")).collect();
    rt.block_on(async {
        let client = connect(&peer_addr)
            .await
            .expect("connecting to the metrics daemon");
        let mut set = tokio::task::JoinSet::new();
        for (i, (dir, requester)) in dirs.iter().zip(&requesters).enumerate() {
            let mut c = client.clone();
            let req = pb::GetChunksRequest {
                dir: dir.clone(),
                hashes: vec![pseudo_random(32, 9000 + 2 * i as u64)],
                requester: requester.clone(),
                ..Default::default()
            };
            set.spawn(async move {
                if let Ok(resp) = c.get_chunks(req).await {
                    let mut s = resp.into_inner();
                    while let Ok(Some(_)) = s.message().await {}
                }
            });
            while set.len() >= 32 {
                set.join_next().await;
            }
        }
        while set.join_next().await.is_some() {}
    });
    let after = http_get(&metrics_addr, "/metrics").expect("/metrics after the requests");
    for id in dirs.iter().chain(&requesters) {
        assert!(!after.contains(id.as_str()), "{id} became part of /metrics");
    }
    assert!(
        after.len() < before.len() + (64 << 10),
        "/metrics grew from {} to {} bytes",
        before.len(),
        after.len()
    );
    alive(&mut md);
    rig.finish(100);
}

/// Asks a replica for one chunk over and over in the background, and
/// records anything it sends for it that is not the chunk.
struct Hammer {
    stop: Arc<AtomicBool>,
    good: Arc<AtomicU64>,
    bad: Arc<Mutex<Vec<String>>>,
}

impl Hammer {
    fn start(rt: &tokio::runtime::Runtime, addr: String, want: Vec<u8>, secret: Vec<u8>) -> Hammer {
        let h = Hammer {
            stop: Arc::new(AtomicBool::new(false)),
            good: Arc::new(AtomicU64::new(0)),
            bad: Arc::new(Mutex::new(Vec::new())),
        };
        let (stop, good, bad) = (h.stop.clone(), h.good.clone(), h.bad.clone());
        let hash = Hash::of(&want).as_bytes().to_vec();
        rt.spawn(async move {
            let mut client: Option<PeerClient<Channel>> = None;
            while !stop.load(Ordering::Relaxed) {
                if client.is_none() {
                    client = connect(&addr).await.ok();
                }
                let result = match client.as_mut() {
                    Some(c) => Some(
                        tokio::time::timeout(
                            Duration::from_secs(5),
                            read_chunks(c, DIR, vec![hash.clone()]),
                        )
                        .await,
                    ),
                    None => None,
                };
                match result {
                    Some(Ok(Ok(chunks))) => {
                        for ch in chunks {
                            if ch.data.is_empty() {
                                continue;
                            }
                            if ch.data[..] == want[..] {
                                good.fetch_add(1, Ordering::Relaxed);
                            } else {
                                bad.lock().unwrap().push(format!(
                                    "{} bytes that are not the chunk{}",
                                    ch.data.len(),
                                    if ch.data[..] == secret[..] {
                                        " but THE SECRET beside the root"
                                    } else {
                                        ""
                                    }
                                ));
                            }
                        }
                    }
                    Some(_) => client = None,
                    None => {}
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        h
    }

    fn good(&self) -> u64 {
        self.good.load(Ordering::Relaxed)
    }

    fn leak(&self) -> Option<String> {
        let bad = self.bad.lock().unwrap();
        (!bad.is_empty()).then(|| format!("the replica served, for f.bin's chunk: {bad:?}"))
    }
}

impl Drop for Hammer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Item 9: the replica holds f.bin (4000 bytes A). Version 2 turns f.bin
/// into a symlink to `../secret` (a file beside the data directory) and
/// adds z.bin, whose chunk is never served: the apply fails after the
/// symlink exists, while the index still says A is in f.bin. The old
/// replica then served, for A's hash, whatever f.bin led to: the secret.
/// Now it serves A or nothing, asked all along the attack (in the
/// background) and once more after; the secret is never written either,
/// and the next version replaces the symlink.
#[test]
fn reads_outside_root() {
    let a = pseudo_random(4000, 0x5810);
    let v1 = build_version(vec![("f.bin", a.clone(), 0o644, MTIME)], &[]);
    let mut rig = Rig::start(58, &v1, false, "");
    let secret = pseudo_random(4000, 0x5820);
    let secret_path = rig.r.base.join("secret");
    fs::write(&secret_path, &secret).unwrap();
    rig.canary.allow("secret");
    let replica_addr = "127.0.58.2:7400".to_string();

    let hammer = Hammer::start(
        rig.fake.rt(),
        replica_addr.clone(),
        a.clone(),
        secret.clone(),
    );
    wait_for(&rig.r, 30, "the replica serves f.bin's chunk", || {
        (hammer.good() > 0).then_some(())
    });

    let z = pseudo_random(4000, 0x5830);
    let mut craft = Craft::default();
    let z_entry = craft.entry("z.bin", &z, 0o644, MTIME, false);
    let root = craft.put(&Node::DirLeaf(vec![
        link_entry("f.bin", "../secret"),
        z_entry,
    ]));
    let v2 = craft.finish(root, 2, 4000);
    let m = rig.attack(&v2);
    wait_error(&rig.r, &m, 45, &[], || hammer.leak());
    // Keep asking for a while after the failure too (a measurement window).
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        assert!(running(&rig.r), "the replica exited\n{}", log_tail(&rig.r));
        if let Some(leak) = hammer.leak() {
            panic!("{leak}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let direct = rig.fake.rt().block_on(fetch_once(
        &replica_addr,
        DIR,
        vec![Hash::of(&a).as_bytes().to_vec()],
    ));
    if let Ok(chunks) = direct {
        for c in chunks {
            assert!(
                c.data.is_empty() || c.data[..] == a[..],
                "the replica served {} bytes for f.bin's chunk{}",
                c.data.len(),
                if c.data[..] == secret[..] {
                    ": the secret"
                } else {
                    ""
                }
            );
        }
    }
    drop(hammer);
    assert_eq!(
        fs::read(&secret_path).unwrap(),
        secret,
        "the secret was written"
    );

    let v3 = build_version(
        vec![
            ("f.bin", a.clone(), 0o644, MTIME),
            ("z.bin", z.clone(), 0o644, MTIME),
        ],
        &[],
    );
    rig.recover(&v3, "the next version replaces the symlink");
    assert_eq!(
        fs::read(&secret_path).unwrap(),
        secret,
        "the secret was written"
    );
    rig.finish(150);
}

/// Item 11: modes and names a peer may not impose, each its own version,
/// each refused with an error naming the path and the peer, nothing
/// applied, and the next valid version applied after each: (a) a setuid
/// file; (b) the same name in two pages of one directory (the old replica
/// applied both and flapped: 30 failed pulls in 4 s); (c) a file named like
/// the materializer's temp files; (d) an mtime of i64::MAX (no file system
/// stores it; the old materializer overflowed on it).
#[test]
fn modes_and_names() {
    let v1 = site("v1");
    let mut rig = Rig::start(59, &v1, false, "");
    let mut current = v1;

    // (a) set-user-id.
    let suid = build_version(
        vec![("suid.bin", b"#!/bin/sh\nid\n".to_vec(), 0o4755, MTIME)],
        &[],
    );
    let m = rig.attack(&suid);
    wait_error(&rig.r, &m, 45, &["suid.bin"], || None);
    rig.assert_unchanged(&current, "a setuid file");
    let setid = special_bits(&rig.r.data);
    assert!(setid.is_empty(), "set-id bits under the root: {setid:?}");
    current = site("after the setuid file");
    rig.recover(&current, "the next version after the setuid file");

    // (b) dup.txt in two leaves under one index node.
    let mut craft = Craft::default();
    let leaf1 = vec![
        craft.entry("a.txt", b"a\n", 0o644, MTIME, true),
        craft.entry("dup.txt", b"dup one\n", 0o644, MTIME, true),
    ];
    let leaf2 = vec![
        craft.entry("dup.txt", b"dup two\n", 0o644, MTIME, true),
        craft.entry("z.txt", b"z\n", 0o644, MTIME, true),
    ];
    let bytes: u64 = leaf1
        .iter()
        .chain(&leaf2)
        .map(|e| match e.meta {
            EntryMeta::File { size, .. } => size,
            _ => 0,
        })
        .sum();
    let h1 = craft.put(&Node::DirLeaf(leaf1));
    let h2 = craft.put(&Node::DirLeaf(leaf2));
    let root = craft.put(&Node::Index {
        tree: Tree::Dir,
        level: 1,
        children: vec![Child { hash: h1, below: 2 }, Child { hash: h2, below: 2 }],
    });
    let dup = craft.finish(root, 4, bytes);
    let m = rig.attack(&dup);
    wait_error(&rig.r, &m, 45, &["dup.txt"], || None);
    rig.assert_unchanged(&current, "a name repeated across pages");
    let n0 = rig.fake.get_nodes();
    observe(&rig.r, Duration::from_secs(10));
    // ≤ 60 GetNodes calls in 10 s: an attempt reads the index node, two
    // leaves and a few recipes (~6 nodes); with backoff 1, 2, 4, 8 s there
    // are at most ~5 attempts in the window. The old replica made 30
    // failed pulls in 4 s.
    let calls = rig.fake.get_nodes() - n0;
    assert!(
        calls <= 60,
        "{calls} GetNodes calls in 10 s: a flapping retry loop"
    );
    current = site("after the duplicate names");
    rig.recover(&current, "the next version after the duplicate names");

    // (c) A reserved temp-file name.
    let reserved = build_version(
        vec![(
            ".syncd-tmp.1.2.x",
            b"not a temp file\n".to_vec(),
            0o644,
            MTIME,
        )],
        &[],
    );
    let m = rig.attack(&reserved);
    wait_error(&rig.r, &m, 45, &[".syncd-tmp.1.2.x"], || None);
    rig.assert_unchanged(&current, "a reserved temp-file name");
    current = site("after the reserved name");
    rig.recover(&current, "the next version after the reserved name");

    // (d) mtime i64::MAX.
    let future = build_version(
        vec![("future.bin", b"later\n".to_vec(), 0o644, i64::MAX)],
        &[],
    );
    let m = rig.attack(&future);
    wait_error(&rig.r, &m, 45, &["future.bin"], || None);
    rig.assert_unchanged(&current, "an mtime of i64::MAX");
    current = site("after the far future");
    rig.recover(&current, "the next version after the far-future mtime");
    rig.finish(150);
}

/// Trust issue (11), item 5: a peer that copied the real (version, root)
/// and answered `GetNodes` with nothing blocked pulls, because the
/// manifest was read only from the first full holder and its
/// self-declared labels sorted it first. Now the replica reads the
/// manifest from the next holder in the same pull — no failed attempt —
/// and the liar is demoted, visibly.
#[test]
fn withholding() {
    let tmp = tempfile::tempdir().unwrap();
    let (src_ip, r_ip, fake_ip) = ("127.0.60.1", "127.0.60.2", "127.0.60.3");
    let fake = FakePeer::start(fake_ip);
    // The liar says it sits in the replica's rack; the source elsewhere.
    fake.set_labels(HashMap::from([
        ("region".to_string(), "eu".to_string()),
        ("zone".to_string(), "a".to_string()),
        ("rack".to_string(), "r1".to_string()),
    ]));
    let src = Daemon::with(
        tmp.path(),
        "src",
        src_ip,
        "source",
        &[r_ip],
        "labels = { region = \"eu\", zone = \"a\", rack = \"r9\" }",
        "",
    );
    fs::write(src.data.join("index.html"), b"the real content").unwrap();
    // The liar lists src's genuine version, as any node that saw it can.
    let genuine = |min: u64| {
        wait_for(&src, 30, "src's version", || {
            let probe = syncd::transport::grpc::GrpcTransport::default();
            let me = pb::Holdings {
                from: Some(pb::Member {
                    node_id: "probe".into(),
                    address: "127.0.60.9:7400".into(),
                    labels: Default::default(),
                }),
                protocol: syncd::wire::PROTOCOL,
                incarnation: 1,
                seq: 1,
                ..Default::default()
            };
            use syncd::transport::Transport as _;
            let reply = fake
                .rt()
                .block_on(probe.exchange(&format!("{src_ip}:7400"), me))
                .ok()?;
            reply.dirs.first().filter(|v| v.version >= min).cloned()
        })
    };
    let mut r = Daemon::with(
        tmp.path(),
        "r",
        r_ip,
        "replica",
        &[fake_ip, src_ip],
        "labels = { region = \"eu\", zone = \"a\", rack = \"r1\" }",
        "",
    );
    common::converge(&src, &[&r], "the first version, from src");
    // Each next version: r paused until it sees both src and the liar
    // holding it, so one pull has both as holders, the liar nearest.
    let next = |r: &Daemon, n: u64, text: &[u8]| {
        let (code, _, err) = ctl(r, &["pause", DIR]);
        assert_eq!(code, 0, "{err}");
        fs::write(src.data.join("index.html"), text).unwrap();
        fake.claim(genuine(n));
        wait_for(
            r,
            30,
            "r to see src and the liar holding the version",
            || {
                let peers = ctl_json(r, &["peers"]);
                let holding = peers["peers"]
                    .as_array()?
                    .iter()
                    .filter(|p| {
                        p["holds"]
                            .as_array()
                            .is_some_and(|h| h.iter().any(|h| h["dir"] == DIR && h["version"] == n))
                    })
                    .count();
                (holding == 2).then_some(())
            },
        );
        let (code, _, err) = ctl(r, &["resume", DIR]);
        assert_eq!(code, 0, "{err}");
        common::converge(&src, &[r], "the next version, past a withholding holder");
    };
    let asked = fake.get_nodes();
    next(&r, 2, b"the real content, two");
    assert!(
        fake.get_nodes() > asked,
        "the liar was never asked: the test would prove nothing\n{}",
        fs::read_to_string(&r.log).unwrap()
    );
    let log = fs::read_to_string(&r.log).unwrap();
    assert!(
        log.contains("passing over a holder for this version's manifest")
            && log.contains("demoting a peer"),
        "{log}"
    );
    assert!(
        !log.contains("sync failed"),
        "a pull failed on the way: {log}"
    );
    let peers = ctl_json(&r, &["peers"]);
    let evil = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node_id"] == EVIL)
        .expect("the liar is a known peer");
    assert!(
        evil["demoted"]
            .as_str()
            .is_some_and(|d| d.contains("does not have its node")),
        "{evil}"
    );
    let (_, text, _) = ctl(&r, &["peers"]);
    assert!(text.contains("demoted"), "{text}");
    // Demoted, its claims are not believed: listing the third version,
    // it is not asked for that manifest.
    let asked = fake.get_nodes();
    next(&r, 3, b"the real content, three");
    assert_eq!(fake.get_nodes(), asked, "the demoted liar was asked again");
    let log = fs::read_to_string(&r.log).unwrap();
    assert!(
        !log.contains("sync failed"),
        "a pull failed on the way: {log}"
    );
    alive(&mut r);
}
