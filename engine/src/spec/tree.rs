//! Dynamic draft trees, EAGLE-2 style: from the root take the top-k
//! tokens; at each layer every beam proposes its top-k children; a node's
//! score is the sum of draft log-probabilities on its path; the k best new
//! nodes become the next beams. Every proposed node stays a candidate; the
//! budget later picks which are verified.

use crate::error::Result;
use crate::spec::drafter::{DraftInput, Drafter, Proposal, TargetView};

/// One candidate token. `nodes[0]` of a tree is the root: the sequence's
/// last known token, which is run (not drafted) this step.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub token: u32,
    /// Index of the parent node (the root is its own parent).
    pub parent: usize,
    /// 0 for the root.
    pub depth: usize,
    /// Sum of draft log-probabilities from the root to here (0 at the root).
    pub score: f32,
    /// Entropy of the drafter's renormalised top-K at this node, once expanded.
    pub entropy: Option<f32>,
    /// Children in the order the drafter ranked them.
    pub children: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DraftTree {
    pub nodes: Vec<Node>,
    /// Nodes to expand next (the beams of the deepest layer).
    frontier: Vec<usize>,
}

impl DraftTree {
    pub fn new(root_token: u32) -> Self {
        DraftTree {
            nodes: vec![Node {
                token: root_token,
                parent: 0,
                depth: 0,
                score: 0.0,
                entropy: None,
                children: Vec::new(),
            }],
            frontier: vec![0],
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Depth of the deepest node.
    pub fn depth(&self) -> usize {
        self.nodes.iter().map(|n| n.depth).max().unwrap_or(0)
    }

    /// Tokens from the root's first child down to `node` (empty for the root).
    pub fn path_tokens(&self, node: usize) -> Vec<u32> {
        let mut path = Vec::with_capacity(self.nodes[node].depth);
        let mut v = node;
        while v != 0 {
            path.push(self.nodes[v].token);
            v = self.nodes[v].parent;
        }
        path.reverse();
        path
    }

    /// Ancestors of `node` from just below the root down to its parent.
    pub fn ancestors(&self, node: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut v = self.nodes[node].parent;
        while v != 0 {
            out.push(v);
            v = self.nodes[v].parent;
        }
        out.reverse();
        out
    }

    /// `H`: the entropies summed along the best-scoring path of the deepest
    /// layer (each step's entropy is the one of the node it was drafted from).
    pub fn path_entropy(&self) -> f32 {
        let deepest = self.depth();
        let Some(best) = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.depth == deepest)
            .max_by(|a, b| a.1.score.total_cmp(&b.1.score))
            .map(|(i, _)| i)
        else {
            return 0.0;
        };
        if best == 0 {
            return self.nodes[0].entropy.unwrap_or(0.0);
        }
        let mut h = 0.0;
        let mut v = best;
        while v != 0 {
            v = self.nodes[v].parent;
            h += self.nodes[v].entropy.unwrap_or(0.0);
        }
        h
    }

    #[cfg(test)]
    pub(crate) fn add_children_for_test(&mut self, parent: usize, proposal: &Proposal) -> Vec<usize> {
        self.add_children(parent, proposal)
    }

    fn add_children(&mut self, parent: usize, proposal: &Proposal) -> Vec<usize> {
        self.nodes[parent].entropy = Some(proposal.entropy);
        let (depth, score) = (self.nodes[parent].depth + 1, self.nodes[parent].score);
        let mut added = Vec::with_capacity(proposal.candidates.len());
        for &(token, logprob) in &proposal.candidates {
            let id = self.nodes.len();
            self.nodes.push(Node {
                token,
                parent,
                depth,
                score: score + logprob,
                entropy: None,
                children: Vec::new(),
            });
            self.nodes[parent].children.push(id);
            added.push(id);
        }
        added
    }
}

/// Grows every tree layer by layer (one batched `expand` per layer) until
/// each reaches `target_depth[i]` or its drafter has nothing to propose.
///
/// A tree stops early once its best beam scores below `min_score[s]` (no
/// descendant of a beam scores above it).
pub fn grow(
    drafter: &mut dyn Drafter,
    target: &mut TargetView<'_>,
    inputs: &[DraftInput<'_>],
    trees: &mut [DraftTree],
    target_depth: &[usize],
    min_score: &[f32],
    top_k: usize,
) -> Result<()> {
    loop {
        let mut requests = Vec::new();
        for (s, tree) in trees.iter().enumerate() {
            let layer_depth = tree.frontier.first().map(|&v| tree.nodes[v].depth);
            let best = tree
                .frontier
                .iter()
                .map(|&v| tree.nodes[v].score)
                .fold(f32::NEG_INFINITY, f32::max);
            if layer_depth.is_some_and(|d| d < target_depth[s]) && best >= min_score[s] {
                requests.extend(tree.frontier.iter().map(|&v| (s, v)));
            }
        }
        if requests.is_empty() {
            return Ok(());
        }
        let proposals = drafter.expand(target, inputs, trees, &requests, top_k)?;
        let mut new_layer: Vec<Vec<usize>> = vec![Vec::new(); trees.len()];
        for (&(s, v), proposal) in requests.iter().zip(&proposals) {
            let mut proposal = proposal.clone();
            proposal.candidates.truncate(top_k);
            new_layer[s].extend(trees[s].add_children(v, &proposal));
        }
        for (s, tree) in trees.iter_mut().enumerate() {
            if !requests.iter().any(|r| r.0 == s) {
                continue;
            }
            let mut layer = std::mem::take(&mut new_layer[s]);
            layer.sort_by(|&a, &b| tree.nodes[b].score.total_cmp(&tree.nodes[a].score));
            layer.truncate(top_k);
            tree.frontier = layer;
        }
    }
}

/// Entropy (natural log) of the top `k` of `probs` renormalised to sum to 1.
pub fn top_k_entropy(probs: &mut [f32], k: usize) -> f32 {
    probs.sort_unstable_by(|a, b| b.total_cmp(a));
    let top = &probs[..k.min(probs.len())];
    let total: f32 = top.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    -top.iter()
        .map(|&p| p / total)
        .filter(|&p| p > 0.0)
        .map(|p| p * p.ln())
        .sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_top_k_is_renormalised() {
        assert!((top_k_entropy(&mut [0.25, 0.25, 0.0], 2) - 2f32.ln()).abs() < 1e-6);
        assert_eq!(top_k_entropy(&mut [0.9], 4), 0.0);
        assert!(
            (top_k_entropy(&mut [0.1, 0.1, 0.1, 0.1, 0.6], 4)
                - (0.6f32 * -(0.6f32 / 0.9).ln() + 3.0 * 0.1 * -(0.1f32 / 0.9).ln()) / 0.9)
                .abs()
                < 1e-5
        );
    }

    #[test]
    fn paths_ancestors_and_path_entropy() {
        let mut t = DraftTree::new(7);
        let a = t.add_children(
            0,
            &Proposal {
                candidates: vec![(1, -0.1), (2, -1.0)],
                entropy: 0.5,
            },
        );
        let b = t.add_children(
            a[0],
            &Proposal {
                candidates: vec![(3, -0.2)],
                entropy: 0.25,
            },
        );
        t.add_children(
            a[1],
            &Proposal {
                candidates: vec![(4, -0.01)],
                entropy: 2.0,
            },
        );
        assert_eq!(t.path_tokens(b[0]), vec![1, 3]);
        assert_eq!(t.ancestors(b[0]), vec![a[0]]);
        assert_eq!(t.depth(), 2);
        // Best deepest node is (1, 3) with score -0.3 over (2, 4) at -1.01.
        assert!((t.path_entropy() - 0.75).abs() < 1e-6);
    }
}
