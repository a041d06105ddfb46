//! Tests of the scheduling core, against a fake engine that keeps its "KV"
//! in a flat slot array addressed through the block tables it is sent, so a
//! wrong table, a bad prefix hit or a lost lookahead token changes what the
//! fake model produces.

mod behaviour;
mod pipelined;
mod randomized;

use std::collections::{HashMap, HashSet};

use crate::pool::{BlockPool, BlockPoolConfig};
use crate::schedule::{
    CommittedRun, Finished, NewSequence, Schedule, ScheduleConfig, ScheduledRun, Scheduler, SeqId, Sequence, Verdict,
};

/// What the fake engine writes into lookahead slots it did not commit.
const GARBAGE: u32 = u32::MAX;

/// Why a test sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Length,
    Eos,
    Stop,
}

fn pool(num_blocks: usize, block_size: usize) -> BlockPool {
    BlockPool::new(BlockPoolConfig { num_blocks, block_size })
}

fn config(
    max_batch_tokens: usize,
    max_running: usize,
    max_prefill_chunk: usize,
    max_lookahead: usize,
) -> ScheduleConfig {
    ScheduleConfig {
        max_batch_tokens,
        max_running,
        max_prefill_chunk,
        max_lookahead,
    }
}

fn request(prompt_token_ids: Vec<u32>, max_new_tokens: usize, speculate: bool) -> NewSequence {
    NewSequence {
        prompt_token_ids,
        max_new_tokens,
        speculate,
        cache_salt: None,
    }
}

/// The fake model: the next token is a hash of the whole context.
fn model(context: &[u32]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &t in context {
        h ^= u64::from(t);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h % 1000) as u32 + 1
}

/// The end-of-sequence rule of the randomized test (about one token in 25).
fn is_eos(token: u32) -> bool {
    token <= 40
}

/// What the fake model generates for `prompt` on its own; `eos` ends it early.
fn generate_alone(prompt: &[u32], max_new_tokens: usize, eos: bool) -> Vec<u32> {
    let mut context = prompt.to_vec();
    let mut out = Vec::new();
    loop {
        let t = model(&context);
        out.push(t);
        context.push(t);
        if (eos && is_eos(t)) || out.len() == max_new_tokens {
            return out;
        }
    }
}

/// The driver's stop rule: end at `max_new_tokens`, or after an EOS token
/// when `eos`.
fn verdict<R>(seq: &Sequence<R>, tokens: &[u32], eos: bool) -> Verdict<Reason> {
    let remaining = seq.num_remaining();
    for (i, &t) in tokens.iter().enumerate() {
        if eos && is_eos(t) {
            return Verdict {
                keep: i + 1,
                finish: Some(Reason::Eos),
            };
        }
        if i + 1 == remaining {
            return Verdict {
                keep: i + 1,
                finish: Some(Reason::Length),
            };
        }
    }
    Verdict::keep_all(tokens.len())
}

/// Ends sequences at `max_new_tokens` only.
fn decide<R>(seq: &mut Sequence<R>, tokens: &[u32]) -> Verdict<Reason> {
    verdict(seq, tokens, false)
}

/// Ends sequences at `max_new_tokens` or after an EOS token.
fn decide_eos<R>(seq: &mut Sequence<R>, tokens: &[u32]) -> Verdict<Reason> {
    verdict(seq, tokens, true)
}

/// An engine that runs the fake model over KV it keeps in slots.
struct FakeEngine {
    block_size: usize,
    slots: Vec<u32>,
    known: HashSet<SeqId>,
    /// Sequences the engine failed on its own (and forgot).
    failed: HashSet<SeqId>,
    /// Per sequence: its computed tokens and the token it committed last
    /// (what a continuation runs).
    pending: HashMap<SeqId, (usize, u32)>,
    /// Report runs that commit nothing as an empty `CommittedRun` (else omit them).
    report_empty: bool,
}

impl FakeEngine {
    fn new(pool: &BlockPool) -> Self {
        let config = pool.config();
        FakeEngine {
            block_size: config.block_size,
            slots: vec![GARBAGE; config.num_blocks * config.block_size],
            known: HashSet::new(),
            failed: HashSet::new(),
            pending: HashMap::new(),
            report_empty: false,
        }
    }

    fn slot(&self, run: &ScheduledRun, position: usize) -> usize {
        let block = run
            .block_table
            .get(position / self.block_size)
            .expect("the block table reaches every position the run touches");
        block.index() * self.block_size + position % self.block_size
    }

    fn context(&self, run: &ScheduledRun, len: usize) -> Vec<u32> {
        (0..len).map(|p| self.slots[self.slot(run, p)]).collect()
    }

    /// Forgets released ids; each must be one it has seen.
    fn release(&mut self, ids: Vec<SeqId>) {
        for id in ids {
            assert!(
                self.known.remove(&id) || self.failed.remove(&id),
                "released {id}, which the engine never saw"
            );
            self.pending.remove(&id);
        }
    }

    /// Runs `schedule`; `accept(run)` draft tokens are accepted (capped by
    /// the run's lookahead).
    fn step<R>(&mut self, schedule: &Schedule<R>, accept: impl FnMut(&ScheduledRun) -> usize) -> Vec<CommittedRun> {
        self.step_runs(&schedule.runs, accept)
    }

    /// Runs `runs` (a continuation runs the token the sequence committed last).
    fn step_runs(
        &mut self,
        runs: &[ScheduledRun],
        mut accept: impl FnMut(&ScheduledRun) -> usize,
    ) -> Vec<CommittedRun> {
        let mut committed = Vec::new();
        for run in runs {
            if self.failed.contains(&run.seq_id) {
                // Failed alone before: this run fails alone too.
                continue;
            }
            let resolved;
            let run = if run.continues {
                assert!(run.new_token_ids.is_empty() && run.sample && !run.first_run);
                let (computed, token) = self.pending[&run.seq_id];
                assert!(run.num_computed <= computed, "a continuation's fewest computed tokens");
                resolved = ScheduledRun {
                    new_token_ids: vec![token],
                    num_computed: computed,
                    continues: false,
                    ..run.clone()
                };
                &resolved
            } else {
                run
            };
            assert_eq!(
                run.first_run,
                !self.known.contains(&run.seq_id),
                "first_run of {}",
                run.seq_id
            );
            self.known.insert(run.seq_id);
            if run.first_run {
                assert_eq!(run.cached_token_ids.len(), run.num_computed);
                assert_eq!(self.context(run, run.num_computed), run.cached_token_ids, "cached KV");
            } else {
                assert!(run.cached_token_ids.is_empty());
            }
            assert!(run.sample || run.lookahead == 0, "lookahead without sampling");
            let end = run.num_computed + run.new_token_ids.len();
            assert!(run.block_table.len() * self.block_size >= end + run.lookahead);
            for (i, &t) in run.new_token_ids.iter().enumerate() {
                let slot = self.slot(run, run.num_computed + i);
                self.slots[slot] = t;
            }
            if !run.sample {
                if self.report_empty {
                    committed.push(CommittedRun {
                        seq_id: run.seq_id,
                        token_ids: Vec::new(),
                    });
                }
                continue;
            }
            let num_accepted = accept(run).min(run.lookahead);
            let mut context = self.context(run, end);
            let mut token_ids = Vec::new();
            for j in 0..=num_accepted {
                let t = model(&context);
                token_ids.push(t);
                context.push(t);
                // Accepted tokens get KV; the last one is the next input.
                if j < num_accepted {
                    let slot = self.slot(run, end + j);
                    self.slots[slot] = t;
                }
            }
            for p in end + num_accepted..end + run.lookahead {
                let slot = self.slot(run, p);
                self.slots[slot] = GARBAGE;
            }
            self.pending
                .insert(run.seq_id, (end + num_accepted, *token_ids.last().expect("one token")));
            committed.push(CommittedRun {
                seq_id: run.seq_id,
                token_ids,
            });
        }
        committed
    }
}

/// One full step: release, schedule, run, update (ending sequences at
/// `max_new_tokens`); checks every invariant.
fn step<R: std::fmt::Debug>(
    sched: &mut Scheduler<R>,
    engine: &mut FakeEngine,
    accept: impl FnMut(&ScheduledRun) -> usize,
) -> (Schedule<R>, Vec<Finished<R, Reason>>) {
    step_with(sched, engine, accept, decide)
}

/// `step` with a chosen stop rule.
fn step_with<R: std::fmt::Debug>(
    sched: &mut Scheduler<R>,
    engine: &mut FakeEngine,
    accept: impl FnMut(&ScheduledRun) -> usize,
    decide: impl FnMut(&mut Sequence<R>, &[u32]) -> Verdict<Reason>,
) -> (Schedule<R>, Vec<Finished<R, Reason>>) {
    engine.release(sched.take_released());
    let schedule = sched.schedule();
    engine.release(sched.take_released());
    sched.check_invariants().expect("invariants after schedule");
    let committed = engine.step(&schedule, accept);
    let finished = sched.update(committed, decide).expect("a well-behaved engine");
    sched.check_invariants().expect("invariants after update");
    (schedule, finished)
}
