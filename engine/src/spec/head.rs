//! An EAGLE-style draft head: one decoder layer that predicts the target's
//! next final-layer feature from the current feature and the embedding of
//! the token that follows it, with an output layer over a frequent-token
//! sub-vocabulary.
//!
//! Row `q` of the head reads `fc([embed(token_q) | feature_{q-1}])`, runs the
//! decoder layer (its K/V live in the head's own paged KV, addressed by the
//! target's block tables) and outputs `f̂_q`, a guess of the target's feature
//! at `q`; `lm_head(f̂_q)` ranks token `q + 1`. The target's real features
//! come from the verify forward (no extra target work); deeper tree nodes
//! feed the head its own guesses.
//!
//! Checkpoints use the EAGLE layout (safetensors with Hugging Face names plus
//! a `config.json`): `fc.weight` `(h, 2h)`, optional `fc.bias`,
//! `layers.0.self_attn.{q,k,v,o}_proj.weight`, `layers.0.mlp.{gate,up,down}_proj.weight`,
//! `layers.0.post_attention_layernorm.weight`, optional
//! `layers.0.input_layernorm.weight`, and optionally a sub-vocabulary
//! output: `lm_head.weight` `(draft_vocab, h)` with `d2t` (EAGLE-3's map:
//! target id = draft id + `d2t[draft id]`) and a `norm.weight` before it.
//! Without `lm_head.weight` the target's own output layer is used (EAGLE-1).
//! Query and key rows are stored in Hugging Face's half-split RoPE order and
//! permuted to the engine's interleaved order at load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv::KvStorage;
use crate::model::{ForwardContext, Layer, Linear, Model, WeightFormat};
use crate::ops::rms_norm_rows;

/// `config.json` of a head (Hugging Face names; unknown keys ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    /// The target's vocabulary size.
    pub vocab_size: usize,
    /// Rows of `lm_head.weight` (absent: the target's output layer).
    #[serde(default)]
    pub draft_vocab_size: Option<usize>,
    /// How the file was made; informational.
    #[serde(default)]
    pub provenance: String,
}

impl HeadConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The head as a one-layer model config over the target's vocabulary.
    pub fn layer_config(&self, target: &ModelConfig) -> ModelConfig {
        ModelConfig {
            num_layers: 1,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim(),
            vocab_size: target.vocab_size,
            max_context: target.max_context,
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
        }
    }
}

/// Tensor names of the decoder layer's matrices, in [`Layer::from_parts`] order.
pub const LAYER_MATRICES: [&str; 7] = [
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight",
];
pub const FC: &str = "fc.weight";
pub const FC_BIAS: &str = "fc.bias";
pub const INPUT_NORM: &str = "layers.0.input_layernorm.weight";
pub const POST_NORM: &str = "layers.0.post_attention_layernorm.weight";
pub const OUTPUT_NORM: &str = "norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";
pub const D2T: &str = "d2t";

/// A head's tensors (f32, Hugging Face layout and names) and config.
#[derive(Debug, Clone)]
pub struct HeadWeights {
    pub config: HeadConfig,
    pub tensors: HashMap<String, Tensor>,
}

/// The checkpoint files for `path`: a directory with `model.safetensors`
/// and `config.json`, or a `.safetensors` file with `config.json` beside it.
pub fn checkpoint_files(path: &Path) -> (PathBuf, PathBuf) {
    if path.is_dir() {
        (path.join("model.safetensors"), path.join("config.json"))
    } else {
        (path.to_path_buf(), path.with_file_name("config.json"))
    }
}

impl HeadWeights {
    /// Reads a checkpoint and checks every shape against its config and
    /// the target (hidden size, vocabulary).
    pub fn load(path: &Path, target: &ModelConfig) -> Result<Self> {
        let (weights_path, config_path) = checkpoint_files(path);
        let bad = |reason: String| EngineError::Config(format!("draft head {}: {reason}", path.display()));
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| bad(format!("cannot read {}: {e}", config_path.display())))?;
        let config: HeadConfig =
            serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", config_path.display())))?;
        let raw = candle_core::safetensors::load(&weights_path, &Device::Cpu)
            .map_err(|e| bad(format!("cannot read {}: {e}", weights_path.display())))?;
        if raw.keys().any(|k| k.starts_with("midlayer.")) {
            return Err(bad(
                "an EAGLE-3 checkpoint (`midlayer.*`: fused low/middle/high-layer features); \
                 only EAGLE / EAGLE-2 heads on the final feature are supported"
                    .into(),
            ));
        }
        let mut tensors = HashMap::new();
        for (name, t) in raw {
            let t = if name == D2T {
                t.to_dtype(DType::I64)?
            } else {
                t.to_dtype(DType::F32)?
            };
            tensors.insert(name, t);
        }
        let weights = HeadWeights { config, tensors };
        weights.check(target).map_err(bad)?;
        Ok(weights)
    }

    /// Writes `model.safetensors` (matrices as f16, `d2t` as i64) and
    /// `config.json` into directory `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| EngineError::Config(format!("cannot create {}: {e}", dir.display())))?;
        let mut out = HashMap::new();
        for (name, t) in &self.tensors {
            let t = if name == D2T {
                t.clone()
            } else {
                t.to_dtype(DType::F16)?
            };
            out.insert(name.clone(), t);
        }
        candle_core::safetensors::save(&out, dir.join("model.safetensors"))?;
        let json = serde_json::to_string_pretty(&self.config).expect("a head config serialises");
        std::fs::write(dir.join("config.json"), json + "\n")
            .map_err(|e| EngineError::Config(format!("cannot write {}: {e}", dir.display())))?;
        Ok(())
    }

    fn dims(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }

    /// Every expected tensor is present with the expected shape.
    pub fn check(&self, target: &ModelConfig) -> std::result::Result<(), String> {
        let c = &self.config;
        let h = c.hidden_size;
        if h != target.hidden_size {
            return Err(format!(
                "hidden size {h}, the target's is {} (a head for another model)",
                target.hidden_size
            ));
        }
        if c.vocab_size != target.vocab_size {
            return Err(format!(
                "vocabulary of {} tokens, the target's has {} (a head for another model)",
                c.vocab_size, target.vocab_size
            ));
        }
        if c.num_attention_heads == 0
            || c.num_key_value_heads == 0
            || c.num_attention_heads % c.num_key_value_heads != 0
        {
            return Err(format!(
                "{} attention heads over {} key/value heads",
                c.num_attention_heads, c.num_key_value_heads
            ));
        }
        let (q, kv, ff) = (
            c.num_attention_heads * c.head_dim(),
            c.num_key_value_heads * c.head_dim(),
            c.intermediate_size,
        );
        let mut expected: Vec<(&str, Vec<usize>)> = vec![
            (FC, vec![h, 2 * h]),
            (LAYER_MATRICES[0], vec![q, h]),
            (LAYER_MATRICES[1], vec![kv, h]),
            (LAYER_MATRICES[2], vec![kv, h]),
            (LAYER_MATRICES[3], vec![h, q]),
            (LAYER_MATRICES[4], vec![ff, h]),
            (LAYER_MATRICES[5], vec![ff, h]),
            (LAYER_MATRICES[6], vec![h, ff]),
            (POST_NORM, vec![h]),
        ];
        for optional in [FC_BIAS, INPUT_NORM, OUTPUT_NORM] {
            if self.tensors.contains_key(optional) {
                expected.push((optional, vec![h]));
            }
        }
        if let Some(dims) = self.dims("embed_tokens.weight") {
            if dims.first() != Some(&target.vocab_size) {
                return Err(format!(
                    "`embed_tokens.weight` has {} rows, the target's vocabulary {} (a head for another model)",
                    dims.first().copied().unwrap_or(0),
                    target.vocab_size
                ));
            }
        }
        match (self.dims(LM_HEAD), c.draft_vocab_size) {
            (Some(_), Some(dv)) => {
                expected.push((LM_HEAD, vec![dv, h]));
                expected.push((D2T, vec![dv]));
            }
            (None, None) => {}
            (Some(_), None) => return Err("`lm_head.weight` without `draft_vocab_size` in config.json".into()),
            (None, Some(_)) => return Err("`draft_vocab_size` in config.json but no `lm_head.weight`".into()),
        }
        for (name, shape) in expected {
            match self.dims(name) {
                None => return Err(format!("tensor `{name}` is missing")),
                Some(d) if d != shape => return Err(format!("tensor `{name}` has shape {d:?}, expected {shape:?}")),
                Some(_) => {}
            }
        }
        if c.draft_vocab_size.is_some() {
            let map = self.draft_to_target().map_err(|e| e.to_string())?;
            if let Some(&t) = map.iter().find(|&&t| t as usize >= target.vocab_size) {
                return Err(format!(
                    "`d2t` maps a draft token to id {t}, outside the target's vocabulary of {}",
                    target.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// Target id of each draft id (empty: the full vocabulary).
    pub fn draft_to_target(&self) -> Result<Vec<u32>> {
        let Some(d2t) = self.tensors.get(D2T) else {
            return Ok(Vec::new());
        };
        Ok(d2t
            .to_vec1::<i64>()?
            .iter()
            .enumerate()
            .map(|(i, &off)| (i as i64 + off).clamp(0, u32::MAX as i64) as u32)
            .collect())
    }

    /// `d2t` offsets for a sub-vocabulary given as target ids.
    pub fn d2t_tensor(sub_vocab: &[u32]) -> Result<Tensor> {
        let offsets: Vec<i64> = sub_vocab
            .iter()
            .enumerate()
            .map(|(i, &t)| t as i64 - i as i64)
            .collect();
        Ok(Tensor::new(offsets, &Device::Cpu)?)
    }
}

/// Rows of a `(heads * head_dim, in)` matrix from Hugging Face's half-split
/// RoPE order to adjacent pairs: row `2i` of a head is row `i`, row `2i+1`
/// is row `head_dim/2 + i` (the GGUF converter's permutation).
pub fn half_split_to_interleaved(w: &[f32], num_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..num_heads {
        for i in 0..half {
            for (dst, src) in [(2 * i, i), (2 * i + 1, half + i)] {
                let (d, s) = ((h * head_dim + dst) * cols, (h * head_dim + src) * cols);
                out[d..d + cols].copy_from_slice(&w[s..s + cols]);
            }
        }
    }
    out
}

/// A loaded head, ready to draft.
pub struct DraftHead {
    config: HeadConfig,
    layer_config: ModelConfig,
    fc: Linear,
    fc_bias: Option<Vec<f32>>,
    layer: Layer,
    output_norm: Option<Vec<f32>>,
    /// `None`: the target's output layer.
    lm_head: Option<Linear>,
    draft_to_target: Vec<u32>,
}

impl DraftHead {
    pub fn load(path: &Path, target: &ModelConfig, format: WeightFormat) -> Result<Self> {
        Self::new(&HeadWeights::load(path, target)?, target, format)
    }

    pub fn new(weights: &HeadWeights, target: &ModelConfig, format: WeightFormat) -> Result<Self> {
        weights
            .check(target)
            .map_err(|e| EngineError::Config(format!("draft head: {e}")))?;
        let c = &weights.config;
        let layer_config = c.layer_config(target);
        let get = |name: &str| -> Result<Tensor> { Ok(weights.tensors[name].clone()) };
        let vector = |name: &str| -> Result<Option<Vec<f32>>> {
            weights.tensors.get(name).map(|t| Ok(t.to_vec1::<f32>()?)).transpose()
        };
        // `Native` keeps the head's matrices at 4 bits (Q4_0 blocks; half the
        // bytes a few-row forward streams), `Q8_0` at 8.
        let matrix = |t: Tensor| -> Result<QTensor> {
            let four_bit = format == WeightFormat::Native && t.dim(1)? % GgmlDType::Q4_0.block_size() == 0;
            Ok(QTensor::quantize(
                &t,
                if four_bit { GgmlDType::Q4_0 } else { GgmlDType::F32 },
            )?)
        };
        let rope_rows = |name: &str, heads: usize| -> Result<QTensor> {
            let t = get(name)?;
            let (rows, cols) = t.dims2()?;
            let w = half_split_to_interleaved(&t.flatten_all()?.to_vec1::<f32>()?, heads, c.head_dim(), cols);
            matrix(Tensor::from_vec(w, (rows, cols), &Device::Cpu)?)
        };
        let parts = [
            rope_rows(LAYER_MATRICES[0], c.num_attention_heads)?,
            rope_rows(LAYER_MATRICES[1], c.num_key_value_heads)?,
            matrix(get(LAYER_MATRICES[2])?)?,
            matrix(get(LAYER_MATRICES[3])?)?,
            matrix(get(LAYER_MATRICES[4])?)?,
            matrix(get(LAYER_MATRICES[5])?)?,
            matrix(get(LAYER_MATRICES[6])?)?,
        ];
        let post_norm = vector(POST_NORM)?.expect("checked");
        Ok(DraftHead {
            fc: Linear::new(matrix(get(FC)?)?, format)?,
            fc_bias: vector(FC_BIAS)?,
            layer: Layer::from_parts(vector(INPUT_NORM)?, post_norm, parts, format)?,
            output_norm: vector(OUTPUT_NORM)?,
            lm_head: weights
                .tensors
                .get(LM_HEAD)
                .map(|t| Linear::new(matrix(t.clone())?, format))
                .transpose()?,
            draft_to_target: weights.draft_to_target()?,
            config: c.clone(),
            layer_config,
        })
    }

    pub fn config(&self) -> &HeadConfig {
        &self.config
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Floats of K (and of V) per token of the head's KV.
    pub fn kv_size(&self) -> usize {
        self.layer_config.kv_size()
    }

    /// Bytes per KV block: the head's K/V and the target feature of each slot.
    pub fn bytes_per_block(&self, block_size: usize) -> usize {
        (2 * self.kv_size() + self.hidden_size()) * block_size * std::mem::size_of::<f32>()
    }

    /// Target id of an output row's column.
    pub fn target_token(&self, column: u32) -> u32 {
        if self.draft_to_target.is_empty() {
            column
        } else {
            self.draft_to_target[column as usize]
        }
    }

    /// Runs the head on `batch` (tokens are target ids) whose row `i` reads
    /// feature row `i` of `features` `(tokens, hidden)`. Writes the head's
    /// K/V and returns, for the logits rows, the output logits (over the
    /// draft vocabulary) and the predicted features.
    pub fn forward(
        &self,
        target: &Model,
        batch: &RaggedBatch,
        features: &[f32],
        kv: &mut KvStorage,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let layout = kv.layout();
        for seq in &batch.seqs {
            seq.validate(layout.block_size, layout.num_slots(), self.layer_config.vocab_size)?;
        }
        let n = batch.num_tokens();
        let h = self.hidden_size();
        if features.len() != n * h {
            return Err(EngineError::Config(format!(
                "{n} tokens but {} feature values",
                features.len()
            )));
        }
        if n == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let embedded = target.embed(batch.seqs.iter().flat_map(|s| s.token_ids.iter().copied()));
        let mut input = Vec::with_capacity(n * 2 * h);
        for t in 0..n {
            input.extend_from_slice(&embedded[t * h..(t + 1) * h]);
            input.extend_from_slice(&features[t * h..(t + 1) * h]);
        }
        let mut x = self.fc.apply(&input, n)?;
        if let Some(bias) = &self.fc_bias {
            for row in x.chunks_exact_mut(h) {
                for (a, b) in row.iter_mut().zip(bias) {
                    *a += b;
                }
            }
        }
        let ctx = ForwardContext::new(batch, &self.layer_config, layout.block_size);
        self.layer.forward(&mut x, &ctx, batch, kv, 0)?;
        let mut hidden = Vec::with_capacity(batch.num_logits_rows() * h);
        for r in ctx.logits_token_rows(batch) {
            hidden.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let rows = hidden.len() / h;
        let normed = match &self.output_norm {
            Some(w) => {
                let mut out = vec![0.0; hidden.len()];
                rms_norm_rows(&hidden, w, self.config.rms_norm_eps, &mut out);
                out
            }
            None => hidden.clone(),
        };
        let logits = match &self.lm_head {
            Some(l) if rows > 0 => l.apply(&normed, rows)?,
            Some(_) => Vec::new(),
            None => target.logits_from_features(&normed)?,
        };
        Ok((logits, hidden))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::train::{frequent_tokens, HeadParams};
    use crate::testing::{tiny_config, tiny_model, tiny_training_data};

    fn saved_head(dir: &Path) -> HeadWeights {
        let target = tiny_model(5).unwrap();
        let (sub, _) = frequent_tokens(&tiny_training_data(5).unwrap(), 48, 64);
        let w = HeadParams::init(&target, sub, 3, DType::F32)
            .unwrap()
            .weights()
            .unwrap();
        w.save(dir).unwrap();
        w
    }

    #[test]
    fn the_sub_vocabulary_map_round_trips() {
        let sub: Vec<u32> = vec![7, 3, 63, 0, 12];
        let mut tensors = HashMap::new();
        tensors.insert(D2T.to_string(), HeadWeights::d2t_tensor(&sub).unwrap());
        let w = HeadWeights {
            config: HeadParams::init(&tiny_model(5).unwrap(), sub.clone(), 1, DType::F32)
                .unwrap()
                .config,
            tensors,
        };
        assert_eq!(w.draft_to_target().unwrap(), sub);
        // Through a checkpoint on disk, and into a loaded head's output map.
        let dir = std::env::temp_dir().join(format!("heterospec-head-{}", std::process::id()));
        let saved = saved_head(&dir);
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
        let dir = std::env::temp_dir().join(format!("heterospec-head-bad-{}", std::process::id()));
        let good = saved_head(&dir);
        let err = |w: &HeadWeights| {
            w.save(&dir).unwrap();
            HeadWeights::load(&dir, &tiny_config()).unwrap_err().to_string()
        };
        let mut other_vocab = good.clone();
        other_vocab.config.vocab_size = 100;
        assert!(
            err(&other_vocab).contains("vocabulary of 100 tokens, the target's has 64"),
            "{}",
            err(&other_vocab)
        );
        let mut wrong_shape = good.clone();
        wrong_shape.tensors.insert(
            LAYER_MATRICES[1].into(),
            Tensor::zeros((7, 32), DType::F32, &Device::Cpu).unwrap(),
        );
        let e = err(&wrong_shape);
        assert!(
            e.contains("`layers.0.self_attn.k_proj.weight` has shape [7, 32], expected [16, 32]"),
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
        let mut eagle3 = good.clone();
        eagle3.tensors.insert(
            "midlayer.self_attn.q_proj.weight".into(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(err(&eagle3).contains("EAGLE-3"));
        let mut target = tiny_config();
        target.hidden_size = 64;
        good.save(&dir).unwrap();
        let e = HeadWeights::load(&dir, &target).unwrap_err().to_string();
        assert!(e.contains("hidden size 32, the target's is 64"), "{e}");
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
}
