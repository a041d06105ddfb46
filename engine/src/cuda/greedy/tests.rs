//! Greedy verification on the device: the picks the `greedy_rows` kernel
//! makes are the host sampler's, and a forward that picks some rows
//! returns the others exactly as a forward that picks none.

use std::sync::Arc;

use super::{synthetic, Backend, DeviceKv, Emulator, GpuModel};
use crate::backend::Row;
use crate::batch::{RaggedBatch, SeqRun};
use crate::kv::KvLayout;
use crate::sampler::{argmax, SampledToken};
use heterospec_kv::BlockId;

/// Rows with ties (the first of equal maxima wins, as on the host),
/// -inf entries and a constant row.
#[test]
fn emulated_greedy_picks_are_the_hosts() {
    let vocab = 300;
    let mut rng = crate::testing::Lcg(5);
    let mut logits: Vec<f32> = (0..5 * vocab).map(|_| rng.f() * 8.0).collect();
    logits[vocab + 17] = 50.0;
    logits[vocab + 250] = 50.0;
    for v in &mut logits[2 * vocab..2 * vocab + 100] {
        *v = f32::NEG_INFINITY;
    }
    for v in &mut logits[3 * vocab..4 * vocab] {
        *v = 1.5;
    }
    let e = Emulator;
    let mut ids = e.upload_ints(&[0; 5]).unwrap();
    let mut logprobs = e.zeros(5).unwrap();
    e.greedy_rows(&logits, &mut ids, &mut logprobs, (5, vocab)).unwrap();
    for (r, row) in logits.chunks(vocab).enumerate() {
        let want = SampledToken::from_row(row, argmax(row), 0);
        assert_eq!(ids[r] as u32, want.token_id, "row {r}");
        assert!(
            (logprobs[r] - want.logprob).abs() < 1e-5,
            "row {r}: {} vs {}",
            logprobs[r],
            want.logprob
        );
    }
    assert_eq!(ids[1], 17);
    assert_eq!(ids[3], 0);
}

/// A forward that may pick rows 0 and 2 of four returns rows 1 and 3
/// whole, to the bit, as the forward that picks none, and picks rows 0
/// and 2's argmax.
#[test]
fn a_picking_forward_returns_the_other_rows_unchanged() {
    let c = synthetic::tiny_config(90);
    let model = GpuModel::synthetic(Arc::new(Emulator), c.clone(), 11).unwrap();
    let layout = KvLayout {
        num_blocks: 4,
        block_size: 16,
        num_layers: 1,
        kv_size: c.kv_size(),
        scratch_slots: 0,
    };
    let table = [BlockId(1)];
    let batch = RaggedBatch {
        seqs: vec![SeqRun::causal(vec![3, 9, 27, 81], 0, &table, 16)
            .unwrap()
            .with_all_logits()],
    };
    let rows = [0, 1, 2, 3];
    let (whole, _) = model
        .forward_on(
            &batch,
            &mut DeviceKv::new(model.backend().clone(), layout).unwrap(),
            1,
            None,
            &rows,
        )
        .unwrap();
    let mut kv = DeviceKv::new(model.backend().clone(), layout).unwrap();
    let (got, _) = model
        .forward_picking(&batch, &mut kv, None, &rows, &[true, false, true, false])
        .unwrap();
    assert_eq!(got.len(), 4);
    for r in 0..4 {
        let want = &whole[r * 90..(r + 1) * 90];
        match got.get(r) {
            Row::Whole(row) => {
                assert!(r % 2 == 1, "row {r} came back whole");
                assert_eq!(row, want, "row {r}");
            }
            Row::Picked { token_id, .. } => {
                assert!(r % 2 == 0, "row {r} was picked");
                assert_eq!(token_id, argmax(want), "row {r}");
            }
        }
    }
}
