//! One description of a llama-family model's weights, shared by every
//! device that loads them: the tensors read from a GGUF file, each layer
//! tensor's GGUF name and shape (with the architecture's extra biases and
//! norms), the RoPE frequency factors, and the tied-output rule.
//!
//! Invariant: a backend loads a model only through these names and shapes,
//! so the CPU and the GPU can never disagree about which tensor is which.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::Device;

use crate::config::{BlockSpec, ModelConfig};
use crate::error::{EngineError, Result};

/// The token embedding matrix `(vocab, hidden)`.
pub const EMBEDDINGS: &str = "token_embd.weight";
/// The final norm `(hidden)`.
pub const OUTPUT_NORM: &str = "output_norm.weight";
/// The output layer `(vocab, hidden)`; absent when tied to the embeddings.
pub const OUTPUT: &str = "output.weight";
/// RoPE frequency factors `(head_dim / 2)`, where the model has them.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// The tensors of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerTensor {
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
    /// `BlockSpec::qkv_bias`.
    QBias,
    KBias,
    VBias,
    /// `BlockSpec::qk_norm`.
    QNorm,
    KNorm,
    /// `BlockSpec::post_norms`.
    PostAttnNorm,
    PostFfnNorm,
}

impl LayerTensor {
    /// The matrices in the order `Layer::from_parts` takes them.
    pub const MATRICES: [LayerTensor; 7] = [
        LayerTensor::Q,
        LayerTensor::K,
        LayerTensor::V,
        LayerTensor::O,
        LayerTensor::Gate,
        LayerTensor::Up,
        LayerTensor::Down,
    ];

    /// Every layer tensor some block has.
    pub const ALL: [LayerTensor; 16] = [
        LayerTensor::AttnNorm,
        LayerTensor::Q,
        LayerTensor::K,
        LayerTensor::V,
        LayerTensor::O,
        LayerTensor::FfnNorm,
        LayerTensor::Gate,
        LayerTensor::Up,
        LayerTensor::Down,
        LayerTensor::QBias,
        LayerTensor::KBias,
        LayerTensor::VBias,
        LayerTensor::QNorm,
        LayerTensor::KNorm,
        LayerTensor::PostAttnNorm,
        LayerTensor::PostFfnNorm,
    ];

    /// Whether `block`'s layers have this tensor.
    pub fn in_block(self, block: &BlockSpec) -> bool {
        match self {
            LayerTensor::QBias | LayerTensor::KBias | LayerTensor::VBias => block.qkv_bias,
            LayerTensor::QNorm | LayerTensor::KNorm => block.qk_norm,
            LayerTensor::PostAttnNorm | LayerTensor::PostFfnNorm => block.post_norms,
            _ => true,
        }
    }

    /// Its GGUF name in layer `layer`.
    pub fn name(self, layer: usize) -> String {
        let part = match self {
            LayerTensor::AttnNorm => "attn_norm",
            LayerTensor::Q => "attn_q",
            LayerTensor::K => "attn_k",
            LayerTensor::V => "attn_v",
            LayerTensor::O => "attn_output",
            LayerTensor::FfnNorm => "ffn_norm",
            LayerTensor::Gate => "ffn_gate",
            LayerTensor::Up => "ffn_up",
            LayerTensor::Down => "ffn_down",
            LayerTensor::QBias => return format!("blk.{layer}.attn_q.bias"),
            LayerTensor::KBias => return format!("blk.{layer}.attn_k.bias"),
            LayerTensor::VBias => return format!("blk.{layer}.attn_v.bias"),
            LayerTensor::QNorm => "attn_q_norm",
            LayerTensor::KNorm => "attn_k_norm",
            LayerTensor::PostAttnNorm => "post_attention_norm",
            LayerTensor::PostFfnNorm => "post_ffw_norm",
        };
        format!("blk.{layer}.{part}.weight")
    }

    /// Its shape, `(out, in)` for matrices.
    pub fn shape(self, c: &ModelConfig) -> Vec<usize> {
        let (h, q, kv, ff) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
        match self {
            LayerTensor::AttnNorm | LayerTensor::FfnNorm | LayerTensor::PostAttnNorm | LayerTensor::PostFfnNorm => {
                vec![h]
            }
            LayerTensor::Q => vec![q, h],
            LayerTensor::K | LayerTensor::V => vec![kv, h],
            LayerTensor::O => vec![h, q],
            LayerTensor::Gate | LayerTensor::Up => vec![ff, h],
            LayerTensor::Down => vec![h, ff],
            LayerTensor::QBias => vec![q],
            LayerTensor::KBias | LayerTensor::VBias => vec![kv],
            LayerTensor::QNorm | LayerTensor::KNorm => vec![c.head_dim],
        }
    }
}

/// Tensors by GGUF name plus the hyperparameters.
pub struct ModelTensors {
    pub config: ModelConfig,
    pub tensors: HashMap<String, QTensor>,
}

impl ModelTensors {
    /// Reads a GGUF file; checks architecture and metadata, not yet tensors.
    pub fn read_gguf(path: &Path) -> Result<(Self, gguf_file::Content)> {
        if !path.exists() {
            return Err(EngineError::ModelNotFound {
                path: path.to_path_buf(),
            });
        }
        let file = File::open(path).map_err(|source| EngineError::ModelRead {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |e: candle_core::Error| EngineError::InvalidGguf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(invalid)?;
        let config = ModelConfig::from_gguf(&content)?;
        let file_len = std::fs::metadata(path)
            .map_err(|source| EngineError::ModelRead {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let mut tensors = HashMap::new();
        for (name, info) in &content.tensor_infos {
            let size = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + size as u64;
            if end > file_len {
                return Err(EngineError::InvalidGguf {
                    path: path.to_path_buf(),
                    reason: format!("file is truncated: tensor `{name}` ends at byte {end} of {file_len}"),
                });
            }
            let tensor = content.tensor(&mut reader, name, &Device::Cpu).map_err(invalid)?;
            tensors.insert(name.clone(), tensor);
        }
        let mut t = ModelTensors { config, tensors };
        t.check_all_read()?;
        if t.tensors.contains_key(ROPE_FREQS) {
            t.config.rope_freq_factors = Some(t.get_f32(ROPE_FREQS, &[t.config.head_dim / 2])?);
        }
        Ok((t, content))
    }
}

impl ModelTensors {
    /// Refuses a tensor the forward would not read (a bias or norm of
    /// another block, RoPE factors outside a llama block): running without
    /// it would give wrong logits.
    pub fn check_all_read(&self) -> Result<()> {
        let c = &self.config;
        let mut read: HashSet<String> = [EMBEDDINGS, OUTPUT_NORM, OUTPUT].map(String::from).into();
        if c.block.is_llama() {
            read.insert(ROPE_FREQS.to_string());
        }
        for layer in 0..c.num_layers {
            read.extend(
                LayerTensor::ALL
                    .iter()
                    .filter(|p| p.in_block(&c.block))
                    .map(|p| p.name(layer)),
            );
        }
        match self.tensors.keys().filter(|k| !read.contains(*k)).min() {
            None => Ok(()),
            Some(name) => Err(EngineError::BadTensor {
                name: name.clone(),
                reason: format!(
                    "not part of the block this engine runs for this architecture ({:?})",
                    c.block
                ),
            }),
        }
    }

    /// Whether the output layer is the embedding matrix (no `output.weight`).
    pub fn tied_output(&self) -> bool {
        !self.tensors.contains_key(OUTPUT)
    }

    /// The name of the tensor the output layer uses (the tying rule).
    pub fn output_name(&self) -> &'static str {
        if self.tied_output() {
            EMBEDDINGS
        } else {
            OUTPUT
        }
    }

    /// The tensor `name`, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<&QTensor> {
        let tensor = self.tensors.get(name).ok_or_else(|| EngineError::BadTensor {
            name: name.to_string(),
            reason: "missing".into(),
        })?;
        if tensor.shape().dims() != shape {
            return Err(EngineError::BadTensor {
                name: name.to_string(),
                reason: format!("shape {:?}, expected {shape:?}", tensor.shape().dims()),
            });
        }
        Ok(tensor)
    }

    /// Removes the tensor `name`, checked to have `shape` (a loader that
    /// keeps its own copy takes it).
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<QTensor> {
        self.get(name, shape)?;
        Ok(self.tensors.remove(name).expect("checked above"))
    }

    /// [`ModelTensors::get`], dequantized to f32 (flat).
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self
            .get(name, shape)?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// The embedding matrix as f32 `(vocab, hidden)`, as the first layer
    /// reads it (scaled by `sqrt(hidden)` where the block says so; the tied
    /// output layer uses the file's matrix).
    pub fn embeddings(&self) -> Result<Vec<f32>> {
        let c = &self.config;
        let mut e = self.get_f32(EMBEDDINGS, &[c.vocab_size, c.hidden_size])?;
        if c.block.embed_scale {
            let scale = (c.hidden_size as f32).sqrt();
            e.iter_mut().for_each(|x| *x *= scale);
        }
        Ok(e)
    }
}
