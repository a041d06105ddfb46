//! Drafters: who proposes the candidate tokens of a draft tree.
//!
//! A drafter answers one batched question per tree layer: for each of these
//! (sequence, node) pairs, what are the `k` most likely next tokens (with
//! log-probabilities) and how uncertain is that guess (entropy of the
//! renormalised top-K). Implementations:
//! - [`NgramDrafter`]: prompt lookup, free, no model;
//! - [`ModelDrafter`] with its own model and paged KV (`--draft-model`), or
//!   with the target's first layers (layer-skip self-draft).

use std::collections::HashMap;

use heterospec_kv::BlockId;

use crate::backend::FeatureTap;
use crate::batch::{RaggedBatch, SeqRun};
use crate::device_head::TopRow;
use crate::error::{EngineError, Result};
use crate::features::Features;
use crate::kv::{KvLayout, KvStorage};
use crate::model::Model;
use crate::ops::top_logprobs;
use crate::spec::head::DraftHead;
use crate::spec::tree::{top_k_entropy, DraftTree};
use heterospec_kv::SeqId;

/// One sequence as a drafter sees it this step.
#[derive(Debug, Clone, Copy)]
pub struct DraftInput<'a> {
    pub seq_id: SeqId,
    /// Every token of the sequence through the root (the last one).
    pub tokens: &'a [u32],
    /// Tokens whose target KV exists before this step (the rest are run
    /// by this step's verify forward).
    pub num_computed: usize,
    pub block_table: &'a [BlockId],
    /// Draft only with candidates that cost no model forward (see
    /// [`Drafter::drafts_for_free`]): the budget rule found this
    /// sequence's full drafts not paying lately.
    pub free_only: bool,
}

/// A drafter's guess for a node's next token.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Proposal {
    /// At most `k` (token, log-probability), most likely first.
    pub candidates: Vec<(u32, f32)>,
    /// Entropy of the renormalised top-K probabilities.
    pub entropy: f32,
}

/// The target's model and KV, for drafters that share them; `scratch` are
/// the scratch-slot indices of the target's storage a drafter may use.
pub struct TargetView<'a> {
    pub model: &'a Model,
    pub kv: &'a mut KvStorage,
    pub scratch: std::ops::Range<usize>,
}

pub trait Drafter: Send {
    /// `ngram`, `model` or `self` (names a calibration file's drafter).
    fn name(&self) -> &'static str;

    /// Proposals for each `(index into inputs, node of trees[index])`.
    /// Requests for a root (node 0) start a new step.
    fn expand(
        &mut self,
        target: &mut TargetView<'_>,
        inputs: &[DraftInput<'_>],
        trees: &[DraftTree],
        requests: &[(usize, usize)],
        k: usize,
    ) -> Result<Vec<Proposal>>;

    /// Whether the drafter has candidates that cost no model forward (for
    /// inputs with `free_only`); a drafter without them is not asked for
    /// such inputs.
    fn drafts_for_free(&self) -> bool {
        false
    }

    /// Forgets a sequence.
    fn release(&mut self, _seq_id: SeqId) {}

    /// The target states [`Drafter::observe_features`] wants, if any (the
    /// verify forward then also returns them).
    fn feature_tap(&self) -> Option<FeatureTap> {
        None
    }

    /// The target's states (of [`Drafter::feature_tap`]) of the token now in
    /// each KV slot, after a forward: row `rows[i]` of the forward's
    /// `features` is the state of the token in `slots[i]`.
    fn observe_features(&mut self, _slots: &[usize], _features: &Features, _rows: &[usize]) -> Result<()> {
        Ok(())
    }
}

/// Prompt lookup: the longest suffix (up to `max_ngram` tokens) of the
/// sequence plus the node's path that occurred earlier; the tokens that
/// followed those occurrences, ranked by count. Probability of a follower
/// is `count / (total + u)` where `u = max_ngram - n + 1` is the mass left
/// for "something else" (shorter matches are less sure), and the entropy
/// spreads that mass evenly over the rest of the top-K.
#[derive(Debug, Clone)]
pub struct NgramDrafter {
    pub max_ngram: usize,
    pub entropy_top_k: usize,
}

impl Default for NgramDrafter {
    fn default() -> Self {
        NgramDrafter {
            max_ngram: 4,
            entropy_top_k: 8,
        }
    }
}

impl NgramDrafter {
    /// The longest suffix of `seq` (at most `max_ngram` tokens) that
    /// occurred earlier: its length, and the tokens that followed it with
    /// their counts, most frequent first.
    pub fn followers(&self, seq: &[u32]) -> Option<(usize, Vec<(u32, u32)>)> {
        let len = seq.len();
        for n in (1..=self.max_ngram.min(len.saturating_sub(1))).rev() {
            let suffix = &seq[len - n..];
            let mut counts: Vec<(u32, u32)> = Vec::new();
            for start in 0..len - n {
                if &seq[start..start + n] == suffix {
                    let next = seq[start + n];
                    match counts.iter_mut().find(|c| c.0 == next) {
                        Some(c) => c.1 += 1,
                        None => counts.push((next, 1)),
                    }
                }
            }
            if !counts.is_empty() {
                counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                return Some((n, counts));
            }
        }
        None
    }

    /// The proposal for the token after `seq`.
    pub fn propose(&self, seq: &[u32], k: usize) -> Proposal {
        let Some((n, counts)) = self.followers(seq) else {
            return Proposal::default();
        };
        let unknown = (self.max_ngram - n + 1) as f32;
        let total = counts.iter().map(|c| c.1 as f32).sum::<f32>() + unknown;
        let probs: Vec<(u32, f32)> = counts.iter().map(|&(t, c)| (t, c as f32 / total)).collect();
        self.proposal(&probs, k)
    }

    /// A proposal from follower probabilities (most likely first); the
    /// mass they leave is spread evenly over the rest of the top-K, so a
    /// lone short match reads as uncertain and a long repeated one as sure.
    pub fn proposal(&self, probs: &[(u32, f32)], k: usize) -> Proposal {
        let mut all: Vec<f32> = probs.iter().map(|p| p.1).collect();
        let left = (1.0 - all.iter().sum::<f32>()).max(0.0);
        let others = self.entropy_top_k.saturating_sub(probs.len()).max(1);
        all.extend(std::iter::repeat_n(left / others as f32, others));
        Proposal {
            candidates: probs.iter().take(k).map(|&(t, p)| (t, p.ln())).collect(),
            entropy: top_k_entropy(&mut all, self.entropy_top_k),
        }
    }
}

impl Drafter for NgramDrafter {
    fn name(&self) -> &'static str {
        "ngram"
    }

    fn expand(
        &mut self,
        _target: &mut TargetView<'_>,
        inputs: &[DraftInput<'_>],
        trees: &[DraftTree],
        requests: &[(usize, usize)],
        k: usize,
    ) -> Result<Vec<Proposal>> {
        Ok(requests
            .iter()
            .map(|&(s, node)| self.propose(&node_context(&inputs[s], &trees[s], node), k))
            .collect())
    }
}

/// The tokens a drafter continues at `node` of a sequence's tree: the
/// sequence through its root, then the path down to the node.
pub fn node_context(input: &DraftInput<'_>, tree: &DraftTree, node: usize) -> Vec<u32> {
    let mut seq = input.tokens.to_vec();
    seq.extend(tree.path_tokens(node));
    seq
}

/// Where a [`ModelDrafter`]'s model and KV live.
pub enum DraftSource {
    /// A separate model (same vocabulary) with its own paged KV, addressed
    /// by the same block tables as the target's, plus its own scratch.
    Own { model: Box<Model>, kv: KvStorage },
    /// The target's first `num_layers` layers, reading and writing the
    /// target's KV of those layers (exact for every committed token).
    SelfLayers { num_layers: usize },
    /// A draft head with its own paged KV (a layer per head layer) and its
    /// feature store (a row per KV slot: the target's state, or the head's
    /// prediction for a drafted node; slots of shared prefix blocks share
    /// their rows like their K/V), where the head runs.
    Head { head: Box<DraftHead>, kv: KvStorage },
}

/// A drafter that runs a model: draft tree nodes attend to the sequence's
/// paged KV and to their ancestors (written by earlier draft forwards into
/// scratch slots).
pub struct ModelDrafter {
    source: DraftSource,
    entropy_top_k: usize,
    /// Own source: tokens of each sequence in the draft KV.
    computed: HashMap<SeqId, usize>,
    /// This step's KV slot of each drafted (sequence, node): a scratch
    /// slot, or the root's own.
    node_slots: HashMap<(usize, usize), usize>,
    next_scratch: usize,
}

impl ModelDrafter {
    /// A drafter with its own model; `layout` is the target's (same blocks).
    pub fn with_model(
        model: Model,
        target_layout: KvLayout,
        target_vocab: usize,
        scratch_slots: usize,
    ) -> Result<Self> {
        if model.config().vocab_size != target_vocab {
            return Err(EngineError::Config(format!(
                "the draft model's vocabulary has {} tokens, the target's {target_vocab}",
                model.config().vocab_size
            )));
        }
        let layout = KvLayout {
            num_blocks: target_layout.num_blocks,
            block_size: target_layout.block_size,
            num_layers: model.config().num_layers,
            kv_size: model.config().kv_size(),
            scratch_slots,
        };
        Ok(ModelDrafter {
            source: DraftSource::Own {
                kv: model.new_kv(layout)?,
                model: Box::new(model),
            },
            entropy_top_k: 8,
            computed: HashMap::new(),
            node_slots: HashMap::new(),
            next_scratch: 0,
        })
    }

    /// A draft head; `target_layout` is the target's (same blocks).
    /// The head's KV lives where the head runs ([`DraftHead::new_kv`]).
    pub fn with_head(mut head: DraftHead, target_layout: KvLayout, scratch_slots: usize) -> Result<Self> {
        let layout = KvLayout {
            num_blocks: target_layout.num_blocks,
            block_size: target_layout.block_size,
            num_layers: head.num_layers(),
            kv_size: head.kv_size(),
            scratch_slots,
        };
        Ok(ModelDrafter {
            source: DraftSource::Head {
                kv: head.new_kv(layout)?,
                head: Box::new(head),
            },
            entropy_top_k: 8,
            computed: HashMap::new(),
            node_slots: HashMap::new(),
            next_scratch: 0,
        })
    }

    /// Layer-skip self-draft with the target's first `num_layers` layers.
    pub fn self_draft(num_layers: usize) -> Self {
        ModelDrafter {
            source: DraftSource::SelfLayers { num_layers },
            entropy_top_k: 8,
            computed: HashMap::new(),
            node_slots: HashMap::new(),
            next_scratch: 0,
        }
    }

    pub fn with_entropy_top_k(mut self, k: usize) -> Self {
        self.entropy_top_k = k;
        self
    }

    /// Bytes of KV per block of its own storage (0 for self-draft).
    pub fn bytes_per_block(model: &Model, block_size: usize) -> usize {
        2 * model.config().num_layers * block_size * model.config().kv_size() * std::mem::size_of::<f32>()
    }
}

impl Drafter for ModelDrafter {
    fn name(&self) -> &'static str {
        match self.source {
            DraftSource::Own { .. } => "model",
            DraftSource::SelfLayers { .. } => "self",
            DraftSource::Head { .. } => "head",
        }
    }

    fn feature_tap(&self) -> Option<FeatureTap> {
        match &self.source {
            DraftSource::Head { head, .. } => Some(head.feature_tap().clone()),
            _ => None,
        }
    }

    fn observe_features(&mut self, slots: &[usize], features: &Features, rows: &[usize]) -> Result<()> {
        match &mut self.source {
            DraftSource::Head { head, .. } => head.observe(slots, features, rows),
            _ => Ok(()),
        }
    }

    fn expand(
        &mut self,
        target: &mut TargetView<'_>,
        inputs: &[DraftInput<'_>],
        trees: &[DraftTree],
        requests: &[(usize, usize)],
        k: usize,
    ) -> Result<Vec<Proposal>> {
        if requests.iter().any(|r| r.1 == 0) {
            self.node_slots.clear();
            self.next_scratch = 0;
        }
        let (scratch_base, scratch_len, block_size) = match &self.source {
            DraftSource::Own { kv, .. } | DraftSource::Head { kv, .. } => (
                kv.layout().scratch_slot(0),
                kv.layout().scratch_slots,
                kv.layout().block_size,
            ),
            DraftSource::SelfLayers { .. } => (
                target.kv.layout().scratch_slot(0) + target.scratch.start,
                target.scratch.len(),
                target.kv.layout().block_size,
            ),
        };
        // One run per sequence; `rows[i]` = logits row of requests[i].
        let mut batch = RaggedBatch::default();
        let mut rows: Vec<Option<usize>> = vec![None; requests.len()];
        let mut num_rows = 0;
        let mut seq_order: Vec<usize> = requests.iter().map(|r| r.0).collect();
        seq_order.dedup();
        // Head source: the stored feature row each batch token reads.
        let reads_features = matches!(self.source, DraftSource::Head { .. });
        let mut feature_rows: Vec<Option<usize>> = Vec::new();
        for &s in &seq_order {
            let input = &inputs[s];
            let tree = &trees[s];
            let mine: Vec<usize> = (0..requests.len()).filter(|&i| requests[i].0 == s).collect();
            let root_pos = input.tokens.len() - 1;
            if mine.iter().any(|&i| requests[i].1 == 0) {
                let start = match &self.source {
                    DraftSource::Own { .. } => self.computed.get(&input.seq_id).copied().unwrap_or(input.num_computed),
                    // A new sequence's head KV is built from its first token:
                    // blocks from the prefix cache hold the target's features
                    // but maybe no head K/V (their first owner may never have
                    // drafted), and a head's layers over a prompt are cheap.
                    DraftSource::Head { .. } => self.computed.get(&input.seq_id).copied().unwrap_or(0),
                    DraftSource::SelfLayers { .. } => input.num_computed,
                }
                .min(root_pos);
                let run = SeqRun::causal(input.tokens[start..].to_vec(), start, input.block_table, block_size)?;
                if reads_features {
                    // Row q reads the target's feature of q - 1, known for
                    // positions computed before this step (zeros otherwise:
                    // those rows are redone next step).
                    feature_rows.extend(
                        (start..=root_pos)
                            .map(|q| (q > 0 && q <= input.num_computed).then(|| run.cached_slot(q - 1, block_size))),
                    );
                }
                // The root's row is stored at its slot, where its children read it.
                self.node_slots
                    .insert((s, 0), *run.slots.last().expect("the root is in its run"));
                for &i in &mine {
                    rows[i] = Some(num_rows);
                }
                num_rows += 1;
                batch.seqs.push(run);
                match self.source {
                    DraftSource::Own { .. } => {
                        self.computed.insert(input.seq_id, input.tokens.len());
                    }
                    DraftSource::Head { .. } => {
                        self.computed
                            .insert(input.seq_id, input.tokens.len().min(input.num_computed + 1));
                    }
                    DraftSource::SelfLayers { .. } => {}
                }
                continue;
            }
            let mut run = SeqRun {
                token_ids: Vec::new(),
                positions: Vec::new(),
                num_cached: input.tokens.len(),
                block_table: input.block_table.to_vec(),
                slots: Vec::new(),
                mask: None,
                extra_slots: Vec::new(),
                logits_rows: Vec::new(),
            };
            for &i in &mine {
                let node = requests[i].1;
                let ancestors: Option<Vec<usize>> = tree
                    .ancestors(node)
                    .iter()
                    .map(|&a| self.node_slots.get(&(s, a)).copied())
                    .collect();
                let Some(ancestors) = ancestors else { continue };
                if self.next_scratch >= scratch_len {
                    continue; // out of scratch: this node is not expanded
                }
                if reads_features {
                    // The parent's predicted feature, stored when it was drafted.
                    let Some(&parent) = self.node_slots.get(&(s, tree.nodes[node].parent)) else {
                        continue;
                    };
                    feature_rows.push(Some(parent));
                }
                let slot = scratch_base + self.next_scratch;
                self.next_scratch += 1;
                self.node_slots.insert((s, node), slot);
                run.logits_rows.push(run.token_ids.len());
                run.token_ids.push(tree.nodes[node].token);
                run.positions.push(root_pos + tree.nodes[node].depth);
                run.slots.push(slot);
                run.extra_slots.push(ancestors);
                rows[i] = Some(num_rows);
                num_rows += 1;
            }
            let n = run.token_ids.len();
            if n == 0 {
                continue;
            }
            run.mask = Some((0..n * n).map(|x| x / n == x % n).collect());
            batch.seqs.push(run);
        }
        let m = k.max(self.entropy_top_k);
        let top: Vec<TopRow> = match &mut self.source {
            DraftSource::Own { model, kv } => top_rows(&model.forward(&batch, kv)?, num_rows, m),
            DraftSource::SelfLayers { num_layers } => top_rows(
                &target.model.forward_layers(&batch, target.kv, *num_layers)?,
                num_rows,
                m,
            ),
            DraftSource::Head { head, kv } => {
                let mut top = head.forward_top(target.model, &batch, &feature_rows, kv, m)?;
                for c in top.iter_mut().flatten() {
                    c.0 = head.target_token(c.0);
                }
                top
            }
        };
        Ok(rows
            .iter()
            .map(|row| match row {
                Some(r) => proposal_from_top(&top[*r], k, self.entropy_top_k),
                None => Proposal::default(),
            })
            .collect())
    }

    fn release(&mut self, seq_id: SeqId) {
        self.computed.remove(&seq_id);
    }
}

/// Each of `rows` rows of `logits`' best `m` entries ([`top_logprobs`]).
fn top_rows(logits: &[f32], rows: usize, m: usize) -> Vec<TopRow> {
    let vocab = logits.len() / rows.max(1);
    (0..rows)
        .map(|r| top_logprobs(&logits[r * vocab..(r + 1) * vocab], m))
        .collect()
}

/// Top-`k` log-probabilities and the renormalised top-K entropy of a row.
pub fn proposal_from_logits(logits: &[f32], k: usize, entropy_top_k: usize) -> Proposal {
    proposal_from_top(&top_logprobs(logits, k.max(entropy_top_k)), k, entropy_top_k)
}

/// [`proposal_from_logits`] from a row's best `max(k, entropy_top_k)`
/// entries and their logprobs ([`top_logprobs`]).
pub fn proposal_from_top(top: &[(u32, f32)], k: usize, entropy_top_k: usize) -> Proposal {
    let mut probs: Vec<f32> = top.iter().take(entropy_top_k).map(|t| t.1.exp()).collect();
    Proposal {
        candidates: top.iter().take(k).copied().collect(),
        entropy: top_k_entropy(&mut probs, entropy_top_k),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::log_sum_exp;

    #[test]
    fn ngram_follows_the_longest_earlier_match() {
        let d = NgramDrafter::default();
        // "1 2 3 4" then later "2 3" -> next is 4; "3 9" once elsewhere does
        // not count because the 2-gram "2 3" matches.
        let p = d.propose(&[1, 2, 3, 4, 7, 3, 9, 2, 3], 4);
        assert_eq!(p.candidates[0].0, 4);
        assert_eq!(p.candidates.len(), 1);
        // 2-gram match of 4 max: u = 3, p = 1/4.
        assert!((p.candidates[0].1 - 0.25f32.ln()).abs() < 1e-6);
        assert!(p.entropy > 0.0);
        // Two followers seen after "5": ranked by count.
        let p = d.propose(&[5, 1, 5, 2, 5, 2, 7, 5], 4);
        assert_eq!(p.candidates.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 1]);
        assert!(d.propose(&[1, 2, 3], 4).candidates.is_empty());
    }

    #[test]
    fn proposal_from_logits_ranks_and_normalises() {
        let logits = [0.0, 3.0, 1.0, 2.0, -1.0];
        let p = proposal_from_logits(&logits, 2, 3);
        assert_eq!(p.candidates.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 3]);
        let lse = log_sum_exp(&logits);
        assert!((p.candidates[0].1 - (3.0 - lse)).abs() < 1e-6);
        let mut top3: Vec<f32> = [3.0f32, 2.0, 1.0].iter().map(|l| (l - lse).exp()).collect();
        assert!((p.entropy - top_k_entropy(&mut top3, 3)).abs() < 1e-6);
    }
}
