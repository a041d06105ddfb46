//! Model hyperparameters, read from GGUF metadata (`<arch>.*` keys), and
//! what each supported architecture changes in the llama block, as data
//! ([`BlockSpec`]) the one layer implementation reads.
//!
//! Invariant: a file is accepted only when every key and tensor it sets
//! that changes the forward is one the engine runs exactly; anything else
//! is refused with an error naming it.

use candle_core::quantized::gguf_file;

use crate::error::{EngineError, Result};

/// What an architecture changes in the llama block.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BlockSpec {
    /// Biases on the q, k and v projections (`blk.N.attn_{q,k,v}.bias`):
    /// Qwen2.
    pub qkv_bias: bool,
    /// RMSNorm over each head of q and k before RoPE
    /// (`blk.N.attn_{q,k}_norm.weight`): Qwen3.
    pub qk_norm: bool,
    /// RoPE rotates a head's two halves against each other (NeoX) rather
    /// than adjacent pairs (llama's GGUF order).
    pub rope_neox: bool,
    /// The embeddings are scaled by `sqrt(hidden)` on the way in: Gemma.
    pub embed_scale: bool,
    /// The MLP gates with GELU (tanh form) instead of SiLU: Gemma.
    pub gelu: bool,
    /// RMSNorms on the attention's and the MLP's outputs before each
    /// residual add (`blk.N.post_attention_norm`, `blk.N.post_ffw_norm`):
    /// Gemma 2/3.
    pub post_norms: bool,
    /// With a sliding window: every `global_every`-th layer (the last of
    /// each group) attends to the whole context, the others to the window.
    /// 0: every layer uses the window (Mistral).
    pub global_every: usize,
    /// RoPE base of the windowed layers, where it differs from
    /// `rope.freq_base` (Gemma 3: 10,000 locally, 1,000,000 globally).
    pub local_rope_theta: Option<f32>,
    /// The file's `attention.sliding_window` is run (Mistral's llama
    /// layout, Gemma 3); elsewhere it is refused (Qwen's files may carry
    /// one their model does not use).
    pub sliding_window: bool,
}

impl BlockSpec {
    /// The block of `general.architecture` = `arch`; `None` when the
    /// engine does not run it.
    pub fn of(arch: &str) -> Option<Self> {
        match arch {
            "llama" => Some(Self {
                sliding_window: true,
                ..Self::default()
            }),
            "qwen2" => Some(Self {
                qkv_bias: true,
                rope_neox: true,
                ..Self::default()
            }),
            "qwen3" => Some(Self {
                qk_norm: true,
                rope_neox: true,
                ..Self::default()
            }),
            "gemma3" => Some(Self {
                qk_norm: true,
                rope_neox: true,
                embed_scale: true,
                gelu: true,
                post_norms: true,
                global_every: 6,
                local_rope_theta: Some(10_000.0),
                sliding_window: true,
                ..Self::default()
            }),
            _ => None,
        }
    }

    /// The plain llama block (what the GPU path runs; whether a window
    /// key is read is not part of the block's arithmetic).
    pub fn is_llama(&self) -> bool {
        Self {
            sliding_window: false,
            ..*self
        } == Self::default()
    }
}

/// Shape of a llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_context: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub block: BlockSpec,
    /// Per-frequency RoPE divisors (`rope_freqs.weight`, `head_dim / 2`):
    /// Llama 3.1+'s long-context scaling.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Keys a windowed layer's token sees: those less than this many
    /// positions behind it, itself included (`attention.sliding_window`);
    /// which layers are windowed is `block.global_every`.
    pub sliding_window: Option<usize>,
    /// Attention scores are scaled by `1 / sqrt(attn_scale_dim)`: the head
    /// dimension, except where the architecture says otherwise (Gemma 3
    /// 27B: hidden / heads).
    pub attn_scale_dim: usize,
}

impl ModelConfig {
    /// The window of layer `layer`'s attention; `None`: the whole context.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let global = self.block.global_every > 0 && (layer + 1) % self.block.global_every == 0;
        self.sliding_window.filter(|_| !global)
    }

    /// The RoPE base of layer `layer`.
    pub fn layer_rope_theta(&self, layer: usize) -> f32 {
        match (self.layer_window(layer), self.block.local_rope_theta) {
            (Some(_), Some(local)) => local,
            _ => self.rope_theta,
        }
    }
}

/// Keys that change the forward in ways the engine does not run.
const UNSUPPORTED_KEYS: &[&str] = &[
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
    "attn_logit_softcapping",
    "final_logit_softcapping",
];

/// Largest head dimension the attention kernel's stack accumulator holds.
pub const MAX_HEAD_DIM: usize = 256;

impl ModelConfig {
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let arch = meta_str(content, "general.architecture")?;
        let Some(block) = BlockSpec::of(&arch) else {
            return Err(EngineError::UnsupportedArchitecture { architecture: arch });
        };
        for key in UNSUPPORTED_KEYS.iter().map(|k| format!("{arch}.{k}")) {
            let harmless = match content.metadata.get(&key) {
                None => true,
                // `none` scaling, or a factor of 1, changes nothing.
                Some(v) => v.to_string().is_ok_and(|s| s == "none") || v.to_f32().is_ok_and(|f| f == 1.0),
            };
            if !harmless {
                return Err(EngineError::Config(format!(
                    "the model sets `{key}`, which this engine does not run (it would give wrong logits)"
                )));
            }
        }
        let get = |key: &str| meta_usize(content, &format!("{arch}.{key}"));
        let hidden_size = get("embedding_length")?;
        let num_heads = get("attention.head_count")?;
        let num_kv_heads = get("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = get("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => {
                return Err(EngineError::BadTensor {
                    name: "token_embd.weight".into(),
                    reason: "missing".into(),
                })
            }
        };
        // Partial rotary embeddings, or values wider than keys, are not run.
        for key in ["rope.dimension_count", "attention.value_length"] {
            if let Ok(n) = get(key) {
                if n != head_dim {
                    return Err(EngineError::Config(format!(
                        "the model sets `{arch}.{key}` = {n}, not the head dimension {head_dim}: not supported"
                    )));
                }
            }
        }
        let num_layers = get("block_count")?;
        let window_key = format!("{arch}.attention.sliding_window");
        let sliding_window = match content.metadata.contains_key(&window_key) {
            true if !block.sliding_window => {
                return Err(EngineError::Config(format!(
                "the model sets `{window_key}`, which this engine does not run for {arch} (it would give wrong logits)"
            )))
            }
            true => Some(get("attention.sliding_window")?).filter(|&w| w > 0),
            false => None,
        };
        if sliding_window.is_none() && block.global_every > 0 {
            return Err(EngineError::MissingMetadata {
                key: format!("{arch}.attention.sliding_window"),
            });
        }
        // As llama.cpp: Gemma 3 27B (62 layers) scales scores by its hidden
        // size per head, the others by the head dimension.
        let attn_scale_dim = match (arch.as_str(), num_layers) {
            ("gemma3", 62) => hidden_size / num_heads.max(1),
            _ => head_dim,
        };
        let config = ModelConfig {
            num_layers,
            hidden_size,
            intermediate_size: get("feed_forward_length")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            max_context: get("context_length")?,
            rope_theta: meta_f32(content, &format!("{arch}.rope.freq_base")).unwrap_or(10_000.0),
            rms_norm_eps: meta_f32(content, &format!("{arch}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            block,
            // Read with the tensors (`ModelTensors::read_gguf`).
            rope_freq_factors: None,
            sliding_window,
            attn_scale_dim,
        };
        config.validate()?;
        Ok(config)
    }

    /// Rejects shapes the forward cannot run.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(EngineError::Config(msg));
        if self.num_layers == 0 || self.hidden_size == 0 || self.num_heads == 0 || self.vocab_size == 0 {
            return fail(format!("degenerate model shape {self:?}"));
        }
        if self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0 {
            return fail(format!(
                "{} heads are not a multiple of {} kv heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.sliding_window == Some(0) || self.attn_scale_dim == 0 {
            return fail(format!("degenerate attention window or scale in {self:?}"));
        }
        if self.head_dim % 2 != 0 || self.head_dim > MAX_HEAD_DIM {
            return fail(format!(
                "head dimension {} must be even and at most {MAX_HEAD_DIM}",
                self.head_dim
            ));
        }
        Ok(())
    }

    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

fn meta<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| EngineError::MissingMetadata { key: key.to_string() })
}

pub(crate) fn meta_str(content: &gguf_file::Content, key: &str) -> Result<String> {
    meta(content, key)?
        .to_string()
        .cloned()
        .map_err(|_| EngineError::MissingMetadata { key: key.to_string() })
}

fn meta_usize(content: &gguf_file::Content, key: &str) -> Result<usize> {
    use gguf_file::Value::*;
    let v = meta(content, key)?;
    let n = match v {
        U8(v) => *v as u64,
        U16(v) => *v as u64,
        U32(v) => *v as u64,
        U64(v) => *v,
        I8(v) if *v >= 0 => *v as u64,
        I16(v) if *v >= 0 => *v as u64,
        I32(v) if *v >= 0 => *v as u64,
        I64(v) if *v >= 0 => *v as u64,
        _ => return Err(EngineError::MissingMetadata { key: key.to_string() }),
    };
    Ok(n as usize)
}

fn meta_f32(content: &gguf_file::Content, key: &str) -> Result<f32> {
    use gguf_file::Value::*;
    match meta(content, key)? {
        F32(v) => Ok(*v),
        F64(v) => Ok(*v as f32),
        _ => Err(EngineError::MissingMetadata { key: key.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_rope_bases_follow_the_block() {
        let mut c = crate::testing::tiny_config();
        c.num_layers = 12;
        assert!((0..12).all(|l| c.layer_window(l).is_none() && c.layer_rope_theta(l) == c.rope_theta));
        // Mistral: a window on every layer, one RoPE base.
        c.sliding_window = Some(4096);
        assert!((0..12).all(|l| c.layer_window(l) == Some(4096) && c.layer_rope_theta(l) == c.rope_theta));
        // Gemma 3: five windowed layers (base 10,000), then a global one.
        c.block = BlockSpec::of("gemma3").unwrap();
        c.rope_theta = 1e6;
        c.sliding_window = Some(512);
        let global: Vec<usize> = (0..12).filter(|&l| c.layer_window(l).is_none()).collect();
        assert_eq!(global, [5, 11]);
        assert_eq!(c.layer_rope_theta(0), 10_000.0);
        assert_eq!(c.layer_rope_theta(5), 1e6);
        assert!(!c.block.is_llama());
    }
}
