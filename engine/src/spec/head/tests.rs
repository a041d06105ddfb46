use super::*;
use std::collections::HashMap;

use crate::spec::train::{frequent_tokens, HeadParams};
use crate::testing::{tiny_config, tiny_model, tiny_training_data};
use candle_core::DType;

fn saved_head(dir: &Path, kind: HeadKind) -> HeadWeights {
    let target = tiny_model(5).unwrap();
    let (sub, _) = frequent_tokens(&tiny_training_data(5, &FeatureTap::Final).unwrap(), 48, 64);
    let w = HeadParams::init(&target, sub, 3, DType::F32, kind, 1)
        .unwrap()
        .weights()
        .unwrap();
    w.save(dir).unwrap();
    w
}

/// Why loading `w` from `dir` (where it is saved first) fails.
fn refusal(dir: &Path, w: &HeadWeights) -> String {
    w.save(dir).unwrap();
    HeadWeights::load(dir, &tiny_config()).unwrap_err().to_string()
}

#[test]
fn the_sub_vocabulary_map_round_trips() {
    let sub: Vec<u32> = vec![7, 3, 63, 0, 12];
    let mut tensors = HashMap::new();
    tensors.insert(D2T.to_string(), HeadWeights::d2t_tensor(&sub).unwrap());
    let w = HeadWeights {
        config: HeadParams::init(&tiny_model(5).unwrap(), sub.clone(), 1, DType::F32, HeadKind::Eagle, 1)
            .unwrap()
            .config,
        tensors,
    };
    assert_eq!(w.draft_to_target().unwrap(), sub);
    // Through a checkpoint on disk, and into a loaded head's output map.
    let dir = std::env::temp_dir().join(format!("heterospec-head-{}", std::process::id()));
    let saved = saved_head(&dir, HeadKind::Eagle);
    let loaded = HeadWeights::load(&dir, &tiny_config()).unwrap();
    assert_eq!(loaded.draft_to_target().unwrap(), saved.draft_to_target().unwrap());
    let head = DraftHead::new(&loaded, &tiny_config(), WeightFormat::AsShipped).unwrap();
    for (i, &t) in saved.draft_to_target().unwrap().iter().enumerate() {
        assert_eq!(head.target_token(i as u32), t);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn checkpoints_with_wrong_shapes_or_another_vocabulary_are_refused() {
    for kind in [HeadKind::Eagle, HeadKind::Eagle3] {
        let dir = std::env::temp_dir().join(format!("heterospec-head-bad-{}-{}", kind.as_str(), std::process::id()));
        let good = saved_head(&dir, kind);
        assert_eq!(HeadWeights::load(&dir, &tiny_config()).unwrap().kind(), kind);
        let err = |w: &HeadWeights| refusal(&dir, w);
        let mut other_vocab = good.clone();
        other_vocab.config.vocab_size = 100;
        let e = err(&other_vocab);
        assert!(e.contains("vocabulary of 100 tokens, the target's has 64"), "{e}");
        let k_proj = kind.layer_names(0).matrices[1].clone();
        let mut wrong_shape = good.clone();
        wrong_shape.tensors.insert(
            k_proj.clone(),
            Tensor::zeros((7, 32), DType::F32, &Device::Cpu).unwrap(),
        );
        let e = err(&wrong_shape);
        let columns = if kind == HeadKind::Eagle { 32 } else { 64 }; // EAGLE-3 attends over [embed | x]
        assert!(
            e.contains(&format!("`{k_proj}` has shape [7, 32], expected [16, {columns}]")),
            "{e}"
        );
        let mut missing = good.clone();
        missing.tensors.remove(FC);
        assert!(err(&missing).contains("tensor `fc.weight` is missing"));
        let mut outside = good.clone();
        outside
            .tensors
            .insert(D2T.into(), HeadWeights::d2t_tensor(&[70; 48]).unwrap());
        assert!(err(&outside).contains("outside the target's vocabulary of 64"));
        let mut target = tiny_config();
        target.hidden_size = 64;
        good.save(&dir).unwrap();
        let e = HeadWeights::load(&dir, &target).unwrap_err().to_string();
        assert!(e.contains("hidden size 32, the target's is 64"), "{e}");
        if kind == HeadKind::Eagle3 {
            let mut deep = good.clone();
            deep.config.eagle_config = Some(EagleConfig {
                eagle_aux_hidden_state_layer_ids: Some(vec![0, 1, 9]),
            });
            let e = err(&deep);
            assert!(e.contains("feature layers [0, 1, 9], the target has 2 layers"), "{e}");
            let mut two = good.clone();
            two.config.num_hidden_layers = 2;
            let e = err(&two);
            assert!(e.contains("an EAGLE-3 head exactly one"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn heads_of_several_layers_load_and_need_every_layer() {
    let dir = std::env::temp_dir().join(format!("heterospec-head-layers-{}", std::process::id()));
    let target = tiny_model(5).unwrap();
    let (sub, _) = frequent_tokens(&tiny_training_data(5, &FeatureTap::Final).unwrap(), 48, 64);
    let good = HeadParams::init(&target, sub, 3, DType::F32, HeadKind::Eagle, 2)
        .unwrap()
        .weights()
        .unwrap();
    good.save(&dir).unwrap();
    let loaded = HeadWeights::load(&dir, &tiny_config()).unwrap();
    assert_eq!(loaded.config.num_hidden_layers, 2);
    let head = DraftHead::new(&loaded, &tiny_config(), WeightFormat::AsShipped).unwrap();
    assert_eq!(head.num_layers(), 2);
    // K and V of both layers and the target feature, per slot.
    assert_eq!(
        head.bytes_per_block(16),
        (2 * 2 * head.kv_size() + head.hidden_size()) * 16 * 4
    );
    let err = |w: &HeadWeights| refusal(&dir, w);
    let mut no_norm = good.clone();
    no_norm.tensors.remove("layers.1.input_layernorm.weight");
    let e = err(&no_norm);
    assert!(e.contains("tensor `layers.1.input_layernorm.weight` is missing"), "{e}");
    let mut fewer = good.clone();
    fewer.config.num_hidden_layers = 1;
    let e = err(&fewer);
    assert!(e.contains("but `num_hidden_layers` is 1"), "{e}");
    let mut none = good.clone();
    none.config.num_hidden_layers = 0;
    assert!(err(&none).contains("`num_hidden_layers` 0"));
    // EAGLE-3 heads have one layer.
    let sub = loaded.draft_to_target().unwrap();
    let e = HeadParams::init(&target, sub, 3, DType::F32, HeadKind::Eagle3, 2)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("an EAGLE-3 head exactly one"), "{e}");
    // A config without the key (as the committed head's) has one layer.
    let mut json: serde_json::Value = serde_json::to_value(&good.config).unwrap();
    json.as_object_mut().unwrap().remove("num_hidden_layers");
    let config: HeadConfig = serde_json::from_value(json).unwrap();
    assert_eq!(config.num_hidden_layers, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn public_eagle3_checkpoints_load() {
    // As EAGLE-3's trainers write them: bf16 matrices, a boolean `t2d`,
    // the layers in `eagle_config` (or absent: 2, L/2, L-3).
    let dir = std::env::temp_dir().join(format!("heterospec-head-eagle3-{}", std::process::id()));
    let ours = saved_head(&dir, HeadKind::Eagle3);
    let mut bufs: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in &ours.tensors {
        let (dtype, bytes) = if name == D2T {
            let v = t.to_vec1::<i64>().unwrap();
            (
                safetensors::Dtype::I64,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        } else {
            let v = t
                .flatten_all()
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap();
            (
                safetensors::Dtype::BF16,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        };
        bufs.push((name.clone(), dtype, t.dims().to_vec(), bytes));
    }
    let sub = ours.draft_to_target().unwrap();
    let t2d: Vec<u8> = (0..64u32).map(|t| sub.contains(&t) as u8).collect();
    bufs.push(("t2d".into(), safetensors::Dtype::BOOL, vec![64], t2d));
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bufs
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let mut config = serde_json::to_value(&ours.config).unwrap();
    config.as_object_mut().unwrap().remove("eagle_config");
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let loaded = HeadWeights::load(&dir, &tiny_config()).unwrap();
    assert_eq!(loaded.kind(), HeadKind::Eagle3);
    assert!(!loaded.tensors.contains_key("t2d"));
    assert_eq!(loaded.feature_tap(2), FeatureTap::eagle3_default(2));
    assert_eq!(loaded.draft_to_target().unwrap(), sub);
    let head = DraftHead::new(&loaded, &tiny_config(), WeightFormat::AsShipped).unwrap();
    assert_eq!(head.kind(), HeadKind::Eagle3);
    assert_eq!(head.feature_tap(), &FeatureTap::Layers(vec![0, 1, 2]));
    // Layer ids at the top level, in any order; refused variants.
    let mut top = config.clone();
    top["eagle_aux_hidden_state_layer_ids"] = serde_json::json!([2, 0, 1]);
    std::fs::write(dir.join("config.json"), top.to_string()).unwrap();
    let w = HeadWeights::load(&dir, &tiny_config()).unwrap();
    assert_eq!(w.feature_tap(2), FeatureTap::Layers(vec![0, 1, 2]));
    top["norm_before_residual"] = serde_json::json!(true);
    std::fs::write(dir.join("config.json"), top.to_string()).unwrap();
    let e = HeadWeights::load(&dir, &tiny_config()).unwrap_err().to_string();
    assert!(e.contains("norm_before_residual"), "{e}");
    // bf16 rounding only.
    let a = ours.tensors[FC].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = loaded.tensors[FC].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 0.01 * x.abs().max(0.01)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn half_split_rows_become_adjacent_pairs() {
    // One head of dim 4, two columns: rows r0 r1 r2 r3 -> r0 r2 r1 r3.
    let w: Vec<f32> = (0..8).map(|x| x as f32).collect();
    assert_eq!(
        half_split_to_interleaved(&w, 1, 4, 2),
        vec![0., 1., 4., 5., 2., 3., 6., 7.]
    );
}

/// Tree rows read their parent's predicted feature: chains grown three deep
/// for two sequences at once through [`ModelDrafter`] (one candidate per
/// node) are the chains a head gives when each token is fed, one at a time,
/// the feature the head predicted for the token before it.
#[test]
fn draft_chains_feed_each_node_its_parents_prediction() {
    use crate::batch::SeqRun;
    use crate::kv::KvLayout;
    use crate::spec::drafter::{DraftInput, Drafter, ModelDrafter, TargetView};
    use crate::spec::tree::{grow, DraftTree};
    use heterospec_kv::{BlockId, SeqId};

    let target = tiny_model(5).unwrap();
    let h = target.config().hidden_size;
    let sub: Vec<u32> = (0..40).map(|i| i * 3 % 64).collect();
    let w = HeadParams::init(&target, sub, 4, DType::F32, HeadKind::Eagle, 1)
        .unwrap()
        .weights()
        .unwrap();
    let head = || DraftHead::new(&w, target.config(), WeightFormat::F32).unwrap();
    let layout = KvLayout {
        num_blocks: 12,
        block_size: 4,
        num_layers: 1,
        kv_size: head().kv_size(),
        scratch_slots: 8,
    };
    let prompts: [Vec<u32>; 2] = [vec![3, 9, 27, 5, 1, 60], vec![7, 7, 2, 40, 11]];
    let tables: [Vec<BlockId>; 2] = [
        vec![BlockId(1), BlockId(2), BlockId(3)],
        vec![BlockId(5), BlockId(6), BlockId(7)],
    ];
    let mut rng = crate::testing::Lcg(8);
    // The target's states of every token before each root.
    let states: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| (0..(p.len() - 1) * h).map(|_| rng.f() - 0.5).collect())
        .collect();
    let slots = |s: usize, n: usize| -> Vec<usize> { (0..n).map(|q| tables[s][q / 4].index() * 4 + q % 4).collect() };

    let mut drafter = ModelDrafter::with_head(head(), layout, 8).unwrap();
    for s in 0..2 {
        drafter
            .observe_features(
                &slots(s, prompts[s].len() - 1),
                &Features::host(states[s].clone(), h),
                &(0..prompts[s].len() - 1).collect::<Vec<_>>(),
            )
            .unwrap();
    }
    let inputs: Vec<DraftInput> = (0..2)
        .map(|s| DraftInput {
            seq_id: SeqId(s as u64),
            tokens: &prompts[s],
            num_computed: prompts[s].len() - 1,
            block_table: &tables[s],
            free_only: false,
        })
        .collect();
    let mut trees: Vec<DraftTree> = prompts.iter().map(|p| DraftTree::new(*p.last().unwrap())).collect();
    let mut target_kv = target.new_kv(layout).unwrap();
    let mut view = TargetView {
        model: &target,
        kv: &mut target_kv,
        scratch: 0..0,
    };
    grow(
        &mut drafter,
        &mut view,
        &inputs,
        &mut trees,
        &[3, 3],
        &[f32::NEG_INFINITY; 2],
        1,
    )
    .unwrap();

    for s in 0..2 {
        let drafted: Vec<u32> = trees[s].path_tokens(trees[s].len() - 1);
        assert_eq!(drafted.len(), 3, "sequence {s}");
        // The same head, fed by hand: the prompt (row q reads q - 1's
        // state), then each drafted token reading the prediction before it.
        let mut reference = head();
        let mut kv = reference.new_kv(layout).unwrap();
        let p = &prompts[s];
        let mut features = vec![0.0; h];
        features.extend_from_slice(&states[s]);
        let mut run = SeqRun::causal(p.clone(), 0, &tables[s], 4).unwrap();
        let mut want = Vec::new();
        for step in 0..3 {
            let batch = crate::batch::RaggedBatch { seqs: vec![run] };
            let (logits, hidden) = reference.forward(&target, &batch, &features, &mut kv).unwrap();
            let best = crate::sampler::argmax(&logits);
            want.push(reference.target_token(best));
            features = hidden;
            run = SeqRun::causal(vec![want[step]], p.len() + step, &tables[s], 4).unwrap();
        }
        assert_eq!(drafted, want, "sequence {s}");
    }
}
