//! A draft head's checkpoint: its `config.json` (`HeadConfig`), the two
//! layouts it may come in (`HeadKind`: EAGLE `layers.{i}.*`, EAGLE-3
//! `midlayer.*`), the tensor names of each, and its weights as read from
//! safetensors (`HeadWeights`), checked against the target before use.
//!
//! Invariant: a `HeadWeights` that passed `check` has every tensor the
//! engine's head reads, with the shapes the target implies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::backend::FeatureTap;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

/// `config.json` of a head (Hugging Face names; unknown keys ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Decoder layers (EAGLE heads; EAGLE-3 heads have one).
    #[serde(default = "one_layer")]
    pub num_hidden_layers: usize,
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

fn one_layer() -> usize {
    1
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

    /// Tensor names of decoder layer `layer` (EAGLE: `layers.{layer}.*`;
    /// EAGLE-3's one layer: `midlayer.*`).
    pub fn layer_names(self, layer: usize) -> LayerNames {
        debug_assert!(self == HeadKind::Eagle || layer == 0, "EAGLE-3 heads have one layer");
        let prefix = match self {
            HeadKind::Eagle => format!("layers.{layer}"),
            HeadKind::Eagle3 => "midlayer".to_string(),
        };
        LayerNames {
            matrices: LAYER_MATRIX_SUFFIXES.map(|m| format!("{prefix}.{m}.weight")),
            input_norm: format!("{prefix}.input_layernorm.weight"),
            post_norm: format!("{prefix}.post_attention_layernorm.weight"),
        }
    }

    /// Whether a head of this kind may have `layers` decoder layers (the
    /// reason when not).
    pub fn check_layers(self, layers: usize) -> std::result::Result<(), String> {
        if layers == 0 || (self == HeadKind::Eagle3 && layers != 1) {
            return Err("an EAGLE head has at least one layer, an EAGLE-3 head exactly one".into());
        }
        Ok(())
    }

    /// The target states a new head of this kind reads, for a target of
    /// `num_layers` (EAGLE-3: layers 2, L/2 and L-3).
    pub fn default_tap(self, num_layers: usize) -> FeatureTap {
        match self {
            HeadKind::Eagle => FeatureTap::Final,
            HeadKind::Eagle3 => FeatureTap::eagle3_default(num_layers),
        }
    }
}

/// Tensor names of one decoder layer of a head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerNames {
    /// `[q, k, v, o, gate, up, down]`, in [`Layer::from_parts`] order.
    pub matrices: [String; 7],
    /// Before attention: optional on an EAGLE head's first layer (whose
    /// input is `fc`'s output), required on later ones; EAGLE-3's norm of
    /// the embedding half.
    pub input_norm: String,
    pub post_norm: String,
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

    /// `(rows, columns)` of decoder layer `layer`'s matrices, in
    /// [`LayerNames::matrices`] order: the first layer's attention reads
    /// `first_in` columns, later layers the hidden size.
    pub fn layer_shapes(&self, layer: usize, first_in: usize) -> [(usize, usize); 7] {
        let (h, ff) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim(),
            self.num_key_value_heads * self.head_dim(),
        );
        let attn_in = if layer == 0 { first_in } else { h };
        [
            (q, attn_in),
            (kv, attn_in),
            (kv, attn_in),
            (h, q),
            (ff, h),
            (ff, h),
            (h, ff),
        ]
    }

    /// The head as a model config over the target's vocabulary.
    pub fn layer_config(&self, target: &ModelConfig) -> ModelConfig {
        ModelConfig {
            num_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim(),
            vocab_size: target.vocab_size,
            max_context: target.max_context,
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            block: Default::default(),
            rope_freq_factors: None,
            sliding_window: None,
            attn_scale_dim: self.head_dim(),
        }
    }
}

/// A decoder layer's matrices after its prefix, in [`Layer::from_parts`] order.
const LAYER_MATRIX_SUFFIXES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];
pub const EAGLE3_INPUT_NORM: &str = "midlayer.input_layernorm.weight";
pub const EAGLE3_HIDDEN_NORM: &str = "midlayer.hidden_norm.weight";
pub const FC: &str = "fc.weight";
pub const FC_BIAS: &str = "fc.bias";
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
        let layers = c.num_hidden_layers;
        kind.check_layers(layers)
            .map_err(|e| format!("`num_hidden_layers` {layers}: {e}"))?;
        // Tensors of layers the config does not have (EAGLE-3: any `layers.*`).
        let has = if kind == HeadKind::Eagle { layers } else { 0 };
        let beyond = self
            .tensors
            .keys()
            .filter_map(|k| Some((k.strip_prefix("layers.")?.split('.').next()?.parse::<usize>().ok()?, k)))
            .filter(|&(i, _)| i >= has)
            .min();
        if let Some((_, extra)) = beyond {
            return Err(format!(
                "tensor `{extra}` but `num_hidden_layers` is {layers} in config.json"
            ));
        }
        let mut expected: Vec<(String, Vec<usize>)> = vec![(FC.into(), vec![h, fc_in])];
        for layer in 0..layers {
            let names = kind.layer_names(layer);
            let shapes = c.layer_shapes(layer, attn_in);
            expected.extend(
                names
                    .matrices
                    .iter()
                    .zip(shapes)
                    .map(|(name, (rows, cols))| (name.clone(), vec![rows, cols])),
            );
            expected.push((names.post_norm.clone(), vec![h]));
            // EAGLE's first layer reads `fc`'s output as it is (its input
            // norm is optional); later layers norm the residual stream.
            if layer > 0 || kind == HeadKind::Eagle3 || self.tensors.contains_key(&names.input_norm) {
                expected.push((names.input_norm, vec![h]));
            }
        }
        if kind == HeadKind::Eagle3 {
            if c.norm_before_residual || c.norm_before_fc {
                return Err("an EAGLE-3 variant with `norm_before_residual` or `norm_before_fc`, \
                            which this engine does not run"
                    .into());
            }
            expected.push((EAGLE3_HIDDEN_NORM.into(), vec![h]));
            expected.push((OUTPUT_NORM.into(), vec![h]));
        }
        for optional in [FC_BIAS, OUTPUT_NORM] {
            if self.tensors.contains_key(optional) {
                expected.push((optional.into(), vec![h]));
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
                expected.push((LM_HEAD.into(), vec![dv, h]));
                if dv != c.vocab_size || self.tensors.contains_key(D2T) {
                    expected.push((D2T.into(), vec![dv]));
                }
            }
            None if kind == HeadKind::Eagle3 => expected.push((LM_HEAD.into(), vec![dv, h])),
            None if c.draft_vocab_size.is_some() => {
                return Err("`draft_vocab_size` in config.json but no `lm_head.weight`".into())
            }
            None => {}
        }
        for (name, shape) in expected {
            match self.dims(&name) {
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
