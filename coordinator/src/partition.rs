//! Balanced partition of a step's sequences over the trainer ranks, and packing of each rank's
//! sequences into micro-batches (DESIGN.md §6.3).
//!
//! Everything here works on plain weights (token counts) and returns indices into the input,
//! so it knows nothing about trajectories; [`crate::batch`] maps the result onto batch entries.
//!
//! All functions are deterministic: equal weights are ordered by their input index, so the
//! same input always gives the same assignment (the commit protocol replays a step after a
//! crash and must get the same manifest).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use serde::{Deserialize, Serialize};

/// Invalid partition or packing parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartitionError {
    /// A step needs at least one trainer rank.
    #[error(
        "cannot partition a step over 0 trainer ranks: wait until at least one trainer is alive"
    )]
    NoRanks,
    /// A micro-batch limit of 0 tokens can hold nothing.
    #[error("micro-batch limit M is 0 tokens: set it to at least 1 (typically thousands)")]
    ZeroMicroBatchLimit,
}

/// How sequences are spread over ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionStrategy {
    /// Longest processing time first: sequences in decreasing size, each to the least loaded
    /// rank. Max load ≤ (4/3 − 1/(3W))·optimum.
    Lpt,
    /// Karmarkar–Karp largest differencing, multiway. Usually closer to the optimum than LPT,
    /// with the same worst-case bound.
    KarmarkarKarp,
    /// Run both and keep the one with the smaller maximum load (Karmarkar–Karp on a tie).
    /// Costs two cheap passes and is never worse than either.
    #[default]
    Best,
}

/// An assignment of items to ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// `ranks[r]` holds the input indices assigned to rank `r`, in increasing order.
    pub ranks: Vec<Vec<usize>>,
    /// `loads[r]` is the sum of the weights assigned to rank `r`.
    pub loads: Vec<u64>,
}

impl Partition {
    /// The heaviest rank's load: what the step's wall time follows.
    pub fn max_load(&self) -> u64 {
        self.loads.iter().copied().max().unwrap_or(0)
    }

    /// Max load over mean load (1.0 is perfect balance); see [`imbalance`].
    pub fn imbalance(&self) -> f64 {
        imbalance(&self.loads)
    }
}

/// Load imbalance, max / mean, exported as a metric. 1.0 means perfectly balanced; W means
/// one rank does everything. An empty or all-zero load vector counts as balanced (1.0).
pub fn imbalance(loads: &[u64]) -> f64 {
    let total: u128 = loads.iter().map(|&l| u128::from(l)).sum();
    if loads.is_empty() || total == 0 {
        return 1.0;
    }
    let max = loads.iter().copied().max().unwrap_or(0) as f64;
    let mean = total as f64 / loads.len() as f64;
    max / mean
}

/// Splits items of the given weights over `ranks` ranks with the chosen strategy.
pub fn partition(
    weights: &[u64],
    ranks: usize,
    strategy: PartitionStrategy,
) -> Result<Partition, PartitionError> {
    if ranks == 0 {
        return Err(PartitionError::NoRanks);
    }
    let assignment = match strategy {
        PartitionStrategy::Lpt => lpt(weights, ranks),
        PartitionStrategy::KarmarkarKarp => karmarkar_karp(weights, ranks),
        PartitionStrategy::Best => {
            let kk = karmarkar_karp(weights, ranks);
            let lpt = lpt(weights, ranks);
            if lpt.max_load() < kk.max_load() {
                lpt
            } else {
                kk
            }
        }
    };
    Ok(assignment)
}

/// Item indices by decreasing weight, ties by increasing index (the determinism rule).
fn by_decreasing_weight(weights: &[u64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by_key(|&i| (Reverse(weights[i]), i));
    order
}

fn finish(weights: &[u64], mut ranks: Vec<Vec<usize>>) -> Partition {
    for rank in &mut ranks {
        rank.sort_unstable();
    }
    let loads = ranks
        .iter()
        .map(|rank| rank.iter().map(|&i| weights[i]).sum())
        .collect();
    Partition { ranks, loads }
}

/// LPT: the heaviest remaining item goes to the least loaded rank (lowest rank on a tie).
fn lpt(weights: &[u64], ranks: usize) -> Partition {
    let mut assigned = vec![Vec::new(); ranks];
    // Min-heap on (load, rank): the rank index breaks ties deterministically.
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = (0..ranks).map(|r| Reverse((0, r))).collect();
    for i in by_decreasing_weight(weights) {
        let Reverse((load, r)) = heap.pop().expect("heap holds one entry per rank");
        assigned[r].push(i);
        heap.push(Reverse((load + weights[i], r)));
    }
    finish(weights, assigned)
}

/// A partial solution of the largest differencing method: `ranks` subsets, heaviest first.
struct Tuple {
    /// (sum, items) per subset, sorted by decreasing sum.
    subsets: Vec<(u64, Vec<usize>)>,
}

impl Tuple {
    fn spread(&self) -> u64 {
        let max = self.subsets.first().map_or(0, |s| s.0);
        let min = self.subsets.last().map_or(0, |s| s.0);
        max - min
    }
}

/// Karmarkar–Karp, multiway: each item starts as a tuple of `ranks` subsets (itself and
/// empties); the two tuples with the largest spread (max − min) are merged by joining the
/// heaviest subset of one with the lightest of the other, and so on, until one tuple is left.
/// Merging large spreads first lets them cancel while fine adjustment is still possible.
fn karmarkar_karp(weights: &[u64], ranks: usize) -> Partition {
    if weights.is_empty() {
        return finish(weights, vec![Vec::new(); ranks]);
    }
    let mut tuples: Vec<Option<Tuple>> = Vec::with_capacity(2 * weights.len());
    // Max-heap on (spread, Reverse(id)): among equal spreads the older tuple comes first.
    let mut heap: BinaryHeap<(u64, Reverse<usize>)> = BinaryHeap::new();
    for i in by_decreasing_weight(weights) {
        let mut subsets = vec![(0, Vec::new()); ranks];
        subsets[0] = (weights[i], vec![i]);
        let tuple = Tuple { subsets };
        heap.push((tuple.spread(), Reverse(tuples.len())));
        tuples.push(Some(tuple));
    }
    while heap.len() > 1 {
        let (_, Reverse(a)) = heap.pop().expect("len > 1");
        let (_, Reverse(b)) = heap.pop().expect("len > 1");
        let a = tuples[a].take().expect("each tuple is merged once");
        let b = tuples[b].take().expect("each tuple is merged once");
        // Heaviest of `a` with lightest of `b`: `b.subsets` reversed is increasing.
        let mut subsets: Vec<(u64, Vec<usize>)> = a
            .subsets
            .into_iter()
            .zip(b.subsets.into_iter().rev())
            .map(|((sa, mut ia), (sb, ib))| {
                ia.extend(ib);
                (sa + sb, ia)
            })
            .collect();
        // Stable sort keeps the merge deterministic among equal sums.
        subsets.sort_by_key(|s| Reverse(s.0));
        let tuple = Tuple { subsets };
        heap.push((tuple.spread(), Reverse(tuples.len())));
        tuples.push(Some(tuple));
    }
    let (_, Reverse(last)) = heap.pop().expect("one tuple left");
    let last = tuples[last].take().expect("the final tuple is unmerged");
    finish(
        weights,
        last.subsets.into_iter().map(|(_, items)| items).collect(),
    )
}

/// Packs items into micro-batches of at most `max_tokens` by first-fit decreasing.
///
/// `items` are indices into `weights`. Each item, heaviest first (ties by index), goes into the
/// first micro-batch it fits in, or opens a new one. An item heavier than `max_tokens` gets a
/// micro-batch of its own: it is not split by token range, because the tokens after a split
/// point attend to all the tokens before it, so the trainer would need the earlier part's
/// activations anyway; running one long sequence alone (with activation checkpointing if
/// memory demands) is the trainer's concern. So a micro-batch exceeds `max_tokens` only when
/// it holds exactly one item.
///
/// Returns the micro-batches in creation order, each listing its items in placement order.
pub fn pack_micro_batches(
    weights: &[u64],
    items: &[usize],
    max_tokens: u64,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if max_tokens == 0 {
        return Err(PartitionError::ZeroMicroBatchLimit);
    }
    let mut order = items.to_vec();
    order.sort_by(|&x, &y| match weights[y].cmp(&weights[x]) {
        Ordering::Equal => x.cmp(&y),
        other => other,
    });
    let mut bins: Vec<(u64, Vec<usize>)> = Vec::new();
    for i in order {
        let w = weights[i];
        match bins
            .iter_mut()
            .find(|(load, _)| load.saturating_add(w) <= max_tokens)
        {
            Some((load, members)) => {
                *load += w;
                members.push(i);
            }
            None => bins.push((w, vec![i])),
        }
    }
    Ok(bins.into_iter().map(|(_, members)| members).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The exact minimum of the maximum load, by depth-first search with pruning.
    fn optimum(weights: &[u64], ranks: usize) -> u64 {
        fn go(sorted: &[u64], loads: &mut [u64], best: &mut u64) {
            let Some((&w, rest)) = sorted.split_first() else {
                *best = (*best).min(loads.iter().copied().max().unwrap_or(0));
                return;
            };
            for r in 0..loads.len() {
                // Ranks with equal loads are interchangeable: try only the first of them.
                if loads[..r].contains(&loads[r]) || loads[r] + w >= *best {
                    continue;
                }
                loads[r] += w;
                go(rest, loads, best);
                loads[r] -= w;
            }
        }
        let mut sorted = weights.to_vec();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let mut best = sorted.iter().sum::<u64>() + 1;
        go(&sorted, &mut vec![0; ranks], &mut best);
        best
    }

    fn check_is_partition(weights: &[u64], p: &Partition, ranks: usize) {
        assert_eq!(p.ranks.len(), ranks);
        assert_eq!(p.loads.len(), ranks);
        let mut seen: Vec<usize> = p.ranks.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..weights.len()).collect::<Vec<_>>(),
            "every item exactly once"
        );
        for (rank, load) in p.ranks.iter().zip(&p.loads) {
            assert_eq!(rank.iter().map(|&i| weights[i]).sum::<u64>(), *load);
        }
    }

    #[test]
    fn zero_ranks_and_zero_limit_are_typed_errors() {
        assert_eq!(
            partition(&[1, 2], 0, PartitionStrategy::Best),
            Err(PartitionError::NoRanks)
        );
        assert_eq!(
            pack_micro_batches(&[1], &[0], 0),
            Err(PartitionError::ZeroMicroBatchLimit)
        );
    }

    #[test]
    fn empty_input_gives_empty_ranks() {
        for strategy in [
            PartitionStrategy::Lpt,
            PartitionStrategy::KarmarkarKarp,
            PartitionStrategy::Best,
        ] {
            let p = partition(&[], 3, strategy).unwrap();
            assert_eq!(p.ranks, vec![Vec::<usize>::new(); 3]);
            assert_eq!(p.loads, vec![0; 3]);
            assert_eq!(p.imbalance(), 1.0);
        }
        assert!(pack_micro_batches(&[], &[], 10).unwrap().is_empty());
    }

    #[test]
    fn karmarkar_karp_beats_lpt_on_the_classic_example() {
        // LPT puts 8,7 | 6,5 | 4 … and ends at 16/14 on two ranks; the optimum is 15/15.
        let weights = [8, 7, 6, 5, 4];
        let lpt = partition(&weights, 2, PartitionStrategy::Lpt).unwrap();
        let kk = partition(&weights, 2, PartitionStrategy::KarmarkarKarp).unwrap();
        check_is_partition(&weights, &lpt, 2);
        check_is_partition(&weights, &kk, 2);
        assert_eq!(lpt.max_load(), 17); // 8+5+4 | 7+6
        assert_eq!(optimum(&weights, 2), 15);
        assert!(kk.max_load() <= lpt.max_load());
        let best = partition(&weights, 2, PartitionStrategy::Best).unwrap();
        assert_eq!(best.max_load(), lpt.max_load().min(kk.max_load()));
    }

    #[test]
    fn lpt_worst_case_family_is_within_its_bound() {
        // Graham's tight example for W = 3: 5,5,4,4,3,3,3 → LPT 11, optimum 9.
        let weights = [5, 5, 4, 4, 3, 3, 3];
        let lpt = partition(&weights, 3, PartitionStrategy::Lpt).unwrap();
        assert_eq!(lpt.max_load(), 11);
        assert_eq!(optimum(&weights, 3), 9);
        assert!(3 * 3 * lpt.max_load() <= (4 * 3 - 1) * 9);
        let best = partition(&weights, 3, PartitionStrategy::Best).unwrap();
        assert_eq!(
            best.max_load(),
            10,
            "Karmarkar–Karp does better than LPT here"
        );
    }

    #[test]
    fn imbalance_is_max_over_mean() {
        assert_eq!(imbalance(&[10, 10]), 1.0);
        assert_eq!(imbalance(&[30, 10]), 1.5);
        assert_eq!(imbalance(&[0, 0, 0]), 1.0);
        assert_eq!(imbalance(&[]), 1.0);
        assert_eq!(imbalance(&[9, 0, 0]), 3.0);
    }

    /// Compares both strategies with the exact optimum on random small inputs; the measured
    /// average ratios are printed (`cargo test -p flywheel-coordinator partition_quality --
    /// --nocapture`).
    #[test]
    fn partition_quality_against_exact_optimum() {
        let mut rng = StdRng::seed_from_u64(0x5eed_c3b0);
        let strategies = [
            PartitionStrategy::Lpt,
            PartitionStrategy::KarmarkarKarp,
            PartitionStrategy::Best,
        ];
        let mut ratio_sum = [0f64; 3];
        let mut worst = [1f64; 3];
        let mut optimal = [0usize; 3];
        let cases = 400;
        for _ in 0..cases {
            let ranks = rng.random_range(2..=4usize);
            let n = rng.random_range(1..=10usize);
            // Long-tailed lengths like real rollouts: mostly short, some ten times longer.
            let weights: Vec<u64> = (0..n)
                .map(|_| {
                    if rng.random_bool(0.2) {
                        rng.random_range(200..=2000)
                    } else {
                        rng.random_range(1..=200)
                    }
                })
                .collect();
            let opt = optimum(&weights, ranks);
            for (s, &strategy) in strategies.iter().enumerate() {
                let p = partition(&weights, ranks, strategy).unwrap();
                check_is_partition(&weights, &p, ranks);
                let max = p.max_load();
                assert!(
                    max >= opt,
                    "{strategy:?} beat the exact optimum: {weights:?}"
                );
                // (4/3 − 1/(3W))·OPT, in integers: 3W·max ≤ (4W − 1)·OPT.
                let w = ranks as u64;
                assert!(
                    3 * w * max <= (4 * w - 1) * opt,
                    "{strategy:?} max load {max} exceeds (4/3 - 1/(3W))·{opt} on {weights:?} over {ranks} ranks"
                );
                let ratio = max as f64 / opt as f64;
                ratio_sum[s] += ratio;
                worst[s] = worst[s].max(ratio);
                optimal[s] += usize::from(max == opt);
            }
        }
        for (s, strategy) in strategies.iter().enumerate() {
            println!(
                "partition quality {strategy:?}: mean max/OPT = {:.4}, worst = {:.4}, optimal in {}/{cases}",
                ratio_sum[s] / cases as f64,
                worst[s],
                optimal[s]
            );
        }
        // Best is never worse than either of its parts, so its average is at most theirs.
        assert!(ratio_sum[2] <= ratio_sum[0] && ratio_sum[2] <= ratio_sum[1]);
    }

    #[test]
    fn ffd_packs_to_the_limit_and_isolates_oversized_items() {
        let weights = [6, 5, 4, 3, 2, 12, 1];
        let items: Vec<usize> = (0..weights.len()).collect();
        let bins = pack_micro_batches(&weights, &items, 10).unwrap();
        // 12 alone (over M); 6+4 and 5+3+2 fill up to exactly 10; 1 fits nowhere else.
        assert_eq!(bins, vec![vec![5], vec![0, 2], vec![1, 3, 4], vec![6]]);
    }

    proptest! {
        #[test]
        fn partition_assigns_every_item_once(
            weights in proptest::collection::vec(0u64..10_000, 0..40),
            ranks in 1usize..9,
            s in 0usize..3,
        ) {
            let strategy = [PartitionStrategy::Lpt, PartitionStrategy::KarmarkarKarp, PartitionStrategy::Best][s];
            let p = partition(&weights, ranks, strategy).unwrap();
            check_is_partition(&weights, &p, ranks);
            // Lower bound of any partition; LPT's guarantee relative to it.
            let total: u64 = weights.iter().sum();
            let lower = total.div_ceil(ranks as u64).max(weights.iter().copied().max().unwrap_or(0));
            prop_assert!(p.max_load() >= lower);
            // Deterministic: a second run gives the same assignment.
            prop_assert_eq!(partition(&weights, ranks, strategy).unwrap(), p);
        }

        #[test]
        fn packing_respects_the_limit(
            weights in proptest::collection::vec(0u64..300, 0..40),
            max_tokens in 1u64..400,
        ) {
            let items: Vec<usize> = (0..weights.len()).collect();
            let bins = pack_micro_batches(&weights, &items, max_tokens).unwrap();
            let mut seen: Vec<usize> = bins.iter().flatten().copied().collect();
            seen.sort_unstable();
            prop_assert_eq!(seen, items);
            for bin in &bins {
                let load: u64 = bin.iter().map(|&i| weights[i]).sum();
                prop_assert!(load <= max_tokens || bin.len() == 1, "bin {:?} load {} > {}", bin, load, max_tokens);
            }
        }
    }
}
