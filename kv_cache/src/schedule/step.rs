//! What crosses the boundary between the core and its driver each step:
//! the plan (`Schedule`, one `ScheduledRun` per sequence with tokens), what
//! the engine committed (`CommittedRun`), the driver's verdict on it
//! (`Verdict`) and the sequences that ended (`Finished`).
//!
//! Invariants of a plan: `runs` follow the running order and name distinct
//! seq ids; `block_table` covers `num_computed + new_token_ids.len() +
//! lookahead` slots (a continuation's: the most its previous run may leave
//! computed, plus its one token and its lookahead); `lookahead > 0` only
//! when `sample`.

use crate::block::BlockId;
use crate::schedule::{SeqId, Sequence};

/// The plan of one step.
#[derive(Debug)]
pub struct Schedule<R> {
    /// In running order; only sequences with tokens this step.
    pub runs: Vec<ScheduledRun>,
    /// Sequences moved from waiting to running this step, in admission order.
    pub admitted: Vec<Admission>,
    /// Running sequences sent back to the waiting queue to free blocks.
    pub num_preempted: usize,
    /// Sequences that can never fit: alone and still out of blocks. Their
    /// blocks are freed and their ids (if the engine knew them) released.
    pub rejected: Vec<Sequence<R>>,
}

/// One sequence's part of a step, as the engine needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledRun {
    /// The sequence's current engine-side id.
    pub seq_id: SeqId,
    /// Tokens to run: `token_ids[num_computed..num_computed + n]`.
    pub new_token_ids: Vec<u32>,
    /// Tokens whose KV is already in the table's blocks.
    pub num_computed: usize,
    /// Blocks for every slot the run and its lookahead touch, in position order.
    pub block_table: Vec<BlockId>,
    /// The engine has not seen this seq id: send the sampling params.
    pub first_run: bool,
    /// `token_ids[..num_computed]` when `first_run` (the cached prefix the
    /// engine did not compute under this id), else empty.
    pub cached_token_ids: Vec<u32>,
    /// The run ends the known tokens: the engine samples after it.
    pub sample: bool,
    /// Slots reserved after the run for accepted draft tokens.
    pub lookahead: usize,
    /// A continuation planned while the sequence's previous run is still in
    /// flight ([`Scheduler::schedule_ahead`](crate::schedule::Scheduler::schedule_ahead)):
    /// the engine runs the token it committed last, which the plan does not
    /// know yet; `new_token_ids` is empty and `num_computed` is the fewest
    /// the previous run leaves computed (the engine uses its own count).
    pub continues: bool,
}

/// A sequence moved from waiting to running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The admitted sequence's id.
    pub seq_id: SeqId,
    /// Never admitted before (not a preempted sequence coming back).
    pub first_admission: bool,
    /// Tokens looked up in the prefix cache (the whole known sequence).
    pub num_queried_tokens: usize,
    /// Tokens found there (their KV is reused).
    pub num_cached_tokens: usize,
}

/// What the engine committed for one run: sampled and accepted tokens, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedRun {
    /// The run's sequence.
    pub seq_id: SeqId,
    /// Committed tokens: accepted draft tokens, then the sampled one.
    pub token_ids: Vec<u32>,
}

/// The driver's judgement of one sequence's committed tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict<F> {
    /// Committed tokens to append (fewer than committed only with `finish`:
    /// a stop inside the run).
    pub keep: usize,
    /// Ends the sequence after the kept tokens, with this reason.
    pub finish: Option<F>,
}

impl<F> Verdict<F> {
    /// Keeps all `num_committed` tokens and goes on.
    pub fn keep_all(num_committed: usize) -> Self {
        Verdict {
            keep: num_committed,
            finish: None,
        }
    }
}

/// A sequence that ended in `update`; its blocks are freed and its id released.
#[derive(Debug)]
pub struct Finished<R, F> {
    /// The ended sequence, holding no blocks.
    pub sequence: Sequence<R>,
    /// The driver's reason, from its `Verdict`.
    pub reason: F,
}
