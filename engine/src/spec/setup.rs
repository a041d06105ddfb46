//! An engine's speculation as one value: the drafter it runs, the policy
//! (tiers, tree shapes), the forward-cost curve and the verification budget
//! it implies, and the budget rule's running estimates.
//!
//! Built once at start-up; the cost curve is measured then (warm, in rounds
//! of forwards of 1..64 tokens after a 128-token context, the median)
//! unless one is given, and refined from the engine's decode steps after.

use std::time::Instant;

use heterospec_kv::BlockId;

use crate::batch::{RaggedBatch, SeqRun};
use crate::error::{EngineError, Result};
use crate::kv::{KvLayout, KvStorage};
use crate::model::Model;
use crate::spec::budget::CostCurve;
use crate::spec::drafter::{Drafter, ModelDrafter, NgramDrafter};
use crate::spec::estimates::AcceptanceEstimates;
use crate::spec::gate::{MeasuredRates, SeqGains};
use crate::spec::head::DraftHead;
use crate::spec::hybrid::HybridDrafter;
use crate::spec::policy::SpecPolicy;
use crate::spec::verify::AcceptRule;

/// Most tree nodes (besides roots) one step verifies: the target's scratch.
pub const MAX_VERIFY_NODES: usize = 256;
/// Scratch slots of a model drafter's tree nodes per step.
pub const DRAFT_SCRATCH_SLOTS: usize = 1024;
/// Forward sizes measured at start-up for the cost curve.
pub const COST_CURVE_TOKENS: [usize; 8] = [1, 2, 4, 8, 16, 32, 48, 64];

/// Which drafter an engine runs.
pub enum DrafterKind {
    Ngram,
    /// The target's first `num_layers` layers.
    SelfDraft {
        num_layers: usize,
    },
    /// A separate model with the target's vocabulary.
    Model(Box<Model>),
    /// An EAGLE-style draft head on the target's features.
    Head(Box<DraftHead>),
    /// A draft head and prompt lookup in one tree.
    Hybrid(Box<DraftHead>),
}

impl DrafterKind {
    /// KV bytes per block the drafter keeps of its own (0: none).
    pub fn bytes_per_block(&self, block_size: usize) -> usize {
        match self {
            DrafterKind::Model(m) => ModelDrafter::bytes_per_block(m, block_size),
            DrafterKind::Head(h) | DrafterKind::Hybrid(h) => h.bytes_per_block(block_size),
            _ => 0,
        }
    }

    /// Scratch slots of the target's KV the drafter needs besides the
    /// verified nodes' (a self-draft writes its tree there).
    pub fn target_scratch_slots(&self) -> usize {
        match self {
            DrafterKind::SelfDraft { .. } => DRAFT_SCRATCH_SLOTS,
            _ => 0,
        }
    }
}

/// Speculation settings of an engine.
pub struct SpecSetup {
    pub drafter: DrafterKind,
    pub policy: SpecPolicy,
    /// Cap on tree tokens (roots and nodes) per step; `None`: the largest
    /// size of the cost curve.
    pub verify_budget: Option<usize>,
    /// `None`: measured at start-up, then refined from the engine's steps,
    /// and drafting guarded by the measured rates. A given curve is taken
    /// as is (neither refined nor overruled by measured rates): the caller
    /// decides what a forward costs (tests pin drafting on this way).
    pub cost_curve: Option<CostCurve>,
}

/// A running engine's speculation.
pub struct Speculation {
    pub drafter: Box<dyn Drafter>,
    pub policy: SpecPolicy,
    pub curve: CostCurve,
    /// Tree tokens (roots and nodes) one step verifies at most.
    pub verify_budget: usize,
    pub rule: AcceptRule,
    pub estimates: AcceptanceEstimates,
    /// What drafting recently gained each sequence.
    pub seq_gains: SeqGains,
    /// Measured rates of steps with and without drafts.
    pub rates: MeasuredRates,
    /// The cost curve was measured here: it is refined from the engine's
    /// decode steps, and the measured rates may stop drafting.
    pub adaptive: bool,
}

impl Speculation {
    /// Builds the drafter for `target` (whose KV has `layout`) and measures
    /// the cost curve on `kv` unless `setup` has one.
    pub fn build(setup: SpecSetup, target: &Model, kv: &mut KvStorage) -> Result<Self> {
        setup.policy.validate().map_err(EngineError::Config)?;
        let layout = kv.layout();
        let k = setup.policy.entropy_top_k;
        let target_config = target.config();
        let drafter: Box<dyn Drafter> = match setup.drafter {
            DrafterKind::Ngram => Box::new(NgramDrafter {
                entropy_top_k: k,
                ..NgramDrafter::default()
            }),
            DrafterKind::SelfDraft { num_layers } => {
                if num_layers == 0 || num_layers >= target_config.num_layers {
                    return Err(EngineError::Config(format!(
                        "self-draft layers must be in 1..{}, got {num_layers}",
                        target_config.num_layers
                    )));
                }
                Box::new(ModelDrafter::self_draft(num_layers).with_entropy_top_k(k))
            }
            DrafterKind::Model(m) => Box::new(
                ModelDrafter::with_model(*m, layout, target_config.vocab_size, DRAFT_SCRATCH_SLOTS)?
                    .with_entropy_top_k(k),
            ),
            DrafterKind::Head(h) => Box::new(head_drafter(*h, target, layout, k)?),
            DrafterKind::Hybrid(h) => Box::new(HybridDrafter::new(
                head_drafter(*h, target, layout, k)?,
                NgramDrafter {
                    entropy_top_k: k,
                    ..NgramDrafter::default()
                },
                setup.policy.ngram_acceptance.clone(),
            )),
        };
        let adaptive = setup.cost_curve.is_none();
        let curve = match setup.cost_curve {
            Some(c) => c,
            None => measure_cost_curve(target, kv)?,
        };
        let verify_budget = setup.verify_budget.unwrap_or(curve.max_tokens()).max(1);
        tracing::info!(
            drafter = drafter.name(),
            verify_budget,
            cost_curve_ms = ?curve.points().iter().map(|&(t, s)| (t, (s * 1e4).round() / 10.0)).collect::<Vec<_>>(),
            "speculation ready"
        );
        Ok(Speculation {
            drafter,
            policy: setup.policy,
            curve,
            verify_budget,
            rule: AcceptRule::Exact,
            estimates: AcceptanceEstimates::default(),
            seq_gains: SeqGains::default(),
            rates: MeasuredRates::default(),
            adaptive,
        })
    }
}

/// A draft head's drafter, once its width is checked against the target's;
/// the head runs on the target's device where that device runs heads.
fn head_drafter(mut head: DraftHead, target: &Model, layout: KvLayout, entropy_top_k: usize) -> Result<ModelDrafter> {
    let target_hidden = target.config().hidden_size;
    if head.hidden_size() != target_hidden {
        return Err(EngineError::Config(format!(
            "the draft head's hidden size is {}, the target's {target_hidden}",
            head.hidden_size(),
        )));
    }
    if head.place_on(target)? {
        tracing::info!(device = %target.device(), "draft head placed on the target's device");
    }
    Ok(ModelDrafter::with_head(head, layout, DRAFT_SCRATCH_SLOTS)?.with_entropy_top_k(entropy_top_k))
}

/// The target's KV layout when it shares `kv_cache_bytes` with `drafter`'s
/// own KV, with the scratch slots speculation needs.
pub fn target_layout(
    target: &Model,
    drafter: Option<&DrafterKind>,
    block_size: usize,
    kv_cache_bytes: usize,
) -> Result<KvLayout> {
    let draft_bytes = drafter.map_or(0, |d| d.bytes_per_block(block_size));
    let target_bytes = ModelDrafter::bytes_per_block(target, block_size);
    // The KV budget covers both models' blocks.
    let share = kv_cache_bytes / (target_bytes + draft_bytes).max(1) * target_bytes;
    let mut layout = KvLayout::for_budget(target.config(), block_size, share)?;
    if let Some(d) = drafter {
        layout.scratch_slots = MAX_VERIFY_NODES + d.target_scratch_slots();
    }
    Ok(layout)
}

/// Seconds per forward of `T` tokens after a 128-token context, for `T`
/// in [`COST_CURVE_TOKENS`], measured the way steady decoding runs: after
/// warm-up forwards, in rounds over every size (so a drift of the
/// machine's speed touches them alike), the median of the rounds. Runs
/// before any sequence exists, so it may write anywhere in KV.
pub fn measure_cost_curve(model: &Model, kv: &mut KvStorage) -> Result<CostCurve> {
    const WARM_UP: usize = 3;
    const ROUNDS: usize = 5;
    let layout = kv.layout();
    let bs = layout.block_size;
    let max_t = *COST_CURVE_TOKENS.last().expect("non-empty");
    let blocks_available = layout.num_blocks - 1;
    let context = 128.min((blocks_available * bs).saturating_sub(max_t));
    let num_blocks = (context + max_t).div_ceil(bs).min(blocks_available);
    let table: Vec<BlockId> = (1..=num_blocks as u32).map(BlockId).collect();
    let mut batches = Vec::new();
    for &t in COST_CURVE_TOKENS.iter().filter(|&&t| context + t <= num_blocks * bs) {
        let run = SeqRun::causal(vec![1; t], context, &table, bs)?.with_all_logits();
        batches.push((t, RaggedBatch { seqs: vec![run] }));
    }
    for (i, (_, batch)) in batches.iter().enumerate() {
        for _ in 0..if i == 0 { WARM_UP } else { 1 } {
            model.forward(batch, kv)?;
        }
    }
    let mut samples = vec![Vec::with_capacity(ROUNDS); batches.len()];
    for _ in 0..ROUNDS {
        for (i, (_, batch)) in batches.iter().enumerate() {
            let start = Instant::now();
            model.forward(batch, kv)?;
            samples[i].push(start.elapsed().as_secs_f64());
        }
    }
    let points = batches
        .iter()
        .zip(&mut samples)
        .map(|((t, _), s)| {
            s.sort_by(f64::total_cmp);
            (*t, s[s.len() / 2])
        })
        .collect();
    Ok(CostCurve::new(points))
}
