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
//!
//! EAGLE-3 heads (`midlayer.*`) read the target's hidden states entering
//! three layers (low, middle, high; `eagle_config.eagle_aux_hidden_state_layer_ids`,
//! default 2, L/2, L-3), fused by `fc` `(h, 3h)` into the row's input `x`;
//! the layer's attention reads `[input_layernorm(embed) | hidden_norm(x)]`
//! (`q/k/v_proj` take `2h` columns) and adds to `x`. Deeper tree nodes feed
//! the head its own output in place of `x`. `t2d` (a boolean map) is not
//! needed and not read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv::KvStorage;
use crate::model::{FeatureTap, ForwardContext, Layer, Linear, Model, WeightFormat};
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
    /// EAGLE-3: which target layers' input states are fused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eagle_config: Option<EagleConfig>,
    /// The same, where some checkpoints put it (read when `eagle_config`
    /// has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eagle_aux_hidden_state_layer_ids: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    /// Variants of the EAGLE-3 layer this engine does not run (refused
    /// when set rather than computed wrongly).
    #[serde(default, skip_serializing)]
    pub norm_before_residual: bool,
    #[serde(default, skip_serializing)]
    pub norm_before_fc: bool,
}

/// The `eagle_config` block of EAGLE-3 checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EagleConfig {
    #[serde(default)]
    pub eagle_aux_hidden_state_layer_ids: Option<Vec<usize>>,
}

/// The two head designs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// EAGLE / EAGLE-2: the final feature, `fc([embed | feature])`.
    Eagle,
    /// EAGLE-3: low, middle and high-layer states fused by `fc`; the
    /// layer's attention reads `[embed | x]`.
    Eagle3,
}

impl HeadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HeadKind::Eagle => "eagle",
            HeadKind::Eagle3 => "eagle3",
        }
    }

    /// Tensor names of the decoder layer's matrices, in [`Layer::from_parts`] order.
    pub fn layer_matrices(self) -> [&'static str; 7] {
        match self {
            HeadKind::Eagle => LAYER_MATRICES,
            HeadKind::Eagle3 => EAGLE3_LAYER_MATRICES,
        }
    }

    /// The target states a new head of this kind reads, for a target of
    /// `num_layers` (EAGLE-3: layers 2, L/2 and L-3).
    pub fn default_tap(self, num_layers: usize) -> FeatureTap {
        match self {
            HeadKind::Eagle => FeatureTap::Final,
            HeadKind::Eagle3 => FeatureTap::eagle3_default(num_layers),
        }
    }

    pub fn post_norm(self) -> &'static str {
        match self {
            HeadKind::Eagle => POST_NORM,
            HeadKind::Eagle3 => EAGLE3_POST_NORM,
        }
    }
}

impl std::str::FromStr for HeadKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "eagle" => Ok(HeadKind::Eagle),
            "eagle3" => Ok(HeadKind::Eagle3),
            other => Err(format!("unknown head kind `{other}` (eagle, eagle3)")),
        }
    }
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
/// EAGLE-3's names for the same matrices.
pub const EAGLE3_LAYER_MATRICES: [&str; 7] = [
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
];
pub const EAGLE3_INPUT_NORM: &str = "midlayer.input_layernorm.weight";
pub const EAGLE3_HIDDEN_NORM: &str = "midlayer.hidden_norm.weight";
pub const EAGLE3_POST_NORM: &str = "midlayer.post_attention_layernorm.weight";
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
        let bytes =
            std::fs::read(&weights_path).map_err(|e| bad(format!("cannot read {}: {e}", weights_path.display())))?;
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("{}: {e}", weights_path.display())))?;
        let mut tensors = HashMap::new();
        for (name, view) in file.tensors() {
            if name == "t2d" {
                continue; // EAGLE-3's boolean target-to-draft map: not needed
            }
            use candle_core::safetensors::Load;
            let t = view
                .load(&Device::Cpu)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
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

    /// EAGLE-3 when the file has `midlayer.*` tensors.
    pub fn kind(&self) -> HeadKind {
        if self.tensors.keys().any(|k| k.starts_with("midlayer.")) {
            HeadKind::Eagle3
        } else {
            HeadKind::Eagle
        }
    }

    /// The target states the head reads, for a target of `num_layers`.
    pub fn feature_tap(&self, num_layers: usize) -> FeatureTap {
        let kind = self.kind();
        // EAGLE-3 layer ids as vLLM reads them: the states entering layer
        // i, gathered in ascending layer order.
        let ids = self
            .config
            .eagle_config
            .as_ref()
            .and_then(|e| e.eagle_aux_hidden_state_layer_ids.clone())
            .or_else(|| self.config.eagle_aux_hidden_state_layer_ids.clone());
        match ids {
            Some(mut ids) if kind == HeadKind::Eagle3 => {
                ids.sort_unstable();
                FeatureTap::Layers(ids)
            }
            _ => kind.default_tap(num_layers),
        }
    }

    /// Every expected tensor is present with the expected shape.
    pub fn check(&self, target: &ModelConfig) -> std::result::Result<(), String> {
        let c = &self.config;
        let kind = self.kind();
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
        let tap = self.feature_tap(target.num_layers);
        let taps = match &tap {
            FeatureTap::Final => 1,
            FeatureTap::Layers(l) => {
                if l.is_empty() || l.iter().any(|&i| i > target.num_layers) {
                    return Err(format!(
                        "feature layers {l:?}, the target has {} layers",
                        target.num_layers
                    ));
                }
                l.len()
            }
        };
        let (fc_in, attn_in) = match kind {
            HeadKind::Eagle => (2 * h, h),
            HeadKind::Eagle3 => (taps * h, 2 * h),
        };
        let m = kind.layer_matrices();
        let mut expected: Vec<(&str, Vec<usize>)> = vec![
            (FC, vec![h, fc_in]),
            (m[0], vec![q, attn_in]),
            (m[1], vec![kv, attn_in]),
            (m[2], vec![kv, attn_in]),
            (m[3], vec![h, q]),
            (m[4], vec![ff, h]),
            (m[5], vec![ff, h]),
            (m[6], vec![h, ff]),
            (kind.post_norm(), vec![h]),
        ];
        if kind == HeadKind::Eagle3 {
            if c.norm_before_residual || c.norm_before_fc {
                return Err("an EAGLE-3 variant with `norm_before_residual` or `norm_before_fc`, \
                            which this engine does not run"
                    .into());
            }
            expected.push((EAGLE3_INPUT_NORM, vec![h]));
            expected.push((EAGLE3_HIDDEN_NORM, vec![h]));
            expected.push((OUTPUT_NORM, vec![h]));
        }
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
        // An output layer over a sub-vocabulary needs `d2t`; one over the
        // whole vocabulary does not.
        let dv = c.draft_vocab_size.unwrap_or(c.vocab_size);
        match self.dims(LM_HEAD) {
            Some(_) => {
                expected.push((LM_HEAD, vec![dv, h]));
                if dv != c.vocab_size || self.tensors.contains_key(D2T) {
                    expected.push((D2T, vec![dv]));
                }
            }
            None if kind == HeadKind::Eagle3 => expected.push((LM_HEAD, vec![dv, h])),
            None if c.draft_vocab_size.is_some() => {
                return Err("`draft_vocab_size` in config.json but no `lm_head.weight`".into())
            }
            None => {}
        }
        for (name, shape) in expected {
            match self.dims(name) {
                None => return Err(format!("tensor `{name}` is missing")),
                Some(d) if d != shape => return Err(format!("tensor `{name}` has shape {d:?}, expected {shape:?}")),
                Some(_) => {}
            }
        }
        let map = self.draft_to_target().map_err(|e| e.to_string())?;
        if let Some(&t) = map.iter().find(|&&t| t as usize >= target.vocab_size) {
            return Err(format!(
                "`d2t` maps a draft token to id {t}, outside the target's vocabulary of {}",
                target.vocab_size
            ));
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

/// Row `t` of the result is row `t` of `a` then row `t` of `b`, both
/// `(rows, width)`.
fn concat_rows(a: &[f32], b: &[f32], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    for (ra, rb) in a.chunks_exact(width).zip(b.chunks_exact(width)) {
        out.extend_from_slice(ra);
        out.extend_from_slice(rb);
    }
    out
}

/// A loaded head, ready to draft.
pub struct DraftHead {
    config: HeadConfig,
    tap: FeatureTap,
    /// EAGLE-3 (`None`: EAGLE): `input_layernorm` of the embedding and
    /// `hidden_norm` of `x`, before attention.
    eagle3_norms: Option<(Vec<f32>, Vec<f32>)>,
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
        let kind = weights.kind();
        let m = kind.layer_matrices();
        let parts = [
            rope_rows(m[0], c.num_attention_heads)?,
            rope_rows(m[1], c.num_key_value_heads)?,
            matrix(get(m[2])?)?,
            matrix(get(m[3])?)?,
            matrix(get(m[4])?)?,
            matrix(get(m[5])?)?,
            matrix(get(m[6])?)?,
        ];
        let post_norm = vector(kind.post_norm())?.expect("checked");
        let (attn_norm, eagle3_norms) = match kind {
            HeadKind::Eagle => (vector(INPUT_NORM)?, None),
            HeadKind::Eagle3 => (
                None,
                Some((
                    vector(EAGLE3_INPUT_NORM)?.expect("checked"),
                    vector(EAGLE3_HIDDEN_NORM)?.expect("checked"),
                )),
            ),
        };
        // EAGLE-3's fc reads raw residual streams, whose outliers would
        // swamp 8-bit activation blocks: it stays f32 (it runs once per
        // committed token).
        let fc = match kind {
            HeadKind::Eagle => Linear::new(matrix(get(FC)?)?, format)?,
            HeadKind::Eagle3 => Linear::new(QTensor::quantize(&get(FC)?, GgmlDType::F32)?, WeightFormat::F32)?,
        };
        Ok(DraftHead {
            fc,
            fc_bias: vector(FC_BIAS)?,
            layer: Layer::from_parts(attn_norm, post_norm, parts, format)?,
            output_norm: vector(OUTPUT_NORM)?,
            lm_head: weights
                .tensors
                .get(LM_HEAD)
                .map(|t| Linear::new(matrix(t.clone())?, format))
                .transpose()?,
            draft_to_target: weights.draft_to_target()?,
            tap: weights.feature_tap(target.num_layers),
            eagle3_norms,
            config: c.clone(),
            layer_config,
        })
    }

    pub fn kind(&self) -> HeadKind {
        match self.eagle3_norms {
            Some(_) => HeadKind::Eagle3,
            None => HeadKind::Eagle,
        }
    }

    /// The target states this head reads.
    pub fn feature_tap(&self) -> &FeatureTap {
        &self.tap
    }

    /// `fc` (and its bias) on `rows` of `input`.
    fn fc(&self, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut x = self.fc.apply(input, rows)?;
        if let Some(bias) = &self.fc_bias {
            for row in x.chunks_exact_mut(self.hidden_size()) {
                for (a, b) in row.iter_mut().zip(bias) {
                    *a += b;
                }
            }
        }
        Ok(x)
    }

    /// The per-token input the head keeps for the target's states of its
    /// tap, `(tokens, tap width)`: the final feature itself (EAGLE), or the
    /// fused `fc` of the three layers' states (EAGLE-3). `(tokens, hidden)`.
    pub fn input_features(&self, target_states: &[f32]) -> Result<Vec<f32>> {
        if target_states.is_empty() {
            return Ok(Vec::new());
        }
        match self.kind() {
            HeadKind::Eagle => Ok(target_states.to_vec()),
            HeadKind::Eagle3 => {
                let width = self.tap.width(self.hidden_size());
                self.fc(target_states, target_states.len() / width)
            }
        }
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
    /// row `i` of `features` `(tokens, hidden)`: an [`DraftHead::input_features`]
    /// row or the head's own output for a deeper node. Writes the head's
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
        let ctx = ForwardContext::new(batch, &self.layer_config, layout.block_size);
        let mut x;
        match &self.eagle3_norms {
            None => {
                x = self.fc(&concat_rows(&embedded, features, h), n)?;
                self.layer.forward(&mut x, &ctx, batch, kv, 0)?;
            }
            Some((input_norm, hidden_norm)) => {
                let eps = self.config.rms_norm_eps;
                let (mut e, mut f) = (vec![0.0; n * h], vec![0.0; n * h]);
                rms_norm_rows(&embedded, input_norm, eps, &mut e);
                rms_norm_rows(features, hidden_norm, eps, &mut f);
                x = features.to_vec();
                self.layer
                    .forward_from(&mut x, Some(&concat_rows(&e, &f, h)), &ctx, batch, kv, 0)?;
            }
        }
        let mut hidden = Vec::with_capacity(batch.num_logits_rows() * h);
        for r in batch.logits_token_rows() {
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

    fn saved_head(dir: &Path, kind: HeadKind) -> HeadWeights {
        let target = tiny_model(5).unwrap();
        let (sub, _) = frequent_tokens(&tiny_training_data(5, &FeatureTap::Final).unwrap(), 48, 64);
        let w = HeadParams::init(&target, sub, 3, DType::F32, kind)
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
            config: HeadParams::init(&tiny_model(5).unwrap(), sub.clone(), 1, DType::F32, HeadKind::Eagle)
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
            let dir =
                std::env::temp_dir().join(format!("heterospec-head-bad-{}-{}", kind.as_str(), std::process::id()));
            let good = saved_head(&dir, kind);
            assert_eq!(HeadWeights::load(&dir, &tiny_config()).unwrap().kind(), kind);
            let err = |w: &HeadWeights| {
                w.save(&dir).unwrap();
                HeadWeights::load(&dir, &tiny_config()).unwrap_err().to_string()
            };
            let mut other_vocab = good.clone();
            other_vocab.config.vocab_size = 100;
            let e = err(&other_vocab);
            assert!(e.contains("vocabulary of 100 tokens, the target's has 64"), "{e}");
            let k_proj = kind.layer_matrices()[1];
            let mut wrong_shape = good.clone();
            wrong_shape
                .tensors
                .insert(k_proj.into(), Tensor::zeros((7, 32), DType::F32, &Device::Cpu).unwrap());
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
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
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
}
