//! Many requests against a small pool under a seeded generator: random
//! prompts (some sharing prefixes, some salted), budgets, accepted draft
//! counts and cancellations.

use std::collections::HashMap;

use super::*;
use crate::test_util::Rng;

/// How one request ended.
#[derive(Debug)]
enum Outcome {
    Finished(Vec<u32>),
    Cancelled,
}

const NUM_REQUESTS: usize = 40;
const MAX_PROMPT: usize = 12;
const MAX_NEW: usize = 10;

#[test]
fn randomized_requests_all_end_with_the_tokens_they_would_get_alone() {
    let mut num_preempted = 0;
    let mut num_cancelled = 0;
    let mut num_cache_hits = 0;
    let mut num_eos = 0;
    for seed in 1..=30u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let block_size = 1 + rng.below(4);
        // Room for the longest request alone, so nothing is ever rejected,
        // and little more, so preemption is common.
        let num_blocks = 1 + (MAX_PROMPT + MAX_NEW).div_ceil(block_size) + rng.below(6);
        let max_prefill_chunk = [usize::MAX, 1 + rng.below(6)][rng.below(2)];
        let cfg = config(1 + rng.below(16), 1 + rng.below(4), max_prefill_chunk, rng.below(4));
        let mut sched: Scheduler<usize> = Scheduler::new(cfg, pool(num_blocks, block_size), 1000 * seed);
        let mut engine = FakeEngine::new(sched.pool());
        engine.report_empty = rng.below(2) == 0;
        let families: Vec<Vec<u32>> = (0..3)
            .map(|f| (0..MAX_PROMPT as u32).map(|i| f * 100 + i).collect())
            .collect();
        let mut requests: Vec<NewSequence> = Vec::new();
        let mut outcomes: HashMap<usize, Outcome> = HashMap::new();
        let mut num_steps = 0;
        while requests.len() < NUM_REQUESTS || !sched.is_idle() {
            num_steps += 1;
            assert!(num_steps < 10_000, "seed {seed}: no progress");
            while requests.len() < NUM_REQUESTS && rng.below(3) == 0 {
                let len = 1 + rng.below(MAX_PROMPT);
                let mut prompt = families[rng.below(3)][..len].to_vec();
                if rng.below(3) == 0 {
                    prompt[len - 1] = 7_777;
                }
                let seq = NewSequence {
                    prompt_token_ids: prompt,
                    max_new_tokens: 1 + rng.below(MAX_NEW),
                    speculate: rng.below(4) != 0,
                    cache_salt: [None, Some("s".to_string())][rng.below(2)].clone(),
                };
                requests.push(seq.clone());
                sched.add(seq, requests.len() - 1).expect("valid request");
            }
            if rng.below(20) == 0 && !sched.is_idle() {
                let held: Vec<usize> = sched.sequences().map(|s| s.payload).collect();
                let victim = held[rng.below(held.len())];
                let cancelled = sched.cancel(|s| s.payload == victim);
                assert_eq!(cancelled.len(), 1);
                outcomes.insert(victim, Outcome::Cancelled);
                num_cancelled += 1;
                sched.check_invariants().expect("invariants after cancel");
            }
            let accepted = rng.below(5);
            let (schedule, finished) = step_with(&mut sched, &mut engine, |_| accepted, decide_eos);
            assert!(
                schedule.rejected.is_empty(),
                "seed {seed}: a request that fits alone was rejected"
            );
            num_preempted += schedule.num_preempted;
            num_cache_hits += schedule.admitted.iter().filter(|a| a.num_cached_tokens > 0).count();
            for f in finished {
                num_eos += usize::from(f.reason == Reason::Eos);
                let tokens = f.sequence.generated_token_ids().to_vec();
                assert!(outcomes.insert(f.sequence.payload, Outcome::Finished(tokens)).is_none());
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
            if let Outcome::Finished(tokens) = outcome {
                let r = &requests[index];
                let alone = generate_alone(&r.prompt_token_ids, r.max_new_tokens, true);
                assert_eq!(tokens, alone, "seed {seed}: request {index}");
            }
        }
    }
    assert!(
        num_preempted > 50,
        "the pools are small enough to preempt ({num_preempted})"
    );
    assert!(num_cancelled > 10, "cancellations happen ({num_cancelled})");
    assert!(num_cache_hits > 50, "prefixes are shared ({num_cache_hits})");
    assert!(num_eos > 10, "stops end runs early ({num_eos})");
}
