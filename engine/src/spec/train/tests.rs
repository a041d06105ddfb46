use super::*;
use crate::batch::{RaggedBatch, SeqRun};
use crate::kv::{KvLayout, KvStorage};
use crate::model::WeightFormat;
use crate::spec::head::DraftHead;
use crate::testing::{tiny_model, tiny_training_data};

/// Head designs and decoder layers the tests run.
const SHAPES: [(HeadKind, usize); 3] = [(HeadKind::Eagle, 1), (HeadKind::Eagle3, 1), (HeadKind::Eagle, 2)];

fn no_noise_batch(target: &Model, p: &HeadParams, data: &[TrainSequence], dtype: DType) -> Batch {
    let sub_index = p.sub_vocab.iter().enumerate().map(|(i, &t)| (t, i as u32)).collect();
    let seqs: Vec<&TrainSequence> = data.iter().collect();
    make_batch(
        target,
        p,
        &seqs,
        &sub_index,
        64,
        0.0,
        0.0,
        &mut StdRng::seed_from_u64(0),
        dtype,
    )
    .unwrap()
}

/// The tiny target 5, a new head of `kind` with `layers` on it and its
/// training data (the head's tap).
fn setup((kind, layers): (HeadKind, usize), dtype: DType) -> (Model, HeadParams, Vec<TrainSequence>) {
    let target = tiny_model(5).unwrap();
    let (sub, _) = frequent_tokens(&tiny_training_data(5, &FeatureTap::Final).unwrap(), 48, 64);
    let p = HeadParams::init(&target, sub, 3, dtype, kind, layers).unwrap();
    let data = tiny_training_data(5, &p.tap).unwrap();
    (target, p, data)
}

#[test]
fn the_training_graph_computes_what_the_engine_runs() {
    for shape @ (kind, layers) in SHAPES {
        let (target, mut p, data) = setup(shape, DType::F32);
        // Non-trivial norms and bias, so their placement is checked too.
        let h = p.config.hidden_size;
        for (k, (_, var)) in p.vars.iter_mut().enumerate().filter(|(_, v)| v.1.rank() == 1) {
            let values: Vec<f32> = (0..h).map(|i| 1.0 + ((i + 7 * k) as f32 * 0.11).cos() * 0.5).collect();
            var.set(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap();
        }
        let seq = &data[3];
        let n = seq.tokens.len();
        let batch = no_noise_batch(&target, &p, std::slice::from_ref(seq), DType::F32);
        let steps = forward(&p, &batch, 3, None).unwrap();
        let rows = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let head = DraftHead::new(&p.weights().unwrap(), target.config(), WeightFormat::AsShipped).unwrap();
        assert_eq!((head.kind(), head.num_layers()), shape);
        let fw = p.tap.width(h);
        let mut states = vec![0.0; fw];
        states.extend_from_slice(&seq.features[..(n - 1) * fw]);
        let inputs = head.input_features(states).unwrap();
        let layout = KvLayout {
            num_blocks: n.div_ceil(4),
            block_size: 4,
            num_layers: layers,
            kv_size: head.kv_size(),
            scratch_slots: 0,
        };
        let table: Vec<_> = (0..layout.num_blocks as u32).map(heterospec_kv::BlockId).collect();
        // The engine's head on positions start..end with `inputs` rows.
        let run = |kv: &mut KvStorage, start: usize, end: usize, inputs: &[f32]| {
            let run = SeqRun::causal(seq.tokens[start..end].to_vec(), start, &table, 4)
                .unwrap()
                .with_all_logits();
            head.forward(&target, &RaggedBatch { seqs: vec![run] }, inputs, kv)
                .unwrap()
        };
        let close = |a: &[f32], b: &[f32], what: &str| {
            assert_eq!(a.len(), b.len(), "{shape:?} {what}");
            assert!(a.iter().any(|&x| x.abs() > 0.1), "{shape:?} {what}");
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-3, "{shape:?} {what}: max difference {worst}");
        };
        // Step 0 over the whole sequence in two runs: the second reads
        // the first's K/V from paged storage.
        let mut kv = KvStorage::new(layout);
        let (split, mut got_hidden, mut got_logits) = (n / 2, Vec::new(), Vec::new());
        for (start, end) in [(0, split), (split, n)] {
            let (l, hd) = run(&mut kv, start, end, &inputs[start * h..end * h]);
            got_logits.extend(l);
            got_hidden.extend(hd);
        }
        assert!(got_hidden.len() == n * h);
        close(&rows(&steps[0].0), &got_hidden, "step 0 outputs");
        close(&rows(&steps[0].1), &got_logits, "step 0 logits");
        if kind == HeadKind::Eagle {
            assert_eq!(steps.len(), 1);
            continue;
        }
        // Step j, row q: a draft chain of depth j after the context
        // 0..=q-j, each node reading its parent's output.
        let dv = p.sub_vocab.len();
        for (j, q) in [(1, n - 1), (2, n - 1), (2, n / 2 + 1)] {
            let mut kv = KvStorage::new(layout);
            let (_, hd) = run(&mut kv, 0, q - j + 1, &inputs[..(q - j + 1) * h]);
            let mut parent = hd[(q - j) * h..].to_vec();
            let mut logits = Vec::new();
            for pos in q - j + 1..=q {
                (logits, parent) = run(&mut kv, pos, pos + 1, &parent);
            }
            close(
                &rows(&steps[j].0)[q * h..(q + 1) * h],
                &parent,
                &format!("step {j} row {q} output"),
            );
            close(
                &rows(&steps[j].1)[q * dv..(q + 1) * dv],
                &logits,
                &format!("step {j} row {q} logits"),
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences_and_training_lowers_the_loss() {
    for shape in SHAPES {
        // Gradient check in f64 on a few entries of every tensor
        // (EAGLE-3 through three training-time-test steps).
        let (target, p, data) = setup(shape, DType::F64);
        let batch = no_noise_batch(&target, &p, &data[..4], DType::F64);
        let (total, ..) = loss(&p, &batch, 0.5, 3).unwrap();
        let grads = total.backward().unwrap();
        let eps = 1e-5;
        for (name, var) in &p.vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for idx in [0, base.len() / 3, base.len() - 1] {
                let at = |delta: f64| {
                    let mut w = base.clone();
                    w[idx] += delta;
                    var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&p, &batch, 0.5, 3).unwrap().0.to_scalar::<f64>().unwrap()
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                assert!(
                    (numeric - g[idx]).abs() <= 1e-6 + 1e-4 * numeric.abs().max(g[idx].abs()),
                    "{shape:?} {name}[{idx}]: autograd {} finite difference {numeric}",
                    g[idx]
                );
            }
        }
        // A short run lowers the loss on the training data.
        let (target, mut p, data) = setup(shape, DType::F32);
        let batch = no_noise_batch(&target, &p, &data, DType::F32);
        let cfg = TrainConfig {
            max_len: 64,
            epochs: 15,
            learning_rate: 3e-3,
            warmup_steps: 5,
            ..TrainConfig::default()
        };
        let before = loss(&p, &batch, 0.1, cfg.ttt_steps).unwrap();
        let mut steps = 0;
        let epochs = train(&target, &mut p, &data, &cfg, |_, _, _| steps += 1, |_, _, _| Ok(())).unwrap();
        assert_eq!(steps, 15 * data.len().div_ceil(8));
        let after = loss(&p, &batch, 0.1, cfg.ttt_steps).unwrap();
        let total = |l: &(Tensor, f64, f64, f64)| scalar(&l.0).unwrap();
        assert!(
            total(&after) < 0.7 * total(&before) && after.1 <= 0.7 * before.1 && after.2 < 0.7 * before.2,
            "{shape:?}: loss {:.4} -> {:.4}, feature loss {:.4} -> {:.4}, token loss {:.3} -> {:.3} (epochs {epochs:?})",
            total(&before),
            total(&after),
            before.1,
            after.1,
            before.2,
            after.2
        );
        assert!(after.3 > before.3, "{shape:?}: top-1 {:.3} -> {:.3}", before.3, after.3);
    }
}

#[test]
fn frequent_tokens_rank_answers_and_fill_up() {
    let seq = |tokens: Vec<u32>, answer_start| TrainSequence {
        features: vec![],
        tokens,
        answer_start,
    };
    let data = [seq(vec![9, 9, 9, 5, 5, 7], 3), seq(vec![1, 7, 5], 1)];
    let (ids, coverage) = frequent_tokens(&data, 4, 10);
    assert_eq!(ids, vec![5, 7, 0, 1]); // 5 x3, 7 x2, then the lowest unused
    assert!((coverage - 1.0).abs() < 1e-9);
    let (ids, coverage) = frequent_tokens(&data, 1, 10);
    assert_eq!(ids, vec![5]);
    assert!((coverage - 0.6).abs() < 1e-9);
}

#[test]
fn packed_features_equal_one_sequence_at_a_time() {
    let target = tiny_model(5).unwrap();
    let data = tiny_training_data(5, &FeatureTap::Final).unwrap();
    let seqs: Vec<&[u32]> = data.iter().map(|s| &s.tokens[..]).collect();
    for tap in [FeatureTap::Final, FeatureTap::Layers(vec![0, 1])] {
        let mut forwards = 0;
        let packed = target_features_packed(&target, &seqs, 100, &tap, |_| forwards += 1).unwrap();
        assert!(
            forwards < seqs.len(),
            "{forwards} forwards for {} sequences",
            seqs.len()
        );
        for (s, p) in seqs.iter().zip(&packed) {
            let alone = target_features(&target, s, 512, &tap).unwrap();
            assert_eq!(alone.len(), p.len());
            let worst = alone.iter().zip(p).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{tap:?}: {worst}");
        }
    }
}

#[test]
fn held_out_figures_agree_with_the_loss_and_rise_with_training_and_a_resumed_run_does_the_rest() {
    for shape @ (kind, layers) in SHAPES {
        let (target, p, data) = setup(shape, DType::F32);
        // A sub-vocabulary that leaves some answer tokens out.
        let mut p = HeadParams::init(&target, p.sub_vocab[..3].to_vec(), 3, DType::F32, kind, layers).unwrap();
        let cfg = TrainConfig {
            max_len: 64,
            epochs: 12,
            learning_rate: 3e-3,
            warmup_steps: 5,
            batch_size: 32,
            ..TrainConfig::default()
        };
        let before = evaluate(&target, &p, &data, &cfg).unwrap();
        assert_eq!(
            before.top1.len(),
            if kind == HeadKind::Eagle { 1 } else { cfg.ttt_steps }
        );
        // One batch holds all: the first depth's figures are the loss's,
        // with answer tokens outside the sub-vocabulary counted as misses.
        let (_, _, ce, acc) = loss(&p, &no_noise_batch(&target, &p, &data, DType::F32), 0.1, cfg.ttt_steps).unwrap();
        let next: Vec<u32> = data
            .iter()
            .flat_map(|s| s.tokens[s.answer_start.max(1)..s.tokens.len().min(64)].iter().copied())
            .collect();
        let inside = next.iter().filter(|t| p.sub_vocab.contains(t)).count() as f64;
        assert!(
            inside < next.len() as f64,
            "the tiny sub-vocabulary leaves some answer tokens out"
        );
        let expected = acc * inside / next.len() as f64;
        assert!(
            (before.top1[0] - expected).abs() < 1e-9,
            "{shape:?}: {} vs {expected}",
            before.top1[0]
        );
        assert!(
            (before.token_loss - ce).abs() < 1e-4 * ce.max(1.0),
            "{shape:?}: {} vs {ce}",
            before.token_loss
        );
        // A resumed run runs only the epochs left, and reports each.
        let mut seen = Vec::new();
        let resumed = TrainConfig {
            start_epoch: 9,
            ..cfg.clone()
        };
        train(&target, &mut p, &data, &cfg, |_, _, _| {}, |_, _, _| Ok(())).unwrap();
        let after = evaluate(&target, &p, &data, &cfg).unwrap();
        assert!(after.top1[0] > before.top1[0], "{shape:?}: {before:?} -> {after:?}");
        assert!(after.tau_estimate(4) > before.tau_estimate(4));
        let epochs = train(
            &target,
            &mut p,
            &data,
            &resumed,
            |_, _, _| {},
            |e, _, _| {
                seen.push(e);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!((epochs.len(), seen), (3, vec![10, 11, 12]));
    }
}

#[test]
fn the_tau_estimate_chains_the_depths() {
    let s = HeldOutStats {
        token_loss: 0.0,
        top1: vec![0.5, 0.4],
    };
    // 1 + .5 + .5*.4 + .5*.4*.4
    assert!((s.tau_estimate(3) - 1.78).abs() < 1e-9);
    assert_eq!(HeldOutStats::default().tau_estimate(4), 1.0);
}
