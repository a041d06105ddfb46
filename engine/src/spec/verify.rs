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

use crate::backend::Row;
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

/// The target's token from one row: `sampler`'s draw from a whole row, or
/// the row's pick (only greedy rows without a penalty or alternatives are
/// picked, and their draw is the pick: the first largest logit).
pub fn draw(row: Row<'_>, sampler: &mut Sampler, history: &[u32]) -> SampledToken {
    match row {
        Row::Whole(row) => sampler.sample(row, history),
        Row::Picked { token_id, logprob } => SampledToken {
            token_id,
            logprob,
            top: Vec::new(),
        },
    }
}

/// Whether a sequence sampling with `params` may be verified from picked
/// rows: [`draw`] from a pick is then what the sampler would draw.
pub fn pickable(params: &crate::sampler::SamplingParams) -> bool {
    params.is_greedy() && params.repetition_penalty == 1.0 && params.top_logprobs == 0
}

/// Walks the tree. `verified[v]` marks nodes that were run; `logits(v)`
/// gives the target's row at node `v` (the next-token distribution after
/// its path, whole or picked); `history` is every token through the root;
/// at most `max_accept` draft tokens are accepted.
pub fn accept<'a>(
    tree: &DraftTree,
    verified: &[bool],
    logits: &dyn Fn(usize) -> Row<'a>,
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
        let drawn = draw(row, sampler, &hist);
        let children = tree.nodes[v].children.iter().copied().filter(|&c| verified[c]);
        let mut next = None;
        if out.nodes.len() < max_accept {
            next = match rule {
                AcceptRule::Exact => children.into_iter().find(|&c| tree.nodes[c].token == drawn.token_id),
                #[cfg(any(test, feature = "testing"))]
                AcceptRule::BiasedForTests => {
                    let Row::Whole(row) = row else {
                        unreachable!("the biased rule reads whole rows")
                    };
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
                out.tokens.push(match row {
                    _ if token == drawn.token_id => drawn,
                    Row::Whole(row) => SampledToken::from_row(row, token, sampler.params().top_logprobs),
                    Row::Picked { .. } => unreachable!("a picked row accepts only its pick"),
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
