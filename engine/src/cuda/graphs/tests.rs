//! CUDA graphs under the emulator: a capture records and does not run,
//! refuses to allocate or copy, and a replay runs the recorded launches
//! on what their buffers hold then; a model's forwards from graphs give
//! the eager forwards' logits, features and K/V to the bit, through
//! padding, buffer growth, graph reuse and a new KV storage.

use std::sync::Arc;

use super::super::tests::gpu;
use super::super::{synthetic, Backend, DeviceKv, Emulator, GpuModel};
use crate::backend::FeatureTap;
use crate::batch::{RaggedBatch, SeqRun};
use crate::config::ModelConfig;
use crate::kv::KvLayout;
use heterospec_kv::BlockId;

use super::{bucket, MAX_GRAPH_TOKENS};
use crate::cuda::TILE;

#[test]
fn buckets_round_up_to_powers_of_two_then_whole_tiles() {
    let got: Vec<usize> = [0, 1, 2, 3, 5, 33, 64, 65, 128, 129, 512]
        .into_iter()
        .map(bucket)
        .collect();
    assert_eq!(got, [0, 1, 2, 4, 8, 64, 64, 128, 128, 192, 512]);
    for n in 1..=MAX_GRAPH_TOKENS {
        let padded = bucket(n);
        assert!(padded >= n && padded <= MAX_GRAPH_TOKENS, "{n} -> {padded}");
        // Padding never adds a GEMM row tile.
        assert_eq!(padded.div_ceil(TILE), n.div_ceil(TILE), "{n} -> {padded}");
    }
}

#[test]
fn an_emulated_capture_records_and_a_replay_runs_on_new_inputs() {
    a_capture_records_and_a_replay_runs_on_new_inputs(&Emulator);
}

#[test]
#[ignore = "needs a CUDA GPU: HETEROSPEC_TEST_DEVICE=cuda cargo test -- --ignored"]
fn the_gpu_captures_and_replays_graphs() {
    a_capture_records_and_a_replay_runs_on_new_inputs(&*gpu());
    forwards_from_graphs_are_the_eager_forwards(gpu(), gpu());
}

#[test]
fn emulated_forwards_from_graphs_are_the_eager_forwards_to_the_bit() {
    forwards_from_graphs_are_the_eager_forwards(Arc::new(Emulator), Arc::new(Emulator));
}

/// A GEMM that splits along k, captured: the capture runs nothing, and
/// each replay computes what the eager GEMM does on the input written
/// since; nothing is allocated or copied while a capture records.
fn a_capture_records_and_a_replay_runs_on_new_inputs<B: Backend>(e: &B) {
    let (m, n, k) = (3, 70, 200);
    let mut a = e
        .upload(&(0..m * k).map(|i| (i as f32 * 0.01).sin()).collect::<Vec<_>>())
        .unwrap();
    let w = e
        .upload_bf16(&(0..n * k).map(|i| (i as f32 * 0.07).cos()).collect::<Vec<_>>())
        .unwrap();
    let mut c = e.zeros(m * n).unwrap();
    let mut part = e.zeros(e.split_len((m, n, k))).unwrap();
    assert!(e.split_len((m, n, k)) > 1, "the test GEMM splits along k");
    let graph = e
        .capture(&mut || e.matmul_in(&a, &w, &mut c, &mut part, (m, n, k), false))
        .unwrap();
    let read = |c: &B::Floats| e.download(c, m * n).unwrap();
    assert!(read(&c).iter().all(|&v| v == 0.0), "a capture runs nothing");
    for round in 0..2 {
        let input: Vec<f32> = (0..m * k).map(|i| ((i + 31 * round) as f32 * 0.013).sin()).collect();
        e.write(&mut a, &input).unwrap();
        let mut want = e.zeros(m * n).unwrap();
        e.matmul(&a, &w, &mut want, (m, n, k), false).unwrap();
        e.replay(&graph).unwrap();
        assert_eq!(read(&c), read(&want), "round {round}");
    }
    // Nothing is allocated or copied while recording; a failed capture
    // leaves the thread recording nothing.
    let refused = e.capture(&mut || e.zeros(4).map(drop)).err().unwrap().to_string();
    assert!(refused.contains("captured"), "{refused}");
    assert!(e.capture(&mut || e.write(&mut a, &[1.0]).map(drop)).is_err());
    assert!(e.upload(&[1.0]).is_ok());
}

fn config() -> ModelConfig {
    ModelConfig {
        num_layers: 2,
        ..synthetic::tiny_config(90)
    }
}

const BLOCK_SIZE: usize = 16;

fn layout(block_size: usize) -> KvLayout {
    KvLayout {
        num_blocks: 128,
        block_size,
        num_layers: config().num_layers,
        kv_size: config().kv_size(),
        scratch_slots: 0,
    }
}

fn blocks(range: std::ops::RangeInclusive<u32>) -> Vec<BlockId> {
    range.map(BlockId).collect()
}

fn ids(n: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 13 + salt * 7) % 90) as u32).collect()
}

fn causal(n: usize, at: usize, table: &[BlockId], salt: usize) -> SeqRun {
    SeqRun::causal(ids(n, salt), at, table, BLOCK_SIZE).unwrap()
}

/// [`causal`] in KV blocks of `block_size`.
fn causal_in(block_size: usize, n: usize, at: usize, table: &[BlockId]) -> SeqRun {
    SeqRun::causal(ids(n, 11), at, table, block_size).unwrap()
}

/// `n` tokens at `at` whose mask is causal but written out (so the key
/// lists hold every (token, earlier token) pair), all wanting logits.
fn masked(n: usize, at: usize, table: &[BlockId]) -> SeqRun {
    let mut run = causal(n, at, table, 5).with_all_logits();
    run.mask = Some((0..n * n).map(|x| x % n <= x / n).collect());
    run
}

/// A draft tree of five nodes after `at`: two branches, extras.
fn tree(at: usize, table: &[BlockId]) -> SeqRun {
    let mut run = causal(5, at, table, 9).with_all_logits();
    run.positions = vec![at, at + 1, at + 1, at + 2, at + 2];
    #[rustfmt::skip]
    let mask = vec![
        true,  false, false, false, false,
        true,  true,  false, false, false,
        true,  false, true,  false, false,
        true,  true,  false, true,  false,
        true,  false, true,  false, true,
    ];
    run.mask = Some(mask);
    run.extra_slots = vec![vec![run.cached_slot(at - 1, BLOCK_SIZE)]; 5];
    run
}

/// What a step runs, and the graphs captured after it.
type Step = (&'static str, Vec<SeqRun>, usize, Option<FeatureTap>, usize);

/// Every step's logits and features from graphs, and the K/V they leave,
/// are the eager forward's to the bit; graphs are captured once per
/// bucket, again after the buffers grow or the KV storage changes, and
/// never for layer taps or forwards past `MAX_GRAPH_TOKENS`.
fn forwards_from_graphs_are_the_eager_forwards<B: Backend>(one: Arc<B>, other: Arc<B>) {
    let graphs = GpuModel::synthetic(one, config(), 4).unwrap();
    let eager = GpuModel::synthetic(other, config(), 4).unwrap();
    eager.set_graphs(false);
    let new_kv = |m: &GpuModel<B>, block_size| DeviceKv::new(m.backend().clone(), layout(block_size)).unwrap();
    let (mut kv_g, mut kv_e) = (new_kv(&graphs, BLOCK_SIZE), new_kv(&eager, BLOCK_SIZE));
    let (a, b, c, d) = (blocks(1..=20), blocks(21..=30), blocks(31..=40), blocks(41..=80));
    let layers = config().num_layers;
    let fin = Some(FeatureTap::Final);
    let taps = Some(FeatureTap::Layers(vec![0, 2]));
    // (what, batch, layers, tap, graphs captured after it)
    let steps: Vec<Step> = vec![
        ("prefill of 37", vec![causal(37, 0, &a, 1)], layers, fin.clone(), 1),
        ("decode", vec![causal(1, 37, &a, 2)], layers, fin.clone(), 2),
        (
            "decode again: the same graph",
            vec![causal(1, 38, &a, 3)],
            layers,
            fin.clone(),
            2,
        ),
        (
            "a decode and a prefill",
            vec![causal(1, 39, &a, 4), causal(3, 0, &b, 5)],
            layers,
            None,
            3,
        ),
        ("a tree", vec![tree(40, &a)], layers, fin.clone(), 4),
        (
            "a long masked run: the buffers grow",
            vec![masked(100, 0, &c)],
            layers,
            fin.clone(),
            5,
        ),
        (
            "decode after growing",
            vec![causal(1, 45, &a, 6)],
            layers,
            fin.clone(),
            6,
        ),
        ("layer taps run eagerly", vec![causal(1, 3, &b, 7)], layers, taps, 6),
        ("the first layer alone", vec![causal(1, 4, &b, 8)], 1, None, 7),
        ("past the largest graph", vec![causal(520, 0, &d, 9)], layers, None, 7),
    ];
    for (what, seqs, layers, tap, captures) in steps {
        let models = [(&graphs, &mut kv_g), (&eager, &mut kv_e)];
        same_forwards(models, what, seqs, layers, tap.as_ref());
        assert_eq!(graphs.graph_captures(), captures, "{what}: graphs captured");
    }
    // Another KV storage, of smaller blocks: the graphs that wrote the
    // old one (and read its block tables) are not replayed.
    let (mut kv_g, mut kv_e) = (new_kv(&graphs, 4), new_kv(&eager, 4));
    let models = [(&graphs, &mut kv_g), (&eager, &mut kv_e)];
    same_forwards(models, "a new KV storage", vec![causal_in(4, 20, 0, &a)], layers, None);
    let models = [(&graphs, &mut kv_g), (&eager, &mut kv_e)];
    same_forwards(
        models,
        "a decode in blocks of 4",
        vec![causal_in(4, 1, 20, &a)],
        layers,
        None,
    );
    assert_eq!(graphs.graph_captures(), 9, "a new KV storage");
    assert_eq!(eager.graph_captures(), 0, "graphs off");
}

/// Runs `seqs` on both models, each on its own KV storage: the same
/// logits, features and K/V to the bit.
fn same_forwards<B: Backend>(
    [(one, kv_one), (other, kv_other)]: [(&GpuModel<B>, &mut DeviceKv<B>); 2],
    what: &str,
    seqs: Vec<SeqRun>,
    layers: usize,
    tap: Option<&FeatureTap>,
) {
    let batch = RaggedBatch { seqs };
    let rows: Vec<usize> = batch.logits_token_rows().collect();
    let got = one.forward_on(&batch, kv_one, layers, tap, &rows).unwrap();
    let want = other.forward_on(&batch, kv_other, layers, tap, &rows).unwrap();
    assert!(!want.0.is_empty() || rows.is_empty(), "{what}: logits");
    assert_eq!(got.0, want.0, "{what}: logits");
    assert_eq!(got.1, want.1, "{what}: features");
    let len = layout(kv_one.block_size).num_slots() * config().kv_size();
    let all = |model: &GpuModel<B>, kv: &Vec<B::Floats>| -> Vec<Vec<f32>> {
        kv.iter().map(|l| model.backend().download(l, len).unwrap()).collect()
    };
    assert!(
        all(one, &kv_one.keys) == all(other, &kv_other.keys),
        "{what}: the K written differ"
    );
    assert!(
        all(one, &kv_one.values) == all(other, &kv_other.values),
        "{what}: the V written differ"
    );
}
