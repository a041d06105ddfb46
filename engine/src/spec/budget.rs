//! The global verification budget (DESIGN §2 step 6): one budget of tree
//! tokens per step for the whole batch. Every speculating sequence gets its
//! root; the remaining nodes are chosen across all sequences best-first by
//! estimated acceptance (`exp(score)`), each sequence capped by its tier,
//! and the budget's size is the one that maximises expected committed
//! tokens per second on the engine's measured forward-cost curve.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::spec::tree::DraftTree;

/// Seconds per forward of `T` tokens, measured at warm-up.
#[derive(Debug, Clone, PartialEq)]
pub struct CostCurve {
    /// Ascending `T`, seconds.
    points: Vec<(usize, f64)>,
}

impl CostCurve {
    /// `points` must have distinct `T >= 1`; they are sorted here.
    pub fn new(mut points: Vec<(usize, f64)>) -> Self {
        assert!(!points.is_empty(), "a cost curve needs at least one point");
        points.sort_by_key(|p| p.0);
        CostCurve { points }
    }

    pub fn points(&self) -> &[(usize, f64)] {
        &self.points
    }

    /// Largest measured `T`.
    pub fn max_tokens(&self) -> usize {
        self.points.last().expect("non-empty").0
    }

    /// Piecewise-linear cost; beyond the last point the last slope goes on.
    pub fn cost(&self, t: usize) -> f64 {
        let p = &self.points;
        if p.len() == 1 {
            return p[0].1 * t.max(1) as f64 / p[0].0 as f64;
        }
        let i = p.partition_point(|q| q.0 < t).clamp(1, p.len() - 1);
        let (a, b) = (p[i - 1], p[i]);
        let slope = (b.1 - a.1) / (b.0 - a.0) as f64;
        (a.1 + slope * (t as f64 - a.0 as f64)).max(0.0)
    }
}

/// Weight of one observed forward in [`CostCurve::observe`]: about the
/// last twenty forwards of a size shape its point.
const OBSERVE_RATE: f64 = 0.05;

impl CostCurve {
    /// Folds in a forward of `t` tokens that took `secs` (the engine's own
    /// decode steps): the points on either side of `t` move towards it in
    /// proportion to how much `t` reads each, one observation being off by
    /// at most half the curve's price (a stall of the machine is not a
    /// price), each kept between its neighbours (so the curve stays
    /// non-decreasing without one noisy size dragging the others along).
    /// Sizes beyond the last point are not observed.
    pub fn observe(&mut self, t: usize, secs: f64) {
        let p = &mut self.points;
        if t == 0 || t > p.last().expect("non-empty").0 || !secs.is_finite() {
            return;
        }
        let predicted = self.cost(t);
        let err = (secs - predicted).clamp(-0.5 * predicted, 0.5 * predicted) * OBSERVE_RATE;
        let p = &mut self.points;
        let i = p.partition_point(|q| q.0 < t);
        let touched = if p[i].0 == t || i == 0 {
            p[i].1 += err;
            i..i + 1
        } else {
            let (a, b) = (p[i - 1].0, p[i].0);
            let wb = (t - a) as f64 / (b - a) as f64;
            p[i - 1].1 += err * (1.0 - wb);
            p[i].1 += err * wb;
            i - 1..i + 1
        };
        for j in touched {
            let low = if j > 0 { p[j - 1].1 } else { 1e-6 };
            let high = p.get(j + 1).map_or(f64::INFINITY, |q| q.1).max(low);
            p[j].1 = p[j].1.max(low).min(high);
        }
    }
}

/// One sequence's candidates.
#[derive(Debug, Clone, Copy)]
pub struct SeqCandidates<'a> {
    pub tree: &'a DraftTree,
    /// Tier cap on verified nodes (besides the root).
    pub max_nodes: usize,
}

/// How to size the budget from the cost curve.
#[derive(Debug, Clone, Copy)]
pub struct RateModel<'a> {
    pub curve: &'a CostCurve,
    /// Tokens the forward runs anyway (prefill chunks, plain decodes, roots).
    pub base_tokens: usize,
    /// Seconds spent outside the forward this step (drafting).
    pub overhead_secs: f64,
    /// Tokens committed anyway (one per sampling sequence).
    pub base_committed: f64,
    /// Measured acceptance over predicted (`exp(score)`) so far: corrects
    /// a drafter's over- or under-confidence.
    pub gain_scale: f64,
}

impl RateModel<'_> {
    /// Expected committed tokens per second with `b` more nodes expected to
    /// yield `expected` accepted tokens (before scaling).
    pub fn rate(&self, b: usize, expected: f64) -> f64 {
        (self.base_committed + expected * self.gain_scale)
            / (self.curve.cost(self.base_tokens + b) + self.overhead_secs)
    }

    /// Whether even a sure draft token could raise the rate: if not, there
    /// is no point drafting this step.
    pub fn may_pay(&self) -> bool {
        self.rate(1, 1.0) > self.rate(0, 0.0)
    }

    /// The least estimated acceptance (`exp(score)`, before the gain
    /// scale) a draft node needs for [`select`] to verify it: below it, a
    /// node costs more forward time than it can gain even on the cheapest
    /// stretch of the curve within `max_extra` more tokens. Scores only
    /// fall along a path, so no descendant of such a node is verified
    /// either: a tree need not grow below it.
    pub fn least_paying_acceptance(&self, max_extra: usize) -> f64 {
        let base = self.base_tokens;
        let cheapest = (base..base + max_extra.max(1))
            .map(|t| self.curve.cost(t + 1) - self.curve.cost(t))
            .fold(f64::INFINITY, f64::min)
            .max(0.0);
        self.base_committed * cheapest / (self.curve.cost(base) + self.overhead_secs) / self.gain_scale.max(1e-9)
    }

    /// Whether drafting for `n` sequences beats not drafting at all, when
    /// each drafted sequence recently gained `accepted` tokens for `nodes`
    /// more verified tokens, and drafting takes `overhead_secs` (which not
    /// drafting saves).
    pub fn drafting_pays(&self, n: usize, accepted: f64, nodes: f64) -> bool {
        if n == 0 {
            return false;
        }
        let plain = self.base_committed / self.curve.cost(self.base_tokens);
        let extra = (n as f64 * nodes).ceil() as usize;
        let drafted = (self.base_committed + n as f64 * accepted)
            / (self.curve.cost(self.base_tokens + extra) + self.overhead_secs);
        drafted > plain
    }
}

/// Chosen nodes per sequence and what the choice expected.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Selection {
    /// Node indices per sequence (ancestor-closed, excluding the root), in
    /// the order chosen.
    pub nodes: Vec<Vec<usize>>,
    /// Sum of `exp(score)` over chosen nodes: expected accepted tokens.
    pub expected_accepted: f64,
}

#[derive(PartialEq)]
struct Ranked {
    gain: f32,
    seq: usize,
    node: usize,
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.gain
            .total_cmp(&other.gain)
            .then(other.seq.cmp(&self.seq))
            .then(other.node.cmp(&self.node))
    }
}

/// Best-first selection of at most `max_total` nodes across sequences
/// (parents before children, per-sequence caps); with `rate`, only the
/// prefix of that order that maximises expected committed tokens per second.
pub fn select(seqs: &[SeqCandidates<'_>], max_total: usize, rate: Option<RateModel<'_>>) -> Selection {
    let mut heap = BinaryHeap::new();
    for (s, c) in seqs.iter().enumerate() {
        for &child in &c.tree.nodes[0].children {
            heap.push(Ranked {
                gain: c.tree.nodes[child].score.exp(),
                seq: s,
                node: child,
            });
        }
    }
    let mut order: Vec<(usize, usize, f32)> = Vec::new();
    let mut taken = vec![0usize; seqs.len()];
    while order.len() < max_total {
        let Some(best) = heap.pop() else { break };
        if taken[best.seq] >= seqs[best.seq].max_nodes {
            continue;
        }
        taken[best.seq] += 1;
        order.push((best.seq, best.node, best.gain));
        let tree = seqs[best.seq].tree;
        for &child in &tree.nodes[best.node].children {
            heap.push(Ranked {
                gain: tree.nodes[child].score.exp(),
                seq: best.seq,
                node: child,
            });
        }
    }
    let keep = match rate {
        None => order.len(),
        Some(r) => {
            let (mut best_b, mut best_rate) = (0, r.rate(0, 0.0));
            let mut expected = 0.0;
            for (b, o) in order.iter().enumerate() {
                expected += o.2 as f64;
                let rate = r.rate(b + 1, expected);
                if rate > best_rate {
                    (best_b, best_rate) = (b + 1, rate);
                }
            }
            best_b
        }
    };
    let mut selection = Selection {
        nodes: vec![Vec::new(); seqs.len()],
        expected_accepted: 0.0,
    };
    for &(s, node, gain) in &order[..keep] {
        selection.nodes[s].push(node);
        selection.expected_accepted += gain as f64;
    }
    selection
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::drafter::Proposal;

    /// A chain of `depth` nodes below the root, each with log-prob `lp`.
    fn chain(depth: usize, lp: f32) -> DraftTree {
        let mut t = DraftTree::new(0);
        let mut v = 0;
        for d in 0..depth {
            let p = Proposal {
                candidates: vec![(d as u32 + 1, lp), (100 + d as u32, lp - 3.0)],
                entropy: 0.0,
            };
            v = t.add_children_for_test(v, &p)[0];
        }
        t
    }

    #[test]
    fn budget_is_never_exceeded_and_goes_first_to_confident_sequences() {
        let sure = chain(6, -0.05);
        let unsure = chain(6, -1.5);
        let seqs = [
            SeqCandidates {
                tree: &unsure,
                max_nodes: 8,
            },
            SeqCandidates {
                tree: &sure,
                max_nodes: 8,
            },
        ];
        let sel = select(&seqs, 5, None);
        assert_eq!(sel.nodes.iter().map(Vec::len).sum::<usize>(), 5);
        // The confident chain takes its 5 nodes before the unsure one's first (exp(-1.5) = 0.22 < exp(-0.3) = 0.74).
        assert_eq!(sel.nodes[1].len(), 5);
        assert!(sel.nodes[0].is_empty());
        // Caps hold.
        let capped = [
            SeqCandidates {
                tree: &unsure,
                max_nodes: 1,
            },
            SeqCandidates {
                tree: &sure,
                max_nodes: 2,
            },
        ];
        let sel = select(&capped, 100, None);
        assert_eq!((sel.nodes[0].len(), sel.nodes[1].len()), (1, 2));
        // Parents always precede children.
        for (s, nodes) in sel.nodes.iter().enumerate() {
            for (i, &v) in nodes.iter().enumerate() {
                let p = capped[s].tree.nodes[v].parent;
                assert!(p == 0 || nodes[..i].contains(&p));
            }
        }
    }

    #[test]
    fn budget_size_follows_the_cost_curve() {
        let sure = chain(6, -0.05);
        let seqs = [SeqCandidates {
            tree: &sure,
            max_nodes: 8,
        }];
        // Flat cost up to 4 tokens then steep: the rate peaks at 3 nodes + root.
        let curve = CostCurve::new(vec![(1, 1.0), (4, 1.0), (5, 3.0), (64, 100.0)]);
        let rate = RateModel {
            curve: &curve,
            base_tokens: 1,
            overhead_secs: 0.0,
            base_committed: 1.0,
            gain_scale: 1.0,
        };
        assert_eq!(select(&seqs, 64, Some(rate)).nodes[0].len(), 3);
        // A linear cost curve with unsure drafts: verifying pays nothing.
        let linear = CostCurve::new(vec![(1, 1.0), (64, 64.0)]);
        let unsure = chain(6, -2.0);
        let seqs = [SeqCandidates {
            tree: &unsure,
            max_nodes: 8,
        }];
        let rate = RateModel { curve: &linear, ..rate };
        assert!(select(&seqs, 64, Some(rate)).nodes[0].is_empty());
        assert!(!rate.may_pay(), "a sure token costs a whole forward more: no gain");
        // The flat curve pays for sure drafts; a drafter measured to be 10x
        // overconfident verifies fewer nodes.
        let flat = RateModel { curve: &curve, ..rate };
        assert!(flat.may_pay());
        let sure = chain(6, -0.05);
        let seqs = [SeqCandidates {
            tree: &sure,
            max_nodes: 8,
        }];
        let gentle = CostCurve::new(vec![(1, 1.0), (65, 13.8)]); // +0.2 per token
        let trusted = RateModel { curve: &gentle, ..flat };
        let humbled = RateModel {
            gain_scale: 0.1,
            ..trusted
        };
        assert_eq!(select(&seqs, 64, Some(trusted)).nodes[0].len(), 6);
        assert!(select(&seqs, 64, Some(humbled)).nodes[0].is_empty());
        assert!((linear.cost(32) - 32.0).abs() < 1e-9);
        assert!((curve.cost(128) - (100.0 + 64.0 * 97.0 / 59.0)).abs() < 1e-6);
    }

    #[test]
    fn observed_forwards_move_the_curve_towards_them_and_keep_it_rising() {
        let mut c = CostCurve::new(vec![(1, 0.010), (2, 0.011), (4, 0.012), (8, 0.020)]);
        // Plain steps measure 6 ms, not 10: T=1 follows, T=2 stays above it.
        for _ in 0..200 {
            c.observe(1, 0.006);
        }
        assert!((c.cost(1) - 0.006).abs() < 1e-4, "{}", c.cost(1));
        assert!((c.cost(2) - 0.011).abs() < 1e-9);
        // A 6-token forward moves its two neighbours (4 and 8) half each.
        for _ in 0..400 {
            c.observe(6, 0.030);
        }
        assert!((c.cost(6) - 0.030).abs() < 1e-3, "{}", c.cost(6));
        let p = c.points();
        assert!(p.windows(2).all(|w| w[0].1 <= w[1].1), "{p:?}");
        // One stall moves a point by at most a fortieth of its price.
        let before = c.cost(2);
        c.observe(2, 10.0);
        assert!(c.cost(2) <= before * 1.026);
        c.observe(64, 1.0);
        c.observe(0, 1.0);
        assert_eq!(c.points().len(), 4);
    }

    #[test]
    fn no_node_below_the_least_paying_acceptance_is_selected() {
        let curve = CostCurve::new(vec![(1, 0.005), (2, 0.006), (4, 0.008), (64, 0.068)]);
        let rate = RateModel {
            curve: &curve,
            base_tokens: 1,
            overhead_secs: 0.0,
            base_committed: 1.0,
            gain_scale: 0.5,
        };
        // The cheapest token costs 1 ms on a 5 ms step: 0.2 tokens, 0.4 before the scale.
        let least = rate.least_paying_acceptance(64);
        assert!((least - 0.4).abs() < 1e-9, "{least}");
        for lp in [-0.5f32, -0.9, -1.2, -3.0] {
            let tree = chain(6, lp);
            let seqs = [SeqCandidates {
                tree: &tree,
                max_nodes: 8,
            }];
            let sel = select(&seqs, 64, Some(rate));
            for &v in &sel.nodes[0] {
                assert!((tree.nodes[v].score as f64).exp() >= least, "lp {lp}: node {v}");
            }
        }
    }

    #[test]
    fn drafting_pays_only_when_its_measured_gain_covers_its_time() {
        let curve = CostCurve::new(vec![(1, 0.010), (16, 0.030), (32, 0.045)]);
        let rate = |overhead_secs: f64| RateModel {
            curve: &curve,
            base_tokens: 16,
            overhead_secs,
            base_committed: 16.0,
            gain_scale: 1.0,
        };
        // 16 sequences gaining 0.8 tokens each for one more verified token
        // each: 28.8 tokens in 45 ms against 16 in 30 ms plain.
        assert!(rate(0.0).drafting_pays(16, 0.8, 1.0));
        // The same with 20 ms of drafting: 28.8 in 65 ms does not pay.
        assert!(!rate(0.020).drafting_pays(16, 0.8, 1.0));
        assert!(!rate(0.0).drafting_pays(16, 0.05, 1.0));
        assert!(!rate(0.0).drafting_pays(0, 1.0, 1.0));
    }
}
