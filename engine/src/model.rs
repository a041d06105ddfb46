//! The target model: its configuration, its token embeddings (on the host:
//! drafters read them) and the backend that runs its forward on a device
//! (`backend::ModelBackend`: `cpu::CpuModel`, or the GPU's `cuda::GpuModel`
//! with feature `cuda`). Immutable after load: all mutable state lives in
//! [`KvStorage`].
//!
//! Invariant: every forward goes through the one backend chosen at load;
//! this type never asks which device it is on.

use std::path::Path;

use crate::backend::{FeatureTap, ModelBackend, Rows};
use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::cpu::CpuModel;
use crate::error::{EngineError, Result};
use crate::features::Features;
use crate::kv::{KvLayout, KvStorage};
pub use crate::linear::WeightFormat;
pub use crate::weights::ModelTensors;

/// A loaded model.
pub struct Model {
    config: ModelConfig,
    /// (vocab, hidden)
    embeddings: Vec<f32>,
    backend: Box<dyn ModelBackend>,
}

impl Model {
    pub fn load(path: &Path, format: WeightFormat) -> Result<Self> {
        Self::load_on(path, format, crate::Device::Cpu)
    }

    /// [`Model::load`] whose forward runs on `device`.
    pub fn load_on(path: &Path, format: WeightFormat, device: crate::Device) -> Result<Self> {
        let (tensors, _) = ModelTensors::read_gguf(path)?;
        Self::from_tensors_on(tensors, format, device)
    }

    /// [`Model::from_tensors`] whose forward runs on `device` (`format`
    /// applies to the CPU backend).
    pub fn from_tensors_on(t: ModelTensors, format: WeightFormat, device: crate::Device) -> Result<Self> {
        match device {
            crate::Device::Cpu => Self::from_tensors(t, format),
            #[cfg(feature = "cuda")]
            crate::Device::Cuda(ordinal) => {
                t.config.validate()?;
                let backend = crate::cuda::open_model(ordinal, &t)?;
                Self::with_backend(&t, backend)
            }
            #[cfg(not(feature = "cuda"))]
            crate::Device::Cuda(_) => Err(EngineError::Device(
                "this build has no GPU path: build with `--features cuda`".into(),
            )),
        }
    }

    /// A model on the CPU backend.
    pub fn from_tensors(mut t: ModelTensors, format: WeightFormat) -> Result<Self> {
        t.config.validate()?;
        let embeddings = t.embeddings()?;
        let backend = Box::new(CpuModel::new(&mut t, format)?);
        Ok(Model {
            config: t.config,
            embeddings,
            backend,
        })
    }

    /// A model of `t`'s shape and embeddings whose forward runs on `backend`
    /// (loaded from the same tensors).
    pub fn with_backend(t: &ModelTensors, backend: Box<dyn ModelBackend>) -> Result<Self> {
        t.config.validate()?;
        Ok(Model {
            config: t.config.clone(),
            embeddings: t.embeddings()?,
            backend,
        })
    }

    /// Whether GPU forwards of frequent shapes run from CUDA graphs (on
    /// by default; no effect on the CPU). Set it before placing a draft
    /// head on the device: the head takes the setting then.
    pub fn set_graphs(&self, on: bool) {
        self.backend.set_graphs(on);
    }

    /// Where the forward runs.
    pub fn device(&self) -> crate::Device {
        self.backend.device()
    }

    /// Empty KV storage for this model's forward (in device memory for a
    /// GPU model).
    pub fn new_kv(&self, layout: KvLayout) -> Result<KvStorage> {
        self.backend.new_kv(layout)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Runs one ragged batch: writes the new tokens' K/V into `kv` at their
    /// slots and returns the logits rows asked for, `(rows, vocab)` flat, in
    /// batch order.
    pub fn forward(&self, batch: &RaggedBatch, kv: &mut KvStorage) -> Result<Vec<f32>> {
        Ok(self.forward_impl(batch, kv, self.config.num_layers, None)?.0)
    }

    /// [`Model::forward`] that also returns every new token's features of
    /// `tap`, `(tokens, tap.width(hidden))` flat in batch order: what a
    /// draft head reads.
    pub fn forward_with_features(
        &self,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        tap: &FeatureTap,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_tap(tap)?;
        self.forward_impl(batch, kv, self.config.num_layers, Some(tap))
    }

    /// [`Model::forward_with_features`] (or [`Model::forward`] without a
    /// tap) for verification: each logits row `r` with `pickable[r]` may
    /// come back as its greedy pick rather than whole (a GPU finds the
    /// picks on the device and copies back only the other rows, and leaves
    /// the features there; the CPU returns every row whole).
    pub fn forward_rows(
        &self,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        tap: Option<&FeatureTap>,
        pickable: &[bool],
    ) -> Result<(Rows, Features)> {
        if let Some(tap) = tap {
            self.check_tap(tap)?;
        }
        let Some(x) = self.prepare(batch, kv)? else {
            return Ok((Rows::whole(Vec::new(), self.config.vocab_size), Features::none()));
        };
        self.backend.forward_rows(x, batch, kv, tap, pickable)
    }

    /// [`Model::forward`] through the first `num_layers` layers only, then
    /// the output norm and head (a layer-skip self-draft). Writes K/V of
    /// those layers only.
    pub fn forward_layers(&self, batch: &RaggedBatch, kv: &mut KvStorage, num_layers: usize) -> Result<Vec<f32>> {
        Ok(self.forward_impl(batch, kv, num_layers, None)?.0)
    }

    /// The embedding rows of `tokens`, `(tokens, hidden)` flat.
    pub fn embed(&self, tokens: impl IntoIterator<Item = u32>) -> Vec<f32> {
        let h = self.config.hidden_size;
        let mut x = Vec::new();
        for t in tokens {
            x.extend_from_slice(&self.embeddings[t as usize * h..(t as usize + 1) * h]);
        }
        x
    }

    /// A draft head of `parts` on this model's device, where its backend
    /// runs heads (`None` on the CPU).
    pub fn head_on_device(
        &self,
        parts: &crate::device_head::HeadParts,
    ) -> Result<Option<Box<dyn crate::device_head::HeadBackend>>> {
        self.backend.head_on_device(parts)
    }

    /// The output layer on rows that are already normed, `(rows, vocab)`.
    pub fn logits_from_features(&self, features: &[f32]) -> Result<Vec<f32>> {
        if features.len() < self.config.hidden_size {
            return Ok(Vec::new());
        }
        self.backend.logits_from_features(features)
    }

    fn forward_impl(
        &self,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        num_layers: usize,
        tap: Option<&FeatureTap>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let Some(x) = self.prepare(batch, kv)? else {
            return Ok((Vec::new(), Vec::new()));
        };
        self.backend.forward(x, batch, kv, num_layers, tap)
    }

    /// A tap's layers exist in this model.
    fn check_tap(&self, tap: &FeatureTap) -> Result<()> {
        let num_layers = self.config.num_layers;
        if let FeatureTap::Layers(l) = tap {
            if let Some(&bad) = l.iter().find(|&&i| i > num_layers) {
                return Err(EngineError::Config(format!(
                    "feature layer {bad}, the model has {num_layers} layers"
                )));
            }
        }
        Ok(())
    }

    /// Checks `batch` against `kv` and the vocabulary, and returns the new
    /// tokens' embeddings (empty where the backend gathers them itself);
    /// `None` for a batch without tokens.
    fn prepare(&self, batch: &RaggedBatch, kv: &KvStorage) -> Result<Option<Vec<f32>>> {
        let c = &self.config;
        let layout = kv.layout();
        for seq in &batch.seqs {
            seq.validate(layout.block_size, layout.num_slots(), c.vocab_size)?;
        }
        if batch.num_tokens() == 0 {
            return Ok(None);
        }
        Ok(Some(if self.backend.embeds_tokens() {
            Vec::new()
        } else {
            self.embed(batch.seqs.iter().flat_map(|s| s.token_ids.iter().copied()))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::SeqRun;
    use crate::kv::KvLayout;
    use crate::testing::{tiny_config, tiny_model};
    use heterospec_kv::{BlockPool, BlockPoolConfig, BlockTable};

    /// Logits agree to this absolute tolerance: f32 sums in a different order.
    const TOL: f32 = 1e-4;

    fn storage(block_size: usize) -> (KvStorage, BlockPool) {
        let layout = KvLayout {
            num_blocks: 128,
            block_size,
            num_layers: tiny_config().num_layers,
            kv_size: tiny_config().kv_size(),
            scratch_slots: 0,
        };
        (
            KvStorage::new(layout),
            BlockPool::new(BlockPoolConfig {
                num_blocks: 128,
                block_size,
            }),
        )
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(worst < TOL, "{what}: max abs diff {worst}");
    }

    fn prompts() -> Vec<Vec<u32>> {
        vec![
            (0..23).map(|i| (i * 7 % 64) as u32).collect(),
            vec![5],
            (0..9).map(|i| (i * 3 + 1) as u32).collect(),
            (0..17).map(|i| (63 - i) as u32).collect(),
        ]
    }

    /// Every position's logits for one sequence run alone in one forward.
    fn solo_logits(model: &Model, tokens: &[u32], block_size: usize) -> Vec<f32> {
        let (mut kv, mut pool) = storage(block_size);
        let mut table = BlockTable::new();
        pool.allocate_slots(&mut table, tokens.len()).unwrap();
        let run = SeqRun::causal_from_table(tokens.to_vec(), 0, &table, block_size)
            .unwrap()
            .with_all_logits();
        model.forward(&RaggedBatch { seqs: vec![run] }, &mut kv).unwrap()
    }

    #[test]
    fn ragged_batch_equals_each_sequence_alone() {
        let model = tiny_model(1).unwrap();
        let vocab = model.config().vocab_size;
        for block_size in [4, 16] {
            let (mut kv, mut pool) = storage(block_size);
            let mut batch = RaggedBatch::default();
            for p in prompts() {
                let mut table = BlockTable::new();
                pool.allocate_slots(&mut table, p.len()).unwrap();
                batch.seqs.push(
                    SeqRun::causal_from_table(p, 0, &table, block_size)
                        .unwrap()
                        .with_all_logits(),
                );
            }
            let together = model.forward(&batch, &mut kv).unwrap();
            let mut offset = 0;
            for p in prompts() {
                let alone = solo_logits(&model, &p, block_size);
                assert_close(&together[offset..offset + alone.len()], &alone, "ragged vs alone");
                offset += p.len() * vocab;
            }
        }
    }

    #[test]
    fn incremental_decoding_equals_recomputing_the_whole_sequence() {
        let model = tiny_model(2).unwrap();
        let vocab = model.config().vocab_size;
        for block_size in [1, 3, 16] {
            for p in prompts() {
                let full = solo_logits(&model, &p, block_size);
                // chunks of 5 (chunked prefill), then one token at a time
                let (mut kv, mut pool) = storage(block_size);
                let mut table = BlockTable::new();
                let mut done = 0;
                while done < p.len() {
                    let n = if done < 10 { 5.min(p.len() - done) } else { 1 };
                    pool.allocate_slots(&mut table, done + n).unwrap();
                    let run = SeqRun::causal_from_table(p[done..done + n].to_vec(), done, &table, block_size)
                        .unwrap()
                        .with_all_logits();
                    let out = model.forward(&RaggedBatch { seqs: vec![run] }, &mut kv).unwrap();
                    assert_close(&out, &full[done * vocab..(done + n) * vocab], "incremental vs full");
                    done += n;
                }
            }
        }
    }

    #[test]
    fn tree_node_logits_equal_decoding_its_path() {
        let model = tiny_model(3).unwrap();
        let vocab = model.config().vocab_size;
        let bs = 4;
        let prefix: Vec<u32> = vec![1, 2, 3, 4, 5, 6];
        // tree: n0=10; n1=11 (child of n0); n2=12 (child of n0); n3=13 (child of n1)
        let parents = [None, Some(0), Some(0), Some(1)];
        let tokens = [10u32, 11, 12, 13];
        let (mut kv, mut pool) = storage(bs);
        let mut table = BlockTable::new();
        pool.allocate_slots(&mut table, prefix.len() + tokens.len()).unwrap();
        let run = SeqRun::causal_from_table(prefix.clone(), 0, &table, bs).unwrap();
        model.forward(&RaggedBatch { seqs: vec![run] }, &mut kv).unwrap();
        let depth = |mut i: usize| {
            let mut d = 0;
            while let Some(p) = parents[i] {
                i = p;
                d += 1;
            }
            d
        };
        let mut run = SeqRun::causal_from_table(tokens.to_vec(), prefix.len(), &table, bs)
            .unwrap()
            .with_all_logits();
        run.positions = (0..4).map(|i| prefix.len() + depth(i)).collect();
        let mut mask = vec![false; 16];
        for i in 0..4 {
            let mut a = Some(i);
            while let Some(j) = a {
                mask[i * 4 + j] = true;
                a = parents[j];
            }
        }
        run.mask = Some(mask);
        let tree = model.forward(&RaggedBatch { seqs: vec![run] }, &mut kv).unwrap();
        for node in 0..4 {
            let mut path = vec![node];
            while let Some(p) = parents[*path.last().unwrap()] {
                path.push(p);
            }
            let mut seq = prefix.clone();
            seq.extend(path.iter().rev().map(|&i| tokens[i]));
            let want = solo_logits(&model, &seq, bs);
            let last = seq.len() - 1;
            assert_close(
                &tree[node * vocab..(node + 1) * vocab],
                &want[last * vocab..(last + 1) * vocab],
                "tree node",
            );
        }
    }

    #[test]
    fn bad_runs_are_errors_not_panics() {
        let model = tiny_model(4).unwrap();
        let (mut kv, _) = storage(4);
        let mut run = SeqRun::causal(vec![1, 2], 0, &[heterospec_kv::BlockId(1)], 4).unwrap();
        run.token_ids[1] = 10_000;
        assert!(model
            .forward(&RaggedBatch { seqs: vec![run] }, &mut kv)
            .unwrap_err()
            .to_string()
            .contains("vocabulary"));
        assert!(
            SeqRun::causal(vec![1; 5], 0, &[heterospec_kv::BlockId(1)], 4).is_err(),
            "table too short"
        );
    }
}

#[cfg(test)]
mod weight_type_tests {
    use super::*;
    use crate::batch::SeqRun;
    use crate::kv::KvLayout;
    use crate::testing::random_tensors;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;
    use heterospec_kv::BlockId;

    /// Shapes that every GGUF block size divides (K-quants need 256).
    fn config() -> ModelConfig {
        ModelConfig {
            num_layers: 1,
            hidden_size: 256,
            intermediate_size: 512,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
            vocab_size: 64,
            max_context: 64,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            block: Default::default(),
            rope_freq_factors: None,
            sliding_window: None,
            attn_scale_dim: 64,
        }
    }

    /// Logits of 5 tokens with every linear weight stored as `dtype`.
    fn logits(dtype: Option<GgmlDType>, format: WeightFormat) -> Vec<f32> {
        let mut t = random_tensors(&config(), 7).unwrap();
        for (name, q) in t.tensors.iter_mut() {
            if q.shape().rank() == 2 && !name.starts_with("token_embd") {
                let f = q.dequantize(&Device::Cpu).unwrap();
                *q = match dtype {
                    Some(d) => QTensor::quantize(&f, d).unwrap(),
                    None => QTensor::quantize(&f, GgmlDType::F32).unwrap(),
                };
            }
        }
        let model = Model::from_tensors(t, format).unwrap();
        let layout = KvLayout::for_budget(model.config(), 16, 1 << 20).unwrap();
        let mut kv = KvStorage::new(layout);
        let run = SeqRun::causal(vec![1, 5, 9, 3, 7], 0, &[BlockId(1)], 16)
            .unwrap()
            .with_all_logits();
        model.forward(&RaggedBatch { seqs: vec![run] }, &mut kv).unwrap()
    }

    /// Each GGUF weight type loads in every format and gives the logits of
    /// its own dequantized f32 weights, up to 8-bit activation rounding.
    #[test]
    fn every_weight_type_matches_its_dequantized_f32_model() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::F16,
        ] {
            // The reference: the same quantized values, dequantized, in f32.
            let mut t = random_tensors(&config(), 7).unwrap();
            for (name, q) in t.tensors.iter_mut() {
                if q.shape().rank() == 2 && !name.starts_with("token_embd") {
                    let f = q.dequantize(&Device::Cpu).unwrap();
                    let quantized = QTensor::quantize(&f, dtype).unwrap();
                    *q = QTensor::quantize(&quantized.dequantize(&Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
                }
            }
            let model = Model::from_tensors(t, WeightFormat::F32).unwrap();
            let layout = KvLayout::for_budget(model.config(), 16, 1 << 20).unwrap();
            let mut kv = KvStorage::new(layout);
            let run = SeqRun::causal(vec![1, 5, 9, 3, 7], 0, &[BlockId(1)], 16)
                .unwrap()
                .with_all_logits();
            let want = model.forward(&RaggedBatch { seqs: vec![run] }, &mut kv).unwrap();
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for format in [WeightFormat::Native, WeightFormat::Q8_0, WeightFormat::AsShipped] {
                let got = logits(Some(dtype), format);
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                println!("{dtype:?} as {format:?}: worst |diff| {worst:.5} of max |logit| {scale:.3}");
                // 8-bit activation rounding (and q8_0's second rounding of the
                // weights) moves logits by ~0.15% of their range here.
                assert!(
                    worst < 0.005 * scale,
                    "{dtype:?} as {format:?}: worst {worst} of {scale}"
                );
            }
        }
        assert!(!logits(None, WeightFormat::Native).is_empty());
    }
}
