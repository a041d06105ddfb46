//! Every metric the engine emits: names, help texts, and the recording
//! helpers. Buckets are set where the exporter is installed (the binary).

use std::time::Duration;

pub const STEP_DURATION_SECONDS: &str = "heterospec_engine_step_duration_seconds";
pub const STEP_TOKENS_TOTAL: &str = "heterospec_engine_step_tokens_total";
pub const STEPS_TOTAL: &str = "heterospec_engine_steps_total";
pub const STEP_SEQUENCES: &str = "heterospec_engine_step_sequences";
pub const SPEC_STEPS_TOTAL: &str = "heterospec_spec_steps_total";
pub const SPEC_DRAFT_TOKENS_TOTAL: &str = "heterospec_spec_draft_tokens_total";
pub const SPEC_VERIFIED_TOKENS_TOTAL: &str = "heterospec_spec_verified_tokens_total";
pub const SPEC_ACCEPTED_TOKENS_TOTAL: &str = "heterospec_spec_accepted_tokens_total";
pub const SPEC_ACCEPTANCE_LENGTH: &str = "heterospec_spec_acceptance_length";
pub const SPEC_BUDGET_TOKENS: &str = "heterospec_spec_budget_tokens";
pub const SPEC_DRAFT_FAILURES_TOTAL: &str = "heterospec_spec_draft_failures_total";

/// The `tier` label: `B0`..`B7` under HeteroSpec, `fixed` for the fixed tree.
pub fn tier_label(tier: Option<usize>) -> &'static str {
    const NAMES: [&str; 8] = ["B0", "B1", "B2", "B3", "B4", "B5", "B6", "B7"];
    tier.map_or("fixed", |t| NAMES[t.min(7)])
}

/// Registers help texts (call once after installing a recorder).
pub fn describe() {
    metrics::describe_histogram!(
        STEP_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Wall time of one engine step, by phase (step: the whole step; draft: growing draft trees; forward: the batched verify/decode forward)."
    );
    metrics::describe_counter!(
        STEP_TOKENS_TOTAL,
        "Tokens run through the model (prompt chunks and decode tokens)."
    );
    metrics::describe_counter!(STEPS_TOTAL, "Engine steps run.");
    metrics::describe_histogram!(STEP_SEQUENCES, "Sequences per engine step.");
    metrics::describe_counter!(
        SPEC_STEPS_TOTAL,
        "Speculative (sequence, step) verifications, by entropy tier (`fixed`: the fixed tree)."
    );
    metrics::describe_counter!(SPEC_DRAFT_TOKENS_TOTAL, "Draft tokens verified by the target, by tier.");
    metrics::describe_counter!(
        SPEC_VERIFIED_TOKENS_TOTAL,
        "Tokens run by verification (draft tokens plus each tree's root), by tier."
    );
    metrics::describe_counter!(SPEC_ACCEPTED_TOKENS_TOTAL, "Draft tokens accepted, by tier.");
    metrics::describe_histogram!(
        SPEC_ACCEPTANCE_LENGTH,
        "Tokens committed per speculative verification (accepted + 1), by tier."
    );
    metrics::describe_histogram!(
        SPEC_BUDGET_TOKENS,
        "Tree tokens (roots and draft nodes) verified per engine step: the global budget spent."
    );
    metrics::describe_counter!(
        SPEC_DRAFT_FAILURES_TOTAL,
        "Steps whose drafting failed and that decoded without drafts instead (same output)."
    );
    metrics::counter!(SPEC_DRAFT_FAILURES_TOTAL).increment(0);
}

/// Drafting failed for a step, which then decoded plainly.
pub fn record_draft_failure() {
    metrics::counter!(SPEC_DRAFT_FAILURES_TOTAL).increment(1);
}

/// One sequence's verification in one step.
pub fn record_spec(tier: Option<usize>, num_draft: usize, num_accepted: usize) {
    let tier = tier_label(tier);
    metrics::counter!(SPEC_STEPS_TOTAL, "tier" => tier).increment(1);
    metrics::counter!(SPEC_DRAFT_TOKENS_TOTAL, "tier" => tier).increment(num_draft as u64);
    metrics::counter!(SPEC_VERIFIED_TOKENS_TOTAL, "tier" => tier).increment(num_draft as u64 + 1);
    metrics::counter!(SPEC_ACCEPTED_TOKENS_TOTAL, "tier" => tier).increment(num_accepted as u64);
    metrics::histogram!(SPEC_ACCEPTANCE_LENGTH, "tier" => tier).record((num_accepted + 1) as f64);
}

/// A step that speculated: tree tokens verified and time spent drafting.
pub fn record_spec_step(budget_tokens: usize, draft: f64) {
    metrics::histogram!(SPEC_BUDGET_TOKENS).record(budget_tokens as f64);
    metrics::histogram!(STEP_DURATION_SECONDS, "phase" => "draft").record(draft);
}

/// The batched verify/decode forward of a step.
pub fn record_forward(secs: f64) {
    metrics::histogram!(STEP_DURATION_SECONDS, "phase" => "forward").record(secs);
}

pub fn record_step(elapsed: Duration, num_seqs: usize, num_tokens: usize) {
    metrics::histogram!(STEP_DURATION_SECONDS, "phase" => "step").record(elapsed.as_secs_f64());
    metrics::histogram!(STEP_SEQUENCES).record(num_seqs as f64);
    metrics::counter!(STEP_TOKENS_TOTAL).increment(num_tokens as u64);
    metrics::counter!(STEPS_TOTAL).increment(1);
}
