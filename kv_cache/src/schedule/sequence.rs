//! One request as the core holds it: its tokens (prompt, then generated),
//! how far its KV is computed, its block table and its engine-side id.
//!
//! Invariants: `num_prompt <= token_ids.len()`; `num_computed <=
//! token_ids.len()`; `num_scheduled` and `lookahead` are non-zero only
//! while a run is in flight (between `schedule` and `update`, or after an
//! `update` that started a run planned ahead); `ahead` is set only while
//! `num_scheduled > 0`; `engine_knows` is false for a fresh id.

use std::fmt;

use crate::schedule::ScheduleError;
use crate::table::BlockTable;

/// Engine-side id of a sequence; a sequence gets a new one after each preemption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A request to schedule, in tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSequence {
    /// Non-empty.
    pub prompt_token_ids: Vec<u32>,
    /// At least 1.
    pub max_new_tokens: usize,
    /// Whether lookahead slots are reserved for draft tokens.
    pub speculate: bool,
    /// Isolates this request's prefix-cache entries from other salts.
    pub cache_salt: Option<String>,
}

impl NewSequence {
    /// Rejects an empty prompt or a zero `max_new_tokens`, naming the field.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        if self.prompt_token_ids.is_empty() {
            return Err(ScheduleError::InvalidRequest {
                field: "prompt_token_ids",
                reason: "must not be empty",
            });
        }
        if self.max_new_tokens == 0 {
            return Err(ScheduleError::InvalidRequest {
                field: "max_new_tokens",
                reason: "must be at least 1",
            });
        }
        Ok(())
    }
}

/// A request the core holds. `payload` is the caller's (response channel,
/// output stream, timestamps, ...).
#[derive(Debug)]
pub struct Sequence<R> {
    /// The caller's data, carried along untouched.
    pub payload: R,
    pub(crate) seq_id: SeqId,
    /// Prompt, then every generated token.
    pub(crate) token_ids: Vec<u32>,
    pub(crate) num_prompt: usize,
    pub(crate) max_new_tokens: usize,
    pub(crate) speculate: bool,
    pub(crate) cache_salt: Option<String>,
    /// Tokens whose KV is in the table's blocks.
    pub(crate) num_computed: usize,
    /// Tokens run in the step in flight.
    pub(crate) num_scheduled: usize,
    /// Slots reserved after them for accepted draft tokens.
    pub(crate) lookahead: usize,
    /// The lookahead of a continuation planned while the run in flight
    /// runs (`Scheduler::schedule_ahead`): the next run, already sent.
    pub(crate) ahead: Option<usize>,
    pub(crate) table: BlockTable,
    /// The engine has run this seq id (and holds state for it).
    pub(crate) engine_knows: bool,
    /// Prefix-cache hit at first admission.
    pub(crate) num_cached_prompt_tokens: usize,
    /// Admitted at least once (a preempted sequence has been).
    pub(crate) admitted: bool,
}

impl<R> Sequence<R> {
    pub(crate) fn new(seq_id: SeqId, request: NewSequence, payload: R) -> Self {
        Sequence {
            payload,
            seq_id,
            num_prompt: request.prompt_token_ids.len(),
            token_ids: request.prompt_token_ids,
            max_new_tokens: request.max_new_tokens,
            speculate: request.speculate,
            cache_salt: request.cache_salt,
            num_computed: 0,
            num_scheduled: 0,
            lookahead: 0,
            ahead: None,
            table: BlockTable::new(),
            engine_knows: false,
            num_cached_prompt_tokens: 0,
            admitted: false,
        }
    }

    /// The current engine-side id.
    pub fn seq_id(&self) -> SeqId {
        self.seq_id
    }

    /// Prompt, then every generated token.
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    /// The prompt as submitted.
    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.token_ids[..self.num_prompt]
    }

    /// Every token generated so far (kept across preemptions).
    pub fn generated_token_ids(&self) -> &[u32] {
        &self.token_ids[self.num_prompt..]
    }

    /// Tokens generated so far.
    pub fn num_generated(&self) -> usize {
        self.token_ids.len() - self.num_prompt
    }

    /// Most tokens the request may generate.
    pub fn max_new_tokens(&self) -> usize {
        self.max_new_tokens
    }

    /// Tokens the request may still generate.
    pub fn num_remaining(&self) -> usize {
        self.max_new_tokens.saturating_sub(self.num_generated())
    }

    /// Whether lookahead slots are reserved for draft tokens.
    pub fn speculate(&self) -> bool {
        self.speculate
    }

    /// The prefix-cache salt, if any.
    pub fn cache_salt(&self) -> Option<&str> {
        self.cache_salt.as_deref()
    }

    /// Tokens whose KV is computed (and held by the block table).
    pub fn num_computed(&self) -> usize {
        self.num_computed
    }

    /// Prompt tokens found in the prefix cache at first admission.
    pub fn num_cached_prompt_tokens(&self) -> usize {
        self.num_cached_prompt_tokens
    }

    /// The blocks holding this sequence's KV (empty while waiting).
    pub fn block_table(&self) -> &BlockTable {
        &self.table
    }

    /// Whether the engine holds state under the current seq id.
    pub fn engine_knows(&self) -> bool {
        self.engine_knows
    }

    /// The run of the step in flight ends the known tokens.
    pub(crate) fn samples(&self) -> bool {
        self.num_scheduled > 0 && self.num_computed + self.num_scheduled == self.token_ids.len()
    }
}
