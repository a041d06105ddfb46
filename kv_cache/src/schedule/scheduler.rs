//! `Scheduler`: the waiting queue, the running set and the block pool of one
//! engine, and the rules that turn them into steps.
//!
//! Invariants (between steps; `check_invariants` verifies them):
//! - the pool's ref counts match the block tables of all held sequences;
//! - a waiting sequence holds no blocks and `num_computed == 0`;
//! - a running sequence has `num_computed < token_ids.len()` and, with no
//!   run in flight, blocks for exactly `num_computed` tokens (rounded up to
//!   whole blocks);
//! - `to_release` holds only ids the engine has seen and that no held
//!   sequence carries any more; `retired_in_flight` and `retired_ahead`
//!   only ids no held sequence carries, whose runs are still in flight
//!   (one step, or two: the step in flight and a continuation after it);
//! - a sequence with a continuation planned ahead has a run in flight.
//!
//! Planning ahead (`schedule_ahead`) lets a driver send step n+1 before
//! step n has answered, so the engine never waits for the driver. The
//! engine runs the steps of one driver in order, so blocks freed while a
//! step is in flight are only written again by later steps, after it.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::pool::BlockPool;
use crate::schedule::{
    Admission, CommittedRun, Finished, NewSequence, Schedule, ScheduleConfig, ScheduleError, ScheduledRun, SeqId,
    Sequence, Verdict,
};
use crate::table::BlockTable;

mod ahead;

/// The scheduling state machine of one engine. `R` is the caller's payload.
#[derive(Debug)]
pub struct Scheduler<R> {
    config: ScheduleConfig,
    pool: BlockPool,
    waiting: VecDeque<Sequence<R>>,
    /// Admission order: the newest is last.
    running: Vec<Sequence<R>>,
    next_seq_id: u64,
    /// Ids the engine should forget.
    to_release: Vec<SeqId>,
    /// Ids retired while a run of theirs is in flight: released (and that
    /// run's results ignored) once the step in flight is applied.
    retired_in_flight: Vec<SeqId>,
    /// Ids retired with a continuation planned ahead: they move to
    /// `retired_in_flight` when the step in flight is applied, so they are
    /// released after the continuation's step.
    retired_ahead: Vec<SeqId>,
}

/// Tokens of `seq` to run this step under `budget`.
fn run_length<R>(config: &ScheduleConfig, seq: &Sequence<R>, budget: usize) -> usize {
    (seq.token_ids.len() - seq.num_computed)
        .min(budget)
        .min(config.max_prefill_chunk)
}

/// Slots to reserve for accepted draft tokens when a run of `n` tokens ends
/// the known ones: the engine's lookahead, capped by what the request may
/// still generate after the token it samples anyway.
fn lookahead_for<R>(config: &ScheduleConfig, seq: &Sequence<R>, n: usize) -> usize {
    let samples = seq.num_computed + n == seq.token_ids.len();
    if !samples || !seq.speculate {
        return 0;
    }
    let remaining = seq.max_new_tokens.saturating_sub(seq.num_generated());
    config.max_lookahead.min(remaining.saturating_sub(1))
}

/// Grows `table` to `need` slots plus `lookahead` if they fit, else to
/// `need` alone (plain decoding this step): the lookahead reserved, or
/// `None` (and no change) when not even `need` fits.
fn reserve(pool: &mut BlockPool, table: &mut BlockTable, need: usize, lookahead: usize) -> Option<usize> {
    if pool.allocate_slots(table, need + lookahead).is_some() {
        return Some(lookahead);
    }
    pool.allocate_slots(table, need).map(|()| 0)
}

impl<R> Scheduler<R> {
    /// An idle scheduler over `pool`; seq ids count up from `first_seq_id`.
    /// Panics if `config` is invalid (validate it first).
    pub fn new(config: ScheduleConfig, pool: BlockPool, first_seq_id: u64) -> Self {
        if let Err(e) = config.validate() {
            panic!("{e}");
        }
        Scheduler {
            config,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_seq_id: first_seq_id,
            to_release: Vec::new(),
            retired_in_flight: Vec::new(),
            retired_ahead: Vec::new(),
        }
    }

    /// Queues a request at the back; `Err` (naming the field) for an empty
    /// prompt or `max_new_tokens` 0.
    pub fn add(&mut self, seq: NewSequence, payload: R) -> Result<SeqId, ScheduleError> {
        seq.validate()?;
        let seq_id = self.new_seq_id();
        self.waiting.push_back(Sequence::new(seq_id, seq, payload));
        Ok(seq_id)
    }

    /// Sequences queued for admission (new and preempted).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Admitted sequences (holding blocks).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Nothing waiting and nothing running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// The block pool (read-only: the scheduler owns every block).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// The knobs this scheduler was built with.
    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }

    /// The held sequence with this id (running or waiting).
    pub fn get(&self, id: SeqId) -> Option<&Sequence<R>> {
        self.sequences().find(|s| s.seq_id == id)
    }

    /// The held sequence with this id (running or waiting).
    pub fn get_mut(&mut self, id: SeqId) -> Option<&mut Sequence<R>> {
        self.sequences_mut().find(|s| s.seq_id == id)
    }

    /// Every held sequence: running (oldest first), then waiting (front first).
    pub fn sequences(&self) -> impl Iterator<Item = &Sequence<R>> {
        self.running.iter().chain(self.waiting.iter())
    }

    /// Every held sequence: running (oldest first), then waiting (front first).
    pub fn sequences_mut(&mut self) -> impl Iterator<Item = &mut Sequence<R>> {
        self.running.iter_mut().chain(self.waiting.iter_mut())
    }

    /// Plans one step: running sequences first, oldest first (their decode
    /// token or next prompt chunk), preempting the newest when blocks run
    /// out; then waiting sequences, front first, while the token budget,
    /// `max_running` and free blocks allow. Panics if a step is in flight
    /// (apply it with `update` first).
    pub fn schedule(&mut self) -> Schedule<R> {
        assert!(!self.is_in_flight(), "schedule with a step in flight");
        for seq in &mut self.running {
            seq.num_scheduled = 0;
            seq.lookahead = 0;
        }
        let mut budget = self.config.max_batch_tokens;
        let mut num_preempted = 0;
        let mut rejected = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &mut self.running[i];
            let n = run_length(&self.config, seq, budget);
            let need = seq.num_computed + n;
            let lookahead = lookahead_for(&self.config, seq, n);
            if let Some(lookahead) = reserve(&mut self.pool, &mut seq.table, need, lookahead) {
                seq.num_scheduled = n;
                seq.lookahead = lookahead;
                budget -= n;
                i += 1;
                continue;
            }
            if i + 1 < self.running.len() {
                self.preempt_newest();
                num_preempted += 1;
            } else if i > 0 {
                // This is the newest: it yields to the older ones.
                self.preempt_newest();
                num_preempted += 1;
                break;
            } else {
                // Alone and still out of blocks: it can never fit.
                let seq = self.running.remove(0);
                rejected.push(self.retire(seq));
            }
        }
        let mut admitted = Vec::new();
        while budget > 0 && self.running.len() < self.config.max_running {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let mut hit = 0;
            if seq.num_computed == 0 && seq.table.num_blocks() == 0 {
                let max_tokens = seq.token_ids.len() - 1;
                hit = self
                    .pool
                    .attach_cached_prefix(&mut seq.table, &seq.token_ids, seq.cache_salt.as_deref(), max_tokens)
                    .num_cached_tokens;
                seq.num_computed = hit;
            }
            let n = run_length(&self.config, &seq, budget);
            let need = seq.num_computed + n;
            let lookahead = lookahead_for(&self.config, &seq, n);
            let Some(lookahead) = reserve(&mut self.pool, &mut seq.table, need, lookahead) else {
                self.pool.free_table(&mut seq.table);
                seq.num_computed = 0;
                if self.running.is_empty() {
                    // Every block is free and it still does not fit.
                    rejected.push(self.retire(seq));
                    continue;
                }
                self.waiting.push_front(seq);
                break;
            };
            seq.lookahead = lookahead;
            let first_admission = !seq.admitted;
            if first_admission {
                seq.admitted = true;
                seq.num_cached_prompt_tokens = hit;
            }
            admitted.push(Admission {
                seq_id: seq.seq_id,
                first_admission,
                num_queried_tokens: seq.token_ids.len(),
                num_cached_tokens: hit,
            });
            seq.num_scheduled = n;
            budget -= n;
            self.running.push(seq);
        }
        let runs = self
            .running
            .iter()
            .filter(|s| s.num_scheduled > 0)
            .map(|s| {
                let end = s.num_computed + s.num_scheduled;
                let first_run = !s.engine_knows;
                ScheduledRun {
                    seq_id: s.seq_id,
                    new_token_ids: s.token_ids[s.num_computed..end].to_vec(),
                    num_computed: s.num_computed,
                    block_table: s.table.block_ids().to_vec(),
                    first_run,
                    cached_token_ids: if first_run {
                        s.token_ids[..s.num_computed].to_vec()
                    } else {
                        Vec::new()
                    },
                    sample: end == s.token_ids.len(),
                    lookahead: s.lookahead,
                    continues: false,
                }
            })
            .collect();
        Schedule {
            runs,
            admitted,
            num_preempted,
            rejected,
        }
    }

    /// Applies what the engine committed for the oldest step in flight. `decide` is
    /// called once per sequence that committed tokens, with the committed
    /// token ids, before they are appended (the sequence still shows the
    /// state the run was planned from); it returns how many to keep (a stop
    /// condition inside the run truncates them) and whether the sequence
    /// ends after them. A sequence that ends is removed, its blocks freed and
    /// its id released; the others register their full blocks for prefix
    /// caching and give back unused lookahead. A sequence with a
    /// continuation planned ahead starts it: its table keeps that run's
    /// slots, now exact (the step in flight is the continuation's).
    ///
    /// `Err` when the engine or `decide` broke the contract (a sampled run
    /// without a token, tokens for a sequence that was not run, a verdict out
    /// of range); the scheduler is then unchanged (`decide` may have run).
    pub fn update<F>(
        &mut self,
        committed: Vec<CommittedRun>,
        mut decide: impl FnMut(&mut Sequence<R>, &[u32]) -> Verdict<F>,
    ) -> Result<Vec<Finished<R, F>>, ScheduleError> {
        // Runs of sequences that ended while they were in flight.
        let num_ignored = self.retired_in_flight.len();
        let ignored: HashSet<SeqId> = self
            .retired_in_flight
            .iter()
            .chain(&self.retired_ahead)
            .copied()
            .collect();
        let scheduled: HashSet<SeqId> = self
            .running
            .iter()
            .filter(|s| s.num_scheduled > 0)
            .map(|s| s.seq_id)
            .collect();
        let mut by_id: HashMap<SeqId, Vec<u32>> = HashMap::with_capacity(committed.len());
        for run in committed {
            if ignored.contains(&run.seq_id) {
                continue;
            }
            if !run.token_ids.is_empty() && !scheduled.contains(&run.seq_id) {
                return Err(ScheduleError::NotScheduled { seq_id: run.seq_id });
            }
            if by_id.insert(run.seq_id, run.token_ids).is_some() {
                return Err(ScheduleError::DuplicateCommit { seq_id: run.seq_id });
            }
        }
        if let Some(seq) = self
            .running
            .iter()
            .find(|s| s.samples() && by_id.get(&s.seq_id).is_none_or(|t| t.is_empty()))
        {
            return Err(ScheduleError::NoTokenForSampledRun { seq_id: seq.seq_id });
        }
        let mut verdicts = Vec::with_capacity(self.running.len());
        for seq in &mut self.running {
            let tokens = match by_id.remove(&seq.seq_id) {
                Some(tokens) if seq.num_scheduled > 0 && !tokens.is_empty() => tokens,
                _ => {
                    verdicts.push(None);
                    continue;
                }
            };
            let verdict = decide(seq, &tokens);
            let num_committed = tokens.len();
            if verdict.keep > num_committed {
                return Err(ScheduleError::KeepExceedsCommitted {
                    seq_id: seq.seq_id,
                    keep: verdict.keep,
                    num_committed,
                });
            }
            if verdict.keep < num_committed && verdict.finish.is_none() {
                return Err(ScheduleError::TruncatedWithoutFinish {
                    seq_id: seq.seq_id,
                    keep: verdict.keep,
                    num_committed,
                });
            }
            verdicts.push(Some((tokens, verdict)));
        }
        let mut finished = Vec::new();
        let running = std::mem::take(&mut self.running);
        for (mut seq, outcome) in running.into_iter().zip(verdicts) {
            if seq.num_scheduled == 0 {
                self.running.push(seq);
                continue;
            }
            let num_run = seq.num_scheduled;
            seq.num_scheduled = 0;
            seq.lookahead = 0;
            seq.engine_knows = true;
            let Some((tokens, verdict)) = outcome else {
                seq.num_computed += num_run;
                self.keep_computed_blocks(&mut seq);
                self.running.push(seq);
                continue;
            };
            // KV now holds the run and every committed token but the last.
            seq.num_computed += num_run + tokens.len() - 1;
            seq.token_ids.extend_from_slice(&tokens[..verdict.keep]);
            match verdict.finish {
                Some(reason) => finished.push(Finished {
                    sequence: self.retire(seq),
                    reason,
                }),
                None => {
                    self.keep_computed_blocks(&mut seq);
                    self.running.push(seq);
                }
            }
        }
        self.to_release.extend(self.retired_in_flight.drain(..num_ignored));
        // Continuations of retired sequences now are the step in flight.
        self.retired_in_flight.append(&mut self.retired_ahead);
        Ok(finished)
    }

    /// Removes the sequences `pred` selects (running, then waiting) and frees
    /// their blocks; the engine is told to forget those it knew (those with
    /// a run in flight once it is applied, whose results are then ignored).
    pub fn cancel(&mut self, mut pred: impl FnMut(&mut Sequence<R>) -> bool) -> Vec<Sequence<R>> {
        let mut removed = Vec::new();
        for mut seq in std::mem::take(&mut self.running) {
            if pred(&mut seq) {
                removed.push(self.retire(seq));
            } else {
                self.running.push(seq);
            }
        }
        for mut seq in std::mem::take(&mut self.waiting) {
            if pred(&mut seq) {
                removed.push(self.retire(seq));
            } else {
                self.waiting.push_back(seq);
            }
        }
        removed
    }

    /// Ends a running sequence whose run in the oldest step in flight the
    /// engine failed on its own (the other runs went on): removed with its
    /// blocks freed and its id released (whether or not the engine knew
    /// it) once its runs in flight are applied. Call before that step's
    /// `update`; `None` when it is not running.
    pub fn fail(&mut self, seq_id: SeqId) -> Option<Sequence<R>> {
        let i = self.running.iter().position(|s| s.seq_id == seq_id)?;
        let mut seq = self.running.remove(i);
        seq.engine_knows = true;
        Some(self.retire(seq))
    }

    /// Engine ids the engine should forget (finished, cancelled, rejected
    /// and preempted sequences it had seen). Drains.
    pub fn take_released(&mut self) -> Vec<SeqId> {
        std::mem::take(&mut self.to_release)
    }

    /// The engine is gone: every sequence (running first, then waiting) is
    /// handed back with its blocks freed, and the released ids are dropped.
    pub fn drain(&mut self) -> Vec<Sequence<R>> {
        let all: Vec<Sequence<R>> = self.running.drain(..).chain(self.waiting.drain(..)).collect();
        let drained = all.into_iter().map(|seq| self.retire(seq)).collect();
        self.to_release.clear();
        self.retired_in_flight.clear();
        self.retired_ahead.clear();
        drained
    }

    /// Replaces the pool (a reconnected engine starts with empty KV). No
    /// sequence may be running (drain first); waiting ones hold no blocks.
    pub fn reset_pool(&mut self, pool: BlockPool) {
        assert!(
            self.running.is_empty(),
            "reset_pool with running sequences (drain first)"
        );
        debug_assert!(self.waiting.iter().all(|s| s.table.num_blocks() == 0));
        self.pool = pool;
        self.to_release.clear();
        self.retired_in_flight.clear();
        self.retired_ahead.clear();
    }

    /// Checks the pool against every held table and the invariants in the
    /// module docs. Returns a description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let tables: Vec<_> = self.sequences().map(|s| &s.table).collect();
        self.pool.check_invariants(&tables)?;
        if let Some(s) = self
            .waiting
            .iter()
            .find(|s| s.table.num_blocks() > 0 || s.num_computed > 0)
        {
            return Err(format!("waiting sequence {} holds blocks or computed tokens", s.seq_id));
        }
        for s in &self.running {
            if s.ahead.is_some() && s.num_scheduled == 0 {
                return Err(format!(
                    "running sequence {} is planned ahead with no run in flight",
                    s.seq_id
                ));
            }
            if s.num_computed >= s.token_ids.len() {
                return Err(format!("running sequence {} has nothing left to run", s.seq_id));
            }
            if s.num_scheduled == 0 && s.table.num_blocks() != self.pool.blocks_for(s.num_computed) {
                return Err(format!(
                    "running sequence {}: {} blocks for {} computed tokens",
                    s.seq_id,
                    s.table.num_blocks(),
                    s.num_computed
                ));
            }
        }
        let held: HashSet<SeqId> = self.sequences().map(|s| s.seq_id).collect();
        if let Some(id) = self
            .to_release
            .iter()
            .chain(&self.retired_in_flight)
            .chain(&self.retired_ahead)
            .find(|id| held.contains(id))
        {
            return Err(format!("sequence {id} is released but still held"));
        }
        Ok(())
    }

    fn new_seq_id(&mut self) -> SeqId {
        let id = SeqId(self.next_seq_id);
        self.next_seq_id += 1;
        id
    }

    /// Registers the full blocks of computed tokens and gives back the rest
    /// of the table (unused lookahead), but for the slots of a continuation
    /// planned ahead, which this starts.
    fn keep_computed_blocks(&mut self, seq: &mut Sequence<R>) {
        let computed = &seq.token_ids[..seq.num_computed];
        self.pool
            .register_full_blocks(&mut seq.table, computed, seq.cache_salt.as_deref());
        let mut keep = seq.num_computed;
        if let Some(lookahead) = seq.ahead.take() {
            seq.num_scheduled = 1;
            seq.lookahead = lookahead;
            keep += 1 + lookahead;
        }
        self.pool.truncate(&mut seq.table, keep);
    }

    /// Frees the newest running sequence's blocks and requeues it first,
    /// under a new id (its generated tokens are recomputed as prompt).
    fn preempt_newest(&mut self) {
        let seq = self.running.pop().expect("a running sequence to preempt");
        let mut seq = self.retire(seq);
        seq.seq_id = self.new_seq_id();
        self.waiting.push_front(seq);
    }

    /// Takes `seq` out of scheduling: frees its blocks and releases its id
    /// if the engine knows it, once a run of it in flight is applied.
    fn retire(&mut self, mut seq: Sequence<R>) -> Sequence<R> {
        self.pool.free_table(&mut seq.table);
        if seq.ahead.is_some() {
            self.retired_ahead.push(seq.seq_id);
        } else if seq.num_scheduled > 0 {
            self.retired_in_flight.push(seq.seq_id);
        } else if seq.engine_knows {
            self.to_release.push(seq.seq_id);
        }
        seq.engine_knows = false;
        seq.num_computed = 0;
        seq.num_scheduled = 0;
        seq.lookahead = 0;
        seq.ahead = None;
        seq
    }
}
