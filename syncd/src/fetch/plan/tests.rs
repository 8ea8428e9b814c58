use proptest::prelude::*;

use super::*;

const K: u32 = 64 << 10;

fn chunks(n: usize) -> Vec<ChunkEntry> {
    (0..n)
        .map(|i| ChunkEntry {
            hash: Hash::of(&(i as u64).to_le_bytes()),
            len: K,
        })
        .collect()
}

fn cfg() -> PlanConfig {
    PlanConfig {
        batch_bytes: 4 * u64::from(K),
        batch_chunks: 1024,
        ahead_bytes: 64 * u64::from(K),
        per_peer: 2,
        max_errors: 3,
        endgame_bytes: 0,
        endgame_after: Duration::from_secs(1),
        insist_after: Duration::from_millis(1500),
    }
}

fn fetch(t: Take) -> Batch {
    match t {
        Take::Fetch(b) => b,
        other => panic!("expected a batch, got {other:?}"),
    }
}

fn hashes(b: &Batch) -> Vec<Hash> {
    b.chunks.iter().map(|c| c.hash).collect()
}

#[tokio::test(start_paused = true)]
async fn a_receiver_is_asked_for_its_rarest_chunks_first() {
    let c = chunks(8);
    let mut plan = Plan::new(
        &c,
        PlanConfig {
            batch_bytes: u64::from(K),
            ..cfg()
        },
        1,
    );
    let (a, b) = (plan.add_peer(false), plan.add_peer(false));
    // a holds 0..4, b holds 2..8: 0 and 1 are rarest at a.
    plan.announce(a, &c[..4].iter().map(|c| c.hash).collect::<Vec<_>>());
    plan.announce(b, &c[2..].iter().map(|c| c.hash).collect::<Vec<_>>());
    let now = Instant::now();
    let first = fetch(plan.take(a, now));
    let second = fetch(plan.take(a, now));
    let mut got = [hashes(&first), hashes(&second)].concat();
    got.sort();
    let mut want = vec![c[0].hash, c[1].hash];
    want.sort();
    assert_eq!(got, want);
    // A receiver is asked only for what it announced.
    let at_b = fetch(plan.take(b, now));
    assert!(
        hashes(&at_b)
            .iter()
            .all(|h| c[2..].iter().any(|c| c.hash == *h))
    );
}

#[tokio::test(start_paused = true)]
async fn a_full_holder_is_spared_what_a_receiver_has_and_what_it_declined() {
    let c = chunks(4);
    let mut plan = Plan::new(&c, cfg(), 2);
    let origin = plan.add_peer(true);
    let r = plan.add_peer(false);
    plan.announce(r, &[c[0].hash]);
    let now = Instant::now();
    let b = fetch(plan.take(origin, now));
    assert_eq!(
        hashes(&b),
        vec![c[1].hash, c[2].hash, c[3].hash]
            .into_iter()
            .filter(|h| hashes(&b).contains(h))
            .collect::<Vec<_>>()
    );
    assert!(
        !hashes(&b).contains(&c[0].hash),
        "the receiver serves chunk 0"
    );
    assert!(!b.insist);
    // The origin sends 1 and leaves 2 and 3 out (another receiver got them).
    let new = plan.answered(origin, &b, &|h| *h == c[1].hash, &|h| *h != c[1].hash, now);
    assert_eq!(new, vec![c[1].hash]);
    assert_eq!(
        plan.take(origin, now),
        Take::Wait,
        "declined chunks wait for a receiver"
    );
    // Nobody announced them: after insist_after the origin is asked again,
    // insisting.
    let later = now + Duration::from_millis(1500);
    let again = fetch(plan.take(origin, later));
    assert!(again.insist);
    let mut h = hashes(&again);
    h.sort();
    let mut want = vec![c[2].hash, c[3].hash];
    want.sort();
    assert_eq!(h, want);
}

#[tokio::test(start_paused = true)]
async fn in_the_endgame_a_slow_call_is_doubled_and_the_first_answer_wins() {
    let c = chunks(2);
    let mut plan = Plan::new(
        &c,
        PlanConfig {
            endgame_bytes: 2 * u64::from(K),
            ..cfg()
        },
        3,
    );
    let (slow, fast) = (plan.add_peer(true), plan.add_peer(true));
    let now = Instant::now();
    let b1 = fetch(plan.take(slow, now));
    assert_eq!(b1.chunks.len(), 2);
    assert_eq!(plan.take(fast, now), Take::Wait, "not before endgame_after");
    let later = now + Duration::from_secs(1);
    let b2 = fetch(plan.take(fast, later));
    assert_eq!(b2.chunks.len(), 2);
    assert_eq!(
        plan.answered(fast, &b2, &|_| true, &|_| false, later).len(),
        2
    );
    assert!(
        plan.answered(slow, &b1, &|_| true, &|_| false, later)
            .is_empty(),
        "the second answer brings nothing new"
    );
    assert_eq!(plan.remaining(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_failing_peer_is_dropped_and_a_chunk_nobody_has_is_unavailable() {
    let c = chunks(1);
    let mut plan = Plan::new(&c, cfg(), 4);
    let (a, b) = (plan.add_peer(true), plan.add_peer(true));
    let now = Instant::now();
    for _ in 0..3 {
        let batch = fetch(plan.take(a, now));
        plan.failed(a, &batch);
    }
    assert!(plan.is_dead(a));
    assert_eq!(plan.take(a, now), Take::Done);
    let i = plan.reading(&c[0]);
    assert!(!plan.unavailable(i), "b may still have it");
    let batch = fetch(plan.take(b, now));
    plan.answered(b, &batch, &|_| false, &|_| false, now);
    assert!(plan.unavailable(i));
}

#[tokio::test(start_paused = true)]
async fn receivers_with_different_seeds_start_on_different_chunks() {
    let c = chunks(64);
    let firsts: HashSet<Vec<Hash>> = (0..8)
        .map(|seed| {
            let mut plan = Plan::new(&c, cfg(), seed);
            let o = plan.add_peer(true);
            hashes(&fetch(plan.take(o, Instant::now())))
        })
        .collect();
    assert!(
        firsts.len() >= 6,
        "{} distinct first batches of 8",
        firsts.len()
    );
}

#[derive(Debug, Clone)]
enum Op {
    Take(usize),
    Answer(usize, u8),
    Fail(usize),
    Announce(usize, Vec<usize>),
    Complete(usize),
    Drop(usize),
    Read,
    Advance(u16),
}

fn op(peers: usize, n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..peers).prop_map(Op::Take),
        4 => (0..peers, any::<u8>()).prop_map(|(p, m)| Op::Answer(p, m)),
        1 => (0..peers).prop_map(Op::Fail),
        3 => (0..peers, proptest::collection::vec(0..n, 0..8)).prop_map(|(p, v)| Op::Announce(p, v)),
        1 => (0..peers).prop_map(Op::Complete),
        1 => (0..peers).prop_map(Op::Drop),
        3 => Just(Op::Read),
        1 => (0u16..3000).prop_map(Op::Advance),
    ]
}

proptest! {
    /// Whatever peers announce, answer, fail or leave: a receiver is asked
    /// only for what it announced, no peer has more than `per_peer` calls
    /// out, nothing beyond the read-ahead window is asked, and once one
    /// full holder answers everything, every chunk arrives.
    #[test]
    fn the_plan_keeps_its_bounds_and_finishes(
        ops in proptest::collection::vec(op(4, 40), 0..200),
        seed in any::<u64>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async {
            let c = chunks(40);
            let cfg = PlanConfig { endgame_bytes: 4 * u64::from(K), ahead_bytes: 16 * u64::from(K), ..cfg() };
            let mut plan = Plan::new(&c, cfg, seed);
            let full = [true, false, false, true];
            // Peers in random racks, and a random share of the rack's
            // fetching from afar: topology must not break the bounds.
            for (p, f) in full.into_iter().enumerate() {
                plan.add_peer_at(f, (seed >> (2 * p)) as u8 & 3);
            }
            let r = (seed >> 8) % 4;
            plan.set_rack_share((seed >> 12) % 4, r);
            let mut announced: Vec<HashSet<Hash>> = vec![HashSet::new(); 4];
            let mut completed = [false; 4];
            let mut out: Vec<Vec<Batch>> = (0..4).map(|_| Vec::new()).collect();
            let mut read = 0usize;
            for op in ops {
                let now = Instant::now();
                match op {
                    Op::Take(p) => {
                        if let Take::Fetch(b) = plan.take(p, now) {
                            prop_assert!(out[p].len() < cfg.per_peer);
                            for ch in &b.chunks {
                                let i = c.iter().position(|x| x.hash == ch.hash).unwrap();
                                prop_assert!((i as u64) * u64::from(K) <= (read as u64) * u64::from(K) + cfg.ahead_bytes);
                                prop_assert!(full[p] || completed[p] || announced[p].contains(&ch.hash), "asked {p} for what it did not announce");
                            }
                            out[p].push(b);
                        }
                    }
                    Op::Answer(p, mask) => {
                        if let Some(b) = out[p].pop() {
                            let give = |h: &Hash| h.as_bytes()[0] & mask != 0 && (full[p] || completed[p] || announced[p].contains(h));
                            plan.answered(p, &b, &give, &|h| full[p] && h.as_bytes()[1] & 1 == 0, now);
                        }
                    }
                    Op::Fail(p) => {
                        if let Some(b) = out[p].pop() {
                            plan.failed(p, &b);
                        }
                    }
                    Op::Announce(p, v) => {
                        if !full[p] && !plan.is_dead(p) {
                            let hs: Vec<Hash> = v.iter().map(|&i| c[i].hash).collect();
                            announced[p].extend(hs.iter().copied());
                            plan.announce(p, &hs);
                        }
                    }
                    Op::Complete(p) => {
                        if !plan.is_dead(p) {
                            completed[p] = true;
                            plan.complete(p);
                        }
                    }
                    Op::Drop(p) => {
                        out[p].clear();
                        plan.drop_peer(p);
                    }
                    Op::Read => {
                        if read < c.len() {
                            let i = plan.reading(&c[read]);
                            if plan.is_ready(i) {
                                plan.consumed(i);
                                read += 1;
                            }
                        }
                    }
                    Op::Advance(ms) => tokio::time::advance(Duration::from_millis(ms.into())).await,
                }
            }
            // Answer what is out, then a fresh full holder serves the rest,
            // insisting when it declined.
            for (p, batches) in out.iter_mut().enumerate() {
                for b in batches.drain(..) {
                    plan.failed(p, &b);
                }
            }
            for p in 0..4 {
                plan.drop_peer(p);
            }
            // The last full holder is in another rack: what falls to
            // rack-mates still comes, as the materializer waits for it.
            let last = plan.add_peer_at(true, 1 + (seed >> 16) as u8 % 3);
            for _ in 0..10_000 {
                if read == c.len() {
                    break;
                }
                let i = plan.reading(&c[read]);
                if plan.is_ready(i) {
                    plan.consumed(i);
                    read += 1;
                    continue;
                }
                tokio::time::advance(Duration::from_millis(500)).await;
                if let Take::Fetch(b) = plan.take(last, Instant::now()) {
                    plan.answered(last, &b, &|_| true, &|_| false, Instant::now());
                }
            }
            prop_assert_eq!(read, c.len(), "every chunk arrived");
            prop_assert_eq!(plan.remaining(), 0);
            Ok(())
        })?;
    }
}

/// Two racks: a receiver asks a peer in the other rack only for what no
/// peer in its own rack has, and a far full holder only for what no
/// receiver as near has; in its own rack it takes anything.
#[tokio::test(start_paused = true)]
async fn a_chunk_crosses_to_another_rack_about_once() {
    let c = chunks(8);
    let mut plan = Plan::new(
        &c,
        PlanConfig {
            batch_bytes: 8 * u64::from(K),
            ..cfg()
        },
        3,
    );
    let origin = plan.add_peer_at(true, 1);
    let far = plan.add_peer_at(false, 1);
    let near = plan.add_peer_at(false, 0);
    let all: Vec<Hash> = c.iter().map(|c| c.hash).collect();
    // The far receiver has everything, the near one the first half.
    plan.announce(far, &all);
    plan.announce(near, &all[..4]);
    let now = Instant::now();
    let mut from_far = hashes(&fetch(plan.take(far, now)));
    from_far.sort();
    let mut second_half = all[4..].to_vec();
    second_half.sort();
    assert_eq!(
        from_far, second_half,
        "the far receiver gives what the rack lacks"
    );
    let mut from_near = hashes(&fetch(plan.take(near, now)));
    from_near.sort();
    let mut first_half = all[..4].to_vec();
    first_half.sort();
    assert_eq!(from_near, first_half);
    // Everything is asked of someone; the far full holder is spared.
    assert_eq!(plan.take(origin, now), Take::Wait);
}

/// The k-th of r receivers in a rack fetches from farther away only its
/// share of the chunks; the chunk the materializer waits for is exempt,
/// and so is everything in the endgame.
#[tokio::test(start_paused = true)]
async fn a_rack_mate_fetches_only_its_share_from_afar() {
    let c = chunks(64);
    let mut plan = Plan::new(
        &c,
        PlanConfig {
            batch_bytes: 64 * u64::from(K),
            batch_chunks: 64,
            ..cfg()
        },
        5,
    );
    let far = plan.add_peer_at(true, 1);
    plan.set_rack_share(1, 2);
    let now = Instant::now();
    let got = hashes(&fetch(plan.take(far, now)));
    assert!(!got.is_empty());
    assert!(
        got.iter().all(|h| share_of(h, 2) == 1),
        "asked a far peer for a rack-mate's share"
    );
    // The materializer waits for a chunk of the other share: asked too.
    let other = c
        .iter()
        .find(|x| share_of(&x.hash, 2) == 0)
        .expect("some chunk is the other's");
    let i = plan.reading(other);
    let got = hashes(&fetch(plan.take(far, now)));
    assert_eq!(got, vec![other.hash], "the waited-for chunk is fetched");
    assert!(!plan.is_ready(i));
}

/// From a full holder in its own rack, a receiver takes its share of the
/// front stripe first (rack-mates then seldom ask the origin for the same
/// chunk at once), and the rest after: a preference, never a filter.
#[tokio::test(start_paused = true)]
async fn from_a_near_full_holder_a_rack_mate_takes_its_share_first() {
    let c = chunks(16);
    let mut plan = Plan::new(&c, cfg(), 9);
    let origin = plan.add_peer_at(true, 0);
    plan.set_rack_share(0, 2);
    let now = Instant::now();
    let mine = c.iter().filter(|x| share_of(&x.hash, 2) == 0).count();
    assert!((4..16).contains(&mine), "{mine} of 16 in this share");
    let mut asked = Vec::new();
    while let Take::Fetch(b) = plan.take(origin, now) {
        asked.extend(hashes(&b));
    }
    // Two calls in flight of four chunks each: this node's share first.
    assert_eq!(asked.len(), 8);
    let n = mine.min(asked.len());
    assert!(
        asked[..n].iter().all(|h| share_of(h, 2) == 0),
        "another's share asked before this node's own"
    );
    if mine < 8 {
        assert!(asked[n..].iter().all(|h| share_of(h, 2) != 0));
    }
}
