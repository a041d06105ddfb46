//! Speculative decoding: drafters grow candidate trees, the HeteroSpec
//! policy sizes them by entropy tier, one global budget per step picks the
//! nodes to verify across the batch, and the verifier accepts a path so that
//! the output is exactly the target model's (DESIGN §2, steps 2–9).
//!
//! Nothing before verification looks at target logits or the verifier's
//! random numbers, which is why any tree shape is lossless.

pub mod budget;
pub mod calibrate;
pub mod drafter;
pub mod estimates;
pub mod gate;
pub mod head;
pub mod hybrid;
pub mod policy;
pub mod setup;
pub mod train;
pub mod tree;
pub mod verify;

use std::str::FromStr;

pub use budget::{CostCurve, Selection};
pub use drafter::{DraftInput, Drafter, ModelDrafter, NgramDrafter, Proposal};
pub use head::{DraftHead, HeadConfig, HeadWeights};
pub use hybrid::HybridDrafter;
pub use policy::{SpecPolicy, TierShape};
pub use tree::{DraftTree, Node};

/// How a request speculates (values of `heterospec.v1.SpeculationMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SpecMode {
    /// HeteroSpec; falls back to plain decoding per step when the cost curve
    /// says verifying more tokens does not pay (the budget rule does this).
    #[default]
    Auto,
    Off,
    /// A static tree of the policy's base depth and size (EAGLE-2 style).
    Fixed,
    /// Entropy tiers under the global verification budget.
    Hetero,
}

impl SpecMode {
    pub fn from_proto(value: i32) -> Option<Self> {
        Some(match value {
            0 => SpecMode::Auto,
            1 => SpecMode::Off,
            2 => SpecMode::Fixed,
            3 => SpecMode::Hetero,
            _ => return None,
        })
    }

    pub fn to_proto(self) -> i32 {
        match self {
            SpecMode::Auto => 0,
            SpecMode::Off => 1,
            SpecMode::Fixed => 2,
            SpecMode::Hetero => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SpecMode::Auto => "auto",
            SpecMode::Off => "off",
            SpecMode::Fixed => "fixed",
            SpecMode::Hetero => "hetero",
        }
    }
}

impl FromStr for SpecMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => SpecMode::Auto,
            "off" => SpecMode::Off,
            "fixed" => SpecMode::Fixed,
            "hetero" => SpecMode::Hetero,
            other => return Err(format!("unknown speculation mode `{other}` (off, fixed, hetero, auto)")),
        })
    }
}

/// Per-step speculation outcome of one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpecOutcome {
    /// Whether a draft tree was verified for this sequence this step.
    pub speculated: bool,
    /// Entropy tier used (`None`: fixed tree or no speculation this step).
    pub tier: Option<usize>,
    /// Draft tokens verified (tree nodes besides the root).
    pub num_draft_tokens: usize,
    /// Draft tokens accepted.
    pub num_accepted_tokens: usize,
}
