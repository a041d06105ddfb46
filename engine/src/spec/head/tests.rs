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
