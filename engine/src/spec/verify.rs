//! Acceptance (DESIGN §2 step 8): walk the verified tree from the root
//! using the target's distribution at each node.
//!
//! At each node the target distribution `p` is the one plain decoding would
//! sample from (repetition penalty over the history including the accepted
//! path, then temperature, top-k, top-p). The multi-draft rule accepts some
//! child `c` with total probability `Σ p(children)` and otherwise draws from
//! the residual, so the committed token is distributed exactly as `p`. We
//! run it in its coupled form: the target's own draw at this position (the
//! sampler's Gumbel-max with noise fixed by seed and position, see
//! `sampler`) is made first, and the child equal to it, if verified, is
//! accepted; otherwise the draw itself is the committed token. Each child is
//! accepted with probability `p(c)`, the same as the residual rule, and the
//! tokens are those plain decoding with the same seed would produce, for any
//! tree. Greedy is the case where the draw is the argmax.

use crate::sampler::{SampledToken, Sampler};
use crate::spec::tree::DraftTree;

/// Result of verifying one tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// Accepted nodes, from the root's child down.
    pub nodes: Vec<usize>,
    /// Committed tokens: the accepted nodes' tokens then one more from the target.
    pub tokens: Vec<SampledToken>,
}

/// How a child is accepted: the exact rule, or a deliberately wrong one
/// (tests use it to show the statistical test can fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptRule {
    Exact,
    /// Also accepts the first verified child the target gives any
    /// probability: biased towards drafts.
    #[cfg(any(test, feature = "testing"))]
    BiasedForTests,
}

/// Walks the tree. `verified[v]` marks nodes that were run; `logits(v)`
/// gives the target logits at node `v` (the next-token distribution after
/// its path); `history` is every token through the root; at most
/// `max_accept` draft tokens are accepted.
pub fn accept<'a>(
    tree: &DraftTree,
    verified: &[bool],
    logits: &dyn Fn(usize) -> &'a [f32],
    sampler: &mut Sampler,
    history: &[u32],
    max_accept: usize,
    rule: AcceptRule,
) -> Accepted {
    let mut hist = history.to_vec();
    let mut out = Accepted {
        nodes: Vec::new(),
        tokens: Vec::new(),
    };
    let mut v = 0;
    loop {
        let row = logits(v);
        let drawn = sampler.sample(row, &hist);
        let children = tree.nodes[v].children.iter().copied().filter(|&c| verified[c]);
        let mut next = None;
        if out.nodes.len() < max_accept {
            next = match rule {
                AcceptRule::Exact => children.into_iter().find(|&c| tree.nodes[c].token == drawn.token_id),
                #[cfg(any(test, feature = "testing"))]
                AcceptRule::BiasedForTests => {
                    let support = sampler.distribution(row, &hist);
                    children
                        .into_iter()
                        .find(|&c| support.iter().any(|e| e.0 == tree.nodes[c].token))
                }
            };
        }
        match next {
            Some(c) => {
                let token = tree.nodes[c].token;
                out.nodes.push(c);
                out.tokens.push(if token == drawn.token_id {
                    drawn
                } else {
                    SampledToken::from_row(row, token, sampler.params().top_logprobs)
                });
                hist.push(token);
                v = c;
            }
            None => {
                out.tokens.push(drawn);
                return out;
            }
        }
    }
}
