//! Planning the next step while one runs (`Scheduler::schedule_ahead`):
//! continuations of every running sequence, each with blocks for the most
//! its run in flight may commit.
//!
//! Invariant: a plan made here changes nothing when it does not fit, and
//! never preempts or admits; `update` starts what it planned.

use super::{reserve, Scheduler};
use crate::schedule::ScheduledRun;

impl<R> Scheduler<R> {
    /// Whether a running sequence has a run in flight (planned and not yet
    /// applied). False when the only runs in flight are of sequences that
    /// ended: a driver keeps its own queue of steps sent, and applies each.
    pub fn is_in_flight(&self) -> bool {
        self.running.iter().any(|s| s.num_scheduled > 0)
    }

    /// Plans the next step while the step in flight still runs, when that
    /// step is steady decoding: every running sequence samples in it, none
    /// can reach its length limit in it, nothing waits that could be
    /// admitted, and every continuation fits in free blocks (no
    /// preemption). A continuation runs the token its sequence's run in
    /// flight commits last; its table covers the most that run may commit,
    /// that token, and the continuation's own lookahead. `None` (and no
    /// change) otherwise: apply the step in flight, then `schedule`.
    ///
    /// The next `update` applies the step in flight and starts these runs
    /// (a sequence that ends there still runs: its results are ignored);
    /// the `update` after it applies them.
    pub fn schedule_ahead(&mut self) -> Option<Vec<ScheduledRun>> {
        let steady = !self.running.is_empty()
            && (self.waiting.is_empty() || self.running.len() >= self.config.max_running)
            && self.running.len() <= self.config.max_batch_tokens
            && self
                .running
                .iter()
                .all(|s| s.samples() && s.ahead.is_none() && s.num_remaining() >= s.lookahead + 2);
        if !steady {
            return None;
        }
        for i in 0..self.running.len() {
            let seq = &mut self.running[i];
            // The run in flight commits 1..=lookahead + 1 tokens; the
            // continuation runs the last of them.
            let need = seq.num_computed + seq.num_scheduled + seq.lookahead + 1;
            // Left after the step in flight if it commits the most it may;
            // the continuation samples one of them anyway.
            let lookahead = match seq.speculate {
                true => self
                    .config
                    .max_lookahead
                    .min(seq.num_remaining().saturating_sub(seq.lookahead + 2)),
                false => 0,
            };
            match reserve(&mut self.pool, &mut seq.table, need, lookahead) {
                Some(lookahead) => seq.ahead = Some(lookahead),
                None => {
                    for s in &mut self.running[..i] {
                        s.ahead = None;
                        let planned = s.num_computed + s.num_scheduled + s.lookahead;
                        self.pool.truncate(&mut s.table, planned);
                    }
                    return None;
                }
            }
        }
        let runs = self
            .running
            .iter()
            .map(|s| ScheduledRun {
                seq_id: s.seq_id,
                new_token_ids: Vec::new(),
                num_computed: s.num_computed + s.num_scheduled,
                block_table: s.table.block_ids().to_vec(),
                first_run: false,
                cached_token_ids: Vec::new(),
                sample: true,
                lookahead: s.ahead.expect("planned above"),
                continues: true,
            })
            .collect();
        Some(runs)
    }
}
