//! One behaviour per test, step by step.

use super::*;
use crate::schedule::ScheduleError;

fn ids<R>(schedule: &Schedule<R>) -> Vec<SeqId> {
    schedule.runs.iter().map(|r| r.seq_id).collect()
}

fn lens<R>(schedule: &Schedule<R>) -> Vec<usize> {
    schedule.runs.iter().map(|r| r.new_token_ids.len()).collect()
}

fn no_drafts(_: &ScheduledRun) -> usize {
    0
}

fn all_drafts(run: &ScheduledRun) -> usize {
    run.lookahead
}

#[test]
fn admission_is_fifo_running_goes_first_and_max_running_caps_the_batch() {
    let mut sched = Scheduler::new(config(100, 2, usize::MAX, 0), pool(64, 4), 10);
    let mut engine = FakeEngine::new(sched.pool());
    let a = sched.add(request(vec![1, 2, 3], 1, false), "a").expect("valid");
    let b = sched.add(request(vec![4, 5, 6], 5, false), "b").expect("valid");
    let c = sched.add(request(vec![7, 8, 9], 5, false), "c").expect("valid");
    assert_eq!((a, b, c), (SeqId(10), SeqId(11), SeqId(12)));

    let (first, finished) = step(&mut sched, &mut engine, no_drafts);
    assert_eq!(ids(&first), [a, b]);
    let admitted: Vec<_> = first.admitted.iter().map(|x| (x.seq_id, x.first_admission)).collect();
    assert_eq!(admitted, [(a, true), (b, true)]);
    assert_eq!(sched.num_waiting(), 1, "max_running 2 leaves c waiting");
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].sequence.payload, "a");
    assert_eq!(finished[0].reason, Reason::Length);

    let (second, _) = step(&mut sched, &mut engine, no_drafts);
    assert_eq!(ids(&second), [b, c], "the running b before the admitted c");
    assert_eq!(lens(&second), [1, 3]);
    assert_eq!(second.admitted.len(), 1);
    assert_eq!(second.admitted[0].seq_id, c);
}

#[test]
fn a_waiting_sequence_that_does_not_fit_keeps_its_place_at_the_front() {
    // 4 usable blocks of 2 slots: a holds 2, b needs 3.
    let mut sched = Scheduler::new(config(100, 4, usize::MAX, 0), pool(5, 2), 0);
    let mut engine = FakeEngine::new(sched.pool());
    let a = sched.add(request(vec![1, 2, 3, 4], 5, false), "a").expect("valid");
    sched
        .add(request(vec![5, 6, 7, 8, 9, 10], 5, false), "b")
        .expect("valid");
    sched.add(request(vec![11], 5, false), "c").expect("valid");
    let (first, _) = step(&mut sched, &mut engine, no_drafts);
    assert_eq!(ids(&first), [a]);
    let waiting: Vec<_> = sched.sequences().skip(1).map(|s| s.payload).collect();
    assert_eq!(waiting, ["b", "c"], "c does not overtake b");
    assert_eq!(sched.sequences().nth(1).expect("b").block_table().num_blocks(), 0);
}

#[test]
fn the_token_budget_chunks_prompts_across_steps_mixed_with_decode() {
    let mut sched = Scheduler::new(config(8, 4, usize::MAX, 0), pool(64, 4), 0);
    let mut engine = FakeEngine::new(sched.pool());
    let a = sched.add(request((0..5).collect(), 10, false), ()).expect("valid");
    let b = sched.add(request((100..110).collect(), 10, false), ()).expect("valid");

    let (first, _) = step(&mut sched, &mut engine, no_drafts);
    assert_eq!(ids(&first), [a, b]);
    assert_eq!(lens(&first), [5, 3], "b gets what is left of the budget");
    assert_eq!(first.runs.iter().map(|r| r.sample).collect::<Vec<_>>(), [true, false]);
    let seq_b = sched.get(b).expect("running");
    assert_eq!(seq_b.num_computed(), 3);
    assert_eq!(seq_b.num_generated(), 0);

    let (second, _) = step(&mut sched, &mut engine, no_drafts);
    assert_eq!(lens(&second), [1, 7], "a decodes, b finishes its prompt");
    assert_eq!(second.runs[1].num_computed, 3);
    assert!(second.runs[1].sample);
    assert_eq!(sched.get(b).expect("running").num_generated(), 1);
}

#[test]
fn max_prefill_chunk_caps_one_sequence_run() {
    let mut sched = Scheduler::new(config(100, 4, 4, 0), pool(64, 4), 0);
    let mut engine = FakeEngine::new(sched.pool());
    engine.report_empty = true;
    sched.add(request((0..10).collect(), 3, false), ()).expect("valid");
    sched.add(request((20..23).collect(), 3, false), ()).expect("valid");
    let mut runs = Vec::new();
    while !sched.is_idle() {
        let (schedule, _) = step(&mut sched, &mut engine, no_drafts);
        runs.push(lens(&schedule));
    }
    assert_eq!(runs, [vec![4, 3], vec![4, 1], vec![2, 1], vec![1], vec![1]]);
}

#[test]
fn lookahead_is_reserved_only_for_sampling_speculating_runs_and_capped_by_what_is_left() {
    let mut sched = Scheduler::new(config(100, 4, 4, 4), pool(64, 4), 0);
    let mut engine = FakeEngine::new(sched.pool());
    let long = sched.add(request((0..6).collect(), 3, true), ()).expect("valid");
    let plain = sched.add(request((10..12).collect(), 9, false), ()).expect("valid");
    let roomy = sched.add(request((20..22).collect(), 9, true), ()).expect("valid");
    let single = sched.add(request((30..32).collect(), 1, true), ()).expect("valid");

    let (first, _) = step(&mut sched, &mut engine, no_drafts);
    let lookaheads: Vec<_> = first.runs.iter().map(|r| (r.seq_id, r.sample, r.lookahead)).collect();
    assert_eq!(
        lookaheads,
        [(long, false, 0), (plain, true, 0), (roomy, true, 4), (single, true, 0)],
        "a prompt chunk, no speculation, the engine's cap, nothing left after the sample"
    );
    let (second, _) = step(&mut sched, &mut engine, no_drafts);
    assert_eq!(second.runs[0].seq_id, long);
    assert_eq!(second.runs[0].lookahead, 2, "max_new_tokens 3 - 0 generated - 1");
}

#[test]
fn lookahead_drops_to_zero_when_blocks_are_short() {
    // 3 prompt tokens + 4 lookahead slots need 2 blocks of 4.
    let mut roomy = Scheduler::new(config(100, 4, usize::MAX, 4), pool(3, 4), 0);
    roomy.add(request((0..3).collect(), 10, true), ()).expect("valid");
    assert_eq!(roomy.schedule().runs[0].lookahead, 4);

    let mut short = Scheduler::new(config(100, 4, usize::MAX, 4), pool(2, 4), 0);
    let mut engine = FakeEngine::new(short.pool());
    short.add(request((0..3).collect(), 10, true), ()).expect("valid");
    let (first, _) = step(&mut short, &mut engine, all_drafts);
    assert!(first.runs[0].sample);
    assert_eq!(first.runs[0].lookahead, 0, "no partial lookahead in the one block");
    assert_eq!(first.runs[0].block_table.len(), 1);
    let (second, _) = step(&mut short, &mut engine, all_drafts);
    assert_eq!(second.runs[0].lookahead, 0);
    assert_eq!(short.get(SeqId(0)).expect("running").num_computed(), 4);
}

#[test]
fn update_applies_the_commit_rule_and_gives_back_unused_lookahead() {
    let mut sched = Scheduler::new(config(100, 4, usize::MAX, 4), pool(11, 4), 0);
    let mut engine = FakeEngine::new(sched.pool());
    let a = sched.add(request((0..6).collect(), 10, true), ()).expect("valid");
    let schedule = sched.schedule();
    assert_eq!(schedule.runs[0].lookahead, 4);
    assert_eq!(
        sched.get(a).expect("running").block_table().num_blocks(),
        3,
        "6 + 4 slots"
    );
    assert_eq!(sched.pool().num_free_blocks(), 7);
    let committed = engine.step(&schedule, |_| 1);
    assert_eq!(committed[0].token_ids.len(), 2);
    sched.update(committed, decide).expect("valid commit");
    let seq = sched.get(a).expect("running");
    assert_eq!(
        seq.num_computed(),
        6 + 2 - 1,
        "the run and every committed token but the last"
    );
    assert_eq!(seq.token_ids().len(), 8);
    assert_eq!(seq.block_table().num_blocks(), 2, "blocks for 7 tokens");
    assert_eq!(
        seq.block_table().num_hashed_blocks(),
        1,
        "the full block of computed tokens"
    );
    assert_eq!(sched.pool().num_free_blocks(), 8);
    sched.check_invariants().expect("consistent");
}

#[test]
fn a_stop_inside_the_run_keeps_only_kept_tokens_finishes_and_releases() {
    let mut sched = Scheduler::new(config(100, 4, usize::MAX, 4), pool(11, 4), 0);
    let mut engine = FakeEngine::new(sched.pool());
    let a = sched.add(request((0..6).collect(), 10, true), "a").expect("valid");
    let schedule = sched.schedule();
    let committed = engine.step(&schedule, |_| 2);
    let produced = committed[0].token_ids.clone();
    assert_eq!(produced.len(), 3);
    let finished = sched
        .update(committed, |seq, tokens| {
            assert_eq!(seq.num_generated(), 0, "decide sees the sequence before the commit");
            assert_eq!(tokens, produced);
            Verdict {
                keep: 2,
                finish: Some(Reason::Stop),
            }
        })
        .expect("valid commit");
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].reason, Reason::Stop);
    assert_eq!(finished[0].sequence.generated_token_ids(), &produced[..2]);
    assert_eq!(finished[0].sequence.block_table().num_blocks(), 0);
    assert!(sched.is_idle());
    assert_eq!(sched.pool().num_free_blocks(), sched.pool().num_usable_blocks());
    assert_eq!(sched.take_released(), [a]);
    assert!(sched.take_released().is_empty(), "take_released drains");
}

#[test]
fn preemption_requeues_the_newest_first_under_a_new_id_and_it_recomputes_from_the_cache() {
    // Block size 2, 5 usable blocks: two 4-token prompts fill 4 of them.
    let mut sched = Scheduler::new(config(100, 4, usize::MAX, 0), pool(6, 2), 0);
    let mut engine = FakeEngine::new(sched.pool());
    let prompt_b: Vec<u32> = vec![9, 8, 7, 6];
    let a = sched.add(request(vec![1, 2, 3, 4], 2, false), "a").expect("valid");
    let b = sched.add(request(prompt_b.clone(), 3, false), "b").expect("valid");
    let (first, _) = step(&mut sched, &mut engine, no_drafts);
    assert_eq!(ids(&first), [a, b]);
    assert_eq!(sched.pool().num_free_blocks(), 1);

    // a takes the last block for its decode token; b, the newest, yields.
    let (second, finished) = step(&mut sched, &mut engine, no_drafts);
    assert_eq!(ids(&second), [a]);
    assert_eq!(second.num_preempted, 1);
    assert_eq!(finished.len(), 1, "a ends at max_new_tokens 2");
    let requeued = sched.sequences().find(|s| s.payload == "b").expect("b is held");
    let new_b = requeued.seq_id();
    assert_ne!(new_b, b);
    assert_eq!(requeued.num_generated(), 1, "generated tokens are kept");
    assert!(!sched.take_released().contains(&new_b));

    let (third, _) = step(&mut sched, &mut engine, no_drafts);
    assert_eq!(third.admitted.len(), 1);
    let admission = third.admitted[0];
    assert_eq!(admission.seq_id, new_b);
    assert!(!admission.first_admission);
    assert_eq!(admission.num_queried_tokens, 5);
    assert_eq!(
        admission.num_cached_tokens, 4,
        "its registered prompt blocks are still cached"
    );
    assert!(third.runs[0].first_run);
    assert_eq!(third.runs[0].cached_token_ids, prompt_b);
    assert_eq!(third.runs[0].new_token_ids.len(), 1);

    let mut done = Vec::new();
    while !sched.is_idle() {
        done.extend(step(&mut sched, &mut engine, no_drafts).1);
    }
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0].sequence.generated_token_ids(),
        generate_alone(&prompt_b, 3, false)
    );
    assert_eq!(
        done[0].sequence.num_cached_prompt_tokens(),
        0,
        "the hit at first admission"
    );
}

#[test]
fn a_sequence_that_cannot_fit_alone_is_rejected_not_lost_or_looped_on() {
    // 3 usable blocks of 2 slots.
    let mut sched = Scheduler::new(config(100, 4, usize::MAX, 0), pool(4, 2), 0);
    let mut engine = FakeEngine::new(sched.pool());
    sched
        .add(request((0..10).collect(), 5, false), "too long")
        .expect("valid");
    let grows = sched.add(request((0..5).collect(), 10, false), "grows").expect("valid");
    let first = sched.schedule();
    assert_eq!(first.rejected.len(), 1);
    assert_eq!(first.rejected[0].payload, "too long");
    assert_eq!(ids(&first), [grows]);
    assert!(
        sched.take_released().is_empty(),
        "the engine never saw the rejected one"
    );
    let committed = engine.step(&first, no_drafts);
    sched.update(committed, decide).expect("valid commit");

    step(&mut sched, &mut engine, no_drafts);
    let third = sched.schedule();
    assert!(third.runs.is_empty());
    assert_eq!(third.rejected.len(), 1, "7 tokens need 4 blocks");
    assert_eq!(third.rejected[0].num_generated(), 2);
    assert!(sched.is_idle());
    assert_eq!(sched.pool().num_free_blocks(), 3);
    assert_eq!(sched.take_released(), [grows]);
}

#[test]
fn equal_prompts_share_blocks_and_salts_isolate() {
    let mut sched = Scheduler::new(config(100, 4, usize::MAX, 0), pool(32, 4), 0);
    let mut engine = FakeEngine::new(sched.pool());
    let prompt: Vec<u32> = (0..9).collect();
    let a = sched.add(request(prompt.clone(), 5, false), ()).expect("valid");
    step(&mut sched, &mut engine, no_drafts);
    let b = sched.add(request(prompt.clone(), 5, false), ()).expect("valid");
    let salted = NewSequence {
        cache_salt: Some("tenant".into()),
        ..request(prompt.clone(), 5, false)
    };
    let c = sched.add(salted, ()).expect("valid");
    let (second, _) = step(&mut sched, &mut engine, no_drafts);
    let hits: Vec<_> = second
        .admitted
        .iter()
        .map(|x| (x.seq_id, x.num_cached_tokens))
        .collect();
    assert_eq!(hits, [(b, 8), (c, 0)]);
    let table_a = sched.get(a).expect("running").block_table().block_ids().to_vec();
    let table_b = sched.get(b).expect("running").block_table().block_ids().to_vec();
    let table_c = sched.get(c).expect("running").block_table().block_ids().to_vec();
    assert_eq!(table_a[..2], table_b[..2]);
    assert_eq!(sched.pool().ref_count(table_a[0]), 2);
    assert!(table_c.iter().all(|block| !table_a.contains(block)));
    assert_eq!(sched.get(b).expect("running").num_cached_prompt_tokens(), 8);
    let finished_b = loop {
        let (_, finished) = step(&mut sched, &mut engine, no_drafts);
        if let Some(f) = finished.into_iter().find(|f| f.sequence.seq_id() == b) {
            break f;
        }
    };
    assert_eq!(
        finished_b.sequence.generated_token_ids(),
        generate_alone(&prompt, 5, false)
    );
}

#[test]
fn cancel_frees_blocks_and_releases_only_ids_the_engine_knew() {
    let mut sched = Scheduler::new(config(100, 1, usize::MAX, 0), pool(32, 4), 0);
    let mut engine = FakeEngine::new(sched.pool());
    let a = sched.add(request((0..9).collect(), 5, false), "a").expect("valid");
    sched.add(request((0..5).collect(), 5, false), "b").expect("valid");
    step(&mut sched, &mut engine, no_drafts);
    assert_eq!((sched.num_running(), sched.num_waiting()), (1, 1));
    let mut offered = Vec::new();
    let cancelled = sched.cancel(|s| {
        offered.push(s.payload);
        true
    });
    assert_eq!(offered, ["a", "b"], "running, then waiting");
    assert_eq!(cancelled.len(), 2);
    assert!(sched.is_idle());
    assert_eq!(sched.pool().num_free_blocks(), sched.pool().num_usable_blocks());
    assert_eq!(sched.take_released(), [a]);
    sched.check_invariants().expect("consistent");
}

#[test]
fn contract_violations_are_errors_that_change_nothing() {
    let mut sched = Scheduler::new(config(100, 4, usize::MAX, 2), pool(32, 4), 0);
    let mut engine = FakeEngine::new(sched.pool());
    let a = sched.add(request((0..5).collect(), 5, true), ()).expect("valid");
    let schedule = sched.schedule();
    let before = format!("{sched:?}");
    let no_token = vec![CommittedRun {
        seq_id: a,
        token_ids: Vec::new(),
    }];
    let err = sched
        .update(no_token, decide)
        .expect_err("a sampled run committed nothing");
    assert_eq!(err, ScheduleError::NoTokenForSampledRun { seq_id: a });
    assert!(err.to_string().contains(&a.to_string()));
    assert!(matches!(
        sched.update(Vec::new(), decide),
        Err(ScheduleError::NoTokenForSampledRun { .. })
    ));
    let stranger = vec![CommittedRun {
        seq_id: SeqId(99),
        token_ids: vec![1],
    }];
    assert!(matches!(
        sched.update(stranger, decide),
        Err(ScheduleError::NotScheduled { seq_id: SeqId(99) })
    ));
    let committed = engine.step(&schedule, all_drafts);
    let too_many = |_: &mut Sequence<()>, tokens: &[u32]| Verdict::<Reason> {
        keep: tokens.len() + 1,
        finish: None,
    };
    assert!(matches!(
        sched.update(committed.clone(), too_many),
        Err(ScheduleError::KeepExceedsCommitted { .. })
    ));
    let cut = |_: &mut Sequence<()>, _: &[u32]| Verdict::<Reason> { keep: 1, finish: None };
    assert!(matches!(
        sched.update(committed.clone(), cut),
        Err(ScheduleError::TruncatedWithoutFinish { .. })
    ));
    assert_eq!(format!("{sched:?}"), before, "nothing changed");
    sched.update(committed, decide).expect("the real commit applies");
    assert_eq!(sched.get(a).expect("running").num_computed(), 5 + 3 - 1);
}

#[test]
fn first_run_and_cached_token_ids_are_set_once_per_seq_id() {
    let mut sched = Scheduler::new(config(100, 4, usize::MAX, 0), pool(32, 4), 0);
    let mut engine = FakeEngine::new(sched.pool());
    let prompt: Vec<u32> = (0..9).collect();
    sched.add(request(prompt.clone(), 5, false), ()).expect("valid");
    let (first, _) = step(&mut sched, &mut engine, no_drafts);
    assert!(first.runs[0].first_run);
    assert!(first.runs[0].cached_token_ids.is_empty(), "nothing cached yet");
    let b = sched.add(request(prompt.clone(), 5, false), ()).expect("valid");
    let (second, _) = step(&mut sched, &mut engine, no_drafts);
    assert_eq!(second.runs[1].seq_id, b);
    assert!(second.runs[1].first_run);
    assert_eq!(second.runs[1].num_computed, 8);
    assert_eq!(second.runs[1].cached_token_ids, prompt[..8]);
    assert_eq!(second.runs[1].new_token_ids, [8]);
    let (third, _) = step(&mut sched, &mut engine, no_drafts);
    assert!(third.runs.iter().all(|r| !r.first_run && r.cached_token_ids.is_empty()));
}

#[test]
fn drain_hands_back_everything_and_reset_pool_starts_empty() {
    let mut sched = Scheduler::new(config(100, 1, usize::MAX, 0), pool(32, 4), 0);
    let mut engine = FakeEngine::new(sched.pool());
    for name in ["a", "b", "c"] {
        sched.add(request((0..6).collect(), 5, false), name).expect("valid");
    }
    step(&mut sched, &mut engine, no_drafts);
    sched.cancel(|s| s.payload == "c");
    let drained: Vec<_> = sched.drain().into_iter().map(|s| s.payload).collect();
    assert_eq!(drained, ["a", "b"]);
    assert!(sched.is_idle());
    assert!(sched.take_released().is_empty(), "a new engine knows nothing");
    assert_eq!(sched.pool().num_free_blocks(), sched.pool().num_usable_blocks());
    sched.reset_pool(pool(8, 4));
    assert_eq!(sched.pool().num_usable_blocks(), 7);
    sched.add(request((0..6).collect(), 5, false), "d").expect("valid");
    let schedule = sched.schedule();
    assert!(schedule.runs[0].first_run);
    assert_eq!(schedule.admitted[0].num_cached_tokens, 0);
}

#[test]
fn config_and_requests_are_validated_naming_the_field() {
    assert_eq!(config(1, 1, 1, 0).validate(), Ok(()));
    for (bad, field) in [
        (config(0, 1, 1, 0), "max_batch_tokens"),
        (config(1, 0, 1, 0), "max_running"),
        (config(1, 1, 0, 0), "max_prefill_chunk"),
    ] {
        let err = bad.validate().expect_err("a zero field");
        assert!(err.to_string().contains(field), "{err}");
    }
    let mut sched: Scheduler<()> = Scheduler::new(config(1, 1, 1, 0), pool(4, 4), 0);
    let empty = sched.add(request(Vec::new(), 1, false), ()).expect_err("empty prompt");
    assert!(empty.to_string().contains("prompt_token_ids"), "{empty}");
    let zero = sched
        .add(request(vec![1], 0, false), ())
        .expect_err("zero max_new_tokens");
    assert!(zero.to_string().contains("max_new_tokens"), "{zero}");
    assert!(sched.is_idle());
}
