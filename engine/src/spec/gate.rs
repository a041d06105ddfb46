//! The guards that keep the budget rule (AUTO, HeteroSpec) from costing
//! more than plain decoding: measured outcomes, not predictions.
//!
//! - [`SeqGains`]: what drafting recently gained each sequence. A sequence
//!   whose recent drafts did not pay for their verification and drafting
//!   time is not drafted for (it costs nothing), and is tried again once
//!   its record has faded towards the engine-wide figure.
//! - [`MeasuredRates`]: committed tokens per second of the engine's own
//!   steps with drafts and without, per batch size. Where drafted steps
//!   measure slower than plain ones, or no faster by a clear margin, the
//!   rule stops drafting for that batch size and only probes drafting now
//!   and then (and plain decoding likewise while drafting wins), so the
//!   comparison stays current.
//!
//! Invariant: a guard only ever turns drafting off; what is verified when
//! drafting is on is the budget rule's choice alone, and no guard affects
//! which tokens are committed.

use std::collections::HashMap;

use heterospec_kv::SeqId;

/// Per drafted step of a sequence: its record's memory is about five of
/// its drafted steps (a request's content changes within a few lines).
const SEQ_DECAY: f64 = 0.8;
/// Per step a sequence is not drafted for: its record fades towards the
/// engine-wide figure, so it is tried again after about twenty steps.
const SEQ_FADE: f64 = 0.93;
/// Per recorded step of a batch-size bucket: a memory of about fifty steps.
const RATE_DECAY: f64 = 0.98;
/// Steps of each kind a bucket needs before the comparison decides.
const MIN_SAMPLES: f64 = 6.0;
/// One step in this many tries the arm that is losing.
const PROBE_EVERY: u64 = 24;
/// How much faster drafted steps must measure than plain ones to be
/// played: a tie goes to plain decoding, which costs nothing when it is
/// wrong by little, while a rate over some fifty noisy steps is not surer
/// than a few percent.
const DRAFTING_MARGIN: f64 = 1.02;
/// Batch-size buckets: 1, 2–3, 4–7, ..., 128 and more.
const NUM_BUCKETS: usize = 8;

#[derive(Debug, Clone, Copy, Default)]
struct SeqGain {
    drafted: f64,
    accepted: f64,
    nodes: f64,
}

/// Recent accepted tokens and verified nodes per drafted step, by sequence.
#[derive(Debug, Clone, Default)]
pub struct SeqGains {
    seqs: HashMap<SeqId, SeqGain>,
}

impl SeqGains {
    /// `(accepted, nodes)` per drafted step of `seq` recently, leaning on
    /// `prior` (the engine-wide figure) with the weight of one step.
    pub fn gain(&self, seq: SeqId, prior: (f64, f64)) -> (f64, f64) {
        let g = self.seqs.get(&seq).copied().unwrap_or_default();
        let n = g.drafted + 1.0;
        ((g.accepted + prior.0) / n, (g.nodes + prior.1) / n)
    }

    /// A step that verified `nodes` draft nodes of `seq` and accepted `accepted`.
    pub fn record(&mut self, seq: SeqId, accepted: usize, nodes: usize) {
        let g = self.seqs.entry(seq).or_default();
        g.drafted = g.drafted * SEQ_DECAY + 1.0;
        g.accepted = g.accepted * SEQ_DECAY + accepted as f64;
        g.nodes = g.nodes * SEQ_DECAY + nodes as f64;
    }

    /// A step `seq` was not drafted for because its drafts did not pay.
    pub fn skip(&mut self, seq: SeqId) {
        if let Some(g) = self.seqs.get_mut(&seq) {
            g.drafted *= SEQ_FADE;
            g.accepted *= SEQ_FADE;
            g.nodes *= SEQ_FADE;
        }
    }

    pub fn release(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }
}

/// A decaying mean.
#[derive(Debug, Clone, Copy, Default)]
struct Mean {
    sum: f64,
    weight: f64,
}

impl Mean {
    fn add(&mut self, value: f64) {
        self.sum = self.sum * RATE_DECAY + value;
        self.weight = self.weight * RATE_DECAY + 1.0;
    }

    fn get(&self) -> f64 {
        self.sum / self.weight.max(f64::MIN_POSITIVE)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Arms {
    plain: Mean,
    drafted: Mean,
    /// Steps that asked whether to draft.
    asked: u64,
}

impl Arms {
    /// Whether drafting is the arm to play (it wins by the margin, or is not
    /// yet measured against plain decoding).
    fn drafting_leads(&self) -> bool {
        self.drafted.weight < MIN_SAMPLES
            || self.plain.weight < MIN_SAMPLES
            || self.drafted.get() >= self.plain.get() * DRAFTING_MARGIN
    }
}

/// Measured committed tokens per second of decode steps with and without
/// drafts, per batch-size bucket, each step's as its speedup over plain
/// decoding by the cost curve: tokens committed per sequence, times the
/// curve's price of the step's plain forward, over the step's time (about
/// 1 for a plain step of any size, so batch sizes within a bucket compare).
#[derive(Debug, Clone, Default)]
pub struct MeasuredRates {
    buckets: [Arms; NUM_BUCKETS],
}

fn bucket(num_seqs: usize) -> usize {
    ((usize::BITS - 1 - num_seqs.max(1).leading_zeros()) as usize).min(NUM_BUCKETS - 1)
}

impl MeasuredRates {
    /// Whether a decode step of `num_seqs` sequences may draft: yes while
    /// drafting measures [`DRAFTING_MARGIN`] faster than plain decoding at
    /// this batch size (or either is not measured yet), except one step in
    /// [`PROBE_EVERY`] that decodes plainly; otherwise only that one.
    pub fn allows_drafting(&mut self, num_seqs: usize) -> bool {
        let arms = &mut self.buckets[bucket(num_seqs)];
        arms.asked += 1;
        let probe = arms.asked % PROBE_EVERY == 0;
        arms.drafting_leads() != probe
    }

    /// A decode step of `num_seqs` sequences that committed `committed`
    /// tokens in `secs` (drafting and forward), whose plain forward the
    /// cost curve prices at `plain_secs`; `drafted`: it verified drafts.
    pub fn record(&mut self, num_seqs: usize, drafted: bool, committed: usize, secs: f64, plain_secs: f64) {
        if secs <= 0.0 || committed == 0 {
            return;
        }
        let arms = &mut self.buckets[bucket(num_seqs)];
        let value = committed as f64 / num_seqs.max(1) as f64 * plain_secs / secs;
        if drafted {
            arms.drafted.add(value);
        } else {
            arms.plain.add(value);
        }
    }

    /// Measured drafted over plain rate for `num_seqs` sequences, once both
    /// are measured.
    pub fn drafted_over_plain(&self, num_seqs: usize) -> Option<f64> {
        let arms = &self.buckets[bucket(num_seqs)];
        (arms.drafted.weight >= MIN_SAMPLES && arms.plain.weight >= MIN_SAMPLES)
            .then(|| arms.drafted.get() / arms.plain.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_whose_drafts_fail_loses_its_gain_and_regains_the_prior_while_skipped() {
        let mut g = SeqGains::default();
        let s = SeqId(7);
        assert_eq!(g.gain(s, (1.0, 2.0)), (1.0, 2.0));
        for _ in 0..4 {
            g.record(s, 0, 3);
        }
        let (accepted, nodes) = g.gain(s, (1.0, 2.0));
        assert!(accepted < 0.3, "{accepted}");
        assert!((nodes - 3.0).abs() < 0.5, "{nodes}");
        let mut steps = 0;
        while g.gain(s, (1.0, 2.0)).0 < 0.5 {
            g.skip(s);
            steps += 1;
        }
        assert!((10..60).contains(&steps), "{steps}");
        g.release(s);
        assert_eq!(g.gain(s, (1.0, 2.0)), (1.0, 2.0));
    }

    #[test]
    fn drafting_stops_where_it_measures_slower_or_ties_and_is_still_probed() {
        let mut r = MeasuredRates::default();
        // Unmeasured: drafting allowed but for the plain probes.
        let allowed = (0..PROBE_EVERY).filter(|_| r.allows_drafting(4)).count() as u64;
        assert_eq!(allowed, PROBE_EVERY - 1);
        for _ in 0..20 {
            r.record(4, true, 4, 0.010, 0.008); // 0.8 of plain
            r.record(7, false, 7, 0.012, 0.012); // 1.0, another size in the bucket
        }
        assert!(r.drafted_over_plain(5).unwrap() < 0.9);
        let allowed = (0..PROBE_EVERY * 2).filter(|_| r.allows_drafting(5)).count() as u64;
        assert_eq!(allowed, 2, "only the probes draft");
        // Another bucket is unaffected, and drafting that wins is played.
        assert!(r.drafted_over_plain(1).is_none());
        for _ in 0..60 {
            r.record(1, true, 2, 0.007, 0.005);
        }
        assert!(r.drafted_over_plain(1).is_none(), "plain not measured yet");
        for _ in 0..20 {
            r.record(1, false, 1, 0.005, 0.005);
        }
        assert!(r.drafted_over_plain(1).unwrap() > 1.2);
        let allowed = (0..PROBE_EVERY).filter(|_| r.allows_drafting(1)).count() as u64;
        assert_eq!(
            allowed,
            PROBE_EVERY - 1,
            "drafting wins: all but the plain probes draft"
        );
        // A tie goes to plain decoding.
        let mut tie = MeasuredRates::default();
        for _ in 0..20 {
            tie.record(16, true, 16, 0.0101, 0.0102); // 1.01 of plain
            tie.record(16, false, 16, 0.010, 0.010);
        }
        let allowed = (0..PROBE_EVERY * 2).filter(|_| tie.allows_drafting(16)).count() as u64;
        assert_eq!(allowed, 2, "only the probes draft");
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(3), 1);
        assert_eq!(bucket(16), 4);
        assert_eq!(bucket(1000), NUM_BUCKETS - 1);
    }
}
