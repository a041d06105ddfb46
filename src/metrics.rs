//! The Prometheus exporter of this binary: where each process serves
//! `/metrics`, and the histogram buckets of every metric it emits (names and
//! help texts live with the code that records them: `heterospec_router::
//! metrics`, `heterospec_engine::metrics`).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Request-level latencies: 5 ms to 2 minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// One engine step: 1 ms to 10 s.
const STEP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Sequences per step; tree tokens verified per step.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// Tokens committed per speculative verification (accepted + 1).
const ACCEPTANCE_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0];

/// Serves `/metrics` on `addr` (needs a running tokio runtime).
pub fn install(addr: SocketAddr) -> Result<()> {
    let mut builder = PrometheusBuilder::new().with_http_listener(addr);
    for name in heterospec_router::metrics::LATENCY_HISTOGRAMS {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.to_string()), LATENCY_BUCKETS)?;
    }
    builder = builder
        .set_buckets_for_metric(
            Matcher::Full(heterospec_engine::metrics::STEP_DURATION_SECONDS.to_string()),
            STEP_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(heterospec_engine::metrics::STEP_SEQUENCES.to_string()),
            BATCH_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(heterospec_engine::metrics::SPEC_BUDGET_TOKENS.to_string()),
            BATCH_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(heterospec_engine::metrics::SPEC_ACCEPTANCE_LENGTH.to_string()),
            ACCEPTANCE_BUCKETS,
        )?;
    builder
        .install()
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    Ok(())
}
