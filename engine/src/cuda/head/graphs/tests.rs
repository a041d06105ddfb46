//! A draft head's tree layers from CUDA graphs: under the emulator (and on
//! a GPU), every layer's picks, the predictions it stores and the K/V it
//! writes are the eager layer's to the bit, through padding, graph reuse,
//! another pick count, buffer growth and a layer past the largest bucket.

use std::sync::Arc;

use super::super::tests::gpu;
use super::super::{device_kv, synthetic, Backend, DeviceHead, Emulator};
use crate::batch::{RaggedBatch, SeqRun};
use crate::config::ModelConfig;
use crate::device_head::{HeadBackend, HeadLayerParts, HeadParts};
use crate::features::Features;
use crate::kv::{KvLayout, KvStorage};
use crate::testing::Lcg;
use heterospec_kv::BlockId;

#[test]
fn an_emulated_heads_layers_from_graphs_are_its_eager_layers() {
    head_layers_from_graphs_are_the_eager_layers(Arc::new(Emulator), Arc::new(Emulator), true);
}

/// The same without an `fc` bias or an output norm (`fc`'s first product
/// then writes its buffer rather than adding to the bias).
#[test]
fn an_emulated_plain_heads_layers_from_graphs_are_its_eager_layers() {
    head_layers_from_graphs_are_the_eager_layers(Arc::new(Emulator), Arc::new(Emulator), false);
}

#[test]
#[ignore = "needs a CUDA GPU: HETEROSPEC_TEST_DEVICE=cuda cargo test -- --ignored"]
fn the_gpu_heads_layers_from_graphs_are_its_eager_layers() {
    for extras in [true, false] {
        head_layers_from_graphs_are_the_eager_layers(gpu(), gpu(), extras);
    }
}

const VOCAB: usize = 90;
const DRAFT_VOCAB: usize = 40;
const BLOCK_SIZE: usize = 16;

fn config() -> ModelConfig {
    ModelConfig {
        num_layers: 2,
        ..synthetic::tiny_config(VOCAB)
    }
}

/// A two-layer head of random weights, with an `fc` bias and an output
/// norm where `extras`.
fn parts(c: &ModelConfig, extras: bool) -> HeadParts {
    let mut rng = Lcg(21);
    let mut random =
        |n: usize, base: f32, scale: f32| -> Vec<f32> { (0..n).map(|_| base + scale * (rng.f() - 0.5)).collect() };
    let (h, q, kv, ff) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
    let layers = (0..c.num_layers)
        .map(|l| HeadLayerParts {
            attn_norm: (l > 0).then(|| random(h, 1.0, 0.2)),
            matrices: [
                random(q * h, 0.0, 0.1),
                random(kv * h, 0.0, 0.1),
                random(kv * h, 0.0, 0.1),
                random(h * q, 0.0, 0.1),
                random(ff * h, 0.0, 0.1),
                random(ff * h, 0.0, 0.1),
                random(h * ff, 0.0, 0.1),
            ],
            ffn_norm: random(h, 1.0, 0.2),
        })
        .collect();
    HeadParts {
        layer_config: c.clone(),
        fc: random(2 * h * h, 0.0, 0.1),
        fc_bias: extras.then(|| random(h, 0.0, 0.2)),
        layers,
        output_norm: extras.then(|| random(h, 1.0, 0.2)),
        lm_head: random(DRAFT_VOCAB * h, 0.0, 0.5),
        draft_vocab: DRAFT_VOCAB,
    }
}

fn layout() -> KvLayout {
    KvLayout {
        num_blocks: 128,
        block_size: BLOCK_SIZE,
        num_layers: config().num_layers,
        kv_size: config().kv_size(),
        scratch_slots: 8,
    }
}

fn blocks(range: std::ops::RangeInclusive<u32>) -> Vec<BlockId> {
    range.map(BlockId).collect()
}

fn causal(n: usize, at: usize, table: &[BlockId]) -> SeqRun {
    let ids = (0..n).map(|i| ((i * 17 + at) % VOCAB) as u32).collect();
    SeqRun::causal(ids, at, table, BLOCK_SIZE).unwrap().with_all_logits()
}

/// `n` tokens at `at` whose mask is causal but written out (their key
/// lists hold every pair), the odd ones wanting picks.
fn masked(n: usize, at: usize, table: &[BlockId]) -> SeqRun {
    let mut run = causal(n, at, table);
    run.mask = Some((0..n * n).map(|x| x % n <= x / n).collect());
    run.logits_rows = (1..n).step_by(2).collect();
    run
}

/// A tree layer of four nodes after `at`, two of them wanting picks.
fn tree(at: usize, table: &[BlockId]) -> SeqRun {
    let mut run = causal(4, at, table);
    run.positions = vec![at, at + 1, at + 1, at + 2];
    #[rustfmt::skip]
    let mask = vec![
        true,  false, false, false,
        true,  true,  false, false,
        true,  false, true,  false,
        true,  true,  false, true,
    ];
    run.mask = Some(mask);
    run.extra_slots = vec![vec![run.cached_slot(at - 1, BLOCK_SIZE)]; 4];
    run.logits_rows = vec![1, 3];
    run
}

/// Per token, the stored row it reads: one of the `observed` target
/// states (random weights would blow up a chain of predictions), none
/// for a sequence's first position.
fn reads(batch: &RaggedBatch, observed: &[usize]) -> Vec<Option<usize>> {
    let positions = batch.seqs.iter().flat_map(|s| s.positions.iter().copied());
    positions
        .map(|p| (p > 0).then(|| observed[(p - 1) % observed.len()]))
        .collect()
}

/// What a layer runs (its picks per row), and the graphs captured after.
type Step = (&'static str, Vec<SeqRun>, usize, usize);

fn head_layers_from_graphs_are_the_eager_layers<B: Backend>(one: Arc<B>, other: Arc<B>, extras: bool) {
    let c = config();
    let parts = parts(&c, extras);
    let mut rng = Lcg(8);
    let table: Vec<f32> = (0..VOCAB * c.hidden_size).map(|_| rng.f() - 0.5).collect();
    let head = |b: Arc<B>, graphs| {
        let embeddings = Arc::new(b.upload_bf16(&table).unwrap());
        DeviceHead::new(b, &parts, embeddings, graphs).unwrap()
    };
    let (mut graphs, mut eager) = (head(one, true), head(other, false));
    let (mut kv_g, mut kv_e) = (graphs.new_kv(layout()).unwrap(), eager.new_kv(layout()).unwrap());
    // The target's states at the first sequence's 40 slots.
    let (a, b, d) = (blocks(1..=20), blocks(21..=30), blocks(41..=80));
    let slots: Vec<usize> = (0..40).map(|p| causal(1, p, &a).slots[0]).collect();
    let states: Vec<f32> = (0..slots.len() * c.hidden_size).map(|_| rng.f() - 0.5).collect();
    let every: Vec<usize> = (0..slots.len()).collect();
    for h in [&mut graphs, &mut eager] {
        h.observe(&slots, &Features::host(states.clone(), c.hidden_size), &every)
            .unwrap();
    }
    let steps: Vec<Step> = vec![
        ("a prompt of 6", vec![causal(6, 0, &a)], 5, 1),
        ("a one-token layer", vec![causal(1, 40, &a)], 5, 2),
        ("again: the same graph", vec![causal(1, 41, &a)], 5, 2),
        ("fewer picks", vec![causal(1, 42, &a)], 3, 3),
        ("a tree layer", vec![tree(43, &a)], 5, 4),
        ("two sequences", vec![causal(1, 47, &a), causal(3, 0, &b)], 5, 5),
        ("no picks", vec![causal(1, 48, &a)], 0, 6),
        ("a long masked run: the buffers grow", vec![masked(100, 0, &d)], 4, 7),
        ("a layer after growing", vec![causal(1, 49, &a)], 5, 8),
        ("past the largest graph", vec![causal(520, 100, &d)], 2, 8),
    ];
    for (what, seqs, m, captures) in steps {
        let batch = RaggedBatch { seqs };
        let inputs = reads(&batch, &slots);
        let got = graphs.forward_top(&batch, &inputs, &mut kv_g, m).unwrap();
        let want = eager.forward_top(&batch, &inputs, &mut kv_e, m).unwrap();
        assert_eq!(got.len(), batch.num_logits_rows(), "{what}: rows");
        assert!(m == 0 || got.iter().all(|r| r.len() == m), "{what}: picks");
        assert_eq!(got, want, "{what}: picks");
        let all: Vec<usize> = (0..layout().num_slots()).collect();
        let stored = graphs.features_at(&all).unwrap() == eager.features_at(&all).unwrap();
        assert!(stored, "{what}: the stored predictions differ");
        assert!(same_kv::<B>(&mut kv_g, &mut kv_e), "{what}: the K/V written differ");
        assert_eq!(graphs.graph_captures(), captures, "{what}: graphs captured");
    }
    assert_eq!(eager.graph_captures(), 0, "graphs off");
}

fn same_kv<B: Backend>(one: &mut KvStorage, other: &mut KvStorage) -> bool {
    let len = layout().num_slots() * layout().kv_size;
    let read = |kv: &mut KvStorage| -> Vec<Vec<f32>> {
        let kv = device_kv::<B>(kv).unwrap();
        let b = kv.backend.clone();
        kv.keys
            .iter()
            .chain(&kv.values)
            .map(|l| b.download(l, len).unwrap())
            .collect()
    };
    read(one) == read(other)
}
