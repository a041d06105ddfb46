//! Next-token selection: greedy, or sampling with temperature, top-k, top-p
//! and repetition penalty from a seeded generator.
//!
//! Order of processing (as in HF transformers and vLLM): repetition penalty
//! on the raw logits, then temperature, then top-k, then top-p (nucleus),
//! then a draw. `temperature == 0` is greedy (argmax after the penalty).
//! Reported log-probabilities are those of the raw model distribution.
//!
//! The draw is Gumbel-max with noise fixed by (seed, position, token): the
//! token at position `t` is `argmax_x ln q(x) + G(seed, t, x)`, which is
//! distributed exactly as `q`. Because the noise belongs to the position and
//! not to a stream, the same seed gives the same tokens however many draft
//! trees were verified on the way (speculative and plain decoding agree
//! token for token), and a recomputed (preempted) request repeats itself.

use crate::ops::log_sum_exp;

/// Per-request sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// 1 means no penalty.
    pub repetition_penalty: f32,
    /// `None`: seeded from the OS.
    pub seed: Option<u64>,
    /// Alternatives reported with each chosen token (the most probable
    /// tokens of the raw distribution, with their logprobs); 0: none.
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: None,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Message naming the first invalid field, if any.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A chosen token and its log-probability under the raw model distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token_id: u32,
    pub logprob: f32,
    /// The `top_logprobs` most probable tokens of the raw distribution and
    /// their logprobs, most probable first (empty unless asked for).
    pub top: Vec<(u32, f32)>,
}

impl SampledToken {
    /// `token_id` chosen from the raw logits `row`, with the `top` most
    /// probable alternatives.
    pub fn from_row(row: &[f32], token_id: u32, top: usize) -> Self {
        let z = log_sum_exp(row);
        let top = if top == 0 {
            Vec::new()
        } else {
            let mut ids: Vec<u32> = (0..row.len() as u32).collect();
            let k = top.min(ids.len());
            let by_logit = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
            if k < ids.len() {
                ids.select_nth_unstable_by(k - 1, by_logit);
                ids.truncate(k);
            }
            ids.sort_unstable_by(by_logit);
            ids.into_iter().map(|t| (t, row[t as usize] - z)).collect()
        };
        SampledToken {
            token_id,
            logprob: row[token_id as usize] - z,
            top,
        }
    }
}

/// A sequence's sampler: its settings and its random stream.
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    /// Scratch: (token, probability) candidates, reused across calls.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Sampler {
            params,
            seed,
            candidates: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits; `history` is every token
    /// of the sequence so far (prompt and output) for the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> SampledToken {
        let mut processed = logits.to_vec();
        apply_repetition_penalty(&mut processed, history, self.params.repetition_penalty);
        let token_id = if self.params.is_greedy() {
            argmax(&processed)
        } else {
            self.fill_candidates(&processed, false);
            gumbel_max(&self.candidates, self.seed, history.len())
        };
        SampledToken::from_row(logits, token_id, self.params.top_logprobs)
    }

    /// The distribution `sample` draws from (after penalty, temperature,
    /// top-k, top-p), as sparse (token, probability) pairs summing to 1,
    /// most probable first. Greedy is a point mass on the argmax.
    pub fn distribution(&mut self, logits: &[f32], history: &[u32]) -> Vec<(u32, f32)> {
        let mut processed = logits.to_vec();
        apply_repetition_penalty(&mut processed, history, self.params.repetition_penalty);
        if self.params.is_greedy() {
            return vec![(argmax(&processed), 1.0)];
        }
        self.fill_candidates(&processed, true);
        self.candidates.clone()
    }

    /// The (token, probability) pairs `sample` draws from, in
    /// `self.candidates`; most probable first when `sorted` or when top-k or
    /// top-p cut the vocabulary (ties by id). Only what the cuts need is
    /// sorted: top-k selects its `k` first, top-p sorts a growing head until
    /// it holds the nucleus. The sums are taken in an order that does not
    /// depend on `sorted`, so `sample` and `distribution` agree exactly.
    fn fill_candidates(&mut self, processed: &[f32], sorted: bool) {
        let t = self.params.temperature;
        let max = processed.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let by_probability = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            processed
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, ((l - max) / t).exp())),
        );
        let mut cut = false;
        if self.params.top_k > 0 && self.params.top_k < c.len() {
            c.select_nth_unstable_by(self.params.top_k - 1, by_probability);
            c.truncate(self.params.top_k);
            c.sort_unstable_by(by_probability);
            cut = true;
        }
        let total: f32 = c.iter().map(|c| c.1).sum();
        if self.params.top_p < 1.0 {
            let mut head = 64.min(c.len());
            loop {
                if head < c.len() {
                    c.select_nth_unstable_by(head - 1, by_probability);
                }
                c[..head].sort_unstable_by(by_probability);
                let mut cum = 0.0;
                let keep = c[..head].iter().position(|x| {
                    cum += x.1 / total;
                    cum >= self.params.top_p
                });
                if let Some(i) = keep {
                    c.truncate(i + 1);
                    break;
                }
                if head == c.len() {
                    break;
                }
                head = (head * 4).min(c.len());
            }
            cut = true;
        }
        if sorted && !cut {
            c.sort_unstable_by(by_probability);
        }
        let total = if cut { c.iter().map(|c| c.1).sum() } else { total };
        for x in c.iter_mut() {
            x.1 /= total;
        }
    }
}

/// CTRL-style penalty: positive logits of seen tokens are divided by the
/// penalty, negative ones multiplied (each seen token once).
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in history {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            let l = &mut logits[t];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `argmax ln p + G` over (token, probability) pairs, with Gumbel noise
/// `G` fixed by (seed, position, token).
fn gumbel_max(candidates: &[(u32, f32)], seed: u64, position: usize) -> u32 {
    let mut best = (f32::NEG_INFINITY, candidates.first().expect("at least one candidate").0);
    for &(t, p) in candidates {
        if p <= 0.0 {
            continue;
        }
        let score = p.ln() + gumbel(seed, position, t);
        if score > best.0 {
            best = (score, t);
        }
    }
    best.1
}

/// Standard Gumbel noise from a hash of (seed, position, token).
fn gumbel(seed: u64, position: usize, token: u32) -> f32 {
    let mut z = seed
        ^ (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (token as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    // splitmix64 finaliser
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // Uniform in (0, 1): 53 bits, never 0.
    let u = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (-(-u.ln()).ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9, -1.0]
    }

    #[test]
    fn greedy_takes_argmax_and_reports_raw_logprob() {
        let mut s = Sampler::new(SamplingParams::greedy());
        let out = s.sample(&logits(), &[]);
        assert_eq!(out.token_id, 1);
        let z: f32 = logits().iter().map(|l| l.exp()).sum();
        assert!((out.logprob - (3.0 - z.ln())).abs() < 1e-5);
    }

    #[test]
    fn top_logprobs_are_the_most_probable_raw_tokens_in_order() {
        let mut s = Sampler::new(SamplingParams {
            top_logprobs: 3,
            ..SamplingParams::greedy()
        });
        let out = s.sample(&logits(), &[]);
        let z = log_sum_exp(&logits());
        let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 4, 2]);
        for (t, lp) in &out.top {
            assert!((lp - (logits()[*t as usize] - z)).abs() < 1e-6);
        }
        assert_eq!(out.top[0].1, out.logprob);
        // More than the vocabulary: all of it.
        assert_eq!(SampledToken::from_row(&logits(), 0, 50).top.len(), 6);
        assert!(Sampler::new(SamplingParams::greedy())
            .sample(&logits(), &[])
            .top
            .is_empty());
    }

    #[test]
    fn same_seed_gives_same_tokens() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..50)
                .map(|i| s.sample(&logits(), &vec![0; i]).token_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&params), run(&params));
        let other = SamplingParams {
            seed: Some(8),
            ..params.clone()
        };
        assert_ne!(run(&params), run(&other));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: Some(1),
            ..Default::default()
        });
        let d = s.distribution(&logits(), &[]);
        assert_eq!(d.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 4]);
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(1),
            ..Default::default()
        });
        let d = s.distribution(&logits(), &[]);
        assert_eq!(
            d.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![1, 4],
            "p(1) ~ 0.39 < 0.5 <= p(1)+p(4)"
        );
        assert!((d.iter().map(|c| c.1).sum::<f32>() - 1.0).abs() < 1e-6);
        for i in 0..100 {
            let t = s.sample(&logits(), &vec![0; i]).token_id;
            assert!(t == 1 || t == 4);
        }
    }

    /// The nucleus and top-k of a full sort, as the partial sorts must give.
    fn reference(logits: &[f32], p: &SamplingParams) -> Vec<u32> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut c: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (((l - max) / p.temperature) as f64).exp()))
            .collect();
        c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            c.truncate(p.top_k);
        }
        let total: f64 = c.iter().map(|x| x.1).sum();
        let mut cum = 0.0;
        let keep = c
            .iter()
            .position(|x| {
                cum += x.1 / total;
                cum >= p.top_p as f64 - 1e-6
            })
            .map_or(c.len(), |i| i + 1);
        c.truncate(if p.top_p < 1.0 { keep } else { c.len() });
        c.into_iter().map(|x| x.0).collect()
    }

    #[test]
    fn partial_sorts_keep_the_full_sorts_support_and_sample_inside_it() {
        let n = 5000;
        let mut z = 0x1234_5678u64;
        let logits: Vec<f32> = (0..n)
            .map(|_| {
                z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((z >> 33) as f32 / (1u64 << 31) as f32) * 12.0 - 6.0
            })
            .collect();
        for (top_k, top_p) in [
            (0, 1.0),
            (0, 0.9),
            (0, 0.999),
            (0, 0.05),
            (50, 1.0),
            (300, 0.8),
            (4999, 0.95),
        ] {
            let params = SamplingParams {
                temperature: 0.8,
                top_k,
                top_p,
                seed: Some(3),
                ..Default::default()
            };
            let mut s = Sampler::new(params.clone());
            let d = s.distribution(&logits, &[]);
            let ids: Vec<u32> = d.iter().map(|c| c.0).collect();
            let want = reference(&logits, &params);
            // Rounding may move the nucleus's edge by one token.
            assert!(
                ids.len().abs_diff(want.len()) <= 1,
                "k {top_k} p {top_p}: {} vs {}",
                ids.len(),
                want.len()
            );
            let common = ids.len().min(want.len());
            assert_eq!(ids[..common], want[..common], "k {top_k} p {top_p}");
            assert!(d.windows(2).all(|w| w[0].1 >= w[1].1), "most probable first");
            assert!((d.iter().map(|c| c.1).sum::<f32>() - 1.0).abs() < 1e-4);
            let support: std::collections::HashSet<u32> = ids.iter().copied().collect();
            for pos in 0..200 {
                let t = s.sample(&logits, &vec![0; pos]).token_id;
                assert!(support.contains(&t), "k {top_k} p {top_p}: {t} outside the support");
                // The same draw as Gumbel-max over the distribution.
                assert_eq!(t, gumbel_max(&d, 3, pos), "k {top_k} p {top_p} at {pos}");
            }
        }
    }

    #[test]
    fn sampling_frequencies_follow_the_softmax() {
        let l = logits();
        let n = 20_000;
        let mut counts = [0usize; 6];
        for seed in 0..n {
            let mut s = Sampler::new(SamplingParams {
                temperature: 0.5,
                seed: Some(seed as u64),
                ..Default::default()
            });
            counts[s.sample(&l, &[]).token_id as usize] += 1;
        }
        let z: f32 = l.iter().map(|v| (v / 0.5).exp()).sum();
        for (i, &c) in counts.iter().enumerate() {
            let p = (l[i] / 0.5).exp() / z;
            let sd = (p * (1.0 - p) / n as f32).sqrt();
            assert!(
                (c as f32 / n as f32 - p).abs() < 5.0 * sd + 1e-3,
                "token {i}: {} vs {p}",
                c as f32 / n as f32
            );
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits(), &[1, 1]).token_id, 4, "3.0/2 < 2.9");
        let mut l = vec![-1.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1], 2.0);
        assert_eq!(l, vec![-2.0, 0.5]);
    }

    #[test]
    fn invalid_params_name_the_field() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("top_p"));
        let bad = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("temperature"));
    }
}
