//! Every metric the router emits (names, help texts). Buckets are set where
//! the exporter is installed (the binary). Labels are bounded: `outcome` is a
//! finish reason or an error type, `engine` an index, `state` used/free.

pub const REQUESTS_TOTAL: &str = "heterospec_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "heterospec_request_duration_seconds";
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "heterospec_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "heterospec_inter_token_latency_seconds";
pub const QUEUE_DURATION_SECONDS: &str = "heterospec_queue_duration_seconds";
pub const PROMPT_TOKENS_TOTAL: &str = "heterospec_prompt_tokens_total";
pub const GENERATED_TOKENS_TOTAL: &str = "heterospec_generated_tokens_total";
pub const REQUESTS_RUNNING: &str = "heterospec_requests_running";
pub const REQUESTS_WAITING: &str = "heterospec_requests_waiting";
pub const KV_BLOCKS: &str = "heterospec_kv_blocks";
pub const PREEMPTIONS_TOTAL: &str = "heterospec_preemptions_total";
pub const PREFIX_CACHE_QUERIES_TOTAL: &str = "heterospec_prefix_cache_queries_total";
pub const PREFIX_CACHE_HITS_TOTAL: &str = "heterospec_prefix_cache_hits_total";
pub const ENGINE_UP: &str = "heterospec_engine_up";
pub const REQUESTS_RETRIED_TOTAL: &str = "heterospec_requests_retried_total";
pub const ENGINE_STEP_SECONDS: &str = "heterospec_engine_step_seconds";
pub const ENGINE_BUSY_SECONDS: &str = "heterospec_engine_busy_seconds";
pub const ENGINE_STEPS_OVERLAPPED_TOTAL: &str = "heterospec_engine_steps_overlapped_total";

/// Histograms with time buckets (seconds).
pub const LATENCY_HISTOGRAMS: &[&str] = &[
    REQUEST_DURATION_SECONDS,
    TIME_TO_FIRST_TOKEN_SECONDS,
    INTER_TOKEN_LATENCY_SECONDS,
    QUEUE_DURATION_SECONDS,
    ENGINE_STEP_SECONDS,
    ENGINE_BUSY_SECONDS,
];

/// Registers help texts (call once after installing a recorder).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        REQUESTS_TOTAL,
        "Finished requests by outcome (length, eos, stop, cancelled, or an error type)."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from arrival to the last response."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Time from arrival to the first generated token."
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY_SECONDS,
        Unit::Seconds,
        "Time between generated tokens of one request."
    );
    describe_histogram!(
        QUEUE_DURATION_SECONDS,
        Unit::Seconds,
        "Time from arrival to the first scheduled step."
    );
    describe_counter!(PROMPT_TOKENS_TOTAL, "Prompt tokens of admitted requests.");
    describe_counter!(GENERATED_TOKENS_TOTAL, "Tokens generated.");
    describe_gauge!(REQUESTS_RUNNING, "Requests with KV blocks on an engine.");
    describe_gauge!(REQUESTS_WAITING, "Requests queued for admission.");
    describe_gauge!(
        KV_BLOCKS,
        "KV blocks by state (used: referenced by a request; free: reusable, possibly cached)."
    );
    describe_counter!(
        PREEMPTIONS_TOTAL,
        "Requests preempted (blocks freed, recomputed later) for lack of KV blocks."
    );
    describe_counter!(
        PREFIX_CACHE_QUERIES_TOTAL,
        "Prompt tokens looked up in the prefix cache."
    );
    describe_counter!(PREFIX_CACHE_HITS_TOTAL, "Prompt tokens found in the prefix cache.");
    describe_gauge!(ENGINE_UP, "1 when the router is connected to the engine, else 0.");
    describe_histogram!(
        ENGINE_STEP_SECONDS,
        Unit::Seconds,
        "Time each engine step was the oldest in flight as the router sees it: its round trip, less the part spent behind the step before it when steps overlap. rate(_sum) is the share of time some step was in flight."
    );
    describe_histogram!(
        ENGINE_BUSY_SECONDS,
        Unit::Seconds,
        "Time the engine spent on one step, as it reports; rate(_sum) is the share of time it was busy, one minus that its idle share."
    );
    describe_counter!(
        ENGINE_STEPS_OVERLAPPED_TOTAL,
        "Engine steps sent while the step before them still ran (--overlap-steps), all engines together."
    );
    describe_counter!(
        REQUESTS_RETRIED_TOTAL,
        "Requests moved to another engine after theirs failed before their first token."
    );
    // Counters that may stay at zero for a long time still get a series, so
    // dashboards and alerts see 0 rather than no data.
    for name in [
        PREEMPTIONS_TOTAL,
        PROMPT_TOKENS_TOTAL,
        GENERATED_TOKENS_TOTAL,
        PREFIX_CACHE_QUERIES_TOTAL,
        PREFIX_CACHE_HITS_TOTAL,
        REQUESTS_RETRIED_TOTAL,
        ENGINE_STEPS_OVERLAPPED_TOTAL,
    ] {
        metrics::counter!(name).increment(0);
    }
}
