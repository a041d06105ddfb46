//! Scheduling knobs and the errors of the scheduling core.
//!
//! A config is valid when every budget is at least 1 (`max_lookahead` may be
//! 0: no speculation); `Scheduler::new` refuses an invalid one.

use crate::schedule::SeqId;

/// Scheduling knobs of one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleConfig {
    /// Tokens (prompt chunks + decode tokens) per step, shared by all sequences.
    pub max_batch_tokens: usize,
    /// Sequences per step.
    pub max_running: usize,
    /// Most tokens of one sequence per step (`usize::MAX`: no cap beyond the budget).
    pub max_prefill_chunk: usize,
    /// Most draft tokens the engine accepts per step (0: no speculation).
    pub max_lookahead: usize,
}

impl ScheduleConfig {
    /// Rejects a zero token budget, running cap or prefill chunk, naming the field.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        let fields = [
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_running", self.max_running),
            ("max_prefill_chunk", self.max_prefill_chunk),
        ];
        match fields.into_iter().find(|&(_, value)| value == 0) {
            Some((field, _)) => Err(ScheduleError::InvalidConfig { field }),
            None => Ok(()),
        }
    }
}

/// What the scheduling core refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// A config field that must be at least 1 is 0.
    #[error("schedule config: {field} must be at least 1")]
    InvalidConfig { field: &'static str },
    /// A request field is out of range (empty prompt, zero `max_new_tokens`).
    #[error("request: {field} {reason}")]
    InvalidRequest { field: &'static str, reason: &'static str },
    /// The engine broke the contract: a run that ends the known tokens
    /// (`sample`) committed nothing.
    #[error("engine committed no token for sequence {seq_id}, which was to be sampled")]
    NoTokenForSampledRun { seq_id: SeqId },
    /// Tokens came back for a sequence the last schedule did not run.
    #[error("tokens committed for sequence {seq_id}, which the last schedule did not run")]
    NotScheduled { seq_id: SeqId },
    /// The same sequence appears twice in one step's committed runs.
    #[error("sequence {seq_id} committed twice in one step")]
    DuplicateCommit { seq_id: SeqId },
    /// `decide` kept more tokens than were committed.
    #[error("sequence {seq_id}: kept {keep} of {num_committed} committed tokens")]
    KeepExceedsCommitted {
        seq_id: SeqId,
        keep: usize,
        num_committed: usize,
    },
    /// `decide` dropped committed tokens without finishing the sequence
    /// (only a stop inside the run may cut it short).
    #[error("sequence {seq_id}: kept {keep} of {num_committed} committed tokens without finishing")]
    TruncatedWithoutFinish {
        seq_id: SeqId,
        keep: usize,
        num_committed: usize,
    },
}
