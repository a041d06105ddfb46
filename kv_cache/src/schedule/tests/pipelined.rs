//! Planning ahead: a driver that sends step n+1 (`schedule_ahead`) before
//! step n is applied, as the router does, against the fake engine, which
//! runs the steps in order. Outputs, blocks and released ids must be what
//! they are without planning ahead.

use std::collections::{HashMap, VecDeque};

use super::*;
use crate::test_util::Rng;

const NUM_REQUESTS: usize = 30;
const MAX_PROMPT: usize = 10;
const MAX_NEW: usize = 16;

#[test]
fn steps_planned_ahead_give_every_request_its_tokens_alone() {
    let mut num_ahead = 0;
    let mut num_ignored_finish = 0;
    let mut num_cancelled_in_flight = 0;
    let mut num_failed = 0;
    for seed in 1..=30u64 {
        let mut rng = Rng(seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let block_size = 1 + rng.below(4);
        let num_blocks = 1 + (MAX_PROMPT + MAX_NEW).div_ceil(block_size) * 2 + rng.below(12);
        let cfg = config(1 + rng.below(16), 1 + rng.below(4), usize::MAX, rng.below(4));
        let mut sched: Scheduler<usize> = Scheduler::new(cfg, pool(num_blocks, block_size), 1000 * seed);
        let mut engine = FakeEngine::new(sched.pool());
        let mut requests: Vec<NewSequence> = Vec::new();
        let mut outcomes: HashMap<usize, Option<Vec<u32>>> = HashMap::new();
        let mut in_flight: VecDeque<Vec<ScheduledRun>> = VecDeque::new();
        let mut num_steps = 0;
        while requests.len() < NUM_REQUESTS || !sched.is_idle() || !in_flight.is_empty() {
            num_steps += 1;
            assert!(num_steps < 10_000, "seed {seed}: no progress");
            while requests.len() < NUM_REQUESTS && rng.below(4) == 0 {
                let len = 1 + rng.below(MAX_PROMPT);
                let seq = request(
                    (0..len as u32).map(|i| i * 7 + seed as u32).collect(),
                    1 + rng.below(MAX_NEW),
                    rng.below(4) != 0,
                );
                requests.push(seq.clone());
                sched.add(seq, requests.len() - 1).expect("valid request");
            }
            // Cancellation between steps, also while a continuation runs.
            if rng.below(25) == 0 && !sched.is_idle() {
                let held: Vec<usize> = sched.sequences().map(|s| s.payload).collect();
                let victim = held[rng.below(held.len())];
                let flying = sched.is_in_flight();
                let cancelled = sched.cancel(|s| s.payload == victim);
                assert_eq!(cancelled.len(), 1);
                num_cancelled_in_flight += usize::from(flying);
                outcomes.insert(victim, None);
                sched.check_invariants().expect("invariants after cancel");
            }
            release(&mut engine, sched.take_released(), &in_flight);
            if in_flight.is_empty() {
                let schedule = sched.schedule();
                assert!(schedule.rejected.is_empty(), "seed {seed}: rejected");
                release(&mut engine, sched.take_released(), &in_flight);
                sched.check_invariants().expect("invariants after schedule");
                in_flight.push_back(schedule.runs);
            }
            if rng.below(5) != 0 {
                if let Some(runs) = sched.schedule_ahead() {
                    assert!(runs.iter().all(|r| r.continues));
                    num_ahead += 1;
                    sched.check_invariants().expect("invariants after schedule_ahead");
                    in_flight.push_back(runs);
                }
            }
            let mut runs = in_flight.pop_front().expect("a step in flight");
            // The engine fails one sequence on its own now and then.
            let failing = (rng.below(30) == 0 && !runs.is_empty()).then(|| runs.remove(rng.below(runs.len())).seq_id);
            if let Some(id) = failing {
                engine.known.remove(&id);
                engine.pending.remove(&id);
                engine.failed.insert(id);
            }
            let accepted = rng.below(5);
            let committed = engine.step_runs(&runs, |_| accepted);
            if let Some(id) = failing {
                if let Some(seq) = sched.fail(id) {
                    num_failed += 1;
                    outcomes.insert(seq.payload, None);
                }
            }
            let ended: Vec<SeqId> = sched
                .sequences()
                .filter(|s| s.ahead.is_some())
                .map(|s| s.seq_id())
                .collect();
            let finished = sched.update(committed, decide_eos).expect("a well-behaved engine");
            sched.check_invariants().expect("invariants after update");
            num_ignored_finish += finished.iter().filter(|f| ended.contains(&f.sequence.seq_id)).count();
            for f in finished {
                let tokens = f.sequence.generated_token_ids().to_vec();
                assert!(outcomes.insert(f.sequence.payload, Some(tokens)).is_none());
            }
        }
        engine.release(sched.take_released());
        assert!(engine.known.is_empty(), "seed {seed}: the engine still holds sequences");
        assert_eq!(
            sched.pool().num_free_blocks(),
            sched.pool().num_usable_blocks(),
            "seed {seed}: blocks leaked"
        );
        assert_eq!(outcomes.len(), NUM_REQUESTS, "seed {seed}: a request was lost");
        for (index, outcome) in outcomes {
            if let Some(tokens) = outcome {
                let r = &requests[index];
                let alone = generate_alone(&r.prompt_token_ids, r.max_new_tokens, true);
                assert_eq!(tokens, alone, "seed {seed}: request {index}");
            }
        }
    }
    assert!(num_ahead > 200, "steps are planned ahead ({num_ahead})");
    assert!(
        num_ignored_finish > 10,
        "sequences end with a continuation in flight ({num_ignored_finish})"
    );
    assert!(
        num_cancelled_in_flight > 5,
        "cancellations hit runs in flight ({num_cancelled_in_flight})"
    );
    assert!(num_failed > 5, "sequences fail alone ({num_failed})");
}

/// Hands the engine ids to forget, none of which may still run in a step
/// in flight.
fn release(engine: &mut FakeEngine, ids: Vec<SeqId>, in_flight: &VecDeque<Vec<ScheduledRun>>) {
    for id in &ids {
        assert!(
            !in_flight.iter().flatten().any(|r| r.seq_id == *id),
            "{id} released while a run of it is in flight"
        );
    }
    engine.release(ids);
}

#[test]
fn nothing_is_planned_ahead_unless_every_sequence_decodes_steadily() {
    // Lookahead 2, block size 2, 8 usable blocks.
    let mut sched: Scheduler<()> = Scheduler::new(config(64, 2, usize::MAX, 2), pool(9, 2), 1);
    let mut engine = FakeEngine::new(sched.pool());
    assert!(sched.schedule_ahead().is_none(), "nothing runs");
    sched.add(request(vec![1, 2, 3], 10, true), ()).unwrap();
    let first = sched.schedule();
    assert_eq!(first.runs.len(), 1);
    // A waiting sequence with room to be admitted: apply, then schedule.
    sched.add(request(vec![4, 5], 10, false), ()).unwrap();
    assert!(sched.schedule_ahead().is_none(), "a sequence could be admitted");
    let committed = engine.step(&first, |_| 0);
    sched.update(committed, decide).unwrap();
    let both = sched.schedule();
    assert_eq!(both.runs.len(), 2);
    let free = sched.pool().num_free_blocks();
    let ahead = sched.schedule_ahead().expect("two decoding sequences");
    assert!(sched.schedule_ahead().is_none(), "one continuation in flight at most");
    // The speculating one may have 6 tokens computed after the step in
    // flight (3 + its token + 2 accepted): its continuation's token and 2
    // lookahead slots follow. The plain one: 2, then its next token.
    assert_eq!(ahead[0].lookahead, 2);
    assert_eq!(ahead[0].num_computed, 4);
    assert_eq!(ahead[0].block_table.len(), (6 + 1 + 2usize).div_ceil(2));
    assert_eq!(ahead[1].lookahead, 0);
    assert_eq!(ahead[1].block_table.len(), (2 + 1usize).div_ceil(2));
    assert!(sched.pool().num_free_blocks() < free);
    sched.check_invariants().unwrap();
    // Applying the step in flight starts the continuations with exact tables.
    let committed = engine.step(&both, |_| 1);
    sched.update(committed, decide).unwrap();
    sched.check_invariants().unwrap();
    assert!(sched.is_in_flight());
    let committed = engine.step_runs(&ahead, |_| 0);
    sched.update(committed, decide).unwrap();
    sched.check_invariants().unwrap();
    assert!(!sched.is_in_flight());
}

#[test]
fn a_plan_ahead_that_does_not_fit_changes_nothing() {
    // Block size 1, 8 usable blocks: two sequences of 2 prompt tokens and
    // lookahead 1 take 6; the first continuation takes the other 2, the
    // second cannot fit, so the first is undone.
    let mut sched: Scheduler<()> = Scheduler::new(config(64, 2, usize::MAX, 1), pool(9, 1), 1);
    sched.add(request(vec![1, 2], 10, true), ()).unwrap();
    sched.add(request(vec![3, 4], 10, true), ()).unwrap();
    let plan = sched.schedule();
    assert_eq!(plan.runs.len(), 2);
    let free = sched.pool().num_free_blocks();
    let tables: Vec<usize> = sched.sequences().map(|s| s.block_table().num_blocks()).collect();
    assert!(sched.schedule_ahead().is_none());
    assert_eq!(sched.pool().num_free_blocks(), free);
    let after: Vec<usize> = sched.sequences().map(|s| s.block_table().num_blocks()).collect();
    assert_eq!(tables, after);
    sched.check_invariants().unwrap();
}

#[test]
fn a_sequence_that_may_reach_its_length_in_flight_is_not_continued() {
    let mut sched: Scheduler<()> = Scheduler::new(config(64, 2, usize::MAX, 3), pool(33, 2), 1);
    // Lookahead 2 (3 new tokens at most: the sampled one and 2 more), so
    // the step may commit all three.
    sched.add(request(vec![1, 2], 3, true), ()).unwrap();
    let plan = sched.schedule();
    assert_eq!(plan.runs[0].lookahead, 2);
    assert!(sched.schedule_ahead().is_none());
}
