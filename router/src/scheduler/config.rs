//! The scheduler's knobs: batch limits, the step deadline, and when the
//! next step is sent while one runs.
//!
//! Invariant: these are fixed for a scheduler's life; `OverlapSteps`
//! parses from and prints as the `--overlap-steps` values.

use std::time::Duration;

/// Scheduling knobs.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Tokens (prompt chunks + decode tokens) per engine step.
    pub max_batch_tokens: usize,
    /// Sequences per engine step.
    pub max_running: usize,
    /// Deadline for one engine step before the engine counts as failed.
    pub step_timeout: Duration,
    /// When to plan and send the next step of steady decoding while one runs.
    pub overlap_steps: OverlapSteps,
}

/// When the next step is sent while one runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverlapSteps {
    /// For a GPU engine. Not for an engine computing on the host's cores:
    /// there the router's and the engine's own work for one step, moved
    /// into the next step's forward, takes cores from it, and overlapping
    /// measured no faster at any batch size on a 2-core machine.
    #[default]
    Auto,
    On,
    Off,
}

impl std::str::FromStr for OverlapSteps {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(OverlapSteps::Auto),
            "on" | "true" => Ok(OverlapSteps::On),
            "off" | "false" => Ok(OverlapSteps::Off),
            _ => Err(format!("--overlap-steps must be auto, on or off, not {s:?}")),
        }
    }
}

impl std::fmt::Display for OverlapSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OverlapSteps::Auto => "auto",
            OverlapSteps::On => "on",
            OverlapSteps::Off => "off",
        })
    }
}
