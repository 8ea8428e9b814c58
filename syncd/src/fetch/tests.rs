use std::collections::HashSet;
use std::sync::atomic::AtomicUsize;

use chunk_store::testdata::pseudo_random;

use super::*;

/// An in-memory peer: holds some chunks, can fail calls, counts what it
/// was asked for and how much it ever had outstanding.
struct FakePeer {
    name: String,
    chunks: HashMap<Hash, Bytes>,
    fail_calls: bool,
    /// Chunks it answers with wrong bytes.
    corrupt: HashSet<Hash>,
    asked: Arc<AtomicUsize>,
    delay: Duration,
}

impl ChunkPeer for FakePeer {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self, chunks: Vec<ChunkEntry>, _insist: bool) -> Fut<FetchResult> {
        self.asked.fetch_add(chunks.len(), Ordering::SeqCst);
        let fail = self.fail_calls;
        let delay = self.delay;
        let out: HashMap<Hash, Bytes> = chunks
            .iter()
            .map(|c| &c.hash)
            .filter_map(|h| {
                let b = self.chunks.get(h)?.clone();
                if self.corrupt.contains(h) {
                    // A real peer verifies; a corrupt chunk never reaches
                    // the fetcher. Model that: it is simply absent.
                    return None;
                }
                Some((*h, b))
            })
            .collect();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            if fail {
                Err(FetchError::Failed("connection refused".to_string()))
            } else {
                Ok(out.into())
            }
        })
    }
}

struct Data {
    order: Vec<ChunkEntry>,
    bytes: HashMap<Hash, Bytes>,
}

/// `n` distinct chunks of 64 KiB.
fn data(n: usize) -> Data {
    let mut order = Vec::new();
    let mut bytes = HashMap::new();
    for i in 0..n {
        let b = Bytes::from(pseudo_random(
            64 << 10,
            (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ));
        let h = Hash::of(&b);
        order.push(ChunkEntry {
            hash: h,
            len: b.len() as u32,
        });
        bytes.insert(h, b);
    }
    Data { order, bytes }
}

fn peer(name: &str, chunks: HashMap<Hash, Bytes>) -> FakePeer {
    FakePeer {
        name: name.into(),
        chunks,
        fail_calls: false,
        corrupt: HashSet::new(),
        asked: Arc::new(AtomicUsize::new(0)),
        delay: Duration::from_millis(1),
    }
}

fn small_windows() -> FetchConfig {
    FetchConfig {
        window_bytes: 256 << 10, // 4 chunks
        ahead_bytes: 1 << 20,
        stall: Duration::from_secs(20),
        ..Default::default()
    }
}

/// Reads every chunk in order on a blocking thread, as the materializer does.
fn read_all(rt: &tokio::runtime::Runtime, f: Fetcher, d: &Data) -> (Fetcher, Vec<Option<Bytes>>) {
    let order = d.order.clone();
    rt.block_on(async move {
        tokio::task::spawn_blocking(move || {
            let got = order.iter().map(|c| f.read_chunk(c).unwrap()).collect();
            (f, got)
        })
        .await
        .unwrap()
    })
}

fn start(rt: &tokio::runtime::Runtime, d: &Data, peers: Vec<Arc<dyn ChunkPeer>>) -> Fetcher {
    Fetcher::start(
        rt.handle(),
        &d.order,
        peers,
        small_windows(),
        Default::default(),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn chunks_come_from_several_peers_and_in_order() {
    let rt = runtime();
    let d = data(64);
    let (a, b) = (peer("a", d.bytes.clone()), peer("b", d.bytes.clone()));
    let (asked_a, asked_b) = (a.asked.clone(), b.asked.clone());
    let f = start(&rt, &d, vec![Arc::new(a), Arc::new(b)]);
    let (f, got) = read_all(&rt, f, &d);
    for (i, (c, g)) in d.order.iter().zip(&got).enumerate() {
        assert!(
            g.as_deref() == Some(&d.bytes[&c.hash][..]),
            "chunk {i} wrong or missing"
        );
    }
    let (a, b) = (
        asked_a.load(Ordering::SeqCst),
        asked_b.load(Ordering::SeqCst),
    );
    assert_eq!(a + b, 64, "every chunk asked for exactly once");
    assert!(a > 0 && b > 0, "both peers served: a {a}, b {b}");
    assert_eq!(f.received(), 64 * (64 << 10));
    let per: u64 = f.received_by_peer().iter().map(|(_, n)| n).sum();
    assert_eq!(per, f.received());
}

#[test]
fn a_failing_peer_is_dropped_and_its_windows_fetched_elsewhere() {
    let rt = runtime();
    let d = data(40);
    let mut bad = peer("bad", d.bytes.clone());
    bad.fail_calls = true;
    let good = peer("good", d.bytes.clone());
    let f = start(&rt, &d, vec![Arc::new(bad), Arc::new(good)]);
    let (f, got) = read_all(&rt, f, &d);
    assert!(got.iter().all(Option::is_some));
    let by_peer = f.received_by_peer();
    assert_eq!(by_peer[0], ("bad".to_string(), 0));
    assert_eq!(by_peer[1].1, 40 * (64 << 10));
}

#[test]
fn a_partial_holder_serves_what_it_has_and_the_rest_comes_from_a_full_one() {
    let rt = runtime();
    let d = data(32);
    // The partial holder has every other chunk (a file it is still receiving).
    let half: HashMap<Hash, Bytes> = d
        .order
        .iter()
        .step_by(2)
        .map(|c| (c.hash, d.bytes[&c.hash].clone()))
        .collect();
    let mut full = peer("full", d.bytes.clone());
    full.delay = Duration::from_millis(20);
    let partial = peer("partial", half);
    let f = start(&rt, &d, vec![Arc::new(partial), Arc::new(full)]);
    let (f, got) = read_all(&rt, f, &d);
    assert!(got.iter().all(Option::is_some));
    let by_peer = f.received_by_peer();
    assert!(by_peer[0].1 > 0, "{by_peer:?}");
    assert_eq!(by_peer[0].1 + by_peer[1].1, 32 * (64 << 10));
}

#[test]
fn a_chunk_no_peer_has_is_reported_missing_not_waited_for() {
    let rt = runtime();
    let d = data(12);
    let mut some = d.bytes.clone();
    some.remove(&d.order[5].hash);
    let mut corrupting = peer("corrupting", d.bytes.clone());
    corrupting.corrupt.insert(d.order[5].hash);
    let f = start(
        &rt,
        &d,
        vec![Arc::new(peer("a", some)), Arc::new(corrupting)],
    );
    let (_f, got) = read_all(&rt, f, &d);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.is_none(), i == 5, "chunk {i}");
    }
}

#[test]
fn workers_stay_within_the_read_ahead_bound() {
    let rt = runtime();
    let d = data(256); // 16 MiB
    let p = peer("a", d.bytes.clone());
    let asked = p.asked.clone();
    let cfg = small_windows(); // 1 MiB ahead, 256 KiB windows
    let f = Fetcher::start(
        rt.handle(),
        &d.order,
        vec![Arc::new(p)],
        cfg,
        Default::default(),
    );
    // Nothing consumed: the workers stop at the bound.
    let bound = (cfg.ahead_bytes + cfg.window_bytes) / (64 << 10);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while asked.load(Ordering::SeqCst) < bound as usize && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    // Give a runaway worker the chance to overshoot, then check it did not:
    // reading the first chunk proves the workers ran in between.
    let first = d.order[0];
    let f = rt.block_on(async move {
        tokio::task::spawn_blocking(move || {
            f.read_chunk(&first).unwrap().unwrap();
            f
        })
        .await
        .unwrap()
    });
    let held = f.lock().ready.len() as u64 * (64 << 10);
    assert!(
        held <= cfg.ahead_bytes + cfg.window_bytes,
        "{held} bytes held ahead"
    );
    assert!(
        asked.load(Ordering::SeqCst) as u64 <= bound,
        "fetched past the bound"
    );
    let (_f, got) = read_all(&rt, f, &d);
    assert_eq!(
        got.iter().filter(|g| g.is_some()).count(),
        255,
        "the first was read already"
    );
}

/// Nearest first: a transfer of one window comes from the first-ranked
/// peer only, however the workers are scheduled (100 tries); with work
/// for both, both serve (the test above).
#[test]
fn a_small_transfer_comes_from_the_nearest_peer() {
    let rt = runtime();
    let d = data(3); // one window of 4 chunks
    for _ in 0..100 {
        let (near, far) = (peer("near", d.bytes.clone()), peer("far", d.bytes.clone()));
        let asked_far = far.asked.clone();
        let f = start(&rt, &d, vec![Arc::new(near), Arc::new(far)]);
        let (f, got) = read_all(&rt, f, &d);
        assert!(got.iter().all(Option::is_some));
        assert_eq!(asked_far.load(Ordering::SeqCst), 0);
        assert_eq!(f.received_by_peer()[0].1, 3 * (64 << 10));
    }
}

/// A peer that holds everything, answers after `delay`, and records the
/// most calls it ever had in flight at once.
struct Tracked {
    name: String,
    chunks: HashMap<Hash, Bytes>,
    delay: Duration,
    calls: Arc<AtomicUsize>,
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl Tracked {
    fn new(name: &str, d: &Data, delay: Duration) -> Tracked {
        Tracked {
            name: name.into(),
            chunks: d.bytes.clone(),
            delay,
            calls: Arc::default(),
            now: Arc::default(),
            most: Arc::default(),
        }
    }
}

impl ChunkPeer for Tracked {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self, chunks: Vec<ChunkEntry>, _insist: bool) -> Fut<FetchResult> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let out: HashMap<Hash, Bytes> = chunks
            .iter()
            .map(|c| (c.hash, self.chunks[&c.hash].clone()))
            .collect();
        let (delay, now) = (self.delay, self.now.clone());
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            now.fetch_sub(1, Ordering::SeqCst);
            Ok(out.into())
        })
    }
}

use crate::bandwidth::{Bandwidth, Caps, Control, DirBandwidth, Priority};

fn gated(
    d: &Data,
    bw: &Arc<Bandwidth>,
    dir: &Arc<DirBandwidth>,
    peer: Tracked,
) -> (Fetcher, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let (calls, most) = (peer.calls.clone(), peer.most.clone());
    let f = Fetcher::new(
        &tokio::runtime::Handle::current(),
        &d.order,
        FetchConfig {
            // Everything may be fetched ahead: no materializer reads here.
            ahead_bytes: 64 << 20,
            ..small_windows()
        },
        Default::default(),
        None,
        Some(Hold {
            gate: Arc::new(bw.transfer(dir)),
            stopping: Arc::default(),
        }),
    );
    f.add_peer(Arc::new(peer), true);
    (f, calls, most)
}

fn dir_bw(
    bw: &Bandwidth,
    id: &str,
    caps: Caps,
    paused: bool,
    priority: Priority,
) -> Arc<DirBandwidth> {
    let d = Arc::new(DirBandwidth::new(id, caps, Control { paused, priority }));
    bw.register(d.clone());
    d
}

/// Steps paused time until `f` has everything, returning how long it took.
async fn until_done(f: &Fetcher) -> Duration {
    let start = tokio::time::Instant::now();
    while f.progress().0 > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(start.elapsed() < Duration::from_secs(600), "never finished");
    }
    start.elapsed()
}

/// A paused transfer makes no call however long it stays paused, and
/// finishes once resumed (paused time: a minute passes in no time).
#[tokio::test(start_paused = true)]
async fn a_paused_transfer_makes_no_calls_until_resumed() {
    let d = data(32);
    let bw = Arc::new(Bandwidth::default());
    let dir = dir_bw(&bw, "www", Caps::default(), true, Priority::Normal);
    let (f, calls, _) = gated(
        &d,
        &bw,
        &dir,
        Tracked::new("a", &d, Duration::from_millis(5)),
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "a paused transfer asked a peer"
    );
    assert_eq!(f.progress().0, 32 * (64 << 10));
    dir.set_paused(false);
    until_done(&f).await;
    assert_eq!(f.received(), 32 * (64 << 10));
}

/// A directory's download cap and the node's both hold: 4 MiB through a
/// 1 MiB/s cap takes 3 s after the first second's burst, whichever of the
/// two is the smaller.
#[tokio::test(start_paused = true)]
async fn download_caps_hold_the_rate() {
    let d = data(64); // 4 MiB
    for (node_cap, dir_cap) in [(None, Some(1 << 20)), (Some(1 << 20), Some(8 << 20))] {
        let bw = Arc::new(Bandwidth::new(Caps {
            upload: None,
            download: node_cap,
        }));
        let caps = Caps {
            upload: None,
            download: dir_cap,
        };
        let dir = dir_bw(&bw, "www", caps, false, Priority::Normal);
        let (f, _, _) = gated(
            &d,
            &bw,
            &dir,
            Tracked::new("a", &d, Duration::from_millis(1)),
        );
        let took = until_done(&f).await.as_secs_f64();
        assert!(
            (2.9..3.3).contains(&took),
            "4 MiB at 1 MiB/s (node {node_cap:?}, dir {dir_cap:?}) took {took} s"
        );
    }
}

/// While a high-priority transfer runs, a low-priority one keeps one
/// call in flight (it trickles, it does not stall); alone, it uses its
/// peer's every call slot.
#[tokio::test(start_paused = true)]
async fn a_low_priority_transfer_trickles_while_a_high_one_runs() {
    let bw = Arc::new(Bandwidth::default());
    let (big, small) = (data(256), data(32));
    let low = dir_bw(&bw, "bulk", Caps::default(), false, Priority::Low);
    let high = dir_bw(&bw, "conf", Caps::default(), false, Priority::High);
    let delay = Duration::from_millis(50);
    let (f_high, _, most_high) = gated(&small, &bw, &high, Tracked::new("h", &small, delay));
    let (f_low, calls_low, most_low) = gated(&big, &bw, &low, Tracked::new("l", &big, delay));
    until_done(&f_high).await;
    assert!(
        most_high.load(Ordering::SeqCst) >= 2,
        "the high transfer used its slots"
    );
    assert_eq!(
        most_low.load(Ordering::SeqCst),
        1,
        "the low transfer trickled"
    );
    assert!(
        calls_low.load(Ordering::SeqCst) > 0,
        "the low transfer did not stall"
    );
    assert!(f_low.progress().0 > 0);
    // The high transfer ends: the low one gets every slot back.
    drop(f_high);
    until_done(&f_low).await;
    assert!(most_low.load(Ordering::SeqCst) >= 2);
}
