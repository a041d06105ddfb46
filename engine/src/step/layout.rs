//! Stage 4: chosen tree nodes join their sequence's run in the ragged batch
//! (DESIGN §2 step 7). One speculating sequence with 2 new tokens `a b`
//! (b is the tree's root) and chosen nodes `x` (child of b), `y` (child of
//! x), `z` (child of b):
//!
//! ```text
//!  run row:     0   1   2   3   4
//!  token:       a   b   x   y   z
//!  position:    p   p+1 p+2 p+3 p+2        (root position + node depth)
//!  slot:        table table s0  s1  s2     (scratch slots, step-wide counter)
//!  logits row:      0   1   2   3          (root, then nodes in chosen order)
//!  mask (row attends col):
//!        a b x y z
//!     a  1 . . . .
//!     b  1 1 . . .
//!     x  1 1 1 . .     every node sees all new tokens,
//!     y  1 1 1 1 .     its chosen ancestors and itself
//!     z  1 1 . . 1
//! ```
//!
//! Invariant: a run without chosen nodes stays causal (no mask); scratch
//! slots are handed out in plan order, so they never collide in a step.

use std::collections::HashMap;

use crate::batch::RaggedBatch;
use crate::kv::KvLayout;
use crate::step::plan::Plan;

/// Per plan: tree node → its logits row among its run's rows (root: 0).
pub(crate) type NodeRows = HashMap<usize, usize>;

/// Appends every plan's chosen nodes to its run, with tree masks.
pub(crate) fn lay_out_trees(batch: &mut RaggedBatch, plans: &[Plan], layout: KvLayout) -> Vec<NodeRows> {
    let mut node_rows = Vec::with_capacity(plans.len());
    let mut next_scratch = 0;
    for plan in plans {
        let run = &mut batch.seqs[plan.seq];
        let m = run.len();
        let root_pos = run.positions[m - 1];
        let mut rows = HashMap::new();
        rows.insert(0, 0);
        for (i, &v) in plan.nodes.iter().enumerate() {
            let node = &plan.tree.nodes[v];
            run.token_ids.push(node.token);
            run.positions.push(root_pos + node.depth);
            run.slots.push(layout.scratch_slot(next_scratch));
            next_scratch += 1;
            run.logits_rows.push(m + i);
            rows.insert(v, i + 1);
        }
        let n = run.len();
        if n > m {
            // (n, n) row-major: mask[i * n + j] = row i attends to row j.
            let mut mask = vec![false; n * n];
            for i in 0..n {
                for j in 0..=i.min(m - 1) {
                    mask[i * n + j] = true;
                }
            }
            let index_of: HashMap<usize, usize> = plan.nodes.iter().enumerate().map(|(i, &v)| (v, m + i)).collect();
            for (i, &v) in plan.nodes.iter().enumerate() {
                let row = m + i;
                mask[row * n + row] = true;
                for a in plan.tree.ancestors(v) {
                    mask[row * n + index_of[&a]] = true;
                }
            }
            run.mask = Some(mask);
        }
        node_rows.push(rows);
    }
    node_rows
}
