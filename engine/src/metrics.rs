//! Every metric the engine emits: names, help texts, and the recording
//! helpers. Buckets are set where the exporter is installed (the binary).

use std::time::Duration;

pub const STEP_DURATION_SECONDS: &str = "heterospec_engine_step_duration_seconds";
pub const STEP_TOKENS_TOTAL: &str = "heterospec_engine_step_tokens_total";
pub const STEPS_TOTAL: &str = "heterospec_engine_steps_total";
pub const STEP_SEQUENCES: &str = "heterospec_engine_step_sequences";

/// Registers help texts (call once after installing a recorder).
pub fn describe() {
    metrics::describe_histogram!(
        STEP_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Wall time of one engine step, by phase (forward: the batched model forward and sampling)."
    );
    metrics::describe_counter!(
        STEP_TOKENS_TOTAL,
        "Tokens run through the model (prompt chunks and decode tokens)."
    );
    metrics::describe_counter!(STEPS_TOTAL, "Engine steps run.");
    metrics::describe_histogram!(STEP_SEQUENCES, "Sequences per engine step.");
}

pub fn record_step(elapsed: Duration, num_seqs: usize, num_tokens: usize) {
    metrics::histogram!(STEP_DURATION_SECONDS, "phase" => "forward").record(elapsed.as_secs_f64());
    metrics::histogram!(STEP_SEQUENCES).record(num_seqs as f64);
    metrics::counter!(STEP_TOKENS_TOTAL).increment(num_tokens as u64);
    metrics::counter!(STEPS_TOTAL).increment(1);
}
