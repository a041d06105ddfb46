//! The HeteroSpec policy: base tree shape, entropy thresholds, and the tier
//! rule (DESIGN §2 steps 4–5). Lives in a calibration file per (target,
//! drafter) pair, written by `heterospec calibrate`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Number of entropy thresholds (a depth-3 regression tree: 7 splits, 8 bins).
pub const NUM_THRESHOLDS: usize = 7;
/// Bins that get deeper, narrower trees (B0..B2).
pub const NUM_ADAPTED_TIERS: usize = 3;

/// Calibration file contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecPolicy {
    /// Drafter this calibration belongs to (`ngram`, `model`, `self`).
    pub drafter: String,
    /// Base depth `d`.
    pub depth: usize,
    /// Beams and children per node `k`.
    pub top_k: usize,
    /// Base number of verified nodes per sequence `N` (besides the root).
    pub num_nodes: usize,
    /// `K`: the draft's top-K probabilities (renormalised) give each step's entropy.
    pub entropy_top_k: usize,
    /// Ascending entropy thresholds: `H < thresholds[0]` is B0, ... , `H >= thresholds[6]` is B7.
    pub thresholds: Vec<f32>,
    /// `γ` of B0..B2.
    pub gammas: Vec<f32>,
    /// The hybrid drafter's n-gram scale: how often the most frequent
    /// follower of a context match of length `n` (index `n - 1`) was the
    /// target's greedy token, measured by `heterospec calibrate`. Empty:
    /// the lookup's own count-based estimate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ngram_acceptance: Vec<f32>,
    /// How the file was made (command, prompts, samples); informational.
    #[serde(default)]
    pub provenance: String,
}

/// Tree shape for one sequence in one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierShape {
    pub depth: usize,
    /// Most nodes verified (besides the root).
    pub max_nodes: usize,
}

impl Default for SpecPolicy {
    /// Uncalibrated defaults: the paper's shape, evenly spread thresholds.
    fn default() -> Self {
        SpecPolicy {
            drafter: "ngram".into(),
            depth: 4,
            top_k: 4,
            num_nodes: 8,
            entropy_top_k: 8,
            thresholds: (1..=NUM_THRESHOLDS).map(|i| i as f32 * 0.5).collect(),
            gammas: vec![0.3, 0.6, 1.0],
            ngram_acceptance: Vec::new(),
            provenance: "built-in defaults (not calibrated)".into(),
        }
    }
}

impl SpecPolicy {
    /// The calibration committed for the default model with the n-gram drafter.
    pub fn default_ngram() -> Self {
        serde_json::from_str(include_str!("../../calibration/smollm2-135m-ngram.json"))
            .expect("the committed calibration file parses")
    }

    /// The committed calibration for the default model with `drafter`
    /// (`head`, `hybrid` or `ngram`; others use the n-gram's until calibrated).
    pub fn default_for(drafter: &str) -> Self {
        match drafter {
            "head" => serde_json::from_str(include_str!("../../calibration/smollm2-135m-head.json"))
                .expect("the committed calibration file parses"),
            "hybrid" => serde_json::from_str(include_str!("../../calibration/smollm2-135m-hybrid.json"))
                .expect("the committed calibration file parses"),
            _ => Self::default_ngram(),
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::Config(format!("cannot read calibration file {}: {e}", path.display())))?;
        let policy: SpecPolicy = serde_json::from_str(&text)
            .map_err(|e| EngineError::Config(format!("calibration file {}: {e}", path.display())))?;
        policy
            .validate()
            .map_err(|e| EngineError::Config(format!("calibration file {}: {e}", path.display())))?;
        Ok(policy)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("serializable");
        std::fs::write(path, text + "\n")
            .map_err(|e| EngineError::Config(format!("cannot write {}: {e}", path.display())))
    }

    /// Message naming the first bad field, if any.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.depth == 0 || self.top_k == 0 || self.num_nodes == 0 || self.entropy_top_k < 2 {
            return Err("depth, top_k and num_nodes must be >= 1 and entropy_top_k >= 2".into());
        }
        if self.thresholds.len() != NUM_THRESHOLDS {
            return Err(format!(
                "thresholds: expected {NUM_THRESHOLDS} values, got {}",
                self.thresholds.len()
            ));
        }
        if self.thresholds.windows(2).any(|w| w[0] > w[1]) || self.thresholds.iter().any(|t| !t.is_finite()) {
            return Err("thresholds must be finite and ascending".into());
        }
        if self.gammas.len() != NUM_ADAPTED_TIERS || self.gammas.iter().any(|g| !(*g > 0.0 && *g <= 4.0)) {
            return Err(format!("gammas: expected {NUM_ADAPTED_TIERS} values in (0, 4]"));
        }
        if self.ngram_acceptance.iter().any(|a| !(*a > 0.0 && *a <= 1.0)) {
            return Err("ngram_acceptance: values must be in (0, 1]".into());
        }
        Ok(())
    }

    /// `α = ⌈d/2⌉`.
    pub fn alpha(&self) -> usize {
        self.depth.div_ceil(2)
    }

    /// Deepest tree any tier grows (the lookahead a router reserves).
    pub fn max_depth(&self) -> usize {
        self.depth + self.alpha()
    }

    /// `bin(H)`: the number of thresholds `<= H`.
    pub fn tier(&self, entropy: f32) -> usize {
        self.thresholds.iter().take_while(|&&t| entropy >= t).count()
    }

    /// B0..B2: depth `d + (α − i)`, nodes `γ_i·N + (α − i)`; others `(d, N)`.
    pub fn shape(&self, tier: usize) -> TierShape {
        if tier < NUM_ADAPTED_TIERS {
            let extra = self.alpha().saturating_sub(tier);
            TierShape {
                depth: self.depth + extra,
                max_nodes: (self.gammas[tier] * self.num_nodes as f32).round() as usize + extra,
            }
        } else {
            self.base_shape()
        }
    }

    /// The fixed (EAGLE-2 style) tree.
    pub fn base_shape(&self) -> TierShape {
        TierShape {
            depth: self.depth,
            max_nodes: self.num_nodes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_and_shapes_follow_the_paper_rule() {
        let p = SpecPolicy {
            thresholds: vec![0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4],
            depth: 4,
            num_nodes: 10,
            ..SpecPolicy::default()
        };
        p.validate().unwrap();
        assert_eq!(p.alpha(), 2);
        assert_eq!(p.tier(0.0), 0);
        assert_eq!(p.tier(0.1), 1);
        assert_eq!(p.tier(0.3), 2);
        assert_eq!(p.tier(100.0), 7);
        assert_eq!(p.shape(0), TierShape { depth: 6, max_nodes: 5 });
        assert_eq!(p.shape(1), TierShape { depth: 5, max_nodes: 7 });
        assert_eq!(
            p.shape(2),
            TierShape {
                depth: 4,
                max_nodes: 10
            }
        );
        assert_eq!(
            p.shape(5),
            TierShape {
                depth: 4,
                max_nodes: 10
            }
        );
        assert_eq!(p.max_depth(), 6);
        let bad = SpecPolicy {
            thresholds: vec![1.0; 3],
            ..p.clone()
        };
        assert!(bad.validate().unwrap_err().contains("thresholds"));
    }

    #[test]
    fn committed_calibration_is_valid() {
        for drafter in ["ngram", "head", "hybrid"] {
            let p = SpecPolicy::default_for(drafter);
            p.validate().unwrap();
            assert_eq!(p.drafter, drafter);
        }
    }
}
