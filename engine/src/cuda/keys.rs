//! What each new token of a batch attends on the device: the key lists
//! the attention kernel walks, built on the host from the batch, in the
//! CPU attention's order (so both paths sum the same keys the same way).

use super::{int, KEY_FIELDS};
use crate::batch::RaggedBatch;

/// Which KV slots each new token of a batch attends, in the order the CPU
/// path visits them: cached positions (through the block table), then the
/// extra slots and masked-in run tokens, then a causal run's tokens up to
/// itself. See `paged_attention` in `kernels.cu` for the layout.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AttentionKeys {
    /// Per token: num_cached, table offset, list offset, list count, run
    /// offset, run count.
    pub keys: Vec<i32>,
    pub tables: Vec<i32>,
    pub lists: Vec<i32>,
    pub run_slots: Vec<i32>,
}

impl AttentionKeys {
    pub fn new(batch: &RaggedBatch) -> Self {
        let mut k = AttentionKeys::default();
        for seq in &batch.seqs {
            let table_offset = int(k.tables.len());
            k.tables.extend(seq.block_table.iter().map(|b| int(b.index())));
            let run_offset = int(k.run_slots.len());
            k.run_slots.extend(seq.slots.iter().map(|&s| int(s)));
            for i in 0..seq.len() {
                let list_offset = k.lists.len();
                if let Some(extra) = seq.extra_slots.get(i) {
                    k.lists.extend(extra.iter().map(|&s| int(s)));
                }
                let run_count = if seq.mask.is_some() {
                    let seen = (0..seq.len()).filter(|&j| seq.attends(i, j));
                    k.lists.extend(seen.map(|j| int(seq.slots[j])));
                    0
                } else {
                    i + 1
                };
                let fields: [i32; KEY_FIELDS] = [
                    int(seq.num_cached),
                    table_offset,
                    int(list_offset),
                    int(k.lists.len() - list_offset),
                    run_offset,
                    int(run_count),
                ];
                k.keys.extend(fields);
            }
        }
        k
    }

    /// The slots token `t` attends, in order (what the kernel walks).
    #[cfg(test)]
    pub(super) fn slots_of(&self, t: usize, block_size: usize) -> Vec<usize> {
        let d: Vec<usize> = self.keys[t * KEY_FIELDS..(t + 1) * KEY_FIELDS]
            .iter()
            .map(|&v| v as usize)
            .collect();
        let (num_cached, table, list, list_count, run, run_count) = (d[0], d[1], d[2], d[3], d[4], d[5]);
        let cached =
            (0..num_cached).map(|p| self.tables[table + p / block_size] as usize * block_size + p % block_size);
        let listed = self.lists[list..list + list_count].iter().map(|&s| s as usize);
        let ran = self.run_slots[run..run + run_count].iter().map(|&s| s as usize);
        cached.chain(listed).chain(ran).collect()
    }
}
