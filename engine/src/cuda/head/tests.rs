//! A draft head on the (emulated) device: its top-k kernel ranks as the
//! host does, its forward is the CPU head's up to bf16 rounding, and an
//! engine drafting with it on the device stays token-identical to plain
//! decoding.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::super::features::{on_backend, TO_HOST};
use super::super::{bf16_bits, Backend, Emulator, GpuModel};
use crate::backend::FeatureTap;
use crate::batch::{RaggedBatch, SeqRun};
use crate::device_head::logits_slots;
use crate::features::Features;
use crate::kv::KvLayout;
use crate::model::Model;
use crate::ops::top_logprobs;
use crate::spec::head::{HeadKind, HeadWeights, FC_BIAS, OUTPUT_NORM};
use crate::spec::train::HeadParams;
use crate::spec::DraftHead;
use crate::testing::{random_tensors, tiny_config, tiny_model, Lcg};
use crate::WeightFormat;
use heterospec_kv::BlockId;

/// Rows with ties (the lower index first), -inf entries, a constant row,
/// and more picks asked than a row has: the kernel's picks and logprobs
/// are the host's.
#[test]
fn emulated_top_rows_rank_as_the_host() {
    let (vocab, m) = (300, 8);
    let mut rng = Lcg(9);
    let mut logits: Vec<f32> = (0..5 * vocab).map(|_| rng.f() * 8.0).collect();
    for at in [17, 250, 3, 120] {
        logits[vocab + at] = 50.0;
    }
    for v in &mut logits[2 * vocab..3 * vocab - 4] {
        *v = f32::NEG_INFINITY;
    }
    for v in &mut logits[3 * vocab..4 * vocab] {
        *v = 1.5;
    }
    let e = Emulator;
    let mut ids = e.upload_ints(&vec![0; 5 * m]).unwrap();
    let mut logprobs = e.zeros(5 * m).unwrap();
    e.top_rows(&logits, &mut ids, &mut logprobs, (5, vocab, m)).unwrap();
    for (r, row) in logits.chunks(vocab).enumerate() {
        let want = top_logprobs(row, m);
        let got: Vec<u32> = ids[r * m..(r + 1) * m].iter().map(|&i| i as u32).collect();
        assert_eq!(got, want.iter().map(|w| w.0).collect::<Vec<_>>(), "row {r}");
        for (j, w) in want.iter().enumerate() {
            let lp = logprobs[r * m + j];
            assert!(
                lp == w.1 || (lp - w.1).abs() < 1e-5,
                "row {r} pick {j}: {lp} vs {}",
                w.1
            );
        }
    }
    assert_eq!(&ids[m..m + 4], &[3, 17, 120, 250]);
    // Three columns of a row of two: two picks, then none (-1).
    let mut ids = e.upload_ints(&[0; 3]).unwrap();
    let mut logprobs = e.zeros(3).unwrap();
    e.top_rows(&vec![1.0, 2.0], &mut ids, &mut logprobs, (1, 2, 3)).unwrap();
    assert_eq!(ids, vec![1, 0, -1]);
}

/// `w` with every tensor rounded to bf16 (the device holds matrices so;
/// norms and the bias are f32 on both, and rounding them too keeps the
/// comparison to the activations' rounding).
fn bf16_rounded(w: &HeadWeights) -> HeadWeights {
    let mut w = w.clone();
    for t in w.tensors.values_mut() {
        if t.dtype() != DType::F32 {
            continue; // d2t
        }
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f32> = bf16_bits(&v)
            .into_iter()
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect();
        *t = Tensor::from_vec(v, t.dims(), t.device()).unwrap();
    }
    w
}

/// The tiny target `seed` on `backend`'s device.
fn target_on<B: Backend>(backend: Arc<B>, seed: u64) -> Model {
    let t = random_tensors(&tiny_config(), seed).unwrap();
    let gpu = GpuModel::new(backend, &t).unwrap();
    Model::with_backend(&t, Box::new(gpu)).unwrap()
}

/// A two-layer head with an output norm and an `fc` bias, on the device
/// and on the CPU (same bf16-rounded weights): a prompt and a one-token
/// decode over the same KV give the same predicted features (to bf16
/// rounding of the activations), and each row's device picks are the best
/// of the CPU's logits, with their logprobs.
#[test]
fn an_emulated_device_head_computes_the_cpu_heads_forward() {
    device_head_computes_the_cpu_heads_forward(Arc::new(Emulator));
}

#[test]
#[ignore = "needs a CUDA GPU: HETEROSPEC_TEST_DEVICE=cuda cargo test -- --ignored"]
fn the_gpu_head_computes_the_cpu_heads_forward() {
    let ordinal = match crate::testing::test_device() {
        crate::Device::Cuda(i) => i,
        crate::Device::Cpu => 0,
    };
    device_head_computes_the_cpu_heads_forward(super::super::Gpu::open(ordinal).unwrap_or_else(|e| panic!("{e}")));
}

fn device_head_computes_the_cpu_heads_forward<B: Backend>(backend: Arc<B>) {
    let cpu_target = tiny_model(5).unwrap();
    let h = cpu_target.config().hidden_size;
    let sub: Vec<u32> = (0..40).map(|i| i * 3 % 64).collect();
    let mut w = HeadParams::init(&cpu_target, sub, 2, DType::F32, HeadKind::Eagle, 2)
        .unwrap()
        .weights()
        .unwrap();
    let mut rng = Lcg(4);
    let mut random = |n: usize, base: f32| -> Tensor {
        let v: Vec<f32> = (0..n).map(|_| base + rng.f() - 0.5).collect();
        Tensor::from_vec(v, n, &candle_core::Device::Cpu).unwrap()
    };
    w.tensors.insert(OUTPUT_NORM.into(), random(h, 1.0));
    w.tensors.insert(FC_BIAS.into(), random(h, 0.0));
    let w = bf16_rounded(&w);
    let target = target_on(backend.clone(), 5);
    let mut cpu = DraftHead::new(&w, target.config(), WeightFormat::F32).unwrap();
    let mut stays = DraftHead::new(&w, target.config(), WeightFormat::F32).unwrap();
    assert!(!stays.place_on(&cpu_target).unwrap(), "a CPU target keeps its head");
    assert!(!stays.place_on(&target).unwrap(), "where a head runs is decided once");
    let mut dev = DraftHead::new(&w, target.config(), WeightFormat::F32).unwrap();
    assert!(dev.place_on(&target).unwrap() && dev.on_device());

    let layout = KvLayout {
        num_blocks: 8,
        block_size: 4,
        num_layers: 2,
        kv_size: cpu.kv_size(),
        scratch_slots: 4,
    };
    let (mut cpu_kv, mut dev_kv) = (cpu.new_kv(layout).unwrap(), dev.new_kv(layout).unwrap());
    let table = [BlockId(1), BlockId(3)];
    let prompt = RaggedBatch {
        seqs: vec![SeqRun::causal(vec![3, 9, 27, 5, 1, 60], 0, &table, 4)
            .unwrap()
            .with_all_logits()],
    };
    // The target's states at the prompt's six slots, stored as observed.
    let slots = prompt.seqs[0].slots.clone();
    let states: Vec<f32> = (0..slots.len() * h).map(|_| rng.f() - 0.5).collect();
    let every: Vec<usize> = (0..slots.len()).collect();
    for head in [&mut cpu, &mut dev] {
        head.observe(&slots, &Features::host(states.clone(), h), &every)
            .unwrap();
        assert_eq!(head.features_at(&slots).unwrap(), states);
    }
    // Row q reads q - 1's state; the decode reads the prediction the
    // prompt's forward stored at its last slot.
    let prompt_rows: Vec<Option<usize>> = (0..6).map(|q| (q > 0).then(|| slots[q - 1])).collect();
    let decode = RaggedBatch {
        seqs: vec![SeqRun::causal(vec![11], 6, &table, 4).unwrap()],
    };
    let m = 5;
    for (batch, rows) in [(&prompt, prompt_rows), (&decode, vec![Some(slots[5])])] {
        let features: Vec<f32> = rows
            .iter()
            .flat_map(|r| r.map_or(vec![0.0; h], |s| cpu.features_at(&[s]).unwrap()))
            .collect();
        let (want_logits, _) = cpu.forward(&target, batch, &features, &mut cpu_kv).unwrap();
        cpu.forward_top(&target, batch, &rows, &mut cpu_kv, m).unwrap();
        let top = dev.forward_top(&target, batch, &rows, &mut dev_kv, m).unwrap();
        assert_eq!(top.len(), batch.num_logits_rows());
        // The predicted features, stored at the logits rows' slots.
        let written = logits_slots(batch);
        let (hidden, want_hidden) = (dev.features_at(&written).unwrap(), cpu.features_at(&written).unwrap());
        assert_eq!(hidden.len(), want_hidden.len());
        let worst = hidden
            .iter()
            .zip(&want_hidden)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let scale = want_hidden.iter().map(|x| x.abs()).fold(0.0, f32::max);
        assert!(worst <= 1e-2 * scale.max(1.0), "features: {worst} of {scale}");
        let width = want_logits.len() / top.len();
        for (r, row) in top.iter().enumerate() {
            let want = top_logprobs(&want_logits[r * width..(r + 1) * width], width);
            let logprob = |id: u32| want.iter().find(|c| c.0 == id).unwrap().1;
            // Rounding allows 1% of the row's largest logit.
            let row_logits = &want_logits[r * width..(r + 1) * width];
            let tolerance = 1e-2 * row_logits.iter().map(|x| x.abs()).fold(1.0, f32::max);
            assert_eq!(row.len(), m);
            for (j, &(id, lp)) in row.iter().enumerate() {
                // The j-th pick is within rounding of the CPU's j-th best.
                assert!((logprob(id) - want[j].1).abs() <= tolerance, "row {r} pick {j}");
                let diff = (lp - logprob(id)).abs();
                assert!(
                    diff <= tolerance,
                    "row {r} pick {j}: {lp} vs {} (tolerance {tolerance})",
                    logprob(id)
                );
            }
        }
    }

    // The target's own states, which its verify forward leaves on the
    // device: the device head copies the rows it is told there, the CPU
    // head reads them back; both store what the host copy holds.
    let tc = target.config();
    let target_layout = KvLayout {
        num_blocks: 8,
        block_size: 4,
        num_layers: tc.num_layers,
        kv_size: tc.kv_size(),
        scratch_slots: 4,
    };
    let mut target_kv = target.new_kv(target_layout).unwrap();
    let run = RaggedBatch {
        seqs: vec![SeqRun::causal(vec![4, 8, 15, 16, 23], 0, &table, 4).unwrap()],
    };
    let (_, features) = target
        .forward_rows(&run, &mut target_kv, Some(&FeatureTap::Final), &[false])
        .unwrap();
    let Features::Device { rows: left, .. } = &features else {
        panic!("a verify forward on the device leaves its features there")
    };
    assert!(on_backend(left.as_ref(), &backend).is_some());
    let another = Arc::new(Emulator);
    assert!(
        on_backend(left.as_ref(), &another).is_none(),
        "another device's rows are not read in place"
    );
    let (picks, at) = ([4, 0, 2], [slots[1], slots[5], slots[2]]);
    let want = features.rows(&picks).unwrap();
    for head in [&mut cpu, &mut dev] {
        let copies = TO_HOST.with(|n| n.get());
        head.observe(&at, &features, &picks).unwrap();
        let on_device = TO_HOST.with(|n| n.get()) == copies;
        assert_eq!(on_device, head.on_device(), "only a CPU head copies the rows back");
        assert_eq!(head.features_at(&at).unwrap(), want);
        // A row past the forward's tokens is refused; an empty step stores nothing.
        assert!(head.observe(&at[..1], &features, &[5]).is_err());
        head.observe(&[], &Features::none(), &[]).unwrap();
    }
}

/// An engine whose target runs on the emulated GPU drafts with a trained
/// head placed on the device: its greedy output equals plain decoding's
/// there (tokens and log-probabilities to the bit), and the head's drafts
/// are accepted.
#[test]
fn an_engine_drafting_with_a_device_head_speculates_exactly() {
    let mut head = crate::testing::tiny_head(5, HeadKind::Eagle).unwrap();
    // Placed here to see it placed; the engine's setup keeps it there.
    assert!(head.place_on(&target_on(Arc::new(Emulator), 5)).unwrap());
    let drafter = crate::engine::DrafterKind::Head(Box::new(head));
    super::super::tests::speculates_exactly_on_the_emulated_gpu(drafter, 5, 12);
}
