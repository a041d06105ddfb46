//! Acceptance (DESIGN §2 step 8): walk the verified tree from the root
//! using the target's distribution at each node.
//!
//! At each node the target distribution `p` is the one plain decoding would
//! sample from (repetition penalty over the history including the accepted
//! path, then temperature, top-k, top-p). Children are tried in the
//! drafter's order: child `c` is accepted with probability `p(c)`; on
//! rejection `p(c)` is set to 0 and `p` renormalised; when every child is
//! rejected the next token is drawn from what is left. The chosen token is
//! distributed exactly as `p` (a draw without replacement argument), so
//! the output has the target's distribution. Greedy is the case where `p`
//! is a point mass on the argmax: follow the child equal to it, then add
//! the target's own token.

use crate::ops::log_sum_exp;
use crate::sampler::{draw, SampledToken, Sampler};
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
    /// Accepts with probability `min(1, 2 p(c))`: biased towards drafts.
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
        let lse = log_sum_exp(row);
        let mut p = sampler.distribution(row, &hist);
        let mut next = None;
        if out.nodes.len() < max_accept {
            for &c in tree.nodes[v].children.iter().filter(|&&c| verified[c]) {
                let token = tree.nodes[c].token;
                let Some(i) = p.iter().position(|e| e.0 == token) else {
                    continue; // probability 0 under the target: always rejected
                };
                let pc = p[i].1;
                let threshold = match rule {
                    AcceptRule::Exact => pc,
                    AcceptRule::BiasedForTests => (2.0 * pc).min(1.0),
                };
                if pc >= 1.0 || sampler.uniform() < threshold {
                    next = Some(c);
                    break;
                }
                p.remove(i);
                let total: f32 = p.iter().map(|e| e.1).sum();
                for e in &mut p {
                    e.1 /= total;
                }
            }
        }
        match next {
            Some(c) => {
                let token = tree.nodes[c].token;
                out.nodes.push(c);
                out.tokens.push(SampledToken {
                    token_id: token,
                    logprob: row[token as usize] - lse,
                });
                hist.push(token);
                v = c;
            }
            None => {
                let token = if p.len() == 1 {
                    p[0].0
                } else {
                    draw(&p, sampler.uniform())
                };
                out.tokens.push(SampledToken {
                    token_id: token,
                    logprob: row[token as usize] - lse,
                });
                return out;
            }
        }
    }
}
