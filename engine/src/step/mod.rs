//! One engine step as a pipeline of named stages, each owning one decision
//! (DESIGN §2):
//!
//! ```text
//!  SeqStep[] ─► validate ─► plan (drafts, tiers) ─► choose (budget) ─► layout (tree rows, masks)
//!                 │                                                        │
//!                 └─ Staged: proposed histories, new samplers              ▼
//!  SeqResult[] ◄─ commit (KV moves, features, histories, stats) ◄─ accept ◄─ forward
//! ```
//!
//! Invariant: nothing a later step reads changes before the forward has
//! succeeded. Validation and planning only read the engine's sequences;
//! `commit` is the one stage that writes them (and it moves accepted KV
//! first, so a failed move leaves every sequence as it was).

pub mod accept;
pub mod choose;
pub mod commit;
pub mod layout;
pub mod plan;
pub mod validate;

use heterospec_kv::schedule::{CommittedRun, ScheduledRun};
use heterospec_kv::BlockId;

use crate::sampler::{SampledToken, Sampler, SamplingParams};
use crate::spec::{SpecMode, SpecOutcome};

/// Identifies a sequence between scheduler and engine.
pub use heterospec_kv::SeqId;

/// One sequence's work in a step.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqStep {
    pub seq_id: SeqId,
    /// Tokens to run now (a prompt chunk, or the last committed token).
    pub new_token_ids: Vec<u32>,
    /// Tokens of this sequence already in KV.
    pub num_computed: usize,
    /// Covers at least `num_computed + new_token_ids.len() + lookahead` tokens.
    pub block_table: Vec<BlockId>,
    /// Required the first time the engine sees the sequence.
    pub sampling: Option<SamplingParams>,
    /// On first sight with `num_computed > 0` (a prefix-cache hit): the
    /// cached tokens, for the repetition penalty's history.
    pub cached_token_ids: Vec<u32>,
    /// Whether this run ends the known tokens, so the next one is sampled.
    pub sample: bool,
    pub speculation: SpecMode,
    /// Slots reserved after the new tokens: at most this many draft tokens
    /// are accepted (so at most `lookahead + 1` tokens are committed).
    pub lookahead: usize,
    /// Runs the token the engine committed last for the sequence (planned
    /// before that token was known): `new_token_ids` is empty and
    /// `num_computed` a lower bound until [`SeqStep::resolve`] fills them in.
    pub continues: bool,
}

impl SeqStep {
    /// The scheduling core's run of a request that samples with `sampling`
    /// and speculates with `speculation` (sent on its first run only).
    pub fn scheduled(run: ScheduledRun, sampling: &SamplingParams, speculation: SpecMode) -> Self {
        SeqStep {
            seq_id: run.seq_id,
            new_token_ids: run.new_token_ids,
            num_computed: run.num_computed,
            block_table: run.block_table,
            sampling: run.first_run.then(|| sampling.clone()),
            cached_token_ids: run.cached_token_ids,
            sample: run.sample,
            speculation,
            lookahead: run.lookahead,
            continues: run.continues,
        }
    }

    /// A continuation made concrete from the sequence's state: its pending
    /// token at the position after its history. `Err` (the reason) when the
    /// engine holds no pending token for it.
    pub(crate) fn resolve(&mut self, state: Option<&SeqState>) -> std::result::Result<(), String> {
        if !self.continues {
            return Ok(());
        }
        let state = state.ok_or("continues an unknown sequence (never started, or released)")?;
        let token = state
            .pending
            .ok_or("continues a sequence with no committed token to run")?;
        if !self.new_token_ids.is_empty() || !self.sample || self.num_computed > state.history.len() {
            return Err(format!(
                "a continuation with {} new tokens, sample {} and at least {} computed tokens (the engine has {})",
                self.new_token_ids.len(),
                self.sample,
                self.num_computed,
                state.history.len()
            ));
        }
        self.new_token_ids = vec![token];
        self.num_computed = state.history.len();
        self.continues = false;
        Ok(())
    }
}

/// What a step committed for one sequence (empty for a mid-prompt chunk).
/// KV now holds the new tokens and every committed token but the last.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqResult {
    pub seq_id: SeqId,
    pub tokens: Vec<SampledToken>,
    pub spec: SpecOutcome,
}

impl SeqResult {
    /// The committed token ids, as the scheduling core takes them.
    pub fn committed(&self) -> CommittedRun {
        CommittedRun {
            seq_id: self.seq_id,
            token_ids: self.tokens.iter().map(|t| t.token_id).collect(),
        }
    }
}

/// What the engine keeps per live sequence: only what sampling needs.
pub(crate) struct SeqState {
    pub sampler: Sampler,
    /// Every token whose KV exists (after a step: through the new tokens
    /// and accepted draft tokens).
    pub history: Vec<u32>,
    /// The last token committed, not yet in KV (what a continuation runs);
    /// `None` after a run that sampled nothing.
    pub pending: Option<u32>,
}

/// One sequence of the step as the stages before `commit` see it.
pub(crate) struct Staged {
    /// The sequence's history through this step's new tokens (what it will
    /// be once the forward has run).
    pub history: Vec<u32>,
    /// The sampler of a sequence the engine sees for the first time.
    pub new_sampler: Option<Sampler>,
}
