//! Fitting the entropy thresholds (DESIGN §2 step 4): a depth-3 regression
//! tree on samples `(H, label)`, where the label is the rank (by score,
//! 1-based) of the accepted path's final node among the verified nodes (0
//! when nothing was accepted). Each split minimises the sum over both sides
//! of that side's mean squared error. Its 7 split points, ascending, are the
//! thresholds of bins B0..B7.

use crate::spec::drafter::NgramDrafter;
use crate::spec::policy::NUM_THRESHOLDS;

/// How often the most frequent follower of the longest earlier match was
/// the next token, by match length (index `n - 1`), over every answer
/// position of `sequences` (`(prompt length, prompt and answer tokens)`,
/// answers greedy): the hybrid drafter's n-gram scale. Laplace-smoothed,
/// so a length never seen reads one half.
pub fn fit_ngram_acceptance(ngram: &NgramDrafter, sequences: &[(usize, Vec<u32>)]) -> Vec<f32> {
    let mut hits = vec![0u32; ngram.max_ngram];
    let mut seen = vec![0u32; ngram.max_ngram];
    for (prompt_len, seq) in sequences {
        for j in (*prompt_len).max(1)..seq.len() {
            if let Some((n, followers)) = ngram.followers(&seq[..j]) {
                seen[n - 1] += 1;
                hits[n - 1] += u32::from(followers[0].0 == seq[j]);
            }
        }
    }
    hits.iter()
        .zip(&seen)
        .map(|(&h, &n)| (h as f32 + 1.0) / (n as f32 + 2.0))
        .collect()
}

/// The 7 ascending thresholds of a depth-3 regression tree on `samples`.
/// A node that cannot be split (too few samples or one distinct `H`)
/// repeats its parent's threshold, leaving an empty bin.
pub fn fit_thresholds(samples: &[(f32, f32)]) -> Vec<f32> {
    let mut sorted: Vec<(f32, f32)> = samples.iter().copied().filter(|s| s.0.is_finite()).collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let min_leaf = (sorted.len() / 40).max(2);
    let mut out = Vec::with_capacity(NUM_THRESHOLDS);
    split(&sorted, 3, min_leaf, sorted.first().map_or(0.0, |s| s.0), &mut out);
    out.sort_by(f32::total_cmp);
    out
}

fn split(samples: &[(f32, f32)], depth: usize, min_leaf: usize, fallback: f32, out: &mut Vec<f32>) {
    if depth == 0 {
        return;
    }
    let best = best_split(samples, min_leaf);
    let (threshold, at) = match best {
        Some(b) => b,
        None => (fallback, samples.partition_point(|s| s.0 < fallback)),
    };
    out.push(threshold);
    split(&samples[..at], depth - 1, min_leaf, threshold, out);
    split(&samples[at..], depth - 1, min_leaf, threshold, out);
}

/// `(threshold, index of the first sample >= threshold)` minimising
/// `mse(left) + mse(right)`, over midpoints between distinct sorted `H`.
fn best_split(samples: &[(f32, f32)], min_leaf: usize) -> Option<(f32, usize)> {
    let n = samples.len();
    if n < 2 * min_leaf {
        return None;
    }
    // Prefix sums of label and label^2 (f64).
    let mut sum = vec![0.0f64; n + 1];
    let mut sq = vec![0.0f64; n + 1];
    for (i, s) in samples.iter().enumerate() {
        sum[i + 1] = sum[i] + s.1 as f64;
        sq[i + 1] = sq[i] + (s.1 as f64).powi(2);
    }
    let mse = |a: usize, b: usize| {
        let m = (b - a) as f64;
        let mean = (sum[b] - sum[a]) / m;
        ((sq[b] - sq[a]) / m - mean * mean).max(0.0)
    };
    let mut best: Option<(f64, f32, usize)> = None;
    for at in min_leaf..=n - min_leaf {
        if samples[at - 1].0 == samples[at].0 {
            continue;
        }
        let cost = mse(0, at) + mse(at, n);
        if best.is_none_or(|b| cost < b.0) {
            best = Some((cost, (samples[at - 1].0 + samples[at].0) / 2.0, at));
        }
    }
    best.map(|b| (b.1, b.2))
}

/// The calibration label of one verified tree: rank (1-based, by score
/// among `verified`) of the deepest accepted node, 0 if none.
pub fn rank_label(scores_of_verified: &[f32], accepted_final_score: Option<f32>) -> f32 {
    match accepted_final_score {
        None => 0.0,
        Some(s) => 1.0 + scores_of_verified.iter().filter(|&&x| x > s).count() as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_acceptance_counts_hits_by_match_length() {
        let ngram = NgramDrafter {
            max_ngram: 2,
            entropy_top_k: 8,
        };
        // After prompt "1 2 3", answer "1 2 1 2": predicting the 2 at
        // index 4, "1" (n = 1) was followed by 2 (hit); the 1 at index 5,
        // "1 2" (n = 2) was followed by 3 (miss); the 2 at index 6, "1"
        // (n = 1) was followed by 2 twice (hit). Index 3 has no match.
        let fitted = fit_ngram_acceptance(&ngram, &[(3, vec![1, 2, 3, 1, 2, 1, 2])]);
        assert_eq!(fitted, vec![3.0 / 4.0, 1.0 / 3.0]);
        assert_eq!(fit_ngram_acceptance(&ngram, &[]), vec![0.5, 0.5]);
    }
    use crate::testing::Lcg;

    #[test]
    fn fit_recovers_known_thresholds_from_synthetic_data() {
        // label = number of true thresholds below H, plus noise.
        let truth = [0.5f32, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5];
        let mut rng = Lcg(7);
        let samples: Vec<(f32, f32)> = (0..4000)
            .map(|_| {
                let h = rng.f().abs() * 4.0;
                let label = truth.iter().filter(|&&t| h >= t).count() as f32;
                (h, label + (rng.f() - 0.5) * 0.2)
            })
            .collect();
        let got = fit_thresholds(&samples);
        assert_eq!(got.len(), 7);
        for (g, t) in got.iter().zip(truth) {
            assert!((g - t).abs() < 0.05, "fitted {got:?}, true {truth:?}");
        }
    }

    #[test]
    fn degenerate_data_still_gives_seven_ascending_thresholds() {
        let got = fit_thresholds(&[(1.0, 2.0); 10]);
        assert_eq!(got.len(), 7);
        assert!(got.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(rank_label(&[-0.1, -0.5, -0.3], Some(-0.3)), 2.0);
        assert_eq!(rank_label(&[-0.1], None), 0.0);
    }
}
